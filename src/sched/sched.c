/* The scheduler: request state, admission, step building, sampling, the loop thread. */
#include "dsinfer/sched.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct req {
    uint64_t id;
    dsi_request_params p;      /* p.prompt is not kept: see tokens */
    int32_t *tokens;           /* [n_prompt + max_tokens]: prompt, then generated */
    int n_tokens, n_prompt, n_gen;
    int n_computed;            /* leading tokens whose KV is in the pool */
    int32_t *blocks;           /* block table [max_blocks] */
    uint64_t *hashes;          /* chain hash of each published full block */
    int n_blocks, n_hashed;
    int cached_tokens, admitted;
    int n_loads, load_from, load_fail, cancelled; /* disk loads in flight; blocks [load_from, load_fail) loaded */
    dsi_sampler smp;
    int kv_export;
    int has_import;            /* imported KV waits to be copied in at admission */
    dsi_kv_import imp;         /* imp.data owned here until copied */
    int32_t forced_first;      /* >= 0: the first token is this (imported), not sampled */
    dsi_sched_callback cb;
    void *user;
    struct req *next;          /* inbox / waiting list link */
} req;

typedef struct cancel_node { uint64_t id; struct cancel_node *next; } cancel_node;

struct dsi_sched {
    dsi_engine *e;
    dsi_kv_pool *kv;
    dsi_prefix_cache *pc;
    dsi_sched_opts o;
    int vocab, bt, max_model_len;

    /* shared with other threads, under mu */
    pthread_mutex_t mu;
    pthread_cond_t wake, idle;
    req *inbox_head, *inbox_tail;
    int n_inbox;
    cancel_node *cancels;
    uint64_t next_id;
    int accepting, stop_now, n_active, thread_running;
    int shared_waiting;        /* waiting list length at the last step (inbox excluded) */
    dsi_sched_stats stats;
    pthread_t thread;

    /* scheduler-thread state */
    req *wait_head, *wait_tail;
    int n_waiting;
    req **running;             /* [max_num_seqs], admission order */
    int n_running;
    req **loading;             /* [max_num_seqs]: admitted, disk loads in flight */
    int n_loading, n_saving;   /* n_saving: blocks retained for a disk write */
    uint64_t fingerprint;
    dsi_seq_step *batch;       /* [max_num_seqs] */
    req **batch_req;
    int *batch_chunk;
    float *logits;             /* [max_num_seqs][vocab] */
    void *sample_scratch;
    uint64_t steps, preemptions, prompt_tokens, cached_total, computed_tokens, generated_tokens, finished[4];
    uint64_t disk_cached_total;
};

/* ------------------------------------------------------------ lifecycle */

int dsi_sched_create(dsi_engine *e, const dsi_sched_opts *opts, dsi_sched **out) {
    *out = NULL;
    dsi_sched *s = calloc(1, sizeof *s);
    if (!s) return dsi_error(DSI_ENOMEM, "out of memory");
    if (opts) s->o = *opts;
    s->e = e;
    s->kv = dsi_engine_kv(e);
    const dsi_config *c = dsi_model_config(dsi_engine_model(e));
    s->vocab = c->vocab_size;
    s->bt = dsi_kv_block_tokens(s->kv);
    if (s->o.max_num_seqs <= 0) s->o.max_num_seqs = 64;
    int emax = dsi_engine_max_tokens(e);
    if (s->o.max_batched_tokens <= 0 || s->o.max_batched_tokens > emax) s->o.max_batched_tokens = emax;
    if (s->o.max_num_seqs > s->o.max_batched_tokens) s->o.max_num_seqs = s->o.max_batched_tokens;
    if (s->o.max_queue <= 0) s->o.max_queue = 1024;
    int cap = dsi_kv_n_blocks(s->kv) * s->bt;
    s->max_model_len = DSI_MIN(cap, c->max_position_embeddings);
    if (s->o.max_model_len > 0) s->max_model_len = DSI_MIN(s->max_model_len, s->o.max_model_len);
    s->fingerprint = dsi_model_fingerprint(dsi_engine_model(e));
    int rc = dsi_prefix_cache_create(s->kv, s->fingerprint, &s->pc);
    if (rc) { free(s); return rc; }
    int n = s->o.max_num_seqs;
    s->running = calloc(n, sizeof(req *));
    s->loading = calloc(n, sizeof(req *));
    s->batch = calloc(n, sizeof(dsi_seq_step));
    s->batch_req = calloc(n, sizeof(req *));
    s->batch_chunk = calloc(n, sizeof(int));
    s->logits = malloc(sizeof(float) * (size_t)n * s->vocab);
    s->sample_scratch = malloc(dsi_sampler_scratch_bytes(s->vocab));
    if (!s->running || !s->loading || !s->batch || !s->batch_req || !s->batch_chunk || !s->logits || !s->sample_scratch) {
        dsi_sched_destroy(s);
        return dsi_error(DSI_ENOMEM, "scheduler: out of memory");
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->wake, NULL);
    pthread_cond_init(&s->idle, NULL);
    s->accepting = 1;
    s->next_id = 1;
    s->stats.kv_blocks_total = dsi_kv_n_blocks(s->kv);
    s->stats.kv_blocks_free = dsi_kv_n_free(s->kv);
    s->stats.max_model_len = s->max_model_len;
    *out = s;
    return DSI_OK;
}

