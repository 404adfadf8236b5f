/* DISPATCH, MLP and COMBINE across the group.
 *
 * A dispatched row is one token going to one rank: K (local slot, gate
 * weight) pairs (slot -1 = unused) followed by the activation, FP8 (one
 * float scale per 128 channels, then e4m3 bytes) or BF16. A token whose
 * experts share a rank travels there once. The expert side runs each local
 * slot over its rows and returns each (row, slot) output as its own BF16 row
 * (f32 in the lossless mode), in the order received and, within a row, in
 * top-k order: DeepEP's low-latency combine layout. The home rank weights
 * them by the gate and adds them into its residual stream in float32. No
 * rounding depends on which rank holds which expert, so one process with the
 * same dsi_moe_io computes the same numbers (to float32 summation order).
 *
 * Messages per (layer, micro-batch): a count (int32) from every rank with
 * tokens to every other rank, the rows when there are any, and the combine
 * rows back. Receives for rows are posted when their count arrives. Each
 * kind has its own tag; MPI's per-pair ordering keeps steps apart. */
#include "ep/ep_impl.h"
#include "kernels/dtype.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TAG(m, u, kind) ((((m) * 2 + (u)) * 3) + (kind))
enum { K_COUNT = 0, K_ROWS = 1, K_COMBINE = 2 };

int dsi__ep_xchg_alloc(ep_xchg *x, int P) {
    memset(x, 0, sizeof *x);
    int *a = malloc(sizeof(int) * 4 * P);
    if (!a) return dsi_error(DSI_ENOMEM, "out of memory");
    x->rq_cnt_in = a, x->rq_data_in = a + P, x->rq_cnt_out = a + 2 * P, x->rq_data_out = a + 3 * P;
    for (int i = 0; i < 4 * P; i++) a[i] = -1;
    return DSI_OK;
}

void dsi__ep_xchg_free(ep_xchg *x) {
    free(x->rq_cnt_in);
    memset(x, 0, sizeof *x);
}

static void xchg_reset(ep_xchg *x, int P) {
    for (int i = 0; i < 4 * P; i++) x->rq_cnt_in[i] = -1;
    x->posted = 1, x->done = 0, x->pending = 0, x->t_post = dsi_now();
}

/* ------------------------------------------------------------ row codec */

static void encode_row(const dsi_ep *ep, const float *x, uint8_t *out) {
    int D = ep->D;
    if (ep->o.dispatch == DSI_EP_F32) {
        memcpy(out, x, sizeof(float) * D);
        return;
    }
    if (ep->o.dispatch == DSI_EP_BF16) {
        uint16_t *h = (uint16_t *)out;
        for (int i = 0; i < D; i++) h[i] = dsi_f32_to_bf16(x[i]);
        return;
    }
    /* The engine's FP8 activation quantiser (amax / 448 per 128 channels),
     * the same as dsi__moe_io_round_in: one process can reproduce it. */
    float *sc = (float *)out;
    uint8_t *q = out + sizeof(float) * ep->n_blk;
    for (int b = 0; b < ep->n_blk; b++) {
        int k0 = b * 128, k1 = DSI_MIN(D, k0 + 128);
        float s = dsi_fp8_scale(x + k0, k1 - k0);
        sc[b] = s;
        for (int k = k0; k < k1; k++) q[k] = dsi_f32_to_e4m3(x[k] / s);
    }
}

static void decode_row(const dsi_ep *ep, const uint8_t *in, float *x) {
    int D = ep->D;
    if (ep->o.dispatch == DSI_EP_F32) {
        memcpy(x, in, sizeof(float) * D);
        return;
    }
    if (ep->o.dispatch == DSI_EP_BF16) {
        const uint16_t *h = (const uint16_t *)in;
        for (int i = 0; i < D; i++) x[i] = dsi_bf16_to_f32(h[i]);
        return;
    }
    const float *sc = (const float *)in;
    const uint8_t *q = in + sizeof(float) * ep->n_blk;
    for (int k = 0; k < D; k++) x[k] = dsi_e4m3_to_f32(q[k]) * sc[k / 128];
}

