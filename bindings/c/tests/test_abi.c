/*
 * Calls every function of knit's C ABI, the right way and the wrong way (NULL and garbage
 * handles, double close, double reply, invalid JSON, bad flags), and checks the status codes
 * and the JSON that come back. Run by ffi/tests/c_abi.rs, built with
 * gcc -std=c11 -Wall -Wextra -Werror -fsanitize=address,undefined, against a gateway whose
 * socket path is argv[1] (that gateway allows payloads of at most 1 MiB).
 */
#define _POSIX_C_SOURCE 200809L
#include <knit.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int failures = 0;
static int checks = 0;
static const char *gw = NULL;

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        checks++;                                                                          \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__,        \
                    __LINE__, #cond, knit_last_error_message());                           \
            failures++;                                                                    \
        }                                                                                  \
    } while (0)

#define CHECK_STATUS(expr, want)                                                           \
    do {                                                                                   \
        knit_status_t st_ = (expr);                                                        \
        checks++;                                                                          \
        if (st_ != (want)) {                                                               \
            fprintf(stderr, "%s:%d: %s gave %d (%s), wanted %d (%s); last error: %s\n",    \
                    __FILE__, __LINE__, #expr, st_, knit_status_name(st_), (int)(want),    \
                    knit_status_name(want), knit_last_error_message());                    \
            failures++;                                                                    \
        }                                                                                  \
    } while (0)

#define CONTAINS(haystack, needle) ((haystack) != NULL && strstr((haystack), (needle)) != NULL)

/* A garbage handle: never a pointer knit gave out. */
#define GARBAGE_CLIENT ((knit_client_t *)(uintptr_t)0x1234)
#define GARBAGE_REPLY ((knit_reply_t *)(uintptr_t)0xdeadbeefu)

static knit_client_t *connect_app(const char *app, uint32_t flags) {
    knit_client_t *c = NULL;
    CHECK_STATUS(knit_client_connect(gw, app, flags, &c), KNIT_OK);
    CHECK(c != NULL);
    return c;
}

/* ----- handlers ------------------------------------------------------------------------- */

/* Echoes its arguments. */
static void echo(void *ud, const char *args, const char *caller, knit_reply_t *reply) {
    atomic_int *calls = ud;
    if (calls) atomic_fetch_add(calls, 1);
    CHECK(CONTAINS(caller, "\"application\""));
    CHECK_STATUS(knit_reply_ok(reply, args), KNIT_OK);
}

/* Fails, with context. */
static void fail(void *ud, const char *args, const char *caller, knit_reply_t *reply) {
    (void)ud;
    (void)caller;
    if (strstr(args, "context")) {
        CHECK_STATUS(knit_reply_error_ex(reply, "nope", "{\"code\":42}"), KNIT_OK);
    } else {
        CHECK_STATUS(knit_reply_error(reply, "nope"), KNIT_OK);
    }
}

/* Misuses its reply handle in every way, then answers once. */
struct misuse {
    knit_status_t bad_json, too_big, null_message, first, second, third;
};
static void misuse(void *ud, const char *args, const char *caller, knit_reply_t *reply) {
    struct misuse *m = ud;
    (void)args;
    (void)caller;
    m->bad_json = knit_reply_ok(reply, "{not json");
    /* 1 MiB + a little of JSON string: over the gateway's limit. */
    size_t n = (1u << 20) + 64;
    char *big = malloc(n + 3);
    if (big) {
        big[0] = '"';
        memset(big + 1, 'x', n);
        big[n + 1] = '"';
        big[n + 2] = 0;
        m->too_big = knit_reply_ok(reply, big);
        free(big);
    }
    m->null_message = knit_reply_error(reply, NULL);
    m->first = knit_reply_ok(reply, "\"answered\"");
    m->second = knit_reply_ok(reply, "\"again\"");
    m->third = knit_reply_error(reply, "and again");
}

