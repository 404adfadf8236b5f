/* The planner: a discrete-event simulation of a day of DeepSeek-style serving.
 *
 * Requests arrive as a non-homogeneous Poisson process following a diurnal
 * curve; each simulated arrival is a bundle of `bundle` identical requests
 * (lengths and cache-hit share drawn once for the bundle) so that a day of
 * ~170M requests runs in seconds. Bundles queue for prefill units (4 nodes,
 * EP32), which batch up to 16K miss tokens per GPU per step (chunking long
 * prompts); finished prompts move to the decode unit (18 nodes, EP144) with
 * the fewest requests, where every step advances all its requests by one
 * token (1 + acceptance with MTP). Step times come from perf.c. Every
 * scale_interval_s an autoscaler sizes both pools: prefill to a busy-fraction
 * target (plus one unit while p90 TTFT is over target), decode to the number
 * of requests a unit holds at the per-user speed target.
 *
 * Events: arrival, prefill step done, decode step done, unit ready,
 * autoscale tick, minute sample. Ties break by insertion order, and the RNG
 * is seeded, so a config always gives the same day. */
#include "sim/planner_impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- RNG: splitmix64 seeding xoshiro256** ------------------------------------------ */

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void dsi__rng_seed(sim_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

double dsi__rng_uniform(sim_rng *r) {
    uint64_t *s = r->s;
    uint64_t res = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t, s[3] = rotl(s[3], 45);
    return ((res >> 11) + 0.5) * (1.0 / 9007199254740992.0); /* (0, 1) */
}

static double rng_normal(sim_rng *r) {
    double u = dsi__rng_uniform(r), v = dsi__rng_uniform(r);
    return sqrt(-2 * log(u)) * cos(2 * M_PI * v);
}

/* Marsaglia-Tsang; shape < 1 boosted by U^(1/shape). */
static double rng_gamma(sim_rng *r, double k) {
    if (k < 1) return rng_gamma(r, k + 1) * pow(dsi__rng_uniform(r), 1 / k);
    double d = k - 1.0 / 3, c = 1 / sqrt(9 * d);
    for (;;) {
        double x = rng_normal(r), v = 1 + c * x;
        if (v <= 0) continue;
        v = v * v * v;
        double u = dsi__rng_uniform(r);
        if (log(u) < 0.5 * x * x + d - d * v + d * log(v)) return d * v;
    }
}

static double rng_lognormal(sim_rng *r, double mean, double cv) {
    double s2 = log(1 + cv * cv);
    return exp(log(mean) - s2 / 2 + sqrt(s2) * rng_normal(r));
}

/* ---- event heap ------------------------------------------------------------------------- */

static int ev_less(const sim_event *a, const sim_event *b) {
    return a->t < b->t || (a->t == b->t && a->seq < b->seq);
}

static int push_event(sim *s, double t, int type, int idx) {
    if (s->n_ev == s->cap_ev) {
        int nc = s->cap_ev ? 2 * s->cap_ev : 256;
        sim_event *ne = realloc(s->ev, nc * sizeof *ne);
        if (!ne) return dsi_error(DSI_ENOMEM, "sim: out of memory");
        s->ev = ne, s->cap_ev = nc;
    }
    int i = s->n_ev++;
    sim_event e = {t, s->seq++, type, idx};
    while (i > 0 && ev_less(&e, &s->ev[(i - 1) / 2])) {
        s->ev[i] = s->ev[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    s->ev[i] = e;
    return DSI_OK;
}

static sim_event pop_event(sim *s) {
    sim_event top = s->ev[0], last = s->ev[--s->n_ev];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= s->n_ev) break;
        if (c + 1 < s->n_ev && ev_less(&s->ev[c + 1], &s->ev[c])) c++;
        if (!ev_less(&s->ev[c], &last)) break;
        s->ev[i] = s->ev[c];
        i = c;
    }
    if (s->n_ev > 0) s->ev[i] = last;
    return top;
}

/* ---- bundles and queues ------------------------------------------------------------------- */

static int bundle_new(sim *s) {
    if (s->free_head < 0) {
        int nc = s->cap_b ? 2 * s->cap_b : 4096;
        sim_bundle *nb = realloc(s->b, nc * sizeof *nb);
        if (!nb) return -1;
        s->b = nb;
        for (int i = nc - 1; i >= s->cap_b; i--) {
            s->b[i].next = s->free_head;
            s->free_head = i;
        }
        s->cap_b = nc;
    }
    int i = s->free_head;
    s->free_head = s->b[i].next;
    memset(&s->b[i], 0, sizeof s->b[i]);
    return i;
}

static void bundle_free(sim *s, int i) {
    s->b[i].next = s->free_head;
    s->free_head = i;
}

static int q_push(sim_queue *q, int v) {
    if (q->n == q->cap) {
        int nc = q->cap ? 2 * q->cap : 1024;
        int *nv = malloc(nc * sizeof *nv);
        if (!nv) return dsi_error(DSI_ENOMEM, "sim: out of memory");
        for (int i = 0; i < q->n; i++) nv[i] = q->v[(q->head + i) % q->cap];
        free(q->v);
        q->v = nv, q->cap = nc, q->head = 0;
    }
    q->v[(q->head + q->n) % q->cap] = v;
    q->n++;
    return DSI_OK;
}

static int q_front(const sim_queue *q) { return q->v[q->head]; }
static void q_pop(sim_queue *q) {
    q->head = (q->head + 1) % q->cap;
    q->n--;
}

/* Decode unit min-heap on finish position. */
static int dheap_push(sim_dunit *u, double key, int b) {
    if (u->n == u->cap) {
        int nc = u->cap ? 2 * u->cap : 64;
        sim_dentry *ne = realloc(u->h, nc * sizeof *ne);
        if (!ne) return dsi_error(DSI_ENOMEM, "sim: out of memory");
        u->h = ne, u->cap = nc;
    }
    int i = u->n++;
    while (i > 0 && key < u->h[(i - 1) / 2].key) {
        u->h[i] = u->h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    u->h[i] = (sim_dentry){key, b};
    return DSI_OK;
}

static sim_dentry dheap_pop(sim_dunit *u) {
    sim_dentry top = u->h[0], last = u->h[--u->n];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= u->n) break;
        if (c + 1 < u->n && u->h[c + 1].key < u->h[c].key) c++;
        if (!(u->h[c].key < last.key)) break;
        u->h[i] = u->h[c];
        i = c;
    }
    if (u->n > 0) u->h[i] = last;
    return top;
}