typedef struct row_meta {
    int32_t slot; /* local slot on the destination, -1 unused */
    float w;
} row_meta;

/* ------------------------------------------------------------ polling */

static int test_req(dsi_ep *ep, int *h, int *pending) {
    if (*h < 0) return DSI_OK;
    int done = 0, rc = ep->tp->test(ep->tp, *h, &done);
    if (rc != DSI_OK) { *h = -1; return rc; }
    if (done) { *h = -1; (*pending)--; }
    return DSI_OK;
}

static void note_err(dsi_ep *ep, int rc) {
    if (rc != DSI_OK && ep->err == DSI_OK) ep->err = rc;
}

static void poll_dispatch(dsi_ep *ep, int u) {
    ep_ub *b = &ep->ub[u];
    ep_xchg *x = &b->disp;
    int P = ep->P, m = ep->moe_index[b->layer];
    for (int p = 0; p < P; p++) {
        if (x->rq_cnt_in[p] >= 0) {
            note_err(ep, test_req(ep, &x->rq_cnt_in[p], &x->pending));
            if (x->rq_cnt_in[p] < 0 && ep->err == DSI_OK) {
                int n = b->cnt_in[p];
                if (n < 0 || n > ep->Tm) {
                    note_err(ep, dsi_error(DSI_EPEER, "ep: rank %d announced %d rows (at most %d)", p, n, ep->Tm));
                } else if (n > 0) {
                    int rc = ep->tp->irecv(ep->tp, b->rbuf + (size_t)p * ep->Tm * ep->row_bytes, (size_t)n * ep->row_bytes,
                                           p, TAG(m, u, K_ROWS), &x->rq_data_in[p]);
                    if (rc == DSI_OK) x->pending++;
                    note_err(ep, rc);
                }
            }
        }
        note_err(ep, test_req(ep, &x->rq_data_in[p], &x->pending));
        note_err(ep, test_req(ep, &x->rq_cnt_out[p], &x->pending));
        note_err(ep, test_req(ep, &x->rq_data_out[p], &x->pending));
    }
    if (x->pending == 0) {
        x->done = 1;
        ep->st[b->layer].dispatch_s += dsi_now() - x->t_post;
    }
}

static void poll_combine(dsi_ep *ep, int u) {
    ep_ub *b = &ep->ub[u];
    ep_xchg *x = &b->comb;
    for (int p = 0; p < ep->P; p++) {
        note_err(ep, test_req(ep, &x->rq_data_in[p], &x->pending));
        note_err(ep, test_req(ep, &x->rq_data_out[p], &x->pending));
    }
    if (x->pending == 0) {
        x->done = 1;
        ep->st[b->layer].combine_s += dsi_now() - x->t_post;
    }
}

void dsi__ep_poll(dsi_ep *ep) {
    ep->tp->progress(ep->tp);
    for (int u = 0; u < 2; u++) {
        ep_ub *b = &ep->ub[u];
        if (b->disp.posted && !b->disp.done) poll_dispatch(ep, u);
        if (b->comb.posted && !b->comb.done) poll_combine(ep, u);
    }
}

/* ------------------------------------------------------------ dispatch */

/* Grows a combine buffer to hold `rows` rows (contents not kept). */
static int grow(uint8_t **buf, size_t *cap, size_t rows, size_t row_bytes) {
    if (rows * row_bytes <= *cap) return DSI_OK;
    size_t want = rows * row_bytes + rows * row_bytes / 2;
    uint8_t *n = dsi_alloc(want);
    if (!n) return dsi_error(DSI_ENOMEM, "ep: cannot allocate %zu bytes for the combine", want);
    dsi_free(*buf);
    *buf = n, *cap = want;
    return DSI_OK;
}


