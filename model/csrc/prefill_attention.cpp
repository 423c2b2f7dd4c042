// Causal attention of one prompt chunk over the paged KV cache, for prefill (CPU: the AMX tile unit, else
// AVX512-BF16).
//
// prefill_attention(q (T, nh, hd) scaled bf16, kv_cache (2 nkv, slots, hd) bf16, block_table (nb,) int64,
//                   context_len S, block_size) -> (T, nh * hd)
//
// The chunk's T queries sit at positions S - T .. S - 1 of one sequence, whose first S tokens (the chunk's
// own included) are already in the cache; query i sees keys 0 .. S - T + i. The decode kernel
// (paged_attention.cpp) reads a row's whole context once per row; here 32 query rows of a head share each
// key block:
// - the keys and values of each KV head are packed once per call, 32 keys at a time: K^T as 2 x 2 tiles
//   (16 keys x 32 dims each, dims in pairs), V as 4 tiles (32 keys in pairs x 16 dims), keys past S zero.
//   A line of either is 16 lanes of a bf16 pair: one AMX B tile line, or one vdpbf16ps operand;
// - for 32 queries of one head: S = Q K^T for every key they see into a float32 buffer; each row's softmax
//   with its exact max, P stored as bf16 and its sum taken in float32; then P V and a division by the sum.
//   A row's result depends only on its own scores. The products run on the tile unit where there is one
//   (attend_amx), else as vdpbf16ps with one operand a broadcast pair of q or P (attend_avx512).
// Work items are (query head, 32 queries), dealt to threads round robin from the most expensive (the last
// queries, which see the most keys). Needs hd 64 and a block size that is a multiple of 16 (16 consecutive
// keys in consecutive slots).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "amx.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define SMOLLM2_PREFILL_KERNEL 1
#endif

