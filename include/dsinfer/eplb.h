/* dsinfer/eplb.h - expert-parallel load balancer (redundant-expert placement).
 *
 * Given the measured load of every logical expert in every MoE layer (tokens
 * routed to it), choose which logical expert each physical expert slot holds.
 * Hot experts get several replicas; a replica carries load/replicas of its
 * expert. Slots are GPU-major: GPU g owns slots [g*R/P, (g+1)*R/P), and node n
 * owns GPUs [n*P/N, (n+1)*P/N).
 *
 *     dsi_eplb_placement pl = {0};
 *     if (dsi_eplb_rebalance(load, L, E, R, G, N, P, DSI_EPLB_BEST, &pl) != DSI_OK)
 *         fprintf(stderr, "eplb: %s\n", dsi_last_error());
 *     int slot = dsi_eplb_pick_replica(&pl, layer, expert, token_index);
 *     dsi_eplb_placement_free(&pl);
 *
 * Two policies:
 *  - DSI_EPLB_DEEPSEEK reproduces DeepSeek's open eplb.py (hierarchical when
 *    groups divide evenly over nodes, global otherwise), tie-breaking included.
 *  - DSI_EPLB_BEST never does worse than DEEPSEEK per layer (max_over_mean), never
 *    puts two replicas of one expert on one GPU, and in hierarchical mode keeps
 *    every replica in its group's node.
 *
 * Online use (the EP runtime): one dsi_eplb_stats per rank counts routed
 * tokens per (layer, expert) over a moving window of steps; the runtime sums
 * the ranks' snapshots (all-reduce), asks dsi_eplb_should_rebalance whether a
 * new placement predicts enough gain, and if so moves weights and switches to
 * it at a step boundary. Placements travel as JSON files
 * (dsi_eplb_placement_write / dsi_eplb_placement_load).
 */
#ifndef DSINFER_EPLB_H
#define DSINFER_EPLB_H

#include <stdint.h>
#include <stdio.h>

#include "dsinfer/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum dsi_eplb_policy {
    DSI_EPLB_DEEPSEEK = 0, /* DeepSeek's eplb.py, exactly */
    DSI_EPLB_BEST = 1,     /* ours: never worse than DEEPSEEK, no duplicate per GPU */
} dsi_eplb_policy;

/* A placement for all layers. Arrays are owned by the struct (malloc'd) and
 * released by dsi_eplb_placement_free. */
typedef struct dsi_eplb_placement {
    int n_layers;     /* L */
    int n_experts;    /* E logical experts per layer */
    int n_slots;      /* R physical slots per layer */
    int n_gpus;       /* P; slots per GPU = R / P */
    int max_replicas; /* k: width of log2phy (largest logcnt over all layers) */
    int32_t *phy2log; /* [L][R] logical expert held by each slot */
    int32_t *log2phy; /* [L][E][k] slots holding each expert, padded with -1 */
    int32_t *logcnt;  /* [L][E] replicas of each expert (>= 1) */
} dsi_eplb_placement;

/* Releases the arrays and zeroes the struct. NULL or zeroed: no-op. */
void dsi_eplb_placement_free(dsi_eplb_placement *pl);

/* Checks the argument shapes shared by every entry point: all positive,
 * E % G == 0, P % N == 0, R % P == 0, R >= E. The policy is hierarchical when
 * G % N == 0, global otherwise. DSI_EINVAL with a message on failure. */
int dsi_eplb_check_shape(int n_experts, int n_slots, int n_groups, int n_nodes, int n_gpus);

/* Computes a placement for load[L][E] (tokens, finite, >= 0) over R slots,
 * G expert groups, N nodes and P GPUs. `out` must be zeroed or freed; on
 * success it owns new arrays, on failure it is left zeroed. DSI_EINVAL on bad
 * shapes or loads; DSI_EINVAL also when BEST cannot avoid two replicas of an
 * expert on one GPU (more slots per GPU than experts per node). */
