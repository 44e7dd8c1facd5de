/*
 * status.c - status messages, build information and input checks.
 */
#include <math.h>
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

/* Finite check on the bits: NaN and Inf are the floats whose exponent is all
 * ones. Integer ORs vectorise (a float sum would be a serial chain); one
 * branch per block of 4096 values gives an early exit. */
int dhsa_check_finite(const float *x, int64_t n) {
    const int64_t step = 4096;
    const uint32_t *u = (const uint32_t *)(const void *)x;
    for (int64_t i0 = 0; i0 < n; i0 += step) {
        const int64_t i1 = DHSA_MIN(n, i0 + step);
        uint32_t bad = 0;
        for (int64_t i = i0; i < i1; i++) bad |= (uint32_t)((u[i] & 0x7f800000u) == 0x7f800000u);
        if (bad) return DHSA_ENONFINITE;
    }
    return DHSA_OK;
}

int dhsa_check_finite_f16(const uint16_t *x, int64_t n) {
    const int64_t step = 4096;
    for (int64_t i0 = 0; i0 < n; i0 += step) {
        const int64_t i1 = DHSA_MIN(n, i0 + step);
        uint32_t bad = 0;
        for (int64_t i = i0; i < i1; i++) bad |= (uint32_t)((x[i] & 0x7c00u) == 0x7c00u);
        if (bad) return DHSA_ENONFINITE;
    }
    return DHSA_OK;
}
