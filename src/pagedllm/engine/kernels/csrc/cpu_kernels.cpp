// pagedllm's CPU kernels bound to torch tensors: a linear layer on packed weights, the ops of a layer, and
// forward_step, which runs a whole step (decodes, prefill chunks, or both; every decoder layer in forward_layers) in
// one call (one OpenMP region, a barrier between ops), so a step costs no Python per op. The kernels themselves are kernels.h, over the vector layer
// of the tier this build is for (vec.h); cpu.py builds one module per tier. Every op is tested against the
// plain-torch path on every tier this CPU runs (tests/test_cpu_kernels.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#define PAGEDLLM_WITH_ATEN 1
#include "kernels.h"

#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

using torch::Tensor;
using namespace pagedllm;

namespace {

#define DISPATCH_FLOAT_BF16(dtype, NAME, ...)                                                     \
  [&] {                                                                                            \
    if ((dtype) == at::kBFloat16) { using scalar_t = bf16; return __VA_ARGS__(); }                 \
    TORCH_CHECK((dtype) == at::kFloat, NAME ": bfloat16 or float32 only");                         \
    using scalar_t = float; return __VA_ARGS__();                                                  \
  }()

// Inside DISPATCH_FLOAT_BF16: cache_t, the KV cache's element type: the activations' own, or int8 codes
// (kv_cache_dtype "int8", each block's scales after its codes: kernels.h kv_index).
#define DISPATCH_CACHE(cache, NAME, ...)                                                           \
  [&] {                                                                                            \
    if ((cache).scalar_type() == at::kChar) { using cache_t = int8_t; return __VA_ARGS__(); }      \
    TORCH_CHECK((cache).scalar_type() == (std::is_same<scalar_t, bf16>::value ? at::kBFloat16 : at::kFloat), NAME \
                ": the KV cache is int8 or the activations' dtype");                              \
    using cache_t = scalar_t; return __VA_ARGS__();                                                \
  }()

template <typename T>
T* ptr(const Tensor& t) {  // bf16 is at::BFloat16's layout (its 16 bits)
  if constexpr (std::is_same<T, bf16>::value) return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
  else return reinterpret_cast<T*>(t.data_ptr());
}

Tensor empty_out(const Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return torch::empty(sizes, x.options());
}

// The rows of token_seq's runs of one sequence: decodes one by one, prompt tokens (prefill_seqs) in tiles.
AttentionWork work_for(const c10::optional<Tensor>& token_seq, const c10::optional<Tensor>& prefill_seqs,
                       const Tensor& context_lens) {
  TORCH_CHECK(!token_seq || token_seq->numel() == context_lens.numel(), "attention: a token_seq entry per row");
  TORCH_CHECK(!prefill_seqs || (token_seq && prefill_seqs->scalar_type() == at::kInt), "attention: prefill_seqs "
              "is an int32 0 or 1 per sequence of token_seq");
  return AttentionWork(token_seq ? token_seq->data_ptr<int32_t>() : nullptr,
                       prefill_seqs ? prefill_seqs->data_ptr<int32_t>() : nullptr, context_lens.data_ptr<int32_t>(),
                       context_lens.numel());
}

AttentionPlan plan_for(const AttentionWork& work, int64_t H, int64_t KVH, int64_t D, int64_t BS, bool fetch_ahead) {
  AttentionPlan plan(work.row_ctx.data(), int64_t(work.row_ctx.size()), H, KVH, D, BS, at::get_num_threads());
  plan.fetch_ahead = fetch_ahead;
  return plan;
}

// Activations [rows, width] of the model's dtype, their data pointer resolved where the tensor is made: a step's
// region reads these, never a tensor, whose accessors are cold code there after each weight pass and whose views
// touch a shared reference count (batch-1 decode, step by step against tensors in the region: int8 5% faster,
// where widening made three views per linear and thread; bf16 level). The tensor serves the ops torch runs.
template <typename T>
struct Rows {
  Tensor tensor;
  T* data;
  int64_t rows, width;

  explicit Rows(const Tensor& t) : tensor(t), data(ptr<T>(t)), rows(t.numel() / t.size(-1)), width(t.size(-1)) {}
  Rows first(int64_t n) const { return Rows(tensor.narrow(0, 0, n)); }
};

}  // namespace

// A linear layer in the form the kernels run: "bf16" (weights packed by pack_bf16), "int8" (codes packed by
// pack_int8, float32 scale per channel), or "plain" (float32 models, through at::linear). Packed kinds take a
// float32 bias; inputs are contiguous [..., K], bf16 for "bf16", bf16 or float32 for "int8" (widened to float32
// once per call where the kernels read it so: kernels.h reads_float). `non_temporal`: whether the tiles fetch the
// packed weights non-temporally (kernels.h fetch_weights; cpu_isa.py non_temporal_weights).
struct Linear {
  enum class Kind { kBf16, kInt8, kPlain };
  Tensor weight, scale;
  c10::optional<Tensor> bias;
  int64_t out_features;
  // Read at every call, so kept apart from the tensors (whose metadata a step's weights have pushed out of cache).
  Kind kind;
  int64_t K;
  const void* w;
  const float* scale_data;
  const float* bias_data;
  bool non_temporal;

