/* Prefill/decode disaggregation on loopback, in one process:
 *  1. raw TCP bandwidth over 127.0.0.1 (the bound), then
 *  2. KV transfer throughput: this program plays the prefill side of the
 *     wire protocol against a real decode instance (dsi_server, role decode):
 *     HELLO, SKIP, every block of a long prompt, FIRST, ACK (the decode side
 *     has received every block and queued the request; its scheduler copies
 *     the blocks into the pool at admission), and
 *  3. TTFT through a router (1 prefill + 1 decode instance) against a single
 *     --role both server, for streaming requests of a few prompt lengths.
 * Usage: bench_pd [prompt_tokens_for_transfer (default 8192)] [repeats (default 8)] */
#include "dsinfer/model.h"
#include "dsinfer/pd.h"
#include "dsinfer/router.h"
#include "dsinfer/server.h"
#include "router/router_impl.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "bench_pd: %s: %s\n", what, dsi_last_error());
    exit(1);
}

/* ---------------------------------------------------------------- 1. loopback bandwidth */

typedef struct sink_arg { int lfd; size_t bytes; } sink_arg;

static void *sink(void *arg) {
    sink_arg *a = arg;
    int fd = accept(a->lfd, NULL, NULL);
    char *buf = malloc(1 << 20);
    size_t got = 0;
    while (got < a->bytes) {
        ssize_t k = recv(fd, buf, 1 << 20, 0);
        if (k <= 0) break;
        got += k;
    }
    char ok = 1;
    send(fd, &ok, 1, MSG_NOSIGNAL);
    free(buf);
    close(fd);
    return NULL;
}

static double loopback_gbs(size_t bytes) {
    sink_arg a = {.bytes = bytes};
    int port, fd;
    if (dsi_pd_listen("127.0.0.1", 0, &a.lfd, &port)) die("listen");
    pthread_t t;
    pthread_create(&t, NULL, sink, &a);
    if (dsi_pd_connect("127.0.0.1", port, 2, &fd)) die("connect");
    size_t chunk = 1 << 20;
    char *buf = malloc(chunk);
    memset(buf, 7, chunk);
    double t0 = dsi_now();
    for (size_t sent = 0; sent < bytes; sent += chunk) dsi_pd_send_all(fd, buf, DSI_MIN(chunk, bytes - sent));
    char ok;
    dsi_pd_recv_all(fd, &ok, 1, 30);
    double dt = dsi_now() - t0;
    pthread_join(t, NULL);
    close(fd);
    close(a.lfd);
    free(buf);
    return bytes / dt / 1e9;
}

/* ---------------------------------------------------------------- 2. KV transfer */

static char *prompt_body(int n, int salt, int max_tokens, int stream) {
    size_t cap = (size_t)n * 8 + 256;
    char *b = malloc(cap);
    size_t len = snprintf(b, cap, "{\"prompt\":[");
    for (int i = 0; i < n; i++) len += snprintf(b + len, cap - len, "%s%d", i ? "," : "", (i * 37 + salt * 131 + 11) % 2000);
    snprintf(b + len, cap - len, "],\"max_tokens\":%d,\"temperature\":0,\"ignore_eos\":true,\"return_token_ids\":true%s}",
             max_tokens, stream ? ",\"stream\":true" : "");
    return b;
}

/* One transfer of an n-token prompt's KV to the decode server; returns seconds
 * from HELLO to ACK, *bytes the KV payload. */
static double one_transfer(dsi_server *dec, int n, int salt, size_t *bytes) {
    char path[128];
    uint64_t xfer = 0xbe00000000ull + salt;
    snprintf(path, sizeof path, "/internal/decode?api=completions&xfer=%llx", (unsigned long long)xfer);
    char *body = prompt_body(n, salt, 1, 0);
    dsi_hc dc;
    if (dsi__hc_start(&dc, "127.0.0.1", dsi_server_port(dec), "POST", path, body, strlen(body), NULL, 5)) die("decode");
    /* geometry of the demo model's KV (what dsi_kv_block_data holds) */
    const int layers = 4, dim = 160, bt = 64;
    size_t bb = (size_t)layers * bt * dim * sizeof(float);
    int nb = DSI_CEIL_DIV(n, bt);
    char *kv = malloc(bb);
    for (size_t i = 0; i < bb; i++) kv[i] = (char)(i * 131 + salt);
    int fd;
    if (dsi_pd_connect("127.0.0.1", dsi_server_kv_port(dec), 2, &fd)) die("kv connect");
    extern uint64_t bench_fingerprint; /* the demo model's, computed in main */
    dsi_pd_hello h = {xfer, bench_fingerprint, (uint32_t)n, (uint32_t)nb, layers, bt, dim, 0};
    double t0 = dsi_now();
    dsi_pd_send_msg(fd, DSI_PD_HELLO, &h, sizeof h, NULL, 0);
    uint32_t type;
    uint64_t len;
    dsi_pd_skip sk;
    if (dsi_pd_recv_hdr(fd, &type, &len, 10) || dsi_pd_recv_all(fd, &sk, sizeof sk, 10) || sk.status)
        die("SKIP (geometry or fingerprint mismatch?)");
    for (int i = 0; i < nb; i++) {
        dsi_pd_block b = {(uint32_t)i, layers, bt, dim};
        if (dsi_pd_send_msg(fd, DSI_PD_BLOCK, &b, sizeof b, kv, bb)) die("send block");
    }
    dsi_pd_first f = {.token = 5, .sampler_rng = 1};
    dsi_pd_send_msg(fd, DSI_PD_FIRST, &f, sizeof f, NULL, 0);
    dsi_pd_ack ack;
    if (dsi_pd_recv_hdr(fd, &type, &len, 30) || dsi_pd_recv_all(fd, &ack, sizeof ack, 30) || ack.status) die("ACK");
    double dt = dsi_now() - t0;
    close(fd);
    dsi_rbuf out = {0};
    dsi__hc_read_head(&dc, 30);
    dsi__hc_read_all(&dc, &out, 1 << 20, 30);
    dsi__hc_close(&dc);
    dsi__rbuf_free(&out);
    free(kv);
    free(body);
    *bytes = bb * nb;
    return dt;
}

