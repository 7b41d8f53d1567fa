/* hf_quant native CPU helpers: dequantize packed low-bit codes into float tiles for a GEMM.
 *
 * Built on first use by hf_quant/runtime/kernels/native/__init__.py (the C compiler of the machine, -O3
 * -march=native -fopenmp) and called through ctypes; no torch headers, so the build takes about a
 * second. Values are (code - zero) * scale computed in fp32 and rounded once to the output type,
 * which equals hf_quant.core.dequant.dequantize_weight when the scales are stored in that type.
 *
 * Layout ("nibbles", kernels/cpu.py grouped_codes): packed is (rows, G, gs/2) bytes,
 * the low nibble of byte j the code of channel j of the group and the high nibble that of channel
 * gs/2 + j. "bytes": (rows, G, gs), one code per byte. scale, zero: fp32 (rows, G).
 * out_kind: 0 fp32, 1 bf16 (round to nearest even), 2 fp16.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AVX512BW__)
#define HFQ_AMX_TILE 1  /* the tile state (hfq_amx_enable, amx_config): what both AMX kernels below need */
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define HFQ_AMX 1
#endif
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
static inline float hsum256(__m256 v) {  /* the sum of 8 floats */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void store_row(const float *src, void *dst, int64_t n, int kind) {
    if (kind == 0) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    uint16_t *d = (uint16_t *)dst;
    int64_t i = 0;
    if (kind == 1) {
#if defined(__AVX512BF16__)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)(d + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
        for (; i < n; i++) d[i] = f32_to_bf16(src[i]);
        return;
    }
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) {
        _Float16 h = (_Float16)src[i];
        memcpy(d + i, &h, 2);
    }
}

static int64_t out_size(int kind) { return kind == 0 ? 4 : 2; }

#if defined(__AVX512F__)
/* 16 values (fp32) to out at element offset i, in the output type. */
static inline void put16(__m512 v, void *out, int64_t i, int kind) {
    if (kind == 0) {
        _mm512_storeu_ps((float *)out + i, v);
    } else if (kind == 2) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
#if defined(__AVX512BF16__)
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), (__m256i)_mm512_cvtneps_pbh(v));
#else  /* round to nearest even on the bit pattern (finite values: scales are checked at load) */
        __m512i u = _mm512_castps_si512(v);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
#endif
    }
}

/* The first n of 16 values (fp32) to out at element offset i: put16 when n >= 16, else through a staging row. */
static inline void put_first(__m512 v, void *out, int64_t i, int64_t n, int kind) {
    if (n >= 16) {
        put16(v, out, i, kind);
        return;
    }
    float t[16];
    _mm512_storeu_ps(t, v);
    store_row(t, (char *)out + i * out_size(kind), n, kind);
}

/* The 16 values (i - zero) * scale of a group's nibbles i = 0..15, in fp32: the table that the nibble kernels look
 * codes up in (`vpermw` / `vpermps`), each group's values computed once instead of once per code. */
static inline __m512 nibble_values(float scale, float zero) {
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zero)), _mm512_set1_ps(scale));
}

/* One row of nibbles, groups of gs channels with gs/2 a multiple of 16: no staging buffer. With AVX-512 BW / VL each
 * group's 16 possible values are computed once ((i - zero) * scale in fp32, rounded to the output type as put16
 * rounds them: the same bytes) and the codes look them up, 16 at a time (`vpermw` / `vpermps`): half the vector
 * work per code of converting each one. */
static void nibbles_row_avx512(const uint8_t *p, const float *scale, const float *zero, void *out,
                               int64_t G, int64_t gs, int kind) {
    const int64_t half = gs / 2;
    const __m512i low = _mm512_set1_epi32(15);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    for (int64_t g = 0; g < G; g++) {
        const __m512 table = nibble_values(scale[g], zero[g]);
        const uint8_t *pg = p + g * half;
        if (kind == 0) {
            float *o = (float *)out + g * gs;
            for (int64_t j = 0; j < half; j += 16) {
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(pg + j)));
                _mm512_storeu_ps(o + j, _mm512_permutexvar_ps(_mm512_and_si512(b, low), table));
                _mm512_storeu_ps(o + half + j, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table));
            }
            continue;
        }
        uint16_t t16[16];
        put16(table, t16, 0, kind);  /* the 16 values in the output type, rounded as put16 rounds every value */
        const __m256i t = _mm256_loadu_si256((const __m256i *)t16), nib = _mm256_set1_epi16(15);
        uint16_t *o = (uint16_t *)out + g * gs;
        for (int64_t j = 0; j < half; j += 16) {
            const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(pg + j)));
            _mm256_storeu_si256((__m256i *)(o + j), _mm256_permutexvar_epi16(_mm256_and_si256(w, nib), t));
            _mm256_storeu_si256((__m256i *)(o + half + j), _mm256_permutexvar_epi16(_mm256_srli_epi16(w, 4), t));
        }
    }
    return;
#endif
    for (int64_t g = 0; g < G; g++) {
        const __m512 s = _mm512_set1_ps(scale[g]), z = _mm512_set1_ps(zero[g]);
        const uint8_t *pg = p + g * half;
        for (int64_t j = 0; j < half; j += 16) {
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(pg + j)));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, low));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
            put16(_mm512_mul_ps(_mm512_sub_ps(lo, z), s), out, g * gs + j, kind);
            put16(_mm512_mul_ps(_mm512_sub_ps(hi, z), s), out, g * gs + half + j, kind);
        }
    }
}
#endif

/* One row through the staging buffer buf (K floats): any group size. */
static void row_generic(const uint8_t *codes, const float *scale, const float *zero, void *out, float *buf,
                        int64_t G, int64_t gs, int nibbles, int kind) {
    const int64_t half = gs / 2;
    for (int64_t g = 0; g < G; g++) {
        const float s = scale[g], z = zero[g];
        float *dst = buf + g * gs;
        if (nibbles) {
            const uint8_t *pg = codes + g * half;
            for (int64_t j = 0; j < half; j++) {
                dst[j] = ((float)(pg[j] & 15) - z) * s;
                dst[half + j] = ((float)(pg[j] >> 4) - z) * s;
            }
        } else {
            const uint8_t *cg = codes + g * gs;
            for (int64_t j = 0; j < gs; j++) dst[j] = ((float)cg[j] - z) * s;
        }
    }
    store_row(buf, out, G * gs, kind);
}

static int dequant(const uint8_t *codes, const float *scale, const float *zero, void *out, int64_t rows, int64_t G,
                   int64_t gs, int nibbles, int kind, int nthreads) {
    const int64_t K = G * gs, row_bytes = nibbles ? K / 2 : K;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
#if defined(__AVX512F__)
        const int direct = nibbles && (gs / 2) % 16 == 0;
#else
        const int direct = 0;
#endif
        float *buf = direct ? NULL : (float *)malloc((size_t)K * sizeof(float));
        if (!direct && !buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            void *dst = (char *)out + r * K * out_size(kind);
#if defined(__AVX512F__)
            if (direct) {
                nibbles_row_avx512(codes + r * row_bytes, scale + r * G, zero + r * G, dst, G, gs, kind);
                continue;
            }
#endif
            if (buf) row_generic(codes + r * row_bytes, scale + r * G, zero + r * G, dst, buf, G, gs, nibbles, kind);
        }
        free(buf);
    }
    return failed;
}

int hfq_dequant_nibbles(const uint8_t *packed, const float *scale, const float *zero, void *out,
                        int64_t rows, int64_t G, int64_t gs, int kind, int nthreads) {
    return dequant(packed, scale, zero, out, rows, G, gs, 1, kind, nthreads);
}

int hfq_dequant_bytes(const uint8_t *codes, const float *scale, const float *zero, void *out,
                      int64_t rows, int64_t G, int64_t gs, int kind, int nthreads) {
    return dequant(codes, scale, zero, out, rows, G, gs, 0, kind, nthreads);
}

/* ---------------------------------------------------------------------------------------------------
 * Capabilities of this build: bit 0 = hfq_codes_bf16_gemm is compiled (AVX-512 BW + BF16), bit 1 =
 * hfq_codes_f32_gemm is vectorized (AVX-512F, or AVX2 + FMA), bit 2 = hfq_sign_gemm is vectorized, bit 3 =
 * hfq_codes_i16_gemv is compiled (AVX2), bit 4 = hfq_int8_gemm is compiled (AVX-512 VNNI, or AVX2: then bit 5),
 * bit 6 = hfq_mse_search is compiled (AVX2 + FMA).
 */
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define HFQ_F32_VEC 1
#endif
/* The exact int8 GEMM's form (its section below): 1 = AVX-512 VNNI, 2 = AVX2 (vpmaddubsw); undefined: none. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define HFQ_I8 1
#define HFQ_I8_MR 6
#elif defined(__AVX2__)
#define HFQ_I8 2
#define HFQ_I8_MR 4
#endif
int hfq_caps(void) {
    int caps = 0;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    caps |= 1;
#endif
#if defined(HFQ_F32_VEC)
    caps |= 2;
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
    caps |= 4;  /* hfq_sign_gemm is vectorized */
#endif
#if defined(__AVX2__)
    caps |= 8;  /* hfq_codes_i16_gemv is compiled */
#endif
#if defined(HFQ_I8)
    caps |= 16;  /* hfq_int8_gemm is compiled */
#endif
#if HFQ_I8 == 2
    caps |= 32;  /* ... in its AVX2 form (vpmaddubsw on |w| and sign(w) * c) */
#endif
#if defined(__AVX2__) && defined(__FMA__)
    caps |= 64;  /* hfq_mse_search is compiled */
#endif
#if defined(HFQ_AMX)
    caps |= 128;  /* hfq_codes_amx_gemm is compiled (Linux may still refuse the tiles: hfq_amx_enable) */
#endif
#if defined(HFQ_AMX_TILE) && defined(__AMX_INT8__) && HFQ_I8 == 1
    caps |= 256;  /* hfq_int8_amx_gemm is compiled (the same proviso) */
#endif
    return caps;
}

#if defined(HFQ_F32_VEC)  /* implied by AVX512-BF16 too: the driver of both fused GEMMs below */
#define HFQ_MB_MAX 8
/* One pass of a fused GEMM: weight rows p0, p1 (scales s0, s1) against activation rows x[0..mb) of stride ldx
 * (elements of the kernel's x type), their dot products into r0[m], r1[m]. */
typedef void (*hfq_rows_fn)(const void *x, int64_t ldx, int mb, int wide, const uint8_t *p0, const uint8_t *p1,
                            const float *s0, const float *s1, int64_t G, int64_t gs, float *r0, float *r1);

/* out (M x N) = rows(x, W) - corr (+ bias), fp32 (kind 0) or bf16 (kind 1): weight rows in pairs over the
 * threads, activation rows in blocks of mb_max (<= HFQ_MB_MAX); x_size bytes per activation element.
 * A pair is rows n and n + ceil(N / 2), not two neighbours: two streams read side by side through the same pages
 * defeat the hardware prefetchers (measured on Zen 4: two neighbouring 2 KB rows at a time stream at 23 GB/s, the
 * same rows paired half a matrix apart at 48-58 GB/s, one row at a time at 54). */
static void codes_gemm(const void *x, int64_t x_size, int64_t M, int64_t K, const uint8_t *packed, const float *scale,
                       const float *corr, const float *bias, void *out, int64_t N, int64_t G, int64_t gs, int kind,
                       int wide, int nthreads, int mb_max, hfq_rows_fn rows) {
    const int64_t row_bytes = wide ? K : K / 2, pairs = (N + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t pr = 0; pr < pairs; pr++) {
        const int64_t n = pr, n1 = pr + pairs;
        const int two = n1 < N;  /* an odd N's middle row is computed twice, once discarded */
        const uint8_t *p0 = packed + n * row_bytes, *p1 = two ? packed + n1 * row_bytes : p0;
        const float *s0 = scale + n * G, *s1 = two ? scale + n1 * G : s0;
        for (int64_t m0 = 0; m0 < M; m0 += mb_max) {
            const int mb = (int)(M - m0 < mb_max ? M - m0 : mb_max);
            float r0[HFQ_MB_MAX], r1[HFQ_MB_MAX];
            rows((const char *)x + m0 * K * x_size, K, mb, wide, p0, p1, s0, s1, G, gs, r0, r1);
            for (int m = 0; m < mb; m++) {
                for (int t = 0; t < 1 + two; t++) {
                    const int64_t col = t ? n1 : n, row = m0 + m;
                    float v = (t ? r1[m] : r0[m]) - (corr ? corr[row * N + col] : 0.0f);
                    if (bias) v += bias[col];
                    if (kind == 0) ((float *)out)[row * N + col] = v;
                    else ((uint16_t *)out)[row * N + col] = f32_to_bf16(v);
                }
            }
        }
    }
}
#endif

/* ---------------------------------------------------------------------------------------------------
 * Weights of up to 8 bits x bf16 activations, small M, fused (no dequantized weight in memory).
 *
 * Codes q (0..15) become the bf16 number 128 + q by one OR (0x4300 | q: 128 has a step of 1 in bf16's
 * 7-bit mantissa), so a vdpbf16ps of x with them gives, exactly in its products, sum_k x_k (128 + q_k)
 * per lane. Per group g of gs channels: acc_g = that dot, and
 *     y[m, n] = sum_g scale[n, g] * acc_g - sum_g scale[n, g] (zero[n, g] + 128) * xsum[m, g]
 * where the second sum is `corr` (M x N, computed by the caller as a small GEMM of the per-group sums of
 * x). With the nibble layout above (low nibbles channels 0..gs/2-1 of the group, high nibbles the rest),
 * 32 bytes of codes give 32 low codes for 32 consecutive channels and 32 high codes for the 32 channels
 * gs/2 later, so x is read in its natural order: gs a multiple of 64. gs = 32 combines the 16 low and
 * 16 high codes of one 16-byte half group into one vector (channels 0..31 of the group, in order).
 * wide: one code of up to 8 bits per byte (u = 16 h + l, channels in order, gs a multiple of 32): the low
 * and high nibbles each become 128 + nibble and meet the same x, and acc_g = 16 acc_high + acc_low is
 * sum_k x_k (u_k + 2176), so `corr` uses zero + 2176 instead.
 * Two weight rows and up to four activation rows per pass: every x load feeds two dot products.
 * out: M x N, kind 0 fp32 or 1 bf16; bias (N fp32) or NULL.
 */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HFQ_MB 4
#ifndef HFQ_PREFETCH
#define HFQ_PREFETCH 16384 /* bytes ahead of the codes being read */
#endif
static inline __m512i codes_lo(__m512i w) {  /* (w & 15) | 0x4300 per 16-bit lane */
    return _mm512_ternarylogic_epi32(w, _mm512_set1_epi16(15), _mm512_set1_epi16(0x4300), 0xEA);
}
static inline __m512i codes_hi(__m512i w) {
    return _mm512_or_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi16(0x4300));
}

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline __attribute__((always_inline)) void codes_rows(
        const uint16_t *x, int64_t ldx, const int mb, const int wide, const uint8_t *p0, const uint8_t *p1,
        const float *s0, const float *s1, int64_t G, int64_t gs, float *r0, float *r1) {
    __m512 t0[HFQ_MB], t1[HFQ_MB];
    for (int m = 0; m < mb; m++) t0[m] = t1[m] = _mm512_setzero_ps();
    const int64_t gbytes = wide ? gs : gs / 2, half = gs / 2;
    /* few rows, or bytes (whose high nibbles weigh 16): the high nibbles' products go to their own
     * accumulators (c0, c1), so that a dot product never waits for the one before it (vdpbf16ps latency) */
    const int split = wide || mb <= 2;
    for (int64_t g = 0; g < G; g++) {
        __m512 a0[HFQ_MB], a1[HFQ_MB], c0[HFQ_MB], c1[HFQ_MB];
        for (int m = 0; m < mb; m++) a0[m] = a1[m] = c0[m] = c1[m] = _mm512_setzero_ps();
        const uint8_t *q0 = p0 + g * gbytes, *q1 = p1 + g * gbytes;
        const uint16_t *xg = x + g * gs;
        if (!wide && gs == 32) {
            __m512i w0 = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)q0)));
            __m512i w1 = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)q1)));
            /* words 0..15: the 16 bytes; their low nibbles stay in lanes 0..15, high nibbles go to 16..31 */
            w0 = _mm512_inserti64x4(w0, _mm512_castsi512_si256(_mm512_srli_epi16(w0, 4)), 1);
            w1 = _mm512_inserti64x4(w1, _mm512_castsi512_si256(_mm512_srli_epi16(w1, 4)), 1);
            const __m512bh b0 = (__m512bh)codes_lo(w0), b1 = (__m512bh)codes_lo(w1);
            for (int m = 0; m < mb; m++) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xg + m * ldx));
                a0[m] = _mm512_dpbf16_ps(a0[m], xv, b0);
                a1[m] = _mm512_dpbf16_ps(a1[m], xv, b1);
            }
        } else {
            for (int64_t j = 0; j < gbytes; j += 32) {
                _mm_prefetch((const char *)(q0 + j) + HFQ_PREFETCH, _MM_HINT_T0);  /* the weight streams from memory */
                _mm_prefetch((const char *)(q1 + j) + HFQ_PREFETCH, _MM_HINT_T0);
                const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q0 + j)));
                const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q1 + j)));
                const __m512bh l0 = (__m512bh)codes_lo(w0), h0 = (__m512bh)codes_hi(w0);
                const __m512bh l1 = (__m512bh)codes_lo(w1), h1 = (__m512bh)codes_hi(w1);
                for (int m = 0; m < mb; m++) {
                    const uint16_t *xm = xg + m * ldx + j;
                    /* nibbles: the high nibbles are the channels half a group later; bytes: the same channels */
                    const __m512bh xl = (__m512bh)_mm512_loadu_si512((const void *)xm);
                    const __m512bh xh = wide ? xl : (__m512bh)_mm512_loadu_si512((const void *)(xm + half));
                    a0[m] = _mm512_dpbf16_ps(a0[m], xl, l0);
                    a1[m] = _mm512_dpbf16_ps(a1[m], xl, l1);
                    if (split) {
                        c0[m] = _mm512_dpbf16_ps(c0[m], xh, h0);
                        c1[m] = _mm512_dpbf16_ps(c1[m], xh, h1);
                    } else {
                        a0[m] = _mm512_dpbf16_ps(a0[m], xh, h0);
                        a1[m] = _mm512_dpbf16_ps(a1[m], xh, h1);
                    }
                }
            }
        }
        const __m512 sc0 = _mm512_set1_ps(s0[g]), sc1 = _mm512_set1_ps(s1[g]);
        if (split) {  /* a byte is 16 (128 + high) + (128 + low) - 2176 */
            const __m512 w = _mm512_set1_ps(wide ? 16.0f : 1.0f);
            for (int m = 0; m < mb; m++) {
                a0[m] = _mm512_fmadd_ps(c0[m], w, a0[m]);
                a1[m] = _mm512_fmadd_ps(c1[m], w, a1[m]);
            }
        }
        for (int m = 0; m < mb; m++) {
            t0[m] = _mm512_fmadd_ps(a0[m], sc0, t0[m]);
            t1[m] = _mm512_fmadd_ps(a1[m], sc1, t1[m]);
        }
    }
    for (int m = 0; m < mb; m++) {
        r0[m] = hsum(t0[m]);
        r1[m] = hsum(t1[m]);
    }
}

static void codes_block(const void *xv, int64_t ldx, int mb, int wide, const uint8_t *p0, const uint8_t *p1,
                        const float *s0, const float *s1, int64_t G, int64_t gs, float *r0, float *r1) {
    const uint16_t *x = (const uint16_t *)xv;
    /* a constant row count and layout per call: the accumulators stay in registers */
#define HFQ_ROWS(W) switch (mb) { \
    case 1: codes_rows(x, ldx, 1, W, p0, p1, s0, s1, G, gs, r0, r1); break; \
    case 2: codes_rows(x, ldx, 2, W, p0, p1, s0, s1, G, gs, r0, r1); break; \
    case 3: codes_rows(x, ldx, 3, W, p0, p1, s0, s1, G, gs, r0, r1); break; \
    default: codes_rows(x, ldx, 4, W, p0, p1, s0, s1, G, gs, r0, r1); break; }
    if (wide) { HFQ_ROWS(1) } else { HFQ_ROWS(0) }
#undef HFQ_ROWS
}
#endif

int hfq_codes_bf16_gemm(const uint16_t *x, int64_t M, int64_t K, const uint8_t *packed, const float *scale,
                        const float *corr, const float *bias, void *out, int64_t N, int64_t G, int64_t gs, int kind,
                        int wide, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (!(wide ? gs % 32 == 0 : (gs == 32 || gs % 64 == 0)) || gs <= 0 || G * gs != K) return 2;
    codes_gemm(x, 2, M, K, packed, scale, corr, bias, out, N, G, gs, kind, wide, nthreads, HFQ_MB, codes_block);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)packed; (void)scale; (void)corr; (void)bias; (void)out; (void)N; (void)G;
    (void)gs; (void)kind; (void)wide; (void)nthreads;
    return 1;
#endif
}

/* ---------------------------------------------------------------------------------------------------
 * Weights of up to 8 bits x fp32 activations, small M, fused: the fp32 counterpart of hfq_codes_bf16_gemm
 * for CPUs without AVX512-BF16 and for fp32 models, exact in its products. Codes are widened to int32 and
 * converted to fp32 (exact) and multiplied by their group's scale, then FMA'd with x:
 *     y[m, n] = sum_k x_k (q_k * scale[n, g(k)]) - corr[m, n],  corr = xsum (M x G) @ (scale * zero).T
 * Each step takes 2 VW channels of a group: nibbles, VW bytes whose low nibbles are channels j.. and high
 * nibbles channels gs/2 + j..; bytes, 2 VW bytes of channels j... (VW = 16 with AVX-512, 8 with AVX2):
 * gs a multiple of 2 VW. Two weight rows and up to HFQ_FMB activation rows per pass.
 */
