/* MLA: ATTN-0 (projections, latent KV written to the pool) and ATTN-1 (core
 * attention in either form, o_proj, residual, FFN norm).
 *
 * Two forms give the same result:
 *  - prefill (decompressed): K_nope/V of each context position are rebuilt
 *    from the cached latent by kv_b, one 64-position block at a time, with an
 *    online softmax over blocks;
 *  - absorbed (decode): q_nope is pulled through W_UK into latent space,
 *    attention runs directly over the cached latent + rope key, and the
 *    latent-space output goes through W_UV. */
#include "engine/engine_impl.h"

#include <float.h>
#include <math.h>
#include <string.h>

typedef struct rope_job {
    dsi_engine *e;
    const dsi_layer *L;
    int layer;
} rope_job;

/* Rows [b, end) of the step: rope on every head's query, the latent
 * (kv_a_layernorm) and the roped key written to the row's KV slot. */
static void rope_kv_task(void *ctx, int64_t b, int64_t end, int tid) {
    const rope_job *j = ctx;
    dsi_engine *e = j->e;
    const dsi_config *c = e->c;
    dsi_scratch *s = &e->s;
    int H = c->n_heads, qk = dsi_config_qk_head_dim(c), kvd = dsi_config_kv_dim(c);
    int lora = c->kv_lora_rank, rope = c->qk_rope_dim, nope = c->qk_nope_dim, bt = dsi_kv_block_tokens(e->kv);
    (void)tid;
    int si = 0;
    for (int64_t t = b; t < end; t++) {
        while (t >= e->seqs[si].t0 + e->seqs[si].n) si++; /* rows are laid out sequence by sequence */
        const dsi_step_seq *ss = &e->seqs[si];
        int pos = s->tok_pos[t];
        const float *cs = s->rope_cs + (size_t)t * rope;
        float *q = s->q + (size_t)t * H * qk;
        for (int h = 0; h < H; h++) dsi__rope(e, q + (size_t)h * qk + nope, cs);
        float *row = dsi_kv_token(e->kv, ss->blocks[pos / bt], j->layer, pos % bt);
        const float *kv = s->kva + (size_t)t * kvd;
        dsi__rmsnorm(kv, j->L->kv_a_norm, lora, (float)c->rms_norm_eps, row);
        memcpy(row + lora, kv + lora, sizeof(float) * rope);
        dsi__rope(e, row + lora, cs);
    }
}

int dsi__stage_attn0(dsi_engine *e, int layer) {
    const dsi_config *c = e->c;
    const dsi_layer *L = &e->m->layers[layer];
    dsi_scratch *s = &e->s;
    int T = e->T, D = c->hidden, H = c->n_heads, qk = dsi_config_qk_head_dim(c), kvd = dsi_config_kv_dim(c);
    float eps = (float)c->rms_norm_eps;
    dsi__rmsnorm_rows(e, s->x, D, L->attn_norm, D, eps, s->xn, D, T);
    int ldx = D;
    const float *xn = dsi__pad_rows(e, s->xn, T, D, &ldx); /* once for kv_a and q_a (or q_proj) */
    dsi__matmul(e, &L->kv_a, xn, T, ldx, s->kva, kvd, 0);
    if (c->q_lora_rank > 0) {
        int ql = c->q_lora_rank;
        dsi__matmul(e, &L->q_a, xn, T, ldx, s->qa, ql, 0);
        dsi__rmsnorm_rows(e, s->qa, ql, L->q_a_norm, ql, eps, s->qa, ql, T);
        dsi__matmul(e, &L->q_b, s->qa, T, ql, s->q, H * qk, 0); /* may pad qa: xn's copy is done with */
    } else {
        dsi__matmul(e, &L->q_proj, xn, T, ldx, s->q, H * qk, 0);
    }
    rope_job j = {e, L, layer};
    dsi_pool_for(T >= ROWS_PARALLEL_MIN ? e->pool : NULL, T, 8, rope_kv_task, &j);
    return DSI_OK;
}

/* ---------------------------------------------------------------- absorbed */

typedef struct absorbed_job {
    dsi_engine *e;
    const dsi_layer *L;
    int layer;
    const dsi_step_seq *ss;
} absorbed_job;

/* A task is one token and a group of up to ATTN_HEAD_GROUP heads: each KV
 * block (64 rows of 576 floats, 147 KB) is read once per group while it sits
 * in L2, instead of once per head from L3 or memory. */
