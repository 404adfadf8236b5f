/* The disk tier's store: open/close, the hash -> file index with its LRU list,
 * the directory scan that rebuilds it, eviction (capacity, TTL), probe,
 * contains, stats and metrics. */
#define _GNU_SOURCE
#include "kvdisk/kvdisk_impl.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

dsi_kvdisk_opts dsi_kvdisk_default_opts(void) {
    dsi_kvdisk_opts o = {0};
    o.capacity_bytes = 16ull << 30;
    return o;
}

double dsi__kd_wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------- index */

static size_t slot_of(const kd_index *x, uint64_t h) { return (size_t)(h ^ (h >> 31)) & x->mask; }

int dsi__kd_index_find(kd_index *x, uint64_t h) {
    if (!x->slots) return -1;
    for (size_t i = slot_of(x, h);; i = (i + 1) & x->mask) {
        int e = x->slots[i];
        if (e < 0) return -1;
        if (x->e[e].hash == h) return e;
    }
}

static void lru_unlink(kd_index *x, int e) {
    int p = x->e[e].prev, n = x->e[e].next;
    if (p >= 0) x->e[p].next = n; else x->head = n;
    if (n >= 0) x->e[n].prev = p; else x->tail = p;
}

/* Inserts keeping the list sorted by last_use: a hit is "now" and goes to the
 * tail in one step; older times (scan order, a peer's mtime) walk back. */
static void lru_insert(kd_index *x, int e) {
    int after = x->tail;
    while (after >= 0 && x->e[after].last_use > x->e[e].last_use) after = x->e[after].prev;
    x->e[e].prev = after;
    x->e[e].next = after >= 0 ? x->e[after].next : x->head;
    if (x->e[e].next >= 0) x->e[x->e[e].next].prev = e; else x->tail = e;
    if (after >= 0) x->e[after].next = e; else x->head = e;
}

static void slot_put(kd_index *x, int e) {
    size_t i = slot_of(x, x->e[e].hash);
    while (x->slots[i] >= 0) i = (i + 1) & x->mask;
    x->slots[i] = e;
}

/* Grows entries and slots so one more entry fits. 0 on success. */
static int index_reserve(kd_index *x) {
    if (x->free_head < 0) {
        int ncap = x->cap ? x->cap * 2 : 1024;
        kd_entry *ne = realloc(x->e, sizeof(kd_entry) * (size_t)ncap);
        if (!ne) return -1;
        x->e = ne;
        for (int i = ncap - 1; i >= x->cap; i--) { x->e[i].next = x->free_head; x->free_head = i; }
        x->cap = ncap;
    }
    if (!x->slots || (size_t)(x->n + 1) * 2 > x->mask + 1) {
        size_t ns = x->slots ? (x->mask + 1) * 2 : 2048;
        int *s = malloc(sizeof(int) * ns);
        if (!s) return -1;
        free(x->slots);
        x->slots = s;
        x->mask = ns - 1;
        for (size_t i = 0; i < ns; i++) s[i] = -1;
        for (int e = x->head; e >= 0; e = x->e[e].next) slot_put(x, e);
    }
    return 0;
}

void dsi__kd_index_touch(kd_index *x, uint64_t h, uint64_t bytes, double when) {
    int e = dsi__kd_index_find(x, h);
    if (e >= 0) {
        lru_unlink(x, e);
        x->bytes += bytes - x->e[e].bytes;
    } else {
        if (index_reserve(x)) return; /* out of memory: the block is simply not accounted */
        e = x->free_head;
        x->free_head = x->e[e].next;
        x->e[e].hash = h;
        x->n++;
        x->bytes += bytes;
        slot_put(x, e);
    }
    x->e[e].bytes = bytes;
    x->e[e].last_use = when;
    lru_insert(x, e);
}

void dsi__kd_index_remove(kd_index *x, uint64_t h) {
    int e = dsi__kd_index_find(x, h);
    if (e < 0) return;
    /* backward-shift deletion */
    size_t i = slot_of(x, h);
    while (x->slots[i] != e) i = (i + 1) & x->mask;
    size_t j = i;
    for (;;) {
        j = (j + 1) & x->mask;
        int c = x->slots[j];
        if (c < 0) break;
        size_t home = slot_of(x, x->e[c].hash);
        int home_in = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!home_in) { x->slots[i] = c; i = j; }
    }
    x->slots[i] = -1;
    lru_unlink(x, e);
    x->bytes -= x->e[e].bytes;
    x->n--;
    x->e[e].next = x->free_head;
    x->free_head = e;
}

