/* KV block transfer between instances (include/dsinfer/pd.h has the wire).
 *
 * Prefill side (dsi__pd_prefill): a thread per transfer connects to the
 * decode instance (HELLO / SKIP), then submits the request to the scheduler
 * with kv_export and max_tokens 1; each DSI_SCHED_KV event copies the blocks
 * that became final into a queue (on the scheduler thread: a memcpy, never a
 * socket), and the transfer's thread writes them to the decode instance as
 * they come, then the first token, then waits for the ACK and answers the
 * HTTP request (which stays suspended meanwhile: no HTTP thread waits on a
 * socket).
 *
 * Decode side: /internal/decode parks the parsed request under its transfer
 * id (dsi__pd_await); the KV listener accepts one connection per transfer, a
 * thread reads HELLO, answers SKIP (leading blocks this instance or the disk
 * tier holds), collects the blocks into one buffer, and on FIRST submits the
 * request with kv_import, so the scheduler copies the blocks into its pool
 * (and prefix cache) and continues from the first token. A connection that
 * breaks (or brings a bad FIRST) leaves the request parked: a retry from
 * another prefill instance may still come; past the deadline it finishes with
 * 504. Receiver threads are capped (RECEIVERS_PER_SEQ). */
#include "dsinfer/pd.h"
#include "server/server_impl.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* A parked decode request waits this long for its KV. A variable so that a
 * test can lower it before dsi_server_start (each server copies it then). */
double dsi__pd_park_timeout_s = 60.0;
_Static_assert(DSI_PD_MAX_TOP == DSI_SCHED_MAX_TOP_LOGPROBS, "FIRST carries every top alternative");
#define HELLO_WAIT_S 5.0         /* the HELLO may beat /internal/decode by this much */
#define IO_TIMEOUT_S 30.0
/* The prefill side sends its HELLO right after connecting: a connection
 * silent this long is no transfer, and would hold a receiver slot. */
#define HELLO_RECV_S 10.0
/* Receiver threads at most: 4 x max_num_seqs, at least 16. Each holds a
 * thread and a receive buffer the size of the prompt's KV; transfers beyond a
 * few batches' worth could only queue for a sequence slot anyway. Past the
 * cap a connection is refused at once (SKIP EBUSY, then closed): the prefill
 * side fails its handshake before computing anything and answers 502, and
 * the router tries another decode instance. Without it 2,000 idle
 * connections made 2,000 threads. */
#define RECEIVERS_PER_SEQ 4
#define MIN_RECEIVERS 16

typedef struct parked {
    uint64_t xfer;
    dsi_conn *c;                 /* holds the "scheduler's" reference until submitted or failed */
    dsi_request_params p;        /* p.prompt borrows c->rq.prompt */
    double deadline;
    int busy;                    /* a connection is delivering it */
    struct parked *next;
} parked;

struct dsi_pd_state {
    dsi_pd_hashset *held;
    uint64_t fingerprint;
    int n_layers, kv_dim, bt;
    size_t block_bytes;
    int listen_fd, kv_port;
    pthread_t listener;
    int listener_started;
    atomic_int stop;
    atomic_int n_receivers;
    int max_receivers;           /* see RECEIVERS_PER_SEQ */
    double park_timeout_s;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    parked *parked;
    /* receive buffers kept for reuse: a fresh multi-MiB buffer per transfer
     * costs a page fault per 4 KiB, as much as the copy itself */
    pthread_mutex_t buf_mu;
    void *bufs[4];
    size_t buf_cap[4];
    int n_bufs;
};

/* A buffer of at least n bytes (its capacity in *cap): a kept one, or new. */
static void *buf_get(struct dsi_pd_state *pd, size_t n, size_t *cap) {
    pthread_mutex_lock(&pd->buf_mu);
    for (int i = 0; i < pd->n_bufs; i++)
        if (pd->buf_cap[i] >= n) {
            void *b = pd->bufs[i];
            *cap = pd->buf_cap[i];
            pd->bufs[i] = pd->bufs[--pd->n_bufs];
            pd->buf_cap[i] = pd->buf_cap[pd->n_bufs];
            pthread_mutex_unlock(&pd->buf_mu);
            return b;
        }
    pthread_mutex_unlock(&pd->buf_mu);
    *cap = n;
    return malloc(n);
}

