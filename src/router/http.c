/* A small blocking HTTP/1.1 client for the router's calls to instances.
 * Chosen over libcurl: the router needs exactly one request per connection
 * with deadlines, incremental reads of a chunked SSE body, and to tell "could
 * not connect" (retry elsewhere) from "the body stopped before its end" (the
 * instance died mid-stream); that is ~200 lines over the sockets the KV
 * transfer already uses, and no new dependency. */
#include "router/router_impl.h"
#include "dsinfer/pd.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

void dsi__rbuf_put(dsi_rbuf *b, const void *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) { b->oom = 1; return; }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void dsi__rbuf_printf(dsi_rbuf *b, const char *fmt, ...) {
    char small[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof small) { dsi__rbuf_put(b, small, n); return; }
    char *big = malloc(n + 1);
    if (!big) { b->oom = 1; return; }
    va_start(ap, fmt);
    vsnprintf(big, n + 1, fmt, ap);
    va_end(ap);
    dsi__rbuf_put(b, big, n);
    free(big);
}

void dsi__rbuf_free(dsi_rbuf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

int dsi__hc_start(dsi_hc *c, const char *host, int port, const char *method, const char *path, const char *body,
                  size_t body_len, const char *bearer, double timeout_s) {
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->chunk_left = -1;
    c->content_left = -1;
    int rc = dsi_pd_connect(host, port, timeout_s, &c->fd);
    if (rc) return rc;
    char head[1536];
    int has_key = bearer && *bearer;
    int n = snprintf(head, sizeof head,
                     "%s %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\nContent-Type: application/json\r\n"
                     "%s%s%sContent-Length: %zu\r\n\r\n",
                     method, path, host, port, has_key ? "Authorization: Bearer " : "", has_key ? bearer : "",
                     has_key ? "\r\n" : "", body ? body_len : 0);
    if (n >= (int)sizeof head) { dsi__hc_close(c); return dsi_error(DSI_EINVAL, "request path too long"); }
    rc = dsi_pd_send_all(c->fd, head, n);
    if (!rc && body && body_len) rc = dsi_pd_send_all(c->fd, body, body_len);
    if (rc) dsi__hc_close(c);
    return rc;
}

/* The calling thread's abort check (see dsi__hc_set_abort). */
static _Thread_local dsi_hc_abort_fn tl_abort;
static _Thread_local void *tl_abort_ctx;

void dsi__hc_set_abort(dsi_hc_abort_fn fn, void *ctx) {
    tl_abort = fn;
    tl_abort_ctx = ctx;
}

void dsi__hc_close(dsi_hc *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

/* More raw bytes into buf. 0 ok, DSI_ETIMEOUT, DSI_EPEER on EOF/error. */
static int fill(dsi_hc *c, double timeout_s) {
    if (c->bpos > 0) {
        memmove(c->buf, c->buf + c->bpos, c->blen - c->bpos);
        c->blen -= c->bpos;
        c->bpos = 0;
    }
    if (c->blen == sizeof c->buf) return dsi_error(DSI_EFORMAT, "http: line too long");
    int why = tl_abort ? tl_abort(tl_abort_ctx) : 0;
    if (why == 1) return dsi_error(DSI_ECANCELED, "http: abandoned");
    if (why) return dsi_error(DSI_EPEER, "http: the instance was marked dead");
    /* with an abort check, waits are cut into slices it runs between */
    if (tl_abort && timeout_s > 0.2) timeout_s = 0.2;
    struct pollfd pf = {.fd = c->fd, .events = POLLIN};
    int pr = poll(&pf, 1, (int)(timeout_s * 1000));
    if (pr == 0) return DSI_ETIMEOUT;
    if (pr < 0) return errno == EINTR ? DSI_ETIMEOUT : dsi_error(DSI_EPEER, "poll: %s", strerror(errno));
    ssize_t k = recv(c->fd, c->buf + c->blen, sizeof c->buf - c->blen, 0);
    if (k < 0 && (errno == EINTR || errno == EAGAIN)) return DSI_ETIMEOUT;
    if (k <= 0) return dsi_error(DSI_EPEER, "connection closed");
    c->blen += k;
    return DSI_OK;
}

/* A CRLF-terminated line at bpos, or NULL (need more bytes). */
static char *take_line(dsi_hc *c) {
    char *s = c->buf + c->bpos, *e = memchr(s, '\n', c->blen - c->bpos);
    if (!e) return NULL;
    *e = 0;
    if (e > s && e[-1] == '\r') e[-1] = 0;
    c->bpos = e + 1 - c->buf;
    return s;
}

int dsi__hc_read_head(dsi_hc *c, double timeout_s) {
    double end = dsi_now() + timeout_s;
    int first = 1;
    for (;;) {
        char *line = take_line(c);
        if (!line) {
            double left = end - dsi_now();
            if (left <= 0) return dsi_error(DSI_ETIMEOUT, "http: no response");
            int rc = fill(c, left);
            if (rc == DSI_ETIMEOUT) continue;
            if (rc) return rc;
            continue;
        }
        if (first) {
            if (strncmp(line, "HTTP/1.", 7) || strlen(line) < 12) return dsi_error(DSI_EFORMAT, "http: bad status line");
            c->status = atoi(line + 9);
            first = 0;
            continue;
        }
        if (!*line) break;
        if (!strncasecmp(line, "Content-Length:", 15)) c->content_left = atoll(line + 15);
        else if (!strncasecmp(line, "Transfer-Encoding:", 18) && strstr(line + 18, "chunked")) c->chunked = 1;
        else if (!strncasecmp(line, "Content-Type:", 13)) {
            const char *v = line + 13;
            while (*v == ' ') v++;
            snprintf(c->content_type, sizeof c->content_type, "%s", v);
        }
    }
    if (c->chunked) c->content_left = -1;
    if (c->content_left == 0) c->done = 1;
    return DSI_OK;
}

long dsi__hc_read_body(dsi_hc *c, char *out, size_t cap, double timeout_s) {
    for (;;) {
        if (c->done) return 0;
        size_t avail = c->blen - c->bpos;
        if (c->chunked && c->chunk_left < 0) {
            char *line = take_line(c);
            if (line) {
                if (!*line) continue; /* the CRLF after a chunk's data */
                c->chunk_left = strtoll(line, NULL, 16);
                if (c->chunk_left == 0) { c->done = 1; return 0; }
                continue;
            }
        } else if (avail > 0) {
            size_t n = avail < cap ? avail : cap;
            if (c->chunked && (long long)n > c->chunk_left) n = (size_t)c->chunk_left;
            if (!c->chunked && c->content_left >= 0 && (long long)n > c->content_left) n = (size_t)c->content_left;
            memcpy(out, c->buf + c->bpos, n);
            c->bpos += n;
            if (c->chunked && (c->chunk_left -= n) == 0) c->chunk_left = -1;
            if (!c->chunked && c->content_left >= 0 && (c->content_left -= n) == 0) c->done = 1;
            return (long)n;
        }
        int rc = fill(c, timeout_s);
        if (rc == DSI_EPEER && !c->chunked && c->content_left < 0) { c->done = 1; return 0; } /* body until EOF */
        if (rc) return rc;
    }
}

int dsi__hc_read_all(dsi_hc *c, dsi_rbuf *out, size_t max_bytes, double timeout_s) {
    double end = dsi_now() + timeout_s;
    char tmp[8192];
    for (;;) {
        double left = end - dsi_now();
        if (left <= 0) return dsi_error(DSI_ETIMEOUT, "http: body timed out");
        long n = dsi__hc_read_body(c, tmp, sizeof tmp, left);
        if (n == 0) return DSI_OK;
        if (n == DSI_ETIMEOUT) continue;
        if (n < 0) return (int)n;
        if (out->len + n > max_bytes) return dsi_error(DSI_ERANGE, "http: body too large");
        dsi__rbuf_put(out, tmp, n);
    }
}

int dsi__hc_call(const char *host, int port, const char *method, const char *path, const char *body, size_t body_len,
                 const char *bearer, double timeout_s, int *status, dsi_rbuf *out) {
    dsi_hc c;
    double end = dsi_now() + timeout_s;
    int rc = dsi__hc_start(&c, host, port, method, path, body, body_len, bearer, timeout_s);
    if (!rc) rc = dsi__hc_read_head(&c, end - dsi_now());
    if (!rc) {
        *status = c.status;
        rc = dsi__hc_read_all(&c, out, 64u << 20, end - dsi_now());
    }
    dsi__hc_close(&c);
    return rc;
}
