/*
 * Calls every subscription-related function of knit's C ABI — contexts, the bus, streams,
 * discovery events, knit_subscription_close — the right way and the wrong way (NULL and
 * garbage handles, double close, invalid JSON, closed clients, closing from inside a
 * callback), and checks what comes back. Run by ffi/tests/c_abi.rs, built with
 * gcc -std=c11 -Wall -Wextra -Werror -fsanitize=address,undefined, against a gateway whose
 * socket path is argv[1]. Waits are on conditions with deadlines, never sleeps.
 */
#define _POSIX_C_SOURCE 200809L
#include "check.h"

#include <stdatomic.h>
#include <stdlib.h>

static const char *gw = NULL;

#define WAIT_MS 5000
#define GARBAGE ((uintptr_t)0x1234)

static knit_client_t *connect_app(const char *app, uint32_t flags) {
    knit_client_t *c = NULL;
    CHECK_STATUS(knit_client_connect(gw, app, flags, &c), KNIT_OK);
    CHECK(c != NULL);
    return c;
}

/* ----- callbacks ------------------------------------------------------------------------ */

/* Records "name v<version> data=<data> delta=<delta>". */
static void on_context(void *ud, const char *name, const char *data, const char *delta,
                       uint64_t version) {
    struct rec *r = ud;
    char line[2048];
    snprintf(line, sizeof line, "%s v%llu data=%s delta=%s", name, (unsigned long long)version,
             data, delta);
    pthread_mutex_lock(&r->mu);
    r->last_version = version;
    pthread_mutex_unlock(&r->mu);
    rec_add(r, line);
}

/* Records the whole update JSON. */
static void on_context_update(void *ud, const char *update_json) { rec_add(ud, update_json); }

/* Closes its own subscription from inside its callback (must not deadlock) once the data
   says so. (Not on the first call: that may run before knit_context_subscribe has returned the
   handle.) */
struct self_close {
    struct rec rec;
    knit_subscription_t *sub;
    knit_status_t status;
};
static void on_context_self_close(void *ud, const char *name, const char *data, const char *delta,
                                  uint64_t version) {
    struct self_close *s = ud;
    (void)name;
    (void)delta;
    (void)version;
    if (strstr(data, "self-close")) s->status = knit_subscription_close(s->sub);
    rec_add(&s->rec, data);
}

/* Records "topic data source". */
static void on_message(void *ud, const char *topic, const char *data, const char *source) {
    char line[2048];
    snprintf(line, sizeof line, "%s %s %s", topic, data, source);
    rec_add(ud, line);
}

static void on_event(void *ud, const char *event) { rec_add(ud, event); }

/* Stream subscriber callbacks: "data <json> flags=<f> gap=<g> server=<json>" and
   "closed <reason> flags=<f>". */
static void on_stream_data(void *ud, const char *data, const char *server, uint32_t flags,
                           uint64_t gap) {
    struct rec *r = ud;
    char line[2048];
    snprintf(line, sizeof line, "data %s flags=%u gap=%llu server=%s", data, flags,
             (unsigned long long)gap, server);
    pthread_mutex_lock(&r->mu);
    r->gaps += gap;
    r->last_flags = flags;
    pthread_mutex_unlock(&r->mu);
    rec_add(r, line);
}
static void on_stream_closed(void *ud, const char *reason, uint32_t flags) {
    char line[512];
    snprintf(line, sizeof line, "closed %s flags=%u", reason, flags);
    rec_add(ud, line);
}

/* Records "channel v<version> data=<data> context=<context>". */
static void on_channel(void *ud, const char *channel, const char *data, const char *context,
                       uint64_t version) {
    char line[4096];
    snprintf(line, sizeof line, "%s v%llu data=%s context=%s", channel, (unsigned long long)version,
             data, context);
    rec_add(ud, line);
}
static void on_channels_changed(void *ud, const char *names) { rec_add(ud, names); }

/* ----- misuse without a gateway ---------------------------------------------------------- */

