// Tests of the C++ wrapper (knit/knit.hpp): RAII and move-only types, exceptions per status
// family, std::function handlers (sync, async, bytes), poll mode. Run by ffi/tests/c_abi.rs,
// built with g++ -std=c++17 -Wall -Wextra -Werror under ASan/UBSan, against a gateway whose
// socket is argv[1].
#include <knit/knit.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

static int failures = 0;
static int checks = 0;
static std::string gw;

#define CHECK(cond)                                                                     \
    do {                                                                                \
        checks++;                                                                       \
        if (!(cond)) {                                                                  \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                                 \
        }                                                                               \
    } while (0)

static bool contains(const std::string& s, const std::string& needle) {
    return s.find(needle) != std::string::npos;
}

/// Runs `f`, expecting it to throw `E` with `status`; returns the error for more checks.
template <class E, class F>
static std::optional<knit::Error> expect_throw(F&& f, knit_status_t status, int line) {
    checks++;
    try {
        f();
    } catch (const E& e) {
        if (e.status() != status) {
            std::fprintf(stderr, "line %d: status %d (%s), wanted %d\n", line, e.status(), e.name(),
                         status);
            failures++;
        }
        return e;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "line %d: wrong exception: %s\n", line, e.what());
        failures++;
        return std::nullopt;
    }
    std::fprintf(stderr, "line %d: nothing thrown\n", line);
    failures++;
    return std::nullopt;
}
#define EXPECT_THROW(E, expr, status) expect_throw<E>([&] { expr; }, status, __LINE__)

static_assert(!std::is_copy_constructible_v<knit::Client>, "Client is move-only");
static_assert(std::is_nothrow_move_constructible_v<knit::Client>, "Client moves cheaply");
static_assert(!std::is_copy_constructible_v<knit::Reply>, "Reply is move-only");
static_assert(std::is_base_of_v<std::runtime_error, knit::TimeoutError>, "errors are exceptions");
static_assert(!std::is_copy_constructible_v<knit::Subscription>, "Subscription is move-only");
static_assert(std::is_nothrow_move_constructible_v<knit::Subscription>, "Subscription moves");
static_assert(!std::is_copy_constructible_v<knit::Stream>, "Stream is move-only");
static_assert(!std::is_copy_constructible_v<knit::StreamRequest>, "StreamRequest is move-only");

/// Lines that callbacks add, with waits on conditions (never sleeps).
class Log {
public:
    void add(std::string line) {
        std::lock_guard<std::mutex> g(mu_);
        lines_.push_back(std::move(line));
        cv_.notify_all();
    }
    /// Waits up to 5 s until some line contains `needle`.
    bool wait_for(const std::string& needle) {
        std::unique_lock<std::mutex> g(mu_);
        return cv_.wait_for(g, std::chrono::seconds(5), [&] { return has_locked(needle); });
    }
    bool wait_count(std::size_t n) {
        std::unique_lock<std::mutex> g(mu_);
        return cv_.wait_for(g, std::chrono::seconds(5), [&] { return lines_.size() >= n; });
    }
    bool has(const std::string& needle) {
        std::lock_guard<std::mutex> g(mu_);
        return has_locked(needle);
    }
    std::size_t size() {
        std::lock_guard<std::mutex> g(mu_);
        return lines_.size();
    }
    /// Whether a line with `first` came before a line with `then`.
    bool before(const std::string& first, const std::string& then) {
        std::lock_guard<std::mutex> g(mu_);
        std::size_t a = index_locked(first), b = index_locked(then);
        return a < lines_.size() && b < lines_.size() && a < b;
    }

private:
    bool has_locked(const std::string& needle) const { return index_locked(needle) < lines_.size(); }
    std::size_t index_locked(const std::string& needle) const {
        for (std::size_t i = 0; i < lines_.size(); i++)
            if (lines_[i].find(needle) != std::string::npos) return i;
        return lines_.size();
    }
    std::mutex mu_;
    std::condition_variable cv_;
    std::vector<std::string> lines_;
};

