// knit — header-only C++17 wrapper over the C ABI (knit.h). Move-only RAII handles,
// exceptions per status family, std::function handlers.
//
//   knit::Client server = knit::Client::connect("pricer");
//   server.register_method("Price", [](const knit::Call& c) { return std::string("{\"bid\":1.5}"); });
//   knit::Client client = knit::Client::connect("blotter");
//   std::string result = client.invoke("Price", R"({"symbol":"VOD.L"})");   // io.Connect result JSON
//   knit::Subscription s = client.context_subscribe("instrument", [](const knit::ContextUpdate& u) {
//       std::cout << u.version << " " << u.data_json << "\n";
//   });                                               // ends when `s` is destroyed
//
// Threading is the C ABI's (ffi/README.md): handlers run on the client's dispatcher thread, or
// inside Client::poll for a client connected with KNIT_CONNECT_POLL; a Client may be used from
// several threads at once, but it must not be moved, closed or destroyed while another thread
// uses it, nor from inside one of its own handlers.
#ifndef KNIT_HPP
#define KNIT_HPP

#include <knit.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace knit {

// ----- errors ---------------------------------------------------------------------------------

/// A failed knit call: its status code (KNIT_*), the detail message, and — when an invocation
/// failed on every server — the io.Connect-shaped result JSON.
class Error : public std::runtime_error {
public:
    Error(knit_status_t status, const std::string& message, std::string result_json = {})
        : std::runtime_error(message), status_(status), result_json_(std::move(result_json)) {}
    knit_status_t status() const noexcept { return status_; }
    /// "TIMEOUT", "METHOD_FAILED", … (the constant without its KNIT_ prefix).
    const char* name() const noexcept { return knit_status_name(status_); }
    /// "usage", "not_found", "timeout", "remote", "connection", "permission", "input",
    /// "internal".
    const char* family() const noexcept { return knit_status_family(status_); }
    /// The invocation result when every server failed, else empty.
    const std::string& result_json() const noexcept { return result_json_; }

private:
    knit_status_t status_;
    std::string result_json_;
};

// One class per status family (the `family` column of knit's status table).
struct UsageError : Error { using Error::Error; };       // INVALID_ARGUMENT, CLOSED
struct NotFoundError : Error { using Error::Error; };    // NO_SERVER, NOT_FOUND
struct TimeoutError : Error { using Error::Error; };     // TIMEOUT, BUSY
struct RemoteError : Error { using Error::Error; };      // METHOD_FAILED, PEER_LEFT
struct ConnectionError : Error { using Error::Error; };  // GATEWAY_UNREACHABLE, DISCONNECTED, …
struct PermissionError : Error { using Error::Error; };  // PERMISSION_DENIED
struct InputError : Error { using Error::Error; };       // BAD_INPUT, PAYLOAD_TOO_LARGE, …
struct InternalError : Error { using Error::Error; };    // INTERNAL and unknown codes

/// Throws the exception for `status` with this thread's last error message.
[[noreturn]] inline void throw_status(knit_status_t status, std::string result_json = {}) {
    std::string message = knit_last_error_message();
    if (message.empty()) message = knit_status_string(status);
    const std::string_view f = knit_status_family(status);
    if (f == "usage") throw UsageError(status, message, std::move(result_json));
    if (f == "not_found") throw NotFoundError(status, message, std::move(result_json));
    if (f == "timeout") throw TimeoutError(status, message, std::move(result_json));
    if (f == "remote") throw RemoteError(status, message, std::move(result_json));
    if (f == "connection") throw ConnectionError(status, message, std::move(result_json));
    if (f == "permission") throw PermissionError(status, message, std::move(result_json));
    if (f == "input") throw InputError(status, message, std::move(result_json));
    throw InternalError(status, message, std::move(result_json));
}

/// Throws unless `status` is KNIT_OK.
inline void check(knit_status_t status) {
    if (status != KNIT_OK) throw_status(status);
}

namespace detail {
struct StringFree {
    void operator()(char* s) const noexcept { knit_string_free(s); }
};
struct BytesFree {
    void operator()(uint8_t* b) const noexcept { knit_bytes_free(b); }
};
/// Copies and frees a string knit returned (NULL gives "").
inline std::string take(char* s) {
    std::unique_ptr<char, StringFree> owned(s);
    return s ? std::string(s) : std::string();
}
inline const char* c_or_null(const std::string& s) { return s.empty() ? nullptr : s.c_str(); }

/// What a subscription or stream keeps for its callbacks (the std::functions), passed to knit
/// as user_data. Deleted when the subscription closes — or, when it is closed while runs of its
/// callbacks are still on the stack (from inside one, or from another callback run inside a
/// wait of one: ffi/README.md, "Nesting"), once the last of those runs returns (knit does not
/// call it again).
struct Holder {
    virtual ~Holder() = default;
    /// Twice the number of runs of its callbacks in progress, plus 1 once retired. No run
    /// begins after the holder is retired (knit calls nothing once closed), so whoever leaves
    /// this at exactly 1 deletes it: the last run returning, or retire when none is running.
    std::atomic<unsigned> state{0};
};

/// Runs a callback for `h`: no exception may leave it into C (they are swallowed: a
/// subscription callback has nobody to report to), and a holder retired meanwhile is deleted
/// when its last run returns (runs nest: a callback that waits in knit may run again inside).
template <class F>
void run_callback(Holder* h, F&& f) noexcept {
    h->state.fetch_add(2, std::memory_order_acq_rel);
    try {
        f();
    } catch (...) {
    }
    if (h->state.fetch_sub(2, std::memory_order_acq_rel) == 3) delete h;
}

/// Frees a holder now, or after its callbacks' runs in progress return.
inline void retire(std::unique_ptr<Holder> h) noexcept {
    if (!h) return;
    Holder* p = h.release();
    if (p->state.fetch_or(1, std::memory_order_acq_rel) == 0) delete p;
}

inline std::string str(const char* s) { return s ? std::string(s) : std::string(); }
}  // namespace detail

