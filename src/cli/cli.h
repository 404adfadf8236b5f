/* Subcommands of the dsinfer binary. Each returns a process exit code
 * (0 success, 1 runtime failure, 2 usage error) and prints its own errors. */
#ifndef DSI_CLI_H
#define DSI_CLI_H

#include <stdint.h>

typedef struct dsi_command {
    const char *name;
    const char *summary;
    int (*run)(int argc, char **argv); /* argv[0] is the subcommand name */
} dsi_command;

/* Returns the value of --name=value / --name value at argv[*i], advancing *i,
 * or NULL when argv[*i] is not that flag. Sets *missing when the value is absent. */
const char *dsi_cli_flag(int argc, char **argv, int *i, const char *name, int *missing);

/* "1,2,3" (commas or spaces) -> token ids in *out (malloc'ed, caller frees).
 * Returns the count, or -1 on a malformed list or out of memory. */
int dsi_cli_parse_ids(const char *s, int32_t **out);
int dsi_cmd_eplb(int argc, char **argv);

int dsi_cmd_sim(int argc, char **argv);
int dsi_cmd_report(int argc, char **argv);

int dsi_cmd_demo(int argc, char **argv);
int dsi_cmd_generate(int argc, char **argv);
int dsi_cmd_logits(int argc, char **argv);
int dsi_cmd_make_model(int argc, char **argv);
int dsi_cmd_inspect(int argc, char **argv);
int dsi_cmd_tokenize(int argc, char **argv);
int dsi_cmd_detokenize(int argc, char **argv);
int dsi_cmd_chat_render(int argc, char **argv);

int dsi_cmd_serve(int argc, char **argv);
/* cmd_cuda.c: --device value in argv (0 cpu or absent, 1 cuda, -1 bad, message printed) */
int dsi_cli_device(int argc, char **argv);
int dsi_cmd_logits_cuda(int argc, char **argv);
int dsi_cmd_generate_cuda(int argc, char **argv);
int dsi_cmd_router(int argc, char **argv);

#endif
