// Tests of the .NET binding, compiled with Mono's mcs together with Knit/*.cs and run with
// mono by ../test.sh: argv[0] is the gateway socket, argv[1] a method served by a Rust peer in
// another process (`knit serve ... --echo`, application "rust-echo").
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Threading;
using Knit;

/// <summary>An exception whose Message is null.</summary>
sealed class NullMessageException : Exception { public override string Message { get { return null; } } }

static class Tests
{
    static int checks, failures;
    static string gw, rustMethod;

    static void Check(bool cond, string what)
    {
        checks++;
        if (!cond) { failures++; Console.Error.WriteLine("CHECK failed: " + what); }
    }

    static T Throws<T>(Action a, Status status, string what) where T : KnitException
    {
        checks++;
        try { a(); }
        catch (T e)
        {
            if (e.Status != status) { failures++; Console.Error.WriteLine(what + ": status " + e.Status + ", wanted " + status); }
            return e;
        }
        catch (Exception e) { failures++; Console.Error.WriteLine(what + ": wrong exception " + e.GetType().Name + ": " + e.Message); return null; }
        failures++;
        Console.Error.WriteLine(what + ": nothing thrown");
        return null;
    }

    static bool Has(string s, string needle) { return s != null && s.Contains(needle); }

    /// <summary>Lines that callbacks add, with waits on conditions (never sleeps).</summary>
    sealed class Log
    {
        readonly List<string> lines = new List<string>();
        public void Add(string line) { lock (lines) { lines.Add(line); Monitor.PulseAll(lines); } }
        public bool WaitFor(string needle) { return WaitUntil(() => HasLocked(needle)); }
        public bool WaitCount(int n) { return WaitUntil(() => lines.Count >= n); }
        bool WaitUntil(Func<bool> pred)
        {
            var until = DateTime.UtcNow.AddSeconds(5);
            lock (lines)
            {
                while (!pred())
                {
                    var left = until - DateTime.UtcNow;
                    if (left <= TimeSpan.Zero) return false;
                    Monitor.Wait(lines, left);
                }
                return true;
            }
        }
        bool HasLocked(string needle) { foreach (var l in lines) if (l.Contains(needle)) return true; return false; }
        public bool HasLine(string needle) { lock (lines) return HasLocked(needle); }
        public int Count { get { lock (lines) return lines.Count; } }
        /// <summary>Whether a line with `first` came before a line with `then`.</summary>
        public bool Before(string first, string then)
        {
            lock (lines)
            {
                int a = lines.FindIndex(l => l.Contains(first)), b = lines.FindIndex(l => l.Contains(then));
                return a >= 0 && b >= 0 && a < b;
            }
        }
    }

    static void StatusEnumMatchesTheLibrary()
    {
        var names = new Dictionary<int, string>();
        for (int code = 0; code < 256; code++)
        {
            var n = NativeMethods.Read(NativeMethods.knit_status_name(code));
            if (n != "UNKNOWN") names[code] = n;
        }
        var values = (Status[])Enum.GetValues(typeof(Status));
        Check(values.Length == names.Count, "one enum value per library status (" + values.Length + " vs " + names.Count + ")");
        foreach (var v in values)
        {
            string n;
            Check(names.TryGetValue((int)v, out n) && n.Replace("_", "") == v.ToString().ToUpperInvariant(), "enum " + v + " matches the library");
        }
        Check(KnitException.For((int)Status.Timeout, null) is KnitTimeoutException, "TIMEOUT -> KnitTimeoutException");
        Check(KnitException.For((int)Status.PeerLeft, null) is RemoteException, "PEER_LEFT -> RemoteException");
        Check(KnitException.For((int)Status.Closed, null) is UsageException, "CLOSED -> UsageException");
        Check(KnitException.For(9999, null) is InternalKnitException, "unknown -> InternalKnitException");
    }

    static void ConnectFailures()
    {
        var e = Throws<KnitConnectionException>(() => new KnitClient("cs", "/nonexistent/knit/gw.sock"), Status.GatewayUnreachable, "unreachable gateway");
        Check(e != null && e.Family == "connection" && e.StatusName == "GATEWAY_UNREACHABLE", "family and name");
        Throws<UsageException>(() => new KnitClient("", gw), Status.InvalidArgument, "empty application");
    }

