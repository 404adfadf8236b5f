/* dsinfer/pd.h - prefill/decode disaggregation: the KV transfer wire format
 * between instances, blocking socket helpers, and the "which blocks does this
 * instance probably hold" hint set.
 *
 * A prefill instance opens one TCP connection per request to the decode
 * instance's KV port (reported in GET /internal/load as "kv_port") and speaks:
 *
 *     P -> D  HELLO  xfer id, model fingerprint, prompt length, block geometry,
 *                    chain hashes of the prompt's full blocks
 *     D -> P  SKIP   how many leading blocks D (or the shared disk tier) holds
 *     P -> D  BLOCK  index + float32 [n_layers][64][kv_dim] (dsi_kv_block_data),
 *                    one per block as prefill chunks complete (pipelined)
 *     P -> D  FIRST  the first token P sampled, its logprob, sampler state
 *     D -> P  ACK    status (0: D took the request)
 *
 * Every message is a 16-byte header {magic "DSKV", type, payload bytes}
 * followed by the payload; integers little-endian (both ends are x86-64 or
 * another little-endian host; the magic catches a mismatch).
 *
 *     int fd;
 *     if (dsi_pd_connect("127.0.0.1", kv_port, 2.0, &fd)) die(dsi_last_error());
 *     dsi_pd_send_msg(fd, DSI_PD_BLOCK, &bh, sizeof bh, data, bytes);
 */
#ifndef DSINFER_PD_H
#define DSINFER_PD_H

#include "dsinfer/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DSI_PD_MAGIC 0x564b5344u /* "DSKV" */

enum { DSI_PD_HELLO = 1, DSI_PD_SKIP, DSI_PD_BLOCK, DSI_PD_FIRST, DSI_PD_ACK };

typedef struct dsi_pd_hello {
    uint64_t xfer_id;
    uint64_t fingerprint;      /* dsi_model_fingerprint: both ends must serve the same weights */
    uint32_t n_prompt;
    uint32_t n_blocks;         /* ceil(n_prompt / block_tokens) */
    uint32_t n_layers, block_tokens, kv_dim;
    uint32_t n_hashes;         /* followed by n_hashes uint64 chain hashes (full blocks) */
} dsi_pd_hello;

typedef struct dsi_pd_skip {
    int32_t status;            /* DSI_OK, or why D refuses (no such transfer, geometry) */
    uint32_t skip_blocks;      /* leading blocks not to send */
} dsi_pd_skip;

typedef struct dsi_pd_block {
    uint32_t index;            /* block index in the prompt; payload = block bytes */
    uint32_t n_layers, block_tokens, kv_dim;
} dsi_pd_block;

#define DSI_PD_MAX_TOP 20

typedef struct dsi_pd_first {
    int32_t token;
    float logprob;
    uint64_t sampler_rng;
    uint32_t cached_tokens;    /* prompt tokens P found in its prefix cache */
    uint32_t n_top;            /* top alternatives that follow (requests with top_logprobs) */
    int32_t top_ids[DSI_PD_MAX_TOP];
    float top_logprobs[DSI_PD_MAX_TOP];
} dsi_pd_first;

typedef struct dsi_pd_ack {
    int32_t status;
    uint32_t pad;
} dsi_pd_ack;

/* ---- sockets (blocking; every call has a deadline) ---- */

/* Connects to host:port (IPv4/IPv6 literal or name) within timeout_s. TCP_NODELAY. */
int dsi_pd_connect(const char *host, int port, double timeout_s, int *fd);
/* Listens on host:port (0 = any free port); *bound_port gets the port. */
int dsi_pd_listen(const char *host, int port, int *fd, int *bound_port);
int dsi_pd_send_all(int fd, const void *buf, size_t n);
/* Reads exactly n bytes; DSI_ETIMEOUT past timeout_s, DSI_EPEER on EOF. */
int dsi_pd_recv_all(int fd, void *buf, size_t n, double timeout_s);
/* One message: header, then hdr[hdr_len], then payload[payload_len]. */
int dsi_pd_send_msg(int fd, uint32_t type, const void *hdr, size_t hdr_len, const void *payload, size_t payload_len);
/* Reads a message header; *len gets the payload bytes that follow. */
int dsi_pd_recv_hdr(int fd, uint32_t *type, uint64_t *len, double timeout_s);

/* Splits "host:port" or "[v6]:port" (an optional "http://" is skipped).
 * host gets at most cap-1 bytes. */
int dsi_pd_split_hostport(const char *s, char *host, size_t cap, int *port);

/* ---- hint set: chain hashes an instance recently computed or imported ----
 * Bounded (oldest forgotten first), thread-safe. A hint, never a promise: the
 * blocks may have been evicted since, and the scheduler recomputes then. */
typedef struct dsi_pd_hashset dsi_pd_hashset;

int dsi_pd_hashset_create(int capacity, dsi_pd_hashset **out);
void dsi_pd_hashset_destroy(dsi_pd_hashset *h);
void dsi_pd_hashset_add(dsi_pd_hashset *h, uint64_t hash);
int dsi_pd_hashset_contains(dsi_pd_hashset *h, uint64_t hash);
/* How many of hashes[0..n) lead the chain in the set (stops at the first miss). */
int dsi_pd_hashset_leading(dsi_pd_hashset *h, const uint64_t *hashes, int n);

#ifdef __cplusplus
}
#endif
#endif