static void absorbed_task(void *ctx, int64_t b, int64_t end, int tid) {
    const absorbed_job *j = ctx;
    dsi_engine *e = j->e;
    const dsi_config *c = e->c;
    const dsi_kernels *k = e->k;
    int H = c->n_heads, qk = dsi_config_qk_head_dim(c), nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    int lora = c->kv_lora_rank, vd = c->v_head_dim, kvd = dsi_config_kv_dim(c), bt = dsi_kv_block_tokens(e->kv);
    int groups = DSI_CEIL_DIV(H, ATTN_HEAD_GROUP);
    float *scores = e->s.th_scores[tid];          /* [group][max_ctx] */
    float *q_abs = e->s.th_vec[tid];              /* [group][kvd]: absorbed nope part | rope part */
    float *o_lat = q_abs + (size_t)ATTN_HEAD_GROUP * kvd; /* [group][lora] */
    for (int64_t task = b; task < end; task++) {
        int i = (int)(task / groups), h0 = (int)(task % groups) * ATTN_HEAD_GROUP;
        int G = DSI_MIN(ATTN_HEAD_GROUP, H - h0);
        int t = j->ss->t0 + i, P = j->ss->pos + i;
        const float *q = e->s.q + ((size_t)t * H + h0) * qk;
        /* the first rows of every head's W_UK at once: matmul_t prefetches
         * only within a head (8 KB, 16 rows ahead), so each head started
         * cold, one after the other (~2.5 us each); together the misses
         * overlap */
        if (j->L->kv_b.dtype == DSI_F8_E4M3) {
            size_t row = (size_t)j->L->kv_b.cols;
            for (int g = 0; g < G; g++) {
                const char *w = (const char *)j->L->kv_b.data + (size_t)(h0 + g) * (nope + vd) * row;
                for (size_t off = 0; off < 32 * row && off < (size_t)nope * row; off += 64) __builtin_prefetch(w + off);
            }
        }
        { /* the context's first rows, which the scores kernel reads before its prefetch runs ahead */
            const char *r0 = (const char *)dsi_kv_block_layer(e->kv, j->ss->blocks[0], j->layer);
            for (size_t off = 0; off < (size_t)DSI_MIN(P + 1, 8) * kvd * sizeof(float); off += 64) __builtin_prefetch(r0 + off);
        }
        for (int g = 0; g < G; g++) {
            int r0 = (h0 + g) * (nope + vd);
            k->matmul_t(&j->L->kv_b, r0, r0 + nope, q + (size_t)g * qk, 1, nope, q_abs + (size_t)g * kvd, lora, 0, lora);
            memcpy(q_abs + (size_t)g * kvd + lora, q + (size_t)g * qk + nope, sizeof(float) * rope);
        }
        /* One pass over the context, block by block with an online softmax:
         * the block's scores over whole 576-float rows (latent | rope key),
         * then its weighted sum while the rows are still in L2. */
        float m_run[ATTN_HEAD_GROUP], l_run[ATTN_HEAD_GROUP];
        for (int g = 0; g < G; g++) m_run[g] = -FLT_MAX, l_run[g] = 0;
        memset(o_lat, 0, sizeof(float) * lora * G);
        for (int p0 = 0; p0 <= P; p0 += bt) {
            int n = DSI_MIN(bt, P + 1 - p0);
            const float *rows = dsi_kv_block_layer(e->kv, j->ss->blocks[p0 / bt], j->layer);
            const float *next = p0 + bt <= P ? dsi_kv_block_layer(e->kv, j->ss->blocks[p0 / bt + 1], j->layer) : NULL;
            if (k->dots_mh)
                k->dots_mh(q_abs, kvd, G, rows, n, kvd, kvd, scores, e->max_ctx, 0, next); /* prefetches into next */
            else
                for (int g = 0; g < G; g++)
                    k->dots(q_abs + (size_t)g * kvd, rows, n, kvd, kvd, scores + (size_t)g * e->max_ctx, 0);
            for (int g = 0; g < G; g++) {
                float *sc = scores + (size_t)g * e->max_ctx, mx = m_run[g];
                for (int p = 0; p < n; p++) {
                    sc[p] *= e->softmax_scale;
                    if (sc[p] > mx) mx = sc[p];
                }
                if (mx > m_run[g]) { /* rescale what was summed under the old maximum */
                    float corr = l_run[g] > 0 ? expf(m_run[g] - mx) : 0.0f;
                    l_run[g] *= corr;
                    float *o = o_lat + (size_t)g * lora;
                    for (int d = 0; d < lora; d++) o[d] *= corr;
                    m_run[g] = mx;
                }
                if (k->expsum) {
                    l_run[g] += k->expsum(sc, n, mx);
                } else {
                    double sum = 0;
                    for (int p = 0; p < n; p++) { sc[p] = expf(sc[p] - mx); sum += sc[p]; }
                    l_run[g] += (float)sum;
                }
            }
            if (k->wsum_mh)
                k->wsum_mh(scores, e->max_ctx, G, rows, n, kvd, lora, o_lat, lora);
            else
                for (int g = 0; g < G; g++)
                    k->wsum(scores + (size_t)g * e->max_ctx, rows, n, kvd, lora, o_lat + (size_t)g * lora);
        }
        for (int g = 0; g < G; g++) {
            float inv = 1.0f / l_run[g], *o = o_lat + (size_t)g * lora;
            for (int d = 0; d < lora; d++) o[d] *= inv;
        }
        /* W_UV per head; the GEMV prefetches ahead only within its own
         * rows, so the next head's first 8 KB are fetched here, under this
         * head's stream (one head's 64 KB: 24 -> 27 GB/s) */
        size_t uv_row = (size_t)lora * dsi_dtype_size(j->L->kv_b.dtype);
        for (int g = 0; g < G; g++) {
            int r0 = (h0 + g) * (nope + vd);
            if (g + 1 < G) {
                const char *nx = (const char *)j->L->kv_b.data + (size_t)(r0 + 2 * nope + vd) * uv_row;
                for (size_t off = 0; off < 8192 && off < (size_t)vd * uv_row; off += 64) __builtin_prefetch(nx + off);
            }
            float *out = e->s.attn + ((size_t)t * H + h0 + g) * vd;
            k->matmul(&j->L->kv_b, o_lat + (size_t)g * lora, 1, lora, out, vd, r0 + nope, r0 + nope, r0 + nope + vd, 0);
        }
    }
}

