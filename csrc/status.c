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
int dhsa_max_abs(const float *x, int64_t n, float *max_abs) {
    const int64_t step = 4096;
    const uint32_t *u = (const uint32_t *)(const void *)x;
    uint32_t top = 0;
    for (int64_t i0 = 0; i0 < n; i0 += step) {
        const int64_t i1 = DHSA_MIN(n, i0 + step);
        uint32_t m = 0;
        for (int64_t i = i0; i < i1; i++) {
            const uint32_t a = u[i] & 0x7fffffffu;
            m = a > m ? a : m;
        }
        if (m >= 0x7f800000u) return DHSA_ENONFINITE;
        top = m > top ? m : top;
    }
    if (max_abs) memcpy(max_abs, &top, sizeof(float));
    return DHSA_OK;
}

int dhsa_max_abs_f16(const uint16_t *x, int64_t n, float *max_abs) {
    const int64_t step = 4096;
    uint16_t top = 0;
    for (int64_t i0 = 0; i0 < n; i0 += step) {
        const int64_t i1 = DHSA_MIN(n, i0 + step);
        uint16_t m = 0;
        for (int64_t i = i0; i < i1; i++) {
            const uint16_t a = (uint16_t)(x[i] & 0x7fffu);
            m = a > m ? a : m;
        }
        if (m >= 0x7c00u) return DHSA_ENONFINITE;
        top = m > top ? m : top;
    }
    if (max_abs) dhsa_half_to_float_scalar(max_abs, &top, 1);
    return DHSA_OK;
}

int dhsa_check_finite(const float *x, int64_t n) { return dhsa_max_abs(x, n, NULL); }

int dhsa_check_finite_f16(const uint16_t *x, int64_t n) { return dhsa_max_abs_f16(x, n, NULL); }