static void index_free(kd_index *x) {
    free(x->e);
    free(x->slots);
    memset(x, 0, sizeof *x);
    x->head = x->tail = x->free_head = -1;
}

/* ---------------------------------------------------------------- paths */

void dsi_kvdisk_path(const dsi_kvdisk *d, uint64_t hash, char *buf, size_t cap) {
    snprintf(buf, cap, "%s/%02x/%016llx.kvb", d->dir, (unsigned)(hash >> 56), (unsigned long long)hash);
}

/* Parses "<16 hex>.kvb". */
static int parse_name(const char *name, uint64_t *hash) {
    if (strlen(name) != 20 || strcmp(name + 16, ".kvb")) return 0;
    uint64_t h = 0;
    for (int i = 0; i < 16; i++) {
        char c = name[i];
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (v < 0) return 0;
        h = h << 4 | (uint64_t)v;
    }
    *hash = h;
    return 1;
}

int dsi__kd_mkdir_p(const char *path) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) && errno != EEXIST) return -1;
            *p = '/';
        }
    return mkdir(tmp, 0755) && errno != EEXIST ? -1 : 0;
}

/* ---------------------------------------------------------------- eviction */

/* Evicts the least recently used blocks while over the cap or past the TTL,
 * and until at least `room` bytes are freed; returns the blocks evicted. */
static int evict(dsi_kvdisk *d, uint64_t room) {
    uint64_t freed = 0;
    int total = 0;
    for (;;) {
        uint64_t batch[64];
        int n = 0;
        pthread_mutex_lock(&d->mu);
        double cutoff = d->o.ttl_s > 0 ? dsi__kd_wall() - d->o.ttl_s : -1;
        while (n < 64 && d->idx.head >= 0) {
            kd_entry *e = &d->idx.e[d->idx.head];
            if (!(d->idx.bytes > d->o.capacity_bytes || e->last_use < cutoff || freed < room)) break;
            batch[n++] = e->hash;
            freed += e->bytes;
            dsi__kd_index_remove(&d->idx, e->hash);
            d->st.evictions++;
        }
        pthread_mutex_unlock(&d->mu);
        /* unlink outside the lock; ENOENT means another process evicted it first */
        for (int i = 0; i < n; i++) {
            char path[4200];
            dsi_kvdisk_path(d, batch[i], path, sizeof path);
            unlink(path);
        }
        total += n;
        if (n < 64) return total;
    }
}

void dsi__kd_enforce(dsi_kvdisk *d) { evict(d, 0); }

int dsi__kd_make_room(dsi_kvdisk *d, uint64_t bytes) { return evict(d, bytes); }

void dsi__kd_drop_corrupt(dsi_kvdisk *d, uint64_t hash, int fd) {
    char path[4200];
    dsi_kvdisk_path(d, hash, path, sizeof path);
    struct stat a, b;
    /* a writer may have renamed a good copy over the bad one since we opened it: keep that */
    if (fd >= 0 && (fstat(fd, &a) || stat(path, &b) || a.st_ino != b.st_ino || a.st_dev != b.st_dev)) {
        pthread_mutex_lock(&d->mu);
        d->st.corrupt++;
        pthread_mutex_unlock(&d->mu);
        return;
    }
    unlink(path);
    pthread_mutex_lock(&d->mu);
    dsi__kd_index_remove(&d->idx, hash);
    d->st.corrupt++;
    pthread_mutex_unlock(&d->mu);
    DSI_LOG_WARN("kv-disk: dropped a damaged block file %s", path);
}

/* ---------------------------------------------------------------- scan */

typedef struct scan_item { uint64_t hash, bytes; double mtime; } scan_item;

static int by_mtime(const void *a, const void *b) {
    double x = ((const scan_item *)a)->mtime, y = ((const scan_item *)b)->mtime;
    return x < y ? -1 : x > y;
}

