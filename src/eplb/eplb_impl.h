/* Internals of the expert-parallel load balancer: one layer at a time. */
#ifndef DSI_EPLB_IMPL_H
#define DSI_EPLB_IMPL_H

#include <stdint.h>

/* DeepSeek's eplb.py for one layer. load[E]; writes phy2log[R] and
 * phyrank[R] (which replica of its expert each slot holds: 0 = the first
 * created). Hierarchical when G % N == 0, else global (1 group, 1 node).
 * Shapes must have passed dsi_eplb_check_shape. DSI_OK or DSI_ENOMEM. */
int dsi__eplb_deepseek_layer(const double *load, int E, int R, int G, int N, int P,
                             int32_t *phy2log, int32_t *phyrank);

/* Our policy for one layer. `seed` (may be NULL) is DeepSeek's phy2log[R] for
 * the same layer: it is one of the starting points, which is how BEST never
 * loses to it. Writes phy2log[R] with no expert twice on one GPU. */
int dsi__eplb_best_layer(const double *load, int E, int R, int G, int N, int P,
                         const int32_t *seed, int32_t *phy2log);

/* Busiest GPU load of one layer (absolute, not over the mean). */
double dsi__eplb_layer_max_load(const int32_t *phy2log, const double *load, int E, int R, int P);

#endif