/* Gives the imported KV buffer back to its owner. */
static void drop_import(req *r) {
    if (r->imp.data) {
        if (r->imp.release) r->imp.release(r->imp.release_ctx, r->imp.data);
        else free(r->imp.data);
    }
    r->imp.data = NULL;
}

static void req_free(req *r) {
    if (!r) return;
    free(r->tokens);
    free(r->blocks);
    free(r->hashes);
    drop_import(r);
    free(r);
}

static void release_blocks(dsi_sched *s, req *r) {
    for (int i = 0; i < r->n_blocks; i++) dsi_prefix_cache_release(s->pc, r->blocks[i]);
    r->n_blocks = r->n_hashed = r->n_computed = 0;
}

static void fill_event(const req *r, dsi_sched_event *ev) {
    ev->id = r->id;
    ev->prompt_tokens = r->n_prompt;
    ev->cached_tokens = r->cached_tokens;
    ev->completion_tokens = r->n_gen;
}

/* Ends a request that is in no list any more: frees its blocks, reports. */
static void finish(dsi_sched *s, req *r, dsi_finish_reason why, int status, const char *msg) {
    release_blocks(s, r);
    dsi_sched_event ev = {.type = DSI_SCHED_FINISH, .finish = why, .status = status, .message = msg};
    fill_event(r, &ev);
    s->finished[why]++;
    r->cb(r->user, &ev);
    req_free(r);
}

static void remove_running(dsi_sched *s, int i) {
    memmove(&s->running[i], &s->running[i + 1], sizeof(req *) * (s->n_running - i - 1));
    s->n_running--;
}

static void publish_stats(dsi_sched *s) {
    dsi_prefix_cache_stats pcs;
    dsi_prefix_cache_get_stats(s->pc, &pcs);
    pthread_mutex_lock(&s->mu);
    dsi_sched_stats *t = &s->stats;
    t->n_waiting = s->n_waiting + s->n_inbox;
    s->shared_waiting = s->n_waiting;
    t->n_running = s->n_running;
    t->n_loading = s->n_loading;
    t->disk_cached_tokens = s->disk_cached_total;
    t->kv_blocks_free = dsi_kv_n_free(s->kv);
    t->kv_blocks_cached = pcs.n_cached;
    t->kv_blocks_idle_cached = pcs.n_idle;
    t->kv_blocks_used = t->kv_blocks_total - t->kv_blocks_free - pcs.n_idle;
    t->steps = s->steps;
    t->preemptions = s->preemptions;
    t->prompt_tokens = s->prompt_tokens;
    t->cached_tokens = s->cached_total;
    t->computed_tokens = s->computed_tokens;
    t->generated_tokens = s->generated_tokens;
    memcpy(t->finished, s->finished, sizeof t->finished);
    s->n_active = s->n_waiting + s->n_running + s->n_loading + s->n_saving; /* drain waits for disk writes */
    if (s->n_active == 0 && s->n_inbox == 0) pthread_cond_broadcast(&s->idle);
    pthread_mutex_unlock(&s->mu);
}

static void disk_drain(dsi_sched *s);

