/*
 * dhsa.h - public C API of the DHSA core.
 *
 * Dynamic Hierarchical Sparse Attention on the CPU: dense flash-style
 * attention, dynamic chunking of the keys, length-normalised chunk
 * representations, chunk scores, budgeted selection of key ranges, and a
 * sparse attention kernel that consumes those ranges.
 *
 * Conventions
 *   - Plain C, no Python. Every function returns an int status (DHSA_OK on
 *     success); the core never prints, exits or aborts.
 *   - Outputs first, then inputs, then sizes and options.
 *   - Tensors are dense row-major: q is float32 (B, H, Lq, D), k and v are
 *     (B, Hkv, Lk, D) float32, or IEEE float16 for the attention kernels
 *     (dhsa_attn_shape.kv_f16), out is float32 (B, H, Lq, D). H is a
 *     multiple of Hkv (GQA);
 *     query head h reads KV head h / (H / Hkv).
 *   - Queries are the last Lq of the Lk positions: query i sits at position
 *     Lk - Lq + i.
 *   - Key j is visible to the query at position p when
 *       causal:      j <= p
 *       window > 0:  j > p - window   (and, if not causal, j < p + window)
 *   - A selection is a list of half-open key ranges [start, end) per
 *     (batch, selection group, query block), stored CSR-style.
 */
#ifndef DHSA_H
#define DHSA_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DHSA_VERSION "0.1.0"

enum dhsa_status {
    DHSA_OK = 0,
    DHSA_EINVAL = 1,     /* an argument is out of range or inconsistent */
    DHSA_ENOMEM = 2,     /* an allocation failed */
    DHSA_ENONFINITE = 3, /* an input holds NaN or Inf */
    DHSA_EOVERFLOW = 4,  /* a size product does not fit the index type */
    DHSA_ERANGE = 5,     /* finite values whose float32 logits could overflow */
    DHSA_ESELECTION = 6, /* a caller-given selection is malformed */
    DHSA_EBOUNDS = 7,    /* caller-given chunk boundaries are malformed */
};

/* Human-readable message for a status code (static storage). */
const char *dhsa_status_string(int status);

/* ---- build information and run-time switches (status.c, simd.c) ------- */

/* 1 when the vector kernels (AVX2/FMA, plus AVX-512F where the CPU has it)
 * were compiled in and this CPU runs them. */
int dhsa_simd_available(void);
/* Name of the path in use now: "avx512f", "avx2-fma" or "scalar". */
const char *dhsa_simd_path(void);
/* Force the plain scalar twins (1) or allow the vectorised ones (0). */
void dhsa_simd_force_scalar(int force);
/* Allow (1, default) or forbid (0) the AVX-512 kernels where the CPU has them. */
void dhsa_simd_allow_avx512(int allow);
/* The tile matrix products of the attention kernels (S = Q K^T, O += P V):
 * register-blocked AVX-512 / AVX2 kernels (head_dim a multiple of 16 / 8),
 * OpenBLAS sgemm, or the plain scalar twins. AUTO picks the fastest this CPU
 * and head_dim allow (OpenBLAS under dhsa_simd_force_scalar(1)); a forced
 * vector path the CPU or head_dim cannot run falls back the same way. */
enum dhsa_tile_paths {
    DHSA_TILE_AUTO = 0,
    DHSA_TILE_AVX512 = 1,
    DHSA_TILE_AVX2 = 2,
    DHSA_TILE_BLAS = 3,
    DHSA_TILE_SCALAR = 4,
};
void dhsa_tile_path_set(int path);
/* The path the kernels take for this head_dim now. */
int dhsa_tile_path(int64_t D);
const char *dhsa_tile_path_name(int path);
/* Number of cores the OpenMP runtime would use by default. */
int dhsa_max_threads(void);
/* BLAS identification: configuration string and core name. */
const char *dhsa_blas_config(void);
const char *dhsa_blas_corename(void);

/* *max_abs = max |x| of a float32 / float16 tensor (0 for n = 0; max_abs
 * may be NULL) with up to num_threads threads; DHSA_ENONFINITE when a value
 * is NaN or Inf. */
int dhsa_max_abs_threads(const float *x, int64_t n, float *max_abs, int num_threads);
int dhsa_max_abs_f16_threads(const uint16_t *x, int64_t n, float *max_abs, int num_threads);

