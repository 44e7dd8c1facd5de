/*
 * attention.c - dense and sparse attention with an online softmax.
 *
 * Both kernels share one tile engine: a work item is a group of query heads
 * that read the same KV head (and, for sparse, the same selection), times a
 * tile of consecutive queries. The item's queries are gathered (pre-scaled)
 * into one row block so that a GQA group shares every K/V tile it loads;
 * key tiles of at most tile_k keys are walked over the item's key ranges,
 * S = Q K^T and O += P V go through the register-blocked tile kernels of
 * tiles.c (AVX-512F / AVX2; OpenBLAS sgemm when head_dim is not a multiple
 * of 8 or when forced, the scalar twins on request: dhsa_tile_path), the
 * row steps of the softmax through simd.c (vector kernels with scalar
 * twins), and the softmax is kept online (running max m, running sum l) so
 * nothing larger than a tile is ever materialised. Items are handed out
 * longest-first with dynamic scheduling because causal tiles differ in cost.
 * Items of at most 8 rows (a decode step: one query per head of a GQA
 * group) read K / V in place through the row kernels instead of gathering
 * and transposing them, and their keys are split into parts merged at the
 * end, so that one KV head still keeps every thread busy.
 * Visibility, query-block geometry, the query-head -> KV-head / selection
 * group mapping and the normalisation of a row come from rules.h.
 *
 * Must agree with dhsa/reference.py: dense_attention (dhsa_attention_dense)
 * and attention_with_selection (dhsa_attention_sparse), to float32 rounding.
 */
#include <math.h>
#include <string.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "internal.h"
#include "rules.h"

/* Tile plan. The S tile (rows x tile_k floats) and the K/V tiles should sit
 * in L2 together: with >= 1.5 MiB of L2 per core (Sapphire Rapids: 2 MiB)
 * rows 512 x keys 512 (1 MiB) measured fastest, with 512 KiB (Zen 3) rows
 * 256 x keys 256. Overridable at build time for tuning. */
typedef struct {
    int64_t tile_k;    /* keys per S tile */
    int64_t tile_q;    /* queries per dense work item */
    int64_t rows;      /* target rows (heads x queries) per work item */
} tile_plan;

static tile_plan plan_tiles(void) {
    tile_plan p = {256, 64, 256};
    long l2 = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (l2 >= 1536L * 1024L) { p.tile_k = 512; p.tile_q = 128; p.rows = 512; }
#ifdef TILE_K
    p.tile_k = TILE_K;
#endif
#ifdef TILE_Q_DENSE
    p.tile_q = TILE_Q_DENSE;
#endif
#ifdef TILE_ROWS
    p.rows = TILE_ROWS;
#endif
    /* the QK tile kernel writes whole 32-key blocks of the S tile */
    p.tile_k = DHSA_ROUND_UP(p.tile_k, DHSA_TILE_KEYS);
    return p;
}

typedef struct {
    int64_t rows_cap, D, tile_k;
    float *qt;   /* (rows_cap, D)      scaled queries */
    float *s;    /* (rows_cap, tile_k) logits, then probabilities */
    float *o;    /* (rows_cap, D)     unnormalised output */
    float *m;    /* (rows_cap)        running max */
    float *l;    /* (rows_cap)        running sum */
    float *kg, *vg;  /* (gather_cap, D) gathered keys / values (sparse) */
    float *kt, *vt;  /* (tile_k, D) a widened float16 K / V tile */
    float *ktr;      /* (D, tile_k) the K tile transposed (tile kernels) */
    int32_t *kpos;   /* (gather_cap)    their positions */
} tile_scratch;

static int scratch_init(tile_scratch *w, int64_t rows_cap, int64_t D, int64_t tile_k,
                        int64_t gather_cap, int half) {
    /* the tile kernels work on whole 8-row blocks: room for the padding rows */
    rows_cap = DHSA_ROUND_UP(rows_cap, DHSA_TILE_ROWS);
    w->rows_cap = rows_cap;
    w->D = D;
    w->tile_k = tile_k;
    w->qt = dhsa_alloc((size_t)(rows_cap * D) * sizeof(float));
    w->s = dhsa_alloc((size_t)(rows_cap * tile_k) * sizeof(float));
    w->o = dhsa_alloc((size_t)(rows_cap * D) * sizeof(float));
    w->m = dhsa_alloc((size_t)rows_cap * sizeof(float));
    w->l = dhsa_alloc((size_t)rows_cap * sizeof(float));
    w->kg = w->vg = w->kt = w->vt = NULL;
    w->kpos = NULL;
    w->ktr = dhsa_alloc((size_t)(D * tile_k) * sizeof(float));
    if (!w->ktr) return DHSA_ENOMEM;
    if (half) {
        w->kt = dhsa_alloc((size_t)(tile_k * D) * sizeof(float));
        w->vt = dhsa_alloc((size_t)(tile_k * D) * sizeof(float));
        if (!w->kt || !w->vt) return DHSA_ENOMEM;
    }
    if (gather_cap > 0) {
        w->kg = dhsa_alloc((size_t)(gather_cap * D) * sizeof(float));
        w->vg = dhsa_alloc((size_t)(gather_cap * D) * sizeof(float));
        w->kpos = dhsa_alloc((size_t)gather_cap * sizeof(int32_t));
        if (!w->kg || !w->vg || !w->kpos) return DHSA_ENOMEM;
    }
    return (w->qt && w->s && w->o && w->m && w->l) ? DHSA_OK : DHSA_ENOMEM;
}