/* Cancels everything (inbox, waiting, running): used at shutdown. */
static void cancel_all(dsi_sched *s) {
    disk_drain(s); /* loads land in running (then cancelled); written blocks are released */
    pthread_mutex_lock(&s->mu);
    req *in = s->inbox_head;
    s->inbox_head = s->inbox_tail = NULL;
    s->n_inbox = 0;
    pthread_mutex_unlock(&s->mu);
    while (s->n_running > 0) {
        req *r = s->running[--s->n_running];
        finish(s, r, DSI_FINISH_CANCELLED, DSI_ECANCELED, "server shutting down");
    }
    for (req *lists[2] = {s->wait_head, in}, **l = lists; l < lists + 2; l++)
        for (req *r = *l, *nx; r; r = nx) {
            nx = r->next;
            finish(s, r, DSI_FINISH_CANCELLED, DSI_ECANCELED, "server shutting down");
        }
    s->wait_head = s->wait_tail = NULL;
    s->n_waiting = 0;
    publish_stats(s);
}

void dsi_sched_destroy(dsi_sched *s) {
    if (!s) return;
    if (s->running) { /* fully constructed */
        dsi_sched_stop(s, 0, 0);
        cancel_all(s);
        for (cancel_node *c = s->cancels, *nx; c; c = nx) { nx = c->next; free(c); }
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->wake);
        pthread_cond_destroy(&s->idle);
    }
    dsi_prefix_cache_destroy(s->pc);
    free(s->running);
    free(s->loading);
    free(s->batch);
    free(s->batch_req);
    free(s->batch_chunk);
    free(s->logits);
    free(s->sample_scratch);
    free(s);
}

int dsi_sched_max_model_len(const dsi_sched *s) { return s->max_model_len; }

/* ------------------------------------------------------------ other threads */

int dsi_sched_submit(dsi_sched *s, const dsi_request_params *p, dsi_sched_callback cb, void *user, uint64_t *id) {
    if (!p || !cb || !p->prompt || p->n_prompt <= 0) return dsi_error(DSI_EINVAL, "the prompt is empty");
    if (p->max_tokens <= 0) return dsi_error(DSI_EINVAL, "max_tokens must be at least 1");
    if ((int64_t)p->n_prompt + p->max_tokens > s->max_model_len)
        return dsi_error(DSI_EINVAL,
                         "this model's maximum context length is %d tokens; the request has %d prompt tokens and "
                         "asks for %d completion tokens",
                         s->max_model_len, p->n_prompt, p->max_tokens);
    for (int i = 0; i < p->n_prompt; i++)
        if (p->prompt[i] < 0 || p->prompt[i] >= s->vocab)
            return dsi_error(DSI_EINVAL, "prompt token id %d is outside the vocabulary [0, %d)", p->prompt[i], s->vocab);
    if (p->top_logprobs < 0 || p->top_logprobs > DSI_SCHED_MAX_TOP_LOGPROBS)
        return dsi_error(DSI_EINVAL, "top_logprobs must be between 0 and %d", DSI_SCHED_MAX_TOP_LOGPROBS);
    if (p->n_stop_ids < 0 || p->n_stop_ids > DSI_SCHED_MAX_STOP_IDS) return dsi_error(DSI_EINVAL, "too many stop ids");
    const dsi_kv_import *im = p->kv_import;
    if (im && (im->first_block < 0 || im->n_blocks < 0 || im->first_token < 0 || im->first_token >= s->vocab ||
               im->first_block + im->n_blocks != DSI_CEIL_DIV(p->n_prompt, s->bt) || (im->n_blocks > 0 && !im->data)))
        return dsi_error(DSI_EINVAL, "kv import: blocks %d+%d do not cover a %d-token prompt, or bad first token",
                         im->first_block, im->n_blocks, p->n_prompt);
    req *r = calloc(1, sizeof *r);
    int cap = p->n_prompt + p->max_tokens, nb = DSI_CEIL_DIV(cap, s->bt);
    if (r) {
        r->tokens = malloc(sizeof(int32_t) * cap);
        r->blocks = malloc(sizeof(int32_t) * nb);
        r->hashes = malloc(sizeof(uint64_t) * nb);
    }
    if (!r || !r->tokens || !r->blocks || !r->hashes) { req_free(r); return dsi_error(DSI_ENOMEM, "out of memory"); }
    r->p = *p;
    r->p.prompt = NULL;
    memcpy(r->tokens, p->prompt, sizeof(int32_t) * p->n_prompt);
    r->n_tokens = r->n_prompt = p->n_prompt;
    dsi_sampler_init(&r->smp, &p->sampling);
    r->kv_export = p->kv_export;
    r->forced_first = -1;
    r->cb = cb;
    r->user = user;
    pthread_mutex_lock(&s->mu);
    int rc = DSI_OK;
    if (!s->accepting) rc = dsi_error(DSI_ECANCELED, "the server is shutting down");
    else if (s->n_inbox + s->shared_waiting >= s->o.max_queue)
        rc = dsi_error(DSI_EBUSY, "the queue is full (%d waiting requests)", s->o.max_queue);
    if (rc == DSI_OK) {
        r->id = s->next_id++;
        if (id) *id = r->id;
        if (s->inbox_tail) s->inbox_tail->next = r; else s->inbox_head = r;
        s->inbox_tail = r;
        s->n_inbox++;
        s->stats.n_waiting++; /* visible at once in the stats */
        pthread_cond_signal(&s->wake);
    }
    if (rc == DSI_OK && im) { /* the data is ours from here on */
        r->imp = *im;
        r->has_import = 1;
    }
    pthread_mutex_unlock(&s->mu);
    if (rc) req_free(r);
    return rc;
}