/* out (n) = x (n) widened from IEEE float16 (F16C where the CPU has it,
 * exact bit manipulation otherwise); dhsa_half_to_float_scalar is the twin. */
void dhsa_half_to_float(float *out, const uint16_t *x, int64_t n);
void dhsa_half_to_float_scalar(float *out, const uint16_t *x, int64_t n);

/* ---- attention (attention.c) ------------------------------------------- */

typedef struct {
    int64_t B, H, Hkv, Lq, Lk, D;
    float scale;    /* multiplier of q.k, usually 1/sqrt(D) */
    float softcap;  /* > 0: logits become softcap * tanh(logit / softcap) */
    int64_t window; /* > 0: sliding window (see conventions above) */
    int causal;     /* 1: key j visible only to positions >= j */
    int kv_f16;     /* 1: k and v hold IEEE float16 (uint16_t) values */
} dhsa_attn_shape;

typedef struct {
    int64_t block_size;      /* queries per block */
    int64_t num_blocks;      /* ceil(Lq / block_size) */
    int64_t num_groups;      /* selection groups per batch item: 1, Hkv or H */
    const int64_t *offsets;  /* (B * num_groups * num_blocks + 1) into starts/ends */
    const int32_t *starts;   /* range starts, sorted, non-overlapping per block */
    const int32_t *ends;     /* range ends (exclusive) */
} dhsa_selection;

/* Check a shape: sizes positive, H % Hkv == 0, Lq <= Lk, D <= 256, scale
 * finite and > 0, softcap >= 0, window >= 0, products fit int64. */
int dhsa_attn_shape_check(const dhsa_attn_shape *s);

/* out (B,H,Lq,D) = softmax(q k^T * scale [softcap] [mask]) v, tiled with an
 * online softmax; memory O(threads * tile). k and v are float32, or float16
 * when s->kv_f16 (widened tile by tile, so the cache stays half size).
 * Inputs are scanned first: DHSA_ENONFINITE for NaN / Inf, DHSA_ERANGE when
 * scale * D * max|q| * max|k| > 2**126 (a float32 logit or one of its partial
 * sums could overflow). Any finite v is handled (a large one by scaling the
 * softmax weights by a power of two that cancels in the normalisation). */
int dhsa_attention_dense(float *out, const float *q, const void *k,
                         const void *v, const dhsa_attn_shape *s,
                         int num_threads);

/* Same as dense, but each query block attends only to its selected ranges
 * (the causal / window masks still apply per query inside them). */
int dhsa_attention_sparse(float *out, const float *q, const void *k,
                          const void *v, const dhsa_attn_shape *s,
                          const dhsa_selection *sel, int num_threads);

/* Check a selection against a shape: offsets monotone, ranges sorted,
 * non-empty, non-overlapping and inside [0, Lk). */
int dhsa_selection_check(const dhsa_selection *sel, const dhsa_attn_shape *s);

/* ---- chunking (chunking.c) --------------------------------------------- */

struct dhsa_predict_params; /* below */

/* A learned boundary model for a chunking group of W = heads * D values per
 * key: a row of dhsa_bmodel_len(W) = 2 W + 6 doubles,
 *   [0, W)   weights of (a_x - b_x)^2      [W, 2W) weights of a_x * b_x
 *   then the weights of 1 - cos(a, b), |a - b|, |a|, |b|, the bias, and
 *   the threshold the boundary scan uses in place of the config's,
 * where a / b are the centred window means of dhsa_chunking_boundary_scores. */
enum { DHSA_BMODEL_COS, DHSA_BMODEL_DIST, DHSA_BMODEL_NORM_L, DHSA_BMODEL_NORM_R,
       DHSA_BMODEL_BIAS, DHSA_BMODEL_THRESHOLD, DHSA_BMODEL_TAIL };
static inline int64_t dhsa_bmodel_len(int64_t W) { return 2 * W + DHSA_BMODEL_TAIL; }

/* score (Lk) = boundary score of every key position of one chunking group:
 * the heads [0, nheads) of k (each (Lk, D), head_stride floats apart).
 * a = mL - mu, b = mR - mu where mL / mR are the mean keys of the `window`
 * positions left / right of t (fewer at the edges) and mu the mean of keys
 * [0, t), heads concatenated. Without a model (NULL) score[t] = 1 - cos(a, b)
 * (0 where a vector is zero); with one, the model's linear score of a and b
 * (layout above; its threshold is not read here). score[0] = 0. */
