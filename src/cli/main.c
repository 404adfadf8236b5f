/* dsinfer: one binary, many subcommands. */
#include "cli/cli.h"
#include "dsinfer/common.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

static const dsi_command COMMANDS[] = {
    /* keep sorted by area; each entry's implementation lives in src/cli/cmd_<name>.c */
    {"demo", "run the built-in demo model end to end (no download needed)", dsi_cmd_demo},
    {"generate", "greedy or sampled generation from token ids", dsi_cmd_generate},
    {"logits", "float32 logits for every position of a token sequence", dsi_cmd_logits},
    {"make-model", "write a random-weight checkpoint in the real format", dsi_cmd_make_model},
    {"inspect", "validate a checkpoint and print its shape", dsi_cmd_inspect},
    {"serve", "OpenAI-compatible HTTP server (built-in demo model without --model)", dsi_cmd_serve},
    {"router", "prefill/decode router with DeepSeek's load balancers", dsi_cmd_router},
    {"tokenize", "text on stdin -> token ids", dsi_cmd_tokenize},
    {"detokenize", "token ids on stdin -> text", dsi_cmd_detokenize},
    {"chat-render", "messages JSON on stdin -> chat prompt", dsi_cmd_chat_render},
    {"eplb", "expert placement with redundant experts (EPLB)", dsi_cmd_eplb},
    {"sim", "cost/revenue calculator and cluster simulator (DeepSeek's day)", dsi_cmd_sim},
    {"report", "cost, revenue and margin for a period from an account journal", dsi_cmd_report},
    {NULL, NULL, NULL},
};
static const int N_COMMANDS = sizeof COMMANDS / sizeof COMMANDS[0] - 1; /* last is the sentinel */

static void usage(FILE *f) {
    fprintf(f, "dsinfer %s - DeepSeek-V3/R1 inference\n\nusage: dsinfer <command> [options]\n\ncommands:\n",
            DSI_VERSION);
    for (int i = 0; i < N_COMMANDS; i++) fprintf(f, "  %-14s %s\n", COMMANDS[i].name, COMMANDS[i].summary);
    fprintf(f, "\n'dsinfer <command> --help' describes a command's options.\n");
}

const char *dsi_cli_flag(int argc, char **argv, int *i, const char *name, int *missing) {
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (strncmp(a, name, n) != 0) return NULL;
    if (a[n] == '=') return a + n + 1;
    if (a[n] != '\0') return NULL;
    if (*i + 1 >= argc) {
        *missing = 1;
        return NULL;
    }
    return argv[++*i];
}

/* strtol and strtod skip leading blanks; a flag's value may not start with one */
static int starts_number(const char *v) { return (*v >= '0' && *v <= '9') || *v == '-' || *v == '+' || *v == '.'; }

int dsi_cli_int(const char *cmd, const char *flag, const char *v, int *bad) {
    char *end = (char *)v;
    errno = 0;
    long x = starts_number(v) ? strtol(v, &end, 10) : 0;
    if (end == v || *end) {
        fprintf(stderr, "dsinfer %s: %s: '%s' is not a whole number\n", cmd, flag, v);
    } else if (errno == ERANGE || x < INT_MIN || x > INT_MAX) {
        fprintf(stderr, "dsinfer %s: %s: '%s' is out of range\n", cmd, flag, v);
    } else {
        return (int)x;
    }
    *bad = 1;
    return 0;
}

double dsi_cli_num(const char *cmd, const char *flag, const char *v, int *bad) {
    char *end = (char *)v;
    errno = 0;
    double x = starts_number(v) ? strtod(v, &end) : 0;
    if (end == v || *end || isnan(x) || (isinf(x) && errno != ERANGE)) {
        fprintf(stderr, "dsinfer %s: %s: '%s' is not a number\n", cmd, flag, v);
    } else if (isinf(x)) { /* past DBL_MAX; a value below DBL_MIN is kept as it rounds */
        fprintf(stderr, "dsinfer %s: %s: '%s' is out of range\n", cmd, flag, v);
    } else {
        return x;
    }
    *bad = 1;
    return 0;
}

uint64_t dsi_cli_u64(const char *cmd, const char *flag, const char *v, int *bad) {
    char *end = (char *)v;
    errno = 0;
    unsigned long long x = *v >= '0' && *v <= '9' ? strtoull(v, &end, 10) : 0; /* strtoull takes "-1" */
    if (end == v || *end) {
        fprintf(stderr, "dsinfer %s: %s: '%s' is not a whole number\n", cmd, flag, v);
    } else if (errno == ERANGE) {
        fprintf(stderr, "dsinfer %s: %s: '%s' is out of range\n", cmd, flag, v);
    } else {
        return (uint64_t)x;
    }
    *bad = 1;
    return 0;
}

int dsi_cli_parse_ids(const char *s, int32_t **out) {
    int cap = 16, n = 0;
    int32_t *ids = malloc(sizeof(int32_t) * cap);
    const char *p = s;
    while (ids && *p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > 0x7fffffff) { free(ids); return -1; }
        if (n == cap) {
            int32_t *grown = realloc(ids, sizeof(int32_t) * (cap *= 2));
            if (!grown) { free(ids); return -1; }
            ids = grown;
        }
        ids[n++] = (int32_t)v;
        p = end;
        while (*p == ',' || *p == ' ') p++;
    }
    *out = ids;
    return ids ? n : -1;
}

static void print_version(void) {
    printf("dsinfer %s\nbackends: cpu", DSI_VERSION);
#ifdef DSI_HAVE_CUDA
    printf(" cuda");
#endif
    printf("\nexpert parallelism: %s\n",
#ifdef DSI_HAVE_MPI
           "mpi"
#else
           "none (built without MPI)"
#endif
    );
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
        print_version();
        return 0;
    }
    for (int i = 0; i < N_COMMANDS; i++)
        if (!strcmp(argv[1], COMMANDS[i].name)) return COMMANDS[i].run(argc - 1, argv + 1);
    fprintf(stderr, "dsinfer: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
