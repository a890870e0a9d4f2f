// P/Invoke declarations of libknit's C ABI (bindings/c/include/knit.h). Simple signatures and
// DllImport only, so the same source builds on .NET 8 and on Mono's mcs. Clients and streams
// are passed as HandleRef (the raw handle plus its owner, kept alive for the call), never as a
// SafeHandle: see KnitClient for why.
using System;
using System.Runtime.InteropServices;
using System.Text;

namespace Knit
{
    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeMethodFn(IntPtr userData, IntPtr argsJson, IntPtr callerJson, IntPtr reply);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeBytesMethodFn(IntPtr userData, IntPtr args, UIntPtr argsLen, IntPtr callerJson, IntPtr reply);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeContextFn(IntPtr userData, IntPtr name, IntPtr dataJson, IntPtr deltaJson, ulong version);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeMessageFn(IntPtr userData, IntPtr topic, IntPtr dataJson, IntPtr sourceJson);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeEventFn(IntPtr userData, IntPtr eventJson);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeStreamRequestFn(IntPtr userData, IntPtr request, IntPtr argsJson, IntPtr callerJson);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeStreamDataFn(IntPtr userData, IntPtr dataJson, IntPtr serverJson, uint flags, ulong gap);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeStreamClosedFn(IntPtr userData, IntPtr reason, uint flags);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeChannelFn(IntPtr userData, IntPtr channel, IntPtr dataJson, IntPtr contextJson, ulong version);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeChannelsChangedFn(IntPtr userData, IntPtr channelsJson);

    internal static class NativeMethods
    {
        const string Lib = "knit";
        const CallingConvention C = CallingConvention.Cdecl;