void dsi_sched_cancel(dsi_sched *s, uint64_t id) {
    cancel_node *c = malloc(sizeof *c);
    if (!c) return; /* the request then runs to its end: never lost, only not cut short */
    c->id = id;
    pthread_mutex_lock(&s->mu);
    c->next = s->cancels;
    s->cancels = c;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->mu);
}

void dsi_sched_get_stats(dsi_sched *s, dsi_sched_stats *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->stats;
    pthread_mutex_unlock(&s->mu);
}

/* ------------------------------------------------------------ the step */

static void take_inbox_and_cancels(dsi_sched *s) {
    pthread_mutex_lock(&s->mu);
    req *in = s->inbox_head;
    s->inbox_head = s->inbox_tail = NULL;
    s->n_inbox = 0;
    cancel_node *cl = s->cancels;
    s->cancels = NULL;
    pthread_mutex_unlock(&s->mu);
    for (req *r = in, *nx; r; r = nx) {
        nx = r->next;
        r->next = NULL;
        if (s->wait_tail) s->wait_tail->next = r; else s->wait_head = r;
        s->wait_tail = r;
        s->n_waiting++;
    }
    for (cancel_node *c = cl, *nx; c; c = nx) {
        nx = c->next;
        int done = 0;
        for (int i = 0; i < s->n_running && !done; i++)
            if (s->running[i]->id == c->id) {
                req *r = s->running[i];
                remove_running(s, i);
                finish(s, r, DSI_FINISH_CANCELLED, DSI_ECANCELED, "cancelled");
                done = 1;
            }
        for (int i = 0; i < s->n_loading && !done; i++)
            if (s->loading[i]->id == c->id) s->loading[i]->cancelled = done = 1; /* finished when its loads land */
        for (req **pp = &s->wait_head, *prev = NULL; !done && *pp; prev = *pp, pp = &(*pp)->next)
            if ((*pp)->id == c->id) {
                req *r = *pp;
                *pp = r->next;
                if (s->wait_tail == r) s->wait_tail = prev;
                s->n_waiting--;
                finish(s, r, DSI_FINISH_CANCELLED, DSI_ECANCELED, "cancelled");
                done = 1;
                break; /* the increment would take &(*pp)->next of a NULL *pp (UBSan) */
            }
        free(c);
    }
}

/* An admitted request joins the running batch; usage counts what it found
 * cached (memory and disk) at its first admission. */
static void start_running(dsi_sched *s, req *r, int disk_tokens) {
    if (!r->admitted) {
        r->admitted = 1;
        r->cached_tokens = r->n_computed;
        s->prompt_tokens += r->n_prompt;
        s->cached_total += r->n_computed;
        s->disk_cached_total += disk_tokens;
    }
    s->running[s->n_running++] = r;
}

/* ------------------------------------------------------------ disk tier */

/* Continues r's hash chain on disk past its memory match and queues loads of
 * the blocks found into the blocks r already holds. Returns 1 when r now
 * waits in the loading list. */
static int disk_start_loads(dsi_sched *s, req *r) {
    if (!s->o.disk || s->o.no_prefix_cache) return 0;
    int m = r->n_hashed, max_match = (r->n_tokens - 1) / s->bt, n = 0;
    uint64_t parent = m ? r->hashes[m - 1] : 0;
    for (int j = m; j < max_match; j++) {
        const int32_t *t = r->tokens + (size_t)j * s->bt;
        uint64_t h = dsi_prefix_block_hash(parent, s->fingerprint, t, s->bt);
        if (!dsi_kvdisk_probe(s->o.disk, h)) break;
        if (dsi_kvdisk_load(s->o.disk, h, parent, t, dsi_kv_block_data(s->kv, r->blocks[j]), r, j) != DSI_OK) break;
        r->hashes[j] = h;
        parent = h;
        n++;
    }
    if (n == 0) return 0;
    r->n_loads = n;
    r->load_from = m;
    r->load_fail = m + n;
    s->loading[s->n_loading++] = r;
    return 1;
}

