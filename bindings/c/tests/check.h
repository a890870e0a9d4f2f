/*
 * Checks and waiting helpers shared by the C tests. A check records a failure and goes on; the
 * program prints "N checks, M failed" and exits non-zero when M > 0.
 */
#ifndef KNIT_TEST_CHECK_H
#define KNIT_TEST_CHECK_H

#include <knit.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static int failures = 0;
static int checks = 0;

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

/* An absolute CLOCK_REALTIME deadline `ms` from now, for pthread_cond_timedwait. */
static inline struct timespec deadline_in(int ms) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += ms / 1000;
    t.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

/*
 * What callbacks saw: a count and a log of lines, under a lock, with a condition variable to
 * wait on (never a sleep).
 */
#define LOG_SIZE 65536
struct rec {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n;
    size_t len;
    char log[LOG_SIZE];
    uint64_t last_version;
    uint32_t last_flags;
    uint64_t gaps;
    pthread_t last_thread;
};

static inline void rec_init(struct rec *r) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
}

static inline void rec_destroy(struct rec *r) {
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
}

/* Appends "line\n" to the log and counts it. */
static inline void rec_add(struct rec *r, const char *line) {
    pthread_mutex_lock(&r->mu);
    size_t n = strlen(line);
    if (r->len + n + 2 < LOG_SIZE) {
        memcpy(r->log + r->len, line, n);
        r->len += n;
        r->log[r->len++] = '\n';
        r->log[r->len] = 0;
    }
    r->n++;
    r->last_thread = pthread_self();
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

/* Waits up to `ms` until at least `n` lines were added; returns whether they were. */
static inline int rec_wait(struct rec *r, int n, int ms) {
    struct timespec until = deadline_in(ms);
    pthread_mutex_lock(&r->mu);
    int rc = 0;
    while (r->n < n && rc != ETIMEDOUT) rc = pthread_cond_timedwait(&r->cv, &r->mu, &until);
    int ok = r->n >= n;
    pthread_mutex_unlock(&r->mu);
    return ok;
}

/* Waits up to `ms` until the log contains `needle`. */
static inline int rec_wait_for(struct rec *r, const char *needle, int ms) {
    struct timespec until = deadline_in(ms);
    pthread_mutex_lock(&r->mu);
    int rc = 0;
    while (!strstr(r->log, needle) && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&r->cv, &r->mu, &until);
    int ok = strstr(r->log, needle) != NULL;
    pthread_mutex_unlock(&r->mu);
    return ok;
}

static inline int rec_count(struct rec *r) {
    pthread_mutex_lock(&r->mu);
    int n = r->n;
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* Prints the log (to explain a failed check). */
static inline void rec_dump(struct rec *r, const char *what) {
    pthread_mutex_lock(&r->mu);
    fprintf(stderr, "--- %s (%d lines):\n%s---\n", what, r->n, r->log);
    pthread_mutex_unlock(&r->mu);
}

/* Whether the log contains `needle` now. */
static inline int rec_has(struct rec *r, const char *needle) {
    pthread_mutex_lock(&r->mu);
    int ok = strstr(r->log, needle) != NULL;
    pthread_mutex_unlock(&r->mu);
    return ok;
}

/* Whether both were recorded, `first` before `then`. */
static inline int rec_before(struct rec *r, const char *first, const char *then) {
    pthread_mutex_lock(&r->mu);
    const char *a = strstr(r->log, first);
    const char *b = strstr(r->log, then);
    int ok = a != NULL && b != NULL && a < b;
    pthread_mutex_unlock(&r->mu);
    return ok;
}

#endif