    static void RoundTrips()
    {
        using (var server = new KnitClient("cs-server", gw))
        using (var client = new KnitClient("cs-client", gw))
        {
            int calls = 0;
            server.Register("Echo", c => { Interlocked.Increment(ref calls); Check(Has(c.CallerJson, "cs-client"), "caller"); return c.ArgsJson; });
            server.Register("Boom", c => { throw new InvalidOperationException("boom"); });
            var threads = new List<Thread>();
            server.RegisterAsync("Later", (c, r) =>
            {
                var t = new Thread(() => r.Ok("{\"late\":" + c.ArgsJson + "}"));
                lock (threads) threads.Add(t);
                t.Start();
            });
            Reply parked = null;
            server.RegisterAsync("Parks", (c, r) => { parked = r; });
            server.RegisterAsync("Forgets", (c, r) => r.Dispose());
            server.RegisterBytes("Rev", c => { var b = (byte[])c.Bytes.Clone(); Array.Reverse(b); return b; });
            Check(client.WaitForMethod("Rev", 5000), "methods visible");
            Check(!client.WaitForMethod("Nobody", 0), "no such method");

            var r1 = client.Invoke("Echo", "{\"x\":[1,2],\"s\":\"h\u00e9\"}");
            Check(Has(r1, "\"returned\":{\"x\":[1,2],\"s\":\"h\u00e9\"}"), "echo result: " + r1);
            Check(Has(r1, "\"executed_by\":{\"application\":\"cs-server\""), "executed_by");
            Check(calls == 1, "one call");

            KnitException e = Throws<RemoteException>(() => client.Invoke("Boom"), Status.MethodFailed, "handler exception");
            Check(e != null && e.Message == "boom" && Has(e.ResultJson, "\"message\":\"boom\""), "error message and result");

            Check(Has(client.Invoke("Later", "3"), "\"returned\":{\"late\":3}"), "reply from another thread");
            lock (threads) foreach (var t in threads) t.Join();

            Throws<RemoteException>(() => client.Invoke("Forgets"), Status.MethodFailed, "disposed reply");
            e = Throws<KnitTimeoutException>(() => client.Invoke("Parks", "{}", new InvokeOptions { TimeoutMs = 100 }), Status.Timeout, "timeout");
            Check(e != null && Has(e.ResultJson, "\"status\":1"), "timeout result");
            server.Unregister("Parks");
            Check(parked != null && !parked.Answered, "parked reply held");
            parked.Ok("\"late\"");
            Throws<UsageException>(() => parked.Ok("1"), Status.Closed, "double reply");

            Throws<InputException>(() => client.Invoke("Echo", "{bad"), Status.BadInput, "invalid JSON");
            Throws<NotFoundException>(() => client.Invoke("Nobody", "{}", new InvokeOptions { WaitMs = 0 }), Status.NoServer, "no server");
            Throws<InputException>(() => server.Register("Echo", c => "1"), Status.AlreadyExists, "registered twice");
            Check(Has(client.Invoke("Echo", "5", new InvokeOptions { Target = "CS-SERVER" }), "\"returned\":5"), "target by application");
            Check(Has(client.Invoke("Echo", "6", new InvokeOptions { Target = "{\"application\":\"cs-server\"}" }), "\"returned\":6"), "target filter");
            Throws<UsageException>(() => client.Invoke("Echo", "6", new InvokeOptions { Target = "{\"colour\":1}" }), Status.InvalidArgument, "bad target");

            var data = new byte[] { 0, 1, 2, 255, 0 };
            var back = client.InvokeBytes("Rev", data);
            Check(back.Length == 5 && back[0] == 0 && back[1] == 255 && back[4] == 0, "raw bytes round trip");

            Check(Has(client.Methods(), "\"name\":\"Echo\""), "methods");
            Check(client.Servers().StartsWith("[{\"application\":\"cs-client\""), "servers, ourselves first");
            Check(Has(client.Instance(), "\"application\":\"cs-client\""), "instance");
            Check(client.MaxPayload > 0 && client.Connected, "max payload, connected");

            server.Unregister("Echo");
            Throws<NotFoundException>(() => server.Unregister("Echo"), Status.NotFound, "unregister twice");
            // The server knows at once (other peers learn it through the gateway a moment later).
            Throws<NotFoundException>(() => server.Invoke("Echo", "{}", new InvokeOptions { WaitMs = 0 }), Status.NoServer, "unregistered");
        }
    }

    static void PollMode()
    {
        using (var server = new KnitClient("cs-poller", gw, poll: true))
        using (var client = new KnitClient("cs-poll-caller", gw))
        {
            int ranOn = -1;
            server.Register("Polled", c => { ranOn = Thread.CurrentThread.ManagedThreadId; return c.ArgsJson; });
            string result = null;
            var t = new Thread(() => { result = client.Invoke("Polled", "[1]"); });
            t.Start();
            uint handled = 0;
            for (int i = 0; i < 200 && t.IsAlive; i++) handled += server.Poll(50);
            t.Join();
            Check(handled == 1, "one handler ran in Poll");
            Check(ranOn == Thread.CurrentThread.ManagedThreadId, "on the polling thread");
            Check(Has(result, "\"returned\":[1]"), "poll result");
            Throws<UsageException>(() => client.Poll(0), Status.InvalidArgument, "poll on a dispatcher client");
        }
    }

    static void DisposeAndMisuse()
    {
        var c = new KnitClient("cs-dispose", gw);
        IntPtr raw = c.Handle;
        c.Dispose();
        c.Dispose(); // idempotent
        Throws<UsageException>(() => c.Invoke("x"), Status.Closed, "use after dispose");
        Check(!c.Connected, "not connected after dispose");
        IntPtr r;
        // The raw handle is closed: the C ABI answers with a status, not a crash.
        Check(NativeMethods.knit_client_close(raw) == (int)Status.Closed, "double close in C");
        Check(NativeMethods.knit_invoke_ex_raw(raw, NativeMethods.Utf8("m"), null, null, 0, 0, out r) == (int)Status.Closed && r == IntPtr.Zero, "invoke on a closed handle");
        Check(NativeMethods.knit_invoke_ex_raw(IntPtr.Zero, NativeMethods.Utf8("m"), null, null, 0, 0, out r) == (int)Status.InvalidArgument, "NULL handle");
        Check(NativeMethods.knit_reply_ok(IntPtr.Zero, NativeMethods.Utf8("1")) == (int)Status.InvalidArgument, "NULL reply");
    }

    static void RustPeer()
    {
        using (var client = new KnitClient("cs-caller", gw))
        {
            var r = client.Invoke(rustMethod, "{\"from\":\"dotnet\"}");
            Check(Has(r, "\"returned\":{\"from\":\"dotnet\"}") && Has(r, "\"application\":\"rust-echo\""), "a Rust peer in another process: " + r);
        }
    }