#if defined(HFQ_F32_VEC)
#ifndef HFQ_PREFETCH_F32
#define HFQ_PREFETCH_F32 16384 /* bytes ahead of the codes being read */
#endif
#if defined(__AVX512F__)
#define HFQ_VW 16
#define HFQ_FMB 8
typedef __m512 hfq_vf;
typedef __m512i hfq_vi;
static inline hfq_vi f_widen(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline hfq_vf f_cvt(hfq_vi v) { return _mm512_cvtepi32_ps(v); }
static inline hfq_vi f_low(hfq_vi v) { return _mm512_and_si512(v, _mm512_set1_epi32(15)); }
static inline hfq_vi f_high(hfq_vi v) { return _mm512_srli_epi32(v, 4); }
static inline hfq_vf f_zero(void) { return _mm512_setzero_ps(); }
static inline hfq_vf f_set1(float v) { return _mm512_set1_ps(v); }
static inline hfq_vf f_load(const float *p) { return _mm512_loadu_ps(p); }
static inline hfq_vf f_fma(hfq_vf a, hfq_vf b, hfq_vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline hfq_vf f_add(hfq_vf a, hfq_vf b) { return _mm512_add_ps(a, b); }
static inline hfq_vf f_mul(hfq_vf a, hfq_vf b) { return _mm512_mul_ps(a, b); }
static inline float f_hsum(hfq_vf v) { return _mm512_reduce_add_ps(v); }
#else
#define HFQ_VW 8
#define HFQ_FMB 4  /* 16 ymm registers */
typedef __m256 hfq_vf;
typedef __m256i hfq_vi;
static inline hfq_vi f_widen(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline hfq_vf f_cvt(hfq_vi v) { return _mm256_cvtepi32_ps(v); }
static inline hfq_vi f_low(hfq_vi v) { return _mm256_and_si256(v, _mm256_set1_epi32(15)); }
static inline hfq_vi f_high(hfq_vi v) { return _mm256_srli_epi32(v, 4); }
static inline hfq_vf f_zero(void) { return _mm256_setzero_ps(); }
static inline hfq_vf f_set1(float v) { return _mm256_set1_ps(v); }
static inline hfq_vf f_load(const float *p) { return _mm256_loadu_ps(p); }
static inline hfq_vf f_fma(hfq_vf a, hfq_vf b, hfq_vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline hfq_vf f_add(hfq_vf a, hfq_vf b) { return _mm256_add_ps(a, b); }
static inline hfq_vf f_mul(hfq_vf a, hfq_vf b) { return _mm256_mul_ps(a, b); }
static inline float f_hsum(hfq_vf v) { return hsum256(v); }
#endif

static inline __attribute__((always_inline)) void codes_f32_rows(
        const float *x, int64_t ldx, const int mb, const int wide, const uint8_t *p0, const uint8_t *p1,
        const float *s0, const float *s1, int64_t G, int64_t gs, float *r0, float *r1) {
    /* few rows: the second half's products go to their own accumulators (c0, c1), so that an FMA never
     * waits for the one before it; more rows give enough independent chains without */
    const int split = mb <= 2;
    /* GROUPED: the products of a group are summed unscaled and the group's sum is scaled once (t += s * sum),
     * instead of scaling every code before its FMA. With one activation row the multiplies by the scale were 4 of
     * the AVX2 loop's 18 vector ops per step; with more rows their share is small and the totals would take
     * registers the rows need. One row is split (mb <= 2): a group's sum is a + c. */
    const int grouped = mb == 1;
    hfq_vf a0[HFQ_FMB], a1[HFQ_FMB], c0[HFQ_FMB], c1[HFQ_FMB], t0[HFQ_FMB], t1[HFQ_FMB];
    for (int m = 0; m < mb; m++) a0[m] = a1[m] = c0[m] = c1[m] = t0[m] = t1[m] = f_zero();
    const int64_t gbytes = wide ? gs : gs / 2, second = wide ? HFQ_VW : gs / 2, step = wide ? 2 * HFQ_VW : HFQ_VW;
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *q0 = p0 + g * gbytes, *q1 = p1 + g * gbytes;
        const float *xg = x + g * gs;
        const hfq_vf sc0 = f_set1(s0[g]), sc1 = f_set1(s1[g]);
        for (int64_t j = 0; j < gbytes; j += step) {  /* byte j starts channel j in both layouts */
            if ((j & 63) == 0) {  /* a cache line ahead per line read: the weight streams from memory */
                _mm_prefetch((const char *)(q0 + j) + HFQ_PREFETCH_F32, _MM_HINT_T0);
                _mm_prefetch((const char *)(q1 + j) + HFQ_PREFETCH_F32, _MM_HINT_T0);
            }
            hfq_vf l0, h0, l1, h1;  /* q (* scale unless grouped) of channels j.. and j + second.. of rows 0, 1 */
            if (wide) {
                l0 = f_cvt(f_widen(q0 + j)), h0 = f_cvt(f_widen(q0 + j + HFQ_VW));
                l1 = f_cvt(f_widen(q1 + j)), h1 = f_cvt(f_widen(q1 + j + HFQ_VW));
            } else {
                const hfq_vi w0 = f_widen(q0 + j), w1 = f_widen(q1 + j);
                l0 = f_cvt(f_low(w0)), h0 = f_cvt(f_high(w0)), l1 = f_cvt(f_low(w1)), h1 = f_cvt(f_high(w1));
            }
            if (!grouped) l0 = f_mul(l0, sc0), h0 = f_mul(h0, sc0), l1 = f_mul(l1, sc1), h1 = f_mul(h1, sc1);
            for (int m = 0; m < mb; m++) {
                const float *xm = xg + m * ldx + j;
                const hfq_vf xl = f_load(xm), xh = f_load(xm + second);
                a0[m] = f_fma(xl, l0, a0[m]);
                a1[m] = f_fma(xl, l1, a1[m]);
                if (split) {
                    c0[m] = f_fma(xh, h0, c0[m]);
                    c1[m] = f_fma(xh, h1, c1[m]);
                } else {
                    a0[m] = f_fma(xh, h0, a0[m]);
                    a1[m] = f_fma(xh, h1, a1[m]);
                }
            }
        }
        if (grouped)
            for (int m = 0; m < mb; m++) {
                t0[m] = f_fma(f_add(a0[m], c0[m]), sc0, t0[m]);
                t1[m] = f_fma(f_add(a1[m], c1[m]), sc1, t1[m]);
                a0[m] = a1[m] = c0[m] = c1[m] = f_zero();
            }
    }
    for (int m = 0; m < mb; m++) {
        if (grouped) {
            r0[m] = f_hsum(t0[m]), r1[m] = f_hsum(t1[m]);
        } else {
            r0[m] = f_hsum(split ? f_add(a0[m], c0[m]) : a0[m]);
            r1[m] = f_hsum(split ? f_add(a1[m], c1[m]) : a1[m]);
        }
    }
}

static void codes_f32_block(const void *xv, int64_t ldx, int mb, int wide, const uint8_t *p0, const uint8_t *p1,
                            const float *s0, const float *s1, int64_t G, int64_t gs, float *r0, float *r1) {
    const float *x = (const float *)xv;
#define HFQ_R(k, W) codes_f32_rows(x, ldx, HFQ_FMB < k ? HFQ_FMB : k, W, p0, p1, s0, s1, G, gs, r0, r1); break;
#define HFQ_ROWS(W) switch (mb) { case 1: HFQ_R(1, W) case 2: HFQ_R(2, W) case 3: HFQ_R(3, W) case 4: HFQ_R(4, W) \
    case 5: HFQ_R(5, W) case 6: HFQ_R(6, W) case 7: HFQ_R(7, W) default: HFQ_R(8, W) }
    if (wide) { HFQ_ROWS(1) } else { HFQ_ROWS(0) }
#undef HFQ_ROWS
#undef HFQ_R
}
#endif

int hfq_codes_f32_vector_width(void) {
#if defined(HFQ_F32_VEC)
    return HFQ_VW;
#else
    return 0;
#endif
}

int hfq_codes_f32_gemm(const float *x, int64_t M, int64_t K, const uint8_t *packed, const float *scale,
                       const float *corr, const float *bias, void *out, int64_t N, int64_t G, int64_t gs, int kind,
                       int wide, int nthreads) {
#if defined(HFQ_F32_VEC)
    if (gs <= 0 || gs % (2 * HFQ_VW) != 0 || G * gs != K) return 2;
    codes_gemm(x, 4, M, K, packed, scale, corr, bias, out, N, G, gs, kind, wide, nthreads, HFQ_FMB, codes_f32_block);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)packed; (void)scale; (void)corr; (void)bias; (void)out; (void)N; (void)G;
    (void)gs; (void)kind; (void)wide; (void)nthreads;
    return 1;
#endif
}

/* ---------------------------------------------------------------------------------------------------
 * Weights of up to 8 bits x int16 activation codes, small M, fused, integer products: the decode GEMV of CPUs
 * without AVX512-BF16 (AVX2), where converting every code to fp32 (hfq_codes_f32_gemm) is the limit, not memory.
 * x here is int16 codes (rows of terms: hfq_codes_i16_gemv below writes each float row as one or two s * code); per
 * group g of gs channels: r[m, n] = sum_g scale[n, g] * sum_{k in g} xq[m, k] * q[n, k], the inner sums exact in
 * int32 (vpmaddwd: two 16-bit products per 32-bit lane), flushed to fp32 often enough that they never overflow
 * (a lane sums 1024 products of 15 x 32767 between flushes for nibbles, 128 of 255 x 32767 for bytes: < 2^31;
 * codes in [-32767, 32767]). Same layouts as
 * above: nibbles, 16 bytes = 16 low codes (channels j..j+15) and 16 high codes (channels gs/2 + j..), gs a
 * multiple of 32; bytes, 16 codes of channels j..j+15, gs a multiple of 16. r through codes_gemm (no corr, no bias).
 */
#if defined(__AVX2__) && defined(HFQ_F32_VEC)
#define HFQ_IMB 2
#ifndef HFQ_PREFETCH_I16
#define HFQ_PREFETCH_I16 4096
#endif
static inline __m256 i16_flush(__m256i acc, __m256 f) { return _mm256_add_ps(f, _mm256_cvtepi32_ps(acc)); }
static inline __attribute__((always_inline)) void codes_i16_rows(
        const int16_t *x, int64_t ldx, const int mb, const int wide, const uint8_t *p0, const uint8_t *p1,
        const float *s0, const float *s1, int64_t G, int64_t gs, float *r0, float *r1) {
    __m256 t0[HFQ_IMB], t1[HFQ_IMB];
    for (int m = 0; m < mb; m++) t0[m] = t1[m] = _mm256_setzero_ps();
    const int64_t gbytes = wide ? gs : gs / 2, half = gs / 2;
    const int64_t flush = wide ? 1024 : 4096;  /* bytes of codes between int32 -> fp32 flushes (see above) */
    const __m256i low = _mm256_set1_epi16(15);
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *q0 = p0 + g * gbytes, *q1 = p1 + g * gbytes;
        const int16_t *xg = x + g * gs;
        __m256 f0[HFQ_IMB], f1[HFQ_IMB];
        for (int m = 0; m < mb; m++) f0[m] = f1[m] = _mm256_setzero_ps();
        for (int64_t c = 0; c < gbytes; c += flush) {
            const int64_t end = c + flush < gbytes ? c + flush : gbytes;
            __m256i a0[HFQ_IMB], a1[HFQ_IMB];
            for (int m = 0; m < mb; m++) a0[m] = a1[m] = _mm256_setzero_si256();
            for (int64_t j = c; j < end; j += 16) {
                if ((j & 63) == 0) {
                    _mm_prefetch((const char *)(q0 + j) + HFQ_PREFETCH_I16, _MM_HINT_T0);
                    _mm_prefetch((const char *)(q1 + j) + HFQ_PREFETCH_I16, _MM_HINT_T0);
                }
                const __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q0 + j)));
                const __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q1 + j)));
                if (wide) {
                    for (int m = 0; m < mb; m++) {
                        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xg + m * ldx + j));
                        a0[m] = _mm256_add_epi32(a0[m], _mm256_madd_epi16(w0, xv));
                        a1[m] = _mm256_add_epi32(a1[m], _mm256_madd_epi16(w1, xv));
                    }
                } else {
                    const __m256i l0 = _mm256_and_si256(w0, low), h0 = _mm256_srli_epi16(w0, 4);
                    const __m256i l1 = _mm256_and_si256(w1, low), h1 = _mm256_srli_epi16(w1, 4);
                    for (int m = 0; m < mb; m++) {
                        const int16_t *xm = xg + m * ldx + j;
                        const __m256i xl = _mm256_loadu_si256((const __m256i *)xm);
                        const __m256i xh = _mm256_loadu_si256((const __m256i *)(xm + half));
                        a0[m] = _mm256_add_epi32(a0[m], _mm256_add_epi32(_mm256_madd_epi16(l0, xl), _mm256_madd_epi16(h0, xh)));
                        a1[m] = _mm256_add_epi32(a1[m], _mm256_add_epi32(_mm256_madd_epi16(l1, xl), _mm256_madd_epi16(h1, xh)));
                    }
                }
            }
            for (int m = 0; m < mb; m++) f0[m] = i16_flush(a0[m], f0[m]), f1[m] = i16_flush(a1[m], f1[m]);
        }
        const __m256 sc0 = _mm256_set1_ps(s0[g]), sc1 = _mm256_set1_ps(s1[g]);
        for (int m = 0; m < mb; m++) {
            t0[m] = _mm256_fmadd_ps(f0[m], sc0, t0[m]);
            t1[m] = _mm256_fmadd_ps(f1[m], sc1, t1[m]);
        }
    }
    for (int m = 0; m < mb; m++) r0[m] = hsum256(t0[m]), r1[m] = hsum256(t1[m]);
}

static void codes_i16_block(const void *xv, int64_t ldx, int mb, int wide, const uint8_t *p0, const uint8_t *p1,
                            const float *s0, const float *s1, int64_t G, int64_t gs, float *r0, float *r1) {
    const int16_t *x = (const int16_t *)xv;
    if (wide) {
        if (mb == 1) codes_i16_rows(x, ldx, 1, 1, p0, p1, s0, s1, G, gs, r0, r1);
        else codes_i16_rows(x, ldx, 2, 1, p0, p1, s0, s1, G, gs, r0, r1);
    } else {
        if (mb == 1) codes_i16_rows(x, ldx, 1, 0, p0, p1, s0, s1, G, gs, r0, r1);
        else codes_i16_rows(x, ldx, 2, 0, p0, p1, s0, s1, G, gs, r0, r1);
    }
}
#endif

/* ---------------------------------------------------------------------------------------------------
 * Per-token int8 quantization of activations with LLM.int8()'s outlier columns (kernels/int8.py,
 * bit-identical to runtime.activations.quantize_rows): x (M x K, row stride ldx) in fp32 / bf16 / fp16
 * (in_kind 0 / 1 / 2). A column is an outlier column when any |x| >= threshold in it (threshold > 0);
 * the absmax of a row is the max |x| of its elements below the threshold; codes are
 * round-half-even(x * (127 / absmax)) in fp32 (0 for an all-zero row), 0 in the outlier columns.
 * code_kind: 0 int8, 1 uint8 code + 128, 2 fp32, 3 the fake-quantized activations code * (absmax / 127) in x's
 * type with the outlier columns as x (bit-identical to runtime.activations.fake_quantize_int8_token). flags (K bytes, out): 1 for the outlier columns; cols (K
 * int64, out): their indices, ascending. Returns their number, or -1 if a thread buffer could not be allocated.
 */
static inline float load_x(const void *x, int64_t i, int kind) {
    if (kind == 0) return ((const float *)x)[i];
    uint16_t h = ((const uint16_t *)x)[i];
    if (kind == 1) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}

static void row_to_f32(const void *x, int64_t K, int kind, float *dst) {  /* a row of x (fp32 / bf16 / fp16) as fp32 */
    if (kind == 0) {
        memcpy(dst, x, (size_t)K * sizeof(float));
        return;
    }
    const uint16_t *h = (const uint16_t *)x;
    (void)h;  /* (a build without vectors widens element by element) */
    int64_t k = 0;
    if (kind == 1) {
#if defined(__AVX512F__)
        for (; k + 16 <= K; k += 16)
            _mm512_storeu_ps(dst + k, _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(h + k))), 16)));
#elif defined(__AVX2__)
        for (; k + 8 <= K; k += 8)
            _mm256_storeu_ps(dst + k, _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + k))), 16)));
#endif
    } else {
#if defined(__AVX512F__)
        for (; k + 16 <= K; k += 16) _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + k))));
#elif defined(__F16C__)
        for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + k))));
#endif
    }
    for (; k < K; k++) dst[k] = load_x(x, k, kind);
}

#if defined(__AVX2__)
static inline float max_lanes8(__m256 v) {  /* the largest of 8 non-negative floats (NaN lanes never get in) */
    float lanes[8], a = 0.0f;
    _mm256_storeu_ps(lanes, v);
    for (int i = 0; i < 8; i++) a = lanes[i] > a ? lanes[i] : a;
    return a;
}
#endif

/* The per-token quantization of one row read in place, element by element from channel k on (the vector forms'
 * tails, and the whole row in builds without vectors). qt_codes_from: the codes (see qt_codes). qt_absmax_from: the
 * largest |x| below the threshold, starting from a, the columns at or above it marked in mine. */
static void qt_codes_from(const void *x, int kind, int64_t k, int64_t K, float mul, const uint8_t *flags,
                          float threshold, int code_kind, int8_t *c) {
    for (; k < K; k++) {
        const float xv = load_x(x, k, kind);
        const float v = (flags && flags[k]) || (threshold > 0.0f && fabsf(xv) >= threshold) ? 0.0f : nearbyintf(xv * mul);
        c[k] = code_kind == 1 ? (int8_t)(uint8_t)((int32_t)v + 128) : (int8_t)(int32_t)v;
    }
}

static float qt_absmax_from(const void *x, int kind, int64_t k, int64_t K, float threshold, uint8_t *mine, float a) {
    for (; k < K; k++) {
        const float v = fabsf(load_x(x, k, kind));
        if (threshold > 0.0f && v >= threshold) mine[k] = 1;
        else a = v > a ? v : a;
    }
    return a;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HFQ_QT_VEC 1
static inline __m512 qt_load(const void *x, int64_t k, int kind) {  /* 16 values of a row (fp32 / bf16 / fp16) */
    if (kind == 0) return _mm512_loadu_ps((const float *)x + k);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + k));
    return kind == 1 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

/* The codes of a row, 16 at a time: the same fp32 product as the scalar loop of hfq_quant_tokens, rounded half to
 * even by vcvtps2dq as nearbyintf rounds it, truncated to a byte as its casts (a NaN or out-of-range product: the
 * integer 0x80000000 both ways). Code 0 for the outlier columns: those of flags (none when NULL), and with threshold
 * > 0 those where this row's |x| >= threshold (NaN never). x: a row of kind (0 fp32, 1 bf16, 2 fp16). code_kind 1:
 * + 128 as uint8. */
static void qt_codes(const void *x, int kind, int64_t K, float mul, const uint8_t *flags, float threshold,
                     int code_kind, int8_t *c) {
    const __m512 vm = _mm512_set1_ps(mul), th = _mm512_set1_ps(threshold);
    const __m512i off = _mm512_set1_epi32(code_kind == 1 ? 128 : 0);
    const __mmask16 on = threshold > 0.0f ? 0xFFFF : 0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512 v = qt_load(x, k, kind);
        __mmask16 keep = (__mmask16)~_mm512_mask_cmp_ps_mask(on, _mm512_abs_ps(v), th, _CMP_GE_OQ);
        if (flags)
            keep &= _mm_testn_epi8_mask(_mm_loadu_si128((const __m128i *)(flags + k)),
                                        _mm_loadu_si128((const __m128i *)(flags + k)));
        const __m512i q = _mm512_maskz_cvtps_epi32(keep, _mm512_mul_ps(v, vm));
        _mm_storeu_si128((__m128i *)(c + k), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, off)));
    }
    qt_codes_from(x, kind, k, K, mul, flags, threshold, code_kind, c);
}

/* max |x| over the columns of a row where |x| < threshold (all of them with threshold 0), read in place, and those
 * columns where |x| >= threshold marked in mine: the same max operations in the same order as on the widened row
 * (so the same absmax as torch's amax, NaN lanes as before). */
static float qt_absmax(const void *x, int kind, int64_t K, float threshold, uint8_t *mine) {
    __m512 am = _mm512_setzero_ps();
    const __m512 th = _mm512_set1_ps(threshold);
    const __mmask16 on = threshold > 0.0f ? 0xFFFF : 0;  /* threshold 0: no outliers */
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512 v = _mm512_abs_ps(qt_load(x, k, kind));
        const __mmask16 out = _mm512_mask_cmp_ps_mask(on, v, th, _CMP_GE_OQ);
        if (out)
            _mm_storeu_si128((__m128i *)(mine + k), _mm_or_si128(_mm_loadu_si128((const __m128i *)(mine + k)),
                                                                 _mm_maskz_set1_epi8(out, 1)));
        am = _mm512_mask_max_ps(am, (__mmask16)~out, am, v);
    }
    float a = _mm512_reduce_max_ps(am);
    return qt_absmax_from(x, kind, k, K, threshold, mine, a);
}
#elif defined(__AVX2__) && defined(__F16C__)
#define HFQ_QT_VEC 1
/* The same two functions 8 lanes at a time (AVX2 + F16C): the same values (vcvtps2dq, the low byte of each integer). */
static inline __m256 qt_load(const void *x, int64_t k, int kind) {
    if (kind == 0) return _mm256_loadu_ps((const float *)x + k);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + k));
    return kind == 1 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

static void qt_codes(const void *x, int kind, int64_t K, float mul, const uint8_t *flags, float threshold,
                     int code_kind, int8_t *c) {
    const __m256 vm = _mm256_set1_ps(mul), th = _mm256_set1_ps(threshold), sign = _mm256_set1_ps(-0.0f);
    const __m256i off = _mm256_set1_epi32(code_kind == 1 ? 128 : 0);
    const __m256i low = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                         0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 v = qt_load(x, k, kind);
        __m256 drop = threshold > 0.0f ? _mm256_cmp_ps(_mm256_andnot_ps(sign, v), th, _CMP_GE_OQ) : _mm256_setzero_ps();
        if (flags)
            drop = _mm256_or_ps(drop, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(flags + k))), _mm256_setzero_si256())));
        const __m256i q = _mm256_andnot_si256(_mm256_castps_si256(drop), _mm256_cvtps_epi32(_mm256_mul_ps(v, vm)));
        const __m256i b = _mm256_shuffle_epi8(_mm256_add_epi32(q, off), low);  /* the low byte of each integer */
        _mm_storel_epi64((__m128i *)(c + k), _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
    }
    qt_codes_from(x, kind, k, K, mul, flags, threshold, code_kind, c);
}

static float qt_absmax(const void *x, int kind, int64_t K, float threshold, uint8_t *mine) {
    const __m256 th = _mm256_set1_ps(threshold), sign = _mm256_set1_ps(-0.0f);
    __m256 am = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_andnot_ps(sign, qt_load(x, k, kind));
        if (threshold > 0.0f) {
            const __m256 out = _mm256_cmp_ps(v, th, _CMP_GE_OQ);
            const int bits = _mm256_movemask_ps(out);
            if (bits) {
                for (int j = 0; j < 8; j++)
                    if (bits >> j & 1) mine[k + j] = 1;
                am = _mm256_max_ps(am, _mm256_andnot_ps(out, v));  /* the outliers' lanes as 0: no change */
                continue;
            }
        }
        am = _mm256_max_ps(am, v);
    }
    return qt_absmax_from(x, kind, k, K, threshold, mine, max_lanes8(am));  /* NaN lanes never get in, as there */
}
#else
#define HFQ_QT_VEC 0
#endif

int64_t hfq_quant_tokens(const void *x, int64_t M, int64_t K, int64_t ldx, int in_kind, float threshold,
                         void *codes, int code_kind, float *absmax, uint8_t *flags, int64_t *cols, int nthreads) {
    const int64_t esize = in_kind == 0 ? 4 : 2;
    int failed = 0;
    memset(flags, 0, (size_t)K);
    if (M < 64) nthreads = 1;  /* a few rows: one thread, no fork/join */
    /* codes (not fake quantization): each row's absmax and codes in one pass, the row read in place twice (from L1 / L2
     * the second time, where two passes over x read it from memory twice); a row's absmax and its own outliers are
     * its own, so only the outlier columns other rows found are left: their codes are zeroed at the end */
    const int fused = HFQ_QT_VEC && code_kind <= 1;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)malloc((size_t)K * sizeof(float));
        uint8_t *mine = (uint8_t *)calloc((size_t)K, 1);
        if (!buf || !mine) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        int ok;
#pragma omp atomic read
        ok = failed;
        ok = !ok;
        if (ok) {  /* every thread takes the same branch: the worksharing loops below are met by all or none */
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) {  /* pass 1: absmax below the threshold, outlier columns */
#if HFQ_QT_VEC
                const void *xr = (const char *)x + m * ldx * esize;
                const float a = absmax[m] = qt_absmax(xr, in_kind, K, threshold, mine);
                if (fused)
                    qt_codes(xr, in_kind, K, a > 0.0f ? (1.0f / a) * 127.0f : 0.0f, NULL, threshold, code_kind,
                             (int8_t *)codes + m * K);
#else
                absmax[m] = qt_absmax_from((const char *)x + m * ldx * esize, in_kind, 0, K, threshold, mine, 0.0f);
#endif
            }
