/* The small operations of one decoding step, in C (see lmforge/infer/native.py).

   A decoding step of a small model is hundreds of small tensor operations per token, and on a CPU each costs the
   framework's few microseconds of dispatch and allocation whatever its size. What lies between two matrix products
   is one call here: the residual add and the next norm, rotary embedding + the cache write + attention for one query
   per row, the MLP's activation. The products are PyTorch's, or here where that is faster: small float32 models'
   (lmf_linear, lmf_step), float32 products of a few rows (lmf_gemv), int4 products (lmf_int4) and an int8 output
   projection of several rows (lmf_head_vnni).
   Rows are independent sequences (row r is slot r of the cache, at its own position), or the tokens of prompts in
   order (each row names its slot): a prefill.

   Activations move between the products as float32 or bfloat16 rows (``*_bf`` flags), padded to a row stride;
   bfloat16 is rounded to nearest even like PyTorch. Arithmetic is float32 throughout.
   A small model's step of several rows, attention of many rows and the large products share their work among the
   calling thread's OpenMP team (PyTorch's pool; see lmf_step, lmf_attention and for_tiles); one thread of the
   library's own runs a whole step begun by lmf_step_start while its caller goes on.
   Nothing is allocated but a scratch buffer per worker thread (thread_scratch). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef uint16_t bf16_t;

static inline float bf16_to_f32(bf16_t h) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)h << 16;
    return c.f;
}

static inline bf16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;  /* NaN, as PyTorch rounds it */
    return (bf16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* Below this exp gives 0: exp(-64) is nothing next to 1 in float32 (a softmax's largest term), and anything
   near it, once divided by a softmax's sum, would be subnormal. Arithmetic that reads or makes a subnormal float
   takes a microcode assist of about a hundred cycles: when keys far below the top score gave 2^-126 instead,
   attention over stories260K's cache of an arbitrary prompt took about 5x as long (a decoding step 1.7x). */
#define EXP_FLOOR (-64.0f)

/* exp(x) in float32 within 2 ulp, in a form the compiler vectorizes (glibc's expf is one call per element):
   x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor polynomial to degree 7, times 2^n built in the exponent
   bits. Below EXP_FLOOR (and for NaN) it gives 0, above 88 exp(88). */
static inline float fast_expf(float x) {
    const int live = x >= EXP_FLOOR;
    x = live ? (x > 88.0f ? 88.0f : x) : 0.0f;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  /* ln2 in two parts */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)((int32_t)n + 127) << 23;
    return live ? p * c.f : 0.0f;
}

static void load_row(const void *src, int bf, float *dst, int n) {
    if (bf) {
        const bf16_t *s = (const bf16_t *)src;
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static void store_row(void *dst, int bf, const float *src, int n) {
    if (bf) {
        bf16_t *d = (bf16_t *)dst;
#pragma omp simd
        for (int i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

static inline void *row_at(void *base, int bf, int64_t stride, int r) {
    return (char *)base + (size_t)r * (size_t)stride * (bf ? 2 : 4);
}

#define PREP_SHARED_ROWS 4  /* rows from which for_tiles_prep's threads share the prep (below, the team's barrier
                               cost more than it saved: one SmolLM2 row 4 % slower a step) */
#define INT4_PARALLEL_WORK 65536.0  /* rows x outputs x inputs from which lmf_int4 and lmf_head_vnni share
                                       their outputs among the threads */
int lmf_parallel_ok = 0;  /* set by the loader when this library's OpenMP runtime is PyTorch's */
long lmf_parallel_runs = 0;  /* calls that shared their work among threads (for tests) */

/* tile(args, t) for t = 0 .. tiles - 1 (each tile independent): shared among the calling thread's OpenMP team when
   the product's work (rows x outputs x inputs) is large enough; then done() (if given) on each thread of the team.
   prep (if given) first: prep(args, r0, r1) for rows 0 .. n - 1, from PREP_SHARED_ROWS rows in parts, a part per
   thread of the team, all ended before any tile begins (a product's activations quantized: on one thread, 16 SmolLM2
   rows' took ~1.1 ms a step while the other thread waited). */
static __attribute__((unused)) void for_tiles_prep(int tiles, double work, void (*prep)(const void *, int, int), int n,
                                                   void (*tile)(const void *, int), const void *args,
                                                   void (*done)(void)) {
#if defined(_OPENMP)
    const int par = lmf_parallel_ok && !omp_in_parallel() && work >= INT4_PARALLEL_WORK;
    lmf_parallel_runs += par && omp_get_max_threads() > 1;
    if (prep && (!par || n < PREP_SHARED_ROWS)) {  /* a few rows: here, with no barrier in the team */
        prep(args, 0, n);
        prep = NULL;
    }
#pragma omp parallel if (par)
#endif
    {
        if (prep) {
#if defined(_OPENMP)
            const int me = omp_get_thread_num(), nt = omp_get_num_threads();
#else
            const int me = 0, nt = 1;
#endif
            prep(args, (int)((long)n * me / nt), (int)((long)n * (me + 1) / nt));
#if defined(_OPENMP)
#pragma omp barrier
#endif
        }
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int t = 0; t < tiles; t++) tile(args, t);
        if (done) done();
    }
}

static __attribute__((unused)) void for_tiles(int tiles, double work, void (*tile)(const void *, int),
                                              const void *args, void (*done)(void)) {
    for_tiles_prep(tiles, work, NULL, 0, tile, args, done);
}

static __attribute__((unused)) float *thread_scratch(size_t floats) {  /* a 64-byte aligned buffer per thread, grown as needed, never freed */
    static __thread float *buf = NULL;
    static __thread size_t cap = 0;
    if (floats > cap) {
        free(buf);
        buf = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        cap = buf ? floats : 0;
    }
    return buf;
}

#define ROWS_MAX_THREADS 64
#define ROWS_PARALLEL_WORK 8192.0  /* the elements (rows x width) from which for_rows shares rows among threads */
long lmf_rows_runs = 0;  /* norms and activations that shared their rows among threads (for tests) */

/* fn(a, y, r0, r1, tmp) over rows 0 .. n - 1 (each row independent, tmp: floats of scratch; the calling thread's is
   tmp0): parts of the rows shared among the calling thread's OpenMP team when work (rows x width) is large
   enough (16 SmolLM2 rows: a norm 6 us, an activation 20 us on one thread; the step's norms 0.37 -> 0.29 ms and
   activations 0.59 -> 0.37 ms). The same arithmetic per row on any number of threads. */
static void for_rows(int n, double work, size_t floats, void (*fn)(const void *, const void *, int, int, float *),
                     const void *a, const void *y, float *tmp0) {
#if defined(_OPENMP)
    int nt = omp_get_max_threads();
    nt = nt < ROWS_MAX_THREADS ? nt : ROWS_MAX_THREADS;
    if (lmf_parallel_ok && nt > 1 && n > 1 && !omp_in_parallel() && work >= ROWS_PARALLEL_WORK) {
        char failed[ROWS_MAX_THREADS] = {0};
        nt = nt < n ? nt : n;
        lmf_rows_runs++;
#pragma omp parallel num_threads(nt)
        {   /* the team may be smaller than asked: its threads take the parts in turn */
            const int me = omp_get_thread_num();
            float *t = me == 0 ? tmp0 : thread_scratch(floats);
            for (int i = me; i < nt; i += omp_get_num_threads()) {
                if (t)
                    fn(a, y, n * i / nt, n * (i + 1) / nt, t);
                else
                    failed[i] = 1;
            }
        }
        for (int i = 1; i < nt; i++)  /* no memory for a worker's scratch: its rows here */
            if (failed[i]) fn(a, y, n * i / nt, n * (i + 1) / nt, tmp0);
        return;
    }
#endif
    fn(a, y, 0, n, tmp0);
}

/* ---- residual add + norm -------------------------------------------------------------------- */

typedef struct {
    int32_t n, d, kind;            /* kind: 0 copy (no norm), 1 RMSNorm, 2 LayerNorm */
    int32_t y_bf, out_bf;
    int64_t y_stride, out_stride;  /* elements per row */
    float eps;
    float *x;                      /* the residual stream (n, d), float32 */
    const float *y_bias;           /* NULL or (d): added with y */
    const float *w, *b;            /* the norm's weight and bias (NULL: none) */
    void *out;                     /* norm(x) (n, out_stride) */
    float *tmp;                    /* d floats */
} norm_args;

/* Rows r0 .. r1 - 1: x += y (+ bias) when y is not NULL; then out = norm(x). t: d floats of scratch. */
static void add_norm_rows(const norm_args *a, const void *y, int r0, int r1, float *t) {
    const int d = a->d;
    for (int r = r0; r < r1; r++) {
        float *x = a->x + (size_t)r * d;
        if (y) {
            load_row(row_at((void *)y, a->y_bf, a->y_stride, r), a->y_bf, t, d);
            if (a->y_bias) {
#pragma omp simd
                for (int i = 0; i < d; i++) x[i] += t[i] + a->y_bias[i];
            } else {
#pragma omp simd
                for (int i = 0; i < d; i++) x[i] += t[i];
            }
        }
        if (a->kind == 1) {
            float ss = 0.f;
#pragma omp simd reduction(+ : ss)
            for (int i = 0; i < d; i++) ss += x[i] * x[i];
            const float inv = 1.0f / sqrtf(ss / d + a->eps);
#pragma omp simd
            for (int i = 0; i < d; i++) t[i] = x[i] * inv;
        } else if (a->kind == 2) {
            float s = 0.f, ss = 0.f;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < d; i++) s += x[i];
            const float mean = s / d;
#pragma omp simd reduction(+ : ss)
            for (int i = 0; i < d; i++) ss += (x[i] - mean) * (x[i] - mean);
            const float inv = 1.0f / sqrtf(ss / d + a->eps);
#pragma omp simd
            for (int i = 0; i < d; i++) t[i] = (x[i] - mean) * inv;
        } else {
            memcpy(t, x, (size_t)d * sizeof(float));
        }
        if (a->w) {
#pragma omp simd
            for (int i = 0; i < d; i++) t[i] *= a->w[i];
        }
        if (a->b) {
#pragma omp simd
            for (int i = 0; i < d; i++) t[i] += a->b[i];
        }
        store_row(row_at(a->out, a->out_bf, a->out_stride, r), a->out_bf, t, d);
    }
}

static void add_norm_part(const void *a, const void *y, int r0, int r1, float *t) {
    add_norm_rows(a, y, r0, r1, t);
}

void lmf_add_norm(const norm_args *a, const void *y) {
    for_rows(a->n, (double)a->n * a->d, (size_t)a->d, add_norm_part, a, y, a->tmp);
}

/* ---- rotary embedding, cache write, attention for one query per row ------------------------- */

typedef struct {
    int32_t n, nh, nkv, hd, rd, interleaved, max_len, y_bf, out_bf;
    int64_t y_stride, out_stride;
    float scale;
    const int32_t *pos;            /* (n): each row's new position (its key count before this token); < 0: skip */
    const int32_t *slot;           /* (n): each row's cache slot, or NULL: row r is slot r */
    const float *cos, *sin;        /* (positions, rd) rotary tables, or NULL: no rotation */
    const float *bias;             /* NULL or ((nh + 2 nkv) hd): the qkv projection's bias */
    float *k, *v;                  /* this layer's cache (slots, nkv, max_len, hd), float32 (or float16: kv_half) */
    void *out;                     /* (n, out_stride): the heads' outputs, nh * hd per row */
    float *tmp;                    /* attn_floats(a) floats */
    int32_t kv_half;               /* k and v hold IEEE float16 (lmf_kv_half_ok), not float32 */
    /* NULL, or (heads of 8 channels, float32 cache, lmf_kv_blocks_ok) the cache's keys and values again, transposed in
       blocks of 16 positions, read by rows alone in their slot (decoding): (ceil(max_len / 16), kvb_slots, nkv, 2, 8,
       16), block b of slot s and head g at ((b kvb_slots + s) nkv + g) 256, its keys' channel d at + 16 d, its
       values' at + 128 + 16 d (a slot's blocks spread over the whole copy: planes of max_len positions per slot had
       used a third of the L2 cache's sets); kvb_len (kvb_slots): positions of each slot copied so far (blocks_lower) */
    float *kvb;
    int32_t *kvb_len;
    int32_t kvb_slots;
} attn_args;

int lmf_kv_blocks_ok(void) {  /* whether lmf_attention reads attn_args.kvb here */
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    return 1;
#else
    return 0;
#endif
}

/* Before a call writes its rows' keys and values: a slot's copied positions from a row's position on are written
   again (a new prompt in the slot, a speculative step taken back), so they are copied again when next read. Run by
   the calling thread before any row (rows of one slot may be shared among threads). */
static void blocks_lower(const attn_args *a) {
    if (!a->kvb_len) return;
    for (int r = 0; r < a->n; r++) {
        const int t = a->pos[r], sl = a->slot ? a->slot[r] : r;
        if (t >= 0 && a->kvb_len[sl] > t) a->kvb_len[sl] = t;
    }
}

int lmf_kv_half_ok(void) {  /* whether lmf_attention keeps a float16 cache here (attn_args.kv_half) */
#if defined(__AVX512F__) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__) && defined(__F16C__)
#define HALF_MAX 65504.0f

/* n floats to float16 (rounded to nearest, ties to even, as NumPy's astype(float16); beyond float16's range clamped
   to +-65504, not made infinite: one such key would turn its row's attention into NaN) and back (exact). */
static void floats_to_halves(uint16_t *restrict dst, const float *restrict src, size_t n) {
    const __m512 hi = _mm512_set1_ps(HALF_MAX), lo = _mm512_set1_ps(-HALF_MAX);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {  /* (min/max return their second operand for a NaN: NaN stays NaN) */
        const __m512 x = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_loadu_ps(src + i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; i++) {
        const float x = src[i] > HALF_MAX ? HALF_MAX : (src[i] < -HALF_MAX ? -HALF_MAX : src[i]);
        dst[i] = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
}

static void halves_to_floats(float *restrict dst, const uint16_t *restrict src, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i < n; i++) dst[i] = _cvtsh_ss(src[i]);
}
#endif

static void rotate(float *x, const float *c, const float *s, int rd, int interleaved) {
    if (interleaved) {  /* pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) */
        for (int j = 0; j < rd; j += 2) {
            const float x0 = x[j], x1 = x[j + 1];
            x[j] = x0 * c[j] - x1 * s[j];
            x[j + 1] = x1 * c[j + 1] + x0 * s[j + 1];
        }
    } else {  /* halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) */
        const int h = rd / 2;
#pragma omp simd
        for (int j = 0; j < h; j++) {
            const float x1 = x[j], x2 = x[j + h];
            x[j] = x1 * c[j] - x2 * s[j];
            x[j + h] = x2 * c[j + h] + x1 * s[j + h];
        }
    }
}

#if defined(__AVX512F__)
/* 16 floats from element i of float32 or (half) float16 values: int4 scales and zeros, a float16 cache's values. */
static inline __attribute__((always_inline)) __m512 load16(const float *base, size_t i, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)))
                : _mm512_loadu_ps(base + i);
}

/* The sums of 16 vectors: lane b of the result is the sum of v[b]'s lanes (a transposing tree of shuffles). */
static inline __attribute__((always_inline)) __m512 sum16(const __m512 *v) {
    __m512 c[8], e[4], s[2];
    for (int k = 0; k < 8; k++)  /* c[k]: 128-bit lanes 0-1 key 2k, 2-3 key 2k+1 */
        c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++)  /* e[k]: lane i key 4k + i */
        e[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; k++)  /* s[k]: lane i floats 0-1 key 8k + i, 2-3 key 8k + 4 + i */
        s[k] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * k], e[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(e[2 * k], e[2 * k + 1], 0xEE));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], 0x88), _mm512_shuffle_ps(s[0], s[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);  /* r[4i+p]: key 4p+i */
    return _mm512_permutexvar_ps(order, r);
}

/* Scores of 16 keys K[0..15] (rows of hd floats, hd a multiple of 16) against q, times scale, into p[0..15]: the
   16 products as 16-lane partial sums, then one transposing tree of shuffles and adds sums all 16 at once (a
   horizontal sum per key took twice as long). */
static inline __attribute__((always_inline)) void scores16(const float *restrict q, const float *restrict K,
                                                             float scale, float *restrict p, const int hd) {
    __m512 v[16];
    for (int b = 0; b < 16; b++) {
        const float *kb = K + (size_t)b * hd;
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kb));
        for (int i = 16; i < hd; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(kb + i), acc);
        v[b] = acc;
    }
    _mm512_storeu_ps(p, _mm512_mul_ps(sum16(v), _mm512_set1_ps(scale)));
}
#endif

