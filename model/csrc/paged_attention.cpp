// Fused decode attention over the paged KV cache (CPU), built on first use by model/paged_kernel.py.
//
// paged_decode_attention(q (D, nh, hd) scaled, kv_cache (2 nkv, slots, hd), block_tables (D, nb) int64,
//                        context_lens (D,) int64, block_size) -> (D, nh * hd)
//
// Row d attends to the first context_lens[d] tokens of its block table; token t lives in slot
// block_tables[d][t / block_size] * block_size + t % block_size. K and V rows are read straight from the
// cache (no gathered copy), once per (row, kv head): the g query heads of a KV head are computed
// together. The softmax is online (running max and sum per query head, in float32), over tiles of 16
// tokens: scores of a tile, one rescale of the accumulators, then P @ V of the tile.
// Work is split over (row, kv head) with at::parallel_for. bfloat16 and float32; fp32 accumulation.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int TILE = 16;
#ifndef PAGED_ATTN_AHEAD
#define PAGED_ATTN_AHEAD 2
#endif

struct Problem {
  int64_t nh, nkv, hd, block_size;
  int64_t slots;             // rows per head in the cache
  int64_t head_stride;       // elements between heads of the cache
  int64_t row_stride;        // elements between slots of the cache
  int64_t table_stride;      // elements between rows of block_tables (0 when one table is shared)
  int64_t q_head_stride;     // elements between query heads of q (q may be a slice of the fused qkv)
  const int64_t* tables;
  const int64_t* lens;
};

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Slot of token t of a row whose block table starts at `table`.
inline int64_t slot_of(const int64_t* table, int64_t t, int64_t bs) {
  return table[t / bs] * bs + t % bs;
}

// ---- portable path: any g and hd -------------------------------------------------------------------
template <typename scalar_t>
void attend_scalar(const scalar_t* q, const scalar_t* cache, const Problem& p, int64_t d, int64_t h,
                   scalar_t* out) {
  const int64_t g = p.nh / p.nkv, hd = p.hd, len = p.lens[d];
  const int64_t* table = p.tables + d * p.table_stride;
  const scalar_t* kbase = cache + h * p.head_stride;
  const scalar_t* vbase = cache + (p.nkv + h) * p.head_stride;
  std::vector<float> qf(g * hd), acc(g * hd, 0.f), m(g, -std::numeric_limits<float>::infinity()),
      l(g, 0.f), s(g * TILE);
  for (int64_t j = 0; j < g; ++j)
    for (int64_t c = 0; c < hd; ++c) qf[j * hd + c] = to_float(q[j * p.q_head_stride + c]);
  for (int64_t t0 = 0; t0 < len; t0 += TILE) {
    const int64_t n = std::min<int64_t>(TILE, len - t0);
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* k = kbase + slot_of(table, t0 + t, p.block_size) * p.row_stride;
      for (int64_t j = 0; j < g; ++j) {
        float dot = 0.f;
        for (int64_t c = 0; c < hd; ++c) dot += qf[j * hd + c] * to_float(k[c]);
        s[j * TILE + t] = dot;
      }
    }
    for (int64_t j = 0; j < g; ++j) {
      float mt = m[j];
      for (int64_t t = 0; t < n; ++t) mt = std::max(mt, s[j * TILE + t]);
      const float alpha = std::exp(m[j] - mt);  // exp(-inf) = 0 on the first tile
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) sum += (s[j * TILE + t] = std::exp(s[j * TILE + t] - mt));
      l[j] = l[j] * alpha + sum;
      m[j] = mt;
      for (int64_t c = 0; c < hd; ++c) acc[j * hd + c] *= alpha;
    }
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* v = vbase + slot_of(table, t0 + t, p.block_size) * p.row_stride;
      for (int64_t j = 0; j < g; ++j) {
        const float pj = s[j * TILE + t];
        for (int64_t c = 0; c < hd; ++c) acc[j * hd + c] += pj * to_float(v[c]);
      }
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
    for (int64_t c = 0; c < hd; ++c) out[j * hd + c] = static_cast<scalar_t>(acc[j * hd + c] * inv);
  }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// a K or V row into L2 ahead of its use (both vector paths)
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T1);
}

#endif

