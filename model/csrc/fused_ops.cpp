// Fused element-wise ops of the serving path's decoder layer (CPU, float32 and bfloat16).
//
// A decode step at one stream is mostly small ops: each RMSNorm (with the residual add before it) was
// 8 ATen kernels and RoPE 3, each with its own dispatch, allocation and pass over memory. These do one
// pass each and round exactly where the torch path rounds (to the weights' dtype after x * rsqrt(...)
// and after * weight; RoPE's a * cos rounded, then + roll(a) * sin), so the two paths agree to float32
// summation order. (SwiGLU stays on ATen: its vectorized exp beat a scalar loop here.) Rows run in parallel above a grain of work; on one thread
// (the server's setting for small ops) they run inline.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task, like ATen's GRAIN_SIZE

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);  // c10::BFloat16(float) rounds to nearest even
}

template <typename T>
void rms_norm_rows(float* x, const T* delta, const T* w, T* out, int64_t N, int64_t H, float eps) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(H, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* xr = x + n * H;
      if (delta != nullptr) {
        const T* dr = delta + n * H;
        for (int64_t i = 0; i < H; ++i) xr[i] += static_cast<float>(dr[i]);
      }
      float ss = 0.f;
      for (int64_t i = 0; i < H; ++i) ss += xr[i] * xr[i];
      const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
      T* orow = out + n * H;
      for (int64_t i = 0; i < H; ++i) {
        const float t = static_cast<float>(round_to<T>(xr[i] * r));
        orow[i] = round_to<T>(t * static_cast<float>(w[i]));
      }
    }
  });
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 (N, H) residual stream");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight must be (H,) contiguous");
}

// rms_norm_cast(x float32 (N, H), weight (H,)) -> (N, H) in weight's dtype:
// round(round(x * rsqrt(mean(x^2) + eps)) * weight).
at::Tensor rms_norm_cast(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  at::Tensor out = at::empty(x.sizes(), weight.options());
  const int64_t N = x.size(0), H = x.size(1);
  if (weight.scalar_type() == at::kFloat) {
    rms_norm_rows<float>(x.data_ptr<float>(), nullptr, weight.data_ptr<float>(), out.data_ptr<float>(), N, H,
                         static_cast<float>(eps));
  } else if (weight.scalar_type() == at::kBFloat16) {
    rms_norm_rows<c10::BFloat16>(x.data_ptr<float>(), nullptr, weight.data_ptr<c10::BFloat16>(),
                                 out.data_ptr<c10::BFloat16>(), N, H, static_cast<float>(eps));
  } else {
    TORCH_CHECK(false, "rms_norm_cast: float32 or bfloat16 weights, got ", weight.scalar_type());
  }
  return out;
}

// add_rms_norm_(x float32 (N, H), delta (N, H), weight (H,)): x += delta in place, then rms_norm_cast(x).
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.is_contiguous() && delta.scalar_type() == weight.scalar_type(),
              "delta must be (N, H), contiguous, in weight's dtype");
  at::Tensor out = at::empty(x.sizes(), weight.options());
  const int64_t N = x.size(0), H = x.size(1);
  if (weight.scalar_type() == at::kFloat) {
    rms_norm_rows<float>(x.data_ptr<float>(), delta.data_ptr<float>(), weight.data_ptr<float>(),
                         out.data_ptr<float>(), N, H, static_cast<float>(eps));
  } else if (weight.scalar_type() == at::kBFloat16) {
    rms_norm_rows<c10::BFloat16>(x.data_ptr<float>(), delta.data_ptr<c10::BFloat16>(),
                                 weight.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), N, H,
                                 static_cast<float>(eps));
  } else {
    TORCH_CHECK(false, "add_rms_norm_: float32 or bfloat16 weights, got ", weight.scalar_type());
  }
  return out;
}

template <typename T>
void rope_rows(const T* x, const T* cos, const T* sin, T* out, int64_t rows, int64_t hd) {
  const int64_t half = hd / 2;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(hd, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hd;
      const T* c = cos + r * hd;
      const T* s = sin + r * hd;
      T* o = out + r * hd;
      for (int64_t j = 0; j < hd; ++j) {
        const float a = static_cast<float>(round_to<T>(static_cast<float>(xr[j]) * static_cast<float>(c[j])));
        const float rolled = static_cast<float>(xr[j < half ? j + half : j - half]);
        o[j] = round_to<T>(a + rolled * static_cast<float>(s[j]));
      }
    }
  });
}

// rope(x (N, heads, hd), cos, sin same shape) -> addcmul(x * cos, roll(x, hd / 2, -1), sin), one pass.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous() && x.size(2) % 2 == 0,
              "x must be a contiguous CPU (N, heads, hd) tensor with even hd");
  TORCH_CHECK(cos.sizes() == x.sizes() && sin.sizes() == x.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous and shaped like x");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos and sin must share x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0) * x.size(1), hd = x.size(2);
  if (x.scalar_type() == at::kFloat) {
    rope_rows<float>(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<float>(),
                     rows, hd);
  } else if (x.scalar_type() == at::kBFloat16) {
    rope_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(),
                             sin.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, hd);
  } else {
    TORCH_CHECK(false, "rope: float32 or bfloat16, got ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smollm2, m) {
  m.def("rms_norm_cast(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm_cast);
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor", &add_rms_norm_);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &rope);
}
