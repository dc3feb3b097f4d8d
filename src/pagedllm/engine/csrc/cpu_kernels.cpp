// CPU kernels for x86-64 with AVX-512 (F, BW, VL, BF16): linear layers on packed bf16 or int8 weights,
// and the ops of a decode step (RMSNorm, rotary embedding with the KV-cache write, paged attention,
// SiLU-and-multiply), composed into one call per decoder layer so that a decode step costs no Python
// per op. Loaded by pagedllm/engine/cpu_kernels.py, which checks the CPU first; every op is tested
// against the plain-torch path in tests/test_cpu_kernels.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

using at::BFloat16;
using torch::Tensor;

namespace {

// ---- loads and stores of 16 lanes, float32 inside --------------------------------------------------
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void store16(float* p, __m512 v, __mmask16 m = 0xFFFF) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(BFloat16* p, __m512 v, __mmask16 m = 0xFFFF) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
inline __m512 round_like(float*, __m512 v) { return v; }
inline __m512 round_like(BFloat16*, __m512 v) {  // v rounded to bfloat16 and back, as a bf16 op would leave it
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

// exp for the softmax: range reduction to 2^n * e^r, |r| <= ln2/2, and a degree-6 polynomial (< 2 ulp).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

constexpr int64_t kPrefetch = 4096;  // bytes ahead on each weight stream

// ---- linear on packed weights -------------------------------------------------------------------------
// Output channels go in groups of 48 (three 16-lane blocks), each group one sequential stream of weights:
// bf16 [N, K] is packed as [ceil(N/48), K/2, 48, 2], so at input pair k a group's 48 channels hold their
// weights (k, k+1) in three 64-byte rows, and `vdpbf16ps` with a broadcast input pair adds to 16 outputs
// at once; int8 is packed as [ceil(N/48), K, 48] with a float32 scale per channel, widened to float32 in
// registers (weight-only: activations stay as they are). One stream per group rather than one per block
// measured 10% faster at batch 1; weights sit in huge pages (cpu_kernels.py), another 15%.
constexpr int kGroup = 3;  // 16-lane blocks per channel group

template <int MR, typename Out>
void bf16_tile(const int32_t* x, int64_t x_stride, const __m512i* w, int64_t K2, const float* bias,
               Out* y, int64_t y_stride, int64_t n0, int64_t N) {
  __m512 acc[MR][kGroup];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kGroup; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k, w += kGroup) {
    _mm_prefetch((const char*)w + kPrefetch, _MM_HINT_T0);
    _mm_prefetch((const char*)w + kPrefetch + 64, _MM_HINT_T0);
    _mm_prefetch((const char*)w + kPrefetch + 128, _MM_HINT_T0);
    __m512bh wv[kGroup];
    for (int j = 0; j < kGroup; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j);
    for (int i = 0; i < MR; ++i) {
      __m512bh xb = (__m512bh)_mm512_set1_epi32(x[i * x_stride + k]);
      for (int j = 0; j < kGroup; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xb);
    }
  }
  for (int j = 0; j < kGroup; ++j) {
    int64_t n = n0 + 16 * j;
    if (n >= N) break;
    __mmask16 m = tail_mask(N - n);
    __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + n) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) store16(y + i * y_stride + n, _mm512_add_ps(acc[i][j], b), m);
  }
}

template <int MR, typename Out>
void int8_tile(const float* x, int64_t x_stride, const int8_t* w, int64_t K, const float* scale, const float* bias,
               Out* y, int64_t y_stride, int64_t n0, int64_t N) {
  __m512 acc[MR][kGroup];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kGroup; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k, w += 16 * kGroup) {
    if ((k & 3) == 0) {
      for (int c = 0; c < kGroup; ++c) _mm_prefetch((const char*)w + kPrefetch + 64 * c, _MM_HINT_T0);
    }
    __m512 wv[kGroup];
    for (int j = 0; j < kGroup; ++j)
      wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 16 * j))));
    for (int i = 0; i < MR; ++i) {
      __m512 xb = _mm512_set1_ps(x[i * x_stride + k]);
      for (int j = 0; j < kGroup; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], xb, acc[i][j]);
    }
  }
  for (int j = 0; j < kGroup; ++j) {
    int64_t n = n0 + 16 * j;
    if (n >= N) break;
    __mmask16 m = tail_mask(N - n);
    __m512 s = _mm512_maskz_loadu_ps(m, scale + n);
    __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + n) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) store16(y + i * y_stride + n, _mm512_fmadd_ps(acc[i][j], s, b), m);
  }
}

