/* The CUDA engine: model upload, device KV blocks, the forward step (same
 * stages as src/engine: ATTN-0, ATTN-1, FFN), CUDA graphs for decode.
 *
 * Everything a step needs from the host (tokens, positions, sequence of each
 * row, block tables, rows that want logits) is copied in one transfer to a
 * device buffer at a fixed address; every kernel reads lengths and positions
 * from there, and MoE grouping happens on the device, so a step's launch
 * sequence depends only on (T tokens, R logit rows): that pair keys the graph
 * cache. Attention always runs in the absorbed form (exact for prefill too). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/common.cuh"
#include "dsinfer/cuda.h"

#define N_GRAPHS 16

typedef struct dlayer {
    float *attn_norm, *ffn_norm, *q_a_norm, *kv_a_norm; /* device [n] */
    dsi_dmat q_a, q_b, q_proj, kv_a, kv_b, o_proj;
    int is_moe;
    dsi_dmat gate, up, down;          /* dense MLP */
    dsi_dmat router;
    float *router_bias;               /* device [E] or NULL */
    dsi_dmat eg, eu, ed;              /* routed experts, batch E */
    dsi_dmat sg, su, sd;              /* shared experts */
} dlayer;

typedef struct graph_entry {
    int state;              /* 0 empty, 1 seen once (ran eagerly), 2 captured */
    int T, R;
    cudaGraphExec_t exec;
    unsigned long long last_use;
} graph_entry;

struct dsi_cuda_engine {
    dsi_config c;
    dsi_cuda_opts o;
    cudaStream_t stream;
    dsi_lt *lt;
    dsi_mla_geom g;
    dsi_dmat embed, lm_head;
    float *final_norm;
    dlayer *L;
    double weight_bytes;
    /* KV: device blocks + host free list */
    void *cache;
    int *free_stack, n_free;
    unsigned char *allocated;
    /* step inputs: pinned staging and its device copy, same layout:
     * tokens [T], tok_pos [T], tok_seq [T], logit rows [Rmax], block tables [S][max_blocks] */
    int32_t *h_in, *d_in;
    long off_pos, off_seq, off_rows, off_btab, n_in;
    /* device scratch, T = max_tokens rows; shapes in comments */
    float *x, *xn;        /* [T][D] */
    float *qa;            /* [T][q_lora] */
    float *q;             /* [T][H][nope+rope] */
    float *kva;           /* [T][kvd] */
    float *qabs;          /* [T][H][kvd] absorbed query: latent + roped rope part */
    float *olat;          /* [T][H][lora] */
    float *attn;          /* [T][H][v] */
    float *h1, *h2;       /* [T][max(dense_inter, shared inter)] */
    float *rlog;          /* [T][E] router logits */
    int *tids;            /* [T][K] */
    float *tw;            /* [T][K] */
    int *count, *offset;  /* [E], [E+1] */
    int *slot_of, *slot_tok; /* [T*K] */
    float *ex;            /* [T*K][D] expert inputs, then outputs */
    float *eh1, *eh2;     /* [T*K][moe_inter] */
    float *lrows;         /* [Rmax][D] */
    float *logits;        /* [Rmax][V] */
    uint8_t *xq;          /* FP8 activations: [max(T,R)][max_in] dense, [T*K][max(D, moe_inter)] experts */
    float *xs;            /* their 1x128 scales */
    float *inv_freq;      /* [rope/2] */
    graph_entry graphs[N_GRAPHS];
    unsigned long long n_steps;
    int run_layers;       /* 0: all; else only the first run_layers (bench_cuda's per-layer cost) */
    int capturing;        /* inside a graph capture: no host synchronisation */
    int *h_off;           /* pinned [E+1]: expert row offsets read back for the per-expert cuBLASLt path */
};




/* ------------------------------------------------------------------ upload */

static int upload(dsi_cuda_engine *e, const dsi_mat *W, dsi_dmat *d) {
    int rc = dsi__cuda_upload_mat(W, d);
    if (rc) return rc;
    e->weight_bytes += (double)W->rows * W->cols * dsi_dtype_size(W->dtype);
    if (e->o.gemm == DSI_CUDA_GEMM_CUBLASLT && d->dtype == DSI_F8_E4M3) rc = dsi__lt_prepare_weight(d);
    return rc;
}

static int upload_vec(const float *v, int n, float **d) {
    *d = NULL;
    if (!v) return DSI_OK;
    int rc = dsi__cuda_malloc((void **)d, sizeof(float) * n);
    if (!rc) rc = dsi__cuda_h2d(*d, v, sizeof(float) * n);
    return rc;
}

