/*
 * selection.c - chunk scores, upsampling and budgeted selection.
 *
 * For every query block the chunk-level similarity r_q . r_k is computed
 * against the chunks it can reach (one dgemm per tile of query blocks) -
 * or, with chunk_score "max", r_q . k_j against every key it can reach and
 * each chunk scored by its best key (a key-level second look that a chunk
 * mean would dilute); the token-level upsampling is implicit: every key of
 * a chunk piece inherits its score, so a token-level top-k is "whole pieces
 * best first, the last one cut" and the result is a short list of key ranges, never an L x L
 * mask. Pieces are chunks clipped to the block's candidate keys: the allowed
 * keys minus the always-kept sink and local keys. A clipped piece is scored
 * with its own representation (or its own best key), so no key past the block's local window
 * ever influences the block (causality, see chunking.c for the look-ahead).
 *
 * Must agree with dhsa/reference.py: select_ranges (same order of
 * operations, ties broken by position) and count_pairs.
 */
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "internal.h"
#include "rules.h"

#define QB_TILE 16 /* query blocks per chunk-score dgemm */

static int omp_threads(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

typedef dhsa_piece piece;

static int params_check(const dhsa_attn_shape *s, const dhsa_predict_params *p) {
    int st = dhsa_attn_shape_check(s);
    if (st != DHSA_OK) return st;
    if (!p || p->granularity < 0 || p->granularity > 2 || p->block_size < 1) return DHSA_EINVAL;
    if (p->sink < 0 || p->local < 0 || p->dense_tail < 0 || p->budget_mode < 0 ||
        p->budget_mode > 2)
        return DHSA_EINVAL;
    if (p->budget_mode == DHSA_BUDGET_TOKENS && p->budget < 1) return DHSA_EINVAL;
    if (p->budget_mode == DHSA_BUDGET_DENSITY && !(p->density > 0.0 && p->density <= 1.0))
        return DHSA_EINVAL;
    if (p->budget_mode == DHSA_BUDGET_ADAPTIVE &&
        (!(p->mass > 0.0 && p->mass <= 1.0) || p->min_budget < 1 || p->max_budget < p->min_budget))
        return DHSA_EINVAL;
    if (p->boundary_window < 1) return DHSA_EINVAL;
    if (p->normalization < 0 || p->normalization > 2 || p->method < 0 || p->method > 1)
        return DHSA_EINVAL;
    /* the adaptive budget estimates mass from mean scores */
    if (p->chunk_score < 0 || p->chunk_score > 1 ||
        (p->chunk_score == DHSA_SCORE_MAX && p->budget_mode == DHSA_BUDGET_ADAPTIVE))
        return DHSA_EINVAL;
    return DHSA_OK;
}

/* exponent of the key chunk length in r_k = sum / n ** key_norm */
static double key_norm_of(const dhsa_predict_params *p) {
    return p->normalization == DHSA_NORM_SQRT ? 0.5 : (p->normalization == DHSA_NORM_MEAN ? 1.0 : 0.0);
}

#define chunk_of dhsa_chunk_of

int dhsa_predict_boundaries(int64_t *bounds, int64_t *num_bounds, const float *k,
                            const dhsa_attn_shape *s, const dhsa_predict_params *p,
                            int num_threads) {
    int st = params_check(s, p);
    if (st != DHSA_OK) return st;
    if (!bounds || !num_bounds || !k || num_threads < 1) return DHSA_EINVAL;
    const int64_t CG = dhsa_rule_chunk_groups(s, p->granularity), n = s->B * CG;
    int status = DHSA_OK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(dhsa_threads_for(num_threads, n))
    for (int64_t g = 0; g < n; g++) {
        const int64_t b = g / CG, cg = g % CG;
        int64_t kh0, heads;
        dhsa_rule_chunk_heads(s, p->granularity, cg, &kh0, &heads);
        const float *kg = k + (b * s->Hkv + kh0) * s->Lk * s->D;
        /* a learned model brings its own threshold for the same scan */
        const double *model = p->boundary_model
                                  ? p->boundary_model + cg * dhsa_bmodel_len(heads * s->D)
                                  : NULL;
        dhsa_predict_params scan = *p;
        if (model) scan.threshold = model[2 * heads * s->D + DHSA_BMODEL_THRESHOLD];
        double *score = dhsa_alloc((size_t)s->Lk * sizeof(double));
        int r = score ? dhsa_chunking_boundary_scores(score, kg, s->Lk, s->D, heads,
                                                      s->Lk * s->D, p->boundary_window, model)
                      : DHSA_ENOMEM;
        if (r == DHSA_OK)
            r = dhsa_chunking_find_boundaries(bounds + g * (s->Lk + 1), num_bounds + g,
                                              score, s->Lk, &scan);
        free(score);
        if (r != DHSA_OK) {
#pragma omp atomic write
            status = r;
        }
    }
    return status;
}

int dhsa_predict_capacity(int64_t *capacity, const dhsa_attn_shape *s,
                          const dhsa_predict_params *p, const int64_t *bounds,
                          const int64_t *num_bounds) {
    int st = params_check(s, p);
    if (st != DHSA_OK) return st;
    const int64_t SG = dhsa_rule_select_groups(s, p->granularity);
    const int64_t CG = dhsa_rule_chunk_groups(s, p->granularity);
    const int64_t NQB = dhsa_rule_num_blocks(s->Lq, p->block_size);
    int64_t total = 0;
    capacity[0] = 0;
    for (int64_t b = 0; b < s->B; b++)
        for (int64_t sg = 0; sg < SG; sg++) {
            const int64_t cgi = b * CG + dhsa_rule_chunk_group_of(s, p->granularity, sg);
            const int64_t *bd = bounds + cgi * (s->Lk + 1), nb = num_bounds[cgi];
            for (int64_t qb = 0; qb < NQB; qb++) {
                const dhsa_block_geom g = dhsa_rule_block(s, p->block_size, qb);
                int64_t c = chunk_of(bd, nb, g.hi - 1) - chunk_of(bd, nb, g.lo) + 1;
                int64_t cap = 4 + DHSA_MIN(c, g.hi - g.lo);
                if (total > INT64_MAX - cap) return DHSA_EOVERFLOW;
                total += cap;
                capacity[(b * SG + sg) * NQB + qb + 1] = total;
            }
        }
    return DHSA_OK;
}

static int piece_cmp(const void *x, const void *y) {
    const piece *a = x, *b = y;
    if (a->score > b->score) return -1;
    if (a->score < b->score) return 1;
    return (a->a > b->a) - (a->a < b->a);
}

/* Heaps of pieces under piece_cmp (best score, then earliest start): the
 * best piece on top (BEST_ON_TOP) or the worst (WORST_ON_TOP). */
enum { BEST_ON_TOP = 1, WORST_ON_TOP = -1 };

static inline int above(const piece *a, const piece *b, int order) {
    return order * piece_cmp(a, b) < 0;
}

static void sift_down(piece *h, int64_t n, int64_t i, int order) {
    for (;;) {
        int64_t top = i, l = 2 * i + 1, r = l + 1;
        if (l < n && above(&h[l], &h[top], order)) top = l;
        if (r < n && above(&h[r], &h[top], order)) top = r;
        if (top == i) return;
        piece t = h[i]; h[i] = h[top]; h[top] = t;
        i = top;
    }
}

static void sift_up(piece *h, int64_t i, int order) {
    while (i > 0) {
        const int64_t up = (i - 1) / 2;
        if (!above(&h[i], &h[up], order)) return;
        piece t = h[i]; h[i] = h[up]; h[up] = t;
        i = up;
    }
}

static void heapify(piece *h, int64_t n) {
    for (int64_t i = n / 2 - 1; i >= 0; i--) sift_down(h, n, i, BEST_ON_TOP);
}

static piece heap_pop(piece *h, int64_t *n, int order) {
    piece top = h[0];
    h[0] = h[--(*n)];
    sift_down(h, *n, 0, order);
    return top;
}

/* The best pieces (piece_cmp order) whose lengths first reach `need`,
 * collected in one pass over the candidates: a heap keeps the best pieces so
 * far, its worst on top, trimmed while the others alone still cover `need`.
 * Once it covers `need`, a candidate no better than the top is dropped with
 * one comparison - most of them at long contexts, where a block has
 * thousands of candidate chunks and keeps a few hundred. */
typedef dhsa_cover_heap cover_heap;

void dhsa_cover_offer(cover_heap *c, const piece *pc) {
    if (c->need <= 0 || (c->tok >= c->need && piece_cmp(pc, &c->h[0]) > 0)) return;
    c->h[c->n] = *pc;
    sift_up(c->h, c->n++, WORST_ON_TOP);
    c->tok += pc->b - pc->a;
    while (c->n > 1 && c->tok - (c->h[0].b - c->h[0].a) >= c->need) {
        const piece out = heap_pop(c->h, &c->n, WORST_ON_TOP);
        c->tok -= out.b - out.a;
    }
}

static int range_cmp(const void *x, const void *y) {
    const piece *a = x, *b = y;
    return (a->a > b->a) - (a->a < b->a);
}

/* The covered pieces best first (piece_cmp order), appended to sel[nsel..]
 * until *tokens reaches limit, the last one cut to its first keys: the
 * budget rule of every fixed-budget selection (a block's here, a decode
 * step's in decode.c). Returns the new nsel. */
int64_t dhsa_cover_take(cover_heap *c, piece *sel, int64_t nsel, int64_t *tokens,
                        int64_t limit) {
    qsort(c->h, (size_t)c->n, sizeof(piece), piece_cmp);
    for (int64_t i = 0; i < c->n && *tokens < limit; i++) {
        const int64_t take = DHSA_MIN(c->h[i].b - c->h[i].a, limit - *tokens);
        sel[nsel].a = c->h[i].a;
        sel[nsel].b = c->h[i].a + take;
        nsel++;
        *tokens += take;
    }
    return nsel;
}

/* sel (nsel pieces, any order) -> sorted, merged ranges; returns their number */
int64_t dhsa_pieces_merge(int32_t *starts, int32_t *ends, piece *sel, int64_t nsel) {
    qsort(sel, (size_t)nsel, sizeof(piece), range_cmp);
    int64_t nr = 0;
    for (int64_t i = 0; i < nsel; i++) {
        if (nr > 0 && sel[i].a <= ends[nr - 1]) {
            if (sel[i].b > ends[nr - 1]) ends[nr - 1] = (int32_t)sel[i].b;
        } else {
            starts[nr] = (int32_t)sel[i].a;
            ends[nr] = (int32_t)sel[i].b;
            nr++;
        }
    }
    return nr;
}

static double dot(const double *x, const double *y, int64_t n) {
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++) acc += x[i] * y[i];
    return acc;
}

