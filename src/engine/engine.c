/* The step executor: embedding, the layers as stages, final norm, lm_head. */
#include "engine/engine_impl.h"
#include "kernels/dtype.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ matmul glue */

typedef struct mm_job {
    const dsi_engine *e;
    dsi_matmul_fn fn;
    const dsi_mat *W;
    const float *x;
    int M, ldx, ldy, n_base, accumulate;
    float *y;
} mm_job;

static void mm_task(void *ctx, int64_t b, int64_t end, int tid) {
    const mm_job *j = ctx;
    j->fn(j->W, j->x, j->M, j->ldx, j->y, j->ldy, j->n_base, j->n_base + (int)b, j->n_base + (int)end, j->accumulate);
}

/* Quantises rows of x to e4m3 per 1x128 tile (scale = amax/448) and back:
 * the numerics of an FP8 GEMM with per-token-per-128-channel activation
 * scales, as DeepSeek serves. */
static const float *maybe_quantise(dsi_engine *e, const dsi_mat *W, const float *x, int M, int ldx, int *ldx_out) {
    if (!e->opts.fp8_activations || W->dtype != DSI_F8_E4M3) return x;
    int K = W->cols;
    float *q = e->s.xq;
    for (int m = 0; m < M; m++) {
        memcpy(q + (size_t)m * K, x + (size_t)m * ldx, sizeof(float) * K);
        dsi__moe_io_round_in(e->k, DSI_MOE_IO_FP8, q + (size_t)m * K, K); /* the one FP8 activation quantiser */
    }
    *ldx_out = K;
    return q;
}

/* Below this much work (~25 us on one core, compute- or memory-bound: an FP8 GEMV of 1 MB) a job runs on
 * the calling thread. */
#define PARALLEL_MIN_FLOPS 2e6

dsi_pool *dsi__pool_for_work(const dsi_engine *e, double flops) {
    return flops >= PARALLEL_MIN_FLOPS ? e->pool : NULL;
}

typedef struct q8_job {
    const dsi_engine *e;
    const dsi_mat *W;
    uint16_t *xq; /* written by quant_task, read by q8_task */
    float *xs;
    int ldq, lds, M, ldy, n_base, accumulate;
    float *y;
    const float *x; /* the rows to quantise into xq, xs */
    int ldx;
} q8_job;

static void quant_task(void *ctx, int64_t b, int64_t end, int tid) {
    const q8_job *j = ctx;
    (void)tid;
    for (int64_t m = b; m < end; m++)
        j->e->k->fp8_quant(j->x + m * j->ldx, j->W->cols, j->xq + m * j->ldq, j->xs + m * j->lds);
}

static void q8_task(void *ctx, int64_t b, int64_t end, int tid) {
    const q8_job *j = ctx;
    j->e->k->matmul_q8(j->W, j->xq, j->ldq, j->xs, j->lds, j->M, j->y, j->ldy, j->n_base, j->n_base + (int)b,
                       j->n_base + (int)end, j->accumulate);
}

/* FP8 activations through the FP8 x FP8 kernel: quantise the rows to e4m3
 * (bf16-encoded) with one scale per 128 columns, then run the exact-product
 * GEMM. Returns 0 when that path does not apply. */
static int try_q8(dsi_engine *e, const dsi_mat *W, int n0, int n1, const float *x, int M, int ldx, float *y, int ldy,
                  int y_col0, int accumulate) {
    if (!e->opts.fp8_activations || W->dtype != DSI_F8_E4M3 || W->block_cols != 128 || !e->k->matmul_q8 || M < DSI_Q8_MIN_ROWS ||
        e->opts.batch_invariant)
        return 0;
    /* rows 64 bytes longer than the tiles they hold: a multiple of 2 KB
     * apart, the kernel's rows of a tile would share a few L1 sets */
    int K = W->cols, lds = DSI_CEIL_DIV(K, 128), ldq = lds * 128 + 32;
    uint16_t *xq = (uint16_t *)e->s.xq;
    float *xs = (float *)(xq + (size_t)M * ldq);
    q8_job j = {e, W, xq, xs, ldq, lds, M, ldy, n0, accumulate, y - (n0 - y_col0), x, ldx};
    /* an element quantised costs about what 64 flops of a matmul do (the
     * threshold is a time) */
    dsi_pool_for(dsi__pool_for_work(e, 64.0 * M * K), M, 4, quant_task, &j);
    dsi_pool_for(dsi__pool_for_work(e, 2.0 * M * (n1 - n0) * K), n1 - n0, 32, q8_task, &j);
    return 1;
}