/* ---- time bookkeeping ----------------------------------------------------------------------- */

static int live(int state) { return state != UNIT_OFF; }

static int count_nodes(const sim *s) {
    int n = 0;
    for (int i = 0; i < s->n_pu; i++) n += live(s->pu[i].state) * s->c.prefill_nodes;
    for (int i = 0; i < s->n_du; i++) n += live(s->du[i].state) * s->c.decode_nodes;
    return n;
}

/* Accrues node time from s->t_acc to t, split into the day's hours. */
static void accrue_nodes(sim *s, double t) {
    double a = s->t_acc > s->day0 ? s->t_acc : s->day0, b = t < s->day1 ? t : s->day1;
    if (b > a) {
        int np = 0, nd = 0;
        for (int i = 0; i < s->n_pu; i++) np += live(s->pu[i].state);
        for (int i = 0; i < s->n_du; i++) nd += live(s->du[i].state);
        double pn = np * s->c.prefill_nodes, dn = nd * s->c.decode_nodes;
        s->r->prefill_node_s += (b - a) * pn;
        s->r->decode_node_s += (b - a) * dn;
        double usd_per_node_s = s->c.gpus_per_node * s->c.gpu_cost_per_hour / 3600.0;
        while (a < b) {
            int h = (int)((a - s->day0) / 3600.0);
            if (h > 23) h = 23;
            double end = s->day0 + (h + 1) * 3600.0;
            double e = end < b ? end : b;
            s->r->hourly_cost[h] += (e - a) * (pn + dn) * usd_per_node_s;
            a = e;
        }
        if (pn + dn > s->r->peak_nodes) s->r->peak_nodes = pn + dn;
    }
    s->t_acc = t;
}

static int in_day(const sim *s, double t) { return t >= s->day0 && t < s->day1; }

/* ---- arrivals ---------------------------------------------------------------------------------- */

/* Requests per second at minute m (of the simulated span, from t_begin). */
static double rate_at(const sim *s, double t) {
    int m = (int)((t - s->t_begin) / 60.0);
    if (m < 0) m = 0;
    if (m >= s->n_min) m = s->n_min - 1;
    return s->rate[m];
}

static int schedule_arrival(sim *s, double now) {
    /* Piecewise-constant rate per minute: draw within the minute, else move on. */
    double t = now;
    for (;;) {
        if (t >= s->day1) return DSI_OK;
        double lam = rate_at(s, t) / s->c.bundle;
        double m_end = s->t_begin + (floor((t - s->t_begin) / 60.0) + 1) * 60.0;
        if (lam > 0) {
            double dt = -log(dsi__rng_uniform(&s->rng)) / lam;
            if (t + dt < m_end) return push_event(s, t + dt, EV_ARRIVAL, 0);
        }
        t = m_end;
    }
}

static double utilisation_now(const sim *s) {
    return s->fleet_nodes > 0 ? count_nodes(s) / s->fleet_nodes : -1;
}

