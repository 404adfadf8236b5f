/* dsinfer/kv.h - the paged latent KV pool.
 *
 * One pool of fixed-size blocks; a block holds `block_tokens` (64, as
 * FlashMLA) consecutive positions of one sequence for every layer: per token
 * the normalised compressed latent (kv_lora_rank) followed by the roped
 * shared key (qk_rope_head_dim), float32. A sequence addresses its KV through
 * a block table (block ids in position order). Blocks are reference counted so
 * that prefix-cached blocks can be shared by several sequences.
 *
 *     dsi_kv_pool *kv;
 *     dsi_kv_pool_create(n_layers, kv_dim, 64, n_blocks, &kv);
 *     int b = dsi_kv_alloc(kv);          // refcount 1, or -1 when full
 *     float *row = dsi_kv_token(kv, b, layer, 5);   // [kv_dim]
 *     dsi_kv_release(kv, b);
 */
#ifndef DSINFER_KV_H
#define DSINFER_KV_H

#include "dsinfer/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DSI_KV_BLOCK_TOKENS 64

typedef struct dsi_kv_pool dsi_kv_pool;

int dsi_kv_pool_create(int n_layers, int kv_dim, int block_tokens, int n_blocks, dsi_kv_pool **out);
void dsi_kv_pool_destroy(dsi_kv_pool *p);

int dsi_kv_block_tokens(const dsi_kv_pool *p);
int dsi_kv_n_blocks(const dsi_kv_pool *p);
int dsi_kv_n_free(const dsi_kv_pool *p);
int dsi_kv_dim(const dsi_kv_pool *p);
int dsi_kv_n_layers(const dsi_kv_pool *p);
size_t dsi_kv_block_bytes(const dsi_kv_pool *p);

/* Takes a free block (refcount 1). Returns the id, or -1 when none is free. */
int dsi_kv_alloc(dsi_kv_pool *p);
/* Adds a reference to an allocated block. */
void dsi_kv_retain(dsi_kv_pool *p, int block);
/* Drops a reference; the block is free again when the count reaches 0 and
 * returns 1 then, else 0. */
int dsi_kv_release(dsi_kv_pool *p, int block);
int dsi_kv_refcount(const dsi_kv_pool *p, int block);

/* Row of token `t` (0..block_tokens-1) of `layer` in `block`: [kv_dim] floats. */
float *dsi_kv_token(dsi_kv_pool *p, int block, int layer, int t);
/* The whole block's storage for one layer: [block_tokens][kv_dim]. */
float *dsi_kv_block_layer(dsi_kv_pool *p, int block, int layer);
/* The whole block (all layers, contiguous: dsi_kv_block_bytes bytes), for
 * copying to disk or to another instance. */
void *dsi_kv_block_data(dsi_kv_pool *p, int block);

#ifdef __cplusplus
}
#endif
#endif