static void test_errors_and_raii() {
    auto e = EXPECT_THROW(knit::ConnectionError,
                          knit::Client::connect("cpp", "/nonexistent/knit/gw.sock"),
                          KNIT_GATEWAY_UNREACHABLE);
    CHECK(e && std::string(e->family()) == "connection" && contains(e->what(), "unreachable"));
    EXPECT_THROW(knit::UsageError, knit::Client::connect("", gw), KNIT_INVALID_ARGUMENT);
    EXPECT_THROW(knit::UsageError, knit::Client::connect("cpp", gw, 0x80), KNIT_INVALID_ARGUMENT);

    knit::Client a = knit::Client::connect("cpp-raii", gw);
    CHECK(a.is_open() && a.connected());
    knit::Client b = std::move(a);
    CHECK(!a.is_open() && b.is_open());
    CHECK(contains(b.instance(), "\"application\":\"cpp-raii\""));
    CHECK(b.max_payload() == (1u << 20));
    // A moved-from client's calls are CLOSED errors, not crashes.
    EXPECT_THROW(knit::UsageError, a.invoke("X"), KNIT_CLOSED);
    b.close();
    b.close();  // idempotent
    CHECK(!b.is_open() && !b.connected());
    // So are a closed client's, whatever the call (as a closed handle gives in C).
    auto closed = EXPECT_THROW(knit::UsageError, b.invoke("X"), KNIT_CLOSED);
    CHECK(closed && contains(closed->what(), "closed"));
    EXPECT_THROW(knit::UsageError, b.context_get("n"), KNIT_CLOSED);
    EXPECT_THROW(knit::UsageError, b.publish("t", "{}"), KNIT_CLOSED);
    EXPECT_THROW(knit::UsageError, b.register_method("M", [](const knit::Call&) { return "1"; }),
                 KNIT_CLOSED);
    CHECK(b.try_invoke("X").status == KNIT_CLOSED);
}

static void test_handlers() {
    knit::Client server = knit::Client::connect("cpp-server", gw);
    knit::Client client = knit::Client::connect("cpp-client", gw);
    std::atomic<int> calls{0};

    server.register_method("Echo", [&](const knit::Call& c) {
        calls++;
        return c.args_json;
    });
    EXPECT_THROW(knit::InputError, server.register_method("Echo", nullptr), KNIT_ALREADY_EXISTS);
    server.register_method("Boom", [](const knit::Call&) -> std::string {
        throw std::runtime_error("boom");
    });
    std::thread later;
    server.register_async("Later", [&](const knit::Call& c, knit::Reply& r) {
        // Move the reply to another thread and answer there.
        later = std::thread([r = std::move(r), args = c.args_json]() mutable { r.ok(args); });
    });
    server.register_async("Forgets", [](const knit::Call&, knit::Reply&) {});
    std::optional<knit::Reply> parked;
    server.register_async("Parks", [&](const knit::Call&, knit::Reply& r) { parked.emplace(std::move(r)); });
    std::atomic<int> bad_json_thrown{0};
    server.register_async("Retries", [&](const knit::Call&, knit::Reply& r) {
        try {
            r.ok("{oops");
        } catch (const knit::InputError& e) {
            if (e.status() == KNIT_BAD_INPUT && !r.answered()) bad_json_thrown++;
        }
        r.ok("\"second try\"");
    });
    server.register_bytes("Bytes", [](const knit::BytesCall& c, knit::Reply& r) {
        r.bytes(c.data, c.size);
    });
    CHECK(client.wait_for_method("Bytes", 5000));
    CHECK(!client.wait_for_method("Nobody", 0));

    std::string r = client.invoke("Echo", R"({"x":[1,2]})");
    CHECK(contains(r, R"("returned":{"x":[1,2]})") && contains(r, R"("application":"cpp-server")"));
    CHECK(calls == 1);

    auto e = EXPECT_THROW(knit::RemoteError, client.invoke("Boom"), KNIT_METHOD_FAILED);
    CHECK(e && std::string(e->what()) == "boom" && contains(e->result_json(), R"("message":"boom")"));

    r = client.invoke("Later", "[3]");
    CHECK(contains(r, R"("returned":[3])"));
    server.unregister("Later");  // `later` is assigned once this returns
    if (later.joinable()) later.join();

    e = EXPECT_THROW(knit::RemoteError, client.invoke("Forgets"), KNIT_METHOD_FAILED);
    CHECK(e && std::string(e->what()) == "method handler did not reply");

    knit::InvokeOptions quick;
    quick.timeout_ms = 100;
    e = EXPECT_THROW(knit::TimeoutError, client.invoke("Parks", "{}", quick), KNIT_TIMEOUT);
    CHECK(e && contains(e->result_json(), R"("status":1)"));

    r = client.invoke("Retries");
    CHECK(contains(r, R"("returned":"second try")"));
    server.unregister("Retries");  // the handler is done once this returns
    CHECK(bad_json_thrown == 1);

    EXPECT_THROW(knit::InputError, client.invoke("Echo", "{nope"), KNIT_BAD_INPUT);
    knit::InvokeOptions no_wait;
    no_wait.wait_ms = 0;
    EXPECT_THROW(knit::NotFoundError, client.invoke("Nobody", "{}", no_wait), KNIT_NO_SERVER);
    knit::Outcome o = client.try_invoke("Nobody", "{}", no_wait);
    CHECK(!o && o.status == KNIT_NO_SERVER && contains(o.message, "Nobody") && o.result_json.empty());
    o = client.try_invoke("Boom");
    CHECK(!o && o.status == KNIT_METHOD_FAILED && contains(o.result_json, R"("status":1)"));
    o = client.try_invoke("Echo", "7");
    CHECK(o && contains(o.result_json, R"("returned":7)"));

    const uint8_t data[] = {0, 10, 0, 255};
    auto back = client.invoke_bytes("Bytes", data, sizeof data);
    CHECK(back == std::vector<uint8_t>(data, data + sizeof data));

    knit::InvokeOptions all;
    all.target = "all";
    server.unregister("Echo");
    EXPECT_THROW(knit::NotFoundError, server.unregister("Echo"), KNIT_NOT_FOUND);
    // The server knows at once (other peers learn it through the gateway a moment later).
    EXPECT_THROW(knit::NotFoundError, server.invoke("Echo", "{}", no_wait), KNIT_NO_SERVER);
    CHECK(calls == 2);
    CHECK(contains(client.methods(), R"("name":"Bytes")"));
    CHECK(contains(client.servers(), R"("application":"cpp-server")"));

    // Closing answers the parked reply (its call has long timed out) and makes it unusable.
    server.close();
    CHECK(parked.has_value());
    EXPECT_THROW(knit::UsageError, parked->ok("1"), KNIT_CLOSED);
    CHECK(parked->answered());
}