#pragma omp critical
            for (int64_t k = 0; k < K; k++) flags[k] |= mine[k];
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) {  /* pass 2: the codes */
                if (fused) continue;
                const float a = absmax[m], mul = a > 0.0f ? (1.0f / a) * 127.0f : 0.0f;  /* as torch: 127 / t is reciprocal(t) * 127 */
                row_to_f32((const char *)x + m * ldx * esize, K, in_kind, buf);
                if (threshold > 0.0f)
                    for (int64_t k = 0; k < K; k++) buf[k] = flags[k] ? 0.0f : nearbyintf(buf[k] * mul);
                else
                    for (int64_t k = 0; k < K; k++) buf[k] = nearbyintf(buf[k] * mul);
                if (code_kind == 3) {  /* fake quantization: code * (absmax / 127), outlier columns as x, in x's type */
                    const float s = a / 127.0f;
                    const char *xr = (const char *)x + m * ldx * esize;
                    for (int64_t k = 0; k < K; k++)  /* (int32_t): a code of -0.0 is the integer 0, +0.0 once scaled */
                        buf[k] = threshold > 0.0f && flags[k] ? load_x(xr, k, in_kind) : (float)(int32_t)buf[k] * s;
                    store_row(buf, (char *)codes + m * K * esize, K, in_kind);
                } else if (code_kind == 2) {
                    memcpy((float *)codes + m * K, buf, (size_t)K * 4);
                } else if (code_kind == 1) {
                    uint8_t *c = (uint8_t *)codes + m * K;
                    for (int64_t k = 0; k < K; k++) c[k] = (uint8_t)((int32_t)buf[k] + 128);
                } else {
                    int8_t *c = (int8_t *)codes + m * K;
                    for (int64_t k = 0; k < K; k++) c[k] = (int8_t)(int32_t)buf[k];
                }
            }
        }
        free(buf);
        free(mine);
    }
    if (failed) return -1;
    int64_t n = 0;
    for (int64_t k = 0; k < K; k++)
        if (flags[k]) cols[n++] = k;
    if (fused && n > 0)  /* the columns other rows found: code 0 in every row */
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < n; j++) ((int8_t *)codes)[m * K + cols[j]] = code_kind == 1 ? (int8_t)(uint8_t)128 : 0;
    return n;
}

#if defined(__AVX2__) && defined(HFQ_F32_VEC)
/* The row preparation of hfq_codes_i16_gemv, 8 lanes at a time (scalar, it was ~13 us per 4096-wide row on Zen 1:
 * ~10% of a 1024x1024 layer's decode call). Same values as the scalar forms: max is order-independent (a NaN is
 * skipped, as `t > a ? t : a` skips it), vcvtps2dq rounds half to even as nearbyintf does, and the double sums are
 * of the same fp32 values (their order differs, far below the float they are rounded to). */
static float i16_absmax(const float *v, int64_t K) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 am = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) am = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(v + k)), am);
    float a = max_lanes8(am);
    for (; k < K; k++) {
        const float t = fabsf(v[k]);
        a = t > a ? t : a;
    }
    return a;
}

static void i16_codes(const float *v, int64_t K, float mul, int16_t *c) {  /* c = round-half-even(v * mul) */
    const __m256 m = _mm256_set1_ps(mul);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k), m));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k + 8), m));
        _mm256_storeu_si256((__m256i *)(c + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    for (; k < K; k++) c[k] = (int16_t)nearbyintf(v[k] * mul);
}

static float i16_residual(float *v, const int16_t *c, float s, int64_t K) {  /* v -= c * s; the new max |v| */
    const __m256 sv = _mm256_set1_ps(s), sign = _mm256_set1_ps(-0.0f);
    __m256 am = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 cf = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(c + k))));
        const __m256 r = _mm256_fnmadd_ps(cf, sv, _mm256_loadu_ps(v + k));
        _mm256_storeu_ps(v + k, r);
        am = _mm256_max_ps(_mm256_andnot_ps(sign, r), am);
    }
    float a = max_lanes8(am);
    for (; k < K; k++) {
        v[k] = fmaf(-(float)c[k], s, v[k]);
        const float t = fabsf(v[k]);
        a = t > a ? t : a;
    }
    return a;
}

static double i16_sum(const float *v, int64_t n, int squares) {  /* sum of v (or v^2) in double */
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        const __m256 x = _mm256_loadu_ps(v + k);
        __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
        if (squares) lo = _mm256_mul_pd(lo, lo), hi = _mm256_mul_pd(hi, hi);
        s0 = _mm256_add_pd(s0, lo), s1 = _mm256_add_pd(s1, hi);
    }
    double lanes[4], t = 0.0;
    _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
    for (int i = 0; i < 4; i++) t += lanes[i];
    for (; k < n; k++) t += squares ? (double)v[k] * v[k] : (double)v[k];
    return t;
}
#endif

/* The whole decode GEMV on the int16 kernel above, for M <= HFQ_I16_MAX_ROWS rows of x (fp32 / bf16 / fp16, kind
 * x_kind, contiguous): each row written as int16 terms, c1 = round(x * 32767 / absmax) and, where `two` says so
 * (2: always; 1: rows whose absmax passes ratio x their rms make every row take it), c2 of the residual; the
 * per-group sums of x in fp32 for the zero points; then
 *     out[m, n] = s1 r1[m, n] + s2 r2[m, n] - sum_g xsum[m, g] offset[g, n] + bias[n]
 * in fp32 / bf16 / fp16 (out_kind), offset (G x N) = scale * zero or NULL. Returns 0, 1 (not built), 2 (bad group
 * size), 3 (too many rows) or -1 (out of memory). */
#define HFQ_I16_MAX_ROWS 8
int hfq_codes_i16_gemv(const void *x, int x_kind, int64_t M, int64_t K, int two, float ratio, const uint8_t *packed,
                       const float *scale, const float *offset, const float *bias, void *out, int out_kind, int64_t N,
                       int64_t G, int64_t gs, int wide, int nthreads) {
#if defined(__AVX2__) && defined(HFQ_F32_VEC)
    if (gs <= 0 || gs % (wide ? 16 : 32) != 0 || G * gs != K) return 2;
    if (M > HFQ_I16_MAX_ROWS) return 3;
    if (M <= 0) return 0;
    const int64_t esize = x_kind == 0 ? 4 : 2;
    float *xf = (float *)malloc((size_t)(M * K) * sizeof(float));
    int16_t *xq = (int16_t *)malloc((size_t)(2 * M * K) * sizeof(int16_t));
    float *xsum = (float *)malloc((size_t)(M * G) * sizeof(float));
    float *r = (float *)malloc((size_t)(2 * M * N) * sizeof(float));
    float sc[2 * HFQ_I16_MAX_ROWS], amax[HFQ_I16_MAX_ROWS];
    int rc = 0;
    if (!xf || !xq || !xsum || !r) { rc = -1; goto done; }
    int terms = two == 2 ? 2 : 1;
    for (int64_t m = 0; m < M; m++) {
        float *v = xf + m * K;
        row_to_f32((const char *)x + m * K * esize, K, x_kind, v);
        const float a = i16_absmax(v, K);
        amax[m] = a;
        sc[m] = a / 32767.0f;
        if (two == 1 && terms == 1) {  /* the rms decides only while every row so far takes one term */
            const double ss = i16_sum(v, K, 1);
            if ((double)a > ratio * sqrt(ss / (double)K)) terms = 2;
        }
        for (int64_t g = 0; g < G; g++)  /* the zero points' term is about zero / (q - zero) times the result: sum x exactly */
            xsum[m * G + g] = (float)i16_sum(v + g * gs, gs, 0);
    }
    for (int64_t m = 0; m < M; m++) {
        float *v = xf + m * K;
        const float mul = amax[m] > 0.0f ? 32767.0f / amax[m] : 0.0f;
        int16_t *c = xq + m * K;
        i16_codes(v, K, mul, c);
        if (terms == 2) {  /* the residual's codes: rows M.. of xq; v is overwritten (x is not needed after) */
            const float a2 = i16_residual(v, c, sc[m], K);
            sc[M + m] = a2 / 32767.0f;
            i16_codes(v, K, a2 > 0.0f ? 32767.0f / a2 : 0.0f, xq + (M + m) * K);
        }
    }
    codes_gemm(xq, 2, terms * M, K, packed, scale, NULL, NULL, r, N, G, gs, 0, wide, nthreads, HFQ_IMB,
               codes_i16_block);
    /* the epilogue in column chunks: each chunk's rows of offset are read contiguously, once per row of x */
    const int64_t chunk = 512, chunks = (N + chunk - 1) / chunk;
    if (M * N * G < (1 << 17)) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t n0 = c * chunk, nn = N - n0 < chunk ? N - n0 : chunk;
        float t[512];
        for (int64_t m = 0; m < M; m++) {
            const float *r1 = r + m * N + n0, *r2 = r + (M + m) * N + n0;
            for (int64_t j = 0; j < nn; j++) t[j] = sc[m] * r1[j] + (bias ? bias[n0 + j] : 0.0f);
            if (terms == 2)
                for (int64_t j = 0; j < nn; j++) t[j] += sc[M + m] * r2[j];
            if (offset)
                for (int64_t g = 0; g < G; g++) {
                    const float xs = xsum[m * G + g], *o = offset + g * N + n0;
                    for (int64_t j = 0; j < nn; j++) t[j] -= xs * o[j];
                }
            store_row(t, (char *)out + (m * N + n0) * out_size(out_kind), nn, out_kind);
        }
    }
done:
    free(xf); free(xq); free(xsum); free(r);
    return rc;
#else
    (void)x; (void)x_kind; (void)M; (void)K; (void)two; (void)ratio; (void)packed; (void)scale; (void)offset;
    (void)bias; (void)out; (void)out_kind; (void)N; (void)G; (void)gs; (void)wide; (void)nthreads;
    return 1;
#endif
}

/* x rounded to the activation type (kind 0 fp32, 1 bf16, 2 fp16) and back to fp32. */
static inline float round_to(float v, int kind) {
    if (kind == 1) {
        const uint32_t u = (uint32_t)f32_to_bf16(v) << 16;
        memcpy(&v, &u, 4);
        return v;
    }
    if (kind == 2) return (float)(_Float16)v;
    return v;
}

#define HFQ_FIN_ROWS 16
/* The epilogue of the CPU int8 GEMMs: out[m, n] = y[m, n] * (absmax[m] / 127) + bias[n] (if any)
 * + sum_j x[m, cols[j]] * w_j[n] (the outlier columns' product, if n_out > 0), in fp32 / bf16 / fp16
 * (out_kind 0 / 1 / 2; x of x_kind, row stride ldx). w_j[n] = wq_t[cols[j], n] * ws[n] rounded to the output
 * type (the weight as the activation dtype holds it), read straight from the transposed int8 codes wq_t
 * (K x N): n_out rows of N bytes, no gathered float copy. Column chunks of 256 and row blocks of 16: each
 * decoded chunk serves 16 rows. Returns 1 (nothing written) if a column index is outside [0, K). */
int hfq_finish_tokens(const float *y, int64_t M, int64_t N, const float *absmax, const float *bias,
                      const void *x, int64_t ldx, int x_kind, const int8_t *wq_t, int64_t K, const int64_t *cols,
                      const float *ws, const float *wc, int64_t n_out, void *out, int out_kind, int nthreads) {
    for (int64_t o = 0; o < n_out; o++)
        if (cols[o] < 0 || cols[o] >= K) return 1;
    const int64_t chunks = (N + 255) / 256, blocks = (M + HFQ_FIN_ROWS - 1) / HFQ_FIN_ROWS;
    const int64_t esize = x_kind == 0 ? 4 : 2;
    if (M * N * (1 + n_out) < (1 << 17)) nthreads = 1;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < chunks; c++) {
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = c * 256, nn = N - n0 < 256 ? N - n0 : 256;
            const int64_t m0 = b * HFQ_FIN_ROWS, mm = M - m0 < HFQ_FIN_ROWS ? M - m0 : HFQ_FIN_ROWS;
            float tmp[HFQ_FIN_ROWS][256], w[256];
            for (int64_t i = 0; i < mm; i++) {
                const float sx = absmax[m0 + i] / 127.0f;
                const float *ym = y + (m0 + i) * N + n0;
                if (bias)
                    for (int64_t j = 0; j < nn; j++) tmp[i][j] = ym[j] * sx + bias[n0 + j];
                else
                    for (int64_t j = 0; j < nn; j++) tmp[i][j] = ym[j] * sx;
            }
            for (int64_t o = 0; o < n_out; o++) {
                const float *wr = w;
                if (wc) {  /* the caller's cached W_hat rows of the outlier columns (fp32, already rounded) */
                    wr = wc + o * N + n0;
                } else {
                    const int8_t *q = wq_t + cols[o] * N + n0;
                    for (int64_t j = 0; j < nn; j++) w[j] = (float)q[j] * ws[n0 + j];
                    if (out_kind)
                        for (int64_t j = 0; j < nn; j++) w[j] = round_to(w[j], out_kind);
                }
                for (int64_t i = 0; i < mm; i++) {
                    const float v = load_x((const char *)x + (m0 + i) * ldx * esize, cols[o], x_kind);
                    for (int64_t j = 0; j < nn; j++) tmp[i][j] += v * wr[j];
                }
            }
            for (int64_t i = 0; i < mm; i++)
                store_row(tmp[i], (char *)out + ((m0 + i) * N + n0) * out_size(out_kind), nn, out_kind);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------
 * 1-bit (sign) layers: w = (q - 1/2) * scale, q one bit per weight (code i of a row in bit i % 8 of byte
 * i / 8: hf_quant/core/packing.py), scale per group of gs channels. With P_g the sum of the activations of
 * group g whose bit is set and S_g the sum of all of them,
 *     y[m, n] = sum_g scale[n, g] * (P_g - S_g / 2)
 * so the inner loop only adds: AVX-512, acc += x under a write mask made from the packed bits
 * (a 32-bit word of codes broadcast to every lane and tested against each lane's bit: two 16-lane masks);
 * AVX2, acc += x AND a lane mask looked up from a table of the 256 bytes. x (M x K,
 * row stride ldx, fp32 / bf16 / fp16: x_kind 0 / 1 / 2) is widened to fp32 once per call into `work`
 * (M * K floats, unless x is contiguous fp32) followed by -S_g / 2 per row and group (M * G floats), which
 * starts each group's accumulator (its lane 0). Every sum is fp32. HFQ_SNR weight rows and up to HFQ_SMB_*
 * activation rows per pass; weight rows in blocks of HFQ_SNR over the threads. out (M x N): out_kind 0 fp32,
 * 1 bf16, 2 fp16, rounded once; bias (N fp32) or NULL.
 */
#if defined(__AVX512F__) || defined(__AVX2__)
#define HFQ_SIGN 1
#define HFQ_SNR 4
#ifndef HFQ_SPF
#define HFQ_SPF 4096
#endif
#if defined(__AVX512F__)
#define HFQ_SVW 16
#define HFQ_SMB_ROWS 6  /* 24 accumulators of 32 zmm registers */
#define HFQ_SMB_GROUPS 3  /* accumulators and per-group totals: 24 */
typedef __m512 hfq_sv;
typedef __mmask16 hfq_sm;
static inline hfq_sv s_zero(void) { return _mm512_setzero_ps(); }
static inline hfq_sv s_first(float v) { return _mm512_zextps128_ps512(_mm_set_ss(v)); }
static inline hfq_sv s_load(const float *p) { return _mm512_loadu_ps(p); }
static inline hfq_sv s_add(hfq_sv a, hfq_sv b) { return _mm512_add_ps(a, b); }
static inline hfq_sv s_fma(hfq_sv a, float s, hfq_sv c) { return _mm512_fmadd_ps(a, _mm512_set1_ps(s), c); }
static inline float s_hsum(hfq_sv v) { return _mm512_reduce_add_ps(v); }
/* The masks come from a vector test, not a kmov from a general register (Zen 4: the kmov bounds the loop at half
 * the adds' rate): the packed word broadcast to every lane (a load) and tested against bit l in lane l. */
static inline __m512i s_lane_bits(int shift) {
    return _mm512_sllv_epi32(_mm512_set1_epi32(1 << shift),
                             _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
}
static inline void s_mask2(const uint8_t *p, hfq_sm *k0, hfq_sm *k1) {  /* 32 codes: lanes of two vectors */
    int32_t b;
    memcpy(&b, p, 4);
    const __m512i w = _mm512_set1_epi32(b);
    *k0 = _mm512_test_epi32_mask(w, s_lane_bits(0));
    *k1 = _mm512_test_epi32_mask(w, s_lane_bits(16));
}
static inline hfq_sm s_mask(const uint8_t *p) {  /* 16 codes (a group's last 16) */
    uint16_t b;
    memcpy(&b, p, 2);
    return _mm512_test_epi32_mask(_mm512_set1_epi32(b), s_lane_bits(0));
}
static inline hfq_sv s_addm(hfq_sv acc, hfq_sm k, hfq_sv x) { return _mm512_mask_add_ps(acc, k, acc, x); }
#else
#define HFQ_SVW 8
#define HFQ_SMB_ROWS 2  /* 16 ymm registers: 8 accumulators, 4 masks */
#define HFQ_SMB_GROUPS 1
typedef __m256 hfq_sv;
typedef __m256 hfq_sm;
#define HFQ_B1(b) -((b) & 1), -((b) >> 1 & 1), -((b) >> 2 & 1), -((b) >> 3 & 1), -((b) >> 4 & 1), -((b) >> 5 & 1), \
    -((b) >> 6 & 1), -((b) >> 7 & 1)
#define HFQ_B4(b) HFQ_B1(b), HFQ_B1((b) + 1), HFQ_B1((b) + 2), HFQ_B1((b) + 3)
#define HFQ_B16(b) HFQ_B4(b), HFQ_B4((b) + 4), HFQ_B4((b) + 8), HFQ_B4((b) + 12)
#define HFQ_B64(b) HFQ_B16(b), HFQ_B16((b) + 16), HFQ_B16((b) + 32), HFQ_B16((b) + 48)
/* lane l of entry b: all ones where bit l of b is set */
static const int32_t hfq_bit_lanes[256 * 8] __attribute__((aligned(32))) = {
    HFQ_B64(0), HFQ_B64(64), HFQ_B64(128), HFQ_B64(192)};
static inline hfq_sv s_zero(void) { return _mm256_setzero_ps(); }
static inline hfq_sv s_first(float v) { return _mm256_zextps128_ps256(_mm_set_ss(v)); }
static inline hfq_sv s_load(const float *p) { return _mm256_loadu_ps(p); }
static inline hfq_sv s_add(hfq_sv a, hfq_sv b) { return _mm256_add_ps(a, b); }
static inline hfq_sv s_fma(hfq_sv a, float s, hfq_sv c) {
#if defined(__FMA__)
    return _mm256_fmadd_ps(a, _mm256_set1_ps(s), c);
#else
    return _mm256_add_ps(_mm256_mul_ps(a, _mm256_set1_ps(s)), c);
#endif
}
static inline float s_hsum(hfq_sv v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline hfq_sm s_mask(const uint8_t *p) { return _mm256_load_ps((const float *)(hfq_bit_lanes + 8 * *p)); }
static inline void s_mask2(const uint8_t *p, hfq_sm *k0, hfq_sm *k1) { *k0 = s_mask(p), *k1 = s_mask(p + 1); }
static inline hfq_sv s_addm(hfq_sv acc, hfq_sm k, hfq_sv x) { return _mm256_add_ps(acc, _mm256_and_ps(k, x)); }
#endif
#define HFQ_SMB (HFQ_SMB_ROWS > HFQ_SMB_GROUPS ? HFQ_SMB_ROWS : HFQ_SMB_GROUPS)

/* Weight rows p[0..HFQ_SNR) (scales s[r], G per row) against activation rows x[0..mb) (stride K, fp32), hx their
 * -S_g / 2 (stride G): res[r][m] = sum_g s[r][g] (P_g - S_g / 2). grouped: per-group totals (an FMA per group);
 * else one group, its scale applied to the sum. Two vectors of channels per step (one 32-bit word of codes per
 * row); one activation row: the second vector's adds go to their own accumulators (c), so that an add never
 * waits for the one before it. */
static inline __attribute__((always_inline)) void sign_rows(
        const float *x, int64_t K, const float *hx, const int mb, const int grouped, const uint8_t *const *p,
        const float *const *s, int64_t G, int64_t gs, float res[HFQ_SNR][HFQ_SMB]) {
    hfq_sv acc[HFQ_SNR][HFQ_SMB], tot[HFQ_SNR][HFQ_SMB], c[HFQ_SNR];
    const int split = mb == 1;
    if (grouped)
        for (int r = 0; r < HFQ_SNR; r++)
            for (int m = 0; m < mb; m++) tot[r][m] = s_zero();
    const int64_t gbytes = gs / 8;
    for (int64_t g = 0; g < G; g++) {
        for (int m = 0; m < mb; m++) {
            const hfq_sv h = s_first(hx[m * G + g]);
            for (int r = 0; r < HFQ_SNR; r++) acc[r][m] = h;
        }
        if (split)
            for (int r = 0; r < HFQ_SNR; r++) c[r] = s_zero();
        const float *xg = x + g * gs;
        const uint8_t *q[HFQ_SNR];
        for (int r = 0; r < HFQ_SNR; r++) q[r] = p[r] + g * gbytes;
        int64_t j = 0;
        for (; j + 2 * HFQ_SVW <= gs; j += 2 * HFQ_SVW) {
#if HFQ_SPF
            if (((g * gs + j) & 511) == 0)  /* a cache line of each row, HFQ_SPF bytes ahead: the bits stream from memory */
                for (int r = 0; r < HFQ_SNR; r++) _mm_prefetch((const char *)(q[r] + j / 8) + HFQ_SPF, _MM_HINT_T0);
#endif
            hfq_sm k0[HFQ_SNR], k1[HFQ_SNR];
            for (int r = 0; r < HFQ_SNR; r++) s_mask2(q[r] + j / 8, &k0[r], &k1[r]);
            for (int m = 0; m < mb; m++) {
                hfq_sv x0 = s_load(xg + m * K + j), x1 = s_load(xg + m * K + j + HFQ_SVW);
                __asm__("" : "+v"(x0), "+v"(x1));  /* loaded once for all rows, never folded into each add */
                for (int r = 0; r < HFQ_SNR; r++) {
                    acc[r][m] = s_addm(acc[r][m], k0[r], x0);
                    if (split) c[r] = s_addm(c[r], k1[r], x1);
                    else acc[r][m] = s_addm(acc[r][m], k1[r], x1);
                }
            }
        }
        if (j < gs) {  /* a last single vector */
            hfq_sm k[HFQ_SNR];
            for (int r = 0; r < HFQ_SNR; r++) k[r] = s_mask(q[r] + j / 8);
            for (int m = 0; m < mb; m++) {
                const hfq_sv xv = s_load(xg + m * K + j);
                for (int r = 0; r < HFQ_SNR; r++) acc[r][m] = s_addm(acc[r][m], k[r], xv);
            }
        }
        if (split)
            for (int r = 0; r < HFQ_SNR; r++) acc[r][0] = s_add(acc[r][0], c[r]);
        if (grouped)
            for (int r = 0; r < HFQ_SNR; r++)
                for (int m = 0; m < mb; m++) tot[r][m] = s_fma(acc[r][m], s[r][g], tot[r][m]);
    }
    for (int r = 0; r < HFQ_SNR; r++)
        for (int m = 0; m < mb; m++) res[r][m] = grouped ? s_hsum(tot[r][m]) : s_hsum(acc[r][m]) * s[r][0];
}

static void sign_block(const float *x, int64_t K, const float *hx, int mb, const uint8_t *const *p,
                       const float *const *s, int64_t G, int64_t gs, float res[HFQ_SNR][HFQ_SMB]) {
    /* a constant row count per call: the accumulators stay in registers */
#define HFQ_S(k, GR) case k: sign_rows(x, K, hx, k, GR, p, s, G, gs, res); break;
    if (G > 1) {
        switch (mb) {
#if HFQ_SMB_GROUPS >= 3
        HFQ_S(3, 1) HFQ_S(2, 1)
#endif
        default: sign_rows(x, K, hx, 1, 1, p, s, G, gs, res);
        }
    } else {
        switch (mb) {
#if HFQ_SMB_ROWS >= 6
        HFQ_S(6, 0) HFQ_S(5, 0) HFQ_S(4, 0) HFQ_S(3, 0)
#endif
        HFQ_S(2, 0)
        default: sign_rows(x, K, hx, 1, 0, p, s, G, gs, res);
        }
    }
#undef HFQ_S
}
#endif

int hfq_sign_vector_width(void) {
#if defined(HFQ_SIGN)
    return HFQ_SVW;
#else
    return 0;
#endif
}

/* Returns 0; 1 where this build has no vector sign kernel (neither AVX-512F nor AVX2); 2 for a group size that
 * is not a multiple of the vector width or does not divide K. work: at least M * K + M * G floats. */
int hfq_sign_gemm(const void *x, int64_t M, int64_t K, int64_t ldx, int x_kind, const uint8_t *bits,
                  const float *scale, const float *bias, void *out, int64_t N, int64_t G, int64_t gs, int out_kind,
                  float *work, int nthreads) {
#if defined(HFQ_SIGN)
    if (gs <= 0 || gs % HFQ_SVW != 0 || G * gs != K) return 2;
    const int direct = x_kind == 0 && (ldx == K || M == 1);  /* contiguous fp32: no copy */
    const float *xf = direct ? (const float *)x : work;
    float *hx = work + (direct ? 0 : M * K);
    const int64_t esize = x_kind == 0 ? 4 : 2, row_bytes = K / 8, blocks = (N + HFQ_SNR - 1) / HFQ_SNR;
    const int mb_max = G > 1 ? HFQ_SMB_GROUPS : HFQ_SMB_ROWS;
    if (M * K < (1 << 14) && blocks * M * K < (1 << 18)) nthreads = 1;  /* a tiny product: no fork/join */
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {  /* widen, and -S_g / 2 per group */
            float *dst = (float *)xf + m * K;
            if (!direct) row_to_f32((const char *)x + m * ldx * esize, K, x_kind, dst);
            for (int64_t g = 0; g < G; g++) {
                hfq_sv a = s_zero();
                for (int64_t j = 0; j < gs; j += HFQ_SVW) a = s_add(a, s_load(xf + m * K + g * gs + j));
                hx[m * G + g] = -0.5f * s_hsum(a);
            }
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = b * HFQ_SNR;
            const int nr = (int)(N - n0 < HFQ_SNR ? N - n0 : HFQ_SNR);
            const uint8_t *p[HFQ_SNR];
            const float *s[HFQ_SNR];
            for (int r = 0; r < HFQ_SNR; r++) {  /* a short last block repeats its last row, once discarded */
                const int64_t n = n0 + (r < nr ? r : nr - 1);
                p[r] = bits + n * row_bytes;
                s[r] = scale + n * G;
            }
            for (int64_t m0 = 0; m0 < M; m0 += mb_max) {
                const int mb = (int)(M - m0 < mb_max ? M - m0 : mb_max);
                float res[HFQ_SNR][HFQ_SMB];
                sign_block(xf + m0 * K, K, hx + m0 * G, mb, p, s, G, gs, res);
                for (int m = 0; m < mb; m++) {
                    for (int r = 0; r < nr; r++) {
                        const int64_t i = (m0 + m) * N + n0 + r;
                        const float v = res[r][m] + (bias ? bias[n0 + r] : 0.0f);
                        if (out_kind == 0) ((float *)out)[i] = v;
                        else if (out_kind == 1) ((uint16_t *)out)[i] = f32_to_bf16(v);
                        else {
                            const _Float16 h = (_Float16)v;
                            memcpy((uint16_t *)out + i, &h, 2);
                        }
                    }
                }
            }
        }
    }
    return 0;
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)x_kind; (void)bits; (void)scale; (void)bias; (void)out; (void)N;
    (void)G; (void)gs; (void)out_kind; (void)work; (void)nthreads;
    return 1;
#endif
}

/* The dequantized 1-bit weight out (N x K) = +-scale / 2 (set bit: +), in out_kind (0 fp32, 1 bf16, 2 fp16),
 * rounded once from fp32: for the GEMM of many rows. Groups of gs channels (gs a multiple of 8). Returns 1 if
 * a row buffer could not be allocated. */
int hfq_sign_dequant(const uint8_t *bits, const float *scale, void *out, int64_t N, int64_t K, int64_t gs,
                     int kind, int nthreads) {
    const int64_t G = K / gs, row_bytes = K / 8;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
#if defined(__AVX512F__)
        const int direct = gs % 16 == 0;
#else
        const int direct = 0;
#endif
        float *buf = direct ? NULL : (float *)malloc((size_t)K * sizeof(float));
        if (!direct && !buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *q = bits + n * row_bytes;
            const float *sc = scale + n * G;
#if defined(__AVX512BW__)
            if (kind != 0 && gs % 32 == 0) {  /* 16-bit outputs: +-h rounded once per group, then 32 lanes a blend */
                for (int64_t g = 0; g < G; g++) {
                    const float h = 0.5f * sc[g];
                    uint16_t hb;
                    if (kind == 1) {
                        hb = f32_to_bf16(h);
                    } else {
                        const _Float16 hh = (_Float16)h;
                        memcpy(&hb, &hh, 2);
                    }
                    /* round to nearest even is symmetric: -h rounds to the negated bits */
                    const __m512i pos = _mm512_set1_epi16((short)hb), neg = _mm512_set1_epi16((short)(hb ^ 0x8000u));
                    for (int64_t j = g * gs; j < (g + 1) * gs; j += 32) {
                        uint32_t b;
                        memcpy(&b, q + j / 8, 4);
                        _mm512_storeu_si512((void *)((uint16_t *)out + n * K + j),
                                            _mm512_mask_blend_epi16(_cvtu32_mask32(b), neg, pos));
                    }
                }
                continue;
            }
#endif
#if defined(__AVX512F__)
            if (direct) {
                for (int64_t g = 0; g < G; g++) {
                    const __m512 pos = _mm512_set1_ps(0.5f * sc[g]), neg = _mm512_set1_ps(-0.5f * sc[g]);
                    for (int64_t j = g * gs; j < (g + 1) * gs; j += 16) {
                        uint16_t b;
                        memcpy(&b, q + j / 8, 2);
                        put16(_mm512_mask_blend_ps(_cvtu32_mask16(b), neg, pos), out, n * K + j, kind);
                    }
                }
                continue;
            }
#endif
            if (!buf) continue;
            for (int64_t g = 0; g < G; g++) {
                const float h = 0.5f * sc[g];
                for (int64_t j = g * gs; j < (g + 1) * gs; j++) buf[j] = (q[j >> 3] >> (j & 7)) & 1 ? h : -h;
            }
            store_row(buf, (char *)out + n * K * out_size(kind), K, kind);
        }
        free(buf);
    }
    return failed;
}

/* ---------------------------------------------------------------------------------------------------
 * Exact int8 GEMM for the int8_token scheme (LLM.int8 / dynamic W8A8), AVX-512 VNNI (`vpdpbusd`: 64
 * u8 x s8 products per instruction, summed in fours into int32 lanes, no saturation).
 *     acc[m, n] = sum_k a[m, k] * w[n, k],   a = the per-token codes + 128 (uint8), w = int8 codes,
 * so acc - comp[n] with comp[n] = 128 * sum_k w[n, k] is the exact int32 product of the signed codes.
 * Packed weight (hfq_int8_pack): blocks of HFQ_I8_NR = 64 output rows, each (K/4, 64, 4) bytes: the four
 * codes k..k+3 of each row side by side, so one 64-byte load holds 16 rows' four codes and one k step of a
 * block is 256 contiguous bytes; rows past N are zero. Microkernel: HFQ_I8_MR = 6 rows of a x 64 columns in
 * 24 zmm accumulators over the whole of K (the block's panel, K * 64 bytes, stays in L2 while the rows of a
 * pass over it), named variables (gcc spills an array of vectors to the stack). Work: blocks of columns over
 * the threads, each running all rows of a (in chunks of HFQ_I8_A_BYTES, by default in effect one: each byte of
 * a serves 64 products per block, so re-reading a per block costs ~2 GB/s per core even from memory, where
 * re-reading the weight per chunk of 4 MiB cost 1-4% at 512 x 11008). The first tile of a block reads its
 * panel from memory (prefetch HFQ_I8_PREFETCH_FAR ahead), the others from L2 (HFQ_I8_PREFETCH).
 * Epilogue (per tile, from registers): y = float(acc - comp) * ws[n]; without absmax y is written as fp32
 * (out_kind 0); with absmax, hfq_finish_tokens' arithmetic follows in the same pass: y * (absmax[m] / 127)
 * (+ bias[n], one fma as there, + the outlier columns' products, one fma each in the same order), rounded once
 * to out_kind: the same bytes as hfq_finish_tokens of the fp32 product.
 */
#if defined(HFQ_I8)  /* which form: decided before hfq_caps */
#define HFQ_I8_NR 64
#ifndef HFQ_I8_A_BYTES
#define HFQ_I8_A_BYTES (1 << 30)
#endif
#ifndef HFQ_I8_PREFETCH
#define HFQ_I8_PREFETCH 1024 /* bytes ahead in the weight panel, while it comes from L2 */
#endif
#ifndef HFQ_I8_PREFETCH_FAR
#define HFQ_I8_PREFETCH_FAR 16384 /* the same for the panel's first tile, which reads it from memory */
#endif

typedef struct {
    const int32_t *comp;
    const float *ws, *absmax, *bias, *xo, *wc;
    void *out;
    int64_t ldo, N, n_out;
    int kind;
} hfq_i8_epi;
#endif

#if HFQ_I8 == 1

/* 16 outputs of row m from columns n.., the common case inline: inside N, no outlier columns. */
static inline void i8_store_full(__m512i acc, const hfq_i8_epi *e, int64_t m, int64_t n) {
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_loadu_si512(e->comp + n))),
                             _mm512_loadu_ps(e->ws + n));
    if (e->absmax) {
        const __m512 sx = _mm512_set1_ps(e->absmax[m] / 127.0f);
        y = e->bias ? _mm512_fmadd_ps(y, sx, _mm512_loadu_ps(e->bias + n)) : _mm512_mul_ps(y, sx);
    }
    put16(y, e->out, m * e->ldo + n, e->kind);
}

