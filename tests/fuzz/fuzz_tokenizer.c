/* libFuzzer target for the tokenizer (built only on request: tests/fuzz/build.sh).
 * The first input byte picks what the rest feeds:
 *   0: tokenizer.json text to load (then encode/decode a fixed string with it)
 *   1: text to encode with the golden tokenizer, then decode and compare
 *   2: a chat messages JSON to render
 *   3: ids (2 bytes each) for the streaming detokenizer
 *   4: text for the reasoning splitter, pushed in chunks the next byte sizes */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsinfer/tokenizer.h"

static dsi_tokenizer *golden(void) {
    static dsi_tokenizer *tok;
    if (!tok && dsi_tokenizer_load(DSI_SOURCE_DIR "/tests/data/golden/tokenizer", &tok) != DSI_OK) abort();
    return tok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *s = (const char *)data + 1;
    size_t n = size - 1;
    dsi_tokenizer *tok = golden(), *t;
    int32_t *ids;
    size_t k;
    char *text;
    switch (data[0] % 5) {
    case 0:
        if (dsi_tokenizer_load_json(s, n, NULL, 0, &t) == DSI_OK) {
            if (dsi_tokenizer_encode(t, "Hello 世界 123 <s>", 20, DSI_TOK_ADD_BOS, &ids, &k) == DSI_OK) {
                if (dsi_tokenizer_decode(t, ids, k, 0, &text, NULL) == DSI_OK) free(text);
                free(ids);
            }
            dsi_tokenizer_destroy(t);
        }
        break;
    case 1:
        if (dsi_tokenizer_encode(tok, s, n, 0, &ids, &k) == DSI_OK) {
            size_t len;
            if (dsi_tokenizer_decode(tok, ids, k, 0, &text, &len) != DSI_OK || len != n || memcmp(text, s, n)) abort();
            free(text);
            free(ids);
        }
        break;
    case 2:
        if (dsi_chat_render_json(tok, s, n, 1, &text, NULL) == DSI_OK) free(text);
        break;
    case 3: {
        dsi_detok *d;
        const char *piece;
        size_t pl;
        if (dsi_detok_create(tok, n % 2 ? DSI_TOK_SKIP_SPECIAL : 0, &d) != DSI_OK) abort();
        for (size_t i = 0; i + 1 < n; i += 2) dsi_detok_push(d, (int32_t)(data[1 + i] | data[2 + i] << 8), &piece, &pl);
        dsi_detok_flush(d, &piece, &pl);
        dsi_detok_destroy(d);
        break;
    }
    default: {
        dsi_reasoning *r;
        dsi_reasoning_delta dl;
        if (n < 1 || dsi_reasoning_create(data[1] & 1, &r) != DSI_OK) return 0;
        size_t chunk = 1 + data[1] % 7;
        for (size_t i = 1; i < n; i += chunk) dsi_reasoning_push(r, s + i, chunk < n - i ? chunk : n - i, &dl);
        dsi_reasoning_finish(r, &dl);
        dsi_reasoning_destroy(r);
    }
    }
    return 0;
}
