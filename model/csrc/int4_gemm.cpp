// The serving path's int4 GEMM and its int8 LM head (CPU: AVX512-VNNI, else AVX2), built with the other
// kernels by model/paged_kernel.py.
//
// int4_linear(x (M, K) bfloat16, packed (N / 16, K / 32, 4, 64) uint8, scales (N / 16, K / 32, 2, 16)
//             bfloat16) -> (M, N) bfloat16:
//   y = x @ W^T for W[n, k] = q[n, k] * d[n, g] + m[n, g], g = k / 32, q in 0..15 (pack_int4_tiles in
//   model/quant.py). Per tile of 16 outputs and group of 32 inputs the 512 nibbles are 4 chunks of 64
//   bytes: byte 4 o + b of chunk c holds output o's weight at input 4 c + b (low nibble) and at
//   4 (c + 4) + b (high nibble), the lane order of vpdpbusd. scales holds the 16 outputs' d, then their m.
//
// int8_tiles_linear(x (M, K) bfloat16, packed (N / 16, K / 32, 8, 64) uint8, scales (N / 16, K / 32, 16)
//                   float32) -> (M, N) float32:
//   y = x @ W^T for W[n, k] = q[n, k] * d[n, g], q in -127..127 stored as q + 128 (pack_int8_tiles): the
//   LM head (Q8_0 in the GGUF). Chunk c of a tile and group holds input quad c, as above.
//
// Why not torch's _weight_int4pack_mm_for_cpu, nor widening nibbles to bfloat16 for vdpbf16ps: at one
// stream a decode step streams the weights, and both spend more instructions per weight than the memory
// takes to deliver it (bench/NOTES.md). Here vpdpbusd multiplies 64 nibbles by broadcast quads of int8 x
// into exact int32 sums. Each row of x is quantized per group of 32 as llama.cpp does for its 4-bit
// formats (dx = max |x| / 127), plus a second int8 term for the remainder in steps of dx / 254:
//   sum_k W[n, k] x[k] = sum_g d[n, g] * dx[g] * sum_{k in g} q[n, k] (qx[k] + qr[k] / 254) + m[n, g] * xsum[g]
// with xsum[g] the float32 sum of the group's x. x is then within dx / 508 of itself, far under bfloat16's
// own rounding; one int8 term alone moved the real model's logits well past bf16's differences (its hidden
// states have outlier channels). Sums are float32; the output is rounded to bfloat16 (nearest even).
// Threads split the tiles; rows go through each panel of tiles in blocks of up to 4, so the panel is read
// from memory once. Past kVnniRows rows on CPUs with AMX, int4_linear (and int4_linear_swiglu) run on the
// tile unit instead, each weight tile dequantized to bf16 in cache (int4_amx below).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define SMOLLM2_HAVE_INT4_GEMM 1
#define SMOLLM2_INT4_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SMOLLM2_HAVE_INT4_GEMM 1
#define SMOLLM2_INT4_AVX2 1
#endif

#include "amx.h"
#include "vec_math.h"

