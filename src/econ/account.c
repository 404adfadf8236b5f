/* The live account: billable tokens by model and class, revenue at the price
 * frozen at admission, GPU time following scale up/down, a Prometheus view and
 * an append-only journal that `dsinfer report` sums over any period.
 *
 * One mutex guards everything: a bill is a handful of additions, far cheaper
 * than the request it accounts for, so contention is not a concern. */
#include "econ/pricing_impl.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Records a full disk keeps back, retried at every record, before new ones are dropped. */
#define JOURNAL_PENDING_MAX (1u << 20)

typedef struct acct_model {
    uint64_t tokens[DSI_TOK_N];
    uint64_t paid_tokens[DSI_TOK_N];
    double revenue[DSI_TOK_N];
    uint64_t requests;
} acct_model;

struct dsi_account {
    const dsi_pricing *pricing; /* borrowed */
    pthread_mutex_t mu;
    acct_model *models;         /* [n_models] */
    int gpus;
    double gpu_since;           /* time of the last GPU count change, NAN before the first */
    double gpu_seconds;         /* accrued up to gpu_since */
    double gpu_cost;            /* accrued up to gpu_since */
    int journal;                /* owned fd, -1 if none */
    char *pending;              /* whole lines not yet written (the disk was full) */
    size_t pending_len;
    int journal_failing;        /* the last write failed; said once until it works again */
    uint64_t journal_dropped;   /* lines lost since the last successful write */
};

/* Writes what is pending. Lines go out in one write() each time, so that
 * accounts appending to one journal (O_APPEND) never interleave mid-line; a
 * short write (a full disk) keeps the rest and finishes the line next time,
 * so the journal stays whole once there is room again. Caller holds mu. */
static void journal_flush(dsi_account *a) {
    while (a->pending_len > 0) {
        ssize_t w = write(a->journal, a->pending, a->pending_len);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (!a->journal_failing)
                DSI_LOG_WARN("account journal: write failed: %s; keeping up to %u KiB of records in memory and "
                             "retrying at every record",
                             w < 0 ? strerror(errno) : "nothing written", JOURNAL_PENDING_MAX >> 10);
            a->journal_failing = 1;
            return;
        }
        memmove(a->pending, a->pending + w, a->pending_len - (size_t)w);
        a->pending_len -= (size_t)w;
    }
    if (a->journal_failing) {
        if (a->journal_dropped)
            DSI_LOG_WARN("account journal: writing again; %llu records were lost while it could not be written",
                         (unsigned long long)a->journal_dropped);
        else DSI_LOG_INFO("account journal: writing again, no records lost");
        a->journal_failing = 0;
        a->journal_dropped = 0;
    }
}

static void journal_line(dsi_account *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void journal_line(dsi_account *a, const char *fmt, ...) {
    if (a->journal < 0) return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap); /* our lines are a few hundred bytes */
    va_end(ap);
    if (n < 0 || n >= (int)sizeof line - 1 || a->pending_len + (size_t)n + 1 > JOURNAL_PENDING_MAX) {
        if (!a->journal_dropped)
            DSI_LOG_ERROR("account journal: dropping records (%s)",
                          n < 0 || n >= (int)sizeof line - 1 ? "a record too long" : "the write backlog is full");
        a->journal_dropped++;
    } else {
        memcpy(a->pending + a->pending_len, line, (size_t)n);
        a->pending[a->pending_len + n] = '\n';
        a->pending_len += (size_t)n + 1;
    }
    journal_flush(a);
}

/* A JSON string body for `s` (quotes, backslashes and control characters
 * escaped) into buf; model names come from the pricing file's keys. */
static const char *json_esc(const char *s, char *buf, size_t cap) {
    size_t o = 0;
    for (const unsigned char *c = (const unsigned char *)s; *c && o + 7 < cap; c++) {
        if (*c == '"' || *c == '\\') o += (size_t)snprintf(buf + o, cap - o, "\\%c", *c);
        else if (*c < 0x20) o += (size_t)snprintf(buf + o, cap - o, "\\u%04x", *c);
        else buf[o++] = (char)*c;
    }
    buf[o] = '\0';
    return buf;
}

/* Opens the journal for appending. Only a regular file will do: `dsinfer
 * report` must read it back, and a FIFO with no reader would block the start
 * forever (with the stop signals blocked). A file left ending mid-line (a
 * crash while the disk was full) gets a newline first, so that the torn line
 * stays one bad line instead of swallowing our first record. */