uint64_t bench_fingerprint;

/* ---------------------------------------------------------------- 3. TTFT */

/* Seconds to the first token event of a streaming request. */
static double ttft(int port, const char *body) {
    dsi_hc c;
    double t0 = dsi_now();
    if (dsi__hc_start(&c, "127.0.0.1", port, "POST", "/v1/completions", body, strlen(body), NULL, 5)) die("ttft connect");
    if (dsi__hc_read_head(&c, 60) || c.status != 200) die("ttft head");
    char buf[4096];
    double first = -1;
    for (;;) {
        long n = dsi__hc_read_body(&c, buf, sizeof buf - 1, 60);
        if (n == DSI_ETIMEOUT) continue;
        if (n <= 0) break;
        buf[n] = 0;
        if (first < 0 && strstr(buf, "\"token_ids\"")) first = dsi_now() - t0;
    }
    dsi__hc_close(&c);
    return first;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median_ttft(int port, int n_prompt, int reps, int salt0) {
    double v[64];
    for (int i = 0; i < reps; i++) {
        char *b = prompt_body(n_prompt, salt0 + i, 2, 1); /* fresh prompts: no prefix-cache hits */
        v[i] = ttft(port, b);
        free(b);
    }
    qsort(v, reps, sizeof v[0], cmp_d);
    return v[reps / 2];
}

int main(int argc, char **argv) {
    int n_tok = argc > 1 ? atoi(argv[1]) : 8192, reps = argc > 2 ? atoi(argv[2]) : 8;
    signal(SIGPIPE, SIG_IGN);


    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.threads = 1;
    o.role = DSI_ROLE_DECODE;
    o.kv_blocks = 4096;
    o.max_model_len = 32768;
    dsi_server *dec;
    if (dsi_server_start(&o, &dec)) die("decode server");
    /* the demo model's fingerprint, the way a prefill instance computes it */
    {
        dsi_config c;
        dsi_model *m;
        dsi_config_preset(DSI_PRESET_TINY, 0, 1, &c);
        if (dsi_make_model_memory(&c, 20250227ull, &m)) die("demo model");
        bench_fingerprint = dsi_model_fingerprint(m);
        dsi_model_destroy(m);
    }
    /* interleaved, same bytes per round: the machine is shared, its noise hits both alike */
    double best = 0, sum_s = 0, bw_best = 0, bw_sum = 0;
    size_t bytes = 0, total = 0;
    for (int i = 0; i < reps; i++) {
        double s = one_transfer(dec, n_tok, i + 1, &bytes);
        sum_s += s;
        total += bytes;
        best = DSI_MAX(best, bytes / s / 1e9);
        double bw = loopback_gbs(bytes);
        bw_sum += bw;
        bw_best = DSI_MAX(bw_best, bw);
    }
    double mean_gbs = total / sum_s / 1e9, bw_mean = bw_sum / reps;
    printf("KV transfer, %d-token prompt (%d blocks of %d layers x 64 x 160 float32, %.1f MiB), %d rounds:\n", n_tok,
           DSI_CEIL_DIV(n_tok, 64), 4, bytes / 1048576.0, reps);
    printf("  KV transfer (HELLO..ACK)      mean %.2f GB/s  best %.2f GB/s\n", mean_gbs, best);
    printf("  loopback TCP, same bytes      mean %.2f GB/s  best %.2f GB/s\n", bw_mean, bw_best);
    printf("  ratio                         mean %.2f       best %.2f\n", mean_gbs / bw_mean, best / bw_best);

    /* TTFT: router (1 prefill + 1 decode) vs one --role both server */
    o.role = DSI_ROLE_PREFILL;
    dsi_server *pre, *both;
    if (dsi_server_start(&o, &pre)) die("prefill server");
    o.role = DSI_ROLE_BOTH;
    if (dsi_server_start(&o, &both)) die("both server");
    char pu[64], du[64];
    snprintf(pu, sizeof pu, "http://127.0.0.1:%d", dsi_server_port(pre));
    snprintf(du, sizeof du, "http://127.0.0.1:%d", dsi_server_port(dec));
    const char *pl[1] = {pu}, *dl[1] = {du};
    dsi_router_opts ro = dsi_router_default_opts();
    ro.port = 0;
    ro.prefill = pl;
    ro.n_prefill = 1;
    ro.decode = dl;
    ro.n_decode = 1;
    dsi_router *r;
    if (dsi_router_start(&ro, &r)) die("router");
    printf("TTFT, streaming, median of %d (demo model, 1 thread per instance):\n", reps);
    printf("  %8s %12s %12s %8s\n", "prompt", "single (ms)", "router (ms)", "ratio");
    int lens[] = {16, 512, 2048};
    for (int k = 0; k < 3; k++) {
        double a = median_ttft(dsi_server_port(both), lens[k], reps, 1000 + k * 100);
        double b = median_ttft(dsi_router_port(r), lens[k], reps, 5000 + k * 100);
        printf("  %8d %12.2f %12.2f %8.2f\n", lens[k], a * 1e3, b * 1e3, b / a);
    }
    dsi_router_stop(r);
    dsi_server_stop(both, 0);
    dsi_server_stop(pre, 0);
    dsi_server_stop(dec, 0);
    return 0;
}
