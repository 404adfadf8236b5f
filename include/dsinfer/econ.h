/* dsinfer/econ.h - what serving costs and earns: pricing file, pricing engine,
 * live account (tokens, revenue, GPU cost), journal and reports, and the
 * published-figures calculator.
 *
 * The server and router own one dsi_pricing and one dsi_account:
 *
 *     dsi_pricing *p; dsi_account *a;
 *     if (dsi_pricing_load("pricing.json", &p) != DSI_OK) die(dsi_last_error());
 *     dsi_account_create(p, "econ.jsonl", &a);          // journal may be NULL
 *     dsi_account_set_gpus(a, time_now, 8);             // on every scale up/down
 *     // admission: freeze the price in force (time windows x utilisation band)
 *     dsi_price_quote q;
 *     dsi_pricing_current(p, "deepseek-r1", time_now, utilisation, &q);
 *     ... serve the request ...
 *     dsi_account_bill(a, &q, time_now, hit, miss, out, 1, NULL);
 *     dsi_account_write_metrics(a, time_now, buf, sizeof buf);   // GET /metrics
 *
 * Times are wall-clock Unix seconds (double). Prices are USD per million
 * tokens. The pricing file's schema is in ARCHITECTURE.md ("Economics") and
 * docs/pricing.example.json. All functions here are thread-safe unless noted.
 */
#ifndef DSINFER_ECON_H
#define DSINFER_ECON_H

#include <stddef.h>
#include <stdint.h>

#include "dsinfer/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Billable token classes, in the order of every per-class array below. */
typedef enum dsi_token_class {
    DSI_TOK_INPUT_HIT = 0,  /* prompt tokens served from the KV cache */
    DSI_TOK_INPUT_MISS = 1, /* prompt tokens computed by prefill */
    DSI_TOK_OUTPUT = 2,     /* generated tokens */
    DSI_TOK_N = 3
} dsi_token_class;

/* "input_cache_hit", "input_cache_miss", "output". Never NULL. */
const char *dsi_token_class_name(int cls);

#define DSI_PRICING_NAME_MAX 64

/* ---- pricing file and pricing engine --------------------------------------- */

typedef struct dsi_pricing dsi_pricing;

/* Parses a pricing file (JSON). On error returns DSI_EIO/DSI_EFORMAT/DSI_EINVAL
 * with a message naming the file and the offending key ("windows[0].start: ...").
 * Unknown keys are errors (they are usually typos). *out is owned by the caller. */
int dsi_pricing_load(const char *path, dsi_pricing **out);
/* Same from a NUL-terminated JSON string; `origin` names it in messages. */
int dsi_pricing_parse(const char *json, const char *origin, dsi_pricing **out);
void dsi_pricing_destroy(dsi_pricing *p);

/* Read-only facts from the file. */
int dsi_pricing_n_models(const dsi_pricing *p);
const char *dsi_pricing_model_name(const dsi_pricing *p, int i); /* NULL if out of range */
/* Index of a model by name or alias, or -1. */
int dsi_pricing_find_model(const dsi_pricing *p, const char *name);
/* Base (undiscounted) USD per million tokens, by class. */
int dsi_pricing_base(const dsi_pricing *p, int model, double usd_per_mtok[DSI_TOK_N]);
double dsi_pricing_gpu_cost_per_hour(const dsi_pricing *p);
int dsi_pricing_gpus_per_node(const dsi_pricing *p);
double dsi_pricing_paying_share(const dsi_pricing *p);

/* The price in force for one model at one moment: what a request admitted now
 * is billed at, whatever happens to prices before it completes. */
