// CPU kernels for x86-64 with AVX-512 (F, BW, VL, BF16): linear layers on packed bf16 or int8 weights,
// and the ops of a decode step (RMSNorm, rotary embedding with the KV-cache write, paged attention,
// SiLU-and-multiply), composed into one call for all decoder layers, so that a decode step costs no
// Python per op and starts torch's threads once (one OpenMP region, a barrier between ops). Loaded by pagedllm/engine/cpu_kernels.py, which checks the CPU first; every op is tested
// against the plain-torch path in tests/test_cpu_kernels.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <type_traits>
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

// Where an op's items go: across torch's threads (a standalone op, `tid` < 0), or, inside decode_layers'
// one parallel region, this thread's even share of them, followed by a barrier.
struct Par {
  int tid = -1, threads = 1;

  template <typename F>
  void operator()(int64_t n, int64_t grain, const F& f) const {
    if (tid < 0) return at::parallel_for(0, n, grain, f);
    const int64_t chunk = (n + threads - 1) / threads, begin = std::min(n, tid * chunk);
    const int64_t end = std::min(n, begin + chunk);
    if (begin < end) f(begin, end);
#pragma omp barrier
  }
};

// Threads split the channel groups, and for many rows the row tiles too, walking rows fastest so a
// group's weights stay in cache while every row tile reads them.
template <typename Out>
void linear_tiles(const TileArgs& a, int64_t M, const Par& par) {
  const int64_t groups = (a.N + 16 * kGroup - 1) / (16 * kGroup), mtiles = (M + 7) / 8;
  par(groups * mtiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t g = t / mtiles, m0 = t % mtiles * 8;
      run_rows<Out>(a, m0, std::min<int64_t>(8, M - m0), g);
    }
  });
}

// ---- RMSNorm, as transformers computes it: normalised in float32, rounded to the model's dtype, then
// scaled by the weight in that dtype. With `residual`, first residual += x (in the model's dtype).
template <typename T>
void rms_norm_rows(T* x, T* residual, const T* w, T* out, int64_t rows, int64_t H, float eps, const Par& par) {
  par(rows, 64, [&](int64_t begin, int64_t end) {
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
                   const int32_t* slots, int64_t tokens, int64_t H, int64_t KVH, int64_t D, int64_t cache_rows,
                   const Par& par) {
  const int64_t half = D / 2, width = (H + 2 * KVH) * D;
  par(tokens * (H + 2 * KVH), 256, [&](int64_t begin, int64_t end) {
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

inline __mmask32 mask32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << n) - 1); }

// scores[g][t] = q_g . k * scale for every query head g of the group. bf16 keys meet the bf16 queries in
// vdpbf16ps (products exact, float32 sums: what a bf16 matmul computes); float32 ones the scaled queries.
inline void scores_of_key(const float (*qf)[kMaxHeadDim], const __m512i (*qb)[kMaxHeadDim / 32], const BFloat16* k,
                          int64_t D, int64_t group, float scale, float (*scores)[16], int64_t t) {
  __m512i kv[kMaxHeadDim / 32];
  for (int64_t c = 0; c * 32 < D; ++c) kv[c] = _mm512_maskz_loadu_epi16(mask32(D - 32 * c), k + 32 * c);
  for (int64_t g = 0; g < group; ++g) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t c = 0; c * 32 < D; ++c) s = _mm512_dpbf16_ps(s, (__m512bh)kv[c], (__m512bh)qb[g][c]);
    scores[g][t] = _mm512_reduce_add_ps(s) * scale;
  }
}

inline void scores_of_key(const float (*qf)[kMaxHeadDim], const __m512i (*)[kMaxHeadDim / 32], const float* k,
                          int64_t D, int64_t group, float, float (*scores)[16], int64_t t) {
  for (int64_t g = 0; g < group; ++g) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16)
      s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail_mask(D - d), qf[g] + d), _mm512_maskz_loadu_ps(tail_mask(D - d), k + d), s);
    scores[g][t] = _mm512_reduce_add_ps(s);
  }
}