static int on_arrival(sim *s, double t) {
    int i = bundle_new(s);
    if (i < 0) return dsi_error(DSI_ENOMEM, "sim: out of memory");
    sim_bundle *b = &s->b[i];
    const dsi_sim_config *c = &s->c;
    b->t_arr = t;
    b->w = c->bundle;
    b->lin = fmin(fmax(round(rng_lognormal(&s->rng, s->mean_in, c->input_cv)), 2), 131072);
    b->lout = fmin(fmax(round(rng_lognormal(&s->rng, c->mean_output_len, c->output_cv)), 1), 65536);
    double hs = 0;
    if (c->disk_cache) {
        double a = c->hit_share * c->hit_concentration, bb = (1 - c->hit_share) * c->hit_concentration;
        double x = rng_gamma(&s->rng, a), y = rng_gamma(&s->rng, bb);
        hs = x / (x + y);
    }
    b->hit = fmin(floor(hs * b->lin), b->lin - 1); /* the last prompt token is always computed */
    b->remaining = b->lin - b->hit;
    /* price frozen at admission */
    if (c->pricing) {
        dsi_price_quote q;
        if (dsi_pricing_current(c->pricing, dsi_pricing_model_name(c->pricing, c->pricing_model), t,
                                utilisation_now(s), &q) != DSI_OK)
            return DSI_EINVAL;
        for (int k = 0; k < DSI_TOK_N; k++) b->price[k] = q.usd_per_mtok[k];
    } else {
        for (int k = 0; k < DSI_TOK_N; k++) b->price[k] = c->usd_per_mtok[k];
    }
    if (in_day(s, t)) {
        double tok = b->w * (b->lin + b->lout);
        int h = (int)((t - s->day0) / 3600.0);
        s->r->hourly_tokens[h > 23 ? 23 : h] += tok;
        s->tok_arrived += tok;
        if (s->offpeak_hour[h > 23 ? 23 : h]) s->tok_offpeak += tok;
        s->kv_num += b->w * b->lout * (b->lin + b->lout / 2.0);
        s->kv_den += b->w * b->lout;
    }
    int rc = q_push(&s->pq, i);
    if (rc) return rc;
    return schedule_arrival(s, t);
}

/* ---- prefill ------------------------------------------------------------------------------------ */

static int prefill_try_start(sim *s, int ui, double t) {
    sim_punit *u = &s->pu[ui];
    if (u->state != UNIT_ACTIVE || u->busy || s->pq.n == 0) return DSI_OK;
    int n_gpus = s->c.prefill_nodes * s->c.gpus_per_node;
    double budget = s->c.prefill_tokens_per_gpu * n_gpus, miss = 0, ctx = 0, hit = 0;
    u->n_chunks = 0;
    while (s->pq.n > 0 && budget - miss >= 256) {
        int bi = q_front(&s->pq);
        sim_bundle *b = &s->b[bi];
        double k = b->remaining;
        if (b->w * k > budget - miss) k = floor((budget - miss) / b->w);
        if (k < 1) {
            if (u->n_chunks > 0) break;
            k = fmin(1, b->remaining);
        }
        double done = b->lin - b->hit - b->remaining; /* miss tokens already scheduled */
        if (done == 0) hit += b->w * b->hit;
        miss += b->w * k;
        ctx += b->w * (k * (b->hit + done) + k * (k + 1) / 2);
        b->remaining -= k;
        b->inflight++;
        if (u->n_chunks == u->cap_chunks) {
            int nc = u->cap_chunks ? 2 * u->cap_chunks : 16;
            int *nv = realloc(u->chunks, nc * sizeof *nv);
            if (!nv) return dsi_error(DSI_ENOMEM, "sim: out of memory");
            u->chunks = nv, u->cap_chunks = nc;
        }
        u->chunks[u->n_chunks++] = bi;
        if (b->remaining <= 0) q_pop(&s->pq);
        else break; /* partial chunk: the budget is spent */
    }
    double dt = dsi_perf_prefill_step(&s->c.perf, n_gpus, miss / n_gpus, ctx / n_gpus, hit / n_gpus, NULL);
    u->busy = 1;
    s->win_prefill_busy += dt;
    return push_event(s, t + dt, EV_PREFILL_DONE, ui);
}

static int prefill_kick(sim *s, double t) {
    for (int i = 0; i < s->n_pu && s->pq.n > 0; i++)
        if (s->pu[i].state == UNIT_ACTIVE && !s->pu[i].busy) {
            int rc = prefill_try_start(s, i, t);
            if (rc) return rc;
        }
    return DSI_OK;
}

static void ttft_record(sim *s, double v) {
    int bin = (int)(v / SIM_TTFT_BIN);
    if (bin >= SIM_TTFT_BINS) bin = SIM_TTFT_BINS - 1;
    s->win_ttft[bin]++;
    s->win_ttft_n++;
}

