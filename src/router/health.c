/* Instance health (heartbeat state machine) and the autoscaling policy. */
#include "dsinfer/router.h"

int dsi_health_observe(dsi_health *h, int ok, double now, int miss_limit) {
    dsi_inst_state before = h->state;
    if (miss_limit <= 0) miss_limit = 3;
    if (ok) {
        h->misses = 0;
        h->last_ok = now;
        h->state = DSI_INST_UP;
    } else {
        h->misses++;
        if (h->misses >= miss_limit) h->state = DSI_INST_DEAD;
        else if (h->state == DSI_INST_UP) h->state = DSI_INST_SUSPECT;
    }
    return h->state != before;
}

int dsi_health_routable(const dsi_health *h) { return h->state == DSI_INST_UP || h->state == DSI_INST_SUSPECT; }

const char *dsi_inst_state_name(dsi_inst_state s) {
    switch (s) {
    case DSI_INST_JOINING: return "joining";
    case DSI_INST_UP: return "up";
    case DSI_INST_SUSPECT: return "suspect";
    case DSI_INST_DEAD: return "dead";
    }
    return "?";
}

void dsi_autoscale_init(dsi_autoscale_state *st) {
    st->above_since = st->below_since = -1;
    st->last_change = -1e300;
}

int dsi_autoscale_decide(const dsi_autoscale_policy *p, dsi_autoscale_state *st, double now, double util, int active,
                         int standby) {
    if (util > p->up_util) {
        if (st->above_since < 0) st->above_since = now;
    } else st->above_since = -1;
    if (util < p->down_util) {
        if (st->below_since < 0) st->below_since = now;
    } else st->below_since = -1;
    if (now - st->last_change < p->cooldown_s) return 0;
    int max_i = p->max_instances > 0 ? p->max_instances : active + standby;
    int min_i = p->min_instances > 0 ? p->min_instances : 1;
    int d = 0;
    if (st->above_since >= 0 && now - st->above_since >= p->hold_s && standby > 0 && active < max_i) d = 1;
    else if (st->below_since >= 0 && now - st->below_since >= p->hold_s && active > min_i) d = -1;
    if (d) {
        st->last_change = now;
        st->above_since = st->below_since = -1; /* the new size must earn the next change */
    }
    return d;
}