static void scratch_free(tile_scratch *w) {
    free(w->qt); free(w->s); free(w->o); free(w->m); free(w->l);
    free(w->kg); free(w->vg); free(w->kpos); free(w->kt); free(w->vt); free(w->ktr);
}

int dhsa_attn_shape_check(const dhsa_attn_shape *s) {
    if (!s) return DHSA_EINVAL;
    if (s->B <= 0 || s->H <= 0 || s->Hkv <= 0 || s->Lq <= 0 || s->Lk <= 0) return DHSA_EINVAL;
    if (s->D <= 0 || s->D > 256) return DHSA_EINVAL;
    if (s->H % s->Hkv != 0 || s->Lq > s->Lk) return DHSA_EINVAL;
    if (!(s->scale > 0.0f) || !isfinite(s->scale)) return DHSA_EINVAL;
    if (!(s->softcap >= 0.0f) || !isfinite(s->softcap)) return DHSA_EINVAL;
    if (s->window < 0) return DHSA_EINVAL;
    if (s->kv_f16 != 0 && s->kv_f16 != 1) return DHSA_EINVAL;
    if (s->Lk > INT32_MAX) return DHSA_EOVERFLOW;
    /* element counts must fit int64 (and BLAS ints per tile, which they do) */
    if (s->B > INT64_MAX / s->H || s->B * s->H > INT64_MAX / s->Lk ||
        s->B * s->H * s->Lk > INT64_MAX / s->D) return DHSA_EOVERFLOW;
    return DHSA_OK;
}

/* The keys one work item attends to: row i of k / v is the key at position
 * pos[i] (pos == NULL: at position first + i). Positions rise with i. */
typedef struct {
    const void *k, *v;     /* rows of D floats, or of D halves when half */
    const int32_t *pos;
    int64_t first, n;
    int half;              /* 1: float16 rows, converted tile by tile */
} key_list;

static inline int64_t key_pos(const key_list *kl, int64_t i) {
    return kl->pos ? (int64_t)kl->pos[i] : kl->first + i;
}

/* first index in [a, b) whose position is >= x (b if none) */
static int64_t key_lower_bound(const key_list *kl, int64_t a, int64_t b, int64_t x) {
    if (!kl->pos) return DHSA_MIN(b, DHSA_MAX(a, x - kl->first));
    while (a < b) {
        const int64_t mid = a + (b - a) / 2;
        if (kl->pos[mid] < x) a = mid + 1; else b = mid;
    }
    return a;
}

/* Range guard. Every float32 intermediate must stay finite for finite
 * inputs: |S| and every partial sum of q.k are at most
 * scale * D * max|q| * max|k| (refused above 2**126, so S - m stays finite
 * too); the weights p are at most 1, so l <= Lk and |O| <= l * max|v|. A v
 * too large for that is handled by multiplying p (and so l) by 2**-e: O and l
 * scale alike and O / l is unchanged. Scale above 1 goes into the alpha of
 * the S product (tile kernel or sgemm) instead of into q, so q * scale
 * cannot overflow on its own. */
typedef struct {
    float q_scale;   /* multiplies q when it is gathered */
    float s_alpha;   /* alpha of S = Q K^T (tile kernel or sgemm) */
    float p_factor;  /* 2**-e multiplying every softmax weight (1: none) */
    int tile_path;   /* dhsa_tile_path(D) for this call */
} attn_ranges;

static int attn_ranges_from(attn_ranges *r, const dhsa_attn_shape *s, const float max_abs[3]);

static int attn_ranges_check(attn_ranges *r, const float *q, const void *k, const void *v,
                             const dhsa_attn_shape *s, int T) {
    const int64_t nq = s->B * s->H * s->Lq * s->D, nk = s->B * s->Hkv * s->Lk * s->D;
    float mq = 0.0f, mk = 0.0f, mv = 0.0f;
    int st = dhsa_max_abs_threads(q, nq, &mq, T);
    if (st == DHSA_OK)
        st = s->kv_f16 ? dhsa_max_abs_f16_threads((const uint16_t *)k, nk, &mk, T)
                       : dhsa_max_abs_threads((const float *)k, nk, &mk, T);
    if (st == DHSA_OK)
        st = s->kv_f16 ? dhsa_max_abs_f16_threads((const uint16_t *)v, nk, &mv, T)
                       : dhsa_max_abs_threads((const float *)v, nk, &mv, T);
    if (st != DHSA_OK) return st;
    const float max_abs[3] = {mq, mk, mv};
    return attn_ranges_from(r, s, max_abs);
}

