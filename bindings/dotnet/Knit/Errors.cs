// Status codes and exceptions. The codes mirror knit's one status table (src/status.rs);
// tests/Tests.cs checks every value against the library's knit_status_name, and the exception
// class of a code is chosen by the family the library reports (knit_status_family).
using System;

namespace Knit
{
    /// <summary>knit status codes (KNIT_* in knit.h).</summary>
    public enum Status
    {
        Ok = 0,
        InvalidArgument = 1,
        NoServer = 3,
        Timeout = 4,
        MethodFailed = 5,
        GatewayUnreachable = 6,
        PermissionDenied = 7,
        BadInput = 8,
        PayloadTooLarge = 9,
        PeerLeft = 10,
        Disconnected = 11,
        AlreadyExists = 12,
        NotFound = 13,
        Closed = 14,
        Protocol = 15,
        Internal = 16,
        AlreadyRunning = 17,
        Busy = 18,
    }

    /// <summary>A failed knit call: its status, detail message, and for an invocation that
    /// failed on every server, the io.Connect-shaped result JSON.</summary>
    public class KnitException : Exception
    {
        public KnitException(int status, string message, string resultJson)
            : base(message)
        {
            Code = status;
            ResultJson = resultJson;
        }

        /// <summary>The raw code (may be one this binding does not name).</summary>
        public int Code { get; private set; }
        public Status Status { get { return (Status)Code; } }
        /// <summary>"TIMEOUT", "METHOD_FAILED", …</summary>
        public string StatusName { get { return NativeMethods.Read(NativeMethods.knit_status_name(Code)); } }
        /// <summary>"usage", "not_found", "timeout", "remote", "connection", "permission",
        /// "input", "internal".</summary>
        public string Family { get { return NativeMethods.Read(NativeMethods.knit_status_family(Code)); } }
        /// <summary>The invocation result when every server failed, else null.</summary>
        public string ResultJson { get; private set; }

        /// <summary>The exception for a status, with this thread's last error message.</summary>
        public static KnitException For(int status, string resultJson)
        {
            var message = NativeMethods.Read(NativeMethods.knit_last_error_message());
            if (string.IsNullOrEmpty(message)) message = NativeMethods.Read(NativeMethods.knit_status_string(status));
            switch (NativeMethods.Read(NativeMethods.knit_status_family(status)))
            {
                case "usage": return new UsageException(status, message, resultJson);
                case "not_found": return new NotFoundException(status, message, resultJson);
                case "timeout": return new KnitTimeoutException(status, message, resultJson);
                case "remote": return new RemoteException(status, message, resultJson);
                case "connection": return new KnitConnectionException(status, message, resultJson);
                case "permission": return new KnitPermissionException(status, message, resultJson);
                case "input": return new InputException(status, message, resultJson);
                default: return new InternalKnitException(status, message, resultJson);
            }
        }

        internal static void Check(int status)
        {
            if (status != 0) throw For(status, null);
        }
    }

    /// <summary>INVALID_ARGUMENT, CLOSED.</summary>
    public class UsageException : KnitException { public UsageException(int s, string m, string r) : base(s, m, r) { } }
    /// <summary>NO_SERVER, NOT_FOUND.</summary>
    public class NotFoundException : KnitException { public NotFoundException(int s, string m, string r) : base(s, m, r) { } }
    /// <summary>TIMEOUT, BUSY.</summary>
    public class KnitTimeoutException : KnitException { public KnitTimeoutException(int s, string m, string r) : base(s, m, r) { } }
    /// <summary>METHOD_FAILED, PEER_LEFT.</summary>
    public class RemoteException : KnitException { public RemoteException(int s, string m, string r) : base(s, m, r) { } }
    /// <summary>GATEWAY_UNREACHABLE, DISCONNECTED, PROTOCOL, ALREADY_RUNNING.</summary>
    public class KnitConnectionException : KnitException { public KnitConnectionException(int s, string m, string r) : base(s, m, r) { } }
    /// <summary>PERMISSION_DENIED.</summary>
    public class KnitPermissionException : KnitException { public KnitPermissionException(int s, string m, string r) : base(s, m, r) { } }
    /// <summary>BAD_INPUT, PAYLOAD_TOO_LARGE, ALREADY_EXISTS.</summary>
    public class InputException : KnitException { public InputException(int s, string m, string r) : base(s, m, r) { } }
    /// <summary>INTERNAL and unknown codes.</summary>
    public class InternalKnitException : KnitException { public InternalKnitException(int s, string m, string r) : base(s, m, r) { } }
}