/* r_q . r_k([a, b)) straight from the key running sums */
static double piece_score(const double *rq, const double *kprefix, int64_t D, int64_t a,
                          int64_t b, double power, double *tmp) {
    dhsa_repr_range(tmp, kprefix, D, a, b, power);
    return dot(rq, tmp, D);
}

/* max of x[a .. b) (b > a) */
static double range_max(const double *x, int64_t a, int64_t b) {
    double m = x[a];
    for (int64_t j = a + 1; j < b; j++) m = x[j] > m ? x[j] : m;
    return m;
}

/* Selection of one block. rq: (D) block representation; srow: full-chunk
 * scores (chunks 0 .. reach-1); krow: chunk_score "max": r_q . k_j of every
 * key j < g->hi, else NULL; pieces/sel: scratch of nb + 4. Writes the
 * merged ranges to starts/ends and returns their number. */
static int64_t select_block(int32_t *starts, int32_t *ends, const dhsa_block_geom *g,
                            const double *rq, const double *srow, const double *krow,
                            const double *kprefix, const int64_t *bd, int64_t nb,
                            const dhsa_attn_shape *s, const dhsa_predict_params *p,
                            double key_norm, piece *pieces, piece *sel, piece *kept,
                            double *tmp) {
    const int64_t D = s->D;
    /* the always-kept sink and local keys and the budget clamp (rules.h) */
    const dhsa_block_keep keep = dhsa_rule_keep(s, g, p);
    const int64_t sink_end = keep.sink_end, loc_a = keep.loc_a, loc_b = keep.loc_b;
    const int64_t forced = keep.forced, lo_clamp = keep.lo_clamp, hi_clamp = keep.hi_clamp;
    if (keep.dense) { /* not enough keys to be sparse: dense block */
        starts[0] = (int32_t)g->lo;
        ends[0] = (int32_t)g->hi;
        return 1;
    }

    /* candidate pieces: chunks clipped to [sink_end, loc_a) and [loc_b, hi);
     * a fixed budget streams them through the cover heap, the adaptive one
     * needs them all (their total mass) */
    const int adaptive = p->budget_mode == DHSA_BUDGET_ADAPTIVE;
    cover_heap cov = {kept, 0, 0, hi_clamp - forced};
    int64_t np = 0;
    const int64_t cand[2][2] = {{sink_end, loc_a}, {loc_b, g->hi}};
    for (int iv = 0; iv < 2; iv++) {
        const int64_t x = cand[iv][0], y = cand[iv][1];
        if (x >= y) continue;
        for (int64_t c = chunk_of(bd, nb, x); c < nb - 1 && bd[c] < y; c++) {
            piece pc;
            pc.a = DHSA_MAX(x, bd[c]);
            pc.b = DHSA_MIN(y, bd[c + 1]);
            const int whole = pc.a == bd[c] && pc.b == bd[c + 1];
            /* strictly worse than the worst kept: out, without building it */
            if (!adaptive && whole && cov.tok >= cov.need && srow[c] < cov.h[0].score) continue;
            pc.score = whole ? srow[c]
                       : krow ? range_max(krow, pc.a, pc.b)
                              : piece_score(rq, kprefix, D, pc.a, pc.b, key_norm, tmp);
            pc.logm = 0.0;
            if (adaptive) pieces[np++] = pc;
            else dhsa_cover_offer(&cov, &pc);
        }
    }
    int64_t nsel = 0, tokens = forced;
    if (sink_end > g->lo) { sel[nsel].a = g->lo; sel[nsel].b = sink_end; nsel++; }
    if (loc_b > loc_a) { sel[nsel].a = loc_a; sel[nsel].b = loc_b; nsel++; }

    if (!adaptive) {
        nsel = dhsa_cover_take(&cov, sel, nsel, &tokens, hi_clamp);
    } else {
        /* best pieces first: a heap pops only as many as the budget takes
         * (O(n + k log n) instead of sorting all n) */
        heapify(pieces, np);
        int64_t heap_n = np;
        /* estimated mass of a piece: n * exp(scale * mean_q . mean_k), with
         * mean_q . mean_k = score / (sqrt(nq) * n ** (1 - key_norm)) */
        const double nq = (double)g->nq, scale = (double)s->scale;
        double mmax = -INFINITY, forced_lm[2] = {-INFINITY, -INFINITY};
        /* the always-kept keys count too, but only those before the block:
         * a key after a query must never sway that query's selection */
        const int64_t fa[2] = {g->lo, loc_a};
        const int64_t fb[2] = {DHSA_MIN(sink_end, g->spos), DHSA_MIN(loc_b, g->spos)};
        for (int f = 0; f < 2; f++) {
            if (fb[f] <= fa[f]) continue;
            const double n = (double)(fb[f] - fa[f]);
            const double sc = piece_score(rq, kprefix, D, fa[f], fb[f], key_norm, tmp);
            forced_lm[f] = log(n) + scale * sc / (sqrt(nq) * dhsa_repr_norm(fb[f] - fa[f], 1.0 - key_norm));
            mmax = DHSA_MAX(mmax, forced_lm[f]);
        }
        for (int64_t i = 0; i < np; i++) {
            const double n = (double)(pieces[i].b - pieces[i].a);
            pieces[i].logm = log(n) + scale * pieces[i].score /
                             (sqrt(nq) * dhsa_repr_norm(pieces[i].b - pieces[i].a, 1.0 - key_norm));
            mmax = DHSA_MAX(mmax, pieces[i].logm);
        }
        double total = 0.0, acc = 0.0;
        for (int f = 0; f < 2; f++) acc += exp(forced_lm[f] - mmax);
        total = acc;
        for (int64_t i = 0; i < np; i++) total += exp(pieces[i].logm - mmax);
        const double target = p->mass * total;
        while (heap_n > 0) {
            if (tokens >= hi_clamp) break;
            const int reached = acc >= target;
            if (reached && tokens >= lo_clamp) break;
            const piece pc = heap_pop(pieces, &heap_n, BEST_ON_TOP);
            const int64_t limit = reached ? lo_clamp : hi_clamp;
            const int64_t len = pc.b - pc.a;
            const int64_t take = DHSA_MIN(len, limit - tokens);
            sel[nsel].a = pc.a;
            sel[nsel].b = pc.a + take;
            nsel++;
            tokens += take;
            acc += exp(pc.logm - mmax) * (double)take / (double)len;
        }
    }

    return dhsa_pieces_merge(starts, ends, sel, nsel);
}