/* The guard from max|q|, max|k|, max|v| (dhsa_sparse_attention scans once
 * for the prediction and the kernel). */
static int attn_ranges_from(attn_ranges *r, const dhsa_attn_shape *s, const float max_abs[3]) {
    const float mq = max_abs[0], mk = max_abs[1], mv = max_abs[2];
    const double limit = ldexp(1.0, 126);
    if ((double)s->scale * (double)s->D * (double)mq * (double)mk > limit) return DHSA_ERANGE;
    r->q_scale = s->scale <= 1.0f ? s->scale : 1.0f;
    r->s_alpha = s->scale <= 1.0f ? 1.0f : s->scale;
    r->p_factor = 1.0f;
    r->tile_path = dhsa_tile_path(s->D);
    const double o_bound = (double)s->Lk * (double)mv;
    if (o_bound > limit) r->p_factor = (float)ldexp(1.0, -(int)ceil(log2(o_bound / limit)));
    return DHSA_OK;
}

/* Online-softmax pass of R rows (pre-scaled queries in w->qt; row r is
 * query g->i0 + r % g->nq, at position g->spos + r % g->nq) over a key list,
 * in tiles of w->tile_k keys: S = Q K^T and O += P V by the tile kernels (or
 * sgemm), or with `rows` by the row kernels on K / V where they lie. */
static void attend_keys(tile_scratch *w, const dhsa_attn_shape *s, const attn_ranges *rg,
                        int64_t R, const dhsa_block_geom *g, const key_list *kl, int rows) {
    const int64_t D = s->D, TK = w->tile_k, nq = g->nq;
    const int use_blas = rg->tile_path == DHSA_TILE_BLAS;
    const int64_t R_pad = DHSA_ROUND_UP(R, DHSA_TILE_ROWS);
    const size_t esz = kl->half ? sizeof(uint16_t) : sizeof(float);
    for (int64_t t0 = 0; t0 < kl->n; t0 += TK) {
        const int64_t t1 = DHSA_MIN(kl->n, t0 + TK), nk = t1 - t0;
        /* mask only tiles holding a key some row cannot see (crossing the
         * diagonal or a window edge) */
        const int need_mask = key_pos(kl, t0) < g->all_lo || key_pos(kl, t1 - 1) >= g->all_hi;
        /* float16 storage: V widened once per tile and reused by every row; K
         * widened too for sgemm, else inside the transpose */
        const void *ktile = (const char *)kl->k + (size_t)(t0 * D) * esz;
        const float *vt = (const float *)kl->v + t0 * D;
        if (kl->half) {
            dhsa_half_to_float(w->vt, (const uint16_t *)kl->v + t0 * D, nk * D);
            vt = w->vt;
        }
        if (rows) { /* K rows in place (float16: widened into kt first) */
            const float *kr = (const float *)ktile;
            if (kl->half) {
                dhsa_half_to_float(w->kt, (const uint16_t *)ktile, nk * D);
                kr = w->kt;
            }
            dhsa_rows_qk(rg->tile_path, w->s, TK, w->qt, kr, R, nk, D, rg->s_alpha);
        } else if (use_blas) {
            const float *kt = (const float *)ktile;
            if (kl->half) {
                dhsa_half_to_float(w->kt, (const uint16_t *)ktile, nk * D);
                kt = w->kt;
            }
            dhsa_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)R, (int)nk, (int)D,
                       rg->s_alpha, w->qt, (int)D, kt, (int)D, 0.0f, w->s, (int)TK);
        } else { /* padded to whole blocks: zero q rows, zero kt columns */
            const int64_t nk_pad = DHSA_ROUND_UP(nk, DHSA_TILE_KEYS);
            dhsa_tile_transpose(w->ktr, TK, ktile, kl->half, nk, nk_pad, D);
            dhsa_tile_qk(rg->tile_path, w->s, TK, w->qt, w->ktr, TK, R_pad, nk_pad, D,
                         rg->s_alpha);
        }
        for (int64_t r = 0; r < R; r++) {
            float *srow = w->s + r * TK;
            int64_t ja = 0, jb = nk; /* visible columns of this row */
            if (s->softcap > 0.0f) dhsa_row_softcap(srow, nk, s->softcap);
            if (need_mask) {
                int64_t lo, hi;
                dhsa_rule_visible(s, g->spos + r % nq, &lo, &hi);
                ja = key_lower_bound(kl, t0, t1, lo) - t0;
                jb = key_lower_bound(kl, t0, t1, hi) - t0;
                if (ja >= jb) { memset(srow, 0, (size_t)nk * sizeof(float)); continue; }
                for (int64_t j = 0; j < ja; j++) srow[j] = -INFINITY;
                for (int64_t j = jb; j < nk; j++) srow[j] = -INFINITY;
            }
            const float rmax = dhsa_row_max(srow + ja, jb - ja);
            const float m_new = rmax > w->m[r] ? rmax : w->m[r];
            float sum = dhsa_row_exp_sum(srow, nk, m_new);
            if (rg->p_factor != 1.0f) { /* huge v only: see attn_ranges */
                dhsa_row_scale(srow, nk, rg->p_factor);
                sum *= rg->p_factor;
            }
            const float alpha = expf(w->m[r] - m_new); /* 0 on the first tile */
            if (alpha != 1.0f) dhsa_row_scale(w->o + r * D, D, alpha);
            w->l[r] = w->l[r] * alpha + sum;
            w->m[r] = m_new;
        }
        if (rows) /* padding rows of S were zeroed by attend_item */
            dhsa_rows_pv(rg->tile_path, w->o, w->s, TK, vt, R, nk, D);
        else if (use_blas)
            dhsa_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)R, (int)D, (int)nk, 1.0f,
                       w->s, (int)TK, vt, (int)D, 1.0f, w->o, (int)D);
        else /* padding rows of S hold zero logits, never exponentiated: O += 0 there */
            dhsa_tile_pv(rg->tile_path, w->o, w->s, TK, vt, R_pad, nk, D);
    }
}