#if defined(__AVX512F__)
/* fast_expf on 16 lanes. */
static inline __m512 fast_exp16(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_FLOOR), _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_FLOOR)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f),
                                      _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x));
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(live, p, _mm512_castsi512_ps(e));
}
#endif

/* Softmax of the scores of the rep heads (p + h M, keys 0..t each), in place. With AVX512 the last partial block
   of 16 is masked (the compiler's scalar remainder of max and exp had been a fifth of the attention at 58 keys). */
static inline void softmax_rows(float *restrict p, int rep, int t, size_t M) {
    for (int h = 0; h < rep; h++) {
        float *ph = p + (size_t)h * M;
#if defined(__AVX512F__)
        const int n = t + 1, full = n / 16 * 16;
        const __mmask16 tail = (__mmask16)((1u << (n - full)) - 1u);
        __m512 vm = _mm512_set1_ps(-INFINITY), vs = _mm512_setzero_ps();
        for (int j = 0; j < full; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(ph + j));
        vm = _mm512_mask_max_ps(vm, tail, vm, _mm512_maskz_loadu_ps(tail, ph + full));
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
        for (int j = 0; j < full; j += 16) {
            const __m512 e = fast_exp16(_mm512_sub_ps(_mm512_loadu_ps(ph + j), mx));
            _mm512_storeu_ps(ph + j, e);
            vs = _mm512_add_ps(vs, e);
        }
        if (tail) {
            const __m512 x = _mm512_maskz_loadu_ps(tail, ph + full);
            const __m512 e = _mm512_maskz_mov_ps(tail, fast_exp16(_mm512_sub_ps(x, mx)));
            _mm512_mask_storeu_ps(ph + full, tail, e);
            vs = _mm512_add_ps(vs, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vs));
        for (int j = 0; j < full; j += 16) _mm512_storeu_ps(ph + j, _mm512_mul_ps(_mm512_loadu_ps(ph + j), inv));
        _mm512_mask_storeu_ps(ph + full, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, ph + full), inv));
#else
        float mx = -INFINITY, sum = 0.f;
        for (int j = 0; j <= t; j++) mx = ph[j] > mx ? ph[j] : mx;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j <= t; j++) {
            ph[j] = fast_expf(ph[j] - mx);
            sum += ph[j];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int j = 0; j <= t; j++) ph[j] *= inv;
#endif
    }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
/* Heads of 8 channels (stories260K): two keys fill a 16-lane register. Scores of 16 keys: eight products of a key
   pair with the query twice, summed by the transposing tree of scores16 (its first level adds the 4-lane halves of
   each key); outputs: each pair of values times its two weights, spread by a permutation, the halves added at the
   end. The loops vectorized across keys with strided loads took 1.7 us a row and layer at 58 keys. */
static void attend8(const float *restrict q, const float *restrict K, const float *restrict V, int t, int rep,
                    float scale, size_t M, float *restrict p, float *restrict o) {
    const int full = (t + 1) / 16 * 16;
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int h = 0; h < rep; h++) {
        const __m512 qq = _mm512_broadcast_f32x8(_mm256_loadu_ps(q + (size_t)h * 8));
        float *ph = p + (size_t)h * M;
        for (int j = 0; j < full; j += 16) {
            const float *kb = K + (size_t)j * 8;
            __m512 e[4], s[2];
            for (int k = 0; k < 4; k++) {  /* e[k]: 128-bit lane i holds 4 partial sums of key 4k + i */
                const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(kb + 32 * k), qq);       /* keys 4k, 4k+1 */
                const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(kb + 32 * k + 16), qq);  /* keys 4k+2, 4k+3 */
                e[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
            }
            for (int k = 0; k < 2; k++)
                s[k] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * k], e[2 * k + 1], 0x44),
                                     _mm512_shuffle_ps(e[2 * k], e[2 * k + 1], 0xEE));
            const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], 0x88), _mm512_shuffle_ps(s[0], s[1], 0xDD));
            _mm512_storeu_ps(ph + j, _mm512_mul_ps(_mm512_permutexvar_ps(order, r), _mm512_set1_ps(scale)));
        }
        for (int j = full; j <= t; j++) {
            const float *kj = K + (size_t)j * 8, *qh = q + (size_t)h * 8;
            float d = 0.f;
            for (int i = 0; i < 8; i++) d += qh[i] * kj[i];
            ph[j] = d * scale;
        }
    }
    softmax_rows(p, rep, t, M);
    for (int h = 0; h < rep; h++) {
        const float *ph = p + (size_t)h * M;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int j = 0; j < full; j += 16) {  /* four sums: one would wait for each multiply-add before the next */
            const __m512 w = _mm512_loadu_ps(ph + j);
            for (int k = 0; k < 8; k++) {  /* keys j + 2k, j + 2k + 1: their weights over lanes 0-7 and 8-15 */
                const __m512i pick = _mm512_set_epi32(2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1,
                                                      2 * k + 1, 2 * k + 1, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k,
                                                      2 * k, 2 * k);
                const __m512 v = _mm512_loadu_ps(V + (size_t)(j + 2 * k) * 8);
                acc[k & 3] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pick, w), v, acc[k & 3]);
            }
        }
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        __m256 out = _mm256_add_ps(_mm512_castps512_ps256(sum), _mm512_extractf32x8_ps(sum, 1));
        __m256 odd = _mm256_setzero_ps();
        int j = full;
        for (; j + 1 <= t; j += 2) {
            out = _mm256_fmadd_ps(_mm256_set1_ps(ph[j]), _mm256_loadu_ps(V + (size_t)j * 8), out);
            odd = _mm256_fmadd_ps(_mm256_set1_ps(ph[j + 1]), _mm256_loadu_ps(V + (size_t)(j + 1) * 8), odd);
        }
        if (j <= t) out = _mm256_fmadd_ps(_mm256_set1_ps(ph[j]), _mm256_loadu_ps(V + (size_t)j * 8), out);
        _mm256_storeu_ps(o + (size_t)h * 8, _mm256_add_ps(out, odd));
    }
}

/* Heads of 8 channels over the copy of the cache in blocks (attn_args.kvb: the keys of block b, channel d, positions
   16 b .. 16 b + 15 at kb + b bs + 16 d, the values' at + 128): a block's 16 scores are 8 multiply-adds of whole registers for each head, its values' part 8 more,
   the 16 sums of a pair of heads (8 channels each) one transposing tree at the end; no shuffle per key (attend8's
   trees and permutations took 45 % of a 16-row step of stories260K at 70 keys). Lanes past t in the last block are
   masked (never read from p, zero from the values). */
static void attend8_blocks(const float *restrict q, const float *restrict Kt, size_t bs, int t, int rep, float scale,
                     size_t M, float *restrict p, float *restrict o) {
    const int n = t + 1, nb = (n + 15) / 16;
    const __mmask16 last = (__mmask16)(0xFFFFu >> (16 * nb - n));
    const __m512 sc = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
    for (int h = 0; h < rep; h += 2) {
        const int two = h + 1 < rep;
        float *pa = p + (size_t)h * M, *pb = pa + M;  /* (pb not read or written for a last head alone) */
        __m512 qa[8], qb[8], ma = _mm512_set1_ps(-INFINITY), mb = ma;
        for (int d = 0; d < 8; d++) {
            qa[d] = _mm512_set1_ps(q[h * 8 + d]);
            qb[d] = two ? _mm512_set1_ps(q[h * 8 + 8 + d]) : zero;
        }
        for (int b = 0; b < nb; b++) {  /* the scores, and their largest */
            const float *kb = Kt + b * bs;
            __m512 a0 = _mm512_mul_ps(qa[0], _mm512_loadu_ps(kb)), b0 = _mm512_mul_ps(qb[0], _mm512_loadu_ps(kb));
            __m512 a1 = _mm512_mul_ps(qa[1], _mm512_loadu_ps(kb + 16)), b1 = _mm512_mul_ps(qb[1], _mm512_loadu_ps(kb + 16));
            for (int d = 2; d < 8; d += 2) {
                const __m512 k0 = _mm512_loadu_ps(kb + 16 * d), k1 = _mm512_loadu_ps(kb + 16 * d + 16);
                a0 = _mm512_fmadd_ps(qa[d], k0, a0);
                b0 = _mm512_fmadd_ps(qb[d], k0, b0);
                a1 = _mm512_fmadd_ps(qa[d + 1], k1, a1);
                b1 = _mm512_fmadd_ps(qb[d + 1], k1, b1);
            }
            const __mmask16 m = b + 1 < nb ? (__mmask16)0xFFFF : last;
            const __m512 sa = _mm512_mul_ps(_mm512_add_ps(a0, a1), sc), sb = _mm512_mul_ps(_mm512_add_ps(b0, b1), sc);
            _mm512_mask_storeu_ps(pa + 16 * b, m, sa);
            if (two) _mm512_mask_storeu_ps(pb + 16 * b, m, sb);
            ma = _mm512_mask_max_ps(ma, m, ma, sa);
            mb = _mm512_mask_max_ps(mb, m, mb, sb);
        }
        /* the values weighed by exp(score - largest), the weights summed alongside; divided by the sums at the end */
        const __m512 xa = _mm512_set1_ps(_mm512_reduce_max_ps(ma)), xb = _mm512_set1_ps(_mm512_reduce_max_ps(mb));
        __m512 acc[16], za = zero, zb = zero;
        for (int i = 0; i < 16; i++) acc[i] = zero;
        for (int b = 0; b < nb; b++) {
            const __mmask16 m = b + 1 < nb ? (__mmask16)0xFFFF : last;
            const __m512 wa = _mm512_maskz_mov_ps(m, fast_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, pa + 16 * b), xa)));
            const __m512 wb = two ? _mm512_maskz_mov_ps(m, fast_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, pb + 16 * b),
                                                                                  xb)))
                                  : zero;
            za = _mm512_add_ps(za, wa);
            zb = _mm512_add_ps(zb, wb);
            const float *vb = Kt + b * bs + 128;
            for (int d = 0; d < 8; d++) {
                const __m512 v = _mm512_maskz_loadu_ps(m, vb + 16 * d);
                acc[d] = _mm512_fmadd_ps(wa, v, acc[d]);
                acc[8 + d] = _mm512_fmadd_ps(wb, v, acc[8 + d]);
            }
        }
        const __m512 inv = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(za)),
                                                _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(zb)));
        _mm512_mask_storeu_ps(o + (size_t)h * 8, two ? (__mmask16)0xFFFF : (__mmask16)0xFF,
                              _mm512_mul_ps(sum16(acc), inv));
    }
}

/* Positions from .. to of one slot and head's keys and values K, V (positions of 8 floats) into its blocks from Kt
   (attend8_blocks; bs: floats from a block to the next). */
static void blocks_fill(float *restrict Kt, size_t bs, const float *restrict K, const float *restrict V, int from,
                        int to) {
    for (int j = from; j <= to; j++) {
        float *kb = Kt + (j >> 4) * bs + (j & 15);
        for (int d = 0; d < 8; d++) {
            kb[16 * d] = K[(size_t)j * 8 + d];
            kb[128 + 16 * d] = V[(size_t)j * 8 + d];
        }
    }
}
#endif

#if defined(__AVX512F__)
/* o (rep, hd) = the rep heads' weights p (h M + j) times the values V (t + 1, hd), the rep x hd / 16 sums in registers
   across the keys (they had been summed in memory, every output loaded and stored again for each key). The same
   multiply-adds in the same order. */
static inline __attribute__((always_inline)) void weigh_values(const float *restrict p, const float *restrict V, int t,
                                                                 size_t M, float *restrict o, const int rep,
                                                                 const int hd, const int half) {
    __m512 acc[16];
    const int w = hd / 16;
#pragma GCC unroll 16
    for (int i = 0; i < rep * w; i++) acc[i] = _mm512_setzero_ps();
    for (int j = 0; j <= t; j++) {
        __m512 vj[8];  /* value j (w <= 8 vectors) */
#pragma GCC unroll 8
        for (int i = 0; i < w; i++) vj[i] = load16(V, (size_t)j * hd + 16 * i, half);
#pragma GCC unroll 4
        for (int h = 0; h < rep; h++) {
            const __m512 wj = _mm512_set1_ps(p[(size_t)h * M + j]);
#pragma GCC unroll 8
            for (int i = 0; i < w; i++) acc[h * w + i] = _mm512_fmadd_ps(wj, vj[i], acc[h * w + i]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < rep * w; i++) _mm512_storeu_ps(o + 16 * i, acc[i]);
}
#endif

/* Attention of the rep query heads q (rep, hd) sharing one kv head over keys/values K, V (t + 1, hd): o (rep, hd).
   Inlined into a copy per common head size, so the loops over hd have a constant length (fully unrolled, one
   horizontal sum per key and head). p: rep * M floats of scratch. half (hd 64 or 128, attend_half_ok): K and V hold
   float16 values, the keys converted 16 at a time into kt (16 hd floats), the values read in place. */
static inline __attribute__((always_inline)) void attend(const float *restrict q, const float *restrict K,
                                                           const float *restrict V, int t, int rep, float scale,
                                                           size_t M, float *restrict p, float *restrict o,
                                                           const int hd, const int half, float *restrict kt) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if (hd == 8) {
        attend8(q, K, V, t, rep, scale, M, p, o);
        return;
    }
#endif
    if (hd <= 16) {  /* short heads: vectorized across keys (a horizontal sum per key costs more than the dot) */
        for (int h = 0; h < rep; h++) {
            const float *qh = q + (size_t)h * hd;
            float *ph = p + (size_t)h * M;
#pragma omp simd
            for (int j = 0; j <= t; j++) {
                const float *kj = K + (size_t)j * hd;
                float s = 0.f;
                for (int i = 0; i < hd; i++) s += qh[i] * kj[i];
                ph[j] = s * scale;
            }
        }
    } else {
        int j0 = 0;
        const float *Kt = K;  /* the keys from j0 on as floats (a float16 cache's converted into kt) */
#if defined(__AVX512F__)
        if (hd % 16 == 0) {
            j0 = (t + 1) / 16 * 16;
            Kt = K + (size_t)j0 * hd;
#if defined(__F16C__)
            if (half) {  /* float16 keys: each block of 16 converted once for the rep heads (read in place by each
                            head, a 1,024-token prefill was 10 % slower), the last ones short of 16 as well */
                for (int j = 0; j < j0; j += 16) {
                    halves_to_floats(kt, (const uint16_t *)K + (size_t)j * hd, 16 * hd);
                    for (int h = 0; h < rep; h++) scores16(q + (size_t)h * hd, kt, scale, p + (size_t)h * M + j, hd);
                }
                halves_to_floats(kt, (const uint16_t *)K + (size_t)j0 * hd, (t + 1 - j0) * hd);
                Kt = kt;
            } else
#endif
                for (int h = 0; h < rep; h++)
                    for (int j = 0; j < j0; j += 16)
                        scores16(q + (size_t)h * hd, K + (size_t)j * hd, scale, p + (size_t)h * M + j, hd);
        }
#endif
        for (int j = j0; j <= t; j++) {  /* each key read once for the rep heads */
            const float *kj = Kt + (size_t)(j - j0) * hd;
            for (int h = 0; h < rep; h++) {
                const float *qh = q + (size_t)h * hd;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int i = 0; i < hd; i++) s += qh[i] * kj[i];
                p[(size_t)h * M + j] = s * scale;
            }
        }
    }
    softmax_rows(p, rep, t, M);
#if defined(__AVX512F__)
    if (hd % 16 == 0 && hd <= 128) {  /* the rep heads' outputs held in registers across the keys */
        switch (rep * 16 + hd / 16) {
        case 16 + 4: weigh_values(p, V, t, M, o, 1, 64, half); return;
        case 32 + 4: weigh_values(p, V, t, M, o, 2, 64, half); return;
        case 48 + 4: weigh_values(p, V, t, M, o, 3, 64, half); return;
        case 64 + 4: weigh_values(p, V, t, M, o, 4, 64, half); return;
        case 16 + 8: weigh_values(p, V, t, M, o, 1, 128, half); return;
        case 32 + 8: weigh_values(p, V, t, M, o, 2, 128, half); return;
        default: break;
        }
    }
#endif
    memset(o, 0, (size_t)rep * hd * sizeof(float));
    for (int j = 0; j <= t; j++) {  /* outputs: each value read once for the rep heads */
        const float *vj = V + (size_t)j * hd;
        for (int h = 0; h < rep; h++) {
            const float w = p[(size_t)h * M + j];
            float *oh = o + (size_t)h * hd;
#pragma omp simd
            for (int i = 0; i < hd; i++) oh[i] += w * vj[i];
        }
    }
}