template <typename T>
void attend_split(const T* q, const T* cache, const int32_t* table, int64_t first, int64_t last, int64_t BS,
                  int64_t D, int64_t group, int64_t cache_rows, int64_t kv_head, int64_t KVH, float scale,
                  float* m_out, float* l_out, float* acc_out) {
  const T* keys = cache + kv_head * cache_rows * D;
  const T* values = cache + (KVH + kv_head) * cache_rows * D;
  alignas(64) float qf[kMaxGroup][kMaxHeadDim];
  float m[kMaxGroup], l[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) {
    m[g] = -INFINITY, l[g] = 0.f;
    for (int64_t d = 0; d < D; d += 16) {
      __mmask16 dm = tail_mask(D - d);
      if constexpr (std::is_same<T, float>::value)  // float32 caches: scaled queries (bf16 ones use qb)
        store16(qf[g] + d, _mm512_mul_ps(_mm512_maskz_loadu_ps(dm, q + g * D + d), _mm512_set1_ps(scale)), dm);
      store16(acc_out + g * D + d, _mm512_setzero_ps(), dm);
    }
  }
  __m512i qb[kMaxGroup][kMaxHeadDim / 32];  // bf16 caches: the queries as bf16 pairs, for vdpbf16ps
  if constexpr (std::is_same<T, BFloat16>::value) {
    for (int64_t g = 0; g < group; ++g)
      for (int64_t c = 0; c * 32 < D; ++c) qb[g][c] = _mm512_maskz_loadu_epi16(mask32(D - 32 * c), q + g * D + 32 * c);
  }
  alignas(64) float scores[kMaxGroup][16];
  for (int64_t pos = first; pos < last; pos += BS) {
    const int64_t n = std::min(BS, last - pos), row0 = int64_t(table[pos / BS]) * BS;
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
      const int64_t nt = std::min<int64_t>(16, n - t0);
      for (int64_t t = 0; t < nt; ++t) scores_of_key(qf, qb, keys + (row0 + t0 + t) * D, D, group, scale, scores, t);
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

// attend_split for a bf16 cache whose group size G and head_dim 16 * ND are known at compile time: the
// queries and the weighted values stay in registers instead of being reloaded for every position.
template <int G, int ND>
void attend_split_fixed(const BFloat16* q, const BFloat16* cache, const int32_t* table, int64_t first, int64_t last,
                        int64_t BS, int64_t cache_rows, int64_t kv_head, int64_t KVH, float scale, float* m_out,
                        float* l_out, float* acc_out) {
  constexpr int64_t D = 16 * ND, NC = ND / 2;
  const BFloat16* keys = cache + kv_head * cache_rows * D;
  const BFloat16* values = cache + (KVH + kv_head) * cache_rows * D;
  __m512i qb[G][NC];
  __m512 acc[G][ND];
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY, l[g] = 0.f;
    for (int c = 0; c < NC; ++c) qb[g][c] = _mm512_loadu_si512(q + g * D + 32 * c);
    for (int c = 0; c < ND; ++c) acc[g][c] = _mm512_setzero_ps();
  }
  alignas(64) float scores[G][16];
  for (int64_t pos = first; pos < last; pos += BS) {
    const int64_t n = std::min(BS, last - pos), row0 = int64_t(table[pos / BS]) * BS;
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
      const int64_t nt = std::min<int64_t>(16, n - t0);
      for (int64_t t = 0; t < nt; ++t) {
        const BFloat16* k = keys + (row0 + t0 + t) * D;
        __m512i kv[NC];
        for (int c = 0; c < NC; ++c) kv[c] = _mm512_loadu_si512(k + 32 * c);
        for (int g = 0; g < G; ++g) {
          __m512 sum = _mm512_setzero_ps();
          for (int c = 0; c < NC; ++c) sum = _mm512_dpbf16_ps(sum, (__m512bh)kv[c], (__m512bh)qb[g][c]);
          scores[g][t] = _mm512_reduce_add_ps(sum) * scale;
        }
      }
      const __mmask16 mask = tail_mask(nt);
      for (int g = 0; g < G; ++g) {
        __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mask, scores[g]);
        float m_new = std::max(m[g], _mm512_reduce_max_ps(sv));
        const float correction = std::exp(m[g] - m_new);
        __m512 p = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
        l[g] = l[g] * correction + _mm512_reduce_add_ps(p);
        m[g] = m_new;
        _mm512_store_ps(scores[g], p);
        for (int c = 0; c < ND; ++c) acc[g][c] = _mm512_mul_ps(acc[g][c], _mm512_set1_ps(correction));
      }
      for (int64_t t = 0; t < nt; ++t) {
        const BFloat16* v = values + (row0 + t0 + t) * D;
        __m512 vv[ND];
        for (int c = 0; c < ND; ++c) vv[c] = load16(v + 16 * c);
        for (int g = 0; g < G; ++g) {
          __m512 w = _mm512_set1_ps(scores[g][t]);
          for (int c = 0; c < ND; ++c) acc[g][c] = _mm512_fmadd_ps(w, vv[c], acc[g][c]);
        }
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    m_out[g] = m[g], l_out[g] = l[g];
    for (int c = 0; c < ND; ++c) _mm512_storeu_ps(acc_out + g * D + 16 * c, acc[g][c]);
  }
}

using FixedSplit = void (*)(const BFloat16*, const BFloat16*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t, float, float*, float*, float*);

template <int ND>
FixedSplit fixed_for_group(int64_t group) {
  switch (group) {
    case 1: return attend_split_fixed<1, ND>;
    case 2: return attend_split_fixed<2, ND>;
    case 3: return attend_split_fixed<3, ND>;
    case 4: return attend_split_fixed<4, ND>;
    case 8: return attend_split_fixed<8, ND>;
    default: return nullptr;
  }
}

// The register-resident split for the shapes of common models (head_dim 64 or 128), else none.
inline FixedSplit fixed_split(int64_t group, int64_t D) {
  return D == 64 ? fixed_for_group<4>(group) : D == 128 ? fixed_for_group<8>(group) : nullptr;
}

// How a decode batch's contexts are split: enough splits that threads share the work evenly at batch 1, none
// shorter than 256 positions, each a whole number of blocks; and the float32 scratch the splits need.
struct AttentionPlan {
  int64_t splits, split_len, scratch_floats;

  AttentionPlan(const Tensor& context_lens, int64_t H, int64_t KVH, int64_t D, int64_t BS) {
    const int32_t* ctx = context_lens.data_ptr<int32_t>();
    const int64_t B = context_lens.numel(), threads = at::get_num_threads();
    int64_t longest = 1;
    for (int64_t b = 0; b < B; ++b) longest = std::max<int64_t>(longest, ctx[b]);
    splits = std::max<int64_t>(1, std::min<int64_t>({(longest + 255) / 256, (16 * threads + B * KVH - 1) / (B * KVH), 64}));
    split_len = ((longest + splits - 1) / splits + BS - 1) / BS * BS;
    splits = (longest + split_len - 1) / split_len;
    scratch_floats = B * H * splits * (D + 2);
  }
};

template <typename T>
void paged_attention_decode(const T* q, const T* cache, const int32_t* tables, int64_t max_blocks,
                            const int32_t* context_lens, T* out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                            int64_t BS, int64_t cache_rows, float scale, const AttentionPlan& plan, float* scratch,
                            const Par& par) {
  const int64_t group = H / KVH, splits = plan.splits;
  float* ml = scratch;                              // [item][2 * group]: running max, then sum
  float* acc = scratch + B * KVH * splits * group * 2;  // [item][group][D]
  const FixedSplit fast = std::is_same<T, BFloat16>::value && BS % 16 == 0 ? fixed_split(group, D) : nullptr;
  par(B * KVH * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      int64_t b = item / (KVH * splits), h = item / splits % KVH, s = item % splits;
      int64_t first = s * plan.split_len, last = std::min<int64_t>(first + plan.split_len, context_lens[b]);
      float* m = ml + item * group * 2;
      if (first >= last) { for (int64_t g = 0; g < group; ++g) m[g] = -INFINITY, m[group + g] = 0.f; continue; }
      if (fast != nullptr) {
        if constexpr (std::is_same<T, BFloat16>::value)
          fast(q + (b * H + h * group) * D, cache, tables + b * max_blocks, first, last, BS, cache_rows, h, KVH,
               scale, m, m + group, acc + item * group * D);
      } else {
        attend_split(q + (b * H + h * group) * D, cache, tables + b * max_blocks, first, last, BS, D, group,
                     cache_rows, h, KVH, scale, m, m + group, acc + item * group * D);
      }
    }
  });
  par(B * H, 16, [&](int64_t begin, int64_t end) {
    float weights[64];  // at most 64 splits
    for (int64_t bh = begin; bh < end; ++bh) {
      int64_t b = bh / H, h = bh % H / group, g = bh % group;
      int64_t base = (b * KVH + h) * splits;
      float m_all = -INFINITY, l_all = 0.f;
      for (int64_t s = 0; s < splits; ++s) m_all = std::max(m_all, ml[(base + s) * group * 2 + g]);
      for (int64_t s = 0; s < splits; ++s) {
        float m = ml[(base + s) * group * 2 + g], l = ml[(base + s) * group * 2 + group + g];
        weights[s] = l == 0.f ? 0.f : std::exp(m - m_all);
        l_all += l * weights[s];
      }
      for (int64_t d = 0; d < D; d += 16) {
        __mmask16 dm = tail_mask(D - d);
        __m512 o = _mm512_setzero_ps();
        for (int64_t s = 0; s < splits; ++s)
          if (weights[s] != 0.f) o = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(dm, acc + ((base + s) * group + g) * D + d),
                              _mm512_set1_ps(weights[s]), o);
        store16(out + bh * D + d, _mm512_div_ps(o, _mm512_set1_ps(l_all)), dm);
      }
    }
  });
}

