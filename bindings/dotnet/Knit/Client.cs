// The .NET client: a knit_client_t handle, method handlers as delegates, replies.
using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;
using System.Threading;

namespace Knit
{
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
        public void Ok(string resultJson) { Finish(p => NativeMethods.knit_reply_ok(p, NativeMethods.Json(resultJson))); }
        public void Bytes(byte[] data)
        {
            data = data ?? new byte[0];
            Finish(p => NativeMethods.knit_reply_bytes(p, data, (UIntPtr)data.Length));
        }
        public void Error(string message, string contextJson = null)
        {
            Finish(p => NativeMethods.knit_reply_error_ex(p, NativeMethods.Utf8(message), NativeMethods.Json(contextJson)));
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
        // The client is a plain handle value with a closed flag, not a SafeHandle. knit handles
        // are entries in knit's handle tables, not pointers (ffi/README.md): once
        // knit_client_close has run, every call on the value — made before, during or after it —
        // returns KNIT_CLOSED; none reaches freed memory or a newer client. A SafeHandle adds no
        // safety to that, and its reference count did harm: Dispose only deferred
        // knit_client_close while any call on the client was in flight (another thread's
        // WaitForMethod, the Poll or the dispatcher wait a handler runs in), so the client went on
        // serving with its handlers' GCHandles already freed (a crash), and calls racing with
        // Dispose failed in the marshaller with ObjectDisposedException. So: P/Invokes take a
        // HandleRef (it keeps this object alive for the call, so the finaliser cannot close the
        // client under a running call), Dispose calls knit_client_close at once, and handlers'
        // GCHandles are freed only once knit_client_close has returned (knit then calls none of
        // them again).
        //
        // One static trampoline per signature, alive for the process: the native side holds its
        // pointer. The handler is found through a GCHandle passed as user_data.
        static readonly NativeMethodFn JsonTrampoline = OnJsonCall;
        static readonly NativeBytesMethodFn BytesTrampoline = OnBytesCall;

        readonly IntPtr raw;
        int closing;    // 1 once Close began: later calls throw Closed without calling knit
        bool closed;    // under gate: knit_client_close has returned
        readonly object gate = new object();
        readonly Dictionary<string, Registration> live = new Dictionary<string, Registration>();

        /// <summary>A registered handler's GCHandle (freed once, under gate).</summary>
        sealed class Registration
        {
            public GCHandle Handle;
            public bool Freed;
            public void Free() { if (!Freed) { Freed = true; Handle.Free(); } }
        }

        // knit callbacks running on this thread (of any client), one per nesting level.
        [ThreadStatic] static int callbackDepth;

        // Every client not closed yet, closed by a ProcessExit handler: a program whose Main
        // returns without Dispose while callbacks run must still exit. (At exit Mono aborts the
        // threads running managed code, knit's dispatcher among them, and a finaliser's close
        // then waited forever for the aborted callback.) Weak references keep no client alive.
        // They track resurrection: a client that became unreachable but whose finaliser has not
        // finished is still closed through Close, which makes the finaliser's Close wait for
        // this one (closing its raw handle directly let the finaliser free the GCHandles while
        // this close still waited for a running handler).
        static readonly Dictionary<IntPtr, WeakReference> unclosed = new Dictionary<IntPtr, WeakReference>();

        static KnitClient()
        {
            AppDomain.CurrentDomain.ProcessExit += CloseAllAtExit;
        }

        static void CloseAllAtExit(object sender, EventArgs e)
        {
            List<KeyValuePair<IntPtr, WeakReference>> all;
            lock (unclosed) all = new List<KeyValuePair<IntPtr, WeakReference>>(unclosed);
            foreach (var kv in all)
            {
                try
                {
                    var c = kv.Value.Target as KnitClient;
                    if (c != null) c.Close(); // else collected: its finaliser closed it
                }
                catch (Exception) { }
            }
        }

        public KnitClient(string application, string gateway = null, bool poll = false, string wait = null, string instance = null)
        {
            uint flags = poll ? NativeMethods.KNIT_CONNECT_POLL : 0;
            if (wait == "spin") flags |= NativeMethods.KNIT_CONNECT_SPIN;
            else if (wait == "park") flags |= NativeMethods.KNIT_CONNECT_PARK;
            else if (wait != null) throw new ArgumentException("wait must be \"spin\", \"park\" or null");
            IntPtr h;
            Check(NativeMethods.knit_client_connect_ex(NativeMethods.Utf8(gateway), NativeMethods.Utf8(application), NativeMethods.Utf8(instance), flags, 0, out h));
            raw = h;
            lock (unclosed) unclosed[h] = new WeakReference(this, true);
        }

        /// <summary>Closes the client if nobody disposed it.</summary>
        ~KnitClient() { Close(); }

        /// <summary>The raw knit_client_t* (a handle-table entry: after Dispose, knit answers
        /// calls on it with KNIT_CLOSED).</summary>
        public IntPtr Handle { get { return raw; } }

        /// <summary>Closes the client at once (idempotent; from any thread, also from inside
        /// one of its own handlers or callbacks). Calls on it running in other threads end with
        /// UsageException (Status.Closed), as does every later use. When Dispose returns, none of
        /// this client's handlers or subscription callbacks is running (except the callback it
        /// was called from, and those that callback runs inside) and none runs again; its
        /// subscriptions and streams are closed.</summary>
        public void Dispose()
        {
            Close();
            GC.SuppressFinalize(this);
        }

        void Close()
        {
            if (raw == IntPtr.Zero) return; // the constructor failed
            if (Interlocked.Exchange(ref closing, 1) != 0)
            {
                // Another thread is closing: wait until knit_client_close has returned, so that
                // when Dispose returns no callback runs. Not inside a callback: the closing thread
                // may be waiting for that very callback to return.
                if (callbackDepth == 0) lock (gate) while (!closed) Monitor.Wait(gate);
                return;
            }
            NativeMethods.knit_client_close(raw); // blocks until running callbacks return
            List<Registration> handlers;
            lock (gate)
            {
                closed = true;
                handlers = new List<Registration>(live.Values);
                live.Clear();
                foreach (var r in handlers) r.Free(); // knit calls none of them again
                foreach (var g in afterClose) g.Free();
                afterClose.Clear();
                Monitor.PulseAll(gate);
            }
            lock (unclosed) unclosed.Remove(raw);
            DisposeOpen(); // closed with the client: their handles are now stale, freed here
        }

        HandleRef H
        {
            get
            {
                if (Volatile.Read(ref closing) != 0) throw ClosedException();
                return new HandleRef(this, raw);
            }
        }

        static UsageException ClosedException() { return new UsageException((int)Status.Closed, "the client is closed", null); }

        /// <summary>The exception for a failed call. A call that was waiting on the gateway
        /// when another thread closed the client can come back DISCONNECTED (a subscribe
        /// waiting for its acknowledgement): that is Closed too, like every use of a closed
        /// client.</summary>
        KnitException Failure(int st, string resultJson)
        {
            if (st == (int)Status.Disconnected && Volatile.Read(ref closing) != 0) return ClosedException();
            return KnitException.For(st, resultJson);
        }

        void Check(int st)
        {
            if (st != 0) throw Failure(st, null);
        }

        /// <summary>A required argument that is null: INVALID_ARGUMENT, as knit says of a NULL one.</summary>
        internal static void NotNull(object value, string what)
        {
            if (value == null) throw new UsageException((int)Status.InvalidArgument, what + " is null", null);
        }

        /// <summary>Registers a handler that returns the result as JSON; an exception answers
        /// with its message as the error.</summary>
        public void Register(string name, Func<Call, string> handler)
        {
            NotNull(handler, "handler");
            RegisterAsync(name, (call, reply) => reply.Ok(handler(call)));
        }

        /// <summary>Registers a handler that answers through the Reply, now or later.</summary>
        public void RegisterAsync(string name, Action<Call, Reply> handler)
        {
            NotNull(handler, "handler");
            var n = NativeMethods.Utf8(name);
            Add(name, handler, (c, ud) => NativeMethods.knit_register(c, n, JsonTrampoline, ud));
        }

        /// <summary>Registers a raw-bytes handler: returns the reply's bytes.</summary>
        public void RegisterBytes(string name, Func<Call, byte[]> handler)
        {
            NotNull(handler, "handler");
            var n = NativeMethods.Utf8(name);
            Action<Call, Reply> h = (call, reply) => reply.Bytes(handler(call));
            Add(name, h, (c, ud) => NativeMethods.knit_register_bytes(c, n, BytesTrampoline, ud));
        }

        void Add(string name, Action<Call, Reply> handler, Func<HandleRef, IntPtr, int> register)
        {
            var c = H; // a closed client throws before anything is allocated
            var r = new Registration { Handle = GCHandle.Alloc(handler) };
            int st;
            try { st = register(c, GCHandle.ToIntPtr(r.Handle)); }
            catch { lock (gate) r.Free(); throw; }
            if (st != 0) { lock (gate) r.Free(); throw Failure(st, null); }
            lock (gate)
            {
                if (closed) { r.Free(); return; } // closed meanwhile: knit no longer calls it
                // One left here by an Unregister racing with this Register is unregistered in
                // knit (ours succeeded), and its handler never runs again.
                Registration old;
                if (live.TryGetValue(name, out old)) old.Free();
                live[name] = r;
            }
        }

        /// <summary>Removes one of our methods; when this returns its handler is not running
        /// (unless this is called from inside it) and is not called again.</summary>
        public void Unregister(string name)
        {
            var c = H;
            var n = NativeMethods.Utf8(name);
            Registration r = null;
            if (name != null) lock (gate) live.TryGetValue(name, out r);
            Check(NativeMethods.knit_unregister(c, n));
            if (r == null) return;
            // Freed at once, even from inside the handler itself: once knit_unregister returns,
            // knit does not call this handler again (the C contract lets user_data be freed
            // then), and a run still going on took its delegate from the GCHandle before it
            // started and never reads the GCHandle again.
            lock (gate)
            {
                Registration now;
                if (live.TryGetValue(name, out now) && now == r) live.Remove(name);
                r.Free();
            }
        }

        /// <summary>Invokes; returns the io.Connect-shaped result JSON. Failures throw the
        /// status family's exception (with ResultJson when every server failed).</summary>
        public string Invoke(string method, string argsJson = "{}", InvokeOptions options = null)
        {
            var o = options ?? new InvokeOptions();
            IntPtr r;
            int st = NativeMethods.knit_invoke_ex(H, NativeMethods.Utf8(method), NativeMethods.Json(argsJson), NativeMethods.Utf8(o.Target), o.WaitMs, o.TimeoutMs, out r);
            // knit_string_free does not touch the thread's last error message.
            var json = NativeMethods.Take(r);
            if (st != 0) throw Failure(st, json);
            return json;
        }

        /// <summary>Sends raw bytes; returns the server's bytes (or its result's JSON text).</summary>
        public byte[] InvokeBytes(string method, byte[] data, InvokeOptions options = null)
        {
            var o = options ?? new InvokeOptions();
            data = data ?? new byte[0];
            IntPtr p;
            UIntPtr n;
            Check(NativeMethods.knit_invoke_bytes(H, NativeMethods.Utf8(method), data, (UIntPtr)data.Length, NativeMethods.Utf8(o.Target), o.WaitMs, o.TimeoutMs, out p, out n));
            try
            {
                var b = new byte[(int)n];
                if (b.Length > 0) Marshal.Copy(p, b, 0, b.Length);
                return b;
            }
            finally { NativeMethods.knit_bytes_free(p); }
        }

        /// <summary>Poll mode: runs pending handlers on this thread; returns how many ran.
        /// UsageException (Status.Closed) once the client is closed, also by a handler it ran.</summary>
        public uint Poll(uint timeoutMs)
        {
            uint n;
            Check(NativeMethods.knit_client_poll(H, timeoutMs, out n));
            return n;
        }

        delegate int JsonFn(HandleRef c, out IntPtr json);

        string Json(JsonFn f)
        {
            IntPtr p;
            int st = f(H, out p);
            var s = NativeMethods.Take(p);
            Check(st);
            return s;
        }

        public string Methods() { return Json(NativeMethods.knit_methods); }
        public string Servers() { return Json(NativeMethods.knit_servers); }
        public string Instance() { return Json(NativeMethods.knit_client_instance); }
        /// <summary>False once disposed, or while the gateway connection is down.</summary>
        public bool Connected
        {
            get { return Volatile.Read(ref closing) == 0 && NativeMethods.knit_client_connected(new HandleRef(this, raw)) == 0; }
        }
        public ulong MaxPayload
        {
            get { ulong n; Check(NativeMethods.knit_client_max_payload(H, out n)); return n; }
        }

        /// <summary>Waits until the method has a server; false after the timeout.</summary>
        public bool WaitForMethod(string name, uint timeoutMs)
        {
            IntPtr p;
            int st = NativeMethods.knit_wait_for_method(H, NativeMethods.Utf8(name), timeoutMs, out p);
            NativeMethods.Take(p);
            if (st == (int)Status.NoServer) return false;
            Check(st);
            return true;
        }

        // ----- callbacks from native code: no exception may escape -----------------------------
        //
        // Not even ThreadAbortException: Mono aborts the threads running managed code at exit,
        // and an abort that unwound into knit (knit.h forbids unwinding through it) left knit's
        // dispatcher dead in the middle of a callback. Every trampoline catches it and resets
        // the abort (there are no thread aborts in .NET Core and later).

        internal static void ResetAbort()
        {
#if !NETCOREAPP
            try { Thread.ResetAbort(); }
            catch (Exception) { }
#endif
        }

        static void Dispatch(IntPtr ud, IntPtr reply, Func<Call> call)
        {
            callbackDepth++;
            Reply r = null;
            try
            {
                r = new Reply(reply);
                var handler = (Action<Call, Reply>)GCHandle.FromIntPtr(ud).Target;
                handler(call(), r);
            }
            catch (ThreadAbortException)
            {
                ResetAbort();
                Fail(r, reply, "method handler was aborted");
            }
            catch (Exception e)
            {
                Fail(r, reply, e.Message ?? e.GetType().FullName);
            }
            finally { callbackDepth--; }
        }

        /// <summary>Answers a call its handler failed with an error, if it is unanswered;
        /// whatever goes wrong, the caller is answered (never left to its timeout).</summary>
        static void Fail(Reply r, IntPtr reply, string message)
        {
            try
            {
                if (r == null) r = new Reply(reply);
                foreach (var m in new[] { message, "method handler failed" })
                {
                    if (r.Answered) return;
                    try { r.Error(m); }
                    catch (Exception) { } // null, or text knit refuses (a NUL, a lone surrogate)
                }
                r.Dispose(); // still unanswered: "method handler did not reply"
            }
            catch (ThreadAbortException) { ResetAbort(); }
            catch (Exception) { }
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
