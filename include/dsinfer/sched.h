/* dsinfer/sched.h - the scheduler: continuous batching over one engine.
 *
 * Requests (token ids in, token ids out) join a waiting queue; every step the
 * scheduler admits what the KV pool can hold, gives each running decode one
 * token, fills the rest of the step's token budget with prefill chunks, runs
 * one engine step, samples, and reports tokens through each request's
 * callback. Sequences join and leave at every step. It knows nothing of HTTP
 * or text.
 *
 *     dsi_sched *s;
 *     dsi_sched_create(engine, &(dsi_sched_opts){.max_num_seqs = 64}, &s);
 *     dsi_sched_start(s);                       // or call dsi_sched_step() yourself
 *     uint64_t id;
 *     dsi_sched_submit(s, &params, on_event, ctx, &id);   // any thread
 *     ...                                       // on_event runs on the scheduler thread
 *     dsi_sched_stop(s, 1);                     // drain, then join
 *     dsi_sched_destroy(s);
 *
 * Threads: submit, cancel, stats and stop may be called from any thread. The
 * engine, its KV pool and the prefix cache are touched only by the thread that
 * runs steps (the scheduler's own after dsi_sched_start, else the caller of
 * dsi_sched_step). Callbacks run on that thread and must not block.
 *
 * KV policy: a request is admitted (first come, first served) when blocks for
 * all its known tokens are available (free or evictable cached blocks, after
 * a prefix-cache match); decode then takes one block per 64 tokens. When a
 * decode finds no block, the most recently admitted other request is
 * preempted: its blocks are released (its full blocks stay in the prefix
 * cache) and it goes back to the front of the queue to be recomputed, without
 * repeating tokens it already reported.
 *
 * Disk tier (opts.disk): after the memory match, admission probes the disk
 * for the chain's next blocks, takes blocks for the whole request as usual,
 * and queues loads of the ones found; the request then waits in a loading
 * list (its blocks are not touched by steps) while other sequences run.
 * Completions are collected at the start of each step; the loaded run of
 * blocks up to the first failed one is published and counted as cached, the
 * rest is computed. Each block published to the prefix cache is also queued
 * for writing (the block is retained until written); a partial last block is
 * never written (its hash needs all 64 tokens). */
#ifndef DSINFER_SCHED_H
#define DSINFER_SCHED_H

#include "dsinfer/engine.h"
#include "dsinfer/kvdisk.h"
#include "dsinfer/prefix_cache.h"
#include "dsinfer/sampler.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DSI_SCHED_MAX_TOP_LOGPROBS 20
#define DSI_SCHED_MAX_STOP_IDS 8

typedef struct dsi_sched_opts {
    int max_num_seqs;        /* running requests at once; 0 = 64 */
    int max_batched_tokens;  /* tokens per step (chunked prefill budget); 0 = engine max */
    int max_queue;           /* waiting requests before submit says DSI_EBUSY; 0 = 1024 */
    int max_model_len;       /* prompt + completion limit; 0 = min(model positions, pool capacity) */
    int no_prefix_cache;     /* 1: never share blocks */
    dsi_kvdisk *disk;        /* borrowed, outlives the scheduler; NULL: no disk tier. Full blocks are
                                written to it when published; admission continues the prefix-cache
                                match on disk and loads those blocks asynchronously */
    /* Runs each step instead of dsi_engine_step (an EP group's dsi_ep_step);
     * NULL = the engine. With heartbeat_s > 0 the scheduler thread also calls
     * it with an empty batch when idle that often (the group's liveness). */
    int (*step_fn)(void *ctx, const dsi_seq_step *seqs, int n_seqs);
    void *step_ctx;
    double heartbeat_s;
} dsi_sched_opts;

/* KV computed elsewhere (a prefill instance, see ARCHITECTURE "Prefill/decode
 * disaggregation"): the prompt's blocks and the first token sampled there. */
typedef struct dsi_kv_import {
    void *data;              /* [n_blocks][dsi_kv_block_bytes]: blocks first_block.. of the prompt, the
                                last one possibly partial; owned by the scheduler once submit
                                succeeds: it calls release(release_ctx, data), or free() when
                                release is NULL, as soon as the blocks are in the pool */
    void (*release)(void *release_ctx, void *data);
    void *release_ctx;
    int first_block;         /* blocks before it are expected in the prefix cache (else recomputed) */
    int n_blocks;            /* first_block + n_blocks == ceil(n_prompt / block_tokens) */
    int32_t first_token;     /* sampled at the end of the prompt by the prefill side */
    float first_logprob;     /* its log-probability (reported when params.logprobs) */
    uint64_t sampler_rng;    /* the prefill side's sampler state after that pick */
    int cached_tokens;       /* prompt tokens the prefill side had cached (reported in usage) */
    int n_top;               /* the first token's top alternatives (params.top_logprobs of them) */
    int32_t top_ids[DSI_SCHED_MAX_TOP_LOGPROBS];
    float top_logprobs[DSI_SCHED_MAX_TOP_LOGPROBS];
} dsi_kv_import;

