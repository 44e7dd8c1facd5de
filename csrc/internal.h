/*
 * internal.h - helpers shared by the C files of the core (not installed).
 */
#ifndef DHSA_INTERNAL_H
#define DHSA_INTERNAL_H

#include <stdint.h>
#include <stdlib.h>
#include "dhsa.h"

/* OpenBLAS: the scipy-openblas wheels prefix every symbol with "scipy_". */
#ifdef DHSA_BLAS_PREFIX_SCIPY
#define DHSA_BLAS(name) scipy_##name
#else
#define DHSA_BLAS(name) name
#endif
#include <cblas.h>

#define dhsa_sgemm DHSA_BLAS(cblas_sgemm)
#define dhsa_dgemm DHSA_BLAS(cblas_dgemm)

#define DHSA_MIN(a, b) ((a) < (b) ? (a) : (b))
/* x rounded up to a multiple of n (x >= 0, n > 0) */
#define DHSA_ROUND_UP(x, n) (((x) + (n) - 1) / (n) * (n))
#define DHSA_MAX(a, b) ((a) > (b) ? (a) : (b))
#define DHSA_CACHE_LINE 64

/* Aligned scratch: buffers are cache-line aligned and padded so two threads
 * never share a line. */
static inline void *dhsa_alloc(size_t bytes) {
    size_t padded = (bytes + DHSA_CACHE_LINE - 1) / DHSA_CACHE_LINE * DHSA_CACHE_LINE;
    if (padded == 0) padded = DHSA_CACHE_LINE;
    return aligned_alloc(DHSA_CACHE_LINE, padded);
}

/* Row kernels of the online softmax (simd.c). Each has a scalar twin; the
 * dispatcher picks the vectorised one unless dhsa_simd_force_scalar(1). */
float dhsa_row_max(const float *x, int64_t n);
/* x[i] = exp(x[i] - m); returns the sum of the new x. */
float dhsa_row_exp_sum(float *x, int64_t n, float m);
/* x[i] = cap * tanh(x[i] / cap) */
void dhsa_row_softcap(float *x, int64_t n, float cap);
/* x[i] *= a */
void dhsa_row_scale(float *x, int64_t n, float a);

float dhsa_row_max_scalar(const float *x, int64_t n);
float dhsa_row_exp_sum_scalar(float *x, int64_t n, float m);
void dhsa_row_softcap_scalar(float *x, int64_t n, float cap);
void dhsa_row_scale_scalar(float *x, int64_t n, float a);

/* Run-time switches of simd.c, for the other kernels' dispatch. */
int dhsa_simd_force_scalar_on(void);
int dhsa_simd_avx512_on(void);

/* Tile matrix products (tiles.c). Vector paths need R a multiple of
 * DHSA_TILE_ROWS and (QK) nk_pad a multiple of DHSA_TILE_KEYS; see there. */
#define DHSA_TILE_ROWS 8
#define DHSA_TILE_KEYS 32
/* kt (D, ld) = k (nk, D)^T, k float32 or (half) float16; columns [nk, nk_pad) zeroed */
void dhsa_tile_transpose(float *kt, int64_t ld, const void *k, int half, int64_t nk,
                         int64_t nk_pad, int64_t D);
/* s (R, nk_pad; row stride lds) = alpha * q (R, D) . kt (D, nk_pad; stride ldk) */
void dhsa_tile_qk(int path, float *s, int64_t lds, const float *q, const float *kt,
                  int64_t ldk, int64_t R, int64_t nk_pad, int64_t D, float alpha);
/* o (R, D) += p (R, nk; row stride ldp) . v (nk, D) */
void dhsa_tile_pv(int path, float *o, const float *p, int64_t ldp, const float *v, int64_t R,
                  int64_t nk, int64_t D);
void dhsa_tile_qk_scalar(float *s, int64_t lds, const float *q, const float *kt, int64_t ldk,
                         int64_t R, int64_t nk, int64_t D, float alpha);
void dhsa_tile_pv_scalar(float *o, const float *p, int64_t ldp, const float *v, int64_t R,
                         int64_t nk, int64_t D);

/* Column range [d0, d1) of dhsa_repr_prefix_sums_every (step 1: of
 * dhsa_repr_prefix_sums); no checks, bit-identical to the whole call, for
 * filling the columns in parallel. */
void dhsa_repr_prefix_sums_every_cols(double *out, const float *x, int64_t L, int64_t D,
                                      int64_t nheads, int64_t head_stride, int64_t step,
                                      int64_t d0, int64_t d1);

/* Number of threads to use for `work` independent items. */
static inline int dhsa_threads_for(int requested, int64_t work) {
    int n = requested > 0 ? requested : 1;
    if (work < n) n = (int)(work > 0 ? work : 1);
    return n;
}

#endif /* DHSA_INTERNAL_H */
