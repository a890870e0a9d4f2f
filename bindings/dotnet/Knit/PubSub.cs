// Subscriptions (SafeHandle over knit_subscription_t), shared contexts, the bus, streams and
// discovery events. Callbacks go through static trampolines (alive for the process) and find
// their handler through a GCHandle passed as user_data, freed when the subscription closes (or
// at once when making it fails). No exception escapes a callback into native code, not even
// ThreadAbortException.
using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;
using System.Threading;

namespace Knit
{
    /// <summary>Owns a knit_subscription_t; releasing it calls knit_subscription_close (then
    /// the callback is not running and will not run again) and frees the handler's GCHandle.</summary>
    public sealed class SubscriptionHandle : SafeHandle
    {
        internal GCHandle State;
        readonly KnitClient owner;
        public SubscriptionHandle() : base(IntPtr.Zero, true) { }
        internal SubscriptionHandle(IntPtr h, GCHandle state, KnitClient owner) : base(IntPtr.Zero, true) { SetHandle(h); State = state; this.owner = owner; }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle()
        {
            int st = NativeMethods.knit_subscription_close(handle);
            if (State.IsAllocated)
            {
                // Closed: safe even from inside the callback, which has already taken its
                // handler. KNIT_CLOSED: the client's close took it, and may still be running
                // (and calling it): the client frees it once that close has returned.
                if (st == (int)Status.Closed && owner != null) owner.FreeAfterClose(State);
                else State.Free();
            }
            return st == 0 || st == (int)Status.Closed;
        }
    }

    /// <summary>A subscription (context, topic, stream, discovery events). It lives until
    /// Dispose or until its client is disposed (the client keeps it: dropping the object does
    /// not end it). After Dispose its callback is not running and is not called again;
    /// disposing it from inside its own callback is fine.</summary>
    public sealed class Subscription : IDisposable
    {
        readonly SubscriptionHandle handle;
        readonly KnitClient owner;
        internal Subscription(SubscriptionHandle h, KnitClient owner) { handle = h; this.owner = owner; }
        public bool IsOpen { get { return !handle.IsClosed; } }
        /// <summary>The SafeHandle (its raw value is the knit_subscription_t*).</summary>
        public SubscriptionHandle Handle { get { return handle; } }
        public void Dispose()
        {
            handle.Dispose();
            owner.Forget(this);
        }
    }

    /// <summary>One change of a context: the whole value, what changed (removed keys are
    /// null), and the version now.</summary>
    public sealed class ContextUpdate
    {
        public string Name { get; internal set; }
        public string DataJson { get; internal set; }
        public string DeltaJson { get; internal set; }
        public ulong Version { get; internal set; }
    }

    /// <summary>One change of a channel: its data (the latest FDC3 context decoded as
    /// data.fdc3), the whole channel context {name, meta, data}, the context version.</summary>
    public sealed class ChannelUpdate
    {
        public string Channel { get; internal set; }
        public string DataJson { get; internal set; }
        public string ContextJson { get; internal set; }
        public ulong Version { get; internal set; }
    }

    /// <summary>Joining a channel leaves the one joined before (Single) or adds it (Multi).</summary>
    public enum ChannelMode : uint { Single = 0, Multi = 1 }

    /// <summary>A bus message.</summary>
    public sealed class BusMessage
    {
        public string Topic { get; internal set; }
        public string DataJson { get; internal set; }
        public string SourceJson { get; internal set; }
    }

    /// <summary>One stream item as a subscriber sees it.</summary>
    public sealed class StreamItem
    {
        public string DataJson { get; internal set; }
        public string ServerJson { get; internal set; }
        /// <summary>Pushed to this subscriber alone.</summary>
        public bool Private { get; internal set; }
        /// <summary>Items the slow-consumer policy dropped before this one.</summary>
        public ulong Gap { get; internal set; }
    }

    /// <summary>How a served stream behaves.</summary>
    public sealed class StreamOptions
    {
        /// <summary>"block" (default), "drop-oldest" or "conflate".</summary>
        public string Policy;
        /// <summary>0: the default (5000).</summary>
        public uint BlockMs;
        public string ConflateKey;
        /// <summary>Items per subscriber before the policy applies; 0: the default (1024).</summary>
        public uint Queue;

