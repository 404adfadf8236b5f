/* Tokens -> text -> OpenAI JSON, on the scheduler thread.
 *
 * Per token: the streaming detokenizer gives complete UTF-8; text that could
 * begin a stop string is held back until it cannot (a matched stop string is
 * cut, with what follows); what remains is split into reasoning and content
 * for R1-style prompts; then either an SSE chunk is queued for the client
 * (streaming) or the text is accumulated for the final body. */
#define _GNU_SOURCE /* memmem */
#include "server/server_impl.h"

#include <stdlib.h>
#include <string.h>

static const char *object_name(const dsi_conn *c, int chunk) {
    if (c->rq.chat) return chunk ? "chat.completion.chunk" : "chat.completion";
    return "text_completion";
}

/* ---------------------------------------------------------------- text */

static void emit_text(dsi_conn *c, const char *s, size_t n) {
    if (n == 0) return;
    if (!c->rsn) { dsi__sbuf_put(&c->text, s, n); return; }
    dsi_reasoning_delta d;
    if (dsi_reasoning_push(c->rsn, s, n, &d) != DSI_OK) { dsi__sbuf_put(&c->text, s, n); return; }
    dsi__sbuf_put(&c->rtext, d.reasoning, d.reasoning_len);
    dsi__sbuf_put(&c->text, d.content, d.content_len);
}

/* Feeds new text through the stop-string filter. Returns 1 when a stop
 * string matched: the text before it was emitted, the rest dropped. */
static int text_in(dsi_conn *c, const char *s, size_t n) {
    dsi_api_req *r = &c->rq;
    if (r->n_stop == 0) { emit_text(c, s, n); return 0; }
    dsi__sbuf_put(&c->held, s, n);
    const char *h = c->held.p ? c->held.p : "";
    size_t hl = c->held.len, cut = hl;
    for (int i = 0; i < r->n_stop; i++) {
        const char *m = memmem(h, hl, r->stop[i], r->stop_len[i]);
        if (m && (size_t)(m - h) < cut) cut = m - h;
    }
    if (cut < hl) {
        emit_text(c, h, cut);
        dsi__sbuf_reset(&c->held);
        return 1;
    }
    /* hold back the longest suffix that is a proper prefix of a stop string */
    size_t keep = 0;
    for (int i = 0; i < r->n_stop; i++)
        for (size_t k = DSI_MIN(hl, r->stop_len[i] - 1); k > keep; k--)
            if (!memcmp(h + hl - k, r->stop[i], k)) { keep = k; break; }
    emit_text(c, h, hl - keep);
    memmove(c->held.p, h + hl - keep, keep);
    c->held.len = keep;
    return 0;
}

/* ---------------------------------------------------------------- logprobs */

static void token_text(const dsi_conn *c, int32_t id, const char **s, size_t *n) {
    *s = dsi_tokenizer_token_bytes(c->srv->tok, id, n);
    if (!*s) { *s = ""; *n = 0; }
}

static void bytes_array(dsi_sbuf *b, const char *s, size_t n) {
    dsi__sbuf_put(b, "[", 1);
    for (size_t i = 0; i < n; i++) dsi__sbuf_printf(b, "%s%u", i ? "," : "", (unsigned char)s[i]);
    dsi__sbuf_put(b, "]", 1);
}

/* Appends one token's logprobs: chat, an object of the "content" array;
 * completions, one element of each legacy parallel array. */