template <typename T>
void silu_and_mul(const T* gate_up, T* out, int64_t rows, int64_t I, const Par& par) {
  par(rows, 32, [&](int64_t begin, int64_t end) {
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

template <typename T>
void add_into(T* x, const T* y, int64_t n, const Par& par) {  // x += y, rounded to T
  par((n + 15) / 16, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * 16; i < std::min(n, end * 16); i += 16) {
      __mmask16 m = tail_mask(n - i);
      store16(x + i, _mm512_add_ps(_mm512_maskz_mov_ps(m, load16(x + i)), _mm512_maskz_mov_ps(m, load16(y + i))), m);
    }
  });
}

#define DISPATCH_FLOAT_BF16(dtype, NAME, ...)                                                     \
  [&] {                                                                                            \
    if ((dtype) == at::kBFloat16) { using scalar_t = BFloat16; return __VA_ARGS__(); }             \
    TORCH_CHECK((dtype) == at::kFloat, NAME ": bfloat16 or float32 only");                         \
    using scalar_t = float; return __VA_ARGS__();                                                  \
  }()

Tensor empty_out(const Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return torch::empty(sizes, x.options());
}

}  // namespace

// A linear layer in the form the kernels run: "bf16" (weights packed by pack_bf16), "int8" (codes packed
// by pack_int8, float32 scale per channel), or "plain" (float32 models, through at::linear). Packed
// kinds take a float32 bias; inputs are contiguous [..., K], bf16 for "bf16", bf16 or float32 for "int8"
// (widened to float32 once per call).
struct Linear {
  Tensor weight, scale;
  c10::optional<Tensor> bias;
  int64_t out_features;
  std::string kind;

