/*
 * rules.h - the one C home of the rules every stage of the core shares.
 *
 * Which key a query may see, the geometry of a block of queries, how many
 * keys a query block keeps (sink + local + budget clamp + dense tail),
 * which KV head and which selection / chunking group a query head belongs
 * to, and the normalisation of a masked softmax row. attention.c and the
 * prediction (selection.c, predict.c) call these instead of writing them
 * out again.
 * The Python twin is dhsa/rules.py (named per function below); both state
 * the rules dhsa/reference.py specifies.
 *
 * Conventions (see dhsa.h): queries are the last Lq of the Lk positions,
 * query i at position Lk - Lq + i; all ranges are half-open [lo, hi).
 * Small static inline functions, integer arithmetic only (the density
 * budget aside), so using them changes no result bit.
 */
#ifndef DHSA_RULES_H
#define DHSA_RULES_H

#include <math.h>
#include <stdint.h>
#include "internal.h"

/* ---- visibility --------------------------------------------------------- */

/* Position of query i (of Lq) among Lk keys. */
static inline int64_t dhsa_rule_query_pos(const dhsa_attn_shape *s, int64_t i) {
    return s->Lk - s->Lq + i;
}

/* Keys [*lo, *hi) visible to the query at position p (0 <= p < Lk):
 *   causal:     j <= p
 *   window w:   j > p - w, and when not causal also j < p + w
 * Both ends are non-decreasing in p, so a run of positions [p0, p1] sees
 * the union [lo(p0), hi(p1)) and every one of them sees [lo(p1), hi(p0)).
 * Twin: rules.visible_span / visible_mask. */
static inline void dhsa_rule_visible(const dhsa_attn_shape *s, int64_t p, int64_t *lo,
                                     int64_t *hi) {
    *lo = s->window > 0 ? DHSA_MAX(0, p - s->window + 1) : 0;
    if (s->causal) *hi = p + 1;
    else *hi = s->window > 0 ? DHSA_MIN(s->Lk, p + s->window) : s->Lk;
}

/* ---- geometry of a run of queries ---------------------------------------- */

/* Queries [i0, i0 + nq) at positions [spos, epos]:
 *   [lo, hi)          keys at least one of them sees (the union),
 *   [all_lo, all_hi)  keys every one of them sees (empty when all_hi <= all_lo);
 * a key tile inside [all_lo, all_hi) needs no mask. */
typedef struct {
    int64_t i0, nq, spos, epos, lo, hi, all_lo, all_hi;
} dhsa_block_geom;

static inline dhsa_block_geom dhsa_rule_rows(const dhsa_attn_shape *s, int64_t i0, int64_t nq) {
    dhsa_block_geom g;
    g.i0 = i0;
    g.nq = nq;
    g.spos = dhsa_rule_query_pos(s, i0);
    g.epos = g.spos + nq - 1;
    dhsa_rule_visible(s, g.spos, &g.lo, &g.all_hi);
    dhsa_rule_visible(s, g.epos, &g.all_lo, &g.hi);
    return g;
}

/* Number of query blocks of block_size queries: ceil(Lq / block_size). */
static inline int64_t dhsa_rule_num_blocks(int64_t Lq, int64_t block_size) {
    return (Lq + block_size - 1) / block_size;
}

/* Query block qb: queries [qb * bs, min(Lq, (qb + 1) * bs)) (the last block
 * may be short). Twin: rules.block_geometry. */
static inline dhsa_block_geom dhsa_rule_block(const dhsa_attn_shape *s, int64_t block_size,
                                              int64_t qb) {
    const int64_t i0 = qb * block_size;
    return dhsa_rule_rows(s, i0, DHSA_MIN(block_size, s->Lq - i0));
}

/* Query-key pairs the masks allow to the rows of g: sum of hi - lo.
 * Twin: rules.allowed_pairs. */
static inline int64_t dhsa_rule_allowed_pairs(const dhsa_attn_shape *s, const dhsa_block_geom *g) {
    int64_t n = 0;
    for (int64_t p = g->spos; p <= g->epos; p++) {
        int64_t lo, hi;
        dhsa_rule_visible(s, p, &lo, &hi);
        n += hi - lo;
    }
    return n;
}

/* ---- keys a query block keeps -------------------------------------------- */

/* Whether block g holds one of the last dense_tail queries of the call (the
 * question at the end of a prompt): such a block keeps all its allowed keys.
 * Twin: rules.in_dense_tail. */
static inline int dhsa_rule_in_dense_tail(const dhsa_attn_shape *s, const dhsa_block_geom *g,
                                          int64_t dense_tail) {
    return dense_tail > 0 && g->i0 + g->nq > s->Lq - dense_tail;
}

/* Of the block's allowed keys [g->lo, g->hi):
 *   sink   [lo, sink_end)     the first `sink` allowed keys,
 *   local  [loc_a, loc_b)     the `local` keys before the block and the
 *                             block's own (visible) keys, after the sink,
 * always kept (`forced` keys in all). The block keeps between lo_clamp and
 * hi_clamp keys (equal but for the adaptive budget):
 *   tokens    max(budget, forced)
 *   density   max(ceil(density * allowed), forced)
 *   adaptive  [max(min_budget, forced), max(max_budget, forced)]
 * and it keeps all of them (`dense`) when allowed <= lo_clamp or when it is
 * in the dense tail. Twins: rules.forced_ranges, rules.budget_clamp and
 * rules.in_dense_tail. */