// ----- replies --------------------------------------------------------------------------------

/// The answer to one incoming call: answer it once, now or later, from any thread. Move-only;
/// destroying it unanswered answers with the error "method handler did not reply".
class Reply {
public:
    explicit Reply(knit_reply_t* r) noexcept : r_(r) {}
    Reply(Reply&& o) noexcept : r_(std::exchange(o.r_, nullptr)) {}
    Reply& operator=(Reply&& o) noexcept {
        if (this != &o) {
            abandon();
            r_ = std::exchange(o.r_, nullptr);
        }
        return *this;
    }
    Reply(const Reply&) = delete;
    Reply& operator=(const Reply&) = delete;
    ~Reply() { abandon(); }

    /// Answers with a JSON result. Invalid JSON (InputError) or a too-large result leaves the
    /// reply unanswered, so a valid answer can follow.
    void ok(const std::string& result_json) { finish(knit_reply_ok(r_, result_json.c_str())); }
    /// Answers with raw bytes.
    void bytes(const void* data, std::size_t len) {
        finish(knit_reply_bytes(r_, static_cast<const uint8_t*>(data), len));
    }
    /// Answers with an error (and optional context JSON).
    void error(const std::string& message, const std::string& context_json = {}) {
        finish(knit_reply_error_ex(r_, message.c_str(), detail::c_or_null(context_json)));
    }
    /// Whether this object no longer holds an unanswered call.
    bool answered() const noexcept { return r_ == nullptr; }

private:
    void finish(knit_status_t st) {
        if (st == KNIT_OK || st == KNIT_CLOSED) r_ = nullptr;
        check(st);
    }
    void abandon() noexcept {
        if (r_) knit_reply_error(std::exchange(r_, nullptr), "method handler did not reply");
    }
    knit_reply_t* r_;
};

// ----- calls and options ----------------------------------------------------------------------

/// An incoming call: arguments and caller identity as JSON text.
struct Call {
    std::string args_json;
    std::string caller_json;
};

/// An incoming raw-bytes call (the arguments' JSON text when the caller did not send bytes).
struct BytesCall {
    const uint8_t* data;
    std::size_t size;
    std::string caller_json;
};

/// Returns the result as JSON text; a thrown exception answers with its what() as the error
/// (with "method handler failed (its message is not UTF-8)" when knit refuses what()).
using Handler = std::function<std::string(const Call&)>;
/// Answers through the Reply (may move it away to answer later); a thrown exception answers
/// with its what() if the reply is still held.
using AsyncHandler = std::function<void(const Call&, Reply&)>;
using BytesHandler = std::function<void(const BytesCall&, Reply&)>;

struct InvokeOptions {
    /// "" (best), "all", "skip-mine", an application name, or a JSON instance filter.
    std::string target;
    uint32_t wait_ms = KNIT_DEFAULT_WAIT_MS;
    /// 0: KNIT_DEFAULT_TIMEOUT_MS.
    uint32_t timeout_ms = 0;
};

/// A non-throwing invocation outcome.
struct Outcome {
    knit_status_t status = KNIT_OK;
    std::string result_json;  // also set when every server failed
    std::string message;      // the error detail when status != KNIT_OK
    explicit operator bool() const noexcept { return status == KNIT_OK; }
};

// ----- subscriptions, contexts, bus, streams -----------------------------------------------

/// A subscription (context, bus topic, stream, discovery events). Move-only; destroying or
/// closing it ends the subscription: afterwards its callback is not running and is not called
/// again — except a run still on this thread's stack, which finishes with its callback (and
/// what it captured) intact: closing it from inside its own callback is fine, as is closing it
/// from another callback run inside a wait of one of its runs (nesting). A subscription may
/// outlive its
/// Client (closing the client ends it; closing it afterwards does nothing).
class Subscription {
public:
    Subscription() noexcept = default;
    Subscription(knit_subscription_t* h, std::unique_ptr<detail::Holder> cb) noexcept
        : h_(h), cb_(std::move(cb)) {}
    Subscription(Subscription&& o) noexcept
        : h_(std::exchange(o.h_, nullptr)), cb_(std::move(o.cb_)) {}
    Subscription& operator=(Subscription&& o) noexcept {
        if (this != &o) {
            close();
            h_ = std::exchange(o.h_, nullptr);
            cb_ = std::move(o.cb_);
        }
        return *this;
    }
    Subscription(const Subscription&) = delete;
    Subscription& operator=(const Subscription&) = delete;
    ~Subscription() { close(); }

