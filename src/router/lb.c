/* DeepSeek's prefill and decode load balancers, and the round-robin baseline.
 * Pure functions of the loads they are given. */
#include "dsinfer/router.h"

double dsi_lb_attn_work(int cached, int n_new) {
    if (n_new <= 0) return 0;
    return (double)n_new * ((double)(cached > 0 ? cached : 0) + n_new / 2.0);
}

/* Places an item that adds (a[i], b[i]) to instance i's loads (A[i], B[i]):
 * the winner minimises (A[i]+a[i])/mean_A + (B[i]+b[i])/mean_B, the means
 * taken after the placement; ties go to `prefer` (larger wins), then to the
 * lower index. Means are floored so an idle pool does not divide by zero. */
static int place(const dsi_lb_inst *inst, int n, const double *A, const double *B, const double *a, const double *b,
                 const double *prefer) {
    double sumA = 0, sumB = 0;
    int m = 0;
    for (int i = 0; i < n; i++)
        if (inst[i].eligible) { sumA += A[i]; sumB += B[i]; m++; }
    if (m == 0) return -1;
    int best = -1;
    double best_score = 0;
    for (int i = 0; i < n; i++) {
        if (!inst[i].eligible) continue;
        double mA = (sumA + a[i]) / m, mB = (sumB + b[i]) / m;
        if (mA < 1e-9) mA = 1e-9;
        if (mB < 1e-9) mB = 1e-9;
        double score = (A[i] + a[i]) / mA + (B[i] + b[i]) / mB;
        int better = best < 0 || score < best_score - 1e-9 ||
                     (score <= best_score + 1e-9 && prefer && prefer[i] > prefer[best]);
        if (better) { best = i; best_score = score; }
    }
    return best;
}

#define LB_MAX 256

int dsi_lb_pick_prefill(const dsi_lb_inst *inst, int n, int n_prompt) {
    if (n <= 0 || n > LB_MAX) return -1;
    double A[LB_MAX], B[LB_MAX], a[LB_MAX], b[LB_MAX], pref[LB_MAX];
    for (int i = 0; i < n; i++) {
        /* at least one token is computed: it gives the first token's logits */
        int c = inst[i].cached_tokens < n_prompt ? inst[i].cached_tokens : n_prompt - 1;
        if (c < 0) c = 0;
        A[i] = inst[i].attn_load;
        B[i] = inst[i].input_tokens;
        a[i] = dsi_lb_attn_work(c, n_prompt - c);
        b[i] = n_prompt - c;
        pref[i] = c;
    }
    return place(inst, n, A, B, a, b, pref);
}

int dsi_lb_pick_decode(const dsi_lb_inst *inst, int n, int n_tokens) {
    if (n <= 0 || n > LB_MAX) return -1;
    double A[LB_MAX], B[LB_MAX], a[LB_MAX], b[LB_MAX];
    for (int i = 0; i < n; i++) {
        A[i] = inst[i].kv_tokens;
        B[i] = inst[i].n_requests;
        a[i] = n_tokens;
        b[i] = 1;
    }
    return place(inst, n, A, B, a, b, NULL);
}

int dsi_lb_pick_round_robin(const dsi_lb_inst *inst, int n, unsigned *cursor) {
    for (int k = 0; k < n; k++) {
        int i = (int)((*cursor + k) % (unsigned)n);
        if (inst[i].eligible) {
            *cursor = (unsigned)i + 1;
            return i;
        }
    }
    return -1;
}