dsi_matmul_fn dsi__matmul_fn(const dsi_engine *e) {
    return e->opts.batch_invariant ? e->k->matmul_rowwise : e->k->matmul;
}

typedef struct pad_job {
    const float *x;
    float *out;
    int K, ldx, ld;
} pad_job;

static void pad_task(void *ctx, int64_t b, int64_t end, int tid) {
    const pad_job *j = ctx;
    (void)tid;
    for (int64_t m = b; m < end; m++) memcpy(j->out + m * j->ld, j->x + m * j->ldx, sizeof(float) * j->K);
}

/* The panel GEMMs read PM activation rows at once; rows a multiple of 2 KB
 * apart (K = 2048, 7168, 8192: most of a DeepSeek-V3-shaped model) share L1
 * sets and thrash (see dsi__panel_x). The AVX-512 kernel copies such x per
 * row group and k-block: ~5% of a 2-thread prefill, as every chunk of a
 * matmul copied all of x again. Here x is copied once per matmul, split over
 * the pool, into the FP8 activation scratch (unused unless FP8 activations
 * are on) with rows 16 floats longer; the kernels then read it in place
 * (memmove 5% -> under 2% of samples; 512-token prefill +3% on one and two
 * threads, alternating in one process). */
const float *dsi__pad_rows(dsi_engine *e, const float *x, int M, int K, int *ldx) {
    if (M < DSI_PANEL_MIN_ROWS || *ldx % 512 || e->opts.fp8_activations || x == e->s.xq ||
        (size_t)M * (K + 16) > e->s.xq_floats)
        return x;
    pad_job j = {x, e->s.xq, K, *ldx, K + 16};
    /* a float copied costs about what 64 flops of a matmul do (the threshold is a time) */
    dsi_pool_for(dsi__pool_for_work(e, 64.0 * M * K), M, 8, pad_task, &j);
    *ldx = K + 16;
    return e->s.xq;
}

static void matmul_rows_impl(dsi_engine *e, const dsi_mat *W, int n0, int n1, const float *x, int M, int ldx, float *y,
                             int ldy) {
    if (M <= 0 || n1 <= n0) return;
    if (try_q8(e, W, n0, n1, x, M, ldx, y, ldy, n0, 0)) return;
    x = maybe_quantise(e, W, x, M, ldx, &ldx);
    x = dsi__pad_rows(e, x, M, W->cols, &ldx);
    mm_job j = {e, dsi__matmul_fn(e), W, x, M, ldx, ldy, n0, 0, y};
    /* grain: 16 rows keeps tiles 4-aligned; bigger when M is large so each
     * task streams a useful share of the activations */
    int64_t grain = M >= 64 ? 64 : 16;
    dsi_pool_for(dsi__pool_for_work(e, 2.0 * M * (n1 - n0) * W->cols), n1 - n0, grain, mm_task, &j);
}

static void matmul_impl(dsi_engine *e, const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int accumulate) {
    if (M <= 0) return;
    if (try_q8(e, W, 0, W->rows, x, M, ldx, y, ldy, 0, accumulate)) return;
    x = maybe_quantise(e, W, x, M, ldx, &ldx);
    x = dsi__pad_rows(e, x, M, W->cols, &ldx);
    mm_job j = {e, dsi__matmul_fn(e), W, x, M, ldx, ldy, 0, accumulate, y};
    int64_t grain = M >= 64 ? 64 : 16;
    dsi_pool_for(dsi__pool_for_work(e, 2.0 * M * W->rows * W->cols), W->rows, grain, mm_task, &j);
}

