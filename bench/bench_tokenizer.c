/* bench_tokenizer: single-thread encode throughput on a few MB of mixed English / code /
 * CJK text with a DeepSeek-sized vocabulary (~128k merges), against peers measured in
 * the same run:
 *   - pre-tokenization alone (PCRE2 splits): the bound BPE cannot beat;
 *   - the same heap BPE without the word cache;
 *   - a naive O(n^2) BPE (rescan all pairs after each merge), no cache.
 * All three encoders must produce identical ids; the bench checks that.
 *
 * The vocabulary is synthesised, not trained: the corpus is pre-tokenized with
 * DeepSeek-V3's pre-tokenizer, its distinct words (cut into chunks of at most 16 bytes
 * at character boundaries) are taken by decreasing frequency, and each is built from
 * its two halves recursively, adding one merge per new token, until 128k merges exist.
 * Frequent words thus get low ranks and long words reuse shorter tokens, as in a
 * trained vocabulary. The pre-tokenizer and special tokens are copied from the golden
 * tokenizer.json.
 *
 * usage: bench_tokenizer [corpus_MB (default 4; training uses twice that)] [merges (default 128000)]
 *                        [--dump DIR: also write DIR/tokenizer.json and DIR/corpus.txt] */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dsinfer/tokenizer.h"
#include "tokenizer/tokenizer_impl.h"

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 11);
}
static double urand(void) { return (rnd() + 0.5) / 4294967296.0; }

/* Zipf-ish rank in [0, n): inverse-CDF of a continuous 1/x^1.07 law. */
static size_t zipf(size_t n) {
    double u = urand(), s = 1.07, hn = (pow((double)n, 1 - s) - 1) / (1 - s);
    double x = pow(u * hn * (1 - s) + 1, 1 / (1 - s));
    size_t r = (size_t)x - 1;
    return r < n ? r : n - 1;
}

/* ---- corpus ------------------------------------------------------------------------------- */

typedef struct buf {
    char *p;
    size_t n, cap;
} buf;

static void put(buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = 2 * (b->n + n + 1);
        b->p = realloc(b->p, b->cap);
        if (!b->p) exit(1);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}
static void puts_(buf *b, const char *s) { put(b, s, strlen(s)); }

static void put_cp(buf *b, uint32_t cp) {
    char o[4];
    size_t n;
    if (cp < 0x80) o[0] = (char)cp, n = 1;
    else if (cp < 0x800) o[0] = (char)(0xC0 | cp >> 6), o[1] = (char)(0x80 | (cp & 63)), n = 2;
    else o[0] = (char)(0xE0 | cp >> 12), o[1] = (char)(0x80 | (cp >> 6 & 63)), o[2] = (char)(0x80 | (cp & 63)), n = 3;
    put(b, o, n);
}

enum { N_WORDS = 30000 };
static char *g_words[N_WORDS];

static void make_words(void) {
    static const char *on[] = {"b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
                               "th", "st", "pr", "tr", "ch", "sh", "br", "cl", "", "", ""};
    static const char *nu[] = {"a", "e", "i", "o", "u", "ea", "ou", "ai", "io", "ee"};
    static const char *co[] = {"", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "rs", "ck", "m"};
    for (int i = 0; i < N_WORDS; i++) {
        char w[64] = "";
        int syl = 1 + (int)(rnd() % 4) - (i < 300);
        if (syl < 1) syl = 1;
        for (int s = 0; s < syl; s++) {
            strcat(w, on[rnd() % 27]);
            strcat(w, nu[rnd() % 10]);
            strcat(w, co[rnd() % 13]);
        }
        g_words[i] = strdup(w);
    }
}

static void english(buf *b, size_t bytes) {
    size_t end = b->n + bytes;
    while (b->n < end) {
        int len = 4 + (int)(rnd() % 18);
        for (int i = 0; i < len; i++) {
            const char *w = g_words[zipf(N_WORDS)];
            if (i == 0) {
                char c[64];
                snprintf(c, sizeof c, "%s", w);
                c[0] = (char)(c[0] - 32 * (c[0] >= 'a' && c[0] <= 'z'));
                puts_(b, c);
            } else {
                puts_(b, " ");
                if (rnd() % 40 == 0) {
                    char num[32];
                    snprintf(num, sizeof num, "%u", rnd() % 100000);
                    puts_(b, num);
                    continue;
                }
                puts_(b, w);
            }
            if (rnd() % 12 == 0) puts_(b, (const char *[]){",", ";", " -", "'s", ":"}[rnd() % 5]);
        }
        puts_(b, (const char *[]){". ", ". ", "? ", "! ", ".\n\n"}[rnd() % 5]);
    }
}