// One tile: up to 8 rows by one channel group (24 accumulators in registers).
struct TileArgs {
  const void* x; int64_t x_stride;  // int32 pairs of bf16 (bf16 kind) or float32 (int8 kind)
  const void* w; int64_t k_len;     // K/2 (bf16) or K (int8)
  const float* scale; const float* bias;
  void* y; int64_t y_stride; int64_t N;
};

template <typename Out, int MR>
void run_tile(const TileArgs& a, int64_t m0, int64_t g) {
  Out* y = static_cast<Out*>(a.y) + m0 * a.y_stride;
  if (a.scale == nullptr) {
    bf16_tile<MR>(static_cast<const int32_t*>(a.x) + m0 * a.x_stride, a.x_stride,
                  static_cast<const __m512i*>(a.w) + g * a.k_len * kGroup, a.k_len, a.bias, y, a.y_stride,
                  g * 16 * kGroup, a.N);
  } else {
    int8_tile<MR>(static_cast<const float*>(a.x) + m0 * a.x_stride, a.x_stride,
                  static_cast<const int8_t*>(a.w) + g * a.k_len * 16 * kGroup, a.k_len, a.scale, a.bias, y,
                  a.y_stride, g * 16 * kGroup, a.N);
  }
}

template <typename Out>
void run_rows(const TileArgs& a, int64_t m0, int64_t rows, int64_t g) {
  switch (rows) {
    case 1: return run_tile<Out, 1>(a, m0, g);
    case 2: return run_tile<Out, 2>(a, m0, g);
    case 3: return run_tile<Out, 3>(a, m0, g);
    case 4: return run_tile<Out, 4>(a, m0, g);
    case 5: return run_tile<Out, 5>(a, m0, g);
    case 6: return run_tile<Out, 6>(a, m0, g);
    case 7: return run_tile<Out, 7>(a, m0, g);
    default: return run_tile<Out, 8>(a, m0, g);
  }
}

// Threads split the channel groups, and for many rows the row tiles too, walking rows fastest so a
// group's weights stay in cache while every row tile reads them.
template <typename Out>
void linear_tiles(const TileArgs& a, int64_t M) {
  const int64_t groups = (a.N + 16 * kGroup - 1) / (16 * kGroup), mtiles = (M + 7) / 8;
  at::parallel_for(0, groups * mtiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t g = t / mtiles, m0 = t % mtiles * 8;
      run_rows<Out>(a, m0, std::min<int64_t>(8, M - m0), g);
    }
  });
}

Tensor empty_out(const Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return torch::empty(sizes, x.options());
}

void check_linear_input(const Tensor& x, int64_t K) {
  TORCH_CHECK(x.is_contiguous() && x.size(-1) == K, "linear: input must be contiguous with ", K, " features");
}

}  // namespace

// y = x @ W.T (+ bias) with W packed by pack_bf16; x bfloat16 [..., K], K even.
Tensor linear_bf16(const Tensor& x, const Tensor& packed, const c10::optional<Tensor>& bias, int64_t N) {
  const int64_t K = packed.size(1) * 2;
  check_linear_input(x, K);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "linear_bf16: input must be bfloat16");
  Tensor y = empty_out(x, N);
  const int64_t M = x.numel() / K;
  TileArgs a{x.data_ptr(), K / 2, packed.data_ptr(), K / 2, nullptr,
             bias ? bias->data_ptr<float>() : nullptr, y.data_ptr(), N, N};
  linear_tiles<BFloat16>(a, M);
  return y;
}

