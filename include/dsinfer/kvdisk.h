/* dsinfer/kvdisk.h - the on-disk KV tier: full latent KV blocks persisted
 * under a directory, shared across restarts and by several processes.
 *
 * A block is named by its prefix-cache chain hash (dsi_prefix_block_hash:
 * parent hash, model fingerprint, 64 token ids), one file per block:
 * DIR/v1/<first two hex digits>/<16 hex digits>.kvb. A file holds a header
 * (format version, hash, parent hash, model fingerprint, geometry, the token
 * ids, XXH3 of the payload, XXH3 of the header) and the block's float32 KV
 * exactly as the pool stores it. Loads verify everything: a torn, truncated
 * or corrupted file is a miss and is deleted; a file whose tokens differ (a
 * hash collision) is a miss and is left alone.
 *
 *     dsi_kvdisk_opts o = dsi_kvdisk_default_opts();
 *     o.dir = "/var/cache/dsinfer";  o.capacity_bytes = 100ull << 30;
 *     dsi_kvdisk *d;
 *     dsi_kvdisk_open(&o, fingerprint, n_layers, kv_dim, 64, &d);
 *     if (dsi_kvdisk_probe(d, hash))                       // scheduler thread
 *         dsi_kvdisk_load(d, hash, parent, tokens, dst, req, i);
 *     dsi_kvdisk_save(d, hash, parent, tokens, src, NULL, block);
 *     dsi_kvdisk_done done[16];
 *     int n = dsi_kvdisk_poll(d, done, 16);                // at a step boundary
 *     dsi_kvdisk_close(d);
 *
 * Threads: load/save/poll/wait belong to one thread (the scheduler's); the
 * I/O runs on the store's own threads (io_uring with one reaper thread, or a
 * pread thread pool when io_uring is unavailable). contains(), get_stats(),
 * rescan() and write_metrics() may be called from any thread.
 *
 * Writes are atomic: a temporary file in the same folder, optionally fsynced,
 * then rename(2). Several processes may share DIR (a local disk, NFS, 3FS):
 * rename publishes whole files only, readers verify checksums, and eviction
 * unlinks (a reader that has the file open still reads it). Capacity is
 * accounted per process: the start-up scan, plus this process's writes and
 * the blocks it finds, minus its evictions; a periodic rescan (names, sizes
 * and mtimes only, no reads) brings in other processes' writes and
 * deletions. The LRU clock is the file's mtime, which a hit refreshes, so
 * recency survives restarts and is shared between processes. */
#ifndef DSINFER_KVDISK_H
#define DSINFER_KVDISK_H

#include "dsinfer/common.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { DSI_KVDISK_IO_AUTO = 0, DSI_KVDISK_IO_URING, DSI_KVDISK_IO_THREADS };
enum { DSI_KVDISK_FSYNC_NONE = 0, DSI_KVDISK_FSYNC_FILE, DSI_KVDISK_FSYNC_DIR };

typedef struct dsi_kvdisk_opts {
    const char *dir;            /* NULL or "": no disk tier */
    uint64_t capacity_bytes;    /* size cap over all block files in dir; 0 = 16 GiB */
    double ttl_s;               /* evict blocks unused for this long; 0 = never */
    int fsync;                  /* DSI_KVDISK_FSYNC_*: checksums make NONE safe, fsync makes blocks survive power loss */
    int io;                     /* DSI_KVDISK_IO_*: AUTO tries io_uring, falls back to threads */
    int io_threads;             /* thread-pool size, and writer threads; 0 = 4 */
    int max_pending;            /* loads + saves in flight; 0 = 1024 (save() beyond it is skipped) */
    double rescan_s;            /* directory rescan period, at most 1e9; 0 = 30 s, < 0 = never */
} dsi_kvdisk_opts;

dsi_kvdisk_opts dsi_kvdisk_default_opts(void);

typedef struct dsi_kvdisk dsi_kvdisk;

/* Opens (creating folders as needed) and scans dir. The geometry and the
 * fingerprint are those of the blocks this process reads and writes
 * (payload = n_layers * block_tokens * kv_dim float32). */
int dsi_kvdisk_open(const dsi_kvdisk_opts *o, uint64_t model_fingerprint, int n_layers, int kv_dim, int block_tokens,
                    dsi_kvdisk **out);
/* Waits for every queued load and save, then frees. NULL is a no-op. */
void dsi_kvdisk_close(dsi_kvdisk *d);

