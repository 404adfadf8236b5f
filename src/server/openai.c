/* OpenAI request bodies -> dsi_api_req, with the checks and messages of the
 * OpenAI API (400 invalid_request_error naming the parameter, 404 for an
 * unknown model). */
#include "server/server_impl.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void dsi__api_req_free(dsi_api_req *r) {
    free(r->prompt);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    memset(r, 0, sizeof *r);
}

typedef struct perr {
    char *msg;
    size_t cap;
    const char **param;
} perr;

static int fail(perr *e, int status, const char *param, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(perr *e, int status, const char *param, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, e->cap, fmt, ap);
    va_end(ap);
    *e->param = param;
    return status;
}

/* A field that is absent or JSON null counts as absent. */
static const cJSON *field(const cJSON *o, const char *name) {
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, name);
    return f && !cJSON_IsNull(f) ? f : NULL;
}

/* Number fields: must be numbers; integers must be integral and in range. */
static int get_num(perr *e, const cJSON *o, const char *name, double lo, double hi, double *v) {
    const cJSON *f = field(o, name);
    if (!f) return 0;
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble))
        return fail(e, 400, name, "'%s' must be a number", name);
    if (f->valuedouble < lo || f->valuedouble > hi)
        return fail(e, 400, name, "'%s' must be between %g and %g, got %g", name, lo, hi, f->valuedouble);
    *v = f->valuedouble;
    return 0;
}

static int get_int(perr *e, const cJSON *o, const char *name, double lo, double hi, long long *v) {
    const cJSON *f = field(o, name);
    if (!f) return 0;
    if (!cJSON_IsNumber(f) || f->valuedouble != floor(f->valuedouble))
        return fail(e, 400, name, "'%s' must be an integer", name);
    if (f->valuedouble < lo || f->valuedouble > hi)
        return fail(e, 400, name, "'%s' must be between %.0f and %.0f, got %.0f", name, lo, hi, f->valuedouble);
    *v = (long long)f->valuedouble;
    return 0;
}

/* A token budget (max_tokens, max_completion_tokens): an integer of at least 1.
 * Values past any context length are flagged *huge rather than clamped, so the
 * error later quotes the request and not a clamped figure. */
#define MAX_TOKENS_EXACT 1e15 /* integers this size are exact in a double and a long long */
static int get_max_tokens(perr *e, const cJSON *o, const char *name, long long *v, int *huge) {
    const cJSON *f = field(o, name);
    if (!f) return 0;
    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble) || f->valuedouble != floor(f->valuedouble))
        return fail(e, 400, name, "'%s' must be an integer", name);
    if (f->valuedouble <= 0) return fail(e, 400, name, "'%s' must be at least 1, got %.0f", name, f->valuedouble);
    *huge = f->valuedouble > MAX_TOKENS_EXACT;
    *v = *huge ? (long long)MAX_TOKENS_EXACT : (long long)f->valuedouble;
    return 0;
}

static int get_bool(perr *e, const cJSON *o, const char *name, int *v) {
    const cJSON *f = field(o, name);
    if (!f) return 0;
    if (!cJSON_IsBool(f)) return fail(e, 400, name, "'%s' must be a boolean", name);
    *v = cJSON_IsTrue(f);
    return 0;
}

