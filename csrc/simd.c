/*
 * simd.c - row kernels of the online softmax, AVX2/FMA and scalar twins.
 *
 * The attention kernels spend their time outside the two tile products
 * (tiles.c) here: the running row maximum, exp(x - m) with its sum, tanh
 * soft-capping and row rescaling, and the float16 -> float32 widening of
 * K / V. Each vectorised kernel has a plain scalar twin (dhsa_row_*_scalar,
 * dhsa_half_to_float_scalar); dhsa_simd_force_scalar(1) routes every call of
 * this file to the twins so both paths can be compared in one build
 * (tests/test_simd.py; the tile products then go to OpenBLAS, see tiles.c).
 *
 * Must agree with dhsa/reference.py: the softmax and soft-cap of _attend
 * (numpy exp / tanh in float64), to float32 rounding.
 *
 * Vector paths: AVX2/FMA (8 lanes, the baseline; F16C for the widening) and
 * AVX-512F (16 lanes, for max, exp-sum and scale; picked at run time when
 * the CPU has it; dhsa_simd_allow_avx512(0) pins AVX2 so both vector paths
 * can be tested on one machine). Tails shorter than a vector go through the
 * same polynomial as the full vectors, so a value never depends on where
 * its row ends.
 *
 * The vector exp uses the usual range reduction x = n ln2 + r, |r| <= ln2/2,
 * a degree-6 polynomial for e^r and 2^n built in the exponent bits; inputs
 * below -87.3 (including -inf from masks) give exactly 0.
 */
#include <math.h>
#include <string.h>
#include "internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DHSA_HAVE_AVX2_BUILD 1
#include <immintrin.h>
#else
#define DHSA_HAVE_AVX2_BUILD 0
#endif

static int g_force_scalar = 0;
static int g_cpu_checked = 0;
static int g_cpu_avx2 = 0;
static int g_cpu_avx512 = 0;
static int g_cpu_f16c = 0;

int dhsa_simd_available(void) {
#if DHSA_HAVE_AVX2_BUILD
    if (!g_cpu_checked) {
        __builtin_cpu_init();
        g_cpu_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        g_cpu_avx512 = g_cpu_avx2 && __builtin_cpu_supports("avx512f");
        g_cpu_f16c = g_cpu_avx2 && __builtin_cpu_supports("f16c");
        g_cpu_checked = 1;
    }
    return g_cpu_avx2;
#else
    return 0;
#endif
}

void dhsa_simd_force_scalar(int force) { g_force_scalar = force ? 1 : 0; }

static int g_allow_avx512 = 1;

void dhsa_simd_allow_avx512(int allow) { g_allow_avx512 = allow ? 1 : 0; }

static inline int use_simd(void) { return !g_force_scalar && dhsa_simd_available(); }
static inline int use_avx512(void) { return use_simd() && g_cpu_avx512 && g_allow_avx512; }

int dhsa_simd_force_scalar_on(void) { return g_force_scalar; }
int dhsa_simd_avx512_on(void) { return use_avx512(); }

const char *dhsa_simd_path(void) {
    if (use_avx512()) return "avx512f";
    return use_simd() ? "avx2-fma" : "scalar";
}

/* ---- scalar twins ------------------------------------------------------ */

float dhsa_row_max_scalar(const float *x, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

float dhsa_row_exp_sum_scalar(float *x, int64_t n, float m) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    return sum;
}

void dhsa_row_softcap_scalar(float *x, int64_t n, float cap) {
    for (int64_t i = 0; i < n; i++) x[i] = cap * tanhf(x[i] / cap);
}

void dhsa_row_scale_scalar(float *x, int64_t n, float a) {
    for (int64_t i = 0; i < n; i++) x[i] *= a;
}

/* IEEE half -> float by the bits: sign, exponent rebias, subnormals
 * normalised; Inf/NaN kept (inputs are checked finite before, anyway). */
void dhsa_half_to_float_scalar(float *out, const uint16_t *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const uint32_t h = x[i], sign = (h & 0x8000u) << 16;
        uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
        if (exp == 0) {
            if (man == 0) {
                bits = sign;
            } else { /* subnormal: shift the mantissa up to a normal float */
                exp = 113;
                while (!(man & 0x400u)) { man <<= 1; exp--; }
                bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
            }
        } else if (exp == 31) {
            bits = sign | 0x7f800000u | (man << 13);
        } else {
            bits = sign | ((exp + 112) << 23) | (man << 13);
        }
        memcpy(&out[i], &bits, sizeof(float));
    }
}

/* ---- AVX2 / FMA -------------------------------------------------------- */
#if DHSA_HAVE_AVX2_BUILD
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline __m256 exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    const __m256 hi = _mm256_set1_ps(88.37626f);
    __m256 zero_mask = _mm256_cmp_ps(x, lo, _CMP_LT_OQ); /* also true for -inf */
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 out = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(zero_mask, out);
}

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}

AVX2 static float row_max_avx2(const float *x, int64_t n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 0x55));
    float r = _mm_cvtss_f32(s);
    for (; i < n; i++) r = x[i] > r ? x[i] : r;
    return r;
}

AVX2 static float row_exp_sum_avx2(float *x, int64_t n, float m) {
    __m256 vm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (i < n) { /* masked tail through the same polynomial */
        float buf[8];
        int64_t rest = n - i;
        for (int j = 0; j < 8; j++) buf[j] = j < rest ? x[i + j] - m : -INFINITY;
        __m256 e = exp256(_mm256_loadu_ps(buf));
        _mm256_storeu_ps(buf, e);
        for (int64_t j = 0; j < rest; j++) x[i + j] = buf[j];
        acc = _mm256_add_ps(acc, e);
    }
    return hsum256(acc);
}

