/* dsinfer chat-render: OpenAI-style messages JSON on stdin -> the rendered prompt. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/tokenizer_cli.h"
#include "dsinfer/tokenizer.h"


static const char USAGE[] =
    "usage: dsinfer chat-render --tokenizer DIR [--no-generation-prompt] [--ids]\n"
    "Reads a messages JSON array (or a request object with \"messages\") on stdin and prints\n"
    "the prompt rendered with the tokenizer's chat template.\n"
    "  --tokenizer DIR          folder with tokenizer.json and tokenizer_config.json\n"
    "  --no-generation-prompt   do not end with the assistant turn opener\n"
    "  --ids                    print the prompt's token ids instead of its text\n";

int dsi_cmd_chat_render(int argc, char **argv) {
    const char *dir = NULL;
    int no_gen = 0, want_ids = 0;
    int u = dsi_cli_tokenizer_args(argc, argv, USAGE, &dir, &no_gen, "--no-generation-prompt", &want_ids, "--ids");
    if (u) return u < 0 ? 0 : u;
    dsi_tokenizer *tok = NULL;
    size_t len = 0, tl = 0, n = 0;
    char *in = NULL, *text = NULL;
    int32_t *ids = NULL;
    int rc = dsi_tokenizer_load(dir, &tok);
    if (rc == DSI_OK && !(in = dsi_cli_read_stdin(&len))) rc = dsi_error(DSI_EIO, "cannot read stdin");
    if (rc == DSI_OK) rc = dsi_chat_render_json(tok, in, len, !no_gen, &text, &tl);
    if (rc == DSI_OK && want_ids) rc = dsi_tokenizer_encode(tok, text, tl, 0, &ids, &n);
    if (rc == DSI_OK && want_ids) {
        for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
    } else if (rc == DSI_OK) {
        fwrite(text, 1, tl, stdout);
    } else {
        fprintf(stderr, "chat-render: %s\n", dsi_last_error());
    }
    free(ids);
    free(text);
    free(in);
    dsi_tokenizer_destroy(tok);
    return rc == DSI_OK ? 0 : 1;
}
