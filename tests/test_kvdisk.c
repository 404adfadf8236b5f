/* The disk KV tier: write/read/verify on both I/O backends, damaged files
 * (corrupt, truncated, torn header) are misses and deleted, collisions are
 * misses and kept, the index is rebuilt from a directory scan (stale
 * temporary files removed), LRU and TTL eviction, two stores on one
 * directory, and the scheduler serving a prompt from disk after its memory
 * cache is gone. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "dsinfer/kvdisk.h"
#include "dsinfer/prefix_cache.h"
#include "dsinfer/sched.h"

#define L 2
#define DIM 8
#define BT 64
#define FP 0x1234abcdull

static char g_dir[256];

static int setup(void **state) {
    snprintf(g_dir, sizeof g_dir, "/tmp/dsi_test_kvdisk_XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    return system(cmd);
}

/* a fresh subdirectory per test */
static const char *subdir(const char *name) {
    static char p[300];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    return p;
}

static dsi_kvdisk *open_store(const char *dir, int io, uint64_t cap, double ttl) {
    dsi_kvdisk_opts o = dsi_kvdisk_default_opts();
    o.dir = dir;
    o.io = io;
    o.io_threads = 2;
    o.rescan_s = -1; /* tests rescan by hand */
    if (cap) o.capacity_bytes = cap;
    o.ttl_s = ttl;
    dsi_kvdisk *d = NULL;
    int rc = dsi_kvdisk_open(&o, FP, L, DIM, BT, &d);
    if (rc == DSI_EUNSUPPORTED && io == DSI_KVDISK_IO_URING) {
        print_message("io_uring unavailable here: %s\n", dsi_last_error());
        skip();
    }
    if (rc != DSI_OK) print_error("open: %s\n", dsi_last_error());
    assert_int_equal(rc, DSI_OK);
    return d;
}

/* A block: tokens and payload from a seed; its chain hash from parent. */
typedef struct blk {
    int32_t tokens[BT];
    float kv[L * BT * DIM];
    uint64_t parent, hash;
} blk;

static void make_blk(blk *b, int seed, uint64_t parent) {
    for (int i = 0; i < BT; i++) b->tokens[i] = (seed * 131 + i * 37) % 1000;
    for (int i = 0; i < L * BT * DIM; i++) b->kv[i] = (float)((seed * 7919 + i * 104729) % 2001) / 1000.0f - 1.0f;
    b->parent = parent;
    b->hash = dsi_prefix_block_hash(parent, FP, b->tokens, BT);
}

/* Polls until one job is done; returns it. */
static dsi_kvdisk_done wait_one(dsi_kvdisk *d) {
    dsi_kvdisk_done done;
    for (int i = 0; i < 1000; i++) {
        if (dsi_kvdisk_poll(d, &done, 1) == 1) return done;
        dsi_kvdisk_wait(d, 0.01);
    }
    fail_msg("no completion");
    return done;
}

static void save_sync(dsi_kvdisk *d, const blk *b) {
    assert_int_equal(dsi_kvdisk_save(d, b->hash, b->parent, b->tokens, b->kv, NULL, 7), 1);
    dsi_kvdisk_done done = wait_one(d);
    assert_int_equal(done.kind, DSI_KVDISK_SAVE);
    assert_int_equal(done.status, DSI_OK);
    assert_int_equal(done.index, 7);
}

/* Loads b into a buffer; returns the status and checks the bytes on success. */
static int load_sync(dsi_kvdisk *d, const blk *b) {
    float buf[L * BT * DIM];
    memset(buf, 0, sizeof buf);
    int x = 42;
    assert_int_equal(dsi_kvdisk_load(d, b->hash, b->parent, b->tokens, buf, &x, 3), DSI_OK);
    dsi_kvdisk_done done = wait_one(d);
    assert_int_equal(done.kind, DSI_KVDISK_LOAD);
    assert_ptr_equal(done.user, &x);
    assert_int_equal(done.index, 3);
    assert_true(done.hash == b->hash);
    if (done.status == DSI_OK) assert_memory_equal(buf, b->kv, sizeof buf);
    return done.status;
}

