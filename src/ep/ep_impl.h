/* Internals of the EP runtime shared by ep.c (group, placement, schedule)
 * and xfer.c (dispatch and combine over the transport). */
#ifndef DSI_EP_IMPL_H
#define DSI_EP_IMPL_H

#include <pthread.h>

#include "dsinfer/ep.h"
#include "dsinfer/eplb.h"
#include "engine/engine_impl.h"
#include "ep/transport.h"

/* Stages of one micro-batch through one layer (ARCHITECTURE-SKETCH names).
 * ATTN-1 ends by gating and posting the DISPATCH; MLP starts once it has
 * arrived and ends by posting the COMBINE; DONE adds the returned rows. */
enum { ST_A0, ST_A1, ST_SHARED, ST_MLP, ST_DONE, ST_FINISHED };

/* One exchange (dispatch or combine of one layer) in flight: request handles
 * per peer, -1 when none or complete. */
typedef struct ep_xchg {
    int posted, done;
    int pending;           /* requests not yet complete */
    double t_post;
    int *rq_cnt_in, *rq_data_in, *rq_cnt_out, *rq_data_out; /* [P] (combine uses data_in/out) */
} ep_xchg;

typedef struct ep_ub {
    dsi_ubatch st;         /* the engine's state for this micro-batch while another is current */
    dsi_seq_step *steps;   /* [max_tokens] this micro-batch's slice of the batch */
    int n_steps;
    int T;                 /* tokens on this rank */
    int *T_peer;           /* [P] tokens of each rank in this micro-batch */
    int active;            /* some rank has tokens: the micro-batch runs the layer schedule */
    int layer, stage;
    /* home side: rows this rank sends, by destination rank */
    uint8_t *sbuf;         /* [P][Tm][row_bytes] */
    int *send_rows;        /* [P] */
    int *send_tok;         /* [P][Tm] token (row of x) of each sent row */
    /* expert side: rows received, by source rank */
    int *cnt_in;           /* [P] */
    uint8_t *rbuf;         /* [P][Tm][row_bytes] */
    /* combine: one row per (token, expert) pair, grouped by peer; grown as needed */
    uint8_t *cbuf_out;     /* [cout_off[P]][comb_row_bytes] expert outputs to return, by source */
    uint8_t *cbuf_in;      /* [cin_off[P]][comb_row_bytes] outputs returned, by destination */
    size_t cout_cap, cin_cap; /* bytes */
    int *cout_off, *cin_off;  /* [P+1] first pair row of each peer */
    ep_xchg disp, comb;
} ep_ub;

struct dsi_ep {
    dsi_engine *e;
    const dsi_config *c;
    dsi_ep_opts o;
    dsi_ep_transport *tp;
    int rank, P, Tm, D, K, E;
    int n_moe;             /* MoE layers */
    int *moe_index;        /* [n_layers] index among MoE layers, -1 for dense */
    dsi_eplb_placement pl; /* n_layers = n_moe, n_slots = R, n_gpus = P */
    int spr;               /* slots per rank */
    uint64_t *rr;          /* [n_moe][E] replica round-robin counters */
    size_t row_bytes, payload_bytes; /* dispatched row: meta + activation */
    size_t comb_row_bytes;           /* combined row: D bf16 (f32 in the lossless mode) */
    int n_blk;             /* 128-channel blocks per row (FP8 scales) */
    ep_ub ub[2];
    int cur;               /* micro-batch whose state the engine holds, -1 = the engine's own */
    /* expert-side scratch shared by both micro-batches (MLP runs one at a time) */
    float *ex, *h1, *h2;   /* [Tm][D], [Tm][moe_inter] x2 */
    int *slot_count, *slot_off; /* [spr], [spr+1] */
    int *pair_row;         /* [P*Tm*K] received row of each (row, slot) pair, grouped by slot */
    int *pair_out;         /* [P*Tm*K] its row in cbuf_out */
    const uint8_t **comb_src; /* [Tm*K] home side: combined row of each (token, k) */
    float *comb_tmp;       /* [D] */
    uint8_t *tmp_row;      /* [row_bytes] */
    int *hdr_all, *hdr_rq; /* step header: [P][HDR] received, [2P] requests */
    int err;               /* first error of the step (reported after it) */
    int fault_layer, fault_mode; /* DSI_EP_FAULT test hook: 1 exit, 2 hang */
    dsi_ep_layer_stats *st;/* [n_layers] */
    double *rows_pairs;    /* [n_moe] (token, expert) pairs served since reset */
    /* online EPLB */
    dsi_eplb_stats *eplb;  /* routing counts of this rank's tokens */
    int64_t steps;
    int rebalances;
    /* the last online-EPLB decision, for /metrics (read on HTTP threads) */
    pthread_mutex_t eplb_mu;
    double *mom_before, *mom_after; /* [n_moe] busiest rank's load over mean: placement in force, proposal */
    double last_gain;
    int have_decision;
    _Atomic int want_rebalance; /* set by dsi_ep_request_rebalance (any thread) */
    int rebalance_now;     /* some rank asked, per this step's header */
};

/* Polls every exchange in flight (the engine's poll hook). */
void dsi__ep_poll(dsi_ep *ep);
/* Posts the dispatch of micro-batch u at `layer` (after its gate). */
int dsi__ep_dispatch_post(dsi_ep *ep, int u, int layer);
/* Runs this rank's experts over what micro-batch u received, posts the combine. */
int dsi__ep_mlp_and_combine(dsi_ep *ep, int u, int layer);
/* Adds the combined rows of micro-batch u into its residual stream (the
 * micro-batch must be current). */
void dsi__ep_combine_finish(dsi_ep *ep, int u);
/* Fails with DSI_ETIMEOUT naming the ranks an overdue exchange waits for. */
int dsi__ep_check_timeouts(dsi_ep *ep);
int dsi__ep_xchg_alloc(ep_xchg *x, int P);
void dsi__ep_xchg_free(ep_xchg *x);

#endif