static void test_null_and_garbage_handles(void) {
    knit_client_t *clients[] = {NULL, (knit_client_t *)GARBAGE,
                                (knit_client_t *)(uintptr_t)0x53000001u /* wrong kind */};
    char *s = (char *)"untouched";
    uint64_t v = 99;
    knit_subscription_t *sub = (knit_subscription_t *)"x";
    knit_stream_t *stream = (knit_stream_t *)"x";
    for (size_t i = 0; i < 3; i++) {
        knit_client_t *c = clients[i];
        CHECK_STATUS(knit_context_get(c, "n", &s), KNIT_INVALID_ARGUMENT);
        CHECK(s == NULL);
        CHECK_STATUS(knit_context_get_ex(c, "n", &s, &v), KNIT_INVALID_ARGUMENT);
        CHECK(s == NULL && v == 0);
        CHECK_STATUS(knit_context_set(c, "n", "{}"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_context_set_ex(c, "n", "{}", &v), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_context_update(c, "n", "{}"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_context_update_ex(c, "n", "{}", &v), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_context_update_if(c, "n", 1, "{}", &v), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_context_set_path(c, "n", "a.b", "1", &v), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_context_set_paths(c, "n", "{\"a\":1}", &v), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_context_destroy(c, "n"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_context_list(c, &s), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_context_subscribe(c, "n", on_context, NULL, &sub), KNIT_INVALID_ARGUMENT);
        CHECK(sub == NULL);
        CHECK_STATUS(knit_context_subscribe_ex(c, "n", on_context_update, NULL, &sub),
                     KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_publish(c, "t", "1"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_publish_ex(c, "t", "1", "{}"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_publish_batch(c, "t", "[1]", NULL), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_subscribe(c, "t", on_message, NULL, &sub), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_subscribe_ex(c, "t", NULL, on_message, NULL, &sub),
                     KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_events_subscribe(c, on_event, NULL, &sub), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_channel_list(c, &s), KNIT_INVALID_ARGUMENT);
        CHECK(s == NULL);
        CHECK_STATUS(knit_channel_get(c, "Red", &s), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_channel_set_mode(c, KNIT_CHANNEL_SINGLE), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_channel_join(c, "Red"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_channel_leave(c, NULL), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_channel_joined(c, &s), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_channel_publish(c, "{}", NULL, &v), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_channel_publish_fdc3(c, "{\"type\":\"t\"}", NULL, &v), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_channel_subscribe(c, on_channel, NULL, &sub), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_channel_subscribe_for(c, "Red", on_channel, NULL, &sub), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_channel_on_changed(c, on_channels_changed, NULL, &sub), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_stream_create(c, "s", NULL, NULL, NULL, &stream), KNIT_INVALID_ARGUMENT);
        CHECK(stream == NULL);
        CHECK_STATUS(knit_stream_subscribe(c, "s", NULL, NULL, 0, 0, on_stream_data, NULL, NULL,
                                           &sub),
                     KNIT_INVALID_ARGUMENT);
    }
    /* NULL, garbage and other kinds of handle where a subscription, stream, request or
       subscriber is wanted */
    uintptr_t bad[] = {0, GARBAGE, 0x4b000001u /* a client's kind */, 0x52000001u};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_STATUS(knit_subscription_close((knit_subscription_t *)bad[i]), KNIT_INVALID_ARGUMENT);
        knit_stream_t *st = (knit_stream_t *)bad[i];
        CHECK_STATUS(knit_stream_push(st, "{}"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_stream_push_batch(st, "[{}]"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_stream_push_branches(st, "[\"\"]", "{}"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_stream_close_branch(st, NULL), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_stream_branches(st, &s), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_stream_subscriptions(st, &s), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_stream_close(st), KNIT_INVALID_ARGUMENT);
        knit_stream_request_t *rq = (knit_stream_request_t *)bad[i];
        knit_stream_subscriber_t *sb = (knit_stream_subscriber_t *)"x";
        CHECK_STATUS(knit_stream_accept(rq, NULL, &sb), KNIT_INVALID_ARGUMENT);
        CHECK(sb == NULL);
        CHECK_STATUS(knit_stream_reject(rq, "no"), KNIT_INVALID_ARGUMENT);
        knit_stream_subscriber_t *sub_h = (knit_stream_subscriber_t *)bad[i];
        CHECK_STATUS(knit_stream_subscriber_push(sub_h, "{}"), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_stream_subscriber_close(sub_h), KNIT_INVALID_ARGUMENT);
        CHECK_STATUS(knit_stream_subscriber_free(sub_h), KNIT_INVALID_ARGUMENT);
    }
    /* arguments are checked before handles where that costs nothing */
    CHECK_STATUS(knit_stream_push(NULL, "{bad"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_publish_ex(NULL, "t", "1", "{bad"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_publish_batch(NULL, "t", "{bad", NULL), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_stream_push_batch(NULL, "[1]"), KNIT_BAD_INPUT);
}

/* ----- contexts -------------------------------------------------------------------------- */

static void test_contexts(void) {
    knit_client_t *w = connect_app("c-ctx-writer", 0);
    knit_client_t *f = connect_app("c-ctx-follower", 0);
    char *s = NULL;
    uint64_t v = 0, v1 = 0, v2 = 0;
    const char *name = "c.instrument";

    /* a context that does not exist reads as {} at version 0 */
    CHECK_STATUS(knit_context_get_ex(f, name, &s, &v), KNIT_OK);
    CHECK(s && strcmp(s, "{}") == 0 && v == 0);
    knit_string_free(s);

    /* bad arguments */
    CHECK_STATUS(knit_context_set(w, name, "{oops"), KNIT_BAD_INPUT);
    CHECK(CONTAINS(knit_last_error_message(), "data_json is not valid JSON"));
    CHECK_STATUS(knit_context_set(w, name, "[1,2]"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_context_set(w, name, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_context_set(w, NULL, "{}"), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_context_set(w, "", "{}"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_context_update(w, name, "3"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_context_get(w, name, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_context_list(w, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_context_subscribe(f, name, NULL, NULL, &(knit_subscription_t *){NULL}),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_context_subscribe(f, name, on_context, NULL, NULL), KNIT_INVALID_ARGUMENT);

    /* set, get, versions */
    CHECK_STATUS(knit_context_set_ex(w, name, "{\"ric\":\"VOD.L\",\"bid\":1.5}", &v1), KNIT_OK);
    CHECK(v1 > 0);
    CHECK_STATUS(knit_context_get_ex(f, name, &s, &v), KNIT_OK);
    CHECK(s && strcmp(s, "{\"ric\":\"VOD.L\",\"bid\":1.5}") == 0);
    CHECK(v == v1);
    knit_string_free(s);
    CHECK_STATUS(knit_context_get(f, name, &s), KNIT_OK);
    CHECK(CONTAINS(s, "\"ric\":\"VOD.L\""));
    knit_string_free(s);

    /* follow it: the current value first, then each change */
    struct rec follow, full;
    rec_init(&follow);
    rec_init(&full);
    knit_subscription_t *sub = NULL, *sub_full = NULL;
    CHECK_STATUS(knit_context_subscribe(f, name, on_context, &follow, &sub), KNIT_OK);
    CHECK(sub != NULL);
    CHECK_STATUS(knit_context_subscribe_ex(f, name, on_context_update, &full, &sub_full), KNIT_OK);
    CHECK(rec_wait(&follow, 1, WAIT_MS));
    CHECK(rec_has(&follow, "c.instrument v"));
    CHECK(rec_has(&follow, "data={\"ric\":\"VOD.L\",\"bid\":1.5} delta={\"ric\":\"VOD.L\",\"bid\":1.5}"));
    CHECK(rec_wait(&full, 1, WAIT_MS));
    CHECK(rec_has(&full, "\"first\":true"));

    /* update merges top-level keys; null removes one; an update that changes nothing writes
       nothing */
    CHECK_STATUS(knit_context_update_ex(w, name, "{\"bid\":1.6,\"ric\":null,\"ask\":1.7}", &v2),
                 KNIT_OK);
    CHECK(v2 == v1 + 1);
    CHECK(rec_wait(&follow, 2, WAIT_MS));
    CHECK(rec_has(&follow, "data={\"bid\":1.6,\"ask\":1.7}"));
    CHECK(rec_has(&follow, "delta={\"bid\":1.6,\"ric\":null,\"ask\":1.7}")); /* removed: null, in the update's order */
    CHECK(follow.last_version == v2);
    CHECK(rec_wait(&full, 2, WAIT_MS));
    CHECK(rec_has(&full, "\"removed\":[\"ric\"]"));
    CHECK(rec_has(&full, "\"updater\":{\"application\":\"c-ctx-writer\""));
    CHECK(rec_has(&full, "\"first\":false"));
    CHECK_STATUS(knit_context_update_ex(w, name, "{\"bid\":1.6}", &v), KNIT_OK);
    CHECK(v == v2);
    CHECK_STATUS(knit_context_update(w, name, "{\"n\":0}"), KNIT_OK);
    CHECK(rec_wait(&follow, 3, WAIT_MS));

    /* compare-and-set */
    CHECK_STATUS(knit_context_update_if(w, name, v2, "{\"n\":1}", &v), KNIT_ALREADY_EXISTS);
    CHECK(CONTAINS(knit_last_error_message(), "is at version"));
    CHECK(v == 0);
    CHECK_STATUS(knit_context_update_if(w, name, v2 + 1, "{\"n\":1}", &v), KNIT_OK);
    CHECK(v == v2 + 2);
    CHECK_STATUS(knit_context_update_if(w, "c.fresh", 0, "{\"created\":true}", &v), KNIT_OK);
    CHECK(v == 1);
    CHECK_STATUS(knit_context_update_if(w, "c.fresh", 0, "{\"created\":true}", &v),
                 KNIT_ALREADY_EXISTS);

    /* paths */
    CHECK_STATUS(knit_context_set_path(w, name, "deep.er.leaf", "[1,2]", &v), KNIT_OK);
    CHECK(v == v2 + 3);
    CHECK_STATUS(knit_context_set_paths(w, name, "{\"deep.er.x\":\"y\",\"bid\":null}", &v),
                 KNIT_OK);
    CHECK_STATUS(knit_context_set_paths(w, name, "[[\"ask\",2.5],[\"deep.er.leaf\",null]]", NULL),
                 KNIT_OK);
    CHECK_STATUS(knit_context_get(f, name, &s), KNIT_OK);
    CHECK(s && strcmp(s, "{\"ask\":2.5,\"n\":1,\"deep\":{\"er\":{\"x\":\"y\"}}}") == 0);
    knit_string_free(s);
    CHECK_STATUS(knit_context_set_path(w, name, NULL, "1", NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_context_set_path(w, name, "a", NULL, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_context_set_path(w, name, "a", "{x", NULL), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_context_set_paths(w, name, "[[1,2]]", NULL), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_context_set_paths(w, name, "7", NULL), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_context_set_paths(w, name, NULL, NULL), KNIT_INVALID_ARGUMENT);

    /* list */
    CHECK_STATUS(knit_context_list(w, &s), KNIT_OK); /* others learn of new names a bit later */
    CHECK(CONTAINS(s, "\"c.instrument\"") && CONTAINS(s, "\"c.fresh\"") && s[0] == '[');
    knit_string_free(s);

    /* after knit_subscription_close returns, that callback is never called again: the other
       subscription on the same client, called in the same delivery, is the barrier */
    CHECK_STATUS(knit_subscription_close(sub), KNIT_OK);
    int before = rec_count(&follow);
    int full_before = rec_count(&full);
    CHECK_STATUS(knit_context_update(w, name, "{\"after\":\"close\"}"), KNIT_OK);
    CHECK(rec_wait_for(&full, "\"after\":\"close\"", WAIT_MS));
    CHECK(rec_count(&full) > full_before);
    CHECK(rec_count(&follow) == before);
    CHECK_STATUS(knit_subscription_close(sub), KNIT_CLOSED); /* double close */
    CHECK(CONTAINS(knit_last_error_message(), "closed"));

    /* a callback may close its own subscription */
    struct self_close sc;
    rec_init(&sc.rec);
    sc.status = -1;
    sc.sub = NULL;
    CHECK_STATUS(knit_context_subscribe(f, name, on_context_self_close, &sc, &sc.sub), KNIT_OK);
    CHECK(rec_wait(&sc.rec, 1, WAIT_MS));
    CHECK_STATUS(knit_context_update(w, name, "{\"after\":\"self-close\"}"), KNIT_OK);
    CHECK(rec_wait(&sc.rec, 2, WAIT_MS));
    CHECK(sc.status == KNIT_OK);
    CHECK_STATUS(knit_context_update(w, name, "{\"after\":\"closed-itself\"}"), KNIT_OK);
    CHECK(rec_wait_for(&full, "closed-itself", WAIT_MS));
    CHECK(rec_count(&sc.rec) == 2);
    CHECK_STATUS(knit_subscription_close(sc.sub), KNIT_CLOSED);

    /* subscribing before the context exists: the first call comes when it is created */
    struct rec later;
    rec_init(&later);
    knit_subscription_t *sub_later = NULL;
    CHECK_STATUS(knit_context_subscribe(f, "c.later", on_context, &later, &sub_later), KNIT_OK);
    CHECK_STATUS(knit_context_set(w, "c.later", "{\"born\":1}"), KNIT_OK);
    CHECK(rec_wait_for(&later, "data={\"born\":1}", WAIT_MS));

    /* destroy */
    CHECK_STATUS(knit_context_destroy(w, "c.fresh"), KNIT_OK);
    CHECK_STATUS(knit_context_destroy(w, "c.fresh"), KNIT_NOT_FOUND);
    CHECK_STATUS(knit_context_destroy(w, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_context_get_ex(w, "c.fresh", &s, &v), KNIT_OK);
    CHECK(s && strcmp(s, "{}") == 0 && v == 0);
    knit_string_free(s);

    /* closing the client ends its subscriptions: their handles are closed */
    CHECK_STATUS(knit_client_close(f), KNIT_OK);
    CHECK_STATUS(knit_subscription_close(sub_full), KNIT_CLOSED);
    CHECK_STATUS(knit_subscription_close(sub_later), KNIT_CLOSED);
    CHECK_STATUS(knit_context_get(f, name, &s), KNIT_CLOSED);
    CHECK(s == NULL);
    CHECK_STATUS(knit_context_set(f, name, "{}"), KNIT_CLOSED);
    CHECK_STATUS(knit_context_subscribe(f, name, on_context, NULL, &sub), KNIT_CLOSED);
    CHECK(sub == NULL);
    CHECK_STATUS(knit_context_list(f, &s), KNIT_CLOSED);
    CHECK_STATUS(knit_context_destroy(w, name), KNIT_OK);
    CHECK_STATUS(knit_context_destroy(w, "c.later"), KNIT_OK);
    CHECK_STATUS(knit_client_close(w), KNIT_OK);
    rec_destroy(&follow);
    rec_destroy(&full);
    rec_destroy(&sc.rec);
    rec_destroy(&later);
}

/* ----- the bus --------------------------------------------------------------------------- */

static void test_bus(void) {
    knit_client_t *sub_client = connect_app("c-bus-sub", 0);
    struct rec all, eu, from_other, own;
    rec_init(&all);
    rec_init(&eu);
    rec_init(&from_other);
    rec_init(&own);
    knit_subscription_t *s_all = NULL, *s_eu = NULL, *s_other = NULL, *s_own = NULL;

    CHECK_STATUS(knit_subscribe(sub_client, "c.prices.*", on_message, &all, &s_all), KNIT_OK);
    CHECK_STATUS(knit_subscribe_ex(sub_client, "c.prices.>", "{\"routingKey\":\"eu\"}", on_message,
                                   &eu, &s_eu),
                 KNIT_OK);
    CHECK_STATUS(knit_subscribe_ex(sub_client, "c.prices.*",
                                   "{\"source\":{\"application\":\"c-bus-other\"}}", on_message,
                                   &from_other, &s_other),
                 KNIT_OK);
    /* bad subscriptions */
    knit_subscription_t *none = (knit_subscription_t *)"x";
    CHECK_STATUS(knit_subscribe(sub_client, "", on_message, NULL, &none), KNIT_INVALID_ARGUMENT);
    CHECK(none == NULL);
    CHECK_STATUS(knit_subscribe(sub_client, NULL, on_message, NULL, &none), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_subscribe(sub_client, "t", NULL, NULL, &none), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_subscribe(sub_client, "t", on_message, NULL, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_subscribe_ex(sub_client, "t", "{\"colour\":1}", on_message, NULL, &none),
                 KNIT_INVALID_ARGUMENT);
    CHECK(CONTAINS(knit_last_error_message(), "unknown options_json key"));
    CHECK_STATUS(knit_subscribe_ex(sub_client, "t", "[1]", on_message, NULL, &none),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_subscribe_ex(sub_client, "t", "{\"routingKey\":1}", on_message, NULL, &none),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_subscribe_ex(sub_client, "t", "{x", on_message, NULL, &none), KNIT_BAD_INPUT);

    /* a publisher that connects after the subscriptions exist knows them from its welcome */
    knit_client_t *pub = connect_app("c-bus-pub", 0);
    knit_client_t *other = connect_app("c-bus-other", 0);
    CHECK_STATUS(knit_publish(pub, "c.prices.VOD", "{\"bid\":1}"), KNIT_OK);
    CHECK(rec_wait(&all, 1, WAIT_MS));
    CHECK(rec_has(&all, "c.prices.VOD {\"bid\":1} {\"application\":\"c-bus-pub\""));
    /* routing keys: a keyed subscription gets messages with its key or none */
    CHECK_STATUS(knit_publish_ex(pub, "c.prices.BT", "{\"k\":\"us\"}", "{\"routingKey\":\"us\"}"),
                 KNIT_OK);
    CHECK_STATUS(knit_publish_ex(pub, "c.prices.BT", "{\"k\":\"eu\"}", "{\"routingKey\":\"eu\"}"),
                 KNIT_OK);
    /* a target that matches nobody: nobody gets it */
    CHECK_STATUS(knit_publish_ex(pub, "c.prices.BT", "{\"k\":\"nobody\"}",
                                 "{\"target\":{\"application\":\"nobody\"}}"),
                 KNIT_OK);
    CHECK_STATUS(knit_publish(pub, "c.prices.BT", "{\"k\":\"marker\"}"), KNIT_OK);
    CHECK(rec_wait_for(&all, "marker", WAIT_MS));
    CHECK_STATUS(knit_publish(other, "c.prices.X", "\"from other\""), KNIT_OK);
    CHECK(rec_wait_for(&all, "from other", WAIT_MS));
    /* every message to this client is delivered in one pass over its subscriptions, in each
       publisher's order: what the others have not seen by now, they will never see */
    CHECK(rec_wait_for(&eu, "{\"k\":\"eu\"}", WAIT_MS));
    CHECK(rec_wait_for(&from_other, "from other", WAIT_MS));
    CHECK(rec_has(&all, "{\"k\":\"us\"}") && rec_has(&all, "{\"k\":\"eu\"}"));
    CHECK(!rec_has(&eu, "{\"k\":\"us\"}"));
    CHECK(rec_has(&eu, "c.prices.VOD")); /* published without a key */
    CHECK(!rec_has(&all, "nobody"));
    CHECK(rec_count(&from_other) == 1);

    /* the publisher's own subscription gets its messages too */
    CHECK_STATUS(knit_subscribe(pub, "c.self", on_message, &own, &s_own), KNIT_OK);
    CHECK_STATUS(knit_publish(pub, "c.self", "[1,\"two\",null]"), KNIT_OK);
    CHECK(rec_wait_for(&own, "c.self [1,\"two\",null] {\"application\":\"c-bus-pub\"", WAIT_MS));

    /* a batch: each item delivered as if published alone, in order */
    CHECK_STATUS(knit_publish_batch(pub, "c.prices.B", "[{\"b\":1},{\"b\":2},{\"b\":3}]", NULL),
                 KNIT_OK);
    CHECK(rec_wait_for(&all, "{\"b\":3}", WAIT_MS));
    CHECK(rec_before(&all, "{\"b\":1}", "{\"b\":2}") && rec_before(&all, "{\"b\":2}", "{\"b\":3}"));
    CHECK_STATUS(knit_publish_batch(pub, "c.prices.B", "[{\"k\":\"eu-batch\"}]",
                                    "{\"routingKey\":\"eu\"}"),
                 KNIT_OK);
    CHECK(rec_wait_for(&eu, "eu-batch", WAIT_MS));
    CHECK_STATUS(knit_publish_batch(pub, "c.prices.B", "[]", NULL), KNIT_OK);

    /* bad publishes */
    CHECK_STATUS(knit_publish_batch(pub, "c.x", "{\"not\":\"an array\"}", NULL), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_publish_batch(pub, "c.x", "[1,", NULL), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_publish_batch(pub, "c.x", NULL, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_publish_batch(pub, "", "[1]", NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_publish(pub, "c.x", "{bad"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_publish(pub, "c.x", NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_publish(pub, "", "1"), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_publish(pub, NULL, "1"), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_publish_ex(pub, "c.x", "1", "{\"target\":\"app\"}"), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_publish_ex(pub, "c.x", "1", "{\"source\":{}}"), KNIT_INVALID_ARGUMENT);

    /* closed: not called again */
    CHECK_STATUS(knit_subscription_close(s_eu), KNIT_OK);
    int eu_before = rec_count(&eu);
    CHECK_STATUS(knit_publish(pub, "c.prices.LAST", "\"last\""), KNIT_OK);
    CHECK(rec_wait_for(&all, "\"last\"", WAIT_MS));
    CHECK(rec_count(&eu) == eu_before);
    CHECK_STATUS(knit_subscription_close(s_eu), KNIT_CLOSED);

    CHECK_STATUS(knit_subscription_close(s_all), KNIT_OK);
    CHECK_STATUS(knit_subscription_close(s_own), KNIT_OK);
    CHECK_STATUS(knit_client_close(pub), KNIT_OK);
    CHECK_STATUS(knit_publish(pub, "c.x", "1"), KNIT_CLOSED);
    CHECK_STATUS(knit_subscribe(pub, "c.x", on_message, NULL, &none), KNIT_CLOSED);
    CHECK_STATUS(knit_client_close(other), KNIT_OK);
    CHECK_STATUS(knit_client_close(sub_client), KNIT_OK);
    CHECK_STATUS(knit_subscription_close(s_other), KNIT_CLOSED); /* closed with its client */
    rec_destroy(&all);
    rec_destroy(&eu);
    rec_destroy(&from_other);
    rec_destroy(&own);
}

/* ----- streams --------------------------------------------------------------------------- */

/* The server's request callback: arguments decide. {"reject":…} rejects, {"branch":B} accepts
   on B and keeps the subscriber handle, {"park":true} keeps the request undecided, anything
   else accepts on the default branch. */
struct server {
    struct rec requests;
    knit_stream_subscriber_t *branch_sub;
    knit_stream_request_t *parked;
    knit_status_t accept_status, second_accept, reject_after_accept;
};
static void on_request(void *ud, knit_stream_request_t *req, const char *args, const char *caller) {
    struct server *s = ud;
    CHECK(CONTAINS(caller, "\"application\":\"c-stream-sub\""));
    if (strstr(args, "reject")) {
        CHECK_STATUS(knit_stream_reject(req, "no thanks"), KNIT_OK);
    } else if (strstr(args, "\"branch\":\"eu\"")) {
        s->accept_status = knit_stream_accept(req, "eu", &s->branch_sub);
        s->second_accept = knit_stream_accept(req, NULL, NULL);
        s->reject_after_accept = knit_stream_reject(req, "late");
    } else if (strstr(args, "park")) {
        pthread_mutex_lock(&s->requests.mu);
        s->parked = req;
        pthread_mutex_unlock(&s->requests.mu);
    } else {
        CHECK_STATUS(knit_stream_accept(req, NULL, NULL), KNIT_OK);
    }
    rec_add(&s->requests, args);
}

struct parked_sub {
    knit_client_t *client;
    struct rec *rec;
    knit_subscription_t *sub;
    knit_status_t status;
};
static void *subscribe_parked(void *p) {
    struct parked_sub *ps = p;
    ps->status = knit_stream_subscribe(ps->client, "c.Ticks", "{\"park\":true}", NULL, 5000, 10000,
                                       on_stream_data, on_stream_closed, ps->rec, &ps->sub);
    return NULL;
}

static void test_streams(void) {
    knit_client_t *server = connect_app("c-stream-server", 0);
    knit_client_t *client = connect_app("c-stream-sub", 0);
    struct server srv;
    memset(&srv, 0, sizeof srv);
    rec_init(&srv.requests);
    srv.accept_status = srv.second_accept = srv.reject_after_accept = -1;
    knit_stream_t *ticks = NULL, *dup = (knit_stream_t *)"x";
    char *s = NULL;

    /* bad options */
    CHECK_STATUS(knit_stream_create(server, "c.Bad", "{\"colour\":1}", NULL, NULL, &dup),
                 KNIT_INVALID_ARGUMENT);
    CHECK(dup == NULL);
    CHECK_STATUS(knit_stream_create(server, "c.Bad", "{\"policy\":\"lossy\"}", NULL, NULL, &dup),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_stream_create(server, "c.Bad", "{\"policy\":\"conflate\"}", NULL, NULL, &dup),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_stream_create(server, "c.Bad", "{\"queue\":0}", NULL, NULL, &dup),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_stream_create(server, "c.Bad", "{nope", NULL, NULL, &dup), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_stream_create(server, NULL, NULL, NULL, NULL, &dup), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_stream_create(server, "c.Bad", NULL, NULL, NULL, NULL), KNIT_INVALID_ARGUMENT);

    CHECK_STATUS(knit_stream_create(server, "c.Ticks",
                                    "{\"policy\":\"block\",\"blockMs\":2000,\"queue\":64,"
                                    "\"definition\":{\"displayName\":\"C ticks\"}}",
                                    on_request, &srv, &ticks),
                 KNIT_OK);
    CHECK(ticks != NULL);
    CHECK_STATUS(knit_stream_create(server, "c.Ticks", NULL, NULL, NULL, &dup), KNIT_ALREADY_EXISTS);
    CHECK_STATUS(knit_methods(client, &s), KNIT_OK);
    knit_string_free(s);
    CHECK_STATUS(knit_wait_for_method(client, "c.Ticks", WAIT_MS, &s), KNIT_OK);
    CHECK(CONTAINS(s, "\"displayName\":\"C ticks\"") && CONTAINS(s, "\"supportsStreaming\":true"));
    knit_string_free(s);

    /* subscribe on the default branch */
    struct rec plain, branch;
    rec_init(&plain);
    rec_init(&branch);
    knit_subscription_t *sub = NULL, *sub_eu = NULL, *none = (knit_subscription_t *)"x";
    CHECK_STATUS(knit_stream_subscribe(client, "c.ticks", "{\"who\":\"plain\"}", NULL, WAIT_MS,
                                       WAIT_MS, on_stream_data, on_stream_closed, &plain, &sub),
                 KNIT_OK);
    CHECK(sub != NULL);
    CHECK(rec_wait_for(&srv.requests, "{\"who\":\"plain\"}", WAIT_MS));
    /* on a branch, keeping the subscriber handle */
    CHECK_STATUS(knit_stream_subscribe(client, "c.Ticks", "{\"branch\":\"eu\"}", "c-stream-server",
                                       WAIT_MS, WAIT_MS, on_stream_data, on_stream_closed, &branch,
                                       &sub_eu),
                 KNIT_OK);
    /* the callback may still be running when the subscriber hears the answer */
    CHECK(rec_wait_for(&srv.requests, "{\"branch\":\"eu\"}", WAIT_MS));
    pthread_mutex_lock(&srv.requests.mu);
    CHECK(srv.accept_status == KNIT_OK && srv.branch_sub != NULL);
    CHECK(srv.second_accept == KNIT_CLOSED);       /* decided once */
    CHECK(srv.reject_after_accept == KNIT_CLOSED);
    pthread_mutex_unlock(&srv.requests.mu);
    /* rejected */
    CHECK_STATUS(knit_stream_subscribe(client, "c.Ticks", "{\"reject\":1}", NULL, WAIT_MS, WAIT_MS,
                                       on_stream_data, NULL, NULL, &none),
                 KNIT_METHOD_FAILED);
    CHECK(CONTAINS(knit_last_error_message(), "no thanks"));
    CHECK(none == NULL);
    /* bad subscriptions */
    CHECK_STATUS(knit_stream_subscribe(client, "c.Nobody", NULL, NULL, 0, WAIT_MS, on_stream_data,
                                       NULL, NULL, &none),
                 KNIT_NO_SERVER);
    CHECK_STATUS(knit_stream_subscribe(client, "c.Ticks", NULL, "skip-mine", 0, WAIT_MS,
                                       on_stream_data, NULL, NULL, &none),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_stream_subscribe(client, "c.Ticks", "{x", NULL, 0, WAIT_MS, on_stream_data,
                                       NULL, NULL, &none),
                 KNIT_BAD_INPUT);
    CHECK_STATUS(knit_stream_subscribe(client, "c.Ticks", NULL, NULL, 0, WAIT_MS, NULL, NULL, NULL,
                                       &none),
                 KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_stream_subscribe(client, NULL, NULL, NULL, 0, WAIT_MS, on_stream_data, NULL,
                                       NULL, &none),
                 KNIT_INVALID_ARGUMENT);

    /* the server's view */
    CHECK_STATUS(knit_stream_branches(ticks, &s), KNIT_OK);
    CHECK(s && strcmp(s, "[\"\",\"eu\"]") == 0);
    knit_string_free(s);
    CHECK_STATUS(knit_stream_subscriptions(ticks, &s), KNIT_OK);
    CHECK(CONTAINS(s, "\"branch\":\"eu\"") && CONTAINS(s, "\"arguments\":{\"who\":\"plain\"}"));
    CHECK(CONTAINS(s, "\"instance\":{\"application\":\"c-stream-sub\""));
    knit_string_free(s);
    CHECK_STATUS(knit_stream_branches(ticks, NULL), KNIT_INVALID_ARGUMENT);

    /* pushes: to all, to a branch, to one subscriber */
    CHECK_STATUS(knit_stream_push(ticks, "{\"n\":1}"), KNIT_OK);
    CHECK_STATUS(knit_stream_push_branches(ticks, "[\"eu\"]", "{\"only\":\"eu\"}"), KNIT_OK);
    CHECK_STATUS(knit_stream_subscriber_push(srv.branch_sub, "{\"private\":true}"), KNIT_OK);
    CHECK_STATUS(knit_stream_push(ticks, "{\"n\":2}"), KNIT_OK);
    CHECK(rec_wait_for(&plain, "{\"n\":2}", WAIT_MS));
    CHECK(rec_wait_for(&branch, "{\"n\":2}", WAIT_MS));
    /* a batch reaches every subscriber, in order */
    CHECK_STATUS(knit_stream_push_batch(ticks, "[{\"n\":3},{\"n\":4}]"), KNIT_OK);
    CHECK(rec_wait_for(&plain, "{\"n\":4}", WAIT_MS));
    CHECK(rec_wait_for(&branch, "{\"n\":4}", WAIT_MS));
    CHECK(rec_before(&plain, "{\"n\":3}", "{\"n\":4}"));
    CHECK(rec_before(&branch, "{\"n\":3}", "{\"n\":4}"));
    /* one lane from server to client: per-subscriber order holds, so the plain subscriber
       would have seen the branch item before n=2 */
    CHECK(!rec_has(&plain, "only") && !rec_has(&plain, "private"));
    CHECK(rec_has(&plain, "data {\"n\":1} flags=0 gap=0 server={\"application\":\"c-stream-server\""));
    CHECK(rec_has(&branch, "data {\"only\":\"eu\"} flags=0"));
    CHECK(rec_has(&branch, "data {\"private\":true} flags=1"));
    CHECK(rec_count(&plain) == 4 && rec_count(&branch) == 6);
    /* bad pushes */
    CHECK_STATUS(knit_stream_push(ticks, "[1]"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_stream_push_batch(ticks, "[{\"n\":5},1]"), KNIT_BAD_INPUT); /* refused whole */
    CHECK_STATUS(knit_stream_push_batch(ticks, "{\"n\":5}"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_stream_push_batch(ticks, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_stream_push_batch(ticks, "[]"), KNIT_OK);
    CHECK_STATUS(knit_stream_push(ticks, "{x"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_stream_push(ticks, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_stream_push_branches(ticks, "\"eu\"", "{}"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_stream_push_branches(ticks, "[1]", "{}"), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_stream_push_branches(ticks, NULL, "{}"), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_stream_push_branches(ticks, "[\"none\"]", "{}"), KNIT_OK);
    CHECK_STATUS(knit_stream_subscriber_push(srv.branch_sub, "2"), KNIT_BAD_INPUT);

    /* closing a branch ends its subscriptions; their subscribers hear why */
    CHECK_STATUS(knit_stream_close_branch(ticks, "eu"), KNIT_OK);
    CHECK(rec_wait_for(&branch, "closed Server dropping a branch flags=2", WAIT_MS));
    /* the subscriber handle outlives its subscription until freed; pushes to it do nothing */
    CHECK_STATUS(knit_stream_subscriber_push(srv.branch_sub, "{\"gone\":1}"), KNIT_OK);
    CHECK_STATUS(knit_stream_subscriber_close(srv.branch_sub), KNIT_OK);
    CHECK_STATUS(knit_stream_subscriber_close(srv.branch_sub), KNIT_CLOSED);
    CHECK_STATUS(knit_stream_subscriber_free(srv.branch_sub), KNIT_CLOSED);
    /* the ended subscription's handle is still the app's to close */
    CHECK_STATUS(knit_subscription_close(sub_eu), KNIT_OK);

    /* a request decided later, from another thread */
    struct rec parked_rec;
    rec_init(&parked_rec);
    struct parked_sub ps = {client, &parked_rec, NULL, -1};
    pthread_t t;
    int before = rec_count(&srv.requests);
    CHECK(pthread_create(&t, NULL, subscribe_parked, &ps) == 0);
    CHECK(rec_wait(&srv.requests, before + 1, WAIT_MS));
    pthread_mutex_lock(&srv.requests.mu);
    knit_stream_request_t *parked = srv.parked;
    pthread_mutex_unlock(&srv.requests.mu);
    knit_stream_subscriber_t *one = NULL;
    CHECK_STATUS(knit_stream_accept(parked, "", &one), KNIT_OK);
    pthread_join(t, NULL);
    CHECK(ps.status == KNIT_OK && ps.sub != NULL);
    CHECK_STATUS(knit_stream_reject(parked, "late"), KNIT_CLOSED);
    CHECK_STATUS(knit_stream_subscriber_push(one, "{\"just\":\"you\"}"), KNIT_OK);
    CHECK(rec_wait_for(&parked_rec, "data {\"just\":\"you\"} flags=1", WAIT_MS));
    CHECK_STATUS(knit_stream_subscriber_free(one), KNIT_OK); /* the subscription goes on */
    CHECK_STATUS(knit_stream_push(ticks, "{\"n\":3}"), KNIT_OK);
    CHECK(rec_wait_for(&parked_rec, "{\"n\":3}", WAIT_MS));

    /* after knit_subscription_close the data callback is not called again */
    CHECK_STATUS(knit_subscription_close(ps.sub), KNIT_OK);
    CHECK_STATUS(knit_subscription_close(ps.sub), KNIT_CLOSED);
    int parked_before = rec_count(&parked_rec);
    CHECK_STATUS(knit_stream_push(ticks, "{\"n\":4}"), KNIT_OK);
    CHECK(rec_wait_for(&plain, "{\"n\":4}", WAIT_MS));
    CHECK(rec_count(&parked_rec) == parked_before);
    CHECK(!rec_has(&parked_rec, "closed")); /* no closed callback for our own close */

    /* an undecided request: the subscriber times out; closing the stream answers it */
    knit_subscription_t *timed = (knit_subscription_t *)"x";
    CHECK_STATUS(knit_stream_subscribe(client, "c.Ticks", "{\"park\":2}", NULL, WAIT_MS, 300,
                                       on_stream_data, NULL, NULL, &timed),
                 KNIT_TIMEOUT);
    CHECK(timed == NULL);
    pthread_mutex_lock(&srv.requests.mu);
    parked = srv.parked;
    pthread_mutex_unlock(&srv.requests.mu);

    /* closing the stream ends every subscription; handles of the stream go stale */
    CHECK_STATUS(knit_stream_close(ticks), KNIT_OK);
    CHECK(rec_wait_for(&plain, "closed Stream closed flags=2", WAIT_MS));
    CHECK_STATUS(knit_stream_close(ticks), KNIT_CLOSED);
    CHECK_STATUS(knit_stream_push(ticks, "{}"), KNIT_CLOSED);
    CHECK_STATUS(knit_stream_accept(parked, NULL, NULL), KNIT_CLOSED);
    CHECK(CONTAINS(knit_last_error_message(), "request is closed"));
    CHECK_STATUS(knit_subscription_close(sub), KNIT_OK);

    /* a drop-oldest stream: every item is delivered or counted in a gap */
    knit_stream_t *lossy = NULL;
    CHECK_STATUS(knit_stream_create(server, "c.Lossy", "{\"policy\":\"drop-oldest\",\"queue\":2}",
                                    NULL, NULL, &lossy),
                 KNIT_OK);
    struct rec lr;
    rec_init(&lr);
    knit_subscription_t *ls = NULL;
    CHECK_STATUS(knit_stream_subscribe(client, "c.Lossy", NULL, NULL, WAIT_MS, WAIT_MS,
                                       on_stream_data, NULL, &lr, &ls),
                 KNIT_OK);
    char item[64];
    for (int i = 0; i < 200; i++) {
        snprintf(item, sizeof item, "{\"i\":%d}", i);
        CHECK_STATUS(knit_stream_push(lossy, item), KNIT_OK);
    }
    CHECK(rec_wait_for(&lr, "{\"i\":199}", WAIT_MS));
    pthread_mutex_lock(&lr.mu);
    CHECK((uint64_t)lr.n + lr.gaps == 200);
    pthread_mutex_unlock(&lr.mu);

    /* closing the server's client closes its streams and their handles */
    CHECK_STATUS(knit_client_close(server), KNIT_OK);
    CHECK_STATUS(knit_stream_push(lossy, "{}"), KNIT_CLOSED);
    CHECK_STATUS(knit_stream_close(lossy), KNIT_CLOSED);
    CHECK_STATUS(knit_stream_create(server, "c.Again", NULL, NULL, NULL, &dup), KNIT_CLOSED);
    CHECK_STATUS(knit_client_close(client), KNIT_OK);
    CHECK_STATUS(knit_subscription_close(ls), KNIT_CLOSED);
    CHECK_STATUS(knit_stream_subscribe(client, "c.Lossy", NULL, NULL, 0, 0, on_stream_data, NULL,
                                       NULL, &none),
                 KNIT_CLOSED);
    rec_destroy(&srv.requests);
    rec_destroy(&plain);
    rec_destroy(&branch);
    rec_destroy(&parked_rec);
    rec_destroy(&lr);
}

/* ----- discovery events ------------------------------------------------------------------ */

static void test_events(void) {
    knit_client_t *watcher = connect_app("c-events", 0);
    struct rec ev;
    rec_init(&ev);
    knit_subscription_t *sub = NULL, *none = (knit_subscription_t *)"x";
    CHECK_STATUS(knit_events_subscribe(watcher, NULL, NULL, &none), KNIT_INVALID_ARGUMENT);
    CHECK(none == NULL);
    CHECK_STATUS(knit_events_subscribe(watcher, on_event, &ev, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_events_subscribe(watcher, on_event, &ev, &sub), KNIT_OK);
    /* the replay starts with ourselves */
    CHECK(rec_wait_for(&ev, "{\"type\":\"serverAdded\",\"server\":{\"application\":\"c-events\"",
                       WAIT_MS));
    knit_client_t *peer = connect_app("c-events-peer", 0);
    CHECK(rec_wait_for(&ev, "{\"type\":\"serverAdded\",\"server\":{\"application\":\"c-events-peer\"",
                       WAIT_MS));
    CHECK_STATUS(knit_stream_create(peer, "c.EvStream", NULL, NULL, NULL, &(knit_stream_t *){NULL}),
                 KNIT_OK);
    CHECK(rec_wait_for(&ev, "{\"type\":\"methodAdded\",\"method\":{\"name\":\"c.EvStream\"", WAIT_MS));
    CHECK(rec_wait_for(&ev, "\"type\":\"serverMethodAdded\",\"server\":{\"application\":\"c-events-peer\"",
                       WAIT_MS));
    CHECK(rec_has(&ev, "\"supportsStreaming\":true"));
    CHECK_STATUS(knit_client_close(peer), KNIT_OK); /* also closes its stream */
    CHECK(rec_wait_for(&ev, "{\"type\":\"serverRemoved\",\"server\":{\"application\":\"c-events-peer\"",
                       WAIT_MS));
    CHECK(rec_wait_for(&ev, "{\"type\":\"methodRemoved\"", WAIT_MS));
    pthread_mutex_lock(&ev.mu);
    CHECK(!pthread_equal(ev.last_thread, pthread_self())); /* the dispatcher thread */
    pthread_mutex_unlock(&ev.mu);
    CHECK_STATUS(knit_subscription_close(sub), KNIT_OK);
    CHECK_STATUS(knit_subscription_close(sub), KNIT_CLOSED);
    CHECK_STATUS(knit_client_close(watcher), KNIT_OK);
    CHECK_STATUS(knit_events_subscribe(watcher, on_event, &ev, &sub), KNIT_CLOSED);
    rec_destroy(&ev);
}

/* ----- channels -------------------------------------------------------------------------- */

static void test_channels(void) {
    knit_client_t *w = connect_app("c-chan-writer", 0);
    knit_client_t *r = connect_app("c-chan-reader", 0);
    char *s = NULL;
    uint64_t v = 0;

    /* the default colour channels */
    CHECK_STATUS(knit_channel_list(r, &s), KNIT_OK);
    CHECK(CONTAINS(s, "{\"name\":\"Red\",\"meta\":{\"color\":\"#F44336\"") && CONTAINS(s, "\"Purple\""));
    knit_string_free(s);
    CHECK_STATUS(knit_channel_get(r, "Orange", &s), KNIT_OK);
    CHECK(CONTAINS(s, "{\"name\":\"Orange\"") && CONTAINS(s, "\"data\":{}"));
    knit_string_free(s);
    CHECK_STATUS(knit_channel_get(r, "Nope", &s), KNIT_NOT_FOUND);
    CHECK(s == NULL);
    CHECK_STATUS(knit_channel_join(r, "Nope"), KNIT_NOT_FOUND);
    CHECK_STATUS(knit_channel_join(r, NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_channel_set_mode(r, 7), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_channel_get(r, "Red", NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_channel_subscribe(r, NULL, NULL, &(knit_subscription_t *){NULL}),
                 KNIT_INVALID_ARGUMENT);

    /* membership changes and following whatever is joined */
    struct rec changed, follow, one;
    rec_init(&changed);
    rec_init(&follow);
    rec_init(&one);
    knit_subscription_t *s_changed = NULL, *s_follow = NULL, *s_one = NULL;
    CHECK_STATUS(knit_channel_on_changed(r, on_channels_changed, &changed, &s_changed), KNIT_OK);
    CHECK(rec_wait_for(&changed, "[]", WAIT_MS)); /* the membership now, first */
    CHECK_STATUS(knit_channel_subscribe(r, on_channel, &follow, &s_follow), KNIT_OK);
    CHECK_STATUS(knit_channel_publish(w, "{\"instrument\":\"VOD.L\",\"px\":1}", "Orange", &v), KNIT_OK);
    CHECK(v > 0);
    CHECK_STATUS(knit_channel_join(r, "Orange"), KNIT_OK);
    CHECK(rec_wait_for(&changed, "[\"Orange\"]", WAIT_MS));
    CHECK(rec_wait_for(&follow, "Orange v", WAIT_MS)); /* its current data on joining */
    CHECK(rec_has(&follow, "data={\"instrument\":\"VOD.L\",\"px\":1} context={\"name\":\"Orange\""));
    CHECK_STATUS(knit_channel_joined(r, &s), KNIT_OK);
    CHECK(s && strcmp(s, "[\"Orange\"]") == 0);
    knit_string_free(s);
    CHECK_STATUS(knit_channel_publish(w, "{\"px\":2}", "Orange", NULL), KNIT_OK);
    CHECK(rec_wait_for(&follow, "data={\"instrument\":\"VOD.L\",\"px\":2}", WAIT_MS));

    /* single mode: joining another leaves Orange */
    CHECK_STATUS(knit_channel_join(r, "Yellow"), KNIT_OK);
    CHECK(rec_wait_for(&changed, "[\"Yellow\"]", WAIT_MS));
    CHECK_STATUS(knit_channel_publish(w, "{\"px\":3}", "Orange", NULL), KNIT_OK);
    CHECK_STATUS(knit_channel_publish(w, "{\"y\":1}", "Yellow", NULL), KNIT_OK);
    CHECK(rec_wait_for(&follow, "data={\"y\":1}", WAIT_MS));
    CHECK(!rec_has(&follow, "\"px\":3"));

    /* multi mode: joining adds; publishing without a name writes to every joined channel */
    CHECK_STATUS(knit_channel_set_mode(r, KNIT_CHANNEL_MULTI), KNIT_OK);
    CHECK_STATUS(knit_channel_join(r, "Orange"), KNIT_OK);
    CHECK(rec_wait_for(&changed, "[\"Yellow\",\"Orange\"]", WAIT_MS));
    CHECK_STATUS(knit_channel_publish(r, "{\"both\":true}", NULL, &v), KNIT_OK);
    CHECK(v > 0);
    CHECK(rec_wait_for(&follow, "Yellow v", WAIT_MS));
    CHECK(rec_wait_for(&follow, "data={\"y\":1,\"both\":true}", WAIT_MS));
    CHECK(rec_wait_for(&follow, "data={\"instrument\":\"VOD.L\",\"px\":3,\"both\":true}", WAIT_MS));

    /* FDC3 contexts: the latest per type, decoded as data.fdc3 */
    CHECK_STATUS(knit_channel_publish_fdc3(w, "{\"type\":\"fdc3.instrument\",\"id\":{\"ticker\":\"VOD\"}}",
                                           "Yellow", &v),
                 KNIT_OK);
    CHECK(rec_wait_for(&follow, "\"fdc3\":{\"type\":\"fdc3.instrument\",\"id\":{\"ticker\":\"VOD\"}}", WAIT_MS));
    CHECK_STATUS(knit_channel_publish_fdc3(w, "{\"id\":1}", "Yellow", NULL), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_channel_publish(w, "[1]", "Yellow", NULL), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_channel_publish(w, "{x", "Yellow", NULL), KNIT_BAD_INPUT);
    CHECK_STATUS(knit_channel_publish(w, NULL, "Yellow", NULL), KNIT_INVALID_ARGUMENT);
    CHECK_STATUS(knit_channel_publish(w, "{}", "Nope", NULL), KNIT_NOT_FOUND);
    CHECK_STATUS(knit_channel_publish(w, "{\"a\":1}", NULL, &v), KNIT_BAD_INPUT); /* none joined */
    CHECK(v == 0);

    /* one channel without joining it */
    CHECK_STATUS(knit_channel_subscribe_for(w, "Magenta", on_channel, &one, &s_one), KNIT_OK);
    CHECK_STATUS(knit_channel_subscribe_for(w, "Nope", on_channel, &one, &(knit_subscription_t *){NULL}),
                 KNIT_NOT_FOUND);
    CHECK_STATUS(knit_channel_publish(r, "{\"m\":1}", "Magenta", NULL), KNIT_OK);
    CHECK(rec_wait_for(&one, "Magenta v", WAIT_MS) && rec_wait_for(&one, "data={\"m\":1}", WAIT_MS));
    CHECK_STATUS(knit_channel_joined(w, &s), KNIT_OK);
    CHECK(s && strcmp(s, "[]") == 0);
    knit_string_free(s);

    /* leave all; closed subscriptions are not called again */
    CHECK_STATUS(knit_subscription_close(s_changed), KNIT_OK);
    int changed_before = rec_count(&changed);
    CHECK_STATUS(knit_channel_leave(r, "Nope"), KNIT_OK); /* not joined: nothing happens */
    CHECK_STATUS(knit_channel_leave(r, NULL), KNIT_OK);
    CHECK_STATUS(knit_channel_joined(r, &s), KNIT_OK);
    CHECK(s && strcmp(s, "[]") == 0);
    knit_string_free(s);
    CHECK_STATUS(knit_subscription_close(s_follow), KNIT_OK);
    CHECK_STATUS(knit_subscription_close(s_follow), KNIT_CLOSED);
    CHECK_STATUS(knit_channel_publish(r, "{\"m\":2}", "Magenta", NULL), KNIT_OK);
    CHECK(rec_wait_for(&one, "data={\"m\":2}", WAIT_MS));
    CHECK(rec_count(&changed) == changed_before);
    CHECK_STATUS(knit_client_close(w), KNIT_OK);
    CHECK_STATUS(knit_subscription_close(s_one), KNIT_CLOSED); /* closed with its client */
    CHECK_STATUS(knit_channel_join(w, "Red"), KNIT_CLOSED);
    CHECK_STATUS(knit_channel_list(w, &s), KNIT_CLOSED);
    CHECK_STATUS(knit_client_close(r), KNIT_OK);
    rec_destroy(&changed);
    rec_destroy(&follow);
    rec_destroy(&one);
}

/* ----- poll mode ------------------------------------------------------------------------- */

static void test_poll_mode_callbacks(void) {
    knit_client_t *p = connect_app("c-sub-poller", KNIT_CONNECT_POLL);
    knit_client_t *w = connect_app("c-sub-poll-writer", 0);
    struct rec ctx, bus;
    rec_init(&ctx);
    rec_init(&bus);
    knit_subscription_t *s1 = NULL, *s2 = NULL;
    CHECK_STATUS(knit_context_set(w, "c.polled", "{\"a\":1}"), KNIT_OK);
    CHECK_STATUS(knit_context_subscribe(p, "c.polled", on_context, &ctx, &s1), KNIT_OK);
    CHECK_STATUS(knit_subscribe(p, "c.polled.topic", on_message, &bus, &s2), KNIT_OK);
    CHECK_STATUS(knit_publish(p, "c.polled.topic", "{\"b\":2}"), KNIT_OK);
    /* nothing runs until we poll */
    CHECK(rec_count(&ctx) == 0 && rec_count(&bus) == 0);
    uint32_t handled = 0;
    for (int i = 0; i < 200 && !(rec_count(&ctx) == 1 && rec_count(&bus) == 1); i++) {
        CHECK_STATUS(knit_client_poll(p, 50, &handled), KNIT_OK);
    }
    CHECK_STATUS(knit_context_update(w, "c.polled", "{\"a\":2}"), KNIT_OK);
    for (int i = 0; i < 200 && !rec_has(&ctx, "{\"a\":2}"); i++) {
        CHECK_STATUS(knit_client_poll(p, 50, &handled), KNIT_OK);
    }
    CHECK(rec_has(&ctx, "data={\"a\":1}") && rec_has(&ctx, "data={\"a\":2}"));
    CHECK(rec_has(&bus, "c.polled.topic {\"b\":2}"));
    CHECK(pthread_equal(ctx.last_thread, pthread_self()) && pthread_equal(bus.last_thread, pthread_self()));
    CHECK_STATUS(knit_subscription_close(s1), KNIT_OK);
    CHECK_STATUS(knit_context_destroy(w, "c.polled"), KNIT_OK);
    CHECK_STATUS(knit_client_close(p), KNIT_OK); /* s2 closes with it */
    CHECK_STATUS(knit_subscription_close(s2), KNIT_CLOSED);
    CHECK_STATUS(knit_client_close(w), KNIT_OK);
    rec_destroy(&ctx);
    rec_destroy(&bus);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s GATEWAY_SOCKET\n", argv[0]);
        return 2;
    }
    gw = argv[1];
    test_null_and_garbage_handles();
    test_contexts();
    test_bus();
    test_streams();
    test_events();
    test_channels();
    test_poll_mode_callbacks();
    printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