/* prompt: a string, an array of token ids, or a one-element array of either. */
static int parse_prompt(perr *e, const dsi_api_ctx *ctx, const cJSON *p, dsi_api_req *r) {
    if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1 && !cJSON_IsNumber(p->child)) p = p->child;
    if (cJSON_IsString(p)) {
        size_t n;
        int rc = dsi_tokenizer_encode(ctx->tok, p->valuestring, strlen(p->valuestring),
                                      dsi_tokenizer_add_bos_default(ctx->tok) ? DSI_TOK_ADD_BOS : 0, &r->prompt, &n);
        if (rc) return fail(e, 400, "prompt", "cannot tokenize the prompt: %s", dsi_last_error());
        r->n_prompt = n;
        return 0;
    }
    if (!cJSON_IsArray(p)) return fail(e, 400, "prompt", "'prompt' must be a string or an array of token ids");
    int n = cJSON_GetArraySize(p);
    if (n > 0 && cJSON_IsArray(p->child) == 0 && !cJSON_IsNumber(p->child))
        return fail(e, 400, "prompt", "'prompt' must be a string or an array of token ids");
    if (n > 0 && !cJSON_IsNumber(p->child))
        return fail(e, 400, "prompt", "several prompts in one request are not supported; send one request each");
    r->prompt = malloc(sizeof(int32_t) * (n ? n : 1));
    if (!r->prompt) return fail(e, 500, NULL, "out of memory");
    for (const cJSON *t = p->child; t; t = t->next) {
        if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble))
            return fail(e, 400, "prompt", "'prompt' token ids must be integers");
        if (t->valuedouble < 0 || t->valuedouble >= ctx->vocab)
            return fail(e, 400, "prompt", "prompt token id %.0f is outside the vocabulary [0, %d)", t->valuedouble,
                        ctx->vocab);
        r->prompt[r->n_prompt++] = (int32_t)t->valuedouble;
    }
    return 0;
}

static int parse_stop(perr *e, const cJSON *o, dsi_api_req *r) {
    const cJSON *s = field(o, "stop");
    if (!s) return 0;
    const cJSON *one = cJSON_IsString(s) ? s : NULL;
    if (!one && !cJSON_IsArray(s)) return fail(e, 400, "stop", "'stop' must be a string or an array of strings");
    if (!one && cJSON_GetArraySize(s) > DSI_MAX_STOP)
        return fail(e, 400, "stop", "'stop' takes at most %d sequences", DSI_MAX_STOP);
    for (const cJSON *t = one ? one : s->child; t; t = one ? NULL : t->next) {
        if (!cJSON_IsString(t)) return fail(e, 400, "stop", "'stop' must be a string or an array of strings");
        size_t n = strlen(t->valuestring);
        if (n == 0) continue;
        r->stop[r->n_stop] = strdup(t->valuestring);
        if (!r->stop[r->n_stop]) return fail(e, 500, NULL, "out of memory");
        r->stop_len[r->n_stop++] = n;
    }
    return 0;
}

/* A chat message's role: OpenAI's set. The chat templates silently drop any role
 * they do not know, so an unknown one is refused rather than lost from the prompt.
 * They know no "developer" (OpenAI's newer name for system instructions), so it
 * is rewritten to "system" in the request tree *m. */
static int check_role(perr *e, cJSON *m, const char *role, int i) {
    static const char *const known[] = {"system", "user", "assistant", "tool"};
    for (size_t k = 0; k < sizeof known / sizeof known[0]; k++)
        if (!strcmp(role, known[k])) return 0;
    if (strcmp(role, "developer") != 0)
        return fail(e, 400, "messages",
                    "messages[%d]: unknown role '%.40s'; expected 'system', 'developer', 'user', 'assistant' or 'tool'",
                    i, role);
    cJSON *sys = cJSON_CreateString("system");
    if (!sys || !cJSON_ReplaceItemInObjectCaseSensitive(m, "role", sys)) {
        cJSON_Delete(sys);
        return fail(e, 500, NULL, "out of memory");
    }
    return 0;
}

