// knit — header-only C++17 wrapper over the C ABI (knit.h). Move-only RAII handles,
// exceptions per status family, std::function handlers.
//
//   knit::Client server = knit::Client::connect("pricer");
//   server.register_method("Price", [](const knit::Call& c) { return std::string("{\"bid\":1.5}"); });
//   knit::Client client = knit::Client::connect("blotter");
//   std::string result = client.invoke("Price", R"({"symbol":"VOD.L"})");   // io.Connect result JSON
//
// Threading is the C ABI's (ffi/README.md): handlers run on the client's dispatcher thread, or
// inside Client::poll for a client connected with KNIT_CONNECT_POLL; a Client may be used from
// several threads at once, but it must not be moved, closed or destroyed while another thread
// uses it, nor from inside one of its own handlers.
#ifndef KNIT_HPP
#define KNIT_HPP

#include <knit.h>

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

/// Returns the result as JSON text; a thrown exception answers with its what() as the error.
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

    void register_method(const std::string& name, Handler h) {
        register_async(name, [h = std::move(h)](const Call& c, Reply& r) { r.ok(h(c)); });
    }

    void register_async(const std::string& name, AsyncHandler h) {
        auto slot = std::make_unique<Slot>();
        slot->json = std::move(h);
        add(name, std::move(slot), [&](Slot* s) {
            return knit_register(h_, name.c_str(), &Client::json_trampoline, s);
        });
    }

    void register_bytes(const std::string& name, BytesHandler h) {
        auto slot = std::make_unique<Slot>();
        slot->bytes = std::move(h);
        add(name, std::move(slot), [&](Slot* s) {
            return knit_register_bytes(h_, name.c_str(), &Client::bytes_trampoline, s);
        });
    }

    void unregister(const std::string& name) {
        check(knit_unregister(h_, name.c_str()));
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
        knit_status_t st = knit_invoke_ex(h_, method.c_str(), args_json.c_str(),
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
        check(knit_invoke_bytes(h_, method.c_str(), static_cast<const uint8_t*>(data), len,
                                detail::c_or_null(o.target), o.wait_ms, o.timeout_ms, &out,
                                &out_len));
        std::unique_ptr<uint8_t, detail::BytesFree> owned(out);
        return std::vector<uint8_t>(out, out + out_len);
    }

    /// Poll mode: runs pending handlers here, waiting up to timeout_ms; returns how many ran.
    uint32_t poll(uint32_t timeout_ms) {
        uint32_t n = 0;
        check(knit_client_poll(h_, timeout_ms, &n));
        return n;
    }

    std::string methods() { return json_of(knit_methods); }
    std::string servers() { return json_of(knit_servers); }
    std::string instance() { return json_of(knit_client_instance); }
    bool connected() const noexcept { return knit_client_connected(h_) == KNIT_OK; }
    uint64_t max_payload() {
        uint64_t n = 0;
        check(knit_client_max_payload(h_, &n));
        return n;
    }
    /// Waits until `method` has a server; false after the timeout.
    bool wait_for_method(const std::string& method, uint32_t timeout_ms) {
        knit_status_t st = knit_wait_for_method(h_, method.c_str(), timeout_ms, nullptr);
        if (st == KNIT_NO_SERVER) return false;
        check(st);
        return true;
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
        if (!slots_) throw_status(KNIT_CLOSED);
        Slot* s = slot.get();
        std::lock_guard<std::mutex> g(slots_->mu);
        check(do_register(s));
        slots_->live[name] = std::move(slot);
    }

    std::string json_of(knit_status_t (*f)(knit_client_t*, char**)) {
        char* out = nullptr;
        knit_status_t st = f(h_, &out);
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
