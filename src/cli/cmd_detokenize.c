/* dsinfer detokenize: ids on stdin -> text on stdout. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/tokenizer_cli.h"
#include "dsinfer/tokenizer.h"


static const char USAGE[] =
    "usage: dsinfer detokenize --tokenizer DIR [--skip-special]\n"
    "Reads token ids (separated by spaces, commas or newlines) on stdin and prints the text.\n"
    "  --tokenizer DIR   folder with tokenizer.json\n"
    "  --skip-special    leave special tokens out of the text\n";

int dsi_cmd_detokenize(int argc, char **argv) {
    const char *dir = NULL;
    int skip = 0, unused = 0;
    int u = dsi_cli_tokenizer_args(argc, argv, USAGE, &dir, &skip, "--skip-special", &unused, NULL);
    if (u) return u < 0 ? 0 : u;
    size_t len, n = 0, cap = 256;
    char *in = dsi_cli_read_stdin(&len), *p = in;
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!in || !ids) {
        fprintf(stderr, "detokenize: cannot read stdin\n");
        free(in);
        free(ids);
        return 1;
    }
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\n' || *p == '\r' || *p == '\t' || *p == '[' || *p == ']') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < INT32_MIN || v > INT32_MAX) {
            fprintf(stderr, "detokenize: not a token id at byte %zu of the input\n", (size_t)(p - in));
            free(in);
            free(ids);
            return 1;
        }
        if (n == cap) {
            int32_t *nb = realloc(ids, (cap *= 2) * sizeof *ids);
            if (!nb) {
                fprintf(stderr, "detokenize: out of memory\n");
                free(in);
                free(ids);
                return 1;
            }
            ids = nb;
        }
        ids[n++] = (int32_t)v;
        p = end;
    }
    free(in);
    dsi_tokenizer *tok = NULL;
    char *text = NULL;
    size_t tl = 0;
    int rc = dsi_tokenizer_load(dir, &tok);
    if (rc == DSI_OK) rc = dsi_tokenizer_decode(tok, ids, n, skip ? DSI_TOK_SKIP_SPECIAL : 0, &text, &tl);
    if (rc == DSI_OK) fwrite(text, 1, tl, stdout);
    else fprintf(stderr, "detokenize: %s\n", dsi_last_error());
    free(text);
    free(ids);
    dsi_tokenizer_destroy(tok);
    return rc == DSI_OK ? 0 : 1;
}