  Linear(Tensor weight_, Tensor scale_, c10::optional<Tensor> bias_, int64_t out_features_, std::string kind_,
         bool non_temporal_)
      : weight(weight_), scale(scale_), bias(bias_), out_features(out_features_), non_temporal(non_temporal_) {
    TORCH_CHECK(kind_ == "bf16" || kind_ == "int8" || kind_ == "plain", "Linear: kind is bf16, int8 or plain");
    kind = kind_ == "bf16" ? Kind::kBf16 : kind_ == "int8" ? Kind::kInt8 : Kind::kPlain;
    K = kind == Kind::kBf16 ? weight.size(1) * 2 : weight.size(1);  // bf16 packs input pairs
    w = weight.data_ptr();
    scale_data = kind == Kind::kInt8 ? scale.data_ptr<float>() : nullptr;
    bias_data = bias ? bias->data_ptr<float>() : nullptr;
  }

  int64_t in_features() const { return K; }

  // Whether a call on M rows, `decode` of them decode rows (the rest a step's prompt rows), reads x as float32
  // (kernels.h reads_float).
  bool needs_float(int64_t M, int64_t decode, bool bf16_x) const {
    return kind != Kind::kPlain && reads_float(kind == Kind::kInt8, M, decode, K, bf16_x);
  }

  // The kernels' view of this layer (packed kinds), for x (float32 as `x_float` where needs_float; bf16 as
  // `x_bf16` where it is) into y.
  LinearArgs args(const void* x, const float* x_float, void* y, const void* x_bf16 = nullptr) const {
    const bool int8 = kind == Kind::kInt8;
    LinearArgs a{int8 ? x_float : x, x_float, int8 ? x_bf16 : nullptr, K, w, scale_data, bias_data, y, out_features};
    a.non_temporal = non_temporal;
    return a;
  }

  // y = x @ W.T (+ bias) into `y`; `x_float` is x widened to float32 where needs_float, else nullptr. `next`:
  // the linear this thread runs after this one, whose first weights it fetches while finishing this one.
  // `prompt`: the rows of prompt tokens, in a step (kernels.h linear).
  template <typename T>
  void run(const Rows<T>& x, const float* x_float, const Rows<T>& y, const Par& par, const Linear* next = nullptr,
           const std::vector<RowSpan>* prompt = nullptr) const {
    if (kind == Kind::kPlain) {
      if (par.tid <= 0) {
        Tensor out = y.tensor;
        at::linear_out(out, x.tensor, weight, bias ? c10::optional<Tensor>(*bias) : c10::nullopt);
      }
      if (par.tid >= 0) par.sync();
      return;
    }
    constexpr bool bf16_x = std::is_same<T, bf16>::value;
    LinearArgs a = args(x.data, x_float, y.data, bf16_x ? x.data : nullptr);
    if (next && next->kind != Kind::kPlain) a.then = first_group(next->args(nullptr, nullptr, nullptr), x.rows, par);
    linear<T>(a, x.rows, par, prompt);
  }

  Tensor operator()(const Tensor& x) const {
    TORCH_CHECK(x.is_contiguous() && x.size(-1) == in_features(), "linear: input must be contiguous with ",
                in_features(), " features");
    TORCH_CHECK(kind != Kind::kBf16 || x.scalar_type() == at::kBFloat16, "linear: the bf16 kind takes bfloat16 input");
    Tensor y = empty_out(x, out_features);
    const int64_t M = x.numel() / in_features();
    const bool bf16_x = x.scalar_type() == at::kBFloat16;
    const Tensor x_float = needs_float(M, M, bf16_x) ? x.to(at::kFloat).contiguous() : Tensor();
    DISPATCH_FLOAT_BF16(x.scalar_type(), "linear", [&] {
      run(Rows<scalar_t>(x), x_float.defined() ? x_float.data_ptr<float>() : nullptr, Rows<scalar_t>(y), Par{});
    });
    return y;
  }
};

// out = RMSNorm(x) * weight; with residual: residual += x first, and the norm is of the new residual.
Tensor rms_norm(const Tensor& x, const c10::optional<Tensor>& residual, const Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.scalar_type() == x.scalar_type(), "rms_norm: contiguous x, weight of x's dtype");
  Tensor out = torch::empty_like(x);
  const int64_t H = x.size(-1);
  DISPATCH_FLOAT_BF16(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(ptr<scalar_t>(x), residual ? ptr<scalar_t>(*residual) : nullptr, ptr<scalar_t>(weight),
                            ptr<scalar_t>(out), x.numel() / H, H, (float)eps, Par{});
  });
  return out;
}

void check_cache(const Tensor& kv_cache, int64_t KVH, int64_t D, const char* op) {
  const int64_t row = kv_cache.scalar_type() == at::kChar ? D + 2 : D;
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.size(1) == KVH &&
              kv_cache.size(4) == row, op, ": kv_cache [2, ", KVH, ", blocks, block_size, ", row, "]");
}

