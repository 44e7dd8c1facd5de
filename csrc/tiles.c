/*
 * tiles.c - the two small matrix products of an attention tile.
 *
 *   S (R, nk) = alpha * Q (R, D) K^T      (K given transposed: kt (D, nk))
 *   O (R, D) += P (R, nk) V (nk, D)
 *
 * OpenBLAS sgemm repacks both operands on every call; for attention tiles
 * (D = 64..256, a few hundred rows and keys) that copy is a large part of
 * the work, P especially (R x nk floats per tile, for 2 D FLOPs each). These
 * register-blocked kernels read the operands where they lie: an 8-row block
 * of accumulators, B rows loaded as vectors, A entries broadcast from memory,
 * so each A / B value fetched feeds 8 or more FMAs. K is transposed once per
 * key tile (D x nk floats, shared by every row of the item) so that
 * consecutive keys are consecutive floats.
 *
 * Items of at most DHSA_TILE_ROWS rows (a decode step: one query per head of
 * a GQA group) take the row kernels instead: padded to 8-row blocks, 3 or 4
 * real rows would waste most of the FMAs, and the K tile's transpose would
 * cost more than its product. dhsa_rows_qk reads k's rows where they lie
 * (4 keys per pass over a query row, one horizontal add per 4 scores);
 * dhsa_rows_pv is the 4-row PV kernel on R rounded up to 4.
 *
 * Paths: AVX-512F (8 rows x 32 keys / columns), AVX2/FMA (4 rows x 16), the
 * plain scalar twins dhsa_tile_qk_scalar / dhsa_tile_pv_scalar (for
 * comparison, tests/test_tiles.py), and OpenBLAS sgemm (D not a multiple of
 * 8, the vector paths off under dhsa_simd_force_scalar(1), or forced; the
 * caller, attention.c, makes those sgemm calls). dhsa_tile_path() picks one.
 *
 * Must agree with dhsa/reference.py: the two products of _attend (q k^T and
 * p v), to float32 rounding; the paths differ only in summation order.
 *
 * Shape contract of the vector kernels (the caller pads):
 *   R is a multiple of DHSA_TILE_ROWS (padding rows of Q hold zeros),
 *   nk_pad (QK only) is a multiple of DHSA_TILE_KEYS (kt columns past nk are 0),
 *   D is a multiple of 16 (AVX-512) or 8 (AVX2).
 */
#include <string.h>
#include "internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DHSA_TILES_VECTOR 1
#include <immintrin.h>
#else
#define DHSA_TILES_VECTOR 0
#endif

static int g_tile_path = DHSA_TILE_AUTO;

void dhsa_tile_path_set(int path) {
    g_tile_path = (path >= DHSA_TILE_AUTO && path <= DHSA_TILE_SCALAR) ? path : DHSA_TILE_AUTO;
}

int dhsa_tile_path(int64_t D) {
    const int avx512 = DHSA_TILES_VECTOR && dhsa_simd_avx512_on() && D % 16 == 0;
    const int avx2 = DHSA_TILES_VECTOR && !dhsa_simd_force_scalar_on() &&
                     dhsa_simd_available() && D % 8 == 0;
    switch (g_tile_path) {
    case DHSA_TILE_BLAS: return DHSA_TILE_BLAS;
    case DHSA_TILE_SCALAR: return DHSA_TILE_SCALAR;
    case DHSA_TILE_AVX2: return avx2 ? DHSA_TILE_AVX2 : DHSA_TILE_BLAS;
    default: /* AUTO, or AVX512 where it can run */
        if (avx512) return DHSA_TILE_AVX512;
        return avx2 ? DHSA_TILE_AVX2 : DHSA_TILE_BLAS;
    }
}

const char *dhsa_tile_path_name(int path) {
    switch (path) {
    case DHSA_TILE_AVX512: return "avx512f";
    case DHSA_TILE_AVX2: return "avx2-fma";
    case DHSA_TILE_BLAS: return "openblas";
    case DHSA_TILE_SCALAR: return "scalar";
    default: return "auto";
    }
}

/* kt (D, ld) = k (nk, D) transposed, float16 rows widened on the way (one
 * pass over the tile either way); columns [nk, nk_pad) set to 0. D <= 256. */
