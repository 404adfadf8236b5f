/* The block file header: encode, and check against the block a caller expects. */
#include "kvdisk/kvdisk_impl.h"

#include <string.h>
#include <xxhash.h>

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* XXH3 of the header without its own checksum field: bytes [0, 80) and the tokens. */
static uint64_t header_sum(const uint8_t *hdr, size_t header_bytes) {
    XXH3_state_t *st = XXH3_createState();
    if (!st) return 0;
    XXH3_64bits_reset(st);
    XXH3_64bits_update(st, hdr, 80);
    XXH3_64bits_update(st, hdr + KD_HDR_FIXED, header_bytes - KD_HDR_FIXED);
    uint64_t h = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    return h;
}

void dsi__kd_header_encode(const dsi_kvdisk *d, uint64_t hash, uint64_t parent, const int32_t *tokens,
                           uint64_t payload_xxh3, uint8_t *out) {
    memset(out, 0, d->header_bytes);
    memcpy(out, KD_MAGIC, 8);
    put32(out + 8, KD_VERSION);
    put32(out + 12, (uint32_t)d->header_bytes);
    put64(out + 16, hash);
    put64(out + 24, parent);
    put64(out + 32, d->fingerprint);
    put32(out + 40, (uint32_t)d->n_layers);
    put32(out + 44, (uint32_t)d->kv_dim);
    put32(out + 48, (uint32_t)d->bt);
    put32(out + 52, 0); /* float32 */
    put64(out + 56, d->payload_bytes);
    put64(out + 64, payload_xxh3);
    put64(out + 72, 0);
    memcpy(out + KD_HDR_FIXED, tokens, sizeof(int32_t) * (size_t)d->bt);
    put64(out + 80, header_sum(out, d->header_bytes));
}

int dsi__kd_header_check(const dsi_kvdisk *d, const uint8_t *hdr, uint64_t hash, uint64_t parent,
                         const int32_t *tokens, kd_header *h) {
    if (memcmp(hdr, KD_MAGIC, 8)) return DSI_EFORMAT;
    h->version = get32(hdr + 8);
    h->header_bytes = get32(hdr + 12);
    if (h->version != KD_VERSION || h->header_bytes != d->header_bytes) return DSI_EFORMAT;
    if (get64(hdr + 80) != header_sum(hdr, d->header_bytes)) return DSI_EFORMAT;
    h->hash = get64(hdr + 16);
    h->parent = get64(hdr + 24);
    h->fingerprint = get64(hdr + 32);
    h->n_layers = get32(hdr + 40);
    h->kv_dim = get32(hdr + 44);
    h->block_tokens = get32(hdr + 48);
    h->dtype = get32(hdr + 52);
    h->payload_bytes = get64(hdr + 56);
    h->payload_xxh3 = get64(hdr + 64);
    /* an intact header in the wrong file, or a geometry that does not fit the size we read: damaged */
    if (h->hash != hash || h->payload_bytes != d->payload_bytes || h->dtype != 0) return DSI_EFORMAT;
    /* an intact block of another model or other tokens under our hash: a collision, not ours to delete */
    if (h->fingerprint != d->fingerprint || h->n_layers != (uint32_t)d->n_layers || h->kv_dim != (uint32_t)d->kv_dim ||
        h->block_tokens != (uint32_t)d->bt || h->parent != parent ||
        memcmp(hdr + KD_HDR_FIXED, tokens, sizeof(int32_t) * (size_t)d->bt))
        return DSI_ENOTFOUND;
    return DSI_OK;
}