/* Routed experts of one layer into one batched device weight [E][rows][cols]. */
static int upload_experts(dsi_cuda_engine *e, const dsi_mat *X, int E, dsi_dmat *d) {
    memset(d, 0, sizeof *d);
    const dsi_mat *W0 = &X[0];
    for (int x = 1; x < E; x++)
        if (X[x].dtype != W0->dtype || X[x].rows != W0->rows || X[x].cols != W0->cols ||
            X[x].block_rows != W0->block_rows || X[x].block_cols != W0->block_cols)
            return dsi_error(DSI_EUNSUPPORTED, "cuda: routed experts differ in dtype or shape");
    d->dtype = W0->dtype;
    d->rows = W0->rows;
    d->cols = W0->cols;
    d->batch = E;
    d->block_rows = W0->block_rows > 0 ? W0->block_rows : 128;
    d->block_cols = W0->block_cols > 0 ? W0->block_cols : 128;
    size_t per = (size_t)W0->rows * W0->cols * dsi_dtype_size(W0->dtype);
    int rc = dsi__cuda_malloc(&d->data, per * E);
    for (int x = 0; !rc && x < E; x++) rc = dsi__cuda_h2d((uint8_t *)d->data + per * x, X[x].data, per);
    if (!rc && d->dtype == DSI_F8_E4M3) {
        d->scale_rows = (d->rows + d->block_rows - 1) / d->block_rows;
        d->scale_cols = (d->cols + d->block_cols - 1) / d->block_cols;
        size_t sp = sizeof(float) * d->scale_rows * d->scale_cols;
        rc = dsi__cuda_malloc((void **)&d->scale, sp * E);
        for (int x = 0; !rc && x < E; x++) {
            if (!X[x].scale_inv) rc = dsi_error(DSI_EINVAL, "cuda: FP8 expert without scales");
            else rc = dsi__cuda_h2d((uint8_t *)d->scale + sp * x, X[x].scale_inv, sp);
        }
    }
    if (!rc && d->dtype == DSI_F8_E4M3 && e->o.gemm == DSI_CUDA_GEMM_CUBLASLT && d->block_rows == 128 &&
        d->block_cols == 128)
        rc = dsi__lt_prepare_weight(d); /* for the per-expert cuBLASLt path (prefill) */
    e->weight_bytes += (double)per * E;
    return rc;
}

static int upload_layer(dsi_cuda_engine *e, const dsi_layer *S, dlayer *L) {
    const dsi_config *c = &e->c;
    int rc = DSI_OK;
#define TRY(x) do { if ((rc = (x)) != DSI_OK) return rc; } while (0)
    TRY(upload_vec(S->attn_norm, c->hidden, &L->attn_norm));
    TRY(upload_vec(S->ffn_norm, c->hidden, &L->ffn_norm));
    TRY(upload_vec(S->kv_a_norm, c->kv_lora_rank, &L->kv_a_norm));
    if (c->q_lora_rank > 0) {
        TRY(upload_vec(S->q_a_norm, c->q_lora_rank, &L->q_a_norm));
        TRY(upload(e, &S->q_a, &L->q_a));
        TRY(upload(e, &S->q_b, &L->q_b));
    } else {
        TRY(upload(e, &S->q_proj, &L->q_proj));
    }
    TRY(upload(e, &S->kv_a, &L->kv_a));
    TRY(upload(e, &S->kv_b, &L->kv_b));
    TRY(upload(e, &S->o_proj, &L->o_proj));
    L->is_moe = S->is_moe;
    if (!S->is_moe) {
        TRY(upload(e, &S->gate, &L->gate));
        TRY(upload(e, &S->up, &L->up));
        TRY(upload(e, &S->down, &L->down));
        return DSI_OK;
    }
    TRY(upload(e, &S->router, &L->router));
    TRY(upload_vec(S->router_bias, c->n_experts, &L->router_bias));
    TRY(upload_experts(e, S->exp_gate, c->n_experts, &L->eg));
    TRY(upload_experts(e, S->exp_up, c->n_experts, &L->eu));
    TRY(upload_experts(e, S->exp_down, c->n_experts, &L->ed));
    if (c->n_shared_experts > 0) {
        TRY(upload(e, &S->sh_gate, &L->sg));
        TRY(upload(e, &S->sh_up, &L->su));
        TRY(upload(e, &S->sh_down, &L->sd));
    }
#undef TRY
    return DSI_OK;
}

static void free_layer(dlayer *L) {
    dsi__cuda_free(L->attn_norm); dsi__cuda_free(L->ffn_norm); dsi__cuda_free(L->q_a_norm);
    dsi__cuda_free(L->kv_a_norm); dsi__cuda_free(L->router_bias);
    dsi_dmat *ms[] = {&L->q_a, &L->q_b, &L->q_proj, &L->kv_a, &L->kv_b, &L->o_proj, &L->gate, &L->up, &L->down,
                      &L->router, &L->eg, &L->eu, &L->ed, &L->sg, &L->su, &L->sd};
    for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++) dsi__cuda_free_mat(ms[i]);
}

/* ------------------------------------------------------------------ lifecycle */

extern "C" void dsi_cuda_engine_destroy(dsi_cuda_engine *e) {
    if (!e) return;
    if (e->stream) cudaStreamSynchronize(e->stream);
    for (int i = 0; i < N_GRAPHS; i++)
        if (e->graphs[i].exec) cudaGraphExecDestroy(e->graphs[i].exec);
    if (e->L)
        for (int l = 0; l < e->c.n_layers; l++) free_layer(&e->L[l]);
    free(e->L);
    dsi__cuda_free_mat(&e->embed);
    dsi__cuda_free_mat(&e->lm_head);
    dsi__cuda_free(e->final_norm);
    dsi__cuda_free(e->cache);
    void *bufs[] = {e->d_in, e->x, e->xn, e->qa, e->q, e->kva, e->qabs, e->olat, e->attn, e->h1, e->h2, e->rlog,
                    e->tids, e->tw, e->count, e->offset, e->slot_of, e->slot_tok, e->ex, e->eh1, e->eh2, e->lrows,
                    e->logits, e->xq, e->xs, e->inv_freq};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) dsi__cuda_free(bufs[i]);
    if (e->h_in) cudaFreeHost(e->h_in);
    if (e->h_off) cudaFreeHost(e->h_off);
    dsi__lt_destroy(e->lt);
    if (e->stream) cudaStreamDestroy(e->stream);
    free(e->free_stack);
    free(e->allocated);
    free(e);
}