int dsi_eplb_rebalance(const double *load, int n_layers, int n_experts, int n_slots, int n_groups,
                       int n_nodes, int n_gpus, dsi_eplb_policy policy, dsi_eplb_placement *out);

/* Busiest GPU load over mean GPU load for one layer: phy2log[R] (slot ->
 * expert), load[E], R slots over P GPUs, each replica carrying
 * load[e] / (replicas of e). A layer with zero total load scores 1.0.
 * Returns a negative status if phy2log is out of range or leaves an expert
 * without a replica. */
int dsi_eplb_layer_max_over_mean(const int32_t *phy2log, const double *load, int n_experts,
                                 int n_slots, int n_gpus, double *out_mom);

/* A lower bound on the max_over_mean any placement obeying BEST's rules (no
 * expert twice on a GPU; hierarchical: G/N whole groups per node) can reach
 * for load[E]: per node, the larger of its mean GPU load and its smallest
 * possible heaviest replica, minimised over the splits of groups into nodes
 * (enumerated when there are few, relaxed otherwise). For reports. */
int dsi_eplb_layer_lower_bound(const double *load, int n_experts, int n_slots, int n_groups, int n_nodes,
                               int n_gpus, double *out_mom);

/* max_over_mean for every layer of a placement: out[L]. */
int dsi_eplb_max_over_mean(const dsi_eplb_placement *pl, const double *load, double *out);

/* Checks a placement's internal consistency: slots in range, every expert at
 * least one replica, logcnt and log2phy agree with phy2log. When n_nodes > 0
 * and n_groups % n_nodes == 0 (hierarchical), also that every replica lies in
 * the node holding its whole group. When no_dup_per_gpu, also that no GPU holds
 * two replicas of one expert. DSI_EFORMAT with a message naming the layer. */
int dsi_eplb_placement_validate(const dsi_eplb_placement *pl, int n_groups, int n_nodes,
                                int no_dup_per_gpu);

/* Reads `{"load": [[...], ...]}` from a JSON text: *load (malloc'd, caller
 * frees with free()) gets [L][E] doubles. Rejects malformed JSON, ragged or
 * empty rows, non-numbers, NaN/infinite and negative values. */
int dsi_eplb_load_parse(const char *json, size_t len, double **load, int *n_layers, int *n_experts);
int dsi_eplb_load_read(const char *path, double **load, int *n_layers, int *n_experts);

/* Writes the placement file: {"phy2log": [L][R], "log2phy": [L][E][k],
 * "logcnt": [L][E], "max_over_mean": [L]} (mom may be NULL: the key is then
 * omitted). One layer per line. */
int dsi_eplb_placement_write(const dsi_eplb_placement *pl, const double *mom, FILE *f);

/* Parses a placement file and validates it against the runtime's shape:
 * E experts, R slots, P GPUs (the layer count comes from the file; pass
 * expect_layers > 0 to require it). log2phy and logcnt are checked against
 * phy2log when present, rebuilt from it when absent. `out` as for rebalance. */
int dsi_eplb_placement_parse(const char *json, size_t len, int n_experts, int n_slots, int n_gpus,
                             int expect_layers, dsi_eplb_placement *out);
int dsi_eplb_placement_load(const char *path, int n_experts, int n_slots, int n_gpus,
                            int expect_layers, dsi_eplb_placement *out);

/* Builds logcnt and log2phy from phy2log (replicas listed in slot order).
 * Used after editing phy2log; allocates into `pl` (phy2log and the shape
 * fields must be set, logcnt/log2phy NULL). */
int dsi_eplb_placement_index(dsi_eplb_placement *pl);

/* Relabels `next` so that switching from `cur` moves few weights: renumbers
 * whole nodes (n_nodes of them), GPUs within a node and slots within a GPU,
 * none of which changes any GPU's load or which node holds a group. Greedy
 * matching on replicas kept in place. *moved_slots (may be NULL) gets the
 * number of slots, over all layers, whose expert changes: the weights the
 * runtime must load beside the old ones before switching. Pass n_nodes = 1
 * for a global placement (GPUs may then move across nodes). The index
 * (log2phy, logcnt) is rebuilt in slot order. */