#ifdef __AVX512F__
// ---- AVX-512 path: G query heads per KV head, hd = 16 * NC ------------------------------------------
//
// Per tile of 16 tokens: the G x 16 dot products as 16-lane partial sums, reduced by a transpose tree
// into one score vector per query head; one online-softmax update per head; then P @ V with fp32 FMAs.
// The next tile's K and V rows are prefetched, since blocks are scattered and each starts with a miss.

// NC vectors of 16 floats from one cache row. bf16 rows with even NC are widened with two unpacks per
// 32 values, which permutes the dimensions; dim_of maps (vector, lane) back to the dimension.
template <typename scalar_t, int NC>
struct Rows;

template <int NC>
struct Rows<float, NC> {
  static void load(const float* x, __m512* out) {
    for (int c = 0; c < NC; ++c) out[c] = _mm512_loadu_ps(x + 16 * c);
  }
  static int dim_of(int c, int i) { return 16 * c + i; }
};

template <int NC>
struct Rows<c10::BFloat16, NC> {
  static constexpr bool kPaired = NC % 2 == 0;
  static void load(const c10::BFloat16* x, __m512* out) {
    if constexpr (kPaired) {
      const __m512i zero = _mm512_setzero_si512();
      for (int r = 0; r < NC / 2; ++r) {
        const __m512i raw = _mm512_loadu_si512(x + 32 * r);
        out[2 * r] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw));  // bf16 << 16 is its fp32
        out[2 * r + 1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw));
      }
    } else {
      for (int c = 0; c < NC; ++c) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * c));
        out[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      }
    }
  }
  static int dim_of(int c, int i) {
    if constexpr (kPaired) return 32 * (c / 2) + 8 * (i / 4) + 4 * (c % 2) + i % 4;
    return 16 * c + i;
  }
};

// q . k for the G query heads of a KV head, as 16-lane partial sums (their lanes add up to the dot).
template <typename scalar_t, int G, int NC>
struct QueryDots {
  __m512 qv[G][NC];
  QueryDots(const scalar_t* q, int64_t head_stride) {
    for (int j = 0; j < G; ++j) Rows<scalar_t, NC>::load(q + j * head_stride, qv[j]);
  }
  void dots(const scalar_t* k_row, __m512* out) const {
    __m512 k[NC];
    Rows<scalar_t, NC>::load(k_row, k);
    for (int j = 0; j < G; ++j) {
      out[j] = _mm512_mul_ps(qv[j][0], k[0]);
      for (int c = 1; c < NC; ++c) out[j] = _mm512_fmadd_ps(qv[j][c], k[c], out[j]);
    }
  }
};

#ifdef __AVX512BF16__
// bf16 q . k straight from the raw rows: each vdpbf16ps adds 32 exact products into 16 fp32 lanes.
template <int G, int NC>
  requires(NC % 2 == 0)
struct QueryDots<c10::BFloat16, G, NC> {
  __m512bh qb[G][NC / 2];
  QueryDots(const c10::BFloat16* q, int64_t head_stride) {
    for (int j = 0; j < G; ++j)
      for (int r = 0; r < NC / 2; ++r) qb[j][r] = (__m512bh)_mm512_loadu_si512(q + j * head_stride + 32 * r);
  }
  void dots(const c10::BFloat16* k_row, __m512* out) const {
    for (int j = 0; j < G; ++j) out[j] = _mm512_setzero_ps();
    for (int r = 0; r < NC / 2; ++r) {
      const __m512bh k = (__m512bh)_mm512_loadu_si512(k_row + 32 * r);
      for (int j = 0; j < G; ++j) out[j] = _mm512_dpbf16_ps(out[j], qb[j][r], k);
    }
  }
};
#endif