int dsi__ep_dispatch_post(dsi_ep *ep, int u, int layer) {
    ep_ub *b = &ep->ub[u];
    dsi_engine *e = ep->e;
    int P = ep->P, Tm = ep->Tm, K = ep->K, D = ep->D, me = ep->rank, m = ep->moe_index[layer];
    size_t rb = ep->row_bytes, cr = ep->comb_row_bytes;
    ep_xchg *x = &b->disp, *cx = &b->comb;
    xchg_reset(x, P);
    xchg_reset(cx, P);
    cx->posted = 0;
    memset(b->send_rows, 0, sizeof(int) * P);
    memset(b->cnt_in, 0, sizeof(int) * P);
    memset(b->cin_off, 0, sizeof(int) * (P + 1));
    /* the engine holds this micro-batch's state: gate results and xn */
    const int *ids = e->s.topk_ids;
    const float *w = e->s.topk_w;
    for (int t = 0; t < b->T; t++) {
        int dest[64], lslot[64];
        for (int k = 0; k < K; k++) {
            int xid = ids[t * K + k];
            int slot = dsi_eplb_pick_replica(&ep->pl, m, xid, ep->rr[(size_t)m * ep->E + xid]++);
            dest[k] = slot / ep->spr;
            lslot[k] = slot % ep->spr;
        }
        int encoded = 0;
        for (int k = 0; k < K; k++) b->cin_off[dest[k] + 1]++; /* one combined row per (token, expert) */
        for (int k = 0; k < K; k++) {
            int d = dest[k], seen = 0;
            for (int j = 0; j < k; j++) seen |= dest[j] == d;
            if (seen) continue;
            int row = b->send_rows[d]++;
            b->send_tok[(size_t)d * Tm + row] = t;
            uint8_t *r = b->sbuf + ((size_t)d * Tm + row) * rb;
            row_meta *meta = (row_meta *)r;
            for (int j = 0; j < K; j++) {
                meta[j].slot = dest[j] == d ? lslot[j] : -1;
                meta[j].w = w[t * K + j];
            }
            if (!encoded) {
                encode_row(ep, e->s.xn + (size_t)t * D, ep->tmp_row);
                encoded = 1;
            }
            memcpy(r + sizeof(row_meta) * K, ep->tmp_row, ep->payload_bytes);
        }
    }
    for (int p = 0; p < P; p++) b->cin_off[p + 1] += b->cin_off[p];
    int rc = grow(&b->cbuf_in, &b->cin_cap, (size_t)b->cin_off[P], cr);
    for (int p = 0; p < P && rc == DSI_OK; p++) {
        if (p == me) continue;
        if (b->T > 0) {
            rc = ep->tp->isend(ep->tp, &b->send_rows[p], sizeof(int), p, TAG(m, u, K_COUNT), &x->rq_cnt_out[p]);
            if (rc == DSI_OK) x->pending++;
            if (rc == DSI_OK && b->send_rows[p] > 0) {
                rc = ep->tp->isend(ep->tp, b->sbuf + (size_t)p * Tm * rb, (size_t)b->send_rows[p] * rb, p,
                                   TAG(m, u, K_ROWS), &x->rq_data_out[p]);
                if (rc == DSI_OK) x->pending++;
                if (rc == DSI_OK)
                    ep->st[layer].sent_bytes += (double)b->send_rows[p] * rb;
                /* the combine comes back into its own buffer: post it now */
                if (rc == DSI_OK)
                    rc = ep->tp->irecv(ep->tp, b->cbuf_in + (size_t)b->cin_off[p] * cr,
                                       (size_t)(b->cin_off[p + 1] - b->cin_off[p]) * cr, p, TAG(m, u, K_COMBINE),
                                       &cx->rq_data_in[p]);
                if (rc == DSI_OK) cx->pending++;
            }
        }
        if (rc == DSI_OK && b->T_peer[p] > 0) {
            rc = ep->tp->irecv(ep->tp, &b->cnt_in[p], sizeof(int), p, TAG(m, u, K_COUNT), &x->rq_cnt_in[p]);
            if (rc == DSI_OK) x->pending++;
        }
    }
    /* rows for this rank's own experts never leave it */
    b->cnt_in[me] = b->send_rows[me];
    memcpy(b->rbuf + (size_t)me * Tm * rb, b->sbuf + (size_t)me * Tm * rb, (size_t)b->send_rows[me] * rb);
    if (rc != DSI_OK) return rc;
    poll_dispatch(ep, u);
    return ep->err;
}

/* ------------------------------------------------------------ MLP + combine */

