/* The disk KV tier on a checkpoint (default: the `small` preset at
 * /tmp/small, made by
 *     build/dsinfer make-model --preset small --dtype fp8 --out /tmp/small):
 *
 * 1. time to first token of a 2,000-token prompt computed cold (the run that
 *    writes its blocks to disk), then served from disk by a fresh pool and
 *    scheduler (a restart: the memory cache is empty), then from the memory
 *    prefix cache, with the ratios;
 * 2. the disk tier's read throughput (all the prompt's blocks queued at once,
 *    page cache dropped first, io_uring and thread-pool backends) against the
 *    file system's sequential read bandwidth measured in the same run with
 *    `dd iflag=direct` on a file of the same folder.
 *
 * The page cache is dropped with /proc/sys/vm/drop_caches when writable, else
 * per file with fdatasync + posix_fadvise(DONTNEED); the line "page cache:"
 * says which worked.
 *
 * usage: bench_kvdisk [MODEL_DIR] [DISK_DIR (default /var/tmp/dsi_bench_kvdisk)] [prompt tokens (2000)] [threads (0 = all)] */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dsinfer/sched.h"

typedef struct counter { int tokens, finished, cached; double t_first; } counter;

static int on_event(void *user, const dsi_sched_event *ev) {
    counter *c = user;
    if (ev->type == DSI_SCHED_TOKEN) {
        if (c->tokens++ == 0) c->t_first = dsi_now();
    } else {
        c->finished = 1;
        c->cached = ev->cached_tokens;
    }
    return 0;
}

static void die(const char *what) {
    fprintf(stderr, "bench_kvdisk: %s: %s\n", what, dsi_last_error());
    exit(1);
}

/* Submits the prompt for one token and steps until it arrives: the TTFT. */
static double ttft(dsi_sched *s, const int32_t *prompt, int n, int *cached) {
    counter c = {0};
    dsi_request_params p = {.prompt = prompt, .n_prompt = n, .max_tokens = 1};
    double t0 = dsi_now();
    if (dsi_sched_submit(s, &p, on_event, &c, NULL)) die("submit");
    while (!c.finished)
        if (dsi_sched_step(s) < 0) die("step");
    *cached = c.cached;
    return c.t_first - t0;
}

typedef struct rig { dsi_kv_pool *kv; dsi_engine *e; dsi_sched *s; } rig;

static void rig_open(rig *g, dsi_model *m, dsi_kvdisk *d, int threads) {
    const dsi_config *c = dsi_model_config(m);
    if (dsi_kv_pool_create(c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, 64, &g->kv)) die("pool");
    dsi_engine_opts eo = {.n_threads = threads, .max_tokens = 512};
    if (dsi_engine_create(m, g->kv, &eo, &g->e)) die("engine");
    dsi_sched_opts so = {.disk = d};
    if (dsi_sched_create(g->e, &so, &g->s)) die("scheduler");
}

static void rig_close(rig *g) {
    dsi_sched_destroy(g->s); /* waits for the disk writes */
    dsi_engine_destroy(g->e);
    dsi_kv_pool_destroy(g->kv);
}

/* Evicts one file's pages from the page cache. */
static int fadvise_out(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    fdatasync(fd);
    int rc = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    return rc;
}

/* Drops the page cache for the block files under dir/v1 (and `extra`).
 * Returns a word for the report. */
static const char *drop_cache(const char *dir, const char *extra) {
    sync();
    FILE *f = fopen("/proc/sys/vm/drop_caches", "w");
    if (f && fputs("3\n", f) >= 0 && fclose(f) == 0) return "dropped (drop_caches)";
    int ok = 1;
    for (int sub = 0; sub < 256; sub++) {
        char p[4096];
        snprintf(p, sizeof p, "%s/v1/%02x", dir, sub);
        DIR *dd = opendir(p);
        if (!dd) continue;
        struct dirent *de;
        while ((de = readdir(dd))) {
            if (de->d_name[0] == '.') continue;
            char fp[8192];
            snprintf(fp, sizeof fp, "%s/%s", p, de->d_name);
            if (fadvise_out(fp)) ok = 0;
        }
        closedir(dd);
    }
    if (extra && fadvise_out(extra)) ok = 0;
    return ok ? "dropped per file (fadvise DONTNEED; drop_caches not writable)" : "NOT dropped (figures are page-cache reads)";
}