// 16 vectors -> one vector whose lane t is the sum of the lanes of x[t] (a transpose-and-add tree).
inline __m512 reduce16(const __m512* x) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of x = x[2i], y = x[2i+1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane sums of 4 consecutive vectors
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // [A0+A1, A2+A3, B0+B1, B2+B3] over the 128-bit lanes of b[2i], b[2i+1]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

#ifdef __AVX512BF16__
template <typename scalar_t, int NC>
constexpr bool kPairedBf16 = std::is_same_v<scalar_t, c10::BFloat16> && NC % 2 == 0;

// bf16 P @ V two tokens at a time: interleaving the V rows of tokens t and t+1 (unpacklo/hi_epi16) gives
// the same permuted dims as Rows<bf16>::load, and vdpbf16ps against the broadcast pair (p_t, p_t+1) adds
// both tokens' products into fp32 lanes. P is rounded to bf16 first, as the torch path's bmm does.
template <int G, int NC>
inline void pv_bf16_pairs(const c10::BFloat16* const* rows, int n, int64_t voff, const float (*probs)[TILE],
                          __m512 (*acc)[NC]) {
  alignas(64) uint32_t pairs[G][TILE / 2];
  for (int j = 0; j < G; ++j)
    _mm256_store_si256(reinterpret_cast<__m256i*>(pairs[j]),
                       (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(probs[j])));
  for (int t = 0; t < n; t += 2) {
    const c10::BFloat16* v0 = rows[t] + voff;
    const c10::BFloat16* v1 = (t + 1 < n ? rows[t + 1] : rows[t]) + voff;  // its p is 0 past n
    for (int r = 0; r < NC / 2; ++r) {
      const __m512i a = _mm512_loadu_si512(v0 + 32 * r), b = _mm512_loadu_si512(v1 + 32 * r);
      const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
      for (int j = 0; j < G; ++j) {
        const __m512bh pj = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[j][t / 2]));
        acc[j][2 * r] = _mm512_dpbf16_ps(acc[j][2 * r], lo, pj);
        acc[j][2 * r + 1] = _mm512_dpbf16_ps(acc[j][2 * r + 1], hi, pj);
      }
    }
  }
}
#endif

