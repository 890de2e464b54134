/* Fused CPU kernels for the merge methods that prune task vectors and combine them (TIES, DARE, Model
 * Breadcrumbs, DELLA, SCE): mergeplug.native compiles this file once per machine and calls it through ctypes.
 *
 * Why: each of these methods is some 15-30 elementwise steps per entry. Done as separate torch operations every
 * step is a pass over memory and a dispatch; here one loop over a block of entries does them all while the
 * block sits in the L1 cache. The arithmetic is the one mergeplug.merging's torch code does, step by step
 * (compiled with -ffp-contract=off; an explicit fmaf stands where torch's add with alpha fuses), so both paths
 * agree to float32 rounding and keep exactly the same entries.
 *
 * Every function works on a range [start, stop) of positions so that Python can split a tensor across threads
 * (ctypes releases the GIL); the result of a position never depends on how the range was split.
 * Inputs are float32 (dtype 0) or bfloat16 (dtype 1); arithmetic is float32.
 */
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#define BLOCK 1024 /* entries per step: n_models + 6 arrays of it stay in a 48 KiB L1 cache for 3-5 models */

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };
enum { KEEP_ALL = 0, KEEP_BAND = 1, KEEP_RANDOM = 2, KEEP_RANKED = 3 };
enum { REDUCE_SUM = 0, REDUCE_TIES = 1 };
enum { SCORE_MAGNITUDE = 0, SCORE_VARIANCE = 1 };

int mergeplug_kernels_version(void) { return 20; }

static void load_block(const void *src, int32_t dtype, int64_t start, int64_t count, float *dst) {
    if (dtype == DTYPE_F32) {
        memcpy(dst, (const float *)src + start, (size_t)count * sizeof(float));
    } else { /* bfloat16 is the top half of a float32 */
        const uint16_t *s = (const uint16_t *)src + start;
        uint32_t *d = (uint32_t *)dst;
        for (int64_t j = 0; j < count; j++) d[j] = (uint32_t)s[j] << 16;
    }
}

/* |x| as an integer ordered like |x| (the float's bits with the sign cleared), as torch's _magnitude_keys. */
static inline int64_t key_of(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (int64_t)(u & 0x7FFFFFFFu);
}

/* The top-k rule of mergeplug.merging.TopMagnitudes, a cut (kth, last_tie): an entry is kept when its key is
 * above kth, the k-th largest key, or equal to it at a position up to last_tie, the last kept tie. Keep all:
 * kth = -1; keep none: kth = INT64_MAX. The loops below apply it as "key > kth − 1" up to last_tie and
 * "key > kth" after it: integer comparisons that vectorise. */

/* A cut's kth as an int32 threshold for 31-bit keys (keep all: -1; keep none: INT32_MAX). */
static int32_t threshold32(int64_t t) { return t < -1 ? -1 : (t > INT32_MAX ? INT32_MAX : (int32_t)t); }

/* mask[j] = 1 where the key of score[j] (position s + j) is above the cut (kth, last_tie), else 0: "key > kth − 1"
 * up to the last kept tie and "key > kth" after it, two integer comparisons that vectorise. */
static void selected_mask(const float *score, int64_t s, int64_t m, int64_t kth, int64_t last_tie, float *mask) {
    int64_t cut = last_tie + 1 - s;
    cut = cut < 0 ? 0 : (cut > m ? m : cut);
    int32_t before = threshold32(kth - 1), after = threshold32(kth);
    for (int64_t j = 0; j < cut; j++) mask[j] = (int32_t)key_of(score[j]) > before ? 1.0f : 0.0f;
    for (int64_t j = cut; j < m; j++) mask[j] = (int32_t)key_of(score[j]) > after ? 1.0f : 0.0f;
}

static inline float sign_of(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

/* Counter-based uniform numbers: u(key, position) in [0, 1) with 24 bits, the same function as
 * mergeplug.merging.uniform (two rounds of a 32-bit integer hash). */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    x ^= x >> 15;
    return x;
}

