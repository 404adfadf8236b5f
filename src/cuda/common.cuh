/* Device-side helpers shared by the .cu files: error translation, dtype
 * decoding, reductions. */
#ifndef DSI_CUDA_COMMON_CUH
#define DSI_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/cuda_impl.h"
#include "dsinfer/safetensors.h"

/* Turns a CUDA error into a dsinfer status with the call site in the message. */
static inline int dsi__cuda_status(cudaError_t err, const char *what) {
    if (err == cudaSuccess) return DSI_OK;
    return dsi_error(DSI_EINTERNAL, "cuda: %s: %s", what, cudaGetErrorString(err));
}
#define DSI_CU(call) dsi__cuda_status((call), #call)
/* After a kernel launch: configuration errors (not the kernel's own faults). */
#define DSI_CU_LAUNCHED(name) dsi__cuda_status(cudaGetLastError(), name)

/* OCP e4m3fn -> float, exact (the same table as dsi_e4m3_to_f32). */
__device__ __forceinline__ float dsi_dev_e4m3(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 0xf, m = b & 7;
    if (e == 0xf && m == 7) return __int_as_float(0x7fc00000);
    float v = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);
    return s ? -v : v;
}
__device__ __forceinline__ float dsi_dev_bf16(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }
__device__ __forceinline__ uint16_t dsi_dev_to_bf16(float f) { /* round to nearest even */
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
__device__ __forceinline__ float dsi_dev_f16(uint16_t h) { return __half2float(__ushort_as_half(h)); }

/* Element (r, c) of matrix `mat` of a device weight, float32 (scale applied). */
struct dsi_dev_mat {
    const void *data;
    const float *scale;
    int dtype, rows, cols, br, bc, scale_rows, scale_cols;
    __device__ __forceinline__ float get(long mat, int r, int c) const {
        long i = (mat * rows + r) * (long)cols + c;
        switch (dtype) {
        case DSI_F8_E4M3: {
            float s = scale[(mat * scale_rows + r / br) * (long)scale_cols + c / bc];
            return dsi_dev_e4m3(((const uint8_t *)data)[i]) * s;
        }
        case DSI_BF16: return dsi_dev_bf16(((const uint16_t *)data)[i]);
        case DSI_F16: return dsi_dev_f16(((const uint16_t *)data)[i]);
        default: return ((const float *)data)[i];
        }
    }
};

static inline dsi_dev_mat dsi__dev_mat(const dsi_dmat *W) {
    dsi_dev_mat d;
    d.data = W->data;
    d.scale = W->scale;
    d.dtype = W->dtype;
    d.rows = W->rows;
    d.cols = W->cols;
    d.br = W->block_rows > 0 ? W->block_rows : 128;
    d.bc = W->block_cols > 0 ? W->block_cols : 128;
    d.scale_rows = W->scale_rows;
    d.scale_cols = W->scale_cols;
    return d;
}

/* Sum over a block of blockDim.x threads (a multiple of 32, <= 1024); every
 * thread gets the result. `red` is shared scratch of 32 doubles. */
__device__ __forceinline__ double dsi_block_sum(double v, double *red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    double t = 0;
    for (int i = 0; i < nw; i++) t += red[i];
    return t;
}

#endif