int dhsa_chunking_boundary_scores(double *score, const float *k,
                                  int64_t Lk, int64_t D, int64_t nheads,
                                  int64_t head_stride, int64_t window,
                                  const double *model);

/* bounds (cap Lk + 1) = 0 = b0 < b1 < ... < bN = Lk by a left-to-right scan
 * with p's threshold, min_chunk, max_chunk, nms_radius and max_chunks:
 * t becomes a boundary when the open chunk reached max_chunk, or when it has
 * min_chunk keys and score[t] >= threshold is a local maximum within
 * nms_radius (ties go to the earlier position). The decision at t reads
 * scores up to t + nms_radius only, so the chunking is causal up to that
 * look-ahead. *num_bounds receives N + 1. */
int dhsa_chunking_find_boundaries(int64_t *bounds, int64_t *num_bounds,
                                  const double *score, int64_t Lk,
                                  const struct dhsa_predict_params *p);

/* ---- representations (representations.c) ------------------------------ */

/* out (D) = (prefix[b] - prefix[a]) / n ** power, n = b - a: with power 0.5
 * the DHSA representation mean * sqrt(n); 1 gives the mean, 0 the sum. */
void dhsa_repr_range(double *out, const double *prefix, int64_t D, int64_t a,
                     int64_t b, double power);
/* n ** power (sqrt, n and 1 exactly for 0.5, 1 and 0) */
double dhsa_repr_norm(int64_t n, double power);

/* ---- the prediction (predict.c, selection.c) --------------------------- */

/* The string-valued options of DHSAConfig, matched by name through
 * dhsa_enum_value (the enum values are not part of the Python API). */
enum dhsa_budget_mode {
    DHSA_BUDGET_TOKENS = 0,   /* "tokens": a fixed number of keys per query block */
    DHSA_BUDGET_DENSITY = 1,  /* "density": a fraction of the block's allowed keys */
    DHSA_BUDGET_ADAPTIVE = 2, /* "adaptive": smallest chunk set reaching a mass threshold */
};

enum dhsa_granularity {
    DHSA_GRAN_LAYER = 0,      /* "layer": one selection per batch item, heads averaged */
    DHSA_GRAN_KV_HEAD = 1,    /* "kv_head": one per KV head, shared by its query heads */
    DHSA_GRAN_QUERY_HEAD = 2, /* "query_head": one per query head */
};

enum dhsa_chunking {
    DHSA_CHUNK_DYNAMIC = 0,   /* "dynamic": boundary scores, NMS, length caps */
    DHSA_CHUNK_FIXED = 1,     /* "fixed": a boundary every chunk_size keys */
};

enum dhsa_normalization {
    DHSA_NORM_SQRT = 0,       /* "sqrt": r_k = sum / n ** 0.5 (DHSA) */
    DHSA_NORM_MEAN = 1,       /* "mean": sum / n */
    DHSA_NORM_SUM = 2,        /* "sum": the plain sum */
};

enum dhsa_chunk_score {
    DHSA_SCORE_MEAN = 0,      /* "mean": r_q . r_k of the block and piece representations */
    DHSA_SCORE_MAX = 1,       /* "max": the largest r_q . k_j over the piece's keys */
};

enum dhsa_decode_score {
    DHSA_DECODE_MEAN = 0,     /* "mean": r_q . r_c, the chunk's representation */
    DHSA_DECODE_BOUNDS = 1,   /* "bounds": sum_d max(r_q[d] lo_c[d], r_q[d] hi_c[d]) over the
                               * per-dimension min / max of the chunk's head-mean keys, an
                               * upper bound of r_q . k over its keys (Quest's pages) */
    DHSA_DECODE_MOMENTS = 2,  /* "moments": scale r_q . mu_c + scale^2 / 2 sum_d r_q[d]^2 var_c[d],
                               * the log of E[exp(scale r_q . k)] for keys drawn from a normal
                               * of the chunk's per-dimension mean and variance: the attention
                               * weight one of its keys can expect */
};

enum dhsa_method {
    DHSA_METHOD_DHSA = 0,       /* "dhsa" */
    DHSA_METHOD_BLOCK_TOPK = 1, /* "block_topk": fixed chunks of chunk_size, mean-pooled */
};

