/*
 * chunking.c - training-free dynamic chunking of the keys.
 *
 * A boundary belongs where the key content shifts. The score of position t
 * compares the mean key of the `window` positions left of t with the mean
 * of the `window` positions right of t, both centred on the mean of all keys
 * before t (keys share a large constant component that would make every
 * cosine close to 1). Means come from running sums, so scoring is O(L * D)
 * per head. A left-to-right scan then places boundaries at local maxima
 * above a threshold, with minimum / maximum chunk lengths and an optional cap
 * on the number of chunks (the scan stops after max_chunks - 1 boundaries;
 * the last chunk takes the rest). The decision at t reads keys up to
 * t + window + nms_radius - 1 only (Lk matters only where that look-ahead
 * passes the end), which keeps the chunking causal beyond that look-ahead
 * (DHSAConfig checks local >= window + nms_radius): appending keys moves no
 * boundary at or before Lk - window - nms_radius.
 *
 * A learned boundary model (a row of weights fitted offline from the
 * model's own attention, dhsa/harness/calibrate.py) replaces the cosine by a
 * linear score of features of the same two window means: the squared and
 * the product terms per dimension, the cosine distance, the distance and the
 * two norms. It reads the same keys, so the look-ahead is the same.
 *
 * Plain C without intrinsics (the compiler vectorises the split sums of the
 * score loop), so there is no separate scalar twin.
 *
 * Must agree with dhsa/reference.py: boundary_scores, with and without a
 * model (to float64 rounding:
 * reciprocals and split sums here, divisions there) and find_boundaries
 * (decision for decision on the same scores; tests/test_chunking.py).
 */
#include <math.h>
#include <string.h>
#include "internal.h"

/* The two centred window means at one position, from three prefix rows:
 * a = mean of keys [t - wl, t) - mu, b = mean of [t, t + wr) - mu, mu the mean
 * of keys [0, t); reciprocals, not three divisions per element. */
typedef struct {
    const double *p0, *pt, *p1;
    double inv_t, inv_l, inv_r;
} window_means;

static inline void centred(const window_means *w, int64_t x, double *a, double *b) {
    const double mu = w->pt[x] * w->inv_t;
    *a = (w->pt[x] - w->p0[x]) * w->inv_l - mu;
    *b = (w->p1[x] - w->pt[x]) * w->inv_r - mu;
}

/* The learned score at one position (see dhsa.h for the row's layout): a
 * second pass over the W values, kept apart from the cosine loop so that
 * loop stays branch-free. Four partial sums per reduction (as there). */
static double learned_score(const double *model, const window_means *w, int64_t W,
                            double cosd, double nl, double nr) {
    const double *wsq = model, *wpr = model + W, *tail = model + 2 * W;
    double sq[4] = {0, 0, 0, 0}, pr[4] = {0, 0, 0, 0}, dd[4] = {0, 0, 0, 0};
    for (int64_t x = 0; x < W; x++) {
        double a, b;
        centred(w, x, &a, &b);
        const double e = a - b;
        sq[x & 3] += wsq[x] * (e * e);
        pr[x & 3] += wpr[x] * (a * b);
        dd[x & 3] += e * e;
    }
    const double lin = ((sq[0] + sq[1]) + (sq[2] + sq[3])) + ((pr[0] + pr[1]) + (pr[2] + pr[3]));
    const double dist = sqrt((dd[0] + dd[1]) + (dd[2] + dd[3]));
    return tail[DHSA_BMODEL_BIAS] + lin + tail[DHSA_BMODEL_COS] * cosd +
           tail[DHSA_BMODEL_DIST] * dist + tail[DHSA_BMODEL_NORM_L] * nl +
           tail[DHSA_BMODEL_NORM_R] * nr;
}

/* The score of position t from three prefix rows (row x = sum of keys [0, x)):
 * p0 = row t - wl, pt = row t, p1 = row t + wr. The one home of the score,
 * shared by the whole-sequence pass below and the incremental chunk state of
 * a KV cache (decode.c), so both give the same bits. */
double dhsa_chunking_score_at(const double *p0, const double *pt, const double *p1, int64_t t,
                              int64_t wl, int64_t wr, int64_t W, const double *model) {
    const window_means w = {p0, pt, p1, 1.0 / (double)t, 1.0 / (double)wl, 1.0 / (double)wr};
    /* four partial sums per reduction so the loop vectorises (a serial
     * chain otherwise) */
    double pd[4] = {0, 0, 0, 0}, pl[4] = {0, 0, 0, 0}, pr[4] = {0, 0, 0, 0};
    int64_t x = 0;
    for (; x + 4 <= W; x += 4) {
        for (int u = 0; u < 4; u++) {
            double a, b;
            centred(&w, x + u, &a, &b);
            pd[u] += a * b;
            pl[u] += a * a;
            pr[u] += b * b;
        }
    }
    for (; x < W; x++) {
        double a, b;
        centred(&w, x, &a, &b);
        pd[0] += a * b;
        pl[0] += a * a;
        pr[0] += b * b;
    }
    const double dot = (pd[0] + pd[1]) + (pd[2] + pd[3]);
    const double nl = (pl[0] + pl[1]) + (pl[2] + pl[3]);
    const double nr = (pr[0] + pr[1]) + (pr[2] + pr[3]);
    const double cosd = (nl > 0.0 && nr > 0.0) ? 1.0 - dot / (sqrt(nl) * sqrt(nr)) : 0.0;
    return model ? learned_score(model, &w, W, cosd, sqrt(nl), sqrt(nr)) : cosd;
}