        internal string ToJson()
        {
            var parts = new List<string>();
            if (Policy != null) parts.Add("\"policy\":" + NativeMethods.JsonString(Policy));
            if (BlockMs != 0) parts.Add("\"blockMs\":" + BlockMs);
            if (ConflateKey != null) parts.Add("\"conflateKey\":" + NativeMethods.JsonString(ConflateKey));
            if (Queue != 0) parts.Add("\"queue\":" + Queue);
            return "{" + string.Join(",", parts.ToArray()) + "}";
        }
    }

    /// <summary>Subscription parameters of a stream.</summary>
    public sealed class StreamSubscribeOptions
    {
        public string ArgsJson = "{}";
        /// <summary>null: best; "all", an application name, or a JSON instance filter.</summary>
        public string Target;
        public uint WaitMs = NativeMethods.KNIT_DEFAULT_WAIT_MS;
        /// <summary>0: the default (30 s).</summary>
        public uint TimeoutMs;
    }

    /// <summary>One accepted subscriber of a stream we serve. Dispose frees the handle (the
    /// subscription goes on); Close ends the subscription.</summary>
    public sealed class StreamSubscriber : IDisposable
    {
        IntPtr h;
        internal StreamSubscriber(IntPtr h) { this.h = h; }
        ~StreamSubscriber() { Free(); }
        /// <summary>Sends a JSON object to this subscriber only.</summary>
        public void Push(string dataJson)
        {
            KnitException.Check(NativeMethods.knit_stream_subscriber_push(h, NativeMethods.Json(dataJson)));
        }
        /// <summary>Ends this subscription.</summary>
        public void Close()
        {
            var p = Interlocked.Exchange(ref h, IntPtr.Zero);
            GC.SuppressFinalize(this);
            KnitException.Check(NativeMethods.knit_stream_subscriber_close(p));
        }
        void Free()
        {
            var p = Interlocked.Exchange(ref h, IntPtr.Zero);
            if (p != IntPtr.Zero) NativeMethods.knit_stream_subscriber_free(p);
        }
        public void Dispose() { Free(); GC.SuppressFinalize(this); }
    }

    /// <summary>A subscription request: decide once (Accept or Reject), now or later, from
    /// any thread. Disposed (or finalised) undecided, it is rejected.</summary>
    public sealed class StreamRequest : IDisposable
    {
        IntPtr h;
        internal StreamRequest(IntPtr h, string args, string caller) { this.h = h; ArgsJson = args; CallerJson = caller; }
        ~StreamRequest() { Abandon(); }
        public string ArgsJson { get; private set; }
        public string CallerJson { get; private set; }
        public bool Decided { get { return h == IntPtr.Zero; } }

        IntPtr Take()
        {
            var p = Interlocked.Exchange(ref h, IntPtr.Zero);
            GC.SuppressFinalize(this);
            if (p == IntPtr.Zero) throw new UsageException((int)Status.Closed, "this request was already decided", null);
            return p;
        }

        /// <summary>Accepts on a branch ("" or null: the default); returns the subscriber.</summary>
        public StreamSubscriber Accept(string branch = null)
        {
            IntPtr sub;
            var b = NativeMethods.Utf8(branch); // before Take: a refused branch leaves it undecided
            KnitException.Check(NativeMethods.knit_stream_accept(Take(), b, out sub));
            return new StreamSubscriber(sub);
        }

        /// <summary>Rejects; the subscriber's SubscribeStream throws RemoteException.</summary>
        public void Reject(string reason)
        {
            var r = NativeMethods.Utf8(reason); // before Take: a refused reason leaves it undecided
            KnitException.Check(NativeMethods.knit_stream_reject(Take(), r));
        }

        void Abandon()
        {
            var p = Interlocked.Exchange(ref h, IntPtr.Zero);
            if (p != IntPtr.Zero) NativeMethods.knit_stream_reject(p, NativeMethods.Utf8("request was not decided"));
        }

        public void Dispose() { Abandon(); GC.SuppressFinalize(this); }
    }