static int journal_open(dsi_account *a, const char *path) {
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NONBLOCK, 0644);
    struct stat st;
    if (fd < 0 && errno == ENXIO) return dsi_error(DSI_EIO, "%s: cannot use as a journal: not a regular file", path);
    if (fd < 0) return dsi_error(DSI_EIO, "%s: cannot open journal: %s", path, strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return dsi_error(DSI_EIO, "%s: cannot use as a journal: not a regular file", path);
    }
    a->pending = malloc(JOURNAL_PENDING_MAX);
    if (!a->pending) {
        close(fd);
        return dsi_error(DSI_ENOMEM, "out of memory");
    }
    a->journal = fd;
    int rfd = st.st_size > 0 ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    char last = '\n';
    if (rfd >= 0) {
        if (pread(rfd, &last, 1, st.st_size - 1) != 1) last = '\n';
        close(rfd);
    }
    if (last != '\n') a->pending[a->pending_len++] = '\n';
    return DSI_OK;
}

int dsi_account_create(const dsi_pricing *pricing, const char *journal_path, dsi_account **out) {
    if (!pricing || !out) return dsi_error(DSI_EINVAL, "account: NULL argument");
    *out = NULL;
    dsi_account *a = calloc(1, sizeof *a);
    if (!a) return dsi_error(DSI_ENOMEM, "out of memory");
    a->models = calloc(pricing->n_models, sizeof *a->models);
    if (!a->models) {
        free(a);
        return dsi_error(DSI_ENOMEM, "out of memory");
    }
    a->pricing = pricing;
    a->gpu_since = NAN;
    a->journal = -1;
    pthread_mutex_init(&a->mu, NULL);
    if (journal_path) {
        int rc = journal_open(a, journal_path);
        if (rc) {
            dsi_account_destroy(a);
            return rc;
        }
    }
    *out = a;
    return DSI_OK;
}

void dsi_account_destroy(dsi_account *a) {
    if (!a) return;
    if (a->journal >= 0) {
        journal_flush(a);
        if (a->pending_len > 0 || a->journal_dropped)
            DSI_LOG_ERROR("account journal: %zu bytes of records could not be written (%llu more dropped)",
                          a->pending_len, (unsigned long long)a->journal_dropped);
        close(a->journal);
    }
    free(a->pending);
    pthread_mutex_destroy(&a->mu);
    free(a->models);
    free(a);
}

/* GPU time since the last change, at the current count; caller holds mu. */
static void accrue(dsi_account *a, double now, double *secs, double *cost) {
    *secs = a->gpu_seconds;
    *cost = a->gpu_cost;
    if (isnan(a->gpu_since) || now <= a->gpu_since) return;
    double dt = now - a->gpu_since;
    *secs += dt * a->gpus;
    *cost += dt * a->gpus * a->pricing->gpu_cost_per_hour / 3600.0;
}

int dsi_account_set_gpus(dsi_account *a, double now, int n_gpus) {
    if (!a || n_gpus < 0 || !isfinite(now)) return dsi_error(DSI_EINVAL, "account: bad GPU count or time");
    pthread_mutex_lock(&a->mu);
    if (!isnan(a->gpu_since) && now < a->gpu_since) now = a->gpu_since;
    accrue(a, now, &a->gpu_seconds, &a->gpu_cost);
    a->gpus = n_gpus;
    a->gpu_since = now;
    journal_line(a, "{\"ev\":\"gpus\",\"t\":%.3f,\"gpus\":%d,\"usd_per_gpu_hour\":%.10g}", now, n_gpus,
                 a->pricing->gpu_cost_per_hour);
    pthread_mutex_unlock(&a->mu);
    return DSI_OK;
}

int dsi_account_checkpoint(dsi_account *a, double now) {
    if (!a || !isfinite(now)) return dsi_error(DSI_EINVAL, "account: bad argument");
    pthread_mutex_lock(&a->mu);
    if (!isnan(a->gpu_since) && now < a->gpu_since) now = a->gpu_since;
    journal_line(a, "{\"ev\":\"tick\",\"t\":%.3f,\"gpus\":%d,\"usd_per_gpu_hour\":%.10g}", now, a->gpus,
                 a->pricing->gpu_cost_per_hour);
    pthread_mutex_unlock(&a->mu);
    return DSI_OK;
}

