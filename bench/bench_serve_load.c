/* Load test of the HTTP server on loopback: N concurrent streaming clients
 * (default 64) for T seconds (default 60) against the built-in demo model,
 * started in-process on a free 127.0.0.1 port (or an external server with
 * --url-port P). Each client loops: POST /v1/completions with stream=true,
 * read the SSE stream to [DONE], record time-to-first-token and the gaps
 * between token chunks. Extra clients are killed mid-stream (close the
 * socket); afterwards /metrics must show the batch and the KV pool idle.
 *
 * Prints throughput (requests/s, generated tokens/s), p50/p99 TTFT and
 * inter-token latency, and the failure count (must be 0), against the
 * engine's own single-stream decode rate measured in the same run.
 *
 * usage: bench_serve_load [clients (64)] [seconds (60)] [--url-port P] [--threads N] */
#define _GNU_SOURCE /* memmem */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "dsinfer/server.h"

static int g_port;
static double g_end;
static atomic_int g_ok, g_fail, g_killed, g_tokens;

/* Latency samples, per client, merged at the end. */
typedef struct samples {
    double *v;
    size_t n, cap;
} samples;

static void add(samples *s, double x) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1024;
        s->v = realloc(s->v, sizeof(double) * s->cap);
    }
    s->v[s->n++] = x;
}

typedef struct client {
    int idx;
    samples ttft, itl;
    char err[160];
} client;

static int connect_local(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(g_port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {30, 0}; /* a stalled response counts as a failure, never a hang */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { close(fd); return -1; }
    return fd;
}

static int send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k <= 0) return -1;
        p += k;
        n -= k;
    }
    return 0;
}

/* One streaming request. kill_after > 0: close after that many token chunks.
 * Returns 0 when the stream ended with [DONE] after a finish_reason. */