        public const uint KNIT_CONNECT_POLL = 0x1;
        public const uint KNIT_CONNECT_SPIN = 0x2;
        public const uint KNIT_CONNECT_PARK = 0x4;
        public const uint KNIT_DEFAULT_WAIT_MS = 30000;
        public const uint KNIT_STREAM_PRIVATE = 0x1;
        public const uint KNIT_STREAM_SERVER_INITIATED = 0x2;

        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_connect_ex(byte[] gateway, byte[] application, byte[] instance, uint flags, uint connectTimeoutMs, out IntPtr client);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_connect(byte[] gateway, byte[] application, uint flags, out IntPtr client);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_close(IntPtr client);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_poll(HandleRef client, uint timeoutMs, out uint handled);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_connected(HandleRef client);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_instance(HandleRef client, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_client_max_payload(HandleRef client, out ulong max);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_methods(HandleRef client, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_servers(HandleRef client, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_wait_for_method(HandleRef client, byte[] method, uint timeoutMs, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_register(HandleRef client, byte[] method, NativeMethodFn handler, IntPtr userData);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_register_bytes(HandleRef client, byte[] method, NativeBytesMethodFn handler, IntPtr userData);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_unregister(HandleRef client, byte[] method);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_invoke_ex(HandleRef client, byte[] method, byte[] argsJson, byte[] target, uint waitMs, uint timeoutMs, out IntPtr resultJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_invoke_bytes(HandleRef client, byte[] method, byte[] data, UIntPtr len, byte[] target, uint waitMs, uint timeoutMs, out IntPtr outData, out UIntPtr outLen);
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

        // Contexts, bus, events, streams, subscriptions.
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_get_ex(HandleRef client, byte[] name, out IntPtr dataJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_set_ex(HandleRef client, byte[] name, byte[] dataJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_update_ex(HandleRef client, byte[] name, byte[] deltaJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_update_if(HandleRef client, byte[] name, ulong expectedVersion, byte[] deltaJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_set_path(HandleRef client, byte[] name, byte[] path, byte[] valueJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_set_paths(HandleRef client, byte[] name, byte[] pathsJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_destroy(HandleRef client, byte[] name);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_list(HandleRef client, out IntPtr namesJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_subscribe(HandleRef client, byte[] name, NativeContextFn fn, IntPtr userData, out IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_publish_ex(HandleRef client, byte[] topic, byte[] dataJson, byte[] optionsJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_publish_batch(HandleRef client, byte[] topic, byte[] itemsJson, byte[] optionsJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_subscribe_ex(HandleRef client, byte[] topic, byte[] optionsJson, NativeMessageFn fn, IntPtr userData, out IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_events_subscribe(HandleRef client, NativeEventFn fn, IntPtr userData, out IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_subscription_close(IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_create(HandleRef client, byte[] name, byte[] optionsJson, NativeStreamRequestFn onRequest, IntPtr userData, out IntPtr stream);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_push(HandleRef stream, byte[] dataJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_push_batch(HandleRef stream, byte[] itemsJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_push_branches(HandleRef stream, byte[] branchesJson, byte[] dataJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_close_branch(HandleRef stream, byte[] branch);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_branches(HandleRef stream, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_subscriptions(HandleRef stream, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_close(IntPtr stream);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_accept(IntPtr request, byte[] branch, out IntPtr subscriber);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_reject(IntPtr request, byte[] reason);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_subscriber_push(IntPtr subscriber, byte[] dataJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_subscriber_close(IntPtr subscriber);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_subscriber_free(IntPtr subscriber);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_subscribe(HandleRef client, byte[] name, byte[] argsJson, byte[] target, uint waitMs, uint timeoutMs, NativeStreamDataFn onData, NativeStreamClosedFn onClosed, IntPtr userData, out IntPtr subscription);

        // Channels.
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_list(HandleRef client, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_get(HandleRef client, byte[] name, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_set_mode(HandleRef client, uint mode);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_join(HandleRef client, byte[] name);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_leave(HandleRef client, byte[] name);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_joined(HandleRef client, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_publish(HandleRef client, byte[] dataJson, byte[] name, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_publish_fdc3(HandleRef client, byte[] contextJson, byte[] name, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_subscribe(HandleRef client, NativeChannelFn fn, IntPtr userData, out IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_subscribe_for(HandleRef client, byte[] name, NativeChannelFn fn, IntPtr userData, out IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_on_changed(HandleRef client, NativeChannelsChangedFn fn, IntPtr userData, out IntPtr subscription);

        // Raw IntPtr-handle forms, for calls on handles no object owns any more (tests of
        // misuse: NULL and closed handles must give status codes).
        [DllImport(Lib, CallingConvention = C, EntryPoint = "knit_invoke_ex")] public static extern int knit_invoke_ex_raw(IntPtr client, byte[] method, byte[] argsJson, byte[] target, uint waitMs, uint timeoutMs, out IntPtr resultJson);

        [DllImport(Lib, CallingConvention = C, EntryPoint = "knit_context_set_ex")] public static extern int knit_context_set_ex_raw(IntPtr client, byte[] name, byte[] dataJson, out ulong version);

        /// <summary>A JSON string literal for s.</summary>
        public static string JsonString(string s)
        {
            var b = new StringBuilder("\"");
            foreach (var c in s)
            {
                if (c == '"' || c == '\\') b.Append('\\').Append(c);
                else if (c < ' ') b.Append("\\u").Append(((int)c).ToString("x4"));
                else b.Append(c);
            }
            return b.Append('"').ToString();
        }

        // Strict UTF-8: a lone UTF-16 surrogate throws instead of becoming U+FFFD.
        static readonly UTF8Encoding StrictUtf8 = new UTF8Encoding(false, true);

        /// <summary>A name, identifier or other plain text argument as NUL-terminated UTF-8, or
        /// null for null. A string knit would not receive whole — an embedded NUL (C would
        /// stop there) or a lone surrogate (not encodable as UTF-8) — is refused with
        /// UsageException/InvalidArgument, as the C ABI refuses text that is not UTF-8.</summary>
        public static byte[] Utf8(string s) { return Encode(s, Status.InvalidArgument); }

        /// <summary>JSON text (arguments, data, results) as NUL-terminated UTF-8, or null for
        /// null; the same refusals, as InputException/BadInput (as the C ABI answers JSON text
        /// that is not UTF-8).</summary>
        public static byte[] Json(string s) { return Encode(s, Status.BadInput); }

        static byte[] Encode(string s, Status refusal)
        {
            if (s == null) return null;
            if (s.IndexOf('\0') >= 0)
                throw Refused(refusal, "a string argument contains a NUL character (U+0000), which a C string cannot carry: " + Excerpt(s));
            try
            {
                var n = StrictUtf8.GetByteCount(s);
                var b = new byte[n + 1];
                StrictUtf8.GetBytes(s, 0, s.Length, b, 0);
                return b;
            }
            catch (EncoderFallbackException)
            {
                throw Refused(refusal, "a string argument is not valid UTF-16 (a lone surrogate), so it has no UTF-8 form: " + Excerpt(s));
            }
        }

        static KnitException Refused(Status refusal, string message)
        {
            if (refusal == Status.BadInput) return new InputException((int)refusal, message, null);
            return new UsageException((int)refusal, message, null);
        }

        static string Excerpt(string s)
        {
            var b = new StringBuilder("\"");
            foreach (var c in s.Length > 60 ? s.Substring(0, 60) : s)
            {
                if (c < ' ' || char.IsSurrogate(c)) b.Append("\\u").Append(((int)c).ToString("x4"));
                else b.Append(c);
            }
            return b.Append(s.Length > 60 ? "\"…" : "\"").ToString();
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