/* Split keys. An item of few rows over many keys (a decode step; one KV
 * head, as Gemma-3 has, is one item) would keep one thread busy and the
 * others idle: its visible keys are cut into parts of about SPLIT_KEYS,
 * each part's online-softmax state (m, l, unnormalised o) is made on its
 * own and the parts are merged in order. The number of parts depends on
 * the keys only, never on the threads, so 1 and N threads give the same
 * bits. */
#define SPLIT_KEYS 1024
#define SPLIT_MAX 8

typedef struct {
    int64_t from, to;  /* keys [from, to) of the item's visible keys */
    float *m, *l, *o;  /* (R), (R), (R, D) */
} key_part;

static int64_t split_parts(int64_t keys) {
    return DHSA_MAX(1, DHSA_MIN(SPLIT_MAX, keys / SPLIT_KEYS));
}

/* out rows of one item (heads [h0, h0+nh) x queries [i0, i0+nq)) from its
 * parts' states: m = max m_p, l = sum l_p e^(m_p - m), o likewise */
static void merge_parts(float *out, const dhsa_attn_shape *s, const key_part *parts,
                        int64_t np, int64_t b, int64_t h0, int64_t nh, int64_t i0, int64_t nq) {
    const int64_t D = s->D;
    for (int64_t hh = 0; hh < nh; hh++)
        for (int64_t i = 0; i < nq; i++) {
            const int64_t r = hh * nq + i;
            float *dst = out + ((b * s->H + h0 + hh) * s->Lq + i0 + i) * D;
            float m = -INFINITY, l = 0.0f;
            for (int64_t p = 0; p < np; p++)
                if (parts[p].l[r] > 0.0f && parts[p].m[r] > m) m = parts[p].m[r];
            for (int64_t x = 0; x < D; x++) dst[x] = 0.0f;
            for (int64_t p = 0; p < np; p++) {
                if (!(parts[p].l[r] > 0.0f)) continue; /* saw no key */
                const float a = expf(parts[p].m[r] - m);
                l += parts[p].l[r] * a;
                const float *o = parts[p].o + r * D;
                for (int64_t x = 0; x < D; x++) dst[x] += o[x] * a;
            }
            const float inv = dhsa_rule_inv_sum(l);
            for (int64_t x = 0; x < D; x++) dst[x] *= inv;
        }
}

/* Calls whose items have at most DHSA_TILE_ROWS rows each take the row
 * kernels (tiles.c): K / V read in place, range by range, nothing padded to
 * 8 rows. Decided per call, from the largest item, not per item: a short
 * last query tile keeps the tile kernels, so a row's bits do not depend on
 * how many queries follow it. */
static int use_rows(const attn_ranges *rg, int64_t R) {
    return R <= DHSA_TILE_ROWS && rg->tile_path != DHSA_TILE_BLAS;
}

/* One work item.
 * q (B,H,Lq,D), k/v (B,Hkv,Lk,D), out (B,H,Lq,D); heads [h0, h0+nh) of batch
 * b, all reading KV head kvh, queries [i0, i0+nq), key ranges
 * [starts[x], ends[x]) for x < nranges (sorted). Several ranges are first
 * gathered into contiguous scratch (O(keys * D), against O(rows * keys * D)
 * of compute) so every tile product sees full tiles, not one chunk at a
 * time. */