// y = (x @ Q.T) * scale (+ bias) with Q packed by pack_int8; x bfloat16 or float32, widened once.
Tensor linear_int8(const Tensor& x, const Tensor& packed, const Tensor& scale, const c10::optional<Tensor>& bias,
                   int64_t N) {
  const int64_t K = packed.size(1);
  check_linear_input(x, K);
  Tensor xf = x.to(at::kFloat).contiguous();
  Tensor y = empty_out(x, N);
  const int64_t M = x.numel() / K;
  TileArgs a{xf.data_ptr(), K, packed.data_ptr(), K, scale.data_ptr<float>(),
             bias ? bias->data_ptr<float>() : nullptr, y.data_ptr(), N, N};
  if (x.scalar_type() == at::kBFloat16) linear_tiles<BFloat16>(a, M);
  else linear_tiles<float>(a, M);
  return y;
}

namespace {

// ---- RMSNorm, as transformers computes it: normalised in float32, rounded to the model's dtype, then
// scaled by the weight in that dtype. With `residual`, first residual += x (in the model's dtype).
template <typename T>
void rms_norm_rows(T* x, T* residual, const T* w, T* out, int64_t rows, int64_t H, float eps) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* src = residual ? residual + r * H : x + r * H;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t i = 0; i < H; i += 16) {
        __mmask16 m = tail_mask(H - i);
        __m512 v = _mm512_maskz_mov_ps(m, load16(src + i));
        if (residual) {
          v = round_like((T*)nullptr, _mm512_add_ps(v, _mm512_maskz_mov_ps(m, load16(x + r * H + i))));
          store16(src + i, v, m);
        }
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / H + eps));
      for (int64_t i = 0; i < H; i += 16) {
        __mmask16 m = tail_mask(H - i);
        __m512 v = round_like((T*)nullptr, _mm512_mul_ps(_mm512_maskz_mov_ps(m, load16(src + i)), inv));
        store16(out + r * H + i, _mm512_mul_ps(v, _mm512_maskz_mov_ps(m, load16(w + i))), m);
      }
    }
  });
}

// ---- rotary embedding of queries and keys, and the keys and values written into the paged cache ------
// qkv: [T, (H + 2 KVH) * D]; cache: [2, KVH, num_blocks * block_size, D]; cos/sin: [max_positions, D].
template <typename T>
void rope_write_kv(const T* qkv, T* q_out, T* cache, const float* cos, const float* sin, const int64_t* positions,
                   const int32_t* slots, int64_t tokens, int64_t H, int64_t KVH, int64_t D, int64_t cache_rows) {
  const int64_t half = D / 2, width = (H + 2 * KVH) * D;
  at::parallel_for(0, tokens * (H + 2 * KVH), 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t tok = t / (H + 2 * KVH), head = t % (H + 2 * KVH);
      const T* src = qkv + tok * width + head * D;
      T* dst = head < H ? q_out + (tok * H + head) * D
                        : cache + ((head - H) * cache_rows + slots[tok]) * D;  // keys then values, by head
      if (head >= H + KVH) {  // values are copied as they are
        for (int64_t i = 0; i < D; i += 16) store16(dst + i, load16(src + i), tail_mask(D - i));
        continue;
      }
      const float* c = cos + positions[tok] * D;
      const float* s = sin + positions[tok] * D;
      for (int64_t i = 0; i < half; i += 16) {
        __mmask16 m = tail_mask(half - i);
        __m512 lo = _mm512_maskz_mov_ps(m, load16(src + i)), hi = _mm512_maskz_mov_ps(m, load16(src + half + i));
        __m512 lo_out = _mm512_fmsub_ps(lo, _mm512_maskz_loadu_ps(m, c + i), _mm512_mul_ps(hi, _mm512_maskz_loadu_ps(m, s + i)));
        __m512 hi_out = _mm512_fmadd_ps(hi, _mm512_maskz_loadu_ps(m, c + half + i),
                                        _mm512_mul_ps(lo, _mm512_maskz_loadu_ps(m, s + half + i)));
        store16(dst + i, lo_out, m);
        store16(dst + half + i, hi_out, m);
      }
    }
  });
}