static int exists(dsi_kvdisk *d, uint64_t hash) {
    char path[4300];
    dsi_kvdisk_path(d, hash, path, sizeof path);
    return access(path, F_OK) == 0;
}

static void roundtrip(int io, const char *name) {
    dsi_kvdisk *d = open_store(subdir(name), io, 0, 0);
    assert_string_equal(dsi_kvdisk_backend(d), io == DSI_KVDISK_IO_URING ? "io_uring" : "threads");
    assert_int_equal(dsi_kvdisk_block_bytes(d), sizeof(float) * L * BT * DIM);
    blk a, b;
    make_blk(&a, 1, 0);
    make_blk(&b, 2, a.hash);
    assert_int_equal(dsi_kvdisk_contains(d, a.hash), 0);
    assert_int_equal(dsi_kvdisk_probe(d, a.hash), 0);
    save_sync(d, &a);
    save_sync(d, &b);
    assert_int_equal(dsi_kvdisk_save(d, a.hash, a.parent, a.tokens, a.kv, NULL, 0), 0); /* known: skipped */
    assert_int_equal(dsi_kvdisk_contains(d, a.hash), 1);
    assert_int_equal(dsi_kvdisk_probe(d, b.hash), 1);
    assert_int_equal(load_sync(d, &a), DSI_OK);
    assert_int_equal(load_sync(d, &b), DSI_OK);
    /* many loads at once: all land, all verified */
    static float bufs[40][L * BT * DIM];
    for (int i = 0; i < 40; i++)
        assert_int_equal(dsi_kvdisk_load(d, (i & 1 ? b : a).hash, (i & 1 ? b : a).parent, (i & 1 ? b : a).tokens,
                                         bufs[i], NULL, i), DSI_OK);
    int seen = 0;
    while (seen < 40) {
        dsi_kvdisk_done done[16];
        dsi_kvdisk_wait(d, 0.1);
        int n = dsi_kvdisk_poll(d, done, 16);
        for (int k = 0; k < n; k++) {
            assert_int_equal(done[k].status, DSI_OK);
            assert_memory_equal(bufs[done[k].index], (done[k].index & 1 ? b : a).kv, sizeof bufs[0]);
        }
        seen += n;
    }
    assert_int_equal(dsi_kvdisk_in_flight(d), 0);
    dsi_kvdisk_stats st;
    dsi_kvdisk_get_stats(d, &st);
    assert_int_equal(st.n_blocks, 2);
    assert_int_equal(st.written_blocks, 2);
    assert_int_equal(st.hits, 42);
    assert_int_equal(st.corrupt, 0);
    assert_true(st.read_bytes >= 42 * dsi_kvdisk_block_bytes(d));
    dsi_kvdisk_close(d);
}

static void test_roundtrip_uring(void **state) { roundtrip(DSI_KVDISK_IO_URING, "uring"); }
static void test_roundtrip_threads(void **state) { roundtrip(DSI_KVDISK_IO_THREADS, "threads"); }

static void damage(dsi_kvdisk *d, uint64_t hash, long offset, int truncate_to_half) {
    char path[4300];
    dsi_kvdisk_path(d, hash, path, sizeof path);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    int fd = open(path, O_WRONLY);
    assert_true(fd >= 0);
    if (truncate_to_half) assert_int_equal(ftruncate(fd, sb.st_size / 2), 0);
    else {
        unsigned char x = 0x5a;
        assert_int_equal(pwrite(fd, &x, 1, offset < 0 ? sb.st_size + offset : offset), 1);
    }
    close(fd);
}