#define ATTEND_CASE(HD) \
    case HD: attend(q, K, V, t, rep, scale, M, p, o, HD, 0, NULL); break;

static void attend_any(const float *q, const float *K, const float *V, int t, int rep, float scale, size_t M,
                       float *p, float *o, int hd) {
    switch (hd) {
        ATTEND_CASE(8) ATTEND_CASE(16) ATTEND_CASE(32) ATTEND_CASE(64) ATTEND_CASE(80) ATTEND_CASE(96)
        ATTEND_CASE(128) ATTEND_CASE(256)
    default: attend(q, K, V, t, rep, scale, M, p, o, hd, 0, NULL);
    }
}

#if defined(__AVX512F__) && defined(__F16C__)
/* Whether attend reads a float16 cache itself for rep query heads of hd channels (its values' sums in registers);
   other shapes convert the keys and values to floats first. */
static int attend_half_ok(int rep, int hd) { return (hd == 64 && rep <= 4) || (hd == 128 && rep <= 2); }

/* attend over float16 keys and values Kh, Vh (attend_half_ok): the same arithmetic as over floats holding the same
   values. kt: 16 hd floats of scratch. */
static void attend_half(const float *q, const uint16_t *Kh, const uint16_t *Vh, int t, int rep, float scale, size_t M,
                        float *p, float *o, int hd, float *kt) {
    if (hd == 64)
        attend(q, (const float *)Kh, (const float *)Vh, t, rep, scale, M, p, o, 64, 1, kt);
    else
        attend(q, (const float *)Kh, (const float *)Vh, t, rep, scale, M, p, o, 128, 1, kt);
}
#endif

#define ROW_KV 1      /* attention_row: write the row's key and value into the cache */
#define ROW_ATTEND 2  /* and/or attend over the cache (its keys up to its own position written) */

/* Row r's part of attention (what: ROW_KV, ROW_ATTEND or both) for its kv heads g0 .. g1 - 1 (and their query heads);
   tmp: the scratch of one thread. copy: NULL, or a float32 copy of a float16 cache's keys and values of row r's slot
   (prompt_copy) to attend over. */
static void attention_heads(const attn_args *a, const void *y, int r, float *tmp, int what, const float *copy, int g0,
                            int g1) {
    const int nh = a->nh, nkv = a->nkv, hd = a->hd, rep = nh / nkv, width = (nh + 2 * nkv) * hd;
    const size_t M = (size_t)a->max_len;
    const int t = a->pos[r], sl = a->slot ? a->slot[r] : r;
    if (t < 0) return;  /* a padding row */
    float *row = tmp, *p = tmp + width, *o = p + (size_t)rep * M;
    load_row(row_at((void *)y, a->y_bf, a->y_stride, r), a->y_bf, row, width);
    if (a->bias) {
#pragma omp simd
        for (int i = 0; i < width; i++) row[i] += a->bias[i];
    }
    if (a->cos) {  /* the query heads (0 .. nh - 1) to attend, the key heads (nh .. nh + nkv - 1) to write */
        const float *c = a->cos + (size_t)t * a->rd, *s = a->sin + (size_t)t * a->rd;
        const int h0 = what & ROW_ATTEND ? 0 : nh, h1 = what & ROW_KV ? nh + nkv : nh;
        for (int h = h0; h < h1; h++) rotate(row + (size_t)h * hd, c, s, a->rd, a->interleaved);
    }
    char *out = row_at(a->out, a->out_bf, a->out_stride, r);
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    /* the cache in blocks: for a row alone in its slot (its positions copied up to its own, then read) */
    const int blocked = a->kvb && hd == 8 && !a->kv_half && !copy && (what & ROW_ATTEND) &&
                       (!a->slot || ((r == 0 || a->slot[r - 1] != sl) && (r + 1 == a->n || a->slot[r + 1] != sl)));
    const size_t bs = (size_t)a->kvb_slots * nkv * 256;
#endif
    for (int g = g0; g < g1; g++) {  /* the rep query heads of kv head g (heads g rep .. g rep + rep - 1) */
        const size_t at = ((size_t)sl * nkv + g) * M * hd;  /* this slot and head's keys in the cache */
        const float *q = row + (size_t)g * rep * hd;
        if (copy) {  /* (its keys and values written before the copy was made) */
            if (!(what & ROW_ATTEND)) continue;
            attend_any(q, copy + (size_t)g * M * hd, copy + (size_t)(nkv + g) * M * hd, t, rep, a->scale, M, p, o, hd);
        } else if (!a->kv_half) {
            if (what & ROW_KV) {
                memcpy(a->k + at + (size_t)t * hd, row + (size_t)(nh + g) * hd, (size_t)hd * sizeof(float));
                memcpy(a->v + at + (size_t)t * hd, row + (size_t)(nh + nkv + g) * hd, (size_t)hd * sizeof(float));
            }
            if (!(what & ROW_ATTEND)) continue;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
            if (blocked) {
                float *kb = a->kvb + ((size_t)sl * nkv + g) * 256;
                blocks_fill(kb, bs, a->k + at, a->v + at, a->kvb_len[sl], t);
                attend8_blocks(q, kb, bs, t, rep, a->scale, M, p, o);
            } else
#endif
                attend_any(q, a->k + at, a->v + at, t, rep, a->scale, M, p, o, hd);
        } else {
#if defined(__AVX512F__) && defined(__F16C__)
            uint16_t *Kh = (uint16_t *)a->k + at, *Vh = (uint16_t *)a->v + at;
            float *kf = o + (size_t)rep * hd, *vf = kf + M * hd;
            if (what & ROW_KV) {
                floats_to_halves(Kh + (size_t)t * hd, row + (size_t)(nh + g) * hd, hd);
                floats_to_halves(Vh + (size_t)t * hd, row + (size_t)(nh + nkv + g) * hd, hd);
            }
            if (!(what & ROW_ATTEND)) continue;
            if (attend_half_ok(rep, hd)) {  /* read by attend */
                attend_half(q, Kh, Vh, t, rep, a->scale, M, p, o, hd, kf);
            } else {  /* other shapes: the keys and values converted first */
                halves_to_floats(kf, Kh, (t + 1) * hd);
                halves_to_floats(vf, Vh, (t + 1) * hd);
                attend_any(q, kf, vf, t, rep, a->scale, M, p, o, hd);
            }
#else
            continue;  /* (never set here: lmf_kv_half_ok) */
#endif
        }
        store_row(out + (size_t)g * rep * hd * (a->out_bf ? 2 : 4), a->out_bf, o, rep * hd);
    }
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if (blocked) a->kvb_len[sl] = t + 1;  /* (heads of 8 channels: every head, see heads_shared) */
#endif
}

static void attention_row(const attn_args *a, const void *y, int r, float *tmp, int what, const float *copy) {
    attention_heads(a, y, r, tmp, what, copy, 0, a->nkv);
}

/* Rows r0 .. r1 - 1 in order, each writing its key and value before it attends. */
static void attention_rows(const attn_args *a, const void *y, int r0, int r1, float *tmp) {
    for (int r = r0; r < r1; r++) attention_row(a, y, r, tmp, ROW_KV | ROW_ATTEND, NULL);
}

#define PROMPT_COPY_ROWS 4  /* rows of one prompt from which a float16 cache is copied to floats (prompt_copy) */

/* A float16 cache, and rows that are all one prompt's (one slot, at least PROMPT_COPY_ROWS): scratch for a float32
   copy of the slot's keys and values (2 nkv x max_len x hd: keys of head g from g max_len hd, values from
   (nkv + g) max_len hd): the calling thread's thread_scratch, which lmf_attention does not otherwise use on it (its
   rows take attn_args.tmp); else (or without the memory) NULL. Each row had converted the keys it attends over: a
   1,024-token SmolLM2 prefill was 6 % slower than with a float32 cache, now as fast. */
static float *prompt_copy(const attn_args *a) {
    if (!a->kv_half || a->n < PROMPT_COPY_ROWS || !a->slot) return NULL;
    for (int r = 0; r < a->n; r++)
        if (a->pos[r] < 0 || a->slot[r] != a->slot[0]) return NULL;
    return thread_scratch(2 * (size_t)a->nkv * a->max_len * a->hd);
}

/* Part h (0 .. 2 nkv - 1: keys of head h, then values of head h - nkv) of the copy: positions 0 .. the rows' last. */
static void fill_copy(const attn_args *a, float *copy, int h) {
#if defined(__AVX512F__) && defined(__F16C__)
    int last = 0;
    for (int r = 0; r < a->n; r++) last = a->pos[r] > last ? a->pos[r] : last;
    const size_t plane = (size_t)a->max_len * a->hd, at = (size_t)a->slot[0] * a->nkv * plane;
    const uint16_t *src = (const uint16_t *)(h < a->nkv ? a->k : a->v) + at + (size_t)(h % a->nkv) * plane;
    halves_to_floats(copy + (size_t)h * plane, src, (last + 1) * a->hd);
#else
    (void)a, (void)copy, (void)h;
#endif
}

void *lmf_openmp(void) {  /* the OpenMP runtime's omp_get_max_threads as this library calls it, or NULL: no OpenMP */
#if defined(_OPENMP)
    return (void *)&omp_get_max_threads;
#else
    return NULL;
#endif
}

#if defined(_OPENMP)
/* Attention of several rows reads every row's keys and values once: 16 SmolLM2 rows at 150 keys are 110 MB a step,
   which one core streams at about 14 GB/s (7.9 ms). Rows are shared between the threads of the calling thread's
   OpenMP team (PyTorch's own pool: the library links the libgomp PyTorch loaded) when there is at least this much
   work (keys x query channels summed over the rows); see lmf_attention for the rows of one slot (a prompt). */
#define ATTN_PARALLEL_WORK 200000
#define ATTN_MAX_THREADS 64
#define ATTN_HEADS_WORK 50000  /* the same for a lone row's heads (heads_shared; from ~90 SmolLM2 keys) */

#endif

static size_t attn_floats(const attn_args *a) {  /* the scratch attention_rows takes (attn_args.tmp) */
    const size_t kv = a->kv_half ? 2 * (size_t)a->max_len * a->hd : 0;  /* a head's keys and values as floats */
    return (size_t)(a->nh + 2 * a->nkv) * a->hd + (size_t)(a->nh / a->nkv) * ((size_t)a->max_len + a->hd) + kv;
}

/* The work of rows 0 .. n - 1 (fixed + per_key (keys) a row, none for a padding row), and cut[0 .. nt]: thread k
   takes rows cut[k] .. cut[k + 1] - 1, about its share of the work, the rows of one slot together and in order
   unless any_cut. Returns the work; *parts: how many threads got rows (one: a single slot's rows). */
static double row_cuts(const attn_args *a, int n, int nt, double fixed, double per_key, int *cut, int *parts,
                       int any_cut) {
    double work = 0, done = 0;
    for (int r = 0; r < n; r++) work += a->pos[r] >= 0 ? fixed + per_key * (a->pos[r] + 1) : 0.0;
    int k = 1;
    cut[0] = 0;
    for (int r = 0; r < n && k < nt; r++) {
        const int sl = a->slot ? a->slot[r] : r, prev = r && a->slot ? a->slot[r - 1] : r - 1;
        if (r && (any_cut || sl != prev) && done >= work * k / nt) cut[k++] = r;
        done += a->pos[r] >= 0 ? fixed + per_key * (a->pos[r] + 1) : 0.0;
    }
    *parts = k;
    for (; k <= nt; k++) cut[k] = n;
    return work;
}

#if defined(_OPENMP)
/* Fewer rows than threads, each of its own slot, over long contexts (a lone decoding stream): their (row, kv head)
   pairs shared among up to nt threads, each pair whole on one thread (the same arithmetic as on one: every head is
   computed alone), instead of every row on the calling thread with the other cores idle. Not for heads of 8 channels
   over the blocked copy (its length is kept per row, after all of its heads). 1 when done. */
static int heads_shared(const attn_args *a, const void *y, int nt) {
    if (a->n >= nt || a->nkv < 2 || (a->kvb && a->hd == 8)) return 0;
    double work = 0;
    for (int r = 0; r < a->n; r++) {
        if (r && a->slot && a->slot[r] == a->slot[r - 1]) return 0;  /* a prompt's rows: in order, on one thread */
        work += a->pos[r] >= 0 ? a->pos[r] + 1.0 : 0.0;
    }
    if (work * a->nh * a->hd < ATTN_HEADS_WORK) return 0;
    const int units = a->n * a->nkv;
    nt = nt < units ? nt : units;
    const size_t floats = attn_floats(a);
    char failed[ATTN_MAX_THREADS] = {0};
    lmf_parallel_runs++;
#pragma omp parallel num_threads(nt)
    {
        const int me = omp_get_thread_num(), team = omp_get_num_threads();
        float *tmp = me == 0 ? a->tmp : thread_scratch(floats);
        for (int i = me; i < nt; i += team) {  /* the team may be smaller than asked: its threads take the parts */
            if (!tmp) {
                failed[i] = 1;
                continue;
            }
            for (int u = units * i / nt, end = units * (i + 1) / nt; u < end;) {  /* a row's run of heads per call */
                const int r = u / a->nkv, g0 = u % a->nkv, g1 = end - r * a->nkv < a->nkv ? end - r * a->nkv : a->nkv;
                attention_heads(a, y, r, tmp, ROW_KV | ROW_ATTEND, NULL, g0, g1);
                u = r * a->nkv + g1;
            }
        }
    }
    for (int i = 1; i < nt; i++)  /* no memory for a worker's scratch: its pairs here */
        if (failed[i])
            for (int u = a->n * a->nkv * i / nt; u < a->n * a->nkv * (i + 1) / nt; u++)
                attention_heads(a, y, u / a->nkv, a->tmp, ROW_KV | ROW_ATTEND, NULL, u % a->nkv, u % a->nkv + 1);
    return 1;
}
#endif

/* Rows in order, each writing its key and value before it attends: the tokens of one prompt as rows of one slot at
   consecutive positions are a causal prefill in one call. Shared among the threads: rows each of its own slot (batched
   decoding) in parts of whole rows; where a slot has several rows (a prefill), every row's key and value is written
   first (rows shared alike), then the rows attend in parts cut anywhere (a prompt's rows had all run on one thread:
   a 1,024-token SmolLM2 int4 prefill 1,010 -> 1,490 tokens/s); fewer rows than threads share their heads
   (heads_shared). */
void lmf_attention(const attn_args *a, const void *y) {
    blocks_lower(a);
    float *copy = prompt_copy(a);
#if defined(_OPENMP)
    int nt = omp_get_max_threads();
    nt = nt < ATTN_MAX_THREADS ? nt : ATTN_MAX_THREADS;
    if (lmf_parallel_ok && nt > 1 && !copy && !omp_in_parallel() && heads_shared(a, y, nt)) return;
    if (lmf_parallel_ok && nt > 1 && a->n > 1 && !omp_in_parallel()) {
        int shared = 0;  /* a slot with several rows */
        for (int r = 1; r < a->n && !shared; r++) shared = a->slot && a->slot[r] == a->slot[r - 1];
        int cut[ATTN_MAX_THREADS + 1], parts;
        const double work = row_cuts(a, a->n, nt, 0.0, 1.0, cut, &parts, shared);
        if (work * a->nh * a->hd >= ATTN_PARALLEL_WORK) {
            const size_t floats = attn_floats(a);
            char failed[ATTN_MAX_THREADS] = {0};
            int short_of_memory = 0;
            lmf_parallel_runs++;
#pragma omp parallel num_threads(nt)
            {   /* the team may be smaller than asked: its threads take the parts in turn */
                const int me = omp_get_thread_num();
                float *tmp = me == 0 ? a->tmp : thread_scratch(floats);
                if (shared) {
                    if (!tmp) {
#pragma omp atomic write
                        short_of_memory = 1;
                    }
#pragma omp barrier
                    if (!short_of_memory) {
#pragma omp for schedule(static)
                        for (int r = 0; r < a->n; r++) attention_row(a, y, r, tmp, ROW_KV, NULL);
                        if (copy) {
#pragma omp for schedule(static)
                            for (int h = 0; h < 2 * a->nkv; h++) fill_copy(a, copy, h);
                        }
                        for (int i = me; i < nt; i += omp_get_num_threads())
                            for (int r = cut[i]; r < cut[i + 1]; r++) attention_row(a, y, r, tmp, ROW_ATTEND, copy);
                    }
                } else {
                    for (int i = me; i < nt; i += omp_get_num_threads()) {
                        if (tmp)
                            attention_rows(a, y, cut[i], cut[i + 1], tmp);
                        else
                            failed[i] = 1;
                    }
                }
            }
            if (short_of_memory) {  /* no memory for a worker's scratch: every row here */
                attention_rows(a, y, 0, a->n, a->tmp);
                return;
            }
            for (int i = 1; i < nt; i++)  /* no memory for a worker's scratch: its rows here */
                if (failed[i]) attention_rows(a, y, cut[i], cut[i + 1], a->tmp);
            return;
        }
    }
#endif
    if (copy) {  /* one prompt's rows on this thread: keys and values written, copied, then attended over */
        for (int r = 0; r < a->n; r++) attention_row(a, y, r, a->tmp, ROW_KV, NULL);
        for (int h = 0; h < 2 * a->nkv; h++) fill_copy(a, copy, h);
        for (int r = 0; r < a->n; r++) attention_row(a, y, r, a->tmp, ROW_ATTEND, copy);
        return;
    }
    attention_rows(a, y, 0, a->n, a->tmp);
}