/* The expert-parallel runtime polls its transfers after every matmul. */
void dsi__matmul_rows(dsi_engine *e, const dsi_mat *W, int n0, int n1, const float *x, int M, int ldx, float *y,
                      int ldy) {
    matmul_rows_impl(e, W, n0, n1, x, M, ldx, y, ldy);
    if (e->poll_hook) e->poll_hook(e->poll_ctx);
}

void dsi__matmul(dsi_engine *e, const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int accumulate) {
    matmul_impl(e, W, x, M, ldx, y, ldy, accumulate);
    if (e->poll_hook) e->poll_hook(e->poll_ctx);
}

/* ------------------------------------------------------------ small ops */

void dsi__rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

typedef struct norm_job {
    const float *x, *w;
    size_t ldx, ldo;
    int n;
    float eps, *out;
} norm_job;

static void norm_task(void *ctx, int64_t b, int64_t end, int tid) {
    const norm_job *j = ctx;
    (void)tid;
    for (int64_t t = b; t < end; t++) dsi__rmsnorm(j->x + (size_t)t * j->ldx, j->w, j->n, j->eps, j->out + (size_t)t * j->ldo);
}

void dsi__rmsnorm_rows(dsi_engine *e, const float *x, size_t ldx, const float *w, int n, float eps, float *out,
                       size_t ldo, int T) {
    norm_job j = {x, w, ldx, ldo, n, eps, out};
    dsi_pool_for(T >= ROWS_PARALLEL_MIN ? e->pool : NULL, T, 8, norm_task, &j);
}

/* The rotation of position pos: cs[i] = cos, cs[half + i] = sin of angle i,
 * both times the yarn mscale. Angles are float32 products as in both
 * references. Once per row per step: every head of every layer reuses it. */
static void rope_angles(const dsi_engine *e, int pos, float *cs) {
    int half = e->c->qk_rope_dim / 2;
    for (int i = 0; i < half; i++) {
        float ang = e->inv_freq[i] * (float)pos;
        cs[i] = (float)cos((double)ang) * e->rope_mscale;
        cs[half + i] = (float)sin((double)ang) * e->rope_mscale;
    }
}

/* Interleaved pairs (2i, 2i+1) as DeepSeek's reference (HF's rope_interleave
 * permutes q and k alike, so dot products match); otherwise the rotate-half
 * pairing (i, i+d/2). */
void dsi__rope(const dsi_engine *e, float *v, const float *cs) {
    int half = e->c->qk_rope_dim / 2;
    for (int i = 0; i < half; i++) {
        int a = e->c->rope_interleave ? 2 * i : i, b = e->c->rope_interleave ? 2 * i + 1 : i + half;
        float x0 = v[a], x1 = v[b];
        v[a] = x0 * cs[i] - x1 * cs[half + i];
        v[b] = x1 * cs[i] + x0 * cs[half + i];
    }
}

/* ------------------------------------------------------------ lifecycle */

/* Frees a scratch set. The per-thread attention buffers belong to the
 * engine's own set only (`own_threads`): micro-batch sets borrow them, since
 * they are used within one stage at a time. */
static void scratch_free(dsi_engine *e, dsi_scratch *s, int own_threads) {
    float **fs[] = {&s->x, &s->xn, &s->qa, &s->q, &s->kva, &s->attn, &s->y, &s->h1, &s->h2, &s->xq, &s->topk_w,
                    &s->exp_wts, &s->ex, &s->eh1, &s->eh2, &s->kvdec, &s->ostate, &s->router, &s->rope_cs};
    for (size_t i = 0; i < sizeof fs / sizeof fs[0]; i++) { dsi_free(*fs[i]); *fs[i] = NULL; }
    dsi_free(s->topk_ids); dsi_free(s->exp_count); dsi_free(s->exp_offset); dsi_free(s->exp_tokens);
    dsi_free(s->tok_slot);
    dsi_free(s->tok_pos);
    if (own_threads) {
        int nt = dsi_pool_size(e->pool);
        for (int t = 0; s->th_scores && t < nt; t++) dsi_free(s->th_scores[t]);
        for (int t = 0; s->th_vec && t < nt; t++) dsi_free(s->th_vec[t]);
        free(s->th_scores); free(s->th_vec);
    }
    memset(s, 0, sizeof *s);
}