/* Keeps a buffer (with its capacity stored just before the data) or frees it. */
static void buf_put(struct dsi_pd_state *pd, void *b, size_t cap) {
    pthread_mutex_lock(&pd->buf_mu);
    if (pd->n_bufs < 4 && !atomic_load(&pd->stop)) {
        pd->bufs[pd->n_bufs] = b;
        pd->buf_cap[pd->n_bufs++] = cap;
        b = NULL;
    }
    pthread_mutex_unlock(&pd->buf_mu);
    free(b);
}

/* dsi_kv_import.release: the data pointer sits 64 bytes into a buffer whose
 * first word holds its capacity. */
static void import_release(void *ctx, void *data) {
    char *base = (char *)data - 64;
    buf_put(ctx, base, *(size_t *)base);
}

/* ---------------------------------------------------------------- shared */

int dsi__pd_prompt_hashes(const dsi_server *s, const int32_t *prompt, int n_prompt, uint64_t *out) {
    int n = n_prompt / DSI_KV_BLOCK_TOKENS;
    uint64_t parent = 0;
    for (int i = 0; i < n; i++)
        parent = out[i] = dsi_prefix_block_hash(parent, s->pd->fingerprint, prompt + (size_t)i * DSI_KV_BLOCK_TOKENS,
                                                DSI_KV_BLOCK_TOKENS);
    return n;
}

int dsi__pd_held_blocks(dsi_server *s, const uint64_t *hashes, int n) {
    if (s->o.no_prefix_cache) return 0;
    return dsi_pd_hashset_leading(s->pd->held, hashes, n);
}

/* The shared disk KV tier (--kv-disk): blocks it holds need not travel, the
 * decode scheduler loads them at admission; if they are gone by then it
 * recomputes them, so this too is only a hint. */
int dsi__pd_disk_has(dsi_server *s, uint64_t hash) { return s->disk ? dsi_kvdisk_contains(s->disk, hash) == 1 : 0; }

int dsi__pd_kv_port(const dsi_server *s) { return s->pd ? s->pd->kv_port : 0; }

/* ---------------------------------------------------------------- prefill side */

typedef struct msg {
    struct msg *next;
    uint32_t type;
    size_t hdr_len, len;
    union { dsi_pd_block b; dsi_pd_first f; } h;
    char data[];
} msg;

typedef struct pf_job {
    dsi_server *s;
    dsi_conn *c;                 /* one reference, dropped by the sender */
    int fd;
    char host[256];              /* the decode instance */
    int port;
    uint64_t xfer;
    uint32_t skip, n_blocks, queued_upto;
    int n_hashes;
    uint64_t *hashes;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    msg *head, *tail;
    int done;                    /* FINISH seen */
    int ok;                      /* FINISH was a success and FIRST is queued */
    char err[256];
    int32_t token;
    float logprob;
    uint64_t rng;
    int n_top;
    int32_t top_ids[DSI_PD_MAX_TOP];
    float top_lp[DSI_PD_MAX_TOP];
    int got_token, cached_tokens, n_prompt;
    atomic_int refs;             /* scheduler (until FINISH) + sender */
    double t0;
} pf_job;

static void job_unref(pf_job *j) {
    if (atomic_fetch_sub(&j->refs, 1) != 1) return;
    for (msg *m = j->head, *nx; m; m = nx) { nx = m->next; free(m); }
    free(j->hashes);
    pthread_mutex_destroy(&j->mu);
    pthread_cond_destroy(&j->cv);
    free(j);
}

static void enqueue(pf_job *j, msg *m) {
    m->next = NULL;
    if (j->tail) j->tail->next = m; else j->head = m;
    j->tail = m;
}

