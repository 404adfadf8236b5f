/* dsinfer demo: the main job on the built-in model, nothing downloaded.
 * The engine generates; then the whole disaggregated system starts on this
 * machine as separate processes: a prefill instance, a decode instance (an
 * expert-parallel group of 2 MPI ranks when mpirun is there), both on a
 * shared disk KV tier, and the router with DeepSeek's prefill and decode load
 * balancers in front. A short load of concurrent chat requests goes through
 * the router over loopback, billed at DeepSeek's R1 prices by the decode
 * instance, GPU-hours accounted by the router; the demo prints throughput,
 * latency, cache hits and the cost/revenue account. Without the processes
 * (no fork, a start that fails) it serves the same load in-process. */
#include "cli/cli.h"
#include "dsinfer/econ.h"
#include "dsinfer/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
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

/* Runs the client load against 127.0.0.1:port; fills *sum; returns wall seconds. */
static double run_load(int port, client *sum) {
    client cl[CLIENTS];
    pthread_t th[CLIENTS];
    double t0 = dsi_now();
    for (int i = 0; i < CLIENTS; i++) {
        cl[i] = (client){.port = port, .index = i};
        pthread_create(&th[i], NULL, client_main, &cl[i]);
    }
    memset(sum, 0, sizeof *sum);
    for (int i = 0; i < CLIENTS; i++) {
        pthread_join(th[i], NULL);
        sum->ok += cl[i].ok;
        sum->failed += cl[i].failed;
        sum->completion_tokens += cl[i].completion_tokens;
        sum->prompt_tokens += cl[i].prompt_tokens;
        sum->cached_tokens += cl[i].cached_tokens;
        sum->latency_s += cl[i].latency_s;
    }
    return dsi_now() - t0;
}

static void print_load(const client *sum, double wall) {
    printf("  %d requests ok, %d failed in %.2f s: %.1f req/s, %.0f generated tok/s, mean latency %.0f ms\n", sum->ok,
           sum->failed, wall, sum->ok / wall, sum->completion_tokens / wall,
           sum->ok + sum->failed ? 1000 * sum->latency_s / (sum->ok + sum->failed) : 0.0);
    printf("  prompt tokens %ld, of which %ld (%.0f%%) from the KV cache\n", sum->prompt_tokens, sum->cached_tokens,
           sum->prompt_tokens ? 100.0 * sum->cached_tokens / sum->prompt_tokens : 0.0);
}

/* ---- the disaggregated system as child processes ---- */

typedef struct child {
    pid_t pid;
    char log[512];
    int port;
} child;

/* Starts argv (argv[0] a program on PATH or a path) with stderr into log. */
static int spawn(child *c, char *const argv[]) {
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int fd = open(c->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) { dup2(fd, 2); dup2(fd, 1); close(fd); }
        setpgid(0, 0); /* its own group: the demo ends mpirun and its ranks together */
        execvp(argv[0], argv);
        _exit(127);
    }
    c->pid = pid;
    return 0;
}

/* Waits for "... http://127.0.0.1:PORT" after `marker` in the child's log. */
static int wait_port(child *c, const char *marker, double timeout_s) {
    double end = dsi_now() + timeout_s;
    while (dsi_now() < end) {
        FILE *f = fopen(c->log, "r");
        char line[1024];
        while (f && fgets(line, sizeof line, f)) {
            const char *m = strstr(line, marker), *h = m ? strstr(m, "http://127.0.0.1:") : NULL;
            if (h) { c->port = atoi(h + 17); fclose(f); return c->port > 0 ? 0 : -1; }
        }
        if (f) fclose(f);
        int st;
        if (waitpid(c->pid, &st, WNOHANG) == c->pid) { c->pid = 0; return -1; }
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return -1;
}

static void stop_child(child *c) {
    if (c->pid <= 0) return;
    kill(-c->pid, SIGTERM);
    double end = dsi_now() + 10;
    int st;
    while (dsi_now() < end && waitpid(c->pid, &st, WNOHANG) == 0) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (waitpid(c->pid, &st, WNOHANG) == 0) {
        kill(-c->pid, SIGKILL);
        waitpid(c->pid, &st, 0);
    }
    c->pid = 0;
}

static int have_mpirun(void) {
#ifdef DSI_HAVE_MPI
    return system("command -v mpirun >/dev/null 2>&1") == 0;
#else
    return 0;
#endif
}

static void rmtree(const char *dir) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) DSI_LOG_WARN("demo: could not remove %s", dir);
}