void dsi_engine_destroy(dsi_engine *e) {
    if (!e) return;
    if (e->profile)
        fprintf(stderr, "dsinfer profile: attn0 %.3f s, attn1 %.3f s, dense ffn %.3f s, moe %.3f s, lm_head %.3f s\n",
                e->prof[0], e->prof[1], e->prof[2], e->prof[3], e->prof[4]);
    scratch_free(e, &e->s, 1);
    dsi_free(e->lm_buf);
    dsi_pool_destroy(e->pool);
    free(e->inv_freq);
    free(e->seqs);
    free(e);
}

#define ATTN_CHUNK 64 /* context positions decompressed at a time (prefill form) */

/* Allocates a scratch set for max_tokens rows (see scratch_free for
 * `own_threads`). DSI_ENOMEM leaves `s` zeroed. */
static int scratch_alloc(dsi_engine *e, dsi_scratch *s, int own_threads) {
    const dsi_config *c = e->c;
    size_t T = e->max_tokens, D = c->hidden, H = c->n_heads, qk = dsi_config_qk_head_dim(c);
    size_t kvd = dsi_config_kv_dim(c), topk = c->n_experts_per_tok > 0 ? c->n_experts_per_tok : 1;
    size_t inter = DSI_MAX((size_t)c->dense_inter, (size_t)c->moe_inter * DSI_MAX(1, c->n_shared_experts));
    size_t max_in = DSI_MAX(DSI_MAX(D, (size_t)c->q_lora_rank), DSI_MAX(inter, H * c->v_head_dim));
    max_in = DSI_MAX(max_in, (size_t)c->kv_lora_rank);
    size_t TE = T * topk, E = c->n_experts > 0 ? c->n_experts : 1;
    s->x = dsi_alloc(T * D * 4);
    s->xn = dsi_alloc(T * D * 4);
    s->qa = dsi_alloc(T * DSI_MAX(1, c->q_lora_rank) * 4);
    s->q = dsi_alloc(T * H * qk * 4);
    s->kva = dsi_alloc(T * kvd * 4);
    s->attn = dsi_alloc(T * H * c->v_head_dim * 4);
    s->y = dsi_alloc(T * D * 4);
    s->h1 = dsi_alloc(T * inter * 4);
    s->h2 = dsi_alloc(T * inter * 4);
    /* float copies, or bf16 codes + per-128 scales (try_q8), of up to max(T, chunk) rows */
    s->xq_floats = DSI_MAX(T, (size_t)ATTN_CHUNK) * (max_in + 256);
    s->xq = dsi_alloc(s->xq_floats * 4);
    s->topk_ids = dsi_alloc(TE * sizeof(int));
    s->topk_w = dsi_alloc(TE * 4);
    s->exp_count = dsi_alloc(E * sizeof(int));
    s->exp_offset = dsi_alloc((E + 1) * sizeof(int));
    s->exp_tokens = dsi_alloc(TE * sizeof(int));
    s->tok_slot = dsi_alloc(TE * sizeof(int));
    s->exp_wts = dsi_alloc(TE * 4);
    s->ex = dsi_alloc(TE * D * 4);
    s->eh1 = dsi_alloc(TE * DSI_MAX(1, c->moe_inter) * 4);
    s->eh2 = dsi_alloc(TE * DSI_MAX(1, c->moe_inter) * 4);
    s->tok_pos = dsi_alloc(T * sizeof(int));
    s->rope_cs = dsi_alloc(T * DSI_MAX(2, c->qk_rope_dim) * 4);
    s->kvdec = dsi_alloc((size_t)ATTN_CHUNK * H * (c->qk_nope_dim + c->v_head_dim) * 4);
    s->ostate = dsi_alloc(T * H * (c->v_head_dim + 2) * 4);
    s->router = dsi_alloc(T * E * 4);
    int nt = dsi_pool_size(e->pool);
    if (own_threads) {
        s->th_scores = calloc(nt, sizeof(float *));
        s->th_vec = calloc(nt, sizeof(float *));
    } else {
        s->th_scores = e->s.th_scores;
        s->th_vec = e->s.th_vec;
    }
    int ok = s->x && s->xn && s->qa && s->q && s->kva && s->attn && s->y && s->h1 && s->h2 && s->xq && s->topk_ids &&
             s->topk_w && s->exp_count && s->exp_offset && s->exp_tokens && s->tok_slot && s->exp_wts && s->ex && s->eh1 && s->eh2 &&
             s->tok_pos && s->rope_cs && s->kvdec && s->ostate && s->router && s->th_scores && s->th_vec;
    for (int t = 0; ok && own_threads && t < nt; t++) {
        s->th_scores[t] = dsi_alloc((size_t)ATTN_HEAD_GROUP * e->max_ctx * 4 + 64);
        /* per head: the absorbed query with its rope part [kv dim], the latent output [lora] */
        s->th_vec[t] = dsi_alloc(((size_t)ATTN_HEAD_GROUP * (dsi_config_kv_dim(c) + c->kv_lora_rank) + 64) * 4);
        ok = s->th_scores[t] && s->th_vec[t];
    }
    if (!ok) {
        scratch_free(e, s, own_threads);
        return DSI_ENOMEM;
    }
    return DSI_OK;
}