#define HFQ_I8_DECL(i) __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
#define HFQ_I8_STEP(i) if (mr > i) { \
    int32_t a4; memcpy(&a4, a + i * lda + k, 4); /* 4 codes, unaligned */ \
    const __m512i av = _mm512_set1_epi32(a4); \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, av, b0); c##i##1 = _mm512_dpbusd_epi32(c##i##1, av, b1); \
    c##i##2 = _mm512_dpbusd_epi32(c##i##2, av, b2); c##i##3 = _mm512_dpbusd_epi32(c##i##3, av, b3); }
#define HFQ_I8_FAST(i) if (mr > i) { i8_store_full(c##i##0, e, m0 + i, n0); i8_store_full(c##i##1, e, m0 + i, n0 + 16); \
    i8_store_full(c##i##2, e, m0 + i, n0 + 32); i8_store_full(c##i##3, e, m0 + i, n0 + 48); }
#define HFQ_I8_STORE(i) if (mr > i) { _mm512_store_si512(acc + (i * 4 + 0) * 16, c##i##0); \
    _mm512_store_si512(acc + (i * 4 + 1) * 16, c##i##1); _mm512_store_si512(acc + (i * 4 + 2) * 16, c##i##2); \
    _mm512_store_si512(acc + (i * 4 + 3) * 16, c##i##3); }

static inline __attribute__((always_inline)) void i8_finish_rows(const int32_t *acc, const int mr, const hfq_i8_epi *e,
                                                                 int64_t m0, int64_t n0) {
    const int64_t n_out = e->n_out, ldo = e->ldo, N = e->N;
    const float *xo = e->xo + m0 * n_out, *absmax = e->absmax, *bias = e->bias;
    for (int j = 0; j < 4; j++) {
        const int64_t n = n0 + j * 16;
        if (n >= N) break;
        const __mmask16 k = n + 16 <= N ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1u);
        const __m512i comp = _mm512_loadu_si512(e->comp + n);  /* comp is padded to the block */
        const __m512 ws = _mm512_maskz_loadu_ps(k, e->ws + n);  /* ws, bias: N entries */
        __m512 y[HFQ_I8_MR];
        for (int i = 0; i < mr; i++) {
            y[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(acc + (i * 4 + j) * 16), comp)),
                                 ws);
            if (absmax) {
                const __m512 sx = _mm512_set1_ps(absmax[m0 + i] / 127.0f);
                y[i] = bias ? _mm512_fmadd_ps(y[i], sx, _mm512_maskz_loadu_ps(k, bias + n)) : _mm512_mul_ps(y[i], sx);
            }
        }
        const float *wn = e->wc + n * n_out;  /* the outlier columns, in hfq_finish_tokens' order; each row of */
        for (int64_t o = 0; o < n_out; o++) {  /* wc (blocks of 16) read once */
            const __m512 w = _mm512_loadu_ps(wn + o * 16);
            for (int i = 0; i < mr; i++) y[i] = _mm512_fmadd_ps(_mm512_set1_ps(xo[i * n_out + o]), w, y[i]);
        }
        for (int i = 0; i < mr; i++) put_first(y[i], e->out, (m0 + i) * ldo + n, N - n, e->kind);
    }
}

/* The tile's epilogue from its int32 sums (stored to acc by the tile) where it has outlier columns or reaches past
 * N (masked there: ws and bias hold N entries): inlined into the tile, this general form made gcc spill
 * accumulators of the k loop to the stack (-4%), and a call per 16 outputs cost 3%; the common case
 * (i8_store_full) stays inline. Each 16 columns' W_hat vector of an outlier column serves all rows of the tile,
 * whose sums stay in registers (one copy of the loop per row count: with a variable count they lived on the stack,
 * and the outlier product cost 3x as much). */
static __attribute__((noinline)) void i8_finish(const int32_t *acc, int mr, const hfq_i8_epi *e, int64_t m0,
                                                int64_t n0) {
    switch (mr) {
        case 1: i8_finish_rows(acc, 1, e, m0, n0); break;
        case 2: i8_finish_rows(acc, 2, e, m0, n0); break;
        case 3: i8_finish_rows(acc, 3, e, m0, n0); break;
        case 4: i8_finish_rows(acc, 4, e, m0, n0); break;
        case 5: i8_finish_rows(acc, 5, e, m0, n0); break;
        default: i8_finish_rows(acc, HFQ_I8_MR, e, m0, n0); break;
    }
}

static inline __attribute__((always_inline)) void i8_tile(const int mr, const uint8_t *a, int64_t lda,
                                                          const int8_t *b, int64_t K, const hfq_i8_epi *e,
                                                          int64_t m0, int64_t n0, int64_t pf) {
    HFQ_I8_DECL(0) HFQ_I8_DECL(1) HFQ_I8_DECL(2) HFQ_I8_DECL(3) HFQ_I8_DECL(4) HFQ_I8_DECL(5)
    for (int64_t k = 0; k < K; k += 4) {
        const int8_t *bp = b + k * HFQ_I8_NR;
        const __m512i b0 = _mm512_loadu_si512(bp), b1 = _mm512_loadu_si512(bp + 64),
                      b2 = _mm512_loadu_si512(bp + 128), b3 = _mm512_loadu_si512(bp + 192);
        _mm_prefetch((const char *)(bp + pf), _MM_HINT_T0);
        HFQ_I8_STEP(0) HFQ_I8_STEP(1) HFQ_I8_STEP(2) HFQ_I8_STEP(3) HFQ_I8_STEP(4) HFQ_I8_STEP(5)
    }
    if (!e->n_out && n0 + HFQ_I8_NR <= e->N) {
        HFQ_I8_FAST(0) HFQ_I8_FAST(1) HFQ_I8_FAST(2) HFQ_I8_FAST(3) HFQ_I8_FAST(4) HFQ_I8_FAST(5)
        return;
    }
    int32_t acc[HFQ_I8_MR * HFQ_I8_NR] __attribute__((aligned(64)));
    HFQ_I8_STORE(0) HFQ_I8_STORE(1) HFQ_I8_STORE(2) HFQ_I8_STORE(3) HFQ_I8_STORE(4) HFQ_I8_STORE(5)
    i8_finish(acc, mr, e, m0, n0);
}

#define HFQ_I8_TILE(n) static __attribute__((noinline)) void i8_tile##n(const uint8_t *a, int64_t lda, \
    const int8_t *b, int64_t K, const hfq_i8_epi *e, int64_t m0, int64_t n0, int64_t pf) { \
    i8_tile(n, a, lda, b, K, e, m0, n0, pf); }
HFQ_I8_TILE(1) HFQ_I8_TILE(2) HFQ_I8_TILE(3) HFQ_I8_TILE(4) HFQ_I8_TILE(5) HFQ_I8_TILE(6)
typedef void (*hfq_i8_tile_fn)(const uint8_t *, int64_t, const int8_t *, int64_t, const hfq_i8_epi *, int64_t,
                               int64_t, int64_t);
static const hfq_i8_tile_fn HFQ_I8_TILES[HFQ_I8_MR + 1] = {NULL, i8_tile1, i8_tile2, i8_tile3, i8_tile4,
                                                           i8_tile5, i8_tile6};
#elif HFQ_I8 == 2
/* The AVX2 form (no VNNI: CPUs before Ice Lake / Zen 4). `vpmaddubsw` multiplies uint8 by int8 and adds pairs
 * into int16 with saturation, exact only while |a0 b0 + a1 b1| <= 32767; with uint8 codes + 128 it would saturate.
 * So the weights go in as |w| (0..128) and the activation codes as sign(w) * c (`vpsignb`; c in [-127, 127], the
 * per-token codes' range): each pair is at most 2 * 128 * 127 = 32512, exact, and sums c * w. `vpmaddwd` by ones
 * then adds the int16 pairs into int32 lanes (four codes of one column each, the packed layout's order). Weight
 * codes of -128 (asymmetric 8-bit layers' codes minus 128) are fine; an activation code of -128 (a uint8 0) is
 * refused. hfq_int8_gemm first writes each row of a as K signed codes (a2, row stride K). Tile: up to 4 rows x 16
 * columns in 8 ymm accumulators over the whole of K, the block's four 16-column panels in turn; one row takes all
 * 64 columns per k step (i8_tile1). On a 2-core Zen 1 EPYC (128-bit units: `vpmaddubsw` and `vpmaddwd` share one
 * pipe) it runs at that pipe's limit, 8 products per cycle per core, the same as fp32 FMAs; CPUs with two 256-bit
 * integer multiply pipes (Haswell and later, Zen 2 and later) do twice that per FMA. The int32 sums go to a
 * buffer and the epilogue runs in plain C (gcc vectorizes it) with the arithmetic of hfq_finish_tokens: the same
 * bytes. */
#define HFQ_I8A_DECL(i) __m256i c##i##0 = _mm256_setzero_si256(), c##i##1 = c##i##0;
#define HFQ_I8A_STEP(i) if (mr > i) { \
    int32_t s4; memcpy(&s4, a + i * lda + k, 4); \
    const __m256i sv = _mm256_set1_epi32(s4); \
    c##i##0 = _mm256_add_epi32(c##i##0, _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(sv, b0)), ones)); \
    c##i##1 = _mm256_add_epi32(c##i##1, _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(sv, b1)), ones)); }
#define HFQ_I8A_STORE(i) if (mr > i) { _mm256_store_si256((__m256i *)(acc + i * HFQ_I8_NR + p * 16), c##i##0); \
    _mm256_store_si256((__m256i *)(acc + i * HFQ_I8_NR + p * 16 + 8), c##i##1); }

static void i8a_epilogue(const int32_t *acc, int mr, const hfq_i8_epi *e, int64_t m0, int64_t n0) {
    const int64_t nn = e->N - n0 < HFQ_I8_NR ? e->N - n0 : HFQ_I8_NR;
    for (int i = 0; i < mr; i++) {
        const int64_t m = m0 + i;
        float y[HFQ_I8_NR];
        for (int64_t j = 0; j < nn; j++) y[j] = (float)acc[i * HFQ_I8_NR + j] * e->ws[n0 + j];
        if (e->absmax) {
            const float sx = e->absmax[m] / 127.0f;
            if (e->bias) for (int64_t j = 0; j < nn; j++) y[j] = fmaf(y[j], sx, e->bias[n0 + j]);
            else for (int64_t j = 0; j < nn; j++) y[j] *= sx;
        }
        for (int64_t q = 0; q * 16 < nn; q++) {  /* wc in blocks of 16 columns, each n_out x 16 contiguous */
            const int64_t jn = nn - q * 16 < 16 ? nn - q * 16 : 16;
            const float *wq = e->wc + (n0 / 16 + q) * e->n_out * 16;
            float *yq = y + q * 16;
            const float *xo = e->xo + m * e->n_out;
            if (jn == 16) {  /* the 16 sums stay in registers over the columns, in hfq_finish_tokens' order */
                __m256 y0 = _mm256_loadu_ps(yq), y1 = _mm256_loadu_ps(yq + 8);
                for (int64_t o = 0; o < e->n_out; o++) {
                    const __m256 xv = _mm256_set1_ps(xo[o]);
                    y0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wq + o * 16), y0);
                    y1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wq + o * 16 + 8), y1);
                }
                _mm256_storeu_ps(yq, y0), _mm256_storeu_ps(yq + 8, y1);
            } else {
                for (int64_t o = 0; o < e->n_out; o++)
                    for (int64_t j = 0; j < jn; j++) yq[j] = fmaf(xo[o], wq[o * 16 + j], yq[j]);
            }
        }
        store_row(y, (char *)e->out + (m * e->ldo + n0) * out_size(e->kind), nn, e->kind);
    }
}

static inline __attribute__((always_inline)) void i8a_tile(const int mr, const uint8_t *a, int64_t lda,
                                                           const int8_t *b, int64_t K, const hfq_i8_epi *e,
                                                           int64_t m0, int64_t n0, int64_t pf) {
    int32_t acc[HFQ_I8_MR * HFQ_I8_NR] __attribute__((aligned(32)));
    const __m256i ones = _mm256_set1_epi16(1);
    for (int p = 0; p < HFQ_I8_NR / 16; p++) {
        HFQ_I8A_DECL(0) HFQ_I8A_DECL(1) HFQ_I8A_DECL(2) HFQ_I8A_DECL(3)
        const int8_t *bs = b + p * 64;
        for (int64_t k = 0; k < K; k += 4) {
            const int8_t *bp = bs + k * HFQ_I8_NR;
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)bp), b1 = _mm256_loadu_si256((const __m256i *)(bp + 32));
            const __m256i a0 = _mm256_abs_epi8(b0), a1 = _mm256_abs_epi8(b1);
            _mm_prefetch((const char *)(bp + pf), _MM_HINT_T0);
            HFQ_I8A_STEP(0) HFQ_I8A_STEP(1) HFQ_I8A_STEP(2) HFQ_I8A_STEP(3)
        }
        HFQ_I8A_STORE(0) HFQ_I8A_STORE(1) HFQ_I8A_STORE(2) HFQ_I8A_STORE(3)
    }
    i8a_epilogue(acc, mr, e, m0, n0);
}