static int one_request(client *c, unsigned *rng, int kill_after) {
    char body[4096], req[4600];
    int n_prompt = 16 + rand_r(rng) % 112, max_tokens = 32 + rand_r(rng) % 96;
    int off = snprintf(body, sizeof body, "{\"model\":\"dsinfer-demo\",\"stream\":true,\"max_tokens\":%d,"
                                          "\"temperature\":0.8,\"ignore_eos\":true,\"prompt\":[", max_tokens);
    /* a shared 64-token system prefix on half the requests exercises the prefix cache */
    int shared = rand_r(rng) % 2;
    for (int i = 0; i < n_prompt + (shared ? 64 : 0); i++)
        off += snprintf(body + off, sizeof body - off, "%s%d", i ? "," : "",
                        shared && i < 64 ? (i * 17 + 3) % 2000 : (int)(rand_r(rng) % 2000));
    off += snprintf(body + off, sizeof body - off, "]}");
    int rn = snprintf(req, sizeof req,
                      "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      "Content-Length: %d\r\nConnection: close\r\n\r\n%s", off, body);
    double t0 = dsi_now(), last = 0;
    int fd = connect_local();
    if (fd < 0) { snprintf(c->err, sizeof c->err, "connect: %s", strerror(errno)); return -1; }
    if (send_all(fd, req, rn)) { close(fd); snprintf(c->err, sizeof c->err, "send failed"); return -1; }
    /* read everything, de-chunking as we go; events are scanned in the body */
    static _Thread_local char buf[1 << 16], bodybuf[1 << 20];
    size_t have = 0, blen = 0, scan = 0;
    int header_done = 0, status = 0, chunks = 0, done = 0, finished = 0;
    size_t chunk_left = 0;
    int in_size_line = 1;
    size_t hdr_end = 0;
    for (;;) {
        ssize_t k = recv(fd, buf + have, sizeof buf - have, 0);
        if (k <= 0) break;
        have += k;
        size_t p = 0;
        if (!header_done) {
            char *e = memmem(buf, have, "\r\n\r\n", 4);
            if (!e) continue;
            header_done = 1;
            hdr_end = e - buf + 4;
            sscanf(buf, "HTTP/1.1 %d", &status);
            p = hdr_end;
        }
        /* de-chunk buf[p..have) into bodybuf */
        while (p < have) {
            if (in_size_line) {
                char *nl = memchr(buf + p, '\n', have - p);
                if (!nl) break;
                chunk_left = strtoul(buf + p, NULL, 16);
                p = nl - buf + 1;
                in_size_line = 0;
                if (chunk_left == 0) { done = 1; break; }
            } else {
                size_t take = DSI_MIN(chunk_left, have - p);
                if (blen + take > sizeof bodybuf) take = 0, p = have; /* oversized: ignore */
                memcpy(bodybuf + blen, buf + p, take);
                blen += take;
                p += take;
                chunk_left -= take;
                if (chunk_left == 0) {
                    if (have - p < 2) break; /* wait for the CRLF */
                    p += 2;
                    in_size_line = 1;
                }
            }
        }
        memmove(buf, buf + p, have - p);
        have -= p;
        /* count complete events */
        for (;;) {
            char *e = memmem(bodybuf + scan, blen - scan, "\n\n", 2);
            if (!e) break;
            const char *ev = bodybuf + scan;
            size_t evlen = e - ev;
            scan = e - bodybuf + 2;
            if (evlen >= 12 && !memcmp(ev, "data: [DONE]", 12)) { finished |= 2; continue; }
            if (memmem(ev, evlen, "\"finish_reason\":\"", 17)) finished |= 1;
            else if (memmem(ev, evlen, "\"text\":", 7)) {
                double now = dsi_now();
                if (chunks == 0) add(&c->ttft, now - t0);
                else add(&c->itl, now - last);
                last = now;
                chunks++;
                atomic_fetch_add(&g_tokens, 1);
            }
        }
        if (kill_after > 0 && chunks >= kill_after) { close(fd); return 1; }
        if (done) break;
    }
    close(fd);
    if (status != 200 || finished != 3) {
        snprintf(c->err, sizeof c->err, "status %d, finished %d, %d chunks, body %.60s", status, finished, chunks,
                 blen ? bodybuf : "");
        return -1;
    }
    return 0;
}

static void *client_main(void *arg) {
    client *c = arg;
    unsigned rng = 1234u + c->idx * 7777u;
    while (dsi_now() < g_end) {
        int rc = one_request(c, &rng, 0);
        if (rc == 0) atomic_fetch_add(&g_ok, 1);
        else {
            atomic_fetch_add(&g_fail, 1);
            fprintf(stderr, "client %d: %s\n", c->idx, c->err);
        }
    }
    return NULL;
}

/* Every 5 s a client opens a long stream and drops it after 5 chunks. */
static void *killer_main(void *arg) {
    client *c = arg;
    unsigned rng = 99;
    while (dsi_now() < g_end - 2) {
        if (one_request(c, &rng, 5) == 1) atomic_fetch_add(&g_killed, 1);
        struct timespec ts = {5, 0};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(samples *s, double q) {
    if (!s->n) return 0;
    size_t i = (size_t)(q * (s->n - 1) + 0.5);
    return s->v[i];
}

/* GET /metrics and return the value of one line, or -1. */
static double metric(const char *name) {
    int fd = connect_local();
    if (fd < 0) return -1;
    const char *req = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    send_all(fd, req, strlen(req));
    static char buf[1 << 16];
    size_t n = 0;
    ssize_t k;
    while (n < sizeof buf - 1 && (k = recv(fd, buf + n, sizeof buf - 1 - n, 0)) > 0) n += k;
    buf[n] = 0;
    close(fd);
    char pat[128];
    snprintf(pat, sizeof pat, "\n%s ", name);
    char *p = strstr(buf, pat);
    return p ? atof(p + strlen(pat)) : -1;
}

int main(int argc, char **argv) {
    int n_clients = 64, external = 0, threads = 0;
    double seconds = 60;
    int pos = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--url-port") && i + 1 < argc) { g_port = atoi(argv[++i]); external = 1; continue; }
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) { threads = atoi(argv[++i]); continue; }
        if (pos == 0) n_clients = atoi(argv[i]);
        else if (pos == 1) seconds = atof(argv[i]);
        pos++;
    }
    if (n_clients < 1 || n_clients > 1024 || seconds <= 0 || seconds > 600) {
        fprintf(stderr, "usage: bench_serve_load [clients 1..1024] [seconds <= 600] [--url-port P] [--threads N]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    dsi_server *srv = NULL;
    if (!external) {
        dsi_server_opts o = dsi_server_default_opts();
        o.port = 0;
        o.max_num_seqs = 64;
        o.threads = threads;
        if (dsi_server_start(&o, &srv)) { fprintf(stderr, "bench: %s\n", dsi_last_error()); return 1; }
        g_port = dsi_server_port(srv);
    }
    /* the single-stream peer figure: one client alone for a few requests */
    client solo = {.idx = 1000};
    unsigned r0 = 5;
    double ts = dsi_now();
    int solo_tok0 = atomic_load(&g_tokens);
    for (int i = 0; i < 5; i++)
        if (one_request(&solo, &r0, 0)) { fprintf(stderr, "bench: solo request failed: %s\n", solo.err); return 1; }
    double solo_tps = (atomic_load(&g_tokens) - solo_tok0) / (dsi_now() - ts);
    atomic_store(&g_tokens, 0);

    double computed0 = metric("dsinfer_computed_tokens_total"), hits0 = metric("dsinfer_prompt_cache_hit_tokens_total");
    double prompt0 = metric("dsinfer_prompt_tokens_total");
    printf("load: %d streaming clients for %.0f s on 127.0.0.1:%d (demo model)\n", n_clients, seconds, g_port);
    fflush(stdout);
    client *cs = calloc(n_clients + 1, sizeof *cs);
    pthread_t *th = calloc(n_clients + 1, sizeof *th);
    double t0 = dsi_now();
    g_end = t0 + seconds;
    for (int i = 0; i < n_clients; i++) {
        cs[i].idx = i;
        pthread_create(&th[i], NULL, client_main, &cs[i]);
    }
    cs[n_clients].idx = n_clients;
    pthread_create(&th[n_clients], NULL, killer_main, &cs[n_clients]);
    for (int i = 0; i <= n_clients; i++) pthread_join(th[i], NULL);
    double wall = dsi_now() - t0;

    /* idle again: nothing running or queued, no KV block held */
    double used = -1, running = -1, waiting = -1;
    for (int i = 0; i < 100; i++) {
        used = metric("dsinfer_kv_blocks_used");
        running = metric("dsinfer_requests_running");
        waiting = metric("dsinfer_requests_waiting");
        if (used == 0 && running == 0 && waiting == 0) break;
        usleep(50000);
    }
    double cancelled = metric("dsinfer_requests_total{outcome=\"cancelled\"}");
    double computed = metric("dsinfer_computed_tokens_total"), hits = metric("dsinfer_prompt_cache_hit_tokens_total");
    double prompt_tok = metric("dsinfer_prompt_tokens_total");

    samples ttft = {0}, itl = {0};
    for (int i = 0; i < n_clients; i++) {
        for (size_t k = 0; k < cs[i].ttft.n; k++) add(&ttft, cs[i].ttft.v[k]);
        for (size_t k = 0; k < cs[i].itl.n; k++) add(&itl, cs[i].itl.v[k]);
        free(cs[i].ttft.v);
        free(cs[i].itl.v);
    }
    qsort(ttft.v, ttft.n, sizeof(double), cmp_d);
    qsort(itl.v, itl.n, sizeof(double), cmp_d);
    int ok = atomic_load(&g_ok), failed = atomic_load(&g_fail);
    double tps = atomic_load(&g_tokens) / wall;
    printf("requests: %d completed, %d failed, %d killed mid-stream by the client (server counted %.0f cancelled)\n",
           ok, failed, atomic_load(&g_killed), cancelled);
    printf("throughput: %.2f requests/s, %.0f generated tok/s aggregate = %.1fx one client alone (%.0f tok/s)\n",
           ok / wall, tps, tps / solo_tps, solo_tps);
    printf("engine: %.0f tokens/s computed (prefill + decode; %.0f prompt tokens, %.0f%% served from the prefix cache)\n",
           (computed - computed0) / wall, prompt_tok - prompt0, prompt_tok > prompt0 ? 100.0 * (hits - hits0) / (prompt_tok - prompt0) : 0.0);
    printf("TTFT: p50 %.1f ms, p99 %.1f ms (%zu samples)\n", pct(&ttft, 0.5) * 1e3, pct(&ttft, 0.99) * 1e3, ttft.n);
    printf("inter-token latency: p50 %.1f ms, p99 %.1f ms (%zu samples)\n", pct(&itl, 0.5) * 1e3,
           pct(&itl, 0.99) * 1e3, itl.n);
    printf("after the run: kv blocks used %.0f, running %.0f, waiting %.0f -> %s\n", used, running, waiting,
           used == 0 && running == 0 && waiting == 0 ? "idle" : "NOT IDLE");
    free(ttft.v);
    free(itl.v);
    free(cs);
    free(th);
    if (srv) dsi_server_stop(srv, 10);
    return failed == 0 && used == 0 && running == 0 ? 0 : 1;
}