    static void Contexts()
    {
        using (var w = new KnitClient("cs-ctx-w", gw))
        using (var f = new KnitClient("cs-ctx-f", gw))
        {
            ulong v;
            Check(f.ContextGet("cs.ctx", out v) == "{}" && v == 0, "missing context is {} at 0");
            var v1 = w.ContextSet("cs.ctx", "{\"a\":1,\"b\":2}");
            Check(v1 > 0 && f.ContextGet("cs.ctx", out v) == "{\"a\":1,\"b\":2}" && v == v1, "set then get");
            var log = new Log();
            var barrier = new Log();
            var sub = f.ContextSubscribe("cs.ctx", u => log.Add(u.Name + " v" + u.Version + " " + u.DataJson + " " + u.DeltaJson));
            var other = f.ContextSubscribe("cs.ctx", u => barrier.Add(u.DataJson));
            Check(log.WaitFor("cs.ctx v" + v1 + " {\"a\":1,\"b\":2}"), "first callback: the current value");
            var v2 = w.ContextUpdate("cs.ctx", "{\"b\":null,\"c\":3}");
            Check(v2 == v1 + 1, "update version");
            Check(log.WaitFor("{\"a\":1,\"c\":3} {\"b\":null,\"c\":3}"), "update seen with removal as null");
            Throws<InputException>(() => w.ContextUpdateIf("cs.ctx", v1, "{\"x\":1}"), Status.AlreadyExists, "stale compare-and-set");
            Check(w.ContextUpdateIf("cs.ctx", v2, "{\"x\":1}") == v2 + 1, "compare-and-set");
            Check(w.ContextSetPath("cs.ctx", "p.q", "true") == v2 + 2, "set path");
            Check(w.ContextSetPaths("cs.ctx", "{\"p.r\":1,\"x\":null}") == v2 + 3, "set paths");
            Check(f.ContextGet("cs.ctx") == "{\"a\":1,\"c\":3,\"p\":{\"q\":true,\"r\":1}}", "paths applied: " + f.ContextGet("cs.ctx"));
            Throws<InputException>(() => w.ContextSet("cs.ctx", "[1]"), Status.BadInput, "not an object");
            Throws<InputException>(() => w.ContextSet("cs.ctx", "{oops"), Status.BadInput, "invalid JSON");
            Check(Has(w.Contexts(), "\"cs.ctx\""), "list");

            sub.Dispose();
            sub.Dispose(); // idempotent
            Check(!sub.IsOpen, "closed");
            int before = log.Count;
            w.ContextUpdate("cs.ctx", "{\"after\":1}");
            Check(barrier.WaitFor("\"after\":1"), "barrier saw the update");
            Check(log.Count == before, "no callback after Dispose");

            // A callback may dispose its own subscription; exceptions stay in the callback.
            var selfLog = new Log();
            Subscription self = null;
            self = f.ContextSubscribe("cs.ctx", u =>
            {
                selfLog.Add(u.DataJson);
                if (u.DataJson.Contains("self")) self.Dispose();
            });
            var thrower = f.ContextSubscribe("cs.ctx", u => { throw new InvalidOperationException("ignored"); });
            Check(selfLog.WaitCount(1), "self: first call");
            w.ContextUpdate("cs.ctx", "{\"self\":1}");
            Check(selfLog.WaitCount(2), "self: second call");
            w.ContextUpdate("cs.ctx", "{\"self\":2}");
            Check(barrier.WaitFor("\"self\":2"), "barrier saw self:2");
            Check(selfLog.Count == 2 && !self.IsOpen, "closed itself");
            thrower.Dispose();
            w.ContextDestroy("cs.ctx");
            Throws<NotFoundException>(() => w.ContextDestroy("cs.ctx"), Status.NotFound, "destroy twice");
            // `other` is left open: disposing the client closes it.
            Check(other.IsOpen, "still open");
        }
    }

    static void Bus()
    {
        using (var s = new KnitClient("cs-bus-sub", gw))
        {
            var all = new Log();
            var eu = new Log();
            s.Subscribe("cs.prices.*", m => all.Add(m.Topic + " " + m.DataJson + " " + m.SourceJson));
            var keyed = s.Subscribe("cs.prices.>", m => eu.Add(m.DataJson), routingKey: "eu");
            using (var pub = new KnitClient("cs-bus-pub", gw)) // knows the subscriptions already
            {
                pub.Publish("cs.prices.VOD", "{\"bid\":1}");
                pub.Publish("cs.prices.VOD", "{\"k\":\"us\"}", routingKey: "us");
                pub.Publish("cs.prices.VOD", "{\"k\":\"eu\"}", routingKey: "eu");
                pub.Publish("cs.prices.VOD", "{\"k\":\"nobody\"}", targetJson: "{\"application\":\"nobody\"}");
                pub.Publish("cs.prices.VOD", "{\"k\":\"last\"}");
                Check(all.WaitFor("{\"k\":\"last\"}") && eu.WaitFor("{\"k\":\"last\"}"), "messages arrive");
                Check(all.HasLine("cs.prices.VOD {\"bid\":1} {\"application\":\"cs-bus-pub\""), "topic, data, source");
                Check(all.HasLine("\"us\"") && !eu.HasLine("\"us\"") && eu.HasLine("\"eu\""), "routing keys");
                Check(!all.HasLine("nobody"), "target filter");
                Throws<InputException>(() => pub.Publish("t", "{bad"), Status.BadInput, "invalid JSON");
                pub.PublishBatch("cs.prices.B", "[{\"b\":1},{\"b\":2},{\"b\":3}]");
                Check(all.WaitFor("{\"b\":3}") && all.Before("{\"b\":1}", "{\"b\":2}") && all.Before("{\"b\":2}", "{\"b\":3}"), "a batch arrives in order");
                pub.PublishBatch("cs.prices.B", "[{\"k\":\"eu-batch\"}]", routingKey: "eu");
                Check(eu.WaitFor("eu-batch"), "a batch with a routing key");
                Throws<InputException>(() => pub.PublishBatch("t", "{\"not\":\"an array\"}"), Status.BadInput, "not an array");
                keyed.Dispose();
                pub.Publish("cs.prices.VOD", "{\"k\":\"after\"}");
                Check(all.WaitFor("after") && !eu.HasLine("after"), "no callback after Dispose");
            }
        }
    }