/* 0: ran; 1: failed after starting (reported); -1: could not start (caller falls back). */
static int run_cluster(void) {
    char self[1024];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return -1;
    self[n] = 0;
    char dir[] = "/tmp/dsinfer-demo-XXXXXX";
    if (!mkdtemp(dir)) return -1;
    char kv[1100], rev[1100], cost[1100], url_p[64], url_d[64];
    snprintf(kv, sizeof kv, "%s/kv", dir);
    snprintf(rev, sizeof rev, "%s/revenue.jsonl", dir);
    snprintf(cost, sizeof cost, "%s/gpus.jsonl", dir);
    child pf = {0}, dc = {0}, rt = {0};
    snprintf(pf.log, sizeof pf.log, "%s/prefill.log", dir);
    snprintf(dc.log, sizeof dc.log, "%s/decode.log", dir);
    snprintf(rt.log, sizeof rt.log, "%s/router.log", dir);
    int ep = have_mpirun();
    if (ep) {
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    }
    char *pargv[] = {self, "serve", "--role", "prefill", "--port", "0", "--threads", "1", "--kv-disk", kv, NULL};
    char *dargv_ep[] = {"mpirun", "--oversubscribe", "-np", "2", self, "serve", "--role", "decode", "--port", "0",
                        "--threads", "1", "--kv-disk", kv, "--pricing", "deepseek", "--pricing-model", "deepseek-r1",
                        "--account-journal", rev, NULL};
    char **dargv = ep ? dargv_ep : dargv_ep + 4;
    int rc = -1;
    if (spawn(&pf, pargv) || spawn(&dc, dargv)) goto out;
    if (wait_port(&pf, "dsinfer serve", 60) || wait_port(&dc, "dsinfer serve", 60)) {
        fprintf(stderr, "dsinfer demo: an instance did not start (logs in %s); serving in-process instead\n", dir);
        goto out;
    }
    snprintf(url_p, sizeof url_p, "http://127.0.0.1:%d", pf.port);
    snprintf(url_d, sizeof url_d, "http://127.0.0.1:%d", dc.port);
    char *rargv[] = {self, "router", "--port", "0", "--prefill", url_p, "--decode", url_d,
                     "--econ-journal", cost, "--gpus-per-instance", "8", NULL};
    if (spawn(&rt, rargv) || wait_port(&rt, "instances", 30)) {
        fprintf(stderr, "dsinfer demo: the router did not start (logs in %s); serving in-process instead\n", dir);
        goto out;
    }
    printf("cluster: router http://127.0.0.1:%d (DeepSeek prefill/decode load balancers) -> prefill %s,\n"
           "         decode %s%s; shared disk KV tier %s\n",
           rt.port, url_p, url_d, ep ? " (expert-parallel group: 2 MPI ranks, FP8 dispatch)" : "", kv);
    printf("  %d clients x %d chat requests through the router\n", CLIENTS, PER_CLIENT);
    client sum;
    double wall = run_load(rt.port, &sum);
    print_load(&sum, wall);
    stop_child(&rt); /* writes its last GPU-count checkpoint */
    stop_child(&pf);
    stop_child(&dc);
    dsi_econ_report r, g;
    if (dsi_econ_report_journal(rev, -1e300, 1e300, &r) == DSI_OK &&
        dsi_econ_report_journal(cost, -1e300, 1e300, &g) == DSI_OK) {
        double margin = g.cost_usd > 0 ? (r.revenue_usd - g.cost_usd) / g.cost_usd : 0;
        printf("account: revenue $%.6f at R1 prices (billed by the decode instance: cache hits $0.14/M, misses $0.55/M,\n"
               "         output $2.19/M); cost $%.6f for %.4f GPU-hours (router: 2 instances x 8 GPUs at $2/GPU-hour);\n"
               "         cost-profit margin %.0f%%\n",
               r.revenue_usd, g.cost_usd, g.gpu_hours, 100 * margin);
    }
    rc = sum.failed ? 1 : 0;
out:
    stop_child(&rt);
    stop_child(&pf);
    stop_child(&dc);
    if (rc >= 0) rmtree(dir);
    return rc;
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

    int crc = run_cluster();
    if (crc >= 0) {
        printf("(the same account on DeepSeek's published day: `dsinfer sim`)\n");
        return crc;
    }
    /* fallback: the same load on an in-process server */
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
    client sum;
    double wall = run_load(port, &sum);
    dsi_server_stop(srv, 10.0);
    print_load(&sum, wall);
    dsi_econ_report r;
    if (dsi_econ_report_journal(journal, -1e300, 1e300, &r) == DSI_OK)
        printf("account: revenue $%.6f at R1 prices (cache hits at $0.14/M, misses $0.55/M, output $2.19/M), "
               "cost $%.6f for %.4f GPU-hours at $2/GPU-hour, cost-profit margin %.0f%%\n",
               r.revenue_usd, r.cost_usd, r.gpu_hours, 100 * r.margin);
    printf("(the same account on DeepSeek's published day: `dsinfer sim`)\n");
    unlink(journal);
    return sum.failed ? 1 : 0;
}
