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

    static int Main(string[] args)
    {
        if (args.Length < 2) { Console.Error.WriteLine("usage: Tests.exe GATEWAY_SOCKET RUST_METHOD"); return 2; }
        gw = args[0];
        rustMethod = args[1];
        var tests = new Action[] { StatusEnumMatchesTheLibrary, ConnectFailures, RoundTrips, PollMode, DisposeAndMisuse, RustPeer };
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
