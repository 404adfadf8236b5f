/* dsinfer/ep.h - expert parallelism across processes (an EP group).
 *
 * N ranks started by mpirun form one group. Each rank runs attention and the
 * shared expert for its own sequences (DP attention) and holds a share of the
 * routed experts as physical slots: rank g owns slots [g*R/N, (g+1)*R/N) of
 * the placement (an EPLB placement file, or expert e in slot e). Every MoE
 * layer sends each token to the ranks holding its chosen experts (DISPATCH,
 * FP8 with per-128 scales or BF16), runs the experts there (MLP) and returns
 * each (token, expert) output in BF16, weighted and summed at home in float32
 * (COMBINE, DeepEP's low-latency layout). No rounding depends on the
 * placement, so one process with the matching dsi_moe_io (engine.h; the CLI's
 * --dispatch) computes the same numbers as the group. With overlap on, each
 * rank splits its batch into two micro-batches whose transfers fly while the
 * other computes.
 *
 *     if (dsi_ep_launched()) {
 *         dsi_ep_init();
 *         dsi_ep *ep;
 *         dsi_ep_opts o = {.dispatch = DSI_EP_BF16};
 *         dsi_ep_create(engine, &o, &ep);
 *         dsi_ep_step(ep, my_seqs, n_mine);   // every rank, every step (n may be 0)
 *         dsi_ep_idle(ep);                    // serve the others until all are done
 *         dsi_ep_destroy(ep);
 *         dsi_ep_finalize();
 *     }
 *
 * Every call that moves data is collective over the group. A transfer that
 * does not complete within timeout_ms (a dead or stuck rank) fails the step
 * with DSI_ETIMEOUT naming the ranks that did not answer; the group state is
 * then undefined, and the caller reports and calls dsi_ep_abort, which ends
 * every rank (mpirun exits non-zero). Without MPI in the build every function
 * returns DSI_EUNSUPPORTED and dsi_ep_launched() is 0. */
#ifndef DSINFER_EP_H
#define DSINFER_EP_H

#include "dsinfer/engine.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum dsi_ep_dispatch {
    DSI_EP_FP8 = 0,  /* e4m3 activations with one float scale per 128 channels */
    DSI_EP_BF16 = 1,
    DSI_EP_F32 = 2,  /* lossless, for checking the plumbing (combine is then float32 too) */
} dsi_ep_dispatch;

/* The engine rounding that reproduces a dispatch format in one process. */
static inline dsi_moe_io dsi_ep_moe_io(dsi_ep_dispatch d) {
    return d == DSI_EP_BF16 ? DSI_MOE_IO_BF16 : d == DSI_EP_FP8 ? DSI_MOE_IO_FP8 : DSI_MOE_IO_EXACT;
}

typedef struct dsi_ep_opts {
    const char *placement;   /* EPLB placement file (JSON, phy2log [L][R]); NULL = expert e in slot e.
                              * L is the number of MoE layers, or 1 (used for every MoE layer). */
    dsi_ep_dispatch dispatch;
    int no_overlap;          /* one micro-batch, each transfer waited for as soon as posted */
    int timeout_ms;          /* a transfer pending this long fails the group; 0 = 30000 */
    double link_gbps;        /* emulated link: outgoing GB/s per rank (0 = none, loopback speed) */
    double link_latency_us;  /* emulated one-way latency added to every message */
    int eplb_every;          /* online EPLB: consider a new placement every this many steps; 0 = only on request */
    double eplb_threshold;   /* ...and switch only when the predicted gain is at least this (0 = 0.05) */
    int eplb_window;         /* steps of routing statistics kept (0 = 64) */
} dsi_ep_opts;

/* Per layer figures accumulated since the last reset (seconds, summed over
 * steps, this rank). */
typedef struct dsi_ep_layer_stats {
    double compute_s;        /* stages run on this rank's cores (wall) */
    double compute_cpu_s;    /* the same in the calling thread's CPU time (wall above it: descheduled) */
    double dispatch_s;       /* dispatch post to completion, summed over micro-batches */
    double combine_s;        /* combine post to completion */
    double wait_s;           /* idle: nothing to compute, waiting for a transfer */
    double sent_bytes;       /* dispatch + combine bytes sent to other ranks */
    double expert_rows;      /* (token, rank) rows this rank's experts processed */
} dsi_ep_layer_stats;

typedef struct dsi_ep dsi_ep;

/* 1 when this process was started by mpirun in a group of more than one. */
int dsi_ep_launched(void);
/* Initialises MPI (once per process). */
int dsi_ep_init(void);
/* This process's rank and the group size (0 and 1 before init). */
int dsi_ep_rank(void);
int dsi_ep_size(void);
void dsi_ep_finalize(void);
/* Ends every rank of the group with `code` (after a failed collective). */
void dsi_ep_abort(int code);

/* An EP runtime over `e` (borrowed; its model's experts are read only for
 * this rank's slots). Collective. */
int dsi_ep_create(dsi_engine *e, const dsi_ep_opts *opts, dsi_ep **out);
void dsi_ep_destroy(dsi_ep *ep);

/* One forward step of this rank's batch (n_seqs may be 0: the rank still
 * serves its experts). Collective: every rank calls it (or dsi_ep_idle) once
 * per step. Results as dsi_engine_step. */
int dsi_ep_step(dsi_ep *ep, const dsi_seq_step *seqs, int n_seqs);
/* Serves the other ranks' steps with an empty batch until every rank has
 * called dsi_ep_idle; then returns DSI_OK on all of them. */
int dsi_ep_idle(dsi_ep *ep);

/* Figures per layer ([n_layers], caller-provided) since the last reset. */
void dsi_ep_get_stats(const dsi_ep *ep, dsi_ep_layer_stats *out);
void dsi_ep_reset_stats(dsi_ep *ep);
/* Busiest rank's routed rows over mean, per MoE layer, since the last reset
 * (collective: sums over the group). out [n_moe_layers]. */
int dsi_ep_expert_balance(dsi_ep *ep, double *out);
/* Times the online balancer switched placement so far. */
int dsi_ep_rebalances(const dsi_ep *ep);
/* Prometheus text for /metrics: rebalances so far and, from the last
 * online-EPLB decision, per-MoE-layer balancedness (busiest rank over mean)
 * of the placement then in force and of the proposal. Any thread. Returns
 * the length written or a negative status. */
int dsi_ep_write_eplb_metrics(dsi_ep *ep, char *buf, size_t cap);

/* Asks for a rebalance at the end of the next step (any thread, any rank;
 * e.g. an operator's request on rank 0): the group sums its routing counts
 * and switches placement if the predicted gain passes the threshold. */
void dsi_ep_request_rebalance(dsi_ep *ep);

#ifdef __cplusplus
}
#endif
#endif