/* o: the request tree, owned by the caller; developer roles are rewritten in it. */
static int parse_body(perr *e, const dsi_api_ctx *ctx, cJSON *o, int chat, dsi_api_req *r) {
    int rc;
    if (!cJSON_IsObject(o)) return fail(e, 400, NULL, "the request body must be a JSON object");
    const cJSON *model = field(o, "model");
    if (model && !cJSON_IsString(model)) return fail(e, 400, "model", "'model' must be a string");
    if (model && strcmp(model->valuestring, ctx->model_name) != 0)
        return fail(e, 404, "model", "The model '%.200s' does not exist; this server serves '%s'", model->valuestring,
                    ctx->model_name);
    long long n = 1;
    if ((rc = get_int(e, o, "n", 1, 1, &n))) return rc;
    const char *unsupported[] = {"best_of", "suffix", "tools", "functions", "logit_bias"};
    for (size_t i = 0; i < sizeof unsupported / sizeof unsupported[0]; i++)
        if (field(o, unsupported[i]) && !(cJSON_IsArray(field(o, unsupported[i])) &&
                                          cJSON_GetArraySize(field(o, unsupported[i])) == 0))
            return fail(e, 400, unsupported[i], "'%s' is not supported by this server", unsupported[i]);
    double pen = 0;
    if ((rc = get_num(e, o, "presence_penalty", 0, 0, &pen)) || (rc = get_num(e, o, "frequency_penalty", 0, 0, &pen)))
        return fail(e, 400, *e->param, "'%s' is not supported (only 0)", *e->param);
    r->chat = chat;
    if ((rc = get_bool(e, o, "stream", &r->stream))) return rc;
    if ((rc = get_bool(e, o, "include_price", &r->include_price))) return rc;
    const cJSON *so = field(o, "stream_options");
    if (so) {
        if (!cJSON_IsObject(so)) return fail(e, 400, "stream_options", "'stream_options' must be an object");
        if ((rc = get_bool(e, so, "include_usage", &r->include_usage))) return rc;
    }
    double temp = 1.0, top_p = 1.0;
    long long top_k = 0, seed = -1, max_tokens = -1;
    if ((rc = get_num(e, o, "temperature", 0, 2, &temp))) return rc;
    if ((rc = get_num(e, o, "top_p", 0, 1, &top_p))) return rc;
    if (field(o, "top_p") && top_p <= 0) return fail(e, 400, "top_p", "'top_p' must be greater than 0");
    if ((rc = get_int(e, o, "top_k", -1, 1e9, &top_k))) return rc;
    if ((rc = get_int(e, o, "seed", -9.2e18, 9.2e18, &seed))) return rc;
    /* Chat takes max_completion_tokens over the deprecated max_tokens, as OpenAI
     * does; a present max_tokens is still validated, so a malformed one is not
     * silently ignored. Completions know only max_tokens. */
    int mt_huge = 0;
    if ((rc = get_max_tokens(e, o, "max_tokens", &max_tokens, &mt_huge))) return rc;
    const char *mt_name = "max_tokens";
    if (chat && field(o, "max_completion_tokens")) {
        mt_name = "max_completion_tokens";
        if ((rc = get_max_tokens(e, o, mt_name, &max_tokens, &mt_huge))) return rc;
    }
    if ((rc = parse_stop(e, o, r))) return rc;
    if ((rc = get_bool(e, o, "ignore_eos", &r->ignore_eos))) return rc;
    if ((rc = get_bool(e, o, "return_token_ids", &r->return_token_ids))) return rc;
    long long top_lp = 0;
    if (chat) {
        if ((rc = get_bool(e, o, "logprobs", &r->logprobs))) return rc;
        if ((rc = get_int(e, o, "top_logprobs", 0, DSI_SCHED_MAX_TOP_LOGPROBS, &top_lp))) return rc;
        if (top_lp > 0 && !r->logprobs) return fail(e, 400, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
    } else {
        long long lp = -1;
        if ((rc = get_int(e, o, "logprobs", 0, 5, &lp))) return rc;
        if (field(o, "logprobs")) { r->logprobs = 1; top_lp = lp; }
    }
    r->top_logprobs = (int)top_lp;
    r->sampling.temperature = (float)temp;
    r->sampling.top_p = (float)top_p;
    r->sampling.top_k = top_k > 0 ? (int)top_k : 0;
    static atomic_ulong seed_counter = 0x5eed;
    r->sampling.seed = seed >= 0 || field(o, "seed") ? (uint64_t)seed
                                                      : (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull + atomic_fetch_add(&seed_counter, 1);

    /* the prompt */
    if (chat) {
        cJSON *msgs = cJSON_GetObjectItemCaseSensitive(o, "messages");
        if (cJSON_IsNull(msgs)) msgs = NULL;
        if (!msgs) return fail(e, 400, "messages", "'messages' is required");
        if (!cJSON_IsArray(msgs) || cJSON_GetArraySize(msgs) == 0)
            return fail(e, 400, "messages", "'messages' must be a non-empty array");
        int i = 0;
        for (cJSON *m = msgs->child; m; m = m->next, i++) {
            const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
            const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
            if (!cJSON_IsObject(m) || !cJSON_IsString(role))
                return fail(e, 400, "messages", "each message must be an object with a string 'role'");
            if (content && !cJSON_IsString(content) && !cJSON_IsArray(content) && !cJSON_IsNull(content))
                return fail(e, 400, "messages", "a message's 'content' must be a string or an array of parts");
            if ((rc = check_role(e, m, role->valuestring, i))) return rc;
        }
        char *text;
        size_t tlen;
        if (dsi_chat_render_cjson(ctx->tok, msgs, 1, &text, &tlen))
            return fail(e, 400, "messages", "cannot render the conversation: %s", dsi_last_error());
        static const char think[] = "<think>\n";
        r->reasoning = tlen >= sizeof think - 1 && !memcmp(text + tlen - (sizeof think - 1), think, sizeof think - 1);
        size_t np;
        rc = dsi_tokenizer_encode(ctx->tok, text, tlen, 0, &r->prompt, &np);
        free(text);
        if (rc) return fail(e, 400, "messages", "cannot tokenize the conversation: %s", dsi_last_error());
        r->n_prompt = np;
    } else {
        const cJSON *p = field(o, "prompt");
        if (!p) return fail(e, 400, "prompt", "'prompt' is required");
        if ((rc = parse_prompt(e, ctx, p, r))) return rc;
    }
    if (r->n_prompt == 0) return fail(e, 400, chat ? "messages" : "prompt", "the prompt is empty");
    /* "maximum 128, your prompt has 128" would read as a contradiction: say why
     * it does not fit */
    if ((long long)r->n_prompt >= ctx->max_model_len)
        return fail(e, 400, chat ? "messages" : "prompt",
                    "This model's maximum context length is %d tokens. However, your prompt has %zu tokens, which "
                    "leaves no room for a completion: the prompt plus at least one completion token must fit.",
                    ctx->max_model_len, r->n_prompt);
    long long room = ctx->max_model_len - (long long)r->n_prompt;
    if (max_tokens < 0) max_tokens = DSI_MIN(room, (long long)ctx->default_max_tokens);
    else if (mt_huge)
        return fail(e, 400, mt_name,
                    "'%s' is too large: this model's maximum context length is %d tokens and your prompt has %zu "
                    "tokens, so at most %lld completion tokens fit.",
                    mt_name, ctx->max_model_len, r->n_prompt, room);
    else if (max_tokens > room)
        return fail(e, 400, mt_name,
                    "This model's maximum context length is %d tokens. However, you requested %lld tokens (%zu in the "
                    "prompt, %lld for the completion).",
                    ctx->max_model_len, (long long)r->n_prompt + max_tokens, r->n_prompt, max_tokens);
    r->max_tokens = (int)max_tokens;
    return 0;
}

static int is_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

/* A pass over the raw body before cJSON, for what cJSON lets through: its
 * strings are NUL-terminated, so a NUL byte, the escape \u0000, or a malformed
 * \u escape (which it decodes as a NUL) would silently cut the text short
 * ("a\u0000bc" tokenised as "a"). It also accepts raw control bytes inside
 * strings, which RFC 8259 (and Python's json, hence vLLM) refuse. Escapes are
 * followed properly: in "\\u0000" the backslash is escaped and u0000 is text.
 * What is left (structure, surrogates) is cJSON's to judge. */
static int prescan(perr *e, const char *body, size_t len) {
    int in_str = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)body[i];
        if (c == 0) return fail(e, 400, NULL, "the request body is not valid JSON (a NUL byte at byte %zu)", i);
        if (!in_str) {
            in_str = c == '"';
            continue;
        }
        if (c == '"') {
            in_str = 0;
        } else if (c < 0x20) {
            return fail(e, 400, NULL,
                        "the request body is not valid JSON (control character 0x%02x inside a string at byte %zu; "
                        "escape it, e.g. as \\u%04x)",
                        c, i, c);
        } else if (c == '\\') {
            if (i + 1 >= len) return 0; /* cut short: cJSON says where */
            char x = body[i + 1];
            if (x == 'u') {
                if (i + 5 >= len || !is_hex(body[i + 2]) || !is_hex(body[i + 3]) || !is_hex(body[i + 4]) ||
                    !is_hex(body[i + 5]))
                    return fail(e, 400, NULL,
                                "the request body is not valid JSON (\\u not followed by 4 hex digits at byte %zu)", i);
                if (!memcmp(body + i + 2, "0000", 4))
                    return fail(e, 400, NULL, "NUL characters (\\u0000) are not supported in text (at byte %zu)", i);
                i += 5;
            } else if (x && strchr("\"\\/bfnrt", x)) {
                i++;
            } else {
                return fail(e, 400, NULL, "the request body is not valid JSON (invalid escape at byte %zu)", i);
            }
        }
    }
    return 0;
}