// Rotates the queries and keys of qkv [T, (H + 2 KVH) * D] at `positions`, writes keys and values into
// kv_cache [2, KVH, num_blocks, block_size, D] (int8: D + 2, the scales) at `slot_mapping`; returns the rotated
// queries [T, H * D].
Tensor rope_and_write_kv(const Tensor& qkv, const Tensor& cos, const Tensor& sin, const Tensor& positions,
                         const Tensor& slot_mapping, Tensor& kv_cache, int64_t H, int64_t KVH, int64_t D) {
  TORCH_CHECK(qkv.is_contiguous(), "rope_and_write_kv: contiguous qkv");
  check_cache(kv_cache, KVH, D, "rope_and_write_kv");
  const int64_t T = qkv.size(0);
  Tensor q = torch::empty({T, H * D}, qkv.options());
  DISPATCH_FLOAT_BF16(qkv.scalar_type(), "rope_and_write_kv", [&] {
    DISPATCH_CACHE(kv_cache, "rope_and_write_kv", [&] {
      rope_write_kv<scalar_t, cache_t>(ptr<scalar_t>(qkv), ptr<scalar_t>(q), ptr<cache_t>(kv_cache),
                                       cos.data_ptr<float>(), sin.data_ptr<float>(), positions.data_ptr<int64_t>(),
                                       slot_mapping.data_ptr<int32_t>(), T, H, KVH, D, kv_cache.size(3),
                                       kv_cache.size(2) * kv_cache.size(3), Par{});
    });
  });
  return q;
}

// Attention of each query row q [T, H * D] over the first context_lens[t] cached positions of its block table
// (block_tables [T, max_blocks]); the rows of a sequence marked in prefill_seqs (token_seq's index) in tiles.
// `fetch_ahead`: decode rows fetch their blocks ahead by hand (kernels.h kFetchBlocks).
Tensor paged_attention(const Tensor& q, const Tensor& kv_cache, const Tensor& block_tables,
                       const c10::optional<Tensor>& token_seq, const c10::optional<Tensor>& prefill_seqs,
                       const Tensor& context_lens, int64_t H, int64_t KVH, int64_t D, double scale,
                       bool fetch_ahead) {
  TORCH_CHECK(H / KVH <= kMaxGroup && D <= kMaxHeadDim, "paged_attention: at most 16 query heads per KV head, head_dim 256");
  check_cache(kv_cache, KVH, D, "paged_attention");
  Tensor out = torch::empty_like(q);
  AttentionWork work = work_for(token_seq, prefill_seqs, context_lens);
  AttentionPlan plan = plan_for(work, H, KVH, D, kv_cache.size(3), fetch_ahead);
  Tensor scratch = torch::empty({plan.scratch_floats}, q.options().dtype(at::kFloat));
  DISPATCH_FLOAT_BF16(q.scalar_type(), "paged_attention", [&] {
    DISPATCH_CACHE(kv_cache, "paged_attention", [&] {
      paged_attention_step<scalar_t, cache_t>(ptr<scalar_t>(q), ptr<cache_t>(kv_cache), block_tables.data_ptr<int32_t>(),
                                              block_tables.size(1), context_lens.data_ptr<int32_t>(), ptr<scalar_t>(out),
                                              H, KVH, D, kv_cache.size(3), kv_cache.size(2) * kv_cache.size(3),
                                              (float)scale, work, plan, scratch.data_ptr<float>(), Par{});
    });
  });
  return out;
}

Tensor silu_mul(const Tensor& gate_up) {
  const int64_t I = gate_up.size(-1) / 2;
  Tensor out = empty_out(gate_up, I);
  DISPATCH_FLOAT_BF16(gate_up.scalar_type(), "silu_mul", [&] {
    silu_and_mul<scalar_t>(ptr<scalar_t>(gate_up), ptr<scalar_t>(out), gate_up.numel() / (2 * I), I, Par{});
  });
  return out;
}

// One Llama decoder layer's weights and shape; forward_layers runs a list of them.
struct DecoderLayer {
  Linear qkv, o, gate_up, down;
  Tensor input_norm, post_attention_norm;
  int64_t H, KVH, D;
  double eps, scale;
  const void* input_norm_data;  // as Linear's pointers: read at every step
  const void* post_attention_norm_data;

  DecoderLayer(Linear qkv_, Linear o_, Linear gate_up_, Linear down_, Tensor input_norm_, Tensor post_attention_norm_,
               int64_t H_, int64_t KVH_, int64_t D_, double eps_, double scale_)
      : qkv(std::move(qkv_)), o(std::move(o_)), gate_up(std::move(gate_up_)), down(std::move(down_)),
        input_norm(input_norm_), post_attention_norm(post_attention_norm_), H(H_), KVH(KVH_), D(D_), eps(eps_),
        scale(scale_), input_norm_data(input_norm.data_ptr()), post_attention_norm_data(post_attention_norm.data_ptr()) {}
};

// The model's end, for the rows a step samples from: the final RMSNorm and the LM head.
struct ModelHead {
  Tensor norm;
  Linear lm_head;
  double eps;
};

// A fused linear's LoRA slots (engine/lora.py BankModule), and a layer's four.
struct LoRAModule {
  Tensor a, bt;
  std::vector<int64_t> slice_ends;