    /// Ends it (idempotent).
    void close() noexcept {
        if (h_) (void)knit_subscription_close(std::exchange(h_, nullptr));
        detail::retire(std::move(cb_));
    }
    bool is_open() const noexcept { return h_ != nullptr; }
    knit_subscription_t* native() const noexcept { return h_; }

private:
    knit_subscription_t* h_ = nullptr;
    std::unique_ptr<detail::Holder> cb_;
};

/// One change of a context: its whole value, what changed (removed keys are null) and the
/// version now.
struct ContextUpdate {
    std::string name;
    std::string data_json;
    std::string delta_json;
    uint64_t version = 0;
};
using ContextHandler = std::function<void(const ContextUpdate&)>;

/// A bus message: topic, data and the publisher's identity, as JSON.
struct Message {
    std::string topic;
    std::string data_json;
    std::string source_json;
};
using MessageHandler = std::function<void(const Message&)>;

struct PublishOptions {
    std::string routing_key;  // "": none
    std::string target_json;  // identity filter, e.g. {"application":"blotter"}; "": everyone
};

struct SubscribeOptions {
    std::string routing_key;  // "": every message
    std::string source_json;  // identity filter of publishers; "": anyone
};

/// One change of a channel: its data (the latest FDC3 context decoded as data.fdc3), the
/// whole channel context {name, meta, data}, and the context version.
struct ChannelUpdate {
    std::string channel;
    std::string data_json;
    std::string context_json;
    uint64_t version = 0;
};
using ChannelHandler = std::function<void(const ChannelUpdate&)>;
/// The channels joined now (a JSON array of names).
using ChannelsChangedHandler = std::function<void(const std::string& channels_json)>;
enum class ChannelMode : uint32_t { single = KNIT_CHANNEL_SINGLE, multi = KNIT_CHANNEL_MULTI };

/// Discovery events as JSON ({"type":"serverAdded","server":{…}}, …; see knit_events_subscribe).
using EventHandler = std::function<void(const std::string& event_json)>;

/// One stream item as a subscriber sees it.
struct StreamItem {
    std::string data_json;
    std::string server_json;
    bool is_private = false;  // pushed to this subscriber alone
    uint64_t gap = 0;         // items the slow-consumer policy dropped before this one
};
using StreamDataHandler = std::function<void(const StreamItem&)>;
/// The subscription ended on the server side (not called for Subscription::close).
using StreamClosedHandler = std::function<void(const std::string& reason, bool server_initiated)>;

struct StreamSubscribeOptions {
    std::string args_json = "{}";
    std::string target;  // "": best; "all", an application name, or a JSON instance filter
    uint32_t wait_ms = KNIT_DEFAULT_WAIT_MS;
    uint32_t timeout_ms = 0;  // 0: KNIT_DEFAULT_TIMEOUT_MS
};

/// One accepted subscriber of a stream we serve: push to it alone, or end its subscription.
/// Move-only; destroying it frees the handle (the subscription goes on).
class StreamSubscriber {
public:
    StreamSubscriber() noexcept = default;
    explicit StreamSubscriber(knit_stream_subscriber_t* h) noexcept : h_(h) {}
    StreamSubscriber(StreamSubscriber&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
    StreamSubscriber& operator=(StreamSubscriber&& o) noexcept {
        if (this != &o) {
            free();
            h_ = std::exchange(o.h_, nullptr);
        }
        return *this;
    }
    StreamSubscriber(const StreamSubscriber&) = delete;
    StreamSubscriber& operator=(const StreamSubscriber&) = delete;
    ~StreamSubscriber() { free(); }

    /// Sends a JSON object to this subscriber only.
    void push(const std::string& data_json) {
        check(knit_stream_subscriber_push(h_, data_json.c_str()));
    }
    /// Ends this subscription.
    void close() { check(knit_stream_subscriber_close(std::exchange(h_, nullptr))); }
    bool is_open() const noexcept { return h_ != nullptr; }

private:
    void free() noexcept {
        if (h_) (void)knit_stream_subscriber_free(std::exchange(h_, nullptr));
    }
    knit_stream_subscriber_t* h_ = nullptr;
};

/// A subscription request: decide it once, now or later, from any thread. Move-only;
/// destroying it undecided rejects it ("request was not decided").
class StreamRequest {
public:
    StreamRequest(knit_stream_request_t* h, std::string args_json, std::string caller_json) noexcept
        : h_(h), args_json_(std::move(args_json)), caller_json_(std::move(caller_json)) {}
    StreamRequest(StreamRequest&& o) noexcept
        : h_(std::exchange(o.h_, nullptr)),
          args_json_(std::move(o.args_json_)),
          caller_json_(std::move(o.caller_json_)) {}
    StreamRequest& operator=(StreamRequest&& o) noexcept {
        if (this != &o) {
            abandon();
            h_ = std::exchange(o.h_, nullptr);
            args_json_ = std::move(o.args_json_);
            caller_json_ = std::move(o.caller_json_);
        }
        return *this;
    }
    StreamRequest(const StreamRequest&) = delete;
    StreamRequest& operator=(const StreamRequest&) = delete;
    ~StreamRequest() { abandon(); }

