// P/Invoke declarations of libknit's C ABI (bindings/c/include/knit.h). Blittable signatures
// and DllImport only, so the same source builds on .NET 8 and on Mono's mcs.
using System;
using System.Runtime.InteropServices;

namespace Knit
{
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeMethodFn(IntPtr userData, IntPtr argsJson, IntPtr callerJson, IntPtr reply);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeBytesMethodFn(IntPtr userData, IntPtr args, UIntPtr argsLen, IntPtr callerJson, IntPtr reply);

    internal static class NativeMethods
    {
        const string Lib = "knit";
        const CallingConvention C = CallingConvention.Cdecl;

        public const uint KNIT_CONNECT_POLL = 0x1;
        public const uint KNIT_CONNECT_SPIN = 0x2;
        public const uint KNIT_CONNECT_PARK = 0x4;
        public const uint KNIT_DEFAULT_WAIT_MS = 30000;

        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_connect_ex(byte[] gateway, byte[] application, byte[] instance, uint flags, uint connectTimeoutMs, out IntPtr client);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_connect(byte[] gateway, byte[] application, uint flags, out IntPtr client);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_close(IntPtr client);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_poll(ClientHandle client, uint timeoutMs, out uint handled);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_connected(ClientHandle client);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_instance(ClientHandle client, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_max_payload(ClientHandle client, out ulong max);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_methods(ClientHandle client, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_servers(ClientHandle client, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_wait_for_method(ClientHandle client, byte[] method, uint timeoutMs, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_register(ClientHandle client, byte[] method, NativeMethodFn handler, IntPtr userData);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_register_bytes(ClientHandle client, byte[] method, NativeBytesMethodFn handler, IntPtr userData);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_unregister(ClientHandle client, byte[] method);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_invoke_ex(ClientHandle client, byte[] method, byte[] argsJson, byte[] target, uint waitMs, uint timeoutMs, out IntPtr resultJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_invoke_bytes(ClientHandle client, byte[] method, byte[] data, UIntPtr len, byte[] target, uint waitMs, uint timeoutMs, out IntPtr outData, out UIntPtr outLen);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_reply_ok(IntPtr reply, byte[] resultJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_reply_bytes(IntPtr reply, byte[] data, UIntPtr len);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_reply_error_ex(IntPtr reply, byte[] message, byte[] contextJson);
        [DllImport(Lib, CallingConvention = C)] public static extern void knit_string_free(IntPtr s);
        [DllImport(Lib, CallingConvention = C)] public static extern void knit_bytes_free(IntPtr data);
        [DllImport(Lib, CallingConvention = C)] public static extern IntPtr knit_status_string(int status);
        [DllImport(Lib, CallingConvention = C)] public static extern IntPtr knit_status_name(int status);
        [DllImport(Lib, CallingConvention = C)] public static extern IntPtr knit_status_family(int status);
        [DllImport(Lib, CallingConvention = C)] public static extern IntPtr knit_version();
        [DllImport(Lib, CallingConvention = C)] public static extern IntPtr knit_last_error_message();

        // Raw IntPtr-handle forms, for calls on handles a SafeHandle no longer owns (tests of
        // misuse: NULL and closed handles must give status codes).
        [DllImport(Lib, CallingConvention = C, EntryPoint = "knit_invoke_ex")] public static extern int knit_invoke_ex_raw(IntPtr client, byte[] method, byte[] argsJson, byte[] target, uint waitMs, uint timeoutMs, out IntPtr resultJson);

        /// <summary>NUL-terminated UTF-8, or null for null.</summary>
        public static byte[] Utf8(string s)
        {
            if (s == null) return null;
            var n = System.Text.Encoding.UTF8.GetByteCount(s);
            var b = new byte[n + 1];
            System.Text.Encoding.UTF8.GetBytes(s, 0, s.Length, b, 0);
            return b;
        }

        /// <summary>Reads a NUL-terminated UTF-8 string knit owns (not freed).</summary>
        public static string Read(IntPtr p)
        {
            if (p == IntPtr.Zero) return null;
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            var b = new byte[n];
            Marshal.Copy(p, b, 0, n);
            return System.Text.Encoding.UTF8.GetString(b);
        }

        /// <summary>Reads and frees a string knit returned.</summary>
        public static string Take(IntPtr p)
        {
            if (p == IntPtr.Zero) return null;
            try { return Read(p); }
            finally { knit_string_free(p); }
        }
    }
}
