// The serving path's bf16 GEMM on CPU (AVX512-BF16), built with the other kernels by model/paged_kernel.py.
//
// bf16_linear(x (M, K) bfloat16, tiles (N / 16, K / 2, 16, 2) bfloat16) -> (M, N) bfloat16:
//   y = x @ W^T for W (N, K) stored in column tiles of 16 outputs, each tile as K / 2 pairs of 16 x 2
//   (pack_bf16_tiles in model/modeling.py). One k-pair of a tile is one 64-byte line: a vdpbf16ps
//   multiplies it by one row's broadcast pair of inputs and adds into 16 float32 sums.
//
// Why not oneDNN: the engine's weights (270 MB) stream from memory every step, and oneDNN's packed GEMM
// ran at ~240-290 GFLOPS over the 30 layers streamed against ~350-410 with its weight in cache (bench/NOTES.md,
// sixth round). This kernel walks a thread's columns in panels of up to 4 tiles (64 outputs), all rows of x
// through each panel in blocks of 4 rows (16 accumulators + 4 weight vectors in registers; the panel is reused
// from L1/L2 by every row block), and while it computes one panel it prefetches the next one into L2, one line
// per k-pair, so the panel after this one is in cache when its turn comes. Sums are float32 in k order;
// the output is rounded to bfloat16 (nearest even), as oneDNN's bf16 output is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define SMOLLM2_HAVE_BF16_GEMM 1
#endif

namespace {

#ifdef SMOLLM2_HAVE_BF16_GEMM
constexpr int kRows = 4;   // rows of x per register block
constexpr int kPanel = 4;  // tiles of 16 outputs per panel

// MR rows x NR tiles: out[i, 16 j + c] = sum_k x[i, k] W[16 j + c, k]. Each k-pair also prefetches one line
// of the next panel while lines remain (pf_lines of them from pf).
template <int MR, int NR>
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
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * N + j * 16), (__m256i)_mm512_cvtneps_pbh(acc[i][j]));
}

// All M rows of x through one panel of NR tiles; the next panel's pf_total lines are prefetched on the way.
template <int NR>
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
      case 4: block<4, NR>(xm, K, w, tile_elems, om, N, p, lines); m += 4; break;
      case 3: block<3, NR>(xm, K, w, tile_elems, om, N, p, lines); m += 3; break;
      case 2: block<2, NR>(xm, K, w, tile_elems, om, N, p, lines); m += 2; break;
      default: block<1, NR>(xm, K, w, tile_elems, om, N, p, lines); m += 1; break;
    }
    done += lines;
  }
}

using PanelFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t,
                         const char*, int64_t);
constexpr PanelFn kPanels[kPanel + 1] = {nullptr, &panel<1>, &panel<2>, &panel<3>, &panel<4>};
#endif

bool bf16_gemm_available() {
#ifdef SMOLLM2_HAVE_BF16_GEMM
  return true;
#else
  return false;
#endif
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& tiles) {
  TORCH_CHECK(bf16_gemm_available(), "bf16_linear needs a CPU with AVX512-BF16 (built -march=native)");
  TORCH_CHECK(x.device().is_cpu() && tiles.device().is_cpu(), "CPU only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be an (M, K) bfloat16 tensor");
  TORCH_CHECK(tiles.dim() == 4 && tiles.scalar_type() == at::kBFloat16 && tiles.is_contiguous() &&
                  tiles.size(2) == 16 && tiles.size(3) == 2,
              "tiles must be a contiguous (N / 16, K / 2, 16, 2) bfloat16 tensor (pack_bf16_tiles)");
  const int64_t M = x.size(0), K = x.size(1), T = tiles.size(0), N = T * 16;
  TORCH_CHECK(tiles.size(1) * 2 == K, "tiles are for K = ", tiles.size(1) * 2, ", x has K = ", K);
  at::Tensor out = at::empty({M, N}, x.options());
#ifdef SMOLLM2_HAVE_BF16_GEMM
  if (M == 0 || N == 0) return out;
  const at::Tensor xc = x.contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(tiles.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t tile_elems = K * 16;
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1;) {
      const int64_t nr = t1 - t < kPanel ? t1 - t : kPanel;
      const int64_t next = t + nr;
      const int64_t next_nr = t1 - next < kPanel ? t1 - next : kPanel;
      const char* pf = reinterpret_cast<const char*>(wp + next * tile_elems);
      kPanels[nr](xp, M, K, wp + t * tile_elems, tile_elems, op + t * 16, N, pf, next_nr * (K / 2));
      t = next;
    }
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smollm2, m) {
  m.def("bf16_gemm_available() -> bool", &bf16_gemm_available);
  m.def("bf16_linear(Tensor x, Tensor tiles) -> Tensor", &bf16_linear);
}