  int64_t in_features() const {
    return kind == "bf16" ? weight.size(1) * 2 : weight.size(1);  // bf16 packs input pairs
  }

  // y = x @ W.T (+ bias) into `y`; `x_float` is x widened to float32 (int8 kind only, else undefined).
  void run(const Tensor& x, const Tensor& x_float, Tensor& y, const Par& par) const {
    const int64_t K = in_features(), M = x.numel() / K;
    const float* b = bias ? bias->data_ptr<float>() : nullptr;
    if (kind == "plain") {
      if (par.tid <= 0) at::linear_out(y, x, weight, bias ? c10::optional<Tensor>(*bias) : c10::nullopt);
      if (par.tid >= 0) {
#pragma omp barrier
      }
      return;
    }
    TileArgs a = kind == "bf16"
        ? TileArgs{x.data_ptr(), K / 2, weight.data_ptr(), K / 2, nullptr, b, y.data_ptr(), out_features, out_features}
        : TileArgs{x_float.data_ptr(), K, weight.data_ptr(), K, scale.data_ptr<float>(), b, y.data_ptr(),
                   out_features, out_features};
    if (y.scalar_type() == at::kBFloat16) linear_tiles<BFloat16>(a, M, par);
    else linear_tiles<float>(a, M, par);
  }

  Tensor operator()(const Tensor& x) const {
    TORCH_CHECK(x.is_contiguous() && x.size(-1) == in_features(), "linear: input must be contiguous with ",
                in_features(), " features");
    TORCH_CHECK(kind != "bf16" || x.scalar_type() == at::kBFloat16, "linear: the bf16 kind takes bfloat16 input");
    Tensor y = empty_out(x, out_features);
    run(x, kind == "int8" ? x.to(at::kFloat).contiguous() : Tensor(), y, Par{});
    return y;
  }
};

