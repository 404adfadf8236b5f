/* The EP runtime: the group, the placement, and the dual micro-batch
 * schedule.
 *
 * A step: each rank splits its batch into two micro-batches by tokens (the
 * first half of the rows, the second; a sequence may straddle them), tells
 * every rank its token counts (a header, also carrying "idle"), then runs
 * both micro-batches through the layers as stages interleaved on one thread:
 * whenever the preferred micro-batch is blocked on a transfer, the other one
 * computes. Transfers progress only when polled (Open MPI has no progress
 * thread), so the engine calls dsi__ep_poll after every matmul and the
 * scheduler polls between stages. The second micro-batch may not start a
 * layer's attention before the first has written that layer's KV (a
 * sequence split across both reads the first half's cache).
 *
 * With no_overlap: a single micro-batch, each transfer waited for as soon
 * as it is posted (the baseline the benchmark compares against). */
#include "ep/ep_impl.h"

#include <cjson/cJSON.h>
#include <mpi.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define TAG_HEADER 30000
#define HDR 4 /* ints in a step header */

/* ------------------------------------------------------------ process */

static int g_init, g_rank, g_size = 1;

int dsi_ep_launched(void) {
    const char *s = getenv("OMPI_COMM_WORLD_SIZE");
    if (!s) s = getenv("PMI_SIZE");
    return s && atoi(s) > 1;
}

int dsi_ep_init(void) {
    if (g_init) return DSI_OK;
    /* serialized: `serve` calls MPI from its scheduler thread, then from the
     * main thread after joining it; never two threads at once */
    int provided = 0, rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided);
    if (rc != MPI_SUCCESS) return dsi_error(DSI_EPEER, "ep: MPI_Init failed (%d)", rc);
    if (provided < MPI_THREAD_SERIALIZED) {
        MPI_Finalize();
        return dsi_error(DSI_EUNSUPPORTED, "ep: this MPI cannot be called from more than one thread (level %d)", provided);
    }
    /* errors come back as values: a failed peer must not kill us silently */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    g_init = 1;
    return DSI_OK;
}

int dsi_ep_rank(void) { return g_rank; }
int dsi_ep_size(void) { return g_size; }

void dsi_ep_finalize(void) {
    if (!g_init) return;
    MPI_Finalize();
    g_init = 0;
}

void dsi_ep_abort(int code) {
    fflush(stdout);
    fflush(stderr);
    if (g_init) MPI_Abort(MPI_COMM_WORLD, code);
    exit(code);
}

/* ------------------------------------------------------------ placement */

