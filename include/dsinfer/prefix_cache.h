/* dsinfer/prefix_cache.h - sharing full KV blocks between sequences.
 *
 * A full block (64 positions) is named by a hash chain: the hash of block i is
 * XXH3 over (hash of block i-1, the model fingerprint, the block's 64 token
 * ids), with 0 as the parent of block 0. Two sequences whose first k blocks
 * hold the same tokens (for the same model) therefore name them identically
 * and can share the KV instead of recomputing it.
 *
 * The cache holds one reference (dsi_kv_retain) on every block it publishes.
 * A cached block that no sequence uses (refcount 1: the cache's own) sits on
 * an LRU list and is evicted, oldest first, only when the pool's free list is
 * empty and a sequence needs a block. Each entry also keeps its parent hash
 * and token ids, so a match is exact: a hash collision (XXH3 is not
 * cryptographic; clients choose the tokens) can never hand one request
 * another's KV.
 *
 *     dsi_prefix_cache *pc;
 *     dsi_prefix_cache_create(kv, dsi_model_fingerprint(m), &pc);
 *     int n = dsi_prefix_cache_match(pc, prompt, n_prompt, max_blocks, table, hashes);
 *     // table[0..n) are retained for the caller; compute the rest into
 *     int b = dsi_prefix_cache_alloc(pc);                    // new blocks
 *     dsi_prefix_cache_insert(pc, b, parent_hash, tokens_of_b, &hash);  // once full
 *     dsi_prefix_cache_release(pc, b);                       // when done
 *
 * Not thread-safe: like the pool, it belongs to the scheduler's thread.
 *
 * Seam for a disk tier (issue 5): match() is the one lookup entry point; a
 * second tier continues the chain where the memory tier stops (the caller has
 * the hashes) and loads blocks into fresh ones from dsi_prefix_cache_alloc. */
#ifndef DSINFER_PREFIX_CACHE_H
#define DSINFER_PREFIX_CACHE_H

#include "dsinfer/kv.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dsi_prefix_cache dsi_prefix_cache;

typedef struct dsi_prefix_cache_stats {
    int n_cached;          /* blocks published in the cache (in use or idle) */
    int n_idle;            /* cached blocks no sequence uses: evictable */
    uint64_t hit_blocks;   /* blocks returned by match(), cumulative */
    uint64_t evictions;    /* cumulative */
    uint64_t inserts;      /* cumulative */
} dsi_prefix_cache_stats;

/* `kv` is borrowed and must outlive the cache. */
int dsi_prefix_cache_create(dsi_kv_pool *kv, uint64_t model_fingerprint, dsi_prefix_cache **out);
/* Drops the cache's references (idle blocks return to the pool's free list). */
void dsi_prefix_cache_destroy(dsi_prefix_cache *pc);

/* The chain hash of one full block: `tokens` holds block_tokens ids. */
uint64_t dsi_prefix_block_hash(uint64_t parent, uint64_t model_fingerprint, const int32_t *tokens, int block_tokens);

/* Finds the longest run of cached leading full blocks of `tokens` (at most
 * max_blocks). Writes their ids to blocks[] and their chain hashes to hashes[]
 * (both [max_blocks], out) and retains each for the caller. Returns the count. */
int dsi_prefix_cache_match(dsi_prefix_cache *pc, const int32_t *tokens, int n_tokens, int max_blocks, int32_t *blocks,
                           uint64_t *hashes);

/* A fresh block (refcount 1) from the free list, evicting the least recently
 * used idle cached block when the free list is empty. -1 when neither exists. */
int dsi_prefix_cache_alloc(dsi_prefix_cache *pc);

/* Adds a reference for a caller that does not hold one yet (a write-back to
 * the disk tier): an idle cached block leaves the LRU list until released. */
void dsi_prefix_cache_retain(dsi_prefix_cache *pc, int block);

/* Drops the caller's reference to `block`. A cached block whose last user
 * leaves becomes idle (most recently used end of the LRU). */
void dsi_prefix_cache_release(dsi_prefix_cache *pc, int block);

/* Publishes a full, computed block under the hash of (parent, tokens); writes
 * that hash to *hash. If an equal block is already cached, the cache keeps the
 * old one and `block` stays private to its caller. Returns 1 when inserted. */
int dsi_prefix_cache_insert(dsi_prefix_cache *pc, int block, uint64_t parent, const int32_t *tokens, uint64_t *hash);

/* Blocks a caller could obtain now: free + idle cached. */
int dsi_prefix_cache_n_available(const dsi_prefix_cache *pc);
void dsi_prefix_cache_get_stats(const dsi_prefix_cache *pc, dsi_prefix_cache_stats *out);
/* Evicts every idle block (returns how many). */
int dsi_prefix_cache_evict_all(dsi_prefix_cache *pc);

#ifdef __cplusplus
}
#endif
#endif