  LoRAModule(Tensor a_, Tensor bt_, std::vector<int64_t> ends) : a(a_), bt(bt_), slice_ends(ends) {
    TORCH_CHECK(a.dim() == 3 && bt.dim() == 3 && a.scalar_type() == at::kFloat && bt.scalar_type() == at::kFloat &&
                a.is_contiguous() && bt.is_contiguous() && !ends.empty() && a.size(0) == bt.size(0) &&
                a.size(1) == int64_t(ends.size()) * bt.size(1) && bt.size(2) == ends.back(),
                "LoRAModule: a [slots, slices * rank, in] and bt [slots, rank, out] float32, slice_ends up to out");
  }

  LoRAArgs args() const { return LoRAArgs{a.data_ptr<float>(), bt.data_ptr<float>(), slice_ends.data(),
                                          int64_t(slice_ends.size()), bt.size(1)}; }
  int64_t scratch() const { return a.size(1); }  // floats of t per row
};

struct LoRALayer {
  LoRAModule qkv, o, gate_up, down;
};

// What every step of one model reads: its layers, head, embedding, rotary tables, KV caches and adapters' slots,
// held here once; `kv_fetch_ahead`: AttentionPlan::fetch_ahead for its steps. Passed as lists at each call, pybind
// copied every layer (each tensor's reference count touched twice, from memory after the step's weights had gone
// through the caches).
struct Model {
  std::vector<DecoderLayer> layers;
  ModelHead head;
  Tensor embedding, cos, sin;
  std::vector<Tensor> kv_caches;
  std::vector<LoRALayer> lora_layers;  // empty: none
  bool kv_fetch_ahead;

  Model(std::vector<DecoderLayer> layers_, ModelHead head_, Tensor embedding_, Tensor cos_, Tensor sin_,
        std::vector<Tensor> kv_caches_, std::vector<LoRALayer> lora_layers_, bool kv_fetch_ahead_)
      : layers(std::move(layers_)), head(std::move(head_)), embedding(embedding_), cos(cos_), sin(sin_),
        kv_caches(std::move(kv_caches_)), lora_layers(std::move(lora_layers_)), kv_fetch_ahead(kv_fetch_ahead_) {
    TORCH_CHECK(!layers.empty() && embedding.is_contiguous() && embedding.dim() == 2,
                "Model: layers, and an embedding [vocab, hidden]");
    const DecoderLayer& first = layers[0];
    TORCH_CHECK(first.H / first.KVH <= kMaxGroup && first.D <= kMaxHeadDim, "Model: head shape unsupported");
    TORCH_CHECK(kv_caches.size() == layers.size(), "Model: a KV cache per layer");
    for (const Tensor& cache : kv_caches) {
      check_cache(cache, first.KVH, first.D, "Model");
      TORCH_CHECK(cache.scalar_type() == kv_caches[0].scalar_type(), "Model: every layer's cache of one dtype");
    }
    TORCH_CHECK(lora_layers.empty() || lora_layers.size() == layers.size(), "Model: a LoRALayer per layer, or none");
    for (const DecoderLayer& l : layers)  // forward_layer reads them through their pointers, unchecked
      TORCH_CHECK(l.input_norm.scalar_type() == embedding.scalar_type() &&
                  l.post_attention_norm.scalar_type() == embedding.scalar_type(), "Model: norms of the embedding's dtype");
  }
};

// A step's adapters: each layer's four (their LoRAArgs, resolved before the region) and the step's rows by slot,
// with the scratch of the shrink.
struct LoRAStep {
  struct Layer {
    LoRAArgs qkv, o, gate_up, down;
  };
  std::vector<Layer> layers;  // empty: no adapters
  std::unique_ptr<LoRARowGroups> groups;
  float* t = nullptr;

  template <typename T>
  void apply(const LoRAArgs Layer::*module, size_t layer, const Rows<T>& x, const Rows<T>& y, const Par& par) const {
    if (layers.empty()) return;
    apply_lora<T>(layers[layer].*module, x.data, x.width, y.data, y.width, *groups, t, par);
  }
};

// A step's activations (`hidden`, the residual stream, and every op's output), allocated once for all layers.
template <typename T>
struct StepBuffers {
  Rows<T> hidden, normed, qkv, q, attn, o, gate_up, act, mlp;
  Tensor wide_tensor, scratch_tensor;
  float *wide, *scratch;

  StepBuffers(const Tensor& hidden_, const DecoderLayer& l, const AttentionPlan& plan)
      : hidden(hidden_), normed(like(hidden_.size(1))), qkv(like(l.qkv.out_features)), q(like(l.H * l.D)),
        attn(like(l.H * l.D)), o(like(hidden_.size(1))), gate_up(like(2 * l.down.in_features())),
        act(like(l.down.in_features())), mlp(like(hidden_.size(1))),
        wide_tensor(torch::empty({hidden.rows * std::max(hidden.width, act.width)},
                                 hidden_.options().dtype(at::kFloat))),
        scratch_tensor(torch::empty({plan.scratch_floats}, hidden_.options().dtype(at::kFloat))),
        wide(wide_tensor.data_ptr<float>()), scratch(scratch_tensor.data_ptr<float>()) {}

  Tensor like(int64_t width) const { return torch::empty({hidden.rows, width}, hidden.tensor.options()); }