static void test_poll_mode() {
    knit::Client server = knit::Client::connect("cpp-poller", gw, KNIT_CONNECT_POLL);
    knit::Client client = knit::Client::connect("cpp-poll-caller", gw);
    std::thread::id ran_on;
    server.register_method("Polled", [&](const knit::Call& c) {
        ran_on = std::this_thread::get_id();
        return c.args_json;
    });
    std::atomic<bool> done{false};
    std::string result;
    std::thread t([&] {
        result = client.invoke("Polled", R"({"p":true})");
        done = true;
    });
    uint32_t handled = 0;
    for (int i = 0; i < 200 && !done; i++) handled += server.poll(50);
    t.join();
    CHECK(handled == 1);
    CHECK(ran_on == std::this_thread::get_id());
    CHECK(contains(result, R"("returned":{"p":true})"));
    EXPECT_THROW(knit::UsageError, client.poll(0), KNIT_INVALID_ARGUMENT);
}


static void test_contexts() {
    knit::Client w = knit::Client::connect("cpp-ctx-writer", gw);
    knit::Client f = knit::Client::connect("cpp-ctx-follower", gw);
    uint64_t v = 99;
    CHECK(f.context_get("cpp.ctx", &v) == "{}" && v == 0);
    uint64_t v1 = w.context_set("cpp.ctx", R"({"a":1,"b":2})");
    CHECK(v1 > 0);
    CHECK(f.context_get("cpp.ctx", &v) == R"({"a":1,"b":2})" && v == v1);

    Log log, other;
    knit::Subscription s = f.context_subscribe("cpp.ctx", [&](const knit::ContextUpdate& u) {
        log.add(u.name + " v" + std::to_string(u.version) + " " + u.data_json + " " + u.delta_json);
    });
    knit::Subscription barrier = f.context_subscribe("cpp.ctx", [&](const knit::ContextUpdate& u) {
        other.add(u.data_json);
    });
    CHECK(s.is_open());
    CHECK(log.wait_for(R"(cpp.ctx v)" + std::to_string(v1) + R"( {"a":1,"b":2} {"a":1,"b":2})"));
    uint64_t v2 = w.context_update("cpp.ctx", R"({"b":null,"c":3})");
    CHECK(v2 == v1 + 1);
    CHECK(log.wait_for(R"({"a":1,"c":3} {"b":null,"c":3})"));
    EXPECT_THROW(knit::InputError, w.context_update_if("cpp.ctx", v1, R"({"x":1})"), KNIT_ALREADY_EXISTS);
    CHECK(w.context_update_if("cpp.ctx", v2, R"({"x":1})") == v2 + 1);
    CHECK(w.context_set_path("cpp.ctx", "p.q", "[true]") == v2 + 2);
    CHECK(w.context_set_paths("cpp.ctx", R"({"p.r":1,"x":null})") == v2 + 3);
    CHECK(f.context_get("cpp.ctx") == R"({"a":1,"c":3,"p":{"q":[true],"r":1}})");
    EXPECT_THROW(knit::InputError, w.context_set("cpp.ctx", "[1]"), KNIT_BAD_INPUT);
    EXPECT_THROW(knit::InputError, w.context_set("cpp.ctx", "{oops"), KNIT_BAD_INPUT);
    CHECK(contains(w.contexts(), R"("cpp.ctx")"));

    // Moving a subscription keeps it; closing it stops the callback (the barrier subscription
    // on the same client is called in the same delivery).
    knit::Subscription moved = std::move(s);
    CHECK(!s.is_open() && moved.is_open());
    moved.close();
    moved.close();  // idempotent
    std::size_t before = log.size();
    w.context_update("cpp.ctx", R"({"after":1})");
    CHECK(other.wait_for(R"("after":1)"));
    CHECK(log.size() == before);

    // A callback may close (or destroy) its own subscription.
    Log self_log;
    knit::Subscription self;
    self = f.context_subscribe("cpp.ctx", [&](const knit::ContextUpdate& u) {
        self_log.add(u.data_json);
        if (contains(u.data_json, "self")) self.close();
    });
    CHECK(self_log.wait_count(1));
    w.context_update("cpp.ctx", R"({"self":1})");
    CHECK(self_log.wait_for(R"("self":1)"));
    w.context_update("cpp.ctx", R"({"self":2})");
    CHECK(other.wait_for(R"("self":2)"));
    CHECK(self_log.size() == 2 && !self.is_open());

    // Exceptions in a callback stay in the callback.
    knit::Subscription thrower = f.context_subscribe("cpp.ctx", [&](const knit::ContextUpdate&) {
        throw std::runtime_error("ignored");
    });
    w.context_update("cpp.ctx", R"({"thrown":1})");
    CHECK(other.wait_for(R"("thrown":1)"));

    w.context_destroy("cpp.ctx");
    EXPECT_THROW(knit::NotFoundError, w.context_destroy("cpp.ctx"), KNIT_NOT_FOUND);
    // Subscriptions may outlive their client: closing the client ends them.
    f.close();
    barrier.close();
    thrower.close();
}

