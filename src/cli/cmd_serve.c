/* dsinfer serve: the OpenAI-compatible server until SIGTERM/SIGINT, then drain. */
#include "cli/cli.h"
#include "dsinfer/server.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fprintf(f,
            "usage: dsinfer serve [--model DIR] [--host H] [--port P] [options]\n"
            "OpenAI-compatible HTTP server: POST /v1/chat/completions, POST /v1/completions,\n"
            "GET /v1/models, GET /health, GET /metrics. Without --model it serves the built-in\n"
            "demo model (\"dsinfer-demo\": tiny DeepSeek-V3 shape, random weights, golden tokenizer).\n\n"
            "  --model DIR                  checkpoint directory with tokenizer.json (default: demo)\n"
            "  --served-model-name NAME     model id in the API (default: the directory's name)\n"
            "  --host H                     listen address (default 127.0.0.1)\n"
            "  --port P                     listen port (default 8000; 0 = any free port)\n"
            "  --max-model-len N            context limit, prompt + completion (default: model / KV pool)\n"
            "  --kv-blocks N                KV pool size in 64-token blocks (overrides --kv-cache-gb)\n"
            "  --kv-cache-gb G              KV pool size in GiB (default 0.5)\n"
            "  --max-num-seqs N             running requests at once (default 64)\n"
            "  --max-num-batched-tokens N   tokens per step, the chunked-prefill budget (default 512)\n"
            "  --max-queue N                waiting requests before answering 429 (default 1024)\n"
            "  --max-tokens-default N       completion cap when a request gives none (default 4096)\n"
            "  --threads N                  compute threads (default: all cores)\n"
            "  --batch-invariant            deterministic: a request's tokens do not depend on what it is\n"
            "                               batched with (one matmul tile shape for all batch sizes; slower)\n"
            "  --http-threads N             HTTP event-loop threads (default 2)\n"
            "  --api-key KEY                require 'Authorization: Bearer KEY' on /v1/* and /internal/*\n"
            "  --no-prefix-cache            never share KV blocks between requests\n"
            "  --drain-timeout S            on SIGTERM, seconds to let requests finish (default 30)\n"
            "  --kv-disk DIR                persist full KV blocks under DIR and load them on prefix-cache misses\n"
            "                               (shared across restarts and by servers of the same model on DIR)\n"
            "  --kv-disk-gb G               size cap of DIR's block files, LRU eviction (default 16)\n"
            "  --kv-disk-ttl S              also evict blocks unused for S seconds (default: never)\n"
            "  --kv-disk-fsync MODE         none (default; checksums catch torn files), file, or dir\n"
            "  --kv-disk-io MODE            auto (default: io_uring, else threads), uring, or threads\n"
            "  --kv-disk-rescan S           seconds between directory rescans (default 30; 0 = default)\n"
            "economics (see docs/pricing.example.json):\n"
            "  --pricing FILE|deepseek      bill requests at the prices in force at admission ('deepseek':\n"
            "                               the built-in DeepSeek price list); revenue\n"
            "                               and GPU cost in /metrics; GET /v1/pricing\n"
            "  --pricing-model NAME         pricing entry to bill at (default: the served name, else the first)\n"
            "  --account-journal FILE       append bills and scale events (read by 'dsinfer report')\n"
            "  --account-gpus N             GPUs this instance costs (default: the file's gpus_per_node)\n"
            "expert parallelism (under mpirun -np N: rank 0 serves HTTP, every rank serves experts):\n"
            "  --dispatch fp8|bf16|f32      dispatch format (default fp8); without mpirun, round expert\n"
            "                               inputs/outputs the same way (default: exact)\n"
            "  --placement FILE             EPLB placement file (default: expert e in slot e)\n"
            "  --no-overlap                 one micro-batch per step\n"
            "  --ep-timeout-ms N            a rank silent this long fails the group (default 30000)\n"
            "  --eplb-every N               online EPLB every N steps\n"
            "  --role both|prefill|decode   behind 'dsinfer router': prefill computes prompts' KV and first\n"
            "                               tokens and ships the KV to decode instances (default both)\n"
            "  --kv-port P                  decode/both: KV transfer listen port (default 0 = any free)\n");
}