  // x widened to float32 where the linear reads it so (its share of x by each thread), else nullptr; `decode`:
  // x's decode rows.
  const float* widened(const Linear& linear, const Rows<T>& x, int64_t decode, const Par& par) const {
    constexpr bool bf16_x = std::is_same<T, bf16>::value;
    if (!linear.needs_float(x.rows, decode, bf16_x)) return nullptr;
    if constexpr (bf16_x) {
      widen(x.data, wide, x.rows * x.width, par);
      return wide;
    } else {
      return x.data;
    }
  }
};

// What a step's layers read besides their weights and buffers, resolved before the region as Rows are; `caches`:
// each layer's KV cache.
template <typename C>
struct StepInputs {
  const float *cos, *sin;
  const int64_t* positions;
  const int32_t *slot_mapping, *block_tables, *context_lens;
  int64_t max_blocks, block_size, cache_rows;
  std::vector<C*> caches;
};

// `then`: the linear after this layer's last (its first weights are fetched during that one).
template <typename T, typename C>
void forward_layer(const DecoderLayer& l, const Linear* then, const StepBuffers<T>& buf, const StepInputs<C>& in,
                   const AttentionWork& work, const AttentionPlan& plan, const LoRAStep& lora, size_t index,
                   const Par& par) {
  const int64_t B = buf.hidden.rows, hidden_size = buf.hidden.width, decode = B - rows_of(work.prompt);
  T* h = buf.hidden.data;
  C* cache = in.caches[index];
  rms_norm_rows<T>(h, nullptr, static_cast<const T*>(l.input_norm_data), buf.normed.data, B, hidden_size, l.eps, par);
  l.qkv.run(buf.normed, buf.widened(l.qkv, buf.normed, decode, par), buf.qkv, par, &l.o, &work.prompt);
  lora.apply(&LoRAStep::Layer::qkv, index, buf.normed, buf.qkv, par);
  rope_write_kv<T, C>(buf.qkv.data, buf.q.data, cache, in.cos, in.sin, in.positions, in.slot_mapping, B, l.H, l.KVH,
                      l.D, in.block_size, in.cache_rows, par);
  paged_attention_step<T, C>(buf.q.data, cache, in.block_tables, in.max_blocks, in.context_lens, buf.attn.data, l.H,
                             l.KVH, l.D, in.block_size, in.cache_rows, l.scale, work, plan, buf.scratch, par);
  l.o.run(buf.attn, buf.widened(l.o, buf.attn, decode, par), buf.o, par, &l.gate_up, &work.prompt);
  lora.apply(&LoRAStep::Layer::o, index, buf.attn, buf.o, par);
  rms_norm_rows<T>(buf.o.data, h, static_cast<const T*>(l.post_attention_norm_data), buf.normed.data, B, hidden_size,
                   l.eps, par);
  l.gate_up.run(buf.normed, buf.widened(l.gate_up, buf.normed, decode, par), buf.gate_up, par, &l.down, &work.prompt);
  lora.apply(&LoRAStep::Layer::gate_up, index, buf.normed, buf.gate_up, par);
  silu_and_mul<T>(buf.gate_up.data, buf.act.data, B, buf.act.width, par);
  l.down.run(buf.act, buf.widened(l.down, buf.act, decode, par), buf.mlp, par, then, &work.prompt);
  lora.apply(&LoRAStep::Layer::down, index, buf.act, buf.mlp, par);
  add_into<T>(h, buf.mlp.data, B * hidden_size, par);
}

// out [n, width] = rows index[0..n) of src [?, width] (checked by the caller).
template <typename T>
void gather_rows(const T* src, const int64_t* index, int64_t n, int64_t width, T* out, const Par& par) {
  par(n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::memcpy(out + r * width, src + index[r] * width, width * sizeof(T));
  });
}

// The end of a step, for the rows it samples (`sampled`, S of them): their hidden states normed into `normed` (the
// first S rows of the step's buffer) and through the LM head into `rounded` (the model's dtype, as torch's path
// rounds them), then widened into `logits` (float32 [S, vocab]; the same buffer for float32); and where `argmax`
// is given, each row's most likely token into it (`partial`: a Best per row and thread).
template <typename T>
struct StepHead {
  const ModelHead& head;
  const T* norm;
  const int64_t* sampled;
  Rows<T> normed, rounded;
  float* logits;
  int64_t* argmax;
  Best* partial;

  void run(const StepBuffers<T>& buf, const Par& par) const {
    const int64_t S = normed.rows, width = normed.width;
    T* rows = buf.o.data;  // free once the layers are done
    gather_rows(buf.hidden.data, sampled, S, width, rows, par);
    rms_norm_rows<T>(rows, nullptr, norm, normed.data, S, width, float(head.eps), par);
    head.lm_head.run(normed, buf.widened(head.lm_head, normed, S, par), rounded, par);
    if constexpr (std::is_same<T, bf16>::value) widen(rounded.data, logits, S * rounded.width, par);
    if (argmax) argmax_rows(logits, S, rounded.width, par.threads, partial, argmax, par);
  }
};