/* All of r's loads have landed: publish the verified run, then run r (or
 * finish it, if cancelled meanwhile). */
static void disk_loaded(dsi_sched *s, req *r) {
    for (int i = 0; i < s->n_loading; i++)
        if (s->loading[i] == r) {
            memmove(&s->loading[i], &s->loading[i + 1], sizeof(req *) * (s->n_loading - i - 1));
            s->n_loading--;
            break;
        }
    for (int i = r->load_from; i < r->load_fail; i++) {
        uint64_t parent = i ? r->hashes[i - 1] : 0;
        dsi_prefix_cache_insert(s->pc, r->blocks[i], parent, r->tokens + (size_t)i * s->bt, &r->hashes[i]);
    }
    r->n_hashed = r->load_fail;
    r->n_computed = r->load_fail * s->bt;
    if (r->cancelled) { finish(s, r, DSI_FINISH_CANCELLED, DSI_ECANCELED, "cancelled"); return; }
    start_running(s, r, (r->load_fail - r->load_from) * s->bt);
}

/* Collects finished loads and writes (at a step boundary). */
static void disk_poll(dsi_sched *s) {
    if (!s->o.disk) return;
    dsi_kvdisk_done done[64];
    int n;
    while ((n = dsi_kvdisk_poll(s->o.disk, done, 64)) > 0)
        for (int k = 0; k < n; k++) {
            if (done[k].kind == DSI_KVDISK_SAVE) {
                dsi_prefix_cache_release(s->pc, done[k].index);
                s->n_saving--;
                continue;
            }
            req *r = done[k].user;
            if (done[k].status != DSI_OK && done[k].index < r->load_fail) r->load_fail = done[k].index;
            if (--r->n_loads == 0) disk_loaded(s, r);
        }
}

/* Waits for every load and write of ours (shutdown). */
static void disk_drain(dsi_sched *s) {
    while (s->o.disk && (s->n_loading > 0 || s->n_saving > 0)) {
        dsi_kvdisk_wait(s->o.disk, 0.1);
        disk_poll(s);
    }
}

/* Queues a write of a block just published to the prefix cache; the block is
 * retained until the write lands. */
static void disk_save(dsi_sched *s, int block, uint64_t hash, uint64_t parent, const int32_t *tokens) {
    dsi_prefix_cache_retain(s->pc, block);
    if (dsi_kvdisk_save(s->o.disk, hash, parent, tokens, dsi_kv_block_data(s->kv, block), NULL, block) == 1)
        s->n_saving++;
    else
        dsi_prefix_cache_release(s->pc, block);
}

/* Admits waiting requests, first come first served, while blocks for all
 * their known tokens can be had. */
static void admit(dsi_sched *s) {
    while (s->wait_head && s->n_running + s->n_loading < s->o.max_num_seqs) {
        req *r = s->wait_head;
        if (!s->o.no_prefix_cache && r->n_blocks == 0) {
            /* leave a token to compute: it gives the logits (imported KV brings its first token) */
            int max_match = r->has_import ? r->n_tokens / s->bt : (r->n_tokens - 1) / s->bt;
            int m = dsi_prefix_cache_match(s->pc, r->tokens, r->n_tokens, max_match, r->blocks, r->hashes);
            r->n_blocks = r->n_hashed = m;
            r->n_computed = m * s->bt;
        }
        int need = DSI_CEIL_DIV(r->n_tokens, s->bt) - r->n_blocks;
        if (need > dsi_prefix_cache_n_available(s->pc)) {
            release_blocks(s, r); /* matched blocks go back to the idle list until next time */
            break;
        }
        for (int i = 0; i < need; i++) r->blocks[r->n_blocks++] = dsi_prefix_cache_alloc(s->pc);
        s->wait_head = r->next;
        if (!s->wait_head) s->wait_tail = NULL;
        r->next = NULL;
        s->n_waiting--;
        if (!disk_start_loads(s, r)) start_running(s, r, 0);
    }
}

/* Puts running[i] back at the front of the queue; its KV will be recomputed
 * (full blocks are likely still in the prefix cache). */
