/* Internals of the disk KV tier, shared by store.c (index, directory scan,
 * eviction, probe, stats), io.c (jobs, the io_uring and thread-pool backends,
 * block files) and format.c (the block file header). */
#ifndef DSI_KVDISK_IMPL_H
#define DSI_KVDISK_IMPL_H

#include "dsinfer/kvdisk.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/uio.h>

#define KD_MAGIC "DSIKVB\0\1"
#define KD_VERSION 1u
#define KD_SUBDIR "v1"            /* a format change gets a new folder: old files are never parsed */
#define KD_HDR_FIXED 88           /* bytes before the token ids */
#define KD_TMP_PREFIX ".tmp."
#define KD_TMP_STALE_S 600.0      /* temporary files older than this are a crashed writer's */

/* The block file header, decoded. On disk: magic[8], u32 version,
 * u32 header_bytes, u64 hash, u64 parent, u64 fingerprint, u32 n_layers,
 * u32 kv_dim, u32 block_tokens, u32 dtype (0 = float32), u64 payload_bytes,
 * u64 payload_xxh3, u64 reserved, u64 header_xxh3 (of the bytes before it and
 * the token ids), int32 tokens[block_tokens]; then the payload. Host byte
 * order (little-endian on every machine we target). */
typedef struct kd_header {
    uint32_t version, header_bytes;
    uint64_t hash, parent, fingerprint;
    uint32_t n_layers, kv_dim, block_tokens, dtype;
    uint64_t payload_bytes, payload_xxh3;
} kd_header;

/* One queued load or save. Buffers live in the store's slab. */
typedef struct kd_job {
    int kind;                 /* DSI_KVDISK_LOAD / SAVE */
    int status;
    uint64_t hash, parent;
    int32_t *tokens;          /* [block_tokens]: expected (load) or to write (save) */
    uint8_t *hdr;             /* [header_bytes] */
    void *buf;                /* load: destination; save: source (borrowed) */
    void *user;
    int index;
    int fd;
    struct iovec iov[2];
    struct kd_job *next;
} kd_job;

typedef struct kd_entry {
    uint64_t hash, bytes;
    double last_use;          /* wall-clock seconds (the file's mtime) */
    int prev, next;           /* LRU list, oldest at head; free list via next */
} kd_entry;

/* hash -> entry map with an LRU list; guarded by dsi_kvdisk.mu */
typedef struct kd_index {
    kd_entry *e;
    int cap, n, free_head;
    int *slots;               /* entry ids, -1 empty */
    size_t mask;
    int head, tail;
    uint64_t bytes;
} kd_index;

struct dsi_kvdisk {
    dsi_kvdisk_opts o;
    char *dir;                /* DIR/v1 */
    uint64_t fingerprint;
    int n_layers, kv_dim, bt;
    size_t payload_bytes, header_bytes;

    pthread_mutex_t mu;       /* everything below */
    pthread_cond_t cv_work, cv_done, cv_maint;
    kd_index idx;
    kd_job *jobs;             /* [max_pending] slab */
    uint8_t *slab;
    kd_job *free_jobs;
    kd_job *loads_head, *loads_tail, *saves_head, *saves_tail, *done_head, *done_tail;
    int n_in_flight;          /* taken from the free list and not yet polled */
    int n_done;
    int write_failing;        /* the last write failed: the next failure is not logged */
    atomic_int full_logged;   /* a full disk made room once: said once */
    int stopping;             /* the rescan thread ends */
    int io_stopping;          /* the I/O threads end once the queues are empty */
    dsi_kvdisk_stats st;
    unsigned long tmp_counter;
    uint64_t nonce;           /* in temporary names: unique across processes, hosts (NFS) and stores */

    int use_uring;
    void *uring;              /* struct io_uring * */
    int efd;                  /* wakes the uring thread */
    pthread_t uring_thread, maint_thread;
    pthread_t *workers;
    int n_workers, uring_started, maint_started;
};

/* format.c */
void dsi__kd_header_encode(const dsi_kvdisk *d, uint64_t hash, uint64_t parent, const int32_t *tokens,
                           uint64_t payload_xxh3, uint8_t *out);
/* Checks a read header against what the caller expects. Returns DSI_OK,
 * DSI_EFORMAT (damaged: the file should go) or DSI_ENOTFOUND (a valid block
 * for other tokens or another model: leave it). Fills *h. */
int dsi__kd_header_check(const dsi_kvdisk *d, const uint8_t *hdr, uint64_t hash, uint64_t parent,
                         const int32_t *tokens, kd_header *h);

/* store.c (call with mu held unless said otherwise) */
int dsi__kd_index_find(kd_index *x, uint64_t hash);
/* Adds or refreshes an entry (moving it to the most recent end). */
void dsi__kd_index_touch(kd_index *x, uint64_t hash, uint64_t bytes, double when);
void dsi__kd_index_remove(kd_index *x, uint64_t hash);
/* Evicts by TTL and capacity; call WITHOUT mu (unlinks files). */
void dsi__kd_enforce(dsi_kvdisk *d);
/* Evicts least recently used blocks until `bytes` are freed (a full disk); returns how many. */
int dsi__kd_make_room(dsi_kvdisk *d, uint64_t bytes);
/* Tests: when nonzero, block files beyond this many bytes in the index fail to
 * write as on a full disk (ENOSPC). */
extern uint64_t dsi__kd_test_disk_bytes;
/* Deletes a damaged block file if the path still names the file open as fd. */
void dsi__kd_drop_corrupt(dsi_kvdisk *d, uint64_t hash, int fd);
double dsi__kd_wall(void);
/* mkdir -p, any thread (no lock); 0 on success, else -1 with errno set. */
int dsi__kd_mkdir_p(const char *path);

/* io.c */
int dsi__kd_io_start(dsi_kvdisk *d);
void dsi__kd_io_stop(dsi_kvdisk *d);

#endif