/* ---- the MLP's activation ------------------------------------------------------------------- */

typedef struct {
    int32_t n, f, gated, act, y_bf, out_bf;  /* act: 0 SiLU, 1 GELU (erf), 2 GELU (tanh), 3 ReLU */
    int64_t y_stride, out_stride;
    const float *bias;             /* NULL or the first projection's bias ((2 if gated else 1) f) */
    void *out;                     /* (n, out_stride) */
    float *tmp;                    /* 2 f floats */
} act_args;

static void activate(float *x, int n, int act) {
    switch (act) {
    case 0:
#pragma omp simd
        for (int i = 0; i < n; i++) x[i] = x[i] / (1.0f + fast_expf(-x[i]));
        break;
    case 1:
#pragma omp simd
        for (int i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
        break;
    case 2:
#pragma omp simd
        for (int i = 0; i < n; i++) {
            const float u = 0.79788456080286536f * (x[i] + 0.044715f * x[i] * x[i] * x[i]);
            x[i] = 0.5f * x[i] * (2.0f - 2.0f / (fast_expf(2.0f * u) + 1.0f));  /* 1 + tanh(u) */
        }
        break;
    default:
#pragma omp simd
        for (int i = 0; i < n; i++) x[i] = x[i] > 0.f ? x[i] : 0.f;
    }
}

/* Rows r0 .. r1 - 1: out = act(gate) * up for a gated MLP (y = [gate | up]), else act(y). t: 2 f floats. */
static void activation_rows(const act_args *a, const void *y, int r0, int r1, float *t) {
    const int f = a->f, width = a->gated ? 2 * f : f;
    for (int r = r0; r < r1; r++) {
        load_row(row_at((void *)y, a->y_bf, a->y_stride, r), a->y_bf, t, width);
        if (a->bias) {
#pragma omp simd
            for (int i = 0; i < width; i++) t[i] += a->bias[i];
        }
        activate(t, f, a->act);
        if (a->gated) {
#pragma omp simd
            for (int i = 0; i < f; i++) t[i] *= t[f + i];
        }
        store_row(row_at(a->out, a->out_bf, a->out_stride, r), a->out_bf, t, f);
    }
}

static void activation_part(const void *a, const void *y, int r0, int r1, float *t) {
    activation_rows(a, y, r0, r1, t);
}

void lmf_activation(const act_args *a, const void *y) {
    const double width = (a->gated ? 2.0 : 1.0) * a->f;
    for_rows(a->n, a->n * width, 2 * (size_t)a->f, activation_part, a, y, a->tmp);
}

/* ---- the int8 output projection's exact top candidates ---------------------------------------- */

typedef struct {
    int32_t n, N, K, k;            /* rows, outputs (vocabulary), inputs, candidates recomputed per row */
    int64_t y_stride;              /* elements per row of y (bfloat16) */
    const int8_t *q;               /* (N, K) int8 weight, one scale per output */
    const float *scales, *bias;    /* (N), and NULL or (N) */
    const float *x;                /* (n, K) the projection's float32 input */
    float *out;                    /* (n, N) logits */
    int32_t *idx;                  /* k ints of scratch */
} head_args;

/* out = float(y) + bias, then the k largest entries of each row recomputed exactly from x and the int8 rows
   ((q * scale) . x, as dequantize + matmul computes it): y comes from a bfloat16 kernel, whose rounding (steps of
   0.125 near 25) ties and swaps the top candidates of greedy decoding. The k largest are found in one pass: blocks
   of 16 with no entry above the current k-th largest are skipped. Rows of a large vocabulary are shared among the
   threads. */
static void refine_row(const head_args *a, const void *y, int r, int k, int32_t *idx) {
    const int N = a->N, K = a->K;
    float *o = a->out + (size_t)r * N;
    if (y) {  /* NULL: out already holds the approximate logits, bias included (lmf_head_vnni) */
        const bf16_t *yr = (const bf16_t *)y + (size_t)r * a->y_stride;
#pragma omp simd
        for (int j = 0; j < N; j++) o[j] = bf16_to_f32(yr[j]);
        if (a->bias) {
#pragma omp simd
            for (int j = 0; j < N; j++) o[j] += a->bias[j];
        }
    }
    if (k <= 0) return;
    int low = 0;  /* position in idx of the smallest kept entry */
    for (int c = 0; c < k; c++) {
        idx[c] = c;
        if (o[c] < o[idx[low]]) low = c;
    }
    float floor = o[idx[low]];
    for (int j0 = k; j0 < N; j0 += 16) {
        const int j1 = j0 + 16 < N ? j0 + 16 : N;
#if defined(__AVX512F__)
        const __mmask16 live = (__mmask16)(j1 - j0 == 16 ? 0xFFFFu : (1u << (j1 - j0)) - 1u);
        if (!_mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, o + j0), _mm512_set1_ps(floor), _CMP_GT_OQ))
            continue;  /* nothing above the floor in this block */
#else
        float bm = o[j0];
        for (int j = j0 + 1; j < j1; j++) bm = o[j] > bm ? o[j] : bm;
        if (!(bm > floor)) continue;
#endif
        for (int j = j0; j < j1; j++) {
            if (o[j] > floor) {
                idx[low] = j;
                low = 0;
                for (int c = 1; c < k; c++)
                    if (o[idx[c]] < o[idx[low]]) low = c;
                floor = o[idx[low]];
            }
        }
    }
    const float *x = a->x + (size_t)r * K;
    for (int c = 0; c < k; c++) {
        const int j = idx[c];
        const int8_t *qj = a->q + (size_t)j * K;
        const float s = a->scales[j];
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int i = 0; i < K; i++) acc += ((float)qj[i] * s) * x[i];
        o[j] = a->bias ? acc + a->bias[j] : acc;
    }
}

#define REFINE_LOCAL 256  /* candidates a row may keep on its thread's stack (more: rows in turn in a->idx) */

void lmf_head_refine(const head_args *a, const void *y) {
    const int k = a->k < a->N ? a->k : a->N;
#if defined(_OPENMP)
    if (lmf_parallel_ok && a->n > 1 && k <= REFINE_LOCAL && (double)a->n * a->N >= INT4_PARALLEL_WORK &&
        !omp_in_parallel()) {  /* rows shared among threads (a small vocabulary's rows stay here) */
        lmf_parallel_runs++;
#pragma omp parallel for schedule(static)
        for (int r = 0; r < a->n; r++) {
            int32_t idx[REFINE_LOCAL];
            refine_row(a, y, r, k, idx);
        }
        return;
    }
#endif
    for (int r = 0; r < a->n; r++) refine_row(a, y, r, k, a->idx);
}

/* ---- small float32 products, and the whole step in one call ----------------------------------- */

typedef struct {
    int32_t n, K, N, Np;           /* rows, inputs, outputs, outputs padded to a multiple of 16 */
    int64_t x_stride;              /* elements per input row */
    const float *x;                /* (n, x_stride) */
    const float *wt;               /* (K, Np): the weight transposed, zero past N */
    const float *bias;             /* NULL or (Np), zero past N */
    float *out;                    /* (n, Np) */
} lin_args;

