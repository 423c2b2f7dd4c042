// Fused element-wise ops of the serving path's decoder layer (CPU, float32 and bfloat16).
//
// A decode step at one stream is mostly small ops: each RMSNorm (with the residual add before it) was
// 8 ATen kernels and RoPE 3, each with its own dispatch, allocation and pass over memory. These do one
// pass each and round exactly where the torch path rounds (to the weights' dtype after x * rsqrt(...)
// and after * weight; RoPE's a * cos rounded, then + roll(a) * sin), so the two paths agree to float32
// summation order. With AVX512-BF16 the loops are vectorized in 16 lanes, with AVX2 in 8 (the same
// roundings, float32 sums in lane order). SwiGLU (silu(gate) * up, with a vectorized exp) and the KV-cache write are here too. Rows run
// in parallel above a grain of work; on one thread (the server's setting for small ops) they run inline.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define SMOLLM2_VEC 1  // the AVX-512 loops below; others take the scalar ones (the same roundings)
#elif defined(__AVX2__) && defined(__FMA__)
#define SMOLLM2_VEC8 1  // the same loops on 8 AVX2 lanes (the same roundings)
#endif

namespace {

#ifdef SMOLLM2_VEC
// 16 values of T as float32, and float32 rounded to 16 values of T (nearest even, as c10::BFloat16 does).
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return smollm2::load_bf16(reinterpret_cast<const uint16_t*>(p));
  }
}
template <typename T>
inline void store16(T* p, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
  }
}
// v rounded to T and back (a no-op for float32)
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return smollm2::round_bf16(v);
  }
}
#endif

#ifdef SMOLLM2_VEC8
// float32 rounded to 8 values of T, and v rounded to T and back (AVX2); smollm2::load8 reads them
using smollm2::load8;
template <typename T>
inline void store8(T* p, __m256 v) {
  if constexpr (std::is_same_v<T, float>) _mm256_storeu_ps(p, v);
  else smollm2::store_bf16x8(reinterpret_cast<uint16_t*>(p), v);
}
template <typename T>
inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return smollm2::round_bf16x8(v);
}

#endif

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
#ifdef SMOLLM2_VEC
      if (H % 16 == 0) {
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < H; i += 16) {
          __m512 v = _mm512_loadu_ps(xr + i);
          if (delta != nullptr) {
            v = _mm512_add_ps(v, load16(delta + n * H + i));
            _mm512_storeu_ps(xr + i, v);
          }
          ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(H) + eps));
        T* orow = out + n * H;
        for (int64_t i = 0; i < H; i += 16)
          store16(orow + i, _mm512_mul_ps(round16<T>(_mm512_mul_ps(_mm512_loadu_ps(xr + i), r)), load16(w + i)));
        continue;
      }
#elif defined(SMOLLM2_VEC8)
      if (H % 8 == 0) {
        __m256 ss = _mm256_setzero_ps();
        for (int64_t i = 0; i < H; i += 8) {
          __m256 v = _mm256_loadu_ps(xr + i);
          if (delta != nullptr) {
            v = _mm256_add_ps(v, load8(delta + n * H + i));
            _mm256_storeu_ps(xr + i, v);
          }
          ss = _mm256_fmadd_ps(v, v, ss);
        }
        const __m256 r = _mm256_set1_ps(1.f / std::sqrt(smollm2::hsum8(ss) / static_cast<float>(H) + eps));
        T* orow = out + n * H;
        for (int64_t i = 0; i < H; i += 8)
          store8(orow + i, _mm256_mul_ps(round8<T>(_mm256_mul_ps(_mm256_loadu_ps(xr + i), r)), load8(w + i)));
        continue;
      }
#endif
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
#ifdef SMOLLM2_VEC
      if (half % 16 == 0) {
        for (int64_t j = 0; j < hd; j += 16) {
          const __m512 a = round16<T>(_mm512_mul_ps(load16(xr + j), load16(c + j)));
          const __m512 rolled = load16(xr + (j < half ? j + half : j - half));
          store16(o + j, _mm512_fmadd_ps(rolled, load16(s + j), a));
        }
        continue;
      }