    const std::string& args_json() const noexcept { return args_json_; }
    const std::string& caller_json() const noexcept { return caller_json_; }
    bool decided() const noexcept { return h_ == nullptr; }

    /// Accepts on `branch` ("" is the default branch); returns the new subscriber. A branch
    /// that is not UTF-8 throws UsageError (INVALID_ARGUMENT) and leaves the request undecided,
    /// so a valid decision can follow (or destroying it rejects it).
    StreamSubscriber accept(const std::string& branch = {}) {
        knit_stream_subscriber_t* sub = nullptr;
        decide(knit_stream_accept(h_, branch.c_str(), &sub));
        return StreamSubscriber(sub);
    }
    /// Rejects; the subscriber's subscribe_stream throws RemoteError with the reason. A reason
    /// that is not UTF-8 throws UsageError (INVALID_ARGUMENT) and leaves the request undecided.
    void reject(const std::string& reason) { decide(knit_stream_reject(h_, reason.c_str())); }

private:
    friend class Client;
    /// Rejects with `reason`, or — when knit refuses it (not UTF-8) — with `fallback` (ASCII);
    /// never throws. Nothing when already decided.
    void reject_or(const std::string& reason, const char* fallback) noexcept {
        if (!h_) return;
        if (knit_stream_reject(h_, reason.c_str()) == KNIT_INVALID_ARGUMENT)
            (void)knit_stream_reject(h_, fallback);
        h_ = nullptr;
    }
    /// knit refuses text that is not UTF-8 (KNIT_INVALID_ARGUMENT) before it decides anything:
    /// the request is still ours then. Every other outcome used the handle up.
    void decide(knit_status_t st) {
        if (st != KNIT_INVALID_ARGUMENT) h_ = nullptr;
        check(st);
    }
    void abandon() noexcept {
        if (h_) (void)knit_stream_reject(std::exchange(h_, nullptr), "request was not decided");
    }
    knit_stream_request_t* h_;
    std::string args_json_;
    std::string caller_json_;
};

/// Decides a request (may move it away to decide later). An exception rejects it with what()
/// (with "request handler failed (its message is not UTF-8)" when knit refuses what()).
using RequestHandler = std::function<void(StreamRequest&)>;

struct StreamOptions {
    std::string policy;  // "block" (default), "drop-oldest", "conflate"
    uint32_t block_ms = 0;  // 0: the default (5000)
    std::string conflate_key;
    uint32_t queue = 0;  // 0: the default (1024)
    RequestHandler on_request;  // empty: accept every request on the default branch
};

/// A stream we serve. Move-only; destroying or closing it ends every subscription and
/// unregisters it; afterwards its request handler is not running.
class Stream {
public:
    Stream() noexcept = default;
    Stream(knit_stream_t* h, std::unique_ptr<detail::Holder> cb) noexcept
        : h_(h), cb_(std::move(cb)) {}
    Stream(Stream&& o) noexcept : h_(std::exchange(o.h_, nullptr)), cb_(std::move(o.cb_)) {}
    Stream& operator=(Stream&& o) noexcept {
        if (this != &o) {
            close();
            h_ = std::exchange(o.h_, nullptr);
            cb_ = std::move(o.cb_);
        }
        return *this;
    }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    ~Stream() { close(); }

    /// Pushes a JSON object to every subscriber.
    void push(const std::string& data_json) { check(knit_stream_push(h_, data_json.c_str())); }
    /// Pushes every object of a JSON array to every subscriber, in order, for the cost of one
    /// push; a bad item refuses the whole batch.
    void push_batch(const std::string& items_json) {
        check(knit_stream_push_batch(h_, items_json.c_str()));
    }
    /// Pushes to the subscribers of these branches.
    void push(const std::vector<std::string>& branches, const std::string& data_json) {
        std::string list = "[";
        for (std::size_t i = 0; i < branches.size(); i++) {
            if (i) list += ",";
            list += json_string(branches[i]);
        }
        list += "]";
        check(knit_stream_push_branches(h_, list.c_str(), data_json.c_str()));
    }
    /// Ends every subscription on a branch.
    void close_branch(const std::string& branch) {
        check(knit_stream_close_branch(h_, branch.c_str()));
    }
    /// Branches that have subscribers (JSON array).
    std::string branches() { return json_of(knit_stream_branches); }
    /// Current subscriptions (JSON array of {branch, instance, arguments}).
    std::string subscriptions() { return json_of(knit_stream_subscriptions); }
    /// Closes (idempotent).
    void close() noexcept {
        if (h_) (void)knit_stream_close(std::exchange(h_, nullptr));
        detail::retire(std::move(cb_));
    }
    bool is_open() const noexcept { return h_ != nullptr; }