/* Scheduler thread: copy blocks out, note the token, queue FIRST. */
static int pf_on_event(void *user, const dsi_sched_event *ev) {
    pf_job *j = user;
    struct dsi_pd_state *pd = j->s->pd;
    if (ev->type == DSI_SCHED_KV) {
        pthread_mutex_lock(&j->mu);
        for (uint32_t i = DSI_MAX(j->queued_upto, j->skip); i < (uint32_t)ev->kv_n_blocks; i++) {
            msg *m = malloc(sizeof *m + pd->block_bytes);
            if (!m) { snprintf(j->err, sizeof j->err, "out of memory"); break; }
            m->type = DSI_PD_BLOCK;
            m->h.b = (dsi_pd_block){i, (uint32_t)pd->n_layers, (uint32_t)pd->bt, (uint32_t)pd->kv_dim};
            m->hdr_len = sizeof m->h.b;
            m->len = pd->block_bytes;
            memcpy(m->data, dsi_kv_block_data(j->s->kv, ev->kv_blocks[i]), pd->block_bytes);
            enqueue(j, m);
        }
        if ((uint32_t)ev->kv_n_blocks > j->queued_upto) j->queued_upto = ev->kv_n_blocks;
        pthread_cond_signal(&j->cv);
        pthread_mutex_unlock(&j->mu);
        return 0;
    }
    if (ev->type == DSI_SCHED_TOKEN) {
        j->token = ev->token;
        j->logprob = ev->logprob;
        j->rng = ev->sampler_rng;
        j->n_top = DSI_MIN(ev->n_top, DSI_PD_MAX_TOP);
        for (int i = 0; i < j->n_top; i++) {
            j->top_ids[i] = ev->top_ids[i];
            j->top_lp[i] = ev->top_logprobs[i];
        }
        j->got_token = 1;
        return 0;
    }
    pthread_mutex_lock(&j->mu);
    j->cached_tokens = ev->cached_tokens;
    int ok = (ev->finish == DSI_FINISH_LENGTH || ev->finish == DSI_FINISH_STOP) && j->got_token &&
             j->queued_upto == j->n_blocks;
    if (ok) {
        msg *m = malloc(sizeof *m);
        if (m) {
            m->type = DSI_PD_FIRST;
            m->h.f = (dsi_pd_first){.token = j->token, .logprob = j->logprob, .sampler_rng = j->rng,
                                    .cached_tokens = (uint32_t)ev->cached_tokens, .n_top = (uint32_t)j->n_top};
            memcpy(m->h.f.top_ids, j->top_ids, sizeof j->top_ids);
            memcpy(m->h.f.top_logprobs, j->top_lp, sizeof j->top_lp);
            m->hdr_len = sizeof m->h.f;
            m->len = 0;
            enqueue(j, m);
        } else ok = 0;
    }
    if (!ok && !j->err[0])
        snprintf(j->err, sizeof j->err, "prefill did not complete: %s", ev->message ? ev->message : "no first token");
    j->ok = ok;
    j->done = 1;
    pthread_cond_signal(&j->cv);
    pthread_mutex_unlock(&j->mu);
    job_unref(j); /* the scheduler's */
    return 0;
}

static void pf_answer(pf_job *j, int status, uint64_t bytes, double secs) {
    dsi_conn *c = j->c;
    dsi__conn_unregister(c);
    pthread_mutex_lock(&c->mu);
    dsi__sbuf_reset(&c->out);
    if (status == 200) {
        dsi__sbuf_printf(&c->out,
                         "{\"first_token\":%d,\"prompt_tokens\":%d,\"cached_tokens\":%d,\"blocks\":%u,"
                         "\"skipped_blocks\":%u,\"transfer_bytes\":%llu,\"prefill_s\":%.6f}",
                         j->token, j->n_prompt, j->cached_tokens, j->n_blocks, j->skip, (unsigned long long)bytes,
                         secs);
    } else {
        dsi__api_error_json(&c->out, status, j->err[0] ? j->err : "kv transfer failed", NULL);
    }
    c->final_status = c->out.oom ? 500 : status;
    c->finished = 1;
    dsi__conn_wake(c);
    pthread_mutex_unlock(&c->mu);
}

static void *pf_sender(void *arg) {
    pf_job *j = arg;
    int failed = 0;
    uint64_t bytes = 0;
    for (;;) {
        pthread_mutex_lock(&j->mu);
        while (!j->head && !j->done) pthread_cond_wait(&j->cv, &j->mu);
        msg *m = j->head;
        if (m) {
            j->head = m->next;
            if (!j->head) j->tail = NULL;
        }
        int done = j->done && !m;
        pthread_mutex_unlock(&j->mu);
        if (done) break;
        if (!failed && dsi_pd_send_msg(j->fd, m->type, &m->h, m->hdr_len, m->data, m->len)) {
            failed = 1;
            pthread_mutex_lock(&j->mu);
            snprintf(j->err, sizeof j->err, "decode instance: %s", dsi_last_error());
            pthread_mutex_unlock(&j->mu);
            dsi_sched_cancel(j->s->sched, j->c->sched_id); /* nobody will take this KV */
        }
        bytes += m->len;
        free(m);
    }
    int status = 502;
    if (!failed && j->ok) {
        uint32_t type;
        uint64_t len;
        dsi_pd_ack ack;
        if (dsi_pd_recv_hdr(j->fd, &type, &len, IO_TIMEOUT_S) || type != DSI_PD_ACK || len != sizeof ack ||
            dsi_pd_recv_all(j->fd, &ack, sizeof ack, IO_TIMEOUT_S))
            snprintf(j->err, sizeof j->err, "decode instance: no acknowledgement (%s)", dsi_last_error());
        else if (ack.status != DSI_OK)
            snprintf(j->err, sizeof j->err, "decode instance refused the request (%s)", dsi_status_name(ack.status));
        else
            status = 200;
    }
    close(j->fd);
    if (status == 200) /* these blocks are now in this instance's prefix cache */
        for (int i = 0; i < j->n_hashes; i++) dsi_pd_hashset_add(j->s->pd->held, j->hashes[i]);
    pf_answer(j, status, bytes, dsi_now() - j->t0);
    dsi_conn *c = j->c;
    job_unref(j);
    dsi__conn_unref(c);
    return NULL;
}