static void test_bus() {
    knit::Client sub = knit::Client::connect("cpp-bus-sub", gw);
    Log all, keyed;
    knit::Subscription s1 = sub.subscribe("cpp.prices.*", [&](const knit::Message& m) {
        all.add(m.topic + " " + m.data_json + " " + m.source_json);
    });
    knit::SubscribeOptions eu;
    eu.routing_key = "eu";
    knit::Subscription s2 = sub.subscribe(
        "cpp.prices.>", [&](const knit::Message& m) { keyed.add(m.data_json); }, eu);
    knit::Client pub = knit::Client::connect("cpp-bus-pub", gw);  // knows both subscriptions
    pub.publish("cpp.prices.VOD", R"({"bid":1})");
    knit::PublishOptions us;
    us.routing_key = "us";
    pub.publish("cpp.prices.VOD", R"({"k":"us"})", us);
    knit::PublishOptions to_eu;
    to_eu.routing_key = "eu";
    pub.publish("cpp.prices.VOD", R"({"k":"eu"})", to_eu);
    knit::PublishOptions nobody;
    nobody.target_json = R"({"application":"nobody"})";
    pub.publish("cpp.prices.VOD", R"({"k":"nobody"})", nobody);
    pub.publish("cpp.prices.VOD", R"({"k":"last"})");
    CHECK(all.wait_for(R"({"k":"last"})"));
    CHECK(keyed.wait_for(R"({"k":"last"})"));
    CHECK(all.has(R"(cpp.prices.VOD {"bid":1} {"application":"cpp-bus-pub")"));
    CHECK(all.has(R"({"k":"us"})") && !keyed.has(R"({"k":"us"})") && keyed.has(R"({"k":"eu"})"));
    CHECK(!all.has("nobody"));
    EXPECT_THROW(knit::InputError, pub.publish("t", "{bad"), KNIT_BAD_INPUT);
    EXPECT_THROW(knit::UsageError, pub.publish("", "1"), KNIT_INVALID_ARGUMENT);
    pub.publish_batch("cpp.prices.VOD", R"([{"b":1},{"b":2},{"b":3}])");
    CHECK(all.wait_for(R"({"b":3})"));
    CHECK(all.before(R"({"b":1})", R"({"b":2})") && all.before(R"({"b":2})", R"({"b":3})"));
    pub.publish_batch("cpp.prices.VOD", R"([{"k":"eu-batch"}])", to_eu);
    CHECK(keyed.wait_for("eu-batch"));
    EXPECT_THROW(knit::InputError, pub.publish_batch("t", R"({"not":"an array"})"), KNIT_BAD_INPUT);
    s2.close();
    pub.publish("cpp.prices.VOD", R"({"k":"after"})");
    CHECK(all.wait_for(R"({"k":"after"})"));
    CHECK(!keyed.has("after"));
}