static void add_logprob(dsi_conn *c, const dsi_sched_event *ev) {
    const char *s;
    size_t n;
    token_text(c, ev->token, &s, &n);
    if (!c->rq.chat) {
        const char *sep = c->lp_tok.len ? "," : "";
        dsi__sbuf_puts(&c->lp_tok, sep);
        dsi__sbuf_json_str(&c->lp_tok, s, n);
        dsi__sbuf_puts(&c->lp_val, sep);
        dsi__sbuf_json_num(&c->lp_val, ev->logprob);
        dsi__sbuf_printf(&c->lp_off, "%s%zu", sep, c->text_offset);
        dsi__sbuf_puts(&c->lp_top, *sep ? ",{" : "{");
        for (int i = 0; i < ev->n_top; i++) {
            const char *ts;
            size_t tn;
            token_text(c, ev->top_ids[i], &ts, &tn);
            if (i) dsi__sbuf_put(&c->lp_top, ",", 1);
            dsi__sbuf_json_str(&c->lp_top, ts, tn);
            dsi__sbuf_put(&c->lp_top, ":", 1);
            dsi__sbuf_json_num(&c->lp_top, ev->top_logprobs[i]);
        }
        dsi__sbuf_put(&c->lp_top, "}", 1);
        c->text_offset += n;
        return;
    }
    dsi_sbuf *b = &c->lp;
    if (b->len) dsi__sbuf_put(b, ",", 1);
    dsi__sbuf_puts(b, "{\"token\":");
    dsi__sbuf_json_str(b, s, n);
    dsi__sbuf_puts(b, ",\"logprob\":");
    dsi__sbuf_json_num(b, ev->logprob);
    dsi__sbuf_puts(b, ",\"bytes\":");
    bytes_array(b, s, n);
    dsi__sbuf_puts(b, ",\"top_logprobs\":[");
    for (int i = 0; i < ev->n_top; i++) {
        const char *ts;
        size_t tn;
        token_text(c, ev->top_ids[i], &ts, &tn);
        dsi__sbuf_puts(b, i ? ",{\"token\":" : "{\"token\":");
        dsi__sbuf_json_str(b, ts, tn);
        dsi__sbuf_puts(b, ",\"logprob\":");
        dsi__sbuf_json_num(b, ev->top_logprobs[i]);
        dsi__sbuf_puts(b, ",\"bytes\":");
        bytes_array(b, ts, tn);
        dsi__sbuf_put(b, "}", 1);
    }
    dsi__sbuf_puts(b, "]}");
}

static const char *str_or_empty(const dsi_sbuf *b) { return b->p ? b->p : ""; }

/* The "logprobs" value for what c->lp* hold. */
static void write_logprobs(dsi_conn *c, dsi_sbuf *o) {
    if (!c->rq.logprobs) { dsi__sbuf_puts(o, "null"); return; }
    if (c->rq.chat) {
        dsi__sbuf_printf(o, "{\"content\":[%s]}", str_or_empty(&c->lp));
        return;
    }
    dsi__sbuf_printf(o, "{\"tokens\":[%s],\"token_logprobs\":[%s],\"top_logprobs\":[%s],\"text_offset\":[%s]}",
                     str_or_empty(&c->lp_tok), str_or_empty(&c->lp_val), str_or_empty(&c->lp_top),
                     str_or_empty(&c->lp_off));
}

static void reset_logprobs(dsi_conn *c) {
    dsi__sbuf_reset(&c->lp);
    dsi__sbuf_reset(&c->lp_tok);
    dsi__sbuf_reset(&c->lp_val);
    dsi__sbuf_reset(&c->lp_top);
    dsi__sbuf_reset(&c->lp_off);
}

/* ---------------------------------------------------------------- JSON out */

static void usage_json(dsi_conn *c, dsi_sbuf *o, const dsi_sched_event *ev) {
    int hit = ev->cached_tokens, p = ev->prompt_tokens, g = ev->completion_tokens;
    dsi__sbuf_printf(o,
                     "{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d,"
                     "\"prompt_cache_hit_tokens\":%d,\"prompt_cache_miss_tokens\":%d,"
                     "\"prompt_tokens_details\":{\"cached_tokens\":%d}",
                     p, g, p + g, hit, p - hit, hit);
    if (c->rq.include_price && c->has_quote) { /* the price frozen at admission and what it came to */
        char q[2048];
        int n = dsi_price_quote_write_json(&c->quote, q, sizeof q);
        if (n > 0) {
            dsi__sbuf_puts(o, ",\"price\":");
            dsi__sbuf_put(o, q, (size_t)n);
            dsi__sbuf_printf(o, ",\"cost_usd\":%.9g", c->charge_usd);
        }
    }
    dsi__sbuf_puts(o, "}");
}

