/* Serves the method Examples.Price: it answers {request, bid, ask, server} to any request.
 * Prints one line once it serves, then serves until its standard input closes.
 * The gateway is $KNIT_GATEWAY (else the per-user default).
 *   cc server.c $(pkg-config --cflags --libs knit) -o price-server */
#include <knit.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Runs on knit's dispatcher thread; answers through the reply handle, exactly once. */
static void price(void *user_data, const char *args_json, const char *caller_json,
                  knit_reply_t *reply) {
    (void)user_data;
    (void)caller_json;
    size_t n = strlen(args_json) + 96;
    char *result = malloc(n);
    if (result == NULL) {
        knit_reply_error(reply, "out of memory");
        return;
    }
    snprintf(result, n, "{\"request\":%s,\"bid\":100.25,\"ask\":100.75,\"server\":\"c\"}",
             args_json);
    knit_reply_ok(reply, result);
    free(result);
}

int main(void) {
    knit_client_t *client = NULL;
    knit_status_t st = knit_client_connect(NULL, "price-server-c", 0, &client);
    if (st == KNIT_OK) st = knit_register(client, "Examples.Price", price, NULL);
    if (st != KNIT_OK) {
        fprintf(stderr, "price-server: %s (%s)\n", knit_status_string(st),
                knit_last_error_message());
        knit_client_close(client);
        return 1;
    }
    printf("price-server (c) ready\n");
    fflush(stdout);
    while (getchar() != EOF) {
    } /* serve until stdin closes */
    knit_client_close(client);
    return 0;
}