static void damaged(int io, const char *name) {
    dsi_kvdisk *d = open_store(subdir(name), io, 0, 0);
    blk b[5];
    for (int i = 0; i < 5; i++) {
        make_blk(&b[i], 10 + i, i ? b[i - 1].hash : 0);
        save_sync(d, &b[i]);
    }
    damage(d, b[0].hash, -5, 0);      /* payload byte */
    damage(d, b[1].hash, 20, 0);      /* header byte (parent field) */
    damage(d, b[2].hash, 0, 1);       /* truncated */
    assert_int_equal(load_sync(d, &b[0]), DSI_EFORMAT);
    assert_false(exists(d, b[0].hash));
    assert_int_equal(load_sync(d, &b[1]), DSI_EFORMAT);
    assert_false(exists(d, b[1].hash));
    assert_int_equal(load_sync(d, &b[2]), DSI_EFORMAT); /* a load without a probe still checks the size */
    assert_false(exists(d, b[2].hash));
    /* a truncated file seen by probe: a miss, deleted */
    damage(d, b[3].hash, 0, 1);
    assert_int_equal(dsi_kvdisk_probe(d, b[3].hash), 0);
    assert_false(exists(d, b[3].hash));
    /* a whole block for other tokens (a collision) or another parent: a miss, kept */
    blk other = b[4];
    other.tokens[5]++;
    assert_int_equal(load_sync(d, &other), DSI_ENOTFOUND);
    other = b[4];
    other.parent ^= 1;
    assert_int_equal(load_sync(d, &other), DSI_ENOTFOUND);
    assert_true(exists(d, b[4].hash));
    assert_int_equal(load_sync(d, &b[4]), DSI_OK);
    /* gone since: a miss */
    blk never;
    make_blk(&never, 99, 0);
    assert_int_equal(load_sync(d, &never), DSI_ENOTFOUND);
    dsi_kvdisk_stats st;
    dsi_kvdisk_get_stats(d, &st);
    assert_int_equal(st.corrupt, 4);
    assert_int_equal(st.n_blocks, 1);
    /* rewritten after the damage: whole again */
    save_sync(d, &b[0]);
    assert_int_equal(load_sync(d, &b[0]), DSI_OK);
    dsi_kvdisk_close(d);
}

static void test_damaged_uring(void **state) { damaged(DSI_KVDISK_IO_URING, "dmg_uring"); }
static void test_damaged_threads(void **state) { damaged(DSI_KVDISK_IO_THREADS, "dmg_threads"); }

static void set_mtime(dsi_kvdisk *d, uint64_t hash, double ago_s) {
    char path[4300];
    dsi_kvdisk_path(d, hash, path, sizeof path);
    struct timespec ts[2];
    clock_gettime(CLOCK_REALTIME, &ts[0]);
    ts[0].tv_sec -= (time_t)ago_s;
    ts[1] = ts[0];
    assert_int_equal(utimensat(AT_FDCWD, path, ts, 0), 0);
}

static void test_index_rebuild(void **state) {
    const char *dir = subdir("rebuild");
    dsi_kvdisk *d = open_store(dir, DSI_KVDISK_IO_AUTO, 0, 0);
    blk b[20];
    for (int i = 0; i < 20; i++) {
        make_blk(&b[i], 100 + i, 0);
        save_sync(d, &b[i]);
    }
    dsi_kvdisk_stats st;
    dsi_kvdisk_get_stats(d, &st);
    uint64_t bytes = st.bytes;
    assert_int_equal(bytes, 20 * (dsi_kvdisk_block_bytes(d) + 88 + 4 * BT));
    /* a crashed writer's temporary file (old) and a live one (new); junk names are ignored */
    char path[4300], stale[4400], live[4400], junk[4400];
    dsi_kvdisk_path(d, b[0].hash, path, sizeof path);
    *strrchr(path, '/') = 0;
    snprintf(stale, sizeof stale, "%s/.tmp.dead.1.1", path);
    snprintf(live, sizeof live, "%s/.tmp.live.1.2", path);
    snprintf(junk, sizeof junk, "%s/notablock.txt", path);
    dsi_kvdisk_close(d);
    const char *files[3] = {stale, live, junk};
    for (int i = 0; i < 3; i++) {
        FILE *f = fopen(files[i], "w");
        assert_non_null(f);
        fputs("x", f);
        fclose(f);
    }
    struct timespec ts[2] = {{.tv_sec = time(NULL) - 3600}, {.tv_sec = time(NULL) - 3600}};
    assert_int_equal(utimensat(AT_FDCWD, stale, ts, 0), 0);
    d = open_store(dir, DSI_KVDISK_IO_AUTO, 0, 0);
    dsi_kvdisk_get_stats(d, &st);
    assert_int_equal(st.n_blocks, 20);
    assert_int_equal(st.bytes, bytes);
    assert_int_equal(st.scans, 1);
    assert_int_equal(access(stale, F_OK), -1);
    assert_int_equal(access(live, F_OK), 0);
    assert_int_equal(access(junk, F_OK), 0);
    for (int i = 0; i < 20; i++) assert_int_equal(load_sync(d, &b[i]), DSI_OK);
    /* LRU order survives a restart through mtimes: the 5 oldest go when the cap shrinks */
    for (int i = 0; i < 20; i++) set_mtime(d, b[i].hash, 1000 - i);
    dsi_kvdisk_close(d);
    d = open_store(dir, DSI_KVDISK_IO_AUTO, bytes / 20 * 15, 0);
    dsi_kvdisk_get_stats(d, &st);
    assert_int_equal(st.n_blocks, 15);
    assert_int_equal(st.evictions, 5);
    for (int i = 0; i < 20; i++) assert_int_equal(exists(d, b[i].hash), i >= 5);
    dsi_kvdisk_close(d);
}