/* Connects to the decode instance and exchanges HELLO / SKIP: before
 * computing, the decode side says which leading blocks it already holds. */
static int pf_handshake(pf_job *j) {
    struct dsi_pd_state *pd = j->s->pd;
    int rc = dsi_pd_connect(j->host, j->port, 2.0, &j->fd);
    dsi_pd_hello h = {j->xfer, pd->fingerprint, (uint32_t)j->n_prompt, j->n_blocks, (uint32_t)pd->n_layers,
                      (uint32_t)pd->bt, (uint32_t)pd->kv_dim, (uint32_t)j->n_hashes};
    if (!rc) rc = dsi_pd_send_msg(j->fd, DSI_PD_HELLO, &h, sizeof h, j->hashes, sizeof(uint64_t) * j->n_hashes);
    uint32_t type;
    uint64_t len;
    dsi_pd_skip sk = {0};
    if (!rc) rc = dsi_pd_recv_hdr(j->fd, &type, &len, HELLO_WAIT_S + 5);
    if (!rc && (type != DSI_PD_SKIP || len != sizeof sk)) rc = dsi_error(DSI_EFORMAT, "kv transfer: expected SKIP");
    if (!rc) rc = dsi_pd_recv_all(j->fd, &sk, sizeof sk, IO_TIMEOUT_S);
    if (!rc && sk.status != DSI_OK)
        rc = dsi_error(DSI_EPEER, "decode instance refused the transfer (%s)", dsi_status_name(sk.status));
    if (!rc && sk.skip_blocks > (uint32_t)j->n_hashes) rc = dsi_error(DSI_EFORMAT, "kv transfer: bad SKIP");
    if (rc) return dsi_error_prefix(rc, "decode instance %s:%d", j->host, j->port);
    j->skip = sk.skip_blocks;
    j->queued_upto = j->skip;
    return DSI_OK;
}

/* The transfer's thread: the handshake, the prefill's submission, then the
 * sender loop. All of it off the HTTP threads: a decode address that accepts
 * and never answers held an HTTP thread (and every request queued on it) for
 * the handshake's 10 s. */
static void *pf_thread(void *arg) {
    pf_job *j = arg;
    dsi_conn *c = j->c;
    int rc = pf_handshake(j), status = 502;
    if (!rc) {
        /* max_tokens 1, no stop ids: the first token always comes back, the
         * decode side applies the request's own stops to it */
        const dsi_api_req *r = &c->rq;
        dsi_request_params p = {.prompt = r->prompt, .n_prompt = (int)r->n_prompt, .max_tokens = 1,
                                .sampling = r->sampling, .logprobs = r->logprobs, .top_logprobs = r->top_logprobs,
                                .kv_export = 1};
        atomic_fetch_add(&j->refs, 1); /* the scheduler's */
        pthread_mutex_lock(&c->mu);
        /* a client gone during the handshake: its cancel went to no request */
        rc = c->cancel_sent ? dsi_error(DSI_ECANCELED, "the client went away")
                            : dsi_sched_submit(j->s->sched, &p, pf_on_event, j, &c->sched_id);
        pthread_mutex_unlock(&c->mu);
        if (rc) {
            atomic_fetch_sub(&j->refs, 1); /* never the last: this thread holds one */
            status = rc == DSI_EBUSY ? 429 : rc == DSI_ECANCELED ? 503 : rc == DSI_EINVAL ? 400 : 502;
        }
    }
    if (rc) {
        snprintf(j->err, sizeof j->err, "%s", dsi_last_error());
        if (j->fd >= 0) close(j->fd);
        pf_answer(j, status, 0, dsi_now() - j->t0);
        job_unref(j);
        dsi__conn_unref(c);
        return NULL;
    }
    return pf_sender(j);
}