static void preempt(dsi_sched *s, int i) {
    req *r = s->running[i];
    remove_running(s, i);
    release_blocks(s, r);
    r->next = s->wait_head;
    s->wait_head = r;
    if (!s->wait_tail) s->wait_tail = r;
    s->n_waiting++;
    s->preemptions++;
}

/* Gives every running decode a block for its next position, preempting the
 * most recently admitted requests when the pool runs dry. */
static void grow_blocks(dsi_sched *s) {
    for (int i = 0; i < s->n_running; i++) {
        req *r = s->running[i];
        while (r->n_blocks * s->bt < r->n_tokens) {
            int b = dsi_prefix_cache_alloc(s->pc);
            if (b >= 0) { r->blocks[r->n_blocks++] = b; continue; }
            int victim = s->n_running - 1; /* the newest; possibly r itself */
            preempt(s, victim);
            if (victim == i) { i--; break; }
        }
    }
}

static void top_logprobs(const float *l, int V, int k, float lse, int32_t *ids, float *lp) {
    int n = 0;
    for (int v = 0; v < V; v++) {
        if (n == k && l[v] <= l[ids[n - 1]]) continue;
        int j = n < k ? n++ : n - 1;
        while (j > 0 && l[ids[j - 1]] < l[v]) { ids[j] = ids[j - 1]; j--; }
        ids[j] = v;
    }
    for (int i = 0; i < n; i++) lp[i] = l[ids[i]] - lse;
}

/* Samples the next token of r from its logits and reports it. Returns 1
 * when r is finished (the caller removes and finishes it). */
static int emit_token(dsi_sched *s, req *r, const float *l, dsi_finish_reason *why) {
    int V = s->vocab;
    int32_t tok = dsi_sampler_pick(&r->smp, l, V, s->sample_scratch);
    if (r->forced_first >= 0) { /* imported KV that had to be recomputed: keep the prefill side's pick */
        tok = r->forced_first;
        r->smp.rng = r->imp.sampler_rng;
        r->forced_first = -1;
    }
    r->n_gen++;
    s->generated_tokens++;
    for (int i = 0; i < r->p.n_stop_ids; i++)
        if (tok == r->p.stop_ids[i]) { *why = DSI_FINISH_STOP; return 1; }
    r->tokens[r->n_tokens++] = tok;
    dsi_sched_event ev = {.type = DSI_SCHED_TOKEN, .token = tok};
    int32_t top_ids[DSI_SCHED_MAX_TOP_LOGPROBS];
    float top_lp[DSI_SCHED_MAX_TOP_LOGPROBS];
    if (r->p.logprobs || r->p.top_logprobs > 0) {
        float mx = l[dsi_argmax(l, V)];
        double sum = 0;
        for (int v = 0; v < V; v++) sum += exp((double)l[v] - mx);
        float lse = mx + (float)log(sum);
        ev.logprob = l[tok] - lse;
        if (r->p.top_logprobs > 0) {
            top_logprobs(l, V, r->p.top_logprobs, lse, top_ids, top_lp);
            ev.n_top = DSI_MIN(r->p.top_logprobs, V);
            ev.top_ids = top_ids;
            ev.top_logprobs = top_lp;
        }
    }
    ev.sampler_rng = r->smp.rng;
    fill_event(r, &ev);
    if (r->cb(r->user, &ev)) { *why = DSI_FINISH_STOP; return 1; }
    if (r->n_gen >= r->p.max_tokens) { *why = DSI_FINISH_LENGTH; return 1; }
    return 0;
}

static void publish_full_blocks(dsi_sched *s, req *r) {
    if (s->o.no_prefix_cache) return;
    while ((r->n_hashed + 1) * s->bt <= r->n_computed) {
        int i = r->n_hashed;
        uint64_t parent = i ? r->hashes[i - 1] : 0;
        if (dsi_prefix_cache_insert(s->pc, r->blocks[i], parent, r->tokens + (size_t)i * s->bt, &r->hashes[i]) &&
            s->o.disk)
            disk_save(s, r->blocks[i], r->hashes[i], parent, r->tokens + (size_t)i * s->bt);
        r->n_hashed++;
    }
}

/* Running requests whose KV was imported: copy the blocks the prefix cache
 * did not supply, publish them, and report the first token the prefill side
 * sampled. When the cache lacks blocks the prefill side skipped (evicted since
 * the decode side said it held them), the prompt is recomputed from the cached
 * part instead and the imported first token is kept. */