template <typename scalar_t, int G, int NC>
void attend_avx512(const scalar_t* q, const scalar_t* cache, const Problem& p, int64_t d, int64_t h,
                   scalar_t* out) {
  using R = Rows<scalar_t, NC>;
  constexpr int HD = 16 * NC;
  const int64_t len = p.lens[d], bs = p.block_size, row_bytes = HD * sizeof(scalar_t);
  const int64_t* table = p.tables + d * p.table_stride;
  const scalar_t* kbase = cache + h * p.head_stride;
  const int64_t voff = p.nkv * p.head_stride;  // V head h sits nkv heads after K head h
  const QueryDots<scalar_t, G, NC> qd(q, p.q_head_stride);
  __m512 acc[G][NC];
  float m[G], l[G];
  for (int j = 0; j < G; ++j) {
    m[j] = -std::numeric_limits<float>::infinity();
    l[j] = 0.f;
    for (int c = 0; c < NC; ++c) acc[j][c] = _mm512_setzero_ps();
  }
  // Row pointers of the tiles in flight: tile k lives in rows[k % RING] and is prefetched AHEAD tiles
  // before it is used (one tile of compute is shorter than a DRAM miss).
  constexpr int AHEAD = PAGED_ATTN_AHEAD, RING = AHEAD + 1;
  const scalar_t* rows[RING][TILE];
  auto fill_rows = [&](int64_t t0, const scalar_t** r) {
    const int n = static_cast<int>(std::min<int64_t>(TILE, len - t0));
    for (int t = 0; t < n; ++t) {
      r[t] = kbase + slot_of(table, t0 + t, bs) * p.row_stride;
      prefetch_row(r[t], row_bytes);
      prefetch_row(r[t] + voff, row_bytes);
    }
  };
  for (int k = 0; k < AHEAD && k * TILE < len; ++k) fill_rows(k * TILE, rows[k]);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t0 = 0, k = 0; t0 < len; t0 += TILE, ++k) {
    const int n = static_cast<int>(std::min<int64_t>(TILE, len - t0));
    if (t0 + AHEAD * TILE < len) fill_rows(t0 + AHEAD * TILE, rows[(k + AHEAD) % RING]);
    const scalar_t* const* r = rows[k % RING];
    __m512 scores[G];
    {
      __m512 dots[G][TILE];
      for (int t = 0; t < n; ++t) {
        __m512 dt[G];
        qd.dots(r[t], dt);
        for (int j = 0; j < G; ++j) dots[j][t] = dt[j];
      }
      for (int t = n; t < TILE; ++t)
        for (int j = 0; j < G; ++j) dots[j][t] = _mm512_setzero_ps();
      for (int j = 0; j < G; ++j) scores[j] = reduce16(dots[j]);
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
    alignas(64) float probs[G][TILE];
    for (int j = 0; j < G; ++j) {
      const __m512 sv = _mm512_mask_mov_ps(ninf, valid, scores[j]);
      const float mt = std::max(m[j], _mm512_reduce_max_ps(sv));
      const float alpha = std::exp(m[j] - mt);  // 0 on the first tile
      const __m512 pv = _mm512_maskz_mov_ps(valid, smollm2::exp16(_mm512_sub_ps(sv, _mm512_set1_ps(mt))));
      l[j] = l[j] * alpha + _mm512_reduce_add_ps(pv);
      m[j] = mt;
      _mm512_store_ps(probs[j], pv);
      const __m512 a = _mm512_set1_ps(alpha);
      for (int c = 0; c < NC; ++c) acc[j][c] = _mm512_mul_ps(acc[j][c], a);
    }
#ifdef __AVX512BF16__
    if constexpr (kPairedBf16<scalar_t, NC>) {
      pv_bf16_pairs<G, NC>(r, n, voff, probs, acc);
      continue;
    }
#endif
    for (int t = 0; t < n; ++t) {
      __m512 v[NC];
      R::load(r[t] + voff, v);
      for (int j = 0; j < G; ++j) {
        const __m512 pj = _mm512_set1_ps(probs[j][t]);
        for (int c = 0; c < NC; ++c) acc[j][c] = _mm512_fmadd_ps(pj, v[c], acc[j][c]);
      }
    }
  }
  for (int j = 0; j < G; ++j) {
    const __m512 inv = _mm512_set1_ps(l[j] > 0.f ? 1.f / l[j] : 0.f);
    alignas(64) float o[HD];
    for (int c = 0; c < NC; ++c) _mm512_store_ps(o + 16 * c, _mm512_mul_ps(acc[j][c], inv));
    for (int c = 0; c < NC; ++c)
      for (int i = 0; i < 16; ++i) out[j * HD + R::dim_of(c, i)] = static_cast<scalar_t>(o[16 * c + i]);
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// ---- AVX2 path: G query heads per KV head, hd = 8 * NC ---------------------------------------------
//
// As the AVX-512 path in 8 lanes, with 16 registers: per token the G dots run over the row's NC vectors
// (q in a float32 array, read from L1) and are summed across lanes; P @ V goes one 8-dim slice at a time
// through the tile's tokens, so only G accumulators are live (the rest in a float32 array).
using smollm2::load8;

template <typename scalar_t, int G, int NC>
void attend_avx2(const scalar_t* q, const scalar_t* cache, const Problem& p, int64_t d, int64_t h,
                 scalar_t* out) {
  constexpr int HD = 8 * NC;
  const int64_t len = p.lens[d], bs = p.block_size, row_bytes = HD * sizeof(scalar_t);
  const int64_t* table = p.tables + d * p.table_stride;
  const scalar_t* kbase = cache + h * p.head_stride;
  const int64_t voff = p.nkv * p.head_stride;  // V head h sits nkv heads after K head h
  alignas(32) float qf[G][HD], acc[G][HD];
  float m[G], l[G];
  for (int j = 0; j < G; ++j) {
    for (int c = 0; c < NC; ++c) {
      _mm256_store_ps(qf[j] + 8 * c, load8(q + j * p.q_head_stride + 8 * c));
      _mm256_store_ps(acc[j] + 8 * c, _mm256_setzero_ps());
    }
    m[j] = -std::numeric_limits<float>::infinity();
    l[j] = 0.f;
  }
  const scalar_t* rows[2][TILE];  // this tile's rows and the next one's, prefetched a tile ahead
  auto fill_rows = [&](int64_t t0, const scalar_t** r) {
    const int n = static_cast<int>(std::min<int64_t>(TILE, len - t0));
    for (int t = 0; t < n; ++t) {
      r[t] = kbase + slot_of(table, t0 + t, bs) * p.row_stride;
      prefetch_row(r[t], row_bytes);
      prefetch_row(r[t] + voff, row_bytes);
    }
  };
  if (len > 0) fill_rows(0, rows[0]);
  for (int64_t t0 = 0, k = 0; t0 < len; t0 += TILE, ++k) {
    const int n = static_cast<int>(std::min<int64_t>(TILE, len - t0));
    if (t0 + TILE < len) fill_rows(t0 + TILE, rows[(k + 1) % 2]);
    const scalar_t* const* r = rows[k % 2];
    alignas(32) float probs[G][TILE];
    for (int t = 0; t < n; ++t) {
      __m256 dot[G];
      for (int j = 0; j < G; ++j) dot[j] = _mm256_setzero_ps();
      for (int c = 0; c < NC; ++c) {
        const __m256 kv = load8(r[t] + 8 * c);
        for (int j = 0; j < G; ++j) dot[j] = _mm256_fmadd_ps(_mm256_load_ps(qf[j] + 8 * c), kv, dot[j]);
      }
      for (int j = 0; j < G; ++j) probs[j][t] = smollm2::hsum8(dot[j]);
    }
    for (int j = 0; j < G; ++j) {
      float mt = m[j];
      for (int t = 0; t < n; ++t) mt = std::max(mt, probs[j][t]);
      const float alpha = std::exp(m[j] - mt);  // 0 on the first tile
      for (int t = n; t < TILE; ++t) probs[j][t] = -std::numeric_limits<float>::infinity();
      const __m256 mv = _mm256_set1_ps(mt);
      const __m256 p0 = smollm2::exp8(_mm256_sub_ps(_mm256_load_ps(probs[j]), mv));
      const __m256 p1 = smollm2::exp8(_mm256_sub_ps(_mm256_load_ps(probs[j] + 8), mv));
      // exp8 clamps its argument, so the -inf past n comes back as a tiny number: those are zeroed
      const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 nv = _mm256_set1_ps(static_cast<float>(n));
      const __m256 q0 = _mm256_and_ps(p0, _mm256_cmp_ps(lane, nv, _CMP_LT_OQ));
      const __m256 q1 = _mm256_and_ps(p1, _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(8.f)), nv, _CMP_LT_OQ));
      _mm256_store_ps(probs[j], q0);
      _mm256_store_ps(probs[j] + 8, q1);
      l[j] = l[j] * alpha + smollm2::hsum8(_mm256_add_ps(q0, q1));
      m[j] = mt;
      const __m256 a = _mm256_set1_ps(alpha);
      for (int c = 0; c < NC; ++c) _mm256_store_ps(acc[j] + 8 * c, _mm256_mul_ps(_mm256_load_ps(acc[j] + 8 * c), a));
    }
    for (int c = 0; c < NC; ++c) {
      __m256 a[G];
      for (int j = 0; j < G; ++j) a[j] = _mm256_load_ps(acc[j] + 8 * c);
      for (int t = 0; t < n; ++t) {
        const __m256 v = load8(r[t] + voff + 8 * c);
        for (int j = 0; j < G; ++j) a[j] = _mm256_fmadd_ps(_mm256_set1_ps(probs[j][t]), v, a[j]);
      }
      for (int j = 0; j < G; ++j) _mm256_store_ps(acc[j] + 8 * c, a[j]);
    }
  }
  for (int j = 0; j < G; ++j) {
    const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
    for (int c = 0; c < HD; ++c) out[j * HD + c] = static_cast<scalar_t>(acc[j][c] * inv);
  }
}
#endif

