// Tests of the C++ wrapper (knit/knit.hpp): RAII and move-only types, exceptions per status
// family, std::function handlers (sync, async, bytes), poll mode. Run by ffi/tests/c_abi.rs,
// built with g++ -std=c++17 -Wall -Wextra -Werror under ASan/UBSan, against a gateway whose
// socket is argv[1].
#include <knit/knit.hpp>

#include <atomic>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>

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
    // A moved-from client's calls are status errors (NULL handle), not crashes.
    EXPECT_THROW(knit::UsageError, a.invoke("X"), KNIT_INVALID_ARGUMENT);
    b.close();
    b.close();  // idempotent
    CHECK(!b.is_open() && !b.connected());
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
    } catch (const std::exception& e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        failures++;
    }
    std::printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