// out = RMSNorm(x) * weight; with residual: residual += x first, and the norm is of the new residual.
Tensor rms_norm(const Tensor& x, const c10::optional<Tensor>& residual, const Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.scalar_type() == x.scalar_type(), "rms_norm: contiguous x, weight of x's dtype");
  Tensor out = torch::empty_like(x);
  const int64_t H = x.size(-1);
  DISPATCH_FLOAT_BF16(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel() / H, H, (float)eps, Par{});
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
                            slot_mapping.data_ptr<int32_t>(), T, H, KVH, D, kv_cache.size(2) * kv_cache.size(3), Par{});
  });
  return q;
}

// Attention of one query token per sequence over its first context_lens[b] cached positions.
Tensor paged_attention(const Tensor& q, const Tensor& kv_cache, const Tensor& block_tables, const Tensor& context_lens,
                       int64_t H, int64_t KVH, int64_t D, double scale) {
  TORCH_CHECK(H / KVH <= kMaxGroup && D <= kMaxHeadDim, "paged_attention: at most 16 query heads per KV head, head_dim 256");
  Tensor out = torch::empty_like(q);
  AttentionPlan plan(context_lens, H, KVH, D, kv_cache.size(3));
  Tensor scratch = torch::empty({plan.scratch_floats}, q.options().dtype(at::kFloat));
  DISPATCH_FLOAT_BF16(q.scalar_type(), "paged_attention", [&] {
    paged_attention_decode<scalar_t>(q.data_ptr<scalar_t>(), kv_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                                     block_tables.size(1), context_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
                                     q.size(0), H, KVH, D, kv_cache.size(3), kv_cache.size(2) * kv_cache.size(3),
                                     (float)scale, plan, scratch.data_ptr<float>(), Par{});
  });
  return out;
}

Tensor silu_mul(const Tensor& gate_up) {
  const int64_t I = gate_up.size(-1) / 2;
  Tensor out = empty_out(gate_up, I);
  DISPATCH_FLOAT_BF16(gate_up.scalar_type(), "silu_mul", [&] {
    silu_and_mul<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gate_up.numel() / (2 * I), I, Par{});
  });
  return out;
}

// One Llama decoder layer's weights and shape; decode_layers runs a list of them.
struct DecoderLayer {
  Linear qkv, o, gate_up, down;
  Tensor input_norm, post_attention_norm;
  int64_t H, KVH, D;
  double eps, scale;
};

// Buffers of a decode step, allocated once for all layers.
struct DecodeBuffers {
  Tensor normed, qkv, q, attn, o, gate_up, act, mlp, wide, scratch;

  DecodeBuffers(const Tensor& hidden, const DecoderLayer& l, const AttentionPlan& plan) {
    const int64_t B = hidden.size(0), I = l.down.in_features();
    auto make = [&](int64_t n) { return torch::empty({B, n}, hidden.options()); };
    normed = make(hidden.size(1)), qkv = make(l.qkv.out_features), q = make(l.H * l.D), attn = make(l.H * l.D);
    o = make(hidden.size(1)), gate_up = make(2 * I), act = make(I), mlp = make(hidden.size(1));
    wide = torch::empty({B, std::max(hidden.size(1), I)}, hidden.options().dtype(at::kFloat));
    scratch = torch::empty({plan.scratch_floats}, hidden.options().dtype(at::kFloat));
  }

  // x widened to float32 for an int8 linear (in this thread's share of rows), else undefined.
  Tensor widened(const Linear& linear, const Tensor& x, const Par& par) {
    if (linear.kind != "int8") return Tensor();
    if (x.scalar_type() == at::kFloat) return x;
    const int64_t n = x.numel();
    Tensor out = wide.view(-1).narrow(0, 0, n).view(x.sizes());
    const BFloat16* src = x.data_ptr<BFloat16>();
    float* dst = out.data_ptr<float>();
    par((n + 15) / 16, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * 16; i < std::min(n, end * 16); i += 16)
        store16(dst + i, _mm512_maskz_mov_ps(tail_mask(n - i), load16(src + i)), tail_mask(n - i));
    });
    return out;
  }
};