namespace {

constexpr int64_t kGroup = 32;
// Up to this many rows int4_linear multiplies with vpdpbusd, beyond them on the AMX tile unit where there is
// one (bench/NOTES.md)
constexpr int64_t kVnniRows = 8;
constexpr int64_t kChunk = 64;  // bytes per chunk: 16 outputs x one k-quad of int8, or two of int4

#ifdef SMOLLM2_HAVE_INT4_GEMM
// x's rows quantized by quantize_row: row r's qx at q + 2 r K, its qr at q + (2 r + 1) K; dx, xsum and corr
// at stats + (0, 1, 2) * M * G + r * G.
struct QuantRows {
  const int8_t* q;
  const float* stats;
  int64_t M, K, G;
  QuantRows rows_from(int64_t m0) const { return {q + 2 * m0 * K, stats + m0 * G, M, K, G}; }
  const int8_t* qx(int r) const { return q + 2 * r * K; }
  float dx(int r, int64_t g) const { return stats[r * G + g]; }
  float xsum(int r, int64_t g) const { return stats[M * G + r * G + g]; }
  float corr(int r, int64_t g) const { return stats[2 * M * G + r * G + g]; }
};

inline int32_t quad(const int8_t* p) { return *reinterpret_cast<const int32_t*>(p); }
#endif

#ifdef SMOLLM2_INT4_AVX512
using smollm2::load_bf16;

// One row of x (K bfloat16) -> per group of 32: qx (32 int8) and its remainder qr (32 int8), dx, xsum and
// corr: x ~ dx * (qx + qr / 254). (A single int8 term is too coarse for the real model, whose activations
// have outlier channels; the remainder brings x's error to dx / 508, far under bf16's own.)
// corr = 128 * (sum qx + sum qr / 254) takes off the 128 by which int8 weights are stored as u8.
void quantize_row(const uint16_t* x, int64_t K, int8_t* qx, int8_t* qr, float* dx, float* xsum, float* corr) {
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m512 v[2];
    for (int h = 0; h < 2; ++h) v[h] = load_bf16(x + g * kGroup + 16 * h);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    const float d = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    const __m512 inv_r = _mm512_set1_ps(d > 0.f ? 254.f / d : 0.f);
    __m512i sq = _mm512_setzero_si512(), sr = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      const __m512 t = _mm512_mul_ps(v[h], inv);
      const __m512 q = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      // remainder in units of dx / 254: |x / dx - q| <= 1/2 (a little more from float32 rounding), so
      // within -127..127 after rounding; saturation guards the edge
      const __m512 r = _mm512_mul_ps(_mm512_fnmadd_ps(q, _mm512_set1_ps(d), v[h]), inv_r);
      const __m128i q8 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q));
      const __m128i r8 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qx + g * kGroup + 16 * h), q8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + g * kGroup + 16 * h), r8);
      sq = _mm512_add_epi32(sq, _mm512_cvtepi8_epi32(q8));
      sr = _mm512_add_epi32(sr, _mm512_cvtepi8_epi32(r8));
    }
    dx[g] = d;
    xsum[g] = _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
    corr[g] = 128.f * (static_cast<float>(_mm512_reduce_add_epi32(sq)) +
                       static_cast<float>(_mm512_reduce_add_epi32(sr)) / 254.f);
  }
}


// MR rows x NT tiles: out[r, 16 (t0 + j) + c] for r < MR, j < NT.
//   INT8 = false: int4 weights (4 chunks of 64 bytes per tile and group, two k-quads each; scales: d, m as
//   bfloat16), bfloat16 out.
//   INT8 = true: int8 weights stored as u8 (w + 128; 8 chunks of 64 bytes, one k-quad each; scales: d as
//   float32), float32 out.
// Weights are read this many groups ahead of their use: each tile is its own stream of a few KB, too short
// for the hardware prefetcher to ramp up on (bench/NOTES.md)
constexpr int64_t kPrefetchGroups = 4;

