/* EPLB placement quality on Zipf-skewed loads, DeepSeek's two settings.
 *
 * Each layer's load: 16384 tokens x 8 routed experts = 131072 draws from a
 * Zipf(s) distribution over the experts, P(e) proportional to 1/rank(e)^s,
 * rank a random permutation of 1..E per layer (draws are independent: the
 * distinct-experts-per-token rule is ignored, it changes little). For each
 * exponent s it prints max_over_mean (busiest GPU over mean GPU) of:
 *   none     no redundancy: E experts in order over the P GPUs (floor(e*P/E));
 *   deepseek DeepSeek's open algorithm;
 *   best     our policy;
 *   bound    dsi_eplb_layer_lower_bound (no placement can do better);
 * mean and worst over layers, best/deepseek (mean of per-layer ratios, and the
 * worst single layer), and the layers where best is worse (must be 0).
 *
 *   bench_eplb [--layers N] [--seed S]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsinfer/eplb.h"

static uint64_t rng_state;
static uint64_t rng(void) {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return rng_state;
}

static void zipf_layer(double *load, int E, double s) {
    int *perm = malloc(sizeof(int) * E);
    for (int i = 0; i < E; i++) perm[i] = i;
    for (int i = E - 1; i > 0; i--) {
        int j = (int)(rng() % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    double *cdf = malloc(sizeof(double) * E), acc = 0;
    for (int e = 0; e < E; e++) cdf[e] = acc += pow(perm[e] + 1, -s);
    for (int e = 0; e < E; e++) load[e] = 0;
    for (int t = 0; t < 16384 * 8; t++) {
        double u = (double)(rng() >> 11) / 9007199254740992.0 * acc;
        int lo = 0, hi = E - 1;
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (cdf[mid] > u) hi = mid;
            else lo = mid + 1;
        }
        load[lo] += 1;
    }
    free(cdf);
    free(perm);
}

typedef struct {
    const char *name;
    int E, R, G, N, P;
} setting;

int main(int argc, char **argv) {
    int layers = 32;
    uint64_t seed = 12345;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--layers") && i + 1 < argc) layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: bench_eplb [--layers N] [--seed S]\n");
            return 2;
        }
    }
    if (layers <= 0) layers = 1;
    const setting settings[] = {
        {"prefill", 256, 288, 8, 4, 32},
        {"decode", 256, 288, 8, 18, 144},
    };
    const double exps[] = {0.6, 0.8, 1.0, 1.2};
    int total_worse = 0;
    for (size_t si = 0; si < sizeof settings / sizeof *settings; si++) {
        const setting *st = &settings[si];
        int hier = st->G % st->N == 0;
        printf("%s: %d experts, %d slots, %d gpus, %d nodes, %d groups (%s policy), %d layers per exponent\n",
               st->name, st->E, st->R, st->P, st->N, st->G, hier ? "hierarchical" : "global", layers);
        printf("  %-4s  %-15s %-15s %-15s %-7s  %-21s %s  %s\n", "s", "none mean/worst", "deepseek m/w", "best m/w",
               "bound", "best/deepseek mean/max", "worse", "secs ds/best");
        for (size_t xi = 0; xi < sizeof exps / sizeof *exps; xi++) {
            rng_state = seed * 2654435761u + xi * 97 + si * 7919 + 1;
            double *load = malloc(sizeof(double) * layers * st->E);
            for (int l = 0; l < layers; l++) zipf_layer(load + (size_t)l * st->E, st->E, exps[xi]);
            dsi_eplb_placement ds = {0}, best = {0};
            double t0 = dsi_now();
            if (dsi_eplb_rebalance(load, layers, st->E, st->R, st->G, st->N, st->P, DSI_EPLB_DEEPSEEK, &ds)) {
                fprintf(stderr, "deepseek: %s\n", dsi_last_error());
                return 1;
            }
            double t1 = dsi_now();
            if (dsi_eplb_rebalance(load, layers, st->E, st->R, st->G, st->N, st->P, DSI_EPLB_BEST, &best)) {
                fprintf(stderr, "best: %s\n", dsi_last_error());
                return 1;
            }
            double t2 = dsi_now();
            if (dsi_eplb_placement_validate(&best, st->G, st->N, 1)) {
                fprintf(stderr, "best placement invalid: %s\n", dsi_last_error());
                return 1;
            }
            double *mds = malloc(sizeof(double) * layers), *mb = malloc(sizeof(double) * layers);
            dsi_eplb_max_over_mean(&ds, load, mds);
            dsi_eplb_max_over_mean(&best, load, mb);
            int32_t *none = malloc(sizeof(int32_t) * st->E);
            double sn = 0, wn = 0, sd = 0, wd = 0, sb = 0, wb = 0, sr = 0, wr = 0, sbound = 0;
            int worse = 0;
            for (int l = 0; l < layers; l++) {
                const double *ld = load + (size_t)l * st->E;
                /* no redundancy: one slot per expert; GPU g holds experts [g*E/P, (g+1)*E/P) */
                double gmax = 0, tot = 0, top = 0;
                for (int g = 0; g < st->P; g++) {
                    double sum = 0;
                    for (int e = (int)((long)g * st->E / st->P); e < (int)((long)(g + 1) * st->E / st->P); e++)
                        sum += ld[e];
                    gmax = fmax(gmax, sum);
                }
                for (int e = 0; e < st->E; e++) tot += ld[e], top = fmax(top, ld[e]);
                double mn = gmax / (tot / st->P);
                double bound;
                dsi_eplb_layer_lower_bound(ld, st->E, st->R, st->G, st->N, st->P, &bound);
                (void)top;
                sn += mn, wn = fmax(wn, mn), sd += mds[l], wd = fmax(wd, mds[l]);
                sb += mb[l], wb = fmax(wb, mb[l]), sbound += bound;
                double r = mb[l] / mds[l];
                sr += r, wr = fmax(wr, r);
                if (mb[l] > mds[l] * (1 + 1e-12)) worse++;
            }
            total_worse += worse;
            printf("  %-4.1f  %6.3f/%-8.3f %6.3f/%-8.3f %6.3f/%-8.3f %-7.3f  %6.4f/%-14.4f %-5d  %.3f/%.3f\n", exps[xi],
                   sn / layers, wn, sd / layers, wd, sb / layers, wb, sbound / layers, sr / layers, wr, worse, t1 - t0,
                   t2 - t1);
            free(mds), free(mb), free(none), free(load);
            dsi_eplb_placement_free(&ds);
            dsi_eplb_placement_free(&best);
        }
    }
    printf("layers where best is worse than deepseek: %d\n", total_worse);
    return total_worse ? 1 : 0;
}