    /// `s` as a JSON string literal.
    static std::string json_string(const std::string& s) {
        std::string out = "\"";
        for (unsigned char c : s) {
            if (c == '"' || c == '\\') {
                out += '\\';
                out += static_cast<char>(c);
            } else if (c < 0x20) {
                const char* hex = "0123456789abcdef";
                out += "\\u00";
                out += hex[c >> 4];
                out += hex[c & 15];
            } else {
                out += static_cast<char>(c);
            }
        }
        return out + "\"";
    }

private:
    std::string json_of(knit_status_t (*f)(knit_stream_t*, char**)) {
        char* out = nullptr;
        knit_status_t st = f(h_, &out);
        std::string s = detail::take(out);
        check(st);
        return s;
    }
    knit_stream_t* h_ = nullptr;
    std::unique_ptr<detail::Holder> cb_;
};

// ----- the client -----------------------------------------------------------------------------

/// A connection to the gateway. Move-only; closes when destroyed.
class Client {
public:
    /// Connects as `application` (gateway "": $KNIT_GATEWAY or the default path). `flags`:
    /// KNIT_CONNECT_POLL, KNIT_CONNECT_SPIN, KNIT_CONNECT_PARK.
    static Client connect(const std::string& application, const std::string& gateway = {},
                          uint32_t flags = 0) {
        knit_client_t* h = nullptr;
        check(knit_client_connect(detail::c_or_null(gateway), application.c_str(), flags, &h));
        return Client(h);
    }

    Client(Client&& o) noexcept : h_(std::exchange(o.h_, nullptr)), slots_(std::move(o.slots_)) {}
    Client& operator=(Client&& o) noexcept {
        if (this != &o) {
            close();
            h_ = std::exchange(o.h_, nullptr);
            slots_ = std::move(o.slots_);
        }
        return *this;
    }
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;
    ~Client() { close(); }

    /// Closes (idempotent). Afterwards no handler of this client runs.
    void close() noexcept {
        if (h_) {
            (void)knit_client_close(std::exchange(h_, nullptr));
        }
        slots_.reset();
    }
    bool is_open() const noexcept { return h_ != nullptr; }
    knit_client_t* native() const noexcept { return h_; }

private:
    /// The handle for a call into knit: a closed client throws CLOSED (a UsageError), as a
    /// closed handle gives in C, rather than the INVALID_ARGUMENT of a null one.
    knit_client_t* open() const {
        if (!h_) throw UsageError(KNIT_CLOSED, "the client is closed");
        return h_;
    }

public:

    void register_method(const std::string& name, Handler h) {
        register_async(name, [h = std::move(h)](const Call& c, Reply& r) { r.ok(h(c)); });
    }

    void register_async(const std::string& name, AsyncHandler h) {
        auto slot = std::make_unique<Slot>();
        slot->json = std::move(h);
        add(name, std::move(slot), [&](Slot* s) {
            return knit_register(open(), name.c_str(), &Client::json_trampoline, s);
        });
    }

    void register_bytes(const std::string& name, BytesHandler h) {
        auto slot = std::make_unique<Slot>();
        slot->bytes = std::move(h);
        add(name, std::move(slot), [&](Slot* s) {
            return knit_register_bytes(open(), name.c_str(), &Client::bytes_trampoline, s);
        });
    }

    void unregister(const std::string& name) {
        check(knit_unregister(open(), name.c_str()));
        if (!slots_) return;
        std::lock_guard<std::mutex> g(slots_->mu);
        auto it = slots_->live.find(name);
        if (it != slots_->live.end()) {
            // Kept until close: unregister may be called from the handler itself.
            slots_->retired.push_back(std::move(it->second));
            slots_->live.erase(it);
        }
    }

    /// Invokes; returns the io.Connect-shaped result JSON or throws (RemoteError,
    /// TimeoutError, NotFoundError, … with the result JSON when every server failed).
    std::string invoke(const std::string& method, const std::string& args_json = "{}",
                       const InvokeOptions& o = {}) {
        char* out = nullptr;
        knit_status_t st = knit_invoke_ex(open(), method.c_str(), args_json.c_str(),
                                          detail::c_or_null(o.target), o.wait_ms, o.timeout_ms,
                                          &out);
        std::string json = detail::take(out);
        if (st != KNIT_OK) throw_status(st, std::move(json));
        return json;
    }

    /// Invokes without throwing for knit failures.
    Outcome try_invoke(const std::string& method, const std::string& args_json = "{}",
                       const InvokeOptions& o = {}) {
        char* out = nullptr;
        Outcome r;
        if (!h_) {
            r.status = KNIT_CLOSED;
            r.message = "the client is closed";
            return r;
        }
        r.status = knit_invoke_ex(h_, method.c_str(), args_json.c_str(),
                                  detail::c_or_null(o.target), o.wait_ms, o.timeout_ms, &out);
        if (r.status != KNIT_OK) r.message = knit_last_error_message();
        r.result_json = detail::take(out);
        return r;
    }

    /// Sends raw bytes; returns the server's bytes (or its result's JSON text).
    std::vector<uint8_t> invoke_bytes(const std::string& method, const void* data,
                                      std::size_t len, const InvokeOptions& o = {}) {
        uint8_t* out = nullptr;
        std::size_t out_len = 0;
        check(knit_invoke_bytes(open(), method.c_str(), static_cast<const uint8_t*>(data), len,
                                detail::c_or_null(o.target), o.wait_ms, o.timeout_ms, &out,
                                &out_len));
        std::unique_ptr<uint8_t, detail::BytesFree> owned(out);
        return std::vector<uint8_t>(out, out + out_len);
    }