int dsi__api_parse(const dsi_api_ctx *ctx, const char *body, size_t len, int chat, dsi_api_req *out, char *msg,
                   size_t msg_cap, const char **param) {
    memset(out, 0, sizeof *out);
    perr e = {msg, msg_cap, param};
    *param = NULL;
    int rc = prescan(&e, body, len);
    if (rc) return rc;
    const char *end = NULL;
    /* require_null_terminated is no use with an explicit length (it wants a NUL
     * inside it): what follows the value is checked below */
    cJSON *o = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    if (!o) {
        size_t at = end && end >= body ? (size_t)(end - body) : 0;
        return fail(&e, 400, NULL, "the request body is not valid JSON (near byte %zu)", at);
    }
    while (end < body + len && (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r')) end++;
    if (end < body + len) {
        cJSON_Delete(o);
        return fail(&e, 400, NULL, "the request body is not valid JSON (unexpected data after the value at byte %zu)",
                    (size_t)(end - body));
    }
    rc = parse_body(&e, ctx, o, chat, out);
    cJSON_Delete(o);
    if (rc) dsi__api_req_free(out);
    return rc;
}

void dsi__api_error_json(dsi_sbuf *b, int status, const char *msg, const char *param) {
    const char *type = status == 401 ? "authentication_error"
                       : status == 404 ? "invalid_request_error"
                       : status == 429 ? "rate_limit_error"
                       : status >= 500 ? "server_error"
                                       : "invalid_request_error";
    const char *code = status == 404 && param && !strcmp(param, "model") ? "\"model_not_found\""
                       : status == 413                                  ? "\"request_too_large\""
                       : status == 401                                  ? "\"invalid_api_key\""
                                                                        : "null";
    dsi__sbuf_puts(b, "{\"error\":{\"message\":");
    dsi__sbuf_json_str(b, msg, strlen(msg));
    dsi__sbuf_printf(b, ",\"type\":\"%s\",\"param\":", type);
    if (param) dsi__sbuf_json_str(b, param, strlen(param));
    else dsi__sbuf_puts(b, "null");
    dsi__sbuf_printf(b, ",\"code\":%s}}", code);
}

void dsi__api_models_json(dsi_sbuf *b, const char *model, int max_model_len, long created) {
    dsi__sbuf_puts(b, "{\"object\":\"list\",\"data\":[{\"id\":");
    dsi__sbuf_json_str(b, model, strlen(model));
    dsi__sbuf_printf(b, ",\"object\":\"model\",\"created\":%ld,\"owned_by\":\"dsinfer\",\"max_model_len\":%d}]}",
                     created, max_model_len);
}