template <typename T>
void decode_layer(const DecoderLayer& l, DecodeBuffers& buf, Tensor& hidden, const Tensor& cos, const Tensor& sin,
                  const Tensor& positions, const Tensor& slot_mapping, Tensor& kv_cache, const Tensor& block_tables,
                  const Tensor& context_lens, const AttentionPlan& plan, const Par& par) {
  const int64_t B = hidden.size(0), hidden_size = hidden.size(1), I = l.down.in_features();
  T* h = hidden.data_ptr<T>();
  const int64_t BS = kv_cache.size(3), cache_rows = kv_cache.size(2) * BS;
  rms_norm_rows<T>(h, nullptr, l.input_norm.data_ptr<T>(), buf.normed.data_ptr<T>(), B, hidden_size, l.eps, par);
  l.qkv.run(buf.normed, buf.widened(l.qkv, buf.normed, par), buf.qkv, par);
  rope_write_kv<T>(buf.qkv.data_ptr<T>(), buf.q.data_ptr<T>(), kv_cache.data_ptr<T>(), cos.data_ptr<float>(),
                   sin.data_ptr<float>(), positions.data_ptr<int64_t>(), slot_mapping.data_ptr<int32_t>(), B, l.H,
                   l.KVH, l.D, cache_rows, par);
  paged_attention_decode<T>(buf.q.data_ptr<T>(), kv_cache.data_ptr<T>(), block_tables.data_ptr<int32_t>(),
                            block_tables.size(1), context_lens.data_ptr<int32_t>(), buf.attn.data_ptr<T>(), B, l.H,
                            l.KVH, l.D, BS, cache_rows, l.scale, plan, buf.scratch.data_ptr<float>(), par);
  l.o.run(buf.attn, buf.widened(l.o, buf.attn, par), buf.o, par);
  rms_norm_rows<T>(buf.o.data_ptr<T>(), h, l.post_attention_norm.data_ptr<T>(), buf.normed.data_ptr<T>(), B,
                   hidden_size, l.eps, par);
  l.gate_up.run(buf.normed, buf.widened(l.gate_up, buf.normed, par), buf.gate_up, par);
  silu_and_mul<T>(buf.gate_up.data_ptr<T>(), buf.act.data_ptr<T>(), B, I, par);
  l.down.run(buf.act, buf.widened(l.down, buf.act, par), buf.mlp, par);
  add_into<T>(h, buf.mlp.data_ptr<T>(), B * hidden_size, par);
}

// Every decoder layer for a batch of decoding sequences (one new token each), `hidden` [B, hidden]
// updated in place: the computation of models/llama.py's DecoderLayer with TorchPagedAttention, in one
// OpenMP region for the whole step.
void decode_layers(const std::vector<DecoderLayer>& layers, Tensor& hidden, const Tensor& cos, const Tensor& sin,
                   const Tensor& positions, const Tensor& slot_mapping, std::vector<Tensor>& kv_caches,
                   const Tensor& block_tables, const Tensor& context_lens) {
  TORCH_CHECK(!layers.empty() && hidden.is_contiguous() && hidden.dim() == 2, "decode_layers: hidden [B, hidden]");
  const DecoderLayer& first = layers[0];
  TORCH_CHECK(first.H / first.KVH <= kMaxGroup && first.D <= kMaxHeadDim, "decode_layers: head shape unsupported");
  AttentionPlan plan(context_lens, first.H, first.KVH, first.D, kv_caches[0].size(3));
  DecodeBuffers buf(hidden, first, plan);
  const int threads = at::get_num_threads();
  DISPATCH_FLOAT_BF16(hidden.scalar_type(), "decode_layers", [&] {
#pragma omp parallel num_threads(threads)
    {
      Par par{omp_get_thread_num(), omp_get_num_threads()};
      for (size_t i = 0; i < layers.size(); ++i)
        decode_layer<scalar_t>(layers[i], buf, hidden, cos, sin, positions, slot_mapping, kv_caches[i],
                               block_tables, context_lens, plan, par);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("rope_and_write_kv", &rope_and_write_kv);
  m.def("paged_attention", &paged_attention);
  m.def("silu_mul", &silu_mul);
  py::class_<Linear>(m, "Linear")
      .def(py::init<Tensor, Tensor, c10::optional<Tensor>, int64_t, std::string>())
      .def("__call__", &Linear::operator());
  py::class_<DecoderLayer>(m, "DecoderLayer")
      .def(py::init<Linear, Linear, Linear, Linear, Tensor, Tensor, int64_t, int64_t, int64_t, double, double>());
  m.def("decode_layers", &decode_layers, py::call_guard<py::gil_scoped_release>());
}
