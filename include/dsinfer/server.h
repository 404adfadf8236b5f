/* dsinfer/server.h - the OpenAI-compatible HTTP server (dsinfer serve).
 *
 * Starts in-process: loads the model (or builds the built-in demo), its
 * tokenizer, a KV pool, an engine and a scheduler, and listens with
 * libmicrohttpd. POST /v1/chat/completions, POST /v1/completions,
 * GET /v1/models, GET /health, GET /metrics.
 *
 *     dsi_server *srv;
 *     dsi_server_opts o = dsi_server_default_opts();   // demo model on 127.0.0.1:8000
 *     o.port = 0;                                      // any free port
 *     if (dsi_server_start(&o, &srv) != DSI_OK) die(dsi_last_error());
 *     printf("listening on %d\n", dsi_server_port(srv));
 *     ...
 *     dsi_server_stop(srv, 30.0);                      // drain up to 30 s, then free
 */
#ifndef DSINFER_SERVER_H
#define DSINFER_SERVER_H

#include "dsinfer/common.h"
#include "dsinfer/kvdisk.h"
#include "dsinfer/ep.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dsi_server_opts {
    const char *host;              /* listen address (IPv4 or IPv6 literal); default 127.0.0.1 */
    int port;                      /* 0: any free port (see dsi_server_port) */
    const char *model_dir;         /* NULL: the built-in demo model and tokenizer */
    const char *served_model_name; /* NULL: "dsinfer-demo" or the directory's basename */
    int max_model_len;             /* 0: min(model positions, KV pool capacity) */
    int kv_blocks;                 /* KV pool size in 64-token blocks; 0: from kv_cache_gb */
    double kv_cache_gb;            /* 0: 0.5 */
    int max_num_seqs;              /* running requests at once; 0: 64 */
    int max_num_batched_tokens;    /* tokens per step (chunked prefill budget); 0: 512 */
    int max_queue;                 /* waiting requests before 429; 0: 1024 */
    int threads;                   /* compute threads; 0: all cores */
    int batch_invariant;           /* deterministic: a request's tokens do not depend on its batch */
    dsi_moe_io moe_io;             /* one process: round expert I/O as EP dispatch would (--dispatch) */
    int http_threads;              /* libmicrohttpd threads; 0: 2 */
    const char *api_key;           /* NULL: no authentication */
    size_t max_body_bytes;         /* 0: 8 MiB */
    int default_max_tokens;        /* cap when max_tokens is absent; 0: 4096 */
    int no_prefix_cache;
    int role;                      /* DSI_ROLE_BOTH (a whole server), _PREFILL or _DECODE (behind dsinfer router) */
    int kv_port;                   /* decode/both: KV transfer listen port on `host`; 0: any free port */
    dsi_kvdisk_opts kv_disk;       /* .dir NULL: no disk KV tier */
    /* economics (include/dsinfer/econ.h): with a pricing file, every request
     * is billed at the price in force at its admission, /metrics carries
     * revenue and GPU cost, GET /v1/pricing answers */
    const char *pricing_path;      /* NULL: no billing */
    const char *pricing_model;     /* entry of the pricing file to bill at; NULL: the served name, else the first */
    const char *account_journal;   /* append-only JSON lines for `dsinfer report`; NULL: none */
    int account_gpus;              /* GPUs this instance accounts for; 0: the file's gpus_per_node */
    /* expert parallelism when started by mpirun with several ranks
     * (include/dsinfer/ep.h): rank 0 serves HTTP and runs the scheduler, its
     * steps run across the group; the other ranks call dsi_server_follow */
    const dsi_ep_opts *ep;         /* NULL: defaults */
} dsi_server_opts;

/* What an instance does behind `dsinfer router` (ARCHITECTURE: "Prefill/decode
 * disaggregation"). Every role still answers the /v1 API; prefill instances take
 * POST /internal/prefill, decode ones POST /internal/decode and KV over TCP. */
enum { DSI_ROLE_BOTH = 0, DSI_ROLE_PREFILL = 1, DSI_ROLE_DECODE = 2 };
/* "both", "prefill", "decode" -> DSI_ROLE_*, or -1. */
int dsi_server_role_parse(const char *s);

/* Extra lines for /metrics (econ counters, ...): write Prometheus text with
 * the given function; called on an HTTP thread while rendering /metrics. */
typedef void (*dsi_metrics_hook)(void *ctx, void (*write)(void *w, const char *text, size_t len), void *w);

/* Called once per finished generation request (on the scheduler thread; must
 * not block), e.g. to bill it: token counts as reported in its usage. */
typedef struct dsi_request_record {
    const char *model;
    int prompt_tokens, cached_tokens, completion_tokens;
    const char *outcome;   /* "stop", "length", "cancelled", "server_error" */
    double ttft_s, duration_s;
} dsi_request_record;
typedef void (*dsi_request_hook)(void *ctx, const dsi_request_record *r);

typedef struct dsi_server dsi_server;

dsi_server_opts dsi_server_default_opts(void);
int dsi_server_start(const dsi_server_opts *o, dsi_server **out);
/* The port actually bound. */
int dsi_server_port(const dsi_server *s);
/* The KV transfer port (decode/both roles), or 0. */
int dsi_server_kv_port(const dsi_server *s);
const char *dsi_server_model_name(const dsi_server *s);
/* Adds a /metrics hook (at most 8). Call before requests arrive. */
int dsi_server_add_metrics_hook(dsi_server *s, dsi_metrics_hook fn, void *ctx);
/* Adds a per-request hook (at most 8). Call before requests arrive. */
int dsi_server_add_request_hook(dsi_server *s, dsi_request_hook fn, void *ctx);
/* Stops accepting connections and new requests, lets in-flight requests
 * finish for up to drain_timeout_s (0: cancel them at once), then frees
 * everything. NULL is a no-op. */
void dsi_server_stop(dsi_server *s, double drain_timeout_s);

/* An EP group's rank other than 0: loads the same model and engine as
 * dsi_server_start would, joins the group and serves its share of the
 * experts for rank 0's steps until rank 0 stops. Blocks; DSI_OK when the
 * group ended normally. */
int dsi_server_follow(const dsi_server_opts *o);

#ifdef __cplusplus
}
#endif
#endif
