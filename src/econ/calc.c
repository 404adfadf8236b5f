/* The calculator: cost, revenue and margin from published day totals. */
#include "dsinfer/econ.h"

#include <string.h>

void dsi_econ_calc_deepseek(dsi_econ_calc_in *in) {
    memset(in, 0, sizeof *in);
    in->nodes = 226.75;
    in->gpus_per_node = 8;
    in->gpu_cost_per_hour = 2.0;
    in->hours = 24;
    in->tokens[DSI_TOK_INPUT_HIT] = 342e9;
    in->tokens[DSI_TOK_INPUT_MISS] = 608e9 - 342e9;
    in->tokens[DSI_TOK_OUTPUT] = 168e9;
    in->usd_per_mtok[DSI_TOK_INPUT_HIT] = 0.14;
    in->usd_per_mtok[DSI_TOK_INPUT_MISS] = 0.55;
    in->usd_per_mtok[DSI_TOK_OUTPUT] = 2.19;
}

int dsi_econ_calc(const dsi_econ_calc_in *in, dsi_econ_calc_out *out) {
    if (!in || !out) return dsi_error(DSI_EINVAL, "calc: NULL argument");
    if (!(in->nodes >= 0) || in->gpus_per_node <= 0 || !(in->gpu_cost_per_hour >= 0) || !(in->hours > 0))
        return dsi_error(DSI_EINVAL, "calc: nodes, GPUs per node, cost and hours must be positive");
    memset(out, 0, sizeof *out);
    out->cost_usd = in->nodes * in->gpus_per_node * in->gpu_cost_per_hour * in->hours;
    for (int c = 0; c < DSI_TOK_N; c++) {
        if (!(in->tokens[c] >= 0) || !(in->usd_per_mtok[c] >= 0))
            return dsi_error(DSI_EINVAL, "calc: token counts and prices must be >= 0");
        /* tokens / 1e6 first keeps the product exact for whole millions */
        out->revenue_by_class[c] = in->tokens[c] / 1e6 * in->usd_per_mtok[c];
        out->revenue_usd += out->revenue_by_class[c];
    }
    out->margin = out->cost_usd > 0 ? (out->revenue_usd - out->cost_usd) / out->cost_usd : 0;
    return DSI_OK;
}
