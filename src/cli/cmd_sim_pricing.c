/* dsinfer sim pricing: flat vs night-discount vs load-based prices. */
#include <stdio.h>

#include "cli/sim_cli.h"

int dsi__sim_cmd_pricing(int argc, char **argv) {
    fprintf(stderr, "dsinfer sim pricing: not yet\n");
    return 1;
}