    /// Poll mode: runs pending handlers here, waiting up to timeout_ms; returns how many ran.
    uint32_t poll(uint32_t timeout_ms) {
        uint32_t n = 0;
        check(knit_client_poll(open(), timeout_ms, &n));
        return n;
    }

    std::string methods() { return json_of(knit_methods); }
    std::string servers() { return json_of(knit_servers); }
    std::string instance() { return json_of(knit_client_instance); }
    bool connected() const noexcept { return knit_client_connected(h_) == KNIT_OK; }
    uint64_t max_payload() {
        uint64_t n = 0;
        check(knit_client_max_payload(open(), &n));
        return n;
    }
    /// Waits until `method` has a server; false after the timeout.
    bool wait_for_method(const std::string& method, uint32_t timeout_ms) {
        knit_status_t st = knit_wait_for_method(open(), method.c_str(), timeout_ms, nullptr);
        if (st == KNIT_NO_SERVER) return false;
        check(st);
        return true;
    }

    // ----- contexts ----------------------------------------------------------------------------

    /// The context's data as JSON ("{}" when it does not exist); its version in *version.
    std::string context_get(const std::string& name, uint64_t* version = nullptr) {
        char* out = nullptr;
        uint64_t v = 0;
        knit_status_t st = knit_context_get_ex(open(), name.c_str(), &out, &v);
        std::string s = detail::take(out);
        check(st);
        if (version) *version = v;
        return s;
    }
    /// Replaces the whole value (a JSON object); returns the version after.
    uint64_t context_set(const std::string& name, const std::string& data_json) {
        uint64_t v = 0;
        check(knit_context_set_ex(open(), name.c_str(), data_json.c_str(), &v));
        return v;
    }
    /// Merges top-level keys (null removes one); returns the version after.
    uint64_t context_update(const std::string& name, const std::string& delta_json) {
        uint64_t v = 0;
        check(knit_context_update_ex(open(), name.c_str(), delta_json.c_str(), &v));
        return v;
    }
    /// context_update only while the context is at `expected_version`, else InputError
    /// (ALREADY_EXISTS).
    uint64_t context_update_if(const std::string& name, uint64_t expected_version,
                               const std::string& delta_json) {
        uint64_t v = 0;
        check(knit_context_update_if(open(), name.c_str(), expected_version, delta_json.c_str(), &v));
        return v;
    }
    /// Sets one dotted path to a JSON value.
    uint64_t context_set_path(const std::string& name, const std::string& path,
                              const std::string& value_json) {
        uint64_t v = 0;
        check(knit_context_set_path(open(), name.c_str(), path.c_str(), value_json.c_str(), &v));
        return v;
    }
    /// Sets several paths in one version: {"a.b": 1, "c": null} or [[path, value], …].
    uint64_t context_set_paths(const std::string& name, const std::string& paths_json) {
        uint64_t v = 0;
        check(knit_context_set_paths(open(), name.c_str(), paths_json.c_str(), &v));
        return v;
    }
    void context_destroy(const std::string& name) { check(knit_context_destroy(open(), name.c_str())); }
    /// Every context name (JSON array).
    std::string contexts() { return json_of(knit_context_list); }
    /// Follows a context: the current value first (if it exists), then every change.
    Subscription context_subscribe(const std::string& name, ContextHandler h) {
        struct H : detail::Holder {
            ContextHandler f;
        };
        auto holder = std::make_unique<H>();
        holder->f = std::move(h);
        knit_subscription_t* sub = nullptr;
        check(knit_context_subscribe(
            h_, name.c_str(),
            [](void* ud, const char* n, const char* data, const char* delta, uint64_t version) {
                auto* self = static_cast<H*>(ud);
                detail::run_callback(self, [&] {
                    self->f(ContextUpdate{detail::str(n), detail::str(data), detail::str(delta),
                                          version});
                });
            },
            holder.get(), &sub));
        return Subscription(sub, std::move(holder));
    }

    // ----- the bus -----------------------------------------------------------------------------

    /// `PublishOptions` as the C ABI's options JSON.
    static std::string publish_options(const PublishOptions& o) {
        std::string opts = "{";
        if (!o.routing_key.empty()) opts += "\"routingKey\":" + Stream::json_string(o.routing_key);
        if (!o.target_json.empty()) {
            if (opts.size() > 1) opts += ",";
            opts += "\"target\":" + o.target_json;
        }
        opts += "}";
        return opts;
    }