    static void Streams()
    {
        using (var server = new KnitClient("cs-stream-server", gw))
        using (var client = new KnitClient("cs-stream-client", gw))
        {
            var kept = new Dictionary<string, object>();
            Action<StreamRequest> decide = r =>
            {
                if (r.ArgsJson.Contains("reject")) { r.Reject("not you"); return; }
                if (r.ArgsJson.Contains("throw")) throw new InvalidOperationException("thrown");
                if (r.ArgsJson.Contains("park")) { lock (kept) { kept["parked"] = r; Monitor.PulseAll(kept); } return; }
                if (r.ArgsJson.Contains("eu")) { var sub = r.Accept("eu"); lock (kept) { kept["eu"] = sub; Monitor.PulseAll(kept); } return; }
                r.Accept();
            };
            var ticks = server.CreateStream("Cs.Ticks", decide, new StreamOptions { Policy = "drop-oldest", Queue = 64 });
            Throws<InputException>(() => server.CreateStream("Cs.Ticks"), Status.AlreadyExists, "stream twice");
            Throws<UsageException>(() => server.CreateStream("Cs.Bad", null, new StreamOptions { Policy = "lossy" }), Status.InvalidArgument, "bad policy");

            var plain = new Log();
            var branch = new Log();
            var ends = new Log();
            var o = new StreamSubscribeOptions { WaitMs = 5000, TimeoutMs = 5000 };
            var s1 = client.SubscribeStream("Cs.Ticks", i => plain.Add(i.DataJson), (reason, byServer) => ends.Add(reason + (byServer ? " server" : "")), o);
            var s2 = client.SubscribeStream("Cs.Ticks", i => branch.Add(i.DataJson + (i.Private ? " private" : "")), null, new StreamSubscribeOptions { ArgsJson = "{\"branch\":\"eu\"}", TimeoutMs = 5000 });
            Throws<RemoteException>(() => client.SubscribeStream("Cs.Ticks", i => { }, null, new StreamSubscribeOptions { ArgsJson = "{\"reject\":1}", TimeoutMs = 5000 }), Status.MethodFailed, "rejected");
            var e = Throws<RemoteException>(() => client.SubscribeStream("Cs.Ticks", i => { }, null, new StreamSubscribeOptions { ArgsJson = "{\"throw\":1}", TimeoutMs = 5000 }), Status.MethodFailed, "handler threw");
            Check(e != null && Has(e.Message, "thrown"), "the exception's message is the reason");
            Throws<NotFoundException>(() => client.SubscribeStream("Cs.Nobody", i => { }, null, new StreamSubscribeOptions { WaitMs = 0 }), Status.NoServer, "no such stream");

            ticks.Push("{\"n\":1}");
            ticks.PushToBranches(new[] { "eu" }, "{\"only\":\"eu\"}");
            StreamSubscriber euSub = null;
            lock (kept)
            {
                var until = DateTime.UtcNow.AddSeconds(5);
                while (!kept.ContainsKey("eu") && DateTime.UtcNow < until) Monitor.Wait(kept, until - DateTime.UtcNow);
                if (kept.ContainsKey("eu")) euSub = (StreamSubscriber)kept["eu"];
            }
            Check(euSub != null, "accepted on a branch");
            if (euSub != null) euSub.Push("{\"just\":\"you\"}");
            ticks.Push("{\"n\":2}");
            Check(plain.WaitFor("{\"n\":2}") && branch.WaitFor("{\"n\":2}"), "pushes arrive");
            Check(!plain.HasLine("only") && !plain.HasLine("just"), "branch and private pushes stay on their branch");
            Check(branch.HasLine("{\"only\":\"eu\"}") && branch.HasLine("{\"just\":\"you\"} private"), "branch and private pushes");
            Check(ticks.Branches() == "[\"\",\"eu\"]", "branches: " + ticks.Branches());
            Check(Has(ticks.Subscriptions(), "\"arguments\":{\"branch\":\"eu\"}"), "subscriptions");
            Throws<InputException>(() => ticks.Push("[1]"), Status.BadInput, "not an object");
            ticks.PushBatch("[{\"m\":1},{\"m\":2}]");
            Check(plain.WaitFor("{\"m\":2}") && plain.Before("{\"m\":1}", "{\"m\":2}"), "a pushed batch arrives in order");
            Throws<InputException>(() => ticks.PushBatch("[{\"m\":3},1]"), Status.BadInput, "a bad item refuses the batch");

            // decided later, from another thread
            StreamSubscriber late = null;
            var t = new Thread(() =>
            {
                lock (kept)
                {
                    var until = DateTime.UtcNow.AddSeconds(5);
                    while (!kept.ContainsKey("parked") && DateTime.UtcNow < until) Monitor.Wait(kept, until - DateTime.UtcNow);
                    if (kept.ContainsKey("parked")) late = ((StreamRequest)kept["parked"]).Accept();
                }
            });
            t.Start();
            var lateLog = new Log();
            var s3 = client.SubscribeStream("Cs.Ticks", i => lateLog.Add(i.DataJson + (i.Private ? " private" : "")), null, new StreamSubscribeOptions { ArgsJson = "{\"park\":1}", TimeoutMs = 5000 });
            t.Join();
            Check(late != null, "accepted later");
            if (late != null) late.Push("{\"late\":true}");
            Check(lateLog.WaitFor("{\"late\":true} private"), "private push to the late subscriber");

            ticks.CloseBranch("eu");
            s3.Dispose();
            ticks.Push("{\"n\":3}");
            Check(plain.WaitFor("{\"n\":3}") && !lateLog.HasLine("\"n\":3"), "no data after Dispose");
            ticks.Dispose();
            Check(ends.WaitFor("Stream closed server"), "closing the stream ends subscriptions");
            Throws<UsageException>(() => ticks.Push("{}"), Status.Closed, "push after close");
            if (euSub != null) Throws<UsageException>(() => euSub.Push("{}"), Status.Closed, "subscriber of a closed stream");
            s1.Dispose();
            s2.Dispose();
        }
    }

    static void Events()
    {
        using (var watcher = new KnitClient("cs-events", gw))
        {
            var events = new Log();
            using (watcher.OnEvent(events.Add))
            {
                Check(events.WaitFor("{\"type\":\"serverAdded\",\"server\":{\"application\":\"cs-events\""), "replay: ourselves");
                using (var peer = new KnitClient("cs-events-peer", gw))
                {
                    peer.Register("Cs.Ev", c => c.ArgsJson);
                    Check(events.WaitFor("{\"type\":\"methodAdded\",\"method\":{\"name\":\"Cs.Ev\""), "methodAdded");
                }
                Check(events.WaitFor("{\"type\":\"serverRemoved\",\"server\":{\"application\":\"cs-events-peer\""), "serverRemoved");
            }
        }
    }