template <typename scalar_t>
using AttendFn = void (*)(const scalar_t*, const scalar_t*, const Problem&, int64_t, int64_t, scalar_t*);

template <typename scalar_t>
AttendFn<scalar_t> pick_kernel(int64_t g, int64_t hd) {
// (query heads per KV head, head_dim) with a vector kernel: SmolLM2-135M (9 query heads over 3 KV heads,
// head_dim 64), the tests' tiny configs, head_dim 128 models
#define SMOLLM2_SHAPES(X) X(3, 64) X(1, 64) X(3, 16) X(1, 16) X(4, 64) X(2, 64) X(4, 128) X(1, 128)
#ifdef __AVX512F__
#define SMOLLM2_CASE(G, HD) \
  if (g == G && hd == HD) return &attend_avx512<scalar_t, G, HD / 16>;
  SMOLLM2_SHAPES(SMOLLM2_CASE)
#undef SMOLLM2_CASE
#elif defined(__AVX2__) && defined(__FMA__)
#define SMOLLM2_CASE(G, HD) \
  if (g == G && hd == HD) return &attend_avx2<scalar_t, G, HD / 8>;
  SMOLLM2_SHAPES(SMOLLM2_CASE)
#undef SMOLLM2_CASE
#endif
#undef SMOLLM2_SHAPES
  return &attend_scalar<scalar_t>;
}