/* "io_uring" or "threads". */
const char *dsi_kvdisk_backend(const dsi_kvdisk *d);
size_t dsi_kvdisk_block_bytes(const dsi_kvdisk *d);
/* The file a block lives in (whether or not it exists). */
void dsi_kvdisk_path(const dsi_kvdisk *d, uint64_t hash, char *buf, size_t cap);

/* Whether the shared directory holds a block (any thread): the index, then
 * the file system (another process may have written it since the last scan).
 * A yes is a hint: a later load still verifies. For prefill->decode transfer
 * to skip blocks the receiver can read from disk. */
int dsi_kvdisk_contains(dsi_kvdisk *d, uint64_t hash);
/* Like contains(), and checks the file's size (a truncated file is deleted
 * and counted as corrupt). One stat(2); meant for the scheduler's lookup. */
int dsi_kvdisk_probe(dsi_kvdisk *d, uint64_t hash);

enum { DSI_KVDISK_LOAD = 0, DSI_KVDISK_SAVE = 1 };

/* A finished load or save, returned by poll(). */
typedef struct dsi_kvdisk_done {
    int kind;          /* DSI_KVDISK_LOAD / SAVE */
    int status;        /* DSI_OK; load: DSI_ENOTFOUND (gone or another block), DSI_EFORMAT (corrupt: deleted),
                          DSI_EIO; save: DSI_OK also when skipped because the file exists */
    uint64_t hash;
    void *user;        /* as given */
    int index;         /* as given */
} dsi_kvdisk_done;

/* Queues a read of block `hash` into dst (dsi_kvdisk_block_bytes bytes, not
 * touched by the caller until the load is polled as done; on failure its
 * contents are undefined). tokens[block_tokens] and parent are what the
 * caller expects: the file must hold exactly those. Returns DSI_OK (poll()
 * reports it exactly once) or DSI_EBUSY (too many in flight: a miss). */
int dsi_kvdisk_load(dsi_kvdisk *d, uint64_t hash, uint64_t parent, const int32_t *tokens, void *dst, void *user,
                    int index);
/* Queues a write of a full block from src (read until the save is polled as
 * done: the caller keeps it alive and unchanged). Returns 1 when queued, 0
 * when skipped (already known on disk, or too many in flight): nothing will
 * be polled then and src may be released at once. */
int dsi_kvdisk_save(dsi_kvdisk *d, uint64_t hash, uint64_t parent, const int32_t *tokens, const void *src, void *user,
                    int index);
/* Moves up to max finished jobs to out[]; returns how many. */
int dsi_kvdisk_poll(dsi_kvdisk *d, dsi_kvdisk_done *out, int max);
/* Blocks until a job has finished (or timeout_s passes); returns the number
 * of finished jobs waiting to be polled. */
int dsi_kvdisk_wait(dsi_kvdisk *d, double timeout_s);
/* Jobs queued or running, not yet polled. */
int dsi_kvdisk_in_flight(dsi_kvdisk *d);

/* Rebuilds the index from the directory (names, sizes, mtimes; no reads),
 * removes temporary files older than 10 minutes (crashed writers), applies
 * the TTL and the capacity. Runs at open and every rescan_s. */
int dsi_kvdisk_rescan(dsi_kvdisk *d);

typedef struct dsi_kvdisk_stats {
    uint64_t n_blocks, bytes;          /* in the index now */
    uint64_t capacity_bytes;
    uint64_t hits, misses;             /* loads that succeeded; probes that found nothing + loads that failed */
    uint64_t read_bytes, written_bytes, written_blocks;
    uint64_t corrupt;                  /* bad files dropped (deleted) */
    uint64_t evictions;                /* by capacity or TTL, this process */
    uint64_t skipped_saves;            /* queue full */
    uint64_t write_errors;             /* saves that failed (disk full, read-only, ...) */
    uint64_t scans;
    double last_scan_s;                /* duration of the last scan */
} dsi_kvdisk_stats;

void dsi_kvdisk_get_stats(dsi_kvdisk *d, dsi_kvdisk_stats *out);

/* Prometheus text for /metrics (a dsi_metrics_hook: ctx is the store). */
void dsi_kvdisk_write_metrics(void *ctx, void (*write)(void *w, const char *text, size_t len), void *w);

#ifdef __cplusplus
}
#endif
#endif