template <bool INT8, int MR, int NT>
inline void block(const QuantRows& x, const uint8_t* __restrict w, const void* __restrict scales, int64_t t0,
                  void* __restrict out, int64_t N) {
  constexpr int64_t chunks = INT8 ? 8 : 4;
  const int64_t G = x.G, K = x.K;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512 rem = _mm512_set1_ps(1.f / 254.f);
  __m512 acc[MR][NT];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NT; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i part[MR][NT], part_r[MR][NT];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NT; ++j) part[r][j] = part_r[r][j] = _mm512_setzero_si512();
    for (int j = 0; j < NT; ++j)
      for (int c = 0; c < chunks; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(w + ((t0 + j) * G + g + kPrefetchGroups) * chunks * kChunk +
                                                   c * kChunk),
                     _MM_HINT_T0);
    for (int c = 0; c < chunks; ++c) {
      for (int j = 0; j < NT; ++j) {
        const __m512i v = _mm512_loadu_si512(w + ((t0 + j) * G + g) * chunks * kChunk + c * kChunk);
        for (int r = 0; r < MR; ++r) {
          const int8_t* xq = x.qx(r) + g * kGroup + 4 * c;  // this chunk's k-quad (the low nibbles' for int4)
          if constexpr (INT8) {
            part[r][j] = _mm512_dpbusd_epi32(part[r][j], v, _mm512_set1_epi32(quad(xq)));
            part_r[r][j] = _mm512_dpbusd_epi32(part_r[r][j], v, _mm512_set1_epi32(quad(xq + K)));
          } else {
            const __m512i lo = _mm512_and_si512(v, low);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            part[r][j] = _mm512_dpbusd_epi32(part[r][j], lo, _mm512_set1_epi32(quad(xq)));
            part[r][j] = _mm512_dpbusd_epi32(part[r][j], hi, _mm512_set1_epi32(quad(xq + 16)));
            part_r[r][j] = _mm512_dpbusd_epi32(part_r[r][j], lo, _mm512_set1_epi32(quad(xq + K)));
            part_r[r][j] = _mm512_dpbusd_epi32(part_r[r][j], hi, _mm512_set1_epi32(quad(xq + K + 16)));
          }
        }
      }
    }
    for (int j = 0; j < NT; ++j) {
      if constexpr (INT8) {
        const __m512 d = _mm512_loadu_ps(static_cast<const float*>(scales) + ((t0 + j) * G + g) * 16);
        for (int r = 0; r < MR; ++r) {
          __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part_r[r][j]), rem, _mm512_cvtepi32_ps(part[r][j]));
          sum = _mm512_sub_ps(sum, _mm512_set1_ps(x.corr(r, g)));
          acc[r][j] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(x.dx(r, g))), acc[r][j]);
        }
      } else {
        const uint16_t* sg = static_cast<const uint16_t*>(scales) + ((t0 + j) * G + g) * 32;
        const __m512 d = load_bf16(sg);
        const __m512 m = load_bf16(sg + 16);
        for (int r = 0; r < MR; ++r) {
          const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part_r[r][j]), rem, _mm512_cvtepi32_ps(part[r][j]));
          acc[r][j] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(x.dx(r, g))), acc[r][j]);
          acc[r][j] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.xsum(r, g)), acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NT; ++j) {
      if constexpr (INT8)
        _mm512_storeu_ps(static_cast<float*>(out) + r * N + 16 * (t0 + j), acc[r][j]);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + r * N + 16 * (t0 + j)),
                            (__m256i)_mm512_cvtneps_pbh(acc[r][j]));
    }
}

// MR rows of x through tiles [t0, t1), NT at a time
template <bool INT8, int MR, int NT>
void rows_through(const QuantRows& x, const uint8_t* w, const void* s, int64_t t0, int64_t t1, void* out,
                  int64_t N) {
  int64_t t = t0;
  for (; t + NT <= t1; t += NT) block<INT8, MR, NT>(x, w, s, t, out, N);
  for (; t < t1; ++t) block<INT8, MR, 1>(x, w, s, t, out, N);
}

constexpr int64_t kRowBlock = 4;  // rows per pass over a panel of tiles

template <bool INT8>
void rows_block(int64_t mr, const QuantRows& x, const uint8_t* w, const void* s, int64_t t0, int64_t t1, void* out,
                int64_t N) {
  switch (mr) {
    case 1: return rows_through<INT8, 1, 1>(x, w, s, t0, t1, out, N);  // one stream: read in order
    case 2: return rows_through<INT8, 2, 2>(x, w, s, t0, t1, out, N);
    case 3: return rows_through<INT8, 3, 1>(x, w, s, t0, t1, out, N);
    default: return rows_through<INT8, 4, 1>(x, w, s, t0, t1, out, N);
  }
}

#endif  // SMOLLM2_INT4_AVX512