static inline float uniform_at(uint64_t key, uint64_t position) {
    uint32_t h = mix32((uint32_t)position ^ (uint32_t)key);
    h = mix32(h ^ (uint32_t)(position >> 32) ^ (uint32_t)(key >> 32));
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

void mergeplug_uniform(uint64_t key, int64_t start, int64_t count, float *out) {
    for (int64_t j = 0; j < count; j++) out[j] = uniform_at(key, (uint64_t)(start + j));
}

/* Read one byte of every page of [p, p + bytes), in order: an input that is still a file mapping is then
 * faulted in sequentially (the kernel reads ahead), not page by page in the order a sample visits it. */
int64_t mergeplug_touch(const void *p, int64_t bytes) {
    const volatile uint8_t *b = (const volatile uint8_t *)p;
    int64_t sum = 0;
    for (int64_t at = 0; at < bytes; at += 4096) sum += b[at];
    return sum;
}

typedef struct {
    int64_t n_models;
    const void *base;
    int32_t base_dtype;
    const void *const *models;
    const int32_t *model_dtypes;
} inputs_spec;

/* Per position: the score whose top entries a selection keeps (|τ_i| of one model, or the population variance
 * of τ across models, as SCE's), for `count` positions from `start`. tv: n_models * BLOCK floats of scratch. */
static void scores_block(const inputs_spec *in, int32_t kind, int64_t model, int64_t start, int64_t count,
                         float *b, float *tv, float *score) {
    load_block(in->base, in->base_dtype, start, count, b);
    if (kind == SCORE_MAGNITUDE) {
        load_block(in->models[model], in->model_dtypes[model], start, count, score);
        for (int64_t j = 0; j < count; j++) score[j] = score[j] - b[j];
        return;
    }
    int64_t n = in->n_models;
    float w = (float)(1.0 / (double)n);
    for (int64_t i = 0; i < n; i++) {
        float *t = tv + i * BLOCK;
        load_block(in->models[i], in->model_dtypes[i], start, count, t);
        for (int64_t j = 0; j < count; j++) t[j] = t[j] - b[j];
    }
    /* mean = Σ τ_i/n as weighted_sum does it (a product, then fused adds); variance = Σ (τ_i − mean)² / n */
    float *mean = b; /* the base is no longer needed */
    for (int64_t j = 0; j < count; j++) mean[j] = tv[j] * w;
    for (int64_t i = 1; i < n; i++) {
        const float *t = tv + i * BLOCK;
        for (int64_t j = 0; j < count; j++) mean[j] = fmaf(t[j], w, mean[j]);
    }
    for (int64_t j = 0; j < count; j++) score[j] = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float *t = tv + i * BLOCK;
        for (int64_t j = 0; j < count; j++) {
            float d = t[j] - mean[j];
            score[j] = score[j] + d * d;
        }
    }
    float nf = (float)n;
    for (int64_t j = 0; j < count; j++) score[j] = score[j] / nf;
}

static float *scratch(int64_t n_models) {
    return (float *)malloc((size_t)(n_models + 3) * BLOCK * sizeof(float));
}

/* Keys of the score in `runs` runs of `run` consecutive positions, run r starting at r · stride: the sample
 * that brackets a cut. Runs, not single positions: a position alone costs a cache miss per input. */
int mergeplug_sample_keys(const inputs_spec *in, int32_t kind, int64_t model, int64_t stride, int64_t runs,
                          int64_t run, int32_t *out) {
    float *buf = scratch(in->n_models);
    if (!buf || run > BLOCK) {
        free(buf);
        return -1;
    }
    float *b = buf, *score = buf + BLOCK, *tv = buf + 2 * BLOCK;
    for (int64_t r = 0; r < runs; r++) {
        scores_block(in, kind, model, r * stride, run, b, tv, score);
        for (int64_t j = 0; j < run; j++) out[r * run + j] = (int32_t)key_of(score[j]);
    }
    free(buf);
    return 0;
}

/* What one pass collects for one band [lo, hi] of keys (see mergeplug_band_scan). */
typedef struct {
    int64_t model;         /* whose |τ| (SCORE_MAGNITUDE; bands of one model next to each other) */
    int64_t lo, hi;
    int64_t count_above;   /* out: keys above hi */
    int32_t *keys;         /* the keys in the band, in order (room for stop − start of them) ... */
    int64_t *histogram;    /* ... or, when not NULL, their counts: histogram[k − lo], hi − lo + 1 entries,
                              zeroed by the caller */
    int64_t found;         /* out: keys in the band */
} band_spec;