static void test_lru_and_ttl(void **state) {
    size_t file = sizeof(float) * L * BT * DIM + 88 + 4 * BT;
    dsi_kvdisk *d = open_store(subdir("lru"), DSI_KVDISK_IO_AUTO, 3 * file, 0);
    blk b[5];
    for (int i = 0; i < 5; i++) make_blk(&b[i], 200 + i, 0);
    save_sync(d, &b[0]);
    save_sync(d, &b[1]);
    save_sync(d, &b[2]);
    assert_int_equal(load_sync(d, &b[0]), DSI_OK); /* b[0] is now the most recent */
    save_sync(d, &b[3]);                            /* over the cap: b[1], the least recently used, goes */
    assert_true(exists(d, b[0].hash));
    assert_false(exists(d, b[1].hash));
    assert_true(exists(d, b[2].hash));
    assert_true(exists(d, b[3].hash));
    dsi_kvdisk_stats st;
    dsi_kvdisk_get_stats(d, &st);
    assert_int_equal(st.evictions, 1);
    assert_int_equal(st.n_blocks, 3);
    assert_true(st.bytes <= 3 * file);
    dsi_kvdisk_close(d);

    d = open_store(subdir("ttl"), DSI_KVDISK_IO_AUTO, 0, 100);
    for (int i = 0; i < 5; i++) save_sync(d, &b[i]);
    set_mtime(d, b[1].hash, 1000);
    set_mtime(d, b[3].hash, 500);
    assert_int_equal(dsi_kvdisk_rescan(d), DSI_OK);
    for (int i = 0; i < 5; i++) assert_int_equal(exists(d, b[i].hash), i != 1 && i != 3);
    dsi_kvdisk_get_stats(d, &st);
    assert_int_equal(st.n_blocks, 3);
    assert_int_equal(st.evictions, 2);
    dsi_kvdisk_close(d);
}

static void test_two_stores_one_dir(void **state) {
    const char *dir = subdir("shared");
    dsi_kvdisk *a = open_store(dir, DSI_KVDISK_IO_URING, 0, 0);
    dsi_kvdisk *b = open_store(dir, DSI_KVDISK_IO_THREADS, 0, 0);
    blk x, y;
    make_blk(&x, 300, 0);
    make_blk(&y, 301, x.hash);
    save_sync(a, &x);
    /* b scanned before a wrote: found through the file system */
    assert_int_equal(dsi_kvdisk_contains(b, x.hash), 1);
    assert_int_equal(dsi_kvdisk_probe(b, x.hash), 1);
    assert_int_equal(load_sync(b, &x), DSI_OK);
    save_sync(b, &y);
    assert_int_equal(load_sync(a, &y), DSI_OK);
    /* both write the same block at once: one whole file either way */
    blk z;
    make_blk(&z, 302, y.hash);
    assert_int_equal(dsi_kvdisk_save(a, z.hash, z.parent, z.tokens, z.kv, NULL, 0), 1);
    assert_int_equal(dsi_kvdisk_save(b, z.hash, z.parent, z.tokens, z.kv, NULL, 0), 1);
    assert_int_equal(wait_one(a).status, DSI_OK);
    assert_int_equal(wait_one(b).status, DSI_OK);
    assert_int_equal(load_sync(a, &z), DSI_OK);
    assert_int_equal(load_sync(b, &z), DSI_OK);
    /* a evicts (unlinks) what b's index still lists: b misses cleanly */
    char path[4300];
    dsi_kvdisk_path(a, x.hash, path, sizeof path);
    assert_int_equal(unlink(path), 0);
    assert_int_equal(load_sync(b, &x), DSI_ENOTFOUND);
    assert_int_equal(dsi_kvdisk_probe(b, x.hash), 0);
    /* a rescan brings in the peer's deletions and writes */
    assert_int_equal(dsi_kvdisk_rescan(a), DSI_OK);
    dsi_kvdisk_stats st;
    dsi_kvdisk_get_stats(a, &st);
    assert_int_equal(st.n_blocks, 2);
    dsi_kvdisk_close(a);
    dsi_kvdisk_close(b);
}