    static void Channels()
    {
        using (var w = new KnitClient("cs-chan-w", gw))
        using (var r = new KnitClient("cs-chan-r", gw))
        {
            Check(Has(r.ChannelList(), "{\"name\":\"Blue\",\"meta\":{\"color\":\"#2196F3\""), "default channels");
            Check(Has(r.ChannelGet("Blue"), "\"name\":\"Blue\""), "get");
            Throws<NotFoundException>(() => r.ChannelGet("Nope"), Status.NotFound, "no such channel");
            var changed = new Log();
            var follow = new Log();
            r.OnChannelsChanged(changed.Add);
            var f = r.ChannelSubscribe(u => follow.Add(u.Channel + " " + u.DataJson + " " + u.ContextJson));
            Check(changed.WaitFor("[]"), "membership first");
            r.ChannelJoin("Blue");
            Check(changed.WaitFor("[\"Blue\"]") && r.ChannelsJoined() == "[\"Blue\"]", "joined");
            Check(w.ChannelPublish("{\"instrument\":\"VOD.L\"}", "Blue") > 0, "publish");
            Check(follow.WaitFor("Blue {\"instrument\":\"VOD.L\"} {\"name\":\"Blue\""), "followed");
            w.ChannelPublishFdc3("{\"type\":\"fdc3.instrument\",\"id\":{\"ticker\":\"BP\"}}", "Blue");
            Check(follow.WaitFor("\"fdc3\":{\"type\":\"fdc3.instrument\",\"id\":{\"ticker\":\"BP\"}}"), "FDC3 decoded");
            Throws<InputException>(() => w.ChannelPublish("{\"a\":1}"), Status.BadInput, "none joined");
            r.ChannelSetMode(ChannelMode.Multi);
            r.ChannelJoin("Red");
            Check(changed.WaitFor("[\"Blue\",\"Red\"]"), "multi mode");
            var one = new Log();
            w.ChannelSubscribeFor("Red", u => one.Add(u.DataJson));
            r.ChannelPublish("{\"both\":1}");
            Check(one.WaitFor("\"both\":1") && follow.WaitFor("Red "), "publish to every joined channel");
            r.ChannelLeave();
            Check(r.ChannelsJoined() == "[]", "left all");
            f.Dispose();
            int before = follow.Count;
            w.ChannelPublish("{\"after\":1}", "Red");
            Check(one.WaitFor("\"after\":1") && follow.Count == before, "no callback after Dispose");
        }
    }

    static void SubscriptionMisuse()
    {
        var c = new KnitClient("cs-sub-misuse", gw);
        var sub = c.Subscribe("cs.misuse", m => { });
        IntPtr raw = sub.Handle.DangerousGetHandle();
        c.Dispose(); // closes the subscription with the client
        Check(!sub.IsOpen, "subscription closed with its client");
        Check(NativeMethods.knit_subscription_close(raw) == (int)Status.Closed, "double close in C");
        Check(NativeMethods.knit_subscription_close(IntPtr.Zero) == (int)Status.InvalidArgument, "NULL subscription");
        sub.Dispose(); // harmless
        ulong v;
        Check(NativeMethods.knit_context_set_ex_raw(IntPtr.Zero, NativeMethods.Utf8("n"), NativeMethods.Utf8("{}"), out v) == (int)Status.InvalidArgument, "NULL client");
        Throws<UsageException>(() => c.ContextGet("n"), Status.Closed, "context on a closed client");
    }

    /// <summary>knit's own view of a client: 0 connected, 14 (KNIT_CLOSED) once closed.</summary>
    static int NativeState(KnitClient c)
    {
        return NativeMethods.knit_client_connected(new HandleRef(null, c.Handle));
    }

    static bool Wait(WaitHandle h) { return h.WaitOne(10000); }

    /// <summary>Runs f, giving "ok", "usage Closed"-style text for a KnitException, or the type
    /// name of any other exception.</summary>
    static string Outcome(Action f)
    {
        try { f(); return "ok"; }
        catch (UsageException e) { return "usage " + e.Status; }
        catch (KnitException e) { return e.GetType().Name + " " + e.Status; }
        catch (Exception e) { return e.GetType().Name; }
    }

    // Dispose while knit calls on the client run: it closes at once (the in-flight calls end with
    // Closed), and its handlers' GCHandles are freed only once knit no longer calls them.
    static void DisposeWhileCallsRun()
    {
        using (var slow = new KnitClient("cs-dwr-slow", gw))
        using (var caller = new KnitClient("cs-dwr-caller", gw))
        {
            var held = new List<Reply>();
            var slowEntered = new AutoResetEvent(false);
            slow.RegisterAsync("Cs.Dwr.Slow", (c, r) => { lock (held) held.Add(r); slowEntered.Set(); });
            var answered = new List<Thread>();
            Action<string> invokeInBackground = m =>
            {
                var t = new Thread(() => Outcome(() => caller.Invoke(m, "{}", new InvokeOptions { WaitMs = 0, TimeoutMs = 20000 })));
                lock (answered) answered.Add(t);
                t.Start();
            };

            // 1. From another thread, while a handler of the client waits inside an invoke on it.
            var a = new KnitClient("cs-dwr-a", gw);
            string outcome = null;
            var handlerDone = new ManualResetEvent(false);
            a.Register("Cs.Dwr.M", c =>
            {
                outcome = Outcome(() => a.Invoke("Cs.Dwr.Slow", "{}", new InvokeOptions { TimeoutMs = 20000 }));
                handlerDone.Set();
                return "{}";
            });
            a.Subscribe("cs.dwr", m => { });
            Check(caller.WaitForMethod("Cs.Dwr.M", 5000) && caller.WaitForMethod("Cs.Dwr.Slow", 5000), "dwr: methods visible");
            invokeInBackground("Cs.Dwr.M");
            Check(Wait(slowEntered), "dwr: the handler waits inside an invoke");
            a.Dispose();
            Check(handlerDone.WaitOne(0), "dwr: when Dispose returns, the handler has returned");
            Check(outcome == "usage Closed", "dwr: the handler's invoke ended with Closed: " + outcome);
            Check(NativeState(a) == (int)Status.Closed, "dwr: closed in knit at once");
            Check(!a.Connected, "dwr: not connected after Dispose");
            Throws<UsageException>(() => a.Invoke("Cs.Dwr.Slow"), Status.Closed, "dwr: invoke after Dispose");
            Throws<UsageException>(() => a.Subscribe("cs.dwr", m => { }), Status.Closed, "dwr: subscribe after Dispose");
            a.Dispose(); // idempotent

            // 2. From another thread, while a thread waits in WaitForMethod.
            var b = new KnitClient("cs-dwr-b", gw);
            var waiting = new ManualResetEvent(false);
            string waited = null;
            var w = new Thread(() => { waiting.Set(); waited = Outcome(() => b.WaitForMethod("Cs.Dwr.Nobody", 30000)); });
            w.Start();
            Check(Wait(waiting), "dwr: waiter started");
            b.Dispose();
            Check(w.Join(10000) && waited == "usage Closed", "dwr: a waiting WaitForMethod ends with Closed: " + waited);

            // 3. Poll mode: a handler Poll runs disposes its own client; more calls are queued.
            var p = new KnitClient("cs-dwr-poll", gw, poll: true);
            int runs = 0, stateInside = -1;
            string laterInside = null;
            p.Register("Cs.Dwr.P", c =>
            {
                if (Interlocked.Increment(ref runs) == 1)
                {
                    p.Dispose();
                    stateInside = NativeState(p);
                    laterInside = Outcome(() => p.Publish("cs.dwr", "{}"));
                }
                return "{}";
            });
            Check(caller.WaitForMethod("Cs.Dwr.P", 5000), "dwr: poll method visible");
            for (int i = 0; i < 3; i++) invokeInBackground("Cs.Dwr.P");
            string pollEnd = null;
            var until = DateTime.UtcNow.AddSeconds(15);
            while (pollEnd == null && DateTime.UtcNow < until)
            {
                try { p.Poll(100); }
                catch (UsageException e) { pollEnd = "usage " + e.Status; }
                catch (Exception e) { pollEnd = e.GetType().Name; }
            }
            Check(pollEnd == "usage Closed", "dwr: Poll ends with Closed: " + pollEnd);
            Check(stateInside == (int)Status.Closed, "dwr: disposed inside Poll, closed in knit at once: " + stateInside);
            Check(laterInside == "usage Closed", "dwr: a call after Dispose inside the handler: " + laterInside);
            Check(runs == 1, "dwr: no handler runs after Dispose (" + runs + ")");

            // 4. Nested: the dispatcher waits inside an invoke an outer handler made; a handler
            // run meanwhile (nested) disposes the client.
            var n = new KnitClient("cs-dwr-nested", gw);
            string outer = null;
            int nestedState = -1;
            var outerDone = new ManualResetEvent(false);
            var nestedDone = new ManualResetEvent(false);
            n.Register("Cs.Dwr.Outer", c =>
            {
                outer = Outcome(() => n.Invoke("Cs.Dwr.Slow", "{}", new InvokeOptions { TimeoutMs = 20000 }));
                outerDone.Set();
                return "{}";
            });
            n.Register("Cs.Dwr.Inner", c =>
            {
                n.Dispose();
                nestedState = NativeState(n);
                nestedDone.Set();
                return "{}";
            });
            Check(caller.WaitForMethod("Cs.Dwr.Outer", 5000) && caller.WaitForMethod("Cs.Dwr.Inner", 5000), "dwr: nested methods visible");
            invokeInBackground("Cs.Dwr.Outer");
            Check(Wait(slowEntered), "dwr: the outer handler waits inside an invoke");
            invokeInBackground("Cs.Dwr.Inner");
            Check(Wait(nestedDone) && nestedState == (int)Status.Closed, "dwr: disposed by a nested handler, closed in knit at once: " + nestedState);
            Check(Wait(outerDone) && outer == "usage Closed", "dwr: the outer handler's invoke ended with Closed: " + outer);
            n.Dispose(); // from outside: returns once nothing runs
            Throws<UsageException>(() => n.ContextGet("cs.dwr"), Status.Closed, "dwr: nested: use after Dispose");

            lock (held) foreach (var r in held) Outcome(() => r.Ok("1"));
            lock (answered) foreach (var t in answered) Check(t.Join(25000), "dwr: every caller is answered");
        }
    }