int lmf_linear_fast(void) {  /* whether lmf_linear has its vector kernel here */
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
/* Rows r0 .. r0 + R - 1, outputs j0 .. j0 + 16 NB - 1: R x NB accumulators, each weight load used by R rows. */
static inline __attribute__((always_inline)) void lin_block(const lin_args *a, int r0, int j0, const int R,
                                                            const int NB) {
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++)
            acc[r][b] = a->bias ? _mm512_loadu_ps(a->bias + j0 + 16 * b) : _mm512_setzero_ps();
    const float *w = a->wt + j0;
    for (int k = 0; k < a->K; k++, w += a->Np) {
        __m512 wk[4];
        for (int b = 0; b < NB; b++) wk[b] = _mm512_loadu_ps(w + 16 * b);
        for (int r = 0; r < R; r++) {
            const __m512 xr = _mm512_set1_ps(a->x[(size_t)(r0 + r) * a->x_stride + k]);
            for (int b = 0; b < NB; b++) acc[r][b] = _mm512_fmadd_ps(xr, wk[b], acc[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) _mm512_storeu_ps(a->out + (size_t)(r0 + r) * a->Np + j0 + 16 * b, acc[r][b]);
}

#define LIN_ROWS(R)                                                                   \
    for (; j + 64 <= a->Np; j += 64) lin_block(a, r, j, R, 4);                        \
    switch ((a->Np - j) / 16) {                                                       \
    case 3: lin_block(a, r, j, R, 3); break;                                          \
    case 2: lin_block(a, r, j, R, 2); break;                                          \
    case 1: lin_block(a, r, j, R, 1); break;                                          \
    }
#endif

/* Rows r0 .. r1 - 1 of out = x W^T (+ bias), float32, for products small enough that a framework's call costs more
   than the arithmetic (stories260K: 64 x 128 weights; PyTorch's F.linear took 5-10 us a call, most of a step of 21
   of them). */
static void linear_rows(const lin_args *a, int r0, int r1) {
#if defined(__AVX512F__)
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        int j = 0;
        LIN_ROWS(4)
    }
    for (; r < r1; r++) {
        int j = 0;
        LIN_ROWS(1)
    }
#else
    for (int r = r0; r < r1; r++) {
        float *o = a->out + (size_t)r * a->Np;
        for (int j = 0; j < a->Np; j++) o[j] = a->bias ? a->bias[j] : 0.f;
        for (int k = 0; k < a->K; k++) {
            const float xk = a->x[(size_t)r * a->x_stride + k];
            const float *w = a->wt + (size_t)k * a->Np;
#pragma omp simd
            for (int j = 0; j < a->Np; j++) o[j] += xk * w[j];
        }
    }
#endif
}

void lmf_linear(const lin_args *a) { linear_rows(a, 0, a->n); }

typedef struct {
    int32_t n_layer;
    const norm_args *first;        /* the first norm (reads the embedded tokens in x) */
    const lin_args *const *lin;    /* 4 per layer: qkv, proj, fc1, fc2 */
    const attn_args *const *attn;  /* per layer */
    const norm_args *const *norm2; /* per layer: + proj, then the MLP's norm */
    const act_args *const *act;    /* per layer */
    const norm_args *const *after; /* per layer: + fc2, then the next layer's norm (or the final one) */
    const lin_args *head;          /* the output projection */
    int64_t *top;                  /* NULL, or (n): each row's argmax of its logits (as lmf_argmax_rows), found by
                                      the thread that wrote them: read later from another core's cache, 16 rows of
                                      stories260K took 12 us instead of 2 */
} step_args;

void lmf_argmax_rows(const float *x, int64_t n, int64_t v, int64_t stride, int64_t *out);

/* Rows r0 .. r1 - 1 of a whole step (rows are independent but for the rows of one slot, kept together and in
   order); norm, act and attn: scratch of d, 2 f and attn->tmp's floats, or NULL: the args' own. */
static void step_rows(const step_args *s, int r0, int r1, float *norm, float *act, float *attn) {
    add_norm_rows(s->first, NULL, r0, r1, norm ? norm : s->first->tmp);
    for (int i = 0; i < s->n_layer; i++) {
        const lin_args *const *l = s->lin + 4 * i;
        linear_rows(l[0], r0, r1);
        attention_rows(s->attn[i], l[0]->out, r0, r1, attn ? attn : s->attn[i]->tmp);
        linear_rows(l[1], r0, r1);
        add_norm_rows(s->norm2[i], l[1]->out, r0, r1, norm ? norm : s->norm2[i]->tmp);
        linear_rows(l[2], r0, r1);
        activation_rows(s->act[i], l[2]->out, r0, r1, act ? act : s->act[i]->tmp);
        linear_rows(l[3], r0, r1);
        add_norm_rows(s->after[i], l[3]->out, r0, r1, norm ? norm : s->after[i]->tmp);
    }
    linear_rows(s->head, r0, r1);
    if (s->top)
        lmf_argmax_rows(s->head->out + (size_t)r0 * s->head->Np, r1 - r0, s->head->N, s->head->Np, s->top + r0);
}

#if defined(_OPENMP)
/* Multiply-adds from which a step of several rows is shared among the threads: the rows of a small model take a few
   microseconds each (stories260K: 257k multiply-adds, about 10 us), a parallel region's hand-off a few more. */
#define STEP_PARALLEL_WORK 400000.0
#endif

/* A whole decoding step when every product is an lmf_linear: one call, no interpreter between the layers. Rows are
   shared among the calling thread's OpenMP team (each thread takes its rows through every layer, no waiting between
   them) when there is enough work; the rows of one slot (a prompt's tokens) stay together, in order. The arithmetic
   per row is the same on any number of threads: the logits and cache do not depend on it. */
static void step_lower(const step_args *s) {  /* blocks_lower of every layer */
    for (int i = 0; i < s->n_layer; i++) blocks_lower(s->attn[i]);
}

void lmf_step(const step_args *s) {
    const int n = s->first->n;
    step_lower(s);
#if defined(_OPENMP)
    int nt = omp_get_max_threads();
    nt = nt < ATTN_MAX_THREADS ? nt : ATTN_MAX_THREADS;
    if (lmf_parallel_ok && nt > 1 && n > 1 && !omp_in_parallel()) {
        const attn_args *a = s->attn[0];
        double row = s->head->K * (double)s->head->Np;  /* multiply-adds a row */
        for (int k = 0; k < 4 * s->n_layer; k++) row += s->lin[k]->K * (double)s->lin[k]->Np;
        int cut[ATTN_MAX_THREADS + 1], parts;
        const double work = row_cuts(a, n, nt, row, 2.0 * a->nh * a->hd * s->n_layer, cut, &parts, 0);
        if (work >= STEP_PARALLEL_WORK) {
            if (parts == 1) {  /* a single slot's rows (a prompt): on this thread, no parallel region */
                step_rows(s, 0, n, NULL, NULL, NULL);
                return;
            }
            const size_t d = (size_t)s->first->d, f2 = 2 * (size_t)s->act[0]->f, at = attn_floats(a);
            char failed[ATTN_MAX_THREADS] = {0};
            lmf_parallel_runs++;
#pragma omp parallel num_threads(nt)
            {   /* the team may be smaller than asked: its threads take the parts in turn */
                const int me = omp_get_thread_num();
                float *tmp = me == 0 ? NULL : thread_scratch(d + f2 + at);
                for (int i = me; i < nt; i += omp_get_num_threads()) {
                    if (me == 0)
                        step_rows(s, cut[i], cut[i + 1], NULL, NULL, NULL);
                    else if (tmp)
                        step_rows(s, cut[i], cut[i + 1], tmp, tmp + d, tmp + d + f2);
                    else
                        failed[i] = 1;
                }
            }
            for (int i = 1; i < nt; i++)  /* no memory for a worker's scratch: its rows here */
                if (failed[i]) step_rows(s, cut[i], cut[i + 1], NULL, NULL, NULL);
            return;
        }
    }
#endif
    step_rows(s, 0, n, NULL, NULL, NULL);
}

/* ---- a step on a thread of its own -----------------------------------------------------------------
   lmf_step_start hands a whole step (lmf_step's rows) to a background thread and returns at once; lmf_step_join
   waits for its end. Meanwhile the caller (the serving engine's loop) reports the tokens of the step before, which
   the step does not need: the step on one core and the interpreter on the other. The rows are taken BG_CHUNK_ROWS at
   a time (rows are independent in a decoding step: one per slot), by the thread and then by the caller in
   lmf_step_join, which computes the rows not yet taken instead of waiting: a step begun as the caller goes on runs
   on both cores once the caller joins, with no OpenMP team (libgomp's worker spins between parallel regions, and on
   two cores took one from the background thread). Both sides wait by yielding the core (others may take it) for up
   to BG_SPIN_NS, then asleep: on this 2-core virtual machine a sleeping thread took 250-400 us to wake, longer than
   a step of stories260K. One step at a time per process: a start while one runs is refused; a join returns once no
   started step is running. A forked child starts a thread of its own. Not for prefill steps (a prompt's rows
   attend to each other's keys, in order). */
#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#include <time.h>

#define BG_SPIN_NS 2000000L

static struct {
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    const step_args *s;
    int state;      /* 0: idle, 1: a step to run or running, 2: its step ended */
    int sleeping;   /* the thread waits on `go` */
    int joining;    /* callers wait on `done` */
    pid_t pid;      /* the process whose thread it is (0: none yet) */
    int chunks;     /* the step's rows in chunks of BG_CHUNK_ROWS */
    int finished;   /* chunks computed */
    uint32_t gen;   /* steps started so far */
    uint64_t claim; /* gen << 32 | lo << 16 | hi: chunks lo .. hi - 1 not taken yet (the thread takes lo, a joining
                       caller hi - 1: each row mostly on one core from step to step, its keys and values in its cache) */
    long began, ended; /* CLOCK_MONOTONIC ns: the last step's start and the end of its last chunk */
} bg = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0};

#define BG_CHUNK_ROWS 4  /* rows a taker computes at a time (lmf_linear's blocks of 4 rows) */

static pthread_once_t bg_once = PTHREAD_ONCE_INIT;

static void bg_forked(void) {  /* in a forked child: no thread yet, the lock and conditions new */
    pthread_mutex_init(&bg.mu, NULL);
    pthread_cond_init(&bg.go, NULL);
    pthread_cond_init(&bg.done, NULL);
    bg.state = bg.sleeping = bg.joining = bg.chunks = bg.finished = 0;
    bg.gen = 0;
    bg.claim = 0;
    bg.began = bg.ended = 0;
    bg.pid = 0;
}

static void bg_at_fork(void) { pthread_atfork(NULL, NULL, bg_forked); }

static long bg_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Takes chunks of the step under way and computes them until none is left (scratch: NULL, the args' own, for the
   background thread; a joining caller's thread_scratch); whoever computes the last chunk ends the step. A chunk is
   taken only of the step whose args were read (its generation in the claim); the thread's from the first rows on, a
   caller's (scratch given) from the last. Returns that generation. */
static uint32_t bg_take(float *norm, float *act, float *attn) {
    const int back = norm != NULL;
    pthread_mutex_lock(&bg.mu);
    const step_args *s = bg.s;
    const uint32_t gen = bg.gen;
    const int chunks = bg.chunks, live = bg.state == 1;
    pthread_mutex_unlock(&bg.mu);
    if (!live) return gen;
    const int n = s->first->n;
    uint64_t claim = __atomic_load_n(&bg.claim, __ATOMIC_ACQUIRE);
    while ((uint32_t)(claim >> 32) == gen && ((claim >> 16) & 0xFFFF) < (claim & 0xFFFF)) {
        const uint64_t next = back ? claim - 1 : claim + (1u << 16);
        if (!__atomic_compare_exchange_n(&bg.claim, &claim, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue;  /* (claim reloaded) */
        const int c = back ? (int)(claim & 0xFFFF) - 1 : (int)((claim >> 16) & 0xFFFF);
        const int r0 = c * BG_CHUNK_ROWS, r1 = r0 + BG_CHUNK_ROWS < n ? r0 + BG_CHUNK_ROWS : n;
        step_rows(s, r0, r1, norm, act, attn);
        if (__atomic_add_fetch(&bg.finished, 1, __ATOMIC_ACQ_REL) == chunks) {
            const long now = bg_now_ns();
            pthread_mutex_lock(&bg.mu);
            bg.ended = now;
            __atomic_store_n(&bg.state, 2, __ATOMIC_RELEASE);
            if (bg.joining) pthread_cond_broadcast(&bg.done);
            pthread_mutex_unlock(&bg.mu);
        }
        claim = __atomic_load_n(&bg.claim, __ATOMIC_ACQUIRE);
    }
    return gen;
}

static int bg_new(uint32_t seen) {  /* a step not yet taken by the thread is under way */
    return __atomic_load_n(&bg.state, __ATOMIC_ACQUIRE) == 1 && __atomic_load_n(&bg.gen, __ATOMIC_ACQUIRE) != seen;
}

static void *bg_main(void *unused) {
    (void)unused;
    uint32_t seen = 0;
    for (;;) {
        const long until = bg_now_ns() + BG_SPIN_NS;
        for (int i = 1; !bg_new(seen); i++) {
            if ((i & 7) == 0 && bg_now_ns() > until) {
                pthread_mutex_lock(&bg.mu);
                bg.sleeping = 1;
                while (!(bg.state == 1 && bg.gen != seen)) pthread_cond_wait(&bg.go, &bg.mu);
                bg.sleeping = 0;
                pthread_mutex_unlock(&bg.mu);
                break;
            }
            sched_yield();
        }
        seen = bg_take(NULL, NULL, NULL);
    }
    return NULL;
}

int lmf_step_thread_ok(void) { return 1; }  /* whether lmf_step_start has a background thread here */

/* Starts step s on the background thread (made at first use). 0, or -1: a step is running (or no thread could be
   made); nothing started. */
int lmf_step_start(const step_args *s) {
    pthread_once(&bg_once, bg_at_fork);
    pthread_mutex_lock(&bg.mu);
    if (bg.pid != getpid()) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, bg_main, NULL);
        pthread_attr_destroy(&attr);
        if (failed) {
            pthread_mutex_unlock(&bg.mu);
            return -1;
        }
        bg.pid = getpid();
    }
    if (bg.state == 1) {
        pthread_mutex_unlock(&bg.mu);
        return -1;
    }
    step_lower(s);
    bg.began = bg_now_ns();
    bg.s = s;
    bg.chunks = (s->first->n + BG_CHUNK_ROWS - 1) / BG_CHUNK_ROWS;
    bg.finished = 0;
    const uint32_t gen = bg.gen + 1;
    __atomic_store_n(&bg.claim, (uint64_t)gen << 32 | (uint64_t)bg.chunks, __ATOMIC_RELEASE);
    __atomic_store_n(&bg.gen, gen, __ATOMIC_RELEASE);
    __atomic_store_n(&bg.state, 1, __ATOMIC_RELEASE);
    if (bg.sleeping) pthread_cond_signal(&bg.go);
    pthread_mutex_unlock(&bg.mu);
    return 0;
}

/* Returns once no started step is running (at once when none is); meanwhile computes the chunks the thread has not
   taken (with scratch of its own). */
void lmf_step_join(void) {
    if (__atomic_load_n(&bg.state, __ATOMIC_ACQUIRE) == 1) {
        pthread_mutex_lock(&bg.mu);
        const step_args *s = bg.s;
        pthread_mutex_unlock(&bg.mu);
        const size_t d = (size_t)s->first->d, f2 = 2 * (size_t)s->act[0]->f;
        float *tmp = thread_scratch(d + f2 + attn_floats(s->attn[0]));
        if (tmp) bg_take(tmp, tmp + d, tmp + d + f2);
    }
    const long until = bg_now_ns() + BG_SPIN_NS;
    for (int i = 1; __atomic_load_n(&bg.state, __ATOMIC_ACQUIRE) == 1 && ((i & 7) || bg_now_ns() < until); i++)
        sched_yield();
    pthread_mutex_lock(&bg.mu);
    bg.joining++;
    while (bg.state == 1) pthread_cond_wait(&bg.done, &bg.mu);
    bg.joining--;
    bg.state = 0;
    pthread_mutex_unlock(&bg.mu);
}

/* Seconds from the start of the last step begun to the end of its computation (call after lmf_step_join, whose lock
   ordered both writes before it; no lock here: called holding the interpreter's): the time it was under way,
   whenever the caller joined it. */
double lmf_step_seconds(void) {
    const long d = __atomic_load_n(&bg.ended, __ATOMIC_ACQUIRE) - __atomic_load_n(&bg.began, __ATOMIC_ACQUIRE);
    return d > 0 ? d * 1e-9 : 0.0;
}
#else
double lmf_step_seconds(void) { return 0.0; }
int lmf_step_thread_ok(void) { return 0; }
int lmf_step_start(const step_args *s) {  /* no background thread here: the caller runs lmf_step itself */
    (void)s;
    return -1;
}
void lmf_step_join(void) {}
#endif

/* ---- float32 products of up to 64 rows against large weights ------------------------------------ */

typedef struct {
    int32_t n, K, N;               /* rows, inputs, outputs */
    int64_t x_stride, out_stride;  /* elements per row */
    const float *x;                /* (n, x_stride) */
    const float *w;                /* (N, K) row-major: the layer's own weight, read in place */
    const float *bias;             /* NULL or (N) */
    float *out;                    /* (n, out_stride) */
} gemv_args;

int lmf_gemv_ok(int K) {  /* whether lmf_gemv has its vector kernel for rows of K inputs here */
#if defined(__AVX512F__)
    return K % 16 == 0;
#else
    (void)K;
    return 0;
#endif
}

#if defined(__AVX512F__)
#define GEMM_TILE 32      /* outputs per tile, the unit shared among threads (SmolLM2's 576 outputs: 18 tiles, 9 each) */

/* Rows r0 .. r0 + R - 1 (R <= 4) against weight rows j0 .. j0 + 3: 4 R accumulators over K (each weight load used
   by R rows, each input load by 4 outputs), summed by one tree: lane 4 r + j holds row r, output j. */
static inline __attribute__((always_inline)) void gemm_block(const gemv_args *a, int r0, int j0, const int R,
                                                             const float *ahead, const int mask) {
    const int K = a->K;
    __m512 acc[16];
    for (int b = 0; b < 16; b++) acc[b] = _mm512_setzero_ps();
    const float *w = a->w + (size_t)j0 * K, *x = a->x + (size_t)r0 * a->x_stride;
    for (int k = 0; k < K; k += 16) {
        __m512 wk[4];
        if (ahead)  /* the next weight rows (those of mask), while this block computes */
            for (int j = 0; j < 4; j++)
                if (mask >> j & 1) _mm_prefetch((const char *)(ahead + (size_t)j * K + k), _MM_HINT_T1);
        for (int j = 0; j < 4; j++) wk[j] = _mm512_loadu_ps(w + (size_t)j * K + k);
        for (int r = 0; r < R; r++) {
            const __m512 xr = _mm512_loadu_ps(x + (size_t)r * a->x_stride + k);
            for (int j = 0; j < 4; j++) acc[4 * r + j] = _mm512_fmadd_ps(xr, wk[j], acc[4 * r + j]);
        }
    }
    float sums[16];
    _mm512_storeu_ps(sums, sum16(acc));
    const __m128 bias = a->bias ? _mm_loadu_ps(a->bias + j0) : _mm_setzero_ps();
    for (int r = 0; r < R; r++)
        _mm_storeu_ps(a->out + (size_t)(r0 + r) * a->out_stride + j0, _mm_add_ps(_mm_loadu_ps(sums + 4 * r), bias));
}

static inline int pass_mask(int p, int passes) {  /* the weight rows (of 4) pass p of passes prefetches */
    int m = 0;
    for (int j = 0; j < 4; j++) m |= (j % (passes < 4 ? passes : 4) == p) << j;
    return m;
}

static void gemm_tile(const void *args, int t) {  /* outputs t GEMM_TILE .. (to N / 4 * 4) of every row */
    const gemv_args *a = args;
    const int end = a->N / 4 * 4, j1 = (t + 1) * GEMM_TILE < end ? (t + 1) * GEMM_TILE : end;
    for (int j = t * GEMM_TILE; j < j1; j += 4) {
        /* the next block's weight rows are prefetched while this one computes, spread over the passes of rows */
        const float *ahead = j + 8 <= end ? a->w + (size_t)(j + 4) * a->K : NULL;
        const int passes = (a->n + 3) / 4;
        int r = 0, p = 0;
        for (; r + 4 <= a->n; r += 4, p++) gemm_block(a, r, j, 4, ahead, pass_mask(p, passes));
        switch (a->n - r) {
        case 3: gemm_block(a, r, j, 3, ahead, pass_mask(p, passes)); break;
        case 2: gemm_block(a, r, j, 2, ahead, pass_mask(p, passes)); break;
        case 1: gemm_block(a, r, j, 1, ahead, pass_mask(p, passes)); break;
        }
    }
}
#endif

/* out = x W^T (+ bias) for rows of a float32 model's decoding step (or a short prefill), the weight read in place:
   blocks of 4 rows x 4 outputs (gemm_block), tiles of outputs shared among the threads, the next block's weight
   rows prefetched into L2 while a block computes (spread over its passes of rows). One row is bound by memory
   bandwidth, many rows by arithmetic. benchmarks/bench_gemv.py (SmolLM2's block weights, 2 threads) against
   PyTorch's (MKL's) product: one row 15.1 ms against 16.5 (the earlier one-thread kernel took twice MKL's time),
   16 rows 22.5 against 39.1, 64 rows 60.9 against 63.2; 128 rows 108.5 against 99.4 (MKL's blocking wins there). */
void lmf_gemv(const gemv_args *a) {
#if defined(__AVX512F__)
    const int K = a->K, N = a->N, full = N / 4 * 4;
    for_tiles((full + GEMM_TILE - 1) / GEMM_TILE, (double)a->n * N * K, gemm_tile, a, NULL);
    for (int j = full; j < N; j++) {
        const float *wj = a->w + (size_t)j * K;
        for (int r = 0; r < a->n; r++) {
            const float *x = a->x + (size_t)r * a->x_stride;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < K; i++) s += x[i] * wj[i];
            a->out[(size_t)r * a->out_stride + j] = a->bias ? s + a->bias[j] : s;
        }
    }
#else
    (void)a;
#endif
}

/* ---- AMX tiles ----------------------------------------------------------------------------------------- */

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AMX_TILE__) && \
    defined(__AMX_INT8__) && defined(__linux__)
#define LMF_AMX 1
/* AMX (Intel's tile matrix unit: eight tiles of up to 16 rows x 64 bytes, and int8 dot products of whole tiles) for
   the int8 and int4 products of several rows: the integer sums of each group of 32 inputs that the VNNI kernels
   form with vpdpbusd come from one tile instruction for 16 rows x 16 outputs, then the same float arithmetic in the
   same order, so the results are bitwise the VNNI kernels' (at any row count, as rows computed alone). */
int lmf_amx = 0;  /* the OS lets this process use AMX tiles (lmf_amx_init); 0 keeps lmf_int4 on AVX512-VNNI */

int lmf_amx_init(void) {  /* asks Linux for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM); 1 when granted */
    lmf_amx = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return lmf_amx;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

static __thread int amx_rows_set = 0;  /* the M this thread's tiles are configured for during a for_tiles; 0: none */

/* Tiles 0, 1: M rows x 32 bytes (activations); 2, 3: 8 x 64 (weights); 4-7: M x 64 (int32 results), unless the
   thread's tiles are already so. */
static void amx_configure(int M) {
    if (amx_rows_set == M) return;
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = t == 2 || t == 3 ? 8 : M;
        c.colsb[t] = t < 2 ? 32 : 64;
    }
    _tile_loadconfig(&c);
    amx_rows_set = M;
}

/* for_tiles' done() for tile work: each thread releases its tiles when its share is done, so no tile state is left
   on the thread for other code (PyTorch's oneDNN uses the tiles too), nor taken from it. */
static void amx_done(void) {
    if (amx_rows_set) _tile_release();
    amx_rows_set = 0;
}

#else
int lmf_amx = 0;
int lmf_amx_init(void) { return 0; }
#endif
/* The weight of the next tile of outputs (jb + 1, the same thread's next under a static schedule) is fetched into the
   cache a piece per block while this tile computes: in a decoding step the weights come from memory, and the hardware
   prefetcher did not keep the tiles fed (SmolLM2 int4, 16 rows: the head 1.48 -> 0.90 ms, a step 11.9 -> 10.8 ms;
   one row 2.88 -> 2.67 ms). */
#define PREFETCH_NEXT(p, bytes)                                                                                      \
    do {                                                                                                             \
        for (int pf_i = 0; pf_i < (bytes); pf_i += 64) _mm_prefetch((const char *)(p) + pf_i, _MM_HINT_T0);          \
    } while (0)