void dhsa_tile_transpose(float *kt, int64_t ld, const void *k, int half, int64_t nk,
                         int64_t nk_pad, int64_t D) {
    float wide[8 * 256];
    /* 8 keys at a time: each k row is read once, 8 output rows are written
     * in runs of up to 8 consecutive floats */
    for (int64_t j0 = 0; j0 < nk; j0 += 8) {
        const int64_t n = DHSA_MIN(8, nk - j0);
        const float *rows = (const float *)k + j0 * D;
        if (half) {
            dhsa_half_to_float(wide, (const uint16_t *)k + j0 * D, n * D);
            rows = wide;
        }
        for (int64_t d = 0; d < D; d++)
            for (int64_t j = 0; j < n; j++) kt[d * ld + j0 + j] = rows[j * D + d];
    }
    for (int64_t d = 0; d < D; d++)
        for (int64_t j = nk; j < nk_pad; j++) kt[d * ld + j] = 0.0f;
}

/* ---- scalar twins ------------------------------------------------------ */

void dhsa_tile_qk_scalar(float *s, int64_t lds, const float *q, const float *kt, int64_t ldk,
                         int64_t R, int64_t nk, int64_t D, float alpha) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < nk; j++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < D; d++) acc += q[r * D + d] * kt[d * ldk + j];
            s[r * lds + j] = alpha * acc;
        }
}

void dhsa_tile_pv_scalar(float *o, const float *p, int64_t ldp, const float *v, int64_t R,
                         int64_t nk, int64_t D) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < nk; j++) {
            const float pj = p[r * ldp + j];
            for (int64_t d = 0; d < D; d++) o[r * D + d] += pj * v[j * D + d];
        }
}

/* s (R, nk) = alpha * q (R, D) k (nk, D)^T: the rows kernel's twin (the sums
 * of dhsa_tile_qk_scalar, without the transpose) */
void dhsa_rows_qk_scalar(float *s, int64_t lds, const float *q, const float *k, int64_t R,
                         int64_t nk, int64_t D, float alpha) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < nk; j++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < D; d++) acc += q[r * D + d] * k[j * D + d];
            s[r * lds + j] = alpha * acc;
        }
}

#if DHSA_TILES_VECTOR
/* ---- AVX-512F: 8 rows x 2 vectors of 16 ------------------------------- */
#define AVX512 __attribute__((target("avx512f")))

/* kt's 32-key slice (D x 32 floats) stays in L1 while every 8-row block of
 * Q passes over it. */
AVX512 static void qk_avx512(float *s, int64_t lds, const float *q, const float *kt,
                             int64_t ldk, int64_t R, int64_t nk_pad, int64_t D, float alpha) {
    const __m512 va = _mm512_set1_ps(alpha);
    for (int64_t j0 = 0; j0 < nk_pad; j0 += 32) {
        for (int64_t r0 = 0; r0 < R; r0 += 8) {
            __m512 c[8][2];
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
            const float *qb = q + r0 * D;
            for (int64_t d = 0; d < D; d++) {
                const __m512 b0 = _mm512_loadu_ps(kt + d * ldk + j0);
                const __m512 b1 = _mm512_loadu_ps(kt + d * ldk + j0 + 16);
#pragma GCC unroll 8
                for (int r = 0; r < 8; r++) {
                    const __m512 a = _mm512_set1_ps(qb[r * D + d]);
                    c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
                    c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
                }
            }
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                _mm512_storeu_ps(s + (r0 + r) * lds + j0, _mm512_mul_ps(c[r][0], va));
                _mm512_storeu_ps(s + (r0 + r) * lds + j0 + 16, _mm512_mul_ps(c[r][1], va));
            }
        }
    }
}

/* Keys in blocks of 128 so the V slice (128 x 32 floats) stays in L1 across
 * the row blocks; O is read and written once per key block. */
#define PV_KEY_BLOCK 128

