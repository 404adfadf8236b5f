/* The expert-parallel API in a build without MPI (src/ep/ is compiled only
 * with MPI): every entry point reports that EP is unavailable. */
#ifndef DSI_HAVE_MPI
#include "dsinfer/ep.h"

#include <stdlib.h>
#include <string.h>

static int none(void) { return dsi_error(DSI_EUNSUPPORTED, "expert parallelism: this build has no MPI"); }

int dsi_ep_launched(void) { return 0; }
int dsi_ep_init(void) { return none(); }
int dsi_ep_rank(void) { return 0; }
int dsi_ep_size(void) { return 1; }
void dsi_ep_finalize(void) {}
void dsi_ep_abort(int code) { exit(code); }
int dsi_ep_create(dsi_engine *e, const dsi_ep_opts *opts, dsi_ep **out) {
    *out = NULL;
    return none();
}
void dsi_ep_destroy(dsi_ep *ep) {}
int dsi_ep_step(dsi_ep *ep, const dsi_seq_step *seqs, int n_seqs) { return none(); }
int dsi_ep_idle(dsi_ep *ep) { return none(); }
void dsi_ep_get_stats(const dsi_ep *ep, dsi_ep_layer_stats *out) {}
void dsi_ep_reset_stats(dsi_ep *ep) {}
int dsi_ep_expert_balance(dsi_ep *ep, double *out) { return none(); }
int dsi_ep_rebalances(const dsi_ep *ep) { return 0; }
int dsi_ep_write_eplb_metrics(dsi_ep *ep, char *buf, size_t cap) {
    return dsi_error(DSI_EUNSUPPORTED, "built without MPI: no expert parallelism");
}
void dsi_ep_request_rebalance(dsi_ep *ep) {}
#else
typedef int dsi_ep_none_unused; /* ISO C wants a non-empty translation unit */
#endif