/* Reads the slot count from a placement file (the length of phy2log[0]). */
static int placement_slots(const char *path, int *slots, int *layers) {
    FILE *f = fopen(path, "rb");
    if (!f) return dsi_error(DSI_EIO, "%s: cannot open placement", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n > 0 ? malloc(n + 1) : NULL;
    if (!buf || fread(buf, 1, n, f) != (size_t)n) { fclose(f); free(buf); return dsi_error(DSI_EIO, "%s: read failed", path); }
    fclose(f);
    buf[n] = 0;
    cJSON *root = cJSON_Parse(buf);
    free(buf);
    const cJSON *p2l = root ? cJSON_GetObjectItemCaseSensitive(root, "phy2log") : NULL;
    int rc = DSI_OK;
    if (!cJSON_IsArray(p2l) || !cJSON_IsArray(p2l->child))
        rc = dsi_error(DSI_EFORMAT, "%s: not a placement file (no phy2log [layers][slots])", path);
    else {
        *slots = cJSON_GetArraySize(p2l->child);
        *layers = cJSON_GetArraySize(p2l);
    }
    cJSON_Delete(root);
    return rc;
}

static int placement_setup(dsi_ep *ep) {
    int E = ep->E, P = ep->P, L = ep->n_moe, rc;
    if (!ep->o.placement) {
        if (E % P)
            return dsi_error(DSI_EINVAL, "ep: %d experts do not divide over %d ranks; give a placement file", E, P);
        dsi_eplb_placement *pl = &ep->pl;
        pl->n_layers = L, pl->n_experts = E, pl->n_slots = E, pl->n_gpus = P;
        if (!(pl->phy2log = malloc(sizeof(int32_t) * (size_t)L * E))) return dsi_error(DSI_ENOMEM, "out of memory");
        for (int l = 0; l < L; l++)
            for (int s = 0; s < E; s++) pl->phy2log[(size_t)l * E + s] = s;
        return dsi_eplb_placement_index(pl);
    }
    int R = 0, fl = 0;
    if ((rc = placement_slots(ep->o.placement, &R, &fl)) != DSI_OK) return rc;
    if (R < E || R % P)
        return dsi_error(DSI_EINVAL, "ep: %s has %d slots: need at least %d experts and a multiple of %d ranks",
                         ep->o.placement, R, E, P);
    if (fl != L && fl != 1)
        return dsi_error(DSI_EINVAL, "ep: %s has %d layers; the model has %d MoE layers (or give 1 for all)",
                         ep->o.placement, fl, L);
    dsi_eplb_placement f = {0};
    if ((rc = dsi_eplb_placement_load(ep->o.placement, E, R, P, fl, &f)) != DSI_OK) return rc;
    if (fl == L) {
        ep->pl = f;
        return DSI_OK;
    }
    /* one layer given: the same placement for every MoE layer */
    dsi_eplb_placement *pl = &ep->pl;
    pl->n_layers = L, pl->n_experts = E, pl->n_slots = R, pl->n_gpus = P;
    pl->phy2log = malloc(sizeof(int32_t) * (size_t)L * R);
    if (!pl->phy2log) { dsi_eplb_placement_free(&f); return dsi_error(DSI_ENOMEM, "out of memory"); }
    for (int l = 0; l < L; l++) memcpy(pl->phy2log + (size_t)l * R, f.phy2log, sizeof(int32_t) * R);
    dsi_eplb_placement_free(&f);
    return dsi_eplb_placement_index(pl);
}

/* ------------------------------------------------------------ lifecycle */

static void ub_free(dsi_ep *ep, ep_ub *b) {
    dsi__ubatch_free(ep->e, &b->st);
    free(b->steps); free(b->T_peer); free(b->send_rows); free(b->send_tok); free(b->cnt_in);
    free(b->cout_off); free(b->cin_off);
    dsi_free(b->sbuf); dsi_free(b->rbuf); dsi_free(b->cbuf_out); dsi_free(b->cbuf_in);
    dsi__ep_xchg_free(&b->disp);
    dsi__ep_xchg_free(&b->comb);
    memset(b, 0, sizeof *b);
}

static int ub_alloc(dsi_ep *ep, ep_ub *b) {
    int P = ep->P, Tm = ep->Tm;
    size_t rows = (size_t)P * Tm;
    if (dsi__ubatch_init(ep->e, &b->st) != DSI_OK) return DSI_ENOMEM;
    b->steps = calloc(Tm, sizeof(dsi_seq_step));
    b->T_peer = calloc(P, sizeof(int));
    b->send_rows = calloc(P, sizeof(int));
    b->send_tok = calloc(rows, sizeof(int));
    b->cnt_in = calloc(P, sizeof(int));
    b->sbuf = dsi_alloc(rows * ep->row_bytes);
    b->rbuf = dsi_alloc(rows * ep->row_bytes);
    b->cout_off = calloc(P + 1, sizeof(int));
    b->cin_off = calloc(P + 1, sizeof(int));
    if (!b->steps || !b->T_peer || !b->send_rows || !b->send_tok || !b->cnt_in || !b->sbuf || !b->rbuf ||
        !b->cout_off || !b->cin_off || dsi__ep_xchg_alloc(&b->disp, P) || dsi__ep_xchg_alloc(&b->comb, P))
        return DSI_ENOMEM;
    b->stage = ST_FINISHED;
    return DSI_OK;
}

void dsi_ep_destroy(dsi_ep *ep) {
    if (!ep) return;
    if (ep->e) { ep->e->poll_hook = NULL; ep->e->poll_ctx = NULL; }
    for (int u = 0; u < 2; u++) ub_free(ep, &ep->ub[u]);
    if (ep->tp) ep->tp->destroy(ep->tp);
    dsi_eplb_placement_free(&ep->pl);
    dsi_eplb_stats_destroy(ep->eplb);
    free(ep->mom_before);
    free(ep->mom_after);
    pthread_mutex_destroy(&ep->eplb_mu);
    free(ep->moe_index); free(ep->rr); free(ep->slot_count); free(ep->slot_off); free(ep->pair_row);
    free(ep->pair_out); free(ep->comb_src); free(ep->comb_tmp); free(ep->tmp_row); free(ep->st); free(ep->rows_pairs); free(ep->hdr_all); free(ep->hdr_rq);
    dsi_free(ep->ex); dsi_free(ep->h1); dsi_free(ep->h2);
    free(ep);
}

static void poll_hook(void *ctx) { dsi__ep_poll(ctx); }

static void parse_fault(dsi_ep *ep) {
    /* DSI_EP_FAULT=RANK:LAYER:exit|hang|kill makes one rank fail at a layer (tests) */
    const char *f = getenv("DSI_EP_FAULT");
    int r, l;
    char mode[16];
    if (!f || sscanf(f, "%d:%d:%15s", &r, &l, mode) != 3 || r != ep->rank) return;
    ep->fault_layer = l;
    ep->fault_mode = !strcmp(mode, "exit") ? 1 : !strcmp(mode, "hang") ? 2 : !strcmp(mode, "kill") ? 3 : 0;
}

int dsi_ep_create(dsi_engine *e, const dsi_ep_opts *opts, dsi_ep **out) {
    *out = NULL;
    if (!g_init) return dsi_error(DSI_EINVAL, "ep: dsi_ep_init first");
    const dsi_config *c = e->c;
    if (c->n_experts <= 0) return dsi_error(DSI_EUNSUPPORTED, "ep: the model has no routed experts");
    if (c->n_experts_per_tok > 64) return dsi_error(DSI_EUNSUPPORTED, "ep: top-%d routing (at most 64)", c->n_experts_per_tok);
    dsi_ep *ep = calloc(1, sizeof *ep);
    if (!ep) return dsi_error(DSI_ENOMEM, "out of memory");
    pthread_mutex_init(&ep->eplb_mu, NULL);
    ep->e = e, ep->c = c;
    if (opts) ep->o = *opts;
    if (ep->o.timeout_ms <= 0) ep->o.timeout_ms = 30000;
    if (ep->o.eplb_threshold <= 0) ep->o.eplb_threshold = 0.05;
    if (ep->o.eplb_window <= 0) ep->o.eplb_window = 64;
    ep->rank = g_rank, ep->P = g_size, ep->Tm = e->max_tokens, ep->D = c->hidden;
    ep->K = c->n_experts_per_tok, ep->E = c->n_experts;
    ep->cur = -1;
    ep->fault_layer = -1;
    parse_fault(ep);
    int rc = DSI_OK;
    ep->moe_index = malloc(sizeof(int) * c->n_layers);
    if (!ep->moe_index) rc = dsi_error(DSI_ENOMEM, "out of memory");
    for (int l = 0; rc == DSI_OK && l < c->n_layers; l++)
        ep->moe_index[l] = e->m->layers[l].is_moe ? ep->n_moe++ : -1;
    if (rc == DSI_OK && ep->n_moe == 0) rc = dsi_error(DSI_EUNSUPPORTED, "ep: the model has no MoE layer");
    if (rc == DSI_OK) rc = placement_setup(ep);
    /* every rank must agree on the geometry that sizes the buffers */
    if (rc == DSI_OK) {
        long long mine[4] = {ep->Tm, (long long)dsi_model_fingerprint(e->m), ep->pl.n_slots, ep->o.dispatch};
        long long *all = malloc(sizeof(mine) * ep->P);
        if (!all) rc = dsi_error(DSI_ENOMEM, "out of memory");
        else if (MPI_Allgather(mine, 4, MPI_LONG_LONG, all, 4, MPI_LONG_LONG, MPI_COMM_WORLD) != MPI_SUCCESS)
            rc = dsi_error(DSI_EPEER, "ep: group start-up exchange failed");
        for (int p = 0; rc == DSI_OK && p < ep->P; p++)
            if (memcmp(all + 4 * p, mine, sizeof mine))
                rc = dsi_error(DSI_EINVAL,
                               "ep: rank %d disagrees with rank %d on max batch tokens, model, slots or dispatch "
                               "(%lld/%llx/%lld/%lld vs %lld/%llx/%lld/%lld)",
                               p, ep->rank, all[4 * p], all[4 * p + 1], all[4 * p + 2], all[4 * p + 3], mine[0],
                               mine[1], mine[2], mine[3]);
        free(all);
    }
    if (rc == DSI_OK) rc = dsi__ep_transport_mpi(ep->o.link_gbps, ep->o.link_latency_us, &ep->tp);
    if (rc != DSI_OK) { dsi_ep_destroy(ep); return rc; }

    int P = ep->P, Tm = ep->Tm, D = ep->D, K = ep->K;
    ep->spr = ep->pl.n_slots / P;
    ep->n_blk = DSI_CEIL_DIV(D, 128);
    ep->payload_bytes = ep->o.dispatch == DSI_EP_F32    ? (size_t)D * 4
                        : ep->o.dispatch == DSI_EP_BF16 ? (size_t)D * 2
                                                        : (size_t)D + sizeof(float) * ep->n_blk;
    ep->comb_row_bytes = (size_t)D * (ep->o.dispatch == DSI_EP_F32 ? 4 : 2);
    ep->row_bytes = (8 * (size_t)K + ep->payload_bytes + 15) & ~(size_t)15;
    ep->rr = calloc((size_t)ep->n_moe * ep->E, sizeof(uint64_t));
    for (size_t i = 0; ep->rr && i < (size_t)ep->n_moe * ep->E; i++) ep->rr[i] = ep->rank;
    size_t rows = (size_t)P * Tm;
    ep->ex = dsi_alloc((size_t)Tm * D * 4);
    ep->h1 = dsi_alloc((size_t)Tm * c->moe_inter * 4);
    ep->h2 = dsi_alloc((size_t)Tm * c->moe_inter * 4);
    ep->slot_count = calloc(ep->spr, sizeof(int));
    ep->slot_off = calloc(ep->spr + 1, sizeof(int));
    ep->pair_row = malloc(sizeof(int) * rows * K);
    ep->pair_out = malloc(sizeof(int) * rows * K);
    ep->comb_src = malloc(sizeof(*ep->comb_src) * Tm * K);
    ep->comb_tmp = malloc(sizeof(float) * D);
    ep->tmp_row = malloc(ep->row_bytes);
    ep->hdr_all = malloc(sizeof(int) * HDR * P);
    ep->hdr_rq = malloc(sizeof(int) * 2 * P);
    ep->st = calloc(c->n_layers, sizeof(dsi_ep_layer_stats));
    ep->rows_pairs = calloc(ep->n_moe, sizeof(double));
    if (!ep->rr || !ep->ex || !ep->h1 || !ep->h2 || !ep->slot_count || !ep->slot_off || !ep->pair_row ||
        !ep->pair_out || !ep->comb_src || !ep->comb_tmp || !ep->tmp_row || !ep->hdr_all || !ep->hdr_rq || !ep->st || !ep->rows_pairs || ub_alloc(ep, &ep->ub[0]) ||
        ub_alloc(ep, &ep->ub[1])) {
        dsi_ep_destroy(ep);
        return dsi_error(DSI_ENOMEM, "ep: cannot allocate buffers for %d ranks x %d tokens", P, Tm);
    }
    /* routing counts are always kept (cheap): a rebalance may also be requested */
    if (!(ep->eplb = dsi_eplb_stats_create(ep->n_moe, ep->E, ep->o.eplb_window))) {
        rc = DSI_ENOMEM;
        dsi_ep_destroy(ep);
        return rc;
    }
    e->poll_hook = poll_hook;
    e->poll_ctx = ep;
    *out = ep;
    return DSI_OK;
}

/* ------------------------------------------------------------ the schedule */

/* Makes micro-batch u's state the engine's current one. */
static void make_current(dsi_ep *ep, int u) {
    if (ep->cur == u) return;
    if (ep->cur >= 0) dsi__ubatch_swap(ep->e, &ep->ub[ep->cur].st);
    if (u >= 0) dsi__ubatch_swap(ep->e, &ep->ub[u].st);
    ep->cur = u;
}

/* Splits the batch by rows: the first ceil(T/2) rows go to micro-batch 0. */
static void split_batch(dsi_ep *ep, const dsi_seq_step *seqs, int n_seqs, int overlap) {
    int T = 0, V = ep->c->vocab_size;
    for (int s = 0; s < n_seqs; s++) T += seqs[s].n_tokens;
    int cut = overlap ? (T + 1) / 2 : T, at = 0;
    ep_ub *a = &ep->ub[0], *b = &ep->ub[1];
    a->n_steps = b->n_steps = 0;
    for (int s = 0; s < n_seqs; s++) {
        const dsi_seq_step *q = &seqs[s];
        int k = DSI_MAX(0, DSI_MIN(q->n_tokens, cut - at));
        if (k == q->n_tokens) a->steps[a->n_steps++] = *q;
        else if (k == 0) b->steps[b->n_steps++] = *q;
        else {
            dsi_seq_step h = *q, t = *q;
            h.n_tokens = k;
            h.logits = q->logits == DSI_LOGITS_ALL ? DSI_LOGITS_ALL : DSI_LOGITS_NONE;
            t.tokens = q->tokens + k;
            t.n_tokens = q->n_tokens - k;
            t.pos = q->pos + k;
            if (q->logits == DSI_LOGITS_ALL) t.out_logits = q->out_logits + (size_t)k * V;
            a->steps[a->n_steps++] = h;
            b->steps[b->n_steps++] = t;
        }
        at += q->n_tokens;
    }
}

/* Exchanges {T0, T1, idle, rebalance wanted} with every rank. *all_idle when
 * every rank is idle; ep->rebalance_now when any rank asked to rebalance. */
static int exchange_header(dsi_ep *ep, int idle, int *all_idle) {
    int P = ep->P, me = ep->rank;
    int mine[HDR] = {ep->ub[0].T, ep->ub[1].T, idle, atomic_exchange(&ep->want_rebalance, 0)};
    int *all = ep->hdr_all, *rq = ep->hdr_rq;
    int rc = DSI_OK, pending = 0;
    for (int i = 0; i < 2 * P; i++) rq[i] = -1;
    memcpy(all + HDR * me, mine, sizeof mine);
    for (int p = 0; p < P && rc == DSI_OK; p++) {
        if (p == me) continue;
        rc = ep->tp->irecv(ep->tp, all + HDR * p, sizeof mine, p, TAG_HEADER, &rq[p]);
        if (rc == DSI_OK) pending++, rc = ep->tp->isend(ep->tp, mine, sizeof mine, p, TAG_HEADER, &rq[P + p]);
        if (rc == DSI_OK) pending++;
    }
    double t0 = dsi_now();
    int spins = 0;
    while (rc == DSI_OK && pending > 0) {
        ep->tp->progress(ep->tp);
        for (int i = 0; i < 2 * P && rc == DSI_OK; i++) {
            if (rq[i] < 0) continue;
            int done = 0;
            rc = ep->tp->test(ep->tp, rq[i], &done);
            if (done) rq[i] = -1, pending--;
        }
        if (rc == DSI_OK && pending > 0 && dsi_now() - t0 > ep->o.timeout_ms / 1000.0) {
            char peers[512];
            size_t n = 0;
            for (int p = 0; p < P; p++)
                if (rq[p] >= 0 || rq[P + p] >= 0) n += snprintf(peers + n, n < sizeof peers ? sizeof peers - n : 0, "%s%d", n ? ", " : "", p);
            rc = dsi_error(DSI_ETIMEOUT, "ep rank %d: step start got no answer from rank(s) %s in %d ms: a rank is "
                                         "dead or stuck", me, peers, ep->o.timeout_ms);
        }
        if (++spins > 64) { struct timespec ts = {0, 20000}; nanosleep(&ts, NULL); }
    }
    if (rc == DSI_OK) {
        int idle_all = 1;
        for (int u = 0; u < 2; u++) {
            ep_ub *b = &ep->ub[u];
            b->active = 0;
            for (int p = 0; p < P; p++) {
                b->T_peer[p] = all[HDR * p + u];
                if (b->T_peer[p] < 0 || b->T_peer[p] > ep->Tm)
                    rc = dsi_error(DSI_EPEER, "ep: rank %d announced %d tokens", p, b->T_peer[p]);
                b->active |= b->T_peer[p] > 0;
            }
        }
        ep->rebalance_now = 0;
        for (int p = 0; p < P; p++) idle_all &= all[HDR * p + 2] != 0, ep->rebalance_now |= all[HDR * p + 3] != 0;
        *all_idle = idle_all;
    }
    return rc;
}

static int runnable(dsi_ep *ep, int u) {
    ep_ub *b = &ep->ub[u];
    switch (b->stage) {
    case ST_FINISHED: return 0;
    case ST_A0: {
        const ep_ub *a = &ep->ub[0];
        /* micro-batch 1 reads the KV micro-batch 0 writes in this layer */
        return u == 0 || !a->active || a->stage == ST_FINISHED || a->layer > b->layer ||
               (a->layer == b->layer && a->stage > ST_A0);
    }
    case ST_MLP: return b->disp.done;
    case ST_DONE: return b->comb.done;
    default: return 1;
    }
}

static void fault(dsi_ep *ep, int layer) {
    if (ep->fault_mode == 0 || layer != ep->fault_layer) return;
    static const char *name[] = {"", "exit", "hang", "kill"};
    fprintf(stderr, "dsinfer: ep rank %d: injected fault (%s) at layer %d\n", ep->rank, name[ep->fault_mode], layer);
    if (ep->fault_mode == 1) _exit(3);
    if (ep->fault_mode == 3) raise(SIGKILL);
    for (;;) sleep(1);
}

/* Waits (polling) until exchange x is done; the no-overlap path. */
static int wait_xchg(dsi_ep *ep, ep_xchg *x, int layer) {
    double t0 = dsi_now();
    int spins = 0;
    while (!x->done && ep->err == DSI_OK) {
        dsi__ep_poll(ep);
        int rc = dsi__ep_check_timeouts(ep);
        if (rc != DSI_OK) return rc;
        if (++spins > 256) { struct timespec ts = {0, 20000}; nanosleep(&ts, NULL); }
    }
    ep->st[layer].wait_s += dsi_now() - t0;
    return ep->err;
}

static int next_layer(dsi_ep *ep, ep_ub *b) {
    b->layer++;
    b->stage = b->layer < ep->c->n_layers ? ST_A0 : ST_FINISHED;
    return DSI_OK;
}

static double thread_cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Runs the next stage of micro-batch u. */
static int run_stage(dsi_ep *ep, int u) {
    ep_ub *b = &ep->ub[u];
    dsi_engine *e = ep->e;
    int l = b->layer, moe = e->m->layers[l].is_moe, rc = DSI_OK;
    double t0 = dsi_now(), c0 = thread_cpu_s();
    make_current(ep, u);
    switch (b->stage) {
    case ST_A0:
        fault(ep, l);
        if (b->T > 0) rc = dsi__stage_attn0(e, l);
        b->stage = ST_A1;
        break;
    case ST_A1:
        if (b->T > 0) rc = dsi__stage_attn1(e, l);
        if (rc == DSI_OK && moe && b->T > 0) rc = dsi__stage_gate(e, l);
        if (rc == DSI_OK && moe && b->T > 0)
            rc = dsi_eplb_stats_record(ep->eplb, ep->moe_index[l], e->s.topk_ids, (size_t)b->T * ep->K);
        if (rc == DSI_OK && moe) rc = dsi__ep_dispatch_post(ep, u, l);
        if (rc == DSI_OK && moe && ep->o.no_overlap) {
            ep->st[l].compute_s += dsi_now() - t0;
            ep->st[l].compute_cpu_s += thread_cpu_s() - c0;
            rc = wait_xchg(ep, &b->disp, l);
            t0 = dsi_now(), c0 = thread_cpu_s();
        }
        b->stage = ST_SHARED;
        break;
    case ST_SHARED:
        if (b->T > 0) rc = dsi__stage_shared(e, l);
        if (moe) b->stage = ST_MLP;
        else next_layer(ep, b);
        break;
    case ST_MLP:
        rc = dsi__ep_mlp_and_combine(ep, u, l);
        if (rc == DSI_OK && ep->o.no_overlap) {
            ep->st[l].compute_s += dsi_now() - t0;
            ep->st[l].compute_cpu_s += thread_cpu_s() - c0;
            rc = wait_xchg(ep, &b->comb, l);
            t0 = dsi_now(), c0 = thread_cpu_s();
        }
        b->stage = ST_DONE;
        break;
    case ST_DONE:
        if (b->T > 0) dsi__ep_combine_finish(ep, u);
        b->disp.posted = b->comb.posted = 0;
        next_layer(ep, b);
        break;
    }
    ep->st[l].compute_s += dsi_now() - t0;
    ep->st[l].compute_cpu_s += thread_cpu_s() - c0;
    return rc;
}

static int run_layers(dsi_ep *ep) {
    int pref = 0, spins = 0;
    for (int u = 0; u < 2; u++) {
        ep_ub *b = &ep->ub[u];
        b->layer = 0;
        b->stage = b->active ? ST_A0 : ST_FINISHED;
        b->disp.posted = b->comb.posted = 0;
    }
    double t_wait = 0;
    while (ep->ub[0].stage != ST_FINISHED || ep->ub[1].stage != ST_FINISHED) {
        dsi__ep_poll(ep);
        if (ep->err != DSI_OK) return ep->err;
        int ran = 0;
        for (int k = 0; k < 2 && !ran; k++) {
            int u = (pref + k) % 2;
            if (!runnable(ep, u)) continue;
            if (t_wait > 0) {
                /* idle time belongs to the layer the waiting micro-batches are in */
                int lw = DSI_MIN(ep->ub[0].stage == ST_FINISHED ? 1 << 30 : ep->ub[0].layer,
                                 ep->ub[1].stage == ST_FINISHED ? 1 << 30 : ep->ub[1].layer);
                ep->st[lw].wait_s += dsi_now() - t_wait;
                t_wait = 0;
            }
            int rc = run_stage(ep, u);
            if (rc != DSI_OK) return rc;
            pref = 1 - u;
            ran = 1;
            spins = 0;
        }
        if (!ran) {
            if (t_wait == 0) t_wait = dsi_now();
            int rc = dsi__ep_check_timeouts(ep);
            if (rc != DSI_OK) return rc;
            if (++spins > 256) { struct timespec ts = {0, 20000}; nanosleep(&ts, NULL); }
        }
    }
    return DSI_OK;
}

static int online_eplb(dsi_ep *ep);

static int ep_step(dsi_ep *ep, const dsi_seq_step *seqs, int n_seqs, int idle, int *all_idle) {
    dsi_engine *e = ep->e;
    int rc = DSI_OK, bad = DSI_OK;
    ep->err = DSI_OK;
    int64_t T = 0;
    for (int s = 0; s < n_seqs; s++) T += seqs[s].n_tokens > 0 ? seqs[s].n_tokens : ep->Tm + 1;
    if (n_seqs < 0 || T > ep->Tm) {
        /* too big to lay out: take part with nothing, fail afterwards */
        bad = dsi_error(DSI_ERANGE, "ep step: %d sequences with %lld tokens exceed the step budget %d (or one is empty)",
                        n_seqs, (long long)T, ep->Tm);
        n_seqs = 0;
    }
    split_batch(ep, seqs, n_seqs, !ep->o.no_overlap);
    /* lay out and embed both micro-batches; a bad batch still takes part
     * (empty) so that the group stays in step */
    for (int u = 0; u < 2; u++) {
        ep_ub *b = &ep->ub[u];
        make_current(ep, u);
        b->T = 0;
        if (bad == DSI_OK && (bad = dsi__step_begin(e, b->steps, b->n_steps)) == DSI_OK) b->T = e->T;
        else if (bad != DSI_OK) dsi__step_begin(e, NULL, 0);
    }
    if (bad != DSI_OK)
        for (int u = 0; u < 2; u++) ep->ub[u].T = 0;
    char msg[512];
    if (bad != DSI_OK) snprintf(msg, sizeof msg, "%s", dsi_last_error());
    rc = exchange_header(ep, idle, all_idle);
    if (rc == DSI_OK && !*all_idle) rc = run_layers(ep);
    for (int u = 0; rc == DSI_OK && !*all_idle && u < 2; u++) {
        ep_ub *b = &ep->ub[u];
        if (b->T == 0) continue;
        make_current(ep, u);
        dsi__step_end(e, b->steps, b->n_steps);
    }
    make_current(ep, -1);
    if (rc == DSI_OK && !*all_idle) {
        ep->steps++;
        dsi_eplb_stats_step(ep->eplb);
        if (ep->rebalance_now || (ep->o.eplb_every > 0 && ep->steps % ep->o.eplb_every == 0)) rc = online_eplb(ep);
    }
    if (rc != DSI_OK) return rc;
    if (bad != DSI_OK) return dsi_error(bad, "%s", msg);
    return DSI_OK;
}

int dsi_ep_step(dsi_ep *ep, const dsi_seq_step *seqs, int n_seqs) {
    int all_idle = 0;
    return ep_step(ep, seqs, n_seqs, 0, &all_idle);
}

int dsi_ep_idle(dsi_ep *ep) {
    for (;;) {
        int all_idle = 0, rc = ep_step(ep, NULL, 0, 1, &all_idle);
        if (rc != DSI_OK || all_idle) return rc;
    }
}

/* ------------------------------------------------------------ figures */

void dsi_ep_get_stats(const dsi_ep *ep, dsi_ep_layer_stats *out) {
    memcpy(out, ep->st, sizeof(dsi_ep_layer_stats) * ep->c->n_layers);
}

void dsi_ep_reset_stats(dsi_ep *ep) {
    memset(ep->st, 0, sizeof(dsi_ep_layer_stats) * ep->c->n_layers);
    memset(ep->rows_pairs, 0, sizeof(double) * ep->n_moe);
}

int dsi_ep_expert_balance(dsi_ep *ep, double *out) {
    int P = ep->P, L = ep->n_moe;
    double *all = malloc(sizeof(double) * P * L);
    if (!all) return dsi_error(DSI_ENOMEM, "out of memory");
    if (MPI_Allgather(ep->rows_pairs, L, MPI_DOUBLE, all, L, MPI_DOUBLE, MPI_COMM_WORLD) != MPI_SUCCESS) {
        free(all);
        return dsi_error(DSI_EPEER, "ep: statistics exchange failed");
    }
    for (int l = 0; l < L; l++) {
        double mx = 0, sum = 0;
        for (int p = 0; p < P; p++) {
            double v = all[(size_t)p * L + l];
            sum += v;
            if (v > mx) mx = v;
        }
        out[l] = sum > 0 ? mx / (sum / P) : 1.0;
    }
    free(all);
    return DSI_OK;
}

int dsi_ep_rebalances(const dsi_ep *ep) { return ep->rebalances; }

int dsi_ep_write_eplb_metrics(dsi_ep *ep, char *buf, size_t cap) {
    size_t n = 0;
#define PUT(...) do { int k_ = snprintf(buf + n, n < cap ? cap - n : 0, __VA_ARGS__); if (k_ > 0) n += (size_t)k_; } while (0)
    PUT("# HELP dsinfer_eplb_rebalances_total Online expert-placement switches.\n"
        "# TYPE dsinfer_eplb_rebalances_total counter\ndsinfer_eplb_rebalances_total %d\n", ep->rebalances);
    pthread_mutex_lock(&ep->eplb_mu);
    if (ep->have_decision) {
        PUT("# HELP dsinfer_eplb_predicted_gain Predicted drop of the summed busiest-rank load at the last decision.\n"
            "# TYPE dsinfer_eplb_predicted_gain gauge\ndsinfer_eplb_predicted_gain %.6f\n", ep->last_gain);
        PUT("# HELP dsinfer_eplb_max_over_mean Busiest rank's routed load over the mean per MoE layer at the last "
            "decision: the placement then in force (before) and the proposal (after).\n"
            "# TYPE dsinfer_eplb_max_over_mean gauge\n");
        for (int l = 0; l < ep->n_moe; l++) {
            PUT("dsinfer_eplb_max_over_mean{moe_layer=\"%d\",placement=\"before\"} %.6f\n", l, ep->mom_before[l]);
            PUT("dsinfer_eplb_max_over_mean{moe_layer=\"%d\",placement=\"after\"} %.6f\n", l, ep->mom_after[l]);
        }
    }
    pthread_mutex_unlock(&ep->eplb_mu);
#undef PUT
    if (n >= cap) return dsi_error(DSI_ERANGE, "eplb metrics: buffer of %zu bytes too small", cap);
    return (int)n;
}

void dsi_ep_request_rebalance(dsi_ep *ep) { atomic_store(&ep->want_rebalance, 1); }

/* ------------------------------------------------------------ online EPLB */

/* At a step boundary every rank holds the same counters after an
 * all-reduce, so every rank computes the same proposal and decision: no
 * placement needs to travel. Switching is a table swap here because every
 * rank maps the whole checkpoint (a slot's new expert is read from the
 * mapping on first use); a runtime with device memory would copy the moved
 * slots' weights beside the old ones first. */
static int online_eplb(dsi_ep *ep) {
    int L = ep->n_moe, E = ep->E;
    double *load = malloc(sizeof(double) * L * E), *sum = malloc(sizeof(double) * L * E);
    if (!load || !sum) { free(load); free(sum); return dsi_error(DSI_ENOMEM, "out of memory"); }
    dsi_eplb_stats_snapshot(ep->eplb, load);
    int rc = DSI_OK;
    if (MPI_Allreduce(load, sum, L * E, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS)
        rc = dsi_error(DSI_EPEER, "ep: routing statistics exchange failed");
    dsi_eplb_config cfg = {.n_slots = ep->pl.n_slots, .n_groups = 1, .n_nodes = 1, .n_gpus = ep->P,
                           .policy = DSI_EPLB_BEST};
    double *before = malloc(sizeof(double) * L), *after = malloc(sizeof(double) * L);
    dsi_eplb_decision dec = {.mom_before = before, .mom_after = after};
    dsi_eplb_placement next = {0};
    if (!before || !after) rc = dsi_error(DSI_ENOMEM, "out of memory");
    if (rc == DSI_OK) rc = dsi_eplb_should_rebalance(sum, &ep->pl, &cfg, ep->o.eplb_threshold, &dec, &next);
    if (rc == DSI_OK) { /* publish for /metrics */
        pthread_mutex_lock(&ep->eplb_mu);
        double *ob = ep->mom_before, *oa = ep->mom_after;
        ep->mom_before = before;
        ep->mom_after = after;
        before = ob;
        after = oa;
        ep->last_gain = dec.gain;
        ep->have_decision = 1;
        pthread_mutex_unlock(&ep->eplb_mu);
    }
    free(before);
    free(after);
    if (rc == DSI_OK && dec.rebalance) {
        dsi_eplb_placement_free(&ep->pl);
        ep->pl = next;
        memset(&next, 0, sizeof next);
        ep->rebalances++;
        if (ep->rank == 0)
            fprintf(stderr, "dsinfer: ep: step %lld: new expert placement (predicted gain %.1f%%, %d slots moved)\n",
                    (long long)ep->steps, dec.gain * 100, dec.moved_slots);
    }
    dsi_eplb_placement_free(&next);
    free(load);
    free(sum);
    return rc;
}