/// A subscription closed while a run of its callback is still on the stack further up: that run
/// invokes, and the dispatcher runs the next message for it inside the wait (ffi/README.md,
/// "Nesting"); the nested run closes its own subscription ("self"), or another subscription's
/// callback closes it ("other"). The outer run goes on with its callback (and what it captured)
/// intact — the wrapper used to free them under it (ASan: heap-use-after-free, then a double
/// delete) — and the callback is not called again.
static void test_close_while_running_further_up() {
    for (const std::string mode : {"self", "other"}) {
        knit::Client server = knit::Client::connect("cpp-nest-server", gw);
        std::mutex mu;
        std::condition_variable cv;
        bool entered = false, closed = false;
        server.register_method("Cpp.Nest.Gate", [&](const knit::Call&) {
            // Returns once the nested run closed the subscription (or after 5 s).
            std::unique_lock<std::mutex> g(mu);
            entered = true;
            cv.notify_all();
            cv.wait_for(g, std::chrono::seconds(5), [&] { return closed; });
            return std::string("1");
        });
        knit::Client c = knit::Client::connect("cpp-nest-sub", gw);
        CHECK(c.wait_for_method("Cpp.Nest.Gate", 5000));
        auto closed_now = [&] {
            std::lock_guard<std::mutex> g(mu);
            closed = true;
            cv.notify_all();
        };
        Log log;
        std::atomic<int> runs{0};
        std::optional<knit::Subscription> a, b;
        const std::string tag(64, 'x');  // copied into the callback: lives in the wrapper's holder
        a.emplace(c.subscribe("cpp.nest.a", [&, tag](const knit::Message&) {
            const int n = ++runs;
            if (n == 1) {
                c.invoke("Cpp.Nest.Gate");  // the next message runs inside this wait
                log.add("outer run done " + std::to_string(tag.size()) + tag.substr(0, 1));
            } else if (mode == "self") {
                a->close();
                closed_now();
            }
        }));
        b.emplace(c.subscribe("cpp.nest.b", [&](const knit::Message&) {
            a->close();
            closed_now();
        }));
        knit::Subscription z = c.subscribe("cpp.nest.z", [&](const knit::Message& m) { log.add(m.data_json); });
        knit::Client pub = knit::Client::connect("cpp-nest-pub", gw);  // knows the subscriptions
        pub.publish("cpp.nest.a", "1");
        {
            std::unique_lock<std::mutex> g(mu);
            CHECK(cv.wait_for(g, std::chrono::seconds(5), [&] { return entered; }));
        }
        pub.publish(mode == "self" ? "cpp.nest.a" : "cpp.nest.b", "2");
        CHECK(log.wait_for("outer run done 64x"));
        {
            std::lock_guard<std::mutex> g(mu);
            CHECK(closed);
        }
        pub.publish("cpp.nest.a", "3");
        pub.publish("cpp.nest.z", "\"end\"");
        CHECK(log.wait_for("end"));
        CHECK(runs == (mode == "self" ? 2 : 1));
        CHECK(!a->is_open());
        a.reset();
        b.reset();
    }
}

