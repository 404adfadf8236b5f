/* dsinfer/sampler.h - choosing the next token from logits.
 *
 *     dsi_sampler s;
 *     dsi_sampler_init(&s, &(dsi_sampling){.temperature = 0.7f, .top_p = 0.9f, .seed = 42});
 *     int tok = dsi_sampler_pick(&s, logits, vocab, scratch);
 *
 * temperature <= 0 means greedy (argmax, lowest id on ties). */
#ifndef DSINFER_SAMPLER_H
#define DSINFER_SAMPLER_H

#include "dsinfer/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dsi_sampling {
    float temperature;  /* 0: greedy */
    float top_p;        /* 0 or 1: off */
    int top_k;          /* 0: off */
    uint64_t seed;
} dsi_sampling;

typedef struct dsi_sampler {
    dsi_sampling p;
    uint64_t rng;
} dsi_sampler;

void dsi_sampler_init(dsi_sampler *s, const dsi_sampling *p);
/* scratch: at least 2*vocab floats + vocab ints (use dsi_sampler_scratch_bytes). */
size_t dsi_sampler_scratch_bytes(int vocab);
int dsi_sampler_pick(dsi_sampler *s, const float *logits, int vocab, void *scratch);
int dsi_argmax(const float *v, int n);
/* log-softmax of logits[id] (for logprobs) */
float dsi_logprob(const float *logits, int vocab, int id);

#ifdef __cplusplus
}
#endif
#endif