static void attend_item(tile_scratch *w, float *out, const float *q, const void *k,
                        const void *v, const dhsa_attn_shape *s, const attn_ranges *rg,
                        int64_t b, int64_t h0,
                        int64_t nh, int64_t kvh, int64_t i0, int64_t nq,
                        const int32_t *starts, const int32_t *ends, int64_t nranges,
                        int rows, const key_part *kp) {
    const int64_t D = s->D, R = nh * nq;
    const dhsa_block_geom g = dhsa_rule_rows(s, i0, nq);
    const size_t esz = s->kv_f16 ? sizeof(uint16_t) : sizeof(float);
    const char *kb = (const char *)k + (size_t)((b * s->Hkv + kvh) * s->Lk * D) * esz;
    const char *vb = (const char *)v + (size_t)((b * s->Hkv + kvh) * s->Lk * D) * esz;

    for (int64_t hh = 0; hh < nh; hh++) {
        const float *src = q + ((b * s->H + h0 + hh) * s->Lq + i0) * D;
        float *dst = w->qt + hh * nq * D;
        for (int64_t x = 0; x < nq * D; x++) dst[x] = src[x] * rg->q_scale;
    }
    const int64_t R_pad = DHSA_ROUND_UP(R, DHSA_TILE_ROWS);
    memset(w->qt + R * D, 0, (size_t)((R_pad - R) * D) * sizeof(float));
    memset(w->o, 0, (size_t)(R_pad * D) * sizeof(float));
    for (int64_t r = 0; r < R; r++) { w->m[r] = -INFINITY; w->l[r] = 0.0f; }

    /* only keys some row of the item may see, [g.lo, g.hi), are walked */
    key_list kl = {kb, vb, NULL, 0, 0, s->kv_f16};
    if (rows) {
        /* few rows: each range in place, nothing gathered (the softmax state
         * carries from range to range); S rows [R, R_pad) stay zero */
        memset(w->s + R * w->tile_k, 0, (size_t)((R_pad - R) * w->tile_k) * sizeof(float));
        int64_t seen = 0; /* visible keys before range x */
        const int64_t from = kp ? kp->from : 0, to = kp ? kp->to : INT64_MAX;
        for (int64_t x = 0; x < nranges && seen < to; x++) {
            int64_t a = DHSA_MAX((int64_t)starts[x], g.lo);
            int64_t e = DHSA_MIN((int64_t)ends[x], g.hi);
            if (e <= a) continue;
            const int64_t n = e - a;
            /* this part's share of the range: keys [from, to) of the item */
            e = a + DHSA_MIN(n, to - seen);
            a += DHSA_MAX(0, from - seen);
            seen += n;
            if (e <= a) continue;
            kl.first = a;
            kl.n = e - a;
            kl.k = kb + (size_t)(a * D) * esz;
            kl.v = vb + (size_t)(a * D) * esz;
            attend_keys(w, s, rg, R, &g, &kl, 1);
        }
    } else if (nranges == 1) {
        kl.first = DHSA_MAX((int64_t)starts[0], g.lo);
        kl.n = DHSA_MAX(0, DHSA_MIN((int64_t)ends[0], g.hi) - kl.first);
        kl.k = kb + (size_t)(kl.first * D) * esz;
        kl.v = vb + (size_t)(kl.first * D) * esz;
    } else if (nranges > 1) {
        int64_t n = 0;
        for (int64_t x = 0; x < nranges; x++) {
            const int64_t a = DHSA_MAX((int64_t)starts[x], g.lo);
            const int64_t e = DHSA_MIN((int64_t)ends[x], g.hi);
            if (e <= a) continue;
            if (s->kv_f16) { /* gather and widen in one pass */
                dhsa_half_to_float(w->kg + n * D, (const uint16_t *)kb + a * D, (e - a) * D);
                dhsa_half_to_float(w->vg + n * D, (const uint16_t *)vb + a * D, (e - a) * D);
            } else {
                memcpy(w->kg + n * D, (const float *)kb + a * D, (size_t)((e - a) * D) * sizeof(float));
                memcpy(w->vg + n * D, (const float *)vb + a * D, (size_t)((e - a) * D) * sizeof(float));
            }
            for (int64_t j = a; j < e; j++) w->kpos[n++] = (int32_t)j;
        }
        kl.k = w->kg;
        kl.v = w->vg;
        kl.pos = w->kpos;
        kl.n = n;
        kl.half = 0;
    }
    if (!rows) attend_keys(w, s, rg, R, &g, &kl, 0);
    if (kp) { /* a part: its unnormalised state, merged by merge_parts */
        for (int64_t r = 0; r < R; r++) {
            kp->m[r] = w->m[r];
            kp->l[r] = w->l[r];
        }
        memcpy(kp->o, w->o, (size_t)(R * D) * sizeof(float));
        return;
    }

    for (int64_t hh = 0; hh < nh; hh++) {
        float *dst = out + ((b * s->H + h0 + hh) * s->Lq + i0) * D;
        for (int64_t i = 0; i < nq; i++) {
            const int64_t r = hh * nq + i;
            const float inv = dhsa_rule_inv_sum(w->l[r]); /* 0: the row saw no key */
            for (int64_t x = 0; x < D; x++) dst[i * D + x] = w->o[r * D + x] * inv;
        }
    }
}