int dsi_kvdisk_rescan(dsi_kvdisk *d) {
    double t0 = dsi_now(), now = dsi__kd_wall();
    scan_item *items = NULL;
    size_t n = 0, cap = 0;
    int rc = DSI_OK;
    for (int sub = 0; sub < 256 && rc == DSI_OK; sub++) {
        char path[4200];
        snprintf(path, sizeof path, "%s/%02x", d->dir, sub);
        DIR *dir = opendir(path);
        if (!dir) continue; /* another process may not have made it yet; we make ours lazily */
        int dfd = dirfd(dir);
        struct dirent *de;
        while ((de = readdir(dir))) {
            struct stat sb;
            uint64_t h;
            if (!strncmp(de->d_name, KD_TMP_PREFIX, strlen(KD_TMP_PREFIX))) {
                if (!fstatat(dfd, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) && now - sb.st_mtime > KD_TMP_STALE_S)
                    unlinkat(dfd, de->d_name, 0);
                continue;
            }
            if (!parse_name(de->d_name, &h) || fstatat(dfd, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) ||
                !S_ISREG(sb.st_mode))
                continue;
            if (n == cap) {
                size_t nc = cap ? cap * 2 : 4096;
                scan_item *ni = realloc(items, sizeof *ni * nc);
                if (!ni) { rc = dsi_error(DSI_ENOMEM, "kv-disk: out of memory scanning %s", d->dir); break; }
                items = ni;
                cap = nc;
            }
            items[n++] = (scan_item){h, (uint64_t)sb.st_size, sb.st_mtim.tv_sec + sb.st_mtim.tv_nsec * 1e-9};
        }
        closedir(dir);
    }
    if (rc == DSI_OK) {
        if (n) qsort(items, n, sizeof *items, by_mtime);
        kd_index nx;
        memset(&nx, 0, sizeof nx);
        nx.head = nx.tail = nx.free_head = -1;
        for (size_t i = 0; i < n; i++) dsi__kd_index_touch(&nx, items[i].hash, items[i].bytes, items[i].mtime);
        pthread_mutex_lock(&d->mu);
        /* the files' mtimes are the LRU clock shared by every process (a hit refreshes it): they win */
        index_free(&d->idx);
        d->idx = nx;
        d->st.scans++;
        d->st.last_scan_s = dsi_now() - t0;
        pthread_mutex_unlock(&d->mu);
        dsi__kd_enforce(d);
    }
    free(items);
    return rc;
}

