/*
 * predict.c - the one entry point of the prediction, and of prediction plus
 * attention.
 *
 * dhsa_predict runs the stages in order: boundaries (dynamic chunking,
 * fixed chunks or the caller's) -> capacity -> selection -> compaction into
 * CSR -> pair counts. Option values past the sequence length are clamped
 * here, once, and the method's fixed choices (block_topk: fixed chunks of
 * chunk_size keys, mean-pooled, scored by their representations) are made
 * here (resolved). dhsa_sparse_attention scans q, k and v once and
 * hands the bounds to both stages.
 *
 * Must agree with dhsa/reference.py: predict (and, through the kernel,
 * sparse_attention).
 */
#include <string.h>
#include <time.h>
#include "internal.h"
#include "rules.h"

/* ---- names of the string-valued options ------------------------------- */

typedef struct { const char *name; int value; } enum_name;

static const enum_name budget_modes[] = {
    {"tokens", DHSA_BUDGET_TOKENS}, {"density", DHSA_BUDGET_DENSITY},
    {"adaptive", DHSA_BUDGET_ADAPTIVE}, {NULL, 0}};
static const enum_name granularities[] = {
    {"layer", DHSA_GRAN_LAYER}, {"kv_head", DHSA_GRAN_KV_HEAD},
    {"query_head", DHSA_GRAN_QUERY_HEAD}, {NULL, 0}};
static const enum_name chunkings[] = {
    {"dynamic", DHSA_CHUNK_DYNAMIC}, {"fixed", DHSA_CHUNK_FIXED}, {NULL, 0}};
static const enum_name normalizations[] = {
    {"sqrt", DHSA_NORM_SQRT}, {"mean", DHSA_NORM_MEAN}, {"sum", DHSA_NORM_SUM}, {NULL, 0}};
static const enum_name chunk_scores[] = {
    {"mean", DHSA_SCORE_MEAN}, {"max", DHSA_SCORE_MAX}, {NULL, 0}};
static const enum_name decode_scores[] = {
    {"mean", DHSA_DECODE_MEAN}, {"bounds", DHSA_DECODE_BOUNDS},
    {"moments", DHSA_DECODE_MOMENTS}, {NULL, 0}};
static const enum_name methods[] = {
    {"dhsa", DHSA_METHOD_DHSA}, {"block_topk", DHSA_METHOD_BLOCK_TOPK}, {NULL, 0}};

static const struct { const char *field; const enum_name *names; } enum_fields[] = {
    {"budget_mode", budget_modes}, {"granularity", granularities}, {"chunking", chunkings},
    {"normalization", normalizations}, {"method", methods}, {"chunk_score", chunk_scores},
    {"decode_score", decode_scores}, {NULL, NULL}};

int dhsa_enum_value(const char *field, const char *name, int *value) {
    if (!field || !name || !value) return DHSA_EINVAL;
    for (int f = 0; enum_fields[f].field; f++) {
        if (strcmp(field, enum_fields[f].field) != 0) continue;
        for (const enum_name *e = enum_fields[f].names; e->name; e++)
            if (strcmp(name, e->name) == 0) {
                *value = e->value;
                return DHSA_OK;
            }
        return DHSA_EINVAL;
    }
    return DHSA_EINVAL;
}

/* ---- helpers ----------------------------------------------------------- */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void dhsa_prediction_free(dhsa_prediction *pred) {
    if (!pred) return;
    free(pred->bounds); free(pred->num_bounds); free(pred->offsets); free(pred->starts);
    free(pred->ends); free(pred->pairs_selected); free(pred->pairs_allowed);
    free(pred->chunk_scores);
    free(pred);
}

/* The options as the stages read them. Values past the sequence length mean
 * the same as the length itself; clamping keeps every position sum in the
 * core far from overflow. And the one place where a method fixes options:
 * block_topk is fixed chunks of chunk_size keys (unless the caller gives
 * bounds), mean-pooled. */