/* DIR removed while the store runs (a cache cleared by hand): writes make the
 * folders again instead of failing until a restart. */
static void test_dir_removed(void **state) {
    const char *dir = subdir("removed");
    dsi_kvdisk *d = open_store(dir, DSI_KVDISK_IO_THREADS, 0, 0);
    blk a, b;
    make_blk(&a, 400, 0);
    make_blk(&b, 401, a.hash);
    save_sync(d, &a);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(load_sync(d, &a), DSI_ENOTFOUND);
    save_sync(d, &b);
    assert_true(exists(d, b.hash));
    assert_int_equal(load_sync(d, &b), DSI_OK);
    dsi_kvdisk_close(d);
}

/* Writes that fail (here a fan-out folder that is a file: ENOTDIR, as a full
 * or read-only disk fails them) complete as DSI_EIO and are counted; a write
 * that works again lands. */
static void test_write_errors(void **state) {
    dsi_kvdisk *d = open_store(subdir("werr"), DSI_KVDISK_IO_THREADS, 0, 0);
    blk a;
    make_blk(&a, 500, 0);
    char path[4300];
    dsi_kvdisk_path(d, a.hash, path, sizeof path);
    *strrchr(path, '/') = 0;
    assert_int_equal(rmdir(path), 0);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fclose(f);
    for (int i = 1; i <= 2; i++) {
        assert_int_equal(dsi_kvdisk_save(d, a.hash, a.parent, a.tokens, a.kv, NULL, 0), 1);
        assert_int_equal(wait_one(d).status, DSI_EIO);
        dsi_kvdisk_stats st;
        dsi_kvdisk_get_stats(d, &st);
        assert_int_equal(st.write_errors, i);
        assert_int_equal(st.written_blocks, 0);
    }
    assert_int_equal(unlink(path), 0);
    save_sync(d, &a);
    assert_int_equal(load_sync(d, &a), DSI_OK);
    dsi_kvdisk_stats st;
    dsi_kvdisk_get_stats(d, &st);
    assert_int_equal(st.write_errors, 2);
    dsi_kvdisk_close(d);
}

/* A disk that fills below the cap (dsi__kd_test_disk_bytes: a file system
 * that holds four blocks): the least recently used blocks make room and the
 * write is tried again, so the newest blocks are saved and the oldest go;
 * nothing counts as a write error. */
