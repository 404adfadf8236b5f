/* The disk tier's I/O: the job queues, block file reads (io_uring with one
 * reaper thread, or a pread thread pool) and atomic writes (worker threads).
 *
 * A job moves free -> loads/saves queue -> (I/O thread) -> done list ->
 * poll() -> free. Verification (header, sizes, XXH3 of the payload) runs on
 * the I/O threads, so the scheduler thread only copies results. */
#define _GNU_SOURCE
#include "kvdisk/kvdisk_impl.h"

#include <errno.h>
#include <fcntl.h>
#if DSI_HAVE_URING
#include <liburing.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#define KD_URING_DEPTH 64

/* ---------------------------------------------------------------- queues (mu held) */

static void push(kd_job **head, kd_job **tail, kd_job *j) {
    j->next = NULL;
    if (*tail) (*tail)->next = j; else *head = j;
    *tail = j;
}

static kd_job *pop(kd_job **head, kd_job **tail) {
    kd_job *j = *head;
    if (j) {
        *head = j->next;
        if (!*head) *tail = NULL;
        j->next = NULL;
    }
    return j;
}

static void job_done(dsi_kvdisk *d, kd_job *j, int status) {
    j->status = status;
    pthread_mutex_lock(&d->mu);
    push(&d->done_head, &d->done_tail, j);
    d->n_done++;
    pthread_cond_broadcast(&d->cv_done);
    pthread_mutex_unlock(&d->mu);
}

static void wake_uring(dsi_kvdisk *d) {
    uint64_t one = 1;
    if (d->efd >= 0 && write(d->efd, &one, sizeof one) < 0) { /* the counter is saturated: it is awake anyway */ }
}

/* ---------------------------------------------------------------- API */

int dsi_kvdisk_load(dsi_kvdisk *d, uint64_t hash, uint64_t parent, const int32_t *tokens, void *dst, void *user,
                    int index) {
    pthread_mutex_lock(&d->mu);
    kd_job *j = d->free_jobs;
    if (!j || d->io_stopping) {
        d->st.misses++;
        pthread_mutex_unlock(&d->mu);
        return dsi_error(DSI_EBUSY, "kv-disk: too many loads in flight");
    }
    d->free_jobs = j->next;
    d->n_in_flight++;
    j->kind = DSI_KVDISK_LOAD;
    j->hash = hash;
    j->parent = parent;
    memcpy(j->tokens, tokens, sizeof(int32_t) * (size_t)d->bt);
    j->buf = dst;
    j->user = user;
    j->index = index;
    j->fd = -1;
    push(&d->loads_head, &d->loads_tail, j);
    if (!d->use_uring) pthread_cond_signal(&d->cv_work);
    pthread_mutex_unlock(&d->mu);
    if (d->use_uring) wake_uring(d);
    return DSI_OK;
}

int dsi_kvdisk_save(dsi_kvdisk *d, uint64_t hash, uint64_t parent, const int32_t *tokens, const void *src, void *user,
                    int index) {
    pthread_mutex_lock(&d->mu);
    if (dsi__kd_index_find(&d->idx, hash) >= 0) { pthread_mutex_unlock(&d->mu); return 0; }
    kd_job *j = d->free_jobs;
    /* keep a quarter of the slots for loads: a write burst must not turn lookups into misses */
    if (!j || d->io_stopping || d->n_in_flight >= d->o.max_pending - d->o.max_pending / 4) {
        d->st.skipped_saves++;
        pthread_mutex_unlock(&d->mu);
        return 0;
    }
    d->free_jobs = j->next;
    d->n_in_flight++;
    j->kind = DSI_KVDISK_SAVE;
    j->hash = hash;
    j->parent = parent;
    memcpy(j->tokens, tokens, sizeof(int32_t) * (size_t)d->bt);
    j->buf = (void *)src;
    j->user = user;
    j->index = index;
    j->fd = -1;
    push(&d->saves_head, &d->saves_tail, j);
    pthread_cond_signal(&d->cv_work);
    pthread_mutex_unlock(&d->mu);
    return 1;
}

int dsi_kvdisk_poll(dsi_kvdisk *d, dsi_kvdisk_done *out, int max) {
    int n = 0;
    pthread_mutex_lock(&d->mu);
    while (n < max && d->done_head) {
        kd_job *j = pop(&d->done_head, &d->done_tail);
        out[n++] = (dsi_kvdisk_done){j->kind, j->status, j->hash, j->user, j->index};
        d->n_done--;
        d->n_in_flight--;
        j->next = d->free_jobs;
        d->free_jobs = j;
    }
    pthread_mutex_unlock(&d->mu);
    return n;
}