// ---- paged attention for decode (one query token per sequence), split over long contexts -------------
// Each work item is (sequence, KV head, split): it reads its share of the context once for all the query
// heads of its group, keeping a running max, sum and weighted values (flash-decoding); splits are merged
// afterwards. q, out: [B, H * D]; block_tables: [B, max_blocks] int32; context_lens: [B] int32.
constexpr int64_t kMaxGroup = 16, kMaxHeadDim = 256;

template <typename T>
void attend_split(const T* q, const T* cache, const int32_t* table, int64_t first, int64_t last, int64_t BS,
                  int64_t D, int64_t group, int64_t cache_rows, int64_t kv_head, int64_t KVH, float scale,
                  float* m_out, float* l_out, float* acc_out) {
  const T* keys = cache + kv_head * cache_rows * D;
  const T* values = cache + (KVH + kv_head) * cache_rows * D;
  float qf[kMaxGroup][kMaxHeadDim];
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g][d] = static_cast<float>(q[g * D + d]) * scale;
  float m[kMaxGroup], l[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) {
    m[g] = -INFINITY, l[g] = 0.f;
    for (int64_t d = 0; d < D; ++d) acc_out[g * D + d] = 0.f;
  }
  alignas(64) float scores[kMaxGroup][16];
  for (int64_t pos = first; pos < last; pos += BS) {
    const int64_t n = std::min(BS, last - pos), row0 = int64_t(table[pos / BS]) * BS;
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
      const int64_t nt = std::min<int64_t>(16, n - t0);
      for (int64_t t = 0; t < nt; ++t) {
        const T* k = keys + (row0 + t0 + t) * D;
        for (int64_t g = 0; g < group; ++g) {
          __m512 s = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16)
            s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail_mask(D - d), qf[g] + d),
                                _mm512_maskz_mov_ps(tail_mask(D - d), load16(k + d)), s);
          scores[g][t] = _mm512_reduce_add_ps(s);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        __mmask16 mask = tail_mask(nt);
        __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mask, scores[g]);
        float m_new = std::max(m[g], _mm512_reduce_max_ps(sv));
        float correction = std::exp(m[g] - m_new);
        __m512 p = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
        l[g] = l[g] * correction + _mm512_reduce_add_ps(p);
        m[g] = m_new;
        _mm512_store_ps(scores[g], p);
        float* acc = acc_out + g * D;
        for (int64_t d = 0; d < D; d += 16)
          store16(acc + d, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail_mask(D - d), acc + d), _mm512_set1_ps(correction)),
                  tail_mask(D - d));
      }
      for (int64_t t = 0; t < nt; ++t) {
        const T* v = values + (row0 + t0 + t) * D;
        for (int64_t d = 0; d < D; d += 16) {
          __mmask16 dm = tail_mask(D - d);
          __m512 vv = _mm512_maskz_mov_ps(dm, load16(v + d));
          for (int64_t g = 0; g < group; ++g) {
            float* acc = acc_out + g * D + d;
            store16(acc, _mm512_fmadd_ps(_mm512_set1_ps(scores[g][t]), vv, _mm512_maskz_loadu_ps(dm, acc)), dm);
          }
        }
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) m_out[g] = m[g], l_out[g] = l[g];
}