dhsa_predict_params dhsa_predict_resolved(const dhsa_predict_params *in, int64_t Lq, int64_t Lk) {
    dhsa_predict_params p = *in;
    if (p.method == DHSA_METHOD_BLOCK_TOPK) {
        p.chunking = DHSA_CHUNK_FIXED;
        p.normalization = DHSA_NORM_MEAN;
        p.chunk_score = DHSA_SCORE_MEAN;
    }
    p.block_size = DHSA_MIN(p.block_size, Lq);
    p.sink = DHSA_MIN(p.sink, Lk);
    p.local = DHSA_MIN(p.local, Lk);
    p.budget = DHSA_MIN(p.budget, Lk);
    p.min_budget = DHSA_MIN(p.min_budget, Lk);
    p.max_budget = DHSA_MIN(p.max_budget, Lk);
    p.chunk_size = DHSA_MIN(p.chunk_size, Lk);
    p.boundary_window = DHSA_MIN(p.boundary_window, Lk);
    p.min_chunk = DHSA_MIN(p.min_chunk, Lk);
    p.max_chunk = DHSA_MIN(p.max_chunk, Lk);
    p.nms_radius = DHSA_MIN(p.nms_radius, Lk);
    p.max_chunks = DHSA_MIN(p.max_chunks, Lk);
    p.dense_tail = DHSA_MIN(p.dense_tail, Lq);
    return p;
}

/* bounds (n, Lk + 1), num_bounds (n): a boundary every `size` keys */
static void fixed_bounds(int64_t *bounds, int64_t *num_bounds, int64_t n, int64_t Lk,
                         int64_t size) {
    for (int64_t g = 0; g < n; g++) {
        int64_t *row = bounds + g * (Lk + 1), nb = 0;
        for (int64_t t = 0; t < Lk; t += size) row[nb++] = t;
        row[nb++] = Lk;
        num_bounds[g] = nb;
    }
}

/* -1 when every row starts at 0, rises strictly and ends at Lk, else the
 * first bad row (module.c names it in the error). */
int64_t dhsa_predict_bad_bounds(const int64_t *bounds, const int64_t *num_bounds, int64_t n,
                                int64_t Lk) {
    for (int64_t g = 0; g < n; g++) {
        const int64_t nb = num_bounds[g];
        const int64_t *row = bounds + g * (Lk + 1);
        if (nb < 2 || nb > Lk + 1 || row[0] != 0 || row[nb - 1] != Lk) return g;
        for (int64_t i = 1; i < nb; i++)
            if (row[i] <= row[i - 1]) return g;
    }
    return -1;
}

