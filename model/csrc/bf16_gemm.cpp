// The serving path's bf16 GEMM on CPU (AVX512-BF16), built with the other kernels by model/paged_kernel.py.
//
// bf16_linear(x (M, K) bfloat16, tiles (N / 16, K / 2, 16, 2) bfloat16) -> (M, N) bfloat16:
//   y = x @ W^T for W (N, K) stored in column tiles of 16 outputs, each tile as K / 2 pairs of 16 x 2
//   (pack_bf16_tiles in model/quant.py). One k-pair of a tile is one 64-byte line: a vdpbf16ps
//   multiplies it by one row's broadcast pair of inputs and adds into 16 float32 sums.
//
// Why not oneDNN: the engine's weights (270 MB) stream from memory every step, and oneDNN's packed GEMM
// ran well below its in-cache rate when they did (figures in bench/NOTES.md). This kernel walks a thread's
// columns in panels of up to 4 tiles (64 outputs), all rows of x through each panel in blocks of 4 rows
// (16 accumulators + 4 weight vectors in registers; the panel is reused from L1/L2 by every row block), and
// while it computes one panel it prefetches the next one into L2, one line per k-pair, so the panel after
// this one is in cache when its turn comes. Sums are float32 in k order;
// the output is rounded to bfloat16 (nearest even), as oneDNN's bf16 output is.
//
// On CPUs with AMX (and K a multiple of 32) the same tiles go through the tile unit instead: 16 k-pairs of
// a weight tile are one B tile as they lie, so nothing is repacked (model/csrc/amx.h). oneDNN's AMX GEMM read
// the streamed weights at about half the memory's rate, and this one is faster for decode steps and prefill
// chunks alike (bench/NOTES.md). Every row count takes the tile unit, so a row's result
// still does not depend on the batch (--batch-invariant).
//
// bf16_linear_swiglu(x (M, K), tiles of [gate; up] (2 I, K) with gate and up tiles interleaved) -> (M, I):
//   silu(x @ gate^T) * (x @ up^T) with the roundings of bf16_linear followed by smollm2::silu_mul (gate and up
//   to bf16, silu to bf16, the product to bf16), so the result is bit-identical to the two calls; the
//   (M, 2 I) intermediate is never written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "vec_math.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define SMOLLM2_HAVE_BF16_GEMM 1
#endif

#include "amx.h"

namespace {

#ifdef SMOLLM2_HAVE_BF16_GEMM
constexpr int kRows = 4;   // rows of x per register block
constexpr int kPanel = 4;  // tiles of 16 outputs per panel

using smollm2::round_bf16;

// MR rows x NR tiles: out[i, 16 j + c] = sum_k x[i, k] W[16 j + c, k] (SWIGLU: tiles 2 j, 2 j + 1 are the gate
// and up halves of out[i, 16 j + c]). Each k-pair also prefetches one line of the next panel while lines
// remain (pf_lines of them from pf).
template <int MR, int NR, bool SWIGLU>
inline void block(const uint16_t* __restrict x, int64_t K, const uint16_t* __restrict w, int64_t tile_elems,
                  uint16_t* __restrict out, int64_t N, const char* pf, int64_t pf_lines) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    if (kp < pf_lines) _mm_prefetch(pf + kp * 64, _MM_HINT_T1);
    __m512bh wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * tile_elems + kp * 32);
    for (int i = 0; i < MR; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + i * K + 2 * kp));
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, wv[j]);
    }
  }
  if constexpr (SWIGLU) {  // tiles 2 j and 2 j + 1 are gate and up of outputs 16 j .. 16 j + 15
    const __m512 one = _mm512_set1_ps(1.f);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR / 2; ++j) {
        const __m512 g = round_bf16(acc[i][2 * j]), u = round_bf16(acc[i][2 * j + 1]);
        const __m512 silu =
            round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, smollm2::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * N + j * 16),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, u)));
      }
  } else {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * N + j * 16),
                            (__m256i)_mm512_cvtneps_pbh(acc[i][j]));
  }
}

// All M rows of x through one panel of NR tiles; the next panel's pf_total lines are prefetched on the way.
// N is the row stride of out.
template <int NR, bool SWIGLU>
void panel(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t tile_elems, uint16_t* out,
           int64_t N, const char* pf, int64_t pf_total) {
  const int64_t pairs = K / 2;
  int64_t done = 0;  // lines of the next panel prefetched so far
  for (int64_t m = 0; m < M;) {
    const int64_t lines = pf_total - done < pairs ? pf_total - done : pairs;
    const char* p = pf + done * 64;
    const uint16_t* xm = x + m * K;
    uint16_t* om = out + m * N;
    switch (M - m >= kRows ? kRows : M - m) {
      case 4: block<4, NR, SWIGLU>(xm, K, w, tile_elems, om, N, p, lines); m += 4; break;
      case 3: block<3, NR, SWIGLU>(xm, K, w, tile_elems, om, N, p, lines); m += 3; break;
      case 2: block<2, NR, SWIGLU>(xm, K, w, tile_elems, om, N, p, lines); m += 2; break;
      default: block<1, NR, SWIGLU>(xm, K, w, tile_elems, om, N, p, lines); m += 1; break;
    }
    done += lines;
  }
}

using PanelFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t,
                         const char*, int64_t);
constexpr PanelFn kPanels[kPanel + 1] = {nullptr, &panel<1, false>, &panel<2, false>, &panel<3, false>,
                                         &panel<4, false>};
constexpr PanelFn kSwigluPanels[kPanel + 1] = {nullptr, nullptr, &panel<2, true>, nullptr, &panel<4, true>};
#endif

bool bf16_gemm_available() {
#ifdef SMOLLM2_HAVE_BF16_GEMM
  return true;
#else
  return false;
#endif
}

void check_args(const at::Tensor& x, const at::Tensor& tiles) {
  TORCH_CHECK(bf16_gemm_available(), "bf16_linear needs a CPU with AVX512-BF16 (built -march=native)");
  TORCH_CHECK(x.device().is_cpu() && tiles.device().is_cpu(), "CPU only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be an (M, K) bfloat16 tensor");
  TORCH_CHECK(tiles.dim() == 4 && tiles.scalar_type() == at::kBFloat16 && tiles.is_contiguous() &&
                  tiles.size(2) == 16 && tiles.size(3) == 2,
              "tiles must be a contiguous (N / 16, K / 2, 16, 2) bfloat16 tensor (pack_bf16_tiles)");
  TORCH_CHECK(tiles.size(1) * 2 == x.size(1), "tiles are for K = ", tiles.size(1) * 2, ", x has K = ", x.size(1));
}

// out (M, out_cols): the thread's tiles [t0, t1) in panels of up to kPanel; a panel of tiles t.. writes
// outputs from column t * 16 (plain) or t * 8 (SwiGLU: two tiles per 16 outputs).
template <bool SWIGLU>
void run(const at::Tensor& x, const at::Tensor& tiles, at::Tensor& out) {
#ifdef SMOLLM2_HAVE_BF16_GEMM
  const int64_t M = x.size(0), K = x.size(1), T = tiles.size(0), cols = out.size(1);
  if (M == 0 || T == 0) return;
  const at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(tiles.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
#ifdef SMOLLM2_HAVE_AMX
  if (K % 32 == 0 && smollm2::amx::ready()) {
    // plain: tiles 2 u, 2 u + 1; SwiGLU: the pair (gate, up) of columns 16 u .. 16 u + 15
    const int64_t tile_elems = K * 16;
    auto tiles = [&](int64_t u, int which, uint16_t*) -> const uint16_t* {
      return 2 * u + which < T ? wp + (2 * u + which) * tile_elems : nullptr;
    };
    const at::Tensor tail = smollm2::amx::padded_tail(xc);
    smollm2::amx::run<SWIGLU>(xp, smollm2::amx::tail_ptr(tail), M, K, (T + 1) / 2, tiles, op, cols);
    return;
  }
#endif
  const int64_t tile_elems = K * 16;
  constexpr int64_t unit = SWIGLU ? 2 : 1;  // a thread's share is whole (gate, up) pairs
  at::parallel_for(0, T / unit, 1, [&](int64_t u0, int64_t u1) {
    const int64_t t1 = u1 * unit;
    for (int64_t t = u0 * unit; t < t1;) {
      const int64_t nr = t1 - t < kPanel ? t1 - t : kPanel;
      const int64_t next = t + nr;
      const int64_t next_nr = t1 - next < kPanel ? t1 - next : kPanel;
      const char* pf = reinterpret_cast<const char*>(wp + next * tile_elems);
      const PanelFn fn = SWIGLU ? kSwigluPanels[nr] : kPanels[nr];
      fn(xp, M, K, wp + t * tile_elems, tile_elems, op + t * 16 / unit, cols, pf, next_nr * (K / 2));
      t = next;
    }
  });
#endif
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& tiles) {
  check_args(x, tiles);
  at::Tensor out = at::empty({x.size(0), tiles.size(0) * 16}, x.options());
  run<false>(x, tiles, out);
  return out;
}

at::Tensor bf16_linear_swiglu(const at::Tensor& x, const at::Tensor& tiles) {
  check_args(x, tiles);
  TORCH_CHECK(tiles.size(0) % 2 == 0, "SwiGLU tiles come in (gate, up) pairs: an even count");
  at::Tensor out = at::empty({x.size(0), tiles.size(0) * 8}, x.options());
  run<true>(x, tiles, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smollm2, m) {
  m.def("bf16_gemm_available() -> bool", &bf16_gemm_available);
  m.def("bf16_gemm_amx() -> bool", &smollm2::amx::usable);
  m.def("bf16_linear(Tensor x, Tensor tiles) -> Tensor", &bf16_linear);
  m.def("bf16_linear_swiglu(Tensor x, Tensor tiles) -> Tensor", &bf16_linear_swiglu);
}