int dsi__ep_mlp_and_combine(dsi_ep *ep, int u, int layer) {
    ep_ub *b = &ep->ub[u];
    dsi_engine *e = ep->e;
    int P = ep->P, Tm = ep->Tm, K = ep->K, D = ep->D, me = ep->rank, m = ep->moe_index[layer], spr = ep->spr;
    size_t rb = ep->row_bytes, cr = ep->comb_row_bytes;
    /* group the received (row, slot) pairs by local slot; each pair's output
     * row goes back at its place among its source's pairs */
    memset(ep->slot_count, 0, sizeof(int) * spr);
    b->cout_off[0] = 0;
    for (int p = 0; p < P; p++) {
        int n = 0;
        for (int i = 0; i < b->cnt_in[p]; i++) {
            const row_meta *meta = (const row_meta *)(b->rbuf + ((size_t)p * Tm + i) * rb);
            for (int k = 0; k < K; k++) {
                int s = meta[k].slot;
                if (s >= spr) return dsi_error(DSI_EPEER, "ep: rank %d sent a row for slot %d of %d", p, s, spr);
                if (s >= 0) ep->slot_count[s]++, n++;
            }
        }
        b->cout_off[p + 1] = b->cout_off[p] + n;
    }
    int rc = grow(&b->cbuf_out, &b->cout_cap, (size_t)b->cout_off[P], cr);
    if (rc != DSI_OK) return rc;
    ep->slot_off[0] = 0;
    for (int s = 0; s < spr; s++) ep->slot_off[s + 1] = ep->slot_off[s] + ep->slot_count[s];
    memset(ep->slot_count, 0, sizeof(int) * spr);
    for (int p = 0; p < P; p++) {
        int g = b->cout_off[p];
        for (int i = 0; i < b->cnt_in[p]; i++) {
            const row_meta *meta = (const row_meta *)(b->rbuf + ((size_t)p * Tm + i) * rb);
            for (int k = 0; k < K; k++) {
                int s = meta[k].slot;
                if (s < 0) continue;
                int at = ep->slot_off[s] + ep->slot_count[s]++;
                ep->pair_row[at] = p * Tm + i;
                ep->pair_out[at] = g++;
            }
        }
    }
    ep->rows_pairs[m] += b->cout_off[P];
    /* each local slot's expert over its rows, in chunks the engine's scratch holds */
    for (int s = 0; s < spr; s++) {
        int expert = ep->pl.phy2log[(size_t)m * ep->pl.n_slots + me * spr + s];
        for (int a = ep->slot_off[s]; a < ep->slot_off[s + 1]; a += Tm) {
            int n = DSI_MIN(Tm, ep->slot_off[s + 1] - a);
            for (int j = 0; j < n; j++) {
                int r = ep->pair_row[a + j];
                decode_row(ep, b->rbuf + (size_t)r * rb + sizeof(row_meta) * K, ep->ex + (size_t)j * D);
            }
            dsi__expert_mlp(e, layer, expert, ep->ex, n, D, ep->h1, ep->h2);
            for (int j = 0; j < n; j++) {
                const float *y = ep->ex + (size_t)j * D;
                uint8_t *o = b->cbuf_out + (size_t)ep->pair_out[a + j] * cr;
                if (ep->o.dispatch == DSI_EP_F32) memcpy(o, y, sizeof(float) * D);
                else
                    for (int d = 0; d < D; d++) ((uint16_t *)o)[d] = dsi_f32_to_bf16(y[d]);
            }
        }
    }
    int rows = 0;
    for (int p = 0; p < P; p++) rows += b->cnt_in[p];
    ep->st[layer].expert_rows += rows;
    /* COMBINE: receives were posted with the dispatch */
    ep_xchg *cx = &b->comb;
    cx->posted = 1;
    cx->t_post = dsi_now();
    for (int p = 0; p < P && rc == DSI_OK; p++) {
        size_t n = (size_t)(b->cout_off[p + 1] - b->cout_off[p]);
        if (p == me || n == 0) continue;
        rc = ep->tp->isend(ep->tp, b->cbuf_out + (size_t)b->cout_off[p] * cr, n * cr, p, TAG(m, u, K_COMBINE),
                           &cx->rq_data_out[p]);
        if (rc == DSI_OK) cx->pending++;
        ep->st[layer].sent_bytes += (double)n * cr;
    }
    memcpy(b->cbuf_in + (size_t)b->cin_off[me] * cr, b->cbuf_out + (size_t)b->cout_off[me] * cr,
           (size_t)(b->cout_off[me + 1] - b->cout_off[me]) * cr);
    if (rc != DSI_OK) return rc;
    poll_combine(ep, u);
    return ep->err;
}