/* Name -> value of one string option: field is the DHSAConfig field name
 * ("budget_mode", "granularity", "chunking", "normalization", "method",
 * "chunk_score", "decode_score").
 * DHSA_EINVAL for an unknown field or name. */
int dhsa_enum_value(const char *field, const char *name, int *value);

/* The options of the prediction, one field per DHSAConfig field of the same
 * name (see dhsa/config.py for their meaning and valid ranges). Sizes past
 * the sequence length mean the length itself; dhsa_predict clamps them. */
typedef struct dhsa_predict_params {
    int64_t budget;           /* tokens mode: keys per block */
    int64_t block_size;       /* queries per block */
    int64_t sink;             /* first allowed keys always kept */
    int64_t local;            /* keys right before the block always kept */
    int budget_mode;          /* enum dhsa_budget_mode */
    double density;           /* density mode: fraction in (0, 1] */
    double mass;              /* adaptive: mass threshold in (0, 1] */
    int64_t min_budget;       /* adaptive: lower clamp */
    int64_t max_budget;       /* adaptive: upper clamp */
    int granularity;          /* enum dhsa_granularity */
    int chunking;             /* enum dhsa_chunking */
    int64_t chunk_size;       /* fixed chunking: keys per chunk */
    int64_t boundary_window;  /* dynamic chunking: keys each side of a candidate */
    double threshold;         /* dynamic: candidates need score >= threshold */
    int64_t min_chunk;        /* dynamic: shortest chunk (except the last) */
    int64_t max_chunk;        /* dynamic: longest chunk, a boundary is forced there */
    int64_t nms_radius;       /* dynamic: a candidate must beat its neighbours within this */
    int64_t max_chunks;       /* dynamic: 0 no cap, else at most max_chunks - 1 boundaries (the last chunk takes the rest) */
    int normalization;        /* enum dhsa_normalization */
    int method;               /* enum dhsa_method */
    int64_t dense_tail;       /* >= 0: the blocks holding the last dense_tail queries keep all their keys */
    int chunk_score;          /* enum dhsa_chunk_score (tokens and density budgets) */
    int decode_score;         /* enum dhsa_decode_score: how a KV cache scores closed chunks */
    /* dynamic chunking: NULL (cosine scores), or one learned boundary model
     * row per chunking group (CG rows of dhsa_bmodel_len(heads * D), shared
     * by the batch): its scores and its threshold replace the cosine's */
    const double *boundary_model;
} dhsa_predict_params;

/* A whole prediction, allocated by dhsa_predict, released with
 * dhsa_prediction_free. CG chunking groups (1 for layer, else Hkv) and SG
 * selection groups (1, Hkv or H) per batch item, NQB query blocks. */
typedef struct {
    int64_t chunk_groups, select_groups, num_blocks, block_size;
    int64_t *bounds;          /* (B * CG, Lk + 1) chunk bounds, row g valid up to num_bounds[g] */
    int64_t *num_bounds;      /* (B * CG) */
    int64_t *offsets;         /* (B * SG * NQB + 1) CSR offsets into starts / ends */
    int32_t *starts, *ends;   /* (offsets[B * SG * NQB]) sorted, merged key ranges */
    int64_t num_ranges;       /* offsets[B * SG * NQB] */
    int64_t *pairs_selected;  /* (B * SG) query-key pairs the selection keeps */
    int64_t *pairs_allowed;   /* (B * SG) pairs the masks allow */
    double *chunk_scores;     /* (B * SG, NQB, score_stride) or NULL, see dhsa_predict */
    int64_t score_stride;     /* most chunks of any chunking group */
    double predict_seconds;   /* wall time of the prediction */
    double attention_seconds; /* dhsa_sparse_attention: wall time of the kernel */
    int64_t reused_groups;    /* dhsa_decode_attention: selection groups whose
                                 chunk scores came from an earlier step */
} dhsa_prediction;

/* Flags of dhsa_predict. */
enum { DHSA_PREDICT_SCORES = 1 }; /* also fill chunk_scores */