namespace {

#ifdef SMOLLM2_PREFILL_KERNEL

constexpr int64_t HD = 64;       // head dim this kernel serves
constexpr int64_t KB = 32;       // keys per block: the K dim of one P V tile product
constexpr int64_t TILE = 512;    // bf16 per packed tile (16 lines of 64 bytes)
constexpr int64_t KB_TILES = 8;  // per KV head and key block: K^T (sub 0/1 x dims 0-31/32-63), V (4 dim quarters)

// Keys [kb * 32, kb * 32 + 32) of one KV head (its K and V rows in kcache, vcache), as 8 packed tiles at dst;
// keys at or past S are zeros. 16 tokens from a multiple of 16 sit in consecutive slots of one block.
void pack_block(const uint16_t* kcache, const uint16_t* vcache, int64_t row_stride, const int64_t* table,
                int64_t bs, int64_t S, int64_t kb, uint16_t* dst) {
  alignas(64) uint16_t keys[KB * HD], vals[KB * HD];  // the 32 keys' rows, zero past S
  for (int64_t sub = 0; sub < 2; ++sub) {
    const int64_t t0 = kb * KB + sub * 16;
    const int64_t n = std::clamp<int64_t>(S - t0, 0, 16);
    if (n > 0) {
      const int64_t slot = table[t0 / bs] * bs + t0 % bs;
      for (int64_t r = 0; r < n; ++r) {
        std::memcpy(keys + (sub * 16 + r) * HD, kcache + (slot + r) * row_stride, HD * 2);
        std::memcpy(vals + (sub * 16 + r) * HD, vcache + (slot + r) * row_stride, HD * 2);
      }
    }
    if (n < 16) {
      std::memset(keys + (sub * 16 + n) * HD, 0, (16 - n) * HD * 2);
      std::memset(vals + (sub * 16 + n) * HD, 0, (16 - n) * HD * 2);
    }
  }
  // K^T tile (sub, half): line r holds dims half * 32 + 2r, 2r + 1 of keys sub * 16 .. + 15, i.e. the
  // transpose of the keys' rows seen as 16 x 16 uint32.
  const __m512i lane = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(HD / 2));
  for (int64_t sub = 0; sub < 2; ++sub)
    for (int64_t half = 0; half < 2; ++half) {
      uint32_t* t = reinterpret_cast<uint32_t*>(dst + (sub * 2 + half) * TILE);
      const int* base = reinterpret_cast<const int*>(keys + sub * 16 * HD) + half * 16;
      for (int64_t r = 0; r < 16; ++r)
        _mm512_store_si512(t + r * 16, _mm512_i32gather_epi32(lane, base + r, 4));
    }
  // V tile q: line r holds keys 2r, 2r + 1 interleaved over dims q * 16 .. + 15.
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t r = 0; r < 16; ++r)
    for (int64_t h = 0; h < 2; ++h) {  // dims h * 32 .. + 31 of both keys: quarters 2h, 2h + 1
      const __m512i a = _mm512_load_si512(vals + (2 * r) * HD + h * 32);
      const __m512i b = _mm512_load_si512(vals + (2 * r + 1) * HD + h * 32);
      _mm512_store_si512(dst + (4 + 2 * h) * TILE + r * 32, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_store_si512(dst + (5 + 2 * h) * TILE + r * 32, _mm512_permutex2var_epi16(a, hi, b));
    }
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^t for finite t <= 0, relative error < 5e-5 (degree-4 polynomial on the fraction in [-0.5, 0.5]):
// well inside the bf16 rounding the probabilities get before P V.
inline __m512 exp2_neg(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 y = _mm512_set1_ps(9.6181291e-3f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504109e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022651e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

#ifdef SMOLLM2_HAVE_AMX
// Eight tiles of 16 lines of 64 bytes (attend_amx says what each holds).
void configure() {
  smollm2::amx::TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}
#endif

struct Chunk {
  const uint16_t* q;  // query 0, head 0
  int64_t q_row, q_head;  // strides in elements
  const uint16_t* packed;  // (nkv, key blocks, 8 tiles)
  int64_t nkb, T, P, nh;
  uint16_t* out;  // (T, nh * HD)
};

// A 64-byte aligned buffer of at least n elements of T, kept by the thread from call to call: fresh large
// allocations are fresh pages, and their faults cost as much as a short chunk's attention.
template <class T>
T* thread_buffer(int64_t n) {
  thread_local std::vector<T> buf;
  const int64_t pad = 64 / sizeof(T);
  if (static_cast<int64_t>(buf.size()) < n + pad) buf.resize(n + pad);
  T* p = buf.data();
  return p + (pad - reinterpret_cast<uintptr_t>(p) / sizeof(T) % pad) % pad;
}

// Per-thread rows of scores and probabilities for 32 queries over up to `width` keys.
struct Scratch {
  explicit Scratch(int64_t width)
      : s(thread_buffer<float>(32 * (width + 32) * 3 / 2)), p(reinterpret_cast<uint16_t*>(s + 32 * (width + 32))) {}
  float* s;     // (32, width + 32) float32
  uint16_t* p;  // (32, width + 32) bf16
};

// Row r's softmax over its first n of `width` scores (the rest of the row: zeros), into p as bf16; returns
// the sum of the probabilities.
inline float softmax_row(const float* sr, uint16_t* pr, int64_t n, int64_t width) {
  const int64_t full = n / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n % 16)) - 1);
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < full; ++i) mx = _mm512_max_ps(mx, _mm512_load_ps(sr + 16 * i));
  if (tail) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_load_ps(sr + 16 * full));
  // p = 2^((s - max) log2 e), summed in float32 and stored as bf16
  const __m512 mlog = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * kLog2e);
  const __m512 log2e = _mm512_set1_ps(kLog2e);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < full; ++i) {
    const __m512 e = exp2_neg(_mm512_fmsub_ps(_mm512_load_ps(sr + 16 * i), log2e, mlog));
    sum = _mm512_add_ps(sum, e);
    _mm256_store_si256(reinterpret_cast<__m256i*>(pr + 16 * i), (__m256i)_mm512_cvtneps_pbh(e));
  }
  for (int64_t i = full; i < width / 16; ++i) {  // the partial group, then zeros to the block's end
    __m512 e = _mm512_setzero_ps();
    if (i == full && tail)
      e = _mm512_maskz_mov_ps(tail, exp2_neg(_mm512_fmsub_ps(_mm512_load_ps(sr + 16 * i), log2e, mlog)));
    sum = _mm512_add_ps(sum, e);
    _mm256_store_si256(reinterpret_cast<__m256i*>(pr + 16 * i), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return _mm512_reduce_add_ps(sum);
}

// Queries qb * 32 .. of query head `head` (of KV head h): 16 of them, or 32 with TWO (a second row block
// that shares every key tile load with the first), in three passes over the keys they see: the scores (tile
// unit), each row's softmax with its exact max (AVX-512), then P V (tile unit), a half of the head dims at
// a time. Passes rather than one online loop: each runs without waiting on the other unit.
#ifdef SMOLLM2_HAVE_AMX
template <bool TWO>
void attend_amx(const Chunk& c, int64_t h, int64_t head, int64_t qb, Scratch& w) {
  constexpr int64_t R = TWO ? 32 : 16;
  const int64_t rows = std::min<int64_t>(R, c.T - qb * 32);
  const int64_t first = c.P + qb * 32;  // position of the first query
  alignas(64) uint16_t qpad[R * HD];
  const uint16_t* qa = c.q + qb * 32 * c.q_row + head * c.q_head;
  int64_t qld = c.q_row;
  if (rows < R) {  // the chunk's last queries: a zero-padded copy, so the tile reads nothing past q
    std::memset(qpad, 0, sizeof(qpad));
    for (int64_t r = 0; r < rows; ++r) std::memcpy(qpad + r * HD, qa + r * c.q_row, HD * 2);
    qa = qpad;
    qld = HD;
  }
  const int64_t blocks = (first + rows - 1) / KB + 1;  // key blocks the last real query reaches
  const int64_t width = blocks * KB;
  const int64_t ld = width + 32;  // row stride of s and p: off a power of two, so 16 rows do not share a cache set
  const uint16_t* kv = c.packed + h * c.nkb * KB_TILES * TILE;
  float* s = w.s;
  uint16_t* p = w.p;
  // scores: C tiles 0, 1 (rows 0-15, keys 0-15 / 16-31 of the block), 2, 3 (rows 16-31); A 4, 5; B 6, 7
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const uint16_t* blk = kv + kb * KB_TILES * TILE;
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (TWO) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int half = 0; half < 2; ++half) {
      _tile_loadd(4, qa + half * 32, qld * 2);
      if constexpr (TWO) _tile_loadd(5, qa + 16 * qld + half * 32, qld * 2);
      _tile_loadd(6, blk + half * TILE, 64);
      _tile_loadd(7, blk + (2 + half) * TILE, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (TWO) {
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, s + kb * KB, ld * 4);
    _tile_stored(1, s + kb * KB + 16, ld * 4);
    if constexpr (TWO) {
      _tile_stored(2, s + 16 * ld + kb * KB, ld * 4);
      _tile_stored(3, s + 16 * ld + kb * KB + 16, ld * 4);
    }
  }
  float l[R];
  for (int64_t r = 0; r < R; ++r)  // row r sees keys 0 .. first + r; a padding row past the chunk, all (finite)
    l[r] = softmax_row(s + r * ld, p + r * ld, r < rows ? first + r + 1 : width, width);
  // P V, dims 32 d .. 32 d + 31: C tiles 0, 1 (rows 0-15, 16 dims each), 2, 3 (rows 16-31); A 4, 5; B 6, 7
  alignas(64) float o[R * HD];
  for (int d = 0; d < 2; ++d) {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (TWO) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const uint16_t* blk = kv + kb * KB_TILES * TILE;
      _tile_loadd(4, p + kb * KB, ld * 2);
      if constexpr (TWO) _tile_loadd(5, p + 16 * ld + kb * KB, ld * 2);
      _tile_loadd(6, blk + (4 + 2 * d) * TILE, 64);
      _tile_loadd(7, blk + (5 + 2 * d) * TILE, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (TWO) {
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, o + 32 * d, HD * 4);
    _tile_stored(1, o + 32 * d + 16, HD * 4);
    if constexpr (TWO) {
      _tile_stored(2, o + 16 * HD + 32 * d, HD * 4);
      _tile_stored(3, o + 16 * HD + 32 * d + 16, HD * 4);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    uint16_t* dst = c.out + (qb * 32 + r) * c.nh * HD + head * HD;
    for (int64_t d = 0; d < HD; d += 32) {
      const __m512 a = _mm512_mul_ps(_mm512_load_ps(o + r * HD + d), inv);
      const __m512 b = _mm512_mul_ps(_mm512_load_ps(o + r * HD + d + 16), inv);
      _mm512_storeu_si512(dst + d, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
  }
}

#endif  // SMOLLM2_HAVE_AMX

// The chunk's queries qb * 32 .. (up to 32) of query head `head` (of KV head h), as attend_amx, with
// vdpbf16ps: lane i of a packed K^T line is key i's dim pair, so a broadcast pair of one query's dims
// multiplies 16 keys at once; lane i of a packed V line is dim i's key pair, so a broadcast pair of one
// row's probabilities multiplies 16 dims at once.
constexpr int kScoreRows = 8;  // rows per pass over a key block's K^T: 8 x 2 accumulators
constexpr int kOutRows = 4;    // rows per pass over a key block's V: 4 x 4 accumulators

inline __m512 dot_pair(__m512 acc, const uint16_t* pair, const uint16_t* line) {
  const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(pair));
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)_mm512_load_si512(line));
}

void attend_avx512(const Chunk& c, int64_t h, int64_t head, int64_t qb, Scratch& w) {
  constexpr int64_t R = 32;
  const int64_t rows = std::min<int64_t>(R, c.T - qb * 32);
  const int64_t first = c.P + qb * 32;
  const int64_t padded = (rows + kScoreRows - 1) / kScoreRows * kScoreRows;
  alignas(64) uint16_t qpad[R * HD];
  const uint16_t* qa = c.q + qb * 32 * c.q_row + head * c.q_head;
  int64_t qld = c.q_row;
  if (rows < padded) {  // the chunk's last queries: a zero-padded copy, so nothing past q is read
    std::memset(qpad, 0, sizeof(qpad));
    for (int64_t r = 0; r < rows; ++r) std::memcpy(qpad + r * HD, qa + r * c.q_row, HD * 2);
    qa = qpad;
    qld = HD;
  }
  const int64_t blocks = (first + rows - 1) / KB + 1;
  const int64_t width = blocks * KB;
  const int64_t ld = width + 32;
  const uint16_t* kv = c.packed + h * c.nkb * KB_TILES * TILE;
  float* s = w.s;
  uint16_t* p = w.p;
  for (int64_t r0 = 0; r0 < padded; r0 += kScoreRows) {
    // a row group sees keys up to its last real row's position; softmax_row reads no score past a row's own
    // (the last group, which holds the padding rows, sees every block)
    const int64_t seen = (first + std::min<int64_t>(r0 + kScoreRows, rows) - 1) / KB + 1;
    for (int64_t kb = 0; kb < seen; ++kb) {
      const uint16_t* blk = kv + kb * KB_TILES * TILE;
      __m512 acc[kScoreRows][2];
      for (int r = 0; r < kScoreRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int dp = 0; dp < HD / 2; ++dp) {
        const uint16_t* k0 = blk + (dp / 16) * TILE + (dp % 16) * 32;  // keys 0-15 of the block, dims 2 dp, + 1
        const uint16_t* k1 = k0 + 2 * TILE;                            // keys 16-31
        for (int r = 0; r < kScoreRows; ++r) {
          const uint16_t* qr = qa + (r0 + r) * qld + 2 * dp;
          acc[r][0] = dot_pair(acc[r][0], qr, k0);
          acc[r][1] = dot_pair(acc[r][1], qr, k1);
        }
      }
      for (int r = 0; r < kScoreRows; ++r) {
        _mm512_store_ps(s + (r0 + r) * ld + kb * KB, acc[r][0]);
        _mm512_store_ps(s + (r0 + r) * ld + kb * KB + 16, acc[r][1]);
      }
    }
  }
  float l[R];
  for (int64_t r = 0; r < padded; ++r)  // a padding row past the chunk sees all of them (finite)
    l[r] = softmax_row(s + r * ld, p + r * ld, r < rows ? first + r + 1 : width, width);
  for (int64_t r0 = 0; r0 < rows; r0 += kOutRows) {
    const int64_t last = std::min<int64_t>(r0 + kOutRows, rows) - 1;
    const int64_t seen = (first + last) / KB + 1;  // p is zero past each row's own keys
    __m512 acc[kOutRows][4];
    for (int r = 0; r < kOutRows; ++r)
      for (int d = 0; d < 4; ++d) acc[r][d] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < seen; ++kb) {
      const uint16_t* vt = kv + kb * KB_TILES * TILE + 4 * TILE;
      for (int kp = 0; kp < KB / 2; ++kp) {
        for (int r = 0; r < kOutRows; ++r) {
          const uint16_t* pr = p + (r0 + r) * ld + kb * KB + 2 * kp;
          for (int d = 0; d < 4; ++d) acc[r][d] = dot_pair(acc[r][d], pr, vt + d * TILE + kp * 32);
        }
      }
    }
    for (int r = 0; r < kOutRows && r0 + r < rows; ++r) {
      const __m512 inv = _mm512_set1_ps(1.f / l[r0 + r]);
      uint16_t* dst = c.out + (qb * 32 + r0 + r) * c.nh * HD + head * HD;
      for (int d = 0; d < 4; d += 2)
        _mm512_storeu_si512(dst + 16 * d, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(acc[r][d + 1], inv),
                                                                       _mm512_mul_ps(acc[r][d], inv)));
    }
  }
}