extern uint64_t dsi__kd_test_disk_bytes;
static void disk_full(int io, const char *name) {
    dsi_kvdisk *d = open_store(subdir(name), io, 0, 0);
    blk b[8];
    uint64_t parent = 0;
    for (int i = 0; i < 8; i++) make_blk(&b[i], 700 + i, parent), parent = b[i].hash;
    save_sync(d, &b[0]);
    dsi_kvdisk_stats st;
    dsi_kvdisk_get_stats(d, &st);
    dsi__kd_test_disk_bytes = 4 * st.bytes;
    int status[8];
    for (int i = 1; i < 8; i++) {
        assert_int_equal(dsi_kvdisk_save(d, b[i].hash, b[i].parent, b[i].tokens, b[i].kv, NULL, 0), 1);
        status[i] = wait_one(d).status;
    }
    dsi__kd_test_disk_bytes = 0; /* before any assertion: the later tests have a disk of their own */
    for (int i = 1; i < 8; i++) assert_int_equal(status[i], DSI_OK);
    dsi_kvdisk_get_stats(d, &st);
    assert_int_equal(st.write_errors, 0);
    assert_int_equal(st.written_blocks, 8);
    assert_true(st.evictions >= 4);
    assert_true(st.n_blocks <= 4);
    assert_int_equal(load_sync(d, &b[7]), DSI_OK); /* the newest is there */
    assert_false(exists(d, b[0].hash));            /* the oldest made room */
    dsi_kvdisk_close(d);
}
static void test_disk_full_uring(void **state) { disk_full(DSI_KVDISK_IO_URING, "full_uring"); }
static void test_disk_full_threads(void **state) { disk_full(DSI_KVDISK_IO_THREADS, "full_threads"); }

/* A FIFO where a block file should be (swapped in after the probe): the
 * load is a miss, not an I/O thread blocked in open(2) for good; a save
 * replaces it. */
static void fifo_block(int io, const char *name) {
    dsi_kvdisk *d = open_store(subdir(name), io, 0, 0);
    blk a;
    make_blk(&a, 600, 0);
    char path[4300];
    dsi_kvdisk_path(d, a.hash, path, sizeof path);
    assert_int_equal(mkfifo(path, 0644), 0);
    assert_int_not_equal(load_sync(d, &a), DSI_OK);
    save_sync(d, &a);
    assert_int_equal(load_sync(d, &a), DSI_OK);
    dsi_kvdisk_close(d);
}
static void test_fifo_block_uring(void **state) { fifo_block(DSI_KVDISK_IO_URING, "fifo_uring"); }
static void test_fifo_block_threads(void **state) { fifo_block(DSI_KVDISK_IO_THREADS, "fifo_threads"); }

static void test_bad_options(void **state) {
    dsi_kvdisk *d;
    dsi_kvdisk_opts o = dsi_kvdisk_default_opts();
    assert_int_equal(dsi_kvdisk_open(&o, FP, L, DIM, BT, &d), DSI_EINVAL); /* no dir */
    assert_null(d);
    o.dir = "/proc/definitely/not/writable";
    assert_int_equal(dsi_kvdisk_open(&o, FP, L, DIM, BT, &d), DSI_EIO);
    o.dir = subdir("bad");
    assert_int_equal(dsi_kvdisk_open(&o, FP, 0, DIM, BT, &d), DSI_EINVAL);
    o.fsync = 7;
    assert_int_equal(dsi_kvdisk_open(&o, FP, L, DIM, BT, &d), DSI_EINVAL);
    o.fsync = 0;
    /* the rescan thread's deadline must fit a time_t: an infinite or huge period used to spin it */
    const double bad_rescan[] = {INFINITY, 1e300, NAN};
    for (int i = 0; i < 3; i++) {
        o.rescan_s = bad_rescan[i];
        assert_int_equal(dsi_kvdisk_open(&o, FP, L, DIM, BT, &d), DSI_EINVAL);
        assert_null(d);
    }
    o.rescan_s = 0;
    o.ttl_s = NAN;
    assert_int_equal(dsi_kvdisk_open(&o, FP, L, DIM, BT, &d), DSI_EINVAL);
    dsi_kvdisk_close(NULL);
}

/* ---------------------------------------------------------------- with the scheduler */

typedef struct result {
    int32_t tokens[64];
    int n, finished, cached;
} result;

static int on_event(void *user, const dsi_sched_event *ev) {
    result *r = user;
    if (ev->type == DSI_SCHED_TOKEN) r->tokens[r->n++] = ev->token;
    else { r->finished = 1; r->cached = ev->cached_tokens; }
    return 0;
}

/* Serves one greedy request on a fresh pool, engine and scheduler (so the
 * memory cache starts empty) with disk store d. */