int dsi_engine_create(const dsi_model *m, dsi_kv_pool *kv, const dsi_engine_opts *opts, dsi_engine **out) {
    *out = NULL;
    const dsi_config *c = dsi_model_config(m);
    if (dsi_kv_dim(kv) != dsi_config_kv_dim(c) || dsi_kv_n_layers(kv) != c->n_layers)
        return dsi_error(DSI_EINVAL, "engine: KV pool geometry (%d layers x %d) does not match the model (%d x %d)",
                         dsi_kv_n_layers(kv), dsi_kv_dim(kv), c->n_layers, dsi_config_kv_dim(c));
    if (dsi_kv_block_tokens(kv) > ATTN_CHUNK)
        return dsi_error(DSI_EINVAL, "engine: KV blocks of %d tokens exceed the attention chunk of %d",
                         dsi_kv_block_tokens(kv), ATTN_CHUNK);
    dsi_engine *e = calloc(1, sizeof *e);
    if (!e) return dsi_error(DSI_ENOMEM, "out of memory");
    e->m = m;
    e->c = c;
    e->kv = kv;
    if (opts) e->opts = *opts;
    e->max_tokens = e->opts.max_tokens > 0 ? e->opts.max_tokens : 2048;
    e->profile = getenv("DSI_PROFILE") != NULL;
    if (e->opts.absorb_max_tokens <= 0) e->opts.absorb_max_tokens = 32;
    /* AUTO picks the form by how many tokens a sequence brings to a step,
     * which chunking and EP's micro-batch split change: fix it */
    if (e->opts.batch_invariant && e->opts.attn == DSI_ATTN_AUTO) e->opts.attn = DSI_ATTN_ABSORBED;
    e->k = e->opts.kernels ? dsi_kernels_by_name(e->opts.kernels) : dsi_kernels_select();
    if (!e->k) {
        int rc = dsi_error(DSI_EUNSUPPORTED, "engine: kernels '%s' are not available on this CPU", e->opts.kernels);
        free(e);
        return rc;
    }
    e->pool = dsi_pool_create(e->opts.n_threads);
    e->inv_freq = calloc(c->qk_rope_dim / 2, sizeof(float));
    e->seqs = calloc(e->max_tokens, sizeof(dsi_step_seq));
    if (!e->pool || !e->inv_freq || !e->seqs) { dsi_engine_destroy(e); return dsi_error(DSI_ENOMEM, "out of memory"); }
    dsi_config_rope(c, e->inv_freq, &e->rope_mscale, &e->softmax_scale);
    e->max_ctx = dsi_kv_n_blocks(kv) * dsi_kv_block_tokens(kv);

    if (scratch_alloc(e, &e->s, 1) != DSI_OK) {
        int T = e->max_tokens;
        dsi_engine_destroy(e);
        return dsi_error(DSI_ENOMEM, "engine: cannot allocate scratch for %d tokens per step", T);
    }
    *out = e;
    return DSI_OK;
}