int dsi_cmd_serve(int argc, char **argv) {
    dsi_server_opts o = dsi_server_default_opts();
    dsi_ep_opts ep = {0};
    o.ep = &ep;
    double drain = 30, disk_gb = 16;
    int bad = 0; /* a flag's value is not a number (message printed) */
    for (int i = 1; i < argc; i++) {
        int missing = 0;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { usage(stdout); return 0; }
        if ((v = dsi_cli_flag(argc, argv, &i, "--model", &missing))) o.model_dir = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--served-model-name", &missing))) o.served_model_name = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--host", &missing))) o.host = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--port", &missing)))
            o.port = dsi_cli_int("serve", "--port", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--max-model-len", &missing)))
            o.max_model_len = dsi_cli_int("serve", "--max-model-len", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--kv-blocks", &missing)))
            o.kv_blocks = dsi_cli_int("serve", "--kv-blocks", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--kv-cache-gb", &missing)))
            o.kv_cache_gb = dsi_cli_num("serve", "--kv-cache-gb", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--max-num-seqs", &missing)))
            o.max_num_seqs = dsi_cli_int("serve", "--max-num-seqs", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--max-num-batched-tokens", &missing)))
            o.max_num_batched_tokens = dsi_cli_int("serve", "--max-num-batched-tokens", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--max-queue", &missing)))
            o.max_queue = dsi_cli_int("serve", "--max-queue", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--max-tokens-default", &missing)))
            o.default_max_tokens = dsi_cli_int("serve", "--max-tokens-default", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--threads", &missing)))
            o.threads = dsi_cli_int("serve", "--threads", v, &bad);
        else if (!strcmp(argv[i], "--batch-invariant")) o.batch_invariant = 1;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--http-threads", &missing)))
            o.http_threads = dsi_cli_int("serve", "--http-threads", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--api-key", &missing))) o.api_key = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--drain-timeout", &missing)))
            drain = dsi_cli_num("serve", "--drain-timeout", v, &bad);
        else if (!strcmp(argv[i], "--no-prefix-cache")) o.no_prefix_cache = 1;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--kv-disk", &missing))) o.kv_disk.dir = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--kv-disk-gb", &missing)))
            disk_gb = dsi_cli_num("serve", "--kv-disk-gb", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--kv-disk-ttl", &missing)))
            o.kv_disk.ttl_s = dsi_cli_num("serve", "--kv-disk-ttl", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--kv-disk-rescan", &missing)))
            o.kv_disk.rescan_s = dsi_cli_num("serve", "--kv-disk-rescan", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--kv-disk-fsync", &missing))) {
            o.kv_disk.fsync = !strcmp(v, "none") ? 0 : !strcmp(v, "file") ? 1 : !strcmp(v, "dir") ? 2 : -1;
            if (o.kv_disk.fsync < 0) { fprintf(stderr, "dsinfer serve: --kv-disk-fsync takes none, file or dir\n"); return 2; }
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--kv-disk-io", &missing))) {
            o.kv_disk.io = !strcmp(v, "auto") ? 0 : !strcmp(v, "uring") ? 1 : !strcmp(v, "threads") ? 2 : -1;
            if (o.kv_disk.io < 0) { fprintf(stderr, "dsinfer serve: --kv-disk-io takes auto, uring or threads\n"); return 2; }
        }
        else if ((v = dsi_cli_flag(argc, argv, &i, "--pricing", &missing))) o.pricing_path = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--pricing-model", &missing))) o.pricing_model = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--account-journal", &missing))) o.account_journal = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--account-gpus", &missing)))
            o.account_gpus = dsi_cli_int("serve", "--account-gpus", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--dispatch", &missing))) {
            if (!strcmp(v, "fp8")) ep.dispatch = DSI_EP_FP8;
            else if (!strcmp(v, "bf16")) ep.dispatch = DSI_EP_BF16;
            else if (!strcmp(v, "f32")) ep.dispatch = DSI_EP_F32;
            else { fprintf(stderr, "dsinfer serve: --dispatch must be fp8, bf16 or f32\n"); return 2; }
            o.moe_io = dsi_ep_moe_io(ep.dispatch); /* one process rounds expert I/O the same way */
        }
        else if ((v = dsi_cli_flag(argc, argv, &i, "--placement", &missing))) ep.placement = v;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--ep-timeout-ms", &missing)))
            ep.timeout_ms = dsi_cli_int("serve", "--ep-timeout-ms", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--eplb-every", &missing)))
            ep.eplb_every = dsi_cli_int("serve", "--eplb-every", v, &bad);
        else if (!strcmp(argv[i], "--no-overlap")) ep.no_overlap = 1;
        else if ((v = dsi_cli_flag(argc, argv, &i, "--kv-port", &missing)))
            o.kv_port = dsi_cli_int("serve", "--kv-port", v, &bad);
        else if ((v = dsi_cli_flag(argc, argv, &i, "--role", &missing))) {
            if ((o.role = dsi_server_role_parse(v)) < 0) {
                fprintf(stderr, "dsinfer serve: --role must be both, prefill or decode\n");
                return 2;
            }
        }
        else if (!missing) { fprintf(stderr, "dsinfer serve: unknown option '%s' (see --help)\n", argv[i]); return 2; }
        if (missing) { fprintf(stderr, "dsinfer serve: %s needs a value\n", argv[i]); return 2; }
    }
    if (bad) return 2;
    if (o.port < 0 || o.port > 65535 || o.max_model_len < 0 || o.kv_blocks < 0 || o.kv_cache_gb < 0 ||
        o.max_num_seqs < 0 || o.max_num_batched_tokens < 0 || o.max_queue < 0 || o.threads < 0 || o.http_threads < 0 || drain < 0 || o.kv_port < 0 || o.kv_port > 65535) {
        fprintf(stderr, "dsinfer serve: numeric options must be non-negative (and the port below 65536)\n");
        return 2;
    }
    if (!(disk_gb > 0 && disk_gb < 1e9) || o.kv_disk.ttl_s < 0 || o.kv_disk.rescan_s < 0 || o.kv_disk.rescan_s > 1e9) {
        fprintf(stderr, "dsinfer serve: --kv-disk-gb must be positive, --kv-disk-ttl and --kv-disk-rescan non-negative "
                        "(--kv-disk-rescan at most 1e9 s)\n");
        return 2;
    }
    o.kv_disk.capacity_bytes = (uint64_t)(disk_gb * (1u << 30));
    if (!o.kv_disk.capacity_bytes) o.kv_disk.capacity_bytes = 1; /* 0 would be the 16 GiB default */
    /* Block the stop signals in every thread; this one waits for them. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (dsi_ep_launched()) {
        /* an EP group: ranks other than 0 serve experts until rank 0 stops
         * (the stop signals mpirun forwards to them stay blocked) */
        if (dsi_ep_init() != DSI_OK) { fprintf(stderr, "dsinfer serve: %s\n", dsi_last_error()); return 1; }
        if (dsi_ep_rank() != 0) {
            if (dsi_server_follow(&o) != DSI_OK) {
                fprintf(stderr, "dsinfer serve: rank %d: %s\n", dsi_ep_rank(), dsi_last_error());
                dsi_ep_abort(1);
            }
            return 0;
        }
    }
    dsi_server *srv;
    if (dsi_server_start(&o, &srv) != DSI_OK) {
        fprintf(stderr, "dsinfer serve: %s\n", dsi_last_error());
        return 1;
    }
    fprintf(stderr, "dsinfer serve: model %s on http://%s:%d (Ctrl-C or SIGTERM drains and stops)\n",
            dsi_server_model_name(srv), o.host, dsi_server_port(srv));
    if (dsi_server_kv_port(srv)) fprintf(stderr, "dsinfer serve: KV transfers on port %d\n", dsi_server_kv_port(srv));
    int sig = 0;
    sigwait(&set, &sig);
    fprintf(stderr, "dsinfer serve: %s: draining in-flight requests (up to %.0f s)\n",
            sig == SIGTERM ? "SIGTERM" : "SIGINT", drain);
    dsi_server_stop(srv, drain);
    fprintf(stderr, "dsinfer serve: stopped\n");
    return 0;
}
