/* The CUDA backend's public API in a build without nvcc: no devices, and
 * every entry point says so (DSI_EUNSUPPORTED). Compiled only then. */
#include "dsinfer/cuda.h"

int dsi_cuda_device_count(void) { return 0; }
int dsi_cuda_device_describe(int dev, char *buf, size_t n) {
    if (n) buf[0] = 0;
    return dsi_error(DSI_EUNSUPPORTED, "this build has no CUDA backend");
}
int dsi_cuda_engine_create(const dsi_model *m, const dsi_cuda_opts *opts, dsi_cuda_engine **out) {
    *out = NULL;
    return dsi_error(DSI_EUNSUPPORTED, "this build has no CUDA backend (nvcc was not found at configure time)");
}
void dsi_cuda_engine_destroy(dsi_cuda_engine *e) { (void)e; }
int dsi_cuda_engine_step(dsi_cuda_engine *e, const dsi_seq_step *seqs, int n_seqs) {
    return dsi_error(DSI_EUNSUPPORTED, "this build has no CUDA backend");
}
int dsi_cuda_engine_logits(dsi_cuda_engine *e, const int32_t *ids, int n, int chunk, int decode_from, float *out) {
    return dsi_error(DSI_EUNSUPPORTED, "this build has no CUDA backend");
}
int dsi_cuda_kv_alloc(dsi_cuda_engine *e) { return -1; }
void dsi_cuda_kv_release(dsi_cuda_engine *e, int block) { (void)e; (void)block; }
int dsi_cuda_kv_n_free(const dsi_cuda_engine *e) { return 0; }
double dsi_cuda_engine_weight_bytes(const dsi_cuda_engine *e) { return 0; }