int dsi_eplb_align(const dsi_eplb_placement *cur, dsi_eplb_placement *next, int n_nodes, int *moved_slots);

/* The slot serving `token` for (layer, expert): replica token % replicas.
 * Passing a running count of the tokens sent to this (layer, expert) gives
 * the exact equal shares the balancer assumes; a token index gives them on
 * average. No checking: the hot path of dispatch. */
static inline int dsi_eplb_pick_replica(const dsi_eplb_placement *pl, int layer, int expert,
                                        uint64_t token) {
    size_t le = (size_t)layer * pl->n_experts + expert;
    int c = pl->logcnt[le];
    return pl->log2phy[le * pl->max_replicas + (int)(token % (uint64_t)c)];
}

/* ---- online statistics ---------------------------------------------------- */

/* Per-layer per-expert routed-token counters over a moving window of the last
 * W steps. Not thread-safe: one per rank, fed by the thread that routes. */
typedef struct dsi_eplb_stats dsi_eplb_stats;

/* L layers, E experts, window of W >= 1 steps. NULL on bad sizes or no memory
 * (message set). */
dsi_eplb_stats *dsi_eplb_stats_create(int n_layers, int n_experts, int window_steps);
void dsi_eplb_stats_destroy(dsi_eplb_stats *s);

/* Counts n routed (token, expert) pairs of one layer in the current step.
 * DSI_ERANGE (nothing counted) if the layer or any expert id is out of range. */
int dsi_eplb_stats_record(dsi_eplb_stats *s, int layer, const int32_t *expert_ids, size_t n);

/* Closes the current step: the window slides by one, dropping the oldest step
 * once W steps are held. */
void dsi_eplb_stats_step(dsi_eplb_stats *s);

/* Steps closed so far (all of them, not only those still in the window). */
int64_t dsi_eplb_stats_steps(const dsi_eplb_stats *s);

/* The window's totals, including the open step: out[L][E] tokens. */
void dsi_eplb_stats_snapshot(const dsi_eplb_stats *s, double *out);

/* Balancer configuration held by the runtime. */
typedef struct dsi_eplb_config {
    int n_slots, n_groups, n_nodes, n_gpus;
    dsi_eplb_policy policy;
} dsi_eplb_config;

/* Result of dsi_eplb_should_rebalance. Arrays are caller-provided [L] or NULL. */
typedef struct dsi_eplb_decision {
    int rebalance;       /* 1 when gain >= threshold */
    double gain;         /* predicted relative drop of sum over layers of the busiest GPU's load */
    double *mom_before;  /* [L] max_over_mean of the current placement, or NULL */
    double *mom_after;   /* [L] max_over_mean of the proposal, or NULL */
    int moved_slots;     /* slots whose expert the (aligned) proposal changes */
} dsi_eplb_decision;

/* Predicts what rebalancing `load` (e.g. a summed snapshot, [L][E]) would gain
 * over the current placement `cur`. Layers run one after another, so the step
 * time follows the sum over layers of each layer's busiest GPU: gain =
 * 1 - sum(max_after) / sum(max_before) (0 when there is no load). The
 * proposal is aligned with `cur` (dsi_eplb_align) so that it moves few
 * weights. When `proposal` is non-NULL it receives it (always computed; the
 * caller frees it). */
int dsi_eplb_should_rebalance(const double *load, const dsi_eplb_placement *cur,
                              const dsi_eplb_config *cfg, double threshold,
                              dsi_eplb_decision *dec, dsi_eplb_placement *proposal);

/* The same on the stats window's own snapshot (one rank's view; a multi-rank
 * runtime sums snapshots first and calls dsi_eplb_should_rebalance). */
int dsi_eplb_stats_should_rebalance(const dsi_eplb_stats *s, const dsi_eplb_placement *cur,
                                    const dsi_eplb_config *cfg, double threshold, dsi_eplb_decision *dec,
                                    dsi_eplb_placement *proposal);

#ifdef __cplusplus
}
#endif
#endif
