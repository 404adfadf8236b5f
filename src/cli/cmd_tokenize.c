/* dsinfer tokenize / detokenize: text <-> ids through a tokenizer.json. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/tokenizer_cli.h"
#include "dsinfer/tokenizer.h"

char *dsi_cli_read_stdin(size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    while (b) {
        n += fread(b + n, 1, cap - n - 1, stdin);
        if (n < cap - 1) break;
        char *nb = realloc(b, cap *= 2);
        if (!nb) free(b);
        b = nb;
    }
    if (!b || ferror(stdin)) {
        free(b);
        return NULL;
    }
    b[n] = '\0';
    *len = n;
    return b;
}

int dsi_cli_tokenizer_args(int argc, char **argv, const char *usage, const char **dir, int *flag_a,
                           const char *flag_a_name, int *flag_b, const char *flag_b_name) {
    for (int i = 1; i < argc; i++) {
        int missing = 0;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            return -1;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--tokenizer", &missing))) {
            *dir = v;
        } else if (flag_a_name && !strcmp(argv[i], flag_a_name)) {
            *flag_a = 1;
        } else if (flag_b_name && !strcmp(argv[i], flag_b_name)) {
            *flag_b = 1;
        } else {
            fprintf(stderr, "%s: %s '%s'\n\n%s", argv[0], missing ? "missing value for" : "unknown option", argv[i], usage);
            return 2;
        }
    }
    if (!*dir) {
        fprintf(stderr, "%s: --tokenizer DIR is required\n\n%s", argv[0], usage);
        return 2;
    }
    return 0;
}

static const char TOKENIZE_USAGE[] =
    "usage: dsinfer tokenize --tokenizer DIR [--bos] [--plain-special]\n"
    "Reads UTF-8 text on stdin and prints its token ids separated by spaces.\n"
    "  --tokenizer DIR   folder with tokenizer.json (and tokenizer_config.json)\n"
    "  --bos             apply the post-processor template (prepend BOS)\n"
    "  --plain-special   treat special-token text in the input as ordinary text\n";

int dsi_cmd_tokenize(int argc, char **argv) {
    const char *dir = NULL;
    int bos = 0, plain = 0;
    int u = dsi_cli_tokenizer_args(argc, argv, TOKENIZE_USAGE, &dir, &bos, "--bos", &plain, "--plain-special");
    if (u) return u < 0 ? 0 : u;
    dsi_tokenizer *tok;
    if (dsi_tokenizer_load(dir, &tok) != DSI_OK) {
        fprintf(stderr, "tokenize: %s\n", dsi_last_error());
        return 1;
    }
    size_t len, n;
    int32_t *ids = NULL;
    char *text = dsi_cli_read_stdin(&len);
    int rc = text ? dsi_tokenizer_encode(tok, text, len, (bos ? DSI_TOK_ADD_BOS : 0) | (plain ? DSI_TOK_PLAIN_SPECIAL : 0), &ids, &n)
                  : dsi_error(DSI_EIO, "cannot read stdin");
    if (rc == DSI_OK) {
        for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
    } else {
        fprintf(stderr, "tokenize: %s\n", dsi_last_error());
    }
    free(ids);
    free(text);
    dsi_tokenizer_destroy(tok);
    return rc == DSI_OK ? 0 : 1;
}
