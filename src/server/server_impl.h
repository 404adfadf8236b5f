/* Server internals shared by server.c (HTTP, connections), openai.c (request
 * parsing, response text), metrics.c and sbuf.c. */
#ifndef DSI_SERVER_IMPL_H
#define DSI_SERVER_IMPL_H

#include "dsinfer/econ.h"
#include "dsinfer/engine.h"
#include "dsinfer/sched.h"
#include "dsinfer/server.h"
#include "dsinfer/tokenizer.h"

#include <pthread.h>
#include <stdatomic.h>

/* ---------------------------------------------------------------- sbuf.c */
/* A growable byte string. On allocation failure `oom` is set and further
 * writes are dropped (the caller answers 500 instead of crashing). */
typedef struct dsi_sbuf {
    char *p;
    size_t len, cap;
    int oom;
} dsi_sbuf;

void dsi__sbuf_put(dsi_sbuf *b, const char *s, size_t n);
void dsi__sbuf_puts(dsi_sbuf *b, const char *s);
void dsi__sbuf_printf(dsi_sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s[0..n) as a quoted JSON string; bytes that are not valid UTF-8
 * become \ufffd. */
void dsi__sbuf_json_str(dsi_sbuf *b, const char *s, size_t n);
/* Appends a float as JSON (non-finite values become -9999.0, as OpenAI does for -inf). */
void dsi__sbuf_json_num(dsi_sbuf *b, double v);
void dsi__sbuf_reset(dsi_sbuf *b);
void dsi__sbuf_free(dsi_sbuf *b);

/* ---------------------------------------------------------------- metrics.c */
#define DSI_HISTO_MAX_BUCKETS 24
typedef struct dsi_histo {
    const char *name, *help;
    int n_bounds;
    double bounds[DSI_HISTO_MAX_BUCKETS];
    uint64_t counts[DSI_HISTO_MAX_BUCKETS + 1];
    double sum;
    uint64_t count;
    pthread_mutex_t mu;
} dsi_histo;

void dsi__histo_init(dsi_histo *h, const char *name, const char *help, const double *bounds, int n);
void dsi__histo_observe(dsi_histo *h, double v);
void dsi__histo_write(dsi_histo *h, dsi_sbuf *out);

/* Outcomes of requests, a label of dsinfer_requests_total. */
enum {
    DSI_OUT_STOP = 0, DSI_OUT_LENGTH, DSI_OUT_CANCELLED, DSI_OUT_CLIENT_ERROR, DSI_OUT_REJECTED,
    DSI_OUT_SERVER_ERROR, DSI_OUT_COUNT
};

typedef struct dsi_server_metrics {
    atomic_ulong outcomes[DSI_OUT_COUNT];
    atomic_ulong prompt_tokens, completion_tokens, cache_hit_tokens;
    atomic_int in_flight;           /* HTTP requests submitted and not finished */
    dsi_histo ttft, itl, e2e;
    dsi_metrics_hook hooks[8];
    void *hook_ctx[8];
    int n_hooks;
    dsi_request_hook req_hooks[8];
    void *req_hook_ctx[8];
    int n_req_hooks;
} dsi_server_metrics;

void dsi__metrics_init(dsi_server_metrics *m);
void dsi__metrics_destroy(dsi_server_metrics *m);
void dsi__metrics_render(dsi_server_metrics *m, const dsi_sched_stats *st, const char *model, dsi_sbuf *out);

/* ---------------------------------------------------------------- openai.c */
#define DSI_MAX_STOP 4

typedef struct dsi_api_ctx {
    const dsi_tokenizer *tok;
    const char *model_name;
    int vocab;                 /* model vocabulary */
    int max_model_len;
    int default_max_tokens;
    int32_t eos_ids[DSI_MAX_EOS_IDS + 1]; /* config.json's, then the tokenizer's; no repeats */
    int n_eos;
} dsi_api_ctx;

typedef struct dsi_api_req {
    int chat;
    int stream, include_usage;
    int32_t *prompt;           /* malloc'ed */
    size_t n_prompt;
    int max_tokens;
    dsi_sampling sampling;
    char *stop[DSI_MAX_STOP];  /* malloc'ed */
    size_t stop_len[DSI_MAX_STOP];
    int n_stop;
    int logprobs, top_logprobs;
    int ignore_eos, return_token_ids;
    int include_price;         /* extension: usage carries the price applied and the charge */
    int reasoning;             /* chat: the prompt opened a <think> block */
} dsi_api_req;

/* Parses and validates a request body. On failure returns the HTTP status
 * (400, 404) and writes a message and the offending parameter (or NULL). */
int dsi__api_parse(const dsi_api_ctx *ctx, const char *body, size_t len, int chat, dsi_api_req *out, char *msg,
                   size_t msg_cap, const char **param);
void dsi__api_req_free(dsi_api_req *r);
/* {"error": {...}} */
void dsi__api_error_json(dsi_sbuf *b, int http_status, const char *msg, const char *param);
void dsi__api_models_json(dsi_sbuf *b, const char *model, int max_model_len, long created);


/* ---------------------------------------------------------------- server.c / stream.c */
struct MHD_Connection;
struct MHD_Daemon;

enum { DSI_CONN_NEW = 0, DSI_CONN_WAIT, DSI_CONN_STREAM, DSI_CONN_DONE };

/* One HTTP request. Held by up to three owners, counted in `refs`: the MHD
 * request (until its completed callback), the scheduler (until FINISH), and
 * a streaming response (until MHD frees it). The last one frees it. */
typedef struct dsi_conn {
    struct dsi_server *srv;
    struct MHD_Connection *mc;
    int fd;
    atomic_int refs;
    char *body;                /* upload */
    size_t body_len;
    int too_large;

    pthread_mutex_t mu;        /* guards the fields below, shared with the scheduler thread */
    int state, suspended, finished, cancel_sent, in_registry;
    dsi_sbuf out;              /* stream bytes not yet sent, or the final body */
    size_t out_pos;
    int final_status;
    uint64_t sched_id;

    /* the text pipeline: scheduler thread only */
    dsi_api_req rq;
    dsi_detok *detok;
    dsi_reasoning *rsn;
    dsi_sbuf held;             /* text held back: it could begin a stop string */
    dsi_sbuf text, rtext;      /* non-stream: content, reasoning; stream: this token's deltas */
    dsi_sbuf lp;               /* chat logprobs entries (JSON, comma-separated) */
    dsi_sbuf lp_tok, lp_val, lp_top, lp_off; /* completions: the legacy parallel arrays */
    dsi_sbuf ids;              /* generated ids (JSON, comma-separated) */
    size_t text_offset;
    int stopped_by_string, n_seen;
    double t_start, t_first, t_last;
    dsi_price_quote quote;     /* frozen at admission when billing is on */
    int has_quote;
    double charge_usd;         /* what the finished request was billed */
    char id[48];
    long created;
    uint64_t pd_xfer;          /* /internal/decode: the KV transfer this request waits for */
    int fail_status;           /* HTTP status of a failed FINISH when not 500 (set under mu before it) */
    struct dsi_conn *next, *prev; /* registry of submitted requests */
} dsi_conn;

struct dsi_server {
    dsi_server_opts o;
    dsi_pricing *pricing;      /* billing (billing.c); NULL when off */
    dsi_account *account;
    pthread_mutex_t pricing_mu;/* the pricing engine's band state */
    char pricing_model[DSI_PRICING_NAME_MAX];
    char model_name[256];
    dsi_model *model;
    dsi_kv_pool *kv;
    dsi_engine *engine;
    dsi_sched *sched;
    dsi_kvdisk *disk;          /* NULL without --kv-disk */
    dsi_ep *ep;                /* the EP group when launched by mpirun with several ranks, else NULL */
    int ep_released;           /* dsi_ep_idle already returned: the group has ended */
    dsi_tokenizer *tok;
    dsi_api_ctx api;
    struct MHD_Daemon *mhd;
    int port;
    atomic_int draining;
    atomic_int n_conns;        /* dsi_conn objects alive */
    atomic_ulong req_counter;
    uint64_t id_nonce;         /* random per instance: response ids stay unique across instances */
    dsi_server_metrics metrics;
    long created;
    pthread_mutex_t reg_mu;
    dsi_conn *reg_head;
    pthread_t watchdog;
    int watchdog_started;
    atomic_int watchdog_stop;
    struct dsi_pd_state *pd;   /* kv_transfer.c: hint set, KV listener, pending imports */
};

/* billing.c: pricing, the live account and GET /v1/pricing */
int dsi__billing_start(struct dsi_server *s);
void dsi__billing_stop(struct dsi_server *s);
/* Freezes the price in force for a request being admitted. */
void dsi__billing_quote(struct dsi_server *s, dsi_conn *c);
/* Bills a finished request; *usd gets the charge (0 when billing is off). */
void dsi__billing_bill(struct dsi_server *s, dsi_conn *c, int prompt, int cached, int completion, double *usd);
/* Body of GET /v1/pricing; the HTTP status. */
int dsi__billing_pricing_json(struct dsi_server *s, dsi_sbuf *b);

/* stream.c: the scheduler callback (tokens -> text -> SSE chunks / final body) */
int dsi__conn_on_event(void *user, const dsi_sched_event *ev);
/* Sets up the text pipeline for a parsed request; writes the first SSE chunk
 * for streaming chat. */
int dsi__conn_pipeline_init(dsi_conn *c);
void dsi__conn_pipeline_free(dsi_conn *c);
/* server.c */
void dsi__conn_unref(dsi_conn *c);
/* The registry of requests in flight, whose suspended connections the
 * watchdog polls for a client that hung up (then cancels c->sched_id). */
void dsi__conn_register(dsi_conn *c);
void dsi__conn_unregister(dsi_conn *c);
/* Wakes the connection after new output (call with c->mu held). */
void dsi__conn_wake(dsi_conn *c);

/* ---------------------------------------------------------------- kv_transfer.c, pd_endpoints.c */
/* Starts the hint set and (decode/both) the KV listener thread. */
int dsi__pd_start(dsi_server *s);
void dsi__pd_stop(dsi_server *s);
/* Frees what dsi__pd_start made (after the scheduler is gone: it may hold imported buffers). */
void dsi__pd_free(dsi_server *s);
/* How long a parked /internal/decode request waits for its KV before a 504
 * (60 s); tests lower it before dsi_server_start. */
extern double dsi__pd_park_timeout_s;
/* Drain: waits (up to timeout_s) until no decode request waits for its KV. */
void dsi__pd_wait_parked(dsi_server *s, double timeout_s);
int dsi__pd_kv_port(const dsi_server *s);
/* /internal/decode: parks a parsed request until its KV arrives (takes over
 * the scheduler's reference to c; FINISH comes as from the scheduler). */
int dsi__pd_await(dsi_conn *c, const dsi_request_params *p);
/* /internal/prefill after parsing: runs the prompt, streams its KV to
 * `decode` (host:port); answers when the decode side has it. */
int dsi__pd_prefill(dsi_conn *c, const char *decode, uint64_t xfer);
/* Chain hashes of the prompt's full blocks into out[n_prompt / 64]; returns the count. */
int dsi__pd_prompt_hashes(const dsi_server *s, const int32_t *prompt, int n_prompt, uint64_t *out);
/* Leading full blocks of `hashes` this instance probably holds (hint set). */
int dsi__pd_held_blocks(dsi_server *s, const uint64_t *hashes, int n);
/* Does the shared disk KV tier hold this block? (0 until the disk tier is wired.) */
int dsi__pd_disk_has(dsi_server *s, uint64_t hash);
/* GET/POST /internal/... (everything but /internal/decode); returns an MHD_Result. */
int dsi__pd_route(dsi_server *s, dsi_conn *c, const char *url, const char *method);

#endif
