/* DeepSeek-R1 chat format.
 *
 * We do not interpret Jinja. The template of tokenizer_config.json is recognised by a
 * fingerprint (FNV-1a of the template with whitespace and Jinja trim markers removed,
 * so re-indenting it does not matter) and rendered by render_r1(), a line-by-line
 * transcription of that template, including its quirks:
 *  - only the LAST system message is used, and it is placed right after BOS;
 *  - ns.is_first is never reset, so only the first tool call of the whole
 *    conversation opens with "<｜Assistant｜><｜tool▁calls▁begin｜>";
 *  - ns.is_output_first is never reset either (later tool outputs start with "\n");
 *  - an assistant message after tool outputs closes them and is not "</think>"-cut;
 *  - the generation prompt is suppressed when the conversation ends in tool outputs.
 * Any other template fails with DSI_EUNSUPPORTED and its fingerprint in the message. */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer_impl.h"

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

uint64_t dsi__chat_fingerprint(const char *t) {
    size_t n = strlen(t), m = 0;
    char *s = malloc(n + 1);
    if (!s) return 0;
    for (size_t i = 0; i < n; i++)
        if (!is_ws(t[i])) s[m++] = t[i];
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < m; i++) {
        /* "{%-" "{{-" "-%}" "-}}": trim markers only change whitespace handling */
        if (s[i] == '-' && ((i >= 2 && s[i - 2] == '{' && (s[i - 1] == '%' || s[i - 1] == '{')) ||
                            (i + 2 < m && s[i + 2] == '}' && (s[i + 1] == '%' || s[i + 1] == '}'))))
            continue;
        h = (h ^ (unsigned char)s[i]) * 0x100000001b3ull;
    }
    free(s);
    return h;
}

/* Fingerprint of the DeepSeek-R1 template in tests/data/golden/tokenizer (its text is
 * repeated in ARCHITECTURE.md's tokenizer section). */
#define DSI__R1_FINGERPRINT 0x7d5e2b27d3ce82b8ull

int dsi__chat_style_of(const char *tmpl, uint64_t *fingerprint) {
    uint64_t f = dsi__chat_fingerprint(tmpl);
    *fingerprint = f;
    if (f == DSI__R1_FINGERPRINT) return DSI__CHAT_DEEPSEEK_R1;
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

static int render_r1(const dsi_tokenizer *tok, const dsi_chat_message *msgs, size_t n, int add_gen, sbuf *b) {
    int is_first = 0, is_tool = 0, is_output_first = 1, rc;
    const char *system = "";
    for (size_t i = 0; i < n; i++)
        if (msgs[i].role && !strcmp(msgs[i].role, "system")) {
            if ((rc = need_str(msgs[i].content, i, "system content"))) return rc;
            system = msgs[i].content;
        }
    put(b, tok->bos_text);
    put(b, system);
    for (size_t i = 0; i < n; i++) {
        const dsi_chat_message *m = &msgs[i];
        const char *role = m->role ? m->role : "";
        if (!strcmp(role, "user")) {
            if ((rc = need_str(m->content, i, "user content"))) return rc;
            is_tool = 0;
            put(b, "<｜User｜>");
            put(b, m->content);
        }
        if (!strcmp(role, "assistant") && m->n_tool_calls > 0) {
            is_tool = 0;
            for (size_t k = 0; k < m->n_tool_calls; k++) {
                const dsi_chat_tool_call *tc = &m->tool_calls[k];
                if (!tc->type || !tc->name || !tc->arguments)
                    return dsi_error(DSI_EINVAL, "chat: message %zu: tool call %zu needs string type, function.name and function.arguments", i, k);
                put(b, is_first ? "\n<｜tool▁call▁begin｜>" : "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>");
                put(b, tc->type);
                put(b, "<｜tool▁sep｜>");
                put(b, tc->name);
                put(b, "\n```json\n");
                put(b, tc->arguments);
                put(b, "\n```<｜tool▁call▁end｜>");
                is_first = 1;
            }
            put(b, "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>");
        }
        if (!strcmp(role, "assistant") && m->content) {
            if (is_tool) {
                put(b, "<｜tool▁outputs▁end｜>");
                put(b, m->content);
                put(b, "<｜end▁of▁sentence｜>");
                is_tool = 0;
            } else {
                const char *content = m->content, *p;
                while ((p = strstr(content, "</think>"))) content = p + strlen("</think>");
                put(b, "<｜Assistant｜>");
                put(b, content);
                put(b, "<｜end▁of▁sentence｜>");
            }
        }
        if (!strcmp(role, "tool")) {
            if ((rc = need_str(m->content, i, "tool content"))) return rc;
            is_tool = 1;
            put(b, is_output_first ? "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>" : "\n<｜tool▁output▁begin｜>");
            put(b, m->content);
            put(b, "<｜tool▁output▁end｜>");
            is_output_first = 0;
        }
    }
    if (is_tool) put(b, "<｜tool▁outputs▁end｜>");
    if (add_gen && !is_tool) put(b, "<｜Assistant｜><think>\n");
    return DSI_OK;
}

static int check_style(const dsi_tokenizer *tok) {
    if (!tok) return dsi_error(DSI_EINVAL, "chat: NULL tokenizer");
    if (tok->chat_style == DSI__CHAT_NONE)
        return dsi_error(DSI_EUNSUPPORTED, "chat: the tokenizer has no chat_template (tokenizer_config.json missing or without one)");
    if (tok->chat_style != DSI__CHAT_DEEPSEEK_R1)
        return dsi_error(DSI_EUNSUPPORTED, "chat: unrecognised chat_template (fingerprint %016llx); only the DeepSeek-R1 template is rendered (see ARCHITECTURE.md)",
                         (unsigned long long)tok->chat_fingerprint);
    if (!tok->bos_text) return dsi_error(DSI_EUNSUPPORTED, "chat: the template needs bos_token, which tokenizer_config.json lacks");
    return DSI_OK;
}

int dsi_chat_render(const dsi_tokenizer *tok, const dsi_chat_message *msgs, size_t n_msgs, int add_generation_prompt,
                    char **text, size_t *len) {
    if (text) *text = NULL;
    if (len) *len = 0;
    if (!text || (!msgs && n_msgs)) return dsi_error(DSI_EINVAL, "dsi_chat_render: NULL argument");
    int rc = check_style(tok);
    if (rc) return rc;
    sbuf b = {0};
    put(&b, "");
    rc = render_r1(tok, msgs, n_msgs, add_generation_prompt, &b);
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