AVX512 static void pv_avx512(float *o, const float *p, int64_t ldp, const float *v, int64_t R,
                             int64_t nk, int64_t D) {
    for (int64_t c0 = 0; c0 < D; c0 += 32) {
        const int two = D - c0 >= 32; /* else one vector of 16 columns */
        for (int64_t jb = 0; jb < nk; jb += PV_KEY_BLOCK) {
            const int64_t je = DHSA_MIN(nk, jb + PV_KEY_BLOCK);
            for (int64_t r0 = 0; r0 < R; r0 += 8) {
                float *ob = o + r0 * D + c0;
                const float *pb = p + r0 * ldp;
                if (two) {
                    __m512 c[8][2];
#pragma GCC unroll 8
                    for (int r = 0; r < 8; r++) {
                        c[r][0] = _mm512_loadu_ps(ob + r * D);
                        c[r][1] = _mm512_loadu_ps(ob + r * D + 16);
                    }
                    for (int64_t j = jb; j < je; j++) {
                        const __m512 b0 = _mm512_loadu_ps(v + j * D + c0);
                        const __m512 b1 = _mm512_loadu_ps(v + j * D + c0 + 16);
#pragma GCC unroll 8
                        for (int r = 0; r < 8; r++) {
                            const __m512 a = _mm512_set1_ps(pb[r * ldp + j]);
                            c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
                            c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
                        }
                    }
#pragma GCC unroll 8
                    for (int r = 0; r < 8; r++) {
                        _mm512_storeu_ps(ob + r * D, c[r][0]);
                        _mm512_storeu_ps(ob + r * D + 16, c[r][1]);
                    }
                } else {
                    __m512 c[8];
#pragma GCC unroll 8
                    for (int r = 0; r < 8; r++) c[r] = _mm512_loadu_ps(ob + r * D);
                    for (int64_t j = jb; j < je; j++) {
                        const __m512 b0 = _mm512_loadu_ps(v + j * D + c0);
#pragma GCC unroll 8
                        for (int r = 0; r < 8; r++)
                            c[r] = _mm512_fmadd_ps(_mm512_set1_ps(pb[r * ldp + j]), b0, c[r]);
                    }
#pragma GCC unroll 8
                    for (int r = 0; r < 8; r++) _mm512_storeu_ps(ob + r * D, c[r]);
                }
            }
        }
    }
}

/* ---- AVX2/FMA: 4 rows x 2 vectors of 8 (12 of the 16 registers) ------- */
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static void qk_avx2(float *s, int64_t lds, const float *q, const float *kt, int64_t ldk,
                         int64_t R, int64_t nk_pad, int64_t D, float alpha) {
    const __m256 va = _mm256_set1_ps(alpha);
    for (int64_t j0 = 0; j0 < nk_pad; j0 += 16) {
        for (int64_t r0 = 0; r0 < R; r0 += 4) {
            __m256 c[4][2];
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();
            const float *qb = q + r0 * D;
            for (int64_t d = 0; d < D; d++) {
                const __m256 b0 = _mm256_loadu_ps(kt + d * ldk + j0);
                const __m256 b1 = _mm256_loadu_ps(kt + d * ldk + j0 + 8);
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    const __m256 a = _mm256_broadcast_ss(qb + r * D + d);
                    c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
                    c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
                }
            }
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                _mm256_storeu_ps(s + (r0 + r) * lds + j0, _mm256_mul_ps(c[r][0], va));
                _mm256_storeu_ps(s + (r0 + r) * lds + j0 + 8, _mm256_mul_ps(c[r][1], va));
            }
        }
    }
}

AVX2 static void pv_avx2(float *o, const float *p, int64_t ldp, const float *v, int64_t R,
                         int64_t nk, int64_t D) {
    for (int64_t c0 = 0; c0 < D; c0 += 16) {
        const int two = D - c0 >= 16;
        for (int64_t jb = 0; jb < nk; jb += PV_KEY_BLOCK) {
            const int64_t je = DHSA_MIN(nk, jb + PV_KEY_BLOCK);
            for (int64_t r0 = 0; r0 < R; r0 += 4) {
                float *ob = o + r0 * D + c0;
                const float *pb = p + r0 * ldp;
                if (two) {
                    __m256 c[4][2];
#pragma GCC unroll 4
                    for (int r = 0; r < 4; r++) {
                        c[r][0] = _mm256_loadu_ps(ob + r * D);
                        c[r][1] = _mm256_loadu_ps(ob + r * D + 8);
                    }
                    for (int64_t j = jb; j < je; j++) {
                        const __m256 b0 = _mm256_loadu_ps(v + j * D + c0);
                        const __m256 b1 = _mm256_loadu_ps(v + j * D + c0 + 8);
#pragma GCC unroll 4
                        for (int r = 0; r < 4; r++) {
                            const __m256 a = _mm256_broadcast_ss(pb + r * ldp + j);
                            c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
                            c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
                        }
                    }
#pragma GCC unroll 4
                    for (int r = 0; r < 4; r++) {
                        _mm256_storeu_ps(ob + r * D, c[r][0]);
                        _mm256_storeu_ps(ob + r * D + 8, c[r][1]);
                    }
                } else {
                    __m256 c[4];
#pragma GCC unroll 4
                    for (int r = 0; r < 4; r++) c[r] = _mm256_loadu_ps(ob + r * D);
                    for (int64_t j = jb; j < je; j++) {
                        const __m256 b0 = _mm256_loadu_ps(v + j * D + c0);
#pragma GCC unroll 4
                        for (int r = 0; r < 4; r++)
                            c[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(pb + r * ldp + j), b0, c[r]);
                    }
#pragma GCC unroll 4
                    for (int r = 0; r < 4; r++) _mm256_storeu_ps(ob + r * D, c[r]);
                }
            }
        }
    }
}
/* ---- few rows (AVX2/FMA on both vector paths) -------------------------- */