/* Rescans every rescan_s until close. */
static void *maint_loop(void *arg) {
    dsi_kvdisk *d = arg;
    pthread_mutex_lock(&d->mu);
    while (!d->stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double end = ts.tv_sec + ts.tv_nsec * 1e-9 + d->o.rescan_s;
        ts.tv_sec = (time_t)end;
        ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
        if (pthread_cond_timedwait(&d->cv_maint, &d->mu, &ts) == 0 || d->stopping) continue;
        pthread_mutex_unlock(&d->mu);
        dsi_kvdisk_rescan(d);
        pthread_mutex_lock(&d->mu);
    }
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

/* ---------------------------------------------------------------- open / close */

int dsi_kvdisk_open(const dsi_kvdisk_opts *o, uint64_t fp, int n_layers, int kv_dim, int bt, dsi_kvdisk **out) {
    *out = NULL;
    if (!o || !o->dir || !*o->dir) return dsi_error(DSI_EINVAL, "kv-disk: no directory given");
    if (n_layers <= 0 || kv_dim <= 0 || bt <= 0 || bt > 4096)
        return dsi_error(DSI_EINVAL, "kv-disk: bad geometry (%d layers, dim %d, %d tokens/block)", n_layers, kv_dim, bt);
    /* a rescan period past 1e9 s (or NaN) overflows the wait's deadline: the rescan thread would spin */
    if (!(o->ttl_s >= 0) || !(o->rescan_s <= 1e9) || o->io_threads < 0 || o->max_pending < 0 || o->fsync < 0 ||
        o->fsync > DSI_KVDISK_FSYNC_DIR || o->io < 0 || o->io > DSI_KVDISK_IO_THREADS)
        return dsi_error(DSI_EINVAL, "kv-disk: bad options");
    if (strlen(o->dir) > 3000) return dsi_error(DSI_EINVAL, "kv-disk: directory path too long");
    dsi_kvdisk *d = calloc(1, sizeof *d);
    if (!d) return dsi_error(DSI_ENOMEM, "out of memory");
    d->o = *o;
    if (!d->o.capacity_bytes) d->o.capacity_bytes = 16ull << 30;
    if (!d->o.io_threads) d->o.io_threads = 4;
    if (!d->o.max_pending) d->o.max_pending = 1024;
    if (d->o.rescan_s == 0) d->o.rescan_s = 30;
    d->fingerprint = fp;
    d->n_layers = n_layers;
    d->kv_dim = kv_dim;
    d->bt = bt;
    d->payload_bytes = (size_t)n_layers * bt * kv_dim * sizeof(float);
    d->header_bytes = KD_HDR_FIXED + sizeof(int32_t) * (size_t)bt;
    d->efd = -1;
    struct { struct timespec ts; pid_t pid; void *self; char host[64]; } seed = {.pid = getpid(), .self = d};
    clock_gettime(CLOCK_REALTIME, &seed.ts);
    gethostname(seed.host, sizeof seed.host);
    d->nonce = XXH3_64bits(&seed, sizeof seed);
    d->idx.head = d->idx.tail = d->idx.free_head = -1;
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv_work, NULL);
    pthread_cond_init(&d->cv_done, NULL);
    pthread_cond_init(&d->cv_maint, NULL);
    size_t dl = strlen(o->dir) + sizeof("/" KD_SUBDIR);
    d->dir = malloc(dl);
    int np = d->o.max_pending;
    size_t per = sizeof(int32_t) * (size_t)bt + d->header_bytes;
    d->jobs = calloc(np, sizeof(kd_job));
    d->slab = malloc(per * np);
    if (!d->dir || !d->jobs || !d->slab) {
        dsi_kvdisk_close(d);
        return dsi_error(DSI_ENOMEM, "kv-disk: out of memory");
    }
    snprintf(d->dir, dl, "%s/" KD_SUBDIR, o->dir);
    for (int i = np - 1; i >= 0; i--) {
        d->jobs[i].tokens = (int32_t *)(d->slab + per * i);
        d->jobs[i].hdr = d->slab + per * i + sizeof(int32_t) * (size_t)bt;
        d->jobs[i].next = d->free_jobs;
        d->free_jobs = &d->jobs[i];
    }
    int rc = DSI_OK;
    if (dsi__kd_mkdir_p(d->dir)) rc = dsi_error(DSI_EIO, "kv-disk: cannot create %s: %s", d->dir, strerror(errno));
    for (int sub = 0; sub < 256 && rc == DSI_OK; sub++) {
        char path[4200];
        snprintf(path, sizeof path, "%s/%02x", d->dir, sub);
        if (mkdir(path, 0755) && errno != EEXIST)
            rc = dsi_error(DSI_EIO, "kv-disk: cannot create %s: %s", path, strerror(errno));
    }
    if (rc == DSI_OK) rc = dsi_kvdisk_rescan(d);
    if (rc == DSI_OK) rc = dsi__kd_io_start(d);
    if (rc == DSI_OK && d->o.rescan_s > 0) {
        if (pthread_create(&d->maint_thread, NULL, maint_loop, d) == 0) d->maint_started = 1;
        else rc = dsi_error(DSI_ENOMEM, "kv-disk: cannot start the rescan thread");
    }
    if (rc) { dsi_kvdisk_close(d); return rc; }
    DSI_LOG_INFO("kv-disk: %s: %llu blocks, %.1f MiB of %.1f MiB, scanned in %.1f ms; loads via %s", o->dir,
                 (unsigned long long)d->idx.n, d->idx.bytes / 1048576.0, d->o.capacity_bytes / 1048576.0,
                 d->st.last_scan_s * 1e3, dsi_kvdisk_backend(d));
    *out = d;
    return DSI_OK;
}

void dsi_kvdisk_close(dsi_kvdisk *d) {
    if (!d) return;
    dsi__kd_io_stop(d); /* drains queued jobs */
    pthread_mutex_lock(&d->mu);
    d->stopping = 1;
    pthread_cond_broadcast(&d->cv_maint);
    pthread_mutex_unlock(&d->mu);
    if (d->maint_started) pthread_join(d->maint_thread, NULL);
    index_free(&d->idx);
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->cv_work);
    pthread_cond_destroy(&d->cv_done);
    pthread_cond_destroy(&d->cv_maint);
    free(d->dir);
    free(d->jobs);
    free(d->slab);
    free(d);
}

const char *dsi_kvdisk_backend(const dsi_kvdisk *d) { return d->use_uring ? "io_uring" : "threads"; }
size_t dsi_kvdisk_block_bytes(const dsi_kvdisk *d) { return d->payload_bytes; }