template <typename scalar_t>
void run(const at::Tensor& q, const at::Tensor& cache, at::Tensor& out, const Problem& p) {
  const int64_t D = q.size(0), g = p.nh / p.nkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* cp = cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const AttendFn<scalar_t> fn = pick_kernel<scalar_t>(g, p.hd);
  const int64_t q_row_stride = q.stride(0);
  // Rows differ in length (a step mixes decodes with long contexts and prompt rows with short ones), so the
  // (row, KV head) items are split into one contiguous chunk per thread of about equal work (tokens read,
  // plus a per-item overhead of ~16 tokens' worth), not of equal count.
  constexpr int64_t kItemCost = 16;
  int64_t work = 0;
  for (int64_t d = 0; d < D; ++d) work += (p.lens[d] + kItemCost) * p.nkv;
  // A fork costs a few microseconds: below ~1k (token, KV head) pairs (~20 us) one thread does it all.
  const int64_t chunks = work < 1024 ? 1 : std::min<int64_t>(at::get_num_threads(), D * p.nkv);
  std::vector<int64_t> bounds(chunks + 1, D * p.nkv);
  bounds[0] = 0;
  for (int64_t d = 0, c = 1, done = 0; d < D && c < chunks; ++d) {
    done += (p.lens[d] + kItemCost) * p.nkv;
    while (c < chunks && done * chunks >= work * c) bounds[c++] = (d + 1) * p.nkv;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t i = bounds[c0]; i < bounds[c1]; ++i) {
      const int64_t d = i / p.nkv, h = i % p.nkv;
      fn(qp + d * q_row_stride + h * g * p.q_head_stride, cp, p, d, h, op + (d * p.nh + h * g) * p.hd);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  int64_t block_size) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "paged_decode_attention is CPU only");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 3, "q (D, nh, hd) and kv_cache (2 nkv, slots, hd)");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "q and kv_cache must share a dtype");
  TORCH_CHECK(q.stride(2) == 1, "q rows must be contiguous");
  TORCH_CHECK(kv_cache.stride(2) == 1, "kv_cache rows must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.stride(1) == 1, "block_tables (D, nb), rows contiguous");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.is_contiguous(), "context_lens (D,) contiguous");
  const int64_t D = q.size(0), nh = q.size(1), hd = q.size(2), nkv = kv_cache.size(0) / 2;
  TORCH_CHECK(kv_cache.size(0) == 2 * nkv && kv_cache.size(2) == hd, "kv_cache shape mismatch");
  TORCH_CHECK(nkv > 0 && nh % nkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.size(0) == D && context_lens.size(0) == D, "one table and length per row");
  TORCH_CHECK(block_size > 0 && kv_cache.size(1) % block_size == 0, "bad block_size");
  Problem p{nh, nkv, hd, block_size, kv_cache.size(1), kv_cache.stride(0), kv_cache.stride(1),
            block_tables.stride(0), q.stride(1), block_tables.data_ptr<int64_t>(),
            context_lens.data_ptr<int64_t>()};
  // Out-of-range lengths or block ids would read outside the cache: check the used entries up front.
  const int64_t nb = block_tables.size(1), num_blocks = p.slots / block_size;
  for (int64_t d = 0; d < D; ++d) {
    const int64_t len = p.lens[d];
    TORCH_CHECK(len >= 0 && len <= nb * block_size, "context length ", len, " exceeds the block table");
    for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) {
      const int64_t id = p.tables[d * p.table_stride + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block id ", id, " out of range");
    }
  }
  at::Tensor out = at::empty({D, nh * hd}, q.options());
  if (q.scalar_type() == at::kFloat) {
    run<float>(q, kv_cache, out, p);
  } else if (q.scalar_type() == at::kBFloat16) {
    run<c10::BFloat16>(q, kv_cache, out, p);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(smollm2, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor context_lens, "
        "int block_size) -> Tensor",
        &paged_decode_attention);
}