static void band_block(band_spec *band, const float *score, int64_t m) {
    int64_t lo = band->lo, hi = band->hi, high = 0;
    uint64_t width = (uint64_t)(hi - lo);
    for (int64_t j = 0; j < m; j++) high += key_of(score[j]) > hi;
    band->count_above += high;
    /* A branch, not a store for every entry: a band holds a few percent of the entries, so it is predicted
     * well, where an unconditional store (or increment of a spill counter) serialises every entry. */
    if (band->histogram) {
        int64_t *h = band->histogram;
        for (int64_t j = 0; j < m; j++) {
            uint64_t offset = (uint64_t)(key_of(score[j]) - lo);
            if (offset <= width) h[offset]++;
        }
    } else { /* the caller gives room for every position of its range: no bound to check */
        int32_t *keys = band->keys;
        int64_t found = band->found, j = 0;
#if defined(__AVX512F__)
        /* 16 keys at a time: compare, then store the ones inside the band packed together. */
        const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), low = _mm512_set1_epi32((int32_t)lo),
                      span = _mm512_set1_epi32((int32_t)width);
        for (; j + 16 <= m; j += 16) {
            __m512i k = _mm512_and_si512(_mm512_loadu_si512((const void *)(score + j)), magnitude);
            __mmask16 inside = _mm512_cmple_epu32_mask(_mm512_sub_epi32(k, low), span);
            _mm512_mask_compressstoreu_epi32((void *)(keys + found), inside, k);
            found += __builtin_popcount((unsigned)inside);
        }
#endif
        for (; j < m; j++) {
            int64_t k = key_of(score[j]);
            if ((uint64_t)(k - lo) <= width) keys[found++] = (int32_t)k;
        }
        band->found = found;
    }
}

/* One pass over [start, stop) for n_bands bands at once (every model's cut, and Breadcrumbs' two cuts of each
 * model, share it: the base is read once): for each, count the keys above its hi and collect, or count in a
 * histogram, those inside it. */
int mergeplug_band_scan(const inputs_spec *in, int32_t kind, int64_t start, int64_t stop, int64_t n_bands,
                        band_spec *bands) {
    float *buf = scratch(in->n_models);
    if (!buf) return -1;
    float *b = buf, *score = buf + BLOCK, *tv = buf + 2 * BLOCK;
    for (int64_t i = 0; i < n_bands; i++) bands[i].count_above = bands[i].found = 0;
    for (int64_t s = start; s < stop; s += BLOCK) {
        int64_t m = stop - s < BLOCK ? stop - s : BLOCK;
        if (kind == SCORE_VARIANCE) scores_block(in, kind, 0, s, m, b, tv, score);
        else load_block(in->base, in->base_dtype, s, m, b);
        for (int64_t i = 0; i < n_bands; i++) {
            if (kind == SCORE_MAGNITUDE && (i == 0 || bands[i].model != bands[i - 1].model)) {
                int64_t model = bands[i].model;
                load_block(in->models[model], in->model_dtypes[model], s, m, score);
                for (int64_t j = 0; j < m; j++) score[j] = score[j] - b[j];
            }
            band_block(&bands[i], score, m);
        }
    }
    for (int64_t i = 0; i < n_bands; i++)
        if (bands[i].histogram) {
            int64_t found = 0;
            for (int64_t v = 0; v <= bands[i].hi - bands[i].lo; v++) found += bands[i].histogram[v];
            bands[i].found = found;
        }
    free(buf);
    return 0;
}

/* How many positions of [start, stop) have this key; with nth > 0, the position of the nth of them instead
 * (-1 when there are fewer). */