int dsi_account_bill(dsi_account *a, const dsi_price_quote *q, double now, uint64_t hit, uint64_t miss, uint64_t out,
                     int paying, double *usd_out) {
    if (usd_out) *usd_out = 0;
    if (!a || !q) return dsi_error(DSI_EINVAL, "account: NULL argument");
    if (q->model < 0 || q->model >= a->pricing->n_models || strcmp(q->model_name, a->pricing->models[q->model].name))
        return dsi_error(DSI_EINVAL, "account: quote is not from this pricing file");
    const uint64_t lim = (uint64_t)1 << 40; /* a trillion tokens in one request is a bug */
    if (hit > lim || miss > lim || out > lim) return dsi_error(DSI_ERANGE, "account: absurd token count");
    for (int c = 0; c < DSI_TOK_N; c++)
        if (!isfinite(q->usd_per_mtok[c]) || q->usd_per_mtok[c] < 0)
            return dsi_error(DSI_EINVAL, "account: quote has a bad price");
    uint64_t tok[DSI_TOK_N] = {hit, miss, out};
    double usd[DSI_TOK_N], total = 0;
    for (int c = 0; c < DSI_TOK_N; c++) {
        usd[c] = paying ? (double)tok[c] * q->usd_per_mtok[c] / 1e6 : 0.0;
        total += usd[c];
    }
    pthread_mutex_lock(&a->mu);
    acct_model *m = &a->models[q->model];
    for (int c = 0; c < DSI_TOK_N; c++) {
        m->tokens[c] += tok[c];
        if (paying) m->paid_tokens[c] += tok[c];
        m->revenue[c] += usd[c];
    }
    m->requests++;
    char name[DSI_PRICING_NAME_MAX * 6];
    journal_line(a,
                 "{\"ev\":\"bill\",\"t\":%.3f,\"admitted\":%.3f,\"model\":\"%s\",\"paying\":%d,"
                 "\"tokens\":[%llu,%llu,%llu],\"usd_per_mtok\":[%.10g,%.10g,%.10g],\"usd\":%.12g}",
                 now, q->quoted_at, json_esc(q->model_name, name, sizeof name), paying ? 1 : 0,
                 (unsigned long long)hit, (unsigned long long)miss, (unsigned long long)out, q->usd_per_mtok[0],
                 q->usd_per_mtok[1], q->usd_per_mtok[2], total);
    pthread_mutex_unlock(&a->mu);
    if (usd_out) *usd_out = total;
    return DSI_OK;
}

int dsi_account_totals_get(dsi_account *a, double now, dsi_account_totals *t) {
    if (!a || !t) return dsi_error(DSI_EINVAL, "account: NULL argument");
    memset(t, 0, sizeof *t);
    pthread_mutex_lock(&a->mu);
    for (int i = 0; i < a->pricing->n_models; i++) {
        const acct_model *m = &a->models[i];
        for (int c = 0; c < DSI_TOK_N; c++) {
            t->tokens[c] += m->tokens[c];
            t->paid_tokens[c] += m->paid_tokens[c];
            t->revenue_usd[c] += m->revenue[c];
            t->revenue_total_usd += m->revenue[c];
        }
        t->requests += m->requests;
    }
    double secs, cost;
    accrue(a, now, &secs, &cost);
    t->gpu_hours = secs / 3600.0;
    t->gpu_cost_usd = cost;
    t->gpus = a->gpus;
    pthread_mutex_unlock(&a->mu);
    return DSI_OK;
}


/* Prometheus label values escape backslash, quote and newline. */
static void mb_label(dsi_ebuf *s, const char *v) {
    for (const char *c = v; *c; c++) {
        if (*c == '\\') dsi__ebuf_printf(s, "\\\\");
        else if (*c == '"') dsi__ebuf_printf(s, "\\\"");
        else if (*c == '\n') dsi__ebuf_printf(s, "\\n");
        else dsi__ebuf_printf(s, "%c", *c);
    }
}

typedef struct { dsi_account *a; double now; } metrics_args;
static int fill_metrics(void *ctx, char *buf, size_t cap) {
    metrics_args *m = ctx;
    return dsi_account_write_metrics(m->a, m->now, buf, cap);
}

char *dsi_account_metrics_text(dsi_account *a, double now, int *len) {
    metrics_args m = {a, now};
    return dsi__econ_text(fill_metrics, &m, len);
}

