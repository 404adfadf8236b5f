/* The EP transport: point-to-point nonblocking messages behind a small
 * vtable, so the runtime can run over MPI with or without an emulated
 * inter-node link (bandwidth and latency injected on the sending side).
 *
 * Nothing moves unless someone calls test or progress (Open MPI has no
 * progress thread): the runtime polls between and inside its stages. */
#ifndef DSI_EP_TRANSPORT_H
#define DSI_EP_TRANSPORT_H

#include <stddef.h>

typedef struct dsi_ep_transport dsi_ep_transport;

struct dsi_ep_transport {
    int rank, size;
    /* Post a send / receive of `bytes` with `tag`; *req gets a handle. The
     * buffer is borrowed until the request completes. A receive may be
     * larger than the message (the message decides the size). */
    int (*isend)(dsi_ep_transport *t, const void *buf, size_t bytes, int peer, int tag, int *req);
    int (*irecv)(dsi_ep_transport *t, void *buf, size_t bytes, int peer, int tag, int *req);
    /* *done = 1 once complete; the handle is then released. */
    int (*test)(dsi_ep_transport *t, int req, int *done);
    /* Hands queued sends to the wire when the emulated link lets them go. */
    void (*progress)(dsi_ep_transport *t);
    /* Cancels nothing: frees the transport (pending requests are dropped). */
    void (*destroy)(dsi_ep_transport *t);
};

/* MPI on the world communicator (errors returned, not fatal). link_gbps > 0
 * emulates an outgoing link of that many GB/s per rank (messages leave one
 * after another); latency_us is added to every message. */
int dsi__ep_transport_mpi(double link_gbps, double latency_us, dsi_ep_transport **out);

#endif