    /// Publishes JSON data on a topic.
    void publish(const std::string& topic, const std::string& data_json,
                 const PublishOptions& o = {}) {
        check(knit_publish_ex(open(), topic.c_str(), data_json.c_str(), publish_options(o).c_str()));
    }
    /// Publishes every element of a JSON array on a topic, in order, each as if published on
    /// its own, for the cost of one publish; a bad item refuses the whole batch.
    void publish_batch(const std::string& topic, const std::string& items_json,
                       const PublishOptions& o = {}) {
        check(knit_publish_batch(open(), topic.c_str(), items_json.c_str(),
                                 publish_options(o).c_str()));
    }
    /// Subscribes to a topic or pattern ("prices.*", "prices.>").
    Subscription subscribe(const std::string& topic, MessageHandler h,
                           const SubscribeOptions& o = {}) {
        struct H : detail::Holder {
            MessageHandler f;
        };
        auto holder = std::make_unique<H>();
        holder->f = std::move(h);
        std::string opts = "{";
        if (!o.routing_key.empty()) opts += "\"routingKey\":" + Stream::json_string(o.routing_key);
        if (!o.source_json.empty()) {
            if (opts.size() > 1) opts += ",";
            opts += "\"source\":" + o.source_json;
        }
        opts += "}";
        knit_subscription_t* sub = nullptr;
        check(knit_subscribe_ex(
            h_, topic.c_str(), opts.c_str(),
            [](void* ud, const char* t, const char* data, const char* source) {
                auto* self = static_cast<H*>(ud);
                detail::run_callback(self, [&] {
                    self->f(Message{detail::str(t), detail::str(data), detail::str(source)});
                });
            },
            holder.get(), &sub));
        return Subscription(sub, std::move(holder));
    }

    /// Discovery events: what exists now, then every change.
    Subscription on_event(EventHandler h) {
        struct H : detail::Holder {
            EventHandler f;
        };
        auto holder = std::make_unique<H>();
        holder->f = std::move(h);
        knit_subscription_t* sub = nullptr;
        check(knit_events_subscribe(
            open(),
            [](void* ud, const char* event) {
                auto* self = static_cast<H*>(ud);
                detail::run_callback(self, [&] { self->f(detail::str(event)); });
            },
            holder.get(), &sub));
        return Subscription(sub, std::move(holder));
    }


    // ----- colour channels ---------------------------------------------------------------------

    /// Every channel (JSON array of {name, meta, data}).
    std::string channel_list() { return json_of(knit_channel_list); }
    /// One channel ({name, meta, data}); NotFoundError when there is none.
    std::string channel_get(const std::string& name) {
        char* out = nullptr;
        knit_status_t st = knit_channel_get(open(), name.c_str(), &out);
        std::string s = detail::take(out);
        check(st);
        return s;
    }
    void channel_set_mode(ChannelMode m) {
        check(knit_channel_set_mode(open(), static_cast<uint32_t>(m)));
    }
    void channel_join(const std::string& name) { check(knit_channel_join(open(), name.c_str())); }
    /// Leaves one channel, or every joined one ("").
    void channel_leave(const std::string& name = {}) {
        check(knit_channel_leave(open(), detail::c_or_null(name)));
    }
    /// The channels joined (JSON array of names).
    std::string channels_joined() { return json_of(knit_channel_joined); }
    /// Replaces top-level keys of a channel's data ("" : every joined channel).
    uint64_t channel_publish(const std::string& data_json, const std::string& name = {}) {
        uint64_t v = 0;
        check(knit_channel_publish(open(), data_json.c_str(), detail::c_or_null(name), &v));
        return v;
    }
    /// Stores an FDC3 context ({type, …}) as the latest of its type.
    uint64_t channel_publish_fdc3(const std::string& context_json, const std::string& name = {}) {
        uint64_t v = 0;
        check(knit_channel_publish_fdc3(open(), context_json.c_str(), detail::c_or_null(name), &v));
        return v;
    }
    /// Follows the channels this client is on.
    Subscription channel_subscribe(ChannelHandler h) { return channel_sub(nullptr, std::move(h)); }
    /// Follows one channel without joining it.
    Subscription channel_subscribe_for(const std::string& name, ChannelHandler h) {
        return channel_sub(&name, std::move(h));
    }
    /// Calls `h` with the joined channels now and after every join or leave.
    Subscription on_channels_changed(ChannelsChangedHandler h) {
        struct H : detail::Holder {
            ChannelsChangedHandler f;
        };
        auto holder = std::make_unique<H>();
        holder->f = std::move(h);
        knit_subscription_t* sub = nullptr;
        check(knit_channel_on_changed(
            open(),
            [](void* ud, const char* names) {
                auto* self = static_cast<H*>(ud);
                detail::run_callback(self, [&] { self->f(detail::str(names)); });
            },
            holder.get(), &sub));
        return Subscription(sub, std::move(holder));
    }

private:
    Subscription channel_sub(const std::string* name, ChannelHandler h) {
        struct H : detail::Holder {
            ChannelHandler f;
        };
        auto holder = std::make_unique<H>();
        holder->f = std::move(h);
        knit_channel_fn fn = [](void* ud, const char* ch, const char* data, const char* context,
                                uint64_t version) {
            auto* self = static_cast<H*>(ud);
            detail::run_callback(self, [&] {
                self->f(ChannelUpdate{detail::str(ch), detail::str(data), detail::str(context),
                                      version});
            });
        };
        knit_subscription_t* sub = nullptr;
        check(name ? knit_channel_subscribe_for(open(), name->c_str(), fn, holder.get(), &sub)
                   : knit_channel_subscribe(open(), fn, holder.get(), &sub));
        return Subscription(sub, std::move(holder));
    }

public:
    // ----- streams -----------------------------------------------------------------------------