/* Loads every block of the prompt's chain through a store; returns bytes/s. */
static double read_throughput(dsi_kvdisk *d, const int32_t *prompt, int n_blocks, uint64_t fp, void *bufs) {
    size_t bb = dsi_kvdisk_block_bytes(d);
    uint64_t parent = 0;
    double t0 = dsi_now();
    for (int b = 0; b < n_blocks; b++) {
        uint64_t h = dsi_prefix_block_hash(parent, fp, prompt + 64 * b, 64);
        if (dsi_kvdisk_load(d, h, parent, prompt + 64 * b, (char *)bufs + bb * b, NULL, b)) die("load");
        parent = h;
    }
    int seen = 0, bad = 0;
    while (seen < n_blocks) {
        dsi_kvdisk_done done[64];
        dsi_kvdisk_wait(d, 1.0);
        int k = dsi_kvdisk_poll(d, done, 64);
        for (int i = 0; i < k; i++) bad += done[i].status != DSI_OK;
        seen += k;
    }
    double dt = dsi_now() - t0;
    if (bad) fprintf(stderr, "bench_kvdisk: %d loads failed\n", bad);
    return (double)bb * n_blocks / dt;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(const double *v, int n) {
    double t[16];
    memcpy(t, v, sizeof(double) * n);
    qsort(t, n, sizeof(double), cmp_double);
    return t[n / 2];
}

/* dd's figure: "... copied, 0.5 s, 1.2 GB/s" -> bytes/s. */
static double dd_read(const char *file) {
    char cmd[4200], line[512];
    snprintf(cmd, sizeof cmd, "dd if='%.4000s' of=/dev/null bs=4M iflag=direct 2>&1", file);
    FILE *p = popen(cmd, "r");
    if (!p) return 0;
    double bytes = 0, secs = 0;
    while (fgets(line, sizeof line, p)) {
        long long b;
        double s;
        char *c = strstr(line, "copied, ");
        if (sscanf(line, "%lld bytes", &b) == 1 && c && sscanf(c + 8, "%lf s", &s) == 1) { bytes = (double)b; secs = s; }
    }
    pclose(p);
    return secs > 0 ? bytes / secs : 0;
}

int main(int argc, char **argv) {
    const char *model_dir = argc > 1 ? argv[1] : "/tmp/small";
    const char *dir = argc > 2 ? argv[2] : "/var/tmp/dsi_bench_kvdisk";
    int n = argc > 3 ? atoi(argv[3]) : 2000;
    int threads = argc > 4 ? atoi(argv[4]) : 0;
    if (n < 65 || n > 4000) { fprintf(stderr, "bench_kvdisk: prompt tokens must be 65..4000\n"); return 2; }
    char cmd[8400];
    snprintf(cmd, sizeof cmd, "rm -rf '%.4000s'/v1 '%.4000s'/seq.bin", dir, dir);
    if (system(cmd)) {}
    dsi_load_opts lo = {.progress = 0, .no_mmap = 1};
    dsi_model *m;
    if (dsi_model_load(model_dir, &lo, &m)) die(model_dir);
    const dsi_config *c = dsi_model_config(m);
    uint64_t fp = dsi_model_fingerprint(m);
    int32_t *prompt = malloc(sizeof(int32_t) * n);
    for (int i = 0; i < n; i++) prompt[i] = (i * 7919 + 13) % c->vocab_size;
    dsi_kvdisk_opts o = dsi_kvdisk_default_opts();
    o.dir = dir;
    dsi_kvdisk *d;
    if (dsi_kvdisk_open(&o, fp, c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, &d)) die("kv-disk");
    int n_blocks = (n - 1) / 64;
    size_t bb = dsi_kvdisk_block_bytes(d);
    printf("model %s: %d layers, kv dim %d, block %.2f MiB; prompt %d tokens = %d full blocks; disk %s (%s)\n",
           model_dir, c->n_layers, dsi_config_kv_dim(c), bb / 1048576.0, n, n_blocks, dir, dsi_kvdisk_backend(d));

    /* 1. TTFT: cold, from disk after a "restart", from memory */
    rig g;
    int cached;
    rig_open(&g, m, d, threads);
    double t_cold = ttft(g.s, prompt, n, &cached);
    rig_close(&g);
    dsi_kvdisk_stats st;
    dsi_kvdisk_get_stats(d, &st);
    printf("cold:        TTFT %8.1f ms (cached %d tokens; wrote %llu blocks, %.1f MiB)\n", t_cold * 1e3, cached,
           (unsigned long long)st.written_blocks, st.written_bytes / 1048576.0);
    const char *how = drop_cache(dir, NULL);
    printf("page cache:  %s\n", how);
    rig_open(&g, m, d, threads);
    double t_disk = ttft(g.s, prompt, n, &cached);
    printf("from disk:   TTFT %8.1f ms (cached %d of %d tokens)  cold / disk = %.1fx\n", t_disk * 1e3, cached, n,
           t_cold / t_disk);
    /* the same prompt again, now in the memory prefix cache */
    double t_mem = ttft(g.s, prompt, n, &cached);
    printf("from memory: TTFT %8.1f ms (cached %d tokens)         disk / memory = %.1fx\n", t_mem * 1e3, cached,
           t_disk / t_mem);
    rig_close(&g);

    /* 2. read throughput vs the file system's sequential read */
    void *bufs = malloc(bb * n_blocks);
    if (!bufs) die("out of memory");
    memset(bufs, 0, bb * n_blocks);
    /* medians, alternating, from a dropped page cache: the disk is a shared VM's (its host may cache it too) */
    const char *backend = dsi_kvdisk_backend(d);
    dsi_kvdisk *dt;
    o.io = DSI_KVDISK_IO_THREADS;
    if (dsi_kvdisk_open(&o, fp, c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, &dt)) die("kv-disk");
    char seq[4200];
    snprintf(seq, sizeof seq, "%s/seq.bin", dir);
    snprintf(cmd, sizeof cmd, "dd if=/dev/zero of='%.4000s' bs=4M count=256 oflag=direct status=none", seq);
    int have_seq = system(cmd) == 0;
    enum { REPS = 5 };
    double each[4][REPS] = {{0}};
    for (int rep = 0; rep < REPS; rep++) {
        drop_cache(dir, NULL);
        each[0][rep] = read_throughput(d, prompt, n_blocks, fp, bufs);
        drop_cache(dir, NULL);
        each[1][rep] = read_throughput(dt, prompt, n_blocks, fp, bufs);
        each[2][rep] = read_throughput(dt, prompt, n_blocks, fp, bufs); /* now in the page cache */
        if (have_seq) {
            drop_cache(dir, seq);
            each[3][rep] = dd_read(seq);
        }
    }
    printf("each run (uring / threads / hot / dd MB/s), page cache dropped before each cold read:\n");
    for (int rep = 0; rep < REPS; rep++)
        printf("  run %d: %6.0f / %6.0f / %6.0f / %6.0f\n", rep + 1, each[0][rep] / 1e6, each[1][rep] / 1e6,
               each[2][rep] / 1e6, each[3][rep] / 1e6);
    double r_uring = median(each[0], REPS), r_threads = median(each[1], REPS), r_hot = median(each[2], REPS),
           r_dd = median(each[3], REPS);
    dsi_kvdisk_close(d);
    dsi_kvdisk_close(dt);
    unlink(seq);
    double mb = 1e6;
    printf("medians of %d runs:\n", REPS);
    printf("disk tier read (%d blocks, %.0f MiB, %s): %8.0f MB/s\n", n_blocks, bb * n_blocks / 1048576.0, backend,
           r_uring / mb);
    printf("disk tier read (thread pool):                 %8.0f MB/s\n", r_threads / mb);
    printf("disk tier read (page cache hot, threads):     %8.0f MB/s\n", r_hot / mb);
    if (r_dd > 0)
        printf("sequential read, dd bs=4M iflag=direct, 1 GiB: %8.0f MB/s  -> disk tier / dd = %.2f (%s), %.2f (threads)\n",
               r_dd / mb, r_uring / r_dd, backend, r_threads / r_dd);
    else
        printf("sequential read: dd failed (no O_DIRECT on this file system?)\n");
    /* 3. start-up index rebuild: a scan of names, sizes and mtimes over 20,000 block files */
    {
        int nf = 20000;
        char sub[4200], f[4300];
        for (int i = 0; i < nf; i++) {
            uint64_t h = (uint64_t)i * 0x9e3779b97f4a7c15ull;
            snprintf(sub, sizeof sub, "%.4000s/v1/%02x", dir, (unsigned)(h >> 56));
            snprintf(f, sizeof f, "%s/%016llx.kvb", sub, (unsigned long long)h);
            int fd = open(f, O_WRONLY | O_CREAT, 0644);
            if (fd >= 0) close(fd);
        }
        o.io = DSI_KVDISK_IO_AUTO;
        o.capacity_bytes = 1ull << 50; /* the empty files must not be evicted as over the cap */
        dsi_kvdisk_stats ss;
        if (dsi_kvdisk_open(&o, fp, c->n_layers, dsi_config_kv_dim(c), DSI_KV_BLOCK_TOKENS, &d)) die("kv-disk");
        dsi_kvdisk_get_stats(d, &ss);
        printf("index rebuild at start-up: %llu files scanned in %.1f ms (%.0f files/s, no block read)\n",
               (unsigned long long)ss.n_blocks, ss.last_scan_s * 1e3, ss.n_blocks / ss.last_scan_s);
        dsi_kvdisk_close(d);
        snprintf(cmd, sizeof cmd, "rm -rf '%.4000s'/v1", dir);
        if (system(cmd)) {}
    }
    free(bufs);
    free(prompt);
    dsi_model_destroy(m);
    return 0;
}