template <typename T>
void paged_attention_decode(const T* q, const T* cache, const int32_t* tables, int64_t max_blocks,
                            const int32_t* context_lens, T* out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                            int64_t BS, int64_t cache_rows, float scale) {
  const int64_t group = H / KVH;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max<int64_t>(longest, context_lens[b]);
  // Enough splits that every thread has work at batch 1, none shorter than 256 positions.
  const int64_t threads = at::get_num_threads();
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>((longest + 255) / 256, (4 * threads + B * KVH - 1) / (B * KVH)));
  const int64_t split_len = ((longest + splits - 1) / splits + BS - 1) / BS * BS;
  splits = (longest + split_len - 1) / split_len;
  std::vector<float> ml(B * KVH * splits * group * 2), acc(B * KVH * splits * group * D);
  at::parallel_for(0, B * KVH * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      int64_t b = item / (KVH * splits), h = item / splits % KVH, s = item % splits;
      int64_t first = s * split_len, last = std::min<int64_t>(first + split_len, context_lens[b]);
      float* m = ml.data() + item * group * 2;
      if (first >= last) { for (int64_t g = 0; g < group; ++g) m[g] = -INFINITY, m[group + g] = 0.f; continue; }
      attend_split(q + (b * H + h * group) * D, cache, tables + b * max_blocks, first, last, BS, D, group,
                   cache_rows, h, KVH, scale, m, m + group, acc.data() + item * group * D);
    }
  });
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      int64_t b = bh / H, h = bh % H / group, g = bh % group;
      int64_t base = (b * KVH + h) * splits;
      float m_all = -INFINITY;
      for (int64_t s = 0; s < splits; ++s) m_all = std::max(m_all, ml[(base + s) * group * 2 + g]);
      float l_all = 0.f;
      std::vector<float> o(D, 0.f);
      for (int64_t s = 0; s < splits; ++s) {
        float m = ml[(base + s) * group * 2 + g], l = ml[(base + s) * group * 2 + group + g];
        if (l == 0.f) continue;
        float w = std::exp(m - m_all);
        l_all += l * w;
        const float* a = acc.data() + ((base + s) * group + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += a[d] * w;
      }
      for (int64_t d = 0; d < D; ++d) out[bh * D + d] = static_cast<T>(o[d] / l_all);
    }
  });
}

template <typename T>
void silu_and_mul(const T* gate_up, T* out, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, 32, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < I; i += 16) {
        __mmask16 m = tail_mask(I - i);
        __m512 g = _mm512_maskz_mov_ps(m, load16(gate_up + r * 2 * I + i));
        __m512 u = _mm512_maskz_mov_ps(m, load16(gate_up + r * 2 * I + I + i));
        __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        store16(out + r * I + i, _mm512_mul_ps(round_like((T*)nullptr, silu), u), m);
      }
  });
}

#define DISPATCH_FLOAT_BF16(dtype, NAME, ...)                                                     \
  [&] {                                                                                            \
    if ((dtype) == at::kBFloat16) { using scalar_t = BFloat16; return __VA_ARGS__(); }             \
    TORCH_CHECK((dtype) == at::kFloat, NAME ": bfloat16 or float32 only");                         \
    using scalar_t = float; return __VA_ARGS__();                                                  \
  }()

}  // namespace

// out = RMSNorm(x) * weight; with residual: residual += x first, and the norm is of the new residual.
Tensor rms_norm(const Tensor& x, const c10::optional<Tensor>& residual, const Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.scalar_type() == x.scalar_type(), "rms_norm: contiguous x, weight of x's dtype");
  Tensor out = torch::empty_like(x);
  const int64_t H = x.size(-1);
  DISPATCH_FLOAT_BF16(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel() / H, H, (float)eps);
  });
  return out;
}

// Rotates the queries and keys of qkv [T, (H + 2 KVH) * D] at `positions`, writes keys and values into
// kv_cache [2, KVH, num_blocks, block_size, D] at `slot_mapping`; returns the rotated queries [T, H * D].
Tensor rope_and_write_kv(const Tensor& qkv, const Tensor& cos, const Tensor& sin, const Tensor& positions,
                         const Tensor& slot_mapping, Tensor& kv_cache, int64_t H, int64_t KVH, int64_t D) {
  TORCH_CHECK(qkv.is_contiguous() && kv_cache.scalar_type() == qkv.scalar_type(), "rope_and_write_kv: dtypes");
  const int64_t T = qkv.size(0);
  Tensor q = torch::empty({T, H * D}, qkv.options());
  DISPATCH_FLOAT_BF16(qkv.scalar_type(), "rope_and_write_kv", [&] {
    rope_write_kv<scalar_t>(qkv.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), kv_cache.data_ptr<scalar_t>(),
                            cos.data_ptr<float>(), sin.data_ptr<float>(), positions.data_ptr<int64_t>(),
                            slot_mapping.data_ptr<int32_t>(), T, H, KVH, D, kv_cache.size(2) * kv_cache.size(3));
  });
  return q;
}