static int decode_admit(sim *s, int bi, double t);

static int on_prefill_done(sim *s, int ui, double t) {
    sim_punit *u = &s->pu[ui];
    u->busy = 0;
    for (int k = 0; k < u->n_chunks; k++) {
        int bi = u->chunks[k];
        sim_bundle *b = &s->b[bi];
        if (--b->inflight == 0 && b->remaining <= 0) {
            ttft_record(s, t - b->t_arr);
            if (in_day(s, t)) {
                s->r->input_tokens += b->w * b->lin;
                s->r->hit_tokens += b->w * b->hit;
            }
            int rc = decode_admit(s, bi, t);
            if (rc) return rc;
        }
    }
    u->n_chunks = 0;
    if (u->state == UNIT_DRAINING) {
        accrue_nodes(s, t);
        u->state = UNIT_OFF;
        return DSI_OK;
    }
    return prefill_try_start(s, ui, t);
}

/* ---- decode --------------------------------------------------------------------------------------- */

static int decode_step(sim *s, int ui, double t);

static int decode_join(sim *s, int ui, int bi, double t) {
    sim_dunit *u = &s->du[ui];
    sim_bundle *b = &s->b[bi];
    b->g0 = u->g;
    u->W += b->w;
    u->S1 += b->w * (b->lin - b->g0);
    double ttft = t - b->t_arr;
    if (in_day(s, t)) {
        s->ttft_sum += ttft * b->w;
        s->ttft_n += b->w;
        int bin = (int)(ttft / SIM_TTFT_BIN);
        s->ttft_hist[bin >= SIM_TTFT_BINS ? SIM_TTFT_BINS - 1 : bin] += b->w;
    }
    int rc = dheap_push(u, b->g0 + b->lout, bi);
    if (rc) return rc;
    if (!u->stepping) return decode_step(s, ui, t);
    return DSI_OK;
}

static int decode_admit(sim *s, int bi, double t) {
    s->win_dec_tok += s->b[bi].w * s->b[bi].lout;
    int best = -1;
    for (int i = 0; i < s->n_du; i++) {
        const sim_dunit *u = &s->du[i];
        if (u->state != UNIT_ACTIVE || u->W + s->b[bi].w > s->dec_mem_cap) continue;
        if (best < 0 || u->W < s->du[best].W) best = i;
    }
    if (best < 0) {
        s->dq_w += s->b[bi].w;
        return q_push(&s->dq, bi);
    }
    return decode_join(s, best, bi, t);
}

static int decode_drain_queue(sim *s, double t) {
    while (s->dq.n > 0) {
        int bi = q_front(&s->dq);
        int best = -1;
        for (int i = 0; i < s->n_du; i++) {
            const sim_dunit *u = &s->du[i];
            if (u->state != UNIT_ACTIVE || u->W + s->b[bi].w > s->dec_mem_cap) continue;
            if (best < 0 || u->W < s->du[best].W) best = i;
        }
        if (best < 0) return DSI_OK;
        q_pop(&s->dq);
        s->dq_w -= s->b[bi].w;
        int rc = decode_join(s, best, bi, t);
        if (rc) return rc;
    }
    return DSI_OK;
}

/* Starts the next k steps of unit ui at t (requests joining later wait for the next event). */
static int decode_step(sim *s, int ui, double t) {
    sim_dunit *u = &s->du[ui];
    if (u->W <= 0) {
        u->stepping = 0;
        if (u->state == UNIT_DRAINING) {
            accrue_nodes(s, t);
            u->state = UNIT_OFF;
        }
        return DSI_OK;
    }
    const dsi_perf_params *p = &s->c.perf;
    int n_gpus = s->c.decode_nodes * s->c.gpus_per_node;
    int k = s->c.decode_steps_per_event;
    double tau = p->mtp ? 1 + p->mtp_accept : 1;
    double kv = (u->S1 + u->g * u->W) / u->W + 0.5 * k * tau;
    double dt = dsi_perf_decode_step(p, n_gpus, u->W / n_gpus, kv, NULL);
    u->g += k * tau;
    u->stepping = 1;
    if (in_day(s, t)) {
        s->req_s += u->W * k * dt;
        s->step_tok += u->W * k * tau;
        if (tau / dt < s->c.decode_tok_s) s->slow_req_s += u->W * k * dt;
    }
    return push_event(s, t + k * dt, EV_DECODE_DONE, ui);
}