static void ident(buf *b) {
    const char *a = g_words[zipf(2000)], *c = g_words[zipf(2000)];
    char s[160];
    switch (rnd() % 3) {
    case 0: snprintf(s, sizeof s, "%s_%s", a, c); break;
    case 1: snprintf(s, sizeof s, "%s%c%s", a, c[0] - 32 * (c[0] >= 'a' && c[0] <= 'z'), c + 1); break;
    default: snprintf(s, sizeof s, "%s", a);
    }
    puts_(b, s);
}

static void code(buf *b, size_t bytes) {
    size_t end = b->n + bytes;
    char num[32];
    while (b->n < end) {
        int indent = 4 * (int)(rnd() % 4);
        for (int i = 0; i < indent; i++) puts_(b, " ");
        switch (rnd() % 8) {
        case 0: puts_(b, "for (int i = 0; i < "); ident(b); puts_(b, "; i++) {\n"); break;
        case 1: puts_(b, "def "); ident(b); puts_(b, "(self, "); ident(b); puts_(b, "):\n"); break;
        case 2: puts_(b, "return "); ident(b); puts_(b, " * "); snprintf(num, sizeof num, "%u", rnd() % 1000); puts_(b, num); puts_(b, ";\n"); break;
        case 3: ident(b); puts_(b, "->"); ident(b); puts_(b, " = "); ident(b); puts_(b, "[idx + 1];\n"); break;
        case 4: puts_(b, "if ("); ident(b); puts_(b, " == NULL) return -EINVAL;\n"); break;
        case 5: puts_(b, "# "); english(b, 40); puts_(b, "\n"); break;
        case 6: puts_(b, "}\n\n"); break;
        default: ident(b); puts_(b, "("); ident(b); puts_(b, ", \""); ident(b); puts_(b, "\");\n");
        }
    }
}

static void cjk(buf *b, size_t bytes) {
    size_t end = b->n + bytes;
    while (b->n < end) {
        int len = 6 + (int)(rnd() % 30);
        for (int i = 0; i < len; i++) {
            if (rnd() % 9 == 0) put_cp(b, 0x3040 + (uint32_t)(rnd() % 0xBF)); /* kana */
            else put_cp(b, 0x4E00 + (uint32_t)zipf(3500) * 5);
            if (rnd() % 15 == 0) put_cp(b, (uint32_t[]){0xFF0C, 0x3001}[rnd() % 2]);
        }
        if (rnd() % 6 == 0) {
            puts_(b, " ");
            puts_(b, g_words[zipf(N_WORDS)]);
            puts_(b, " ");
        }
        put_cp(b, 0x3002);
        if (rnd() % 8 == 0) puts_(b, "\n");
    }
}

/* ---- vocabulary: byte-level BPE training ------------------------------------------------ */

typedef struct wc {
    const char *s;
    uint32_t n, count;
} wc;

typedef struct table {
    wc *v;
    uint32_t mask, n;
} table;

static wc *tfind(table *t, const char *s, size_t n, int add) {
    uint32_t i = (uint32_t)dsi__hash_bytes(s, n) & t->mask;
    for (;; i = (i + 1) & t->mask) {
        wc *e = &t->v[i];
        if (!e->s) {
            if (!add) return NULL;
            e->s = s;
            e->n = (uint32_t)n;
            t->n++;
            return e;
        }
        if (e->n == n && !memcmp(e->s, s, n)) return e;
    }
}

static int count_word(void *ctx, const char *w, size_t n) {
    wc *e = tfind(ctx, w, n, 1);
    e->count++;
    return DSI_OK;
}

typedef struct tword {
    int32_t *sym, n;
    uint32_t count, stamp;
} tword;

typedef struct tpair {
    int32_t a, b;
    int64_t count;
    int32_t *occ, n_occ, cap_occ; /* words that may hold the pair (duplicates allowed) */
} tpair;

static struct {
    uint64_t *keys;
    int32_t *val;
    uint32_t mask, n;
    tpair *pairs;
    int32_t n_pairs, cap_pairs;
    uint64_t *heap; /* max-heap of count << 32 | pair index */
    size_t heap_n, heap_cap;
} T;

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