/* Four keys per pass over a query row: 8-lane partial sums, then one
 * horizontal add tree gives the 4 scores; every key's sum has the same
 * order whatever its slot. Past nk the last key is read again and its
 * scores land in columns [nk, round_up(nk, 4)) of s, which lds leaves room
 * for and nothing reads. */
AVX2 static void rows_qk_avx2(float *s, int64_t lds, const float *q, const float *k,
                              int64_t R, int64_t nk, int64_t D, float alpha) {
    const __m128 va = _mm_set1_ps(alpha);
    for (int64_t j0 = 0; j0 < nk; j0 += 4) {
        const float *k0 = k + j0 * D;
        const float *k1 = k + DHSA_MIN(j0 + 1, nk - 1) * D;
        const float *k2 = k + DHSA_MIN(j0 + 2, nk - 1) * D;
        const float *k3 = k + DHSA_MIN(j0 + 3, nk - 1) * D;
        for (int64_t r = 0; r < R; r++) {
            const float *qr = q + r * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 x = _mm256_loadu_ps(qr + d);
                a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + d), a0);
                a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k1 + d), a1);
                a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k2 + d), a2);
                a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k3 + d), a3);
            }
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            const __m128 t = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            _mm_storeu_ps(s + r * lds + j0, _mm_mul_ps(t, va));
        }
    }
}
#endif /* DHSA_TILES_VECTOR */

/* ---- dispatch ---------------------------------------------------------- */

void dhsa_tile_qk(int path, float *s, int64_t lds, const float *q, const float *kt,
                  int64_t ldk, int64_t R, int64_t nk_pad, int64_t D, float alpha) {
#if DHSA_TILES_VECTOR
    if (path == DHSA_TILE_AVX512) { qk_avx512(s, lds, q, kt, ldk, R, nk_pad, D, alpha); return; }
    if (path == DHSA_TILE_AVX2) { qk_avx2(s, lds, q, kt, ldk, R, nk_pad, D, alpha); return; }
#endif
    (void)path;
    dhsa_tile_qk_scalar(s, lds, q, kt, ldk, R, nk_pad, D, alpha);
}

void dhsa_tile_pv(int path, float *o, const float *p, int64_t ldp, const float *v, int64_t R,
                  int64_t nk, int64_t D) {
#if DHSA_TILES_VECTOR
    if (path == DHSA_TILE_AVX512) { pv_avx512(o, p, ldp, v, R, nk, D); return; }
    if (path == DHSA_TILE_AVX2) { pv_avx2(o, p, ldp, v, R, nk, D); return; }
#endif
    (void)path;
    dhsa_tile_pv_scalar(o, p, ldp, v, R, nk, D);
}

void dhsa_rows_qk(int path, float *s, int64_t lds, const float *q, const float *k, int64_t R,
                  int64_t nk, int64_t D, float alpha) {
#if DHSA_TILES_VECTOR
    if (path == DHSA_TILE_AVX512 || path == DHSA_TILE_AVX2) {
        rows_qk_avx2(s, lds, q, k, R, nk, D, alpha);
        return;
    }
#endif
    (void)path;
    dhsa_rows_qk_scalar(s, lds, q, k, R, nk, D, alpha);
}

void dhsa_rows_pv(int path, float *o, const float *p, int64_t ldp, const float *v, int64_t R,
                  int64_t nk, int64_t D) {
#if DHSA_TILES_VECTOR
    /* the same per-element FMA order as pv_avx512: both paths, the same bits */
    if (path == DHSA_TILE_AVX512 || path == DHSA_TILE_AVX2) {
        pv_avx2(o, p, ldp, v, DHSA_ROUND_UP(R, 4), nk, D);
        return;
    }
#endif
    (void)path;
    dhsa_tile_pv_scalar(o, p, ldp, v, R, nk, D);
}
