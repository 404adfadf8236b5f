/* Internal layout of the pricing file, shared by the engine, the account and
 * the simulator. */
#ifndef DSI_ECON_PRICING_IMPL_H
#define DSI_ECON_PRICING_IMPL_H

#include <pthread.h>

#include "dsinfer/econ.h"

#define ECON_MAX_ALIASES 4

typedef struct econ_model {
    char name[DSI_PRICING_NAME_MAX];
    char aliases[ECON_MAX_ALIASES][DSI_PRICING_NAME_MAX];
    int n_aliases;
    double base[DSI_TOK_N]; /* USD per million tokens */
} econ_model;

typedef struct econ_window {
    char name[DSI_PRICING_NAME_MAX];
    int tz_min;                 /* offset east of UTC, minutes */
    int start_local, end_local; /* minutes of day in the window's zone, as written */
    int start_utc, end_utc;     /* same in UTC, 0..1439; end < start wraps midnight */
    double *mult;               /* [n_models] */
    unsigned char *applies;     /* [n_models] */
} econ_window;

typedef struct econ_band {
    char name[DSI_PRICING_NAME_MAX];
    double lo, hi;              /* utilisation [lo, hi) */
    double *mult;               /* [n_models] */
    unsigned char *applies;     /* [n_models] */
} econ_band;

struct dsi_pricing {
    char currency[8];
    char gpu_type[32];
    double gpu_cost_per_hour;
    int gpus_per_node;
    double paying_share;
    double hysteresis;          /* utilisation margin to leave a band */
    double min_hold_s;          /* no band change sooner than this after the last */
    econ_model *models;
    int n_models;
    econ_window *windows;
    int n_windows;
    econ_band *bands;
    int n_bands;
    pthread_mutex_t mu;         /* guards the band state below */
    int band_state;             /* band in force, -1 none */
    double band_since;          /* time of the last band change, -inf if none */
};

/* Index of the time window in force for `model` at `now`, or -1. */
int dsi__pricing_eval_window(const dsi_pricing *p, int model, double now);
/* Advances the band state machine and returns the band and its start time. */
int dsi__pricing_step(dsi_pricing *p, double now, double utilisation, int *band, double *since);

/* A text writer into a caller's fixed buffer (metrics, JSON bodies): stops
 * writing and sets `overflow` when the buffer is full. */
typedef struct dsi_ebuf {
    char *buf;
    size_t cap, len;
    int overflow;
} dsi_ebuf;
void dsi__ebuf_printf(dsi_ebuf *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* fill(ctx, buf, cap) into buffers of 16 KiB, then 16x larger up to 4 MiB,
 * while it answers DSI_ERANGE: the malloc'ed text and its length, or NULL
 * with the error set. */
char *dsi__econ_text(int (*fill)(void *ctx, char *buf, size_t cap), void *ctx, int *len);

#endif
