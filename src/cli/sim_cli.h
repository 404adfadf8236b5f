/* Helpers shared by the `dsinfer sim` modes (cmd_sim.c, cmd_sim_pricing.c). */
#ifndef DSI_CLI_SIM_CLI_H
#define DSI_CLI_SIM_CLI_H

#include <stdio.h>

#include "dsinfer/econ.h"
#include "dsinfer/sim.h"

/* Loads `path`, or the built-in DeepSeek pricing when NULL; prints errors. */
int dsi__sim_load_pricing(const char *path, dsi_pricing **out);
/* One planner option at argv[*i]: 1 consumed, 0 not ours, -1 a bad value
 * (message printed); a value that is not a number sets *bad and is consumed. */
int dsi__sim_parse_plan_opt(int argc, char **argv, int *i, dsi_sim_config *c, const char **svg_dir, int *json,
                            int *bad);
void dsi__sim_print_params(const dsi_sim_config *c, FILE *f);
void dsi__sim_print_result(const dsi_sim_config *c, const dsi_sim_result *r, int json);
int dsi__sim_write_svgs(const dsi_sim_config *c, const dsi_sim_result *r, const char *dir, const char *tag);
int dsi__sim_cmd_pricing(int argc, char **argv);

#endif