#ifdef SMOLLM2_INT4_AVX2
// ---- AVX2 + FMA (CPUs without AVX512-VNNI/BF16: AMD Zen 2/3, Intel before Sapphire Rapids) ---------------
//
// The same packed layouts and the same integer sums, without vpdpbusd: vpmaddubsw multiplies unsigned bytes
// by signed ones into pairs of int16, vpmaddwd adds pairs of those into the int32 lanes vpdpbusd fills (one
// output's k-quad per lane). int4: a nibble (0..15) times an int8 term (-128..127) is at most 1,920 in size,
// so the 8 products per lane of a whole group sum in int16 (30,720 < 32,767) before one vpmaddwd. int8 (the
// LM head): a weight of -127..127 needs the x side unsigned: |x| times the weight with x's sign (vpsignb),
// at most 32,512 per pair, so each k-quad goes to int32 at once. Two 8-lane halves per 16-output tile.

using smollm2::bf16_bits;
using smollm2::hsum8;
using smollm2::load_bf16x8;

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// 4 x 8 int32, in order -> 32 int8 in order, saturated
inline __m256i pack_i8(const __m256i* v) {
  const __m256i ab = _mm256_packs_epi32(v[0], v[1]);  // per 128-bit lane: a b (4 each)
  const __m256i cd = _mm256_packs_epi32(v[2], v[3]);
  const __m256i abcd = _mm256_packs_epi16(ab, cd);  // dwords: a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 c4-7 d4-7
  return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// As the AVX-512 quantize_row: x ~ dx * (qx + qr / 254) per group of 32. corr is 0: the int8 loop below
// takes the weights signed, so nothing of the u8 storage is left to take off.
void quantize_row(const uint16_t* x, int64_t K, int8_t* qx, int8_t* qr, float* dx, float* xsum, float* corr) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m256 v[4];
    for (int h = 0; h < 4; ++h) v[h] = load_bf16x8(x + g * kGroup + 8 * h);
    const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    const float d = hmax8(a) / 127.f;
    const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
    const __m256 inv_r = _mm256_set1_ps(d > 0.f ? 254.f / d : 0.f);
    __m256i q[4], r[4];
    for (int h = 0; h < 4; ++h) {
      const __m256 t = _mm256_round_ps(_mm256_mul_ps(v[h], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[h] = _mm256_cvtps_epi32(t);
      r[h] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_fnmadd_ps(t, _mm256_set1_ps(d), v[h]), inv_r));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qx + g * kGroup), pack_i8(q));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + g * kGroup), pack_i8(r));
    dx[g] = d;
    xsum[g] = hsum8(_mm256_add_ps(_mm256_add_ps(v[0], v[2]), _mm256_add_ps(v[1], v[3])));
    corr[g] = 0.f;
  }
}