static int dalloc(void **p, size_t bytes) { return dsi__cuda_malloc(p, bytes); }

extern "C" int dsi_cuda_engine_create(const dsi_model *m, const dsi_cuda_opts *opts, dsi_cuda_engine **out) {
    *out = NULL;
    if (dsi_cuda_device_count() <= 0) return dsi_error(DSI_EUNSUPPORTED, "cuda: no CUDA device");
    dsi_cuda_engine *e = (dsi_cuda_engine *)calloc(1, sizeof *e);
    if (!e) return dsi_error(DSI_ENOMEM, "out of memory");
    e->c = *dsi_model_config(m);
    if (opts) e->o = *opts;
    const dsi_config *c = &e->c;
    dsi_cuda_opts *o = &e->o;
    if (o->max_tokens <= 0) o->max_tokens = 2048;
    if (o->max_logits <= 0) o->max_logits = o->max_tokens;
    if (o->max_seqs <= 0) o->max_seqs = DSI_MAX(1, DSI_MIN(o->max_tokens, 256));
    if (o->kv_blocks <= 0) o->kv_blocks = 64;
    if (o->max_blocks_per_seq <= 0)
        o->max_blocks_per_seq = DSI_MAX(1, DSI_MIN(1024, DSI_CEIL_DIV(c->max_position_embeddings, DSI_KV_BLOCK_TOKENS)));
    if (o->graph_max_tokens <= 0) o->graph_max_tokens = 256;
    int rc = DSI_CU(cudaSetDevice(o->device));
    if (!rc) rc = DSI_CU(cudaStreamCreateWithFlags(&e->stream, cudaStreamNonBlocking));
    if (rc) { dsi_cuda_engine_destroy(e); return rc; }
    if (c->kv_lora_rank > 1024 || c->kv_lora_rank + c->qk_rope_dim > 1280 || c->n_experts > 4096 ||
        (c->n_experts > 0 && c->n_group > 0 && c->n_experts % c->n_group)) {
        dsi_cuda_engine_destroy(e);
        return dsi_error(DSI_EUNSUPPORTED, "cuda: model geometry outside what the kernels support");
    }
    if (o->gemm == DSI_CUDA_GEMM_CUBLASLT && (rc = dsi__lt_create(&e->lt))) { dsi_cuda_engine_destroy(e); return rc; }

    /* geometry */
    dsi_mla_geom *g = &e->g;
    g->H = c->n_heads; g->nope = c->qk_nope_dim; g->rope = c->qk_rope_dim; g->lora = c->kv_lora_rank;
    g->vd = c->v_head_dim; g->n_layers = c->n_layers; g->block_tokens = DSI_KV_BLOCK_TOKENS;
    g->kv_bf16 = o->kv_bf16; g->max_blocks = o->max_blocks_per_seq; g->eps = (float)c->rms_norm_eps;
    g->rope_interleave = c->rope_interleave;
    float *inv = (float *)calloc(c->qk_rope_dim / 2 + 1, sizeof(float));
    if (!inv) { dsi_cuda_engine_destroy(e); return dsi_error(DSI_ENOMEM, "out of memory"); }
    dsi_config_rope(c, inv, &g->rope_mscale, &g->softmax_scale);
    rc = upload_vec(inv, c->qk_rope_dim / 2 + 1, &e->inv_freq);
    free(inv);
    if (!rc) rc = dsi__cuda_mla_setup(g);
    if (!rc && o->attn_tc && !dsi__cuda_mla_tc_supported(g)) {
        DSI_LOG_INFO("cuda: tensor-core attention needs a BF16 cache and 512 + 64 latent dims: using the float32 kernel");
        o->attn_tc = 0;
    }
    if (!rc && o->attn_tc) rc = dsi__cuda_mla_tc_setup();

    /* weights */
    if (!rc) rc = upload(e, &m->embed, &e->embed);
    if (!rc) rc = upload(e, &m->lm_head, &e->lm_head);
    if (!rc) rc = upload_vec(m->final_norm, c->hidden, &e->final_norm);
    if (!rc && !(e->L = (dlayer *)calloc(c->n_layers, sizeof(dlayer)))) rc = dsi_error(DSI_ENOMEM, "out of memory");
    for (int l = 0; !rc && l < c->n_layers; l++) rc = upload_layer(e, &m->layers[l], &e->L[l]);
    if (rc) { dsi_error_prefix(rc, "cuda upload"); dsi_cuda_engine_destroy(e); return rc; }

    /* KV */
    size_t bb = dsi__cuda_kv_block_bytes(g);
    rc = dalloc(&e->cache, bb * o->kv_blocks);
    /* zeros, not garbage: a position read before it is written (a caller's
     * bug, or a benchmark that skips prefill) must not turn into NaN routing */
    if (!rc) rc = dsi__cuda_memset(e->cache, 0, bb * o->kv_blocks);
    e->free_stack = (int *)malloc(sizeof(int) * o->kv_blocks);
    e->allocated = (unsigned char *)calloc(o->kv_blocks, 1);
    if (!rc && (!e->free_stack || !e->allocated)) rc = dsi_error(DSI_ENOMEM, "out of memory");
    if (!rc) {
        for (int b = 0; b < o->kv_blocks; b++) e->free_stack[b] = o->kv_blocks - 1 - b; /* pop gives 0 first */
        e->n_free = o->kv_blocks;
    }

    /* step inputs */
    long T = o->max_tokens;
    e->off_pos = T;
    e->off_seq = 2 * T;
    e->off_rows = 3 * T;
    e->off_btab = 3 * T + o->max_logits;
    e->n_in = e->off_btab + (long)o->max_seqs * o->max_blocks_per_seq;
    if (!rc) rc = DSI_CU(cudaMallocHost((void **)&e->h_in, sizeof(int32_t) * e->n_in));
    if (!rc) rc = DSI_CU(cudaMallocHost((void **)&e->h_off, sizeof(int) * (DSI_MAX(1, c->n_experts) + 1)));
    if (!rc) rc = dalloc((void **)&e->d_in, sizeof(int32_t) * e->n_in);

    /* scratch */
    long D = c->hidden, H = c->n_heads, qk = dsi_config_qk_head_dim(c), kvd = dsi_config_kv_dim(c);
    long K = DSI_MAX(1, c->n_experts_per_tok), E = DSI_MAX(1, c->n_experts), mi = DSI_MAX(1, c->moe_inter);
    long inter = DSI_MAX((long)c->dense_inter, (long)c->moe_inter * DSI_MAX(1, c->n_shared_experts));
    long max_in = DSI_MAX(DSI_MAX(D, (long)c->q_lora_rank), DSI_MAX(inter, H * c->v_head_dim));
    max_in = DSI_MAX(max_in, mi);
    long R = o->max_logits, V = c->vocab_size;
    struct { void **p; long bytes; } sc[] = {
        {(void **)&e->x, 4 * T * D}, {(void **)&e->xn, 4 * T * D}, {(void **)&e->qa, 4 * T * DSI_MAX(1, c->q_lora_rank)},
        {(void **)&e->q, 4 * T * H * qk}, {(void **)&e->kva, 4 * T * kvd}, {(void **)&e->qabs, 4 * T * H * kvd},
        {(void **)&e->olat, 4 * T * H * c->kv_lora_rank}, {(void **)&e->attn, 4 * T * H * c->v_head_dim},
        {(void **)&e->h1, 4 * T * inter}, {(void **)&e->h2, 4 * T * inter}, {(void **)&e->rlog, 4 * T * E},
        {(void **)&e->tids, 4 * T * K}, {(void **)&e->tw, 4 * T * K}, {(void **)&e->count, 4 * E},
        {(void **)&e->offset, 4 * (E + 1)}, {(void **)&e->slot_of, 4 * T * K}, {(void **)&e->slot_tok, 4 * T * K},
        /* expert rows: 64 spare past T*K for dsi__lt_gemm_grouped's whole tiles */
        {(void **)&e->ex, 4 * (T * K + 64) * D}, {(void **)&e->eh1, 4 * (T * K + 64) * mi},
        {(void **)&e->eh2, 4 * (T * K + 64) * mi},
        {(void **)&e->lrows, 4 * R * D}, {(void **)&e->logits, 4 * R * V},
        {(void **)&e->xq, DSI_MAX(DSI_MAX(T, R) * max_in, (T * K + 64) * DSI_MAX(D, mi)) + 256},
        {(void **)&e->xs, 4 * DSI_MAX(DSI_MAX(T, R) * DSI_CEIL_DIV(max_in, 128), (T * K + 64) * DSI_CEIL_DIV(DSI_MAX(D, mi), 128)) + 256},
    };
    for (size_t i = 0; !rc && i < sizeof sc / sizeof sc[0]; i++) rc = dalloc(sc[i].p, (size_t)sc[i].bytes);
    /* uploads, scale transposes and the cache memset ran on the legacy stream,
     * which our non-blocking stream does not wait for */
    if (!rc) rc = DSI_CU(cudaDeviceSynchronize());
    if (rc) { dsi_error_prefix(rc, "cuda engine"); dsi_cuda_engine_destroy(e); return rc; }
    *out = e;
    return DSI_OK;
}

