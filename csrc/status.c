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

/* Finite check with an early exit; isfinite on IEEE floats (no fast-math). */
int dhsa_check_finite(const float *x, int64_t n) {
    const int64_t step = 4096;
    for (int64_t i0 = 0; i0 < n; i0 += step) {
        int64_t i1 = DHSA_MIN(n, i0 + step);
        float acc = 0.0f;
        /* x * 0 is 0 for finite x and NaN for NaN / Inf: one branch per block */
        for (int64_t i = i0; i < i1; i++) acc += x[i] * 0.0f;
        if (acc != 0.0f) return DHSA_ENONFINITE;
    }
    return DHSA_OK;
}