/* One row (the decode GEMV): all 64 columns of the block per k step in 8 accumulators, so the weight is read in
 * order, four lines per step (a 16-column panel at a time reads one line in four per pass, which streamed at
 * 12.6 GB/s where fp32 F.linear streams 17 on a Zen 1 EPYC). */
#define HFQ_I8A_COL(v) { const __m256i w = _mm256_loadu_si256((const __m256i *)(bp + 32 * v)); \
    c##v = _mm256_add_epi32(c##v, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), \
                                                                          _mm256_sign_epi8(sv, w)), ones)); }
static __attribute__((noinline)) void i8_tile1(const uint8_t *a, int64_t lda, const int8_t *b, int64_t K,
                                               const hfq_i8_epi *e, int64_t m0, int64_t n0, int64_t pf) {
    (void)lda;
    int32_t acc[HFQ_I8_NR] __attribute__((aligned(32)));
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    for (int64_t k = 0; k < K; k += 4) {
        const int8_t *bp = b + k * HFQ_I8_NR;
        for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(bp + pf + 64 * l), _MM_HINT_T0);
        int32_t s4;
        memcpy(&s4, a + k, 4);
        const __m256i sv = _mm256_set1_epi32(s4);
        HFQ_I8A_COL(0) HFQ_I8A_COL(1) HFQ_I8A_COL(2) HFQ_I8A_COL(3)
        HFQ_I8A_COL(4) HFQ_I8A_COL(5) HFQ_I8A_COL(6) HFQ_I8A_COL(7)
    }
    _mm256_store_si256((__m256i *)acc, c0), _mm256_store_si256((__m256i *)(acc + 8), c1);
    _mm256_store_si256((__m256i *)(acc + 16), c2), _mm256_store_si256((__m256i *)(acc + 24), c3);
    _mm256_store_si256((__m256i *)(acc + 32), c4), _mm256_store_si256((__m256i *)(acc + 40), c5);
    _mm256_store_si256((__m256i *)(acc + 48), c6), _mm256_store_si256((__m256i *)(acc + 56), c7);
    i8a_epilogue(acc, 1, e, m0, n0);
}

#define HFQ_I8_TILE(n) static __attribute__((noinline)) void i8_tile##n(const uint8_t *a, int64_t lda, \
    const int8_t *b, int64_t K, const hfq_i8_epi *e, int64_t m0, int64_t n0, int64_t pf) { \
    i8a_tile(n, a, lda, b, K, e, m0, n0, pf); }
HFQ_I8_TILE(2) HFQ_I8_TILE(3) HFQ_I8_TILE(4)
typedef void (*hfq_i8_tile_fn)(const uint8_t *, int64_t, const int8_t *, int64_t, const hfq_i8_epi *, int64_t,
                               int64_t, int64_t);
static const hfq_i8_tile_fn HFQ_I8_TILES[HFQ_I8_MR + 1] = {NULL, i8_tile1, i8_tile2, i8_tile3, i8_tile4};
#endif

/* Bytes of hfq_int8_pack's output for an N x K weight (K a multiple of 4); 0 where this build has no int8 GEMM. */
int64_t hfq_int8_packed_bytes(int64_t N, int64_t K) {
#if defined(HFQ_I8)
    return (N + HFQ_I8_NR - 1) / HFQ_I8_NR * HFQ_I8_NR * K;
#else
    (void)N; (void)K;
    return 0;
#endif
}

/* w (N x K int8, contiguous) into the packed layout above, and comp[n] = 128 * sum_k w[n, k] for n < N (comp
 * holds ceil(N/64) * 64 entries, zero past N). Returns 1 (nothing written) if K is not a multiple of 4 or this
 * build has no int8 GEMM. */
int hfq_int8_pack(const int8_t *w, int64_t N, int64_t K, int8_t *out, int32_t *comp, int nthreads) {
#if defined(HFQ_I8)
    if (K % 4 || K <= 0 || N <= 0) return 1;
    const int64_t blocks = (N + HFQ_I8_NR - 1) / HFQ_I8_NR;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t nb = 0; nb < blocks; nb++) {
        int8_t *o = out + nb * HFQ_I8_NR * K;
        for (int64_t j = 0; j < HFQ_I8_NR; j++) {
            const int64_t n = nb * HFQ_I8_NR + j;
            int64_t s = 0;
            for (int64_t k = 0; k < K; k += 4)
                for (int q = 0; q < 4; q++) {
                    const int8_t v = n < N ? w[n * K + k + q] : 0;
                    o[k * HFQ_I8_NR + j * 4 + q] = v;
                    s += v;
                }
            comp[n] = (int32_t)(128 * s);
        }
    }
    return 0;
#else
    (void)w; (void)N; (void)K; (void)out; (void)comp; (void)nthreads;
    return 1;
#endif
}

/* The outlier columns' W_hat rows for hfq_int8_gemm's epilogue, read from the packed weight itself (no transposed
 * copy kept): out (ceil(N/16), n_out, 16) fp32, out[n / 16, o, n % 16] = code(n, cols[o]) * ws[n] rounded to
 * out_kind (the activation type, as the reference holds W_hat) and back, 0 past N. Column k of a block of 64
 * rows lies in 4 lines, so one column costs N / 16 lines. Returns 1 (nothing written) for a column outside
 * [0, K) or a build without the int8 GEMM. */
int hfq_int8_packed_cols(const int8_t *packed, int64_t N, int64_t K, const int64_t *cols, int64_t n_out,
                         const float *ws, int out_kind, float *out) {
#if defined(HFQ_I8)
    for (int64_t o = 0; o < n_out; o++)
        if (cols[o] < 0 || cols[o] >= K) return 1;
    const int64_t blocks = (N + 15) / 16;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t o = 0; o < n_out; o++) {
            const int64_t k = cols[o];
            for (int64_t j = 0; j < 16; j++) {
                const int64_t n = b * 16 + j;
                float v = 0.0f;
                if (n < N) {
                    const int8_t q = packed[(n / HFQ_I8_NR) * HFQ_I8_NR * K + (k / 4) * HFQ_I8_NR * 4
                                            + (n % HFQ_I8_NR) * 4 + k % 4];
                    v = round_to((float)q * ws[n], out_kind);
                }
                out[(b * n_out + o) * 16 + j] = v;
            }
        }
    return 0;
#else
    (void)packed; (void)N; (void)K; (void)cols; (void)n_out; (void)ws; (void)out_kind; (void)out;
    return 1;
#endif
}

/* out (M x N, row stride ldo) from a (M x K uint8 codes + 128, row stride lda) and the packed weight: see the
 * section's comment. absmax NULL: out fp32 (M, N) = (acc - comp) * ws. Else the fused epilogue in out_kind,
 * with n_out > 0 also the outlier columns' product as hfq_finish_tokens adds it: xo (M x n_out fp32) the
 * activations of those columns, wc W_hat's rows of them in blocks of 16 columns, (ceil(N/16), n_out, 16) fp32
 * zero-padded (each 16 outputs read one contiguous n_out * 64 bytes: rows of N apart, the first tile of a
 * block waited on n_out scattered lines from memory, +30% at one row). Returns 1 (nothing written) if K is
 * not a multiple of 4, the arguments do not fit together, or this build has no int8 GEMM. */
#ifndef HFQ_I8_MIN_SPLIT  /* fewer multiply-adds run on one thread: a decode GEMV of a 512 x 512 layer (2^18) already
                             gains from two (Zen 1: 40 -> 35 us, 512 x 1536: 73 -> 51 us) */
#define HFQ_I8_MIN_SPLIT (1 << 18)
#endif
int hfq_int8_gemm(const uint8_t *a, int64_t M, int64_t K, int64_t lda, const int8_t *packed, int64_t N,
                  const int32_t *comp, const float *ws, const float *absmax, const float *bias, const float *xo,
                  const float *wc, int64_t n_out, void *out, int64_t ldo, int out_kind, int nthreads) {
#if defined(HFQ_I8)
    if (K % 4 || K <= 0 || (!absmax && (out_kind != 0 || n_out > 0)) || (n_out > 0 && (!xo || !wc))) return 1;
    const hfq_i8_epi e = {comp, ws, absmax, bias, n_out > 0 ? xo : NULL, n_out > 0 ? wc : NULL, out, ldo, N,
                          n_out > 0 ? n_out : 0, out_kind};
    const int64_t blocks = (N + HFQ_I8_NR - 1) / HFQ_I8_NR;
    int64_t chunk = HFQ_I8_A_BYTES / K / HFQ_I8_MR * HFQ_I8_MR;
    if (chunk < HFQ_I8_MR) chunk = HFQ_I8_MR;
    if (M * N * K < HFQ_I8_MIN_SPLIT) nthreads = 1;
#if HFQ_I8 == 2  /* the AVX2 form reads the signed codes (see above), and cannot take -128 */
    uint8_t *a2 = (uint8_t *)malloc((size_t)(M * K));
    if (!a2) return 1;
    uint8_t low = 255;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) {
            const uint8_t u = a[m * lda + k];
            low = u < low ? u : low;
            a2[m * K + k] = u ^ 0x80u;
        }
    if (low == 0) {
        free(a2);
        return 3;
    }
    a = a2;
    lda = K;
#endif
#pragma omp parallel num_threads(nthreads)
    for (int64_t c0 = 0; c0 < M; c0 += chunk) {
        const int64_t c1 = M - c0 < chunk ? M : c0 + chunk;
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < blocks; nb++) {
            const int8_t *b = packed + nb * HFQ_I8_NR * K;
            for (int64_t m = c0; m < c1; m += HFQ_I8_MR) {
                const int mr = c1 - m < HFQ_I8_MR ? (int)(c1 - m) : HFQ_I8_MR;
                HFQ_I8_TILES[mr](a + m * lda, lda, b, K, &e, m, nb * HFQ_I8_NR,
                                 m == c0 ? HFQ_I8_PREFETCH_FAR : HFQ_I8_PREFETCH);
            }
        }
    }
#if HFQ_I8 == 2
    free(a2);
#endif
    return 0;
#else
    (void)a; (void)M; (void)K; (void)lda; (void)packed; (void)N; (void)comp; (void)ws; (void)absmax; (void)bias;
    (void)xo; (void)wc; (void)n_out; (void)out; (void)ldo; (void)out_kind; (void)nthreads;
    return 1;
#endif
}

/* Decoding's int8 layer in one call: hfq_quant_tokens of x (codes + 128 into `codes`, M x K; absmax; the outlier
 * columns into flags / cols) and hfq_int8_gemm of those codes with its fused epilogue (row scales, bias) into `out`
 * (M x N, out_kind) when no column passed the threshold, or when the columns that did are exactly the caller's
 * `known` ones (n_known of them, ascending, as cols are written), whose W_hat rows `known_wc` (the GEMM's outlier
 * layout) it has from an earlier call: their activations are gathered here (in fp32, as x holds them) for the
 * outlier product. Returns 0 (out written), the number of outlier columns otherwise (codes, absmax and cols[0..n)
 * written, out not: the caller builds the columns' rows and runs the GEMM), -1 (out of memory), or
 * -(1 + hfq_int8_gemm's code). */
int64_t hfq_int8_token_gemm(const void *x, int64_t M, int64_t K, int64_t ldx, int x_kind, float threshold,
                            uint8_t *codes, float *absmax, uint8_t *flags, int64_t *cols, const int8_t *packed,
                            int64_t N, const int32_t *comp, const float *ws, const float *bias, void *out,
                            int out_kind, const int64_t *known, int64_t n_known, const float *known_wc,
                            int nthreads) {
    const int64_t n = hfq_quant_tokens(x, M, K, ldx, x_kind, threshold, codes, 1, absmax, flags, cols, nthreads);
    if (n < 0) return n;
    float *xo = NULL;
    if (n > 0) {
        if (n != n_known || !known || !known_wc || memcmp(cols, known, (size_t)n * sizeof(int64_t)) != 0) return n;
        xo = (float *)malloc((size_t)(M * n) * sizeof(float));
        if (!xo) return -1;
        const int64_t esize = x_kind == 0 ? 4 : 2;
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < n; j++) xo[m * n + j] = load_x((const char *)x + m * ldx * esize, cols[j], x_kind);
    }
    const int rc = hfq_int8_gemm(codes, M, K, K, packed, N, comp, ws, absmax, bias, xo, n ? known_wc : NULL, n, out,
                                 N, out_kind, nthreads);
    free(xo);
    return rc ? -1 - (int64_t)rc : 0;
}

/* ---- The grid's clipping search (hf_quant/core/grid.py `_mse_search`: GPTQ's quantizer with mse=True) -------------
 * For each row r of w (rows x gs, fp32) with its range [lo[r], hi[r]] (lo <= 0 <= hi, already clipped / symmetric):
 * the shrink factors p_i = 1 - i / grid (fp32), i = 0 .. n-1, each one's grid (s, z) computed as `_grid(p lo, p hi)`
 * computes it, bit for bit (the scale rounded up into scale_kind: 0 fp32, 1 bf16, 2 fp16; zero = clamp(rint(-p lo / s),
 * 0, maxq), or sym_zero >= 0 for a symmetric grid), and its error sum_k |(q_k - z) s - w_k|^norm with
 * q_k = clamp(rint(w_k / s) + z, 0, maxq). The first factor of least error wins (strict <, from +inf: a row whose
 * errors are all NaN keeps the scale / zero it came with); `chosen` and `errors` (may be NULL) get its index (or -1)
 * and its error (or +inf).
 * The codes and differences are the oracle's exactly (IEEE division, round half even, no contraction); the power is
 * 2^(norm log2 |d|) in fp32 polynomials (relative error ~1e-6 against the oracle's ~1 ulp powf) summed in fp32
 * lanes: errors agree with the oracle's to ~1e-6, so only factors within that of the best can trade places. A NaN
 * error is never less (the oracle's chunked min lets one NaN spoil its whole chunk of factors).
 * Returns 0, 1 when this build has no vectorized search, or 2 for more than 1024 factors (then nothing is written). */
#if defined(__AVX2__) && defined(__FMA__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")  /* (q - z) s - w: two roundings, as torch's separate ops make them */
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
static inline float mse_bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t mse_f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
/* v rounded to nearest even in bf16 (kind 1) / fp16 (2), as store_row rounds, back as an fp32 value; fp32: v */
static inline float mse_round(float v, int kind) {
    if (kind == 0) return v;
    return kind == 1 ? mse_bits_f((uint32_t)f32_to_bf16(v) << 16) : (float)(_Float16)v;
}
/* the next value of kind above (up) or below v (positive, normal, a value of kind): torch.nextafter in that dtype */
static inline float mse_step(float v, int kind, int up) {
    if (kind == 0) return nextafterf(v, up ? INFINITY : 0.0f);
    const uint32_t one = 1u << (kind == 1 ? 16 : 13);
    const uint32_t u = mse_f_bits(v);
    return mse_bits_f(up ? u + one : u - one);
}
static inline float mse_clamp(float v, float a, float b) { return v < a ? a : (v > b ? b : v); }
/* `_grid(lo, hi)`: store_scale((hi - lo) / maxq) (clamped to [tiny, top], rounded up into kind), then twice the
 * zero point and `_fit_range` (the reciprocal of steps times top: torch's `top / steps` of a Python float) */
static void mse_grid(float lo, float hi, float maxq, float sym_zero, int kind, float tiny, float top, float *s_out,
                     float *z_out) {
    float s = mse_clamp((hi - lo) / maxq, tiny, top);
    const float stored = mse_round(s, kind);
    s = stored < s ? mse_step(stored, kind, 1) : stored;
    float z = 0.0f;
    for (int it = 0; it < 2; it++) {
        z = sym_zero >= 0.0f ? sym_zero : mse_clamp(rintf(-lo / s), 0.0f, maxq);
        float steps = z > maxq - z ? z : maxq - z;
        steps = steps < 1.0f ? 1.0f : steps;
        float fitted = mse_round((1.0f / steps) * top, kind);
        if (fitted * steps > top) fitted = mse_step(fitted, kind, 0);
        if (steps * s > top) s = fitted;
    }
    *s_out = s;
    *z_out = z;
}
/* a^norm for a >= 0 (8 lanes): 2^(norm log2 a), log2 a = e + log2 m (m in [sqrt 1/2, sqrt 2), the atanh series in
 * t = (m - 1) / (m + 1) to t^9), 2^f by a Taylor polynomial of degree 6 on |f| <= ~0.5: relative error ~2e-7. a is
 * taken within [2^-50, 2^50] (so that 2^n needs no range checks): below, the term is ~1e-36 instead of smaller. */
static inline __m256 mse_pow(__m256 a, __m256 vn) {
    const __m256 one = _mm256_set1_ps(1.0f);
    a = _mm256_min_ps(_mm256_max_ps(a, _mm256_set1_ps(0x1p-50f)), _mm256_set1_ps(0x1p50f));
    const __m256i u = _mm256_castps_si256(a);
    const __m256i e = _mm256_srai_epi32(_mm256_sub_epi32(u, _mm256_set1_epi32(0x3F3504F3)), 23);  /* sqrt(1/2) */
    const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(u, _mm256_slli_epi32(e, 23)));
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
    const __m256 t2 = _mm256_mul_ps(t, t);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 9.0f), t2, _mm256_set1_ps(1.0f / 7.0f));
    p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(1.0f / 5.0f));
    p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(1.0f / 3.0f));
    p = _mm256_fmadd_ps(p, t2, one);
    const __m256 lm = _mm256_mul_ps(_mm256_mul_ps(p, t), _mm256_set1_ps(2.8853900817779268f));  /* 2 / ln 2 */
    const __m256 ef = _mm256_cvtepi32_ps(e);
    const __m256 hi = _mm256_mul_ps(vn, ef), lo = _mm256_fmsub_ps(vn, ef, hi);  /* norm e = hi + lo exactly */
    const __m256 s1 = _mm256_mul_ps(vn, lm);
    const __m256 n = _mm256_round_ps(_mm256_add_ps(hi, s1), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 g = _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(_mm256_sub_ps(hi, n), s1), lo),
                                   _mm256_set1_ps(0.69314718055994531f));  /* 2^f = e^g */
    __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 720.0f), g, _mm256_set1_ps(1.0f / 120.0f));
    q = _mm256_fmadd_ps(q, g, _mm256_set1_ps(1.0f / 24.0f));
    q = _mm256_fmadd_ps(q, g, _mm256_set1_ps(1.0f / 6.0f));
    q = _mm256_fmadd_ps(q, g, _mm256_set1_ps(0.5f));
    q = _mm256_fmadd_ps(q, g, one);
    q = _mm256_fmadd_ps(q, g, one);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(q), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
}
/* |(q - z) s - w|, q = clamp(rint(w / s) + z, 0, maxq), for 8 weights */
static inline __m256 mse_diff(__m256 x, __m256 vs, __m256 vz, __m256 vq) {
    __m256 q = _mm256_round_ps(_mm256_div_ps(x, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vz), _mm256_setzero_ps()), vq);
    return _mm256_sub_ps(_mm256_mul_ps(_mm256_sub_ps(q, vz), vs), x);
}
/* the error of one row of gs weights on the grid (s, z): the sum of |(q - z) s - w|^norm, NaN if a difference is;
 * +inf as soon as the partial sum passes `bound` (reaches it, unless `ties`), checked every 16 weights: the terms
 * are >= 0 and float sums of them never decrease, so the whole sum could not pass less; the search's verdict is the
 * same, and a poor factor costs part of a row (on Gaussian rows of 128, 40% of all factors' weights are visited).
 * Two vectors at a time (the power is one long dependency chain: two in flight hide its latency). */
static float mse_error(const float *w, int64_t gs, float s, float z, float maxq, float norm, float bound, int ties) {
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vq = _mm256_set1_ps(maxq), vn = _mm256_set1_ps(norm);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, nan = acc0;
    int64_t k = 0;
    for (; k + 16 <= gs; k += 16) {
        const __m256 d0 = mse_diff(_mm256_loadu_ps(w + k), vs, vz, vq);
        const __m256 d1 = mse_diff(_mm256_loadu_ps(w + k + 8), vs, vz, vq);
        acc0 = _mm256_add_ps(acc0, mse_pow(_mm256_andnot_ps(sign, d0), vn));
        acc1 = _mm256_add_ps(acc1, mse_pow(_mm256_andnot_ps(sign, d1), vn));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(d0, d1, _CMP_UNORD_Q));
        if (!_mm256_movemask_ps(nan)) {
            const float part = hsum256(_mm256_add_ps(acc0, acc1));
            if (part > bound || (part == bound && !ties)) return INFINITY;
        }
    }
    for (; k < gs; k += 8) {  /* the tail's lanes past gs: w = 0, whose code is z, so d = 0 (z is an integer code) */
        float tmp[8] = {0};
        memcpy(tmp, w + k, (size_t)(gs - k < 8 ? gs - k : 8) * sizeof(float));
        const __m256 d = mse_diff(_mm256_loadu_ps(tmp), vs, vz, vq);
        const __m256 keep = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_NEQ_UQ);  /* d = 0: no 2^-120 term */
        acc0 = _mm256_add_ps(acc0, _mm256_and_ps(keep, mse_pow(_mm256_andnot_ps(sign, d), vn)));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(d, d, _CMP_UNORD_Q));
    }
    return _mm256_movemask_ps(nan) ? NAN : hsum256(_mm256_add_ps(acc0, acc1));  /* NaN: as the oracle's error */
}
#define HFQ_MSE_MAX_FACTORS 1024
int hfq_mse_search(const float *w, int64_t rows, int64_t gs, const float *lo, const float *hi, float *scale,
                   float *zero, int32_t *chosen, float *errors, int maxq, float sym_zero, int scale_kind, int64_t n,
                   int64_t grid, float norm, int nthreads) {
    const float tiny = scale_kind == 2 ? 6.103515625e-05f : mse_bits_f(0x00800000u);  /* torch.finfo(...).tiny */
    const float top = scale_kind == 2 ? 65504.0f : mse_bits_f(scale_kind == 1 ? 0x7F7F0000u : 0x7F7FFFFFu);  /* .max */
    const float mq = (float)maxq;
    if (n > HFQ_MSE_MAX_FACTORS || n < 0) return 2;
    if (rows * gs * n < (1 << 16)) nthreads = 1;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)  /* pruning makes rows' costs differ */
    for (int64_t r = 0; r < rows; r++) {
        const float *row = w + r * gs;
        float gs_s[HFQ_MSE_MAX_FACTORS], gs_z[HFQ_MSE_MAX_FACTORS];
        for (int64_t i = 0; i < n; i++) {
            const float p = 1.0f - (float)i / (float)grid;
            mse_grid(p * lo[r], p * hi[r], mq, sym_zero, scale_kind, tiny, top, gs_s + i, gs_z + i);
        }
        float best = INFINITY;
        int64_t at = -1;
        /* every 8th factor first, then the rest: a near-best bound early prunes most factors' rows part way (the
         * verdict is the oracle's order's, first least error: an earlier factor wins a tie) */
        for (int pass = 0; pass < 2; pass++)
            for (int64_t i = 0; i < n; i++) {
                if ((i % 8 == 0) != (pass == 0)) continue;
                if (i > 0 && gs_s[i - 1] == gs_s[i] && gs_z[i - 1] == gs_z[i]) continue;  /* the same error, earlier */
                const int ties = at < 0 || i < at;
                const float err = mse_error(row, gs, gs_s[i], gs_z[i], mq, norm, best, ties);
                if (err < best || (err == best && ties && at >= 0)) best = err, at = i;
            }
        if (at >= 0) scale[r] = gs_s[at], zero[r] = gs_z[at];
        if (chosen) chosen[r] = (int32_t)at;
        if (errors) errors[r] = best;
    }
    return 0;
}
#pragma GCC pop_options
#else
int hfq_mse_search(const float *w, int64_t rows, int64_t gs, const float *lo, const float *hi, float *scale,
                   float *zero, int32_t *chosen, float *errors, int maxq, float sym_zero, int scale_kind, int64_t n,
                   int64_t grid, float norm, int nthreads) {
    (void)w; (void)rows; (void)gs; (void)lo; (void)hi; (void)scale; (void)zero; (void)chosen; (void)errors; (void)maxq;
    (void)sym_zero; (void)scale_kind; (void)n; (void)grid; (void)norm; (void)nthreads;
    return 1;
}
#endif

