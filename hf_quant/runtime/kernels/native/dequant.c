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
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
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

/* One row of nibbles, groups of gs channels with gs/2 a multiple of 16: no staging buffer. */
static void nibbles_row_avx512(const uint8_t *p, const float *scale, const float *zero, void *out,
                               int64_t G, int64_t gs, int kind) {
    const int64_t half = gs / 2;
    const __m512i low = _mm512_set1_epi32(15);
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
