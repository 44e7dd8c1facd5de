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
/* Row kernels for items of R <= DHSA_TILE_ROWS rows (tiles.c): k row-major
 * (nk, D), read in place; s needs lds >= round_up(nk, 4). dhsa_rows_pv's
 * vector path reads p rows and writes o rows up to round_up(R, 4): padding
 * rows of p must be zero. */
void dhsa_rows_qk(int path, float *s, int64_t lds, const float *q, const float *k, int64_t R,
                  int64_t nk, int64_t D, float alpha);
void dhsa_rows_pv(int path, float *o, const float *p, int64_t ldp, const float *v, int64_t R,
                  int64_t nk, int64_t D);
void dhsa_rows_qk_scalar(float *s, int64_t lds, const float *q, const float *k, int64_t R,
                         int64_t nk, int64_t D, float alpha);
void dhsa_tile_qk_scalar(float *s, int64_t lds, const float *q, const float *kt, int64_t ldk,
                         int64_t R, int64_t nk, int64_t D, float alpha);
void dhsa_tile_pv_scalar(float *o, const float *p, int64_t ldp, const float *v, int64_t R,
                         int64_t nk, int64_t D);

/* Running sums of the head mean of x (nheads heads of (L, D), head_stride
 * floats apart), kept every `step` rows: out (ceil(L / step) + 1, D), columns
 * [d0, d1) only (each column one sequential sum, so threads can fill column
 * ranges and the result stays bit-identical; step 1: all L + 1 rows). No
 * checks. Twin: reference.prefix_sums. */
void dhsa_repr_prefix_sums_every_cols(double *out, const float *x, int64_t L, int64_t D,
                                      int64_t nheads, int64_t head_stride, int64_t step,
                                      int64_t d0, int64_t d1);

/* ---- the stages of dhsa_predict (selection.c); p as resolved by predict.c */

/* bounds (B * CG, Lk + 1), num_bounds (B * CG): dynamic chunking of every
 * chunking group (its KV heads concatenated). */
int dhsa_predict_boundaries(int64_t *bounds, int64_t *num_bounds, const float *k,
                            const dhsa_attn_shape *s, const dhsa_predict_params *p,
                            int num_threads);

/* capacity (B * SG * NQB + 1): offsets of a range buffer big enough for any
 * selection over these bounds (per block 4 + chunks meeting its keys). */
int dhsa_predict_capacity(int64_t *capacity, const dhsa_attn_shape *s,
                          const dhsa_predict_params *p, const int64_t *bounds,
                          const int64_t *num_bounds);

/* The selection of every block (see dhsa_predict): sorted, merged ranges at
 * starts/ends + capacity[i], their number in counts[i]; chunk_scores, when
 * not NULL, (B * SG, NQB, score_stride). */
int dhsa_predict_select(int32_t *starts, int32_t *ends, int64_t *counts,
                        double *chunk_scores, int64_t score_stride,
                        const int64_t *capacity, const float *q, const float *k,
                        const dhsa_attn_shape *s, const dhsa_predict_params *p,
                        const int64_t *bounds, const int64_t *num_bounds,
                        int num_threads);

/* Index of the chunk holding key x among n bounds: bounds[c] <= x < bounds[c + 1]. */
static inline int64_t dhsa_chunk_of(const int64_t *bounds, int64_t n, int64_t x) {
    int64_t lo = 0, hi = n - 1; /* chunks 0 .. n - 2 */
    while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (bounds[mid] <= x) lo = mid; else hi = mid;
    }
    return lo;
}

/* ---- pieces and the budget rule (selection.c) ----------------------------- */

/* A candidate key range of a selection and its score. */
typedef struct {
    int64_t a, b;  /* key range [a, b) */
    double score;  /* r_q . r_k of the piece */
    double logm;   /* adaptive: log of the estimated attention mass */
} dhsa_piece;

/* The best pieces (score, then earliest start) whose lengths first reach
 * `need`, kept in one pass over the candidates: a heap of h (room for every
 * candidate), its worst on top, trimmed while the others alone cover need. */
typedef struct {
    dhsa_piece *h;
    int64_t n, tok, need;
} dhsa_cover_heap;
void dhsa_cover_offer(dhsa_cover_heap *c, const dhsa_piece *pc);
/* The kept pieces best first into sel[nsel..] until *tokens reaches limit,
 * the last one cut; returns the new nsel. */
int64_t dhsa_cover_take(dhsa_cover_heap *c, dhsa_piece *sel, int64_t nsel, int64_t *tokens,
                        int64_t limit);
/* sel -> sorted, merged ranges in starts / ends; returns their number. */
int64_t dhsa_pieces_merge(int32_t *starts, int32_t *ends, dhsa_piece *sel, int64_t nsel);

/* ---- chunking internals (chunking.c) ------------------------------------- */

/* The boundary score of position t from prefix rows t - wl, t and t + wr
 * (row x = sum of the group's keys [0, x), W values per key). */
double dhsa_chunking_score_at(const double *p0, const double *pt, const double *p1, int64_t t,
                              int64_t wl, int64_t wr, int64_t W, const double *model);
/* Whether t becomes a boundary of a chunk open since `last` (see dhsa.h). */
int dhsa_chunking_take(const double *score, int64_t t, int64_t last, int64_t Lk,
                       const struct dhsa_predict_params *p);

/* The options as the stages read them: sizes clamped to the sequence
 * length Lk, Lq queries, and the fixed choices of a method (predict.c). */
struct dhsa_predict_params dhsa_predict_resolved(const struct dhsa_predict_params *in,
                                                 int64_t Lq, int64_t Lk);

/* dhsa_selection_count_pairs for a shape and selection already checked. */
void dhsa_selection_count_pairs_checked(int64_t *pairs_selected, int64_t *pairs_allowed,
                                        const dhsa_selection *sel, const dhsa_attn_shape *s,
                                        int num_threads);

/* dhsa_attention_sparse for a shape and selection already checked and q, k, v
 * already scanned: max_abs = {max|q|, max|k|, max|v|} (attention.c). */
int dhsa_attention_sparse_scanned(float *out, const float *q, const void *k, const void *v,
                                  const dhsa_attn_shape *s, const dhsa_selection *sel,
                                  const float max_abs[3], int num_threads);

/* Number of threads to use for `work` independent items. */
static inline int dhsa_threads_for(int requested, int64_t work) {
    int n = requested > 0 ? requested : 1;
    if (work < n) n = (int)(work > 0 ? work : 1);
    return n;
}

#endif /* DHSA_INTERNAL_H */