    /// <summary>A stream we serve. Dispose (or disposing its client) ends every subscription
    /// and unregisters it; afterwards its request handler is not running. Every use after that
    /// (also one racing with Dispose in another thread) is a UsageException (Status.Closed).</summary>
    public sealed class KnitStream : IDisposable
    {
        // A plain handle value and a closed flag, for the reasons KnitClient gives.
        readonly IntPtr raw;
        GCHandle state; // the request handler; freed once knit_stream_close has returned
        int closing;
        readonly KnitClient owner;
        internal KnitStream(IntPtr h, GCHandle state, KnitClient owner) { raw = h; this.state = state; this.owner = owner; }
        ~KnitStream() { Close(); }

        HandleRef H
        {
            get
            {
                if (Volatile.Read(ref closing) != 0) throw new UsageException((int)Status.Closed, "the stream is closed", null);
                return new HandleRef(this, raw);
            }
        }

        public bool IsOpen { get { return Volatile.Read(ref closing) == 0; } }
        /// <summary>Sends a JSON object to every subscriber.</summary>
        public void Push(string dataJson) { KnitException.Check(NativeMethods.knit_stream_push(H, NativeMethods.Json(dataJson))); }
        /// <summary>Sends every object of a JSON array to every subscriber, in order, for the
        /// cost of one push; a bad item refuses the whole batch.</summary>
        public void PushBatch(string itemsJson) { KnitException.Check(NativeMethods.knit_stream_push_batch(H, NativeMethods.Json(itemsJson))); }
        /// <summary>Sends a JSON object to the subscribers of these branches (null: a
        /// UsageException, as any null required argument).</summary>
        public void PushToBranches(string[] branches, string dataJson)
        {
            byte[] list = null; // knit refuses NULL with INVALID_ARGUMENT
            if (branches != null)
            {
                var items = new List<string>();
                foreach (var b in branches) items.Add(b == null ? "null" : NativeMethods.JsonString(b)); // knit: BAD_INPUT
                list = NativeMethods.Json("[" + string.Join(",", items.ToArray()) + "]");
            }
            KnitException.Check(NativeMethods.knit_stream_push_branches(H, list, NativeMethods.Json(dataJson)));
        }
        /// <summary>Ends every subscription on a branch.</summary>
        public void CloseBranch(string branch) { KnitException.Check(NativeMethods.knit_stream_close_branch(H, NativeMethods.Utf8(branch))); }

        delegate int JsonFn(HandleRef s, out IntPtr json);
        string Json(JsonFn f)
        {
            IntPtr p;
            int st = f(H, out p);
            var s = NativeMethods.Take(p);
            KnitException.Check(st);
            return s;
        }
        /// <summary>Branches that have subscribers (JSON array).</summary>
        public string Branches() { return Json(NativeMethods.knit_stream_branches); }
        /// <summary>Current subscriptions (JSON array of {branch, instance, arguments}).</summary>
        public string Subscriptions() { return Json(NativeMethods.knit_stream_subscriptions); }

        void Close()
        {
            if (Interlocked.Exchange(ref closing, 1) != 0) return;
            int st = NativeMethods.knit_stream_close(raw);
            if (state.IsAllocated)
            {
                // As for a subscription (SubscriptionHandle.ReleaseHandle).
                if (st == (int)Status.Closed) owner.FreeAfterClose(state);
                else state.Free();
            }
        }

        public void Dispose()
        {
            Close();
            GC.SuppressFinalize(this);
            owner.Forget(this);
        }
    }

    public sealed partial class KnitClient
    {
        static readonly NativeContextFn ContextTrampoline = OnContext;
        static readonly NativeMessageFn MessageTrampoline = OnMessage;
        static readonly NativeEventFn EventTrampoline = OnEvent;
        static readonly NativeStreamRequestFn RequestTrampoline = OnStreamRequest;
        static readonly NativeStreamDataFn StreamDataTrampoline = OnStreamData;
        static readonly NativeStreamClosedFn StreamClosedTrampoline = OnStreamClosed;
        static readonly NativeChannelFn ChannelTrampoline = OnChannel;
        static readonly NativeChannelsChangedFn ChannelsChangedTrampoline = OnChannelsChanged;

        // Open subscriptions and streams: kept until disposed, or until the client is.
        readonly HashSet<IDisposable> open = new HashSet<IDisposable>();

        internal void Forget(IDisposable x) { lock (gate) open.Remove(x); }

