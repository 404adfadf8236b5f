/* DeepSeek-V3/R1 chat formats.
 *
 * We do not interpret Jinja. The chat_template of tokenizer_config.json is recognised
 * by a fingerprint and rendered by C code that transcribes it, quirks included. The
 * fingerprint is FNV-1a over a canonical form of the template: whitespace dropped
 * except inside string literals, Jinja trim markers dropped, and a raw newline inside
 * a literal written as the escape \n (tokenizer_config.json and GGUF copies differ in
 * exactly these ways). Known templates, each checked against Jinja2 renderings in
 * tests/data/tokenizer/:
 *  - deepseek-r1-distill (the golden template): last system message only; tool calls
 *    when tool_calls is non-empty; ns.is_first / ns.is_output_first never reset, so
 *    only the first tool call of the conversation opens with "<｜Assistant｜>" and later
 *    tool outputs start with "\n"; "</think>" cut from assistant turns not following
 *    tool output; no generation prompt after tool outputs; prompt ends "<think>\n".
 *  - deepseek-v3-r1-old (DeepSeek-V3 / R1 at release): tool calls only when content is
 *    null, and "<｜tool▁calls▁end｜>" written after each non-first call instead of once;
 *    prompt ends "<｜Assistant｜>". deepseek-r1-distill-llama: the same, with "<think>\n".
 *  - deepseek-r1 (is_first_sp): all system messages joined by "\n\n"; a tool_calls key
 *    (even empty) selects the tool-call branch, whose first call is prefixed by the
 *    content; no "\n" between tool outputs.
 *  - deepseek-v3-0324 (is_last_user): see render_v3_0324().
 * Any other template fails with DSI_EUNSUPPORTED and its fingerprint in the message. */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer_impl.h"

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static uint64_t fnv(uint64_t h, char c) { return (h ^ (unsigned char)c) * 0x100000001b3ull; }

uint64_t dsi__chat_fingerprint(const char *t) {
    uint64_t h = 0xcbf29ce484222325ull;
    size_t n = strlen(t);
    char closer = 0, quote = 0; /* inside a tag: its closing char ('}', '%', '#'); inside a literal: its quote */
    for (size_t i = 0; i < n; i++) {
        char c = t[i];
        if (!closer) {
            if (c == '{' && i + 1 < n && (t[i + 1] == '{' || t[i + 1] == '%' || t[i + 1] == '#')) {
                closer = t[i + 1] == '{' ? '}' : t[i + 1];
                h = fnv(fnv(h, c), t[i + 1]);
                i++;
                if (i + 1 < n && (t[i + 1] == '-' || t[i + 1] == '+')) i++; /* trim marker */
            } else if (!is_ws(c)) {
                h = fnv(h, c);
            }
        } else if (quote) {
            if (c == '\n') h = fnv(fnv(h, '\\'), 'n');
            else h = fnv(h, c);
            if (c == '\\' && i + 1 < n) h = fnv(h, t[++i]);
            else if (c == quote) quote = 0;
        } else if (c == '\'' || c == '"') {
            quote = c;
            h = fnv(h, c);
        } else if ((c == '-' || c == '+') && i + 2 < n && t[i + 1] == closer && t[i + 2] == '}') {
            continue; /* trim marker before the closer */
        } else if (c == closer && i + 1 < n && t[i + 1] == '}') {
            h = fnv(fnv(h, c), '}');
            i++;
            closer = 0;
        } else if (!is_ws(c)) {
            h = fnv(h, c);
        }
    }
    return h;
}

enum { CALLS_NONEMPTY, CALLS_CONTENT_NULL, CALLS_KEY };
enum { TEXT_CONTENT_NOT_NULL, TEXT_NO_CALLS_KEY };

/* What tells the R1-family templates apart (see the list above). */
typedef struct flavor {
    const char *name;
    uint64_t fingerprint;
    int join_systems;        /* all system messages joined by "\n\n", else the last one */
    int calls_when;          /* CALLS_*: when an assistant message takes the tool-call branch */
    int content_before_call; /* the first call is written as "<｜Assistant｜>" + content + ... */
    int calls_end_each;      /* "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>" after each non-first call */
    int text_when;           /* TEXT_*: when an assistant message takes the text branch */
    int outputs_newline;     /* "\n" before each tool output but the first */
    const char *gen_prompt;
    int v3_0324; /* rendered by render_v3_0324() */
} flavor;