/* Heads per work item: the whole GQA group up to plan.rows rows. */
static int64_t heads_per_item(const tile_plan *plan, int64_t group, int64_t qtile) {
    int64_t hpi = plan->rows / qtile;
    if (hpi < 1) hpi = 1;
    return DHSA_MIN(hpi, group);
}

static int sparse_run(float *out, const float *q, const void *k, const void *v,
                      const dhsa_attn_shape *s, const dhsa_selection *sel,
                      const attn_ranges *rg_in, const float max_abs[3], int num_threads);

/* Dense attention of few-row items (a decode step over contiguous K / V)
 * through the sparse kernel, one range per query tile: its split keys
 * keep every thread busy when there are fewer items than threads. */
static int dense_as_ranges(float *out, const float *q, const void *k, const void *v,
                           const dhsa_attn_shape *s, const attn_ranges *rg, int64_t BQ,
                           int num_threads) {
    const int64_t nqt = (s->Lq + BQ - 1) / BQ, n = s->B * s->Hkv * nqt;
    int64_t *offsets = malloc((size_t)(n + 1) * sizeof(int64_t));
    int32_t *starts = malloc((size_t)n * sizeof(int32_t));
    int32_t *ends = malloc((size_t)n * sizeof(int32_t));
    int st = DHSA_ENOMEM;
    if (offsets && starts && ends) {
        offsets[0] = 0;
        for (int64_t i = 0; i < n; i++) {
            const int64_t qt = i % nqt, i0 = qt * BQ;
            const dhsa_block_geom g = dhsa_rule_rows(s, i0, DHSA_MIN(BQ, s->Lq - i0));
            starts[i] = (int32_t)g.lo;
            ends[i] = (int32_t)DHSA_MAX(g.lo, g.hi);
            offsets[i + 1] = i + 1;
        }
        dhsa_selection sel = {0};
        sel.offsets = offsets;
        sel.starts = starts;
        sel.ends = ends;
        sel.block_size = BQ;
        sel.num_blocks = nqt;
        sel.num_groups = s->Hkv;
        const float unused[3] = {0};
        st = sparse_run(out, q, k, v, s, &sel, rg, unused, num_threads);
    }
    free(offsets);
    free(starts);
    free(ends);
    return st;
}

int dhsa_attention_dense(float *out, const float *q, const void *k, const void *v,
                         const dhsa_attn_shape *s, int num_threads) {
    int st = dhsa_attn_shape_check(s);
    if (st != DHSA_OK) return st;
    if (!out || !q || !k || !v || num_threads < 1) return DHSA_EINVAL;
    attn_ranges rg;
    st = attn_ranges_check(&rg, q, k, v, s, num_threads);
    if (st != DHSA_OK) return st;

    const tile_plan plan = plan_tiles();
    const int64_t G = dhsa_rule_gqa(s), BQ = plan.tile_q;
    const int64_t hpi = heads_per_item(&plan, G, BQ), nsub = (G + hpi - 1) / hpi;
    const int64_t nqt = (s->Lq + BQ - 1) / BQ;
    if (use_rows(&rg, hpi * DHSA_MIN(BQ, s->Lq)))
        return dense_as_ranges(out, q, k, v, s, &rg, BQ, num_threads);
    const int64_t per_tile = s->B * s->Hkv * nsub, items = per_tile * nqt;
    const int64_t gather_cap = 0; /* one range per item: nothing to gather */
    int status = DHSA_OK;

#pragma omp parallel num_threads(dhsa_threads_for(num_threads, items))
    {
        tile_scratch w;
        int ok = scratch_init(&w, hpi * BQ, s->D, plan.tile_k, gather_cap, s->kv_f16) == DHSA_OK;
        if (!ok) {
#pragma omp atomic write
            status = DHSA_ENOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < items; t++) {
            if (!ok) continue;
            const int64_t qt = nqt - 1 - t / per_tile; /* longest tiles first */
            int64_t rem = t % per_tile;
            const int64_t sub = rem % nsub; rem /= nsub;
            const int64_t kvh = rem % s->Hkv, b = rem / s->Hkv;
            const int64_t h0 = kvh * G + sub * hpi, nh = DHSA_MIN(hpi, G - sub * hpi);
            const int64_t i0 = qt * BQ, nq = DHSA_MIN(BQ, s->Lq - i0);
            const dhsa_block_geom g = dhsa_rule_rows(s, i0, nq); /* one range: [g.lo, g.hi) */
            const int32_t start = (int32_t)g.lo, end = (int32_t)g.hi;
            attend_item(&w, out, q, k, v, s, &rg, b, h0, nh, kvh, i0, nq, &start, &end, 1, 0, NULL);
        }
        scratch_free(&w);
    }
    return status;
}