int dhsa_predict_select(int32_t *starts, int32_t *ends, int64_t *counts,
                        double *chunk_scores, int64_t score_stride,
                        const int64_t *capacity, const float *q, const float *k,
                        const dhsa_attn_shape *s, const dhsa_predict_params *p,
                        const int64_t *bounds, const int64_t *num_bounds, int num_threads) {
    int st = params_check(s, p);
    if (st != DHSA_OK) return st;
    if (!starts || !ends || !counts || !capacity || !q || !k || !bounds || !num_bounds ||
        num_threads < 1) return DHSA_EINVAL;
    const int64_t D = s->D, bs = p->block_size;
    const int64_t SG = dhsa_rule_select_groups(s, p->granularity);
    const int64_t CG = dhsa_rule_chunk_groups(s, p->granularity);
    const int64_t NQB = dhsa_rule_num_blocks(s->Lq, bs), ntiles = (NQB + QB_TILE - 1) / QB_TILE;
    int64_t ncmax = 1;
    for (int64_t i = 0; i < s->B * CG; i++) ncmax = DHSA_MAX(ncmax, num_bounds[i] - 1);
    if (chunk_scores && score_stride < ncmax) return DHSA_EINVAL;
    const double key_norm = key_norm_of(p);

    /* queries: running sums kept only at block starts, (NQB + 1, D) */
    double *qprefix = dhsa_alloc((size_t)((NQB + 1) * D) * sizeof(double));
    double *kprefix = dhsa_alloc((size_t)((s->Lk + 1) * D) * sizeof(double));
    /* the keys the scores read: chunk representations ("mean"), or the
     * head-averaged keys, P[j + 1] - P[j] of the running sums ("max") */
    const int by_key = p->chunk_score == DHSA_SCORE_MAX;
    double *rk = by_key ? NULL : dhsa_alloc((size_t)(ncmax * D) * sizeof(double));
    double *kavg = by_key ? dhsa_alloc((size_t)(s->Lk * D) * sizeof(double)) : NULL;
    if (!qprefix || !kprefix || !(by_key ? kavg : rk)) {
        free(qprefix); free(kprefix); free(rk); free(kavg);
        return DHSA_ENOMEM;
    }
    int status = DHSA_OK;

#pragma omp parallel num_threads(dhsa_threads_for(num_threads, ntiles))
    {
        double *rq = dhsa_alloc((size_t)(QB_TILE * D) * sizeof(double));
        double *sc = dhsa_alloc((size_t)(QB_TILE * ncmax) * sizeof(double));
        double *tmp = dhsa_alloc((size_t)D * sizeof(double));
        piece *pieces = dhsa_alloc((size_t)(ncmax + 4) * sizeof(piece));
        piece *sel = dhsa_alloc((size_t)(ncmax + 6) * sizeof(piece));
        piece *kept = dhsa_alloc((size_t)(ncmax + 4) * sizeof(piece));
        double *sk = by_key ? dhsa_alloc((size_t)(QB_TILE * s->Lk) * sizeof(double)) : NULL;
        const int ok = rq && sc && tmp && pieces && sel && kept && (!by_key || sk);
        if (!ok) {
#pragma omp atomic write
            status = DHSA_ENOMEM;
        }
        int64_t last_cg = -1;
        for (int64_t grp = 0; grp < s->B * SG; grp++) {
            const int64_t b = grp / SG, sg = grp % SG;
            const int64_t cgi = b * CG + dhsa_rule_chunk_group_of(s, p->granularity, sg);
            const int64_t *bd = bounds + cgi * (s->Lk + 1), nb = num_bounds[cgi];
            /* running sums of the group's queries (block starts only) and of
             * its chunking group's keys: split by columns over the threads
             * (each column is one sequential sum, so the result does not
             * depend on the split), then the chunk representations */
            int64_t qh0, nqh, kh0, nkh;
            dhsa_rule_select_heads(s, p->granularity, sg, &qh0, &nqh);
            dhsa_rule_chunk_heads(s, p->granularity, cgi % CG, &kh0, &nkh);
            const int new_k = cgi != last_cg;
            /* one column block per thread, whole cache lines of floats, so
             * every line of q and k is read by one thread only */
            int64_t width = (D + omp_threads() - 1) / omp_threads();
            width = DHSA_ROUND_UP(width, 16);
            const int64_t ncol = (D + width - 1) / width;
#pragma omp for schedule(dynamic, 1)
            for (int64_t job = 0; job < 2 * ncol; job++) {
                const int64_t d0 = (job % ncol) * width, d1 = DHSA_MIN(D, d0 + width);
                if (job < ncol)
                    dhsa_repr_prefix_sums_every_cols(qprefix, q + (b * s->H + qh0) * s->Lq * D,
                                                     s->Lq, D, nqh, s->Lq * D, bs, d0, d1);
                else if (new_k)
                    dhsa_repr_prefix_sums_every_cols(kprefix, k + (b * s->Hkv + kh0) * s->Lk * D,
                                                     s->Lk, D, nkh, s->Lk * D, 1, d0, d1);
            } /* implicit barrier: running sums complete */
            if (new_k) {
                if (by_key) {
#pragma omp for schedule(static)
                    for (int64_t j = 0; j < s->Lk; j++)
                        for (int64_t d = 0; d < D; d++)
                            kavg[j * D + d] = kprefix[(j + 1) * D + d] - kprefix[j * D + d];
                } else {
#pragma omp for schedule(static)
                    for (int64_t c = 0; c < nb - 1; c++)
                        dhsa_repr_range(rk + c * D, kprefix, D, bd[c], bd[c + 1], key_norm);
                }
            }
            last_cg = cgi;
#pragma omp for schedule(dynamic, 1)
            for (int64_t tile = 0; tile < ntiles; tile++) {
                if (!ok) continue;
                const int64_t qb0 = tile * QB_TILE, nqb = DHSA_MIN(QB_TILE, NQB - qb0);
                int64_t reach = 0;
                for (int64_t i = 0; i < nqb; i++) {
                    const dhsa_block_geom g = dhsa_rule_block(s, bs, qb0 + i);
                    /* block sum / sqrt(nq), as dhsa_repr_range on the full running sums */
                    const double *p0 = qprefix + (qb0 + i) * D, *p1 = p0 + D;
                    for (int64_t d = 0; d < D; d++)
                        rq[i * D + d] = (p1[d] - p0[d]) / sqrt((double)g.nq);
                    reach = DHSA_MAX(reach, chunk_of(bd, nb, g.hi - 1) + 1);
                }
                int64_t kreach = 0; /* keys the tile's blocks may see: [0, kreach) */
                if (by_key) {
                    /* r_q . k_j for every key, then each chunk's best key */
                    for (int64_t i = 0; i < nqb; i++)
                        kreach = DHSA_MAX(kreach, dhsa_rule_block(s, bs, qb0 + i).hi);
                    dhsa_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nqb, (int)kreach,
                               (int)D, 1.0, rq, (int)D, kavg, (int)D, 0.0, sk, (int)kreach);
                    for (int64_t i = 0; i < nqb; i++)
                        for (int64_t c = 0; c < reach; c++)
                            sc[i * reach + c] = range_max(sk + i * kreach, bd[c],
                                                          DHSA_MIN(bd[c + 1], kreach));
                } else {
                    dhsa_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nqb, (int)reach,
                               (int)D, 1.0, rq, (int)D, rk, (int)D, 0.0, sc, (int)reach);
                }
                for (int64_t i = 0; i < nqb; i++) {
                    const int64_t qb = qb0 + i, idx = grp * NQB + qb;
                    const dhsa_block_geom g = dhsa_rule_block(s, bs, qb);
                    const double *krow = by_key ? sk + i * kreach : NULL;
                    counts[idx] = select_block(starts + capacity[idx], ends + capacity[idx], &g,
                                               rq + i * D, sc + i * reach, krow, kprefix, bd,
                                               nb, s, p, key_norm, pieces, sel, kept, tmp);
                    if (chunk_scores) {
                        double *dst = chunk_scores + idx * score_stride;
                        const int64_t r = chunk_of(bd, nb, g.hi - 1) + 1;
                        for (int64_t c = 0; c < score_stride; c++)
                            dst[c] = (c < r && bd[c + 1] > g.lo) ? sc[i * reach + c] : NAN;
                    }
                }
            }
        }
        free(rq); free(sc); free(tmp); free(pieces); free(sel); free(kept); free(sk);
    }
    free(qprefix); free(kprefix); free(rk); free(kavg);
    return status;
}