/* The prediction on inputs already scanned; k is float32 (s->kv_f16 = 0). */
static int predict_scanned(dhsa_prediction **out, const float *q, const float *k,
                           const dhsa_attn_shape *s, const dhsa_predict_params *params,
                           const int64_t *given_bounds, const int64_t *given_nb, int flags,
                           int num_threads) {
    *out = NULL;
    const double t0 = now_seconds();
    const dhsa_predict_params p = dhsa_predict_resolved(params, s->Lq, s->Lk);
    /* the rest of the options are checked by the stages that read them */
    if (p.block_size < 1 || p.chunk_size < 1 || p.chunking < 0 || p.chunking > 1 ||
        p.granularity < 0 || p.granularity > 2)
        return DHSA_EINVAL;
    const int64_t CG = dhsa_rule_chunk_groups(s, p.granularity);
    const int64_t SG = dhsa_rule_select_groups(s, p.granularity);
    const int64_t NQB = dhsa_rule_num_blocks(s->Lq, p.block_size);
    const int64_t nrows = s->B * SG * NQB, nbr = s->B * CG;
    int64_t *counts = NULL;
    int st = DHSA_ENOMEM;
    dhsa_prediction *r = calloc(1, sizeof(*r));
    if (!r) return DHSA_ENOMEM;
    r->chunk_groups = CG;
    r->select_groups = SG;
    r->num_blocks = NQB;
    r->block_size = p.block_size;
    r->bounds = malloc((size_t)(nbr * (s->Lk + 1)) * sizeof(int64_t));
    r->num_bounds = malloc((size_t)nbr * sizeof(int64_t));
    r->offsets = malloc((size_t)(nrows + 1) * sizeof(int64_t));
    r->pairs_selected = malloc((size_t)(s->B * SG) * sizeof(int64_t));
    r->pairs_allowed = malloc((size_t)(s->B * SG) * sizeof(int64_t));
    counts = malloc((size_t)nrows * sizeof(int64_t));
    if (!r->bounds || !r->num_bounds || !r->offsets || !r->pairs_selected ||
        !r->pairs_allowed || !counts)
        goto fail;

    /* boundaries */
    if (given_bounds) {
        if (!given_nb) { st = DHSA_EINVAL; goto fail; }
        if (dhsa_predict_bad_bounds(given_bounds, given_nb, nbr, s->Lk) >= 0) {
            st = DHSA_EBOUNDS;
            goto fail;
        }
        memcpy(r->bounds, given_bounds, (size_t)(nbr * (s->Lk + 1)) * sizeof(int64_t));
        memcpy(r->num_bounds, given_nb, (size_t)nbr * sizeof(int64_t));
    } else if (p.chunking == DHSA_CHUNK_FIXED) {
        fixed_bounds(r->bounds, r->num_bounds, nbr, s->Lk, p.chunk_size);
    } else {
        st = dhsa_predict_boundaries(r->bounds, r->num_bounds, k, s, &p, num_threads);
        if (st != DHSA_OK) goto fail;
    }

    /* capacity: the offsets array holds it until the compaction */
    st = dhsa_predict_capacity(r->offsets, s, &p, r->bounds, r->num_bounds);
    if (st != DHSA_OK) goto fail;
    const int64_t total = r->offsets[nrows];
    st = DHSA_ENOMEM;
    r->starts = malloc((size_t)DHSA_MAX(total, 1) * sizeof(int32_t));
    r->ends = malloc((size_t)DHSA_MAX(total, 1) * sizeof(int32_t));
    if (!r->starts || !r->ends) goto fail;
    int64_t ncmax = 1;
    for (int64_t i = 0; i < nbr; i++) ncmax = DHSA_MAX(ncmax, r->num_bounds[i] - 1);
    r->score_stride = ncmax;
    if (flags & DHSA_PREDICT_SCORES) {
        r->chunk_scores = malloc((size_t)(nrows * ncmax) * sizeof(double));
        if (!r->chunk_scores) goto fail;
    }

    /* selection */
    st = dhsa_predict_select(r->starts, r->ends, counts, r->chunk_scores, ncmax, r->offsets, q,
                             k, s, &p, r->bounds, r->num_bounds, num_threads);
    if (st != DHSA_OK) goto fail;

    /* compaction into CSR, in place: block i moves from capacity[i] down to
     * offsets[i] <= capacity[i], so a forward memmove never overwrites a
     * block not yet moved */
    {
        int64_t src = r->offsets[0];
        for (int64_t i = 0; i < nrows; i++) {
            const int64_t next = r->offsets[i + 1], dst = r->offsets[i];
            memmove(r->starts + dst, r->starts + src, (size_t)counts[i] * sizeof(int32_t));
            memmove(r->ends + dst, r->ends + src, (size_t)counts[i] * sizeof(int32_t));
            r->offsets[i + 1] = dst + counts[i];
            src = next;
        }
        r->num_ranges = r->offsets[nrows];
        /* a shrinking realloc that fails leaves the larger block valid */
        int32_t *sh = realloc(r->starts, (size_t)DHSA_MAX(r->num_ranges, 1) * sizeof(int32_t));
        if (sh) r->starts = sh;
        sh = realloc(r->ends, (size_t)DHSA_MAX(r->num_ranges, 1) * sizeof(int32_t));
        if (sh) r->ends = sh;
    }

    /* pair counts of a selection the core made (no check needed) */
    {
        const dhsa_selection sel = {p.block_size, NQB, SG, r->offsets, r->starts, r->ends};
        dhsa_selection_count_pairs_checked(r->pairs_selected, r->pairs_allowed, &sel, s,
                                           num_threads);
    }
    free(counts);
    r->predict_seconds = now_seconds() - t0;
    *out = r;
    return DHSA_OK;
fail:
    free(counts);
    dhsa_prediction_free(r);
    return st;
}

/* max|q|, max|k|, max|v| (v may be NULL: 0), or DHSA_ENONFINITE */
static int scan_inputs(float max_abs[3], const float *q, const void *k, const void *v,
                       const dhsa_attn_shape *s, int T) {
    const int64_t nq = s->B * s->H * s->Lq * s->D, nk = s->B * s->Hkv * s->Lk * s->D;
    const void *kv[2] = {k, v};
    max_abs[0] = max_abs[1] = max_abs[2] = 0.0f;
    int st = dhsa_max_abs_threads(q, nq, &max_abs[0], T);
    for (int i = 0; i < 2 && st == DHSA_OK; i++) {
        if (!kv[i]) continue;
        st = s->kv_f16 ? dhsa_max_abs_f16_threads((const uint16_t *)kv[i], nk, &max_abs[1 + i], T)
                       : dhsa_max_abs_threads((const float *)kv[i], nk, &max_abs[1 + i], T);
    }
    return st;
}

