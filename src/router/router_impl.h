/* Router internals: a growable buffer and the blocking HTTP/1.1 client the
 * router speaks to instances with (one request per connection,
 * "Connection: close"; Content-Length or chunked bodies, read incrementally
 * so an SSE stream can be relayed as it comes). */
#ifndef DSI_ROUTER_IMPL_H
#define DSI_ROUTER_IMPL_H

#include "dsinfer/router.h"

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>

#include "dsinfer/econ.h"

typedef struct dsi_rbuf {
    char *p;
    size_t len, cap;
    int oom;
} dsi_rbuf;

void dsi__rbuf_put(dsi_rbuf *b, const void *s, size_t n);
void dsi__rbuf_printf(dsi_rbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void dsi__rbuf_free(dsi_rbuf *b);

typedef struct dsi_hc {
    int fd;
    int status;              /* HTTP status once the head is read */
    int chunked;
    long long content_left;  /* Content-Length bytes still to come; -1: until EOF */
    long long chunk_left;    /* bytes left in the current chunk; -1: expecting a size line */
    int done;                /* the body ended cleanly */
    char content_type[64];
    char buf[16384];
    size_t blen, bpos;
} dsi_hc;

/* A check the calling thread's reads run at least every 0.2 s while they
 * wait: 1 ends the read with DSI_ECANCELED (abandon it), 2 with DSI_EPEER
 * (the peer is known dead). NULL: none. Thread-local: each request's worker
 * sets its own (its client left, the router stops, its decode instance was
 * marked dead). */
typedef int (*dsi_hc_abort_fn)(void *ctx);
void dsi__hc_set_abort(dsi_hc_abort_fn fn, void *ctx);

/* Connects and sends the request (body may be NULL), with
 * "Authorization: Bearer <bearer>" unless bearer is NULL or empty. */
int dsi__hc_start(dsi_hc *c, const char *host, int port, const char *method, const char *path, const char *body,
                  size_t body_len, const char *bearer, double timeout_s);
/* Reads the status line and headers. */
int dsi__hc_read_head(dsi_hc *c, double timeout_s);
/* Reads body bytes into out (at most cap): > 0 bytes, 0 the body ended
 * cleanly, DSI_ETIMEOUT nothing within timeout_s (try again), other < 0 the
 * connection failed before the body's end. */
long dsi__hc_read_body(dsi_hc *c, char *out, size_t cap, double timeout_s);
/* Reads the whole body (up to max_bytes). */
int dsi__hc_read_all(dsi_hc *c, dsi_rbuf *out, size_t max_bytes, double timeout_s);
void dsi__hc_close(dsi_hc *c);

/* start + head + whole body in one call. */
int dsi__hc_call(const char *host, int port, const char *method, const char *path, const char *body, size_t body_len,
                 const char *bearer, double timeout_s, int *status, dsi_rbuf *out);

#define MAX_INST 64
enum { ROLE_P = 0, ROLE_D = 1 };

/* One instance slot. A request may keep an index across the lock: a slot is
 * reused for another URL only once it has left and nothing of the router's
 * is in it (see dsi__router_add_inst). */
typedef struct inst {
    int used, role;
    int member;                /* in the pool (else standby, or left) */
    int left;                  /* removed by the admin endpoint */
    int wrong_role;            /* its heartbeat reports a role that cannot serve this one */
    int admin_drain;           /* no new requests (admin) */
    int scale_drain;           /* no new requests; back to standby when idle (autoscaler) */
    char url[192], host[128];
    int port;
    dsi_health h;
    /* reported by GET /internal/load */
    int running, waiting, kv_port, max_num_seqs, reported_draining, kv_blocks_total, kv_blocks_used;
    long long kv_tokens;
    /* the router's own account of what it sent and has not seen finish */
    double pend_attn, pend_tokens;
    int inflight;
    double inflight_tokens;
    unsigned long long routed;
} inst;

struct dsi_router {
    dsi_router_opts o;
    pthread_mutex_t pricing_mu; /* the pricing engine's band state (GET /v1/pricing) */
    struct MHD_Daemon *mhd;
    int port;
    pthread_mutex_t mu;        /* guards in[], rr cursors, autoscale state */
    inst in[MAX_INST];
    int n_in;
    unsigned rr[2];
    pthread_t hb;
    int hb_started;
    atomic_int stop;
    dsi_autoscale_state as[2];
    int gpus_recorded;
    dsi_pricing *pricing;
    dsi_account *acct;
    atomic_ulong n_ok, n_client_err, n_err, n_decode_lost, n_retries, n_inflight, xfer_seq;
    atomic_ulong kv_bytes, kv_blocks, kv_skipped; /* from prefill answers */
    atomic_int n_workers;
    atomic_int n_conns;        /* rconns not yet freed: stop waits for MHD to flush them */
};


typedef struct rconn {
    dsi_router *r;
    struct MHD_Connection *mc;
    atomic_int refs;           /* MHD request, worker, streaming response */
    char *body;
    size_t body_len;
    int too_large, chat, started;
    pthread_mutex_t mu;
    int head_ready, status, stream, finished, suspended, client_gone;
    int fd;                    /* the client's socket (valid while the request is suspended) */
    atomic_int watch;          /* the decode instance the worker waits on (-1: none): see worker_abort */
    dsi_rbuf out;
    size_t out_pos;
} rconn;

double dsi__router_wall_now(void);
/* Instance slots (call with r->mu held). */
int dsi__router_add_inst(dsi_router *r, const char *url, int role, int member);
/* url in its one spelling "http://host:port" (see router.c), or an error. */
int dsi__router_canon_url(const char *in, char *out, size_t cap);
int dsi__router_find_inst(dsi_router *r, const char *url, int role);
int dsi__router_routable(const inst *x);
void dsi__router_record_gpus(dsi_router *r);
/* router.c: a request's worker thread (takes the worker's reference to c). */
void *dsi__router_worker(void *arg);
void dsi__rconn_unref(rconn *c);
void dsi__router_fail_request(rconn *c, int status, const char *msg);

#endif