#elif defined(SMOLLM2_VEC8)
      if (half % 8 == 0) {
        for (int64_t j = 0; j < hd; j += 8) {
          const __m256 a = round8<T>(_mm256_mul_ps(load8(xr + j), load8(c + j)));
          const __m256 rolled = load8(xr + (j < half ? j + half : j - half));
          store8(o + j, _mm256_fmadd_ps(rolled, load8(s + j), a));
        }
        continue;
      }
#endif
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

// silu_mul(gate_up (N, 2 I)) -> (N, I): silu(gate) * up with gate, up the two halves of each row, rounded
// as F.silu(gate).mul_(up) rounds: to the dtype after silu, then after the product.
template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t N, int64_t I) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(I, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* g = gu + n * 2 * I;
      const T* u = g + I;
      T* o = out + n * I;
      int64_t i = 0;
#ifdef SMOLLM2_VEC
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= I; i += 16) {
        const __m512 gv = load16(g + i);
        const __m512 sv = round16<T>(_mm512_div_ps(gv, _mm512_add_ps(one, smollm2::exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
        store16(o + i, _mm512_mul_ps(sv, load16(u + i)));
      }
#elif defined(SMOLLM2_VEC8)
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = load8(g + i);
        const __m256 sv = round8<T>(_mm256_div_ps(gv, _mm256_add_ps(one, smollm2::exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)))));
        store8(o + i, _mm256_mul_ps(sv, load8(u + i)));
      }
#endif
      for (; i < I; ++i) {
        const float gf = static_cast<float>(g[i]);
        const float sv = static_cast<float>(round_to<T>(gf / (1.f + std::exp(-gf))));
        o[i] = round_to<T>(sv * static_cast<float>(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be a contiguous CPU (N, 2 I) tensor");
  const int64_t N = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({N, I}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_rows<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), N, I);
  } else if (gate_up.scalar_type() == at::kBFloat16) {
    silu_mul_rows<c10::BFloat16>(gate_up.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), N, I);
  } else {
    TORCH_CHECK(false, "silu_mul: float32 or bfloat16, got ", gate_up.scalar_type());
  }
  return out;
}

// write_kv_(kv_cache (2 nkv, slots, hd), kv (N, 2 nkv, hd), slots (N,) int64): kv_cache[h, slots[i]] = kv[i, h],
// what kv_cache.index_copy_(1, slots, kv.transpose(0, 1)) does, as row copies (that op was ~35 us a layer
// at 32 rows).
at::Tensor write_kv_(at::Tensor& kv_cache, const at::Tensor& kv, const at::Tensor& slots) {
  TORCH_CHECK(kv_cache.device().is_cpu() && kv.device().is_cpu() && slots.device().is_cpu(), "CPU only");
  TORCH_CHECK(kv_cache.dim() == 3 && kv_cache.stride(2) == 1 && kv_cache.stride(1) == kv_cache.size(2),
              "kv_cache must be (2 nkv, slots, hd) with contiguous rows");
  TORCH_CHECK(kv.dim() == 3 && kv.size(1) == kv_cache.size(0) && kv.size(2) == kv_cache.size(2) && kv.stride(2) == 1,
              "kv must be (N, 2 nkv, hd) with contiguous rows");
  TORCH_CHECK(kv.scalar_type() == kv_cache.scalar_type(), "kv and kv_cache must share a dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous() && slots.size(0) == kv.size(0),
              "slots must be (N,) contiguous int64");
  const int64_t N = kv.size(0), heads = kv.size(1), hd = kv.size(2), num_slots = kv_cache.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < num_slots, "slot ", sp[i], " out of range");
  const int64_t bytes = hd * kv.element_size();
  char* cache = static_cast<char*>(kv_cache.data_ptr());
  const char* src = static_cast<const char*>(kv.data_ptr());
  const int64_t es = kv.element_size();
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(cache + (h * kv_cache.stride(0) + sp[i] * kv_cache.stride(1)) * es,
                  src + (i * kv.stride(0) + h * kv.stride(1)) * es, bytes);
  return kv_cache;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smollm2, m) {
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("write_kv_(Tensor(a!) kv_cache, Tensor kv, Tensor slots) -> Tensor(a!)", &write_kv_);
  m.def("rms_norm_cast(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm_cast);
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor", &add_rms_norm_);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &rope);
}