/* ---- GPTQ's column steps (hf_quant/methods/gptq.py `column_loop` with its grid step) ------------------------------
 * Columns c0 .. c1 of one lazy-update block: W1 (rows x B, fp32, row-major), Hinv1 (B x B rows of stride ldh: the
 * block of the upper Cholesky factor of H^-1), each column's group `group[i]` (i < B) into scale / zero (rows x G,
 * fp32), maxq. Per column i, as the torch steps do it, bit for bit (IEEE division, round half even, no contraction):
 *     q = clamp(rint(w / s) + z, 0, maxq)   (maxq 1: q = [w >= 0]);   w_hat = (q - z) s
 *     err = (w - w_hat) / Hinv1[i, i];   W1[:, i:] -= err Hinv1[i, i:];   Err1[:, i] = err;   codes[:, col0 + i] = q
 * A row's steps touch only that row, so rows run in parallel, each through all its columns (its B floats stay in
 * L1). codes: uint8 (rows x ldc). Returns 0, or 1 for an argument out of range (nothing written). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")  /* err * h, then the subtraction: two roundings, as torch's two ops */
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
int hfq_gptq_columns(float *W1, int64_t rows, int64_t B, const float *Hinv1, int64_t ldh, int64_t c0, int64_t c1,
                     const float *scale, const float *zero, int64_t G, const int32_t *group, int maxq, uint8_t *codes,
                     int64_t ldc, int64_t col0, float *Err1, int nthreads) {
    if (c0 < 0 || c1 > B || c0 > c1 || ldh < B || maxq < 1 || maxq > 255 || col0 < 0 || col0 + c1 > ldc) return 1;
    for (int64_t i = c0; i < c1; i++)
        if (group[i] < 0 || group[i] >= G) return 1;
    const float mq = (float)maxq;
    if (rows * (c1 - c0) * B < (1 << 16)) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; r++) {
        float *w = W1 + r * B;
        for (int64_t i = c0; i < c1; i++) {
            const float s = scale[r * G + group[i]], z = zero[r * G + group[i]], x = w[i];
            float q;
            if (maxq == 1) {
                q = x >= 0.0f ? 1.0f : 0.0f;
            } else {
                q = rintf(x / s) + z;
                q = q < 0.0f ? 0.0f : (q > mq ? mq : q);
            }
            const float what = (q - z) * s;
            const float err = (x - what) / Hinv1[i * ldh + i];
            const float *h = Hinv1 + i * ldh;
            for (int64_t j = i; j < B; j++) {
                const float d = err * h[j];
                w[j] = w[j] - d;
            }
            Err1[r * B + i] = err;
            codes[r * ldc + col0 + i] = q == q ? (uint8_t)q : 0;  /* a NaN weight: code 0 (its error is NaN) */
        }
    }
    return 0;
}
#pragma GCC pop_options

/* ---------------------------------------------------------------------------------------------------
 * Weights of up to 8 bits x bf16 or fp32 activations on AMX tiles (Sapphire Rapids and later), fused: the operands
 * and the result of hfq_codes_bf16_gemm / hfq_codes_f32_gemm (corr with the offsets of `amx_a_tile`), for any M.
 *
 * The weight is the A operand: a 16 x 32 bf16 tile of 16 output rows n and 32 channels, made in L1 from the codes
 * (`amx_a_tile`: nibbles as 128 + q by the OR trick of codes_rows, or q itself for fp32 x; bytes as u itself, exact in
 * bf16). A nibble tile takes 16 bytes of a row: the low nibbles are channels c..c+15 of the group, the high nibbles
 * channels gs/2 + c..; the order of channels inside a tile does not matter as long as x meets them in the same order. x is the B operand, transposed in AMX's pair
 * layout (`amx_pack_x`: row r of a tile holds, for each of 16 activation rows m, the two channels of A's columns
 * 2r and 2r + 1, which are neighbours in x), padded to a multiple of 16 rows with zeros. C = A B is a 16 (n) x 16 (m)
 * fp32 tile per group; y^T[n, m] += scale[n, g] C[n, m] (AVX-512), then out[m, n] = y^T[n, m] - corr[m, n] + bias[n].
 * Threads take work items of 16 weight rows x up to HFQ_AMX_MB blocks of 16 activation rows (`codes_amx`). Products
 * are exact and sums fp32, as in hfq_codes_bf16_gemm (the order of the sums differs).
 */
#if defined(HFQ_AMX_TILE)
#define HFQ_ARCH_REQ_XCOMP_PERM 0x1023
#define HFQ_XFEATURE_XTILEDATA 18

int hfq_amx_enable(void) {  /* ask Linux for the AMX tile state once per process: 0 granted, else refused */
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, HFQ_ARCH_REQ_XCOMP_PERM, HFQ_XFEATURE_XTILEDATA) ? 1 : 0;
    return state;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} hfq_tilecfg;

static void amx_config(void) {  /* all eight tiles 16 rows x 64 bytes (each kernel's use: its own comment) */
    hfq_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
    _tile_loadconfig(&cfg);
}

/* A (M x K bytes, rows lda bytes apart) copied into tiles of 16 rows x 64 bytes: tile (mt, kt) at at + (mt * KT + kt)
 * KiB, KT = ceil(K / 64), bytes past K and rows past M (up to 16 MT) zero. Both tile GEMMs' A operand: int8 codes
 * (hfq_int8_amx_gemm), bf16 activations as bytes (hfq_dequant_amx_gemm: 32 channels a tile row). */
static void amx_pack_a(const uint8_t *a, int64_t M, int64_t K, int64_t lda, uint8_t *at, int64_t MT, int nthreads) {
    const int64_t KT = (K + 63) / 64;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < MT * KT; i++) {
        const int64_t mt = i / KT, k0 = (i % KT) * 64, n = K - k0 < 64 ? K - k0 : 64;
        uint8_t *dst = at + i * 1024;
        for (int r = 0; r < 16; r++) {
            const int64_t row = mt * 16 + r;
            if (row < M) {
                memcpy(dst + r * 64, a + row * lda + k0, (size_t)n);
                if (n < 64) memset(dst + r * 64 + n, 0, (size_t)(64 - n));
            } else {
                memset(dst + r * 64, 0, 64);
            }
        }
    }
}

/* How a tile GEMM splits its blocks of output columns (each `block_bytes` of weight per 64 channels of K, i.e. per A/B
 * tile row) over the threads: groups of up to max_sb blocks, a group per thread where there are enough (*sb), and K
 * in chunks of *ktc tiles (at least 1) that keep a group's panels within panel_bytes (in L2). Returns the groups. */
static int64_t amx_groups(int64_t blocks, int nthreads, int64_t max_sb, int64_t panel_bytes, int64_t block_bytes,
                          int64_t *sb, int64_t *ktc) {
    int64_t b = blocks / (nthreads > 0 ? nthreads : 1);
    b = b < 1 ? 1 : b > max_sb ? max_sb : b;
    const int64_t k = panel_bytes / (b * block_bytes);
    *sb = b, *ktc = k < 1 ? 1 : k;
    return (blocks + b - 1) / b;
}
#else
int hfq_amx_enable(void) { return 1; }
#endif

#if defined(HFQ_AMX)

/* xp[((term * MB + mb) * T + t) * 256 + r * 16 + m] (uint32: two bf16) = the channels of A's columns 2r, 2r + 1 in
 * tile t, of x row 16 mb + m (0 past M). Tile t: nibbles, group g = t / (gs/32), c = t % (gs/32): columns 0..15 are
 * channels g gs + 16 c + (0..15), columns 16..31 channels g gs + gs/2 + 16 c + (0..15); bytes: channels 32 t + (0..31).
 * x bf16: one term, x itself. x fp32: three bf16 terms, x = t0 + t1 + t2 + e (each the bf16 rounding of what the
 * ones before leave; |e| <= 2^-24 |x|, as fp32 itself rounds): with exact products and fp32 sums, the fp32 GEMM. */
static void amx_pack_x(const void *xv, int x_f32, int64_t M, int64_t K, int64_t gs, int wide, uint32_t *xp,
                       int nthreads) {
    const int64_t T = K / 32, MB = (M + 15) / 16, per = gs / 32, terms = x_f32 ? 3 : 1, plane = MB * T * 256;
    /* a row's 16 pair words (r = 0..15) go down column m of the tile: scattered with a stride of 16 words */
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < MB * T; i++) {
        const int64_t mb = i / T, t = i % T;
        int64_t lo, hi;
        if (wide) { lo = 32 * t; hi = lo + 16; }
        else { const int64_t g = t / per, c = t % per; lo = g * gs + 16 * c; hi = g * gs + gs / 2 + 16 * c; }
        for (int m = 0; m < 16; m++) {
            const int64_t row = mb * 16 + m;
            if (row >= M) {
                for (int64_t term = 0; term < terms; term++)
                    _mm512_i32scatter_epi32(xp + term * plane + i * 256 + m, column, _mm512_setzero_si512(), 4);
                continue;
            }
            if (!x_f32) {  /* the channels' bf16 pairs: 8 words from the low chunk, 8 from the high one */
                const uint16_t *x = (const uint16_t *)xv + row * K;
                const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(x + lo))),
                                                     _mm256_loadu_si256((const __m256i *)(x + hi)), 1);
                _mm512_i32scatter_epi32(xp + i * 256 + m, column, v, 4);
                continue;
            }
            const float *x = (const float *)xv + row * K;
            __m512 a = _mm512_loadu_ps(x + lo), b = _mm512_loadu_ps(x + hi);
            for (int64_t term = 0; term < terms; term++) {
                const __m512bh h = _mm512_cvtne2ps_pbh(b, a);  /* words 0..15: a's channels, 16..31: b's */
                _mm512_i32scatter_epi32(xp + term * plane + i * 256 + m, column, (__m512i)h, 4);
                a = _mm512_sub_ps(a, _mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256((__m512i)h)));
                b = _mm512_sub_ps(b, _mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64((__m512i)h, 1)));
            }
        }
    }
}

/* One 16 x 32 A tile from 16 bytes (nibbles) or 32 bytes (bytes) of each of 16 weight rows: row j's codes at
 * rows[j] + off. Nibbles, exact = 0: bf16 128 + q by one OR, the offset left to `corr`; exact = 1: bf16 q itself,
 * looked up in a 32-entry table by vpermw, no offset whose large sums would cancel (the fp32 path's accuracy).
 * Bytes: bf16 u itself (exact: 8 significant bits), converted by way of fp32. */
static inline __attribute__((always_inline)) void amx_a_tile(const uint8_t *const *rows, int64_t off, int wide,
                                                             int exact, uint16_t *a) {
    const __m512i ones = _mm512_set_epi16(  /* bf16(i & 15) for word index i */
        0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040,
        0x4000, 0x3F80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0,
        0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
    const __m512i nib = _mm512_set1_epi16(15);
    for (int j = 0; j < 16; j++) {
        const uint8_t *p = rows[j] + off;
        if (wide) {  /* a byte u is exact in bf16 (8 significant bits): one tile, by way of fp32 */
            const __m512 l = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
            const __m512 h = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
            _mm512_store_si512((void *)(a + j * 32), (__m512i)_mm512_cvtne2ps_pbh(h, l));
        } else {
            __m512i w = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p)));
            w = _mm512_inserti64x4(w, _mm512_castsi512_si256(_mm512_srli_epi16(w, 4)), 1);
            _mm512_store_si512((void *)(a + j * 32),
                               exact ? _mm512_permutexvar_epi16(_mm512_and_si512(w, nib), ones) : codes_lo(w));
        }
    }
}

#define HFQ_AMX_MB 4 /* blocks of 16 activation rows met by one A tile: C tiles 0..3 */
#define HFQ_AMX_CH 8 /* A tiles made at a time (8 KB of L1) */

static int codes_amx(const void *x, int x_f32, int64_t M, int64_t K, const uint8_t *packed, const float *scale,
                     const float *corr, const float *bias, void *out, int64_t N, int64_t G, int64_t gs, int kind,
                     int wide, int nthreads) {
    if (gs % 32 || gs <= 0 || G * gs != K || M <= 0) return 2;
    if (hfq_amx_enable()) return 3;
    const int64_t MB = (M + 15) / 16, T = K / 32, per = gs / 32, row_bytes = wide ? K : K / 2;
    const int64_t NB = (N + 15) / 16, gbytes = wide ? gs : gs / 2, tbytes = wide ? 32 : 16;
    const int64_t terms = x_f32 ? 3 : 1, plane = MB * T * 256;
    uint32_t *xp = (uint32_t *)aligned_alloc(64, (size_t)(terms * plane * 4));
    if (!xp) return 4;
    amx_pack_x(x, x_f32, M, K, gs, wide, xp, nthreads);
    int failed = 0;
    /* work items: (up to HFQ_AMX_MB blocks of 16 activation rows) x (16 weight rows); within one, each group's
     * tiles are made one at a time in L1 and met with the blocks' B tiles, the C tiles summing over the group.
     * Past HFQ_AMX_MB blocks the weight is made into tiles again for each further HFQ_AMX_MB: that costs less than
     * reading the activations' tiles from beyond L2 for every 16 weight rows. */
    const int64_t MG = (MB + HFQ_AMX_MB - 1) / HFQ_AMX_MB;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        uint16_t *a = (uint16_t *)aligned_alloc(64, HFQ_AMX_CH * 1024);
        float *acc = (float *)aligned_alloc(64, HFQ_AMX_MB * 1024);
        float *c = (float *)aligned_alloc(64, 1024);
        const int ok = a && acc && c;
        if (!ok) failed = 1;
        else amx_config();
#pragma omp for schedule(static)
        for (int64_t item = 0; item < NB * MG; item++) {
            if (!ok) continue;
            /* consecutive items of a thread share their activation blocks (kept in L2) and walk the weight */
            const int64_t mg = item / NB, nb = item % NB;
            const int64_t n0 = nb * 16, rows = N - n0 < 16 ? N - n0 : 16;
            const int64_t mb0 = mg * HFQ_AMX_MB, nmb = MB - mb0 < HFQ_AMX_MB ? MB - mb0 : HFQ_AMX_MB;
            /* rows past N read row n0's codes again (their scale is 0) */
            const uint8_t *rowp[16];
            for (int j = 0; j < 16; j++) rowp[j] = packed + (n0 + (j < rows ? j : 0)) * row_bytes;
            memset(acc, 0, (size_t)(nmb * 1024));
            for (int64_t g = 0; g < G; g++) {
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                /* up to HFQ_AMX_CH tiles made first, then met: a tile load waits for the stores that wrote it */
                for (int64_t t0 = 0; t0 < per; t0 += HFQ_AMX_CH) {
                    const int64_t nt = per - t0 < HFQ_AMX_CH ? per - t0 : HFQ_AMX_CH;
                    for (int64_t t = 0; t < nt; t++)
                        amx_a_tile(rowp, g * gbytes + (t0 + t) * tbytes, wide, x_f32, a + t * 512);
                    for (int64_t t = 0; t < nt; t++) {
                        _tile_loadd(4, a + t * 512, 64);
                        const uint32_t *xb = xp + (mb0 * T + g * per + t0 + t) * 256;
#define HFQ_AMX_STEP(C) if (nmb > C) for (int64_t term = 0; term < terms; term++) { \
                            _tile_loadd(6, xb + term * plane + (C) * T * 256, 64); _tile_dpbf16ps(C, 4, 6); }
                        HFQ_AMX_STEP(0) HFQ_AMX_STEP(1) HFQ_AMX_STEP(2) HFQ_AMX_STEP(3)
#undef HFQ_AMX_STEP
                    }
                }
                __m512 sc[16];
                for (int j = 0; j < 16; j++) sc[j] = _mm512_set1_ps(j < rows ? scale[(n0 + j) * G + g] : 0.0f);
#define HFQ_AMX_ACC(C) if (nmb > C) { _tile_stored(C, c, 64); float *ab = acc + (C) * 256; \
                    for (int j = 0; j < 16; j++) _mm512_store_ps(ab + j * 16, _mm512_fmadd_ps( \
                        _mm512_load_ps(c + j * 16), sc[j], _mm512_load_ps(ab + j * 16))); }
                HFQ_AMX_ACC(0) HFQ_AMX_ACC(1) HFQ_AMX_ACC(2) HFQ_AMX_ACC(3)
#undef HFQ_AMX_ACC
            }
            const int64_t m_end = (mb0 + nmb) * 16 < M ? (mb0 + nmb) * 16 : M;
            for (int64_t m = mb0 * 16; m < m_end; m++) {
                const float *ab = acc + (m / 16 - mb0) * 256 + (m % 16);
                for (int64_t j = 0; j < rows; j++) {
                    const int64_t n = n0 + j;
                    float v = ab[j * 16] - corr[m * N + n];
                    if (bias) v += bias[n];
                    if (kind == 0) ((float *)out)[m * N + n] = v;
                    else ((uint16_t *)out)[m * N + n] = f32_to_bf16(v);
                }
            }
        }
        if (ok) _tile_release();
        free(a); free(acc); free(c);
    }
    free(xp);
    return failed ? 4 : 0;
}

int hfq_codes_amx_gemm(const uint16_t *x, int64_t M, int64_t K, const uint8_t *packed, const float *scale,
                       const float *corr, const float *bias, void *out, int64_t N, int64_t G, int64_t gs, int kind,
                       int wide, int nthreads) {  /* bf16 x */
    return codes_amx(x, 0, M, K, packed, scale, corr, bias, out, N, G, gs, kind, wide, nthreads);
}

int hfq_codes_amx_f32_gemm(const float *x, int64_t M, int64_t K, const uint8_t *packed, const float *scale,
                           const float *corr, const float *bias, void *out, int64_t N, int64_t G, int64_t gs, int kind,
                           int wide, int nthreads) {  /* fp32 x as three bf16 terms */
    return codes_amx(x, 1, M, K, packed, scale, corr, bias, out, N, G, gs, kind, wide, nthreads);
}

/* ---------------------------------------------------------------------------------------------------
 * hfq_dequant_amx_gemm: out (M x N) = x (M x K, bf16) W_hat^T for many rows (prefill), W_hat the grouped codes
 * dequantized as hfq_dequant_* makes them ((code - zero) * scale in fp32, rounded once to bf16: the same weight as
 * the reference kernel's), products exact and sums fp32 in `tdpbf16ps`, rounded once to the output type. The codes
 * are dequantized per thread into panels that stay in L2 and are read straight as B tiles: a block of 64 output
 * columns over a chunk of K is stored in AMX's pair layout (row p of 256 bytes holds the channels 2p, 2p + 1 of
 * its 64 columns), made 16 columns x 32 channels at a time (each column's 32 values as 16 pair words, then a 16 x 16
 * transpose of the words). x is copied into A tiles once per call (amx_pack_a on its bytes: 32 channels a tile row).
 * Work: groups of up to HFQ_DA_SB blocks over the threads; per chunk of K (HFQ_DA_PANEL bytes of panel per
 * group) the group's panels are made once and every 32 rows of x (of the pass's HFQ_DA_MC) meet them: 2 A x 2 B
 * tiles per step into four fp32 C tiles, kept between chunks in the thread's sums buffer. Where torch's bf16
 * GEMM (oneDNN, AMX) meets a dequantized weight that the dequantization wrote to memory, this one dequantizes
 * into L2 and reads the codes from memory: a quarter of the bytes at 4 bits.
 */
#ifndef HFQ_DA_SB
#define HFQ_DA_SB 2
#endif
#ifndef HFQ_DA_PANEL
#define HFQ_DA_PANEL (512 << 10)  /* bytes of panel a group keeps per chunk of K */
#endif
#ifndef HFQ_DA_MC
#define HFQ_DA_MC 512  /* rows of x per pass (a multiple of 32): the panels are made once per pass */
#endif

/* 16 byte codes at p dequantized in fp32: (q - z) * s. */
static inline __m512 da_bytes16(const uint8_t *p, __m512 z, __m512 s) {
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
    return _mm512_mul_ps(_mm512_sub_ps(q, z), s);
}

/* Word j of r[i] into word i of row j (dst + j * stride): the 16 x 16 transpose of 32-bit words. */
static inline void da_transpose16(const __m512i r[16], uint8_t *dst, int64_t stride) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {  /* per 128-bit lane: words 0, 1 (lo) and 2, 3 (hi) of rows 2i, 2i + 1 */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 4; q++) {  /* u[4q + c], lane L: word 4L + c of rows 4q .. 4q + 3 */
        u[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
        u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
    for (int c = 0; c < 4; c++) {  /* word w = 4L + c of every row: lane L of u[c], u[4 + c], u[8 + c], u[12 + c] */
        const __m512i v = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), w = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        const __m512i w2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
        _mm512_store_si512((__m512i *)(dst + c * stride), _mm512_shuffle_i32x4(v, v2, 0x88));
        _mm512_store_si512((__m512i *)(dst + (8 + c) * stride), _mm512_shuffle_i32x4(v, v2, 0xDD));
        _mm512_store_si512((__m512i *)(dst + (4 + c) * stride), _mm512_shuffle_i32x4(w, w2, 0x88));
        _mm512_store_si512((__m512i *)(dst + (12 + c) * stride), _mm512_shuffle_i32x4(w, w2, 0xDD));
    }
}

/* nibble_values rounded once to bf16, in words 0..15: a table for `vpermw` (the same bytes as computing each code). */
static inline __m512i da_table(float s, float z) {
    return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(nibble_values(s, z)));
}

/* A group's nibble codes of channels c..c+31 (half = gs / 2: channel c < half the low nibble of byte c, else the high
 * nibble of byte c - half) as 32 16-bit indices in channel order. */
static inline __m512i da_nibbles32(const uint8_t *gp, int64_t half, int64_t c) {
    if (half % 32 == 0) {  /* the 32 channels in one half: one nibble of 32 bytes */
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(gp + (c < half ? c : c - half))));
        return c < half ? _mm512_and_si512(w, _mm512_set1_epi16(15)) : _mm512_srli_epi16(w, 4);
    }
    /* half = 16 (groups of 32): channels 0..15 the low nibbles of the group's 16 bytes, 16..31 the high ones */
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)gp));
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(w, _mm256_set1_epi16(15))),
                              _mm256_srli_epi16(w, 4), 1);
}

/* The panel of the block of columns n0.. (64, zero past N) over the tiles of K [t0, t1) (32 channels each): pb +
 * (t - t0) * 4 KiB, row p (256 bytes) of a tile the pair words of its channels 2p, 2p + 1 for the 64 columns. A
 * column's 32 values of a tile are 16 pair words (nibbles: looked up in the group's table; bytes: computed), and
 * the 16 x 16 words of 16 columns are transposed into the tile's rows. */