/* *out = the prediction for q (B, H, Lq, D) and k (B, Hkv, Lk, D), both
 * float32: boundaries (dynamic or fixed chunking, or the caller's: bounds
 * (B * CG, Lk + 1) with num_bounds (B * CG), each row rising strictly from 0
 * to Lk, else DHSA_EBOUNDS) -> per-block capacity -> selection -> CSR -> pair
 * counts. Per (batch, selection group, query block): allowed keys [lo, hi);
 * the first `sink` of them and the `local` keys before the block plus the
 * block's own keys are always kept; the other keys come as chunk pieces
 * scored by r_q . r_k (length-normalised representations of the block's
 * head-averaged queries and of the piece's head-averaged keys), best first,
 * the last piece cut to fit the budget. With chunk_score "max" a piece
 * scores the largest r_q . k_j of its keys k_j (head-averaged) instead: one
 * key that the block's queries point at lifts its chunk, which a chunk mean
 * dilutes. chunk_scores (DHSA_PREDICT_SCORES) are the full-chunk scores,
 * NaN where the chunk is not reachable. q and k are scanned first (DHSA_ENONFINITE). *out is NULL on any error. */
int dhsa_predict(dhsa_prediction **out, const float *q, const float *k,
                 const dhsa_attn_shape *s, const dhsa_predict_params *p,
                 const int64_t *bounds, const int64_t *num_bounds, int flags,
                 int num_threads);
void dhsa_prediction_free(dhsa_prediction *pred);

/* -1 when every row of caller-given bounds (n, Lk + 1) starts at 0, rises
 * strictly over its num_bounds[g] entries and ends at Lk; else the first bad
 * row (for naming it in an error). */
int64_t dhsa_predict_bad_bounds(const int64_t *bounds, const int64_t *num_bounds, int64_t n,
                                int64_t Lk);

/* Predict and attend in one call, q, k and v scanned once (k and v float32,
 * or float16 when s->kv_f16; the prediction reads k widened to float32).
 * With p != NULL the selection is predicted as by dhsa_predict (bounds /
 * num_bounds as there, flags DHSA_PREDICT_SCORES) and *out_pred receives it
 * with both stages' times (the scan counted with the prediction). With
 * p == NULL the caller's selection sel is checked once (DHSA_ESELECTION) by
 * dhsa_attention_sparse; *out_pred then holds no ranges, only the block
 * layout, attention_seconds and, with DHSA_PREDICT_COUNTS, the pair counts.
 * out (B, H, Lq, D) as dhsa_attention_sparse. */
enum { DHSA_PREDICT_COUNTS = 2 }; /* given selection: count its pairs */
int dhsa_sparse_attention(float *out, dhsa_prediction **out_pred, const float *q,
                          const void *k, const void *v, const dhsa_attn_shape *s,
                          const dhsa_predict_params *p, const int64_t *bounds,
                          const int64_t *num_bounds, const dhsa_selection *sel, int flags,
                          int num_threads);

/* The input scan of every call without the attention: DHSA_ENONFINITE when
 * q, k or v (v may be NULL) holds NaN or Inf. */
int dhsa_check_inputs(const float *q, const void *k, const void *v, const dhsa_attn_shape *s,
                      int num_threads);

/* pairs_selected, pairs_allowed (B * num_groups): query-key pairs a
 * selection keeps under the masks, and pairs the masks allow;
 * DHSA_ESELECTION when sel fails dhsa_selection_check. */
int dhsa_selection_count_pairs(int64_t *pairs_selected, int64_t *pairs_allowed,
                               const dhsa_selection *sel, const dhsa_attn_shape *s,
                               int num_threads);

/* ---- decoding from a KV cache (decode.c) -------------------------------- */

/* A KV cache of B batch items x Hkv heads x D, float32 or float16 (kv_f16),
 * with the chunk state of every chunking group (B * CG, CG as in
 * dhsa_predict for p's granularity): the chunking of dhsa_predict built as
 * keys arrive, O(new keys * D) per append (never a re-scan). A boundary is
 * committed once its look-ahead has arrived (boundary_window + nms_radius
 * keys past it for dynamic chunking; a fixed chunk when it is full), so the
 * committed chunks of a cache are exactly those of dhsa_predict on the same
 * keys, however they were appended; the keys after the last committed
 * boundary form the open chunk. Closed chunks keep a float32 representation
 * (sum of their head-averaged keys / n ** key_norm) for decode scoring.
 * Opaque; not safe for concurrent calls on one cache. */
typedef struct dhsa_kv_cache dhsa_kv_cache;