#endif  // SMOLLM2_PREFILL_KERNEL

bool prefill_attention_available() {
#ifdef SMOLLM2_PREFILL_KERNEL
  return true;
#else
  return false;
#endif
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                             int64_t context_len, int64_t block_size) {
  TORCH_CHECK(prefill_attention_available(), "prefill_attention needs AVX512-BF16 or the AMX tile unit");
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "prefill_attention is CPU only");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kv_cache.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 3, "q (T, nh, hd) and kv_cache (2 nkv, slots, hd)");
  TORCH_CHECK(q.size(2) == 64 && kv_cache.size(2) == 64, "head dim 64 only");
  TORCH_CHECK(q.stride(2) == 1 && kv_cache.stride(2) == 1, "rows must be contiguous");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 1 && block_table.is_contiguous(),
              "block_table (nb,) int64 contiguous");
  const int64_t T = q.size(0), nh = q.size(1), nkv = kv_cache.size(0) / 2;
  TORCH_CHECK(nkv > 0 && kv_cache.size(0) == 2 * nkv && nh % nkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_size > 0 && block_size % 16 == 0 && kv_cache.size(1) % block_size == 0,
              "block_size must be a multiple of 16");
  const int64_t S = context_len;
  TORCH_CHECK(T >= 1 && T <= S, "the chunk's ", T, " queries must be within its context of ", S);
  TORCH_CHECK(S <= block_table.size(0) * block_size, "context length ", S, " exceeds the block table");
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t num_blocks = kv_cache.size(1) / block_size;
  for (int64_t b = 0; b < (S + block_size - 1) / block_size; ++b)
    TORCH_CHECK(table[b] >= 0 && table[b] < num_blocks, "block id ", table[b], " out of range");
  at::Tensor out = at::empty({T, nh * 64}, q.options());