/* score (Lk) from k: nheads heads of (Lk, D), head_stride floats apart.
 * Running sums are kept in a ring of 2 * window + 2 rows (row x = sum of keys
 * [0, x)), so memory is O(window * heads * D) whatever Lk is. */
int dhsa_chunking_boundary_scores(double *score, const float *k, int64_t Lk, int64_t D,
                                  int64_t nheads, int64_t head_stride, int64_t window,
                                  const double *model) {
    if (!score || !k || Lk <= 0 || D <= 0 || nheads <= 0 || window <= 0) return DHSA_EINVAL;
    window = DHSA_MIN(window, Lk);
    const int64_t W = nheads * D; /* heads concatenated */
    const int64_t ring = 2 * window + 2;
    double *prefix = dhsa_alloc((size_t)(ring * W) * sizeof(double));
    if (!prefix) return DHSA_ENOMEM;
#define ROW(x) (prefix + ((x) % ring) * W)
    memset(ROW(0), 0, (size_t)W * sizeof(double));
    int64_t made = 0; /* rows [0, made] exist */
    score[0] = 0.0;
    for (int64_t t = 1; t < Lk; t++) {
        const int64_t wl = DHSA_MIN(window, t), wr = DHSA_MIN(window, Lk - t);
        while (made < t + wr) {
            const double *prev = ROW(made);
            double *dst = ROW(made + 1);
            for (int64_t h = 0; h < nheads; h++) {
                const float *row = k + h * head_stride + made * D;
                for (int64_t d = 0; d < D; d++) dst[h * D + d] = prev[h * D + d] + (double)row[d];
            }
            made++;
        }
        score[t] = dhsa_chunking_score_at(ROW(t - wl), ROW(t), ROW(t + wr), t, wl, wr, W, model);
    }
#undef ROW
    free(prefix);
    return DHSA_OK;
}

/* Whether position t becomes a boundary when the open chunk starts at `last`
 * (scores [1, Lk) read, up to t + nms_radius): the open chunk reached
 * max_chunk, or it has min_chunk keys and score[t] >= threshold is a local
 * maximum within nms_radius (the earlier position wins ties). The one home
 * of the decision, for the whole-sequence scan below and the incremental
 * one of a KV cache (decode.c). */
int dhsa_chunking_take(const double *score, int64_t t, int64_t last, int64_t Lk,
                       const dhsa_predict_params *p) {
    const int64_t len = t - last;
    if (len >= p->max_chunk) return 1;
    if (len < p->min_chunk || !(score[t] >= p->threshold)) return 0;
    const int64_t a = DHSA_MAX(1, t - p->nms_radius), b = DHSA_MIN(Lk - 1, t + p->nms_radius);
    for (int64_t u = a; u <= b; u++) {
        if (u < t && score[u] >= score[t]) return 0; /* the earlier wins ties */
        if (u > t && score[u] > score[t]) return 0;
    }
    return 1;
}

/* bounds (capacity Lk + 1), *num_bounds from score (Lk): the scan described
 * in dhsa.h; the twin of reference.find_boundaries, decision for decision. */
int dhsa_chunking_find_boundaries(int64_t *bounds, int64_t *num_bounds, const double *score,
                                  int64_t Lk, const dhsa_predict_params *p) {
    if (!bounds || !num_bounds || !score || !p || Lk <= 0) return DHSA_EINVAL;
    if (p->min_chunk < 1 || p->max_chunk < p->min_chunk || p->nms_radius < 0 ||
        p->max_chunks < 0)
        return DHSA_EINVAL;
    if (!isfinite(p->threshold)) return DHSA_EINVAL;
    /* the cap: at most max_chunks - 1 inner boundaries, then the last chunk
     * takes the rest (it may pass max_len). A cap that read Lk (lengths
     * widened to ceil(Lk / max_chunks)) would let keys appended after a query
     * move the boundaries before it. */
    const int64_t inner_cap = p->max_chunks > 0 ? p->max_chunks - 1 : Lk;
    int64_t n = 0, last = 0;
    bounds[n++] = 0;
    for (int64_t t = 1; t < Lk && n - 1 < inner_cap; t++)
        if (dhsa_chunking_take(score, t, last, Lk, p)) { bounds[n++] = t; last = t; }
    bounds[n++] = Lk;
    *num_bounds = n;
    return DHSA_OK;
}