static void apply_imports(dsi_sched *s) {
    for (int i = 0; i < s->n_running; i++) {
        req *r = s->running[i];
        if (!r->has_import) continue;
        r->has_import = 0;
        int matched = r->n_computed / s->bt;
        /* usage reports the prefill side's cache hits, as a single server would */
        s->cached_total += (uint64_t)r->imp.cached_tokens - (uint64_t)r->cached_tokens;
        r->cached_tokens = r->imp.cached_tokens;
        if (matched < r->imp.first_block) {
            r->forced_first = r->imp.first_token;
            drop_import(r);
            continue;
        }
        size_t bb = dsi_kv_block_bytes(s->kv);
        for (int b = matched; b < r->imp.first_block + r->imp.n_blocks; b++)
            memcpy(dsi_kv_block_data(s->kv, r->blocks[b]), (char *)r->imp.data + (size_t)(b - r->imp.first_block) * bb,
                   bb);
        drop_import(r);
        s->computed_tokens += r->n_tokens - r->n_computed;
        r->n_computed = r->n_tokens;
        publish_full_blocks(s, r);
        /* the first token, as emit_token reports a sampled one */
        int32_t tok = r->imp.first_token;
        r->smp.rng = r->imp.sampler_rng;
        r->n_gen++;
        s->generated_tokens++;
        dsi_finish_reason why = DSI_FINISH_LENGTH;
        int done = 0;
        for (int k = 0; k < r->p.n_stop_ids; k++)
            if (tok == r->p.stop_ids[k]) { why = DSI_FINISH_STOP; done = 1; }
        if (!done) {
            r->tokens[r->n_tokens++] = tok;
            dsi_sched_event ev = {.type = DSI_SCHED_TOKEN, .token = tok, .logprob = r->imp.first_logprob,
                                  .sampler_rng = r->smp.rng, .top_ids = r->imp.top_ids,
                                  .top_logprobs = r->imp.top_logprobs,
                                  .n_top = DSI_MIN(DSI_MAX(r->imp.n_top, 0), r->p.top_logprobs)};
            fill_event(r, &ev);
            if (r->cb(r->user, &ev)) { why = DSI_FINISH_STOP; done = 1; }
            else if (r->n_gen >= r->p.max_tokens) done = 1;
        }
        if (done) {
            remove_running(s, i--);
            finish(s, r, why, DSI_OK, NULL);
        }
    }
}

/* Tells a kv_export request which of its prompt blocks are final. */
static void report_kv(dsi_sched *s, req *r) {
    int ready = r->n_computed >= r->n_prompt ? DSI_CEIL_DIV(r->n_prompt, s->bt) : r->n_computed / s->bt;
    dsi_sched_event ev = {.type = DSI_SCHED_KV, .kv_blocks = r->blocks, .kv_n_blocks = ready,
                          .kv_tokens = DSI_MIN(r->n_computed, r->n_prompt)};
    fill_event(r, &ev);
    r->cb(r->user, &ev);
}