extern "C" double dsi_cuda_engine_weight_bytes(const dsi_cuda_engine *e) { return e->weight_bytes; }

extern "C" int dsi_cuda_kv_alloc(dsi_cuda_engine *e) {
    if (e->n_free == 0) return -1;
    int b = e->free_stack[--e->n_free];
    e->allocated[b] = 1;
    return b;
}
extern "C" void dsi_cuda_kv_release(dsi_cuda_engine *e, int block) {
    if (block < 0 || block >= e->o.kv_blocks || !e->allocated[block]) return; /* not ours: ignore */
    e->allocated[block] = 0;
    e->free_stack[e->n_free++] = block;
}
extern "C" int dsi_cuda_kv_n_free(const dsi_cuda_engine *e) { return e->n_free; }

/* ------------------------------------------------------------------ the forward pass */

static int mm(dsi_cuda_engine *e, const dsi_dmat *W, const float *x, int M, long ldx, float *y, long ldy, int acc) {
    if (e->lt && W->dtype == DSI_F8_E4M3 && W->scale_lt) {
        int rc = dsi__lt_gemm(e->lt, W, x, M, ldx, y, ldy, acc, e->xq, e->xs, e->stream);
        if (rc != DSI_EUNSUPPORTED) return rc;
    }
    dsi_gemm_args a;
    memset(&a, 0, sizeof a);
    a.W = W; a.d_x = x; a.ldx = ldx; a.d_y = y; a.ldy = ldy;
    a.M = M; a.N = W->rows; a.K = W->cols; a.Z = 1; a.accumulate = acc;
    return dsi__cuda_gemm(&a, e->stream);
}