        // GCHandles of subscriptions and streams that the client's close took: freed once
        // knit_client_close has returned (it may still be calling them until then).
        readonly List<GCHandle> afterClose = new List<GCHandle>();

        internal void FreeAfterClose(GCHandle g)
        {
            lock (gate)
            {
                if (!closed) { afterClose.Add(g); return; }
            }
            g.Free();
        }

        delegate int SubscribeFn(HandleRef client, IntPtr userData, out IntPtr subscription);

        /// <summary>Subscribes with handler as user_data. Its GCHandle is freed on every failure
        /// (the subscription's, when made, frees it on close).</summary>
        Subscription Keep(object handler, SubscribeFn subscribe)
        {
            var c = H; // a closed client throws before anything is allocated
            var g = GCHandle.Alloc(handler);
            int st;
            IntPtr h;
            try { st = subscribe(c, GCHandle.ToIntPtr(g), out h); }
            catch { g.Free(); throw; }
            if (st != 0) { g.Free(); throw Failure(st, null); }
            var s = new Subscription(new SubscriptionHandle(h, g, this), this);
            lock (gate)
            {
                if (!closed) { open.Add(s); return s; }
            }
            s.Dispose(); // the client closed meanwhile, and the subscription with it
            throw ClosedException();
        }

        void DisposeOpen()
        {
            List<IDisposable> all;
            lock (gate) { all = new List<IDisposable>(open); open.Clear(); }
            foreach (var x in all) x.Dispose();
        }

        // ----- contexts ---------------------------------------------------------------------

        /// <summary>The context's data as JSON ("{}" when it does not exist).</summary>
        public string ContextGet(string name) { ulong v; return ContextGet(name, out v); }

        /// <summary>The context's data and its version (0 when it does not exist).</summary>
        public string ContextGet(string name, out ulong version)
        {
            IntPtr p;
            int st = NativeMethods.knit_context_get_ex(H, NativeMethods.Utf8(name), out p, out version);
            var s = NativeMethods.Take(p);
            Check(st);
            return s;
        }

        /// <summary>Replaces the whole value (a JSON object); returns the version after.</summary>
        public ulong ContextSet(string name, string dataJson)
        {
            ulong v;
            Check(NativeMethods.knit_context_set_ex(H, NativeMethods.Utf8(name), NativeMethods.Json(dataJson), out v));
            return v;
        }

        /// <summary>Merges top-level keys (null removes one); returns the version after.</summary>
        public ulong ContextUpdate(string name, string deltaJson)
        {
            ulong v;
            Check(NativeMethods.knit_context_update_ex(H, NativeMethods.Utf8(name), NativeMethods.Json(deltaJson), out v));
            return v;
        }

        /// <summary>ContextUpdate only while the context is at expectedVersion (else an
        /// InputException with Status.AlreadyExists).</summary>
        public ulong ContextUpdateIf(string name, ulong expectedVersion, string deltaJson)
        {
            ulong v;
            Check(NativeMethods.knit_context_update_if(H, NativeMethods.Utf8(name), expectedVersion, NativeMethods.Json(deltaJson), out v));
            return v;
        }

        /// <summary>Sets one dotted path to a JSON value (null removes the leaf).</summary>
        public ulong ContextSetPath(string name, string path, string valueJson)
        {
            ulong v;
            Check(NativeMethods.knit_context_set_path(H, NativeMethods.Utf8(name), NativeMethods.Utf8(path), NativeMethods.Json(valueJson), out v));
            return v;
        }

        /// <summary>Sets several paths in one version: {"a.b": 1, "c": null} or [[path, value], …].</summary>
        public ulong ContextSetPaths(string name, string pathsJson)
        {
            ulong v;
            Check(NativeMethods.knit_context_set_paths(H, NativeMethods.Utf8(name), NativeMethods.Json(pathsJson), out v));
            return v;
        }

        public void ContextDestroy(string name) { Check(NativeMethods.knit_context_destroy(H, NativeMethods.Utf8(name))); }

        /// <summary>Every context name (JSON array).</summary>
        public string Contexts() { return Json(NativeMethods.knit_context_list); }