/* ---------------------------------------------------------------- lookups */

int dsi_kvdisk_contains(dsi_kvdisk *d, uint64_t hash) {
    pthread_mutex_lock(&d->mu);
    int in = dsi__kd_index_find(&d->idx, hash) >= 0;
    pthread_mutex_unlock(&d->mu);
    if (in) return 1;
    char path[4200];
    dsi_kvdisk_path(d, hash, path, sizeof path);
    return access(path, F_OK) == 0;
}

int dsi_kvdisk_probe(dsi_kvdisk *d, uint64_t hash) {
    char path[4200];
    dsi_kvdisk_path(d, hash, path, sizeof path);
    struct stat sb;
    int found = stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
    if (found && (uint64_t)sb.st_size != d->header_bytes + d->payload_bytes) {
        /* published files are whole (rename): a wrong size is damage, not a writer in progress */
        unlink(path);
        DSI_LOG_WARN("kv-disk: dropped %s: %lld bytes, expected %zu", path, (long long)sb.st_size,
                     d->header_bytes + d->payload_bytes);
        pthread_mutex_lock(&d->mu);
        d->st.corrupt++;
        pthread_mutex_unlock(&d->mu);
        found = 0;
    }
    pthread_mutex_lock(&d->mu);
    if (found) {
        if (dsi__kd_index_find(&d->idx, hash) < 0)
            dsi__kd_index_touch(&d->idx, hash, (uint64_t)sb.st_size, sb.st_mtim.tv_sec + sb.st_mtim.tv_nsec * 1e-9);
    } else {
        dsi__kd_index_remove(&d->idx, hash);
        d->st.misses++;
    }
    pthread_mutex_unlock(&d->mu);
    return found;
}

/* ---------------------------------------------------------------- stats */

void dsi_kvdisk_get_stats(dsi_kvdisk *d, dsi_kvdisk_stats *out) {
    pthread_mutex_lock(&d->mu);
    *out = d->st;
    out->n_blocks = (uint64_t)d->idx.n;
    out->bytes = d->idx.bytes;
    out->capacity_bytes = d->o.capacity_bytes;
    pthread_mutex_unlock(&d->mu);
}

void dsi_kvdisk_write_metrics(void *ctx, void (*write)(void *w, const char *text, size_t len), void *w) {
    dsi_kvdisk_stats s;
    dsi_kvdisk_get_stats(ctx, &s);
    static const struct { const char *name, *type, *help; } M[] = {
        {"dsinfer_kv_disk_hits_total", "counter", "KV blocks loaded from the disk tier."},
        {"dsinfer_kv_disk_misses_total", "counter", "Disk-tier lookups that found no usable block."},
        {"dsinfer_kv_disk_read_bytes_total", "counter", "Bytes read from the disk tier."},
        {"dsinfer_kv_disk_written_bytes_total", "counter", "Bytes written to the disk tier."},
        {"dsinfer_kv_disk_written_blocks_total", "counter", "KV blocks written to the disk tier."},
        {"dsinfer_kv_disk_corrupt_blocks_total", "counter", "Damaged block files dropped (deleted, never served)."},
        {"dsinfer_kv_disk_evictions_total", "counter", "Block files evicted by capacity or TTL by this process."},
        {"dsinfer_kv_disk_skipped_writes_total", "counter", "Full blocks not written because the write queue was full."},
        {"dsinfer_kv_disk_write_errors_total", "counter", "Full blocks that could not be written (disk full, read-only, ...)."},
        {"dsinfer_kv_disk_blocks", "gauge", "Block files in the disk tier (this process's view)."},
        {"dsinfer_kv_disk_bytes", "gauge", "Bytes of block files in the disk tier (this process's view)."},
        {"dsinfer_kv_disk_capacity_bytes", "gauge", "Size cap of the disk tier."},
    };
    uint64_t v[] = {s.hits, s.misses, s.read_bytes, s.written_bytes, s.written_blocks, s.corrupt,
                    s.evictions, s.skipped_saves, s.write_errors, s.n_blocks, s.bytes, s.capacity_bytes};
    char buf[512];
    for (size_t i = 0; i < sizeof M / sizeof M[0]; i++) {
        int n = snprintf(buf, sizeof buf, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", M[i].name, M[i].help, M[i].name,
                         M[i].type, M[i].name, (unsigned long long)v[i]);
        write(w, buf, (size_t)n);
    }
}