static void serve_once(dsi_model *m, dsi_kvdisk *d, const int32_t *prompt, int n, result *out, dsi_sched_stats *st) {
    const dsi_config *c = dsi_model_config(m);
    dsi_kv_pool *kv;
    dsi_engine *e;
    dsi_sched *s;
    assert_int_equal(dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, 32, &kv), DSI_OK);
    dsi_engine_opts eo = {.n_threads = 1, .max_tokens = 128};
    assert_int_equal(dsi_engine_create(m, kv, &eo, &e), DSI_OK);
    dsi_sched_opts so = {.disk = d};
    assert_int_equal(dsi_sched_create(e, &so, &s), DSI_OK);
    dsi_request_params p = {.prompt = prompt, .n_prompt = n, .max_tokens = 8};
    memset(out, 0, sizeof *out);
    assert_int_equal(dsi_sched_submit(s, &p, on_event, out, NULL), DSI_OK);
    for (int i = 0; i < 10000 && dsi_sched_step(s) > 0; i++) {}
    assert_int_equal(out->finished, 1);
    dsi_sched_get_stats(s, st);
    assert_int_equal(st->n_loading, 0);
    dsi_sched_destroy(s);
    assert_int_equal(dsi_kv_n_free(kv), 32); /* written blocks were released */
    dsi_engine_destroy(e);
    dsi_kv_pool_destroy(kv);
}

