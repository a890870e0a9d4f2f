// The .NET client: a SafeHandle over knit_client_t, method handlers as delegates, replies.
using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;
using System.Threading;

namespace Knit
{
    /// <summary>Owns a knit_client_t; releasing it calls knit_client_close.</summary>
    public sealed class ClientHandle : SafeHandle
    {
        public ClientHandle() : base(IntPtr.Zero, true) { }
        internal ClientHandle(IntPtr h) : base(IntPtr.Zero, true) { SetHandle(h); }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle()
        {
            int st = NativeMethods.knit_client_close(handle);
            return st == 0 || st == (int)Status.Closed;
        }
    }

    /// <summary>An incoming call: arguments and caller identity as JSON text.</summary>
    public sealed class Call
    {
        internal Call(string args, string caller, byte[] bytes) { ArgsJson = args; CallerJson = caller; Bytes = bytes; }
        public string ArgsJson { get; private set; }
        public string CallerJson { get; private set; }
        /// <summary>For raw-bytes handlers: the caller's bytes (or its arguments' JSON text).</summary>
        public byte[] Bytes { get; private set; }
    }

    /// <summary>The answer to one call: answer once, now or later, from any thread. Disposing
    /// (or finalising) it unanswered answers with "method handler did not reply".</summary>
    public sealed class Reply : IDisposable
    {
        IntPtr h;
        readonly object gate = new object();

        internal Reply(IntPtr h) { this.h = h; }
        ~Reply() { Abandon(); }

        public bool Answered { get { lock (gate) return h == IntPtr.Zero; } }

        /// <summary>Answers with a JSON result (invalid JSON throws InputException and leaves
        /// the reply unanswered).</summary>
        public void Ok(string resultJson) { Finish(p => NativeMethods.knit_reply_ok(p, NativeMethods.Utf8(resultJson))); }
        public void Bytes(byte[] data)
        {
            data = data ?? new byte[0];
            Finish(p => NativeMethods.knit_reply_bytes(p, data, (UIntPtr)data.Length));
        }
        public void Error(string message, string contextJson = null)
        {
            Finish(p => NativeMethods.knit_reply_error_ex(p, NativeMethods.Utf8(message), NativeMethods.Utf8(contextJson)));
        }

        void Finish(Func<IntPtr, int> answer)
        {
            int st;
            lock (gate)
            {
                if (h == IntPtr.Zero) throw KnitException.For((int)Status.Closed, null);
                st = answer(h);
                if (st == 0 || st == (int)Status.Closed)
                {
                    h = IntPtr.Zero;
                    GC.SuppressFinalize(this);
                }
            }
            KnitException.Check(st);
        }

        void Abandon()
        {
            IntPtr p;
            lock (gate) { p = h; h = IntPtr.Zero; }
            if (p != IntPtr.Zero) NativeMethods.knit_reply_error_ex(p, NativeMethods.Utf8("method handler did not reply"), null);
        }

        public void Dispose() { Abandon(); GC.SuppressFinalize(this); }
    }

    /// <summary>Invocation options. Target: null/"best", "all", "skip-mine", an application
    /// name, or a JSON instance filter.</summary>
    public sealed class InvokeOptions
    {
        public string Target;
        public uint WaitMs = NativeMethods.KNIT_DEFAULT_WAIT_MS;
        /// <summary>0: the default (30 s).</summary>
        public uint TimeoutMs;
    }

    /// <summary>A connection to the gateway. Handlers run on knit's dispatcher thread, or inside
    /// Poll for a client made with poll: true.</summary>
    public sealed partial class KnitClient : IDisposable
    {
        // One static trampoline per signature, alive for the process: the native side holds
        // its pointer. The handler is found through a GCHandle passed as user_data, kept
        // allocated until the client is disposed (unregister may run inside the handler).
        static readonly NativeMethodFn JsonTrampoline = OnJsonCall;
        static readonly NativeBytesMethodFn BytesTrampoline = OnBytesCall;

        readonly ClientHandle handle;
        readonly object gate = new object();
        readonly Dictionary<string, GCHandle> live = new Dictionary<string, GCHandle>();
        readonly List<GCHandle> retired = new List<GCHandle>();

        public KnitClient(string application, string gateway = null, bool poll = false, string wait = null, string instance = null)
        {
            uint flags = poll ? NativeMethods.KNIT_CONNECT_POLL : 0;
            if (wait == "spin") flags |= NativeMethods.KNIT_CONNECT_SPIN;
            else if (wait == "park") flags |= NativeMethods.KNIT_CONNECT_PARK;
            else if (wait != null) throw new ArgumentException("wait must be \"spin\", \"park\" or null");
            IntPtr h;
            KnitException.Check(NativeMethods.knit_client_connect_ex(NativeMethods.Utf8(gateway), NativeMethods.Utf8(application), NativeMethods.Utf8(instance), flags, 0, out h));
            handle = new ClientHandle(h);
        }

        /// <summary>The SafeHandle (its raw value is the knit_client_t*).</summary>
        public ClientHandle Handle { get { return handle; } }

        /// <summary>Closes (idempotent); afterwards none of this client's handlers or
        /// subscription callbacks runs, and its subscriptions and streams are closed.</summary>
        public void Dispose()
        {
            handle.Dispose();
            DisposeOpen(); // closed with the client: their handles are now stale, freed here
            lock (gate)
            {
                foreach (var g in live.Values) g.Free();
                foreach (var g in retired) g.Free();
                live.Clear();
                retired.Clear();
            }
        }

        ClientHandle H
        {
            get
            {
                if (handle.IsClosed) throw new UsageException((int)Status.Closed, "the client is closed", null);
                return handle;
            }
        }