// The step's one OpenMP region: embedding rows, every layer, the head. A function of its own: written in the body
// of forward_layers' dispatch lambdas, the region's second thread found a StepBuffers of its own there (GCC 12;
// its own address and tensors), and the threads' shares of each op went to different buffers.
template <typename T, typename C>
void run_step(const std::vector<DecoderLayer>& layers, const T* embedding, const int64_t* ids,
              const StepBuffers<T>& buf, const StepInputs<C>& in, const AttentionWork& work, const AttentionPlan& plan,
              const LoRAStep& lora, const StepHead<T>& head, int threads) {
  SpinBarrier barrier;
#pragma omp parallel num_threads(threads)
  {
    barrier.join(omp_get_num_threads());
    Par par{omp_get_thread_num(), omp_get_num_threads(), &barrier};
    gather_rows(embedding, ids, buf.hidden.rows, buf.hidden.width, buf.hidden.data, par);
    for (size_t i = 0; i < layers.size(); ++i)
      forward_layer<T, C>(layers[i], i + 1 < layers.size() ? &layers[i + 1].qkv : &head.head.lm_head, buf, in, work,
                          plan, lora, i, par);
    head.run(buf, par);
  }
}

// A step for a flat batch of T new tokens (decodes, speculative runs, prefill chunks): the embedding's rows of
// `input_ids` into the hidden states [T, hidden], every decoder layer on them (the computation of models/llama.py's
// DecoderLayer with TorchPagedAttention), then the head on the rows at `sample_indices`; returns their float32
// logits [S, vocab], and fills `argmax` (int64 [S], where given) with each one's most likely token. One OpenMP
// region for the whole step, which reads no tensor: every pointer and size is resolved before it. Row t is
// token_seq[t]'s token (a prompt token where prefill_seqs says so), seeing context_lens[t] positions through its
// block table block_tables[t].
Tensor forward_layers(Model& model, const Tensor& input_ids, const Tensor& positions, const Tensor& slot_mapping,
                      const Tensor& block_tables, const Tensor& token_seq, const Tensor& prefill_seqs,
                      const Tensor& context_lens, const Tensor& sample_indices, const c10::optional<Tensor>& lora_slots,
                      const c10::optional<Tensor>& argmax) {
  const std::vector<DecoderLayer>& layers = model.layers;
  const ModelHead& head = model.head;
  const Tensor& embedding = model.embedding;
  std::vector<Tensor>& kv_caches = model.kv_caches;
  TORCH_CHECK(input_ids.dim() == 1 && input_ids.is_contiguous() && input_ids.scalar_type() == at::kLong,
              "forward_step: input_ids int64 [T]");
  const int64_t* ids = input_ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < input_ids.size(0); ++t)  // the embedding's rows are copied unchecked
    TORCH_CHECK(ids[t] >= 0 && ids[t] < embedding.size(0), "forward_step: input_ids[", t, "] = ", ids[t],
                " is not a token of the vocabulary (", embedding.size(0), ")");
  const int64_t rows = input_ids.size(0), S = sample_indices.size(0);
  Tensor hidden = torch::empty({rows, embedding.size(1)}, embedding.options());
  const DecoderLayer& first = layers[0];
  AttentionWork work = work_for(token_seq, prefill_seqs, context_lens);
  AttentionPlan plan = plan_for(work, first.H, first.KVH, first.D, kv_caches[0].size(3), model.kv_fetch_ahead);
  TORCH_CHECK(sample_indices.scalar_type() == at::kLong && sample_indices.dim() == 1 &&
              sample_indices.is_contiguous() && S <= rows, "forward_step: sample_indices, int64 rows of hidden");
  const int64_t* sampled = sample_indices.data_ptr<int64_t>();
  for (int64_t r = 0; r < S; ++r)  // StepHead copies these rows unchecked
    TORCH_CHECK(sampled[r] >= 0 && sampled[r] < rows, "forward_step: sample_indices[", r, "] = ", sampled[r],
                " is not a row of hidden (", rows, " rows)");
  LoRAStep lora;
  Tensor lora_scratch;
  const std::vector<LoRALayer>& lora_layers = model.lora_layers;
  if (lora_slots) {  // each row's adapter slot, -1 for none (engine/lora.py LoRARows)
    TORCH_CHECK(lora_layers.size() == layers.size() && lora_slots->scalar_type() == at::kInt &&
                lora_slots->is_contiguous() && lora_slots->numel() == rows,
                "forward_step: lora_slots, an int32 slot per row of hidden, with a LoRALayer per layer");
    const LoRALayer& l = lora_layers[0];
    const int32_t* slots = lora_slots->data_ptr<int32_t>();
    for (int64_t r = 0; r < rows; ++r)
      TORCH_CHECK(slots[r] < l.qkv.a.size(0), "forward_step: lora_slots[", r, "] = ", slots[r], " is not a slot");
    const int64_t width = std::max({l.qkv.scratch(), l.o.scratch(), l.gate_up.scratch(), l.down.scratch()});
    lora_scratch = torch::empty({rows * width}, hidden.options().dtype(at::kFloat));
    for (const LoRALayer& m : lora_layers)
      lora.layers.push_back({m.qkv.args(), m.o.args(), m.gate_up.args(), m.down.args()});
    lora.groups = std::make_unique<LoRARowGroups>(slots, rows);
    lora.t = lora_scratch.data_ptr<float>();
  }
  Tensor logits = torch::empty({S, head.lm_head.out_features}, hidden.options().dtype(at::kFloat));
  Tensor rounded = hidden.scalar_type() == at::kFloat ? logits : torch::empty(logits.sizes(), hidden.options());
  const int threads = at::get_num_threads();
  TORCH_CHECK(!argmax || (argmax->scalar_type() == at::kLong && argmax->is_contiguous() && argmax->numel() == S),
              "forward_step: argmax, int64 [sampled rows]");
  std::vector<Best> partial(argmax ? S * threads : 0);
  DISPATCH_FLOAT_BF16(hidden.scalar_type(), "forward_step", [&] { DISPATCH_CACHE(kv_caches[0], "forward_step", [&] {
    const StepBuffers<scalar_t> buf(hidden, first, plan);
    StepInputs<cache_t> in{model.cos.data_ptr<float>(), model.sin.data_ptr<float>(), positions.data_ptr<int64_t>(),
                           slot_mapping.data_ptr<int32_t>(), block_tables.data_ptr<int32_t>(),
                           context_lens.data_ptr<int32_t>(), block_tables.size(1), kv_caches[0].size(3),
                           kv_caches[0].size(2) * kv_caches[0].size(3), {}};
    for (const Tensor& cache : kv_caches) in.caches.push_back(ptr<cache_t>(cache));
    const StepHead<scalar_t> step_head{head, ptr<scalar_t>(head.norm), sampled, buf.normed.first(S),
                                       Rows<scalar_t>(rounded), logits.data_ptr<float>(),
                                       argmax ? argmax->data_ptr<int64_t>() : nullptr, partial.data()};
    run_step(layers, ptr<scalar_t>(embedding), ids, buf, in, work, plan, lora, step_head, threads);
  }); });
  return logits;
}