int dhsa_selection_check(const dhsa_selection *sel, const dhsa_attn_shape *s) {
    if (!sel || !sel->offsets || sel->block_size <= 0) return DHSA_EINVAL;
    if (sel->num_blocks != dhsa_rule_num_blocks(s->Lq, sel->block_size)) return DHSA_EINVAL;
    if (sel->num_groups != 1 && sel->num_groups != s->Hkv && sel->num_groups != s->H)
        return DHSA_EINVAL;
    const int64_t n = s->B * sel->num_groups * sel->num_blocks;
    if (sel->offsets[0] != 0) return DHSA_EINVAL;
    for (int64_t i = 0; i < n; i++) {
        if (sel->offsets[i + 1] < sel->offsets[i]) return DHSA_EINVAL;
        int64_t prev_end = 0;
        for (int64_t r = sel->offsets[i]; r < sel->offsets[i + 1]; r++) {
            if (sel->starts[r] < prev_end || sel->ends[r] <= sel->starts[r] ||
                sel->ends[r] > s->Lk) return DHSA_EINVAL;
            prev_end = sel->ends[r];
        }
    }
    return DHSA_OK;
}


int dhsa_attention_sparse(float *out, const float *q, const void *k, const void *v,
                          const dhsa_attn_shape *s, const dhsa_selection *sel,
                          int num_threads) {
    int st = dhsa_attn_shape_check(s);
    if (st != DHSA_OK) return st;
    if (!out || !q || !k || !v || num_threads < 1) return DHSA_EINVAL;
    st = dhsa_selection_check(sel, s);
    if (st != DHSA_OK) return st;
    attn_ranges rg;
    st = attn_ranges_check(&rg, q, k, v, s, num_threads);
    if (st != DHSA_OK) return st;
    const float max_abs[3] = {0}; /* unused: rg is set */
    return sparse_run(out, q, k, v, s, sel, &rg, max_abs, num_threads);
}

int dhsa_attention_sparse_scanned(float *out, const float *q, const void *k, const void *v,
                                  const dhsa_attn_shape *s, const dhsa_selection *sel,
                                  const float max_abs[3], int num_threads) {
    return sparse_run(out, q, k, v, s, sel, NULL, max_abs, num_threads);
}

/* Work item x of the sparse kernel: longest query tiles first, then batch,
 * KV head and head subset (the layout of dhsa_attention_dense's items). */
typedef struct {
    int64_t qt, b, kvh, h0, nh, i0, nq, idx; /* idx: the selection's block */
} sparse_item;

static sparse_item item_of(const dhsa_attn_shape *s, const dhsa_selection *sel, int64_t x,
                           int64_t per_tile, int64_t nsub, int64_t hpi, int64_t G) {
    sparse_item it;
    const int64_t nqt = sel->num_blocks, BQ = sel->block_size;
    it.qt = nqt - 1 - x / per_tile;
    int64_t rem = x % per_tile;
    const int64_t sub = rem % nsub; rem /= nsub;
    it.kvh = rem % s->Hkv;
    it.b = rem / s->Hkv;
    it.h0 = it.kvh * G + sub * hpi;
    it.nh = DHSA_MIN(hpi, G - sub * hpi);
    it.i0 = it.qt * BQ;
    it.nq = DHSA_MIN(BQ, s->Lq - it.i0);
    const int64_t sg = dhsa_rule_group_of_head(s, sel->num_groups, it.h0); /* shared by the item's heads */
    it.idx = (it.b * sel->num_groups + sg) * nqt + it.qt;
    return it;
}

/* keys of selection block idx (query tile qt) that some query of the tile may see */
static int64_t visible_keys(const dhsa_attn_shape *s, const dhsa_selection *sel, int64_t idx,
                            int64_t qt) {
    const int64_t i0 = qt * sel->block_size;
    const dhsa_block_geom g = dhsa_rule_rows(s, i0, DHSA_MIN(sel->block_size, s->Lq - i0));
    int64_t n = 0;
    for (int64_t r = sel->offsets[idx]; r < sel->offsets[idx + 1]; r++)
        n += DHSA_MAX(0, DHSA_MIN((int64_t)sel->ends[r], g.hi) - DHSA_MAX((int64_t)sel->starts[r], g.lo));
    return n;
}

