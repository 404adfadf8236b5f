/* Helpers shared by the tokenize, detokenize and chat-render subcommands. */
#ifndef DSI_TOKENIZER_CLI_H
#define DSI_TOKENIZER_CLI_H

#include <stddef.h>

/* Reads all of stdin into a malloc'd, NUL-terminated buffer (caller frees); NULL on failure. */
char *dsi_cli_read_stdin(size_t *len);

/* Parses --tokenizer DIR, --help and up to two boolean flags (names may be NULL).
 * Returns 0 to go on, -1 after printing help (exit 0), 2 after a usage error. */
int dsi_cli_tokenizer_args(int argc, char **argv, const char *usage, const char **dir, int *flag_a,
                           const char *flag_a_name, int *flag_b, const char *flag_b_name);

#endif