/* out (+)= down(silu(gate(xn)) * up(xn)) over T rows */
static int mlp(dsi_cuda_engine *e, const dsi_dmat *g, const dsi_dmat *u, const dsi_dmat *d, const float *xn, int T,
               float *out) {
    int D = e->c.hidden, inter = g->rows, rc;
    if ((rc = mm(e, g, xn, T, D, e->h1, inter, 0))) return rc;
    if ((rc = mm(e, u, xn, T, D, e->h2, inter, 0))) return rc;
    if ((rc = dsi__cuda_silu_mul(e->h1, e->h2, T, NULL, inter, e->stream))) return rc;
    return mm(e, d, e->h1, T, inter, out, D, 1);
}

static int grouped(dsi_cuda_engine *e, const dsi_dmat *W, const float *x, long ldx, int T, float *y, long ldy) {
    dsi_gemm_args a;
    memset(&a, 0, sizeof a);
    a.W = W; a.d_x = x; a.ldx = ldx; a.d_y = y; a.ldy = ldy;
    a.M = T; a.N = W->rows; a.K = W->cols; a.Z = W->batch; a.d_group_offset = e->offset;
    return dsi__cuda_gemm(&a, e->stream);
}

static int moe(dsi_cuda_engine *e, const dlayer *L, int T) {
    const dsi_config *c = &e->c;
    int D = c->hidden, E = c->n_experts, K = c->n_experts_per_tok, mi = c->moe_inter, rc;
    /* gate */
    if ((rc = mm(e, &L->router, e->xn, T, D, e->rlog, E, 0))) return rc;
    if ((rc = dsi__cuda_moe_gate(c, e->rlog, L->router_bias, T, e->tids, e->tw, e->stream))) return rc;
    /* SHARED */
    if (c->n_shared_experts > 0 && (rc = mlp(e, &L->sg, &L->su, &L->sd, e->xn, T, e->x))) return rc;
    /* DISPATCH (a permutation on one GPU), MLP (grouped over experts), COMBINE */
    if ((rc = dsi__cuda_moe_dispatch(e->tids, T, K, E, e->xn, D, e->count, e->offset, e->slot_of, e->slot_tok, e->ex,
                                     e->stream)))
        return rc;
    int fp8 = e->lt && L->eg.dtype == DSI_F8_E4M3 && D % 16 == 0 && mi % 16 == 0 && L->eg.block_rows == 128 &&
              L->eg.block_cols == 128;
    if (fp8 && !e->capturing && (long)T * K >= 32L * E && D % 128 == 0 && mi % 128 == 0 && L->eg.scale_lt &&
        L->eu.scale_lt && L->ed.scale_lt) {
        /* prefill: enough rows per expert for cuBLASLt, one call per expert
         * on offsets read back to the host (a synchronisation per layer) */
        if ((rc = DSI_CU(cudaMemcpyAsync(e->h_off, e->offset, sizeof(int) * (E + 1), cudaMemcpyDeviceToHost, e->stream))))
            return rc;
        if ((rc = DSI_CU(cudaStreamSynchronize(e->stream)))) return rc;
        if ((rc = dsi__lt_gemm_grouped(e->lt, &L->eg, e->h_off, E, e->ex, D, e->eh1, mi, e->xq, e->xs, e->stream)))
            return rc;
        if ((rc = dsi__lt_gemm_grouped(e->lt, &L->eu, e->h_off, E, e->ex, D, e->eh2, mi, e->xq, e->xs, e->stream)))
            return rc;
        if ((rc = dsi__cuda_silu_mul(e->eh1, e->eh2, T * K, NULL, mi, e->stream))) return rc;
        if ((rc = dsi__lt_gemm_grouped(e->lt, &L->ed, e->h_off, E, e->eh1, mi, e->ex, D, e->xq, e->xs, e->stream)))
            return rc;
    } else if (fp8) {
        /* FP8 activations (per 1x128 tile) on the tensor cores, as DeepSeek serves */
        int avg = (int)DSI_CEIL_DIV((long)T * K, E); /* rows per expert if routing were even */
        if ((rc = dsi__cuda_quant_fp8(e->ex, D, T * K, D, e->xq, e->xs, 0, e->stream))) return rc;
        if ((rc = dsi__cuda_gemm_fp8(&L->eg, e->xq, e->xs, T, e->eh1, mi, 0, e->offset, E, avg, e->stream))) return rc;
        if ((rc = dsi__cuda_gemm_fp8(&L->eu, e->xq, e->xs, T, e->eh2, mi, 0, e->offset, E, avg, e->stream))) return rc;
        if ((rc = dsi__cuda_silu_mul_quant(e->eh1, e->eh2, T * K, mi, e->xq, e->xs, e->stream))) return rc;
        if ((rc = dsi__cuda_gemm_fp8(&L->ed, e->xq, e->xs, T, e->ex, D, 0, e->offset, E, avg, e->stream))) return rc;
    } else {
        if ((rc = grouped(e, &L->eg, e->ex, D, T, e->eh1, mi))) return rc;
        if ((rc = grouped(e, &L->eu, e->ex, D, T, e->eh2, mi))) return rc;
        if ((rc = dsi__cuda_silu_mul(e->eh1, e->eh2, T * K, NULL, mi, e->stream))) return rc;
        if ((rc = grouped(e, &L->ed, e->eh1, mi, T, e->ex, D))) return rc;
    }
    return dsi__cuda_moe_combine(e->ex, e->slot_of, e->tw, T, K, D, e->x, e->stream);
}