Tensor paged_attention(const Tensor& q, const Tensor& kv_cache, const Tensor& block_tables, const Tensor& context_lens,
                       int64_t H, int64_t KVH, int64_t D, double scale) {
  TORCH_CHECK(H / KVH <= kMaxGroup && D <= kMaxHeadDim, "paged_attention: at most 16 query heads per KV head, head_dim 256");
  Tensor out = torch::empty_like(q);
  DISPATCH_FLOAT_BF16(q.scalar_type(), "paged_attention", [&] {
    paged_attention_decode<scalar_t>(q.data_ptr<scalar_t>(), kv_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                                     block_tables.size(1), context_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
                                     q.size(0), H, KVH, D, kv_cache.size(3), kv_cache.size(2) * kv_cache.size(3), (float)scale);
  });
  return out;
}

Tensor silu_mul(const Tensor& gate_up) {
  const int64_t I = gate_up.size(-1) / 2;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  Tensor out = torch::empty(sizes, gate_up.options());
  DISPATCH_FLOAT_BF16(gate_up.scalar_type(), "silu_mul", [&] {
    silu_and_mul<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gate_up.numel() / (2 * I), I);
  });
  return out;
}

// A linear layer in the form the kernels run: packed bf16, packed int8 with scales, or plain weights
// (float32 models) through at::linear.
struct Linear {
  Tensor weight, scale;
  c10::optional<Tensor> bias;  // float32 for the packed kinds, the weight's dtype for plain
  int64_t out_features;
  std::string kind;  // "bf16", "int8" or "plain"

  Tensor operator()(const Tensor& x) const {
    if (kind == "bf16") return linear_bf16(x, weight, bias, out_features);
    if (kind == "int8") return linear_int8(x, weight, scale, bias, out_features);
    return at::linear(x, weight, bias);
  }
};

// One Llama decoder layer for a batch of decoding sequences (one new token each), `hidden` updated in
// place. Same computation as models/llama.py's DecoderLayer with TorchPagedAttention.
struct DecoderLayer {
  Linear qkv, o, gate_up, down;
  Tensor input_norm, post_attention_norm;
  int64_t H, KVH, D;
  double eps, scale;

  void forward(Tensor& hidden, const Tensor& cos, const Tensor& sin, const Tensor& positions, const Tensor& slot_mapping,
               Tensor& kv_cache, const Tensor& block_tables, const Tensor& context_lens) const {
    Tensor q = rope_and_write_kv(qkv(rms_norm(hidden, c10::nullopt, input_norm, eps)), cos, sin, positions,
                                 slot_mapping, kv_cache, H, KVH, D);
    Tensor attn = o(paged_attention(q, kv_cache, block_tables, context_lens, H, KVH, D, scale));
    Tensor mlp = down(silu_mul(gate_up(rms_norm(attn, hidden, post_attention_norm, eps))));
    hidden.add_(mlp);
  }
};

void decode_layers(const std::vector<DecoderLayer>& layers, Tensor& hidden, const Tensor& cos, const Tensor& sin,
                   const Tensor& positions, const Tensor& slot_mapping, std::vector<Tensor>& kv_caches,
                   const Tensor& block_tables, const Tensor& context_lens) {
  for (size_t i = 0; i < layers.size(); ++i)
    layers[i].forward(hidden, cos, sin, positions, slot_mapping, kv_caches[i], block_tables, context_lens);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16);
  m.def("linear_int8", &linear_int8);
  m.def("rms_norm", &rms_norm);
  m.def("rope_and_write_kv", &rope_and_write_kv);
  m.def("paged_attention", &paged_attention);
  m.def("silu_mul", &silu_mul);
  py::class_<Linear>(m, "Linear")
      .def(py::init<Tensor, Tensor, c10::optional<Tensor>, int64_t, std::string>())
      .def("__call__", &Linear::operator());
  py::class_<DecoderLayer>(m, "DecoderLayer")
      .def(py::init<Linear, Linear, Linear, Linear, Tensor, Tensor, int64_t, int64_t, int64_t, double, double>());
  m.def("decode_layers", &decode_layers);
}