// forward_layers for a step as the engine's model runner lays it out, its inputs as Python's lists (pybind converts
// them; no tensor is made in Python): block_tables one per sequence (token_seq's index), unpadded; lora_slots an
// adapter slot per row, or none. Returns the sampled rows' float32 logits and, with `greedy`, each one's most likely
// token. After a step's weights have gone through the caches, every tensor op in Python costs 15-25 us (their code
// is cold): with this call a batch-1 decode step has 180 us of Python against 350 with tensors made in Python
// (3 alternating processes of 7 rounds each, Xeon, amx tier).
std::tuple<Tensor, std::vector<int64_t>> forward_step(
    Model& model, std::vector<int64_t> input_ids, std::vector<int64_t> positions, std::vector<int32_t> slot_mapping,
    const std::vector<std::vector<int32_t>>& block_tables, std::vector<int32_t> token_seq,
    std::vector<int32_t> prefill_seqs, std::vector<int32_t> context_lens, std::vector<int64_t> sample_indices,
    c10::optional<std::vector<int32_t>> lora_slots, bool greedy) {
  const int64_t T = input_ids.size(), seqs = block_tables.size();
  TORCH_CHECK(positions.size() == size_t(T) && slot_mapping.size() == size_t(T) && token_seq.size() == size_t(T) &&
                  context_lens.size() == size_t(T) && (!lora_slots || lora_slots->size() == size_t(T)),
              "forward_step: input_ids, positions, slot_mapping, token_seq, context_lens (and lora_slots) give one "
              "entry per row");
  TORCH_CHECK(prefill_seqs.size() == size_t(seqs), "forward_step: prefill_seqs gives one entry per block table");
  size_t width = 1;
  for (const std::vector<int32_t>& table : block_tables) width = std::max(width, table.size());
  Tensor tables = torch::zeros({T, int64_t(width)}, torch::kInt);  // a row's own table, as forward_layers reads it
  int32_t* row_tables = tables.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(token_seq[t] >= 0 && token_seq[t] < seqs, "forward_step: token_seq[", t, "] = ", token_seq[t],
                " is not a block table (", seqs, ")");
    const std::vector<int32_t>& table = block_tables[token_seq[t]];
    std::copy(table.begin(), table.end(), row_tables + t * width);
  }
  auto view = [](auto& values, at::ScalarType dtype) {
    return torch::from_blob(values.data(), {int64_t(values.size())}, torch::TensorOptions().dtype(dtype));
  };
  std::vector<int64_t> argmax(greedy ? sample_indices.size() : 0);
  Tensor logits = forward_layers(
      model, view(input_ids, at::kLong), view(positions, at::kLong), view(slot_mapping, at::kInt), tables,
      view(token_seq, at::kInt), view(prefill_seqs, at::kInt), view(context_lens, at::kInt),
      view(sample_indices, at::kLong), lora_slots ? c10::optional<Tensor>(view(*lora_slots, at::kInt)) : c10::nullopt,
      greedy ? c10::optional<Tensor>(view(argmax, at::kLong)) : c10::nullopt);
  return {logits, argmax};
}

static void check_logits(const Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(), op,
              ": logits must be contiguous float32 [rows, vocab]");
}

// Each row's most likely token of logits [n, V] (float32), as torch.argmax: kernels.h argmax_rows, a stretch of
// each row per thread, as forward_layers finds them.
Tensor greedy_tokens(const Tensor& logits) {
  check_logits(logits, "greedy_tokens");
  const int64_t rows = logits.size(0), parts = at::get_num_threads();
  Tensor out = torch::empty({rows}, logits.options().dtype(at::kLong));
  std::vector<Best> partial(rows * parts);
  argmax_rows(logits.data_ptr<float>(), rows, logits.size(1), parts, partial.data(), out.data_ptr<int64_t>(), Par{});
  return out;
}

