/* FFN stages: the dense MLP of the first layers, and the MoE layer as
 * SHARED (shared experts) + DISPATCH (group rows by expert; a permutation in
 * one process) + MLP (routed experts) + COMBINE (weighted sum back into the
 * residual). */
#include "core/threadpool.h"
#include "engine/engine_impl.h"
#include "kernels/dtype.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

typedef struct swiglu_job {
    const dsi_kernels *k;
    float *h1;
    const float *h2;
} swiglu_job;

static void swiglu_task(void *ctx, int64_t b, int64_t end, int tid) {
    const swiglu_job *j = ctx;
    (void)tid;
    j->k->silu_mul(j->h1 + b, j->h2 + b, (size_t)(end - b));
}

/* h1 = silu(h1) * h2 over n elements, on the pool from 64K elements on (a
 * 512-token prefill's 4M: serial, ~3% of its time on two threads) */
static void swiglu(dsi_engine *e, float *h1, const float *h2, size_t n) {
    swiglu_job j = {e->k, h1, h2};
    dsi_pool_for(n >= (1 << 16) ? e->pool : NULL, (int64_t)n, 4096, swiglu_task, &j);
}

/* x += down(silu(gate(xn)) * up(xn)) over M rows */
static void mlp_accumulate(dsi_engine *e, const dsi_mat *g, const dsi_mat *u, const dsi_mat *d, const float *xn, int M,
                           int ldx, float *h1, float *h2, float *out, int ldo, int accumulate) {
    int inter = g->rows;
    xn = dsi__pad_rows(e, xn, M, g->cols, &ldx); /* once for gate and up */
    dsi__matmul(e, g, xn, M, ldx, h1, inter, 0);
    dsi__matmul(e, u, xn, M, ldx, h2, inter, 0);
    swiglu(e, h1, h2, (size_t)M * inter);
    dsi__matmul(e, d, h1, M, inter, out, ldo, accumulate);
}