int dhsa_selection_count_pairs(int64_t *pairs_selected, int64_t *pairs_allowed,
                               const dhsa_selection *sel, const dhsa_attn_shape *s,
                               int num_threads) {
    int st = dhsa_attn_shape_check(s);
    if (st != DHSA_OK) return st;
    if (!pairs_selected || !pairs_allowed || num_threads < 1) return DHSA_EINVAL;
    if (dhsa_selection_check(sel, s) != DHSA_OK) return DHSA_ESELECTION;
    dhsa_selection_count_pairs_checked(pairs_selected, pairs_allowed, sel, s, num_threads);
    return DHSA_OK;
}

void dhsa_selection_count_pairs_checked(int64_t *pairs_selected, int64_t *pairs_allowed,
                                        const dhsa_selection *sel, const dhsa_attn_shape *s,
                                        int num_threads) {
    const int64_t NQB = sel->num_blocks, bs = sel->block_size;
#pragma omp parallel for schedule(dynamic, 1) \
    num_threads(dhsa_threads_for(num_threads, s->B * sel->num_groups))
    for (int64_t grp = 0; grp < s->B * sel->num_groups; grp++) {
        int64_t kept = 0, allowed = 0;
        for (int64_t qb = 0; qb < NQB; qb++) {
            const int64_t idx = grp * NQB + qb;
            const dhsa_block_geom g = dhsa_rule_block(s, bs, qb);
            allowed += dhsa_rule_allowed_pairs(s, &g);
            for (int64_t r = sel->offsets[idx]; r < sel->offsets[idx + 1]; r++) {
                const int64_t ra = sel->starts[r], rb = sel->ends[r];
                /* the common case: every row of the block sees the whole range */
                if (ra >= g.all_lo && rb <= g.all_hi) {
                    kept += (rb - ra) * g.nq;
                    continue;
                }
                for (int64_t pos = g.spos; pos <= g.epos; pos++) {
                    int64_t lo, hi;
                    dhsa_rule_visible(s, pos, &lo, &hi);
                    const int64_t a = DHSA_MAX(lo, ra), b = DHSA_MIN(hi, rb);
                    if (b > a) kept += b - a;
                }
            }
        }
        pairs_selected[grp] = kept;
        pairs_allowed[grp] = allowed;
    }
}
