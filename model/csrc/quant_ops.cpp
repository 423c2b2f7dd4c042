// The serving path's LM head in 8 bits, and a row argmax (CPU), built with the other kernels by
// model/paged_kernel.py.
//
// int8_linear(x (M, K) float32 or bfloat16, qweight (N, K) int8, scales (N, K / 32) float32) -> (M, N) float32:
//   y[m, n] = sum_b scales[n, b] * sum_{i < 32} x[m, 32 b + i] * qweight[n, 32 b + i]
// i.e. x @ W^T for W stored as symmetric int8 in blocks of 32 along K with one scale per block, the layout
// of GGUF's Q8_0. At one stream the step streams the 49152 x 576 LM head; in int8 it reads 30 MB instead
// of the 57 MB of bf16. Each block is widened to float32 and scaled (exact products, fp32 sums), so the
// logits are float32 and at least as precise as the bf16 GEMM's (which rounds its output to bf16). Meant
// for a few rows (the weights are read once per 8 rows); work is split over N with at::parallel_for.
//
// argmax_rows(x (M, N) float32 or bfloat16) -> (M,) int64: the first index of each row's maximum, NaN counting as the
// maximum (torch.max(dim).indices' rule); ~10x faster than ATen's max(dim) over 49152 logits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int kMaxRows = 8;  // rows per pass over the weights
constexpr int64_t kAhead = 2048;  // bytes of weights prefetched ahead: the rows stream from memory

template <int M>
void int8_rows(const float* x, const int8_t* q, const float* s, float* out, int64_t K, int64_t N, int64_t n0,
               int64_t n1) {
  const int64_t nb = K / kBlock;
#ifdef __AVX512F__
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qn = q + n * K;
    const float* sn = s + n * nb;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* qb = qn + b * kBlock;
      if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(qb) + kAhead, _MM_HINT_T0);
      if ((b & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(sn + b) + kAhead / 8, _MM_HINT_T0);
      const __m512 sc = _mm512_set1_ps(sn[b]);
      const __m512 w0 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)))), sc);
      const __m512 w1 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 16)))),
          sc);
      for (int m = 0; m < M; ++m) {
        const float* xb = x + m * K + b * kBlock;
        acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[m]);
        acc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) out[m * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
#else
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qn = q + n * K;
    const float* sn = s + n * nb;
    for (int m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        float part = 0.f;
        for (int64_t i = 0; i < kBlock; ++i)
          part += static_cast<float>(qn[b * kBlock + i]) * sn[b] * x[m * K + b * kBlock + i];
        acc += part;
      }
      out[m * N + n] = acc;
    }
  }
#endif
}

using RowsFn = void (*)(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

RowsFn pick_rows(int64_t m) {
  switch (m) {
    case 1: return &int8_rows<1>;
    case 2: return &int8_rows<2>;
    case 3: return &int8_rows<3>;
    case 4: return &int8_rows<4>;
    case 5: return &int8_rows<5>;
    case 6: return &int8_rows<6>;
    case 7: return &int8_rows<7>;
    default: return &int8_rows<8>;
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu(), "CPU only");
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be (M, K) float32 or bfloat16");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous(),
              "qweight must be a contiguous (N, K) int8 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K && K % kBlock == 0, "qweight must be (N, K) with K = x.size(1), a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == N && scales.size(1) == K / kBlock,
              "scales must be a contiguous (N, K / 32) float32 tensor");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, M - m0);
    const RowsFn fn = pick_rows(rows);
    const float* xr = xp + m0 * K;
    float* orow = op + m0 * N;
    at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) { fn(xr, qp, sp, orow, K, N, n0, n1); });
  }
  return out;
}

inline float as_float(float v) { return v; }
inline float as_float(c10::BFloat16 v) { return static_cast<float>(v); }

// Scalar scan: the first NaN, else the first maximum.
template <typename T>
int64_t argmax_row_scalar(const T* x, int64_t n) {
  int64_t arg = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(as_float(x[j]))) return j;
    if (as_float(x[j]) > as_float(x[arg])) arg = j;
  }
  return arg;
}

#ifdef __AVX512F__
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
// bf16 to float32 is exact (the upper half of the float's bits), so the argmax is that of the widened row
inline __m512 load16(const c10::BFloat16* x) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}
#endif

template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
#ifdef __AVX512F__
  // one pass for the maximum (noting any NaN), one for its first index
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = load16(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, v);
  }
  float best = _mm512_reduce_max_ps(vmax);
  for (int64_t j = i; j < n; ++j) {
    if (std::isnan(as_float(x[j]))) nan = 1;
    else if (as_float(x[j]) > best) best = as_float(x[j]);
  }
  if (nan) return argmax_row_scalar(x, n);
  const __m512 b = _mm512_set1_ps(best);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(load16(x + j), b, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
  for (; j < n; ++j)
    if (as_float(x[j]) == best) return j;
  return 0;
#else
  return argmax_row_scalar(x, n);
#endif
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous CPU (M, N) float32 or bfloat16 tensor");
  TORCH_CHECK(x.size(1) > 0, "argmax_rows of empty rows");
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / N);
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) op[m] = argmax_row(xp + m * N, N);
    });
  } else {
    const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) op[m] = argmax_row(xp + m * N, N);
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smollm2, m) {
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor", &int8_linear);
  m.def("argmax_rows(Tensor x) -> Tensor", &argmax_rows);
}
