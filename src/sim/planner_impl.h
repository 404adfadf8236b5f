/* Internal state of the day simulation (planner.c); shared with config.c. */
#ifndef DSI_SIM_PLANNER_IMPL_H
#define DSI_SIM_PLANNER_IMPL_H

#include "dsinfer/sim.h"

#define SIM_MAX_UNITS 1024
#define SIM_TTFT_BIN 0.05 /* seconds per histogram bin */
#define SIM_TTFT_BINS 2400
#define SIM_DOWN_HYST 0.85 /* remove units only below this share of the up threshold */

typedef struct sim_rng {
    uint64_t s[4];
} sim_rng;

void dsi__rng_seed(sim_rng *r, uint64_t seed);
double dsi__rng_uniform(sim_rng *r);
/* Relative arrival rate at Unix time t (mean 1 over a day). */
double dsi__sim_shape(const dsi_sim_config *c, double t);

enum { EV_ARRIVAL, EV_PREFILL_DONE, EV_DECODE_DONE, EV_PREFILL_READY, EV_DECODE_READY, EV_AUTOSCALE, EV_SAMPLE };
enum { UNIT_OFF, UNIT_STARTING, UNIT_ACTIVE, UNIT_DRAINING };

typedef struct sim_event {
    double t;
    uint64_t seq; /* insertion order breaks ties: determinism */
    int type, idx;
} sim_event;

/* `w` identical requests. Token counts are per request. */
typedef struct sim_bundle {
    double t_arr, w;
    double lin, hit, lout;
    double remaining;             /* miss tokens per request not yet given to a prefill step */
    int inflight;                 /* prefill steps holding a chunk of it */
    double g0;                    /* decode unit position when it joined */
    double price[DSI_TOK_N];      /* USD per M tokens frozen at admission */
    int next;                     /* free list */
} sim_bundle;

typedef struct sim_queue {
    int *v;
    int head, n, cap;
} sim_queue;

typedef struct sim_punit {
    int state, busy;
    double ready_at; /* when a starting unit serves; stale ready events are ignored */
    int *chunks; /* bundles in the running step */
    int n_chunks, cap_chunks;
} sim_punit;

typedef struct sim_dentry {
    double key; /* unit position at which the bundle finishes */
    int b;
} sim_dentry;

typedef struct sim_dunit {
    int state, stepping;
    double ready_at;
    double W;  /* requests */
    double S1; /* sum w * (lin - g0): KV total = S1 + g * W */
    double g;  /* tokens produced per request since the unit started */
    sim_dentry *h;
    int n, cap;
} sim_dunit;

typedef struct sim {
    dsi_sim_config c;
    dsi_sim_result *r;
    sim_rng rng;
    double day0, day1, t_begin, t_acc;
    double *rate; /* requests/s per minute from t_begin */
    int n_min;
    double mean_in, kv_default, fleet_nodes;
    unsigned char offpeak_hour[24];
    sim_event *ev;
    int n_ev, cap_ev;
    uint64_t seq;
    sim_bundle *b;
    int cap_b, free_head;
    sim_queue pq, dq; /* prefill queue, decode wait queue */
    double dq_w; /* requests waiting for a decode unit */
    sim_punit *pu;
    sim_dunit *du;
    int n_pu, n_du;
    double dec_cap, dec_mem_cap; /* requests per decode unit: at the speed target, in memory */
    double dec_cap_tok;          /* output tokens/s of a unit holding dec_cap */
    /* autoscaler window */
    double win_prefill_busy, win_dec_tok;
    int64_t win_ttft[SIM_TTFT_BINS], win_ttft_n;
    /* day statistics */
    double ttft_sum, ttft_n, ttft_hist[SIM_TTFT_BINS];
    double req_s, slow_req_s, step_tok;
    double kv_num, kv_den, tok_arrived, tok_offpeak;
} sim;

#endif