int dsi_account_write_metrics(dsi_account *a, double now, char *buf, size_t cap) {
    if (!a || !buf || cap == 0) return dsi_error(DSI_EINVAL, "account: NULL argument");
    dsi_ebuf s = {buf, cap, 0, 0};
    const dsi_pricing *p = a->pricing;
    pthread_mutex_lock(&a->mu);
    dsi__ebuf_printf(&s, "# HELP dsinfer_tokens_total Tokens served, by model and billing class (paying or not).\n"
                  "# TYPE dsinfer_tokens_total counter\n");
    for (int i = 0; i < p->n_models; i++)
        for (int c = 0; c < DSI_TOK_N; c++) {
            dsi__ebuf_printf(&s, "dsinfer_tokens_total{model=\"");
            mb_label(&s, p->models[i].name);
            dsi__ebuf_printf(&s, "\",class=\"%s\"} %llu\n", dsi_token_class_name(c),
                      (unsigned long long)a->models[i].tokens[c]);
        }
    dsi__ebuf_printf(&s, "# HELP dsinfer_paid_tokens_total Tokens billed to paying customers.\n"
                  "# TYPE dsinfer_paid_tokens_total counter\n");
    for (int i = 0; i < p->n_models; i++)
        for (int c = 0; c < DSI_TOK_N; c++) {
            dsi__ebuf_printf(&s, "dsinfer_paid_tokens_total{model=\"");
            mb_label(&s, p->models[i].name);
            dsi__ebuf_printf(&s, "\",class=\"%s\"} %llu\n", dsi_token_class_name(c),
                      (unsigned long long)a->models[i].paid_tokens[c]);
        }
    dsi__ebuf_printf(&s, "# HELP dsinfer_revenue_usd_total Revenue at admission-time prices.\n"
                  "# TYPE dsinfer_revenue_usd_total counter\n");
    double rev = 0;
    for (int i = 0; i < p->n_models; i++) {
        for (int c = 0; c < DSI_TOK_N; c++) {
            dsi__ebuf_printf(&s, "dsinfer_revenue_usd_total{model=\"");
            mb_label(&s, p->models[i].name);
            dsi__ebuf_printf(&s, "\",class=\"%s\"} %.6f\n", dsi_token_class_name(c), a->models[i].revenue[c]);
            rev += a->models[i].revenue[c];
        }
    }
    dsi__ebuf_printf(&s, "# HELP dsinfer_billed_requests_total Requests billed.\n"
                  "# TYPE dsinfer_billed_requests_total counter\n");
    for (int i = 0; i < p->n_models; i++) {
        dsi__ebuf_printf(&s, "dsinfer_billed_requests_total{model=\"");
        mb_label(&s, p->models[i].name);
        dsi__ebuf_printf(&s, "\"} %llu\n", (unsigned long long)a->models[i].requests);
    }
    double secs, cost;
    accrue(a, now, &secs, &cost);
    dsi__ebuf_printf(&s,
              "# HELP dsinfer_gpus GPUs currently provisioned (all instances).\n# TYPE dsinfer_gpus gauge\n"
              "dsinfer_gpus %d\n"
              "# HELP dsinfer_gpu_seconds_total GPU time provisioned (GPU-seconds).\n"
              "# TYPE dsinfer_gpu_seconds_total counter\n"
              "dsinfer_gpu_seconds_total %.3f\n"
              "# HELP dsinfer_gpu_cost_usd_total GPU cost at the pricing file's hourly rate.\n"
              "# TYPE dsinfer_gpu_cost_usd_total counter\n"
              "dsinfer_gpu_cost_usd_total %.6f\n"
              "# HELP dsinfer_cost_profit_margin (revenue - cost) / cost since start.\n"
              "# TYPE dsinfer_cost_profit_margin gauge\n"
              "dsinfer_cost_profit_margin %.6f\n",
              a->gpus, secs, cost, cost > 0 ? (rev - cost) / cost : 0.0);
    pthread_mutex_unlock(&a->mu);
    if (s.overflow) return dsi_error(DSI_ERANGE, "metrics: output buffer of %zu bytes too small", cap);
    return (int)s.len;
}

/* ---- reports ---------------------------------------------------------------------------- */

typedef struct gpu_ev {
    double t;
    int gpus;
    double usd_per_gpu_hour;
} gpu_ev;

static int cmp_ev(const void *a, const void *b) {
    double x = ((const gpu_ev *)a)->t, y = ((const gpu_ev *)b)->t;
    return x < y ? -1 : x > y;
}

static double num(const cJSON *o, const char *k, double dflt) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(it) && isfinite(it->valuedouble) ? it->valuedouble : dflt;
}

