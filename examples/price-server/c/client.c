/* Calls Examples.Price for a symbol (default VOD.L) and prints the invocation result as JSON.
 * Exits non-zero when the call fails.
 *   cc client.c $(pkg-config --cflags --libs knit) -o price-client */
#include <knit.h>

#include <stdio.h>

int main(int argc, char **argv) {
    const char *symbol = argc > 1 ? argv[1] : "VOD.L";
    char args[256];
    snprintf(args, sizeof args, "{\"symbol\":\"%s\"}", symbol); /* a plain symbol: no escaping */
    knit_client_t *client = NULL;
    char *result = NULL;
    knit_status_t st = knit_client_connect(NULL, "price-client-c", 0, &client);
    if (st == KNIT_OK) st = knit_invoke(client, "Examples.Price", args, NULL, 10000, &result);
    if (st != KNIT_OK) {
        fprintf(stderr, "price-client: %s (%s)\n", knit_status_string(st),
                knit_last_error_message());
    } else {
        printf("%s\n", result);
    }
    knit_string_free(result);
    knit_client_close(client);
    return st == KNIT_OK ? 0 : 1;
}