static void pm_put(uint64_t key, int32_t v) {
    uint32_t i = (uint32_t)dsi__mix64(key) & T.mask;
    while (T.keys[i] != UINT64_MAX) i = (i + 1) & T.mask;
    T.keys[i] = key;
    T.val[i] = v;
}

static int32_t pair_get(int32_t a, int32_t b) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (uint32_t i = (uint32_t)dsi__mix64(key) & T.mask;; i = (i + 1) & T.mask) {
        if (T.keys[i] == key) return T.val[i];
        if (T.keys[i] == UINT64_MAX) break;
    }
    if (2 * (T.n + 1) > T.mask) { /* grow and rehash */
        uint64_t *ok = T.keys;
        int32_t *ov = T.val;
        uint32_t om = T.mask;
        T.mask = 2 * om + 1;
        T.keys = xrealloc(NULL, ((size_t)T.mask + 1) * sizeof *T.keys);
        T.val = xrealloc(NULL, ((size_t)T.mask + 1) * sizeof *T.val);
        memset(T.keys, 0xff, ((size_t)T.mask + 1) * sizeof *T.keys);
        for (uint32_t i = 0; i <= om; i++)
            if (ok[i] != UINT64_MAX) pm_put(ok[i], ov[i]);
        free(ok);
        free(ov);
    }
    if (T.n_pairs == T.cap_pairs) T.pairs = xrealloc(T.pairs, (T.cap_pairs = 2 * T.cap_pairs + 1024) * sizeof *T.pairs);
    T.pairs[T.n_pairs] = (tpair){a, b, 0, NULL, 0, 0};
    pm_put(key, T.n_pairs);
    T.n++;
    return T.n_pairs++;
}

static void heap_push(uint64_t v) {
    if (T.heap_n == T.heap_cap) T.heap = xrealloc(T.heap, (T.heap_cap = 2 * T.heap_cap + 4096) * sizeof *T.heap);
    size_t i = T.heap_n++;
    while (i > 0 && T.heap[(i - 1) / 2] < v) T.heap[i] = T.heap[(i - 1) / 2], i = (i - 1) / 2;
    T.heap[i] = v;
}

static uint64_t heap_pop(void) {
    uint64_t top = T.heap[0], v = T.heap[--T.heap_n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= T.heap_n) break;
        if (c + 1 < T.heap_n && T.heap[c + 1] > T.heap[c]) c++;
        if (T.heap[c] <= v) break;
        T.heap[i] = T.heap[c];
        i = c;
    }
    T.heap[i] = v;
    return top;
}

static void pair_add(int32_t a, int32_t b, int64_t delta, int32_t word) {
    int32_t p = pair_get(a, b);
    tpair *e = &T.pairs[p];
    e->count += delta;
    if (delta <= 0) return;
    if (e->n_occ == e->cap_occ) e->occ = xrealloc(e->occ, (e->cap_occ = 2 * e->cap_occ + 4) * sizeof *e->occ);
    e->occ[e->n_occ++] = word;
    heap_push((uint64_t)e->count << 32 | (uint32_t)p);
}

static char **g_tok_bytes; /* by id */
static uint32_t *g_tok_len;

static void spelled(const char *s, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = dsi__bytelevel_cp((unsigned char)s[i]);
        if (cp < 0x80) out[o++] = (char)cp;
        else out[o++] = (char)(0xC0 | cp >> 6), out[o++] = (char)(0x80 | (cp & 63));
    }
    out[o] = '\0';
}

/* Trains max_merges merges on the pre-tokenized words of text; fills model.vocab and
 * model.merges of the golden tokenizer.json and returns it printed. */