    /// Serves a stream.
    Stream create_stream(const std::string& name, StreamOptions o = {}) {
        struct H : detail::Holder {
            RequestHandler f;
        };
        std::string opts = "{";
        auto add = [&](const std::string& kv) {
            if (opts.size() > 1) opts += ",";
            opts += kv;
        };
        if (!o.policy.empty()) add("\"policy\":" + Stream::json_string(o.policy));
        if (o.block_ms) add("\"blockMs\":" + std::to_string(o.block_ms));
        if (!o.conflate_key.empty()) add("\"conflateKey\":" + Stream::json_string(o.conflate_key));
        if (o.queue) add("\"queue\":" + std::to_string(o.queue));
        opts += "}";
        std::unique_ptr<H> holder;
        knit_stream_request_fn fn = nullptr;
        if (o.on_request) {
            holder = std::make_unique<H>();
            holder->f = std::move(o.on_request);
            fn = [](void* ud, knit_stream_request_t* r, const char* args, const char* caller) {
                auto* self = static_cast<H*>(ud);
                StreamRequest req(r, detail::str(args), detail::str(caller));
                detail::run_callback(self, [&] {
                    try {
                        self->f(req);
                    } catch (const std::exception& e) {
                        req.reject_or(e.what(),
                                      "request handler failed (its message is not UTF-8)");
                    }
                });
            };
        }
        knit_stream_t* st = nullptr;
        check(knit_stream_create(open(), name.c_str(), opts.c_str(), fn, holder.get(), &st));
        return Stream(st, std::move(holder));
    }

    /// Subscribes to a stream; returns once a server accepted (RemoteError when rejected).
    Subscription subscribe_stream(const std::string& name, StreamDataHandler on_data,
                                  StreamClosedHandler on_closed = {},
                                  const StreamSubscribeOptions& o = {}) {
        struct H : detail::Holder {
            StreamDataHandler data;
            StreamClosedHandler closed;
        };
        auto holder = std::make_unique<H>();
        holder->data = std::move(on_data);
        holder->closed = std::move(on_closed);
        knit_subscription_t* sub = nullptr;
        check(knit_stream_subscribe(
            h_, name.c_str(), o.args_json.c_str(), detail::c_or_null(o.target), o.wait_ms,
            o.timeout_ms,
            [](void* ud, const char* data, const char* server, uint32_t flags, uint64_t gap) {
                auto* self = static_cast<H*>(ud);
                detail::run_callback(self, [&] {
                    if (self->data)
                        self->data(StreamItem{detail::str(data), detail::str(server),
                                              (flags & KNIT_STREAM_PRIVATE) != 0, gap});
                });
            },
            [](void* ud, const char* reason, uint32_t flags) {
                auto* self = static_cast<H*>(ud);
                detail::run_callback(self, [&] {
                    if (self->closed)
                        self->closed(detail::str(reason),
                                     (flags & KNIT_STREAM_SERVER_INITIATED) != 0);
                });
            },
            holder.get(), &sub));
        return Subscription(sub, std::move(holder));
    }

private:
    explicit Client(knit_client_t* h) : h_(h), slots_(std::make_unique<Slots>()) {}

    struct Slot {
        AsyncHandler json;
        BytesHandler bytes;
    };
    struct Slots {
        std::mutex mu;
        std::map<std::string, std::unique_ptr<Slot>> live;
        std::vector<std::unique_ptr<Slot>> retired;
    };

    template <class F>
    void add(const std::string& name, std::unique_ptr<Slot> slot, F do_register) {
        (void)open();  // a closed (or moved-from) client has no slots either
        Slot* s = slot.get();
        std::lock_guard<std::mutex> g(slots_->mu);
        check(do_register(s));
        slots_->live[name] = std::move(slot);
    }

    std::string json_of(knit_status_t (*f)(knit_client_t*, char**)) {
        char* out = nullptr;
        knit_status_t st = f(open(), &out);
        std::string s = detail::take(out);
        check(st);
        return s;
    }

    template <class F>
    static void guarded(Reply& reply, F&& f) noexcept {
        try {
            f();
        } catch (const std::exception& e) {
            try {
                if (!reply.answered()) reply.error(e.what());
            } catch (...) {
            }
            try {
                // knit refused the message (not UTF-8): answer all the same.
                if (!reply.answered()) reply.error("method handler failed (its message is not UTF-8)");
            } catch (...) {
            }
        } catch (...) {
            try {
                if (!reply.answered()) reply.error("unknown C++ exception in method handler");
            } catch (...) {
            }
        }
    }

    // No exception may leave a callback into C: both trampolines catch everything.
    static void json_trampoline(void* ud, const char* args, const char* caller,
                                knit_reply_t* r) noexcept {
        Reply reply(r);
        guarded(reply, [&] {
            const Call call{args ? args : "null", caller ? caller : "{}"};
            static_cast<Slot*>(ud)->json(call, reply);
        });
    }

    static void bytes_trampoline(void* ud, const uint8_t* data, std::size_t len,
                                 const char* caller, knit_reply_t* r) noexcept {
        Reply reply(r);
        guarded(reply, [&] {
            const BytesCall call{data, len, caller ? caller : "{}"};
            static_cast<Slot*>(ud)->bytes(call, reply);
        });
    }

    knit_client_t* h_ = nullptr;
    std::unique_ptr<Slots> slots_;
};

}  // namespace knit

#endif  // KNIT_HPP