static void chunk_head(dsi_conn *c, dsi_sbuf *o) {
    dsi__sbuf_printf(o, "data: {\"id\":\"%s\",\"object\":\"%s\",\"created\":%ld,\"model\":", c->id,
                     object_name(c, 1), c->created);
    dsi__sbuf_json_str(o, c->srv->model_name, strlen(c->srv->model_name));
    dsi__sbuf_puts(o, ",\"choices\":[");
}

/* One SSE chunk with this token's deltas (c->text / c->rtext), logprobs and
 * ids, or the closing chunk when finish_reason is given. */
static void stream_chunk(dsi_conn *c, dsi_sbuf *o, const char *finish_reason, int has_token, int32_t token) {
    chunk_head(c, o);
    dsi__sbuf_puts(o, "{\"index\":0,");
    if (c->rq.chat) {
        dsi__sbuf_puts(o, "\"delta\":{");
        int comma = 0;
        if (c->rtext.len) {
            dsi__sbuf_puts(o, "\"reasoning_content\":");
            dsi__sbuf_json_str(o, c->rtext.p, c->rtext.len);
            comma = 1;
        }
        if (c->text.len || (!finish_reason && !c->rtext.len)) {
            dsi__sbuf_puts(o, comma ? ",\"content\":" : "\"content\":");
            dsi__sbuf_json_str(o, c->text.p ? c->text.p : "", c->text.len);
        }
        dsi__sbuf_puts(o, "},");
    } else {
        dsi__sbuf_puts(o, "\"text\":");
        dsi__sbuf_json_str(o, c->text.p ? c->text.p : "", c->text.len);
        dsi__sbuf_put(o, ",", 1);
    }
    if (has_token && c->rq.return_token_ids) dsi__sbuf_printf(o, "\"token_ids\":[%d],", token);
    dsi__sbuf_puts(o, "\"logprobs\":");
    if (has_token && c->rq.logprobs) write_logprobs(c, o);
    else dsi__sbuf_puts(o, "null");
    if (finish_reason) dsi__sbuf_printf(o, ",\"finish_reason\":\"%s\"}]}\n\n", finish_reason);
    else dsi__sbuf_puts(o, ",\"finish_reason\":null}]}\n\n");
}

static void final_body(dsi_conn *c, dsi_sbuf *o, const char *finish_reason, const dsi_sched_event *ev) {
    dsi__sbuf_printf(o, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%ld,\"model\":", c->id, object_name(c, 0),
                     c->created);
    dsi__sbuf_json_str(o, c->srv->model_name, strlen(c->srv->model_name));
    dsi__sbuf_puts(o, ",\"choices\":[{\"index\":0,");
    if (c->rq.chat) {
        dsi__sbuf_puts(o, "\"message\":{\"role\":\"assistant\",\"content\":");
        dsi__sbuf_json_str(o, c->text.p ? c->text.p : "", c->text.len);
        if (c->rsn) {
            dsi__sbuf_puts(o, ",\"reasoning_content\":");
            dsi__sbuf_json_str(o, c->rtext.p ? c->rtext.p : "", c->rtext.len);
        }
        dsi__sbuf_puts(o, "},");
    } else {
        dsi__sbuf_puts(o, "\"text\":");
        dsi__sbuf_json_str(o, c->text.p ? c->text.p : "", c->text.len);
        dsi__sbuf_put(o, ",", 1);
    }
    if (c->rq.return_token_ids) {
        dsi__sbuf_puts(o, "\"token_ids\":[");
        dsi__sbuf_put(o, c->ids.p ? c->ids.p : "", c->ids.len);
        dsi__sbuf_puts(o, "],");
    }
    dsi__sbuf_puts(o, "\"logprobs\":");
    write_logprobs(c, o);
    dsi__sbuf_printf(o, ",\"finish_reason\":\"%s\"}],\"usage\":", finish_reason);
    usage_json(c, o, ev);
    dsi__sbuf_put(o, "}", 1);
}

