/* dsinfer/tokenizer.h - byte-level BPE tokenizer, DeepSeek chat format, R1 reasoning split.
 *
 * Loads a Hugging Face `tokenizer.json` (+ optional `tokenizer_config.json`) and
 * reproduces the `tokenizers` library's encode/decode for the DeepSeek-V3/R1 family.
 *
 *     dsi_tokenizer *tok;
 *     if (dsi_tokenizer_load("/models/r1", &tok) != DSI_OK) die(dsi_last_error());
 *     int32_t *ids; size_t n;
 *     dsi_tokenizer_encode(tok, text, strlen(text), DSI_TOK_ADD_BOS, &ids, &n);
 *     ... free(ids);
 *
 *     dsi_detok *d; dsi_detok_create(tok, DSI_TOK_SKIP_SPECIAL, &d);
 *     for each generated id: dsi_detok_push(d, id, &s, &len); send(s, len);
 *     dsi_detok_flush(d, &s, &len); send(s, len); dsi_detok_destroy(d);
 *
 * Thread safety: a loaded tokenizer is immutable; any number of threads may call
 * encode/decode/chat functions on it at once (each thread keeps its own word cache).
 * A dsi_detok or dsi_reasoning object belongs to one thread at a time.
 */
#ifndef DSINFER_TOKENIZER_H
#define DSINFER_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "dsinfer/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dsi_tokenizer dsi_tokenizer;
struct cJSON; /* from <cjson/cJSON.h> */

/* Encode/decode flags (bitwise or). */
enum {
    DSI_TOK_ADD_BOS = 1u << 0,       /* encode: apply the post-processor template (DeepSeek: prepend BOS) */
    DSI_TOK_PLAIN_SPECIAL = 1u << 1, /* encode: added-token text in the input is ordinary text, not matched */
    DSI_TOK_SKIP_SPECIAL = 1u << 2,  /* decode/detok: drop special tokens from the output */
};

/* Loads `dir`/tokenizer.json and, when present, `dir`/tokenizer_config.json.
 * Unsupported components (normalizers, non-BPE models, ...) fail with DSI_EUNSUPPORTED,
 * malformed files with DSI_EFORMAT; the message names the offending field.
 * *out is owned by the caller (dsi_tokenizer_destroy). */
int dsi_tokenizer_load(const char *dir, dsi_tokenizer **out);

/* Same from memory. `config_json` may be NULL (no tokenizer_config). Inputs are borrowed. */
int dsi_tokenizer_load_json(const char *tokenizer_json, size_t tokenizer_len, const char *config_json,
                            size_t config_len, dsi_tokenizer **out);

void dsi_tokenizer_destroy(dsi_tokenizer *tok);

/* Encodes `len` bytes of UTF-8 `text` (need not be NUL-terminated). Invalid UTF-8 fails
 * with DSI_EINVAL (the message gives the byte offset). On success *ids is a malloc'd
 * array of *n ids owned by the caller (free()); it is non-NULL even when *n is 0. */
int dsi_tokenizer_encode(const dsi_tokenizer *tok, const char *text, size_t len, unsigned flags, int32_t **ids,
                         size_t *n);

/* Decodes ids to text. Byte sequences that are not valid UTF-8 become U+FFFD (as the
 * `tokenizers` library does). An id outside the vocabulary fails with DSI_ERANGE.
 * *text is malloc'd, NUL-terminated, owned by the caller; *len excludes the NUL. */
int dsi_tokenizer_decode(const dsi_tokenizer *tok, const int32_t *ids, size_t n, unsigned flags, char **text,
                         size_t *len);

/* Number of ids (max id + 1). */
int32_t dsi_tokenizer_vocab_size(const dsi_tokenizer *tok);
/* BOS/EOS ids from tokenizer_config.json (BOS falls back to the post-processor's first
 * special token); -1 when unknown. */
int32_t dsi_tokenizer_bos_id(const dsi_tokenizer *tok);
int32_t dsi_tokenizer_eos_id(const dsi_tokenizer *tok);
/* tokenizer_config.json's add_bos_token (1 when absent and a BOS is known). */
int dsi_tokenizer_add_bos_default(const dsi_tokenizer *tok);
/* The id of a token given its exact text as written in tokenizer.json ("<｜User｜>"),
 * or DSI_ENOTFOUND (negative) with a message. */
int32_t dsi_tokenizer_token_id(const dsi_tokenizer *tok, const char *token_text);
/* The bytes `id` decodes to (borrowed, valid while tok lives; not NUL-terminated and
 * possibly a partial UTF-8 character), or NULL for an unknown id. */
const char *dsi_tokenizer_token_bytes(const dsi_tokenizer *tok, int32_t id, size_t *len);
/* 1 when `id` is a special added token, else 0. */
int dsi_tokenizer_is_special(const dsi_tokenizer *tok, int32_t id);

/* ---- streaming detokenizer ---------------------------------------------------------
 * Turns generated ids into text pieces that are always complete UTF-8: bytes of a
 * character split across tokens are held back until the character is complete, and
 * bytes that can never become valid UTF-8 are emitted as U+FFFD. The concatenation of
 * all pushes and the final flush equals dsi_tokenizer_decode of the same ids. */