void dsi__ep_combine_finish(dsi_ep *ep, int u) {
    ep_ub *b = &ep->ub[u];
    dsi_engine *e = ep->e;
    int D = ep->D, Tm = ep->Tm, K = ep->K;
    size_t cr = ep->comb_row_bytes, rb = ep->row_bytes;
    /* where each (token, k) output landed */
    for (int d = 0; d < ep->P; d++) {
        const uint8_t *r = b->cbuf_in + (size_t)b->cin_off[d] * cr;
        for (int i = 0; i < b->send_rows[d]; i++) {
            const row_meta *meta = (const row_meta *)(b->sbuf + ((size_t)d * Tm + i) * rb);
            int t = b->send_tok[(size_t)d * Tm + i];
            for (int k = 0; k < K; k++)
                if (meta[k].slot >= 0) ep->comb_src[t * K + k] = r, r += cr;
        }
    }
    /* per token in ascending expert order with the engine's axpy: the order
     * and rounding of dsi__stage_routed_local, so one process matches bit
     * for bit when the expert outputs do */
    const int *ids = e->s.topk_ids;
    const float *w = e->s.topk_w;
    for (int t = 0; t < b->T; t++) {
        float *xr = e->s.x + (size_t)t * D;
        int done = 0;
        for (int n = 0; n < K; n++) {
            int best = -1;
            for (int k = 0; k < K; k++)
                if (!(done >> k & 1) && (best < 0 || ids[t * K + k] < ids[t * K + best])) best = k;
            done |= 1 << best;
            const uint8_t *r = ep->comb_src[t * K + best];
            const float *y = (const float *)r;
            if (ep->o.dispatch != DSI_EP_F32) {
                for (int c = 0; c < D; c++) ep->comb_tmp[c] = dsi_bf16_to_f32(((const uint16_t *)r)[c]);
                y = ep->comb_tmp;
            }
            e->k->axpy(w[t * K + best], y, xr, D);
        }
    }
}

/* ------------------------------------------------------------ timeouts */

static int list_peers(const int *a, const int *b2, int P, char *buf, size_t cap) {
    size_t n = 0;
    int any = 0;
    buf[0] = 0;
    for (int p = 0; p < P; p++)
        if (a[p] >= 0 || (b2 && b2[p] >= 0)) {
            n += snprintf(buf + n, n < cap ? cap - n : 0, "%s%d", any ? ", " : "", p);
            any = 1;
        }
    return any;
}

int dsi__ep_check_timeouts(dsi_ep *ep) {
    double now = dsi_now(), limit = ep->o.timeout_ms / 1000.0;
    for (int u = 0; u < 2; u++) {
        ep_ub *b = &ep->ub[u];
        ep_xchg *xs[2] = {&b->disp, &b->comb};
        for (int k = 0; k < 2; k++) {
            ep_xchg *x = xs[k];
            if (!x->posted || x->done || now - x->t_post < limit) continue;
            char peers[512];
            if (!list_peers(x->rq_cnt_in, x->rq_data_in, ep->P, peers, sizeof peers))
                list_peers(x->rq_cnt_out, x->rq_data_out, ep->P, peers, sizeof peers);
            return dsi_error(DSI_ETIMEOUT,
                             "ep rank %d: %s of layer %d (micro-batch %d) got no answer from rank(s) %s in %d ms: "
                             "a rank is dead or stuck",
                             ep->rank, k ? "combine" : "dispatch", b->layer, u, peers, ep->o.timeout_ms);
        }
    }
    return DSI_OK;
}