/* The sparse kernel after the checks; rg NULL: the guard from max_abs. */
static int sparse_run(float *out, const float *q, const void *k, const void *v,
                      const dhsa_attn_shape *s, const dhsa_selection *sel,
                      const attn_ranges *rg_in, const float max_abs[3], int num_threads) {
    attn_ranges rg;
    if (rg_in) rg = *rg_in;
    else {
        const int st = attn_ranges_from(&rg, s, max_abs);
        if (st != DHSA_OK) return st;
    }

    const tile_plan plan = plan_tiles();
    const int64_t G = dhsa_rule_gqa(s), BQ = sel->block_size, SG = sel->num_groups;
    /* heads that share a selection and a KV head go into one item */
    const int64_t hpi = SG == s->H ? 1 : heads_per_item(&plan, G, BQ);
    const int64_t nsub = (G + hpi - 1) / hpi, nqt = sel->num_blocks;
    const int64_t per_tile = s->B * s->Hkv * nsub, items = per_tile * nqt;
    const int64_t nblk = s->B * SG * nqt;
    const int64_t R_cap = hpi * DHSA_MIN(BQ, s->Lq); /* rows of the largest item */
    const int rows = use_rows(&rg, R_cap);             /* for every item of the call */
    int status = DHSA_OK;
    /* gather scratch (tile kernels): the most keys any multi-range block selects */
    int64_t gather_cap = 0;
    if (!rows)
        for (int64_t i = 0; i < nblk; i++) {
            if (sel->offsets[i + 1] - sel->offsets[i] < 2) continue;
            int64_t n = 0;
            for (int64_t r = sel->offsets[i]; r < sel->offsets[i + 1]; r++)
                n += (int64_t)sel->ends[r] - sel->starts[r];
            gather_cap = DHSA_MAX(gather_cap, n);
        }

    /* split keys (row kernels): every block's visible keys counted once, the
     * parts from the most of them, each work item's part laid out here */
    int64_t parts = 1, work = items;
    float *pbuf = NULL;
    key_part *kps = NULL;
    if (rows) {
        int64_t *nvis = malloc((size_t)nblk * sizeof(int64_t)), most = 0;
        if (!nvis) return DHSA_ENOMEM;
        for (int64_t i = 0; i < nblk; i++) {
            nvis[i] = visible_keys(s, sel, i, i % nqt);
            most = DHSA_MAX(most, nvis[i]);
        }
        parts = split_parts(most);
        work = items * parts;
        const int64_t pstride = R_cap * (s->D + 2);
        if (parts > 1) {
            pbuf = malloc((size_t)(work * pstride) * sizeof(float));
            kps = malloc((size_t)work * sizeof(key_part));
            for (int64_t t = 0; pbuf && kps && t < work; t++) {
                const int64_t p = t % parts;
                const int64_t n = nvis[item_of(s, sel, t / parts, per_tile, nsub, hpi, G).idx];
                kps[t].from = n * p / parts;
                kps[t].to = n * (p + 1) / parts;
                kps[t].m = pbuf + t * pstride;
                kps[t].l = kps[t].m + R_cap;
                kps[t].o = kps[t].l + R_cap;
            }
        }
        free(nvis);
        if (parts > 1 && (!pbuf || !kps)) { free(pbuf); free(kps); return DHSA_ENOMEM; }
    }

#pragma omp parallel num_threads(dhsa_threads_for(num_threads, work))
    {
        tile_scratch w;
        int ok = scratch_init(&w, R_cap, s->D, plan.tile_k, gather_cap, s->kv_f16) == DHSA_OK;
        if (!ok) {
#pragma omp atomic write
            status = DHSA_ENOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < work; t++) {
            if (!ok) continue;
            const sparse_item it = item_of(s, sel, t / parts, per_tile, nsub, hpi, G);
            const int64_t r0 = sel->offsets[it.idx], nr = sel->offsets[it.idx + 1] - r0;
            attend_item(&w, out, q, k, v, s, &rg, it.b, it.h0, it.nh, it.kvh, it.i0, it.nq,
                        sel->starts + r0, sel->ends + r0, nr, rows, kps ? &kps[t] : NULL);
        }
        int st_now;
#pragma omp atomic read
        st_now = status; /* after the loop's barrier: every part has run */
        if (parts > 1 && st_now == DHSA_OK) {
#pragma omp for schedule(static)
            for (int64_t x = 0; x < items; x++) {
                const sparse_item it = item_of(s, sel, x, per_tile, nsub, hpi, G);
                merge_parts(out, s, kps + x * parts, parts, it.b, it.h0, it.nh, it.i0, it.nq);
            }
        }
        scratch_free(&w);
    }
    free(pbuf);
    free(kps);
    return status;
}