#define AMX_MIN_ROWS 5  /* rows from which lmf_int4 and lmf_head_vnni take the tiles: SmolLM2 int4 steps of 5, 6 and 7
                           rows 4.85, 5.33, 6.49 ms on VNNI, 4.70, 4.86, 5.71 on the tiles; of 4 rows VNNI's 3.9-4.1
                           against 4.5 */

/* ---- the int8 output projection for several rows: int8 activations, AVX512-VNNI ------------------ */

typedef struct {
    int32_t n, N, K;               /* rows, outputs (a multiple of 16), inputs (a multiple of 32) */
    const int8_t *qi;              /* (N / 16, K / 4, 16, 4): the int8 weight interleaved for vpdpbusd */
    const int32_t *qsum;           /* (N / 16, K / 32, 16): 128 x the sum of each weight row over each group of 32
                                      inputs (activations are shifted by 128 to be unsigned) */
    const float *scales, *bias;    /* (N), and NULL or (N) */
    const float *x;                /* (n, K) float32 */
    float *out;                    /* (n, N) */
    uint8_t *xq;                   /* n K bytes of scratch */
    float *xs;                     /* n K / 32 floats of scratch */
} vnni_args;

int lmf_vnni_ok(void) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
/* Outputs jb * 16 .. + 15 of rows r0 .. r0 + R - 1: each 64-byte block of the weight (16 outputs x 4 inputs) read
   once for the R rows; per group of 32 inputs the integer sums are scaled by the group's activation scale. */
static inline __attribute__((always_inline)) void vnni_rows(const vnni_args *a, int jb, int r0, const int R) {
    const int K4 = a->K / 4, G = a->K / 32;
    const int32_t *xq = (const int32_t *)a->xq;
    const int8_t *w = a->qi + (size_t)jb * K4 * 64;
    const int32_t *qs = a->qsum + (size_t)jb * G * 16;
    __m512 accf[8];
    for (int r = 0; r < R; r++) accf[r] = _mm512_setzero_ps();
    const char *next = (const char *)(w + (size_t)K4 * 64);  /* the next tile's weight (see PREFETCH_NEXT) */
    const int pf = r0 == 0 && jb + 1 < a->N / 16;
    for (int g = 0; g < G; g++) {
        __m512i acc[8];
        if (pf) PREFETCH_NEXT(next + (size_t)g * 512, 512);
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
        for (int k = 8 * g; k < 8 * g + 8; k++) {
            const __m512i wk = _mm512_loadu_si512((const void *)(w + (size_t)k * 64));
            for (int r = 0; r < R; r++)
                acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(xq[(size_t)(r0 + r) * K4 + k]), wk);
        }
        const __m512i q = _mm512_loadu_si512((const void *)(qs + (size_t)g * 16));
        for (int r = 0; r < R; r++)
            accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], q)),
                                      _mm512_set1_ps(a->xs[(size_t)(r0 + r) * G + g]), accf[r]);
    }
    const __m512 sc = _mm512_loadu_ps(a->scales + (size_t)jb * 16);
    const __m512 b = a->bias ? _mm512_loadu_ps(a->bias + (size_t)jb * 16) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++)
        _mm512_storeu_ps(a->out + (size_t)(r0 + r) * a->N + (size_t)jb * 16, _mm512_fmadd_ps(accf[r], sc, b));
}

static void vnni_tile(const void *args, int jb) {  /* every row of outputs jb * 16 .. + 15 */
    const vnni_args *a = args;
    int r = 0;
    for (; r + 8 <= a->n; r += 8) vnni_rows(a, jb, r, 8);
    if (r + 4 <= a->n) { vnni_rows(a, jb, r, 4); r += 4; }
    if (r + 3 == a->n) {  /* three rows in one pass over the weight (2 + 1: two) */
        vnni_rows(a, jb, r, 3);
        return;
    }
    if (r + 2 <= a->n) { vnni_rows(a, jb, r, 2); r += 2; }
    if (r < a->n) vnni_rows(a, jb, r, 1);
}

#if defined(LMF_AMX)
/* vnni_rows on AMX tiles for rows r0 .. r0 + M - 1 (M <= 16): per group of 32 inputs, the rows' activations (a tile
   of M x 32 bytes) times the weight's 8 x 64 bytes as stored (tdpbusd), groups two at a time in turn (tiles 0, 2, 4
   and 1, 3, 5) so one group's tile products run while the one before it is scaled. */
static inline __attribute__((always_inline)) void head_amx_rows(const vnni_args *a, int jb, int r0, const int M,
                                                                int32_t *c) {
    const int K = a->K, G = K / 32;
    const int8_t *w = a->qi + (size_t)jb * (K / 4) * 64;
    const int32_t *qs = a->qsum + (size_t)jb * G * 16;
    const uint8_t *x = a->xq + (size_t)r0 * K;
    __m512 accf[16];
#pragma GCC unroll 16
    for (int r = 0; r < M; r++) accf[r] = _mm512_setzero_ps();
    amx_configure(M);
#define HEAD_GROUP(g, A, B, C, buf)                          \
    do {                                                     \
        _tile_loadd(A, x + 32 * (size_t)(g), K);             \
        _tile_loadd(B, w + (size_t)(g) * 512, 64);           \
        _tile_zero(C);                                       \
        _tile_dpbusd(C, A, B);                               \
        _tile_stored(C, (buf), 64);                          \
    } while (0)
#define HEAD_DONE(g, buf)                                                                                      \
    do {                                                                                                       \
        const __m512i q = _mm512_loadu_si512((const void *)(qs + (size_t)(g) * 16));                          \
        _Pragma("GCC unroll 16") for (int r = 0; r < M; r++) accf[r] = _mm512_fmadd_ps(                        \
            _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512((buf) + 16 * r), q)),                       \
            _mm512_set1_ps(a->xs[(size_t)(r0 + r) * G + (g)]), accf[r]);                                       \
    } while (0)
    int g = 0;
    const char *next = (const char *)(w + (size_t)K / 4 * 64);  /* the next tile's weight (see PREFETCH_NEXT) */
    const int pf = r0 == 0 && jb + 1 < a->N / 16;
    for (; g + 2 <= G; g += 2) {
        if (pf) PREFETCH_NEXT(next + (size_t)g * 512, 1024);
        HEAD_GROUP(g, 0, 2, 4, c);
        if (g) HEAD_DONE(g - 1, c + 256);
        HEAD_GROUP(g + 1, 1, 3, 5, c + 256);
        HEAD_DONE(g, c);
    }
    if (g < G) {
        HEAD_GROUP(g, 0, 2, 4, c);
        if (g) HEAD_DONE(g - 1, c + 256);
        HEAD_DONE(g, c);
    } else if (G) {
        HEAD_DONE(G - 1, c + 256);
    }
#undef HEAD_GROUP
#undef HEAD_DONE
    const __m512 sc = _mm512_loadu_ps(a->scales + (size_t)jb * 16);
    const __m512 b = a->bias ? _mm512_loadu_ps(a->bias + (size_t)jb * 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < M; r++)
        _mm512_storeu_ps(a->out + (size_t)(r0 + r) * a->N + (size_t)jb * 16, _mm512_fmadd_ps(accf[r], sc, b));
}

static void head_amx_tile(const void *args, int jb) {  /* every row of outputs jb * 16 .. + 15 */
    const vnni_args *a = args;
    int32_t *c = (int32_t *)(uint8_t *)thread_scratch(2048 / 4);
    if (!c) {
        vnni_tile(args, jb);
        return;
    }
    int r = 0;
    for (; r + 16 <= a->n; r += 16) head_amx_rows(a, jb, r, 16, c);
    if (r < a->n) head_amx_rows(a, jb, r, a->n - r, c);
}
#endif
#endif

/* out = x W^T + bias with x quantized to int8 in groups of 32 inputs (scale max|x| / 127 per group, as llama.cpp's
   Q8 blocks) and int32 dot products: several rows of the int8 output projection, where PyTorch's int8 kernel with
   bfloat16 activations reached 126 GFLOP/s (SmolLM2, 16 rows). Approximate like that kernel: lmf_head_refine (y
   NULL) then recomputes each row's top candidates exactly. */
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
static void vnni_quantize(const void *args, int r0, int r1) {  /* rows r0 .. r1 - 1 of lmf_head_vnni's activations */
    const vnni_args *a = args;
    const int K = a->K, G = K / 32;
    for (int r = r0; r < r1; r++) {
        for (int g = 0; g < G; g++) {
            const float *x = a->x + (size_t)r * K + 32 * g;
            float m = 0.f;
            for (int i = 0; i < 32; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
            const float s = m > 0.f ? m / 127.0f : 1.0f, inv = 1.0f / s;
            a->xs[(size_t)r * G + g] = s;
            uint8_t *q = a->xq + (size_t)r * K + 32 * g;
#pragma omp simd
            for (int i = 0; i < 32; i++) q[i] = (uint8_t)((int)__builtin_rintf(x[i] * inv) + 128);
        }
    }
}
#endif

void lmf_head_vnni(const vnni_args *a) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    const double work = (double)a->n * a->N * a->K;
#if defined(LMF_AMX)
    if (lmf_amx && a->n >= AMX_MIN_ROWS) {
        for_tiles_prep(a->N / 16, work, vnni_quantize, a->n, head_amx_tile, a, amx_done);
        return;
    }
#endif
    for_tiles_prep(a->N / 16, work, vnni_quantize, a->n, vnni_tile, a, NULL);
#else
    (void)a;
#endif
}

/* ---- int4 products with integer dot products, AVX512-VNNI ------------------------------------------------- */

typedef struct {
    int32_t n, N, K, G;            /* rows, outputs (a multiple of 16), inputs (padded: a multiple of 32), group size
                                      (a multiple of 32) */
    int64_t x_stride, out_stride;  /* in floats */
    const uint8_t *w;              /* (N / 16, K / 32, 4, 64): see lmf_int4 */
    const float *scales, *zeros;   /* (N / 16, K / G, 16), float32 or float16 (half); zeros NULL: symmetric */
    const float *x;                /* (n, x_stride) float32, K used (padding columns zero) */
    float *out;                    /* (n, out_stride) */
    int8_t *xq;                    /* 2 n K bytes of scratch: per row and block of 32 inputs, two int8 parts */
    float *xs;                     /* 3 n K / 32 floats of scratch */
    int32_t half;                  /* scales and zeros are float16 (each value exact: the same products) */
} i4_args;


#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* Outputs jb * 16 .. + 15 for rows r0 .. r0 + R - 1: each block of 32 inputs x 16 outputs (256 bytes, two 4-bit
   levels a byte) is unpacked once for the R rows, whose dot products run side by side (one chain of dependent
   vpdpbusd per row was bound by their latency: 11.2 against 9.0 ms for SmolLM2's products at 16 rows). */
static inline __attribute__((always_inline)) void i4_rows(const i4_args *a, int jb, int r0, const int R) {
    const int nb = a->K / 32, gb = a->G / 32, ng = a->K / a->G;
    const uint8_t *w = a->w + (size_t)jb * nb * 256;
    const float *sc = a->scales, *zr = a->zeros;  /* this tile's from element jb ng 16 on */
    const size_t p0 = (size_t)jb * ng * 16;
    const int half = a->half;
    const __m512i low = _mm512_set1_epi8(0x0F), f254 = _mm512_set1_epi32(254);
    const size_t rs = (size_t)nb * 64;  /* bytes from one row's block to the next row's */
    __m512 acc[4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const char *next = (const char *)(w + (size_t)nb * 256);  /* the next tile's levels (see PREFETCH_NEXT) */
    const int pf = r0 == 0 && jb + 1 < a->N / 16;
    for (int b = 0; b < nb; b++) {
        __m512i q[8], d[4], e[4];
        if (pf) PREFETCH_NEXT(next + (size_t)b * 256, 256);
        for (int m = 0; m < 4; m++) {
            const __m512i v = _mm512_loadu_si512((const void *)(w + (size_t)b * 256 + 64 * m));
            q[m] = _mm512_and_si512(v, low);                          /* inputs 4m .. 4m + 3 */
            q[m + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);  /* inputs 16 + 4m .. 16 + 4m + 3 */
        }
        const int32_t *x0 = (const int32_t *)(a->xq + ((size_t)r0 * nb + b) * 64);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) d[r] = e[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int m = 0; m < 8; m++) {
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const int32_t *xr = x0 + r * rs / 4;
                d[r] = _mm512_dpbusd_epi32(d[r], q[m], _mm512_set1_epi32(xr[m]));      /* the coarse part */
                e[r] = _mm512_dpbusd_epi32(e[r], q[m], _mm512_set1_epi32(xr[8 + m]));  /* the fine part */
            }
        }
        const __m512 s = load16(sc, p0 + (size_t)(b / gb) * 16, half);
        const __m512 z = zr ? load16(zr, p0 + (size_t)(b / gb) * 16, half) : _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            /* 254 x the coarse dot plus the fine one: |sum| < 2^24, exact in float */
            const __m512i dd = _mm512_add_epi32(_mm512_mullo_epi32(d[r], f254), e[r]);
            const float *p = a->xs + ((size_t)(r0 + r) * nb + b) * 3;  /* scale, 8 scale sum(levels), sum(x) */
            const __m512 t = _mm512_fmsub_ps(_mm512_set1_ps(p[0]), _mm512_cvtepi32_ps(dd), _mm512_set1_ps(p[1]));
            acc[r] = _mm512_fmadd_ps(s, t, acc[r]);
            if (zr) acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(p[2]), acc[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
        _mm512_storeu_ps(a->out + (size_t)(r0 + r) * a->out_stride + (size_t)jb * 16, acc[r]);
}

static void i4_tile(const void *args, int jb) {  /* every row of outputs jb * 16 .. + 15 */
    const i4_args *a = args;
    int r = 0;
    for (; r + 4 <= a->n; r += 4) i4_rows(a, jb, r, 4);
    if (r + 3 == a->n) {  /* three rows in one pass over the levels (2 + 1: two) */
        i4_rows(a, jb, r, 3);
        return;
    }
    if (r + 2 <= a->n) { i4_rows(a, jb, r, 2); r += 2; }
    if (r < a->n) i4_rows(a, jb, r, 1);
}
#endif

#if defined(LMF_AMX)
/* lmf_int4 on AMX tiles: per block of 32 inputs, the levels of 16 outputs (the layout above, unpacked to a byte a
   level: a tile of 8 rows x 64 bytes) times up to 16 rows' coarse and fine parts (two tiles of rows x 32 bytes) are
   two tdpbsud (signed activations, unsigned levels). */

/* Float arithmetic of one block for rows r0 .. r0 + M - 1 from the tiles' int32 results, as i4_rows does it:
   254 coarse + fine is an integer below 2^24, exact in float whichever way it is formed. */
static inline __attribute__((always_inline)) void amx_combine(const i4_args *a, const int32_t *cc, const int32_t *cf,
                                                              int b, int r0, const int M, __m512 *acc, __m512 s,
                                                              __m512 z, const int zeros) {
    const int nb = a->K / 32;
    const __m512 f254 = _mm512_set1_ps(254.0f);
#pragma GCC unroll 16
    for (int r = 0; r < M; r++) {
        const __m512 dd = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cc + 16 * r)), f254,
                                          _mm512_cvtepi32_ps(_mm512_load_si512(cf + 16 * r)));
        const float *p = a->xs + ((size_t)(r0 + r) * nb + b) * 3;
        const __m512 t = _mm512_fmsub_ps(_mm512_set1_ps(p[0]), dd, _mm512_set1_ps(p[1]));
        acc[r] = _mm512_fmadd_ps(s, t, acc[r]);
        if (zeros) acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(p[2]), acc[r]);
    }
}

/* Outputs jb * 16 .. + 15 of rows r0 .. r0 + M - 1 (M <= 16) from the unpacked levels lv (nb x 512 bytes). Two
   blocks in flight: block b's tile products (tiles 4, 5 or 6, 7) run while block b - 1's results are combined. */