static char *make_tokenizer_json(const char *text, size_t len, int max_merges) {
    char path[512];
    snprintf(path, sizeof path, "%s/tests/data/golden/tokenizer/tokenizer.json", DSI_SOURCE_DIR);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(1);
    }
    buf js = {0};
    char chunk[65536];
    size_t k;
    while ((k = fread(chunk, 1, sizeof chunk, f)) > 0) put(&js, chunk, k);
    fclose(f);
    cJSON *root = cJSON_Parse(js.p), *model = cJSON_GetObjectItem(root, "model"), *a;
    free(js.p);
    cJSON *vocab = cJSON_CreateObject(), *merges = cJSON_CreateArray();
    int next_id = 0;
    cJSON_ArrayForEach(a, cJSON_GetObjectItem(root, "added_tokens")) {
        int id = cJSON_GetObjectItem(a, "id")->valueint;
        cJSON_AddNumberToObject(vocab, cJSON_GetObjectItem(a, "content")->valuestring, id);
        next_id = DSI_MAX(next_id, id + 1);
    }
    const int first_byte = next_id;
    size_t cap_ids = (size_t)first_byte + 256 + (size_t)max_merges;
    g_tok_bytes = xrealloc(NULL, cap_ids * sizeof *g_tok_bytes);
    g_tok_len = xrealloc(NULL, cap_ids * sizeof *g_tok_len);
    table tokens = {calloc(1u << 20, sizeof(wc)), (1u << 20) - 1, 0}; /* bytes -> id */
    for (int b = 0; b < 256; b++) {
        char *one = xrealloc(NULL, 1), sp[8];
        one[0] = (char)b;
        g_tok_bytes[next_id] = one;
        g_tok_len[next_id] = 1;
        tfind(&tokens, one, 1, 1)->count = (uint32_t)next_id;
        spelled(one, 1, sp);
        cJSON_AddNumberToObject(vocab, sp, next_id++);
    }
    /* words of the corpus, cut by DeepSeek-V3's pre-tokenizer (a bytes-only tokenizer) */
    cJSON_ReplaceItemInObject(model, "vocab", cJSON_Duplicate(vocab, 1));
    cJSON_ReplaceItemInObject(model, "merges", cJSON_CreateArray());
    char *tmp = cJSON_PrintUnformatted(root);
    dsi_tokenizer *t;
    if (dsi_tokenizer_load_json(tmp, strlen(tmp), NULL, 0, &t) != DSI_OK) {
        fprintf(stderr, "bootstrap tokenizer: %s\n", dsi_last_error());
        exit(1);
    }
    free(tmp);
    table seen = {calloc(1u << 21, sizeof(wc)), (1u << 21) - 1, 0};
    if (dsi__pretokenize(t, dsi__tls_get(t), text, len, count_word, &seen) != DSI_OK) {
        fprintf(stderr, "pre-tokenize: %s\n", dsi_last_error());
        exit(1);
    }
    dsi_tokenizer_destroy(t);
    tword *words = xrealloc(NULL, seen.n * sizeof *words);
    int32_t n_words = 0;
    size_t n_sym = 0;
    T.mask = (1u << 20) - 1;
    T.keys = xrealloc(NULL, ((size_t)T.mask + 1) * sizeof *T.keys);
    T.val = xrealloc(NULL, ((size_t)T.mask + 1) * sizeof *T.val);
    memset(T.keys, 0xff, ((size_t)T.mask + 1) * sizeof *T.keys);
    for (uint32_t i = 0; i <= seen.mask; i++) {
        wc *e = &seen.v[i];
        if (!e->s) continue;
        tword *w = &words[n_words];
        w->sym = xrealloc(NULL, e->n * sizeof *w->sym);
        w->n = (int32_t)e->n;
        w->count = e->count;
        w->stamp = 0;
        for (uint32_t j = 0; j < e->n; j++) w->sym[j] = first_byte + (unsigned char)e->s[j];
        for (int32_t j = 0; j + 1 < w->n; j++) pair_add(w->sym[j], w->sym[j + 1], w->count, n_words);
        n_sym += e->n;
        n_words++;
    }
    int n_merges = 0;
    uint32_t stamp = 0;
    while (n_merges < max_merges && T.heap_n > 0) {
        uint64_t top = heap_pop();
        int32_t p = (int32_t)(uint32_t)top;
        int64_t c = (int64_t)(top >> 32);
        tpair *e = &T.pairs[p];
        if (e->count != c) { /* stale entry: counts only drop without a push */
            if (e->count > 0 && e->count < c) heap_push((uint64_t)e->count << 32 | (uint32_t)p);
            continue;
        }
        if (c <= 0) break;
        int32_t pa = e->a, pb = e->b;
        size_t la = g_tok_len[pa], lb = g_tok_len[pb];
        char *nb = xrealloc(NULL, la + lb);
        memcpy(nb, g_tok_bytes[pa], la);
        memcpy(nb + la, g_tok_bytes[pb], lb);
        wc *te = tfind(&tokens, nb, la + lb, 0);
        int32_t z;
        if (te) { /* the same bytes reached by another split: reuse the id, as tokenizers' trainer does */
            z = (int32_t)te->count;
            free(nb);
        } else {
            z = next_id++;
            g_tok_bytes[z] = nb;
            g_tok_len[z] = (uint32_t)(la + lb);
            tfind(&tokens, nb, la + lb, 1)->count = (uint32_t)z;
            char *sp = xrealloc(NULL, 2 * (la + lb) + 1);
            spelled(nb, la + lb, sp);
            cJSON_AddNumberToObject(vocab, sp, z);
            free(sp);
        }
        char *ma = xrealloc(NULL, 2 * la + 1), *mb = xrealloc(NULL, 2 * lb + 1), *mm = xrealloc(NULL, 2 * (la + lb) + 2);
        spelled(g_tok_bytes[pa], la, ma);
        spelled(g_tok_bytes[pb], lb, mb);
        sprintf(mm, "%s %s", ma, mb);
        cJSON_AddItemToArray(merges, cJSON_CreateString(mm));
        free(ma);
        free(mb);
        free(mm);
        n_merges++;
        stamp++;
        int32_t *occ = e->occ, n_occ = e->n_occ;
        e->occ = NULL;
        e->n_occ = e->cap_occ = 0;
        for (int32_t o = 0; o < n_occ; o++) {
            tword *w = &words[occ[o]];
            if (w->stamp == stamp) continue;
            w->stamp = stamp;
            int64_t wc_ = w->count;
            for (int32_t i = 0; i + 1 < w->n; i++) {
                if (w->sym[i] != pa || w->sym[i + 1] != pb) continue;
                if (i > 0) pair_add(w->sym[i - 1], pa, -wc_, -1), pair_add(w->sym[i - 1], z, wc_, occ[o]);
                if (i + 2 < w->n) pair_add(pb, w->sym[i + 2], -wc_, -1), pair_add(z, w->sym[i + 2], wc_, occ[o]);
                w->sym[i] = z;
                memmove(w->sym + i + 1, w->sym + i + 2, (w->n - i - 2) * sizeof *w->sym);
                w->n--;
            }
        }
        free(occ);
        T.pairs[p].count = 0;
    }
    printf("trained: %d distinct words (%zu bytes), %d merges, %d tokens\n", n_words, n_sym, n_merges, next_id);
    cJSON_ReplaceItemInObject(model, "vocab", vocab);
    cJSON_ReplaceItemInObject(model, "merges", merges);
    char *out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    for (int32_t i = 0; i < n_words; i++) free(words[i].sym);
    free(words);
    for (int32_t i = 0; i < T.n_pairs; i++) free(T.pairs[i].occ);
    free(T.pairs);
    free(T.keys);
    free(T.val);
    free(T.heap);
    for (int i = first_byte; i < next_id; i++) free(g_tok_bytes[i]);
    free(g_tok_bytes);
    free(g_tok_len);
    free(seen.v);
    free(tokens.v);
    return out;
}

