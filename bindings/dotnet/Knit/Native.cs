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

        // Contexts, bus, events, streams, subscriptions.
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_get_ex(ClientHandle client, byte[] name, out IntPtr dataJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_set_ex(ClientHandle client, byte[] name, byte[] dataJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_update_ex(ClientHandle client, byte[] name, byte[] deltaJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_update_if(ClientHandle client, byte[] name, ulong expectedVersion, byte[] deltaJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_set_path(ClientHandle client, byte[] name, byte[] path, byte[] valueJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_set_paths(ClientHandle client, byte[] name, byte[] pathsJson, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_destroy(ClientHandle client, byte[] name);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_list(ClientHandle client, out IntPtr namesJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_context_subscribe(ClientHandle client, byte[] name, NativeContextFn fn, IntPtr userData, out IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_publish_ex(ClientHandle client, byte[] topic, byte[] dataJson, byte[] optionsJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_publish_batch(ClientHandle client, byte[] topic, byte[] itemsJson, byte[] optionsJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_subscribe_ex(ClientHandle client, byte[] topic, byte[] optionsJson, NativeMessageFn fn, IntPtr userData, out IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_events_subscribe(ClientHandle client, NativeEventFn fn, IntPtr userData, out IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_subscription_close(IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_create(ClientHandle client, byte[] name, byte[] optionsJson, NativeStreamRequestFn onRequest, IntPtr userData, out IntPtr stream);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_push(StreamHandle stream, byte[] dataJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_push_batch(StreamHandle stream, byte[] itemsJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_push_branches(StreamHandle stream, byte[] branchesJson, byte[] dataJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_close_branch(StreamHandle stream, byte[] branch);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_branches(StreamHandle stream, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_subscriptions(StreamHandle stream, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_close(IntPtr stream);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_accept(IntPtr request, byte[] branch, out IntPtr subscriber);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_reject(IntPtr request, byte[] reason);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_subscriber_push(IntPtr subscriber, byte[] dataJson);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_subscriber_close(IntPtr subscriber);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_subscriber_free(IntPtr subscriber);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_stream_subscribe(ClientHandle client, byte[] name, byte[] argsJson, byte[] target, uint waitMs, uint timeoutMs, NativeStreamDataFn onData, NativeStreamClosedFn onClosed, IntPtr userData, out IntPtr subscription);

        // Channels.
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_list(ClientHandle client, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_get(ClientHandle client, byte[] name, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_set_mode(ClientHandle client, uint mode);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_join(ClientHandle client, byte[] name);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_leave(ClientHandle client, byte[] name);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_joined(ClientHandle client, out IntPtr json);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_publish(ClientHandle client, byte[] dataJson, byte[] name, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_publish_fdc3(ClientHandle client, byte[] contextJson, byte[] name, out ulong version);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_subscribe(ClientHandle client, NativeChannelFn fn, IntPtr userData, out IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_subscribe_for(ClientHandle client, byte[] name, NativeChannelFn fn, IntPtr userData, out IntPtr subscription);
        [DllImport(Lib, CallingConvention = C)] public static extern int knit_channel_on_changed(ClientHandle client, NativeChannelsChangedFn fn, IntPtr userData, out IntPtr subscription);

        // Raw IntPtr-handle forms, for calls on handles a SafeHandle no longer owns (tests of
        // misuse: NULL and closed handles must give status codes).
        [DllImport(Lib, CallingConvention = C, EntryPoint = "knit_invoke_ex")] public static extern int knit_invoke_ex_raw(IntPtr client, byte[] method, byte[] argsJson, byte[] target, uint waitMs, uint timeoutMs, out IntPtr resultJson);

        [DllImport(Lib, CallingConvention = C, EntryPoint = "knit_context_set_ex")] public static extern int knit_context_set_ex_raw(IntPtr client, byte[] name, byte[] dataJson, out ulong version);

        /// <summary>A JSON string literal for s.</summary>
        public static string JsonString(string s)
        {
            var b = new System.Text.StringBuilder("\"");
            foreach (var c in s)
            {
                if (c == '"' || c == '\\') b.Append('\\').Append(c);
                else if (c < ' ') b.Append("\\u").Append(((int)c).ToString("x4"));
                else b.Append(c);
            }
            return b.Append('"').ToString();
        }

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