    // Threads using a client while another disposes it: every failure is UsageException with
    // Status.Closed (it was ObjectDisposedException, "Safe handle has been closed").
    static void UseWhileDisposing()
    {
        using (var srv = new KnitClient("cs-uwd-srv", gw))
        {
            srv.Register("Cs.Uwd.Echo", c => c.ArgsJson);
            var wrong = new List<string>();
            int closedSeen = 0;
            for (int round = 0; round < 8; round++)
            {
                var c = new KnitClient("cs-uwd", gw);
                Check(c.WaitForMethod("Cs.Uwd.Echo", 5000), "uwd: method visible");
                var calling = new CountdownEvent(6);
                var threads = new List<Thread>();
                for (int i = 0; i < 6; i++)
                {
                    int k = i;
                    var t = new Thread(() =>
                    {
                        bool first = true;
                        while (true)
                        {
                            try
                            {
                                switch (k % 3)
                                {
                                    case 0: c.Invoke("Cs.Uwd.Echo", "{\"k\":" + k + "}"); break;
                                    case 1: c.Publish("cs.uwd", "{}"); break;
                                    default: c.ContextSet("cs.uwd." + k, "{\"k\":" + k + "}"); break;
                                }
                            }
                            catch (UsageException e)
                            {
                                if (e.Status == Status.Closed) Interlocked.Increment(ref closedSeen);
                                else lock (wrong) wrong.Add("UsageException " + e.Status);
                                break;
                            }
                            catch (Exception e) { lock (wrong) wrong.Add(e.GetType().Name + ": " + e.Message); break; }
                            finally { if (first) { first = false; calling.Signal(); } }
                        }
                    });
                    threads.Add(t);
                    t.Start();
                }
                Check(calling.Wait(10000), "uwd: every thread is calling");
                c.Dispose();
                foreach (var t in threads) Check(t.Join(10000), "uwd: a calling thread ends");
            }
            lock (wrong) Check(wrong.Count == 0, "uwd: only Closed: " + string.Join("; ", wrong.ToArray()));
            Check(closedSeen == 8 * 6, "uwd: every thread saw Closed (" + closedSeen + ")");
        }
    }

    // A program that returns from Main without Dispose while callbacks run (this program, run
    // with --exit-child) must exit; it hung: Mono aborted knit's dispatcher in a callback, the
    // abort unwound into knit, and a finaliser's close waited for that callback forever.
    static void ExitWithoutDispose()
    {
        var exe = System.Reflection.Assembly.GetExecutingAssembly().Location;
        var psi = new ProcessStartInfo("mono", "--debug \"" + exe + "\" --exit-child \"" + gw + "\"") { UseShellExecute = false };
        using (var p = Process.Start(psi))
        {
            bool exited = p.WaitForExit(40000);
            if (!exited) { try { p.Kill(); } catch (Exception) { } p.WaitForExit(5000); }
            Check(exited, "exit: a program that forgot Dispose while callbacks run exits");
            Check(!exited || p.ExitCode == 0, "exit: exit code " + (exited ? p.ExitCode : -1));
        }
    }