static void da_panel(const uint8_t *codes, const float *scale, const float *zero, int64_t N, int64_t G, int64_t gs,
                     int nibbles, int64_t n0, int64_t t0, int64_t t1, uint8_t *pb) {
    const int64_t gb = nibbles ? gs / 2 : gs, row_bytes = G * gb, half = gs / 2;
    __m512i tab[16];
    for (int jb = 0; jb < 4; jb++) {
        const int64_t nj = n0 + jb * 16, cols = N - nj < 16 ? N - nj : 16;
        int64_t gcur = -1;
        for (int64_t t = t0; t < t1; t++) {
            const int64_t g = t * 32 / gs, c = t * 32 % gs;
            __m512i r[16];
            if (nibbles && g != gcur) {
                for (int j = 0; j < cols; j++) tab[j] = da_table(scale[(nj + j) * G + g], zero[(nj + j) * G + g]);
                gcur = g;
            }
            for (int j = 0; j < 16; j++) {
                if (j >= cols) { r[j] = _mm512_setzero_si512(); continue; }
                const uint8_t *gp = codes + (nj + j) * row_bytes + g * gb;
                if (nibbles) {
                    r[j] = _mm512_permutexvar_epi16(da_nibbles32(gp, half, c), tab[j]);
                } else {
                    const __m512 sv = _mm512_set1_ps(scale[(nj + j) * G + g]), zv = _mm512_set1_ps(zero[(nj + j) * G + g]);
                    r[j] = (__m512i)_mm512_cvtne2ps_pbh(da_bytes16(gp + c + 16, zv, sv), da_bytes16(gp + c, zv, sv));
                }
            }
            da_transpose16(r, pb + (t - t0) * 4096 + jb * 64, 256);
        }
    }
}

int hfq_dequant_amx_gemm(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *codes,
                         const float *scale, const float *zero, const float *bias, void *out, int64_t N, int64_t G,
                         int64_t gs, int nibbles, int kind, int nthreads) {
    if (M <= 0 || N <= 0 || K <= 0 || K % 32 || gs <= 0 || gs % 32 || G * gs != K || ldx < K) return 1;
    if (hfq_amx_enable()) return 3;
    if (nthreads < 1) nthreads = 1;
    const int64_t KT = K / 32, units = (M + 31) / 32, blocks = (N + 63) / 64;
    int64_t sb, ktc;
    const int64_t groups = amx_groups(blocks, nthreads, HFQ_DA_SB, HFQ_DA_PANEL, 4096, &sb, &ktc);
    ktc = ktc > KT ? KT : ktc;  /* the panel buffer: no larger than K needs */
    const int64_t UC = HFQ_DA_MC / 32;  /* units per pass */
    uint8_t *at = (uint8_t *)aligned_alloc(64, (size_t)(2 * units * KT * 1024));
    if (!at) return 4;
    amx_pack_a((const uint8_t *)x, M, 2 * K, 2 * ldx, at, 2 * units, nthreads);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        uint8_t *panel = (uint8_t *)aligned_alloc(64, (size_t)(sb * ktc * 4096));
        float *sums = (float *)aligned_alloc(64, (size_t)(UC * sb * 32 * 64 * 4));
        const int ok = panel && sums;
        if (!ok) failed = 1;
        else amx_config();
#pragma omp for schedule(static)
        for (int64_t gi = 0; gi < groups; gi++) {
            if (!ok) continue;
            const int64_t nb0 = gi * sb, nb1 = nb0 + sb < blocks ? nb0 + sb : blocks;
            for (int64_t uc0 = 0; uc0 < units; uc0 += UC) {
                const int64_t uc1 = units - uc0 < UC ? units : uc0 + UC;
                for (int64_t t0 = 0; t0 < KT; t0 += ktc) {
                    const int64_t t1 = KT - t0 < ktc ? KT : t0 + ktc;
                    for (int64_t nb = nb0; nb < nb1; nb++)
                        da_panel(codes, scale, zero, N, G, gs, nibbles, nb * 64, t0, t1, panel + (nb - nb0) * ktc * 4096);
                    for (int64_t u = uc0; u < uc1; u++) {
                        const uint8_t *a0 = at + 2 * u * KT * 1024, *a1 = a0 + KT * 1024;
                        for (int64_t nb = nb0; nb < nb1; nb++) {
                            const uint8_t *pb = panel + (nb - nb0) * ktc * 4096;
                            float *c = sums + ((u - uc0) * sb + nb - nb0) * 2048;
                            for (int h = 0; h < 2; h++) {
                                float *c0 = c + h * 32, *c1 = c0 + 16 * 64;
                                if (t0 == 0) {
                                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                                } else {
                                    _tile_loadd(0, c0, 256); _tile_loadd(1, c0 + 16, 256);
                                    _tile_loadd(2, c1, 256); _tile_loadd(3, c1 + 16, 256);
                                }
                                for (int64_t t = t0; t < t1; t++) {
                                    const uint8_t *bp = pb + (t - t0) * 4096 + h * 128;
                                    _tile_loadd(4, a0 + t * 1024, 64);
                                    _tile_loadd(6, bp, 256);
                                    _tile_loadd(7, bp + 64, 256);
                                    _tile_dpbf16ps(0, 4, 6);
                                    _tile_dpbf16ps(1, 4, 7);
                                    _tile_loadd(5, a1 + t * 1024, 64);
                                    _tile_dpbf16ps(2, 5, 6);
                                    _tile_dpbf16ps(3, 5, 7);
                                }
                                _tile_stored(0, c0, 256); _tile_stored(1, c0 + 16, 256);
                                _tile_stored(2, c1, 256); _tile_stored(3, c1 + 16, 256);
                            }
                        }
                    }
                }
                for (int64_t u = uc0; u < uc1; u++) {  /* the pass's epilogue: its rows of the group's columns */
                    const int64_t m0 = u * 32, rows = M - m0 < 32 ? M - m0 : 32;
                    for (int64_t nb = nb0; nb < nb1; nb++) {
                        const float *c = sums + ((u - uc0) * sb + nb - nb0) * 2048;
                        for (int j = 0; j < 4; j++) {
                            const int64_t n = nb * 64 + j * 16;
                            if (n >= N) break;
                            const __mmask16 k = n + 16 <= N ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1u);
                            const __m512 b = bias ? _mm512_maskz_loadu_ps(k, bias + n) : _mm512_setzero_ps();
                            for (int64_t i = 0; i < rows; i++)
                                put_first(_mm512_add_ps(_mm512_load_ps(c + i * 64 + j * 16), b), out, (m0 + i) * N + n,
                                          N - n, kind);
                        }
                    }
                }
            }
        }
        if (ok) _tile_release();
        free(panel); free(sums);
    }
    free(at);
    return failed ? 4 : 0;
}
#else
int hfq_codes_amx_gemm(const uint16_t *x, int64_t M, int64_t K, const uint8_t *packed, const float *scale,
                       const float *corr, const float *bias, void *out, int64_t N, int64_t G, int64_t gs, int kind,
                       int wide, int nthreads) {
    (void)x; (void)M; (void)K; (void)packed; (void)scale; (void)corr; (void)bias; (void)out; (void)N; (void)G;
    (void)gs; (void)kind; (void)wide; (void)nthreads;
    return 1;
}
int hfq_codes_amx_f32_gemm(const float *x, int64_t M, int64_t K, const uint8_t *packed, const float *scale,
                           const float *corr, const float *bias, void *out, int64_t N, int64_t G, int64_t gs, int kind,
                           int wide, int nthreads) {
    return hfq_codes_amx_gemm((const uint16_t *)x, M, K, packed, scale, corr, bias, out, N, G, gs, kind, wide,
                              nthreads);
}
int hfq_dequant_amx_gemm(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *codes,
                         const float *scale, const float *zero, const float *bias, void *out, int64_t N, int64_t G,
                         int64_t gs, int nibbles, int kind, int nthreads) {
    (void)x; (void)M; (void)K; (void)ldx; (void)codes; (void)scale; (void)zero; (void)bias; (void)out; (void)N;
    (void)G; (void)gs; (void)nibbles; (void)kind; (void)nthreads;
    return 1;
}
#endif

/* ---------------------------------------------------------------------------------------------------
 * The exact int8 GEMM of hfq_int8_gemm on AMX-INT8 tiles (Sapphire Rapids and later): the same operands (uint8
 * codes + 128, the packed weight and comp of hfq_int8_pack, unchanged), the same epilogue (i8_store_full /
 * i8_finish on the int32 sums) and so the same bytes. `tdpbusd` multiplies a 16 x 64 uint8 A tile by a 64 x 16
 * int8 B tile (16 rows of four codes of 16 columns) into 16 x 16 int32, 16384 products per instruction. B tiles
 * come straight from the packed weight: row q of a block (256 bytes) holds the four codes k = 4q.. of its 64
 * columns, so 16 columns' tile is 64 bytes of each of 16 rows, stride 256. A is first copied into tiles
 * (`amx_pack_a`: (16 rows x 64 codes) contiguous, rows past M and codes past K zero; each m-block of the
 * GEMM then reads two sequential streams). A job is 32 rows x 32 columns over all of K in the four C tiles (2 A
 * x 2 B tiles per step: 4 loads per 4 products); a block of 64 columns takes two, then its epilogue. Where K
 * is not a multiple of 64 the last step's B tiles are copied (zero past K) instead of read past the block. Work:
 * groups of up to HFQ_AI8_SB blocks of columns (their panels, 512 KiB at K = 4096, stay in L2) over the threads;
 * a group runs every 32 rows of A through all of its blocks, so each tile of A is read once per group.
 */
#if defined(HFQ_AMX_TILE) && defined(__AMX_INT8__) && HFQ_I8 == 1
#ifndef HFQ_AI8_SB
#define HFQ_AI8_SB 2
#endif
#ifndef HFQ_AI8_PANEL
#define HFQ_AI8_PANEL (512 << 10)  /* bytes of weight a group of blocks keeps in L2 per chunk of K (1 MiB: 8% slower at K = 11008) */
#endif
#ifndef HFQ_AI8_PF
#define HFQ_AI8_PF 3  /* the first unit's prefetch distance (into L2), steps of K (4 KiB of a block each); 0: none */
#endif
#ifndef HFQ_AI8_MC
#define HFQ_AI8_MC 512  /* rows per pass of a chunked K (a multiple of 32): their partial sums, MC x 64 x sb int32 */
#endif

/* One step of K (64 codes): C0, C1 += A0 B0, A0 B1 (and C2, C3 += A1 B0, A1 B1 when two); B's two tiles at bp and bp +
 * 64, rows `stride` bytes apart. */
static inline __attribute__((always_inline)) void ai8_step(const uint8_t *a0, const uint8_t *a1, const int8_t *bp,
                                                           int64_t stride, int two) {
    _tile_loadd(4, a0, 64);
    _tile_loadd(6, bp, stride);
    _tile_loadd(7, bp + 64, stride);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    if (two) {
        _tile_loadd(5, a1, 64);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
}

/* Half a job: acc (32 x 64 int32, rows of 256 bytes) columns 32 h.. += A's m-tiles at a0 (and a0 + KT tiles when
 * two) times the block's columns 32 h.. (b: K/4 rows of 256 bytes), over the tiles [t0, t1) of K (K's last tile, if
 * partial, included: its codes past K are zero in A, and B's rows are copied to btail, zero past K, instead of read
 * past the block). first: the sums start at zero instead of acc's. pf (the caller's: the first half of a pass's
 * first unit, whose B comes from memory): each step also prefetches into L2 the whole 4 KiB of the block HFQ_AI8_PF steps ahead (both
 * halves' rows; past the block's end, the next block's start). The AMX tile loads alone keep too few lines in flight:
 * cold weights at 64 rows streamed at 4-6 GiB/s against the VM's 15-19 (+25-30% with the prefetch, A/B). */
static inline __attribute__((always_inline)) void ai8_half(const uint8_t *a0, int64_t KT, int two, const int8_t *b,
                                                           int64_t K, int64_t t0, int64_t t1, int h, int first,
                                                           int32_t *acc, int8_t *btail, int pf) {
    const int8_t *bh = b + h * 128;
    const uint8_t *a1 = a0 + KT * 1024;
    int32_t *c0 = acc + h * 32, *c1 = c0 + 16 * 64;
    const int64_t full = t1 < K / 64 ? t1 : K / 64;
    if (first) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    } else {
        _tile_loadd(0, c0, 256); _tile_loadd(1, c0 + 16, 256);
        if (two) { _tile_loadd(2, c1, 256); _tile_loadd(3, c1 + 16, 256); }
    }
    for (int64_t kt = t0; kt < full; kt++) {
        if (HFQ_AI8_PF && pf)
            for (int l = 0; l < 64; l++) _mm_prefetch((const char *)(b + (kt + HFQ_AI8_PF) * 16 * 256) + 64 * l, _MM_HINT_T1);
        ai8_step(a0 + kt * 1024, a1 + kt * 1024, bh + kt * 16 * 256, 256, two);
    }
    if (full < t1) {  /* K's last K % 64 codes: rows 16 full.. of the block, the rest of the tile zero */
        const int64_t q = (K % 64) / 4;
        memset(btail, 0, 16 * 128);
        for (int64_t r = 0; r < q; r++) memcpy(btail + r * 128, bh + (full * 16 + r) * 256, 128);
        ai8_step(a0 + full * 1024, a1 + full * 1024, btail, 128, two);
    }
    _tile_stored(0, c0, 256); _tile_stored(1, c0 + 16, 256);
    if (two) { _tile_stored(2, c1, 256); _tile_stored(3, c1 + 16, 256); }
}

/* The work of a tile GEMM: `units` row units, unit u the `tiles(u)` (1..HFQ_AI8_TT) consecutive 16-row tiles of A from
 * tile row `first(u)` (at: tile rows of KT tiles of 1 KiB), with `rows(u)` output rows; the epilogue of a unit and
 * a block of 64 columns reads its int32 sums from r (tile t's rows at r + t * 16 * 64, rows of 64). W8A8: units of
 * 32 tokens (two tiles); the split kernel: 16 tokens, one tile per term. */
#define HFQ_AI8_TT 4
typedef struct {
    int split;  /* 0: W8A8 (hfq_i8_epi), 1: the split kernel's terms */
    int64_t M, MT;  /* W8A8: rows of A, its 16-row tiles */
    const int8_t *tt;  /* split: the terms of each 16-token group (its tile count) */
    int TT;  /* split: tile rows per group in at */
    const float *st, *rowsum, *offset, *bias;  /* split: the terms' scales (M x TT), sum(x) per row */
    const int32_t *comp;
    const float *ws;
    void *out;
    int64_t N;
    int kind;
} hfq_ai8_work;

static inline int64_t ai8_first(const hfq_ai8_work *w, int64_t u) { return w->split ? u * w->TT : 2 * u; }
static inline int ai8_tiles(const hfq_ai8_work *w, int64_t u) {
    return w->split ? w->tt[u] : (w->MT - 2 * u < 2 ? (int)(w->MT - 2 * u) : 2);
}
static inline int ai8_rows(const hfq_ai8_work *w, int64_t u, int64_t *m0) {
    const int64_t per = w->split ? 16 : 32;
    *m0 = u * per;
    return w->M - *m0 < per ? (int)(w->M - *m0) : (int)per;
}

/* The split kernel's epilogue: out[m, n] = sum_t st[m, t] ((acc_t - comp[n]) ws[n]) (+ rowsum[m] offset[n])
 * (+ bias[n]), terms in order, fp32, rounded once to the output type. */
static void ai8_split_epilogue(const int32_t *r, int tiles, int rows, int64_t m0, int64_t n0, const hfq_ai8_work *w) {
    for (int j = 0; j < 4; j++) {
        const int64_t n = n0 + j * 16;
        if (n >= w->N) break;
        const __mmask16 k = n + 16 <= w->N ? (__mmask16)0xFFFF : (__mmask16)((1u << (w->N - n)) - 1u);
        const __m512i comp = _mm512_loadu_si512(w->comp + n);
        const __m512 ws = _mm512_maskz_loadu_ps(k, w->ws + n);
        const __m512 off = w->offset ? _mm512_maskz_loadu_ps(k, w->offset + n) : _mm512_setzero_ps();
        const __m512 bias = w->bias ? _mm512_maskz_loadu_ps(k, w->bias + n) : _mm512_setzero_ps();
        for (int i = 0; i < rows; i++) {
            const int64_t m = m0 + i;
            const float *st = w->st + m * w->TT;
            __m512 y = _mm512_setzero_ps();
            for (int t = 0; t < tiles; t++) {
                const __m512 z = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(
                    _mm512_load_si512(r + (t * 16 + i) * 64 + j * 16), comp)), ws);
                y = t ? _mm512_fmadd_ps(z, _mm512_set1_ps(st[t]), y) : _mm512_mul_ps(z, _mm512_set1_ps(st[0]));
            }
            if (w->offset) y = _mm512_fmadd_ps(_mm512_set1_ps(w->rowsum[m]), off, y);
            if (w->bias) y = _mm512_add_ps(y, bias);
            put_first(y, w->out, m * w->N + n, w->N - n, w->kind);
        }
    }
}

static int ai8_drive(const uint8_t *at, int64_t KT, int64_t K, int64_t units, const int8_t *packed, int64_t N,
                     const hfq_i8_epi *e, const hfq_ai8_work *w, int nthreads) {
    const int64_t blocks = (N + HFQ_I8_NR - 1) / HFQ_I8_NR;
    int64_t sb, ktc;  /* blocks per group (at most HFQ_AI8_SB, a group per thread), tiles of K per chunk (panels in L2) */
    const int64_t groups = amx_groups(blocks, nthreads, HFQ_AI8_SB, HFQ_AI8_PANEL, HFQ_I8_NR * 64, &sb, &ktc);
    const int chunked = ktc < KT;  /* then each job's partial sums wait in cbuf between the chunks of K */
    const int64_t UC = chunked ? HFQ_AI8_MC / (w->split ? 16 : 32) : units;  /* units per pass: HFQ_AI8_MC rows */
    const int64_t unit_ints = (w->split ? w->TT : 2) * 16 * 64;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        int32_t *acc = (int32_t *)aligned_alloc(64, (size_t)(unit_ints * 4));
        int32_t *cbuf = chunked ? (int32_t *)aligned_alloc(64, (size_t)(UC * sb * unit_ints * 4)) : NULL;
        int8_t *btail = (int8_t *)aligned_alloc(64, 16 * 128);
        const int ok = acc && btail && (cbuf || !chunked);
        if (!ok) failed = 1;
        else amx_config();
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            if (!ok) continue;
            const int64_t nb0 = g * sb, nb1 = nb0 + sb < blocks ? nb0 + sb : blocks;
            for (int64_t uc0 = 0; uc0 < units; uc0 += UC) {
                const int64_t uc1 = units - uc0 < UC ? units : uc0 + UC;
                for (int64_t t0 = 0; t0 < KT; t0 += ktc) {
                    const int64_t t1 = KT - t0 < ktc ? KT : t0 + ktc;
                    for (int64_t u = uc0; u < uc1; u++) {
                        const int tiles = ai8_tiles(w, u);
                        int64_t m0;
                        const int rows = ai8_rows(w, u, &m0);
                        const uint8_t *a0 = at + ai8_first(w, u) * KT * 1024;
                        for (int64_t nb = nb0; nb < nb1; nb++) {
                            const int8_t *b = packed + nb * HFQ_I8_NR * K;
                            const int64_t n0 = nb * HFQ_I8_NR;
                            int32_t *r = chunked ? cbuf + ((u - uc0) * sb + nb - nb0) * unit_ints : acc;
                            const int pf = u == uc0;  /* the pass's first unit reads the panel from memory */
                            for (int t = 0; t < tiles; t += 2) {  /* pairs of tiles (the last alone if odd) */
                                const uint8_t *ap = a0 + t * KT * 1024;
                                int32_t *rp = r + t * 16 * 64;
                                if (t + 1 < tiles) {
                                    ai8_half(ap, KT, 1, b, K, t0, t1, 0, t0 == 0, rp, btail, pf && t == 0);
                                    ai8_half(ap, KT, 1, b, K, t0, t1, 1, t0 == 0, rp, btail, 0);
                                } else {
                                    ai8_half(ap, KT, 0, b, K, t0, t1, 0, t0 == 0, rp, btail, pf && t == 0);
                                    ai8_half(ap, KT, 0, b, K, t0, t1, 1, t0 == 0, rp, btail, 0);
                                }
                            }
                            if (t1 < KT) continue;
                            if (w->split) {
                                ai8_split_epilogue(r, tiles, rows, m0, n0, w);
                            } else if (!e->n_out && n0 + HFQ_I8_NR <= N) {
                                for (int i = 0; i < rows; i++)
                                    for (int j = 0; j < 4; j++)
                                        i8_store_full(_mm512_load_si512(r + i * 64 + j * 16), e, m0 + i, n0 + j * 16);
                            } else {
                                for (int i = 0; i < rows; i += HFQ_I8_MR)
                                    i8_finish(r + i * 64, rows - i < HFQ_I8_MR ? rows - i : HFQ_I8_MR, e, m0 + i, n0);
                            }
                        }
                    }
                }
            }
        }
        if (ok) _tile_release();
        free(acc); free(cbuf); free(btail);
    }
    return failed ? 4 : 0;
}

int hfq_int8_amx_gemm(const uint8_t *a, int64_t M, int64_t K, int64_t lda, const int8_t *packed, int64_t N,
                      const int32_t *comp, const float *ws, const float *absmax, const float *bias, const float *xo,
                      const float *wc, int64_t n_out, void *out, int64_t ldo, int out_kind, int nthreads) {
    if (K % 4 || K <= 0 || M <= 0 || (!absmax && (out_kind != 0 || n_out > 0)) || (n_out > 0 && (!xo || !wc))) return 1;
    if (hfq_amx_enable()) return 3;
    const hfq_i8_epi e = {comp, ws, absmax, bias, n_out > 0 ? xo : NULL, n_out > 0 ? wc : NULL, out, ldo, N,
                          n_out > 0 ? n_out : 0, out_kind};
    const int64_t KT = (K + 63) / 64, MT = (M + 15) / 16;
    hfq_ai8_work w;
    memset(&w, 0, sizeof w);
    w.M = M, w.MT = MT;
    uint8_t *at = (uint8_t *)aligned_alloc(64, (size_t)((MT + 1) * KT * 1024));
    if (!at) return 4;
    amx_pack_a(a, M, K, lda, at, MT, nthreads);
    const int rc = ai8_drive(at, KT, K, (MT + 1) / 2, packed, N, &e, &w, nthreads);
    free(at);
    return rc;
}

static inline float ai8_absmax(const float *r, int64_t K) {
    __m512 m = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(r + k)));
    float a = _mm512_reduce_max_ps(m);
    for (; k < K; k++) a = fabsf(r[k]) > a ? fabsf(r[k]) : a;
    return a;
}

/* A row's sum, sum of squares and absmax (fp32), in one pass. */
static void split_stats(const float *r, int64_t K, float *sum_out, float *sq_out, float *amax_out) {
    __m512 vs = _mm512_setzero_ps(), vq = vs, va = vs;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512 v = _mm512_loadu_ps(r + k);
        vs = _mm512_add_ps(vs, v);
        vq = _mm512_fmadd_ps(v, v, vq);
        va = _mm512_max_ps(va, _mm512_abs_ps(v));
    }
    float sum = _mm512_reduce_add_ps(vs), sq = _mm512_reduce_add_ps(vq), amax = _mm512_reduce_max_ps(va);
    for (; k < K; k++) sum += r[k], sq += r[k] * r[k], amax = fabsf(r[k]) > amax ? fabsf(r[k]) : amax;
    *sum_out = sum, *sq_out = sq, *amax_out = amax;
}