int64_t mergeplug_find_key(const inputs_spec *in, int32_t kind, int64_t model, int64_t start, int64_t stop,
                           int64_t key, int64_t nth) {
    float *buf = scratch(in->n_models);
    if (!buf) return -2;
    float *b = buf, *score = buf + BLOCK, *tv = buf + 2 * BLOCK;
    int64_t seen = 0, result = -1;
    for (int64_t s = start; s < stop && result < 0; s += BLOCK) {
        int64_t m = stop - s < BLOCK ? stop - s : BLOCK;
        scores_block(in, kind, model, s, m, b, tv, score);
        int64_t here = 0;
        for (int64_t j = 0; j < m; j++) here += key_of(score[j]) == key;
        if (nth > 0 && seen + here >= nth) { /* the nth is in this block: find it */
            for (int64_t j = 0; j < m; j++) {
                seen += key_of(score[j]) == key;
                if (seen == nth) {
                    result = s + j;
                    break;
                }
            }
        } else {
            seen += here;
        }
    }
    free(buf);
    return nth > 0 ? result : seen;
}

/* Σ τ_i² over the selected positions, per model (SCE's energy), in double. */
int mergeplug_selected_energy(const inputs_spec *in, int64_t start, int64_t stop, int64_t kth, int64_t last_tie,
                              double *energy) {
    float *buf = scratch(in->n_models);
    if (!buf) return -1;
    float *b = buf, *score = buf + BLOCK, *tv = buf + 2 * BLOCK;
    for (int64_t i = 0; i < in->n_models; i++) energy[i] = 0.0;
    for (int64_t s = start; s < stop; s += BLOCK) {
        int64_t m = stop - s < BLOCK ? stop - s : BLOCK;
        scores_block(in, SCORE_VARIANCE, 0, s, m, b, tv, score);
        float *mask = b; /* the mean is no longer needed */
        selected_mask(score, s, m, kth, last_tie, mask);
        for (int64_t i = 0; i < in->n_models; i++) {
            const float *t = tv + i * BLOCK;
            /* 16 float partial sums per block (they vectorise), added up in double: torch sums a chunk in
             * float32 too. */
            float part[16] = {0.0f};
            int64_t j = 0;
            for (; j + 16 <= m; j += 16)
                for (int l = 0; l < 16; l++) part[l] = part[l] + mask[j + l] * (t[j + l] * t[j + l]);
            double e = 0.0;
            for (int l = 0; l < 16; l++) e += part[l];
            for (; j < m; j++) e += mask[j] * (t[j] * t[j]);
            energy[i] += e;
        }
    }
    free(buf);
    return 0;
}

/* Bucket bounds from a histogram counted in two halves (c0, c1: two counters, two independent chains of
 * increments when many entries share a bucket): the exclusive prefix sums of c0[v] + c1[v] into c0 (each
 * bucket's first slot) and the inclusive ones into c1 (one past its last). */
static void bucket_bounds(uint32_t *c0, uint32_t *c1, uint32_t bins) {
    uint32_t v = 0, total = 0;
#if defined(__AVX512F__)
    __m512i carry = _mm512_setzero_si512(), zero = _mm512_setzero_si512(), last = _mm512_set1_epi32(15);
    for (; v + 16 <= bins; v += 16) { /* a prefix sum of 16 lanes in four shifted adds */
        __m512i c = _mm512_add_epi32(_mm512_loadu_si512(c0 + v), _mm512_loadu_si512(c1 + v));
        __m512i x = _mm512_add_epi32(c, _mm512_alignr_epi32(c, zero, 15));
        x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 14));
        x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 12));
        x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 8));
        x = _mm512_add_epi32(x, carry);
        _mm512_storeu_si512(c0 + v, _mm512_sub_epi32(x, c));
        _mm512_storeu_si512(c1 + v, x);
        carry = _mm512_permutexvar_epi32(last, x);
    }
    total = v ? c1[v - 1] : 0;
#endif
    for (; v < bins; v++) {
        uint32_t c = c0[v] + c1[v];
        c0[v] = total;
        total += c;
        c1[v] = total;
    }
}

/* Count digit (packed >> shift) & mask of packed[0..n) into c0 (first half) and c1 (second half). */
static void count_halves(const uint64_t *packed, int64_t n, int shift, uint32_t mask, uint32_t *c0, uint32_t *c1,
                         uint32_t bins) {
    memset(c0, 0, (size_t)bins * sizeof(uint32_t));
    memset(c1, 0, (size_t)bins * sizeof(uint32_t));
    int64_t half = n / 2;
    for (int64_t j = 0; j < half; j++) {
        c0[(packed[j] >> shift) & mask]++;
        c1[(packed[half + j] >> shift) & mask]++;
    }
    if (n & 1) c1[(packed[n - 1] >> shift) & mask]++;
}