        /// <summary>Follows a context: its current value first (if it exists), then every change.</summary>
        public Subscription ContextSubscribe(string name, Action<ContextUpdate> handler)
        {
            NotNull(handler, "handler");
            var n = NativeMethods.Utf8(name);
            return Keep(handler, (HandleRef c, IntPtr ud, out IntPtr h) => NativeMethods.knit_context_subscribe(c, n, ContextTrampoline, ud, out h));
        }

        // ----- the bus ----------------------------------------------------------------------

        /// <summary>Publishes JSON data on a topic; routingKey and targetJson (an identity
        /// filter of subscribers) are optional.</summary>
        public void Publish(string topic, string dataJson, string routingKey = null, string targetJson = null)
        {
            var opts = PublishOptions(routingKey, targetJson);
            Check(NativeMethods.knit_publish_ex(H, NativeMethods.Utf8(topic), NativeMethods.Json(dataJson), NativeMethods.Json(opts)));
        }

        /// <summary>Publishes every element of a JSON array on a topic, in order, each as if
        /// published on its own, for the cost of one publish; a bad item refuses the whole
        /// batch. Options as for Publish.</summary>
        public void PublishBatch(string topic, string itemsJson, string routingKey = null, string targetJson = null)
        {
            var opts = PublishOptions(routingKey, targetJson);
            Check(NativeMethods.knit_publish_batch(H, NativeMethods.Utf8(topic), NativeMethods.Json(itemsJson), NativeMethods.Json(opts)));
        }

        static string PublishOptions(string routingKey, string targetJson)
        {
            var parts = new List<string>();
            if (routingKey != null) parts.Add("\"routingKey\":" + NativeMethods.JsonString(routingKey));
            if (targetJson != null) parts.Add("\"target\":" + targetJson);
            return "{" + string.Join(",", parts.ToArray()) + "}";
        }

        /// <summary>Subscribes to a topic or pattern ("prices.*", "prices.>"); routingKey and
        /// sourceJson (an identity filter of publishers) are optional.</summary>
        public Subscription Subscribe(string topic, Action<BusMessage> handler, string routingKey = null, string sourceJson = null)
        {
            var parts = new List<string>();
            if (routingKey != null) parts.Add("\"routingKey\":" + NativeMethods.JsonString(routingKey));
            if (sourceJson != null) parts.Add("\"source\":" + sourceJson);
            var opts = "{" + string.Join(",", parts.ToArray()) + "}";
            NotNull(handler, "handler");
            var t = NativeMethods.Utf8(topic);
            var o = NativeMethods.Json(opts);
            return Keep(handler, (HandleRef c, IntPtr ud, out IntPtr h) => NativeMethods.knit_subscribe_ex(c, t, o, MessageTrampoline, ud, out h));
        }

        /// <summary>Discovery events as JSON: what exists now, then every change.</summary>
        public Subscription OnEvent(Action<string> handler)
        {
            NotNull(handler, "handler");
            return Keep(handler, (HandleRef c, IntPtr ud, out IntPtr h) => NativeMethods.knit_events_subscribe(c, EventTrampoline, ud, out h));
        }

        // ----- colour channels --------------------------------------------------------------

        /// <summary>Every channel (JSON array of {name, meta, data}).</summary>
        public string ChannelList() { return Json(NativeMethods.knit_channel_list); }

        /// <summary>One channel ({name, meta, data}); NotFoundException when there is none.</summary>
        public string ChannelGet(string name)
        {
            IntPtr p;
            int st = NativeMethods.knit_channel_get(H, NativeMethods.Utf8(name), out p);
            var s = NativeMethods.Take(p);
            Check(st);
            return s;
        }

        public void ChannelSetMode(ChannelMode mode) { Check(NativeMethods.knit_channel_set_mode(H, (uint)mode)); }
        public void ChannelJoin(string name) { Check(NativeMethods.knit_channel_join(H, NativeMethods.Utf8(name))); }
        /// <summary>Leaves one channel, or every joined one (null).</summary>
        public void ChannelLeave(string name = null) { Check(NativeMethods.knit_channel_leave(H, NativeMethods.Utf8(name))); }
        /// <summary>The channels joined (JSON array of names).</summary>
        public string ChannelsJoined() { return Json(NativeMethods.knit_channel_joined); }