/* One int8 term of r (fp32, overwritten by its residual r - q s) whose absmax is a: q = round-half-even(r * 127 / a)
 * + add (add 128: uint8 codes; 0: int8), written in 64-code rows (K's chunk kt at row + kt * stride, zero codes past
 * K); returns the term's scale s = a / 127. */
static float split_term(float *r, int64_t K, float a, uint8_t *row, int64_t stride, int add) {
    const float mul = a > 0.0f ? 127.0f / a : 0.0f, s = a / 127.0f;
    const __m512 vm = _mm512_set1_ps(mul), vsc = _mm512_set1_ps(s);
    const __m512i off = _mm512_set1_epi32(add);
    for (int64_t kt = 0; kt < (K + 63) / 64; kt++) {
        uint8_t *dst = row + kt * stride;
        for (int c = 0; c < 64; c += 16) {
            const int64_t k0 = kt * 64 + c;
            const __mmask16 valid = k0 + 16 <= K ? (__mmask16)0xFFFF
                                    : k0 >= K ? (__mmask16)0 : (__mmask16)((1u << (K - k0)) - 1u);
            const __m512 v = _mm512_maskz_loadu_ps(valid, r + k0);
            const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(v, vm), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128((__m128i *)(dst + c), _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(q), off)));
            _mm512_mask_storeu_ps(r + k0, valid, _mm512_fnmadd_ps(q, vsc, v));  /* the residual: v - q s */
        }
    }
    return s;
}

/* How many terms a row with these statistics takes: `terms`, one more where absmax > extra_ratio x rms. */
static inline int split_count(float sq, float amax, int64_t K, int terms, float extra_ratio) {
    return terms + (amax > extra_ratio * sqrtf(sq / (float)K) ? 1 : 0);
}

/* One row's terms (r: the row in fp32, overwritten by its residuals) into its 64-byte rows of the term tiles at row0
 * (term t's at row0 + t * KT KiB, one per tile of K); st[t] the terms' scales, 0 and codes 0 past the row's count.
 * Returns that count: `terms`, one more where absmax > extra_ratio x rms. */
static int ai8_split_row(float *r, int64_t K, int64_t KT, int terms, float extra_ratio, int TT, uint8_t *row0,
                         float *st, float *rowsum) {
    float sq, amax;
    split_stats(r, K, rowsum, &sq, &amax);
    const int n = split_count(sq, amax, K, terms, extra_ratio);
    for (int t = 0; t < TT; t++) {
        uint8_t *row = row0 + t * KT * 1024;
        if (t >= n) {
            st[t] = 0.0f;
            for (int64_t kt = 0; kt < KT; kt++) memset(row + kt * 1024, 128, 64);  /* code 0 */
            continue;
        }
        st[t] = split_term(r, K, t ? ai8_absmax(r, K) : amax, row, 1024, 128);
    }
    return n;
}

/* Weight-only int8 rows (the packed weight of hfq_int8_pack) times float activations written as int8 terms per
 * row, all on the tiles (`cpu_int8_split` fused): x (M x K, row stride ldx, x_kind 0 fp32 / 1 bf16 / 2 fp16) ~
 * sum_t s_t q_t, q_1 = round-half-even(x * 127 / absmax(x)), each further term from the residual of the ones
 * before (r - q s in fp32), `terms` of them, one more for a row whose absmax passes extra_ratio x its rms. Each
 * group of 16 rows takes one 16 x 64 tile row per term (codes + 128; a row that needs fewer terms than its group
 * has zero codes there), met by the same B tiles; out[m, n] = sum_t s_t (q_t . w_n) ws[n] (+ sum(x_m) offset[n])
 * (+ bias[n]) in out_kind, the exact int32 products combined in fp32 in the epilogue. Returns 0, 1 (bad
 * arguments), 3 (no tiles) or 4 (out of memory). */
int hfq_int8_split_amx(const void *x, int64_t M, int64_t K, int64_t ldx, int x_kind, int terms, float extra_ratio,
                       const int8_t *packed, int64_t N, const int32_t *comp, const float *ws, const float *offset,
                       const float *bias, void *out, int out_kind, int nthreads) {
    if (K % 4 || K <= 0 || M <= 0 || terms < 1 || terms >= HFQ_AI8_TT || x_kind < 0 || x_kind > 2) return 1;
    if (hfq_amx_enable()) return 3;
    const int TT = terms + 1;
    const int64_t KT = (K + 63) / 64, MG = (M + 15) / 16, esize = x_kind == 0 ? 4 : 2;
    uint8_t *at = (uint8_t *)aligned_alloc(64, (size_t)(MG * TT * KT * 1024));
    float *st = (float *)calloc((size_t)(M * TT), sizeof(float));
    float *rowsum = (float *)malloc((size_t)M * sizeof(float));
    int8_t *need = (int8_t *)malloc((size_t)M);
    int8_t *tt = (int8_t *)malloc((size_t)MG);
    int failed = 0;
    if (!at || !st || !rowsum || !need || !tt) {
        free(at); free(st); free(rowsum); free(need); free(tt);
        return 4;
    }
#pragma omp parallel num_threads(M < 16 ? 1 : nthreads) reduction(| : failed)
    {
        float *r = (float *)malloc((size_t)K * sizeof(float));
        if (!r) failed = 1;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {  /* the terms of row m: codes + 128 into its place in every term's tile row */
            if (!r) continue;
            row_to_f32((const char *)x + m * ldx * esize, K, x_kind, r);
            need[m] = (int8_t)ai8_split_row(r, K, KT, terms, extra_ratio, TT,
                                            at + ((m / 16) * TT * KT) * 1024 + (m % 16) * 64, st + m * TT, rowsum + m);
        }
        free(r);
    }
    if (!failed) {
        for (int64_t m = M; m < MG * 16; m++)  /* the rows past M: code 0 in every term */
            for (int t = 0; t < TT; t++)
                for (int64_t kt = 0; kt < KT; kt++)
                    memset(at + ((m / 16 * TT + t) * KT + kt) * 1024 + (m % 16) * 64, 128, 64);
        for (int64_t g = 0; g < MG; g++) {
            int8_t most = 0;
            for (int64_t m = g * 16; m < M && m < g * 16 + 16; m++) most = need[m] > most ? need[m] : most;
            tt[g] = most;
        }
        hfq_ai8_work w = {1, M, MG, tt, TT, st, rowsum, offset, bias, comp, ws, out, N, out_kind};
        failed = ai8_drive(at, KT, K, MG, packed, N, NULL, &w, nthreads) ? 1 : 0;
    }
    free(at); free(st); free(rowsum); free(need); free(tt);
    return failed ? 4 : 0;
}

/* ---------------------------------------------------------------------------------------------------
 * Group-quantized codes (uint8) times float activations written as int8 terms, on AMX-INT8 tiles: the split
 * kernel's terms for layers with a scale per group of channels. The weight is B, in the layout of `hfq_codes_vnni`:
 * per block of 16 output rows (blocks in pairs) and tile of K (64 channels) the B tile itself (wide: 1 KiB, byte
 * 64 r + 4 n + i the code of row n, channel 4 r + i of the tile), or for codes of at most 4 bits 512 bytes, byte
 * 64 p + 4 n + i holding in its low nibble the code of row n, channel 4 (2 p) + i and in its high one that of
 * channel 4 (2 p + 1) + i, so that two AND / shift steps make two 64-byte rows of the B tile. A holds the
 * activations' terms, one 16 x 64 tile row per term of each token (int8 codes, `tdpbsud`: signed A by unsigned B,
 * no offset), a token's rows never split between two work groups of 32 (two tiles). Each step of K meets two A
 * tiles with two B tiles (32 output rows) in the C tiles 0..3. At the end of each group of channels the C tiles are
 * stored and zeroed, and one step of K later (the tiles busy with the next group meanwhile) the group's exact int32
 * sums are combined per token with its terms' scales and added, times the scale of each output row, into the
 * token's fp32 accumulator. Out = that - corr (the zero points, M x N) + bias. Work items: (a chunk of work groups
 * whose tiles stay in L2; one chunk for all where the tiles take at most HFQ_CS_ONE) x (32 output rows); the
 * blocks' B tiles (made once per item from nibbles, read in place from bytes) meet every work group of the chunk,
 * while the next item's codes are prefetched.
 */
#ifndef HFQ_CS_CHUNK
#define HFQ_CS_CHUNK (1 << 20) /* bytes of term tiles a work item's chunk keeps in L2 */
#endif
#ifndef HFQ_CS_ONE
#define HFQ_CS_ONE (5 << 19) /* bytes of term tiles that take one chunk, past L2: 2.5 MiB */
#endif
#define HFQ_CS_MAX_CG 32 /* work groups per chunk at most (the accumulators: 4 KiB per work group) */
#define HFQ_CS_MAX_K_NIBBLES (1 << 20) /* a group's int32 sums: 127 x 15 x K < 2^31 */
#define HFQ_CS_MAX_K_BYTES (1 << 16) /* 127 x 255 x K < 2^31 */

/* One group's sums into the accumulators of a work group's tokens m0..m1 - 1: acc[m - ma] (2 x 16 fp32 lanes: two
 * blocks of output rows; ma the chunk's first token) += scale x sum_t st_t c_t over the token's rows of terms c_t (the
 * group's exact int32 sums: rows of 32, the blocks' 16 each side by side; token m's from row first[m] - row0).
 * st[m * TT + t]: its terms' scales. */
static inline void cs_flush(float *acc, int64_t ma, const int32_t *c, const float *scale, int64_t m0, int64_t m1,
                            const int64_t *first, int64_t row0, const int8_t *need, const float *st, int TT) {
    const __m512 s0 = _mm512_loadu_ps(scale), s1 = _mm512_loadu_ps(scale + 16);
    for (int64_t m = m0; m < m1; m++) {
        const int n = need[m];
        const int32_t *r = c + (first[m] - row0) * 32;
        const float *sc = st + m * TT;
        __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(r)), _mm512_set1_ps(sc[0]));
        __m512 v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(r + 16)), _mm512_set1_ps(sc[0]));
        for (int t = 1; t < n; t++) {
            v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(r + t * 32)), _mm512_set1_ps(sc[t]), v0);
            v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(r + t * 32 + 16)), _mm512_set1_ps(sc[t]), v1);
        }
        float *a = acc + (m - ma) * 32;
        _mm512_store_ps(a, _mm512_fmadd_ps(v0, s0, _mm512_load_ps(a)));
        _mm512_store_ps(a + 16, _mm512_fmadd_ps(v1, s1, _mm512_load_ps(a + 16)));
    }
}

int hfq_codes_vnni(const uint8_t *q, int64_t N, int64_t K, int wide, uint8_t *out, int nthreads) {  /* q: N x K codes */
    if (K % 64 || K <= 0 || N <= 0) return 1;
    const int64_t NB = 2 * ((N + 31) / 32), KT = K / 64, bytes = wide ? 1024 : 512;  /* blocks in pairs */
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < NB * KT; i++) {
        const int64_t nb = i / KT, kt = i % KT;
        uint8_t *dst = out + i * bytes;
        memset(dst, 0, (size_t)bytes);
        for (int r = 0; r < 16; r++)  /* the B tile's row r: channels 4 r + c of the 16 rows n */
            for (int n = 0; n < 16; n++)
                for (int c = 0; c < 4; c++) {
                    const int64_t row = nb * 16 + n, k = kt * 64 + 4 * r + c;
                    const uint8_t v = row < N ? q[row * K + k] : 0;
                    if (wide) dst[r * 64 + 4 * n + c] = v;
                    else dst[(r / 2) * 64 + 4 * n + c] |= (uint8_t)((v & 15) << (r % 2 ? 4 : 0));
                }
    }
    return 0;
}

int hfq_codes_split_amx(const void *x, int64_t M, int64_t K, int64_t ldx, int x_kind, int terms, float extra_ratio,
                        const uint8_t *wv, int wide, const float *scale_t, const float *corr, const float *bias,
                        void *out, int64_t N, int64_t gs, int out_kind, int nthreads) {
    if (K % 64 || K <= 0 || K > (wide ? HFQ_CS_MAX_K_BYTES : HFQ_CS_MAX_K_NIBBLES) || M <= 0 || N <= 0 || gs <= 0
        || gs % 64 || K % gs || terms < 1 || terms >= HFQ_AI8_TT || x_kind < 0 || x_kind > 2)
        return 1;
    if (hfq_amx_enable()) return 3;
    const int TT = terms + 1;
    const int64_t KT = K / 64, per = gs / 64, NB2 = (N + 31) / 32, NP = NB2 * 32, esize = x_kind == 0 ? 4 : 2;
    int64_t cg = HFQ_CS_CHUNK / (2 * KT * 1024);  /* work groups (32 rows of terms) per chunk */
    cg = cg < 1 ? 1 : cg > HFQ_CS_MAX_CG ? HFQ_CS_MAX_CG : cg;
    int8_t *need = (int8_t *)malloc((size_t)M);
    float *amax = (float *)malloc((size_t)M * sizeof(float));
    float *st = (float *)calloc((size_t)(M * TT), sizeof(float));
    int64_t *first = (int64_t *)malloc((size_t)M * sizeof(int64_t));
    int failed = 0;
    if (!need || !amax || !st || !first) {
        free(need); free(amax); free(st); free(first);
        return 4;
    }
#pragma omp parallel num_threads(M < 16 ? 1 : nthreads) reduction(| : failed)
    {
        float *r = (float *)malloc((size_t)K * sizeof(float));
        if (!r) failed = 1;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {  /* each row's count of terms */
            if (!r) continue;
            float sum, sq;
            row_to_f32((const char *)x + m * ldx * esize, K, x_kind, r);
            split_stats(r, K, &sum, &sq, amax + m);
            need[m] = (int8_t)split_count(sq, amax[m], K, terms, extra_ratio);
        }
        free(r);
    }
    /* rows of terms, token after token: a token's never across two work groups (of 32 rows), so that its terms
     * meet in one sum (a row's result does not depend on the rows beside it) */
    int64_t R = 0;
    for (int64_t m = 0; m < M; m++) {
        if (R / 32 != (R + need[m] - 1) / 32) R = (R / 32 + 1) * 32;
        first[m] = R;
        R += need[m];
    }
    const int64_t AT = (R + 15) / 16, WG = (AT + 1) / 2;
    if (AT * KT * 1024 <= HFQ_CS_ONE && WG <= 4 * HFQ_CS_MAX_CG) cg = WG;  /* few rows: one chunk (each more */
    const int64_t CR = cg * 32, chunks = (WG + cg - 1) / cg;                 /* makes the B tiles again) */
    uint8_t *at = failed ? NULL : (uint8_t *)aligned_alloc(64, (size_t)(AT * KT * 1024));
    int64_t *wtok = (int64_t *)malloc((size_t)(WG + 1) * sizeof(int64_t));  /* each work group's first token */
    if (!at || !wtok) {
        free(need); free(amax); free(st); free(first); free(at); free(wtok);
        return 4;
    }
    for (int64_t w = 0, m = 0; w <= WG; w++) {  /* a chunk's tokens: those of its work groups */
        while (m < M && first[m] < w * 32) m++;
        wtok[w] = m;
    }
    for (int64_t m = 0, row = 0; row < AT * 16; row++) {  /* rows of no token: zero codes */
        while (m < M && first[m] + need[m] <= row) m++;
        if (m < M && first[m] <= row) continue;
        for (int64_t kt = 0; kt < KT; kt++) memset(at + ((row / 16) * KT + kt) * 1024 + (row % 16) * 64, 0, 64);
    }
#pragma omp parallel num_threads(M < 16 ? 1 : nthreads) reduction(| : failed)
    {
        float *r = (float *)malloc((size_t)K * sizeof(float));
        if (!r) failed = 1;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {  /* the terms of row m into their tile rows */
            if (!r) continue;
            row_to_f32((const char *)x + m * ldx * esize, K, x_kind, r);
            for (int t = 0; t < need[m]; t++) {
                const int64_t row = first[m] + t;
                st[m * TT + t] = split_term(r, K, t ? ai8_absmax(r, K) : amax[m],
                                            at + (row / 16) * KT * 1024 + (row % 16) * 64, 1024, 0);
            }
        }
        free(r);
    }
    /* work items: (a chunk of work groups, their tiles in L2) x (32 output rows: two blocks of 16); the blocks' B
     * tiles (made once per item from nibbles, read in place from bytes) meet every work group of the chunk, two A
     * tiles by two B tiles per step of K into C tiles 0..3 */
    const int64_t bytes = wide ? 1024 : 512;  /* of weight per tile of B */
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        uint8_t *panel = wide ? NULL : (uint8_t *)aligned_alloc(64, (size_t)(2 * KT * 1024));
        float *acc = (float *)aligned_alloc(64, (size_t)(CR * 32 * 4));  /* per token of a chunk, 2 x 16 lanes */
        int32_t *c = (int32_t *)aligned_alloc(64, 2 * 32 * 32 * 4);  /* two groups' sums, 32 rows of 32 */
        const int ok = !failed && (panel || wide) && acc && c;
        if (!ok) failed = 1;
        else amx_config();
#pragma omp for schedule(static)
        for (int64_t item = 0; item < chunks * NB2; item++) {
            if (!ok) continue;
            const int64_t ch = item / NB2, n0 = (item % NB2) * 32;
            const uint8_t *wb = wv + (n0 / 16) * KT * bytes;  /* the two blocks' codes, one after the other */
            const __m512i nib = _mm512_set1_epi8(15);
            for (int64_t t = 0; t < (wide ? 0 : 2 * KT); t++) {  /* nibbles: two rows of B from each 64 bytes */
                const uint8_t *src = wb + t * 512;
                uint8_t *dst = panel + t * 1024;
                for (int p = 0; p < 8; p++) {
                    const __m512i v = _mm512_loadu_si512((const void *)(src + p * 64));
                    _mm512_store_si512((void *)(dst + p * 128), _mm512_and_si512(v, nib));
                    _mm512_store_si512((void *)(dst + p * 128 + 64), _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
                }
            }
            const uint8_t *b0 = wide ? wb : panel, *b1 = b0 + KT * 1024;
            const int64_t w1 = (ch + 1) * cg < WG ? (ch + 1) * cg : WG;
            const int64_t m0 = wtok[ch * cg], nt = wtok[w1] - m0;  /* the chunk's tokens */
            memset(acc, 0, (size_t)(nt * 32 * 4));
            for (int64_t w = ch * cg; w < w1; w++) {
                const int two = AT - w * 2 > 1;
                const uint8_t *a0 = at + w * 2 * KT * 1024;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                /* at a group's end the C tiles are stored and zeroed, and the group's sums are scaled into acc one
                 * step of K later, while the tiles go on with the next group */
                int64_t pending = -1;
                for (int64_t kt = 0; kt < KT; kt++) {
                    const uint8_t *ak = a0 + kt * 1024;
                    if (w == ch * cg)  /* the next item's codes on their way while these tiles run */
                        for (int i = 0; i < 2 * bytes; i += 64)
                            _mm_prefetch((const char *)(wb + 2 * KT * bytes + (i < bytes ? 0 : KT * bytes - bytes)
                                                        + kt * bytes + i), _MM_HINT_T1);
                    _tile_loadd(4, b0 + kt * 1024, 64);
                    _tile_loadd(5, b1 + kt * 1024, 64);
                    _tile_loadd(6, ak, 64);
                    _tile_dpbsud(0, 6, 4);
                    _tile_dpbsud(1, 6, 5);
                    if (two) {
                        _tile_loadd(7, ak + KT * 1024, 64);
                        _tile_dpbsud(2, 7, 4);
                        _tile_dpbsud(3, 7, 5);
                    }
                    if (pending >= 0) {
                        cs_flush(acc, m0, c + (pending & 1) * 1024, scale_t + pending * NP + n0, wtok[w],
                                 wtok[w + 1], first, w * 32, need, st, TT);
                        pending = -1;
                    }
                    if ((kt + 1) % per) continue;
                    int32_t *cs = c + ((kt / per) & 1) * 1024;
                    _tile_stored(0, cs, 128); _tile_zero(0);
                    _tile_stored(1, cs + 16, 128); _tile_zero(1);
                    if (two) {
                        _tile_stored(2, cs + 512, 128); _tile_zero(2);
                        _tile_stored(3, cs + 528, 128); _tile_zero(3);
                    }
                    pending = kt / per;
                }
                const int64_t g = KT / per - 1;  /* the last group */
                cs_flush(acc, m0, c + (g & 1) * 1024, scale_t + g * NP + n0, wtok[w], wtok[w + 1], first, w * 32,
                         need, st, TT);
            }
            for (int h = 0; h < 2 && n0 + h * 16 < N; h++) {  /* the chunk's tokens, one block at a time */
                const int64_t n = n0 + h * 16;
                const __mmask16 kn = n + 16 <= N ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1u);
                const __m512 bv = bias ? _mm512_maskz_loadu_ps(kn, bias + n) : _mm512_setzero_ps();
                for (int64_t m = m0; m < m0 + nt; m++) {
                    __m512 y = _mm512_load_ps(acc + (m - m0) * 32 + h * 16);
                    if (corr) y = _mm512_sub_ps(y, _mm512_maskz_loadu_ps(kn, corr + m * N + n));
                    put_first(_mm512_add_ps(y, bv), out, m * N + n, N - n, out_kind);
                }
            }
        }
        if (ok) _tile_release();
        free(panel); free(acc); free(c);
    }
    free(need); free(amax); free(st); free(first); free(at); free(wtok);
    return failed ? 4 : 0;
}
#else
int hfq_int8_amx_gemm(const uint8_t *a, int64_t M, int64_t K, int64_t lda, const int8_t *packed, int64_t N,
                      const int32_t *comp, const float *ws, const float *absmax, const float *bias, const float *xo,
                      const float *wc, int64_t n_out, void *out, int64_t ldo, int out_kind, int nthreads) {
    (void)a; (void)M; (void)K; (void)lda; (void)packed; (void)N; (void)comp; (void)ws; (void)absmax; (void)bias;
    (void)xo; (void)wc; (void)n_out; (void)out; (void)ldo; (void)out_kind; (void)nthreads;
    return 1;
}
int hfq_int8_split_amx(const void *x, int64_t M, int64_t K, int64_t ldx, int x_kind, int terms, float extra_ratio,
                       const int8_t *packed, int64_t N, const int32_t *comp, const float *ws, const float *offset,
                       const float *bias, void *out, int out_kind, int nthreads) {
    (void)x; (void)M; (void)K; (void)ldx; (void)x_kind; (void)terms; (void)extra_ratio; (void)packed; (void)N;
    (void)comp; (void)ws; (void)offset; (void)bias; (void)out; (void)out_kind; (void)nthreads;
    return 1;
}
int hfq_codes_vnni(const uint8_t *q, int64_t N, int64_t K, int wide, uint8_t *out, int nthreads) {
    (void)q; (void)N; (void)K; (void)wide; (void)out; (void)nthreads;
    return 1;
}
int hfq_codes_split_amx(const void *x, int64_t M, int64_t K, int64_t ldx, int x_kind, int terms, float extra_ratio,
                        const uint8_t *wv, int wide, const float *scale_t, const float *corr, const float *bias,
                        void *out, int64_t N, int64_t gs, int out_kind, int nthreads) {
    (void)x; (void)M; (void)K; (void)ldx; (void)x_kind; (void)terms; (void)extra_ratio; (void)wv; (void)wide;
    (void)scale_t;
    (void)corr; (void)bias; (void)out; (void)N; (void)gs; (void)out_kind; (void)nthreads;
    return 1;
}
#endif
