/*
 * decode.c - a KV cache with an incremental chunk state, and sparse decoding
 * from it.
 *
 * Generation reads the whole KV cache once per new token; DHSA's chunks let
 * a decode step read a budget of it instead. The cache keeps, per chunking
 * group, what the prefill's chunking needs as keys arrive:
 *   - a ring of running key sums (row x = sum of keys [0, x)), the same rows
 *     dhsa_chunking_boundary_scores builds, so every score has the same bits;
 *   - the scores whose right window is complete (t + window <= length);
 *   - the scan (dhsa_chunking_take), run as far as its look-ahead allows
 *     (t + nms_radius scored): its boundaries are committed and never move;
 *   - a float32 representation of every closed chunk, made once when it
 *     closes, from the stored keys (O(D) per key in all), and the
 *     per-dimension statistics of its head-mean keys that decode_score
 *     reads: min and max ("bounds", Quest's page bounds: r_q . k <= sum_d
 *     max(r_q lo, r_q hi)), or mean and variance ("moments").
 * Nothing is re-scanned: an append costs O(new keys * heads * D) beyond the
 * copy. The keys after the last committed boundary (at most
 * max_chunk + boundary_window + nms_radius of them) form the open chunk,
 * which a decode step always keeps.
 *
 * A decode step is one block of the last nq queries: the sink, local and
 * budget rules of the prefill (rules.h), the open chunk kept, closed chunks
 * by their decode_score (the representation's, the bounds' or the moments')
 * through the prefill's budget rule (dhsa_cover_take), then the sparse kernel of attention.c on the stored
 * K/V (float16 stays float16), per (batch, KV head) with threads across
 * them.
 *
 * Must agree with dhsa/reference.py: cache_chunks, decode_select and
 * decode_attention (tests/test_decode.py).
 */
#include <math.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "internal.h"
#include "rules.h"

typedef struct {
    int64_t kh0, heads, W;  /* KV heads [kh0, kh0 + heads) concatenated, W = heads * D */
    double *ring;           /* (ring_rows, W) running sums, row x at x % ring_rows */
    double *score;          /* (score_cap) final scores [0, scored) */
    int64_t score_cap, scored;
    int64_t tnext;          /* next position the scan decides */
    int64_t *bounds;        /* (bounds_cap) committed: 0, ..., open chunk start */
    int64_t nb, bounds_cap;
    float *reps;            /* (bounds_cap - 1, D) closed chunk representations */
    float *st1, *st2;       /* (bounds_cap - 1, D) per-dimension statistics of their head-mean
                             * keys: min / max ("bounds"), mean / variance ("moments"); or
                             * NULL ("mean") */
} chunk_state;

/* chunk scores of one selection group, kept for later decode steps */
typedef struct {
    int64_t made_at;        /* cache length when scored; -1: none */
    int64_t nb, first;      /* the group's bound count then, first chunk scored */
    double scale;           /* the softmax scale they were made with ("moments" reads it) */
    int64_t cap;
    double *score;          /* (cap) r_q . r_c of chunks [first, nb - 1) */
} score_memo;

struct dhsa_kv_cache {
    int64_t B, Hkv, D, n, cap, CG, ring_rows;
    int kv_f16;
    size_t esz;
    char *k, *v;            /* (B, Hkv, cap, D) */
    dhsa_predict_params p;  /* resolved chunking options, threshold per row below */
    double *model;          /* (CG, bmodel_len) copy, or NULL */
    chunk_state *cs;        /* (B * CG) */
    float max_k, max_v;     /* max |k|, max |v| over the stored keys */
    score_memo *memo;       /* (memo_n) per (batch, selection group), or NULL */
    int64_t memo_n;
};

static void memo_drop(dhsa_kv_cache *c) {
    for (int64_t i = 0; i < c->memo_n; i++) free(c->memo[i].score);
    free(c->memo);
    c->memo = NULL;
    c->memo_n = 0;
}

/* a memo per (batch, selection group) with room for `room` scores; the
 * kept scores survive unless the group count changed */