int dsi_engine_max_tokens(const dsi_engine *e) { return e->max_tokens; }
const dsi_model *dsi_engine_model(const dsi_engine *e) { return e->m; }
dsi_kv_pool *dsi_engine_kv(const dsi_engine *e) { return e->kv; }
const char *dsi_engine_kernels_name(const dsi_engine *e) { return e->k->name; }
int dsi_engine_n_threads(const dsi_engine *e) { return dsi_pool_size(e->pool); }

void dsi_engine_capture_hidden(dsi_engine *e, float *buf, int max_tokens) {
    e->capture = buf;
    e->capture_tokens = max_tokens;
}

static void capture(dsi_engine *e, int slot, const float *x) {
    if (!e->capture || e->T > e->capture_tokens) return;
    memcpy(e->capture + (size_t)slot * e->capture_tokens * e->c->hidden, x, sizeof(float) * e->T * e->c->hidden);
}

/* ------------------------------------------------------------ the step */

static void embed_rows(dsi_engine *e, const dsi_seq_step *seqs, int n_seqs) {
    const dsi_mat *E = &e->m->embed;
    int D = e->c->hidden;
    for (int s = 0; s < n_seqs; s++)
        for (int i = 0; i < seqs[s].n_tokens; i++) {
            int t = e->seqs[s].t0 + i;
            dsi_mat_row_f32(E, seqs[s].tokens[i], 0, D, e->s.x + (size_t)t * D);
        }
}

int dsi__step_begin(dsi_engine *e, const dsi_seq_step *seqs, int n_seqs) {
    const dsi_config *c = e->c;
    int bt = dsi_kv_block_tokens(e->kv);
    if (n_seqs < 0 || n_seqs > e->max_tokens) return dsi_error(DSI_EINVAL, "engine step: bad batch size %d", n_seqs);
    e->n_seqs = 0;
    e->T = 0;
    int T = 0;
    for (int s = 0; s < n_seqs; s++) {
        const dsi_seq_step *q = &seqs[s];
        if (q->n_tokens <= 0 || !q->tokens) return dsi_error(DSI_EINVAL, "engine step: sequence %d has no tokens", s);
        if (q->pos < 0 || (int64_t)q->pos + q->n_tokens > (int64_t)q->n_blocks * bt)
            return dsi_error(DSI_EINVAL, "engine step: sequence %d: positions [%d, %d) exceed its %d blocks", s, q->pos,
                             q->pos + q->n_tokens, q->n_blocks);
        if ((int64_t)q->pos + q->n_tokens > c->max_position_embeddings)
            return dsi_error(DSI_ERANGE, "engine step: sequence %d reaches position %d beyond the model's %d", s,
                             q->pos + q->n_tokens, c->max_position_embeddings);
        for (int b = 0; b < DSI_CEIL_DIV(q->pos + q->n_tokens, bt); b++)
            if (q->blocks[b] < 0 || q->blocks[b] >= dsi_kv_n_blocks(e->kv) || dsi_kv_refcount(e->kv, q->blocks[b]) <= 0)
                return dsi_error(DSI_EINVAL, "engine step: sequence %d: block %d (%d) is not allocated", s, b, q->blocks[b]);
        for (int i = 0; i < q->n_tokens; i++)
            if (q->tokens[i] < 0 || q->tokens[i] >= c->vocab_size)
                return dsi_error(DSI_EINVAL, "engine step: token id %d out of range [0, %d)", q->tokens[i], c->vocab_size);
        if (q->logits != DSI_LOGITS_NONE && !q->out_logits)
            return dsi_error(DSI_EINVAL, "engine step: sequence %d wants logits but has no buffer", s);
        if (T + q->n_tokens > e->max_tokens)
            return dsi_error(DSI_ERANGE, "engine step: %d tokens exceed the step budget %d", T + q->n_tokens, e->max_tokens);
        dsi_step_seq *ss = &e->seqs[s];
        ss->t0 = T;
        ss->n = q->n_tokens;
        ss->pos = q->pos;
        ss->blocks = q->blocks;
        ss->absorbed = e->opts.attn == DSI_ATTN_ABSORBED ||
                       (e->opts.attn == DSI_ATTN_AUTO && q->n_tokens <= e->opts.absorb_max_tokens);
        for (int i = 0; i < q->n_tokens; i++) {
            e->s.tok_pos[T + i] = q->pos + i;
            rope_angles(e, q->pos + i, e->s.rope_cs + (size_t)(T + i) * c->qk_rope_dim);
        }
        T += q->n_tokens;
    }
    e->n_seqs = n_seqs;
    e->T = T;

    embed_rows(e, seqs, n_seqs);
    return DSI_OK;
}