static const flavor FLAVORS[] = {
    {"deepseek-r1-distill", 0x7d5e2b27d3ce82b8ull, 0, CALLS_NONEMPTY, 0, 0, TEXT_CONTENT_NOT_NULL, 1, "<｜Assistant｜><think>\n", 0},
    {"deepseek-v3-r1-old", 0x567ba96ab8a02041ull, 0, CALLS_CONTENT_NULL, 0, 1, TEXT_CONTENT_NOT_NULL, 1, "<｜Assistant｜>", 0},
    {"deepseek-r1-distill-llama", 0x96a70bc14ff9c5a9ull, 0, CALLS_CONTENT_NULL, 0, 1, TEXT_CONTENT_NOT_NULL, 1, "<｜Assistant｜><think>\n", 0},
    {"deepseek-r1", 0x90d11a66a1279f3cull, 1, CALLS_KEY, 1, 0, TEXT_NO_CALLS_KEY, 0, "<｜Assistant｜><think>\n", 0},
    {"deepseek-v3-0324", 0x30a2375f521d544bull, 1, 0, 0, 0, 0, 1, "<｜Assistant｜>", 1},
};
enum { N_FLAVORS = sizeof FLAVORS / sizeof FLAVORS[0] };

int dsi__chat_style_of(const char *tmpl, uint64_t *fingerprint) {
    uint64_t f = dsi__chat_fingerprint(tmpl);
    *fingerprint = f;
    for (int i = 0; i < N_FLAVORS; i++)
        if (FLAVORS[i].fingerprint == f) return DSI__CHAT_FLAVOR0 + i;
    return DSI__CHAT_UNKNOWN;
}

/* ---- rendering ------------------------------------------------------------------------- */

typedef struct sbuf {
    char *p;
    size_t n, cap;
    int err;
} sbuf;

static void put(sbuf *b, const char *s) {
    size_t l = strlen(s);
    if (b->err) return;
    if (b->n + l + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + l + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->err = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, l + 1);
    b->n += l;
}

static int need_str(const char *s, size_t i, const char *what) {
    if (s) return DSI_OK;
    return dsi_error(DSI_EINVAL, "chat: message %zu: %s must be a string", i, what);
}

static int role_is(const dsi_chat_message *m, const char *r) { return m->role && !strcmp(m->role, r); }

/* System prompt: the last system message, or all joined by "\n\n". */
static int put_system(const dsi_chat_message *msgs, size_t n, int join, sbuf *b) {
    const char *last = "";
    int first = 1, rc;
    for (size_t i = 0; i < n; i++) {
        if (!role_is(&msgs[i], "system")) continue;
        if ((rc = need_str(msgs[i].content, i, "system content"))) return rc;
        if (join) {
            if (!first) put(b, "\n\n");
            put(b, msgs[i].content);
        }
        last = msgs[i].content;
        first = 0;
    }
    if (!join) put(b, last);
    return DSI_OK;
}

/* type<｜tool▁sep｜>name\n```json\narguments\n```<｜tool▁call▁end｜> */
static int put_call_body(const dsi_chat_tool_call *tc, size_t i, size_t k, sbuf *b) {
    if (!tc->type || !tc->name || !tc->arguments)
        return dsi_error(DSI_EINVAL, "chat: message %zu: tool call %zu needs string type, function.name and function.arguments", i, k);
    put(b, tc->type);
    put(b, "<｜tool▁sep｜>");
    put(b, tc->name);
    put(b, "\n```json\n");
    put(b, tc->arguments);
    put(b, "\n```<｜tool▁call▁end｜>");
    return DSI_OK;
}

static const char *after_think(const char *content) {
    const char *p;
    while ((p = strstr(content, "</think>"))) content = p + strlen("</think>");
    return content;
}

