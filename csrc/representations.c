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
 * sequential float64 additions) and _repr / _norm.
 */
#include <string.h>
#include <math.h>
#include "internal.h"

/* out (ceil(L / step) + 1, D), columns [d0, d1) only: the rows t = 0, step,
 * 2 step, ..., L of the running sums P (P[0] = 0, P[t + 1] = P[t] + the mean
 * over heads [0, nheads) of x at t; x holds nheads heads of (L, D),
 * head_stride floats apart). step 1 gives every row, (L + 1, D).
 * Every column is its own sequential sum, so column ranges can be filled by
 * different threads and the result is bit-identical to one pass (and to
 * reference.prefix_sums). No checks: the caller sizes the buffers. */
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