static int layer_forward(dsi_cuda_engine *e, int l, int T) {
    const dsi_config *c = &e->c;
    const dlayer *L = &e->L[l];
    const dsi_mla_geom *g = &e->g;
    int D = c->hidden, H = c->n_heads, qk = dsi_config_qk_head_dim(c), kvd = dsi_config_kv_dim(c);
    int lora = c->kv_lora_rank, vd = c->v_head_dim, nope = c->qk_nope_dim, rc;
    float eps = (float)c->rms_norm_eps;
    const int *tok_pos = e->d_in + e->off_pos, *tok_seq = e->d_in + e->off_seq, *btab = e->d_in + e->off_btab;
    /* ATTN-0 */
    if ((rc = dsi__cuda_rmsnorm(e->x, D, L->attn_norm, T, D, eps, e->xn, D, e->stream))) return rc;
    if (c->q_lora_rank > 0) {
        int ql = c->q_lora_rank;
        if ((rc = mm(e, &L->q_a, e->xn, T, D, e->qa, ql, 0))) return rc;
        if ((rc = dsi__cuda_rmsnorm(e->qa, ql, L->q_a_norm, T, ql, eps, e->qa, ql, e->stream))) return rc;
        if ((rc = mm(e, &L->q_b, e->qa, T, ql, e->q, (long)H * qk, 0))) return rc;
    } else if ((rc = mm(e, &L->q_proj, e->xn, T, D, e->q, (long)H * qk, 0))) {
        return rc;
    }
    if ((rc = mm(e, &L->kv_a, e->xn, T, D, e->kva, kvd, 0))) return rc;
    if ((rc = dsi__cuda_mla_prepare(g, l, T, e->q, e->kva, L->kv_a_norm, e->inv_freq, tok_pos, tok_seq, btab,
                                    e->cache, e->qabs, e->stream)))
        return rc;
    /* ATTN-1: q_nope through W_UK (rows h*(nope+v) .. +nope of kv_b, transposed) into latent space */
    dsi_gemm_args a;
    memset(&a, 0, sizeof a);
    a.W = &L->kv_b; a.trans = 1; a.row0 = 0; a.row_zstride = nope + vd;
    a.d_x = e->q; a.ldx = (long)H * qk; a.x_zstride = qk;
    a.d_y = e->qabs; a.ldy = (long)H * kvd; a.y_zstride = kvd;
    a.M = T; a.N = lora; a.K = nope; a.Z = H;
    if ((rc = dsi__cuda_gemm(&a, e->stream))) return rc;
    rc = e->o.attn_tc ? dsi__cuda_mla_decode_tc(g, l, T, e->qabs, e->cache, tok_pos, tok_seq, btab, e->olat, e->stream)
                      : dsi__cuda_mla_decode(g, l, T, e->qabs, e->cache, tok_pos, tok_seq, btab, e->olat, e->stream);
    if (rc) return rc;
    /* latent output through W_UV (rows h*(nope+v)+nope .. +v) */
    memset(&a, 0, sizeof a);
    a.W = &L->kv_b; a.trans = 0; a.row0 = nope; a.row_zstride = nope + vd;
    a.d_x = e->olat; a.ldx = (long)H * lora; a.x_zstride = lora;
    a.d_y = e->attn; a.ldy = (long)H * vd; a.y_zstride = vd;
    a.M = T; a.N = vd; a.K = lora; a.Z = H;
    if ((rc = dsi__cuda_gemm(&a, e->stream))) return rc;
    if ((rc = mm(e, &L->o_proj, e->attn, T, (long)H * vd, e->x, D, 1))) return rc;
    if ((rc = dsi__cuda_rmsnorm(e->x, D, L->ffn_norm, T, D, eps, e->xn, D, e->stream))) return rc;
    /* FFN */
    if (!L->is_moe) return mlp(e, &L->gate, &L->up, &L->down, e->xn, T, e->x);
    return moe(e, L, T);
}