/* Stable scatter of src[0..n) into the buckets of digit (x >> shift) & mask whose bounds bucket_bounds left in
 * c0 / c1: the first half forward from each bucket's start, the second half backward from its end, two
 * independent chains, each keeping the order of its entries. With rank, writes each entry's slot to
 * rank[position] instead of the entry to dst. */
static void scatter(const uint64_t *src, int64_t n, int shift, uint32_t mask, uint32_t *c0, uint32_t *c1,
                    uint64_t *dst, uint32_t *rank) {
    int64_t half = n / 2;
    if (rank) {
        for (int64_t r = 0; r < half; r++) {
            uint64_t x = src[r], y = src[n - 1 - r];
            rank[(uint32_t)x] = c0[(x >> shift) & mask]++;
            rank[(uint32_t)y] = --c1[(y >> shift) & mask];
        }
        if (n & 1) rank[(uint32_t)src[half]] = c0[(src[half] >> shift) & mask];
    } else {
        for (int64_t r = 0; r < half; r++) {
            uint64_t x = src[r], y = src[n - 1 - r];
            dst[c0[(x >> shift) & mask]++] = x;
            dst[--c1[(y >> shift) & mask]] = y;
        }
        if (n & 1) dst[c0[(src[half] >> shift) & mask]] = src[half];
    }
}

/* The bits row_ranks' counting pass sorts a row of n entries on: floor(log2 n) + 1 (about two buckets an
 * entry), at most 16. */
static int coarse_bits(int64_t n) {
    int coarse = n > 1 ? 64 - __builtin_clzll((uint64_t)n) : 1;
    return coarse > 16 ? 16 : coarse;
}

/* Room row_ranks needs in counts for a row of n entries. */
static int64_t rank_counts_size(int64_t n) {
    int64_t need = (int64_t)2 << coarse_bits(n);
    return need > 2 * 2048 ? need : 2 * 2048;
}

/* Stable ranks of keys[0..n) (0 for the smallest; equal keys by position) into rank[], through (key, position)
 * packed into 64 bits (one load per entry moved, not an index and a key). The keys are first made narrow
 * without changing their order: zeros stay 0, a nonzero key k becomes ((k − smallest nonzero) >> z) + 1, z being
 * the trailing zero bits all nonzero keys share.
 *
 * Then one of two sorts. A bfloat16 task vector's magnitudes have few significant bits, so most narrow keys
 * share their low bits and differ in the high ones: one counting pass on the top floor(log2 n) + 1 bits (about
 * two buckets an entry) leaves few entries out of order, and an insertion pass puts them in place (measured on
 * rows of 1024 and 2816: 2.1-2.3 ns an entry, against 3.6-3.7 for the radix sort below). Where many keys differ
 * in their low bits (float32 task vectors), insertion would move too much: a least-significant-digit radix
 * sort with up to 11-bit digits does it in two or three passes. counts: rank_counts_size(n). */