typedef struct {
    int64_t sink_end, loc_a, loc_b, forced, lo_clamp, hi_clamp;
    int dense;
} dhsa_block_keep;

static inline dhsa_block_keep dhsa_rule_keep(const dhsa_attn_shape *s, const dhsa_block_geom *g,
                                             const dhsa_predict_params *p) {
    dhsa_block_keep k;
    const int64_t allowed = g->hi - g->lo;
    k.sink_end = DHSA_MIN(g->lo + p->sink, g->hi);
    k.loc_a = DHSA_MAX(k.sink_end, g->spos - p->local);
    k.loc_b = DHSA_MAX(k.loc_a, DHSA_MIN(g->hi, g->epos + 1));
    k.forced = (k.sink_end - g->lo) + (k.loc_b - k.loc_a);
    if (p->budget_mode == DHSA_BUDGET_ADAPTIVE) {
        k.lo_clamp = DHSA_MAX(p->min_budget, k.forced);
        k.hi_clamp = DHSA_MAX(p->max_budget, k.forced);
    } else {
        const int64_t bud = p->budget_mode == DHSA_BUDGET_TOKENS
                                ? p->budget
                                : (int64_t)ceil(p->density * (double)allowed);
        k.lo_clamp = k.hi_clamp = DHSA_MAX(bud, k.forced);
    }
    k.dense = allowed <= k.lo_clamp || dhsa_rule_in_dense_tail(s, g, p->dense_tail);
    return k;
}

/* ---- heads and groups ------------------------------------------------------ */

/* Query heads per KV head (GQA group size); H is a multiple of Hkv. */
static inline int64_t dhsa_rule_gqa(const dhsa_attn_shape *s) { return s->H / s->Hkv; }

/* KV head read by query head h: h / (H / Hkv). Query heads
 * [kvh * G, (kvh + 1) * G) read KV head kvh. Twin: rules.kv_head_of. */
static inline int64_t dhsa_rule_kv_head(const dhsa_attn_shape *s, int64_t h) {
    return h / dhsa_rule_gqa(s);
}

/* Selection groups per batch item of a granularity (enum dhsa_granularity):
 * layer 1, kv_head Hkv, query_head H. Twin: rules.selection_groups. */
static inline int64_t dhsa_rule_select_groups(const dhsa_attn_shape *s, int granularity) {
    if (granularity == DHSA_GRAN_LAYER) return 1;
    return granularity == DHSA_GRAN_KV_HEAD ? s->Hkv : s->H;
}

/* Chunking groups per batch item: layer 1 (the KV heads concatenated), else
 * one per KV head (query_head shares its KV head's chunking). Twin:
 * rules.chunk_groups. */
static inline int64_t dhsa_rule_chunk_groups(const dhsa_attn_shape *s, int granularity) {
    return granularity == DHSA_GRAN_LAYER ? 1 : s->Hkv;
}

/* Chunking group of selection group sg. */
static inline int64_t dhsa_rule_chunk_group_of(const dhsa_attn_shape *s, int granularity,
                                               int64_t sg) {
    if (granularity == DHSA_GRAN_LAYER) return 0;
    return granularity == DHSA_GRAN_KV_HEAD ? sg : dhsa_rule_kv_head(s, sg);
}

/* Query heads [*h0, *h0 + *n) whose queries selection group sg averages
 * (twin: rules.group_heads, its first list). */
static inline void dhsa_rule_select_heads(const dhsa_attn_shape *s, int granularity, int64_t sg,
                                          int64_t *h0, int64_t *n) {
    if (granularity == DHSA_GRAN_LAYER) { *h0 = 0; *n = s->H; }
    else if (granularity == DHSA_GRAN_KV_HEAD) { *h0 = sg * dhsa_rule_gqa(s); *n = dhsa_rule_gqa(s); }
    else { *h0 = sg; *n = 1; }
}

/* KV heads [*h0, *h0 + *n) whose keys chunking group cg uses (the group of
 * selection group sg is dhsa_rule_chunk_group_of(s, granularity, sg)). */
static inline void dhsa_rule_chunk_heads(const dhsa_attn_shape *s, int granularity, int64_t cg,
                                         int64_t *h0, int64_t *n) {
    if (granularity == DHSA_GRAN_LAYER) { *h0 = 0; *n = s->Hkv; }
    else { *h0 = cg; *n = 1; }
}

/* Selection group of query head h in a selection of num_groups groups per
 * batch item (1, Hkv or H; the granularity is implied by the count, and
 * where two counts coincide the groups coincide too). Twin:
 * rules.group_of_head. */
static inline int64_t dhsa_rule_group_of_head(const dhsa_attn_shape *s, int64_t num_groups,
                                              int64_t h) {
    if (num_groups == 1) return 0;
    return num_groups == s->Hkv ? dhsa_rule_kv_head(s, h) : h;
}

/* ---- masked softmax ---------------------------------------------------------- */

/* A masked logit is -inf and its weight exp(-inf - m) exactly 0. A row's
 * output is O / l; a row that saw no key (l == 0: only with a caller's
 * selection that omits all its visible keys) gives zeros, not NaN - as
 * reference._attend's divide where l > 0 (rules.masked_softmax). */
static inline float dhsa_rule_inv_sum(float l) { return l > 0.0f ? 1.0f / l : 0.0f; }

#endif /* DHSA_RULES_H */