static inline __attribute__((always_inline)) void amx_rows(const i4_args *a, int jb, int r0, const int M,
                                                           const uint8_t *lv, int32_t *c, const int zeros) {
    const int nb = a->K / 32, gb = a->G / 32, ng = a->K / a->G;
    const float *sc = a->scales, *zr = a->zeros;  /* this tile's from element jb ng 16 on */
    const size_t p0 = (size_t)jb * ng * 16;
    const int half = a->half;
    const int8_t *x = a->xq + (size_t)r0 * nb * 64;
    const size_t stride = (size_t)nb * 64;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
    amx_configure(M);
#define AMX_PRODUCT(b, C0, C1, BT)                                                     \
    do {                                                                               \
        _tile_loadd(0, x + (size_t)(b) * 64, stride);                                  \
        _tile_loadd(1, x + (size_t)(b) * 64 + 32, stride);                             \
        _tile_loadd(BT, lv + (size_t)(b) * 512, 64);                                   \
        _tile_zero(C0);                                                                \
        _tile_zero(C1);                                                                \
        _tile_dpbsud(C0, 0, BT);                                                       \
        _tile_dpbsud(C1, 1, BT);                                                       \
    } while (0)
#define AMX_STORE(C0, C1, buf)                                                         \
    do {                                                                               \
        _tile_stored(C0, (buf), 64);                                                   \
        _tile_stored(C1, (buf) + 256, 64);                                             \
    } while (0)
#define AMX_DONE(b, buf)                                                               \
    amx_combine(a, (buf), (buf) + 256, (b), r0, M, acc, load16(sc, p0 + (size_t)((b) / gb) * 16, half), \
                zeros ? load16(zr, p0 + (size_t)((b) / gb) * 16, half) : _mm512_setzero_ps(), zeros)
    /* two blocks in flight: block b's tile products are issued before block b - 1's results are combined (5-8 %
       faster at 16 and 64 rows than one block at a time) */
    AMX_PRODUCT(0, 4, 5, 2);
    AMX_STORE(4, 5, c);
    int b = 1;  /* here block b - 1's results are in c */
    const char *next = (const char *)(a->w + (size_t)(jb + 1) * nb * 256);  /* (see PREFETCH_NEXT) */
    const int pf = r0 == 0 && jb + 1 < a->N / 16;
    for (; b + 2 <= nb; b += 2) {
        if (pf) PREFETCH_NEXT(next + (size_t)(b - 1) * 256, 512);
        AMX_PRODUCT(b, 6, 7, 3);
        AMX_DONE(b - 1, c);
        AMX_STORE(6, 7, c + 512);
        AMX_PRODUCT(b + 1, 4, 5, 2);
        AMX_DONE(b, c + 512);
        AMX_STORE(4, 5, c);
    }
    if (b < nb) {
        AMX_PRODUCT(b, 6, 7, 3);
        AMX_DONE(b - 1, c);
        AMX_STORE(6, 7, c + 512);
        AMX_DONE(b, c + 512);
    } else {
        AMX_DONE(b - 1, c);
    }
#undef AMX_PRODUCT
#undef AMX_STORE
#undef AMX_DONE
#pragma GCC unroll 16
    for (int r = 0; r < M; r++)
        _mm512_storeu_ps(a->out + (size_t)(r0 + r) * a->out_stride + (size_t)jb * 16, acc[r]);
}

static void amx_tile(const void *args, int jb) {  /* every row of outputs jb * 16 .. + 15 */
    const i4_args *a = args;
    const int nb = a->K / 32;
    uint8_t *lv = (uint8_t *)thread_scratch(((size_t)nb * 512 + 4096) / 4);
    if (!lv) {  /* no memory for the unpacked levels: the VNNI kernel */
        i4_tile(args, jb);
        return;
    }
    int32_t *c = (int32_t *)(lv + (size_t)nb * 512);  /* two blocks' results: 2 x (2 x 16 x 16) int32 */
    const uint8_t *w = a->w + (size_t)jb * nb * 256;
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++)  /* rows m and 4 + m of the block's tile: inputs 4m .. and 16 + 4m .. */
        for (int m = 0; m < 4; m++) {
            const __m512i v = _mm512_loadu_si512((const void *)(w + (size_t)b * 256 + 64 * m));
            _mm512_store_si512((void *)(lv + (size_t)b * 512 + 64 * m), _mm512_and_si512(v, low));
            _mm512_store_si512((void *)(lv + (size_t)b * 512 + 256 + 64 * m),
                               _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
        }
    int r = 0;
    if (a->zeros) {
        for (; r + 16 <= a->n; r += 16) amx_rows(a, jb, r, 16, lv, c, 1);
        if (r < a->n) amx_rows(a, jb, r, a->n - r, lv, c, 1);
    } else {
        for (; r + 16 <= a->n; r += 16) amx_rows(a, jb, r, 16, lv, c, 0);
        if (r < a->n) amx_rows(a, jb, r, a->n - r, lv, c, 0);
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* Sixteen vectors reduced to one: lane j the reduction of v[j] over its 16 lanes, the lanes paired as
   _mm512_reduce_add_ps pairs them (i with i + 8, then i + 4, i + 2 and i + 1; each operand on the side GCC puts it),
   so that float sums are the same bit for bit; a tree of 15 operations for 16 vectors instead of 16 trees. */
#define TREE16(NAME, V, OP, TOPS, FROMPS)                                                                            \
    static inline __attribute__((always_inline)) V NAME(const V *v) {                                              \
        __m512 u[8], w[4], x[2];                                                                                   \
        for (int k = 0; k < 8; k++) {                                                                              \
            const __m512 a = TOPS(v[2 * k]), b = TOPS(v[2 * k + 1]);                                               \
            u[k] = TOPS(OP(FROMPS(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2))),                            \
                           FROMPS(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)))));                          \
        }                                                                                                          \
        for (int k = 0; k < 4; k++)                                                                                \
            w[k] = TOPS(OP(FROMPS(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1))),          \
                           FROMPS(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)))));        \
        for (int k = 0; k < 2; k++)                                                                                \
            x[k] = TOPS(OP(FROMPS(_mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0))),             \
                           FROMPS(_mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)))));           \
        const __m512 y = TOPS(OP(FROMPS(_mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0))),                   \
                                 FROMPS(_mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)))));                 \
        /* lane 4 q + k holds vector 4 k + q */                                                                    \
        return FROMPS(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), \
                                            y));                                                                   \
    }
#define PS_SAME(x) (x)
TREE16(tree16_add_ps, __m512, _mm512_add_ps, PS_SAME, PS_SAME)
TREE16(tree16_max_ps, __m512, _mm512_max_ps, PS_SAME, PS_SAME)
TREE16(tree16_add_epi32, __m512i, _mm512_add_epi32, _mm512_castsi512_ps, _mm512_castps_si512)
#undef PS_SAME
#undef TREE16

/* Rows r0 .. r1 - 1 of lmf_int4's activations, sixteen blocks of 32 inputs at a time: their largest magnitudes and
   sums found by one tree each (the same numbers as a reduction per block), their scales divided as vectors (the same
   IEEE quotients), then each block's two parts, packed to bytes by two packs and a permutation (four vpmovsdb
   before). A step of 16 SmolLM2 rows at 70 keys 9.05-9.25 -> 8.69-8.97 ms, where the quantization had taken ~1.1. */
static void i4_quantize(const void *args, int r0, int r1) {
    const i4_args *a = args;
    const int nb = a->K / 32;
    const __m512 zero = _mm512_setzero_ps();
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int r = r0; r < r1; r++) {
        const float *xr = a->x + (size_t)r * a->x_stride;
        for (int b0 = 0; b0 < nb; b0 += 16) {
            const int n = nb - b0 < 16 ? nb - b0 : 16;
            __m512 mx[16], sx[16];
            for (int j = 0; j < 16; j++) {
                if (j < n) {
                    const __m512 x0 = _mm512_loadu_ps(xr + 32 * (b0 + j)), x1 = _mm512_loadu_ps(xr + 32 * (b0 + j) + 16);
                    mx[j] = _mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1));
                    sx[j] = _mm512_add_ps(x0, x1);
                } else {
                    mx[j] = sx[j] = zero;
                }
            }
            const __m512 m = tree16_max_ps(mx), sum_x = tree16_add_ps(sx);
            const __mmask16 pos = _mm512_cmp_ps_mask(m, zero, _CMP_GT_OQ);
            const __m512 d = _mm512_div_ps(m, _mm512_set1_ps(127.0f));
            float dv[16], iv[16], i2[16];
            _mm512_storeu_ps(dv, d);
            _mm512_storeu_ps(iv, _mm512_maskz_div_ps(pos, _mm512_set1_ps(127.0f), m));
            _mm512_storeu_ps(i2, _mm512_maskz_div_ps(pos, _mm512_set1_ps(254.0f * 127.0f), m));
            __m512i is[16];
            for (int j = 0; j < 16; j++) {
                if (j >= n) {
                    is[j] = _mm512_setzero_si512();
                    continue;
                }
                const float *x = xr + 32 * (b0 + j);
                const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
                const __m512 dj = _mm512_set1_ps(dv[j]), inv = _mm512_set1_ps(iv[j]), inv2 = _mm512_set1_ps(i2[j]);
                const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), c1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
                const __m512i f0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_fnmadd_ps(dj, _mm512_cvtepi32_ps(c0), x0), inv2));
                const __m512i f1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_fnmadd_ps(dj, _mm512_cvtepi32_ps(c1), x1), inv2));
                /* c0, c1, f0, f1 as bytes (rounding: to nearest, ties to even; saturated to int8 through int16 as
                   vpmovsdb saturates): the packs leave each 128-bit lane L holding the four sources' elements
                   4 L .. 4 L + 3, a dword each, put in order by one permutation */
                const __m512i packed = _mm512_packs_epi16(_mm512_packs_epi32(c0, c1), _mm512_packs_epi32(f0, f1));
                _mm512_storeu_si512((void *)(a->xq + ((size_t)r * nb + b0 + j) * 64),
                                    _mm512_permutexvar_epi32(order, packed));
                is[j] = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_add_epi32(c0, c1), _mm512_set1_epi32(254)),
                                         _mm512_add_epi32(f0, f1));
            }
            const __m512 p0 = _mm512_div_ps(d, _mm512_set1_ps(254.0f));  /* d / 254, then 8 (d / 254) (254 c + f) */
            const __m512 p1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(8.0f), p0),
                                            _mm512_cvtepi32_ps(tree16_add_epi32(is)));
            float v0[16], v1[16], v2[16];
            _mm512_storeu_ps(v0, p0);
            _mm512_storeu_ps(v1, p1);
            _mm512_storeu_ps(v2, sum_x);
            float *p = a->xs + ((size_t)r * nb + b0) * 3;
            for (int j = 0; j < n; j++) {
                p[3 * j] = v0[j];
                p[3 * j + 1] = v1[j];
                p[3 * j + 2] = v2[j];
            }
        }
    }
}
#endif

/* out = x W^T for an int4 weight W[n, k] = (q - 8) s + z (groups of G inputs; lmforge's format, llama.cpp's Q4_0 and
   Q4_1) with integer dot products (AVX512-VNNI): each block of 32 inputs is two int8 parts, x ~ d (c + f / 254) with
   d = max|x| / 127, c = round(x / d) and f = round((x - d c) 254 / d) (a relative error of about 2e-5 against
   bfloat16's 3e-3; one part, llama.cpp's Q8 blocks, is 1.35x faster at 16 rows and moves SmolLM2's logits 1.7x
   farther from float32 than bfloat16 does). Per block, the dot products of the levels (0..15, unsigned) with both
   parts by vpdpbusd, then s (d' dot - 8 d' sum) + z sum(x), d' = d / 254. PyTorch's int4 kernel dequantizes each
   weight to float per use; here 32 inputs x 16 outputs are 16 instructions a row. The rows' activations are quantized
   in parts and the output columns shared among the OpenMP team (for_tiles_prep). */
void lmf_int4(const i4_args *a) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const double work = (double)a->n * a->N * a->K;
#if defined(LMF_AMX)
    if (lmf_amx && a->n >= AMX_MIN_ROWS) {
        for_tiles_prep(a->N / 16, work, i4_quantize, a->n, amx_tile, a, amx_done);
        return;
    }
#endif
    for_tiles_prep(a->N / 16, work, i4_quantize, a->n, i4_tile, a, NULL);
#else
    (void)a;
#endif
}

/* ---- attention of whole sequences (scoring, prefill): float32 flash attention ----------------------------- */

/* Softmax attention of T query rows against S keys per sequence, without the (T, S) scores: each block of up to
   FLASH_Q query vectors (the query heads of one key/value head, times consecutive rows) walks the keys FLASH_K at a
   time with a running maximum and sum (flash attention's online softmax). Keys a query may not see cost nothing:
   causal blocks stop at their last row's key, and a tile whose mask hides every key is skipped. A mask value at or
   below -1e30 hides its key (the decoder's masks use the float minimum), any other value is added to the score; a
   query that sees no key gets zeros. Blocks are shared among the OpenMP threads. */

typedef struct {
    int32_t B, H, KV, T, S, D, causal;  /* causal (without a mask): key j is seen by query t iff j <= t + S - T */
    float scale;
    int64_t q_sb, q_sh, q_st;           /* q (B, H, T, D), strides in elements; D contiguous */
    int64_t k_sb, k_sh, k_ss;           /* k (B, KV, S, D) */
    int64_t v_sb, v_sh, v_ss;           /* v (B, KV, S, D) */
    int64_t m_sb, m_sh, m_st;           /* mask (B or 1, H or 1, T, S), additive; stride 0 broadcasts */
    const float *q, *k, *v, *mask;      /* mask may be NULL */
    float *out;                         /* (B, T, H, D) contiguous */
} flash_args;

#define FLASH_Q 12
#define FLASH_K 16
#define FLASH_MAX_D 256
#define FLASH_HIDDEN -1e30f

int lmf_flash_ok(int D) {  /* whether lmf_flash has its vector kernel for heads of D channels here */
#if defined(__AVX512F__)
    return D % 16 == 0 && D <= FLASH_MAX_D;
#else
    (void)D;
    return 0;
#endif
}

#if defined(__AVX512F__)
/* out += p v over a tile's keys for all FLASH_Q query vectors, W (16 or 32) output channels from c on */
#define FLASH_PV(W)                                                                                      \
    do {                                                                                                 \
        __m512 lo[FLASH_Q], hi[FLASH_Q];                                                                 \
        for (int i = 0; i < FLASH_Q; i++) {                                                              \
            lo[i] = _mm512_mul_ps(_mm512_load_ps(acc + (size_t)i * D + c), _mm512_set1_ps(corr[i]));     \
            if (W == 32)                                                                                 \
                hi[i] = _mm512_mul_ps(_mm512_load_ps(acc + (size_t)i * D + c + 16), _mm512_set1_ps(corr[i])); \
        }                                                                                                \
        for (int jj = 0; jj < jn; jj++) {                                                                \
            const float *vr = vb + (int64_t)(j0 + jj) * a->v_ss + c;                                     \
            const __m512 v0 = _mm512_loadu_ps(vr), v1 = W == 32 ? _mm512_loadu_ps(vr + 16) : v0;        \
            for (int i = 0; i < FLASH_Q; i++) {                                                          \
                const __m512 pi = _mm512_set1_ps(p[i][jj]);                                              \
                lo[i] = _mm512_fmadd_ps(pi, v0, lo[i]);                                                  \
                if (W == 32) hi[i] = _mm512_fmadd_ps(pi, v1, hi[i]);                                     \
            }                                                                                            \
        }                                                                                                \
        for (int i = 0; i < FLASH_Q; i++) {                                                              \
            _mm512_store_ps(acc + (size_t)i * D + c, lo[i]);                                             \
            if (W == 32) _mm512_store_ps(acc + (size_t)i * D + c + 16, hi[i]);                           \
        }                                                                                                \
    } while (0)