static void row_ranks(const uint32_t *keys, int64_t n, uint64_t *packed, uint64_t *spare, uint32_t *counts,
                      uint32_t *rank) {
    uint32_t below = UINT32_MAX, high = 0, ored = 0; /* below: the smallest nonzero key − 1 (0 wraps to max) */
    for (int64_t j = 0; j < n; j++) {
        uint32_t k = keys[j];
        below = k - 1u < below ? k - 1u : below;
        high = k > high ? k : high;
        ored |= k;
    }
    uint32_t low = below + 1u;
    int zeros = ored ? __builtin_ctz(ored) : 0;
    uint32_t top = high ? ((high - low) >> zeros) + 1u : 0u;
    int bits = top ? 32 - __builtin_clz(top) : 0;
    int coarse = coarse_bits(n);
    int fine = bits > coarse ? bits - coarse : 0; /* low bits the counting pass leaves to insertion */
    uint32_t fine_mask = (1u << fine) - 1u;
    /* The low bits of the narrow key of any k with more trailing zeros than low (most keys, when few bits are
     * significant); an entry whose low bits differ may be out of place after the counting pass. */
    uint32_t common = ((0u - low) >> zeros) + 1u;
    int64_t differing = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t k = keys[j];
        uint32_t narrow = k ? ((k - low) >> zeros) + 1u : 0u;
        differing += ((narrow ^ common) & fine_mask) != 0;
        packed[j] = ((uint64_t)narrow << 32) | (uint64_t)j;
    }
    if (differing <= n / 4) { /* counting pass on the high bits, then insertion */
        uint32_t bins = 1u << (bits - fine), *c0 = counts, *c1 = counts + bins;
        count_halves(packed, n, 32 + fine, bins - 1u, c0, c1, bins);
        bucket_bounds(c0, c1, bins);
        if (!fine) { scatter(packed, n, 32, bins - 1u, c0, c1, NULL, rank); return; }
        scatter(packed, n, 32 + fine, bins - 1u, c0, c1, spare, NULL);
        uint64_t prev = spare[0]; /* spare[r − 1], kept in a register: reloading it would wait on the last store */
        for (int64_t r = 1; r < n; r++) {
            uint64_t x = spare[r];
            if (__builtin_expect(x < prev, 0)) {
                int64_t q = r;
                do { spare[q] = spare[q - 1]; q--; } while (q > 0 && spare[q - 1] > x);
                spare[q] = x; /* spare[r] now holds prev, still the last entry placed */
            } else {
                prev = x;
            }
        }
        for (int64_t r = 0; r < n; r++) rank[(uint32_t)spare[r]] = (uint32_t)r;
        return;
    }
    int passes = (bits + 10) / 11, width = (bits + passes - 1) / passes;
    uint32_t bins = 1u << width, mask = bins - 1u, *c0 = counts, *c1 = counts + bins;
    uint64_t *src = packed, *dst = spare;
    for (int d = 0; d < passes; d++) {
        int shift = 32 + d * width, last = d == passes - 1;
        count_halves(src, n, shift, mask, c0, c1, bins);
        bucket_bounds(c0, c1, bins);
        scatter(src, n, shift, mask, c0, c1, dst, last ? rank : NULL);
        uint64_t *swap = src; src = dst; dst = swap;
    }
}

typedef struct {
    inputs_spec in;
    /* per model: how its task vector is pruned */
    const int32_t *rule;
    const int64_t *outer_kth, *outer_last, *inner_kth, *inner_last; /* KEEP_BAND: above outer and not inner */
    const float *density;                                           /* KEEP_RANDOM: keep probability */
    const uint64_t *rng_key;                                        /* KEEP_RANDOM, KEEP_RANKED */
    const float *slope, *offset;     /* KEEP_RANKED: keep probability slope · rank + offset, ranks within rows */
    int64_t row_length;              /* KEEP_RANKED: the rows (then each call's range is whole rows) */
    int32_t rescale;                 /* divide kept entries by their keep probability */
    /* an optional selection shared by all models (SCE): positions whose variance across models is in the top */
    int32_t select;
    int64_t select_kth, select_last;
    /* how the pruned task vectors are combined */
    int32_t reduce;                  /* REDUCE_SUM: Σ w_i τ̂_i (÷ weight_total if normalize); REDUCE_TIES */
    const float *weight, *vote;
    int32_t sign_count;              /* TIES election: 0 sign of Σ vote_i τ̂_i; 1 majority of signs */
    int32_t normalize;
    float weight_total;
    int32_t add_base;                /* out = base + scale · reduced (else the reduced task vector) */
    float scale;
    float *out;
} merge_spec;

/* Keep t[j] where kth_o-rule keeps and kth_i-rule does not (the top-k rule above), for positions s..s+m−1. The block
 * is cut where a rule's last kept tie falls, so that in each piece each rule is one integer threshold and the
 * loop vectorises: "key > kth, or == kth at a position <= last" is key > kth − 1 up to last, key > kth after. */