static void bill(sim *s, const sim_bundle *b, double t) {
    if (!in_day(s, t)) return;
    double miss = b->lin - b->hit;
    double usd = b->w * (b->hit * b->price[0] + miss * b->price[1] + b->lout * b->price[2]) / 1e6;
    usd *= s->c.paying_share;
    s->r->revenue_usd += usd;
    int h = (int)((t - s->day0) / 3600.0);
    s->r->hourly_revenue[h > 23 ? 23 : h] += usd;
    s->r->output_tokens += b->w * b->lout;
    s->r->requests += b->w;
}

static int on_decode_done(sim *s, int ui, double t) {
    sim_dunit *u = &s->du[ui];
    while (u->n > 0 && u->h[0].key <= u->g + 1e-9) {
        sim_dentry e = dheap_pop(u);
        sim_bundle *b = &s->b[e.b];
        u->W -= b->w;
        u->S1 -= b->w * (b->lin - b->g0);
        bill(s, b, t);
        bundle_free(s, e.b);
    }
    if (u->n == 0) u->W = u->S1 = 0; /* no drift from floating-point sums */
    int rc = decode_drain_queue(s, t);
    if (rc) return rc;
    return decode_step(s, ui, t);
}

/* ---- autoscaler -------------------------------------------------------------------------------------- */

static int prefill_live(const sim *s) {
    int n = 0;
    for (int i = 0; i < s->n_pu; i++) n += s->pu[i].state == UNIT_ACTIVE || s->pu[i].state == UNIT_STARTING;
    return n;
}

static int decode_live(const sim *s) {
    int n = 0;
    for (int i = 0; i < s->n_du; i++) n += s->du[i].state == UNIT_ACTIVE || s->du[i].state == UNIT_STARTING;
    return n;
}

static int add_unit(sim *s, int decode, double t, double delay) {
    int n = decode ? s->n_du : s->n_pu;
    int slot = -1;
    for (int i = 0; i < n && slot < 0; i++)
        if ((decode ? s->du[i].state : s->pu[i].state) == UNIT_OFF) slot = i;
    if (slot < 0) {
        if (n >= SIM_MAX_UNITS) return dsi_error(DSI_ERANGE, "sim: more than %d units needed", SIM_MAX_UNITS);
        slot = n;
        if (decode) s->n_du++;
        else s->n_pu++;
    }
    accrue_nodes(s, t);
    if (decode) {
        s->du[slot].state = delay > 0 ? UNIT_STARTING : UNIT_ACTIVE;
        s->du[slot].g = s->du[slot].W = s->du[slot].S1 = 0;
        s->du[slot].ready_at = t + delay;
    } else {
        s->pu[slot].state = delay > 0 ? UNIT_STARTING : UNIT_ACTIVE;
        s->pu[slot].ready_at = t + delay;
    }
    if (delay > 0) return push_event(s, t + delay, decode ? EV_DECODE_READY : EV_PREFILL_READY, slot);
    return DSI_OK;
}

/* Stops one unit: a starting one first, else the least loaded active one. */
static void remove_unit(sim *s, int decode, double t) {
    int best = -1;
    int n = decode ? s->n_du : s->n_pu;
    for (int i = 0; i < n && best < 0; i++)
        if ((decode ? s->du[i].state : s->pu[i].state) == UNIT_STARTING) best = i;
    if (best >= 0) {
        accrue_nodes(s, t);
        if (decode) s->du[best].state = UNIT_OFF;
        else s->pu[best].state = UNIT_OFF;
        return;
    }
    for (int i = 0; i < n; i++) {
        if (decode) {
            if (s->du[i].state == UNIT_ACTIVE && (best < 0 || s->du[i].W < s->du[best].W)) best = i;
        } else if (s->pu[i].state == UNIT_ACTIVE && (best < 0 || !s->pu[i].busy)) {
            best = i;
        }
    }
    if (best < 0) return;
    accrue_nodes(s, t);
    if (decode) {
        s->du[best].state = s->du[best].W > 0 ? UNIT_DRAINING : UNIT_OFF;
    } else {
        s->pu[best].state = s->pu[best].busy ? UNIT_DRAINING : UNIT_OFF;
    }
}

static double decode_kv_mean(const sim *s) {
    double kv = 0, w = 0;
    for (int i = 0; i < s->n_du; i++) {
        kv += s->du[i].S1 + s->du[i].g * s->du[i].W;
        w += s->du[i].W;
    }
    return w > 0 ? kv / w : s->kv_default;
}

static double decode_demand(const sim *s) {
    double w = s->dq_w;
    for (int i = 0; i < s->n_du; i++) w += s->du[i].W;
    return w;
}