int dsi_sched_step(dsi_sched *s) {
    take_inbox_and_cancels(s);
    disk_poll(s);
    admit(s);
    apply_imports(s);
    grow_blocks(s);
    int budget = s->o.max_batched_tokens, n = 0, V = s->vocab;
    /* Decodes first (one token each: latency). Then the prefills: first an
     * equal share of what is left to each, then the rest in admission order.
     * In admission order alone, a long prompt took the whole budget every
     * step and a short one admitted behind it waited for all of it (a 4-token
     * request, 80 s behind a 40,000-token prompt on one thread); with the
     * shares it is done in the next step, and the long prompt still gets all
     * the budget the others leave. */
    for (int i = 0; i < s->n_running && budget > 0; i++) {
        req *r = s->running[i];
        if (r->n_tokens - r->n_computed != 1) continue;
        s->batch_req[n] = r;
        s->batch_chunk[n++] = 1;
        budget--;
    }
    int n_dec = n, n_pre = 0;
    for (int i = 0; i < s->n_running; i++) n_pre += s->running[i]->n_tokens - s->running[i]->n_computed > 1;
    int share = n_pre ? DSI_MAX(budget / n_pre, 1) : 0;
    for (int i = 0; i < s->n_running && budget > 0; i++) {
        req *r = s->running[i];
        int left = r->n_tokens - r->n_computed;
        if (left <= 1) continue;
        int c = DSI_MIN(DSI_MIN(left, share), budget);
        s->batch_req[n] = r;
        s->batch_chunk[n++] = c;
        budget -= c;
    }
    for (int k = n_dec; k < n && budget > 0; k++) {
        req *r = s->batch_req[k];
        int more = DSI_MIN(r->n_tokens - r->n_computed - s->batch_chunk[k], budget);
        s->batch_chunk[k] += more;
        budget -= more;
    }
    for (int k = 0; k < n; k++) {
        req *r = s->batch_req[k];
        int c = s->batch_chunk[k], last = r->n_computed + c == r->n_tokens;
        s->batch[k] = (dsi_seq_step){r->tokens + r->n_computed, c, r->n_computed, r->blocks, r->n_blocks,
                                     last ? DSI_LOGITS_LAST : DSI_LOGITS_NONE, s->logits + (size_t)k * V};
    }
    int rc = DSI_OK;
    if (n == 0 && s->n_loading + s->n_saving > 0) dsi_kvdisk_wait(s->o.disk, 0.002); /* nothing to compute: not a spin */
    if (n > 0) {
        rc = s->o.step_fn ? s->o.step_fn(s->o.step_ctx, s->batch, n) : dsi_engine_step(s->e, s->batch, n);
        s->steps++;
        if (rc != DSI_OK) {
            char msg[256];
            snprintf(msg, sizeof msg, "engine step failed: %s", dsi_last_error());
            DSI_LOG_ERROR("scheduler: %s", msg);
            for (int k = 0; k < n; k++) {
                for (int i = 0; i < s->n_running; i++)
                    if (s->running[i] == s->batch_req[k]) { remove_running(s, i); break; }
                finish(s, s->batch_req[k], DSI_FINISH_ERROR, rc, msg);
            }
        } else {
            for (int k = 0; k < n; k++) {
                req *r = s->batch_req[k];
                r->n_computed += s->batch_chunk[k];
                s->computed_tokens += s->batch_chunk[k];
                publish_full_blocks(s, r);
                if (r->kv_export && r->n_gen == 0) report_kv(s, r);
                dsi_finish_reason why;
                if (s->batch[k].logits == DSI_LOGITS_LAST && emit_token(s, r, s->logits + (size_t)k * V, &why)) {
                    for (int i = 0; i < s->n_running; i++)
                        if (s->running[i] == r) { remove_running(s, i); break; }
                    finish(s, r, why, DSI_OK, NULL);
                }
            }
        }
    }
    publish_stats(s);
    return rc != DSI_OK ? rc : s->n_waiting + s->n_running + s->n_loading + s->n_saving;
}

/* ------------------------------------------------------------ the thread */

static void *loop(void *arg) {
    dsi_sched *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        int beat = 0;
        while (!s->stop_now && !s->inbox_head && !s->cancels && s->n_active == 0 && !beat) {
            if (s->o.step_fn && s->o.heartbeat_s > 0) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                double end = ts.tv_sec + ts.tv_nsec * 1e-9 + s->o.heartbeat_s;
                ts.tv_sec = (time_t)end;
                ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
                beat = pthread_cond_timedwait(&s->wake, &s->mu, &ts) != 0;
            } else {
                pthread_cond_wait(&s->wake, &s->mu);
            }
        }
        int stop = s->stop_now;
        pthread_mutex_unlock(&s->mu);
        if (stop) break;
        if (beat) {
            /* nothing to run: an empty step keeps the group's deadlines fed */
            s->o.step_fn(s->o.step_ctx, NULL, 0);
            continue;
        }
        dsi_sched_step(s);
    }
    cancel_all(s);
    return NULL;
}

int dsi_sched_start(dsi_sched *s) {
    if (s->thread_running) return dsi_error(DSI_EINVAL, "scheduler already started");
    if (pthread_create(&s->thread, NULL, loop, s) != 0) return dsi_error(DSI_ENOMEM, "cannot start scheduler thread");
    s->thread_running = 1;
    return DSI_OK;
}

void dsi_sched_stop(dsi_sched *s, int drain, double timeout_s) {
    pthread_mutex_lock(&s->mu);
    s->accepting = 0;
    if (drain && s->thread_running) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double end = ts.tv_sec + ts.tv_nsec * 1e-9 + timeout_s;
        ts.tv_sec = (time_t)end;
        ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
        while (s->n_active > 0 || s->inbox_head)
            if (pthread_cond_timedwait(&s->idle, &s->mu, &ts) != 0) break;
    }
    s->stop_now = 1;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->mu);
    if (s->thread_running) {
        pthread_join(s->thread, NULL);
        s->thread_running = 0;
    }
}
