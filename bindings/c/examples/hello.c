/* The C example from docs/bindings.md: serve a method and call it (gateway: $KNIT_GATEWAY).
   cc hello.c $(pkg-config --cflags --libs knit) -o hello && ./hello */
#include <knit.h>
#include <stdio.h>

static void greet(void *ud, const char *args, const char *caller, knit_reply_t *reply) {
    (void)ud; (void)args; (void)caller;
    knit_reply_ok(reply, "{\"greeting\":\"hello from C\"}");
}

int main(void) {
    knit_client_t *c = NULL;
    char *result = NULL;
    knit_status_t st = knit_client_connect(NULL, "hello-c", 0, &c);
    if (st == KNIT_OK) st = knit_register(c, "Hello", greet, NULL);
    if (st == KNIT_OK) st = knit_invoke(c, "Hello", "{}", NULL, 5000, &result);
    if (st != KNIT_OK) {
        fprintf(stderr, "knit: %s (%s)\n", knit_status_string(st), knit_last_error_message());
    } else {
        printf("%s\n", result);
    }
    knit_string_free(result);
    knit_client_close(c);
    return st == KNIT_OK ? 0 : 1;
}
