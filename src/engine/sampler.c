/* Greedy, temperature, top-k and top-p sampling with a per-request RNG. */
#include "dsinfer/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t next_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void dsi_sampler_init(dsi_sampler *s, const dsi_sampling *p) {
    s->p = *p;
    s->rng = p->seed ^ 0x2545f4914f6cdd1dull;
}

size_t dsi_sampler_scratch_bytes(int vocab) { return (size_t)vocab * (2 * sizeof(float) + sizeof(int)); }

int dsi_argmax(const float *v, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

float dsi_logprob(const float *logits, int vocab, int id) {
    float mx = logits[dsi_argmax(logits, vocab)];
    double sum = 0;
    for (int i = 0; i < vocab; i++) sum += exp((double)logits[i] - mx);
    return (float)((double)logits[id] - mx - log(sum));
}

typedef struct { float p; int id; } cand;

static int cmp_cand(const void *a, const void *b) {
    float x = ((const cand *)a)->p, y = ((const cand *)b)->p;
    if (x != y) return x > y ? -1 : 1;
    return ((const cand *)a)->id - ((const cand *)b)->id;
}

int dsi_sampler_pick(dsi_sampler *s, const float *logits, int vocab, void *scratch) {
    if (s->p.temperature <= 0.0f) return dsi_argmax(logits, vocab);
    cand *c = scratch;
    float mx = logits[dsi_argmax(logits, vocab)];
    float inv_t = 1.0f / s->p.temperature;
    double sum = 0;
    for (int i = 0; i < vocab; i++) {
        c[i].p = expf((logits[i] - mx) * inv_t);
        c[i].id = i;
        sum += c[i].p;
    }
    int n = vocab;
    int need_sort = (s->p.top_k > 0 && s->p.top_k < vocab) || (s->p.top_p > 0 && s->p.top_p < 1);
    if (need_sort) {
        qsort(c, vocab, sizeof(cand), cmp_cand);
        if (s->p.top_k > 0 && s->p.top_k < n) n = s->p.top_k;
        double tot = 0;
        for (int i = 0; i < n; i++) tot += c[i].p;
        if (s->p.top_p > 0 && s->p.top_p < 1) {
            double acc = 0;
            for (int i = 0; i < n; i++) {
                acc += c[i].p;
                if (acc >= s->p.top_p * tot) { n = i + 1; break; }
            }
        }
        sum = 0;
        for (int i = 0; i < n; i++) sum += c[i].p;
    }
    double r = (double)(next_u64(&s->rng) >> 11) * (1.0 / 9007199254740992.0) * sum;
    double acc = 0;
    for (int i = 0; i < n; i++) {
        acc += c[i].p;
        if (r < acc) return c[i].id;
    }
    return c[n - 1].id;
}