typedef struct dsi_price_quote {
    int model;                          /* index in the pricing file */
    char model_name[DSI_PRICING_NAME_MAX];
    double usd_per_mtok[DSI_TOK_N];     /* base x window x band */
    double multiplier;                  /* window x band */
    int window;                         /* time window in force, or -1 */
    int band;                           /* utilisation band in force, or -1 */
    char window_name[DSI_PRICING_NAME_MAX];
    char band_name[DSI_PRICING_NAME_MAX];
    double quoted_at;                   /* the `now` it was evaluated at (admission time) */
    double effective_from;              /* when this price started (>= last change seen) */
    double next_change;                 /* next scheduled (time-window) change; INFINITY if none */
    double next_usd_per_mtok[DSI_TOK_N];/* prices after next_change if the band holds */
} dsi_price_quote;

/* Evaluates the rules for `model` (name or alias) at `now` with the cluster's
 * `utilisation` (0..1+, see dsi_pricing_utilisation) and fills *q. Updates the
 * engine's band state: a band is entered when utilisation is inside it, left
 * only when utilisation is `hysteresis` beyond its edge, and never changed
 * within `min_hold_s` of the previous change. Calls with `now` earlier than the
 * last change do not move the state. A negative utilisation means "unknown":
 * the band state is kept as is. Returns DSI_ENOTFOUND for an unknown model. */
int dsi_pricing_current(dsi_pricing *p, const char *model, double now, double utilisation,
                        dsi_price_quote *q);

/* Pure evaluation with an explicit band (-1 = none): no state is read or changed. */
int dsi_pricing_eval(const dsi_pricing *p, int model, double now, int band, dsi_price_quote *q);

/* Utilisation the engine expects: the larger of running/capacity (batch slots)
 * and kv_used/kv_total (KV blocks). Zero capacities are ignored. */
double dsi_pricing_utilisation(double running, double capacity, double kv_used, double kv_total);

/* Resets the hysteresis state (band none, no change seen). For simulations. */
void dsi_pricing_reset_state(dsi_pricing *p);

/* Writes the body of GET /v1/pricing: current prices for every model and class
 * and the next scheduled change, as JSON. Moves band state like
 * dsi_pricing_current. Returns the length written (excluding NUL) or a negative
 * status (DSI_ERANGE when `cap` is too small). */
int dsi_pricing_write_json(dsi_pricing *p, double now, double utilisation, char *buf, size_t cap);
/* The same in a malloc'ed buffer grown to fit (16 KiB, then 16x larger, up
 * to 4 MiB: the text grows with the models): the text, which the caller
 * frees, its length in *len; NULL with the error set. */
char *dsi_pricing_json_text(dsi_pricing *p, double now, double utilisation, int *len);

/* The price applied to one request, for its response's usage when asked:
 * {"model":..,"unit":"per 1M tokens","prices":{class: usd},"multiplier":..,
 *  "window":name|null,"band":name|null,"quoted_at":"ISO time"}.
 * Returns the length written or a negative status. */
int dsi_price_quote_write_json(const dsi_price_quote *q, char *buf, size_t cap);

/* Time helpers: "UTC", "UTC+8", "UTC+08:00", "UTC-05:30", "Z" -> offset in
 * minutes east of UTC. Named zones are rejected (their offsets move). */
int dsi_econ_parse_tz(const char *s, int *offset_min);
/* Unix seconds from "1740628800", "1740628800.5", "2025-02-27T12:00:00+08:00",
 * "2025-02-27T04:00:00Z" or "2025-02-27 04:00" (UTC when no zone). */
int dsi_econ_parse_time(const char *s, double *unix_s);
/* "2025-02-27T04:00:00Z" into buf (>= 32 bytes). */
void dsi_econ_format_time(double unix_s, char *buf, size_t cap);

/* ---- live account -------------------------------------------------------------- */

typedef struct dsi_account dsi_account;

/* Creates an account billing with `pricing` (borrowed; must outlive the
 * account). `journal_path` (may be NULL) is opened for append; every bill and
 * scale event is written as one JSON line and flushed. */
int dsi_account_create(const dsi_pricing *pricing, const char *journal_path, dsi_account **out);
void dsi_account_destroy(dsi_account *a);

