/* RoPE constants from the config: inverse frequencies with YaRN's ramp
 * between interpolation and extrapolation, the cos/sin factor and the softmax
 * scale, computed with the same float32/float64 steps as Hugging Face's
 * DeepseekV3 (and DeepSeek's reference): one implementation for every backend,
 * so CPU and GPU angles agree bit for bit. */
#include "dsinfer/model.h"

#include <math.h>

static double yarn_get_mscale(double scale, double mscale) {
    return scale <= 1.0 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

static double yarn_correction_dim(double rot, int dim, double base, double max_pos) {
    return (dim * log(max_pos / (rot * 2 * M_PI))) / (2 * log(base));
}

void dsi_config_rope(const dsi_config *c, float *inv_freq, float *rope_mscale, float *softmax_scale) {
    int dim = c->qk_rope_dim, half = dim / 2;
    *softmax_scale = (float)(1.0 / sqrt((double)dsi_config_qk_head_dim(c)));
    *rope_mscale = 1.0f;
    for (int i = 0; i < half; i++) {
        float pos_freq = (float)pow(c->rope_theta, (double)(float)(2 * i) / dim);
        float extra = 1.0f / pos_freq;
        inv_freq[i] = extra;
        if (c->yarn) {
            float inter = 1.0f / ((float)c->yarn_factor * pos_freq);
            double low = floor(yarn_correction_dim(c->yarn_beta_fast, dim, c->rope_theta, c->yarn_orig_max_pos));
            double high = ceil(yarn_correction_dim(c->yarn_beta_slow, dim, c->rope_theta, c->yarn_orig_max_pos));
            if (low < 0) low = 0;
            if (high > dim - 1) high = dim - 1;
            if (low == high) high += 0.001;
            float ramp = (float)(((float)i - low) / (high - low));
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            float extra_factor = 1.0f - ramp;
            inv_freq[i] = inter * (1.0f - extra_factor) + extra * extra_factor;
        }
    }
    if (c->yarn) {
        double f = c->yarn_factor;
        if (c->yarn_mscale != 0 && c->yarn_mscale_all_dim != 0)
            *rope_mscale = (float)(yarn_get_mscale(f, c->yarn_mscale) / yarn_get_mscale(f, c->yarn_mscale_all_dim));
        else
            *rope_mscale = (float)yarn_get_mscale(f, 1.0);
        if (c->yarn_mscale_all_dim != 0) {
            double ms = yarn_get_mscale(f, c->yarn_mscale_all_dim);
            *softmax_scale = (float)(*softmax_scale * ms * ms);
        }
    }
}