/* tanh: odd Taylor series up to y^15 for |y| < 0.55 (relative error < 1e-7),
 * 1 - 2 / (exp(2|y|) + 1) with the sign restored above it. */
AVX2 static inline __m256 tanh256(__m256 y) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 ay = _mm256_andnot_ps(sign, y);
    __m256 y2 = _mm256_mul_ps(y, y);
    __m256 p = _mm256_set1_ps(929569.0f / 638512875.0f);
    p = _mm256_fnmadd_ps(p, y2, _mm256_set1_ps(21844.0f / 6081075.0f));
    p = _mm256_fnmadd_ps(p, y2, _mm256_set1_ps(1382.0f / 155925.0f));
    p = _mm256_fnmadd_ps(p, y2, _mm256_set1_ps(62.0f / 2835.0f));
    p = _mm256_fnmadd_ps(p, y2, _mm256_set1_ps(17.0f / 315.0f));
    p = _mm256_fnmadd_ps(p, y2, _mm256_set1_ps(2.0f / 15.0f));
    p = _mm256_fnmadd_ps(p, y2, _mm256_set1_ps(1.0f / 3.0f));
    /* signs alternate: y - y^3/3 + 2y^5/15 - ... = y (1 - y2 * p') */
    __m256 small = _mm256_mul_ps(y, _mm256_fnmadd_ps(y2, p, _mm256_set1_ps(1.0f)));
    __m256 e = exp256(_mm256_min_ps(_mm256_add_ps(ay, ay), _mm256_set1_ps(80.0f)));
    __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                               _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
    big = _mm256_or_ps(big, _mm256_and_ps(y, sign));
    __m256 use_small = _mm256_cmp_ps(ay, _mm256_set1_ps(0.55f), _CMP_LT_OQ);
    return _mm256_blendv_ps(big, small, use_small);
}

AVX2 static void row_softcap_avx2(float *x, int64_t n, float cap) {
    __m256 c = _mm256_set1_ps(cap), inv = _mm256_set1_ps(1.0f / cap);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_mul_ps(c, tanh256(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv))));
    if (i < n) { /* the tail through the same polynomial: a logit's value must
                  * not depend on where its row (tile) ends */
        float buf[8] = {0};
        const int64_t rest = n - i;
        memcpy(buf, x + i, (size_t)rest * sizeof(float));
        _mm256_storeu_ps(buf, _mm256_mul_ps(c, tanh256(_mm256_mul_ps(_mm256_loadu_ps(buf), inv))));
        memcpy(x + i, buf, (size_t)rest * sizeof(float));
    }
}

AVX2 static void row_scale_avx2(float *x, int64_t n, float a) {
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), va));
    for (; i < n; i++) x[i] *= a;
}

/* ---- AVX-512F (same algorithms, 16 lanes; used when the CPU has it) ---- */
#define AVX512 __attribute__((target("avx512f")))

AVX512 static inline __m512 exp512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f);
    __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ); /* false for -inf */
    x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.37626f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

AVX512 static float row_max_avx512(const float *x, int64_t n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, x + i));
    }
    return _mm512_reduce_max_ps(m);
}

AVX512 static float row_exp_sum_avx512(float *x, int64_t n, float m) {
    __m512 vm = _mm512_set1_ps(m), acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        __m512 e = exp512(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, x + i), vm));
        e = _mm512_maskz_mov_ps(k, e);
        _mm512_mask_storeu_ps(x + i, k, e);
        acc = _mm512_add_ps(acc, e);
    }
    return _mm512_reduce_add_ps(acc);
}

AVX512 static void row_scale_avx512(float *x, int64_t n, float a) {
    __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), va));
    for (; i < n; i++) x[i] *= a;
}
#endif /* DHSA_HAVE_AVX2_BUILD */

#if DHSA_HAVE_AVX2_BUILD
__attribute__((target("avx2,f16c"))) static void half_to_float_f16c(float *out, const uint16_t *x,
                                                                   int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    dhsa_half_to_float_scalar(out + i, x + i, n - i);
}
#endif

void dhsa_half_to_float(float *out, const uint16_t *x, int64_t n) {
#if DHSA_HAVE_AVX2_BUILD
    if (use_simd() && g_cpu_f16c) { half_to_float_f16c(out, x, n); return; }
#endif
    dhsa_half_to_float_scalar(out, x, n);
}

/* ---- dispatch ---------------------------------------------------------- */

float dhsa_row_max(const float *x, int64_t n) {
#if DHSA_HAVE_AVX2_BUILD
    if (use_avx512()) return row_max_avx512(x, n);
    if (use_simd()) return row_max_avx2(x, n);
#endif
    return dhsa_row_max_scalar(x, n);
}

float dhsa_row_exp_sum(float *x, int64_t n, float m) {
#if DHSA_HAVE_AVX2_BUILD
    if (use_avx512()) return row_exp_sum_avx512(x, n, m);
    if (use_simd()) return row_exp_sum_avx2(x, n, m);
#endif
    return dhsa_row_exp_sum_scalar(x, n, m);
}

void dhsa_row_softcap(float *x, int64_t n, float cap) {
#if DHSA_HAVE_AVX2_BUILD
    if (use_simd()) { row_softcap_avx2(x, n, cap); return; }
#endif
    dhsa_row_softcap_scalar(x, n, cap);
}

void dhsa_row_scale(float *x, int64_t n, float a) {
#if DHSA_HAVE_AVX2_BUILD
    if (use_avx512()) { row_scale_avx512(x, n, a); return; }
    if (use_simd()) { row_scale_avx2(x, n, a); return; }
#endif
    dhsa_row_scale_scalar(x, n, a);
}