static int render_r1(const dsi_tokenizer *tok, const flavor *f, const dsi_chat_message *msgs, size_t n, int add_gen,
                     sbuf *b) {
    int is_first = 0, is_tool = 0, is_output_first = 1, rc;
    put(b, tok->bos_text);
    if ((rc = put_system(msgs, n, f->join_systems, b))) return rc;
    for (size_t i = 0; i < n; i++) {
        const dsi_chat_message *m = &msgs[i];
        if (role_is(m, "user")) {
            if ((rc = need_str(m->content, i, "user content"))) return rc;
            is_tool = 0;
            put(b, "<｜User｜>");
            put(b, m->content);
        }
        int calls = f->calls_when == CALLS_NONEMPTY       ? m->n_tool_calls > 0
                    : f->calls_when == CALLS_CONTENT_NULL ? m->content == NULL
                                                          : m->tool_calls != NULL;
        if (role_is(m, "assistant") && calls) {
            is_tool = 0;
            for (size_t k = 0; k < m->n_tool_calls; k++) {
                int was_first = is_first;
                if (!is_first) {
                    put(b, "<｜Assistant｜>");
                    if (f->content_before_call && m->content) put(b, m->content);
                    put(b, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>");
                    is_first = 1;
                } else {
                    put(b, "\n<｜tool▁call▁begin｜>");
                }
                if ((rc = put_call_body(&m->tool_calls[k], i, k, b))) return rc;
                /* the old template closes inside its else branch: after every call but
                 * the conversation's first */
                if (f->calls_end_each && was_first) put(b, "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>");
            }
            if (!f->calls_end_each) put(b, "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>");
        }
        int text = f->text_when == TEXT_CONTENT_NOT_NULL ? m->content != NULL : m->tool_calls == NULL;
        if (role_is(m, "assistant") && text) {
            if ((rc = need_str(m->content, i, "assistant content"))) return rc;
            if (is_tool) {
                put(b, "<｜tool▁outputs▁end｜>");
                put(b, m->content);
                put(b, "<｜end▁of▁sentence｜>");
                is_tool = 0;
            } else {
                put(b, "<｜Assistant｜>");
                put(b, after_think(m->content));
                put(b, "<｜end▁of▁sentence｜>");
            }
        }
        if (role_is(m, "tool")) {
            if ((rc = need_str(m->content, i, "tool content"))) return rc;
            is_tool = 1;
            put(b, is_output_first ? "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
                   : f->outputs_newline ? "\n<｜tool▁output▁begin｜>" : "<｜tool▁output▁begin｜>");
            put(b, m->content);
            put(b, "<｜tool▁output▁end｜>");
            is_output_first = 0;
        }
    }
    if (is_tool) put(b, "<｜tool▁outputs▁end｜>");
    if (add_gen && !is_tool) put(b, f->gen_prompt);
    return DSI_OK;
}

/* DeepSeek-V3-0324: the user turn itself opens the assistant turn ("<｜User｜>...<｜Assistant｜>"),
 * assistant text is written bare (no "</think>" cut), the tool-call state is reset per user
 * turn and per tool-call message, and the generation prompt is added only when the last
 * message is not from the user (whose turn already opened it) nor a tool output. */
static int render_v3_0324(const dsi_tokenizer *tok, const dsi_chat_message *msgs, size_t n, int add_gen, sbuf *b) {
    int is_first = 0, is_tool = 0, is_output_first = 1, is_last_user = 0, rc;
    put(b, tok->bos_text);
    if ((rc = put_system(msgs, n, 1, b))) return rc;
    for (size_t i = 0; i < n; i++) {
        const dsi_chat_message *m = &msgs[i];
        if (role_is(m, "user")) {
            if ((rc = need_str(m->content, i, "user content"))) return rc;
            is_tool = is_first = 0;
            is_last_user = 1;
            put(b, "<｜User｜>");
            put(b, m->content);
            put(b, "<｜Assistant｜>");
        }
        if (role_is(m, "assistant") && m->tool_calls) {
            is_last_user = 0;
            if (is_tool) put(b, "<｜tool▁outputs▁end｜>");
            is_first = is_tool = 0;
            is_output_first = 1;
            for (size_t k = 0; k < m->n_tool_calls; k++) {
                if (!is_first) {
                    if (m->content) put(b, m->content);
                    put(b, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>");
                    is_first = 1;
                } else {
                    put(b, "\n<｜tool▁call▁begin｜>");
                }
                if ((rc = put_call_body(&m->tool_calls[k], i, k, b))) return rc;
            }
            put(b, "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>");
        }
        if (role_is(m, "assistant") && !m->tool_calls) {
            if ((rc = need_str(m->content, i, "assistant content"))) return rc;
            is_last_user = 0;
            if (is_tool) put(b, "<｜tool▁outputs▁end｜>");
            put(b, m->content);
            put(b, "<｜end▁of▁sentence｜>");
            is_tool = 0;
        }
        if (role_is(m, "tool")) {
            if ((rc = need_str(m->content, i, "tool content"))) return rc;
            is_last_user = 0;
            is_tool = 1;
            put(b, is_output_first ? "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>" : "\n<｜tool▁output▁begin｜>");
            put(b, m->content);
            put(b, "<｜tool▁output▁end｜>");
            is_output_first = 0;
        }
    }
    if (is_tool) put(b, "<｜tool▁outputs▁end｜>");
    if (add_gen && !is_last_user && !is_tool) put(b, "<｜Assistant｜>");
    return DSI_OK;
}

static const flavor *flavor_of(const dsi_tokenizer *tok) {
    int k = tok ? tok->chat_style - DSI__CHAT_FLAVOR0 : -1;
    return k >= 0 && k < N_FLAVORS ? &FLAVORS[k] : NULL;
}

static int check_style(const dsi_tokenizer *tok) {
    if (!tok) return dsi_error(DSI_EINVAL, "chat: NULL tokenizer");
    if (tok->chat_style == DSI__CHAT_NONE)
        return dsi_error(DSI_EUNSUPPORTED, "chat: the tokenizer has no chat_template (tokenizer_config.json missing or without one)");
    if (!flavor_of(tok))
        return dsi_error(DSI_EUNSUPPORTED, "chat: unrecognised chat_template (fingerprint %016llx); only the DeepSeek-V3/R1 templates listed in ARCHITECTURE.md are rendered",
                         (unsigned long long)tok->chat_fingerprint);
    if (!tok->bos_text) return dsi_error(DSI_EUNSUPPORTED, "chat: the template needs bos_token, which tokenizer_config.json lacks");
    return DSI_OK;
}

const char *dsi_chat_template_name(const dsi_tokenizer *tok) {
    const flavor *f = flavor_of(tok);
    return f ? f->name : NULL;
}

int dsi_chat_prompt_opens_reasoning(const dsi_tokenizer *tok) {
    const flavor *f = flavor_of(tok);
    return f && strstr(f->gen_prompt, "<think>") != NULL;
}

int dsi_chat_render(const dsi_tokenizer *tok, const dsi_chat_message *msgs, size_t n_msgs, int add_generation_prompt,
                    char **text, size_t *len) {
    if (text) *text = NULL;
    if (len) *len = 0;
    if (!text || (!msgs && n_msgs)) return dsi_error(DSI_EINVAL, "dsi_chat_render: NULL argument");
    int rc = check_style(tok);
    if (rc) return rc;
    const flavor *f = flavor_of(tok);
    sbuf b = {0};
    put(&b, "");
    rc = f->v3_0324 ? render_v3_0324(tok, msgs, n_msgs, add_generation_prompt, &b)
                    : render_r1(tok, f, msgs, n_msgs, add_generation_prompt, &b);
    if (!rc && b.err) rc = dsi_error(DSI_ENOMEM, "chat: out of memory");
    if (rc) {
        free(b.p);
        return rc;
    }
    *text = b.p;
    if (len) *len = b.n;
    return DSI_OK;
}

/* ---- from JSON ------------------------------------------------------------------------------ */

/* content: a string, null, or an array of {"type":"text","text":...} parts (joined into
 * *owned). Sets *out to NULL for null/missing; *missing tells the two apart. */
static int json_content(const cJSON *m, size_t i, const char **out, char **owned, int *missing) {
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content"), *part;
    *out = NULL;
    *owned = NULL;
    *missing = c == NULL;
    if (!c || cJSON_IsNull(c)) return DSI_OK;
    if (cJSON_IsString(c)) {
        *out = c->valuestring;
        return DSI_OK;
    }
    if (!cJSON_IsArray(c)) return dsi_error(DSI_EINVAL, "chat: message %zu: content must be a string, null or an array of text parts", i);
    sbuf b = {0};
    put(&b, "");
    cJSON_ArrayForEach(part, c) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        const cJSON *txt = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") || !cJSON_IsString(txt)) {
            free(b.p);
            return dsi_error(DSI_EINVAL, "chat: message %zu: only {\"type\":\"text\",\"text\":...} content parts are supported", i);
        }
        put(&b, txt->valuestring);
    }
    if (b.err) {
        free(b.p);
        return dsi_error(DSI_ENOMEM, "chat: out of memory");
    }
    *out = *owned = b.p;
    return DSI_OK;
}