// One token per row of logits [n, V] (float32), drawn at temperature 1 / inv_temperatures[r] with uniform[r] in
// [0, 1) (float64): kernels.h draw_token.
Tensor draw_tokens(const Tensor& logits, const Tensor& inv_temperatures, const Tensor& uniform) {
  check_logits(logits, "draw_tokens");
  TORCH_CHECK(inv_temperatures.scalar_type() == at::kFloat && uniform.scalar_type() == at::kDouble &&
                  inv_temperatures.numel() == logits.size(0) && uniform.numel() == logits.size(0),
              "draw_tokens: one float32 inverse temperature and one float64 uniform per row");
  const int64_t n = logits.size(0), V = logits.size(1);
  Tensor out = torch::empty({n}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  const float* inv_t = inv_temperatures.contiguous().data_ptr<float>();
  const double* u = uniform.contiguous().data_ptr<double>();
  int64_t* tokens = out.data_ptr<int64_t>();
  Par{}(n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) tokens[r] = draw_token(x + r * V, V, inv_t[r], u[r]);
  });
  return out;
}

// One token per row of logits [n, V] (float32) at temperature 1 / inv_temperatures[r], filtered by top_k (int64,
// 0: off), top_p and min_p (float64) among each row's `width`, then `wider`, most likely tokens, drawn with
// uniform[r]; -1 for a row whose kept set may run past them: kernels.h draw_filtered.
Tensor draw_filtered_tokens(const Tensor& logits, const Tensor& inv_temperatures, const Tensor& top_k,
                            const Tensor& top_p, const Tensor& min_p, const Tensor& uniform, int64_t width,
                            int64_t wider) {
  check_logits(logits, "draw_filtered_tokens");
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(inv_temperatures.scalar_type() == at::kFloat && top_k.scalar_type() == at::kLong &&
                  top_p.scalar_type() == at::kDouble && min_p.scalar_type() == at::kDouble &&
                  uniform.scalar_type() == at::kDouble && inv_temperatures.numel() == n && top_k.numel() == n &&
                  top_p.numel() == n && min_p.numel() == n && uniform.numel() == n,
              "draw_filtered_tokens: per row a float32 inverse temperature, an int64 top_k and float64 top_p, min_p "
              "and uniform");
  TORCH_CHECK(width >= 1 && width <= V && wider <= V, "draw_filtered_tokens: width ", width, " and wider ", wider,
              " must be in [1, ", V, "]");
  Tensor out = torch::empty({n}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  const Tensor t = inv_temperatures.contiguous(), k = top_k.contiguous(), p = top_p.contiguous(),
               m = min_p.contiguous(), u = uniform.contiguous();
  int64_t* tokens = out.data_ptr<int64_t>();
  Par{}(n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      tokens[r] = draw_filtered(x + r * V, V, width, wider, t.data_ptr<float>()[r], k.data_ptr<int64_t>()[r],
                                p.data_ptr<double>()[r], m.data_ptr<double>()[r], u.data_ptr<double>()[r]);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = kIsaName;  // the tier this module was built for
  m.def("amx_tiles", [] {  // whether linears of many rows run on AMX tiles: tier amx, and the OS grants them
#if defined(PAGEDLLM_ISA_AMX)
    return amx_permitted();
#else
    return false;
#endif
  });
  m.def("rms_norm", &rms_norm);
  m.def("rope_and_write_kv", &rope_and_write_kv);
  m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("kv_cache"), py::arg("block_tables"),
        py::arg("token_seq"), py::arg("prefill_seqs"), py::arg("context_lens"), py::arg("H"), py::arg("KVH"),
        py::arg("D"), py::arg("scale"), py::arg("fetch_ahead") = true);
  m.def("silu_mul", &silu_mul);
  m.def("greedy_tokens", &greedy_tokens);
  m.def("draw_tokens", &draw_tokens);
  m.def("draw_filtered_tokens", &draw_filtered_tokens);
  py::class_<Linear>(m, "Linear", py::module_local())  // one per tier in a process
      .def(py::init<Tensor, Tensor, c10::optional<Tensor>, int64_t, std::string, bool>())
      .def("__call__", &Linear::operator());
  py::class_<DecoderLayer>(m, "DecoderLayer", py::module_local())
      .def(py::init<Linear, Linear, Linear, Linear, Tensor, Tensor, int64_t, int64_t, int64_t, double, double>());
  py::class_<ModelHead>(m, "ModelHead", py::module_local()).def(py::init<Tensor, Linear, double>());
  py::class_<LoRAModule>(m, "LoRAModule", py::module_local()).def(py::init<Tensor, Tensor, std::vector<int64_t>>());
  py::class_<LoRALayer>(m, "LoRALayer", py::module_local())
      .def(py::init<LoRAModule, LoRAModule, LoRAModule, LoRAModule>());
  py::class_<Model>(m, "Model", py::module_local())
      .def(py::init<std::vector<DecoderLayer>, ModelHead, Tensor, Tensor, Tensor, std::vector<Tensor>,
                    std::vector<LoRALayer>, bool>());
  m.def("forward_step", &forward_step, py::call_guard<py::gil_scoped_release>());
}
