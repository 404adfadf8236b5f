/* MPI transport, optionally behind an emulated link.
 *
 * The emulation is on the sender: a message "leaves" when the link has sent
 * every earlier message and its own bytes (bytes / bandwidth), and is handed
 * to MPI latency later. Sends wait in a FIFO until progress() (called at
 * every poll) finds their release time passed, so the receiver sees data no
 * earlier than an inter-node link would deliver it. Release times grow with
 * posting order, so the FIFO keeps MPI's per-peer message order. */
#include "ep/transport.h"
#include "dsinfer/common.h"

#include <mpi.h>
#include <stdlib.h>
#include <string.h>

typedef struct mreq {
    MPI_Request r;
    int used, queued;
    const void *buf;
    size_t bytes;
    int peer, tag;
    double t_release;
} mreq;

typedef struct mpi_tp {
    dsi_ep_transport base;
    mreq *q;
    int cap;
    int *fifo; /* queued send handles in release order (ring) */
    int fifo_head, fifo_n;
    double bytes_per_s, latency_s, link_free;
} mpi_tp;

static int mpi_fail(int rc, const char *what, int peer) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return dsi_error(DSI_EPEER, "ep: %s with rank %d failed: %s", what, peer, msg);
}

static int new_req(mpi_tp *t) {
    for (int i = 0; i < t->cap; i++)
        if (!t->q[i].used) {
            memset(&t->q[i], 0, sizeof t->q[i]);
            t->q[i].used = 1;
            t->q[i].r = MPI_REQUEST_NULL;
            return i;
        }
    int ncap = t->cap ? t->cap * 2 : 256;
    mreq *q = realloc(t->q, sizeof(mreq) * ncap);
    int *f = malloc(sizeof(int) * ncap);
    if (!q || !f) {
        free(f);
        if (q) t->q = q;
        return -1;
    }
    /* unroll the ring into the new array */
    for (int i = 0; i < t->fifo_n; i++) f[i] = t->fifo[(t->fifo_head + i) % (t->cap ? t->cap : 1)];
    free(t->fifo);
    t->fifo = f;
    t->fifo_head = 0;
    memset(q + t->cap, 0, sizeof(mreq) * (ncap - t->cap));
    t->q = q;
    int i = t->cap;
    t->cap = ncap;
    t->q[i].used = 1;
    t->q[i].r = MPI_REQUEST_NULL;
    return i;
}

static void tp_progress(dsi_ep_transport *base) {
    mpi_tp *t = (mpi_tp *)base;
    if (!t->fifo_n) return;
    double now = dsi_now();
    while (t->fifo_n) {
        mreq *m = &t->q[t->fifo[t->fifo_head]];
        if (m->t_release > now) break;
        /* an error here surfaces at the next test of this request */
        if (MPI_Isend(m->buf, (int)m->bytes, MPI_BYTE, m->peer, m->tag, MPI_COMM_WORLD, &m->r) != MPI_SUCCESS)
            m->r = MPI_REQUEST_NULL;
        m->queued = 0;
        t->fifo_head = (t->fifo_head + 1) % t->cap;
        t->fifo_n--;
    }
}

static int tp_isend(dsi_ep_transport *base, const void *buf, size_t bytes, int peer, int tag, int *req) {
    mpi_tp *t = (mpi_tp *)base;
    if (bytes > (size_t)0x7fffffff) return dsi_error(DSI_ERANGE, "ep: message of %zu bytes is too large", bytes);
    int i = new_req(t);
    if (i < 0) return dsi_error(DSI_ENOMEM, "out of memory");
    mreq *m = &t->q[i];
    *req = i;
    if (t->bytes_per_s > 0 || t->latency_s > 0) {
        double now = dsi_now(), start = now > t->link_free ? now : t->link_free;
        t->link_free = start + (t->bytes_per_s > 0 ? (double)bytes / t->bytes_per_s : 0);
        m->t_release = t->link_free + t->latency_s;
        m->queued = 1;
        m->buf = buf, m->bytes = bytes, m->peer = peer, m->tag = tag;
        t->fifo[(t->fifo_head + t->fifo_n) % t->cap] = i;
        t->fifo_n++;
        tp_progress(base);
        return DSI_OK;
    }
    int rc = MPI_Isend(buf, (int)bytes, MPI_BYTE, peer, tag, MPI_COMM_WORLD, &m->r);
    if (rc != MPI_SUCCESS) { m->used = 0; return mpi_fail(rc, "send", peer); }
    return DSI_OK;
}

static int tp_irecv(dsi_ep_transport *base, void *buf, size_t bytes, int peer, int tag, int *req) {
    mpi_tp *t = (mpi_tp *)base;
    if (bytes > (size_t)0x7fffffff) return dsi_error(DSI_ERANGE, "ep: message of %zu bytes is too large", bytes);
    int i = new_req(t);
    if (i < 0) return dsi_error(DSI_ENOMEM, "out of memory");
    *req = i;
    int rc = MPI_Irecv(buf, (int)bytes, MPI_BYTE, peer, tag, MPI_COMM_WORLD, &t->q[i].r);
    if (rc != MPI_SUCCESS) { t->q[i].used = 0; return mpi_fail(rc, "receive", peer); }
    t->q[i].peer = peer;
    return DSI_OK;
}

static int tp_test(dsi_ep_transport *base, int req, int *done) {
    mpi_tp *t = (mpi_tp *)base;
    *done = 0;
    if (req < 0 || req >= t->cap || !t->q[req].used) return dsi_error(DSI_EINTERNAL, "ep: bad request handle %d", req);
    mreq *m = &t->q[req];
    if (m->queued) return DSI_OK;
    int flag = 0;
    MPI_Status st;
    int rc = MPI_Test(&m->r, &flag, &st);
    if (rc != MPI_SUCCESS) {
        m->used = 0;
        return mpi_fail(rc, "transfer", m->peer);
    }
    if (flag) {
        m->used = 0;
        *done = 1;
    }
    return DSI_OK;
}

static void tp_destroy(dsi_ep_transport *base) {
    mpi_tp *t = (mpi_tp *)base;
    if (!t) return;
    free(t->q);
    free(t->fifo);
    free(t);
}

int dsi__ep_transport_mpi(double link_gbps, double latency_us, dsi_ep_transport **out) {
    *out = NULL;
    mpi_tp *t = calloc(1, sizeof *t);
    if (!t) return dsi_error(DSI_ENOMEM, "out of memory");
    MPI_Comm_rank(MPI_COMM_WORLD, &t->base.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &t->base.size);
    t->base.isend = tp_isend;
    t->base.irecv = tp_irecv;
    t->base.test = tp_test;
    t->base.progress = tp_progress;
    t->base.destroy = tp_destroy;
    t->bytes_per_s = link_gbps > 0 ? link_gbps * 1e9 : 0;
    t->latency_s = latency_us > 0 ? latency_us * 1e-6 : 0;
    int i = new_req(t); /* sizes the table and the ring */
    if (i < 0) { tp_destroy(&t->base); return dsi_error(DSI_ENOMEM, "out of memory"); }
    t->q[i].used = 0;
    *out = &t->base;
    return DSI_OK;
}