    static int ExitChild(string gateway)
    {
        var pub = new KnitClient("cs-exit-pub", gateway);
        var sub = new KnitClient("cs-exit-sub", gateway);
        long got = 0;
        var flowing = new ManualResetEvent(false);
        sub.Subscribe("cs.exit.flood", m =>
        {
            if (Interlocked.Increment(ref got) == 200) flowing.Set();
            var busy = Stopwatch.StartNew(); // work: the dispatcher is mostly in managed code
            while (busy.ElapsedTicks < Stopwatch.Frequency / 1000) { }
        });
        sub.Register("Cs.Exit.M", c => c.ArgsJson);
        new Thread(() => { try { while (true) pub.Publish("cs.exit.flood", "{}"); } catch (KnitException) { } }) { IsBackground = true }.Start();
        // Short deadlines: a call blocked on a full ring is not woken by its client's close
        // (it waits for its deadline), and Mono's exit waits for it.
        new Thread(() => { try { while (true) pub.Invoke("Cs.Exit.M", "{}", new InvokeOptions { TimeoutMs = 2000 }); } catch (KnitException) { } }) { IsBackground = true }.Start();
        return flowing.WaitOne(20000) ? 0 : 3; // returns with callbacks flowing, nothing disposed
    }

    // A callback whose thread is aborted (as Mono does to every thread running managed code at
    // exit): the abort must not unwind into knit; the caller is answered and callbacks go on.
    static void AbortInCallback()
    {
        using (var s = new KnitClient("cs-abort-s", gw))
        using (var c = new KnitClient("cs-abort-c", gw))
        {
            s.Register("Cs.Abort.M", call => { if (call.ArgsJson.Contains("abort")) Thread.CurrentThread.Abort(); return call.ArgsJson; });
            var log = new Log();
            s.ContextSubscribe("cs.abort", u => { log.Add(u.DataJson); if (u.DataJson.Contains("abort")) Thread.CurrentThread.Abort(); });
            Check(c.WaitForMethod("Cs.Abort.M", 5000), "abort: method visible");
            var e = Throws<RemoteException>(() => c.Invoke("Cs.Abort.M", "{\"abort\":1}", new InvokeOptions { TimeoutMs = 15000 }), Status.MethodFailed, "abort: an aborted handler answers with an error");
            Check(e != null && Has(e.Message, "aborted"), "abort: says so");
            Check(Has(c.Invoke("Cs.Abort.M", "{\"after\":1}", new InvokeOptions { TimeoutMs = 15000 }), "\"returned\":{\"after\":1}"), "abort: handlers run on");
            c.ContextSet("cs.abort", "{\"abort\":1}");
            Check(log.WaitFor("abort"), "abort: the context callback ran");
            c.ContextSet("cs.abort", "{\"after\":2}");
            Check(log.WaitFor("\"after\":2"), "abort: callbacks go on after an aborted one");
            c.ContextDestroy("cs.abort");
        }
    }