int dsi_kvdisk_wait(dsi_kvdisk *d, double timeout_s) {
    pthread_mutex_lock(&d->mu);
    if (d->n_done == 0 && d->n_in_flight > 0 && timeout_s > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double end = ts.tv_sec + ts.tv_nsec * 1e-9 + timeout_s;
        ts.tv_sec = (time_t)end;
        ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
        while (d->n_done == 0 && d->n_in_flight > 0)
            if (pthread_cond_timedwait(&d->cv_done, &d->mu, &ts) != 0) break;
    }
    int n = d->n_done;
    pthread_mutex_unlock(&d->mu);
    return n;
}

int dsi_kvdisk_in_flight(dsi_kvdisk *d) {
    pthread_mutex_lock(&d->mu);
    int n = d->n_in_flight;
    pthread_mutex_unlock(&d->mu);
    return n;
}

/* ---------------------------------------------------------------- block files */

static size_t file_bytes(const dsi_kvdisk *d) { return d->header_bytes + d->payload_bytes; }

static void set_iov(dsi_kvdisk *d, kd_job *j) {
    j->iov[0] = (struct iovec){j->hdr, d->header_bytes};
    j->iov[1] = (struct iovec){j->buf, d->payload_bytes};
}

/* Reads or writes the job's two buffers from byte `done` on, until the end
 * (or EOF for reads). Returns bytes done in total, or -1. */