/* The account now runs `n_gpus` GPUs (all instances together): GPU time up to
 * `now` is accrued at the previous count. Times earlier than the last event are
 * treated as the last event's time. */
int dsi_account_set_gpus(dsi_account *a, double now, int n_gpus);

/* Bills one finished request at the quote frozen at its admission. `paying`=0
 * counts the tokens (free tier) but earns nothing. *usd_out (may be NULL) gets
 * the charge. */
int dsi_account_bill(dsi_account *a, const dsi_price_quote *q, double now, uint64_t hit_tokens,
                     uint64_t miss_tokens, uint64_t output_tokens, int paying, double *usd_out);

/* Writes a journal line recording the current GPU count at `now` (call it
 * periodically and at shutdown so reports see GPU time up to the end). */
int dsi_account_checkpoint(dsi_account *a, double now);

typedef struct dsi_account_totals {
    uint64_t tokens[DSI_TOK_N];      /* all tokens, paying or not */
    uint64_t paid_tokens[DSI_TOK_N];
    double revenue_usd[DSI_TOK_N];
    double revenue_total_usd;
    double gpu_hours;
    double gpu_cost_usd;
    int gpus;                        /* current count */
    uint64_t requests;
} dsi_account_totals;

/* Totals over all models, GPU time accrued up to `now`. */
int dsi_account_totals_get(dsi_account *a, double now, dsi_account_totals *t);

/* Prometheus text format (version 0.0.4) for GET /metrics: tokens and revenue by
 * model and class, GPU count, GPU hours, cost, margin. Returns the length
 * written or a negative status (DSI_ERANGE when `cap` is too small). */
int dsi_account_write_metrics(dsi_account *a, double now, char *buf, size_t cap);
/* The same in a malloc'ed buffer grown to fit, as dsi_pricing_json_text. */
char *dsi_account_metrics_text(dsi_account *a, double now, int *len);

/* ---- reports from a journal ------------------------------------------------------ */

typedef struct dsi_econ_report {
    double from, to;                 /* the period actually covered */
    uint64_t tokens[DSI_TOK_N];
    uint64_t paid_tokens[DSI_TOK_N];
    double revenue_usd;
    double gpu_hours;
    double cost_usd;
    double margin;                   /* (revenue - cost) / cost; 0 when cost is 0 */
    uint64_t requests;
    uint64_t bad_lines;              /* lines skipped as malformed */
} dsi_econ_report;

/* Sums a journal over [from, to) (use -INFINITY / INFINITY for all of it):
 * revenue of bills whose billing time is in the period, GPU cost of the GPU
 * count step function clipped to the period and to the journal's span. */
int dsi_econ_report_journal(const char *path, double from, double to, dsi_econ_report *r);

/* ---- the calculator: DeepSeek's published day --------------------------------------- */

typedef struct dsi_econ_calc_in {
    double nodes;              /* time-weighted average nodes (226.75) */
    int gpus_per_node;         /* 8 */
    double gpu_cost_per_hour;  /* 2.0 */
    double hours;              /* 24 */
    double tokens[DSI_TOK_N];  /* 342e9 hit, 266e9 miss, 168e9 output */
    double usd_per_mtok[DSI_TOK_N]; /* R1: 0.14, 0.55, 2.19 */
} dsi_econ_calc_in;

typedef struct dsi_econ_calc_out {
    double cost_usd;
    double revenue_usd;
    double revenue_by_class[DSI_TOK_N];
    double margin;             /* (revenue - cost) / cost */
} dsi_econ_calc_out;

/* DeepSeek's published inputs (SYSTEM.md), R1 prices. */
void dsi_econ_calc_deepseek(dsi_econ_calc_in *in);
int dsi_econ_calc(const dsi_econ_calc_in *in, dsi_econ_calc_out *out);

#ifdef __cplusplus
}
#endif
#endif