void dsi__moe_gate(const dsi_config *c, const float *logits, const float *bias, int *ids, float *w, float *scratch) {
    int E = c->n_experts, G = c->n_group, per = E / G, K = c->n_experts_per_tok;
    float *score = scratch, *choice = scratch + E;
    for (int i = 0; i < E; i++) {
        score[i] = 1.0f / (1.0f + expf(-logits[i]));
        choice[i] = score[i] + (bias ? bias[i] : 0.0f);
    }
    if (G > 1) {
        /* group score: sum of its top-2 biased scores; keep topk_group groups */
        float gs[4096];
        int keep[4096];
        for (int g = 0; g < G; g++) {
            float a = -FLT_MAX, b = -FLT_MAX;
            for (int i = g * per; i < (g + 1) * per; i++) {
                float v = choice[i];
                if (v > a) { b = a; a = v; }
                else if (v > b) b = v;
            }
            gs[g] = per >= 2 ? a + b : a;
            keep[g] = 0;
        }
        for (int r = 0; r < c->topk_group; r++) {
            int best = -1;
            for (int g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
            keep[best] = 1;
        }
        for (int g = 0; g < G; g++)
            if (!keep[g])
                for (int i = g * per; i < (g + 1) * per; i++) choice[i] = -INFINITY;
    }
    /* top-K experts by biased score (ties: lower id first) */
    for (int r = 0; r < K; r++) {
        int best = -1;
        for (int i = 0; i < E; i++) {
            if (choice[i] == -INFINITY) continue;
            int taken = 0;
            for (int q = 0; q < r; q++) taken |= ids[q] == i;
            if (!taken && (best < 0 || choice[i] > choice[best])) best = i;
        }
        ids[r] = best;
    }
    double sum = 0;
    for (int r = 0; r < K; r++) { w[r] = score[ids[r]]; sum += w[r]; }
    for (int r = 0; r < K; r++) {
        if (c->norm_topk_prob) w[r] = (float)(w[r] / (sum + 1e-20));
        w[r] *= c->routed_scaling_factor;
    }
}

int dsi__stage_gate(dsi_engine *e, int layer) {
    const dsi_config *c = e->c;
    const dsi_layer *L = &e->m->layers[layer];
    dsi_scratch *s = &e->s;
    int T = e->T, D = c->hidden, E = c->n_experts, K = c->n_experts_per_tok;
    if (!L->is_moe || T <= 0) return DSI_OK;
    dsi__matmul(e, &L->router, s->xn, T, D, s->router, E, 0);
    float gate_scratch[2 * 4096];
    for (int t = 0; t < T; t++)
        dsi__moe_gate(c, s->router + (size_t)t * E, L->router_bias, s->topk_ids + (size_t)t * K,
                      s->topk_w + (size_t)t * K, gate_scratch);
    return DSI_OK;
}

int dsi__stage_shared(dsi_engine *e, int layer) {
    const dsi_config *c = e->c;
    const dsi_layer *L = &e->m->layers[layer];
    dsi_scratch *s = &e->s;
    int T = e->T, D = c->hidden;
    if (!L->is_moe)
        mlp_accumulate(e, &L->gate, &L->up, &L->down, s->xn, T, D, s->h1, s->h2, s->x, D, 1);
    else if (c->n_shared_experts > 0)
        mlp_accumulate(e, &L->sh_gate, &L->sh_up, &L->sh_down, s->xn, T, D, s->h1, s->h2, s->x, D, 1);
    return DSI_OK;
}

void dsi__expert_mlp(dsi_engine *e, int layer, int x, float *rows, int n, int ldx, float *h1, float *h2) {
    const dsi_layer *L = &e->m->layers[layer];
    mlp_accumulate(e, &L->exp_gate[x], &L->exp_up[x], &L->exp_down[x], rows, n, ldx, h1, h2, rows, ldx, 0);
}

void dsi__moe_io_round_in(const dsi_kernels *k, dsi_moe_io mode, float *x, int D) {
    if (mode == DSI_MOE_IO_BF16) {
        for (int i = 0; i < D; i++) x[i] = dsi_bf16_to_f32(dsi_f32_to_bf16(x[i]));
    } else if (mode == DSI_MOE_IO_FP8) {
        k->fp8_round(x, D); /* per 128: dsi_fp8_scale, as ep/xfer.c encodes */
    }
}

void dsi__moe_io_round_out(dsi_moe_io mode, float *y, int D) {
    if (mode == DSI_MOE_IO_EXACT) return;
    for (int i = 0; i < D; i++) y[i] = dsi_bf16_to_f32(dsi_f32_to_bf16(y[i]));
}

/* Slots [b, end): the token's row copied in and rounded as dispatch would */
static void gather_task(void *ctx, int64_t b, int64_t end, int tid) {
    dsi_engine *e = ctx;
    dsi_scratch *s = &e->s;
    int D = e->c->hidden;
    (void)tid;
    for (int64_t i = b; i < end; i++) {
        memcpy(s->ex + (size_t)i * D, s->xn + (size_t)s->exp_tokens[i] * D, sizeof(float) * D);
        dsi__moe_io_round_in(e->k, e->opts.moe_io, s->ex + (size_t)i * D, D);
    }
}

/* DISPATCH: the step's (token, expert) rows grouped by expert, rounded as
 * dispatch would round them; the row copies on the pool for large steps
 * (25 MB per layer for a 512-token prefill of `small`). */
static void dispatch_local(dsi_engine *e) {
    const dsi_config *c = e->c;
    dsi_scratch *s = &e->s;
    int T = e->T, E = c->n_experts, K = c->n_experts_per_tok;
    memset(s->exp_count, 0, sizeof(int) * E);
    for (int i = 0; i < T * K; i++) s->exp_count[s->topk_ids[i]]++;
    s->exp_offset[0] = 0;
    for (int x = 0; x < E; x++) s->exp_offset[x + 1] = s->exp_offset[x] + s->exp_count[x];
    memset(s->exp_count, 0, sizeof(int) * E);
    for (int t = 0; t < T; t++)
        for (int r = 0; r < K; r++) {
            int x = s->topk_ids[t * K + r], slot = s->exp_offset[x] + s->exp_count[x]++;
            s->exp_tokens[slot] = t;
            s->exp_wts[slot] = s->topk_w[t * K + r];
            s->tok_slot[t * K + r] = slot;
        }
    dsi_pool_for(T >= ROWS_PARALLEL_MIN ? e->pool : NULL, (int64_t)T * K, 8, gather_task, e);
}

/* Tokens [b, end): each adds its experts' outputs, weighted, in slot order
 * (the order of the serial sum over slots, so the same numbers). */
static void combine_task(void *ctx, int64_t b, int64_t end, int tid) {
    dsi_engine *e = ctx;
    dsi_scratch *s = &e->s;
    int D = e->c->hidden, K = e->c->n_experts_per_tok;
    (void)tid;
    for (int64_t t = b; t < end; t++) {
        const int *ts = s->tok_slot + t * K;
        for (int r = 0, prev = -1; r < K; r++) { /* the token's slots in increasing order (distinct; K is small) */
            int sl = INT_MAX;
            for (int q = 0; q < K; q++)
                if (ts[q] > prev && ts[q] < sl) sl = ts[q];
            prev = sl;
            float *row = s->ex + (size_t)sl * D;
            dsi__moe_io_round_out(e->opts.moe_io, row, D);
            e->k->axpy(s->exp_wts[sl], row, s->x + (size_t)t * D, D);
        }
    }
}

/* COMBINE: weighted sum into the residual */
static void combine_local(dsi_engine *e) {
    dsi_pool_for(e->T >= ROWS_PARALLEL_MIN ? e->pool : NULL, e->T, 4, combine_task, e);
}

int dsi__stage_routed_local(dsi_engine *e, int layer) {
    const dsi_config *c = e->c;
    dsi_scratch *s = &e->s;
    int D = c->hidden;
    if (!e->m->layers[layer].is_moe) return DSI_OK;
    dispatch_local(e);
    /* MLP: each expert over its rows; outputs overwrite the gathered inputs */
    for (int x = 0; x < c->n_experts; x++) {
        int n = s->exp_count[x];
        if (!n) continue;
        dsi__expert_mlp(e, layer, x, s->ex + (size_t)s->exp_offset[x] * D, n, D, s->eh1, s->eh2);
    }
    combine_local(e);
    return DSI_OK;
}

/* ---- decode: every MLP of the layer in two parallel jobs ----
 * With one token per step the shared (or dense) MLP and each routed expert
 * are one-row GEMVs of ~1.5 MB: three fork/joins per MLP, each ending with
 * a thread waiting on the other's last chunk (~3 us, 5% of a 2-thread decode
 * token). Instead the gate and up rows of all the layer's MLPs (SwiGLU on
 * each chunk's rows as it finishes) form one job, and all down rows a
 * second. A batch of decoding sequences (up to FUSED_T_MAX rows) does the
 * same with each MLP over its rows: ~60 routed experts of a few rows each
 * at batch 32. Each output is the kernel's sum for that row, as in the
 * per-expert path (the per-row sums do not depend on the row range a call
 * covers), so the results are those of that path. */
typedef struct mlp_row {
    const dsi_mat *g, *u, *d;
    const float *x; /* [M][D] */
    float *h1, *h2; /* [M][inter] */
    float *out;     /* [M][D], written, or added to when accumulate */
    int accumulate, M;
} mlp_row;

/* items: the shared (or dense) MLP and, at most, every routed expert */
#define FUSED_MAX 272
/* Steps of up to this many rows. With FP8 activations only the routed
 * experts of fewer than DSI_Q8_MIN_ROWS rows, which the per-expert path
 * also runs in the float kernels on quantised rows; the shared or dense MLP
 * and any expert with more rows run on their own through try_q8's FP8 x FP8
 * GEMM, so the results are the per-expert path's. */
#define FUSED_T_MAX 64
/* ~50 us of one core's streaming: a layer's gate/up job of `small` in 16
 * chunks, its down job in 8. Each chunk is a GEMV call per matrix, which
 * permutes and rescales the activation row and starts a new prefetch
 * stream; against 384 KB chunks, two-thread decode alternating in one
 * process ran +1.5 to +5.5% (mean tok/s) while the host's bandwidth was
 * high, +0.2 to +0.5% while it was the limit (2x and 8x: within noise of
 * this, 0.5x: -4%). One thread runs a job as one call either way. */
#define FUSED_CHUNK_BYTES (1536 << 10)

typedef struct fused_job {
    dsi_matmul_fn mm;
    const dsi_kernels *k;
    const mlp_row *it;
    int n, down;                /* down: the down rows, else gate and up */
    int64_t off[FUSED_MAX + 1]; /* item i's rows are [off[i], off[i + 1]) of the job */
} fused_job;

/* Items' row ranges within [b, end): gate and up (then SwiGLU on those
 * rows), or down. */
static void fused_task(void *ctx, int64_t b, int64_t end, int tid) {
    const fused_job *j = ctx;
    (void)tid;
    for (int i = 0; i < j->n && b < end; i++) {
        if (b >= j->off[i + 1]) continue;
        const mlp_row *r = &j->it[i];
        int r0 = (int)(b - j->off[i]), r1 = (int)(DSI_MIN(end, j->off[i + 1]) - j->off[i]);
        int inter = r->g->rows;
        if (j->down) {
            j->mm(r->d, r->h1, r->M, inter, r->out, r->d->rows, 0, r0, r1, r->accumulate);
        } else {
            j->mm(r->g, r->x, r->M, r->g->cols, r->h1, inter, 0, r0, r1, 0);
            j->mm(r->u, r->x, r->M, r->u->cols, r->h2, inter, 0, r0, r1, 0);
            for (int m = 0; m < r->M; m++)
                j->k->silu_mul(r->h1 + (size_t)m * inter + r0, r->h2 + (size_t)m * inter + r0, (size_t)(r1 - r0));
        }
        b = j->off[i + 1];
    }
}

static void run_fused(dsi_engine *e, fused_job *j, int down) {
    double bytes = 0, flops = 0;
    j->down = down;
    j->off[0] = 0;
    for (int i = 0; i < j->n; i++) {
        const dsi_mat *W = down ? j->it[i].d : j->it[i].g;
        int mats = down ? 1 : 2;
        j->off[i + 1] = j->off[i] + W->rows;
        bytes += (double)mats * W->rows * W->cols * dsi_dtype_size(W->dtype);
        flops += 2.0 * mats * W->rows * W->cols * j->it[i].M;
    }
    dsi_pool_for_chunks(dsi__pool_for_work(e, flops), j->off[j->n], 16, (int)(bytes / FUSED_CHUNK_BYTES), fused_task, j);
}

/* Applies to steps of up to FUSED_T_MAX rows when the engine runs in one
 * process (no transfers to poll between matmuls). With FP8 activations each
 * MLP's gate and up must share a dtype: they read one quantised row. */
static int fused_ok(const dsi_engine *e, int layer) {
    if (e->poll_hook || 1 + DSI_MIN(e->c->n_experts, e->T * e->c->n_experts_per_tok) > FUSED_MAX) return 0;
    if (e->T > FUSED_T_MAX) return 0;
    if (!e->opts.fp8_activations) return 1;
    const dsi_layer *L = &e->m->layers[layer];
    if (!L->is_moe) return L->gate.dtype == L->up.dtype;
    if (e->c->n_shared_experts > 0 && L->sh_gate.dtype != L->sh_up.dtype) return 0;
    for (int x = 0; x < e->c->n_experts; x++)
        if (L->exp_gate[x].dtype != L->exp_up[x].dtype) return 0;
    return 1;
}

/* --fp8-act: the rows the items' gate/up (or down) matmuls read, quantised
 * in place where the weights are FP8, as matmul_impl's maybe_quantise
 * quantises a copy: the same values, and nothing reads these rows
 * unquantised afterwards (the routed rows were dispatched from xn before,
 * and each row belongs to one item). */
static void quantise_items(const dsi_kernels *k, const mlp_row *it, int n, int down) {
    for (int i = 0; i < n; i++) {
        const dsi_mat *W = down ? it[i].d : it[i].g;
        if (W->dtype != DSI_F8_E4M3) continue;
        for (int m = 0; m < it[i].M; m++) { /* rows of W->cols floats; h1's are g->rows apart */
            float *row = down ? it[i].h1 + (size_t)m * it[i].g->rows : (float *)it[i].x + (size_t)m * W->cols;
            dsi__moe_io_round_in(k, DSI_MOE_IO_FP8, row, W->cols);
        }
    }
}

static int ffn_fused(dsi_engine *e, int layer) {
    const dsi_config *c = e->c;
    const dsi_layer *L = &e->m->layers[layer];
    dsi_scratch *s = &e->s;
    int D = c->hidden, T = e->T, n = 0, rc;
    mlp_row it[FUSED_MAX];
    int q8 = e->opts.fp8_activations;
    if ((rc = dsi__stage_gate(e, layer)) != DSI_OK) return rc;
    if (q8 && T > 1) { /* the shared or dense MLP on its own, through try_q8 */
        if ((rc = dsi__stage_shared(e, layer)) != DSI_OK) return rc;
    } else if (!L->is_moe) {
        it[n++] = (mlp_row){&L->gate, &L->up, &L->down, s->xn, s->h1, s->h2, s->x, 1, T};
    } else if (c->n_shared_experts > 0) {
        it[n++] = (mlp_row){&L->sh_gate, &L->sh_up, &L->sh_down, s->xn, s->h1, s->h2, s->x, 1, T};
    }
    if (L->is_moe) {
        dispatch_local(e);
        /* each chosen expert over its rows, in expert order (the per-expert path's) */
        for (int x = 0; x < c->n_experts; x++) {
            int r = s->exp_offset[x], M = s->exp_offset[x + 1] - r;
            if (!M) continue;
            float *rows = s->ex + (size_t)r * D, *h1 = s->eh1 + (size_t)r * c->moe_inter,
                  *h2 = s->eh2 + (size_t)r * c->moe_inter;
            if (q8 && M >= DSI_Q8_MIN_ROWS)
                dsi__expert_mlp(e, layer, x, rows, M, D, h1, h2);
            else
                it[n++] = (mlp_row){&L->exp_gate[x], &L->exp_up[x], &L->exp_down[x], rows, h1, h2, rows, 0, M};
        }
    }
    fused_job j = {dsi__matmul_fn(e), e->k, it, n, 0, {0}};
    if (n) {
        if (q8) quantise_items(e->k, it, n, 0);
        run_fused(e, &j, 0);
        if (q8) quantise_items(e->k, it, n, 1);
        run_fused(e, &j, 1);
    }
    if (L->is_moe) combine_local(e);
    return DSI_OK;
}

/* Gate, then SHARED before the routed experts: the order the single-process
 * engine has always summed in (the residual gets shared, then routed). */
int dsi__stage_ffn(dsi_engine *e, int layer) {
    if (fused_ok(e, layer)) return ffn_fused(e, layer);
    int rc;
    if ((rc = dsi__stage_gate(e, layer)) != DSI_OK) return rc;
    if ((rc = dsi__stage_shared(e, layer)) != DSI_OK) return rc;
    return dsi__stage_routed_local(e, layer);
}