static void keep_band(float *restrict t, int64_t s, int64_t m, int64_t ok, int64_t ol, int64_t ik, int64_t il) {
    int64_t cut[4] = {s, ol + 1, il + 1, s + m};
    for (int c = 1; c <= 2; c++) cut[c] = cut[c] < s ? s : (cut[c] > s + m ? s + m : cut[c]);
    if (cut[1] > cut[2]) { int64_t x = cut[1]; cut[1] = cut[2]; cut[2] = x; }
    for (int piece = 0; piece < 3; piece++) {
        int64_t a = cut[piece], b = cut[piece + 1];
        if (a >= b) continue;
        int32_t keep_above = threshold32(a <= ol ? ok - 1 : ok); /* kept by the outer rule: key > keep_above */
        int32_t drop_above = threshold32(a <= il ? ik - 1 : ik); /* taken by the inner rule: key > drop_above */
        float *restrict x = t + (a - s);
        int64_t n = b - a;
        for (int64_t j = 0; j < n; j++) {
            int32_t k = (int32_t)key_of(x[j]);
            x[j] = (k > keep_above) & (k <= drop_above) ? x[j] : 0.0f;
        }
    }
}

/* Scratch for ranking one row (KEEP_RANKED). */
typedef struct {
    uint32_t *keys, *rank, *counts;
    uint64_t *packed, *spare;
    float *p;
} rank_work;

static void prune_block(const merge_spec *sp, int64_t i, int64_t s, int64_t m, float *restrict t, float *restrict u,
                        rank_work *w) {
    int32_t rule = sp->rule[i];
    if (rule == KEEP_BAND) {
        keep_band(t, s, m, sp->outer_kth[i], sp->outer_last[i], sp->inner_kth[i], sp->inner_last[i]);
    } else if (rule == KEEP_RANDOM) {
        const float d = sp->density[i];
        const uint64_t key = sp->rng_key[i];
        for (int64_t j = 0; j < m; j++) u[j] = uniform_at(key, (uint64_t)(s + j));
        for (int64_t j = 0; j < m; j++) t[j] = t[j] * (u[j] < d ? 1.0f : 0.0f);
        if (sp->rescale)
            for (int64_t j = 0; j < m; j++) t[j] = t[j] / d;
    } else if (rule == KEEP_RANKED) { /* the block is one row: rank |τ| within it (DELLA's MAGPRUNE) */
        for (int64_t j = 0; j < m; j++) w->keys[j] = (uint32_t)key_of(t[j]);
        row_ranks(w->keys, m, w->packed, w->spare, w->counts, w->rank);
        float *restrict p = w->p;
        const float slope = sp->slope[i], offset = sp->offset[i];
        for (int64_t j = 0; j < m; j++) { /* as magprune_keep_probabilities: a product, then a sum */
            float product = (float)w->rank[j] * slope;
            p[j] = product + offset;
        }
        const uint64_t key = sp->rng_key[i];
        for (int64_t j = 0; j < m; j++) u[j] = uniform_at(key, (uint64_t)(s + j));
        if (sp->rescale) {
            for (int64_t j = 0; j < m; j++) t[j] = u[j] < p[j] ? t[j] / p[j] : 0.0f;
        } else {
            for (int64_t j = 0; j < m; j++) t[j] = u[j] < p[j] ? t[j] : 0.0f;
        }
    }
}