        /// <summary>Registers a handler that returns the result as JSON; an exception answers
        /// with its message as the error.</summary>
        public void Register(string name, Func<Call, string> handler)
        {
            RegisterAsync(name, (call, reply) => reply.Ok(handler(call)));
        }

        /// <summary>Registers a handler that answers through the Reply, now or later.</summary>
        public void RegisterAsync(string name, Action<Call, Reply> handler)
        {
            Add(name, handler, g => NativeMethods.knit_register(H, NativeMethods.Utf8(name), JsonTrampoline, GCHandle.ToIntPtr(g)));
        }

        /// <summary>Registers a raw-bytes handler: returns the reply's bytes.</summary>
        public void RegisterBytes(string name, Func<Call, byte[]> handler)
        {
            Action<Call, Reply> h = (call, reply) => reply.Bytes(handler(call));
            Add(name, h, g => NativeMethods.knit_register_bytes(H, NativeMethods.Utf8(name), BytesTrampoline, GCHandle.ToIntPtr(g)));
        }

        void Add(string name, Action<Call, Reply> handler, Func<GCHandle, int> register)
        {
            var g = GCHandle.Alloc(handler);
            int st;
            try { st = register(g); }
            catch { g.Free(); throw; }
            if (st != 0) { g.Free(); KnitException.Check(st); }
            lock (gate) live[name] = g;
        }

        /// <summary>Removes one of our methods; when this returns its handler is not running.</summary>
        public void Unregister(string name)
        {
            KnitException.Check(NativeMethods.knit_unregister(H, NativeMethods.Utf8(name)));
            lock (gate)
            {
                GCHandle g;
                if (live.TryGetValue(name, out g)) { live.Remove(name); retired.Add(g); }
            }
        }

        /// <summary>Invokes; returns the io.Connect-shaped result JSON. Failures throw the
        /// status family's exception (with ResultJson when every server failed).</summary>
        public string Invoke(string method, string argsJson = "{}", InvokeOptions options = null)
        {
            var o = options ?? new InvokeOptions();
            IntPtr r;
            int st = NativeMethods.knit_invoke_ex(H, NativeMethods.Utf8(method), NativeMethods.Utf8(argsJson), NativeMethods.Utf8(o.Target), o.WaitMs, o.TimeoutMs, out r);
            // knit_string_free does not touch the thread's last error message.
            var json = NativeMethods.Take(r);
            if (st != 0) throw KnitException.For(st, json);
            return json;
        }

        /// <summary>Sends raw bytes; returns the server's bytes (or its result's JSON text).</summary>
        public byte[] InvokeBytes(string method, byte[] data, InvokeOptions options = null)
        {
            var o = options ?? new InvokeOptions();
            data = data ?? new byte[0];
            IntPtr p;
            UIntPtr n;
            KnitException.Check(NativeMethods.knit_invoke_bytes(H, NativeMethods.Utf8(method), data, (UIntPtr)data.Length, NativeMethods.Utf8(o.Target), o.WaitMs, o.TimeoutMs, out p, out n));
            try
            {
                var b = new byte[(int)n];
                if (b.Length > 0) Marshal.Copy(p, b, 0, b.Length);
                return b;
            }
            finally { NativeMethods.knit_bytes_free(p); }
        }

        /// <summary>Poll mode: runs pending handlers on this thread; returns how many ran.</summary>
        public uint Poll(uint timeoutMs)
        {
            uint n;
            KnitException.Check(NativeMethods.knit_client_poll(H, timeoutMs, out n));
            return n;
        }

        delegate int JsonFn(ClientHandle c, out IntPtr json);

        string Json(JsonFn f)
        {
            IntPtr p;
            int st = f(H, out p);
            var s = NativeMethods.Take(p);
            KnitException.Check(st);
            return s;
        }

        public string Methods() { return Json(NativeMethods.knit_methods); }
        public string Servers() { return Json(NativeMethods.knit_servers); }
        public string Instance() { return Json(NativeMethods.knit_client_instance); }
        public bool Connected { get { return !handle.IsClosed && NativeMethods.knit_client_connected(handle) == 0; } }
        public ulong MaxPayload
        {
            get { ulong n; KnitException.Check(NativeMethods.knit_client_max_payload(H, out n)); return n; }
        }

        /// <summary>Waits until the method has a server; false after the timeout.</summary>
        public bool WaitForMethod(string name, uint timeoutMs)
        {
            IntPtr p;
            int st = NativeMethods.knit_wait_for_method(H, NativeMethods.Utf8(name), timeoutMs, out p);
            NativeMethods.Take(p);
            if (st == (int)Status.NoServer) return false;
            KnitException.Check(st);
            return true;
        }

        // ----- callbacks from native code: no exception may escape -----------------------------

        static void Dispatch(IntPtr ud, IntPtr reply, Func<Call> call)
        {
            Reply r = null;
            try
            {
                r = new Reply(reply);
                var handler = (Action<Call, Reply>)GCHandle.FromIntPtr(ud).Target;
                handler(call(), r);
            }
            catch (Exception e)
            {
                try
                {
                    if (r == null) r = new Reply(reply);
                    if (!r.Answered) r.Error(e.Message);
                }
                catch (Exception) { }
            }
        }

        static void OnJsonCall(IntPtr ud, IntPtr args, IntPtr caller, IntPtr reply)
        {
            Dispatch(ud, reply, () => new Call(NativeMethods.Read(args), NativeMethods.Read(caller), null));
        }

        static void OnBytesCall(IntPtr ud, IntPtr args, UIntPtr len, IntPtr caller, IntPtr reply)
        {
            Dispatch(ud, reply, () =>
            {
                var b = new byte[(int)len];
                if (b.Length > 0) Marshal.Copy(args, b, 0, b.Length);
                return new Call(null, NativeMethods.Read(caller), b);
            });
        }
    }
}
