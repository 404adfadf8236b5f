/* dsinfer router: the public endpoint in front of prefill and decode instances. */
#include "cli/cli.h"
#include "dsinfer/router.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_URLS 64

static void usage(FILE *f) {
    fprintf(f,
            "usage: dsinfer router --prefill URL,... --decode URL,... [--host H] [--port P] [options]\n"
            "OpenAI-compatible endpoint (POST /v1/completions, /v1/chat/completions, GET /v1/models,\n"
            "/health, /metrics) in front of 'dsinfer serve --role prefill' and '--role decode' instances.\n"
            "Each request is prefilled on one instance (Prefill LB: balances core-attention work and\n"
            "input tokens, prefers the instance holding the prompt's prefix), its KV is shipped to a\n"
            "decode instance (Decode LB: balances KV tokens and request counts), which streams the answer.\n\n"
            "  --prefill URL,...            prefill instances (http://127.0.0.1:8001,...)\n"
            "  --decode URL,...             decode instances\n"
            "  --standby-prefill URL,...    running instances outside the pool, for the autoscaler\n"
            "  --standby-decode URL,...\n"
            "  --host H / --port P          listen address (default 127.0.0.1:8000; port 0 = any free)\n"
            "  --lb deepseek|round-robin    balancing policy (default deepseek)\n"
            "  --api-key KEY                require 'Authorization: Bearer KEY' on /v1/* and /admin/*,\n"
            "                               and send it to the instances (serve them with the same key)\n"
            "  --heartbeat S                seconds between load polls (default 0.2; 3 misses = dead)\n"
            "  --autoscale                  add standby instances under load, drain idle ones\n"
            "  --scale-up U / --scale-down U  utilisation thresholds (default 0.8 / 0.3)\n"
            "  --scale-hold S / --scale-cooldown S  (default 2 / 5)\n"
            "  --gpus-per-instance N        for the GPU-hour account on /metrics (default 8)\n"
            "  --pricing FILE               pricing file for the account (default $2/GPU-hour)\n"
            "  --econ-journal FILE          append account events (GPU count changes) as JSON lines\n\n"
            "Admin: POST /admin/instances {\"action\":\"join|leave|drain|undrain|standby\",\n"
            "\"role\":\"prefill|decode\",\"url\":\"http://host:port\"}; GET /admin/instances lists them.\n");
}

/* Splits a comma list into urls (pointers into a strdup'ed copy kept in *keep). */
static int split(const char *v, const char **urls, int *n, char **keep) {
    char *s = strdup(v);
    if (!s) return -1;
    *keep = s;
    for (char *tok = strtok(s, ","); tok; tok = strtok(NULL, ",")) {
        if (*n >= MAX_URLS) return -1;
        urls[(*n)++] = tok;
    }
    return 0;
}

int dsi_cmd_router(int argc, char **argv) {
    dsi_router_opts o = dsi_router_default_opts();
    const char *pf[MAX_URLS], *dc[MAX_URLS], *spf[MAX_URLS], *sdc[MAX_URLS];
    int npf = 0, ndc = 0, nspf = 0, nsdc = 0;
    char *keep[8] = {0};
    int nk = 0, too_many = 0, bad = 0; /* bad: a value is not a number (message printed) */
    for (int i = 1; i < argc && !too_many; i++) {
        int missing = 0;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { usage(stdout); return 0; }
        if ((v = dsi_cli_flag(argc, argv, &i, "--prefill", &missing)))
            too_many = nk >= 8 || split(v, pf, &npf, &keep[nk++]);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--decode", &missing)))
            too_many = nk >= 8 || split(v, dc, &ndc, &keep[nk++]);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--standby-prefill", &missing)))
            too_many = nk >= 8 || split(v, spf, &nspf, &keep[nk++]);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--standby-decode", &missing)))
            too_many = nk >= 8 || split(v, sdc, &nsdc, &keep[nk++]);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--host", &missing))) o.host = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--api-key", &missing))) o.api_key = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--port", &missing)))
            o.port = dsi_cli_int("router", "--port", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--lb", &missing))) {
            if (!strcmp(v, "deepseek")) o.lb = DSI_LB_DEEPSEEK;
            else if (!strcmp(v, "round-robin")) o.lb = DSI_LB_ROUND_ROBIN;
            else { fprintf(stderr, "dsinfer router: --lb must be deepseek or round-robin\n"); return 2; }
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--heartbeat", &missing)))
            o.heartbeat_s = dsi_cli_num("router", "--heartbeat", v, &bad);
        else if (!strcmp(argv[i], "--autoscale")) o.autoscale = 1;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--scale-up", &missing)))
            o.policy.up_util = dsi_cli_num("router", "--scale-up", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--scale-down", &missing)))
            o.policy.down_util = dsi_cli_num("router", "--scale-down", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--scale-hold", &missing)))
            o.policy.hold_s = dsi_cli_num("router", "--scale-hold", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--scale-cooldown", &missing)))
            o.policy.cooldown_s = dsi_cli_num("router", "--scale-cooldown", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--gpus-per-instance", &missing)))
            o.gpus_per_instance = dsi_cli_int("router", "--gpus-per-instance", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--pricing", &missing))) o.pricing_path = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--econ-journal", &missing))) o.journal_path = v;
        else { fprintf(stderr, "dsinfer router: unknown option '%s' (see --help)\n", argv[i]); return 2; }
        if (missing) { fprintf(stderr, "dsinfer router: %s needs a value\n", argv[i]); return 2; }
    }
    if (bad) return 2;
    if (too_many) {
        fprintf(stderr, "dsinfer router: too many instance URLs (at most %d per list)\n", MAX_URLS);
        return 2;
    }
    if (npf == 0 || ndc == 0) {
        fprintf(stderr, "dsinfer router: --prefill and --decode need at least one instance each (see --help)\n");
        return 2;
    }
    if (o.port < 0 || o.port > 65535 || o.heartbeat_s < 0 || o.gpus_per_instance < 0) {
        fprintf(stderr, "dsinfer router: numeric options must be non-negative (and the port below 65536)\n");
        return 2;
    }
    o.prefill = pf; o.n_prefill = npf;
    o.decode = dc; o.n_decode = ndc;
    o.standby_prefill = spf; o.n_standby_prefill = nspf;
    o.standby_decode = sdc; o.n_standby_decode = nsdc;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    dsi_router *r;
    int rc = dsi_router_start(&o, &r);
    if (rc != DSI_OK) {
        fprintf(stderr, "dsinfer router: %s\n", dsi_last_error());
        for (int k = 0; k < nk; k++) free(keep[k]);
        return 1;
    }
    fprintf(stderr, "dsinfer router: %d prefill + %d decode instances (%s LB) on http://%s:%d\n", npf, ndc,
            o.lb == DSI_LB_ROUND_ROBIN ? "round-robin" : "deepseek", o.host, dsi_router_port(r));
    int sig = 0;
    sigwait(&set, &sig);
    fprintf(stderr, "dsinfer router: stopping\n");
    dsi_router_stop(r);
    for (int k = 0; k < nk; k++) free(keep[k]);
    return 0;
}
