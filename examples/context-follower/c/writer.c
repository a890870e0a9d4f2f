/* Writes a shared context step by step: a first value, five updates of "seq", then a last
 * update that removes "scratch" and sets "done". The context's name is argv[1].
 *   cc writer.c $(pkg-config --cflags --libs knit) -o context-writer */
#include <knit.h>

#include <stdio.h>

int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "examples.instrument";
    knit_client_t *client = NULL;
    uint64_t version = 0;
    knit_status_t st = knit_client_connect(NULL, "context-writer-c", 0, &client);
    if (st == KNIT_OK)
        st = knit_context_set(client, name,
                              "{\"symbol\":\"VOD.L\",\"writer\":\"c\",\"seq\":0,\"scratch\":true}");
    for (int seq = 1; seq <= 5 && st == KNIT_OK; seq++) {
        char delta[32];
        snprintf(delta, sizeof delta, "{\"seq\":%d}", seq);
        st = knit_context_update(client, name, delta);
    }
    if (st == KNIT_OK)
        st = knit_context_update_ex(client, name, "{\"scratch\":null,\"done\":true}", &version);
    if (st != KNIT_OK) {
        fprintf(stderr, "context-writer: %s (%s)\n", knit_status_string(st),
                knit_last_error_message());
    } else {
        printf("wrote %s up to version %llu\n", name, (unsigned long long)version);
    }
    knit_client_close(client);
    return st == KNIT_OK ? 0 : 1;
}