#ifdef SMOLLM2_PREFILL_KERNEL
  [[maybe_unused]] const bool amx = smollm2::amx::usable();
  const int64_t nkb = (S + KB - 1) / KB, g = nh / nkv;
  uint16_t* pk = thread_buffer<uint16_t>(nkv * nkb * KB_TILES * TILE);
  const uint16_t* cache = reinterpret_cast<const uint16_t*>(kv_cache.data_ptr());
  at::parallel_for(0, nkv * nkb, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / nkb, kb = i % nkb;
      pack_block(cache + h * kv_cache.stride(0), cache + (nkv + h) * kv_cache.stride(0), kv_cache.stride(1), table,
                 block_size, S, kb, pk + i * KB_TILES * TILE);
    }
  });
  const Chunk c{reinterpret_cast<const uint16_t*>(q.data_ptr()), q.stride(0), q.stride(1), pk, nkb, T, S - T, nh,
                reinterpret_cast<uint16_t*>(out.data_ptr())};
  // Items from the most expensive (last query block) down, dealt round robin: each thread's share is within
  // one item of the others'.
  const int64_t nqb = (T + 31) / 32, items = nqb * nh;
  // (32 queries x 32 keys) products: below ~32 of them (~20 us) a second thread's wake-up costs more
  int64_t work = 0;
  for (int64_t qb = 0; qb < nqb; ++qb) work += nh * ((S - T + std::min(qb * 32 + 32, T) - 1) / KB + 1);
  const int64_t threads = work < 32 ? 1 : std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, threads, 1, [&](int64_t w0, int64_t w1) {
    Scratch scratch(nkb * KB);
#ifdef SMOLLM2_HAVE_AMX
    if (amx) {
      configure();
      for (int64_t w = w0; w < w1; ++w)
        for (int64_t i = w; i < items; i += threads) {
          const int64_t qb = nqb - 1 - i / nh, head = i % nh;
          if (T - qb * 32 > 16) attend_amx<true>(c, head / g, head, qb, scratch);
          else attend_amx<false>(c, head / g, head, qb, scratch);
        }
      _tile_release();
      return;
    }
#endif
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t i = w; i < items; i += threads) {
        const int64_t qb = nqb - 1 - i / nh, head = i % nh;
        attend_avx512(c, head / g, head, qb, scratch);
      }
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smollm2, m) {
  m.def("prefill_attention_available() -> bool", &prefill_attention_available);
  m.def("prefill_attention(Tensor q, Tensor kv_cache, Tensor block_table, int context_len, int block_size) "
        "-> Tensor",
        &prefill_attention);
}
