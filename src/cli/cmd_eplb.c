/* dsinfer eplb: redundant-expert placement from a load file. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "dsinfer/eplb.h"

static void eplb_usage(FILE *f) {
    fprintf(f,
            "usage: dsinfer eplb --load FILE --slots R --groups G --nodes N --gpus P\n"
            "                    [--policy deepseek|best] [--out FILE]\n\n"
            "Places R physical expert slots (R/P per GPU, GPU-major) for the loads in FILE,\n"
            "JSON {\"load\": [[tokens per expert] per layer]}, and prints JSON\n"
            "{\"phy2log\": [L][R], \"log2phy\": [L][E][k] (-1 padded), \"logcnt\": [L][E],\n"
            " \"max_over_mean\": [L]} (busiest GPU load over mean GPU load).\n\n"
            "  --policy deepseek  DeepSeek's open EPLB algorithm, exactly (hierarchical when\n"
            "                     G divides by N, global otherwise)\n"
            "  --policy best      ours (default): never worse than deepseek per layer, no\n"
            "                     expert twice on a GPU, replicas stay in their group's node\n"
            "  --out FILE         write the JSON there instead of stdout\n");
}

static int parse_pos(const char *name, const char *v, int *out) {
    char *end;
    long x = strtol(v, &end, 10);
    if (!*v || *end || x <= 0 || x > 1 << 24) {
        fprintf(stderr, "dsinfer eplb: %s wants a positive integer, got '%s'\n", name, v);
        return -1;
    }
    *out = (int)x;
    return 0;
}

int dsi_cmd_eplb(int argc, char **argv) {
    const char *load_path = NULL, *out_path = NULL, *policy_s = "best";
    int R = 0, G = 0, N = 0, P = 0;
    for (int i = 1; i < argc; i++) {
        int missing = 0;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            eplb_usage(stdout);
            return 0;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--load", &missing))) {
            load_path = v;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--out", &missing))) {
            out_path = v;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--policy", &missing))) {
            policy_s = v;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--slots", &missing))) {
            if (parse_pos("--slots", v, &R)) return 2;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--groups", &missing))) {
            if (parse_pos("--groups", v, &G)) return 2;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--nodes", &missing))) {
            if (parse_pos("--nodes", v, &N)) return 2;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--gpus", &missing))) {
            if (parse_pos("--gpus", v, &P)) return 2;
        } else {
            fprintf(stderr, missing ? "dsinfer eplb: %s needs a value\n" : "dsinfer eplb: unknown option '%s'\n",
                    argv[i]);
            eplb_usage(stderr);
            return 2;
        }
    }
    if (!load_path || !R || !G || !N || !P) {
        fprintf(stderr, "dsinfer eplb: --load, --slots, --groups, --nodes and --gpus are required\n");
        eplb_usage(stderr);
        return 2;
    }
    dsi_eplb_policy policy;
    if (!strcmp(policy_s, "best")) policy = DSI_EPLB_BEST;
    else if (!strcmp(policy_s, "deepseek")) policy = DSI_EPLB_DEEPSEEK;
    else {
        fprintf(stderr, "dsinfer eplb: --policy must be deepseek or best, got '%s'\n", policy_s);
        return 2;
    }
    double *load = NULL, *mom = NULL;
    int L, E, rc = 1;
    dsi_eplb_placement pl = {0};
    FILE *f = NULL;
    if (dsi_eplb_load_read(load_path, &load, &L, &E) != DSI_OK) {
        fprintf(stderr, "dsinfer eplb: %s\n", dsi_last_error());
        goto done;
    }
    if (dsi_eplb_rebalance(load, L, E, R, G, N, P, policy, &pl) != DSI_OK ||
        !(mom = malloc(sizeof(double) * L)) || dsi_eplb_max_over_mean(&pl, load, mom) != DSI_OK) {
        fprintf(stderr, "dsinfer %s\n", mom || !pl.phy2log ? dsi_last_error() : "eplb: out of memory");
        goto done;
    }
    f = out_path ? fopen(out_path, "w") : stdout;
    if (!f) {
        perror(out_path);
        goto done;
    }
    if (dsi_eplb_placement_write(&pl, mom, f) != DSI_OK || (out_path && fclose(f) != 0)) {
        fprintf(stderr, "dsinfer eplb: %s\n", out_path ? out_path : "stdout: write failed");
        goto done;
    }
    rc = 0;
done:
    dsi_eplb_placement_free(&pl);
    free(load), free(mom);
    return rc;
}