/* Sequences whose last row's logits go through one lm_head matmul: a
 * batch of decoding sequences reads the LM head (131 MB in BF16 for `small`,
 * 1.85 GB for V3) once per group instead of once per sequence. With 16 rows
 * the matmul is bound by arithmetic, not by that read, on a CPU. */
#define LM_GROUP 16

/* lm_head on the gathered last rows of the sequences in `idx` (n of them),
 * each logits row copied to its sequence's buffer. */
static void lm_head_group(dsi_engine *e, const dsi_seq_step *seqs, const int *idx, int n) {
    int D = e->c->hidden, V = e->c->vocab_size;
    float *xg = e->lm_buf, *yg = e->lm_buf + (size_t)LM_GROUP * D;
    for (int i = 0; i < n; i++) {
        const dsi_step_seq *ss = &e->seqs[idx[i]];
        memcpy(xg + (size_t)i * D, e->s.xn + (size_t)(ss->t0 + ss->n - 1) * D, sizeof(float) * D);
    }
    dsi__matmul(e, &e->m->lm_head, xg, n, D, yg, V, 0);
    for (int i = 0; i < n; i++) memcpy(seqs[idx[i]].out_logits, yg + (size_t)i * V, sizeof(float) * V);
}

void dsi__step_end(dsi_engine *e, const dsi_seq_step *seqs, int n_seqs) {
    const dsi_config *c = e->c;
    int D = c->hidden, V = c->vocab_size, T = e->T;
    double tl = e->profile ? dsi_now() : 0;
    dsi__rmsnorm_rows(e, e->s.x, D, e->m->final_norm, D, (float)c->rms_norm_eps, e->s.xn, D, T);
    capture(e, c->n_layers, e->s.xn);
    int n_last = 0;
    for (int s = 0; s < n_seqs; s++) n_last += seqs[s].logits == DSI_LOGITS_LAST;
    if (n_last > 1 && !e->lm_buf) /* without it, one matmul per sequence as below */
        e->lm_buf = dsi_alloc(sizeof(float) * LM_GROUP * ((size_t)D + V));
    int idx[LM_GROUP], n = 0;
    for (int s = 0; s < n_seqs; s++) {
        const dsi_seq_step *q = &seqs[s];
        const dsi_step_seq *ss = &e->seqs[s];
        if (q->logits == DSI_LOGITS_ALL) {
            dsi__matmul(e, &e->m->lm_head, e->s.xn + (size_t)ss->t0 * D, ss->n, D, q->out_logits, V, 0);
        } else if (q->logits == DSI_LOGITS_LAST) {
            if (n_last == 1 || !e->lm_buf) {
                dsi__matmul(e, &e->m->lm_head, e->s.xn + (size_t)(ss->t0 + ss->n - 1) * D, 1, D, q->out_logits, V,
                            0);
                continue;
            }
            idx[n++] = s;
            if (n == LM_GROUP) lm_head_group(e, seqs, idx, n), n = 0;
        }
    }
    if (n) lm_head_group(e, seqs, idx, n);
    if (e->profile) e->prof[4] += dsi_now() - tl;
}