/* Enqueues the whole step on e->stream (capturable: no host synchronisation). */
static int forward(dsi_cuda_engine *e, int T, int R) {
    const dsi_config *c = &e->c;
    int D = c->hidden, rc;
    if ((rc = dsi__cuda_embed(&e->embed, e->d_in, T, e->x, e->stream))) return rc;
    int nl = e->run_layers > 0 && e->run_layers < c->n_layers ? e->run_layers : c->n_layers;
    for (int l = 0; l < nl; l++)
        if ((rc = layer_forward(e, l, T))) return dsi_error_prefix(rc, "layer %d", l);
    if ((rc = dsi__cuda_rmsnorm(e->x, D, e->final_norm, T, D, (float)c->rms_norm_eps, e->xn, D, e->stream))) return rc;
    if (R == 0) return DSI_OK;
    if ((rc = dsi__cuda_gather_rows(e->xn, e->d_in + e->off_rows, R, D, e->lrows, e->stream))) return rc;
    return mm(e, &e->lm_head, e->lrows, R, D, e->logits, c->vocab_size, 0);
}

/* Runs forward() for (T, R) from a cached graph. The first step of a shape
 * runs eagerly (it creates the cuBLASLt plans, host-side work that should not
 * happen inside a capture, and shows kernel errors where they occur); the
 * second captures and instantiates; later ones replay. */
static int forward_graph(dsi_cuda_engine *e, int T, int R) {
    graph_entry *hit = NULL, *victim = &e->graphs[0];
    for (int i = 0; i < N_GRAPHS; i++) {
        graph_entry *g = &e->graphs[i];
        if (g->state && g->T == T && g->R == R) { hit = g; break; }
        if (victim->state && (!g->state || g->last_use < victim->last_use)) victim = g;
    }
    if (!hit) {
        if (victim->exec) cudaGraphExecDestroy(victim->exec);
        victim->exec = NULL;
        victim->state = 1;
        victim->T = T;
        victim->R = R;
        victim->last_use = ++e->n_steps;
        return forward(e, T, R);
    }
    hit->last_use = ++e->n_steps;
    if (hit->state == 1) {
        cudaGraph_t graph = NULL;
        int rc = DSI_CU(cudaStreamBeginCapture(e->stream, cudaStreamCaptureModeThreadLocal));
        if (rc) return rc;
        e->capturing = 1;
        int frc = forward(e, T, R);
        e->capturing = 0;
        rc = DSI_CU(cudaStreamEndCapture(e->stream, &graph));
        if (frc) { if (graph) cudaGraphDestroy(graph); return frc; }
        if (rc) return rc;
        rc = DSI_CU(cudaGraphInstantiate(&hit->exec, graph, 0));
        cudaGraphDestroy(graph);
        if (rc) { hit->exec = NULL; return rc; }
        hit->state = 2;
    }
    return DSI_CU(cudaGraphLaunch(hit->exec, e->stream));
}

extern "C" int dsi_cuda_engine_step(dsi_cuda_engine *e, const dsi_seq_step *seqs, int n_seqs) {
    const dsi_config *c = &e->c;
    const dsi_cuda_opts *o = &e->o;
    int bt = DSI_KV_BLOCK_TOKENS;
    if (n_seqs <= 0) return dsi_error(DSI_EINVAL, "cuda step: empty batch");
    if (n_seqs > o->max_seqs) return dsi_error(DSI_ERANGE, "cuda step: %d sequences exceed %d", n_seqs, o->max_seqs);
    int32_t *tok = e->h_in, *pos = e->h_in + e->off_pos, *seq = e->h_in + e->off_seq, *rows = e->h_in + e->off_rows;
    int32_t *btab = e->h_in + e->off_btab;
    int T = 0, R = 0;
    for (int s = 0; s < n_seqs; s++) {
        const dsi_seq_step *q = &seqs[s];
        if (q->n_tokens <= 0 || !q->tokens) return dsi_error(DSI_EINVAL, "cuda step: sequence %d has no tokens", s);
        if (q->pos < 0 || (int64_t)q->pos + q->n_tokens > (int64_t)q->n_blocks * bt)
            return dsi_error(DSI_EINVAL, "cuda step: sequence %d: positions [%d, %d) exceed its %d blocks", s, q->pos,
                             q->pos + q->n_tokens, q->n_blocks);
        if ((int64_t)q->pos + q->n_tokens > c->max_position_embeddings)
            return dsi_error(DSI_ERANGE, "cuda step: sequence %d reaches position %d beyond the model's %d", s,
                             q->pos + q->n_tokens, c->max_position_embeddings);
        int nb = DSI_CEIL_DIV(q->pos + q->n_tokens, bt);
        if (nb > o->max_blocks_per_seq)
            return dsi_error(DSI_ERANGE, "cuda step: sequence %d needs %d blocks, the table holds %d", s, nb,
                             o->max_blocks_per_seq);
        for (int b = 0; b < nb; b++) {
            int id = q->blocks[b];
            if (id < 0 || id >= o->kv_blocks || !e->allocated[id])
                return dsi_error(DSI_EINVAL, "cuda step: sequence %d: block %d (%d) is not allocated", s, b, id);
            btab[(long)s * o->max_blocks_per_seq + b] = id;
        }
        if (q->logits != DSI_LOGITS_NONE && !q->out_logits)
            return dsi_error(DSI_EINVAL, "cuda step: sequence %d wants logits but has no buffer", s);
        if (T + q->n_tokens > o->max_tokens)
            return dsi_error(DSI_ERANGE, "cuda step: %d tokens exceed the step budget %d", T + q->n_tokens, o->max_tokens);
        int nr = q->logits == DSI_LOGITS_ALL ? q->n_tokens : q->logits == DSI_LOGITS_LAST ? 1 : 0;
        if (R + nr > o->max_logits)
            return dsi_error(DSI_ERANGE, "cuda step: %d logit rows exceed %d", R + nr, o->max_logits);
        for (int i = 0; i < q->n_tokens; i++) {
            if (q->tokens[i] < 0 || q->tokens[i] >= c->vocab_size)
                return dsi_error(DSI_EINVAL, "cuda step: token id %d out of range [0, %d)", q->tokens[i], c->vocab_size);
            tok[T + i] = q->tokens[i];
            pos[T + i] = q->pos + i;
            seq[T + i] = s;
        }
        for (int i = 0; i < nr; i++) rows[R + i] = T + q->n_tokens - nr + i;
        T += q->n_tokens;
        R += nr;
    }
    cudaStream_t st = e->stream;
    /* inputs: the token/position/row arrays, then the used block-table rows */
    int rc = DSI_CU(cudaMemcpyAsync(e->d_in, e->h_in, sizeof(int32_t) * e->off_btab, cudaMemcpyHostToDevice, st));
    if (!rc)
        rc = DSI_CU(cudaMemcpyAsync(e->d_in + e->off_btab, btab, sizeof(int32_t) * n_seqs * o->max_blocks_per_seq,
                                    cudaMemcpyHostToDevice, st));
    if (rc) return rc;
    if (o->graphs && T <= o->graph_max_tokens) rc = forward_graph(e, T, R);
    else rc = forward(e, T, R);
    if (rc) { cudaStreamSynchronize(st); return rc; }
    /* logits back, in row order */
    long V = c->vocab_size;
    int r = 0;
    for (int s = 0; s < n_seqs && !rc; s++) {
        const dsi_seq_step *q = &seqs[s];
        int nr = q->logits == DSI_LOGITS_ALL ? q->n_tokens : q->logits == DSI_LOGITS_LAST ? 1 : 0;
        if (nr)
            rc = DSI_CU(cudaMemcpyAsync(q->out_logits, e->logits + (long)r * V, sizeof(float) * nr * V,
                                        cudaMemcpyDeviceToHost, st));
        r += nr;
    }
    int src = DSI_CU(cudaStreamSynchronize(st));
    return rc ? rc : src;
}