/* ---------------------------------------------------------------- prefill */

typedef struct prefill_job {
    dsi_engine *e;
    int layer, c0, cl;
    const dsi_step_seq *ss;
} prefill_job;

/* One head and a group of up to PREFILL_Q_GROUP consecutive queries against
 * one decompressed context block, updating each query's online-softmax state
 * [m, l, acc[v]]. The group shares the block's K and V rows, so the
 * multi-row kernels (dots_mh, wsum_mh: the "heads" there are queries here)
 * load each key row once per group instead of once per query: one query at
 * a time, attention was ~8% of a 512-token prefill at ~2% of its FLOPs.
 * Causality: query i sees jn_i rows (increasing with i); the group is
 * scored over the largest jn and each query's extra rows get probability 0. */
#define PREFILL_Q_GROUP 8
static void prefill_task(void *ctx, int64_t b, int64_t end, int tid) {
    const prefill_job *j = ctx;
    dsi_engine *e = j->e;
    const dsi_config *c = e->c;
    const dsi_kernels *k = e->k;
    int H = c->n_heads, qk = dsi_config_qk_head_dim(c), nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    int vd = c->v_head_dim, lora = c->kv_lora_rank, bt = dsi_kv_block_tokens(e->kv);
    int dec = nope + vd, kvd = dsi_config_kv_dim(c);
    const float *blk = dsi_kv_block_layer(e->kv, j->ss->blocks[j->c0 / bt], j->layer);
    int groups = DSI_CEIL_DIV(j->ss->n, PREFILL_Q_GROUP);
    size_t ldk = (size_t)H * dec, ldq = (size_t)H * qk, lds = (size_t)H * (vd + 2);
    float sc[PREFILL_Q_GROUP][64];
    (void)tid;
    for (int64_t task = b; task < end; task++) {
        int h = (int)(task / groups), qg = (int)(task % groups);
        int i0 = qg * PREFILL_Q_GROUP, i1 = DSI_MIN(j->ss->n, i0 + PREFILL_Q_GROUP);
        while (i0 < i1 && j->ss->pos + i0 - j->c0 + 1 <= 0) i0++; /* queries before the block see none of it */
        if (i0 >= i1) continue;
        int G = i1 - i0, jmax = DSI_MIN(j->cl, j->ss->pos + i1 - 1 - j->c0 + 1);
        const float *q = e->s.q + ((size_t)(j->ss->t0 + i0) * H + h) * qk;
        const float *kh = e->s.kvdec + (size_t)h * dec, *vh = kh + nope;
        float *st0 = e->s.ostate + ((size_t)(j->ss->t0 + i0) * H + h) * (vd + 2);
        if (k->dots_mh) {
            k->dots_mh(q, ldq, G, kh, jmax, ldk, nope, sc[0], 64, 0, NULL);
            k->dots_mh(q + nope, ldq, G, blk + lora, jmax, kvd, rope, sc[0], 64, 1, NULL);
        } else {
            for (int g = 0; g < G; g++) {
                k->dots(q + g * ldq, kh, jmax, ldk, nope, sc[g], 0);
                k->dots(q + g * ldq + nope, blk + lora, jmax, kvd, rope, sc[g], 1);
            }
        }
        for (int g = 0; g < G; g++) {
            int jn = DSI_MIN(j->cl, j->ss->pos + i0 + g - j->c0 + 1);
            float *s = sc[g], mx = -FLT_MAX;
            for (int p = 0; p < jn; p++) {
                s[p] *= e->softmax_scale;
                if (s[p] > mx) mx = s[p];
            }
            for (int p = jn; p < jmax; p++) s[p] = 0.0f; /* rows this query may not see */
            float *st = st0 + (size_t)g * lds, m_old = st[0], l_old = st[1], *acc = st + 2;
            float m_new = m_old > mx ? m_old : mx;
            float corr = l_old > 0 ? expf(m_old - m_new) : 0.0f;
            if (corr != 1.0f)
                for (int d = 0; d < vd; d++) acc[d] *= corr;
            float l = l_old * corr;
            if (k->expsum) {
                l += k->expsum(s, jn, m_new);
            } else {
                for (int p = 0; p < jn; p++) {
                    s[p] = expf(s[p] - m_new);
                    l += s[p];
                }
            }
            st[0] = m_new;
            st[1] = l;
        }
        if (k->wsum_mh)
            k->wsum_mh(sc[0], 64, G, vh, jmax, ldk, vd, st0 + 2, lds);
        else
            for (int g = 0; g < G; g++) k->wsum(sc[g], vh, jmax, ldk, vd, st0 + (size_t)g * lds + 2);
    }
}

