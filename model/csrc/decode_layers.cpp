// Every decoder layer of a step in one call, for the steps whose attention is one paged-kernel call per layer
// (decodes, short prompts, draft checks) and whose linears are our int4 or bf16 tile GEMMs: the same ops, in
// the same order and on the same threads, as SmolLM2Model.forward_paged calls from Python, so the results
// are bit-identical. A one-stream step is ~300 op calls of a few to ~50 us each; from Python each also
// costs an interpreter round, a dispatcher call and two OpenMP thread-count switches, which here shrink to a
// typed dispatcher call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

using at::Tensor;

// How one linear runs (model.quant.PackedLinear.cpp_plan picks it for the step's row count).
enum Mode : int64_t {
  kInt4 = 0,           // int4_linear(x, packed, scales)
  kTiles = 1,          // bf16_linear(x, tiles)
  kInt4SwigluAmx = 2,  // int4_linear_swiglu(x, packed, scales): [gate; up] with the SwiGLU as epilogue
  kInt4ThenSilu = 3,   // silu_mul(int4_linear(x, packed, scales))
  kTilesSwiglu = 4,    // bf16_linear_swiglu(x, tiles)
};
constexpr int64_t kPerLayer = 10;  // input norm, qkv (2), o (2), post norm, gate/up (2), down (2)

template <class Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

struct Ops {
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, double)> rms_norm_cast =
      handle<Tensor(const Tensor&, const Tensor&, double)>("smollm2::rms_norm_cast");
  c10::TypedOperatorHandle<Tensor(Tensor&, const Tensor&, const Tensor&, double)> add_rms_norm =
      handle<Tensor(Tensor&, const Tensor&, const Tensor&, double)>("smollm2::add_rms_norm_");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&)> rope =
      handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>("smollm2::rope");
  c10::TypedOperatorHandle<Tensor(Tensor&, const Tensor&, const Tensor&)> write_kv =
      handle<Tensor(Tensor&, const Tensor&, const Tensor&)>("smollm2::write_kv_");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)> attend =
      handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)>(
          "smollm2::paged_decode_attention");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&)> int4_linear =
      handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>("smollm2::int4_linear");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&)> int4_swiglu =
      handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>("smollm2::int4_linear_swiglu");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&)> bf16_linear =
      handle<Tensor(const Tensor&, const Tensor&)>("smollm2::bf16_linear");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&)> bf16_swiglu =
      handle<Tensor(const Tensor&, const Tensor&)>("smollm2::bf16_linear_swiglu");
  c10::TypedOperatorHandle<Tensor(const Tensor&)> silu_mul = handle<Tensor(const Tensor&)>("smollm2::silu_mul");
};

const Ops& ops() {
  static const Ops o;  // after every TORCH_LIBRARY of the library has run: the first call, not load time
  return o;
}

// OpenMP's thread count at n for the scope (n <= 0: as it is), as model.threads.run_on does.
class Threads {
 public:
  explicit Threads(int64_t n) : prev_(at::get_num_threads()), on_(n > 0 && n != prev_) {
    if (on_) at::set_num_threads(static_cast<int>(n));
  }
  ~Threads() {
    if (on_) at::set_num_threads(prev_);
  }
  Threads(const Threads&) = delete;
  Threads& operator=(const Threads&) = delete;

 private:
  int prev_;
  bool on_;
};

Tensor linear(const Ops& o, int64_t mode, const Tensor& x, const Tensor& a, const Tensor& b, int64_t threads) {
  Threads t(threads);
  switch (mode) {
    case kInt4:
      return o.int4_linear.call(x, a, b);
    case kTiles:
      return o.bf16_linear.call(x, a);
    default:
      TORCH_CHECK(false, "decode_layers: linear mode ", mode, " is not a plain linear");
  }
}