    // Text knit would not receive whole: an embedded NUL (C stops there) or a lone surrogate
    // (no UTF-8 form) is refused, never cut or replaced.
    static void StringsKnitCannotCarry()
    {
        using (var c = new KnitClient("cs-strings", gw))
        {
            c.Register("Cs.Str.Echo", call => call.ArgsJson);
            Check(c.WaitForMethod("Cs.Str.Echo", 5000), "strings: method visible");
            Throws<UsageException>(() => c.Invoke("Cs.Str.Echo\0junk", "{}"), Status.InvalidArgument, "strings: a method name with a NUL");
            Throws<UsageException>(() => c.Invoke("Cs.Str.\uDC00", "{}"), Status.InvalidArgument, "strings: a method name with a lone surrogate");
            Throws<UsageException>(() => c.ContextSet("cs.str\0evil", "{\"v\":1}"), Status.InvalidArgument, "strings: a context name with a NUL");
            Check(c.ContextGet("cs.str") == "{}", "strings: nothing written under the name cut at the NUL");
            Throws<InputException>(() => c.ContextSet("cs.str", "{\"s\":\"a\uD800b\"}"), Status.BadInput, "strings: JSON with a lone surrogate");
            Check(c.ContextGet("cs.str") == "{}", "strings: nothing written with U+FFFD");
            Throws<InputException>(() => c.Invoke("Cs.Str.Echo", "{\"s\":\"x\0y\"}"), Status.BadInput, "strings: JSON with a NUL");
            Throws<InputException>(() => c.Publish("cs.str", "{\"s\":\"\uDBFF\"}"), Status.BadInput, "strings: published JSON with a lone surrogate");
            Throws<UsageException>(() => c.Publish("cs.str\0x", "{}"), Status.InvalidArgument, "strings: a topic with a NUL");
            Throws<UsageException>(() => new KnitClient("cs-str\0cd", gw), Status.InvalidArgument, "strings: an application name with a NUL");
            // A result knit cannot carry is refused too, and the caller still gets an answer.
            c.Register("Cs.Str.Bad", call => "{\"s\":\"\uD800\"}");
            Throws<RemoteException>(() => c.Invoke("Cs.Str.Bad", "{}", new InvokeOptions { TimeoutMs = 15000 }), Status.MethodFailed, "strings: a result with a lone surrogate");
            // Whole characters outside the BMP (surrogate pairs) and escaped NULs pass.
            Check(Has(c.Invoke("Cs.Str.Echo", "{\"s\":\"\U0001F600\",\"z\":\"\\u0000\"}"), "\"returned\":{\"s\":\"\U0001F600\",\"z\":\"\\u0000\"}"), "strings: a surrogate pair and an escaped NUL");
        }
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    static WeakReference RegisterTracked(KnitClient c, string name)
    {
        var payload = new byte[64];
        c.Register(name, call => { GC.KeepAlive(payload); return "1"; });
        return new WeakReference(payload);
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    static WeakReference SubscribeTracked(KnitClient c, int kind)
    {
        var payload = new byte[64];
        Action<string> f = x => GC.KeepAlive(payload);
        try
        {
            switch (kind)
            {
                case 0: c.Subscribe("cs.free", m => f(m.DataJson)); break;
                case 1: c.ContextSubscribe("cs.free", u => f(u.DataJson)); break;
                case 2: c.SubscribeStream("Cs.Free", i => f(i.DataJson)); break;
                case 3: c.CreateStream("Cs.Free", r => f(r.ArgsJson)); break;
                default: c.OnEvent(f); break;
            }
        }
        catch (KnitException) { }
        return new WeakReference(payload);
    }

    static int Dead(List<WeakReference> refs)
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        int n = 0;
        foreach (var w in refs) if (!w.IsAlive) n++;
        return n;
    }

    // Handlers are not kept after they are gone: unregistered ones (also from inside
    // themselves), and those of subscriptions that failed (their GCHandles leaked). Mono scans
    // stacks conservatively, so a few may stay alive by accident: most must be collected.
    static void HandlersAreFreed()
    {
        using (var c = new KnitClient("cs-free", gw))
        {
            var refs = new List<WeakReference>();
            for (int i = 0; i < 20; i++)
            {
                refs.Add(RegisterTracked(c, "Cs.Free." + i));
                c.Unregister("Cs.Free." + i);
            }
            int dead = Dead(refs);
            Check(dead >= 10, "free: unregistered handlers are collected (" + dead + " of 20)");

            // A handler that unregisters itself.
            var selfRefs = new List<WeakReference>();
            for (int i = 0; i < 10; i++) selfRefs.Add(RegisterSelfUnregistering(c, "Cs.Free.Self." + i));
            dead = Dead(selfRefs);
            Check(dead >= 5, "free: handlers that unregistered themselves are collected (" + dead + " of 10)");
        }
        var closed = new KnitClient("cs-free-closed", gw);
        closed.Dispose();
        var failed = new List<WeakReference>();
        for (int i = 0; i < 25; i++) failed.Add(SubscribeTracked(closed, i % 5));
        int gone = Dead(failed);
        Check(gone >= 13, "free: handlers of subscriptions refused on a closed client are collected (" + gone + " of 25)");
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    static WeakReference RegisterSelfUnregistering(KnitClient c, string name)
    {
        var payload = new byte[64];
        c.Register(name, call => { GC.KeepAlive(payload); c.Unregister(name); return "1"; });
        Check(Has(c.Invoke(name, "{}", new InvokeOptions { TimeoutMs = 10000 }), "\"returned\":1"), "free: self-unregistering handler ran");
        return new WeakReference(payload);
    }

    // A handler's exception without a message still answers at once (it left the caller
    // waiting for its whole timeout), as does one whose message knit cannot carry.
    static void HandlerExceptionWithoutMessage()
    {
        using (var s = new KnitClient("cs-nullmsg-s", gw))
        using (var c = new KnitClient("cs-nullmsg-c", gw))
        {
            s.Register("Cs.NullMsg", call => { throw new NullMessageException(); });
            s.Register("Cs.NulMsg", call => { throw new InvalidOperationException("a\0b"); });
            Check(c.WaitForMethod("Cs.NullMsg", 5000) && c.WaitForMethod("Cs.NulMsg", 5000), "nullmsg: methods visible");
            var e = Throws<RemoteException>(() => c.Invoke("Cs.NullMsg", "{}", new InvokeOptions { TimeoutMs = 15000 }), Status.MethodFailed, "nullmsg: answered with an error");
            Check(e != null && Has(e.Message, "NullMessageException"), "nullmsg: the exception's type is the message: " + (e == null ? null : e.Message));
            Throws<RemoteException>(() => c.Invoke("Cs.NulMsg", "{}", new InvokeOptions { TimeoutMs = 15000 }), Status.MethodFailed, "nullmsg: a message with a NUL answers too");
        }
    }

    // Null arguments: a UsageException (INVALID_ARGUMENT, as knit says of a NULL argument),
    // never a NullReferenceException or a subscription that delivers nothing.
    static void NullArguments()
    {
        using (var c = new KnitClient("cs-null", gw))
        {
            var stream = c.CreateStream("Cs.Null.S");
            Throws<UsageException>(() => stream.PushToBranches(null, "{}"), Status.InvalidArgument, "null: PushToBranches(null)");
            Throws<InputException>(() => stream.PushToBranches(new string[] { null }, "{}"), Status.BadInput, "null: a null branch");
            Throws<UsageException>(() => c.Subscribe("cs.null", null), Status.InvalidArgument, "null: Subscribe handler");
            Throws<UsageException>(() => c.SubscribeStream("Cs.Null.S", null), Status.InvalidArgument, "null: SubscribeStream onData");
            Throws<UsageException>(() => c.ContextSubscribe("cs.null", null), Status.InvalidArgument, "null: ContextSubscribe handler");
            Throws<UsageException>(() => c.OnEvent(null), Status.InvalidArgument, "null: OnEvent handler");
            Throws<UsageException>(() => c.ChannelSubscribe(null), Status.InvalidArgument, "null: ChannelSubscribe handler");
            Throws<UsageException>(() => c.OnChannelsChanged(null), Status.InvalidArgument, "null: OnChannelsChanged handler");
            Throws<UsageException>(() => c.Register("Cs.Null.M", (Func<Call, string>)null), Status.InvalidArgument, "null: Register handler");
            Throws<UsageException>(() => c.RegisterAsync("Cs.Null.M", null), Status.InvalidArgument, "null: RegisterAsync handler");
            Throws<UsageException>(() => c.Invoke(null), Status.InvalidArgument, "null: method name");
            stream.Dispose();
        }
    }

    static int Main(string[] args)
    {
        if (args.Length == 2 && args[0] == "--exit-child") return ExitChild(args[1]);
        if (args.Length < 2) { Console.Error.WriteLine("usage: Tests.exe GATEWAY_SOCKET RUST_METHOD"); return 2; }
        gw = args[0];
        rustMethod = args[1];
        var tests = new Action[] { StatusEnumMatchesTheLibrary, ConnectFailures, RoundTrips, PollMode, DisposeAndMisuse, RustPeer, Contexts, Bus, Streams, Events, Channels, SubscriptionMisuse,
            DisposeWhileCallsRun, UseWhileDisposing, ExitWithoutDispose, AbortInCallback, StringsKnitCannotCarry,
            HandlersAreFreed, HandlerExceptionWithoutMessage, NullArguments };
        foreach (var t in tests)
        {
            try { t(); }
            catch (Exception e) { failures++; Console.Error.WriteLine(t.Method.Name + ": unexpected " + e); }
        }
        GC.Collect();
        GC.WaitForPendingFinalizers();
        Console.WriteLine(checks + " checks, " + failures + " failed");
        Console.WriteLine((checks - failures) + " passed, " + failures + " failed");
        return failures == 0 ? 0 : 1;
    }
}