extern "C" int dsi_cuda_engine_logits(dsi_cuda_engine *e, const int32_t *ids, int n, int chunk, int decode_from,
                                      float *out) {
    int bt = DSI_KV_BLOCK_TOKENS, nb = DSI_CEIL_DIV(n, bt), V = e->c.vocab_size;
    if (n <= 0) return dsi_error(DSI_EINVAL, "no tokens");
    int32_t *blocks = (int32_t *)malloc(sizeof(int32_t) * nb);
    if (!blocks) return dsi_error(DSI_ENOMEM, "out of memory");
    int got = 0, rc = DSI_OK;
    for (; got < nb; got++) {
        int b = dsi_cuda_kv_alloc(e);
        if (b < 0) { rc = dsi_error(DSI_EBUSY, "cuda KV full: %d tokens need %d blocks", n, nb); break; }
        blocks[got] = b;
    }
    int prefill_end = decode_from >= 0 && decode_from < n ? decode_from : n;
    if (decode_from == 0) prefill_end = 0;
    int step = chunk > 0 ? chunk : e->o.max_tokens;
    step = DSI_MIN(step, DSI_MIN(e->o.max_tokens, e->o.max_logits));
    for (int p = 0; rc == DSI_OK && p < prefill_end; p += step) {
        int k = DSI_MIN(step, prefill_end - p);
        dsi_seq_step s = {ids + p, k, p, blocks, nb, DSI_LOGITS_ALL, out + (size_t)p * V};
        rc = dsi_cuda_engine_step(e, &s, 1);
    }
    for (int p = prefill_end; rc == DSI_OK && p < n; p++) {
        dsi_seq_step s = {ids + p, 1, p, blocks, nb, DSI_LOGITS_ALL, out + (size_t)p * V};
        rc = dsi_cuda_engine_step(e, &s, 1);
    }
    for (int i = 0; i < got; i++) dsi_cuda_kv_release(e, blocks[i]);
    free(blocks);
    return rc;
}

extern "C" int dsi__cuda_engine_run_layers(dsi_cuda_engine *e, int n) {
    int rc = DSI_CU(cudaStreamSynchronize(e->stream));
    for (int i = 0; i < N_GRAPHS; i++) {
        if (e->graphs[i].exec) cudaGraphExecDestroy(e->graphs[i].exec);
        memset(&e->graphs[i], 0, sizeof e->graphs[i]);
    }
    e->run_layers = n;
    return rc;
}

extern "C" int dsi__cuda_engine_experts_hit(dsi_cuda_engine *e) {
    int E = e->c.n_experts, hit = 0;
    if (E <= 0 || cudaStreamSynchronize(e->stream) != cudaSuccess) return -1;
    if (cudaMemcpy(e->h_off, e->offset, sizeof(int) * (E + 1), cudaMemcpyDeviceToHost) != cudaSuccess) return -1;
    for (int x = 0; x < E; x++) hit += e->h_off[x + 1] > e->h_off[x];
    return hit;
}