static int memo_reserve(dhsa_kv_cache *c, int64_t groups, int64_t room) {
    if (c->memo_n != groups) {
        memo_drop(c);
        if (!(c->memo = calloc((size_t)groups, sizeof(score_memo)))) return DHSA_ENOMEM;
        c->memo_n = groups;
        for (int64_t i = 0; i < groups; i++) c->memo[i].made_at = -1;
    }
    for (int64_t i = 0; i < groups; i++) {
        score_memo *m = &c->memo[i];
        if (m->cap >= room) continue;
        const int64_t cap = DHSA_MAX(room, 2 * m->cap);
        double *sc = realloc(m->score, (size_t)cap * sizeof(double));
        if (!sc) return DHSA_ENOMEM;
        m->score = sc;
        m->cap = cap;
    }
    return DHSA_OK;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double key_norm(const dhsa_predict_params *p) {
    return p->normalization == DHSA_NORM_SQRT ? 0.5 : (p->normalization == DHSA_NORM_MEAN ? 1.0 : 0.0);
}

/* row x of group g's key x (its heads concatenated), widened to double */
static void key_row(const dhsa_kv_cache *c, int64_t b, const chunk_state *g, int64_t x,
                    double *dst) {
    for (int64_t h = 0; h < g->heads; h++) {
        const size_t off = (size_t)(((b * c->Hkv + g->kh0 + h) * c->cap + x) * c->D);
        if (c->kv_f16) {
            float tmp[256];
            dhsa_half_to_float(tmp, (const uint16_t *)c->k + off, c->D);
            for (int64_t d = 0; d < c->D; d++) dst[h * c->D + d] = (double)tmp[d];
        } else {
            const float *row = (const float *)c->k + off;
            for (int64_t d = 0; d < c->D; d++) dst[h * c->D + d] = (double)row[d];
        }
    }
}

static const double *model_of(const dhsa_kv_cache *c, int64_t cg) {
    return c->model ? c->model + cg * dhsa_bmodel_len(c->cs[0].W) : NULL;
}

static void state_free(chunk_state *g) {
    free(g->ring); free(g->score); free(g->bounds); free(g->reps); free(g->st1); free(g->st2);
    memset(g, 0, sizeof(*g));
}

/* an empty state of chunking group cg */
static int state_init(chunk_state *g, const dhsa_kv_cache *c, int64_t cg) {
    memset(g, 0, sizeof(*g));
    dhsa_attn_shape s = {1, c->Hkv, c->Hkv, 1, 1, c->D, 1.0f, 0.0f, 0, 1, 0};
    dhsa_rule_chunk_heads(&s, c->p.granularity, cg, &g->kh0, &g->heads);
    g->W = g->heads * c->D;
    g->ring = calloc((size_t)(c->ring_rows * g->W), sizeof(double));
    g->bounds_cap = 16;
    g->bounds = malloc((size_t)g->bounds_cap * sizeof(int64_t));
    g->reps = malloc((size_t)(g->bounds_cap * c->D) * sizeof(float));
    if (c->p.decode_score != DHSA_DECODE_MEAN) {
        g->st1 = malloc((size_t)(g->bounds_cap * c->D) * sizeof(float));
        g->st2 = malloc((size_t)(g->bounds_cap * c->D) * sizeof(float));
        if (!g->st1 || !g->st2) { state_free(g); return DHSA_ENOMEM; }
    }
    if (!g->ring || !g->bounds || !g->reps) { state_free(g); return DHSA_ENOMEM; }
    g->bounds[0] = 0;
    g->nb = 1;
    g->tnext = 1;
    return DHSA_OK;
}

/* room for `need` scores and `nb_need` bounds; on failure the state is intact */
static int state_reserve(chunk_state *g, int64_t D, int64_t need, int64_t nb_need) {
    if (need > g->score_cap) {
        const int64_t cap = DHSA_MAX(need, 2 * g->score_cap);
        double *s = realloc(g->score, (size_t)cap * sizeof(double));
        if (!s) return DHSA_ENOMEM;
        g->score = s;
        g->score_cap = cap;
    }
    if (nb_need > g->bounds_cap) {
        const int64_t cap = DHSA_MAX(nb_need, 2 * g->bounds_cap);
        int64_t *b = realloc(g->bounds, (size_t)cap * sizeof(int64_t));
        if (!b) return DHSA_ENOMEM;
        g->bounds = b;
        float *r = realloc(g->reps, (size_t)(cap * D) * sizeof(float));
        if (!r) return DHSA_ENOMEM;
        g->reps = r;
        if (g->st1) {
            float *a = realloc(g->st1, (size_t)(cap * D) * sizeof(float));
            if (!a) return DHSA_ENOMEM;
            g->st1 = a;
            float *b = realloc(g->st2, (size_t)(cap * D) * sizeof(float));
            if (!b) return DHSA_ENOMEM;
            g->st2 = b;
        }
        g->bounds_cap = cap;
    }
    return DHSA_OK;
}

/* Commit boundary t: chunk [last, t) closes and gets its representation,
 * the head mean of its keys summed in order, over n ** key_norm, and the
 * statistics of those head means its decode_score reads, rounded to
 * float32: min / max, or mean and variance (sum m^2 / n - mean^2, >= 0). */
static void commit(dhsa_kv_cache *c, int64_t b, chunk_state *g, int64_t t, double *tmp) {
    const int64_t a = g->bounds[g->nb - 1], D = c->D;
    const int score = c->p.decode_score;
    double *acc = tmp + g->W, *sq = acc + D;
    float *s1 = g->st1 ? g->st1 + (g->nb - 1) * D : NULL;
    float *s2 = g->st2 ? g->st2 + (g->nb - 1) * D : NULL;
    for (int64_t d = 0; d < D; d++) acc[d] = sq[d] = 0.0;
    for (int64_t x = a; x < t; x++) {
        key_row(c, b, g, x, tmp);
        for (int64_t d = 0; d < D; d++) {
            double m = 0.0;
            for (int64_t h = 0; h < g->heads; h++) m += tmp[h * D + d];
            m /= (double)g->heads;
            acc[d] += m;
            if (score == DHSA_DECODE_MOMENTS) sq[d] += m * m;
            if (score == DHSA_DECODE_BOUNDS) { /* rounding is monotonic: the float32 min is the min's rounding */
                const float f = (float)m;
                s1[d] = x == a ? f : DHSA_MIN(s1[d], f);
                s2[d] = x == a ? f : DHSA_MAX(s2[d], f);
            }
        }
    }
    if (score == DHSA_DECODE_MOMENTS)
        for (int64_t d = 0; d < D; d++) {
            const double mu = acc[d] / (double)(t - a);
            s1[d] = (float)mu;
            s2[d] = (float)DHSA_MAX(0.0, sq[d] / (double)(t - a) - mu * mu);
        }
    const double norm = dhsa_repr_norm(t - a, key_norm(&c->p));
    float *rep = g->reps + (g->nb - 1) * D;
    for (int64_t d = 0; d < D; d++) rep[d] = (float)(acc[d] / norm);
    g->bounds[g->nb++] = t;
}

#define RING(g, c, x) ((g)->ring + ((x) % (c)->ring_rows) * (g)->W)

/* Feed keys [from, to) of batch item b to group g (capacity reserved):
 * running sums, final scores, the scan as far as its look-ahead allows. */
static void state_feed(dhsa_kv_cache *c, int64_t b, int64_t cg, chunk_state *g, int64_t from,
                       int64_t to, double *tmp) {
    const dhsa_predict_params *p = &c->p;
    if (p->chunking == DHSA_CHUNK_FIXED) {
        for (int64_t x = from + 1; x <= to; x++)
            if (x % p->chunk_size == 0) commit(c, b, g, x, tmp);
        return;
    }
    const int64_t w = p->boundary_window, r = p->nms_radius, W = g->W;
    const double *model = model_of(c, cg);
    dhsa_predict_params scan = *p;
    if (model) scan.threshold = model[2 * W + DHSA_BMODEL_THRESHOLD];
    for (int64_t x = from; x < to; x++) {
        /* row x + 1 = row x + key x */
        key_row(c, b, g, x, tmp);
        const double *prev = RING(g, c, x);
        double *dst = RING(g, c, x + 1);
        for (int64_t i = 0; i < W; i++) dst[i] = prev[i] + tmp[i];
        /* position t = x + 1 - w now has its whole right window */
        const int64_t t = x + 1 - w;
        if (t == 0) { g->score[0] = 0.0; g->scored = 1; }
        if (t >= 1) {
            const int64_t wl = DHSA_MIN(w, t);
            g->score[t] = dhsa_chunking_score_at(RING(g, c, t - wl), RING(g, c, t),
                                                 RING(g, c, t + w), t, wl, w, W, model);
            g->scored = t + 1;
        }
        /* decide every position whose neighbourhood is scored */
        while (g->tnext + r < g->scored) {
            if (dhsa_chunking_take(g->score, g->tnext, g->bounds[g->nb - 1], g->scored, &scan))
                commit(c, b, g, g->tnext, tmp);
            g->tnext++;
        }
    }
}

void dhsa_kv_cache_free(dhsa_kv_cache *c) {
    if (!c) return;
    if (c->cs)
        for (int64_t i = 0; i < c->B * c->CG; i++) state_free(&c->cs[i]);
    free(c->cs); free(c->k); free(c->v); free(c->model);
    memo_drop(c);
    free(c);
}

int dhsa_kv_cache_create(dhsa_kv_cache **out, int64_t B, int64_t Hkv, int64_t D, int kv_f16,
                         const dhsa_predict_params *p) {
    if (!out) return DHSA_EINVAL;
    *out = NULL;
    if (!p || B < 1 || Hkv < 1 || D < 1 || D > 256 || B > INT32_MAX || Hkv > INT32_MAX)
        return DHSA_EINVAL;
    /* the resolved method, sizes unclamped (the cache has no length yet) */
    dhsa_predict_params rp = dhsa_predict_resolved(p, INT64_MAX, INT64_MAX);
    if (rp.granularity < 0 || rp.granularity > 2 || rp.chunking < 0 || rp.chunking > 1 ||
        rp.normalization < 0 || rp.normalization > 2 || rp.max_chunks != 0 ||
        rp.chunk_size < 1 || rp.boundary_window < 1 || rp.min_chunk < 1 ||
        rp.max_chunk < rp.min_chunk || rp.nms_radius < 0 || !isfinite(rp.threshold) ||
        rp.boundary_window > (1 << 20) || rp.nms_radius > (1 << 20) ||
        rp.decode_score < 0 || rp.decode_score > 2)
        return DHSA_EINVAL;
    if (rp.boundary_model && rp.chunking != DHSA_CHUNK_DYNAMIC) return DHSA_EINVAL;
    dhsa_kv_cache *c = calloc(1, sizeof(*c));
    if (!c) return DHSA_ENOMEM;
    c->B = B; c->Hkv = Hkv; c->D = D; c->kv_f16 = kv_f16 ? 1 : 0;
    c->esz = kv_f16 ? sizeof(uint16_t) : sizeof(float);
    c->p = rp;
    c->p.boundary_model = NULL;
    dhsa_attn_shape s = {B, Hkv, Hkv, 1, 1, D, 1.0f, 0.0f, 0, 1, 0};
    c->CG = dhsa_rule_chunk_groups(&s, rp.granularity);
    c->ring_rows = 2 * rp.boundary_window + 2;
    if (rp.boundary_model) {
        int64_t kh0, heads;
        dhsa_rule_chunk_heads(&s, rp.granularity, 0, &kh0, &heads);
        const int64_t len = c->CG * dhsa_bmodel_len(heads * D);
        if (!(c->model = malloc((size_t)len * sizeof(double)))) goto nomem;
        memcpy(c->model, rp.boundary_model, (size_t)len * sizeof(double));
        for (int64_t i = 0; i < len; i++)
            if (!isfinite(c->model[i])) { dhsa_kv_cache_free(c); return DHSA_ENONFINITE; }
    }
    if (!(c->cs = calloc((size_t)(B * c->CG), sizeof(chunk_state)))) goto nomem;
    for (int64_t i = 0; i < B * c->CG; i++)
        if (state_init(&c->cs[i], c, i % c->CG) != DHSA_OK) goto nomem;
    *out = c;
    return DHSA_OK;
nomem:
    dhsa_kv_cache_free(c);
    return DHSA_ENOMEM;
}

int64_t dhsa_kv_cache_length(const dhsa_kv_cache *c) { return c ? c->n : -1; }
int64_t dhsa_kv_cache_batch(const dhsa_kv_cache *c) { return c ? c->B : -1; }

void dhsa_kv_cache_bytes(const dhsa_kv_cache *c, int64_t *kv_bytes, int64_t *state_bytes) {
    int64_t st = 0;
    for (int64_t i = 0; c && i < c->B * c->CG; i++) {
        const chunk_state *g = &c->cs[i];
        st += c->ring_rows * g->W * 8 + g->score_cap * 8 + g->bounds_cap * (8 + c->D * 4)
              + (g->st1 ? 2 * g->bounds_cap * c->D * 4 : 0);
    }
    for (int64_t i = 0; c && i < c->memo_n; i++) st += c->memo[i].cap * 8;
    if (kv_bytes) *kv_bytes = c ? 2 * c->B * c->Hkv * c->cap * c->D * (int64_t)c->esz : 0;
    if (state_bytes) *state_bytes = st;
}

/* K/V storage for at least `need` positions (doubling); the old rows are
 * copied, and on failure nothing changes */
static int reserve_kv(dhsa_kv_cache *c, int64_t need) {
    if (need <= c->cap) return DHSA_OK;
    int64_t cap = DHSA_MAX(need, DHSA_MAX(2 * c->cap, 256));
    if (cap > INT32_MAX) cap = DHSA_MAX(need, (int64_t)INT32_MAX);
    if (need > INT32_MAX) return DHSA_EOVERFLOW;
    const size_t row = (size_t)c->D * c->esz, nh = (size_t)(c->B * c->Hkv);
    char *k = malloc(nh * (size_t)cap * row), *v = malloc(nh * (size_t)cap * row);
    if (!k || !v) { free(k); free(v); return DHSA_ENOMEM; }
    for (size_t h = 0; c->n > 0 && h < nh; h++) { /* an empty cache has no rows (nor buffers) */
        memcpy(k + h * (size_t)cap * row, c->k + h * (size_t)c->cap * row, (size_t)c->n * row);
        memcpy(v + h * (size_t)cap * row, c->v + h * (size_t)c->cap * row, (size_t)c->n * row);
    }
    free(c->k); free(c->v);
    c->k = k; c->v = v; c->cap = cap;
    return DHSA_OK;
}

/* the most chunks n keys can close, plus the leading 0 and the open chunk */
static int64_t most_bounds(const dhsa_kv_cache *c, int64_t n) {
    const int64_t shortest = c->p.chunking == DHSA_CHUNK_FIXED ? c->p.chunk_size : c->p.min_chunk;
    return n / DHSA_MAX(1, shortest) + 2;
}

/* every group's room for `total` keys: scores and bounds */
static int reserve_states(dhsa_kv_cache *c, int64_t total) {
    for (int64_t i = 0; i < c->B * c->CG; i++) {
        const int st = state_reserve(&c->cs[i], c->D, total + 1, most_bounds(c, total));
        if (st != DHSA_OK) return st;
    }
    return DHSA_OK;
}

/* feed stored keys [from, to) to every group, groups across threads */
static int feed_all(dhsa_kv_cache *c, int64_t from, int64_t to, int num_threads) {
    const int64_t ng = c->B * c->CG;
    int status = DHSA_OK;
#pragma omp parallel num_threads(dhsa_threads_for(num_threads, ng))
    {
        double *tmp = malloc((size_t)(c->Hkv * c->D + 2 * c->D) * sizeof(double));
        if (!tmp) {
#pragma omp atomic write
            status = DHSA_ENOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < ng; i++)
            if (tmp) state_feed(c, i / c->CG, i % c->CG, &c->cs[i], from, to, tmp);
        free(tmp);
    }
    return status;
}

int dhsa_kv_cache_append(dhsa_kv_cache *c, const void *k, const void *v, int64_t n,
                         int num_threads) {
    if (!c || !k || !v || n < 1 || num_threads < 1) return DHSA_EINVAL;
    if (n > INT32_MAX - c->n) return DHSA_EOVERFLOW;
    const int64_t count = c->B * c->Hkv * n * c->D;
    float mk = 0.0f, mv = 0.0f;
    int st = c->kv_f16 ? dhsa_max_abs_f16_threads(k, count, &mk, num_threads)
                       : dhsa_max_abs_threads(k, count, &mk, num_threads);
    if (st == DHSA_OK)
        st = c->kv_f16 ? dhsa_max_abs_f16_threads(v, count, &mv, num_threads)
                       : dhsa_max_abs_threads(v, count, &mv, num_threads);
    if (st != DHSA_OK) return st;
    /* all memory first: a failure leaves the cache as it was (buffers that
     * grew but hold nothing new change nothing) */
    if ((st = reserve_kv(c, c->n + n)) != DHSA_OK) return st;
    if ((st = reserve_states(c, c->n + n)) != DHSA_OK) return st;
    const size_t row = (size_t)c->D * c->esz;
    for (int64_t h = 0; h < c->B * c->Hkv; h++) {
        memcpy(c->k + ((size_t)(h * c->cap + c->n)) * row, (const char *)k + (size_t)(h * n) * row,
               (size_t)n * row);
        memcpy(c->v + ((size_t)(h * c->cap + c->n)) * row, (const char *)v + (size_t)(h * n) * row,
               (size_t)n * row);
    }
    c->max_k = DHSA_MAX(c->max_k, mk);
    c->max_v = DHSA_MAX(c->max_v, mv);
    const int64_t from = c->n;
    c->n += n;
    st = feed_all(c, from, c->n, num_threads);
    if (st != DHSA_OK) { /* only a scratch allocation fails there: rebuild */
        const int64_t keep = from;
        dhsa_kv_cache_crop(c, keep);
    }
    return st;
}

int dhsa_kv_cache_crop(dhsa_kv_cache *c, int64_t n) {
    if (!c || n < 0 || n > c->n) return DHSA_EINVAL;
    memo_drop(c); /* scores of keys that may be gone */
    for (int64_t i = 0; i < c->B * c->CG; i++) {
        chunk_state fresh;
        if (state_init(&fresh, c, i % c->CG) != DHSA_OK) return DHSA_ENOMEM;
        if (state_reserve(&fresh, c->D, n + 1, most_bounds(c, n)) != DHSA_OK) {
            state_free(&fresh);
            return DHSA_ENOMEM;
        }
        state_free(&c->cs[i]);
        c->cs[i] = fresh;
    }
    c->n = n;
    /* the range guard's maxima, of the kept keys only */
    float mk = 0.0f, mv = 0.0f;
    const size_t row = (size_t)c->D * c->esz;
    for (int64_t h = 0; h < c->B * c->Hkv && n > 0; h++) {
        float a = 0.0f, b = 0.0f;
        const char *kp = c->k + (size_t)(h * c->cap) * row, *vp = c->v + (size_t)(h * c->cap) * row;
        if (c->kv_f16) {
            dhsa_max_abs_f16_threads((const uint16_t *)kp, n * c->D, &a, 1);
            dhsa_max_abs_f16_threads((const uint16_t *)vp, n * c->D, &b, 1);
        } else {
            dhsa_max_abs_threads((const float *)kp, n * c->D, &a, 1);
            dhsa_max_abs_threads((const float *)vp, n * c->D, &b, 1);
        }
        mk = DHSA_MAX(mk, a);
        mv = DHSA_MAX(mv, b);
    }
    c->max_k = mk;
    c->max_v = mv;
    return n > 0 ? feed_all(c, 0, n, 1) : DHSA_OK;
}

/* a deep copy of a state */
static int state_copy(chunk_state *dst, const chunk_state *src, const dhsa_kv_cache *c) {
    *dst = *src;
    dst->ring = malloc((size_t)(c->ring_rows * src->W) * sizeof(double));
    dst->score = malloc((size_t)DHSA_MAX(src->score_cap, 1) * sizeof(double));
    dst->bounds = malloc((size_t)src->bounds_cap * sizeof(int64_t));
    dst->reps = malloc((size_t)(src->bounds_cap * c->D) * sizeof(float));
    dst->st1 = dst->st2 = NULL;
    if (src->st1) {
        dst->st1 = malloc((size_t)(src->bounds_cap * c->D) * sizeof(float));
        dst->st2 = malloc((size_t)(src->bounds_cap * c->D) * sizeof(float));
    }
    if (!dst->ring || !dst->score || !dst->bounds || !dst->reps || (src->st1 && (!dst->st1 || !dst->st2))) {
        state_free(dst);
        return DHSA_ENOMEM;
    }
    if (src->st1) {
        memcpy(dst->st1, src->st1, (size_t)(src->bounds_cap * c->D) * sizeof(float));
        memcpy(dst->st2, src->st2, (size_t)(src->bounds_cap * c->D) * sizeof(float));
    }
    memcpy(dst->ring, src->ring, (size_t)(c->ring_rows * src->W) * sizeof(double));
    if (src->score_cap) memcpy(dst->score, src->score, (size_t)src->score_cap * sizeof(double));
    memcpy(dst->bounds, src->bounds, (size_t)src->bounds_cap * sizeof(int64_t));
    memcpy(dst->reps, src->reps, (size_t)(src->bounds_cap * c->D) * sizeof(float));
    return DHSA_OK;
}

int dhsa_kv_cache_reorder(dhsa_kv_cache *c, const int64_t *index, int64_t B_new) {
    if (!c || !index || B_new < 1 || B_new > INT32_MAX) return DHSA_EINVAL;
    for (int64_t i = 0; i < B_new; i++)
        if (index[i] < 0 || index[i] >= c->B) return DHSA_EINVAL;
    const size_t head = (size_t)c->cap * c->D * c->esz, nh = (size_t)(B_new * c->Hkv);
    char *k = malloc(DHSA_MAX(nh * head, 1)), *v = malloc(DHSA_MAX(nh * head, 1));
    chunk_state *cs = calloc((size_t)(B_new * c->CG), sizeof(chunk_state));
    int st = (k && v && cs) ? DHSA_OK : DHSA_ENOMEM;
    for (int64_t i = 0; i < B_new * c->CG && st == DHSA_OK; i++)
        st = state_copy(&cs[i], &c->cs[index[i / c->CG] * c->CG + i % c->CG], c);
    if (st != DHSA_OK) {
        for (int64_t i = 0; cs && i < B_new * c->CG; i++) state_free(&cs[i]);
        free(cs); free(k); free(v);
        return st;
    }
    for (int64_t i = 0; c->cap > 0 && i < B_new; i++) {
        memcpy(k + (size_t)(i * c->Hkv) * head, c->k + (size_t)(index[i] * c->Hkv) * head,
               (size_t)c->Hkv * head);
        memcpy(v + (size_t)(i * c->Hkv) * head, c->v + (size_t)(index[i] * c->Hkv) * head,
               (size_t)c->Hkv * head);
    }
    for (int64_t i = 0; i < c->B * c->CG; i++) state_free(&c->cs[i]);
    free(c->cs); free(c->k); free(c->v);
    c->cs = cs; c->k = k; c->v = v; c->B = B_new;
    memo_drop(c); /* the batch items moved */
    return DHSA_OK;
}

int dhsa_kv_cache_chunks(const dhsa_kv_cache *c, int64_t g, const int64_t **bounds,
                         int64_t *num_bounds) {
    if (!c || !bounds || !num_bounds || g < 0 || g >= c->B * c->CG) return DHSA_EINVAL;
    *bounds = c->cs[g].bounds;
    *num_bounds = c->cs[g].nb;
    return DHSA_OK;
}

int dhsa_kv_cache_read(const dhsa_kv_cache *c, void *k, void *v, int64_t a, int64_t b) {
    if (!c || a < 0 || b < a || b > c->n) return DHSA_EINVAL;
    const size_t row = (size_t)c->D * c->esz;
    for (int64_t h = 0; b > a && h < c->B * c->Hkv; h++) {
        if (k) memcpy((char *)k + (size_t)(h * (b - a)) * row,
                      c->k + (size_t)(h * c->cap + a) * row, (size_t)(b - a) * row);
        if (v) memcpy((char *)v + (size_t)(h * (b - a)) * row,
                      c->v + (size_t)(h * c->cap + a) * row, (size_t)(b - a) * row);
    }
    return DHSA_OK;
}

int dhsa_kv_cache_prefill_bounds(const dhsa_kv_cache *c, int64_t *bounds, int64_t *num_bounds) {
    if (!c || !bounds || !num_bounds || c->n < 1) return DHSA_EINVAL;
    const int64_t L = c->n;
    double *score = malloc((size_t)L * sizeof(double));
    if (!score) return DHSA_ENOMEM;
    for (int64_t i = 0; i < c->B * c->CG; i++) {
        const chunk_state *g = &c->cs[i];
        int64_t *row = bounds + i * (L + 1), nb = g->nb;
        memcpy(row, g->bounds, (size_t)nb * sizeof(int64_t));
        if (c->p.chunking == DHSA_CHUNK_DYNAMIC) {
            /* the open chunk as the whole-sequence scan places it: the
             * scores past the last final one with their shortened windows */
            const int64_t cg = i % c->CG, w = DHSA_MIN(c->p.boundary_window, L);
            const double *model = model_of(c, cg);
            dhsa_predict_params scan = dhsa_predict_resolved(&c->p, 1, L);
            if (model) scan.threshold = model[2 * g->W + DHSA_BMODEL_THRESHOLD];
            memcpy(score, g->score, (size_t)g->scored * sizeof(double));
            if (g->scored == 0) score[0] = 0.0;
            for (int64_t t = DHSA_MAX(1, g->scored); t < L; t++) {
                const int64_t wl = DHSA_MIN(w, t), wr = DHSA_MIN(w, L - t);
                score[t] = dhsa_chunking_score_at(RING(g, c, t - wl), RING(g, c, t),
                                                  RING(g, c, t + wr), t, wl, wr, g->W, model);
            }
            for (int64_t t = g->tnext; t < L; t++)
                if (dhsa_chunking_take(score, t, row[nb - 1], L, &scan)) row[nb++] = t;
        }
        if (row[nb - 1] != L) row[nb++] = L;
        num_bounds[i] = nb;
    }
    free(score);
    return DHSA_OK;
}

/* ---- decode ---------------------------------------------------------------- */

/* r_q . rep, summed in the order every decode step uses */
static double rep_score(const double *rq, const float *rep, int64_t D) {
    double acc[4] = {0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 4 <= D; d += 4)
        for (int u = 0; u < 4; u++) acc[u] += rq[d + u] * (double)rep[d + u];
    for (; d < D; d++) acc[0] += rq[d] * (double)rep[d];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* sum_d max(r_q[d] lo[d], r_q[d] hi[d]), summed as rep_score sums */
static double bounds_score(const double *rq, const float *lo, const float *hi, int64_t D) {
    double acc[4] = {0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 4 <= D; d += 4)
        for (int u = 0; u < 4; u++)
            acc[u] += rq[d + u] * (double)(rq[d + u] >= 0.0 ? hi[d + u] : lo[d + u]);
    for (; d < D; d++) acc[0] += rq[d] * (double)(rq[d] >= 0.0 ? hi[d] : lo[d]);
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* scale r_q . mu + scale^2 / 2 sum_d r_q[d]^2 var[d], each sum as rep_score sums */
static double moments_score(const double *rq, const float *mu, const float *var, int64_t D,
                            double scale) {
    double a[4] = {0, 0, 0, 0}, v[4] = {0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 4 <= D; d += 4)
        for (int u = 0; u < 4; u++) {
            a[u] += rq[d + u] * (double)mu[d + u];
            v[u] += rq[d + u] * rq[d + u] * (double)var[d + u];
        }
    for (; d < D; d++) {
        a[0] += rq[d] * (double)mu[d];
        v[0] += rq[d] * rq[d] * (double)var[d];
    }
    return scale * ((a[0] + a[1]) + (a[2] + a[3])) +
           0.5 * scale * scale * ((v[0] + v[1]) + (v[2] + v[3]));
}

/* closed chunk ch of g scored for r_q, by the cache's decode_score */
static double chunk_score(const dhsa_kv_cache *c, const double *rq, const chunk_state *g,
                          int64_t ch, double scale) {
    const int64_t D = c->D;
    switch (c->p.decode_score) {
    case DHSA_DECODE_BOUNDS: return bounds_score(rq, g->st1 + ch * D, g->st2 + ch * D, D);
    case DHSA_DECODE_MOMENTS:
        return moments_score(rq, g->st1 + ch * D, g->st2 + ch * D, D, scale);
    default: return rep_score(rq, g->reps + ch * D, D);
    }
}

/* The selection of selection group sg of batch item b (see dhsa.h): merged
 * ranges into starts / ends (room for the closed chunks + 3), returns their
 * number. m: the group's kept scores (NULL: no reuse), used when reuse_at
 * (the oldest length whose scores may serve) allows, else rescored; *reused
 * says which. pieces / sel: scratch of (chunks + 3). */
static int64_t decode_select(int32_t *starts, int32_t *ends, const dhsa_kv_cache *c,
                             const dhsa_attn_shape *s, const dhsa_predict_params *p,
                             const float *q, int64_t b, int64_t sg, score_memo *m,
                             int64_t reuse_at, int *reused, double *rq, dhsa_piece *pieces,
                             dhsa_piece *sel) {
    *reused = 0;
    const dhsa_block_geom geo = dhsa_rule_rows(s, 0, s->Lq);
    const dhsa_block_keep keep = dhsa_rule_keep(s, &geo, p);
    if (keep.dense) {
        starts[0] = (int32_t)geo.lo;
        ends[0] = (int32_t)geo.hi;
        return 1;
    }
    const int64_t D = s->D;
    const chunk_state *g = &c->cs[b * c->CG + dhsa_rule_chunk_group_of(s, p->granularity, sg)];
    /* always kept: sink, local (with the block), the open chunk */
    const int64_t open_a = DHSA_MAX(g->bounds[g->nb - 1], keep.sink_end);
    const int64_t tail_a = DHSA_MIN(keep.loc_a, open_a);
    const int64_t forced = (keep.sink_end - geo.lo) + (geo.hi - tail_a);
    int64_t nsel = 0, tokens = forced;
    if (keep.sink_end > geo.lo) { sel[nsel].a = geo.lo; sel[nsel].b = keep.sink_end; nsel++; }
    sel[nsel].a = tail_a; sel[nsel].b = geo.hi; nsel++;
    if (keep.hi_clamp > forced && tail_a > keep.sink_end) {
        const int64_t first = dhsa_chunk_of(g->bounds, g->nb, keep.sink_end);
        /* kept scores serve while no chunk of the group closed; they cover
         * every closed chunk from `first`, local ones too, as local moves on */
        if (m && m->made_at >= reuse_at && m->nb == g->nb && m->first == first &&
            m->scale == (double)s->scale) {
            *reused = 1;
        } else {
            /* r_q: the group's head-averaged queries, block sum / sqrt(nq) */
            int64_t h0, nh;
            dhsa_rule_select_heads(s, p->granularity, sg, &h0, &nh);
            for (int64_t d = 0; d < D; d++) rq[d] = 0.0;
            for (int64_t i = 0; i < s->Lq; i++)
                for (int64_t d = 0; d < D; d++) {
                    double x = 0.0;
                    for (int64_t h = h0; h < h0 + nh; h++)
                        x += (double)q[((b * s->H + h) * s->Lq + i) * D + d];
                    rq[d] += x / (double)nh;
                }
            const double inv = 1.0 / sqrt((double)s->Lq);
            for (int64_t d = 0; d < D; d++) rq[d] *= inv;
            if (m) {
                for (int64_t ch = first; ch < g->nb - 1; ch++)
                    m->score[ch - first] = chunk_score(c, rq, g, ch, (double)s->scale);
                m->made_at = c->n;
                m->scale = (double)s->scale;
                m->nb = g->nb;
                m->first = first;
            }
        }
        dhsa_cover_heap cov = {pieces, 0, 0, keep.hi_clamp - forced};
        for (int64_t ch = first; ch < g->nb - 1 && g->bounds[ch] < tail_a; ch++) {
            dhsa_piece pc;
            pc.a = DHSA_MAX(keep.sink_end, g->bounds[ch]);
            pc.b = DHSA_MIN(tail_a, g->bounds[ch + 1]);
            pc.score = m ? m->score[ch - first] : chunk_score(c, rq, g, ch, (double)s->scale);
            pc.logm = 0.0;
            dhsa_cover_offer(&cov, &pc);
        }
        nsel = dhsa_cover_take(&cov, sel, nsel, &tokens, keep.hi_clamp);
    }
    return dhsa_pieces_merge(starts, ends, sel, nsel);
}

int dhsa_decode_attention(float *out, dhsa_prediction **out_pred, const float *q,
                          dhsa_kv_cache *c, int64_t H, int64_t nq, float scale,
                          float softcap, int64_t window, int64_t budget, int64_t sink,
                          int64_t local, int64_t reuse, int num_threads) {
    if (out_pred) *out_pred = NULL;
    if (!out || !q || !c || num_threads < 1 || budget < 0 || sink < 0 || local < 0 || reuse < 1)
        return DHSA_EINVAL;
    if (c->n < 1 || nq < 1 || nq > c->n || H < 1 || H % c->Hkv != 0) return DHSA_EINVAL;
    const double t0 = now_seconds();
    dhsa_attn_shape s = {c->B, H, c->Hkv, nq, c->n, c->D, scale, softcap,
                         DHSA_MIN(window, c->n), 1, c->kv_f16};
    int st = dhsa_attn_shape_check(&s);
    if (st != DHSA_OK) return st;
    float max_abs[3] = {0.0f, c->max_k, c->max_v};
    if ((st = dhsa_max_abs_threads(q, c->B * H * nq * c->D, &max_abs[0], num_threads)) != DHSA_OK)
        return st;
    /* the budget rule of rules.h with a token budget (0: all keys) */
    dhsa_predict_params p = c->p;
    p.budget_mode = DHSA_BUDGET_TOKENS;
    p.budget = budget > 0 ? DHSA_MIN(budget, c->n) : c->n;
    p.sink = DHSA_MIN(sink, c->n);
    p.local = DHSA_MIN(local, c->n);
    p.dense_tail = 0;
    p.block_size = nq;
    const int64_t SG = dhsa_rule_select_groups(&s, p.granularity);
    const int64_t G = dhsa_rule_gqa(&s), nsel_groups = c->B * SG;
    int64_t room = 0;
    for (int64_t i = 0; i < c->B * c->CG; i++) room = DHSA_MAX(room, c->cs[i].nb + 3);
    int64_t *offsets = malloc((size_t)(nsel_groups + 1) * sizeof(int64_t));
    int64_t *counts = malloc((size_t)nsel_groups * sizeof(int64_t));
    int32_t *starts = malloc((size_t)(nsel_groups * room) * sizeof(int32_t));
    int32_t *ends = malloc((size_t)(nsel_groups * room) * sizeof(int32_t));
    int *reused = calloc((size_t)nsel_groups, sizeof(int));
    if (!offsets || !counts || !starts || !ends || !reused) { st = DHSA_ENOMEM; goto done; }
    /* kept scores: made by any call, served to single-query steps within
     * reuse positions of it */
    if (reuse > 1 && (st = memo_reserve(c, nsel_groups, room)) != DHSA_OK) goto done;
    if (reuse == 1 && c->memo) memo_drop(c);
    const int64_t reuse_at = nq == 1 ? c->n - reuse + 1 : INT64_MAX;

    /* selections, one per (batch, selection group) */
#pragma omp parallel num_threads(dhsa_threads_for(num_threads, nsel_groups))
    {
        double *rq = malloc((size_t)c->D * sizeof(double));
        dhsa_piece *pieces = malloc((size_t)room * sizeof(dhsa_piece));
        dhsa_piece *sel = malloc((size_t)room * sizeof(dhsa_piece));
        const int ok = rq && pieces && sel;
        if (!ok) {
#pragma omp atomic write
            st = DHSA_ENOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nsel_groups; i++)
            if (ok) counts[i] = decode_select(starts + i * room, ends + i * room, c, &s, &p, q,
                                              i / SG, i % SG, c->memo ? &c->memo[i] : NULL,
                                              reuse_at, &reused[i], rq, pieces, sel);
        free(rq); free(pieces); free(sel);
    }
    if (st != DHSA_OK) goto done;
    /* compaction into CSR */
    offsets[0] = 0;
    for (int64_t i = 0; i < nsel_groups; i++) {
        memmove(starts + offsets[i], starts + i * room, (size_t)counts[i] * sizeof(int32_t));
        memmove(ends + offsets[i], ends + i * room, (size_t)counts[i] * sizeof(int32_t));
        offsets[i + 1] = offsets[i] + counts[i];
    }
    const double t1 = now_seconds();

    /* attention per (batch, KV head) on the stored rows: one item of G query
     * heads over one head's (cap, D) keys, whose row stride is D whatever
     * the capacity; threads across the items. With fewer items than threads
     * (one KV head: Gemma-3) an item's heads are split in parts, each part
     * reading the same keys on its own thread. */
    {
        const int64_t items = c->B * c->Hkv;
        const int64_t parts = items < num_threads
                                  ? DHSA_MIN(G, (num_threads + items - 1) / items) : 1;
        const int64_t gh = (G + parts - 1) / parts; /* heads per part */
        const int64_t nparts = (G + gh - 1) / gh;
#pragma omp parallel for schedule(dynamic, 1) num_threads(dhsa_threads_for(num_threads, items * nparts))
        for (int64_t it = 0; it < items * nparts; it++) {
            const int64_t b = it / nparts / c->Hkv, kvh = (it / nparts) % c->Hkv;
            const int64_t h0 = kvh * G + (it % nparts) * gh, nh = DHSA_MIN(gh, (kvh + 1) * G - h0);
            dhsa_attn_shape sub = s;
            sub.B = 1; sub.H = nh; sub.Hkv = 1;
            /* the part's selection groups: one (layer, kv_head) or its nh heads */
            const int64_t sub_groups = SG == H ? nh : 1;
            const int64_t sg0 = SG == 1 ? 0 : (SG == c->Hkv ? kvh : h0);
            int64_t one[2], *offs = sub_groups == 1 ? one : malloc((size_t)(sub_groups + 1) * sizeof(int64_t));
            if (!offs) {
#pragma omp atomic write
                st = DHSA_ENOMEM;
                continue;
            }
            const int64_t base = offsets[b * SG + sg0];
            for (int64_t x = 0; x <= sub_groups; x++) offs[x] = offsets[b * SG + sg0 + x] - base;
            const dhsa_selection sl = {nq, 1, sub_groups, offs, starts + base, ends + base};
            const size_t hoff = (size_t)((b * c->Hkv + kvh) * c->cap * c->D) * c->esz;
            const int r = dhsa_attention_sparse_scanned(
                out + (b * H + h0) * nq * c->D, q + (b * H + h0) * nq * c->D,
                c->k + hoff, c->v + hoff, &sub, &sl, max_abs, 1);
            if (offs != one) free(offs);
            if (r != DHSA_OK) {
#pragma omp atomic write
                st = r;
            }
        }
    }
    if (st != DHSA_OK) goto done;

    if (out_pred) {
        dhsa_prediction *r = calloc(1, sizeof(*r));
        if (!r) { st = DHSA_ENOMEM; goto done; }
        r->chunk_groups = c->CG;
        r->select_groups = SG;
        r->num_blocks = 1;
        r->block_size = nq;
        r->offsets = offsets; offsets = NULL;
        r->starts = starts; starts = NULL;
        r->ends = ends; ends = NULL;
        r->num_ranges = r->offsets[nsel_groups];
        const int64_t nbr = c->B * c->CG;
        r->bounds = malloc((size_t)(nbr * (c->n + 1)) * sizeof(int64_t));
        r->num_bounds = malloc((size_t)nbr * sizeof(int64_t));
        r->pairs_selected = malloc((size_t)nsel_groups * sizeof(int64_t));
        r->pairs_allowed = malloc((size_t)nsel_groups * sizeof(int64_t));
        if (!r->bounds || !r->num_bounds || !r->pairs_selected || !r->pairs_allowed) {
            dhsa_prediction_free(r);
            st = DHSA_ENOMEM;
            goto done;
        }
        for (int64_t i = 0; i < nbr; i++) {
            const chunk_state *g = &c->cs[i];
            int64_t *row = r->bounds + i * (c->n + 1);
            memcpy(row, g->bounds, (size_t)g->nb * sizeof(int64_t));
            r->num_bounds[i] = g->nb;
            if (g->bounds[g->nb - 1] != c->n) row[r->num_bounds[i]++] = c->n;
        }
        const dhsa_selection sl = {nq, 1, SG, r->offsets, r->starts, r->ends};
        dhsa_selection_count_pairs_checked(r->pairs_selected, r->pairs_allowed, &sl, &s, 1);
        for (int64_t i = 0; i < nsel_groups; i++) r->reused_groups += reused[i];
        r->predict_seconds = t1 - t0;
        r->attention_seconds = now_seconds() - t1;
        *out_pred = r;
    }
done:
    free(offsets); free(counts); free(starts); free(ends); free(reused);
    return st;
}