/* *out = an empty cache. p: the chunking options (granularity, chunking,
 * chunk_size, boundary_window, threshold, min_chunk, max_chunk, nms_radius,
 * normalization, method, boundary_model: copied), max_chunks must be 0 (a cap
 * on chunks would leave an open chunk growing without end). */
int dhsa_kv_cache_create(dhsa_kv_cache **out, int64_t B, int64_t Hkv, int64_t D, int kv_f16,
                         const dhsa_predict_params *p);
void dhsa_kv_cache_free(dhsa_kv_cache *c);

/* Append k and v, (B, Hkv, n, D) in the cache's dtype. They are scanned
 * first: DHSA_ENONFINITE (or DHSA_ENOMEM) leaves the cache unchanged. */
int dhsa_kv_cache_append(dhsa_kv_cache *c, const void *k, const void *v, int64_t n,
                         int num_threads);
/* Keep the first n keys (n <= length): the state becomes that of a cache
 * given only those (re-chunked from the stored keys). */
int dhsa_kv_cache_crop(dhsa_kv_cache *c, int64_t n);
/* Batch item i of the new cache is item index[i] of the old one (B_new
 * items, indices in [0, B), repeats allowed: beam search). */
int dhsa_kv_cache_reorder(dhsa_kv_cache *c, const int64_t *index, int64_t B_new);

int64_t dhsa_kv_cache_length(const dhsa_kv_cache *c);
int64_t dhsa_kv_cache_batch(const dhsa_kv_cache *c);
/* Bytes held: K/V storage (capacity included) and the chunk state. */
void dhsa_kv_cache_bytes(const dhsa_kv_cache *c, int64_t *kv_bytes, int64_t *state_bytes);
/* Committed bounds of chunking group g (b * CG + cg): *bounds points to
 * *num_bounds values 0 = b0 < ... < b_last, the last one the open chunk's
 * start (valid until the next call that changes the cache). */
int dhsa_kv_cache_chunks(const dhsa_kv_cache *c, int64_t g, const int64_t **bounds,
                         int64_t *num_bounds);
/* The bounds dhsa_predict computes for all `length` keys (committed ones,
 * then the scan of the open chunk with the shortened windows at the end):
 * bounds (B * CG, length + 1), num_bounds (B * CG). */
int dhsa_kv_cache_prefill_bounds(const dhsa_kv_cache *c, int64_t *bounds, int64_t *num_bounds);
/* Copy keys and values of positions [a, b) into k, v (B, Hkv, b - a, D). */
int dhsa_kv_cache_read(const dhsa_kv_cache *c, void *k, void *v, int64_t a, int64_t b);

/* out (B, H, nq, D) float32 = attention of q (B, H, nq, D), the queries of
 * the cache's last nq positions, over the cache: causal, with scale,
 * softcap and window as dhsa_attn_shape. budget 0 (or >= the keys visible)
 * attends every visible key. Otherwise the nq queries form one block whose
 * selection (per selection group of the cache's granularity) keeps the
 * first `sink` visible keys, the `local` keys before the block and its own,
 * the open chunk, and then closed chunks by r_q . r_k, or by the cache's
 * decode_score over the chunk's head-mean keys ("bounds": the bound of
 * r_q . k; "moments": the expected log weight, with `scale`) (r_q the group's
 * head-averaged queries, block sum / sqrt(nq); pieces clipped to the
 * candidate keys inherit their chunk's score), best first, the last cut,
 * until `budget` keys. reuse > 1: a group's chunk scores serve the
 * single-query steps of the next reuse - 1 positions too, unless a chunk of
 * its group closes meanwhile (the scores are kept in the cache; sink, local,
 * the open chunk and the budget rule are applied anew every step); reuse 1
 * scores every step. q is scanned (DHSA_ENONFINITE). With out_pred,
 * *out_pred receives the selection (one block), the bounds it used
 * (committed + length), the pair counts and reused_groups. */
int dhsa_decode_attention(float *out, dhsa_prediction **out_pred, const float *q,
                          dhsa_kv_cache *c, int64_t H, int64_t nq, float scale,
                          float softcap, int64_t window, int64_t budget, int64_t sink,
                          int64_t local, int64_t reuse, int num_threads);

#ifdef __cplusplus
}
#endif

#endif /* DHSA_H */