static void test_streams() {
    knit::Client server = knit::Client::connect("cpp-stream-server", gw);
    knit::Client client = knit::Client::connect("cpp-stream-client", gw);
    std::mutex mu;
    std::condition_variable cv;  // signalled when eu_sub or parked is set
    std::optional<knit::StreamSubscriber> eu_sub;
    std::optional<knit::StreamRequest> parked;
    knit::StreamOptions so;
    so.policy = "drop-oldest";
    so.queue = 16;
    so.on_request = [&](knit::StreamRequest& r) {
        if (contains(r.args_json(), "reject")) return r.reject("not you");
        if (contains(r.args_json(), "throw")) throw std::runtime_error("thrown");
        if (contains(r.args_json(), "forget")) return;  // destroyed undecided: rejected
        if (contains(r.args_json(), "park")) {
            std::lock_guard<std::mutex> g(mu);
            parked.emplace(std::move(r));
            cv.notify_all();
            return;
        }
        if (contains(r.args_json(), "eu")) {
            auto s = r.accept("eu");
            std::lock_guard<std::mutex> g(mu);
            eu_sub.emplace(std::move(s));
            cv.notify_all();
            return;
        }
        r.accept();
    };
    knit::Stream ticks = server.create_stream("Cpp.Ticks", std::move(so));
    EXPECT_THROW(knit::InputError, server.create_stream("Cpp.Ticks"), KNIT_ALREADY_EXISTS);
    knit::StreamOptions bad;
    bad.policy = "lossy";
    EXPECT_THROW(knit::UsageError, server.create_stream("Cpp.Bad", bad), KNIT_INVALID_ARGUMENT);

    Log plain, branch, ends;
    knit::StreamSubscribeOptions o;
    o.wait_ms = 5000;
    o.timeout_ms = 5000;
    knit::Subscription s1 = client.subscribe_stream(
        "Cpp.Ticks", [&](const knit::StreamItem& i) { plain.add(i.data_json); },
        [&](const std::string& reason, bool server) { ends.add(reason + (server ? " server" : "")); },
        o);
    knit::StreamSubscribeOptions on_eu = o;
    on_eu.args_json = R"({"branch":"eu"})";
    knit::Subscription s2 = client.subscribe_stream(
        "Cpp.Ticks",
        [&](const knit::StreamItem& i) {
            branch.add(i.data_json + (i.is_private ? " private" : "") + " gap=" + std::to_string(i.gap));
        },
        {}, on_eu);
    for (const char* why : {R"({"reject":1})", R"({"throw":1})", R"({"forget":1})"}) {
        knit::StreamSubscribeOptions r = o;
        r.args_json = why;
        EXPECT_THROW(knit::RemoteError,
                     client.subscribe_stream("Cpp.Ticks", [](const knit::StreamItem&) {}, {}, r),
                     KNIT_METHOD_FAILED);
    }
    ticks.push(R"({"n":1})");
    ticks.push({"eu"}, R"({"only":"eu"})");
    CHECK(branch.wait_for(R"({"only":"eu"})"));
    {
        // The request callback may still be running when the subscriber hears the answer.
        std::unique_lock<std::mutex> g(mu);
        CHECK(cv.wait_for(g, std::chrono::seconds(5), [&] { return eu_sub.has_value(); }));
        if (eu_sub) eu_sub->push(R"({"just":"you"})");
    }
    CHECK(branch.wait_for(R"({"just":"you"} private gap=0)"));
    ticks.push(R"({"n":2})");
    CHECK(plain.wait_for(R"({"n":2})"));
    CHECK(!plain.has("only") && !plain.has("just"));
    CHECK(ticks.branches() == R"(["","eu"])");
    CHECK(contains(ticks.subscriptions(), R"("arguments":{"branch":"eu"})"));
    EXPECT_THROW(knit::InputError, ticks.push("[1]"), KNIT_BAD_INPUT);
    ticks.push_batch(R"([{"n":3},{"n":4}])");
    CHECK(plain.wait_for(R"({"n":4})"));
    CHECK(plain.before(R"({"n":3})", R"({"n":4})"));
    EXPECT_THROW(knit::InputError, ticks.push_batch(R"([{"n":5},1])"), KNIT_BAD_INPUT);

    // A request decided later, from another thread.
    std::thread later([&] {
        std::unique_lock<std::mutex> g(mu);
        if (cv.wait_for(g, std::chrono::seconds(5), [&] { return parked.has_value(); })) {
            parked->accept();
            parked.reset();
        }
    });
    knit::StreamSubscribeOptions park = o;
    park.args_json = R"({"park":1})";
    Log parked_log;
    knit::Subscription s3 = client.subscribe_stream(
        "Cpp.Ticks", [&](const knit::StreamItem& i) { parked_log.add(i.data_json); }, {}, park);
    later.join();
    ticks.push(R"({"n":3})");
    CHECK(parked_log.wait_for(R"({"n":3})"));

    ticks.close_branch("eu");
    s3.close();
    ticks.push(R"({"n":4})");
    CHECK(plain.wait_for(R"({"n":4})"));
    CHECK(!parked_log.has(R"({"n":4})"));
    ticks.close();
    CHECK(ends.wait_for("Stream closed server"));
    EXPECT_THROW(knit::UsageError, ticks.push("{}"), KNIT_INVALID_ARGUMENT);  // closed: NULL
    {
        std::lock_guard<std::mutex> g(mu);
        if (eu_sub) EXPECT_THROW(knit::UsageError, eu_sub->push("{}"), KNIT_CLOSED);
    }
    EXPECT_THROW(knit::NotFoundError,
                 client.subscribe_stream("Cpp.Nobody", [](const knit::StreamItem&) {}, {},
                                         knit::StreamSubscribeOptions{"{}", "", 0, 1000}),
                 KNIT_NO_SERVER);
}