/* Answers from another thread. */
struct deferred {
    pthread_t thread;
    knit_reply_t *reply;
    knit_status_t status;
    /* 0 until the handler tried to start its thread, then 1 (started) or -1 (failed): the
       thread may answer, and the caller see the answer, before the handler returns. */
    atomic_int started;
};
static void *deferred_thread(void *p) {
    struct deferred *d = p;
    d->status = knit_reply_ok(d->reply, "{\"from\":\"thread\"}");
    return NULL;
}
static void deferred(void *ud, const char *args, const char *caller, knit_reply_t *reply) {
    struct deferred *d = ud;
    (void)args;
    (void)caller;
    d->reply = reply;
    int rc = pthread_create(&d->thread, NULL, deferred_thread, d);
    atomic_store(&d->started, rc == 0 ? 1 : -1);
}

/* Never answers: keeps the handle. */
static knit_reply_t *kept[4];
static atomic_int nkept;
static void keep(void *ud, const char *args, const char *caller, knit_reply_t *reply) {
    (void)ud;
    (void)args;
    (void)caller;
    int i = atomic_fetch_add(&nkept, 1);
    if (i < 4) kept[i] = reply;
}

/* Raw bytes echo. */
static void bytes_echo(void *ud, const uint8_t *args, size_t len, const char *caller,
                       knit_reply_t *reply) {
    (void)ud;
    (void)caller;
    CHECK_STATUS(knit_reply_bytes(reply, args, len), KNIT_OK);
}

/* Unregisters its own method from inside its handler (must not deadlock). */
struct self_unreg {
    knit_client_t *client;
    knit_status_t status;
};
static void self_unregister(void *ud, const char *args, const char *caller, knit_reply_t *reply) {
    struct self_unreg *s = ud;
    (void)args;
    (void)caller;
    s->status = knit_unregister(s->client, "SelfRemoving");
    CHECK_STATUS(knit_reply_ok(reply, "\"bye\""), KNIT_OK);
}

/* ----- tests ---------------------------------------------------------------------------- */

static void test_status_strings(void) {
    static const struct {
        knit_status_t code;
        const char *name;
        const char *family;
    } rows[] = {
        {KNIT_OK, "OK", "ok"},
        {KNIT_INVALID_ARGUMENT, "INVALID_ARGUMENT", "usage"},
        {KNIT_NO_SERVER, "NO_SERVER", "not_found"},
        {KNIT_TIMEOUT, "TIMEOUT", "timeout"},
        {KNIT_METHOD_FAILED, "METHOD_FAILED", "remote"},
        {KNIT_GATEWAY_UNREACHABLE, "GATEWAY_UNREACHABLE", "connection"},
        {KNIT_PERMISSION_DENIED, "PERMISSION_DENIED", "permission"},
        {KNIT_BAD_INPUT, "BAD_INPUT", "input"},
        {KNIT_PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "input"},
        {KNIT_PEER_LEFT, "PEER_LEFT", "remote"},
        {KNIT_DISCONNECTED, "DISCONNECTED", "connection"},
        {KNIT_ALREADY_EXISTS, "ALREADY_EXISTS", "input"},
        {KNIT_NOT_FOUND, "NOT_FOUND", "not_found"},
        {KNIT_CLOSED, "CLOSED", "usage"},
        {KNIT_PROTOCOL, "PROTOCOL", "connection"},
        {KNIT_INTERNAL, "INTERNAL", "internal"},
        {KNIT_ALREADY_RUNNING, "ALREADY_RUNNING", "connection"},
        {KNIT_BUSY, "BUSY", "timeout"},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        CHECK(strcmp(knit_status_name(rows[i].code), rows[i].name) == 0);
        CHECK(strcmp(knit_status_family(rows[i].code), rows[i].family) == 0);
        CHECK(strlen(knit_status_string(rows[i].code)) > 0);
    }
    CHECK(strcmp(knit_status_string(KNIT_TIMEOUT), "no reply within the timeout") == 0);
    CHECK(strcmp(knit_status_string(12345), "unknown status") == 0);
    CHECK(strcmp(knit_status_name(-1), "UNKNOWN") == 0);
    CHECK(strcmp(knit_status_family(2), "unknown") == 0);
    CHECK(strlen(knit_version()) > 0);
    CHECK(knit_last_error_message() != NULL);
}