static void update_decode_caps(sim *s) {
    int n_gpus = s->c.decode_nodes * s->c.gpus_per_node;
    double kv = decode_kv_mean(s);
    s->dec_cap = dsi_perf_decode_capacity(&s->c.perf, n_gpus, kv, s->c.decode_tok_s) * n_gpus;
    s->dec_mem_cap = dsi_perf_decode_mem_reqs(&s->c.perf, n_gpus, kv) * n_gpus;
    double tau = s->c.perf.mtp ? 1 + s->c.perf.mtp_accept : 1;
    double step = dsi_perf_decode_step(&s->c.perf, n_gpus, s->dec_cap / n_gpus, kv, NULL);
    s->dec_cap_tok = step > 0 ? s->dec_cap * tau / step : 0;
    if (s->dec_mem_cap < s->c.bundle) s->dec_mem_cap = s->c.bundle;
}

static int on_autoscale(sim *s, double t) {
    const dsi_sim_config *c = &s->c;
    int rc;
    /* prefill: busy units needed at the target busy fraction */
    double busy_units = s->win_prefill_busy / c->scale_interval_s;
    int cur = prefill_live(s);
    int need = (int)ceil(busy_units / c->prefill_util_target);
    int keep = (int)ceil(busy_units / (c->prefill_util_target * SIM_DOWN_HYST));
    double p90 = 0;
    if (s->win_ttft_n > 0) {
        int64_t acc = 0;
        for (int i = 0; i < SIM_TTFT_BINS; i++) {
            acc += s->win_ttft[i];
            if (acc >= 0.9 * s->win_ttft_n) {
                p90 = (i + 1) * SIM_TTFT_BIN;
                break;
            }
        }
    }
    if (p90 > c->ttft_target_s && need <= cur) need = cur + 1;
    if (need < 1) need = 1;
    if (need > cur) {
        for (int i = cur; i < need; i++)
            if ((rc = add_unit(s, 0, t, c->unit_start_s))) return rc;
    } else if (keep < cur && p90 <= c->ttft_target_s) {
        int target = keep < 1 ? 1 : keep;
        for (int i = cur; i > target; i--) remove_unit(s, 0, t);
    }
    /* decode: requests a unit holds at the per-user speed target */
    update_decode_caps(s);
    /* Output tokens/s entering decode (plus the backlog's, drained over one
     * interval) against what a unit produces when full at the speed target (or
     * at its memory limit, where it runs faster). Sizing on the current number
     * of requests instead would feed back: slow units hold requests longer. */
    double demand = (s->win_dec_tok + s->dq_w * c->mean_output_len) / c->scale_interval_s;
    int dcur = decode_live(s);
    int dneed = (int)ceil(demand / (s->dec_cap_tok * c->decode_fill_up));
    int dkeep = (int)ceil(demand / (s->dec_cap_tok * c->decode_fill_down));
    if (dneed < 1) dneed = 1;
    DSI_LOG_DEBUG("t=%6.0f dem=%7.0f q=%6.0f dcur=%d need=%d keep=%d cap=%6.0f mem=%6.0f captok=%.0f W=%.0f kv=%5.0f | p cur=%d need=%d busy=%.1f p90=%.2f",
                t - s->day0, demand, s->dq_w, dcur, dneed, dkeep, s->dec_cap, s->dec_mem_cap, s->dec_cap_tok, decode_demand(s), decode_kv_mean(s), cur, need, busy_units, p90);
    if (dneed > dcur) {
        for (int i = dcur; i < dneed; i++)
            if ((rc = add_unit(s, 1, t, c->unit_start_s))) return rc;
    } else if (dkeep < dcur) {
        int target = dkeep < 1 ? 1 : dkeep;
        for (int i = dcur; i > target; i--) remove_unit(s, 1, t);
    }
    s->win_prefill_busy = 0;
    memset(s->win_ttft, 0, sizeof s->win_ttft);
    s->win_ttft_n = 0;
    s->win_dec_tok = 0;
    if (t + c->scale_interval_s < s->day1) return push_event(s, t + c->scale_interval_s, EV_AUTOSCALE, 0);
    return DSI_OK;
}

static int on_sample(sim *s, double t) {
    if (in_day(s, t)) {
        int m = (int)((t - s->day0) / 60.0 + 0.5);
        if (m >= 0 && m < DSI_SIM_MINUTES) {
            s->r->nodes[m] = count_nodes(s);
            s->r->utilisation[m] = utilisation_now(s);
        }
    }
    if (t + 60 < s->day1) return push_event(s, t + 60, EV_SAMPLE, 0);
    return DSI_OK;
}

/* ---- set-up and the loop ---------------------------------------------------------------------------------- */

double dsi__sim_shape(const dsi_sim_config *c, double t) {
    double local_h = fmod((t + c->tz_offset_min * 60.0) / 3600.0, 24.0);
    if (local_h < 0) local_h += 24;
    int h0 = (int)local_h, h1 = (h0 + 1) % 24;
    double f = local_h - h0;
    double mean = 0;
    for (int i = 0; i < 24; i++) mean += c->diurnal[i] / 24;
    return ((1 - f) * c->diurnal[h0] + f * c->diurnal[h1]) / mean;
}