/// Text knit refuses (not UTF-8) in a decision leaves the request undecided: accept and reject
/// throw and keep it, and the wrapper still rejects it — with the exception's message, or a
/// fixed one when that cannot be sent either — so the subscriber hears at once rather than
/// waiting out its timeout. A method handler's exception whose message is not UTF-8 answers with
/// a fixed error rather than "did not reply".
static void test_text_knit_refuses() {
    knit::Client server = knit::Client::connect("cpp-utf8-server", gw);
    knit::Client client = knit::Client::connect("cpp-utf8-client", gw);
    std::atomic<int> kept{0};
    knit::StreamOptions so;
    so.on_request = [&](knit::StreamRequest& r) {
        if (contains(r.args_json(), "throw")) throw std::runtime_error("no entry for caf\xe9");
        try {
            if (contains(r.args_json(), "branch")) r.accept("eu\xff");
            if (contains(r.args_json(), "reason")) r.reject("caf\xe9");
        } catch (const knit::UsageError& e) {
            if (e.status() == KNIT_INVALID_ARGUMENT && !r.decided()) kept++;
            if (contains(r.args_json(), "then-accept")) {
                r.accept();
                return;
            }
            throw;  // rejected with this (valid) message
        }
    };
    knit::Stream st = server.create_stream("Cpp.Utf8", std::move(so));
    knit::StreamSubscribeOptions o;
    o.wait_ms = 5000;
    o.timeout_ms = 5000;
    const std::pair<const char*, const char*> cases[] = {
        {R"({"throw":1})", "request handler failed (its message is not UTF-8)"},
        {R"({"branch":1})", "branch is not valid UTF-8"},
        {R"({"reason":1})", "reason is not valid UTF-8"},
    };
    for (const auto& [args, reason] : cases) {
        o.args_json = args;
        auto e = EXPECT_THROW(knit::RemoteError,
                              client.subscribe_stream("Cpp.Utf8", [](const knit::StreamItem&) {}, {}, o),
                              KNIT_METHOD_FAILED);
        CHECK(e && contains(e->what(), reason));
    }
    CHECK(kept == 2);
    // The request is still held after a refused accept, so a valid decision can follow.
    o.args_json = R"({"branch":1,"then-accept":1})";
    Log items;
    knit::Subscription s = client.subscribe_stream(
        "Cpp.Utf8", [&](const knit::StreamItem& i) { items.add(i.data_json); }, {}, o);
    CHECK(kept == 3);
    st.push(R"({"n":1})");
    CHECK(items.wait_for(R"({"n":1})"));

    server.register_method("Cpp.Latin1", [](const knit::Call&) -> std::string {
        throw std::runtime_error("bad caf\xe9");
    });
    auto e = EXPECT_THROW(knit::RemoteError, client.invoke("Cpp.Latin1"), KNIT_METHOD_FAILED);
    CHECK(e && std::string(e->what()) == "method handler failed (its message is not UTF-8)");
}