int dsi__pd_prefill(dsi_conn *c, const char *decode, uint64_t xfer) {
    dsi_server *s = c->srv;
    struct dsi_pd_state *pd = s->pd;
    dsi_api_req *r = &c->rq;
    int rc;
    pf_job *j = calloc(1, sizeof *j);
    if (!j) return dsi_error(DSI_ENOMEM, "out of memory");
    if ((rc = dsi_pd_split_hostport(decode, j->host, sizeof j->host, &j->port))) {
        free(j);
        return rc;
    }
    j->s = s;
    j->c = c;
    j->fd = -1;
    j->xfer = xfer;
    j->n_prompt = (int)r->n_prompt;
    j->n_blocks = DSI_CEIL_DIV((int)r->n_prompt, pd->bt);
    j->hashes = malloc(sizeof(uint64_t) * (r->n_prompt / pd->bt + 1));
    j->t0 = dsi_now();
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    atomic_init(&j->refs, 1); /* the thread's */
    if (!j->hashes) { job_unref(j); return dsi_error(DSI_ENOMEM, "out of memory"); }
    j->n_hashes = dsi__pd_prompt_hashes(s, r->prompt, (int)r->n_prompt, j->hashes);
    atomic_fetch_add(&c->refs, 1); /* the job's */
    pthread_mutex_lock(&c->mu);
    c->state = DSI_CONN_WAIT; /* answered by pf_answer, however the transfer ends */
    pthread_mutex_unlock(&c->mu);
    /* watched for a hang-up like any request: a router whose client left
     * closes this connection, and the prefill must stop (it ran to its end,
     * holding its KV blocks and, through the transfer, the decode side's
     * parked request) */
    dsi__conn_register(c);
    pthread_t t;
    if (pthread_create(&t, NULL, pf_thread, j) != 0) {
        dsi__conn_unregister(c);
        pthread_mutex_lock(&c->mu);
        c->state = DSI_CONN_NEW;
        pthread_mutex_unlock(&c->mu);
        atomic_fetch_sub(&c->refs, 1);
        job_unref(j);
        return dsi_error(DSI_EBUSY, "cannot start a kv transfer thread");
    }
    pthread_detach(t);
    return DSI_OK;
}

/* ---------------------------------------------------------------- decode side */

/* Ends a parked request that will never reach the scheduler; http_status 0
 * answers as any failed request does (500, or 503 when cancelled). */
static void park_fail(parked *pk, dsi_finish_reason why, int status, int http_status, const char *message) {
    dsi_sched_event ev = {.type = DSI_SCHED_FINISH, .finish = why, .status = status, .message = message,
                          .prompt_tokens = pk->p.n_prompt};
    pthread_mutex_lock(&pk->c->mu);
    pk->c->fail_status = http_status;
    pthread_mutex_unlock(&pk->c->mu);
    dsi__conn_on_event(pk->c, &ev);
    free(pk);
}

int dsi__pd_await(dsi_conn *c, const dsi_request_params *p) {
    dsi_server *s = c->srv;
    struct dsi_pd_state *pd = s->pd;
    if (!pd || pd->listen_fd < 0) return dsi_error(DSI_EINVAL, "this instance takes no KV transfers (role prefill)");
    parked *pk = calloc(1, sizeof *pk);
    if (!pk) return dsi_error(DSI_ENOMEM, "out of memory");
    pk->xfer = c->pd_xfer;
    pk->c = c;
    pk->p = *p;
    pk->deadline = dsi_now() + pd->park_timeout_s;
    pthread_mutex_lock(&pd->mu);
    for (parked *q = pd->parked; q; q = q->next)
        if (q->xfer == pk->xfer) {
            pthread_mutex_unlock(&pd->mu);
            free(pk);
            return dsi_error(DSI_EINVAL, "transfer %llx is already waiting", (unsigned long long)c->pd_xfer);
        }
    pk->next = pd->parked;
    pd->parked = pk;
    pthread_cond_broadcast(&pd->cv);
    pthread_mutex_unlock(&pd->mu);
    return DSI_OK;
}

static parked *claim(struct dsi_pd_state *pd, uint64_t xfer, double wait_s) {
    double end = dsi_now() + wait_s;
    pthread_mutex_lock(&pd->mu);
    for (;;) {
        for (parked *q = pd->parked; q; q = q->next)
            if (q->xfer == xfer && !q->busy) {
                q->busy = 1;
                pthread_mutex_unlock(&pd->mu);
                return q;
            }
        if (dsi_now() >= end || atomic_load(&pd->stop)) break;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 20 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
        pthread_cond_timedwait(&pd->cv, &pd->mu, &ts);
    }
    pthread_mutex_unlock(&pd->mu);
    return NULL;
}