static int sim_init(sim *s, const dsi_sim_config *c) {
    s->c = *c;
    s->free_head = -1;
    s->day0 = c->day_start;
    s->day1 = c->day_start + 86400;
    s->t_begin = s->day0 - c->warmup_s;
    s->t_acc = s->t_begin;
    s->n_min = (int)ceil((s->day1 - s->t_begin) / 60.0) + 1;
    s->rate = calloc(s->n_min, sizeof *s->rate);
    if (!s->rate) return dsi_error(DSI_ENOMEM, "sim: out of memory");
    s->mean_in = c->mean_output_len * c->input_tokens / c->output_tokens;
    s->kv_default = s->mean_in + c->mean_output_len * (1 + c->output_cv * c->output_cv) / 2;
    double base = c->output_tokens / c->mean_output_len / 86400.0;
    for (int m = 0; m < s->n_min; m++) {
        double t = s->t_begin + m * 60.0 + 30;
        double mult = 1;
        if (c->demand)
            mult = (1 - c->batch_share) * c->demand(c->demand_ctx, 0, t) + c->batch_share * c->demand(c->demand_ctx, 1, t);
        s->rate[m] = base * dsi__sim_shape(c, t) * mult;
    }
    /* Off-peak hours: the lower-demand half of the flat day. */
    double shape[24], sorted[24];
    for (int h = 0; h < 24; h++) sorted[h] = shape[h] = dsi__sim_shape(c, s->day0 + h * 3600.0 + 1800);
    for (int i = 0; i < 24; i++)
        for (int j = i + 1; j < 24; j++)
            if (sorted[j] < sorted[i]) {
                double x = sorted[i];
                sorted[i] = sorted[j], sorted[j] = x;
            }
    for (int h = 0; h < 24; h++) s->offpeak_hour[h] = shape[h] < 0.5 * (sorted[11] + sorted[12]);
    s->fleet_nodes = c->fleet_nodes;
    dsi__rng_seed(&s->rng, c->seed);
    s->pu = calloc(SIM_MAX_UNITS, sizeof *s->pu);
    s->du = calloc(SIM_MAX_UNITS, sizeof *s->du);
    if (!s->pu || !s->du) return dsi_error(DSI_ENOMEM, "sim: out of memory");
    /* Initial units sized from the first minute's rate with the perf model. */
    update_decode_caps(s);
    double r0 = s->rate[0];
    int nd = (int)ceil(r0 * c->mean_output_len / (s->dec_cap_tok * c->decode_fill_up));
    int n_gpus = c->prefill_nodes * c->gpus_per_node;
    double hit = c->disk_cache ? c->hit_share : 0, miss_tok = s->mean_in * (1 - hit);
    double n = c->prefill_tokens_per_gpu;
    double ctx = n * (s->mean_in * hit + miss_tok / 2);
    double step = dsi_perf_prefill_step(&c->perf, n_gpus, n, ctx, n * hit / (1 - hit + 1e-9), NULL);
    double unit_tok_s = n * n_gpus / step;
    int np = (int)ceil(r0 * miss_tok / (unit_tok_s * c->prefill_util_target));
    int rc;
    for (int i = 0; i < (np > 1 ? np : 1); i++)
        if ((rc = add_unit(s, 0, s->t_begin, 0))) return rc;
    for (int i = 0; i < (nd > 1 ? nd : 1); i++)
        if ((rc = add_unit(s, 1, s->t_begin, 0))) return rc;
    if ((rc = schedule_arrival(s, s->t_begin))) return rc;
    if ((rc = push_event(s, s->t_begin + c->scale_interval_s, EV_AUTOSCALE, 0))) return rc;
    return push_event(s, s->t_begin + 60 - fmod(c->warmup_s, 60.0), EV_SAMPLE, 0);
}

static void sim_free(sim *s) {
    free(s->rate);
    free(s->ev);
    free(s->b);
    free(s->pq.v);
    free(s->dq.v);
    if (s->pu)
        for (int i = 0; i < SIM_MAX_UNITS; i++) free(s->pu[i].chunks);
    if (s->du)
        for (int i = 0; i < SIM_MAX_UNITS; i++) free(s->du[i].h);
    free(s->pu);
    free(s->du);
}