int dsi_engine_step(dsi_engine *e, const dsi_seq_step *seqs, int n_seqs) {
    const dsi_config *c = e->c;
    if (n_seqs <= 0) return dsi_error(DSI_EINVAL, "engine step: empty batch");
    int rc = dsi__step_begin(e, seqs, n_seqs);
    if (rc != DSI_OK) return rc;
    capture(e, 0, e->s.x);
    for (int l = 0; l < c->n_layers; l++) {
        double t0 = e->profile ? dsi_now() : 0;
        if ((rc = dsi__stage_attn0(e, l)) != DSI_OK) return rc;
        double t1 = e->profile ? dsi_now() : 0;
        if ((rc = dsi__stage_attn1(e, l)) != DSI_OK) return rc;
        double t2 = e->profile ? dsi_now() : 0;
        if ((rc = dsi__stage_ffn(e, l)) != DSI_OK) return rc;
        if (e->profile) {
            double t3 = dsi_now();
            e->prof[0] += t1 - t0;
            e->prof[1] += t2 - t1;
            e->prof[e->m->layers[l].is_moe ? 3 : 2] += t3 - t2;
        }
        if (l + 1 < c->n_layers) capture(e, l + 1, e->s.x);
    }
    dsi__step_end(e, seqs, n_seqs);
    return DSI_OK;
}

/* ------------------------------------------------------------ micro-batches */

int dsi__ubatch_init(dsi_engine *e, dsi_ubatch *u) {
    memset(u, 0, sizeof *u);
    u->seqs = calloc(e->max_tokens, sizeof(dsi_step_seq));
    if (!u->seqs || scratch_alloc(e, &u->s, 0) != DSI_OK) {
        free(u->seqs);
        u->seqs = NULL;
        return dsi_error(DSI_ENOMEM, "engine: cannot allocate a micro-batch of %d tokens", e->max_tokens);
    }
    return DSI_OK;
}

void dsi__ubatch_free(dsi_engine *e, dsi_ubatch *u) {
    if (!u || !u->seqs) return;
    scratch_free(e, &u->s, 0);
    free(u->seqs);
    memset(u, 0, sizeof *u);
}

void dsi__ubatch_swap(dsi_engine *e, dsi_ubatch *u) {
    dsi_scratch s = e->s;
    e->s = u->s;
    u->s = s;
    dsi_step_seq *q = e->seqs;
    e->seqs = u->seqs;
    u->seqs = q;
    int n = e->n_seqs;
    e->n_seqs = u->n_seqs;
    u->n_seqs = n;
    int T = e->T;
    e->T = u->T;
    u->T = T;
}

int dsi_engine_logits(dsi_engine *e, const int32_t *ids, int n, int chunk, int decode_from, float *out) {
    int bt = dsi_kv_block_tokens(e->kv), nb = DSI_CEIL_DIV(n, bt), V = e->c->vocab_size;
    if (n <= 0) return dsi_error(DSI_EINVAL, "no tokens");
    int32_t *blocks = malloc(sizeof(int32_t) * nb);
    if (!blocks) return dsi_error(DSI_ENOMEM, "out of memory");
    int got = 0, rc = DSI_OK;
    for (; got < nb; got++) {
        int b = dsi_kv_alloc(e->kv);
        if (b < 0) { rc = dsi_error(DSI_EBUSY, "KV pool full: %d tokens need %d blocks", n, nb); break; }
        blocks[got] = b;
    }
    int prefill_end = decode_from >= 0 && decode_from < n ? decode_from : n;
    if (decode_from == 0) prefill_end = 0;
    int step = chunk > 0 ? chunk : e->max_tokens;
    if (step > e->max_tokens) step = e->max_tokens;
    for (int p = 0; rc == DSI_OK && p < prefill_end; p += step) {
        int k = DSI_MIN(step, prefill_end - p);
        dsi_seq_step s = {ids + p, k, p, blocks, nb, DSI_LOGITS_ALL, out + (size_t)p * V};
        rc = dsi_engine_step(e, &s, 1);
    }
    for (int p = prefill_end; rc == DSI_OK && p < n; p++) {
        dsi_seq_step s = {ids + p, 1, p, blocks, nb, DSI_LOGITS_ALL, out + (size_t)p * V};
        rc = dsi_engine_step(e, &s, 1);
    }
    for (int i = 0; i < got; i++) dsi_kv_release(e->kv, blocks[i]);
    free(blocks);
    return rc;
}