static void unpark(struct dsi_pd_state *pd, parked *pk) {
    pthread_mutex_lock(&pd->mu);
    for (parked **pp = &pd->parked; *pp; pp = &(*pp)->next)
        if (*pp == pk) { *pp = pk->next; break; }
    pthread_mutex_unlock(&pd->mu);
}

static void release_claim(struct dsi_pd_state *pd, parked *pk) {
    pthread_mutex_lock(&pd->mu);
    pk->busy = 0;
    pthread_mutex_unlock(&pd->mu);
}

static void send_skip(int fd, int status, uint32_t skip) {
    dsi_pd_skip sk = {status, skip};
    dsi_pd_send_msg(fd, DSI_PD_SKIP, &sk, sizeof sk, NULL, 0);
}

typedef struct rx_arg { dsi_server *s; int fd; } rx_arg;

/* One incoming transfer. */
static void *receiver(void *arg) {
    rx_arg *a = arg;
    dsi_server *s = a->s;
    struct dsi_pd_state *pd = s->pd;
    int fd = a->fd;
    free(a);
    uint32_t type;
    uint64_t len;
    dsi_pd_hello h;
    uint64_t *hashes = NULL;
    char *data = NULL;
    uint8_t *have = NULL;
    parked *pk = NULL;
    if (dsi_pd_recv_hdr(fd, &type, &len, HELLO_RECV_S) || type != DSI_PD_HELLO || len < sizeof h ||
        dsi_pd_recv_all(fd, &h, sizeof h, IO_TIMEOUT_S) || len != sizeof h + sizeof(uint64_t) * (uint64_t)h.n_hashes ||
        h.n_hashes > h.n_blocks || h.n_blocks > (1u << 22))
        goto out;
    hashes = malloc(sizeof(uint64_t) * (h.n_hashes + 1));
    if (!hashes || dsi_pd_recv_all(fd, hashes, sizeof(uint64_t) * h.n_hashes, IO_TIMEOUT_S)) goto out;
    if (h.fingerprint != pd->fingerprint || h.n_layers != (uint32_t)pd->n_layers || h.kv_dim != (uint32_t)pd->kv_dim ||
        h.block_tokens != (uint32_t)pd->bt || h.n_blocks != (uint32_t)DSI_CEIL_DIV((int)h.n_prompt, pd->bt)) {
        send_skip(fd, DSI_EINVAL, 0);
        goto out;
    }
    if (!(pk = claim(pd, h.xfer_id, HELLO_WAIT_S))) { send_skip(fd, DSI_ENOTFOUND, 0); goto out; }
    if (h.n_prompt != (uint32_t)pk->p.n_prompt) { send_skip(fd, DSI_EINVAL, 0); goto out; }
    uint32_t skip = dsi__pd_held_blocks(s, hashes, h.n_hashes);
    while (skip < h.n_hashes && !s->o.no_prefix_cache && dsi__pd_disk_has(s, hashes[skip])) skip++;
    /* the scheduler looks on disk for at most (n - 1) / 64 blocks: never skip past that */
    if (skip > 0 && skip > (h.n_prompt - 1) / (uint32_t)pd->bt) skip = (h.n_prompt - 1) / (uint32_t)pd->bt;
    uint32_t n_data = h.n_blocks - skip, got = 0;
    size_t cap;
    char *base = buf_get(pd, 64 + pd->block_bytes * (n_data ? n_data : 1), &cap);
    if (base) *(size_t *)base = cap;
    data = base ? base + 64 : NULL;
    have = calloc(n_data + 1, 1);
    if (!data || !have) { send_skip(fd, DSI_ENOMEM, 0); goto out; }
    send_skip(fd, DSI_OK, skip);
    for (;;) {
        if (dsi_pd_recv_hdr(fd, &type, &len, IO_TIMEOUT_S)) goto out;
        if (type == DSI_PD_BLOCK) {
            dsi_pd_block b;
            if (len != sizeof b + pd->block_bytes || dsi_pd_recv_all(fd, &b, sizeof b, IO_TIMEOUT_S) ||
                b.index < skip || b.index >= h.n_blocks)
                goto out;
            if (dsi_pd_recv_all(fd, data + (size_t)(b.index - skip) * pd->block_bytes, pd->block_bytes, IO_TIMEOUT_S))
                goto out;
            if (!have[b.index - skip]) { have[b.index - skip] = 1; got++; }
            continue;
        }
        if (type != DSI_PD_FIRST || len != sizeof(dsi_pd_first)) goto out;
        dsi_pd_first f;
        if (dsi_pd_recv_all(fd, &f, sizeof f, IO_TIMEOUT_S) || got != n_data) goto out;
        if (f.cached_tokens > h.n_prompt) {
            /* a peer's bad count made usage report a negative miss; refused
             * like any bad transfer, the request stays parked for a retry */
            DSI_LOG_WARN("kv transfer %llx: FIRST reports %u cached tokens of a %u-token prompt; refused",
                         (unsigned long long)h.xfer_id, f.cached_tokens, h.n_prompt);
            dsi_pd_ack nak = {DSI_EINVAL, 0};
            dsi_pd_send_msg(fd, DSI_PD_ACK, &nak, sizeof nak, NULL, 0);
            goto out;
        }
        /* all here: hand the request to the scheduler */
        dsi_kv_import imp = {data, import_release, pd, (int)skip, (int)n_data, f.token, f.logprob, f.sampler_rng,
                             (int)f.cached_tokens, (int)DSI_MIN(f.n_top, DSI_PD_MAX_TOP), {0}, {0}};
        memcpy(imp.top_ids, f.top_ids, sizeof imp.top_ids);
        memcpy(imp.top_logprobs, f.top_logprobs, sizeof imp.top_logprobs);
        dsi_request_params p = pk->p;
        p.kv_import = &imp;
        unpark(pd, pk);
        dsi_conn *c = pk->c;
        pthread_mutex_lock(&c->mu);
        int cancelled = c->cancel_sent;
        int rc = cancelled ? DSI_ECANCELED : dsi_sched_submit(s->sched, &p, dsi__conn_on_event, c, &c->sched_id);
        char why[256];
        snprintf(why, sizeof why, "%s", rc ? dsi_last_error() : "");
        pthread_mutex_unlock(&c->mu);
        if (rc == DSI_OK) {
            data = NULL; /* the scheduler's now */
            for (uint32_t i = 0; i < h.n_hashes; i++) dsi_pd_hashset_add(pd->held, hashes[i]);
            free(pk);
        } else {
            park_fail(pk, cancelled ? DSI_FINISH_CANCELLED : DSI_FINISH_ERROR, rc, 0, cancelled ? "cancelled" : why);
        }
        pk = NULL;
        dsi_pd_ack ack = {rc, 0};
        dsi_pd_send_msg(fd, DSI_PD_ACK, &ack, sizeof ack, NULL, 0);
        break;
    }
out:
    if (pk) release_claim(pd, pk); /* stays parked: another prefill instance may retry */
    free(hashes);
    if (data) import_release(pd, data);
    free(have);
    close(fd);
    atomic_fetch_sub(&pd->n_receivers, 1);
    return NULL;
}