// MR rows x NT tiles, as the AVX-512 block. Registers are what bounds it (16): per group and k-chunk the
// chunk's weights (both 8-output halves, split into nibbles) stay in 4 registers while each row's four
// broadcast quads go through them into that row's 4 accumulators, so a multiply reads at most one operand
// from memory. Two rows fill the register file; more would spill. The int16 sums use the saturating add,
// which never saturates here (see above) but, unlike vpaddw, is not associative: the compiler would
// otherwise reorder each chain into a tree of all the products first and spill them.
template <bool INT8, int MR, int NT>
inline void block(const QuantRows& x, const uint8_t* __restrict w, const void* __restrict scales, int64_t t0,
                  void* __restrict out, int64_t N) {
  constexpr int chunks = INT8 ? 8 : 4;
  const int64_t G = x.G, K = x.K;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256 rem = _mm256_set1_ps(1.f / 254.f);
  __m256 acc[MR][NT][2];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NT; ++j) acc[r][j][0] = acc[r][j][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int j = 0; j < NT; ++j) {
      const uint8_t* wg = w + ((t0 + j) * G + g) * chunks * kChunk;
      __m256i p[MR][2], pr[MR][2];  // int4: int16 pairs over the group; int8: int32 lanes
      for (int r = 0; r < MR; ++r) p[r][0] = p[r][1] = pr[r][0] = pr[r][1] = _mm256_setzero_si256();
      for (int c = 0; c < chunks; ++c) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + c * kChunk));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + c * kChunk + 32));
        if constexpr (INT8) {
          const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));  // the stored q + 128 back to q
          const __m256i w0 = _mm256_xor_si256(v0, flip), w1 = _mm256_xor_si256(v1, flip);
          for (int r = 0; r < MR; ++r) {
            const int8_t* xq = x.qx(r) + g * kGroup + 4 * c;
            const __m256i bq = _mm256_set1_epi32(quad(xq));
            const __m256i aq = _mm256_abs_epi8(bq);
            p[r][0] = _mm256_add_epi32(p[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(w0, bq)), ones));
            p[r][1] = _mm256_add_epi32(p[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(w1, bq)), ones));
            const __m256i br = _mm256_set1_epi32(quad(xq + K));
            const __m256i ar = _mm256_abs_epi8(br);
            pr[r][0] = _mm256_add_epi32(pr[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(ar, _mm256_sign_epi8(w0, br)), ones));
            pr[r][1] = _mm256_add_epi32(pr[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(ar, _mm256_sign_epi8(w1, br)), ones));
            asm("" : "+x"(p[r][0]), "+x"(p[r][1]), "+x"(pr[r][0]), "+x"(pr[r][1]));  // as above: keep the chains
          }
        } else {
          const __m256i low = _mm256_set1_epi8(0x0F);
          const __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
          const __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
          for (int r = 0; r < MR; ++r) {
            const int8_t* xq = x.qx(r) + g * kGroup + 4 * c;  // the low nibbles' k-quad; the high ones' at 16
            __m256i b = _mm256_set1_epi32(quad(xq));
            p[r][0] = _mm256_adds_epi16(p[r][0], _mm256_maddubs_epi16(lo0, b));
            p[r][1] = _mm256_adds_epi16(p[r][1], _mm256_maddubs_epi16(lo1, b));
            b = _mm256_set1_epi32(quad(xq + 16));
            p[r][0] = _mm256_adds_epi16(p[r][0], _mm256_maddubs_epi16(hi0, b));
            p[r][1] = _mm256_adds_epi16(p[r][1], _mm256_maddubs_epi16(hi1, b));
            b = _mm256_set1_epi32(quad(xq + K));
            pr[r][0] = _mm256_adds_epi16(pr[r][0], _mm256_maddubs_epi16(lo0, b));
            pr[r][1] = _mm256_adds_epi16(pr[r][1], _mm256_maddubs_epi16(lo1, b));
            b = _mm256_set1_epi32(quad(xq + K + 16));
            pr[r][0] = _mm256_adds_epi16(pr[r][0], _mm256_maddubs_epi16(hi0, b));
            pr[r][1] = _mm256_adds_epi16(pr[r][1], _mm256_maddubs_epi16(hi1, b));
          }
        }
      }
      for (int h = 0; h < 2; ++h) {
        if constexpr (INT8) {
          const __m256 d = _mm256_loadu_ps(static_cast<const float*>(scales) + ((t0 + j) * G + g) * 16 + 8 * h);
          for (int r = 0; r < MR; ++r) {
            const __m256 sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr[r][h]), rem, _mm256_cvtepi32_ps(p[r][h]));
            acc[r][j][h] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(x.dx(r, g))), acc[r][j][h]);
          }
        } else {
          const uint16_t* sg = static_cast<const uint16_t*>(scales) + ((t0 + j) * G + g) * 32;
          const __m256 d = load_bf16x8(sg + 8 * h);
          const __m256 m = load_bf16x8(sg + 16 + 8 * h);
          for (int r = 0; r < MR; ++r) {
            const __m256 sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pr[r][h], ones)), rem,
                                               _mm256_cvtepi32_ps(_mm256_madd_epi16(p[r][h], ones)));
            acc[r][j][h] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(x.dx(r, g))), acc[r][j][h]);
            acc[r][j][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.xsum(r, g)), acc[r][j][h]);
          }
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NT; ++j) {
      if constexpr (INT8) {
        float* o = static_cast<float*>(out) + r * N + 16 * (t0 + j);
        _mm256_storeu_ps(o, acc[r][j][0]);
        _mm256_storeu_ps(o + 8, acc[r][j][1]);
      } else {
        // words: half 0's 0-3, half 1's 0-3, half 0's 4-7, half 1's 4-7 -> in order
        const __m256i both = _mm256_packus_epi32(bf16_bits(acc[r][j][0]), bf16_bits(acc[r][j][1]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + r * N + 16 * (t0 + j)),
                            _mm256_permute4x64_epi64(both, _MM_SHUFFLE(3, 1, 2, 0)));
      }
    }
}