        /// <summary>Replaces top-level keys of a channel's data (name null: every joined
        /// channel); returns the context version.</summary>
        public ulong ChannelPublish(string dataJson, string name = null)
        {
            ulong v;
            Check(NativeMethods.knit_channel_publish(H, NativeMethods.Json(dataJson), NativeMethods.Utf8(name), out v));
            return v;
        }

        /// <summary>Stores an FDC3 context ({type, …}) as the latest of its type.</summary>
        public ulong ChannelPublishFdc3(string contextJson, string name = null)
        {
            ulong v;
            Check(NativeMethods.knit_channel_publish_fdc3(H, NativeMethods.Json(contextJson), NativeMethods.Utf8(name), out v));
            return v;
        }

        /// <summary>Follows the channels this client is on.</summary>
        public Subscription ChannelSubscribe(Action<ChannelUpdate> handler)
        {
            NotNull(handler, "handler");
            return Keep(handler, (HandleRef c, IntPtr ud, out IntPtr h) => NativeMethods.knit_channel_subscribe(c, ChannelTrampoline, ud, out h));
        }

        /// <summary>Follows one channel without joining it.</summary>
        public Subscription ChannelSubscribeFor(string name, Action<ChannelUpdate> handler)
        {
            NotNull(handler, "handler");
            var n = NativeMethods.Utf8(name);
            return Keep(handler, (HandleRef c, IntPtr ud, out IntPtr h) => NativeMethods.knit_channel_subscribe_for(c, n, ChannelTrampoline, ud, out h));
        }

        /// <summary>Calls handler with the joined channels (JSON array) now and after every change.</summary>
        public Subscription OnChannelsChanged(Action<string> handler)
        {
            NotNull(handler, "handler");
            return Keep(handler, (HandleRef c, IntPtr ud, out IntPtr h) => NativeMethods.knit_channel_on_changed(c, ChannelsChangedTrampoline, ud, out h));
        }

        // ----- streams ----------------------------------------------------------------------

        /// <summary>Serves a stream. onRequest decides each subscription (null: accept all on
        /// the default branch); an exception it throws rejects the request.</summary>
        public KnitStream CreateStream(string name, Action<StreamRequest> onRequest = null, StreamOptions options = null)
        {
            var opts = NativeMethods.Json((options ?? new StreamOptions()).ToJson());
            var n = NativeMethods.Utf8(name);
            var c = H; // a closed client throws before anything is allocated
            var g = onRequest != null ? GCHandle.Alloc(onRequest) : default(GCHandle);
            IntPtr h;
            int st;
            try { st = NativeMethods.knit_stream_create(c, n, opts, onRequest != null ? RequestTrampoline : null, onRequest != null ? GCHandle.ToIntPtr(g) : IntPtr.Zero, out h); }
            catch { if (g.IsAllocated) g.Free(); throw; }
            if (st != 0) { if (g.IsAllocated) g.Free(); throw Failure(st, null); }
            var s = new KnitStream(h, g, this);
            lock (gate)
            {
                if (!closed) { open.Add(s); return s; }
            }
            s.Dispose(); // the client closed meanwhile, and the stream with it
            throw ClosedException();
        }

        sealed class StreamHandlers
        {
            public Action<StreamItem> Data;
            public Action<string, bool> Closed;
        }

        /// <summary>Subscribes to a stream; returns once a server accepted (RemoteException
        /// when rejected). onClosed(reason, serverInitiated) runs when the server side ends it.</summary>
        public Subscription SubscribeStream(string name, Action<StreamItem> onData, Action<string, bool> onClosed = null, StreamSubscribeOptions options = null)
        {
            NotNull(onData, "onData");
            var o = options ?? new StreamSubscribeOptions();
            var n = NativeMethods.Utf8(name);
            var a = NativeMethods.Json(o.ArgsJson);
            var t = NativeMethods.Utf8(o.Target);
            return Keep(new StreamHandlers { Data = onData, Closed = onClosed }, (HandleRef c, IntPtr ud, out IntPtr h) =>
                NativeMethods.knit_stream_subscribe(c, n, a, t, o.WaitMs, o.TimeoutMs, StreamDataTrampoline, StreamClosedTrampoline, ud, out h));
        }

        // ----- trampolines: no exception may escape (see Dispatch in Client.cs) ----------------