// silu(gate) * up of the [gate; up] linear (a, b)
Tensor swiglu(const Ops& o, int64_t mode, const Tensor& x, const Tensor& a, const Tensor& b, int64_t threads,
              int64_t wide) {
  switch (mode) {
    case kInt4SwigluAmx: {
      Threads t(threads);
      return o.int4_swiglu.call(x, a, b);
    }
    case kTilesSwiglu: {
      Threads t(threads);
      return o.bf16_swiglu.call(x, a);
    }
    case kInt4ThenSilu: {
      const Tensor gate_up = linear(o, kInt4, x, a, b, threads);
      Threads t(wide);
      return o.silu_mul.call(gate_up);
    }
    default:
      TORCH_CHECK(false, "decode_layers: linear mode ", mode, " is not a SwiGLU");
  }
}

// x (N, H) float32, the step's embeddings, is the residual stream (updated in place); weights hold
// kPerLayer tensors per layer (input norm weight, qkv a/b, o a/b, post-attention norm weight, gate/up a/b,
// down a/b; b is unused by the tile modes) then the final norm's; modes the Mode of qkv, o, gate/up, down.
// cos/sin (N, nh + 2 nkv, hd) are the step's RoPE tables (SmolLM2Model.rope_tables); row i attends to the
// first lens[i] tokens of tables[i] after its K/V is written to slots[i]. threads: OpenMP threads of the
// GEMMs and attention (0: as set); the norms, RoPE and SwiGLU take them too from wide_rows rows on.
// Returns the final norm of x in the weights' dtype.
Tensor decode_layers(Tensor& x, at::TensorList weights, at::IntArrayRef modes, const Tensor& cos,
                     const Tensor& sin, at::TensorList kv_caches, const Tensor& slots, const Tensor& tables,
                     const Tensor& lens, int64_t block_size, int64_t num_heads, int64_t num_kv_heads, double eps,
                     int64_t threads, int64_t wide_rows) {
  const int64_t L = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kPerLayer * L + 1, "decode_layers: ", kPerLayer,
              " weights per layer and the final norm's");
  TORCH_CHECK(modes.size() == 4, "decode_layers: modes of qkv, o, gate/up and down");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "decode_layers: x is the (N, H) float32 stream");
  const int64_t N = x.size(0), nh = num_heads, heads = num_heads + 2 * num_kv_heads;
  TORCH_CHECK(N > 0 && nh > 0 && num_kv_heads > 0, "decode_layers: no rows or heads");
  const Ops& o = ops();
  const int64_t wide = N >= wide_rows ? threads : 0;
  Tensor delta;
  for (int64_t l = 0; l < L; ++l) {
    const Tensor* w = weights.data() + l * kPerLayer;
    Tensor h;
    {
      Threads t(wide);
      h = l == 0 ? o.rms_norm_cast.call(x, w[0], eps) : o.add_rms_norm.call(x, delta, w[0], eps);
    }
    Tensor qkv = linear(o, modes[0], h, w[1], w[2], threads);
    TORCH_CHECK(qkv.numel() % (N * heads) == 0, "decode_layers: qkv width is not a multiple of the heads");
    qkv = qkv.view({N, heads, -1});
    {
      Threads t(wide);
      qkv = o.rope.call(qkv, cos, sin);
    }
    Tensor cache = kv_caches[l];
    o.write_kv.call(cache, qkv.narrow(1, nh, heads - nh), slots);
    Tensor attn;
    {
      Threads t(threads);
      attn = o.attend.call(qkv.narrow(1, 0, nh), cache, tables, lens, block_size);
    }
    const Tensor out = linear(o, modes[1], attn, w[3], w[4], threads);
    {
      Threads t(wide);
      h = o.add_rms_norm.call(x, out, w[5], eps);
    }
    const Tensor act = swiglu(o, modes[2], h, w[6], w[7], threads, wide);
    delta = linear(o, modes[3], act, w[8], w[9], threads);
  }
  Threads t(wide);
  const Tensor& final_norm = weights[kPerLayer * L];
  return L == 0 ? o.rms_norm_cast.call(x, final_norm, eps) : o.add_rms_norm.call(x, delta, final_norm, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smollm2, m) {
  m.def(
      "decode_layers(Tensor(a!) x, Tensor[] weights, int[] modes, Tensor cos, Tensor sin, Tensor(b!)[] kv_caches, "
      "Tensor slots, Tensor tables, Tensor lens, int block_size, int num_heads, int num_kv_heads, float eps, "
      "int threads, int wide_rows) -> Tensor",
      &decode_layers);
}