static void test_events() {
    knit::Client watcher = knit::Client::connect("cpp-events", gw);
    Log events;
    knit::Subscription s = watcher.on_event([&](const std::string& e) { events.add(e); });
    CHECK(events.wait_for(R"({"type":"serverAdded","server":{"application":"cpp-events")"));
    {
        knit::Client peer = knit::Client::connect("cpp-events-peer", gw);
        peer.register_method("Cpp.Ev", [](const knit::Call& c) { return c.args_json; });
        CHECK(events.wait_for(R"({"type":"methodAdded","method":{"name":"Cpp.Ev")"));
    }
    CHECK(events.wait_for(R"({"type":"serverRemoved","server":{"application":"cpp-events-peer")"));
}

static void test_channels() {
    knit::Client w = knit::Client::connect("cpp-chan-w", gw);
    knit::Client r = knit::Client::connect("cpp-chan-r", gw);
    CHECK(contains(r.channel_list(), R"({"name":"Green","meta":{"color":"#4CAF50")"));
    CHECK(contains(r.channel_get("Green"), R"("name":"Green")"));
    EXPECT_THROW(knit::NotFoundError, r.channel_get("Nope"), KNIT_NOT_FOUND);
    EXPECT_THROW(knit::NotFoundError, r.channel_join("Nope"), KNIT_NOT_FOUND);
    Log changed, follow;
    knit::Subscription c = r.on_channels_changed([&](const std::string& names) { changed.add(names); });
    knit::Subscription f = r.channel_subscribe([&](const knit::ChannelUpdate& u) {
        follow.add(u.channel + " " + u.data_json + " " + u.context_json);
    });
    CHECK(changed.wait_for("[]"));
    r.channel_join("Green");
    CHECK(changed.wait_for(R"(["Green"])") && r.channels_joined() == R"(["Green"])");
    CHECK(w.channel_publish(R"({"instrument":"VOD.L"})", "Green") > 0);
    CHECK(follow.wait_for(R"(Green {"instrument":"VOD.L"} {"name":"Green")"));
    w.channel_publish_fdc3(R"({"type":"fdc3.instrument","id":{"ticker":"BT"}})", "Green");
    CHECK(follow.wait_for(R"("fdc3":{"type":"fdc3.instrument","id":{"ticker":"BT"}})"));
    EXPECT_THROW(knit::InputError, w.channel_publish_fdc3(R"({"id":1})", "Green"), KNIT_BAD_INPUT);
    EXPECT_THROW(knit::InputError, w.channel_publish(R"({"a":1})"), KNIT_BAD_INPUT);  // none joined
    r.channel_set_mode(knit::ChannelMode::multi);
    r.channel_join("Cyan");
    CHECK(changed.wait_for(R"(["Green","Cyan"])"));
    Log one;
    knit::Subscription o = w.channel_subscribe_for("Cyan", [&](const knit::ChannelUpdate& u) { one.add(u.data_json); });
    r.channel_publish(R"({"both":1})");  // every joined channel
    CHECK(one.wait_for(R"("both":1)") && follow.wait_for(R"(Green {"instrument":"VOD.L")"));
    r.channel_leave();
    CHECK(changed.wait_for(R"([])") && r.channels_joined() == "[]");
    f.close();
    std::size_t before = follow.size();
    w.channel_publish(R"({"after":1})", "Cyan");
    CHECK(one.wait_for(R"("after":1)") && follow.size() == before);
}

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s GATEWAY_SOCKET\n", argv[0]);
        return 2;
    }
    gw = argv[1];
    try {
        test_errors_and_raii();
        test_handlers();
        test_poll_mode();
        test_contexts();
        test_bus();
        test_streams();
        test_close_while_running_further_up();
        test_text_knit_refuses();
        test_events();
        test_channels();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        failures++;
    }
    std::printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