int dhsa_check_inputs(const float *q, const void *k, const void *v, const dhsa_attn_shape *s,
                      int num_threads) {
    int st = dhsa_attn_shape_check(s);
    if (st != DHSA_OK) return st;
    if (!q || !k || num_threads < 1) return DHSA_EINVAL;
    float max_abs[3];
    return scan_inputs(max_abs, q, k, v, s, num_threads);
}

int dhsa_predict(dhsa_prediction **out, const float *q, const float *k,
                 const dhsa_attn_shape *s, const dhsa_predict_params *p,
                 const int64_t *bounds, const int64_t *num_bounds, int flags,
                 int num_threads) {
    if (!out) return DHSA_EINVAL;
    *out = NULL;
    const int st = dhsa_check_inputs(q, k, NULL, s, num_threads);
    if (st != DHSA_OK) return st;
    if (!p || s->kv_f16) return DHSA_EINVAL;
    return predict_scanned(out, q, k, s, p, bounds, num_bounds, flags, num_threads);
}

int dhsa_sparse_attention(float *out, dhsa_prediction **out_pred, const float *q,
                          const void *k, const void *v, const dhsa_attn_shape *s,
                          const dhsa_predict_params *p, const int64_t *bounds,
                          const int64_t *num_bounds, const dhsa_selection *sel, int flags,
                          int num_threads) {
    if (!out_pred) return DHSA_EINVAL;
    *out_pred = NULL;
    int st = dhsa_attn_shape_check(s);
    if (st != DHSA_OK) return st;
    if (!out || !q || !k || !v || (!p && !sel) || num_threads < 1) return DHSA_EINVAL;
    dhsa_prediction *pred = NULL;
    if (!p) {
        /* a caller's selection: the kernel checks it (the one check) and
         * scans q, k, v (the one scan); shape and pointers are valid here,
         * so its DHSA_EINVAL is about the selection */
        if (!(pred = calloc(1, sizeof(*pred)))) return DHSA_ENOMEM;
        const double t0 = now_seconds();
        st = dhsa_attention_sparse(out, q, k, v, s, sel, num_threads);
        pred->attention_seconds = now_seconds() - t0;
        if (st == DHSA_EINVAL) st = DHSA_ESELECTION;
        pred->block_size = sel->block_size;
        pred->num_blocks = sel->num_blocks;
        pred->select_groups = sel->num_groups;
        if (st == DHSA_OK && (flags & DHSA_PREDICT_COUNTS)) {
            const int64_t n = s->B * sel->num_groups;
            pred->pairs_selected = malloc((size_t)n * sizeof(int64_t));
            pred->pairs_allowed = malloc((size_t)n * sizeof(int64_t));
            if (!pred->pairs_selected || !pred->pairs_allowed) st = DHSA_ENOMEM;
            else dhsa_selection_count_pairs_checked(pred->pairs_selected, pred->pairs_allowed,
                                                    sel, s, num_threads);
        }
        if (st != DHSA_OK) { dhsa_prediction_free(pred); return st; }
        *out_pred = pred;
        return DHSA_OK;
    }

    /* predict, then attend: one scan of q, k, v for both stages */
    const double t0 = now_seconds();
    float max_abs[3];
    st = scan_inputs(max_abs, q, k, v, s, num_threads);
    if (st != DHSA_OK) return st;
    /* the prediction reads k as float32: a float16 k is widened once */
    dhsa_attn_shape ps = *s;
    ps.kv_f16 = 0;
    float *k32 = NULL;
    if (s->kv_f16) {
        const int64_t nk = s->B * s->Hkv * s->Lk * s->D;
        if (!(k32 = dhsa_alloc((size_t)nk * sizeof(float)))) return DHSA_ENOMEM;
        dhsa_half_to_float(k32, (const uint16_t *)k, nk);
    }
    st = predict_scanned(&pred, q, k32 ? k32 : (const float *)k, &ps, p, bounds, num_bounds,
                         flags, num_threads);
    free(k32);
    if (st != DHSA_OK) return st;
    const dhsa_selection own = {pred->block_size, pred->num_blocks, pred->select_groups,
                                pred->offsets, pred->starts, pred->ends};
    const double t1 = now_seconds();
    pred->predict_seconds = t1 - t0; /* the scan is timed with the prediction */
    st = dhsa_attention_sparse_scanned(out, q, k, v, s, &own, max_abs, num_threads);
    if (st != DHSA_OK) { dhsa_prediction_free(pred); return st; }
    pred->attention_seconds = now_seconds() - t1;
    *out_pred = pred;
    return DHSA_OK;
}