static int check_config(const dsi_sim_config *c) {
    if (c->bundle < 1 || c->decode_steps_per_event < 1 || c->prefill_nodes < 1 || c->decode_nodes < 1 ||
        c->gpus_per_node < 1)
        return dsi_error(DSI_EINVAL, "sim: bundle, steps per event, unit sizes must be >= 1");
    if (!(c->input_tokens > 0) || !(c->output_tokens > 0) || !(c->mean_output_len >= 1) ||
        !(c->hit_share >= 0 && c->hit_share < 1) || !(c->hit_concentration > 0))
        return dsi_error(DSI_EINVAL, "sim: token totals, lengths and hit share must be positive");
    if (!(c->perf.eff_prefill > 0) || !(c->perf.eff_decode > 0) || !(c->decode_tok_s > 0) ||
        !(c->prefill_util_target > 0 && c->prefill_util_target <= 1) || !(c->decode_fill_up > 0) ||
        !(c->decode_fill_down > 0) || !(c->scale_interval_s >= 60))
        return dsi_error(DSI_EINVAL, "sim: efficiencies and autoscaler targets must be positive");
    return DSI_OK;
}

int dsi_sim_run(const dsi_sim_config *c, dsi_sim_result **out) {
    if (!c || !out) return dsi_error(DSI_EINVAL, "sim: NULL argument");
    *out = NULL;
    int rc = check_config(c);
    if (rc) return rc;
    sim *s = calloc(1, sizeof *s);
    dsi_sim_result *r = calloc(1, sizeof *r);
    if (!s || !r) {
        free(s), free(r);
        return dsi_error(DSI_ENOMEM, "sim: out of memory");
    }
    s->r = r;
    rc = sim_init(s, c);
    while (rc == DSI_OK && s->n_ev > 0) {
        sim_event e = pop_event(s);
        if (e.t >= s->day1) break;
        r->events++;
        switch (e.type) {
        case EV_ARRIVAL:
            rc = on_arrival(s, e.t);
            if (!rc) rc = prefill_kick(s, e.t);
            break;
        case EV_PREFILL_DONE: rc = on_prefill_done(s, e.idx, e.t); break;
        case EV_DECODE_DONE: rc = on_decode_done(s, e.idx, e.t); break;
        case EV_PREFILL_READY:
            if (s->pu[e.idx].state == UNIT_STARTING && s->pu[e.idx].ready_at == e.t) {
                s->pu[e.idx].state = UNIT_ACTIVE;
                rc = prefill_try_start(s, e.idx, e.t);
            }
            break;
        case EV_DECODE_READY:
            if (s->du[e.idx].state == UNIT_STARTING && s->du[e.idx].ready_at == e.t) {
                s->du[e.idx].state = UNIT_ACTIVE;
                rc = decode_drain_queue(s, e.t);
            }
            break;
        case EV_AUTOSCALE: rc = on_autoscale(s, e.t); break;
        case EV_SAMPLE: rc = on_sample(s, e.t); break;
        }
    }
    if (rc == DSI_OK) {
        accrue_nodes(s, s->day1);
        double node_s = r->prefill_node_s + r->decode_node_s;
        r->avg_nodes = node_s / 86400.0;
        r->avg_prefill_nodes = r->prefill_node_s / 86400.0;
        r->avg_decode_nodes = r->decode_node_s / 86400.0;
        r->prefill_in_tok_s_node = r->prefill_node_s > 0 ? r->input_tokens / r->prefill_node_s : 0;
        r->decode_out_tok_s_node = r->decode_node_s > 0 ? r->output_tokens / r->decode_node_s : 0;
        r->cost_usd = node_s * c->gpus_per_node * c->gpu_cost_per_hour / 3600.0;
        r->margin = r->cost_usd > 0 ? (r->revenue_usd - r->cost_usd) / r->cost_usd : 0;
        r->ttft_mean_s = s->ttft_n > 0 ? s->ttft_sum / s->ttft_n : 0;
        double acc = 0, tot = 0;
        for (int i = 0; i < SIM_TTFT_BINS; i++) tot += s->ttft_hist[i];
        for (int i = 0; i < SIM_TTFT_BINS; i++) {
            acc += s->ttft_hist[i];
            if (acc >= 0.9 * tot) {
                r->ttft_p90_s = (i + 1) * SIM_TTFT_BIN;
                break;
            }
        }
        r->user_tok_s = s->req_s > 0 ? s->step_tok / s->req_s : 0;
        r->slow_share = s->req_s > 0 ? s->slow_req_s / s->req_s : 0;
        r->kv_per_output_token = s->kv_den > 0 ? s->kv_num / s->kv_den : 0;
        r->offpeak_token_share = s->tok_arrived > 0 ? s->tok_offpeak / s->tok_arrived : 0;
        for (int m = 1; m < DSI_SIM_MINUTES; m++)
            if (r->nodes[m] == 0) r->nodes[m] = r->nodes[m - 1], r->utilisation[m] = r->utilisation[m - 1];
        *out = r;
    } else {
        free(r);
    }
    sim_free(s);
    free(s);
    return rc;
}

void dsi_sim_result_destroy(dsi_sim_result *r) { free(r); }
