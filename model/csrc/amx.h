// The AMX tile unit for the bf16 GEMMs (model/csrc/bf16_gemm.cpp, int4_gemm.cpp). Header changes reach the
// build through a hash of the headers in the compile flags (model/paged_kernel.py).
//
// A weight tile of 16 outputs in the packed layout of pack_bf16_tiles (K / 2 k-pairs of 16 x 2 bf16) is,
// 16 k-pairs at a time, one B tile as it lies (16 lines of 64 bytes); 16 rows of x over the same 32 inputs
// are one A tile, and _tile_dpbf16ps adds their product into a 16 x 16 float32 C tile. A block of up to 32
// rows and 2 weight tiles keeps 4 C tiles, 2 A and 2 B (the 8 tile registers); C is written out (rounded
// to bf16, or through the SwiGLU) once K is done. Each product is exact in float32; sums are float32 and
// depend only on the row's own inputs, whatever the block holds.
#pragma once

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "vec_math.h"

#define SMOLLM2_HAVE_AMX 1

namespace smollm2::amx {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the AMX tile state only on request, once per process.
inline bool ready() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Tiles 0, 1 (C) and 4 (A) hold the first rows0 rows of a block, 2, 3 (C) and 5 (A) the next rows1 (0: not
// used); 6 and 7 (B) are whole k-blocks of a weight tile.
inline void configure(int rows0, int rows1) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64;
  cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = static_cast<uint8_t>(rows0);
  cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = static_cast<uint8_t>(rows1 > 0 ? rows1 : 16);
  cfg.rows[6] = cfg.rows[7] = 16;
  _tile_loadconfig(&cfg);
}

// C (32 x 32 float32, row stride 32) = rows [0, 16 R) of x (row stride K) @ weight tiles w0 (and w1 if C2)
template <bool R2, bool C2>
inline void block(const uint16_t* x, int64_t K, const uint16_t* w0, const uint16_t* w1, float* c) {
  _tile_zero(0);
  if constexpr (C2) _tile_zero(1);
  if constexpr (R2) {
    _tile_zero(2);
    if constexpr (C2) _tile_zero(3);
  }
  const int64_t stride = K * 2;
  for (int64_t kb = 0; kb < K / 32; ++kb) {
    _tile_loadd(4, x + kb * 32, stride);
    if constexpr (R2) _tile_loadd(5, x + 16 * K + kb * 32, stride);
    _tile_loadd(6, w0 + kb * 512, 64);
    if constexpr (C2) _tile_loadd(7, w1 + kb * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (C2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (R2) {
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (C2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  if constexpr (C2) _tile_stored(1, c + 16, 128);
  if constexpr (R2) {
    _tile_stored(2, c + 16 * 32, 128);
    if constexpr (C2) _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

// out = x (M, K) @ W^T over `units` blocks of output: unit u is weight tiles tiles(u, 0, scratch0) and, where
// tiles(u, 1, scratch1) is not null, a second one, each a pointer to K * 16 bf16 in the packed layout (the
// weight itself, or scratch filled with it). Plain: unit u writes columns 32 u .. 32 u + 31. SWIGLU: its two
// tiles are the gate and up of columns 16 u .. 16 u + 15, written as silu(gate) * up with the roundings of
// the GEMM then smollm2::silu_mul. Up to 32 rows the tiles are configured to M's rows, so that no tile reads
// past x; beyond, tiles read 16 rows, and where M is not a multiple of 16 the last partial block of 32 rows
// reads instead from tail (32 rows: x's rows from M / 32 * 32 on, then zeros; see padded_tail). Threads
// split the units.
// Units whose weight tiles are fetched together once x has more than kGroupRows rows: each block of 32 rows
// of x is then multiplied by all of them in turn, so x (past L2 for a long prompt: 1.7-4.6 MB at 1,500
// rows) is read once per kGroup units instead of once per unit, while their tiles (dequantized into the
// scratch, at most 4 x 2 x K x 16 bf16) stay in L2.
constexpr int64_t kGroup = 4;
constexpr int64_t kGroupRows = 64;

template <bool SWIGLU, class Tiles>
void run(const uint16_t* xp, const uint16_t* tail, int64_t M, int64_t K, int64_t units, const Tiles& tiles,
         uint16_t* op, int64_t cols) {
  const int64_t tail0 = M / 32 * 32;  // the last, partial block of 32 rows reads from tail where there is one
  const int rows0 = M < 16 ? static_cast<int>(M) : 16;
  const int rows1 = M <= 32 ? static_cast<int>(M) - rows0 : 16;
  const int64_t group = M > kGroupRows ? kGroup : 1;
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    configure(rows0, rows1);
    alignas(64) float c[32 * 32];
    // dequantized weight tiles for the tiles callback (left uninitialized: it writes before it reads)
    const std::unique_ptr<uint16_t[]> scratch(new uint16_t[2 * group * K * 16 + 32]);
    uint16_t* s0 = scratch.get() + (32 - reinterpret_cast<uintptr_t>(scratch.get()) / 2 % 32) % 32;  // 64-byte aligned
    const uint16_t* w[2 * kGroup];
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t ug = u0; ug < u1; ug += group) {
      const int64_t n = std::min(group, u1 - ug);
      for (int64_t i = 0; i < 2 * n; ++i) w[i] = tiles(ug + i / 2, static_cast<int>(i % 2), s0 + i * K * 16);
      for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const int64_t rows = M - m0 < 32 ? M - m0 : 32;
        const uint16_t* xm = m0 == tail0 && tail != nullptr ? tail : xp + m0 * K;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t u = ug + i;
          const uint16_t* w0 = w[2 * i];
          const uint16_t* w1 = w[2 * i + 1];
          const bool two = w1 != nullptr;
          if (rows > 16) {
            if (two) block<true, true>(xm, K, w0, w1, c);
            else block<true, false>(xm, K, w0, w1, c);
          } else {
            if (two) block<false, true>(xm, K, w0, w1, c);
            else block<false, false>(xm, K, w0, w1, c);
          }
          for (int64_t r = 0; r < rows; ++r) {
            const float* cr = c + r * 32;
            if constexpr (SWIGLU) {
              const __m512 g = round_bf16(_mm512_load_ps(cr)), up = round_bf16(_mm512_load_ps(cr + 16));
              const __m512 silu = round_bf16(
                  _mm512_div_ps(g, _mm512_add_ps(one, smollm2::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + (m0 + r) * cols + 16 * u),
                                  (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, up)));
            } else {
              uint16_t* orow = op + (m0 + r) * cols + 32 * u;
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(cr)));
              if (two)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + 16),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(cr + 16)));
            }
          }
        }
      }
    }
    _tile_release();
  });
}

// The tail buffer run needs for x (M, K) contiguous bf16, or an undefined tensor where none is needed.
inline at::Tensor padded_tail(const at::Tensor& x) {
  const int64_t M = x.size(0);
  if (M <= 32 || M % 16 == 0) return at::Tensor();
  at::Tensor tail = at::zeros({32, x.size(1)}, x.options());
  tail.narrow(0, 0, M - M / 32 * 32).copy_(x.narrow(0, M / 32 * 32, M - M / 32 * 32));
  return tail;
}

inline const uint16_t* tail_ptr(const at::Tensor& tail) {
  return tail.defined() ? reinterpret_cast<const uint16_t*>(tail.data_ptr()) : nullptr;
}

}  // namespace smollm2::amx
#endif

namespace smollm2::amx {
// Whether this build has the AMX loops and Linux grants the tile state: what every op that may take the tile
// unit asks, in builds with and without AMX.
inline bool usable() {
#ifdef SMOLLM2_HAVE_AMX
  return ready();
#else
  return false;
#endif
}
}  // namespace smollm2::amx