static void flash_block(const flash_args *a, const float *kt, int S16, int b, int g, int h0, int nh, int t0,
                        int nr) {
    const int D = a->D, G = a->H / a->KV, nq = nh * nr, shift = a->S - a->T;
    float qs[FLASH_Q * FLASH_MAX_D] __attribute__((aligned(64)));
    float acc[FLASH_Q * FLASH_MAX_D] __attribute__((aligned(64)));
    float p[FLASH_Q][FLASH_K] __attribute__((aligned(64)));
    float mx[FLASH_Q], sum[FLASH_Q], corr[FLASH_Q];
    const float *mrow[FLASH_Q];
    int trow[FLASH_Q];
    for (int i = 0; i < FLASH_Q; i++) {  /* query vector i: head h0 + i / nr, row t0 + i % nr; unused ones are 0 */
        float *dst = qs + (size_t)i * D;
        mx[i] = -INFINITY;
        sum[i] = 0.0f;
        if (i < nq) {
            const int h = g * G + h0 + i / nr, t = t0 + i % nr;
            const float *src = a->q + b * a->q_sb + h * a->q_sh + t * a->q_st;
            for (int d = 0; d < D; d++) dst[d] = src[d] * a->scale;
            trow[i] = t;
            mrow[i] = a->mask ? a->mask + b * a->m_sb + h * a->m_sh + t * a->m_st : NULL;
        } else {
            memset(dst, 0, (size_t)D * sizeof(float));
            trow[i] = t0;
            mrow[i] = NULL;
        }
        memset(acc + (size_t)i * D, 0, (size_t)D * sizeof(float));
    }
    const float *vb = a->v + b * a->v_sb + g * a->v_sh;
    int end = a->S;
    if (!a->mask && a->causal) {
        const int last = t0 + nr - 1 + shift + 1;
        end = last < end ? last : end;
    }
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int j0 = 0; j0 < end; j0 += FLASH_K) {
        const int jn = end - j0 < FLASH_K ? end - j0 : FLASH_K;
        const __mmask16 inside = (__mmask16)((1u << jn) - 1u);
        __mmask16 seen[FLASH_Q];
        int any = 0;
        for (int i = 0; i < FLASH_Q; i++) {
            __mmask16 m = i < nq ? inside : 0;
            if (m && mrow[i]) {
                const __m512 mv = _mm512_maskz_loadu_ps(inside, mrow[i] + j0);
                m &= _mm512_cmp_ps_mask(mv, _mm512_set1_ps(FLASH_HIDDEN), _CMP_GT_OQ);
            } else if (m && a->causal) {
                const __m512i j = _mm512_add_epi32(iota, _mm512_set1_epi32(j0));
                m &= _mm512_cmple_epi32_mask(j, _mm512_set1_epi32(trow[i] + shift));
            }
            seen[i] = m;
            any |= m != 0;
        }
        if (!any) continue;
        __m512 sc[FLASH_Q];
        for (int i = 0; i < FLASH_Q; i++) sc[i] = _mm512_setzero_ps();
        for (int d = 0; d < D; d++) {
            const __m512 kv = _mm512_load_ps(kt + (size_t)d * S16 + j0);
            for (int i = 0; i < FLASH_Q; i++) sc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qs[(size_t)i * D + d]), kv, sc[i]);
        }
        for (int i = 0; i < FLASH_Q; i++) {
            if (!seen[i]) {
                corr[i] = 1.0f;
                _mm512_store_ps(p[i], _mm512_setzero_ps());
                continue;
            }
            __m512 s = sc[i];
            if (mrow[i]) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(inside, mrow[i] + j0));
            const float top = _mm512_mask_reduce_max_ps(seen[i], s);
            const float mnew = top > mx[i] ? top : mx[i];
            corr[i] = mx[i] == -INFINITY ? 0.0f : fast_expf(mx[i] - mnew);
            _mm512_store_ps(p[i], _mm512_sub_ps(s, _mm512_set1_ps(mnew)));
#pragma omp simd
            for (int jj = 0; jj < FLASH_K; jj++) p[i][jj] = fast_expf(p[i][jj]);
            const __m512 pv = _mm512_maskz_load_ps(seen[i], p[i]);
            _mm512_store_ps(p[i], pv);
            sum[i] = sum[i] * corr[i] + _mm512_reduce_add_ps(pv);
            mx[i] = mnew;
        }
        int c = 0;
        for (; c + 32 <= D; c += 32) FLASH_PV(32);
        for (; c < D; c += 16) FLASH_PV(16);
    }
    for (int i = 0; i < nq; i++) {
        const int h = g * G + h0 + i / nr, t = t0 + i % nr;
        float *o = a->out + (((int64_t)b * a->T + t) * a->H + h) * D;
        const float inv = sum[i] > 0.0f ? 1.0f / sum[i] : 0.0f;
        for (int d = 0; d < D; d++) o[d] = acc[(size_t)i * D + d] * inv;
    }
}
#endif

int lmf_flash(const flash_args *a) {  /* 1 when done; 0 without the kernel or the memory for the keys */
#if defined(__AVX512F__)
    const int G = a->H / a->KV, hc = G < FLASH_Q ? G : FLASH_Q, nhc = (G + hc - 1) / hc;
    const int R = FLASH_Q / hc, nrb = (a->T + R - 1) / R, D = a->D, S16 = (a->S + FLASH_K - 1) / FLASH_K * FLASH_K;
    const int units = nhc * nrb;
    float *kt = (float *)aligned_alloc(64, (size_t)D * S16 * sizeof(float));
    if (!kt) return 0;
    for (int b = 0; b < a->B; b++) {
        for (int g = 0; g < a->KV; g++) {
            const float *kb = a->k + b * a->k_sb + g * a->k_sh;  /* the keys, transposed: kt[d][j] */
            for (int j = 0; j < S16; j++) {
                const float *kr = kb + (int64_t)j * a->k_ss;
                for (int d = 0; d < D; d++) kt[(size_t)d * S16 + j] = j < a->S ? kr[d] : 0.0f;
            }
#if defined(_OPENMP)
            const double work = (double)G * a->T * a->S * D;
            const int par = lmf_parallel_ok && !omp_in_parallel() && units > 1 && work >= 4.0 * ATTN_PARALLEL_WORK;
#pragma omp parallel for schedule(dynamic, 1) if (par)
#endif
            for (int u = 0; u < units; u++) {  /* the last row blocks first: causal ones late in a sequence cost most */
                const int rb = nrb - 1 - u % nrb, hcx = u / nrb;
                const int h0 = hcx * hc, nh = G - h0 < hc ? G - h0 : hc, t0 = rb * R;
                const int nr = a->T - t0 < R ? a->T - t0 : R;
                flash_block(a, kt, S16, b, g, h0, nh, t0, nr);
            }
        }
    }
    free(kt);
    return 1;
#else
    (void)a;
    return 0;
#endif
}

/* ---- short calls made with the interpreter lock held ---------------------------------------------------------------
   A call that releases the lock (ctypes.CDLL, NumPy's gathers and reductions above a few hundred elements, any
   PyTorch operation) hands it to a thread waiting for it, and the caller then waits until that thread lets go: under
   16 streams the HTTP thread held it for tens of microseconds each time. These take microseconds: the caller keeps
   the lock (ctypes.PyDLL). */

int64_t lmf_gather_rows(const float *table, int64_t rows, int64_t d, const int64_t *ids, int64_t n, float *out) {
    /* out[r] = table[ids[r]]; an id outside the table: returns r + 1 (the rows before it copied), else 0 */
    for (int64_t r = 0; r < n; r++) {
        if (ids[r] < 0 || ids[r] >= rows) return r + 1;
        memcpy(out + r * d, table + ids[r] * d, (size_t)d * sizeof(float));
    }
    return 0;
}

static int64_t first_equal(const float *row, int64_t v, float m) {  /* m NaN: the first NaN */
    for (int64_t j0 = 0; j0 < v; j0 += 16) {  /* the first block holding it, then its place in the block */
        const int64_t j1 = j0 + 16 < v ? j0 + 16 : v;
        int hit = 0;
        if (m == m) {
#pragma omp simd reduction(| : hit)
            for (int64_t j = j0; j < j1; j++) hit |= row[j] == m;
        } else {
#pragma omp simd reduction(| : hit)
            for (int64_t j = j0; j < j1; j++) hit |= row[j] != row[j];
        }
        if (hit)
            for (int64_t j = j0; j < j1; j++)
                if (m == m ? row[j] == m : row[j] != row[j]) return j;
    }
    return 0;
}

void lmf_argmax_rows(const float *x, int64_t n, int64_t v, int64_t stride, int64_t *out) {
    /* the first largest of each row; a NaN counts as largest (as in torch and NumPy): the row's first NaN */
    for (int64_t r = 0; r < n; r++) {
        const float *row = x + r * stride;
        float m = -INFINITY;
        int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
        for (int64_t j = 0; j < v; j++) {
            const float y = row[j];
            m = y > m ? y : m;
            nan |= y != y;
        }
        out[r] = first_equal(row, v, nan ? NAN : m);
    }
}

/* ---- sampling: temperature, top-k, min-p, top-p, and a draw --------------------------------------------------- */

typedef struct {
    int32_t n, V;
    int64_t stride;               /* floats from a row of logits to the next */
    const float *logits;          /* (n, stride) float32 */
    const float *temperature;     /* (n): > 0 (a row of 0 takes its argmax) */
    const int32_t *top_k;         /* (n): 0 (or >= V) keeps every token */
    const float *top_p, *min_p;   /* (n): 1 and 0 keep every token */
    const double *u;              /* (n): each row's uniform draw in [0, 1) */
    int64_t *out;                 /* (n): the tokens drawn */
    float *e;                     /* V floats of scratch */
    int32_t *idx;                 /* V ints of scratch */
    double *bsum;                 /* ceil(V / SAMPLE_BLOCK) doubles of scratch */
} sample_args;

#define SAMPLE_BLOCK 64  /* weights summed a block at a time (the draw walks the blocks, then one block's weights) */

static void heap_down(float *h, int k, int i) {  /* min-heap of k values: the value at i sifted down */
    const float v = h[i];
    for (;;) {
        int c = 2 * i + 1;
        if (c >= k) break;
        if (c + 1 < k && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
}

/* The k-th largest of x (0 < k < V; no NaN): a min-heap of the k largest so far (in h, k floats), each value compared
   with its smallest first (few enter it: O(V) comparisons, no sort of the vocabulary). */
static float kth_largest(const float *x, int V, int k, float *h) {
    memcpy(h, x, (size_t)k * sizeof(float));
    for (int i = k / 2 - 1; i >= 0; i--) heap_down(h, k, i);
    for (int j = k; j < V; j++)
        if (x[j] > h[0]) {
            h[0] = x[j];
            heap_down(h, k, 0);
        }
    return h[0];
}

static int64_t one_hot(float *dist, int V, int64_t t) {  /* dist: 1 at t, 0 elsewhere; returns t */
    memset(dist, 0, (size_t)V * sizeof(float));
    dist[t] = 1.0f;
    return t;
}

/* Row r's token (dist NULL), or its distribution into dist (V floats; returns -1, or the token a greedy row takes). */
static int64_t sample_row(const sample_args *a, int r, float *dist) {
    const int V = a->V;
    const float *x = a->logits + (size_t)r * a->stride;
    float *e = a->e;
    const float T = a->temperature[r];
    float m = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int j = 0; j < V; j++) {
        m = x[j] > m ? x[j] : m;
        nan |= x[j] != x[j];
    }
    if (!(T > 0) || nan || m == INFINITY || m == -INFINITY)  /* greedy; a NaN or infinite logit: the argmax's token */
        return dist ? one_hot(dist, V, first_equal(x, V, nan ? NAN : m)) : first_equal(x, V, nan ? NAN : m);
    const float inv = 1.0f / T;
    /* the weights exp((x - m) / T) of the tokens top-k and min-p keep (min-p: weight >= min_p, the largest being 1) */
    float lo = -INFINITY;  /* logits below it are dropped */
    int ties = V;          /* logits equal to lo kept (in id order) after those above it: top-k's count */
    const int k = a->top_k[r];
    if (k > 0 && k < V) {
        lo = kth_largest(x, V, k, e);
        int above = 0;
#pragma omp simd reduction(+ : above)
        for (int j = 0; j < V; j++) above += x[j] > lo;
        ties = k - above;
    }
    if (a->min_p[r] > 0) {
        const float t = m + T * logf(a->min_p[r]);  /* (x - m) / T >= log(min_p) */
        if (t > lo) lo = t, ties = V;
    }
    double total = 0, *bsum = a->bsum;
    const int nb = (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    for (int b = 0; b < nb; b++) {
        const int j0 = b * SAMPLE_BLOCK, j1 = j0 + SAMPLE_BLOCK < V ? j0 + SAMPLE_BLOCK : V;
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (int j = j0; j < j1; j++) {
            const float w = x[j] >= lo ? fast_expf((x[j] - m) * inv) : 0.0f;
            e[j] = w;
            s += w;
        }
        bsum[b] = s;
        total += s;
    }
    if (ties < V) {  /* top-k with equal logits at its edge: the first `ties` of them, the others dropped */
        for (int j = 0; j < V; j++)
            if (x[j] == lo && ties-- <= 0) {
                total -= e[j];
                bsum[j / SAMPLE_BLOCK] -= e[j];
                e[j] = 0.0f;
            }
    }
    const double target_all = a->u[r] * total;
    const float p = a->top_p[r];
    if (p < 1.0f) {  /* the most likely tokens until their mass reaches top_p (ties in id order): the candidates
                        above a threshold lowered until they hold that mass, then the cut's weight found by halving
                        its bits (positive floats order as their bits; no sort: a flat distribution's thousands of
                        candidates took a millisecond in qsort) */
        const double want = p * total;
        int32_t *idx = a->idx;
        int c = 0;
        for (float t = 1e-3f;; t = t > 1e-30f ? t * 1e-3f : 0.0f) {
            double held = 0;
            c = 0;
            for (int j = 0; j < V; j++)
                if (e[j] > 0.0f && e[j] >= t) {
                    idx[c++] = j;
                    held += e[j];
                }
            if (held >= want || t == 0.0f) break;
        }
        for (int i = 0; i < c; i++) e[i] = e[idx[i]];  /* the candidates' weights in order (idx[i] >= i) */
        /* w: the largest weight whose candidates at least as heavy hold want (the last one kept) */
        uint32_t lo_bits = 0, hi_bits = 0x7F800000u;  /* F(lo) >= want; F(hi) < want (hi: +inf, above any) */
        while (hi_bits - lo_bits > 1) {
            const uint32_t mid = lo_bits + (hi_bits - lo_bits) / 2;
            float w;
            memcpy(&w, &mid, sizeof w);
            double f = 0;
#pragma omp simd reduction(+ : f)
            for (int i = 0; i < c; i++) f += e[i] >= w ? e[i] : 0.0f;
            if (f >= want) lo_bits = mid;
            else hi_bits = mid;
        }
        float w;
        memcpy(&w, &lo_bits, sizeof w);
        double before = 0;  /* mass of the heavier candidates: all kept; then those of weight w in id order */
#pragma omp simd reduction(+ : before)
        for (int i = 0; i < c; i++) before += e[i] > w ? e[i] : 0.0f;
        double mass = 0;
        for (int i = 0; i < c; i++) {
            if (e[i] == w && before < want) before += e[i];
            else if (!(e[i] > w)) e[i] = 0.0f;  /* dropped */
            mass += e[i];
        }
        if (dist) {
            memset(dist, 0, (size_t)V * sizeof(float));
            for (int i = 0; i < c; i++) dist[idx[i]] = (float)(e[i] / mass);
            return -1;
        }
        const double target = a->u[r] * mass;
        double acc = 0;
        int last = 0;
        for (int i = 0; i < c; i++) {
            if (e[i] == 0.0f) continue;
            last = i;
            acc += e[i];
            if (acc > target) return idx[i];
        }
        return idx[last];
    }
    if (dist) {
        for (int j = 0; j < V; j++) dist[j] = (float)(e[j] / total);
        return -1;
    }
    double acc = 0;  /* the first token whose running sum passes u times the total */
    int last = -1;
    for (int b = 0; b < nb; b++) {
        if (bsum[b] > 0) last = b;
        if (acc + bsum[b] <= target_all) {
            acc += bsum[b];
            continue;
        }
        const int j0 = b * SAMPLE_BLOCK, j1 = j0 + SAMPLE_BLOCK < V ? j0 + SAMPLE_BLOCK : V;
        for (int j = j0; j < j1; j++) {
            acc += e[j];
            if (acc > target_all && e[j] > 0.0f) return j;
        }
    }
    for (int j = (last + 1) * SAMPLE_BLOCK - 1; j >= 0; j--)  /* (rounding: the last token with weight) */
        if (j < V && e[j] > 0.0f) return j;
    return first_equal(x, V, m);
}

/* Each row's token drawn as lmforge.infer.sampling draws it: temperature, then top-k (exactly k tokens, equal logits
   at its edge taken in id order), min-p (weights of at least min_p times the largest), top-p (the smallest set of
   most likely tokens whose mass reaches top_p), then the first token whose running sum of weights (in id order)
   passes u times their total. A row with a NaN or infinite logit, or of temperature
   0, takes its argmax. SmolLM2's 49,152 logits: ~30 us a row where PyTorch's sort took 2.8 ms. */
void lmf_sample_rows(const sample_args *a) {
    for (int r = 0; r < a->n; r++) a->out[r] = sample_row(a, r, NULL);
}

/* The distribution each row's token is drawn from by lmf_sample_rows (out: n rows of V floats, summing to 1; a greedy
   row's or one with a NaN or infinite logit: 1 at its argmax). */
void lmf_distribution_rows(const sample_args *a, float *out) {
    for (int r = 0; r < a->n; r++) sample_row(a, r, out + (size_t)r * a->V);
}