// MR rows of x through tiles [t0, t1), NT at a time
template <bool INT8, int MR, int NT>
void rows_through(const QuantRows& x, const uint8_t* w, const void* s, int64_t t0, int64_t t1, void* out,
                  int64_t N) {
  int64_t t = t0;
  for (; t + NT <= t1; t += NT) block<INT8, MR, NT>(x, w, s, t, out, N);
  for (; t < t1; ++t) block<INT8, MR, 1>(x, w, s, t, out, N);
}

constexpr int64_t kRowBlock = 2;  // rows per pass over a panel of tiles (see block)

template <bool INT8>
void rows_block(int64_t mr, const QuantRows& x, const uint8_t* w, const void* s, int64_t t0, int64_t t1, void* out,
                int64_t N) {
  if (mr == 1) return rows_through<INT8, 1, 1>(x, w, s, t0, t1, out, N);
  return rows_through<INT8, 2, 1>(x, w, s, t0, t1, out, N);
}
#endif  // SMOLLM2_INT4_AVX2

#ifdef SMOLLM2_HAVE_INT4_GEMM
// out (M, N) = x @ W^T for W in tiles (INT8: the int8 layout, else the int4 one); see block.
template <bool INT8>
void tiled_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), T = packed.size(0), G = K / kGroup, N = 16 * T;
  const at::Tensor xc = x.contiguous();
  // per row: int8 terms and remainders (2 K), then dx, xsum and corr (3 G each); kept by the calling thread
  // from call to call, as a decode step makes ~120 of these calls
  thread_local std::vector<int8_t> q_buf;
  thread_local std::vector<float> stats_buf;
  if (static_cast<int64_t>(q_buf.size()) < 2 * M * K) q_buf.resize(2 * M * K);
  if (static_cast<int64_t>(stats_buf.size()) < 3 * M * G) stats_buf.resize(3 * M * G);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  int8_t* qp = q_buf.data();
  float* sp = stats_buf.data();
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xp + m * K, K, qp + 2 * m * K, qp + (2 * m + 1) * K, sp + m * G, sp + (M + m) * G,
                 sp + (2 * M + m) * G);
  const QuantRows rows{qp, sp, M, K, G};
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const void* scp = scales.data_ptr();
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = N * out.element_size();
  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    // a panel of 4 tiles (64 outputs: 20 KB of int4 weights and scales at K = 576) stays in cache while
    // every row block reads it
    for (int64_t p = t0; p < t1; p += 4) {
      const int64_t p1 = std::min<int64_t>(p + 4, t1);
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock)
        rows_block<INT8>(std::min<int64_t>(kRowBlock, M - m0), rows.rows_from(m0), wp, scp, p, p1, op + m0 * row_bytes,
                         N);
    }
  });
}
#endif