static void test_sched_from_disk(void **state) {
    dsi_config c;
    dsi_model *m;
    dsi_config_preset(DSI_PRESET_TINY, 0, 1, &c);
    assert_int_equal(dsi_make_model_memory(&c, 20250227ull, &m), DSI_OK);
    const dsi_config *mc = dsi_model_config(m);
    dsi_kvdisk_opts o = dsi_kvdisk_default_opts();
    o.dir = subdir("sched");
    o.rescan_s = -1;
    dsi_kvdisk *d;
    assert_int_equal(dsi_kvdisk_open(&o, dsi_model_fingerprint(m), mc->n_layers, dsi_config_kv_dim(mc),
                                     DSI_KV_BLOCK_TOKENS, &d), DSI_OK);
    int32_t prompt[300];
    for (int i = 0; i < 300; i++) prompt[i] = (i * 37 + 5) % 2000;
    result cold, warm, part;
    dsi_sched_stats st;
    serve_once(m, d, prompt, 300, &cold, &st);
    assert_int_equal(cold.cached, 0);
    dsi_kvdisk_stats ds;
    dsi_kvdisk_get_stats(d, &ds);
    assert_int_equal(ds.written_blocks, 4); /* 300 prompt + 7 fed back: 4 full blocks; the partial one is not written */
    serve_once(m, d, prompt, 300, &warm, &st);
    assert_int_equal(warm.cached, 256);
    assert_int_equal(st.disk_cached_tokens, 256);
    assert_int_equal(st.cached_tokens, 256);
    assert_int_equal(warm.n, cold.n);
    assert_memory_equal(warm.tokens, cold.tokens, sizeof(int32_t) * cold.n);
    /* block 2 damaged: blocks 0-1 load, 2-3 are computed (and block 2 rewritten), output unchanged */
    uint64_t h = 0;
    for (int b = 0; b < 3; b++) h = dsi_prefix_block_hash(h, dsi_model_fingerprint(m), prompt + 64 * b, 64);
    damage(d, h, -100, 0);
    serve_once(m, d, prompt, 300, &part, &st);
    assert_int_equal(part.cached, 128);
    assert_memory_equal(part.tokens, cold.tokens, sizeof(int32_t) * cold.n);
    dsi_kvdisk_get_stats(d, &ds);
    assert_int_equal(ds.corrupt, 1);
    assert_int_equal(ds.written_blocks, 5);
    /* cancelled while its loads are in flight: finished once they land, every block freed */
    {
        const dsi_config *c = dsi_model_config(m);
        dsi_kv_pool *kv;
        dsi_engine *e;
        dsi_sched *s;
        assert_int_equal(dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, 32, &kv), DSI_OK);
        dsi_engine_opts eo = {.n_threads = 1, .max_tokens = 128};
        assert_int_equal(dsi_engine_create(m, kv, &eo, &e), DSI_OK);
        dsi_sched_opts so = {.disk = d};
        assert_int_equal(dsi_sched_create(e, &so, &s), DSI_OK);
        dsi_request_params p = {.prompt = prompt, .n_prompt = 300, .max_tokens = 8};
        result r = {0};
        uint64_t id;
        assert_int_equal(dsi_sched_submit(s, &p, on_event, &r, &id), DSI_OK);
        assert_true(dsi_sched_step(s) > 0); /* admitted: loading */
        dsi_sched_get_stats(s, &st);
        assert_int_equal(st.n_loading, 1);
        assert_int_equal(st.n_running, 0);
        dsi_sched_cancel(s, id);
        for (int i = 0; i < 10000 && dsi_sched_step(s) > 0; i++) {}
        assert_int_equal(r.finished, 1);
        assert_int_equal(r.n, 0);
        dsi_sched_get_stats(s, &st);
        assert_int_equal(st.finished[DSI_FINISH_CANCELLED], 1);
        assert_int_equal(st.n_loading, 0);
        assert_int_equal(st.kv_blocks_used, 0);
        dsi_sched_destroy(s);
        assert_int_equal(dsi_kv_n_free(kv), 32);
        dsi_engine_destroy(e);
        dsi_kv_pool_destroy(kv);
    }
    /* a decoding request keeps getting tokens in the step that starts another's loads */
    {
        const dsi_config *c = dsi_model_config(m);
        dsi_kv_pool *kv;
        dsi_engine *e;
        dsi_sched *s;
        assert_int_equal(dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, 32, &kv), DSI_OK);
        dsi_engine_opts eo = {.n_threads = 1, .max_tokens = 128};
        assert_int_equal(dsi_engine_create(m, kv, &eo, &e), DSI_OK);
        dsi_sched_opts so = {.disk = d};
        assert_int_equal(dsi_sched_create(e, &so, &s), DSI_OK);
        int32_t other[40];
        for (int i = 0; i < 40; i++) other[i] = (i * 53 + 901) % 2000;
        dsi_request_params pa = {.prompt = other, .n_prompt = 40, .max_tokens = 20};
        dsi_request_params pb = {.prompt = prompt, .n_prompt = 300, .max_tokens = 8};
        result ra = {0}, rb = {0};
        assert_int_equal(dsi_sched_submit(s, &pa, on_event, &ra, NULL), DSI_OK);
        while (ra.n < 2) assert_true(dsi_sched_step(s) > 0);
        assert_int_equal(dsi_sched_submit(s, &pb, on_event, &rb, NULL), DSI_OK);
        int before = ra.n;
        assert_true(dsi_sched_step(s) > 0);
        dsi_sched_get_stats(s, &st);
        assert_int_equal(st.n_loading, 1);  /* b waits for its blocks ... */
        assert_int_equal(ra.n, before + 1); /* ... while a decodes */
        for (int i = 0; i < 10000 && dsi_sched_step(s) > 0; i++) {}
        assert_int_equal(ra.finished, 1);
        assert_int_equal(ra.n, 20);
        assert_int_equal(rb.cached, 256);
        assert_int_equal(rb.n, cold.n);
        assert_memory_equal(rb.tokens, cold.tokens, sizeof(int32_t) * cold.n);
        dsi_sched_destroy(s);
        dsi_engine_destroy(e);
        dsi_kv_pool_destroy(kv);
    }
    dsi_kvdisk_close(d);
    dsi_model_destroy(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_uring),
        cmocka_unit_test(test_roundtrip_threads),
        cmocka_unit_test(test_damaged_uring),
        cmocka_unit_test(test_damaged_threads),
        cmocka_unit_test(test_index_rebuild),
        cmocka_unit_test(test_lru_and_ttl),
        cmocka_unit_test(test_two_stores_one_dir),
        cmocka_unit_test(test_dir_removed),
        cmocka_unit_test(test_write_errors),
        cmocka_unit_test(test_fifo_block_uring),
        cmocka_unit_test(test_disk_full_uring),
        cmocka_unit_test(test_disk_full_threads),
        cmocka_unit_test(test_fifo_block_threads),
        cmocka_unit_test(test_bad_options),
        cmocka_unit_test(test_sched_from_disk),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
