/*
 * status.c - status messages, build information and input checks.
 */
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "internal.h"

const char *dhsa_status_string(int status) {
    switch (status) {
    case DHSA_OK: return "success";
    case DHSA_EINVAL: return "invalid argument";
    case DHSA_ENOMEM: return "out of memory";
    case DHSA_ENONFINITE: return "input contains NaN or Inf";
    case DHSA_EOVERFLOW: return "size overflows the index type";
    case DHSA_ERANGE: return "values so large that attention logits could overflow float32";
    case DHSA_ESELECTION:
        return "malformed selection: offsets must rise from 0, and within each block the "
               "ranges must be sorted and non-overlapping, each with 0 <= start < end <= Lk";
    case DHSA_EBOUNDS: return "chunk boundaries must start at 0, increase strictly and end at Lk";
    default: return "unknown status";
    }
}

int dhsa_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

const char *dhsa_blas_config(void) { return DHSA_BLAS(openblas_get_config)(); }
const char *dhsa_blas_corename(void) { return DHSA_BLAS(openblas_get_corename)(); }

/* Largest magnitude by the bits: for non-negative floats the order of the
 * bit patterns is the numeric order, so an unsigned max of (bits & ~sign)
 * vectorises (a float max would have to order NaN) and one pass gives both
 * the finiteness check (NaN and Inf are the patterns >= all-ones exponent)
 * and the bound the attention range guard needs. One branch per block of
 * 4096 values gives an early exit. */
/* max (bits & ~sign) over x[i0, i1), stopping at the first block that holds
 * a non-finite value (the result then is >= the all-ones exponent) */
static uint32_t max_bits_f32(const uint32_t *u, int64_t i0, int64_t i1) {
    uint32_t top = 0;
    for (int64_t b0 = i0; b0 < i1; b0 += 4096) {
        const int64_t b1 = DHSA_MIN(i1, b0 + 4096);
        uint32_t m = 0;
        for (int64_t i = b0; i < b1; i++) {
            const uint32_t a = u[i] & 0x7fffffffu;
            m = a > m ? a : m;
        }
        top = m > top ? m : top;
        if (m >= 0x7f800000u) break;
    }
    return top;
}

static uint32_t max_bits_f16(const uint16_t *x, int64_t i0, int64_t i1) {
    uint16_t top = 0;
    for (int64_t b0 = i0; b0 < i1; b0 += 4096) {
        const int64_t b1 = DHSA_MIN(i1, b0 + 4096);
        uint16_t m = 0;
        for (int64_t i = b0; i < b1; i++) {
            const uint16_t a = (uint16_t)(x[i] & 0x7fffu);
            m = a > m ? a : m;
        }
        top = m > top ? m : top;
        if (m >= 0x7c00u) break;
    }
    return top;
}

/* One segment per thread for large inputs (a 300 MB q at 128K takes tens of
 * milliseconds on one core); small ones stay on the calling thread. */
static uint32_t max_bits(const void *x, int64_t n, int half, int num_threads) {
    const int T = n >= (1 << 20) ? dhsa_threads_for(num_threads, n >> 18) : 1;
    uint32_t top = 0;
#pragma omp parallel for schedule(static, 1) reduction(max : top) num_threads(T) if (T > 1)
    for (int t = 0; t < T; t++) {
        const int64_t i0 = n * t / T, i1 = n * (t + 1) / T;
        const uint32_t m = half ? max_bits_f16((const uint16_t *)x, i0, i1)
                                : max_bits_f32((const uint32_t *)x, i0, i1);
        top = m > top ? m : top;
    }
    return top;
}

int dhsa_max_abs_threads(const float *x, int64_t n, float *max_abs, int num_threads) {
    const uint32_t top = max_bits(x, n, 0, num_threads);
    if (top >= 0x7f800000u) return DHSA_ENONFINITE;
    if (max_abs) memcpy(max_abs, &top, sizeof(float));
    return DHSA_OK;
}

int dhsa_max_abs_f16_threads(const uint16_t *x, int64_t n, float *max_abs, int num_threads) {
    const uint16_t top = (uint16_t)max_bits(x, n, 1, num_threads);
    if (top >= 0x7c00u) return DHSA_ENONFINITE;
    if (max_abs) dhsa_half_to_float_scalar(max_abs, &top, 1);
    return DHSA_OK;
}