/* The merged (or reduced) values of positions [start, stop): prune each τ_i, combine, add to the base. */
int mergeplug_fused_merge(const merge_spec *sp, int64_t start, int64_t stop) {
    const inputs_spec *in = &sp->in;
    int64_t n = in->n_models;
    /* A block of BLOCK entries, or, when a model's entries are ranked within rows, one row. */
    int64_t step = sp->row_length > 0 ? sp->row_length : BLOCK;
    if (sp->row_length > 0 && sp->select) return -2; /* SCE's selection works on BLOCK-sized blocks */
    float *buf = (float *)malloc((size_t)(n + 7) * step * sizeof(float));
    rank_work w = {0};
    if (sp->row_length > 0) {
        w.keys = (uint32_t *)malloc((size_t)step * sizeof(uint32_t));
        w.rank = (uint32_t *)malloc((size_t)step * sizeof(uint32_t));
        w.counts = (uint32_t *)malloc((size_t)rank_counts_size(step) * sizeof(uint32_t));
        w.packed = (uint64_t *)malloc((size_t)step * sizeof(uint64_t));
        w.spare = (uint64_t *)malloc((size_t)step * sizeof(uint64_t));
    }
    int ok = buf && (sp->row_length == 0 || (w.keys && w.rank && w.counts && w.packed && w.spare));
    if (!ok) {
        free(buf); free(w.keys); free(w.rank); free(w.counts); free(w.packed); free(w.spare);
        return -1;
    }
    float *b = buf, *acc = buf + step, *aux = buf + 2 * step, *total = buf + 3 * step,
          *u = buf + 4 * step, *score = buf + 5 * step, *tv = buf + 7 * step;
    w.p = buf + 6 * step;
    for (int64_t s = start; s < stop; s += step) {
        int64_t m = stop - s < step ? stop - s : step;
        if (sp->select) {
            scores_block(in, SCORE_VARIANCE, 0, s, m, b, tv, score); /* leaves τ_i in tv, overwrites b */
            load_block(in->base, in->base_dtype, s, m, b);
            selected_mask(score, s, m, sp->select_kth, sp->select_last, u);
            for (int64_t i = 0; i < n; i++) {
                float *t = tv + i * step;
                for (int64_t j = 0; j < m; j++) t[j] = u[j] != 0.0f ? t[j] : 0.0f;
            }
        } else {
            load_block(in->base, in->base_dtype, s, m, b);
            for (int64_t i = 0; i < n; i++) {
                float *t = tv + i * step;
                load_block(in->models[i], in->model_dtypes[i], s, m, t);
                for (int64_t j = 0; j < m; j++) t[j] = t[j] - b[j];
            }
        }
        for (int64_t i = 0; i < n; i++) prune_block(sp, i, s, m, tv + i * step, u, &w);

        if (sp->reduce == REDUCE_SUM) { /* weighted_sum: a product, then fused adds */
            float w0 = sp->weight[0];
            for (int64_t j = 0; j < m; j++) acc[j] = tv[j] * w0;
            for (int64_t i = 1; i < n; i++) {
                const float *t = tv + i * step;
                float w = sp->weight[i];
                for (int64_t j = 0; j < m; j++) acc[j] = fmaf(t[j], w, acc[j]);
            }
            if (sp->normalize)
                for (int64_t j = 0; j < m; j++) acc[j] = acc[j] / sp->weight_total;
        } else { /* TIES: elect a sign, then the disjoint sum or mean of the entries that agree with it */
            for (int64_t j = 0; j < m; j++) total[j] = 0.0f;
            for (int64_t i = 0; i < n; i++) {
                const float *t = tv + i * step;
                float v = sp->vote[i];
                if (sp->sign_count) {
                    if (v == 0.0f) continue;
                    float unit = v > 0.0f ? 1.0f : -1.0f;
                    for (int64_t j = 0; j < m; j++) total[j] = fmaf(sign_of(t[j]), unit, total[j]);
                } else {
                    for (int64_t j = 0; j < m; j++) total[j] = fmaf(t[j], v, total[j]);
                }
            }
            for (int64_t j = 0; j < m; j++) {
                total[j] = sign_of(total[j]);
                acc[j] = 0.0f;
                aux[j] = 0.0f;
            }
            for (int64_t i = 0; i < n; i++) {
                const float *t = tv + i * step;
                float w = sp->weight[i];
                for (int64_t j = 0; j < m; j++) {
                    float agreement = t[j] * total[j];
                    agreement = agreement < 0.0f ? 0.0f : agreement;
                    if (sp->normalize) aux[j] = fmaf(sign_of(agreement), w, aux[j]);
                    acc[j] = fmaf(agreement, w, acc[j]);
                }
            }
            for (int64_t j = 0; j < m; j++) acc[j] = acc[j] * total[j];
            if (sp->normalize)
                for (int64_t j = 0; j < m; j++) {
                    float norm = aux[j] + (-fabsf(sign_of(aux[j])) + 1.0f);
                    acc[j] = acc[j] / norm;
                }
        }
        float *o = sp->out + s;
        if (sp->add_base) {
            for (int64_t j = 0; j < m; j++) o[j] = fmaf(acc[j], sp->scale, b[j]);
        } else {
            memcpy(o, acc, (size_t)m * sizeof(float));
        }
    }
    free(buf); free(w.keys); free(w.rank); free(w.counts); free(w.packed); free(w.spare);
    return 0;
}