typedef struct dsi_request_params {
    const int32_t *prompt;   /* [n_prompt], copied */
    int n_prompt;
    int max_tokens;          /* > 0 */
    dsi_sampling sampling;
    int32_t stop_ids[DSI_SCHED_MAX_STOP_IDS]; /* generation ends on these (eos); not reported */
    int n_stop_ids;
    int logprobs;            /* 1: report the chosen token's log-probability */
    int top_logprobs;        /* 0..DSI_SCHED_MAX_TOP_LOGPROBS alternatives per token */
    int kv_export;           /* 1: report the prompt's KV blocks as they fill (DSI_SCHED_KV events) */
    const dsi_kv_import *kv_import; /* non-NULL: start decoding from imported KV (copied; see above) */
} dsi_request_params;

typedef enum dsi_finish_reason {
    DSI_FINISH_STOP = 0,     /* a stop id, or the callback asked to stop (stop string) */
    DSI_FINISH_LENGTH,       /* max_tokens reached */
    DSI_FINISH_CANCELLED,    /* dsi_sched_cancel or shutdown */
    DSI_FINISH_ERROR,        /* the engine failed; see status/message */
} dsi_finish_reason;

/* DSI_SCHED_KV comes only to requests with kv_export: after each step that
 * computed some of the prompt, before that step's TOKEN. */
typedef enum { DSI_SCHED_TOKEN = 0, DSI_SCHED_FINISH, DSI_SCHED_KV } dsi_sched_event_type;

typedef struct dsi_sched_event {
    dsi_sched_event_type type;
    uint64_t id;
    /* TOKEN */
    int32_t token;
    float logprob;              /* when params.logprobs */
    int n_top;                  /* top alternatives, best first (borrowed) */
    const int32_t *top_ids;
    const float *top_logprobs;
    uint64_t sampler_rng;       /* the request's sampler state after this pick */
    /* KV: the prompt's first kv_n_blocks blocks are final (the last one is
     * partial once kv_tokens == prompt_tokens); ids in the engine's pool,
     * borrowed for the callback's duration: copy the data there */
    const int32_t *kv_blocks;
    int kv_n_blocks, kv_tokens;
    /* FINISH (also filled, so far, on TOKEN) */
    dsi_finish_reason finish;
    int status;                 /* DSI_OK or the error for DSI_FINISH_ERROR */
    const char *message;        /* error text (borrowed) or NULL */
    int prompt_tokens;
    int cached_tokens;          /* prompt tokens served from the prefix cache at first admission */
    int completion_tokens;      /* generated so far, a final stop id included */
} dsi_sched_event;

/* TOKEN: return nonzero to finish the request now with DSI_FINISH_STOP.
 * FINISH: the last call for this request; the return value is ignored and the
 * scheduler never touches `user` again. */
typedef int (*dsi_sched_callback)(void *user, const dsi_sched_event *ev);

typedef struct dsi_sched_stats {
    int n_waiting, n_running;
    int n_loading;               /* admitted, waiting for their disk blocks */
    int kv_blocks_total, kv_blocks_free, kv_blocks_cached, kv_blocks_idle_cached;
    int kv_blocks_used;          /* total - free - idle cached: held by sequences */
    int max_model_len;
    uint64_t steps, preemptions;
    uint64_t prompt_tokens, cached_tokens, computed_tokens, generated_tokens;
    uint64_t disk_cached_tokens;  /* the part of cached_tokens loaded from the disk tier */
    uint64_t finished[4];        /* by dsi_finish_reason */
} dsi_sched_stats;

typedef struct dsi_sched dsi_sched;

/* `e` is borrowed (with its model and pool) and must outlive the scheduler. */
int dsi_sched_create(dsi_engine *e, const dsi_sched_opts *opts, dsi_sched **out);
/* Stops the thread if running (cancelling what remains) and frees everything. */
void dsi_sched_destroy(dsi_sched *s);

/* Queues a request. Fails with DSI_EINVAL (empty prompt, ids out of the
 * vocabulary, max_tokens <= 0, prompt + max_tokens beyond max_model_len),
 * DSI_EBUSY (queue full: retry later) or DSI_ECANCELED (stopping). On success
 * the callback will be called with FINISH exactly once. */
int dsi_sched_submit(dsi_sched *s, const dsi_request_params *p, dsi_sched_callback cb, void *user, uint64_t *id);
/* Asks to cancel a request; its blocks are freed at the next step boundary and
 * it finishes with DSI_FINISH_CANCELLED. Unknown or finished ids are ignored. */
void dsi_sched_cancel(dsi_sched *s, uint64_t id);

/* Runs one step on the calling thread (when no scheduler thread runs).
 * Returns the number of requests still waiting or running, or a negative
 * status when the engine failed (the step's requests are then finished with
 * DSI_FINISH_ERROR). */
int dsi_sched_step(dsi_sched *s);

/* Starts the scheduler thread (steps while there is work, sleeps otherwise). */
int dsi_sched_start(dsi_sched *s);
/* Refuses new submissions; with drain, waits up to timeout_s for every request
 * to finish, then cancels the rest; joins the thread. */
void dsi_sched_stop(dsi_sched *s, int drain, double timeout_s);

void dsi_sched_get_stats(dsi_sched *s, dsi_sched_stats *out);
int dsi_sched_max_model_len(const dsi_sched *s);

#ifdef __cplusplus
}
#endif
#endif