static ssize_t rw_rest(dsi_kvdisk *d, kd_job *j, size_t done, int writing) {
    size_t total = file_bytes(d);
    while (done < total) {
        struct iovec iov[2];
        int n = 0;
        if (done < d->header_bytes) {
            iov[n++] = (struct iovec){j->hdr + done, d->header_bytes - done};
            iov[n++] = (struct iovec){j->buf, d->payload_bytes};
        } else {
            iov[n++] = (struct iovec){(uint8_t *)j->buf + (done - d->header_bytes), total - done};
        }
        ssize_t r = writing ? pwritev(j->fd, iov, n, (off_t)done) : preadv(j->fd, iov, n, (off_t)done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        done += (size_t)r;
    }
    return (ssize_t)done;
}

/* Verifies a read of `got` bytes (or -errno) and completes the load. */
static void finish_load(dsi_kvdisk *d, kd_job *j, ssize_t got) {
    int st;
    kd_header h;
    struct stat sb;
    if (got < 0) st = DSI_EIO;
    else if ((size_t)got < file_bytes(d) || fstat(j->fd, &sb) || (uint64_t)sb.st_size != file_bytes(d))
        st = DSI_EFORMAT; /* truncated or grown: never a whole published block */
    else if ((st = dsi__kd_header_check(d, j->hdr, j->hash, j->parent, j->tokens, &h)) == DSI_OK &&
             XXH3_64bits(j->buf, d->payload_bytes) != h.payload_xxh3)
        st = DSI_EFORMAT;
    if (st == DSI_EFORMAT) dsi__kd_drop_corrupt(d, j->hash, j->fd);
    if (st == DSI_OK) futimens(j->fd, NULL); /* the LRU clock, shared through the file system; best effort */
    close(j->fd);
    j->fd = -1;
    pthread_mutex_lock(&d->mu);
    if (st == DSI_OK) {
        dsi__kd_index_touch(&d->idx, j->hash, file_bytes(d), dsi__kd_wall());
        d->st.hits++;
        d->st.read_bytes += file_bytes(d);
    } else {
        if (st != DSI_EFORMAT) dsi__kd_index_remove(&d->idx, j->hash);
        d->st.misses++;
    }
    pthread_mutex_unlock(&d->mu);
    job_done(d, j, st);
}

/* Opens the job's file; completes the job as a miss when it is gone. */
static int open_load(dsi_kvdisk *d, kd_job *j) {
    char path[4200];
    dsi_kvdisk_path(d, j->hash, path, sizeof path);
    /* O_NONBLOCK: a FIFO put where a block file should be must not block this thread (it reads as empty) */
    j->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (j->fd >= 0) { set_iov(d, j); return 1; }
    pthread_mutex_lock(&d->mu);
    dsi__kd_index_remove(&d->idx, j->hash);
    d->st.misses++;
    pthread_mutex_unlock(&d->mu);
    job_done(d, j, DSI_ENOTFOUND);
    return 0;
}

static void run_load(dsi_kvdisk *d, kd_job *j) {
    if (open_load(d, j)) finish_load(d, j, rw_rest(d, j, 0, 0));
}

uint64_t dsi__kd_test_disk_bytes;

/* Writes the block to `tmp` and renames it to `path`; *err: errno of a failure. */
static int write_block(dsi_kvdisk *d, kd_job *j, const char *path, const char *tmp, int *err) {
    const char *slash = strrchr(path, '/');
    if (dsi__kd_test_disk_bytes) { /* tests: a disk that holds this many bytes of blocks */
        pthread_mutex_lock(&d->mu);
        int full = d->idx.bytes + file_bytes(d) > dsi__kd_test_disk_bytes;
        pthread_mutex_unlock(&d->mu);
        if (full) { *err = ENOSPC; return DSI_EIO; }
    }
    int st = DSI_OK;
    j->fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (j->fd < 0 && errno == ENOENT) { /* the fan-out folder, or all of DIR, was removed under us: make it again */
        char sub[4200];
        snprintf(sub, sizeof sub, "%.*s", (int)(slash - path), path);
        dsi__kd_mkdir_p(sub);
        j->fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    }
    *err = errno;
    if (j->fd < 0) return DSI_EIO;
    set_iov(d, j);
    if (rw_rest(d, j, 0, 1) != (ssize_t)file_bytes(d)) st = DSI_EIO;
    else if (d->o.fsync >= DSI_KVDISK_FSYNC_FILE && fsync(j->fd)) st = DSI_EIO;
    if (st != DSI_OK) *err = errno;
    if (close(j->fd)) st = DSI_EIO;
    j->fd = -1;
    if (st == DSI_OK && rename(tmp, path)) st = DSI_EIO, *err = errno;
    if (st != DSI_OK) unlink(tmp);
    return st;
}

/* Whether a failed write means the file system is full: ENOSPC or EDQUOT,
 * or (the io_uring path does not always leave errno) too little space left
 * for one more block. */
static int disk_full(dsi_kvdisk *d, int err) {
    if (err == ENOSPC || err == EDQUOT) return 1;
    struct statvfs v;
    return statvfs(d->dir, &v) == 0 && (uint64_t)v.f_bavail * v.f_frsize < 2 * (uint64_t)file_bytes(d);
}

static void run_save(dsi_kvdisk *d, kd_job *j) {
    char path[4200], tmp[4300];
    dsi_kvdisk_path(d, j->hash, path, sizeof path);
    struct stat sb;
    if (stat(path, &sb) == 0 && (uint64_t)sb.st_size == file_bytes(d)) { /* a peer wrote it */
        pthread_mutex_lock(&d->mu);
        dsi__kd_index_touch(&d->idx, j->hash, file_bytes(d), sb.st_mtim.tv_sec + sb.st_mtim.tv_nsec * 1e-9);
        pthread_mutex_unlock(&d->mu);
        job_done(d, j, DSI_OK);
        return;
    }
    dsi__kd_header_encode(d, j->hash, j->parent, j->tokens, XXH3_64bits(j->buf, d->payload_bytes), j->hdr);
    pthread_mutex_lock(&d->mu);
    unsigned long k = d->tmp_counter++;
    pthread_mutex_unlock(&d->mu);
    const char *slash = strrchr(path, '/');
    snprintf(tmp, sizeof tmp, "%.*s/" KD_TMP_PREFIX "%016llx.%016llx.%lu", (int)(slash - path), path,
             (unsigned long long)j->hash, (unsigned long long)d->nonce, k);
    int err, st = write_block(d, j, path, tmp, &err);
    /* A full disk (below --kv-disk-gb, or shared with other data): the least
     * recently used blocks make room, as the cap would, and the write is tried
     * once more; an eighth of the tier at least, so that the next writes fit too. */
    if (st != DSI_OK && disk_full(d, err)) {
        pthread_mutex_lock(&d->mu);
        uint64_t room = DSI_MAX(d->idx.bytes / 8, 4 * (uint64_t)file_bytes(d));
        pthread_mutex_unlock(&d->mu);
        int n = dsi__kd_make_room(d, room);
        if (n > 0) {
            if (!atomic_exchange(&d->full_logged, 1))
                DSI_LOG_INFO("kv-disk: the disk is full: least recently used blocks make room for new ones "
                             "(dsinfer_kv_disk_evictions_total counts them)");
            st = write_block(d, j, path, tmp, &err);
        }
    }
    /* a full or read-only disk fails every write: log when writes start and stop failing, count the rest */
    pthread_mutex_lock(&d->mu);
    int was_failing = d->write_failing;
    uint64_t n_errors = d->st.write_errors;
    if (st != DSI_OK) d->st.write_errors++;
    d->write_failing = st != DSI_OK;
    pthread_mutex_unlock(&d->mu);
    if (st != DSI_OK && !was_failing)
        DSI_LOG_WARN("kv-disk: cannot write %s: %s (blocks are not saved until writes succeed again; "
                     "dsinfer_kv_disk_write_errors_total counts them)", path, strerror(err));
    if (st == DSI_OK && was_failing)
        DSI_LOG_INFO("kv-disk: writes succeed again (%llu write errors so far)", (unsigned long long)n_errors);
    if (st == DSI_OK && d->o.fsync >= DSI_KVDISK_FSYNC_DIR) {
        char sub[4200];
        snprintf(sub, sizeof sub, "%.*s", (int)(slash - path), path);
        int dfd = open(sub, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) { fsync(dfd); close(dfd); }
    }
    if (st == DSI_OK) {
        pthread_mutex_lock(&d->mu);
        dsi__kd_index_touch(&d->idx, j->hash, file_bytes(d), dsi__kd_wall());
        d->st.written_bytes += file_bytes(d);
        d->st.written_blocks++;
        pthread_mutex_unlock(&d->mu);
        dsi__kd_enforce(d);
    }
    job_done(d, j, st);
}

/* ---------------------------------------------------------------- thread pool */

static void *worker(void *arg) {
    dsi_kvdisk *d = arg;
    pthread_mutex_lock(&d->mu);
    for (;;) {
        kd_job *j = d->use_uring ? NULL : pop(&d->loads_head, &d->loads_tail); /* loads first: latency */
        if (!j) j = pop(&d->saves_head, &d->saves_tail);
        if (j) {
            pthread_mutex_unlock(&d->mu);
            if (j->kind == DSI_KVDISK_LOAD) run_load(d, j); else run_save(d, j);
            pthread_mutex_lock(&d->mu);
            continue;
        }
        if (d->io_stopping) break;
        pthread_cond_wait(&d->cv_work, &d->mu);
    }
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

/* ---------------------------------------------------------------- io_uring */
#if DSI_HAVE_URING

/* One thread owns the ring: it submits reads for queued loads (woken by an
 * eventfd read that sits in the ring), reaps completions and verifies. */
static void *uring_loop(void *arg) {
    dsi_kvdisk *d = arg;
    struct io_uring *ring = d->uring;
    uint64_t efd_val;
    int inflight = 0, armed = 0;
    for (;;) {
        pthread_mutex_lock(&d->mu);
        int stop = d->io_stopping;
        pthread_mutex_unlock(&d->mu);
        /* feed queued loads while the ring has room */
        while (inflight < KD_URING_DEPTH - 1) {
            pthread_mutex_lock(&d->mu);
            kd_job *j = pop(&d->loads_head, &d->loads_tail);
            pthread_mutex_unlock(&d->mu);
            if (!j) break;
            if (!open_load(d, j)) continue;
            struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
            if (!sqe) { io_uring_submit(ring); sqe = io_uring_get_sqe(ring); }
            if (!sqe) { finish_load(d, j, rw_rest(d, j, 0, 0)); continue; } /* cannot happen: depth checked */
            io_uring_prep_readv(sqe, j->fd, j->iov, 2, 0);
            io_uring_sqe_set_data(sqe, j);
            inflight++;
        }
        if (stop && inflight == 0) {
            pthread_mutex_lock(&d->mu);
            int empty = !d->loads_head;
            pthread_mutex_unlock(&d->mu);
            if (empty) break;
            continue;
        }
        if (!armed && !stop) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
            if (!sqe) { io_uring_submit(ring); sqe = io_uring_get_sqe(ring); }
            if (sqe) {
                io_uring_prep_read(sqe, d->efd, &efd_val, sizeof efd_val, 0);
                io_uring_sqe_set_data(sqe, NULL);
                armed = 1;
            }
        }
        io_uring_submit(ring);
        struct io_uring_cqe *cqe;
        int rc = io_uring_wait_cqe(ring, &cqe);
        if (rc == -EINTR) continue;
        if (rc < 0) {
            DSI_LOG_ERROR("kv-disk: io_uring wait failed: %s", strerror(-rc));
            break;
        }
        unsigned head, seen = 0;
        io_uring_for_each_cqe(ring, head, cqe) {
            seen++;
            kd_job *j = io_uring_cqe_get_data(cqe);
            if (!j) { armed = 0; continue; }
            inflight--;
            ssize_t got = cqe->res;
            if (got >= 0 && (size_t)got < file_bytes(d)) got = rw_rest(d, j, (size_t)got, 0); /* short read */
            finish_load(d, j, got);
        }
        io_uring_cq_advance(ring, seen);
    }
    return NULL;
}

/* Sets up a ring and proves it works with a no-op: some container profiles
 * let io_uring_setup succeed or fail in ways only a round trip shows. */
static int uring_try(dsi_kvdisk *d, char *why, size_t cap) {
    struct io_uring *ring = calloc(1, sizeof *ring);
    if (!ring) { snprintf(why, cap, "out of memory"); return 0; }
    int rc = io_uring_queue_init(KD_URING_DEPTH, ring, 0);
    if (rc < 0) { snprintf(why, cap, "io_uring_setup: %s", strerror(-rc)); free(ring); return 0; }
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    struct io_uring_cqe *cqe = NULL;
    io_uring_prep_nop(sqe);
    rc = io_uring_submit(ring);
    if (rc == 1) rc = io_uring_wait_cqe(ring, &cqe);
    if (rc < 0 || !cqe) {
        snprintf(why, cap, "io_uring_enter: %s", strerror(rc < 0 ? -rc : EIO));
        io_uring_queue_exit(ring);
        free(ring);
        return 0;
    }
    io_uring_cqe_seen(ring, cqe);
    d->efd = eventfd(0, EFD_CLOEXEC);
    if (d->efd < 0) {
        snprintf(why, cap, "eventfd: %s", strerror(errno));
        io_uring_queue_exit(ring);
        free(ring);
        return 0;
    }
    d->uring = ring;
    return 1;
}

#else
static void *uring_loop(void *arg) { return arg; }
static int uring_try(dsi_kvdisk *d, char *why, size_t cap) {
    snprintf(why, cap, "built without liburing");
    return 0;
}
#endif

int dsi__kd_io_start(dsi_kvdisk *d) {
    char why[160] = "";
    if (d->o.io != DSI_KVDISK_IO_THREADS) {
        if (uring_try(d, why, sizeof why)) {
            d->use_uring = 1;
            if (pthread_create(&d->uring_thread, NULL, uring_loop, d) == 0) d->uring_started = 1;
            else return dsi_error(DSI_ENOMEM, "kv-disk: cannot start the io_uring thread");
        } else if (d->o.io == DSI_KVDISK_IO_URING) {
            return dsi_error(DSI_EUNSUPPORTED, "kv-disk: io_uring unavailable (%s)", why);
        } else {
            DSI_LOG_WARN("kv-disk: io_uring unavailable (%s): loads use a pread thread pool", why);
        }
    }
    d->workers = calloc(d->o.io_threads, sizeof(pthread_t));
    if (!d->workers) return dsi_error(DSI_ENOMEM, "out of memory");
    for (int i = 0; i < d->o.io_threads; i++) {
        if (pthread_create(&d->workers[i], NULL, worker, d)) return dsi_error(DSI_ENOMEM, "kv-disk: cannot start threads");
        d->n_workers++;
    }
    return DSI_OK;
}

void dsi__kd_io_stop(dsi_kvdisk *d) {
    pthread_mutex_lock(&d->mu);
    d->io_stopping = 1;
    pthread_cond_broadcast(&d->cv_work);
    pthread_mutex_unlock(&d->mu);
    if (d->uring_started) {
        wake_uring(d);
        pthread_join(d->uring_thread, NULL);
    }
    for (int i = 0; i < d->n_workers; i++) pthread_join(d->workers[i], NULL);
    free(d->workers);
    d->workers = NULL;
    d->n_workers = 0;
#if DSI_HAVE_URING
    if (d->uring) {
        io_uring_queue_exit(d->uring);
        free(d->uring);
        d->uring = NULL;
    }
#endif
    if (d->efd >= 0) close(d->efd);
    d->efd = -1;
}
