/*
 * representations.c - running sums behind the length-normalised chunk
 * representations.
 *
 * A chunk [a, b) of keys (or a block of queries) is represented by
 * r = mean * sqrt(n) = (P[b] - P[a]) / sqrt(b - a), where P is the running
 * sum of the head-averaged vectors. Plain means favour short chunks, sums
 * long ones; sqrt(n) sits between. One O(L * D) pass gives every chunk.
 *
 * Must agree with dhsa/reference.py: prefix_sums (bit for bit: the same
 * sequential float64 additions).
 */
#include <string.h>
#include <math.h>
#include "internal.h"

/* prefix (L + 1, D) from x: nheads heads of (L, D), head_stride floats apart. */
int dhsa_repr_prefix_sums(double *prefix, const float *x, int64_t L, int64_t D,
                          int64_t nheads, int64_t head_stride) {
    if (!prefix || !x || L <= 0 || D <= 0 || nheads <= 0) return DHSA_EINVAL;
    dhsa_repr_prefix_sums_every_cols(prefix, x, L, D, nheads, head_stride, 1, 0, D);
    return DHSA_OK;
}

/* Columns [d0, d1) of the running sums, stored every `step` rows.
 * Every column is its own sequential sum, so column ranges can be filled by
 * different threads and the result stays bit-identical to one pass; step 1
 * gives every row. */
void dhsa_repr_prefix_sums_every_cols(double *out, const float *x, int64_t L, int64_t D,
                                      int64_t nheads, int64_t head_stride, int64_t step,
                                      int64_t d0, int64_t d1) {
    double run[256];
    for (int64_t c0 = d0; c0 < d1; c0 += 256) { /* 256 running sums at a time */
        const int64_t c1 = DHSA_MIN(d1, c0 + 256);
        for (int64_t d = c0; d < c1; d++) run[d - c0] = out[d] = 0.0;
        int64_t row = 1;
        for (int64_t t = 0; t < L; t++) {
            for (int64_t d = c0; d < c1; d++) {
                double acc = 0.0;
                for (int64_t h = 0; h < nheads; h++) acc += (double)x[h * head_stride + t * D + d];
                run[d - c0] = run[d - c0] + acc / (double)nheads;
            }
            if ((t + 1) % step == 0 || t + 1 == L) {
                for (int64_t d = c0; d < c1; d++) out[row * D + d] = run[d - c0];
                row++;
            }
        }
    }
}

/* out (ceil(L / step) + 1, D): the rows t = 0, step, 2 step, ..., L of the
 * running sums of dhsa_repr_prefix_sums, computed the same way (so bit-identical) but stored
 * only where a block starts: O(L / step * D) memory. */
int dhsa_repr_prefix_sums_every(double *out, const float *x, int64_t L, int64_t D,
                                int64_t nheads, int64_t head_stride, int64_t step) {
    if (!out || !x || L <= 0 || D <= 0 || nheads <= 0 || step <= 0) return DHSA_EINVAL;
    dhsa_repr_prefix_sums_every_cols(out, x, L, D, nheads, head_stride, step, 0, D);
    return DHSA_OK;
}

/* n ** power, with sqrt for the DHSA default so the reference matches bit for bit */
double dhsa_repr_norm(int64_t n, double power) {
    if (power == 0.5) return sqrt((double)n);
    if (power == 1.0) return (double)n;
    if (power == 0.0) return 1.0;
    return pow((double)n, power);
}

/* out (D) = (prefix[b] - prefix[a]) / (b - a) ** power: the representation of
 * [a, b); power 0.5 is DHSA's mean * sqrt(n), 1 the plain mean, 0 the sum. */
void dhsa_repr_range(double *out, const double *prefix, int64_t D, int64_t a, int64_t b,
                     double power) {
    const double norm = dhsa_repr_norm(b - a, power);
    for (int64_t d = 0; d < D; d++) out[d] = (prefix[b * D + d] - prefix[a * D + d]) / norm;
}