/* Finishes parked requests past their deadline or whose client left. */
static void reap(dsi_server *s, int all) {
    struct dsi_pd_state *pd = s->pd;
    double now = dsi_now();
    for (;;) {
        parked *victim = NULL;
        pthread_mutex_lock(&pd->mu);
        for (parked **pp = &pd->parked; *pp; pp = &(*pp)->next) {
            parked *q = *pp;
            pthread_mutex_lock(&q->c->mu);
            int gone = q->c->cancel_sent;
            pthread_mutex_unlock(&q->c->mu);
            if (!q->busy && (all || gone || now > q->deadline)) {
                *pp = q->next;
                victim = q;
                break;
            }
        }
        pthread_mutex_unlock(&pd->mu);
        if (!victim) return;
        pthread_mutex_lock(&victim->c->mu);
        int gone = victim->c->cancel_sent;
        pthread_mutex_unlock(&victim->c->mu);
        /* 504: the upstream (prefill) instance never delivered; 503 at
         * shutdown, as a request arriving while draining gets */
        if (gone) park_fail(victim, DSI_FINISH_CANCELLED, DSI_ECANCELED, 0, "cancelled");
        else if (all) park_fail(victim, DSI_FINISH_ERROR, DSI_ECANCELED, 503, "the server is shutting down");
        else park_fail(victim, DSI_FINISH_ERROR, DSI_ETIMEOUT, 504,
                       "the KV cache from the prefill instance never arrived");
    }
}