typedef struct dsi_detok dsi_detok;

/* `tok` is borrowed and must outlive the detokenizer. flags: DSI_TOK_SKIP_SPECIAL. */
int dsi_detok_create(const dsi_tokenizer *tok, unsigned flags, dsi_detok **out);
/* Feeds one id. *text, *len: bytes safe to emit now (maybe empty), owned by d and
 * valid until the next call on d. Unknown id: DSI_ERANGE, state unchanged. */
int dsi_detok_push(dsi_detok *d, int32_t id, const char **text, size_t *len);
/* End of stream: emits what is held back (an incomplete character becomes U+FFFD). */
int dsi_detok_flush(dsi_detok *d, const char **text, size_t *len);
void dsi_detok_reset(dsi_detok *d);
void dsi_detok_destroy(dsi_detok *d);

/* ---- chat format ---------------------------------------------------------------------
 * Renders a conversation exactly as the tokenizer's chat_template would (with
 * transformers' Jinja settings), for the DeepSeek-V3/R1 templates listed in
 * ARCHITECTURE.md, the golden R1 one included: the template is recognised by a
 * fingerprint and rendered in C, not interpreted. A tokenizer without a chat template,
 * or with one that is not recognised, fails with DSI_EUNSUPPORTED. The rendered text
 * starts with the BOS token's text: encode it WITHOUT DSI_TOK_ADD_BOS. */
typedef struct dsi_chat_tool_call {
    const char *type;      /* "function" */
    const char *name;      /* function name */
    const char *arguments; /* JSON text, inserted verbatim */
} dsi_chat_tool_call;

typedef struct dsi_chat_message {
    const char *role;    /* "system", "user", "assistant", "tool"; others are ignored */
    const char *content; /* NULL means JSON null (allowed for assistant messages with tool calls) */
    /* assistant only. NULL: no tool_calls (or JSON null); non-NULL with n_tool_calls 0:
     * an empty list (some templates tell the two apart) */
    const dsi_chat_tool_call *tool_calls;
    size_t n_tool_calls;
} dsi_chat_message;

/* Name of the recognised template ("deepseek-r1-distill", "deepseek-v3-0324", ...), or
 * NULL when there is none or it is not recognised. */
const char *dsi_chat_template_name(const dsi_tokenizer *tok);
/* 1 when the generation prompt ends inside a <think> block (R1 templates): start the
 * reasoning splitter with starts_in_reasoning = 1. */
int dsi_chat_prompt_opens_reasoning(const dsi_tokenizer *tok);

/* All inputs borrowed. *text is malloc'd, NUL-terminated, owned by the caller. */
int dsi_chat_render(const dsi_tokenizer *tok, const dsi_chat_message *msgs, size_t n_msgs,
                    int add_generation_prompt, char **text, size_t *len);
/* From an OpenAI-style messages array (cJSON array of {role, content, tool_calls}).
 * content may also be an array of {"type":"text","text":...} parts (concatenated). */
int dsi_chat_render_cjson(const dsi_tokenizer *tok, const struct cJSON *messages, int add_generation_prompt,
                          char **text, size_t *len);
/* Same from JSON text (`json_len` bytes): a messages array, or a request object with a
 * "messages" member. */
int dsi_chat_render_json(const dsi_tokenizer *tok, const char *messages_json, size_t json_len,
                         int add_generation_prompt, char **text, size_t *len);

/* ---- R1 reasoning split --------------------------------------------------------------
 * Splits generated text into reasoning (between <think> and </think>) and content, as
 * it streams in. With `starts_in_reasoning` (the prompt ended in "<think>\n", as the R1
 * generation prompt does) text is reasoning until "</think>"; otherwise the output is
 * content unless it begins with "<think>". A "<think>" at the very start is dropped in
 * both modes; tags split across pushes are recognised; text after "</think>" is content
 * verbatim. Without any "</think>", everything after the start is reasoning.
 * Feed it the detokenizer's output WITHOUT DSI_TOK_SKIP_SPECIAL: "<think>"/"</think>"
 * are special tokens in some tokenizers (the golden one); stop on EOS instead of
 * passing it on. */
typedef struct dsi_reasoning dsi_reasoning;

typedef struct dsi_reasoning_delta {
    const char *reasoning; /* new reasoning text (owned by the splitter) */
    size_t reasoning_len;
    const char *content; /* new content text (owned by the splitter) */
    size_t content_len;
} dsi_reasoning_delta;

int dsi_reasoning_create(int starts_in_reasoning, dsi_reasoning **out);
/* Pushes `len` bytes; *delta's pointers are valid until the next call on r. */
int dsi_reasoning_push(dsi_reasoning *r, const char *text, size_t len, dsi_reasoning_delta *delta);
/* End of stream: releases text held back as a possible partial tag. */
int dsi_reasoning_finish(dsi_reasoning *r, dsi_reasoning_delta *delta);
/* 1 once "</think>" has been seen (or the output was found to have no reasoning). */
int dsi_reasoning_in_content(const dsi_reasoning *r);
void dsi_reasoning_destroy(dsi_reasoning *r);

#ifdef __cplusplus
}
#endif
#endif