static const char *json_str(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

int dsi_chat_render_cjson(const dsi_tokenizer *tok, const struct cJSON *messages, int add_generation_prompt,
                          char **text, size_t *len) {
    if (text) *text = NULL;
    if (!cJSON_IsArray(messages)) return dsi_error(DSI_EINVAL, "chat: messages must be a JSON array");
    int rc = check_style(tok);
    if (rc) return rc;
    size_t n = (size_t)cJSON_GetArraySize(messages), n_calls = 0, i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, messages) {
        const cJSON *tc = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
        if (cJSON_IsArray(tc)) n_calls += (size_t)cJSON_GetArraySize(tc);
    }
    dsi_chat_message *msgs = calloc(n + 1, sizeof *msgs);
    dsi_chat_tool_call *calls = calloc(n_calls + 1, sizeof *calls);
    char **owned = calloc(n + 1, sizeof *owned);
    if (!msgs || !calls || !owned) {
        rc = dsi_error(DSI_ENOMEM, "chat: out of memory");
        goto done;
    }
    size_t c = 0;
    cJSON_ArrayForEach(m, messages) {
        dsi_chat_message *dm = &msgs[i];
        int missing;
        if (!cJSON_IsObject(m) || !(dm->role = json_str(m, "role"))) {
            rc = dsi_error(DSI_EINVAL, "chat: message %zu must be an object with a string role", i);
            goto done;
        }
        if ((rc = json_content(m, i, &dm->content, &owned[i], &missing))) goto done;
        /* the template adds message['content'] to a string: an absent one is an error there */
        if (missing && !strcmp(dm->role, "assistant")) {
            rc = dsi_error(DSI_EINVAL, "chat: message %zu: assistant message without content (use null)", i);
            goto done;
        }
        const cJSON *tc = cJSON_GetObjectItemCaseSensitive(m, "tool_calls"), *t;
        if (tc && !cJSON_IsNull(tc) && !cJSON_IsArray(tc)) {
            rc = dsi_error(DSI_EINVAL, "chat: message %zu: tool_calls must be an array", i);
            goto done;
        }
        if (cJSON_IsArray(tc) && strcmp(dm->role, "assistant") == 0) {
            dm->tool_calls = &calls[c];
            cJSON_ArrayForEach(t, tc) {
                const cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
                calls[c].type = json_str(t, "type");
                calls[c].name = json_str(fn, "name");
                calls[c].arguments = json_str(fn, "arguments");
                c++;
                dm->n_tool_calls++;
            }
        }
        i++;
    }
    rc = dsi_chat_render(tok, msgs, n, add_generation_prompt, text, len);
done:
    for (size_t k = 0; owned && k < n; k++) free(owned[k]);
    free(owned);
    free(msgs);
    free(calls);
    return rc;
}

int dsi_chat_render_json(const dsi_tokenizer *tok, const char *messages_json, size_t json_len,
                         int add_generation_prompt, char **text, size_t *len) {
    if (text) *text = NULL;
    if (!messages_json) return dsi_error(DSI_EINVAL, "chat: NULL messages");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(messages_json, json_len, &end, 0);
    if (!root) return dsi_error(DSI_EINVAL, "chat: messages are not valid JSON (error near byte %zu)",
                                end && end >= messages_json ? (size_t)(end - messages_json) : (size_t)0);
    const cJSON *arr = root;
    if (cJSON_IsObject(root)) arr = cJSON_GetObjectItemCaseSensitive(root, "messages"); /* a request body */
    int rc = dsi_chat_render_cjson(tok, arr, add_generation_prompt, text, len);
    cJSON_Delete(root);
    return rc;
}