/* ---- timing ----------------------------------------------------------------------------------- */

/* CPU time of this thread: the machine is shared, and wall time would charge us for
 * other processes' turns on the core. */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int count_only(void *ctx, const char *w, size_t n) {
    (*(size_t *)ctx)++;
    return DSI_OK;
}

typedef struct run {
    const char *name;
    int algo, cache;
} run;

int main(int argc, char **argv) {
    double mb = 4;
    int max_merges = 128000, pos = 0;
    const char *dump = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dump") && i + 1 < argc) dump = argv[++i];
        else if (pos++ == 0) mb = atof(argv[i]);
        else max_merges = atoi(argv[i]);
    }
    make_words();
    /* train on one corpus, measure on another drawn from the same distribution */
    buf train = {0}, text = {0};
    while (train.n < 2 * (size_t)(mb * 1e6)) {
        english(&train, 6000);
        code(&train, 4500);
        cjk(&train, 4500);
    }
    size_t target = (size_t)(mb * 1e6);
    while (text.n < target) {
        english(&text, 6000);
        code(&text, 4500);
        cjk(&text, 4500);
    }
    printf("corpus: %.2f MB mixed English/code/CJK (vocabulary trained on another %.2f MB)\n", text.n / 1e6,
           train.n / 1e6);
    double t0 = cpu_now();
    char *json = make_tokenizer_json(train.p, train.n, max_merges);
    free(train.p);
    if (dump) { /* for checking against another implementation (bench/bench_tokenizer_hf.sh) */
        char p[1024];
        snprintf(p, sizeof p, "%s/tokenizer.json", dump);
        FILE *f = fopen(p, "wb");
        snprintf(p, sizeof p, "%s/corpus.txt", dump);
        FILE *g = fopen(p, "wb");
        if (!f || !g || fwrite(json, 1, strlen(json), f) != strlen(json) || fwrite(text.p, 1, text.n, g) != text.n) {
            fprintf(stderr, "cannot write to %s\n", dump);
            return 1;
        }
        fclose(f);
        fclose(g);
    }
    dsi_tokenizer *tok;
    double t1 = cpu_now();
    if (dsi_tokenizer_load_json(json, strlen(json), NULL, 0, &tok) != DSI_OK) {
        fprintf(stderr, "load: %s\n", dsi_last_error());
        return 1;
    }
    printf("training %.2f s; tokenizer.json %.1f MB loads in %.0f ms\n", t1 - t0, strlen(json) / 1e6,
           (cpu_now() - t1) * 1e3);
    free(json);

    /* bound: pre-tokenization only */
    double best_pre = 1e30;
    for (int r = 0; r < 3; r++) {
        size_t words = 0;
        double s = cpu_now();
        dsi__pretokenize(tok, dsi__tls_get(tok), text.p, text.n, count_only, &words);
        best_pre = DSI_MIN(best_pre, cpu_now() - s);
    }
    const run runs[] = {{"heap BPE + word cache (dsinfer)", DSI__BPE_HEAP, 1},
                        {"heap BPE, no cache", DSI__BPE_HEAP, 0},
                        {"naive O(n^2) BPE, no cache", DSI__BPE_NAIVE, 0}};
    double best[3];
    int32_t *ref = NULL;
    size_t n_ref = 0;
    for (int k = 0; k < 3; k++) {
        best[k] = 1e30;
        for (int r = 0; r < (k == 2 ? 1 : 3); r++) {
            int32_t *ids;
            size_t n;
            double s = cpu_now();
            if (dsi__encode_ex(tok, text.p, text.n, 0, runs[k].algo, runs[k].cache, &ids, &n) != DSI_OK) {
                fprintf(stderr, "encode: %s\n", dsi_last_error());
                return 1;
            }
            best[k] = DSI_MIN(best[k], cpu_now() - s);
            if (!ref) ref = ids, n_ref = n;
            else {
                if (n != n_ref || memcmp(ids, ref, n * sizeof *ids)) {
                    fprintf(stderr, "MISMATCH: %s differs from the cached heap encoder\n", runs[k].name);
                    return 1;
                }
                free(ids);
            }
        }
    }
    double mbs = text.n / 1e6;
    printf("tokens: %zu (%.2f bytes/token)\n", n_ref, (double)text.n / n_ref);
    printf("%-34s %8.1f MB/s   (bound for BPE)\n", "pre-tokenization only (PCRE2 JIT)", mbs / best_pre);
    for (int k = 0; k < 3; k++)
        printf("%-34s %8.1f MB/s   %.2fx of the bound, dsinfer is %.2fx this\n", runs[k].name, mbs / best[k],
               best_pre / best[k], best[k] / best[0]);
    /* each kind of text alone (1 MB each, same vocabulary) */
    void (*gen[3])(buf *, size_t) = {english, code, cjk};
    const char *kind[3] = {"English", "code", "CJK"};
    for (int k = 0; k < 3; k++) {
        buf part = {0};
        gen[k](&part, 1000000);
        double bt = 1e30;
        size_t nt = 0;
        for (int r = 0; r < 3; r++) {
            int32_t *ids;
            double st = cpu_now();
            dsi_tokenizer_encode(tok, part.p, part.n, 0, &ids, &nt);
            bt = DSI_MIN(bt, cpu_now() - st);
            free(ids);
        }
        printf("dsinfer, %-25s %8.1f MB/s   (%.2f bytes/token)\n", kind[k], part.n / 1e6 / bt, (double)part.n / nt);
        free(part.p);
    }
    /* request-sized calls: 4 KB at a time, as the server encodes prompts */
    double s = cpu_now();
    size_t n_calls = 0;
    for (size_t p = 0; p < text.n;) {
        size_t q = DSI_MIN(text.n, p + 4096);
        while (q < text.n && ((unsigned char)text.p[q] & 0xC0) == 0x80) q++;
        int32_t *ids;
        size_t n;
        dsi_tokenizer_encode(tok, text.p + p, q - p, 0, &ids, &n);
        free(ids);
        p = q;
        n_calls++;
    }
    printf("%-34s %8.1f MB/s   (%zu calls)\n", "dsinfer, 4 KB per call", mbs / (cpu_now() - s), n_calls);
    free(ref);
    free(text.p);
    dsi_tokenizer_destroy(tok);
    return 0;
}
