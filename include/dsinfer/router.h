/* dsinfer/router.h - the public endpoint in front of prefill and decode
 * instances (dsinfer router), with DeepSeek's prefill and decode load
 * balancers, instance health, and an autoscaling policy.
 *
 * The policies are pure functions of reported loads and the request, so the
 * tests and simulations run the same code the router runs:
 *
 *     dsi_lb_inst p[4];                       // one per prefill instance
 *     ... p[i].eligible, attn_load, input_tokens, cached_tokens ...
 *     int i = dsi_lb_pick_prefill(p, 4, n_prompt);
 *     p[i].attn_load += dsi_lb_attn_work(p[i].cached_tokens, n_prompt - p[i].cached_tokens);
 *
 *     dsi_router *r;
 *     dsi_router_opts o = dsi_router_default_opts();
 *     o.prefill = urls; o.n_prefill = 2; o.decode = ...; o.n_decode = 2;
 *     if (dsi_router_start(&o, &r) != DSI_OK) die(dsi_last_error());
 *     ...
 *     dsi_router_stop(r);
 */
#ifndef DSINFER_ROUTER_H
#define DSINFER_ROUTER_H

#include "dsinfer/common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- load balancers (pure) ---------------------------------------------------- */

/* One instance as a balancer sees it. Loads are "live": what the instance
 * reported at its last heartbeat plus what the router sent it since and has
 * not seen finish. */
typedef struct dsi_lb_inst {
    int eligible;           /* in the pool, alive, not draining */
    /* prefill */
    double attn_load;       /* core-attention work queued: sum of n*(c + n/2) */
    double input_tokens;    /* uncached input tokens queued */
    int cached_tokens;      /* per request: leading prompt tokens this instance holds */
    /* decode */
    double kv_tokens;       /* KV tokens held */
    double n_requests;      /* requests held */
} dsi_lb_inst;

/* Core-attention work of prefilling n_new tokens after `cached` cached ones:
 * each new token attends to the cached prefix and to the new tokens before
 * it, n*(c + n/2) token pairs. */
double dsi_lb_attn_work(int cached, int n_new);

/* Prefill LB: the eligible instance that leaves core-attention work and input
 * tokens most evenly spread (the least sum of its two loads after placement,
 * each relative to the mean); an instance holding the prompt's prefix
 * brings less work, so it wins unless it is already the busier one.
 * Returns the index, or -1 when none is eligible. */
int dsi_lb_pick_prefill(const dsi_lb_inst *inst, int n, int n_prompt);

/* Decode LB: the eligible instance that leaves KV tokens held and request
 * counts most evenly spread, for a request that will hold n_tokens. */
int dsi_lb_pick_decode(const dsi_lb_inst *inst, int n, int n_tokens);

/* Round-robin over eligible instances (the baseline). *cursor advances. */
int dsi_lb_pick_round_robin(const dsi_lb_inst *inst, int n, unsigned *cursor);

/* ---- health -------------------------------------------------------------------- */

typedef enum dsi_inst_state {
    DSI_INST_JOINING = 0,   /* added, not heard from yet */
    DSI_INST_UP,
    DSI_INST_SUSPECT,       /* missed at least one heartbeat */
    DSI_INST_DEAD,          /* missed miss_limit in a row: out of the pool until it answers again */
} dsi_inst_state;

typedef struct dsi_health {
    dsi_inst_state state;
    int misses;             /* consecutive */
    double last_ok;         /* time of the last answer */
} dsi_health;

/* Feeds one heartbeat outcome. Returns 1 when the state changed. */
int dsi_health_observe(dsi_health *h, int ok, double now, int miss_limit);
/* UP or SUSPECT: may take new requests (a failed request marks it suspect at once). */
int dsi_health_routable(const dsi_health *h);
const char *dsi_inst_state_name(dsi_inst_state s);

/* ---- autoscaling policy ----------------------------------------------------------- */

typedef struct dsi_autoscale_policy {
    double up_util;         /* scale up when utilisation stays above this ... */
    double down_util;       /* ... down when it stays below this (hysteresis: down < up) */
    double hold_s;          /* ... for this long */
    double cooldown_s;      /* no change within this long of the previous one */
    int min_instances, max_instances;
} dsi_autoscale_policy;

typedef struct dsi_autoscale_state {
    double above_since, below_since; /* -1: not currently */
    double last_change;
} dsi_autoscale_state;

void dsi_autoscale_init(dsi_autoscale_state *st);
/* +1 (add an instance), -1 (drain one) or 0, for one role with `active`
 * instances and `standby` ones available, at utilisation `util` (0..1+:
 * queued + running requests over batch slots, or KV use, whichever is higher). */
int dsi_autoscale_decide(const dsi_autoscale_policy *p, dsi_autoscale_state *st, double now, double util, int active,
                         int standby);

/* ---- the router process ------------------------------------------------------------ */

typedef enum { DSI_LB_DEEPSEEK = 0, DSI_LB_ROUND_ROBIN = 1 } dsi_lb_kind;

typedef struct dsi_router_opts {
    const char *host;                 /* default 127.0.0.1 */
    int port;                         /* 0: any free port */
    const char *const *prefill;       /* instance URLs (http://host:port), borrowed */
    int n_prefill;
    const char *const *decode;
    int n_decode;
    const char *const *standby_prefill; /* started but not in the pool: the autoscaler's reserve */
    int n_standby_prefill;
    const char *const *standby_decode;
    int n_standby_decode;
    dsi_lb_kind lb;
    double heartbeat_s;               /* 0: 0.2 */
    int miss_limit;                   /* 0: 3 */
    int max_prefill_attempts;         /* 0: 3 (first try + retries on other instances) */
    int autoscale;                    /* 1: run the policy below on every heartbeat */
    dsi_autoscale_policy policy;      /* zeros: 0.8 / 0.3, hold 2 s, cooldown 5 s, 1..all */
    int gpus_per_instance;            /* 0: 8 (GPU-hours for the cost account) */
    const char *pricing_path;         /* NULL: built-in $2/GPU-hour */
    const char *journal_path;         /* econ journal (may be NULL) */
    int http_threads;                 /* 0: 2 */
    const char *api_key;              /* NULL or "": open. Else required from clients on /v1/ and
                                         /admin/ paths, and sent to the instances (started with the
                                         same --api-key, which guards their /internal/ paths too) */
} dsi_router_opts;

typedef struct dsi_router dsi_router;

dsi_router_opts dsi_router_default_opts(void);
int dsi_router_start(const dsi_router_opts *o, dsi_router **out);
int dsi_router_port(const dsi_router *r);
/* Stops listening, ends in-flight requests, frees. NULL is a no-op. */
void dsi_router_stop(dsi_router *r);

#ifdef __cplusplus
}
#endif
#endif
