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

/* A flag's numeric value. dsi_cli_int: the whole of v is a base-10 integer in
 * int range; dsi_cli_num: the whole of v is a finite number (strtod). On
 * anything else (empty, leading blanks, trailing characters, overflow, nan,
 * inf) they print "dsinfer <cmd>: <flag>: '<v>' is not a whole number" (or
 * "... is not a number", "... is out of range") to stderr, set *bad and
 * return 0, so a subcommand parses every flag, then exits 2 if *bad:
 *     o.port = dsi_cli_int("serve", "--port", v, &bad);  ...  if (bad) return 2; */
int dsi_cli_int(const char *cmd, const char *flag, const char *v, int *bad);
double dsi_cli_num(const char *cmd, const char *flag, const char *v, int *bad);
/* The same for an unsigned 64-bit value (seeds): digits only. */
uint64_t dsi_cli_u64(const char *cmd, const char *flag, const char *v, int *bad);

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
