// Tests of the .NET binding, compiled with Mono's mcs together with Knit/*.cs and run with
// mono by ../test.sh: argv[0] is the gateway socket, argv[1] a method served by a Rust peer in
// another process (`knit serve ... --echo`, application "rust-echo").
using System;
using System.Collections.Generic;
using System.Threading;
using Knit;

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
        IntPtr raw = c.Handle.DangerousGetHandle();
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

    static int Main(string[] args)
    {
        if (args.Length < 2) { Console.Error.WriteLine("usage: Tests.exe GATEWAY_SOCKET RUST_METHOD"); return 2; }
        gw = args[0];
        rustMethod = args[1];
        var tests = new Action[] { StatusEnumMatchesTheLibrary, ConnectFailures, RoundTrips, PollMode, DisposeAndMisuse, RustPeer, Contexts, Bus, Streams, Events, Channels, SubscriptionMisuse };
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