static void prefill_attention(dsi_engine *e, int layer, const dsi_layer *L, const dsi_step_seq *ss) {
    const dsi_config *c = e->c;
    int H = c->n_heads, vd = c->v_head_dim, bt = dsi_kv_block_tokens(e->kv), kvd = dsi_config_kv_dim(c);
    int ctx = ss->pos + ss->n;
    for (int i = 0; i < ss->n; i++)
        for (int h = 0; h < H; h++) {
            float *st = e->s.ostate + ((size_t)(ss->t0 + i) * H + h) * (vd + 2);
            st[0] = -FLT_MAX;
            st[1] = 0;
            memset(st + 2, 0, sizeof(float) * vd);
        }
    for (int c0 = 0; c0 < ctx; c0 += bt) {
        int cl = DSI_MIN(bt, ctx - c0);
        const float *blk = dsi_kv_block_layer(e->kv, ss->blocks[c0 / bt], layer);
        /* decompress K_nope and V for the block: [cl][H][nope+v] */
        dsi__matmul(e, &L->kv_b, blk, cl, kvd, e->s.kvdec, H * (c->qk_nope_dim + vd), 0);
        prefill_job j = {e, layer, c0, cl, ss};
        double work = 2.0 * ss->n * H * cl * (c->qk_nope_dim + c->qk_rope_dim + vd);
        dsi_pool_for(dsi__pool_for_work(e, work), (int64_t)H * DSI_CEIL_DIV(ss->n, PREFILL_Q_GROUP), 1, prefill_task, &j);
    }
    for (int i = 0; i < ss->n; i++)
        for (int h = 0; h < H; h++) {
            size_t t = ss->t0 + i;
            const float *st = e->s.ostate + (t * H + h) * (vd + 2);
            float inv = st[1] > 0 ? 1.0f / st[1] : 0.0f;
            float *o = e->s.attn + (t * H + h) * vd;
            for (int d = 0; d < vd; d++) o[d] = st[2 + d] * inv;
        }
}

int dsi__stage_attn1(dsi_engine *e, int layer) {
    const dsi_config *c = e->c;
    const dsi_layer *L = &e->m->layers[layer];
    dsi_scratch *s = &e->s;
    int T = e->T, D = c->hidden, H = c->n_heads;
    for (int si = 0; si < e->n_seqs; si++) {
        const dsi_step_seq *ss = &e->seqs[si];
        if (ss->absorbed) {
            absorbed_job j = {e, L, layer, ss};
            /* per head: absorb q (nope x lora), scores and sum over the context (2 x kv dim), W_UV (lora x v) */
            double work = 2.0 * ss->n * H *
                          ((double)c->kv_lora_rank * (c->qk_nope_dim + c->v_head_dim) +
                           (double)(ss->pos + ss->n) * (2 * c->kv_lora_rank + c->qk_rope_dim));
            dsi_pool_for(dsi__pool_for_work(e, work), (int64_t)ss->n * DSI_CEIL_DIV(H, ATTN_HEAD_GROUP), 1,
                         absorbed_task, &j);
        } else {
            prefill_attention(e, layer, L, ss);
        }
    }
    /* o_proj straight into the residual stream */
    dsi__matmul(e, &L->o_proj, s->attn, T, H * c->v_head_dim, s->x, D, 1);
    float eps = (float)c->rms_norm_eps;
    dsi__rmsnorm_rows(e, s->x, D, L->ffn_norm, D, eps, s->xn, D, T);
    return DSI_OK;
}