/* ---------------------------------------------------------------- events */

int dsi__conn_pipeline_init(dsi_conn *c) {
    if (dsi_detok_create(c->srv->tok, DSI_TOK_SKIP_SPECIAL, &c->detok)) return DSI_ENOMEM;
    if (c->rq.chat && c->rq.reasoning && dsi_reasoning_create(1, &c->rsn)) return DSI_ENOMEM;
    if (c->rq.stream && c->rq.chat) { /* the role comes first, as OpenAI's stream does */
        chunk_head(c, &c->out);
        dsi__sbuf_puts(&c->out, "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
                                "\"logprobs\":null,\"finish_reason\":null}]}\n\n");
    }
    return DSI_OK;
}

void dsi__conn_pipeline_free(dsi_conn *c) {
    dsi_detok_destroy(c->detok);
    dsi_reasoning_destroy(c->rsn);
    c->detok = NULL;
    c->rsn = NULL;
    dsi__sbuf_free(&c->held);
    dsi__sbuf_free(&c->text);
    dsi__sbuf_free(&c->rtext);
    dsi__sbuf_free(&c->lp);
    dsi__sbuf_free(&c->lp_tok);
    dsi__sbuf_free(&c->lp_val);
    dsi__sbuf_free(&c->lp_top);
    dsi__sbuf_free(&c->lp_off);
    dsi__sbuf_free(&c->ids);
    dsi__api_req_free(&c->rq);
}

static int on_token(dsi_conn *c, const dsi_sched_event *ev) {
    dsi_server_metrics *m = &c->srv->metrics;
    double now = dsi_now();
    if (c->n_seen++ == 0) {
        c->t_first = now;
        dsi__histo_observe(&m->ttft, now - c->t_start);
    }
    else dsi__histo_observe(&m->itl, now - c->t_last);
    c->t_last = now;
    if (c->rq.stream) { /* this token's deltas only */
        dsi__sbuf_reset(&c->text);
        dsi__sbuf_reset(&c->rtext);
        reset_logprobs(c);
    }
    const char *piece = "";
    size_t n = 0;
    if (ev->token < dsi_tokenizer_vocab_size(c->srv->tok) && dsi_detok_push(c->detok, ev->token, &piece, &n) != DSI_OK) {
        piece = "";
        n = 0;
    } /* ids past the tokenizer's vocabulary (the demo model has 32 spare) decode to nothing */
    int stop = text_in(c, piece, n);
    if (c->rq.logprobs) add_logprob(c, ev);
    if (c->rq.return_token_ids && !c->rq.stream) dsi__sbuf_printf(&c->ids, c->ids.len ? ",%d" : "%d", ev->token);
    if (stop) c->stopped_by_string = 1;
    if (c->rq.stream && (c->text.len || c->rtext.len || c->rq.logprobs || c->rq.return_token_ids)) {
        pthread_mutex_lock(&c->mu);
        stream_chunk(c, &c->out, NULL, 1, ev->token);
        dsi__conn_wake(c);
        pthread_mutex_unlock(&c->mu);
    }
    return stop;
}