        static T Target<T>(IntPtr ud) where T : class
        {
            try { return GCHandle.FromIntPtr(ud).Target as T; }
            catch (InvalidOperationException) { return null; }
        }

        /// <summary>Runs a subscription callback's body: an exception is reported, an abort
        /// reset, nothing unwinds into knit.</summary>
        static void Deliver<T>(string what, IntPtr ud, Action<T> body) where T : class
        {
            callbackDepth++;
            try
            {
                var f = Target<T>(ud);
                if (f != null) body(f);
            }
            catch (ThreadAbortException) { ResetAbort(); }
            catch (Exception e)
            {
                try { Console.Error.WriteLine("knit: " + what + " callback: " + e); }
                catch (ThreadAbortException) { ResetAbort(); }
                catch (Exception) { }
            }
            finally { callbackDepth--; }
        }

        static void OnContext(IntPtr ud, IntPtr name, IntPtr data, IntPtr delta, ulong version)
        {
            Deliver<Action<ContextUpdate>>("context", ud, f => f(new ContextUpdate { Name = NativeMethods.Read(name), DataJson = NativeMethods.Read(data), DeltaJson = NativeMethods.Read(delta), Version = version }));
        }

        static void OnMessage(IntPtr ud, IntPtr topic, IntPtr data, IntPtr source)
        {
            Deliver<Action<BusMessage>>("bus", ud, f => f(new BusMessage { Topic = NativeMethods.Read(topic), DataJson = NativeMethods.Read(data), SourceJson = NativeMethods.Read(source) }));
        }

        static void OnEvent(IntPtr ud, IntPtr ev)
        {
            Deliver<Action<string>>("event", ud, f => f(NativeMethods.Read(ev)));
        }

        static void OnChannel(IntPtr ud, IntPtr channel, IntPtr data, IntPtr context, ulong version)
        {
            Deliver<Action<ChannelUpdate>>("channel", ud, f => f(new ChannelUpdate { Channel = NativeMethods.Read(channel), DataJson = NativeMethods.Read(data), ContextJson = NativeMethods.Read(context), Version = version }));
        }

        static void OnChannelsChanged(IntPtr ud, IntPtr names)
        {
            Deliver<Action<string>>("channel", ud, f => f(NativeMethods.Read(names)));
        }

        static void OnStreamRequest(IntPtr ud, IntPtr request, IntPtr args, IntPtr caller)
        {
            callbackDepth++;
            StreamRequest r = null;
            try
            {
                r = new StreamRequest(request, NativeMethods.Read(args), NativeMethods.Read(caller));
                var f = Target<Action<StreamRequest>>(ud);
                if (f != null) f(r);
            }
            catch (ThreadAbortException)
            {
                ResetAbort();
                Refuse(r, request, "request handler was aborted");
            }
            catch (Exception e) { Refuse(r, request, e.Message ?? e.GetType().FullName); }
            finally { callbackDepth--; }
        }

        /// <summary>Rejects an undecided request whose handler failed; whatever goes wrong, it
        /// is decided.</summary>
        static void Refuse(StreamRequest r, IntPtr request, string reason)
        {
            try
            {
                if (r == null) r = new StreamRequest(request, null, null);
                if (r.Decided) return;
                try { r.Reject(reason); }
                catch (Exception) { } // text knit refuses (a NUL, a lone surrogate)
                r.Dispose(); // still undecided: rejected with "request was not decided"
            }
            catch (ThreadAbortException) { ResetAbort(); }
            catch (Exception) { }
        }

        static void OnStreamData(IntPtr ud, IntPtr data, IntPtr server, uint flags, ulong gap)
        {
            Deliver<StreamHandlers>("stream", ud, h => h.Data(new StreamItem { DataJson = NativeMethods.Read(data), ServerJson = NativeMethods.Read(server), Private = (flags & NativeMethods.KNIT_STREAM_PRIVATE) != 0, Gap = gap }));
        }

        static void OnStreamClosed(IntPtr ud, IntPtr reason, uint flags)
        {
            Deliver<StreamHandlers>("stream", ud, h => { if (h.Closed != null) h.Closed(NativeMethods.Read(reason), (flags & NativeMethods.KNIT_STREAM_SERVER_INITIATED) != 0); });
        }
    }
}