static void test_misuse_needs_no_gateway(void) {
    knit_client_t *c = GARBAGE_CLIENT;
    char *s = (char *)"untouched";
    uint32_t n = 99;
    uint64_t max = 0;
    uint8_t *b = (uint8_t *)"x";
    size_t blen = 7;

    /* connect */
    CHECK_STATUS(knit_client_connect(gw, NULL, 0, &c), KNIT_INVALID_ARGUMENT);
    CHECK(c == NULL); /* cleared on failure */
    CHECK_STATUS(knit_client_connect(gw, "app", 0, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_client_connect(gw, "app", 0x100, &c), KNIT_INVALID_ARGUMENT);
    CHECK(CONTAINS(knit_last_error_message(), "unknown connect flags"));
    CHECK_STATUS(knit_client_connect(gw, "app", KNIT_CONNECT_SPIN | KNIT_CONNECT_PARK, &c),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_client_connect("/nonexistent/knit/gw.sock", "app", 0, &c),
                 KNIT_GATEWAY_UNREACHABLE);
    CHECK(c == NULL);
    CHECK_STATUS(knit_client_connect(gw, "", 0, &c), KNIT_INVALID_ARGUMENT);
    const char bad_utf8[] = {(char)0xff, (char)0xfe, 0};
    CHECK_STATUS(knit_client_connect(gw, bad_utf8, 0, &c), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_client_connect_ex(gw, "app", NULL, 0x80, 0, &c), KNIT_INVALID_ARGUMENT);

    /* NULL and garbage client handles, every function */
    knit_client_t *handles[] = {NULL, GARBAGE_CLIENT, (knit_client_t *)GARBAGE_REPLY};
    for (size_t i = 0; i < 3; i++) {
        knit_client_t *h = handles[i];
        CHECK_STATUS(knit_client_close(h), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_client_poll(h, 0, &n), KNIT_INVALID_ARGUMENT);
        CHECK(n == 0);
        CHECK_STATUS(knit_client_connected(h), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_client_instance(h, &s), KNIT_INVALID_ARGUMENT);
        CHECK(s == NULL);
        CHECK_STATUS(knit_client_max_payload(h, &max), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_methods(h, &s), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_servers(h, &s), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_wait_for_method(h, "m", 0, &s), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_register(h, "m", echo, NULL), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_register_ex(h, "{\"name\":\"m\"}", echo, NULL), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_register_bytes(h, "m", bytes_echo, NULL), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_unregister(h, "m"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_invoke(h, "m", "{}", NULL, 0, &s), KNIT_INVALID_ARGUMENT);
        CHECK(s == NULL);
        CHECK_STATUS(knit_invoke_ex(h, "m", "{}", NULL, 0, 0, &s), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_invoke_bytes(h, "m", b, 1, NULL, 0, 0, &b, &blen),
                     KNIT_INVALID_ARGUMENT);
        CHECK(b == NULL && blen == 0);
        b = (uint8_t *)"x";
    }
    CHECK(CONTAINS(knit_last_error_message(), "client"));

    /* NULL and garbage reply handles */
    knit_reply_t *replies[] = {NULL, GARBAGE_REPLY, (knit_reply_t *)GARBAGE_CLIENT};
    for (size_t i = 0; i < 3; i++) {
        CHECK_STATUS(knit_reply_ok(replies[i], "1"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_reply_bytes(replies[i], (const uint8_t *)"a", 1), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_reply_error(replies[i], "e"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_reply_error_ex(replies[i], "e", "{}"), KNIT_INVALID_ARGUMENT);
    }
    CHECK_STATUS(knit_reply_ok(NULL, "{bad"), KNIT_BAD_INPUT); /* the JSON is checked first */

    /* freeing NULL is a no-op */
    knit_string_free(NULL);
    knit_bytes_free(NULL);
}

static void test_round_trip_and_failures(void) {
    knit_client_t *server = connect_app("c-server", 0);
    knit_client_t *client = connect_app("c-client", 0);
    atomic_int calls = 0;
    char *r = NULL;

    CHECK_STATUS(knit_register(server, "Echo", echo, &calls), KNIT_OK);
    CHECK_STATUS(knit_register(server, "Echo", echo, &calls), KNIT_ALREADY_EXISTS);
    CHECK_STATUS(knit_register(server, NULL, echo, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_register(server, "", echo, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_register(server, "NoHandler", NULL, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_wait_for_method(client, "Echo", 5000, &r), KNIT_OK);
    CHECK(CONTAINS(r, "\"name\":\"Echo\"") && CONTAINS(r, "\"application\":\"c-server\""));
    knit_string_free(r);

    /* plain round trip; the method name matches case-insensitively, as in io.Connect */
    CHECK_STATUS(knit_invoke(client, "echo", "{\"a\":1,\"s\":\"h\\u00e9\"}", NULL, 5000, &r), KNIT_OK);
    CHECK(CONTAINS(r, "\"returned\":{\"a\":1,\"s\":\"h\xc3\xa9\"}"));
    CHECK(CONTAINS(r, "\"called_with\":{\"a\":1"));
    CHECK(CONTAINS(r, "\"executed_by\":{\"application\":\"c-server\""));
    CHECK(CONTAINS(r, "\"status\":0"));
    CHECK(CONTAINS(r, "\"method\":\"echo\""));
    knit_string_free(r);
    CHECK(atomic_load(&calls) == 1);

    /* NULL arguments are {} */
    CHECK_STATUS(knit_invoke(client, "Echo", NULL, "best", 0, &r), KNIT_OK);
    CHECK(CONTAINS(r, "\"returned\":{}"));
    knit_string_free(r);

    /* bad input never reaches the server */
    r = (char *)"untouched";
    CHECK_STATUS(knit_invoke(client, "Echo", "{\"a\":", NULL, 5000, &r), KNIT_BAD_INPUT);
    CHECK(r == NULL);
    CHECK(CONTAINS(knit_last_error_message(), "args_json is not valid JSON"));
    CHECK_STATUS(knit_invoke(client, NULL, "{}", NULL, 5000, &r), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_invoke(client, "", "{}", NULL, 5000, &r), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_invoke(client, "Echo", "{}", "", 5000, &r), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_invoke(client, "Echo", "{}", NULL, 5000, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_invoke_ex(client, "Echo", "{}", "{\"colour\":1}", 0, 5000, &r),
                 KNIT_INVALID_ARGUMENT);
    CHECK(atomic_load(&calls) == 2);

    /* a payload over the gateway's limit (1 MiB here) */
    size_t n = (1u << 20) + 16;
    char *big = malloc(n + 3);
    CHECK(big != NULL);
    if (big) {
        big[0] = '"';
        memset(big + 1, 'y', n);
        big[n + 1] = '"';
        big[n + 2] = 0;
        CHECK_STATUS(knit_invoke(client, "Echo", big, NULL, 5000, &r), KNIT_PAYLOAD_TOO_LARGE);
        CHECK(r == NULL);
        free(big);
    }

    /* no server */
    CHECK_STATUS(knit_invoke_ex(client, "Nobody", "{}", NULL, 0, 5000, &r), KNIT_NO_SERVER);
    CHECK(r == NULL);
    CHECK(CONTAINS(knit_last_error_message(), "Nobody"));
    CHECK_STATUS(knit_wait_for_method(client, "Nobody", 0, NULL), KNIT_NO_SERVER);

    /* the method fails: status, message, and the result-shaped failure */
    CHECK_STATUS(knit_register(server, "Fail", fail, NULL), KNIT_OK);
    CHECK_STATUS(knit_invoke(client, "Fail", "{}", NULL, 5000, &r), KNIT_METHOD_FAILED);
    CHECK(CONTAINS(r, "\"status\":1") && CONTAINS(r, "\"message\":\"nope\""));
    CHECK(strcmp(knit_last_error_message(), "nope") == 0);
    knit_string_free(r);
    CHECK_STATUS(knit_invoke(client, "Fail", "{\"context\":true}", NULL, 5000, &r),
                 KNIT_METHOD_FAILED);
    CHECK(CONTAINS(r, "\"returned\":{\"code\":42}"));
    knit_string_free(r);

    /* every way to misuse a reply handle inside a handler */
    struct misuse m = {-1, -1, -1, -1, -1, -1};
    CHECK_STATUS(knit_register(server, "Misuse", misuse, &m), KNIT_OK);
    CHECK_STATUS(knit_invoke(client, "Misuse", "{}", NULL, 5000, &r), KNIT_OK);
    CHECK(CONTAINS(r, "\"returned\":\"answered\""));
    knit_string_free(r);
    /* the handler may still be running after its answer reached us; once unregister returns
       it is not (the contract), so its record is complete */
    CHECK_STATUS(knit_unregister(server, "Misuse"), KNIT_OK);
    CHECK(m.bad_json == KNIT_BAD_INPUT);
    CHECK(m.too_big == KNIT_PAYLOAD_TOO_LARGE);
    CHECK(m.null_message == KNIT_INVALID_ARGUMENT);
    CHECK(m.first == KNIT_OK);
    CHECK(m.second == KNIT_CLOSED); /* double reply */
    CHECK(m.third == KNIT_CLOSED);

    /* an answer from another thread */
    struct deferred d = {0};
    CHECK_STATUS(knit_register(server, "Deferred", deferred, &d), KNIT_OK);
    CHECK_STATUS(knit_invoke(client, "Deferred", "{}", NULL, 5000, &r), KNIT_OK);
    CHECK(CONTAINS(r, "\"returned\":{\"from\":\"thread\"}"));
    knit_string_free(r);
    while (atomic_load(&d.started) == 0) sched_yield();
    CHECK(atomic_load(&d.started) == 1);
    if (atomic_load(&d.started) == 1) pthread_join(d.thread, NULL);
    CHECK(d.status == KNIT_OK);

    /* a handler that never answers: the caller times out with the result-shaped failure */
    CHECK_STATUS(knit_register(server, "Silent", keep, NULL), KNIT_OK);
    CHECK_STATUS(knit_invoke(client, "Silent", "{}", NULL, 200, &r), KNIT_TIMEOUT);
    CHECK(CONTAINS(r, "\"status\":1") && CONTAINS(r, "Invocation timeout (200 ms)"));
    knit_string_free(r);
    CHECK(atomic_load(&nkept) == 1);
    /* answering late is harmless: the caller has stopped waiting */
    CHECK_STATUS(knit_reply_ok(kept[0], "\"late\""), KNIT_OK);
    CHECK_STATUS(knit_reply_ok(kept[0], "\"later\""), KNIT_CLOSED);
    /* a second one stays unanswered until the server closes */
    CHECK_STATUS(knit_invoke(client, "Silent", "{}", NULL, 100, &r), KNIT_TIMEOUT);
    knit_string_free(r);
    CHECK(atomic_load(&nkept) == 2);

    /* a handler may unregister its own method */
    struct self_unreg su = {server, -1};
    CHECK_STATUS(knit_register(server, "SelfRemoving", self_unregister, &su), KNIT_OK);
    CHECK_STATUS(knit_invoke(client, "SelfRemoving", "{}", NULL, 5000, &r), KNIT_OK);
    knit_string_free(r);
    CHECK(su.status == KNIT_OK);
    /* the server itself knows at once; other peers learn it through the gateway, a moment later */
    CHECK_STATUS(knit_invoke_ex(server, "SelfRemoving", "{}", NULL, 0, 5000, &r), KNIT_NO_SERVER);

    /* unregister */
    CHECK_STATUS(knit_unregister(server, "Echo"), KNIT_OK);
    CHECK_STATUS(knit_unregister(server, "Echo"), KNIT_NOT_FOUND);
    CHECK_STATUS(knit_unregister(server, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_invoke_ex(server, "Echo", "{}", NULL, 0, 5000, &r), KNIT_NO_SERVER);
    int before = atomic_load(&calls);

    /* close: handles go stale, a second close is a status, unanswered replies are closed */
    CHECK_STATUS(knit_client_close(server), KNIT_OK);
    CHECK_STATUS(knit_client_close(server), KNIT_CLOSED);
    CHECK_STATUS(knit_reply_ok(kept[1], "1"), KNIT_CLOSED);
    CHECK_STATUS(knit_register(server, "Again", echo, NULL), KNIT_CLOSED);
    CHECK_STATUS(knit_invoke(server, "Fail", "{}", NULL, 100, &r), KNIT_CLOSED);
    CHECK_STATUS(knit_client_connected(server), KNIT_CLOSED);
    CHECK(CONTAINS(knit_last_error_message(), "closed"));
    CHECK(atomic_load(&calls) == before);
    CHECK_STATUS(knit_client_close(client), KNIT_OK);
    CHECK_STATUS(knit_client_close(client), KNIT_CLOSED);
}

static void test_introspection(void) {
    knit_client_t *c = connect_app("c-intro", 0);
    char *s = NULL;
    uint64_t max = 0;
    CHECK_STATUS(knit_client_connected(c), KNIT_OK);
    CHECK_STATUS(knit_client_instance(c, &s), KNIT_OK);
    CHECK(CONTAINS(s, "\"application\":\"c-intro\"") && CONTAINS(s, "\"peerId\":\"p-"));
    knit_string_free(s);
    CHECK_STATUS(knit_client_instance(c, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_client_max_payload(c, &max), KNIT_OK);
    CHECK(max == (1u << 20));
    CHECK_STATUS(knit_client_max_payload(c, NULL), KNIT_INVALID_ARGUMENT);

    CHECK_STATUS(knit_register_ex(c,
                                  "{\"name\":\"Described\",\"displayName\":\"A described method\","
                                  "\"objectTypes\":[\"Instrument\"],\"version\":2}",
                                  echo, NULL),
                 KNIT_OK);
    CHECK_STATUS(knit_register_ex(c, "{\"name\":\"X\",\"bogus\":1}", echo, NULL),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_register_ex(c, "[1,2", echo, NULL), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_methods(c, &s), KNIT_OK);
    CHECK(s != NULL && s[0] == '[');
    CHECK(CONTAINS(s, "\"name\":\"Described\",\"displayName\":\"A described method\""));
    CHECK(CONTAINS(s, "\"objectTypes\":[\"Instrument\"]") && CONTAINS(s, "\"version\":2"));
    knit_string_free(s);
    CHECK_STATUS(knit_methods(c, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_servers(c, &s), KNIT_OK);
    const char *me_first = "[{\"application\":\"c-intro\"";
    CHECK(s != NULL && strncmp(s, me_first, strlen(me_first)) == 0); /* ourselves first */
    knit_string_free(s);

    /* our own method, invoked by ourselves */
    CHECK_STATUS(knit_invoke(c, "Described", "[1,2,3]", NULL, 5000, &s), KNIT_OK);
    CHECK(CONTAINS(s, "\"returned\":[1,2,3]"));
    knit_string_free(s);
    CHECK_STATUS(knit_client_poll(c, 0, NULL), KNIT_INVALID_ARGUMENT); /* not a poll client */
    CHECK_STATUS(knit_client_close(c), KNIT_OK);
}

static void test_targets_and_bytes(void) {
    knit_client_t *a = connect_app("c-server-a", 0);
    knit_client_t *b = connect_app("c-server-b", 0);
    knit_client_t *client = connect_app("c-caller", KNIT_CONNECT_SPIN);
    char *r = NULL;
    CHECK_STATUS(knit_register(a, "Multi", echo, NULL), KNIT_OK);
    CHECK_STATUS(knit_register(b, "Multi", echo, NULL), KNIT_OK);
    CHECK_STATUS(knit_register_bytes(b, "Bytes", bytes_echo, NULL), KNIT_OK);
    CHECK_STATUS(knit_wait_for_method(client, "Bytes", 5000, NULL), KNIT_OK);

    CHECK_STATUS(knit_invoke(client, "Multi", "1", "all", 5000, &r), KNIT_OK);
    CHECK(CONTAINS(r, "\"all_return_values\":[{") && CONTAINS(r, "\"all_errors\":[]"));
    CHECK(CONTAINS(r, "c-server-a") && CONTAINS(r, "c-server-b"));
    knit_string_free(r);
    CHECK_STATUS(knit_invoke(client, "Multi", "1", "C-SERVER-B", 5000, &r), KNIT_OK);
    CHECK(CONTAINS(r, "\"executed_by\":{\"application\":\"c-server-b\""));
    CHECK(!CONTAINS(r, "all_return_values"));
    knit_string_free(r);
    CHECK_STATUS(knit_invoke_ex(client, "Multi", "1", "{\"application\":\"c-server-a\"}", 1000,
                                5000, &r),
                 KNIT_OK);
    CHECK(CONTAINS(r, "\"executed_by\":{\"application\":\"c-server-a\""));
    knit_string_free(r);
    CHECK_STATUS(knit_invoke_ex(client, "Multi", "1",
                                "[{\"application\":\"c-server-b\"},{\"application\":\"c-server-a\"}]",
                                1000, 5000, &r),
                 KNIT_OK);
    CHECK(CONTAINS(r, "\"executed_by\":{\"application\":\"c-server-b\""));
    CHECK(CONTAINS(r, "all_return_values"));
    knit_string_free(r);
    CHECK_STATUS(knit_invoke_ex(client, "Multi", "1", "nobody-app", 0, 5000, &r), KNIT_NO_SERVER);

    /* raw bytes, NULs included, both ways */
    const uint8_t data[] = {0, 1, 2, 0, 255, 'k'};
    uint8_t *out = NULL;
    size_t len = 0;
    CHECK_STATUS(knit_invoke_bytes(client, "Bytes", data, sizeof data, NULL, 1000, 5000, &out, &len),
                 KNIT_OK);
    CHECK(len == sizeof data && out != NULL && memcmp(out, data, len) == 0);
    knit_bytes_free(out);
    CHECK_STATUS(knit_invoke_bytes(client, "Bytes", NULL, 0, NULL, 1000, 5000, &out, &len), KNIT_OK);
    CHECK(len == 0 && out != NULL);
    knit_bytes_free(out);
    CHECK_STATUS(knit_invoke_bytes(client, "Bytes", NULL, 3, NULL, 1000, 5000, &out, &len),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_invoke_bytes(client, "Bytes", data, 1, NULL, 1000, 5000, &out, NULL),
                 KNIT_INVALID_ARGUMENT);
    /* a JSON caller of a bytes method: the handler gets JSON text, the caller numbers */
    CHECK_STATUS(knit_invoke(client, "Bytes", "{\"j\":true}", NULL, 5000, &r), KNIT_OK);
    CHECK(CONTAINS(r, "\"returned\":[123,34,106,34,58,116,114,117,101,125]"));
    knit_string_free(r);
    /* a bytes caller of a JSON method: the returned value comes back as JSON text */
    CHECK_STATUS(knit_invoke_bytes(client, "Multi", data, 2, "c-server-a", 1000, 5000, &out, &len),
                 KNIT_OK);
    CHECK(len == 5 && memcmp(out, "[0,1]", 5) == 0);
    knit_bytes_free(out);
    CHECK_STATUS(knit_invoke_bytes(client, "Nobody", data, 2, NULL, 0, 5000, &out, &len),
                 KNIT_NO_SERVER);
    CHECK(out == NULL && len == 0);

    CHECK_STATUS(knit_client_close(client), KNIT_OK);
    CHECK_STATUS(knit_client_close(b), KNIT_OK);
    CHECK_STATUS(knit_client_close(a), KNIT_OK);
}

/* Poll mode: the handler runs inside knit_client_poll, on this thread. */
struct poll_ctx {
    knit_client_t *caller;
    atomic_int done;
    knit_status_t status;
    char *result;
    pthread_t handler_thread;
    /* What the invoking thread saw, to tell a failure's cause. */
    char error[512];
    double invoke_ms;
};
static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}
static void polled(void *ud, const char *args, const char *caller, knit_reply_t *reply) {
    struct poll_ctx *p = ud;
    (void)caller;
    p->handler_thread = pthread_self();
    CHECK_STATUS(knit_reply_ok(reply, args), KNIT_OK);
}
static void *poll_invoker(void *ud) {
    struct poll_ctx *p = ud;
    double t0 = now_ms();
    p->status = knit_invoke(p->caller, "Polled", "{\"poll\":1}", NULL, 10000, &p->result);
    p->invoke_ms = now_ms() - t0;
    snprintf(p->error, sizeof p->error, "%s", knit_last_error_message());
    atomic_store(&p->done, 1);
    return NULL;
}

/* A poll-mode client's message callback that closes the client it runs for. */
static void close_own_client(void *ud, const char *topic, const char *data, const char *source) {
    (void)topic;
    (void)data;
    (void)source;
    CHECK_STATUS(knit_client_close((knit_client_t *)ud), KNIT_OK);
}

static void test_poll_mode(void) {
    knit_client_t *server = connect_app("c-poller", KNIT_CONNECT_POLL);
    struct poll_ctx p = {0};
    p.caller = connect_app("c-poll-caller", 0);
    CHECK_STATUS(knit_register(server, "Polled", polled, &p), KNIT_OK);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, poll_invoker, &p) == 0);
    uint32_t handled = 0, total = 0;
    int rounds = 0;
    double t0 = now_ms();
    while (!atomic_load(&p.done) && rounds++ < 200) {
        CHECK_STATUS(knit_client_poll(server, 50, &handled), KNIT_OK);
        total += handled;
    }
    double polled_ms = now_ms() - t0;
    pthread_join(t, NULL);
    CHECK(p.status == KNIT_OK);
    if (p.status != KNIT_OK)
        fprintf(stderr,
                "  poll mode: invoke gave %s after %.0f ms (%s; result %s); the server polled "
                "%d rounds in %.0f ms and ran %u callbacks\n",
                knit_status_name(p.status), p.invoke_ms, p.error, p.result ? p.result : "NULL",
                rounds, polled_ms, total);
    CHECK(CONTAINS(p.result, "\"returned\":{\"poll\":1}"));
    knit_string_free(p.result);
    CHECK(total == 1);
    CHECK(pthread_equal(p.handler_thread, pthread_self()));
    /* nothing pending: a poll times out with 0 handled */
    CHECK_STATUS(knit_client_poll(server, 1, &handled), KNIT_OK);
    CHECK(handled == 0);
    /* a poll client calling its own method runs it inline */
    char *r = NULL;
    CHECK_STATUS(knit_invoke(server, "Polled", "[7]", NULL, 5000, &r), KNIT_OK);
    CHECK(CONTAINS(r, "\"returned\":[7]"));
    knit_string_free(r);
    CHECK_STATUS(knit_client_close(server), KNIT_OK);
    CHECK_STATUS(knit_client_poll(server, 0, &handled), KNIT_CLOSED);

    /* closed during a poll (by a callback it ran): that poll says CLOSED, not DISCONNECTED */
    knit_client_t *closing = connect_app("c-poll-closing", KNIT_CONNECT_POLL);
    knit_subscription_t *sub = NULL;
    CHECK_STATUS(knit_subscribe(closing, "c.poll.close", close_own_client, closing, &sub),
                 KNIT_OK);
    CHECK_STATUS(knit_publish(p.caller, "c.poll.close", "{}"), KNIT_OK);
    knit_status_t st = KNIT_OK;
    handled = 0;
    for (int i = 0; i < 200 && st == KNIT_OK && handled == 0; i++)
        st = knit_client_poll(closing, 50, &handled);
    CHECK_STATUS(st, KNIT_CLOSED);
    CHECK(handled == 1);
    CHECK_STATUS(knit_client_close(p.caller), KNIT_OK);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s GATEWAY_SOCKET\n", argv[0]);
        return 2;
    }
    gw = argv[1];
    test_status_strings();
    test_misuse_needs_no_gateway();
    test_round_trip_and_failures();
    test_introspection();
    test_targets_and_bytes();
    test_poll_mode();
    printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