static void *listener(void *arg) {
    dsi_server *s = arg;
    struct dsi_pd_state *pd = s->pd;
    while (!atomic_load(&pd->stop)) {
        struct pollfd pf = {.fd = pd->listen_fd, .events = POLLIN};
        int pr = poll(&pf, 1, 200);
        if (pr > 0) {
            int fd = accept(pd->listen_fd, NULL, NULL);
            if (fd >= 0 && atomic_load(&pd->n_receivers) >= pd->max_receivers) {
                send_skip(fd, DSI_EBUSY, 0); /* a fresh socket's buffer takes it without blocking */
                close(fd);
            } else if (fd >= 0) {
                rx_arg *a = malloc(sizeof *a);
                pthread_t t;
                if (a) {
                    a->s = s;
                    a->fd = fd;
                    atomic_fetch_add(&pd->n_receivers, 1);
                    if (pthread_create(&t, NULL, receiver, a) == 0) pthread_detach(t);
                    else { atomic_fetch_sub(&pd->n_receivers, 1); free(a); close(fd); }
                } else close(fd);
            }
        }
        reap(s, 0);
    }
    return NULL;
}

/* ---------------------------------------------------------------- lifecycle */

void dsi__pd_wait_parked(dsi_server *s, double timeout_s) {
    struct dsi_pd_state *pd = s->pd;
    if (!pd) return;
    double end = dsi_now() + timeout_s;
    for (;;) {
        pthread_mutex_lock(&pd->mu);
        int any = pd->parked != NULL;
        pthread_mutex_unlock(&pd->mu);
        if (!any || dsi_now() >= end) return;
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

int dsi__pd_start(dsi_server *s) {
    struct dsi_pd_state *pd = calloc(1, sizeof *pd);
    if (!pd) return dsi_error(DSI_ENOMEM, "out of memory");
    s->pd = pd;
    pd->listen_fd = -1;
    pd->park_timeout_s = dsi__pd_park_timeout_s;
    pthread_mutex_init(&pd->mu, NULL);
    pthread_mutex_init(&pd->buf_mu, NULL);
    pthread_cond_init(&pd->cv, NULL);
    pd->fingerprint = dsi_model_fingerprint(s->model);
    pd->n_layers = dsi_kv_n_layers(s->kv);
    pd->kv_dim = dsi_kv_dim(s->kv);
    pd->bt = dsi_kv_block_tokens(s->kv);
    pd->block_bytes = dsi_kv_block_bytes(s->kv);
    int rc = dsi_pd_hashset_create(dsi_kv_n_blocks(s->kv), &pd->held);
    if (rc) return rc;
    if (s->o.role == DSI_ROLE_PREFILL) return DSI_OK;
    pd->max_receivers = DSI_MAX(MIN_RECEIVERS, RECEIVERS_PER_SEQ * (s->o.max_num_seqs > 0 ? s->o.max_num_seqs : 64));
    if ((rc = dsi_pd_listen(s->o.host, s->o.kv_port, &pd->listen_fd, &pd->kv_port))) return rc;
    if (pthread_create(&pd->listener, NULL, listener, s) != 0)
        return dsi_error(DSI_ENOMEM, "cannot start the KV listener thread");
    pd->listener_started = 1;
    return DSI_OK;
}

void dsi__pd_stop(dsi_server *s) {
    struct dsi_pd_state *pd = s->pd;
    if (!pd || atomic_exchange(&pd->stop, 1)) return;
    if (pd->listener_started) pthread_join(pd->listener, NULL);
    if (pd->listen_fd >= 0) close(pd->listen_fd);
    /* receivers end within their I/O timeouts; wait for them briefly */
    double end = dsi_now() + 2.0;
    while (atomic_load(&pd->n_receivers) > 0 && dsi_now() < end) {
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (pd->held && s->sched) reap(s, 1);
}

void dsi__pd_free(dsi_server *s) {
    struct dsi_pd_state *pd = s->pd;
    if (!pd) return;
    dsi__pd_stop(s);
    if (atomic_load(&pd->n_receivers) == 0) {
        dsi_pd_hashset_destroy(pd->held);
        for (int i = 0; i < pd->n_bufs; i++) free(pd->bufs[i]);
        pthread_mutex_destroy(&pd->buf_mu);
        pthread_mutex_destroy(&pd->mu);
        pthread_cond_destroy(&pd->cv);
        free(pd);
    } /* else: a receiver stuck in I/O still uses it; leak it at exit rather than crash */
    s->pd = NULL;
}