#if defined(SMOLLM2_INT4_AVX512) && defined(SMOLLM2_HAVE_AMX)
// Beyond a few rows, on AMX: each weight tile of 16 outputs is dequantized (q * d + m in float32, rounded to
// bf16) into the packed bf16 layout in cache, then goes through the tile unit as the bf16 GEMM's tiles do
// (model/csrc/amx.h). The weights stream as int4, a quarter of the bf16 bytes; the dequantizing costs the
// same whatever the rows, and the tile unit's share grows with them.
// The nibble at bit S of each lane as float32: vpermps reads only an index's low 4 bits, so one permute of
// the table 0 .. 15 masks and converts at once (in place of and + cvtdq2ps); shifts are immediates.
template <int S>
inline __m512 nibble_f32(__m512i v, __m512 table) {
  if constexpr (S == 0) return _mm512_permutexvar_ps(v, table);
  else return _mm512_permutexvar_ps(_mm512_srli_epi32(v, S), table);
}

// One k-pair row of the B tile: inputs 4 c + 2 PB and 4 c + 2 PB + 1 (H = 0) or 16 more (H = 1), q * d + m
// in float32, rounded to bf16 and interleaved to (output, pair) order.
template <int H, int PB>
inline void dequant_pair(__m512i v, __m512 table, __m512 d, __m512 m, __m512i inter, uint16_t* row) {
  constexpr int kShift = 16 * PB + 4 * H;
  const __m512 w0 = _mm512_fmadd_ps(nibble_f32<kShift>(v, table), d, m);
  const __m512 w1 = _mm512_fmadd_ps(nibble_f32<kShift + 8>(v, table), d, m);
  _mm512_store_si512(row, _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(w1, w0)));
}

inline void dequant_tile(const uint8_t* w, const uint16_t* s, int64_t G, uint16_t* out) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i inter = _mm512_load_si512(kInterleave);  // word 2 o + j <- word 16 j + o
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = 0; g < G; ++g) {
    const __m512 d = load_bf16(s + g * 32), m = load_bf16(s + g * 32 + 16);
    uint16_t* rows = out + g * 16 * 32;
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(w + g * 4 * kChunk + c * kChunk);  // lane o: inputs 4 c + b, b < 4
      // row 8 h + 2 c + pb: low nibbles (h = 0) are inputs 4 c + b, high ones 16 + 4 c + b; b = 2 pb, 2 pb + 1
      dequant_pair<0, 0>(v, table, d, m, inter, rows + (2 * c) * 32);
      dequant_pair<0, 1>(v, table, d, m, inter, rows + (2 * c + 1) * 32);
      dequant_pair<1, 0>(v, table, d, m, inter, rows + (8 + 2 * c) * 32);
      dequant_pair<1, 1>(v, table, d, m, inter, rows + (8 + 2 * c + 1) * 32);
    }
  }
}

// SWIGLU: packed is [gate; up] (N = 2 I outputs) and out (M, I) gets silu(gate) * up; unit u is gate tile u
// with up tile u + T / 2.
template <bool SWIGLU>
void int4_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), T = packed.size(0), G = packed.size(1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor tail = smollm2::amx::padded_tail(xc);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  auto tiles = [&](int64_t u, int which, uint16_t* scratch) -> const uint16_t* {
    const int64_t t = SWIGLU ? u + which * (T / 2) : 2 * u + which;
    if (t >= T) return nullptr;
    dequant_tile(wp + t * G * 4 * kChunk, sp + t * G * 32, G, scratch);
    return scratch;
  };
  smollm2::amx::run<SWIGLU>(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
                            smollm2::amx::tail_ptr(tail), M, K, SWIGLU ? T / 2 : (T + 1) / 2, tiles,
                            reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), out.size(1));
}
#endif

bool int4_amx_available() {
#ifdef SMOLLM2_HAVE_INT4_GEMM
  return smollm2::amx::usable();
#else
  return false;
#endif
}

bool int4_gemm_available() {
#ifdef SMOLLM2_HAVE_INT4_GEMM
  return true;
#else
  return false;
#endif
}