static void on_finish(dsi_conn *c, const dsi_sched_event *ev) {
    dsi_server *srv = c->srv;
    dsi_server_metrics *m = &srv->metrics;
    if (c->rq.stream) {
        dsi__sbuf_reset(&c->text);
        dsi__sbuf_reset(&c->rtext);
    }
    int ok = ev->finish == DSI_FINISH_STOP || ev->finish == DSI_FINISH_LENGTH;
    const char *reason = ev->finish == DSI_FINISH_LENGTH ? "length" : "stop";
    if (ok && !c->stopped_by_string) { /* release what the detokenizer and the stop filter hold */
        const char *t;
        size_t n;
        if (dsi_detok_flush(c->detok, &t, &n) == DSI_OK && text_in(c, t, n)) {
            c->stopped_by_string = 1;
            reason = "stop";
        }
        if (!c->stopped_by_string) emit_text(c, c->held.p, c->held.len), c->held.len = 0;
    }
    if (ok && c->rsn) {
        dsi_reasoning_delta d;
        if (dsi_reasoning_finish(c->rsn, &d) == DSI_OK) {
            dsi__sbuf_put(&c->rtext, d.reasoning, d.reasoning_len);
            dsi__sbuf_put(&c->text, d.content, d.content_len);
        }
    }
    int outcome = ev->finish == DSI_FINISH_STOP     ? DSI_OUT_STOP
                  : ev->finish == DSI_FINISH_LENGTH ? DSI_OUT_LENGTH
                  : ev->finish == DSI_FINISH_CANCELLED ? DSI_OUT_CANCELLED
                                                    : DSI_OUT_SERVER_ERROR;
    atomic_fetch_add(&m->outcomes[outcome], 1);
    atomic_fetch_add(&m->prompt_tokens, ev->prompt_tokens);
    atomic_fetch_add(&m->completion_tokens, ev->completion_tokens);
    atomic_fetch_add(&m->cache_hit_tokens, ev->cached_tokens);
    if (ev->finish != DSI_FINISH_ERROR) /* cancelled requests pay for what they consumed */
        dsi__billing_bill(srv, c, ev->prompt_tokens, ev->cached_tokens, ev->completion_tokens, &c->charge_usd);
    if (c->n_seen > 0) dsi__histo_observe(&m->e2e, c->t_last - c->t_start);
    if (m->n_req_hooks) {
        static const char *NAMES[] = {"stop", "length", "cancelled", "client_error", "rejected", "server_error"};
        dsi_request_record rec = {srv->model_name, ev->prompt_tokens, ev->cached_tokens, ev->completion_tokens,
                                  NAMES[outcome], c->t_first - c->t_start, dsi_now() - c->t_start};
        if (c->n_seen == 0) rec.ttft_s = -1;
        for (int i = 0; i < m->n_req_hooks; i++) m->req_hooks[i](m->req_hook_ctx[i], &rec);
    }

    /* a peer process that failed (an EP rank): the service is unavailable, not broken */
    int err_status = c->fail_status                                            ? c->fail_status
                     : ev->status == DSI_EPEER || ev->status == DSI_ETIMEOUT ? 503
                                                                               : 500;
    pthread_mutex_lock(&c->mu);
    if (c->rq.stream) {
        if (ok) {
            if (c->text.len || c->rtext.len) stream_chunk(c, &c->out, NULL, 0, 0);
            dsi__sbuf_reset(&c->text);
            dsi__sbuf_reset(&c->rtext);
            stream_chunk(c, &c->out, reason, 0, 0);
            if (c->rq.include_usage) {
                chunk_head(c, &c->out);
                dsi__sbuf_puts(&c->out, "],\"usage\":");
                usage_json(c, &c->out, ev);
                dsi__sbuf_puts(&c->out, "}\n\n");
            }
        } else {
            dsi__sbuf_puts(&c->out, "data: ");
            dsi__api_error_json(&c->out, err_status, ev->message ? ev->message : "request failed", NULL);
            dsi__sbuf_puts(&c->out, "\n\n");
        }
        dsi__sbuf_puts(&c->out, "data: [DONE]\n\n");
    } else if (ok) {
        c->final_status = 200;
        final_body(c, &c->out, reason, ev);
    } else {
        c->final_status = ev->finish == DSI_FINISH_CANCELLED ? 503 : err_status;
        dsi__api_error_json(&c->out, c->final_status, ev->message ? ev->message : "request failed", NULL);
    }
    if (c->out.oom) c->final_status = 500;
    c->finished = 1;
    dsi__conn_wake(c);
    pthread_mutex_unlock(&c->mu);
    atomic_fetch_sub(&m->in_flight, 1);
    dsi__conn_unregister(c);
    dsi__conn_unref(c); /* the scheduler's reference */
}

int dsi__conn_on_event(void *user, const dsi_sched_event *ev) {
    dsi_conn *c = user;
    if (ev->type == DSI_SCHED_TOKEN) return on_token(c, ev);
    on_finish(c, ev);
    return 0;
}
