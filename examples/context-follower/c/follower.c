/* Follows a shared context (argv[1]) and prints each version it sees; exits once the context
 * says "done": true, printing its final value (or fails after 20 s).
 *   cc follower.c $(pkg-config --cflags --libs knit) -pthread -o context-follower */
#define _POSIX_C_SOURCE 200809L
#include <knit.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct follower {
    pthread_mutex_t lock;
    pthread_cond_t done_cv;
    char *last; /* the final value, once "done" */
};

/* Runs on knit's dispatcher thread: the whole value, what changed, and the version. */
static void on_change(void *user_data, const char *name, const char *data_json,
                      const char *delta_json, uint64_t version) {
    struct follower *f = user_data;
    (void)name;
    printf("version %llu: %s\n", (unsigned long long)version, delta_json);
    fflush(stdout);
    /* A real app would parse the JSON; this one only needs one flag. */
    if (strstr(data_json, "\"done\":true") != NULL) {
        pthread_mutex_lock(&f->lock);
        if (f->last == NULL) f->last = strdup(data_json);
        pthread_cond_signal(&f->done_cv);
        pthread_mutex_unlock(&f->lock);
    }
}

int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "examples.instrument";
    struct follower f = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL};
    knit_client_t *client = NULL;
    knit_subscription_t *sub = NULL;
    knit_status_t st = knit_client_connect(NULL, "context-follower-c", 0, &client);
    if (st == KNIT_OK) st = knit_context_subscribe(client, name, on_change, &f, &sub);
    if (st != KNIT_OK) {
        fprintf(stderr, "context-follower: %s (%s)\n", knit_status_string(st),
                knit_last_error_message());
        knit_client_close(client);
        return 1;
    }
    printf("following %s\n", name);
    fflush(stdout);

    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 20;
    pthread_mutex_lock(&f.lock);
    int rc = 0;
    while (f.last == NULL && rc != ETIMEDOUT) rc = pthread_cond_timedwait(&f.done_cv, &f.lock, &until);
    pthread_mutex_unlock(&f.lock);

    knit_subscription_close(sub); /* on_change is not running after this */
    knit_client_close(client);
    if (f.last == NULL) {
        fprintf(stderr, "context-follower: no \"done\" within 20 s\n");
        return 1;
    }
    printf("followed %s\n", f.last);
    free(f.last);
    return 0;
}