void check_x(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const char* op) {
  TORCH_CHECK(int4_gemm_available(), op, " needs a CPU with AVX512-VNNI and AVX512-BF16, or AVX2 and FMA (built -march=native)");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales.device().is_cpu(), "CPU only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be an (M, K) bfloat16 tensor");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(3) == kChunk && packed.size(1) * kGroup == x.size(1),
              "packed must be a contiguous (N / 16, K / 32, chunks, 64) uint8 tensor for x's K");
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  check_x(x, packed, scales, "int4_linear");
  const int64_t T = packed.size(0), G = packed.size(1);
  TORCH_CHECK(packed.size(2) == 4, "packed must be (N / 16, K / 32, 4, 64) (pack_int4_tiles)");
  TORCH_CHECK(scales.dim() == 4 && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() &&
                  scales.size(0) == T && scales.size(1) == G && scales.size(2) == 2 && scales.size(3) == 16,
              "scales must be a contiguous (N / 16, K / 32, 2, 16) bfloat16 tensor");
  at::Tensor out = at::empty({x.size(0), 16 * T}, x.options());
#ifdef SMOLLM2_HAVE_INT4_GEMM
#if defined(SMOLLM2_INT4_AVX512) && defined(SMOLLM2_HAVE_AMX)
  if (x.size(0) > kVnniRows && int4_amx_available()) {
    int4_amx<false>(x, packed, scales, out);
    return out;
  }
#endif
  if (x.size(0) > 0) tiled_linear<false>(x, packed, scales, out);
#endif
  return out;
}

// silu(gate) * up for packed [gate; up] on the AMX tile unit (int4_gemm_amx() only): the SwiGLU as the
// epilogue, with the roundings of int4_linear then smollm2::silu_mul, without writing the (M, 2 I) product.
at::Tensor int4_linear_swiglu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(int4_amx_available(), "int4_linear_swiglu needs the AMX tile unit (int4_gemm_amx())");
  check_x(x, packed, scales, "int4_linear_swiglu");
  const int64_t T = packed.size(0), G = packed.size(1);
  TORCH_CHECK(packed.size(2) == 4 && T % 2 == 0, "packed must be (N / 16, K / 32, 4, 64) for [gate; up], N / 16 even");
  TORCH_CHECK(scales.dim() == 4 && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() &&
                  scales.size(0) == T && scales.size(1) == G && scales.size(2) == 2 && scales.size(3) == 16,
              "scales must be a contiguous (N / 16, K / 32, 2, 16) bfloat16 tensor");
  at::Tensor out = at::empty({x.size(0), 8 * T}, x.options());
#if defined(SMOLLM2_INT4_AVX512) && defined(SMOLLM2_HAVE_AMX)
  if (x.size(0) > 0) int4_amx<true>(x, packed, scales, out);
#endif
  return out;
}

at::Tensor int8_tiles_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  check_x(x, packed, scales, "int8_tiles_linear");
  const int64_t T = packed.size(0), G = packed.size(1);
  TORCH_CHECK(packed.size(2) == 8, "packed must be (N / 16, K / 32, 8, 64) (pack_int8_tiles)");
  TORCH_CHECK(scales.dim() == 3 && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(0) == T && scales.size(1) == G && scales.size(2) == 16,
              "scales must be a contiguous (N / 16, K / 32, 16) float32 tensor");
  at::Tensor out = at::empty({x.size(0), 16 * T}, x.options().dtype(at::kFloat));
#ifdef SMOLLM2_HAVE_INT4_GEMM
  if (x.size(0) > 0) tiled_linear<true>(x, packed, scales, out);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smollm2, m) {
  m.def("int4_gemm_available() -> bool", &int4_gemm_available);
  m.def("int4_gemm_amx() -> bool", &int4_amx_available);
  m.def("int4_linear_swiglu(Tensor x, Tensor packed, Tensor scales) -> Tensor", &int4_linear_swiglu);
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales) -> Tensor", &int4_linear);
  m.def("int8_tiles_linear(Tensor x, Tensor packed, Tensor scales) -> Tensor", &int8_tiles_linear);
}
