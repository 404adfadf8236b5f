/* dsinfer demo: the main job on the built-in model, nothing downloaded.
 * Today: the engine generates; then the OpenAI server runs in-process and a
 * short load of concurrent chat requests goes through it over loopback,
 * billed at DeepSeek's R1 prices, and the demo prints throughput, latency,
 * prefix-cache hits and the cost/revenue account. */
#include "cli/cli.h"
#include "dsinfer/econ.h"
#include "dsinfer/server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int dsi__demo_engine(void);

#define CLIENTS 8
#define PER_CLIENT 6

typedef struct client {
    int port, index;
    int ok, failed;
    long completion_tokens, cached_tokens, prompt_tokens;
    double latency_s;
} client;

/* One POST over a fresh loopback connection; the response body into buf. */
static int post(int port, const char *path, const char *body, char *buf, size_t cap) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { close(fd); return -1; }
    char head[256];
    int hl = snprintf(head, sizeof head,
                      "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      "Content-Length: %zu\r\nConnection: close\r\n\r\n", path, strlen(body));
    if (write(fd, head, hl) != hl || write(fd, body, strlen(body)) != (ssize_t)strlen(body)) { close(fd); return -1; }
    size_t n = 0;
    ssize_t r;
    while (n + 1 < cap && (r = read(fd, buf + n, cap - 1 - n)) > 0) n += (size_t)r;
    buf[n] = 0;
    close(fd);
    return strncmp(buf, "HTTP/1.1 200", 12) == 0 ? 0 : -1;
}

static long json_int(const char *s, const char *key) {
    char k[64];
    snprintf(k, sizeof k, "\"%s\":", key);
    const char *p = strstr(s, k);
    return p ? strtol(p + strlen(k), NULL, 10) : 0;
}

static void *client_main(void *arg) {
    client *c = arg;
    char *buf = malloc(1 << 16);
    /* every client shares the system prompt (prefix-cache hits), asks its own question */
    for (int r = 0; r < PER_CLIENT && buf; r++) {
        char body[1024];
        snprintf(body, sizeof body,
                 "{\"model\":\"dsinfer-demo\",\"max_tokens\":32,\"temperature\":0.7,\"seed\":%d,"
                 "\"messages\":[{\"role\":\"system\",\"content\":\"You are a helpful assistant that serves "
                 "DeepSeek-V3 with prefill/decode disaggregation, expert parallelism and an on-disk KV cache. "
                 "Answer briefly and precisely, and think step by step before you answer.\"},"
                 "{\"role\":\"user\",\"content\":\"Client %d, question %d: what does serving cost?\"}]}",
                 c->index * 100 + r, c->index, r);
        double t0 = dsi_now();
        if (post(c->port, "/v1/chat/completions", body, buf, 1 << 16) == 0) {
            c->ok++;
            c->completion_tokens += json_int(buf, "completion_tokens");
            c->prompt_tokens += json_int(buf, "prompt_tokens");
            c->cached_tokens += json_int(buf, "prompt_cache_hit_tokens");
        } else {
            c->failed++;
        }
        c->latency_s += dsi_now() - t0;
    }
    free(buf);
    return NULL;
}

int dsi_cmd_demo(int argc, char **argv) {
    if (argc > 1 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        printf("usage: dsinfer demo\n"
               "Runs the system on the built-in demo model (tiny DeepSeek-V3 shape, random FP8 weights,\n"
               "nothing downloaded): the engine generates; the OpenAI server starts in-process on a\n"
               "loopback port and serves %d concurrent clients x %d chat requests billed at DeepSeek's\n"
               "R1 prices; prints throughput, latency, prefix-cache hits and cost/revenue.\n",
               CLIENTS, PER_CLIENT);
        return 0;
    }
    if (argc > 1) { /* demo takes no options: do not silently ignore a typo */
        fprintf(stderr, "dsinfer demo: unknown option '%s' (see --help)\n", argv[1]);
        return 2;
    }
    printf("dsinfer demo\n");
    if (dsi__demo_engine()) return 1;

    char journal[] = "/tmp/dsinfer-demo-journal-XXXXXX";
    int jfd = mkstemp(journal);
    if (jfd < 0) { perror("dsinfer demo: journal"); return 1; }
    close(jfd);
    dsi_server_opts o = dsi_server_default_opts();
    o.port = 0;
    o.pricing_path = "deepseek"; /* the built-in DeepSeek price list */
    o.pricing_model = "deepseek-r1";
    o.account_journal = journal;
    o.account_gpus = 8; /* one H800 node's worth of cost, as a scale for the account */
    dsi_server *srv;
    if (dsi_server_start(&o, &srv) != DSI_OK) {
        fprintf(stderr, "dsinfer demo: server: %s\n", dsi_last_error());
        unlink(journal);
        return 1;
    }
    int port = dsi_server_port(srv);
    printf("server: model %s on http://127.0.0.1:%d, %d clients x %d chat requests\n", dsi_server_model_name(srv),
           port, CLIENTS, PER_CLIENT);
    client cl[CLIENTS];
    pthread_t th[CLIENTS];
    double t0 = dsi_now();
    for (int i = 0; i < CLIENTS; i++) {
        cl[i] = (client){.port = port, .index = i};
        pthread_create(&th[i], NULL, client_main, &cl[i]);
    }
    client sum = {0};
    for (int i = 0; i < CLIENTS; i++) {
        pthread_join(th[i], NULL);
        sum.ok += cl[i].ok;
        sum.failed += cl[i].failed;
        sum.completion_tokens += cl[i].completion_tokens;
        sum.prompt_tokens += cl[i].prompt_tokens;
        sum.cached_tokens += cl[i].cached_tokens;
        sum.latency_s += cl[i].latency_s;
    }
    double wall = dsi_now() - t0;
    dsi_server_stop(srv, 10.0);
    printf("  %d requests ok, %d failed in %.2f s: %.1f req/s, %.0f generated tok/s, mean latency %.0f ms\n", sum.ok,
           sum.failed, wall, sum.ok / wall, sum.completion_tokens / wall,
           sum.ok ? 1000 * sum.latency_s / (sum.ok + sum.failed) : 0.0);
    printf("  prompt tokens %ld, of which %ld (%.0f%%) from the prefix cache\n", sum.prompt_tokens, sum.cached_tokens,
           sum.prompt_tokens ? 100.0 * sum.cached_tokens / sum.prompt_tokens : 0.0);
    dsi_econ_report r;
    if (dsi_econ_report_journal(journal, -1e300, 1e300, &r) == DSI_OK)
        printf("account: revenue $%.6f at R1 prices (cache hits at $0.14/M, misses $0.55/M, output $2.19/M), "
               "cost $%.6f for %.4f GPU-hours at $2/GPU-hour, cost-profit margin %.0f%%\n",
               r.revenue_usd, r.cost_usd, r.gpu_hours, 100 * r.margin);
    printf("(the same account on DeepSeek's published day: `dsinfer sim`)\n");
    unlink(journal);
    return sum.failed ? 1 : 0;
}