int dsi_econ_report_journal(const char *path, double from, double to, dsi_econ_report *r) {
    if (!path || !r) return dsi_error(DSI_EINVAL, "report: NULL argument");
    if (!(from < to)) return dsi_error(DSI_EINVAL, "report: the period is empty (from must be before to)");
    memset(r, 0, sizeof *r);
    FILE *f = fopen(path, "r");
    if (!f) return dsi_error(DSI_EIO, "%s: cannot open journal: %s", path, strerror(errno));
    gpu_ev *ev = NULL;
    size_t n_ev = 0, cap_ev = 0;
    double first = INFINITY, last = -INFINITY;
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    int rc = DSI_OK;
    while ((len = getline(&line, &lcap, f)) >= 0) {
        if (len <= 1) continue;
        /* one record a line: anything after it (two records glued by a torn
         * write, a NUL and garbage) makes the line bad, not silently lost */
        const char *end = NULL;
        cJSON *o = cJSON_ParseWithOpts(line, &end, 0);
        while (o && end < line + len && strchr(" \t\r\n", *end) && *end) end++;
        if (o && end != line + len) {
            cJSON_Delete(o);
            o = NULL;
        }
        const cJSON *evn = o ? cJSON_GetObjectItemCaseSensitive(o, "ev") : NULL;
        double t = o ? num(o, "t", NAN) : NAN;
        /* Unix seconds from 1970 to 9999: a corrupt time would stretch the
         * GPU step function to infinite cost */
        if (!cJSON_IsString(evn) || !(t >= 0 && t < 253402300800.0)) {
            r->bad_lines++;
            cJSON_Delete(o);
            continue;
        }
        if (t < first) first = t;
        if (t > last) last = t;
        if (!strcmp(evn->valuestring, "bill")) {
            const cJSON *tok = cJSON_GetObjectItemCaseSensitive(o, "tokens");
            double usd = num(o, "usd", NAN);
            int ok_tok = cJSON_IsArray(tok) && cJSON_GetArraySize(tok) == DSI_TOK_N;
            for (int c = 0; ok_tok && c < DSI_TOK_N; c++) {
                const cJSON *x = cJSON_GetArrayItem(tok, c);
                ok_tok = cJSON_IsNumber(x) && x->valuedouble >= 0 && x->valuedouble < 1e15;
            }
            if (!ok_tok || isnan(usd) || usd < 0 || usd > 1e12) {
                r->bad_lines++;
            } else if (t >= from && t < to) {
                int paying = num(o, "paying", 1) != 0;
                for (int c = 0; c < DSI_TOK_N; c++) {
                    double v = cJSON_GetArrayItem(tok, c)->valuedouble;
                    r->tokens[c] += (uint64_t)v;
                    if (paying) r->paid_tokens[c] += (uint64_t)v;
                }
                r->revenue_usd += usd;
                r->requests++;
            }
        } else if (!strcmp(evn->valuestring, "gpus") || !strcmp(evn->valuestring, "tick")) {
            double g = num(o, "gpus", -1), price = num(o, "usd_per_gpu_hour", -1);
            if (g < 0 || g > 1e7 || price < 0 || price > 1e4) {
                r->bad_lines++;
            } else {
                if (n_ev == cap_ev) {
                    cap_ev = cap_ev ? cap_ev * 2 : 256;
                    gpu_ev *ne = realloc(ev, cap_ev * sizeof *ev);
                    if (!ne) {
                        cJSON_Delete(o);
                        rc = dsi_error(DSI_ENOMEM, "out of memory");
                        break;
                    }
                    ev = ne;
                }
                ev[n_ev++] = (gpu_ev){t, (int)g, price};
            }
        } else {
            r->bad_lines++;
        }
        cJSON_Delete(o);
    }
    free(line);
    fclose(f);
    if (rc) {
        free(ev);
        return rc;
    }
    /* The GPU count is a step function from each event to the next; the last
     * event's count holds until the journal's last line. */
    qsort(ev, n_ev, sizeof *ev, cmp_ev);
    double secs = 0, cost = 0;
    for (size_t i = 0; i < n_ev; i++) {
        double a = ev[i].t, b = i + 1 < n_ev ? ev[i + 1].t : last;
        if (a < from) a = from;
        if (b > to) b = to;
        if (b > a) {
            secs += (b - a) * ev[i].gpus;
            cost += (b - a) * ev[i].gpus * ev[i].usd_per_gpu_hour / 3600.0;
        }
    }
    free(ev);
    r->from = fmax(from, first);
    r->to = fmin(to, last);
    if (!(r->from <= r->to)) r->from = r->to = isfinite(first) ? first : 0;
    r->gpu_hours = secs / 3600.0;
    r->cost_usd = cost;
    r->margin = cost > 0 ? (r->revenue_usd - cost) / cost : 0;
    return DSI_OK;
}

