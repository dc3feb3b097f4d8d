// pagedllm's CPU kernels on raw pointers, written once over the vector layer (vec.h) for every CPU tier:
// linear layers on packed bf16 or int8 weights, and the ops of a step (RMSNorm, rotary embedding with the
// KV-cache write, paged attention for decodes and prefill chunks, SiLU-and-multiply). Nothing here needs torch:
// cpu_kernels.cpp binds these to tensors, and kernels_selftest.cpp runs them alone (the Arm build under qemu).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

#include "vec.h"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(PAGEDLLM_ISA_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pagedllm {

// ---- where an op's items go ---------------------------------------------------------------------------------
// Across threads (a standalone op, `tid` < 0), or, inside forward_layers' one parallel region, this thread's even
// share of them, followed by a barrier. PAGEDLLM_WITH_ATEN: standalone ops use torch's own thread pool.
template <typename F>
inline void parallel_for(int64_t n, int64_t grain, const F& f) {
#if defined(PAGEDLLM_WITH_ATEN)
  at::parallel_for(0, n, grain, f);
#elif defined(_OPENMP)
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), (n + grain - 1) / grain));
#pragma omp parallel num_threads(int(threads))
  {
    const int64_t chunk = (n + threads - 1) / threads, begin = std::min(n, omp_get_thread_num() * chunk);
    if (begin < std::min(n, begin + chunk)) f(begin, std::min(n, begin + chunk));
  }
#else
  (void)grain;
  if (n > 0) f(0, n);
#endif
}

// The barrier between the ops of forward_layers' region. libgomp's makes a futex syscall at every barrier (its last
// thread wakes any sleepers, whether or not one sleeps): about 256 a batch-1 decode step of SmolLM2. Without them,
// Zen 4, 2 threads, the two barriers alternating step by step: a batch-1 step 8.09 against 8.16 ms (0.9%), 32 rows
// and prompts level. Like libgomp's, it spins for milliseconds (sleeping sooner lost a served engine throughput:
// README), then yields the core; only briefly where the region has more threads than the process has CPUs (one
// waits for a thread that is not running).
class SpinBarrier {
 public:
  // Each thread of the region, before its first wait: the region's size.
  void join(int threads) {
    total_.store(threads, std::memory_order_relaxed);
#if defined(_OPENMP)
    spins_.store(threads > omp_get_num_procs() ? 1 << 10 : 1 << 16, std::memory_order_relaxed);
#endif
  }

  void wait() {
    const int generation = generation_.load(std::memory_order_relaxed);  // it cannot move before this thread arrives
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == total_.load(std::memory_order_relaxed) - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    const int spins = spins_.load(std::memory_order_relaxed);  // 2^16 pauses: 1.7 ms on Zen 4
    for (int i = 0; generation_.load(std::memory_order_acquire) == generation;) {
      if (i < spins) pause(), ++i;  // counts no further: a wait of any length never overflows it
      else std::this_thread::yield();
    }
  }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
  std::atomic<int> total_{1}, spins_{1 << 10};
};

struct Par {
  int tid = -1, threads = 1;
  SpinBarrier* barrier = nullptr;  // the region's (inside forward_layers), else OpenMP's

  template <typename F>
  void operator()(int64_t n, int64_t grain, const F& f) const {
    if (tid < 0) return parallel_for(n, grain, f);
    const int64_t begin = first_of(n), end = std::min(n, begin + (n + threads - 1) / threads);
    if (begin < end) f(begin, end);
    sync();
  }

  // Every thread of the region waits for the others here (inside a region only).
  void sync() const {
    if (barrier) {
      barrier->wait();
    } else {
#pragma omp barrier
    }
  }

  // The first of n items this thread takes (inside forward_layers' region).
  int64_t first_of(int64_t n) const { return std::min<int64_t>(n, std::max(tid, 0) * ((n + threads - 1) / threads)); }

  // Items of uneven cost, costliest first: inside the region each thread takes the next one as it frees up (an even
  // split of a prefill's causal tiles left one of two threads idle for a third of the attention), then a barrier.
  template <typename F>
  void each_dynamic(int64_t n, const F& f) const {
    if (tid < 0) return parallel_for(n, 1, [&](int64_t begin, int64_t end) { for (int64_t i = begin; i < end; ++i) f(i); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) f(i);
  }
};

// A thread's scratch that vectors and tiles read whole: every buffer at a 64-byte boundary. malloc's 16-byte
// alignment split each row of a tile across two cache lines on one thread and not the other (a 512-token prompt,
// int8: the worker thread 25% slower in its linears, 0.89x of bf16 overall).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using Scratch = std::vector<T, CacheLineAllocator<T>>;

// ---- linear on packed weights -------------------------------------------------------------------------------
// Output channels go in groups of 48, each group one sequential stream of weights: bf16 [N, K] is packed as
// [ceil(N/48), K/2, 48, 2] (at input pair k, a group's 48 channels hold weights (k, k+1) as one 32-bit word
// each), int8 as [ceil(N/48), K, 48] with a float32 scale per channel, widened to float32 in registers
// (weight-only: activations stay as they are). One stream per group rather than one per vector measured 10%
// faster at batch 1 on AVX-512; weights sit in huge pages (cpu.py), another 15%.
constexpr int64_t kGroupChannels = 48;
// Loops over a tile's registers are unrolled whole, so its accumulators stay in registers: left to itself, GCC
// kept int8_tile's in memory and stored them at every step (half the speed at batch 1).
#define PAGEDLLM_UNROLL _Pragma("GCC unroll 16")
constexpr int kGroupVecs = int(kGroupChannels) / kLanes;
static_assert(kGroupVecs * kLanes == kGroupChannels, "a channel group is a whole number of vectors");
// Rows per tile, so that kMaxRows x kGroupVecs accumulators stay in registers: 8 x 3 of AVX-512's 32, 2 x 6 of
// AVX2's 16, 2 x 12 of NEON's 32.
constexpr int kMaxRows = kLanes == 16 ? 8 : 2;
constexpr int64_t kPrefetch = 4096;  // bytes ahead on each weight stream

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// A tile's packed weights kPrefetch bytes ahead of it, the 192 bytes of one step of k: into every cache level, or
// `non_temporal` (prefetchnta) where the CPU's plan says so (cpu_isa.py non_temporal_weights: AMD). On Zen 4 a
// non-temporal line is not kept in the L3 once read, so a step's weights no longer push Python's data out of it:
// batch-1 decode, Python outside the kernels' call 94-98 against 132-135 us a step (avx2 tier: 74 against 111), and
// the kernels' own time level to 3% faster (batch 1, 8 and 32 rows, a 512-token prompt; int8 too; in-process A/B).
// On a Sapphire Rapids-class Xeon the same fetches made batch-1 decode 3.3x slower (SmolLM2, 2 threads: 44 against
// 147 tok/s).
inline void fetch_weights(const void* w, bool non_temporal) {
  const char* p = static_cast<const char*>(w) + kPrefetch;
  for (int64_t b = 0; b < kGroupChannels * 4; b += 64)
    non_temporal ? __builtin_prefetch(p + b, 0, 0) : __builtin_prefetch(p + b, 0, 3);
}

// Weights to bring into cache while a tile runs. Strip tiles fetch one line every 8 steps of k: spread out, the
// fetches never fill the miss queue (issued in bursts, the prefetch instructions stalled for 2% of a 32-row step on
// AVX2).
struct Fetch {
  const char* next = nullptr;
  const char* end = nullptr;
};

// x: bf16 pairs as 32-bit words, [rows, K/2] with stride x_stride; w: one group, [K/2, 48] words; `scale`: a
// factor per channel (int8 codes run as bf16 pairs), or none. `fetch`: other weights into L2 meanwhile, two lines a
// step of k (a tile on int8 codes turned into pairs: the next group's codes, 27-74 KB for SmolLM2).
// `non_temporal`: how w's stream is fetched (fetch_weights).
template <int MR, typename Out>
void bf16_tile(const uint32_t* x, int64_t x_stride, const uint32_t* w, int64_t K2, const float* scale,
               const float* bias, Out* y, int64_t y_stride, int64_t n0, int64_t N, bool non_temporal,
               Fetch fetch = {}) {
  VecF acc[MR][kGroupVecs];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kGroupVecs; ++j) acc[i][j] = zero();
  for (int64_t k = 0; k < K2; ++k, w += kGroupChannels) {
    fetch_weights(w, non_temporal);
    if (fetch.next < fetch.end) {
      __builtin_prefetch(fetch.next, 0, 2);
      __builtin_prefetch(fetch.next + 64, 0, 2);
      fetch.next += 128;
    }
    PairX xb[MR];
    for (int i = 0; i < MR; ++i) xb[i] = broadcast_pair(x[i * x_stride + k]);
    for (int j = 0; j < kGroupVecs; ++j) {
      const VecW wj = load_words(w + j * kLanes);
      for (int i = 0; i < MR; ++i) acc[i][j] = dot2(acc[i][j], wj, xb[i]);
    }
  }
  PAGEDLLM_UNROLL for (int j = 0; j < kGroupVecs; ++j) {
    const int64_t n = n0 + kLanes * j;
    if (n >= N) continue;  // the last group's padding
    const VecF b = bias ? load_n(bias + n, N - n) : zero();
    if (scale) {
      const VecF s = load_n(scale + n, N - n);
      PAGEDLLM_UNROLL for (int i = 0; i < MR; ++i) store_n(y + i * y_stride + n, fma(acc[i][j], s, b), N - n);
    } else {
      PAGEDLLM_UNROLL for (int i = 0; i < MR; ++i) store_n(y + i * y_stride + n, add(acc[i][j], b), N - n);
    }
  }
}

// x: float32 [rows, K] with stride x_stride; w: one group, [K, 48] int8 codes.
template <int MR, typename Out>
void int8_tile(const float* x, int64_t x_stride, const int8_t* w, int64_t K, const float* scale, const float* bias,
               Out* y, int64_t y_stride, int64_t n0, int64_t N, bool non_temporal) {
  VecF acc[MR][kGroupVecs];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kGroupVecs; ++j) acc[i][j] = zero();
  for (int64_t k = 0; k < K; ++k, w += kGroupChannels) {
    if ((k & 3) == 0) fetch_weights(w, non_temporal);
    VecF xb[MR];
    for (int i = 0; i < MR; ++i) xb[i] = set1(x[i * x_stride + k]);
    for (int j = 0; j < kGroupVecs; ++j) {
      const VecF wj = load(w + j * kLanes);
      for (int i = 0; i < MR; ++i) acc[i][j] = fma(wj, xb[i], acc[i][j]);
    }
  }
  PAGEDLLM_UNROLL for (int j = 0; j < kGroupVecs; ++j) {
    const int64_t n = n0 + kLanes * j;
    if (n >= N) continue;
    const VecF s = load_n(scale + n, N - n), b = bias ? load_n(bias + n, N - n) : zero();
    PAGEDLLM_UNROLL for (int i = 0; i < MR; ++i) store_n(y + i * y_stride + n, fma(acc[i][j], s, b), N - n);
  }
}

// Many rows on a tier with narrow vectors (AVX2, NEON, portable): tiles of kStripRows rows x one strip of 16
// channels, with x widened to float32 once per call. The direct tiles there hold only two rows (AVX2's 16
// registers) and widen every weight for every two rows; six rows share each widened weight here. With one or
// two row blocks (decode batches) the tiles read the packed weights and widen them in registers (strip_tile);
// with more (prefill) a thread widens each group once into a float32 panel in its scratch that every block's
// tiles reuse (the same tiles, reading float32: no conversion in the inner loop). Measured on AVX2 (SmolLM2, 2
// threads, in-process A/B): 32-row decode steps 1.10x faster with strips than with panels, 64 rows level, a 512-token prompt 1.07x
// faster with panels. On AVX-512 the 8-row direct tiles win or tie at every size, so they keep them.
constexpr int kStripVecs = 16 / kLanes > 0 ? 16 / kLanes : 1;  // 16 channels
constexpr int kStripRows = 6;  // 6 x 2 accumulators of AVX2's 16 registers (the classic 6 x 16 float32 kernel)
constexpr int64_t kStrip = kStripVecs * kLanes, kRowBlock = 48, kStripMinRows = 32;

// A row of a strip as float32: bf16 pairs hold two steps of k (low halves first), int8 codes and a panel's
// float32 one. Packed groups hold 48 channels a row; a panel's strips, kStrip.
template <typename W>
constexpr int kStepsPerRow = std::is_same<W, uint32_t>::value ? 2 : 1;
template <typename W>
constexpr int64_t kRowStride = std::is_same<W, float>::value ? kStrip : kGroupChannels;
inline VecF widened(const uint32_t* w, int step) { return step == 0 ? low_halves(load_words(w)) : high_halves(load_words(w)); }
inline VecF widened(const int8_t* w, int) { return load(w); }
inline VecF widened(const float* w, int) { return load(w); }

// MR rows of x (float32 [MR, K]) times one strip: of a packed group (bf16 pairs or int8 codes, times `scale`),
// or of a panel (float32).
template <int MR, typename W, typename Out>
void strip_tile(const float* x, int64_t K, const W* w, const float* scale, const float* bias, Out* y, int64_t n0,
                int64_t N, Fetch fetch) {
  VecF acc[MR][kStripVecs];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kStripVecs; ++j) acc[i][j] = zero();
  for (int64_t k = 0; k < K; k += kStepsPerRow<W>, w += kRowStride<W>) {
    if ((k & 7) == 0 && fetch.next < fetch.end) {
      __builtin_prefetch(fetch.next, 0, 2);
      fetch.next += 64;
    }
    PAGEDLLM_UNROLL for (int s = 0; s < kStepsPerRow<W>; ++s) {
      VecF wv[kStripVecs];
      for (int j = 0; j < kStripVecs; ++j) wv[j] = widened(w + j * kLanes, s);
      for (int i = 0; i < MR; ++i) {
        const VecF xb = set1(x[i * K + k + s]);
        for (int j = 0; j < kStripVecs; ++j) acc[i][j] = fma(wv[j], xb, acc[i][j]);
      }
    }
  }
  PAGEDLLM_UNROLL for (int j = 0; j < kStripVecs; ++j) {
    const int64_t n = n0 + kLanes * j;
    if (n >= N) continue;
    const VecF b = bias ? load_n(bias + n, N - n) : zero();
    const VecF sc = scale ? load_n(scale + n, N - n) : set1(1.f);
    PAGEDLLM_UNROLL for (int i = 0; i < MR; ++i) store_n(y + i * N + n, fma(acc[i][j], sc, b), N - n);
  }
}

template <typename Out, typename W, int MR = kStripRows>
void run_strip_rows(const float* x, int64_t K, const W* w, const float* scale, const float* bias, Out* y, int64_t n0,
                    int64_t N, int64_t rows, Fetch fetch) {
  if constexpr (MR == 1) {
    strip_tile<1>(x, K, w, scale, bias, y, n0, N, fetch);
  } else {
    if (rows >= MR) return strip_tile<MR>(x, K, w, scale, bias, y, n0, N, fetch);
    run_strip_rows<Out, W, MR - 1>(x, K, w, scale, bias, y, n0, N, rows, fetch);
  }
}

// One linear call: y [M, N] = x [M, K] @ W.T (+ bias), W packed as bf16 pairs or int8 codes (with `scale`).
struct LinearArgs {
  const void* x;          // bf16 [M, K] (bf16 weights) or float32 [M, K] (int8 weights)
  const float* x_float;   // x as float32, where uses_strips() (else unused)
  const void* x_bf16;     // int8 weights: x as bf16 where the activations are (else nullptr)
  int64_t K;
  const void* w;
  const float* scale;     // int8: a float32 scale per channel; bf16: nullptr
  const float* bias;
  void* y;
  int64_t N;
  Fetch then = {};        // the weights this thread reads next (the next linear's first group), where known
  bool non_temporal = false;  // how the tiles fetch w ahead (fetch_weights)

  int64_t groups() const { return (N + kGroupChannels - 1) / kGroupChannels; }
  int64_t group_bytes() const { return K * kGroupChannels * (scale ? 1 : 2); }  // int8 codes, or bf16 pairs
  const char* group_at(int64_t g) const { return static_cast<const char*>(w) + g * group_bytes(); }
  Fetch group_fetch(int64_t g) const { return {group_at(g), group_at(g) + group_bytes()}; }
};

// Whether a call of M rows takes the strip path, and so needs x as float32 (whatever the weights' kind).
inline bool uses_strips(int64_t M) { return kLanes < 16 && M >= kStripMinRows; }

inline int64_t row_blocks(int64_t M) { return (M + kRowBlock - 1) / kRowBlock; }

// Whether a strip call of M rows widens each group into a panel first (prefill) or in registers (decode).
inline bool uses_panels(int64_t M) { return row_blocks(M) > 2; }

// The weights this thread's share of a strip call starts with: what it can fetch during the op before.
inline Fetch first_group(const LinearArgs& a, int64_t M, const Par& par) {
  if (par.tid < 0 || !uses_strips(M) || uses_panels(M)) return {};
  const int64_t g = par.first_of(a.groups() * row_blocks(M)) / row_blocks(M);
  return g < a.groups() ? a.group_fetch(g) : Fetch{};
}

// Panels are strip-major, [48 / kStrip][K][kStrip], 64-byte aligned: each tile streams one contiguous strip.
inline float* strip_at(float* panel, int64_t K, int64_t channel) { return panel + channel / kStrip * K * kStrip + channel % kStrip; }

inline void widen_group(const uint32_t* w, int64_t K2, float* panel) {  // bf16 pairs [K/2, 48] -> float32
  for (int64_t k = 0; k < K2; ++k, w += kGroupChannels)
    for (int j = 0; j < kGroupVecs; ++j) {
      const VecW wj = load_words(w + j * kLanes);
      float* dst = strip_at(panel, 2 * K2, j * kLanes) + 2 * k * kStrip;
      store(dst, low_halves(wj));
      store(dst + kStrip, high_halves(wj));
    }
}

inline void widen_group(const int8_t* w, int64_t K, float* panel) {  // int8 codes [K, 48] -> float32
  for (int64_t k = 0; k < K; ++k, w += kGroupChannels)
    for (int j = 0; j < kGroupVecs; ++j) store(strip_at(panel, K, j * kLanes) + k * kStrip, load(w + j * kLanes));
}

// Threads split (channel group, row block) items, row blocks fastest, so a group's weights stay in cache while
// every block reads them.
template <typename Out>
void linear_strips(const LinearArgs& a, int64_t M, const Par& par) {
  const int64_t blocks = row_blocks(M), tiles = (M + kStripRows - 1) / kStripRows;
  const bool panels = uses_panels(M);
  par(a.groups() * blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch<float> scratch;
    float* panel = nullptr;
    if (panels) {
      scratch.resize(a.K * kGroupChannels);
      panel = scratch.data();
    }
    int64_t widened = -1;
    for (int64_t t = begin; t < end; ++t) {
      // The fewest tiles, as even as they can be, dealt to the blocks: 64 rows are nine tiles of 6 and two of
      // 5 (blocks of 32 rows made eight tiles of 5; 64-row linears 1.05-1.12x faster on AVX2), never a tile of 2
      const int64_t g = t / blocks, b = t % blocks;
      const int64_t tile0 = tiles * b / blocks, block_tiles = tiles * (b + 1) / blocks - tile0;
      if (panels && g != widened) {
        if (a.scale) widen_group(reinterpret_cast<const int8_t*>(a.group_at(g)), a.K, panel);
        else widen_group(reinterpret_cast<const uint32_t*>(a.group_at(g)), a.K / 2, panel);
        widened = g;
      }
      // Strips: the weights come from memory about as fast as the tiles use them, so the next group's are
      // fetched while this one's last block runs (32 rows, AVX2: steps 10-17% faster), and after a thread's
      // last group, the next linear's first (2-3%).
      Fetch ahead;
      if (!panels && (t + 1 == end || (t + 1) / blocks != g)) ahead = t + 1 < end ? a.group_fetch(g + 1) : a.then;
      const int64_t calls = kGroupChannels / kStrip * block_tiles;
      const int64_t ahead_bytes = ahead.end - ahead.next;
      int64_t call = 0;
      for (int64_t c = 0; c < kGroupChannels; c += kStrip)
        for (int64_t i = tile0; i < tile0 + block_tiles; ++i, ++call) {
          const int64_t m = M * i / tiles, tile_rows = M * (i + 1) / tiles - m;
          const float* x = a.x_float + m * a.K;
          Out* y = static_cast<Out*>(a.y) + m * a.N;
          const int64_t n0 = g * kGroupChannels + c;
          if (panels) {
            run_strip_rows<Out>(x, a.K, static_cast<const float*>(strip_at(panel, a.K, c)), a.scale, a.bias, y, n0,
                                a.N, tile_rows, Fetch{});
            continue;
          }
          const Fetch fetch = ahead.next ? Fetch{ahead.next + ahead_bytes * call / calls / 64 * 64,
                                                 ahead.next + ahead_bytes * (call + 1) / calls} : Fetch{};
          if (a.scale)
            run_strip_rows<Out>(x, a.K, reinterpret_cast<const int8_t*>(a.group_at(g)) + c, a.scale, a.bias, y, n0,
                                a.N, tile_rows, fetch);
          else
            run_strip_rows<Out>(x, a.K, reinterpret_cast<const uint32_t*>(a.group_at(g)) + c, nullptr, a.bias, y,
                                n0, a.N, tile_rows, fetch);
        }
    }
  });
}

// `paired`: group g's int8 codes as bf16 pairs (ManyRows::kPairs), or nullptr.
// `fetch`: what the tile brings into cache meanwhile (with `paired` only).
template <typename Out, int MR>
void run_tile(const LinearArgs& a, int64_t m0, int64_t g, const uint32_t* paired, Fetch fetch) {
  Out* y = static_cast<Out*>(a.y) + m0 * a.N;
  if (paired) {
    bf16_tile<MR>(static_cast<const uint32_t*>(a.x_bf16) + m0 * (a.K / 2), a.K / 2, paired, a.K / 2, a.scale, a.bias,
                  y, a.N, g * kGroupChannels, a.N, false, fetch);  // a thread's scratch, read again at once
  } else if (a.scale == nullptr) {
    bf16_tile<MR>(static_cast<const uint32_t*>(a.x) + m0 * (a.K / 2), a.K / 2,
                  static_cast<const uint32_t*>(a.w) + g * (a.K / 2) * kGroupChannels, a.K / 2, nullptr, a.bias, y,
                  a.N, g * kGroupChannels, a.N, a.non_temporal);
  } else {
    int8_tile<MR>(static_cast<const float*>(a.x) + m0 * a.K, a.K,
                  static_cast<const int8_t*>(a.w) + g * a.K * kGroupChannels, a.K, a.scale, a.bias, y, a.N,
                  g * kGroupChannels, a.N, a.non_temporal);
  }
}

template <typename Out, int MR = kMaxRows>
void run_rows(const LinearArgs& a, int64_t m0, int64_t rows, int64_t g, const uint32_t* paired, Fetch fetch = {}) {
  if constexpr (MR == 1) {
    run_tile<Out, 1>(a, m0, g, paired, fetch);
  } else {
    if (rows >= MR) return run_tile<Out, MR>(a, m0, g, paired, fetch);
    run_rows<Out, MR - 1>(a, m0, rows, g, paired, fetch);
  }
}

// int8 weights, bf16 activations and many rows (prefill) on a CPU with a bf16 dot product (AVX-512 BF16): each
// thread turns a group's codes into bf16 pairs once (codes of at most 127 are exact in bf16) and runs the bf16
// tiles on them for every row tile, the scale applied to the sums: twice the products per instruction of
// widening codes to float32 for every row tile (a 512-token prompt: int8 at 0.6x of bf16 before). Decode rows from
// one full row tile a call (8), the next group's codes fetched while the tiles run (linear_vectors). SmolLM2 int8
// on Zen 4, alternating processes, tok/s against the vectors: 8 rows 825 and 814 against 659 and 661, 12 rows 886
// and 880 against 644 and 646; fewer rows do not repay the conversion (4 rows even, batch 1 at half the speed).
constexpr int64_t kPairsMinRows = kMaxRows;

// Input pairs [first, last) of a group's int8 codes [K, 48] into its bf16 pairs [K/2, 48] (`out`: the group's).
inline void pair_rows(const int8_t* w, int64_t first, int64_t last, uint32_t* out) {
  for (int64_t p = first; p < last; ++p)
    for (int j = 0; j < kGroupVecs; ++j)
      store_words(out + p * kGroupChannels + j * kLanes,
                  bf16_pairs(load(w + 2 * p * kGroupChannels + j * kLanes), load(w + (2 * p + 1) * kGroupChannels + j * kLanes)));
}

inline void pair_group(const int8_t* w, int64_t K, uint32_t* out) { pair_rows(w, 0, K / 2, out); }

#if defined(PAGEDLLM_ISA_AMX)
// ---- many rows on AMX tiles (tier amx) -------------------------------------------------------------------------
// One tdpbf16ps multiplies 16 rows x 32 inputs of x by 16 input pairs x 16 channels of weights into 16 x 16
// float32 sums: 16 times a vdpbf16ps' products. A packed group already is what its weight tile reads (a row of
// 16 channels' pairs is 64 bytes, rows 192 bytes apart), so the tiles load the weights in place. Eight tiles:
// sums for 32 rows x 32 channels (0-3), two of x (4, 5), two of weights (6, 7).
constexpr int64_t kAmxRows = 32, kAmxInputs = 32;
// Decode rows from 8 a call (SmolLM2, 8 parallel: 866 against 621 tok/s on vdpbf16ps; batch 1 stays on vectors:
// 130 against 192 on AMX, a linear's tile sums a chain of about 38 us whatever the rows). int8 codes too, though
// each call turns them into bf16 pairs: 1,050 against 950 tok/s at 8 parallel (medians of 4 alternating runs).
constexpr int64_t kAmxMinRows = 8;

// Linux (5.16+) gives a process AMX's 8 KB of tile state only once asked; refused (an older kernel, a hypervisor
// that hides it), linears keep the vdpbf16ps tiles.
inline bool amx_permitted() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// The tiles' shapes are per thread: each thread sets them before its share of a linear, and frees them after.
inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

// Sums of 16 x RT rows of x (bf16 [16 * RT, K]) against one or two 16-channel blocks of a packed group (w0, w1:
// words at the block's first channel), into out [16 * RT][32] float32 (w1's block in columns 16-31).
// `meanwhile`: vector work after each step's products, which the core runs while the tiles compute them.
template <int RT, bool kTwo, typename F>
inline void amx_sums(const bf16* x, int64_t K, const uint32_t* w0, const uint32_t* w1, float* out, const F& meanwhile) {
  constexpr int64_t kWordStride = kGroupChannels * 4, kOut = 2 * 16 * 4;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < K; k += kAmxInputs) {
    _tile_loadd(4, x + k, K * 2);
    if constexpr (RT == 2) _tile_loadd(5, x + 16 * K + k, K * 2);
    _tile_loadd(6, w0 + k / 2 * kGroupChannels, kWordStride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (RT == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (kTwo) {
      _tile_loadd(7, w1 + k / 2 * kGroupChannels, kWordStride);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (RT == 2) _tile_dpbf16ps(3, 5, 7);
    }
    meanwhile();
  }
  _tile_stored(0, out, kOut);
  if constexpr (RT == 2) _tile_stored(2, out + 16 * 32, kOut);
  if constexpr (kTwo) {
    _tile_stored(1, out + 16, kOut);
    if constexpr (RT == 2) _tile_stored(3, out + 16 * 32 + 16, kOut);
  }
}

// A pair of groups' int8 codes turned into bf16 pairs a slice at a time (a unit: one input pair of one group),
// so that the next pair's conversion runs while the tiles compute this one's products (a 512-token prompt's int8
// linears: 5% fewer cycles than with each pair converted before its tiles).
struct PairConversion {
  const int8_t* codes[2] = {};
  uint32_t* out = nullptr;
  int64_t half_k = 0, total = 0, done = 0, pace = 0;

  PairConversion() = default;
  PairConversion(const LinearArgs& a, int64_t pair, uint32_t* panel, int64_t slices) : out(panel), half_k(a.K / 2) {
    const int64_t g0 = 2 * pair, n = std::min<int64_t>(2, a.groups() - g0);
    for (int64_t g = 0; g < n; ++g) codes[g] = reinterpret_cast<const int8_t*>(a.group_at(g0 + g));
    total = n * half_k;
    pace = (total + slices - 1) / slices;
  }
  void step(int64_t units) {
    for (const int64_t last = std::min(total, done + units); done < last;) {
      const int64_t g = done / half_k, stop = std::min(last - g * half_k, half_k);
      pair_rows(codes[g], done - g * half_k, stop, out + g * half_k * kGroupChannels);
      done = g * half_k + stop;
    }
  }
  void finish() { step(total - done); }
};

// Items are (two channel groups, block of 32 rows, or 16 where the call has no more), row blocks fastest so the
// groups' weights stay in cache while every block reads them; a block past the last row is copied, zero-padded,
// once into the thread's scratch. The six 16-channel blocks of two groups go through the tiles two at a time.
template <typename Out>
void linear_amx(const LinearArgs& a, int64_t M, const Par& par) {
  const int64_t K = a.K, groups = a.groups(), pairs = (groups + 1) / 2, pair_words = 2 * (K / 2) * kGroupChannels;
  const int64_t block_rows = M <= 16 ? 16 : kAmxRows, blocks = (M + block_rows - 1) / block_rows;
  constexpr int64_t kSumsPerItem = 2 * kGroupChannels / 32;
  const bf16* x = static_cast<const bf16*>(a.scale ? a.x_bf16 : a.x);
  par(pairs * blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch<bf16> padded;
    thread_local Scratch<uint32_t> panels;  // int8 weights: two pairs' codes as bf16 pairs, this and the next
    alignas(64) float sums[kAmxRows * 32];
    configure_tiles();
    if (a.scale) panels.resize(2 * pair_words);
    auto panel = [&](int64_t pair) { return panels.data() + pair % 2 * pair_words; };
    PairConversion next;
    int64_t current = -1, padded_block = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pair = t / blocks, block = t % blocks, m0 = block * block_rows;
      const int64_t rows = std::min(block_rows, M - m0);
      const int64_t g0 = 2 * pair, pair_groups = std::min<int64_t>(2, groups - g0);
      const uint32_t* w = static_cast<const uint32_t*>(a.w) + g0 * (K / 2) * kGroupChannels;
      if (a.scale) {
        if (pair != current) {
          if (current < 0) next = PairConversion(a, pair, panel(pair), 1);
          next.finish();
          current = pair;
          const int64_t items = std::min(end, (pair + 1) * blocks) - t;
          next = end > (pair + 1) * blocks ? PairConversion(a, pair + 1, panel(pair + 1), items * kSumsPerItem * (K / kAmxInputs))
                                           : PairConversion();
        }
        w = panel(pair);
      }
      const bf16* xb = x + m0 * K;
      if (rows < block_rows) {
        if (block != padded_block) {
          padded.assign(block_rows * K, 0);
          std::copy(xb, xb + rows * K, padded.begin());
          padded_block = block;
        }
        xb = padded.data();
      }
      // The 16-channel blocks of this pair that hold a channel below N, in twos.
      const int64_t n_first = g0 * kGroupChannels;
      const int64_t channel_blocks = (std::min(a.N, n_first + pair_groups * kGroupChannels) - n_first + 15) / 16;
      auto block_words = [&](int64_t c) { return w + c / 3 * (K / 2) * kGroupChannels + c % 3 * 16; };
      auto convert = [&] { next.step(next.pace); };
      for (int64_t c = 0; c < channel_blocks; c += 2) {
        const bool two = c + 1 < channel_blocks;
        const uint32_t* w1 = two ? block_words(c + 1) : nullptr;
        if (block_rows == 16) {
          if (two) amx_sums<1, true>(xb, K, block_words(c), w1, sums, convert);
          else amx_sums<1, false>(xb, K, block_words(c), w1, sums, convert);
        } else {
          if (two) amx_sums<2, true>(xb, K, block_words(c), w1, sums, convert);
          else amx_sums<2, false>(xb, K, block_words(c), w1, sums, convert);
        }
        for (int64_t j = 0; j < (two ? 2 : 1); ++j) {
          const int64_t n = n_first + (c + j) * 16;
          const VecF b = a.bias ? load_n(a.bias + n, a.N - n) : zero();
          const VecF s = a.scale ? load_n(a.scale + n, a.N - n) : set1(1.f);
          Out* y = static_cast<Out*>(a.y) + m0 * a.N + n;
          for (int64_t r = 0; r < rows; ++r) store_n(y + r * a.N, fma(load(sums + r * 32 + j * 16), s, b), a.N - n);
        }
      }
    }
    _tile_release();
  });
}
#endif

// A linear with a path for many rows (AMX tiles; int8 codes as bf16 pairs) sums there in another order than on the
// vectors. So that a row's result does not hang on what else its step holds, a prompt token's row always takes the
// many-rows path, and decode rows take it where a call has `from` of them or more: a prompt whose blocks were found
// in the prefix cache recomputes its last tokens alone, and they must come out as they did within the whole prompt
// (streamed and unstreamed answers equal, byte for byte; int8 on avx512_bf16 differed from the second token).
struct ManyRows {
  enum Path { kNone, kAmx, kPairs } path = kNone;
  int64_t from = 0;
};

// bf16 weights: AMX tiles (amx tier, K a whole number of tiles). int8 codes with bf16 activations: AMX tiles, else
// bf16 pairs on a bf16 dot product. Otherwise none: every row on the vectors.
inline ManyRows many_rows_path(bool int8, int64_t K, bool bf16_x) {
#if defined(PAGEDLLM_ISA_AMX)
  if ((!int8 || bf16_x) && K % kAmxInputs == 0 && amx_permitted()) return {ManyRows::kAmx, kAmxMinRows};
#endif
  if (int8 && bf16_x && kHasBf16Dot && kLanes == 16 && K % 2 == 0) return {ManyRows::kPairs, kPairsMinRows};
  return {};
}

// Whether a linear of M rows, `decode` of them decode rows, reads x as float32 (LinearArgs::x_float), not only as
// bf16: the narrow tiers' strips do, and int8 codes on the vectors.
inline bool reads_float(bool int8, int64_t M, int64_t decode, int64_t K, bool bf16_x) {
  if (uses_strips(M)) return true;
  if (!int8) return false;
  const ManyRows many = many_rows_path(int8, K, bf16_x);
  return many.path == ManyRows::kNone || (decode > 0 && decode < many.from);
}

// Few rows: threads split the channel groups, and the row tiles too, walking rows fastest so a group's weights
// stay in cache while every row tile reads them. Many rows: linear_strips on narrow tiers.
// `paired`: int8 codes as bf16 pairs (ManyRows::kPairs).
template <typename Out>
void linear_vectors(const LinearArgs& a, int64_t M, const Par& par, bool paired) {
  if (uses_strips(M)) return linear_strips<Out>(a, M, par);
  const int64_t groups = (a.N + kGroupChannels - 1) / kGroupChannels, mtiles = (M + kMaxRows - 1) / kMaxRows;
  par(groups * mtiles, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch<uint32_t> panel;
    int64_t converted = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / mtiles, m0 = t % mtiles * kMaxRows;
      if (paired && g != converted) {
        panel.resize(a.K / 2 * kGroupChannels);
        pair_group(reinterpret_cast<const int8_t*>(a.group_at(g)), a.K, panel.data());
        converted = g;
      }
      // Paired: the codes come from memory in the conversion, then the tiles compute from the panel in cache; the
      // thread's next group is fetched while they do, so that the two overlap.
      Fetch fetch;
      if (paired && (g + 1) * mtiles < end) {
        const Fetch next = a.group_fetch(g + 1);
        const int64_t bytes = next.end - next.next, tile = t % mtiles;
        fetch = {next.next + bytes * tile / mtiles / 64 * 64, next.next + bytes * (tile + 1) / mtiles};
      }
      run_rows<Out>(a, m0, std::min<int64_t>(kMaxRows, M - m0), g, paired ? panel.data() : nullptr, fetch);
    }
  });
}

// A step's rows of prompt tokens, in ascending runs.
struct RowSpan {
  int64_t row0, rows;
};

// A call's rows on `path`.
template <typename Out>
void run_path(const LinearArgs& a, int64_t M, ManyRows::Path path, const Par& par) {
#if defined(PAGEDLLM_ISA_AMX)
  if (path == ManyRows::kAmx) return linear_amx<Out>(a, M, par);
#endif
  linear_vectors<Out>(a, M, par, path == ManyRows::kPairs);
}

// Rows [row0, row0 + rows) of a call alone, on `path`.
template <typename Out>
void linear_rows(const LinearArgs& a, int64_t row0, int64_t rows, ManyRows::Path path, const Par& par) {
  if (rows <= 0) return;
  const int64_t at = row0 * a.K;
  LinearArgs part = a;
  if (a.scale) part.x = a.x ? static_cast<const float*>(a.x) + at : nullptr;  // int8: x is x_float
  else part.x = static_cast<const bf16*>(a.x) + at;
  part.x_float = a.x_float ? a.x_float + at : nullptr;
  part.x_bf16 = a.x_bf16 ? static_cast<const bf16*>(a.x_bf16) + at : nullptr;
  part.y = static_cast<Out*>(a.y) + row0 * a.N;
  part.then = {};
  run_path<Out>(part, rows, path, par);
}

inline int64_t rows_of(const std::vector<RowSpan>& spans) {
  int64_t rows = 0;
  for (const RowSpan& span : spans) rows += span.rows;
  return rows;
}

// y [M, N] = x [M, K] @ W.T (+ bias), each row on the path many_rows_path says. `prompt`: the call's prompt rows
// (none: a linear outside a step).
template <typename Out>
void linear(const LinearArgs& a, int64_t M, const Par& par, const std::vector<RowSpan>* prompt = nullptr) {
  const ManyRows many = many_rows_path(a.scale != nullptr, a.K, a.scale == nullptr || a.x_bf16 != nullptr);
  const int64_t prompt_rows = prompt ? rows_of(*prompt) : 0, decode = M - prompt_rows;
  if (decode == 0 || decode >= many.from) return run_path<Out>(a, M, many.path, par);
  if (prompt_rows == 0) return run_path<Out>(a, M, ManyRows::kNone, par);
  int64_t next = 0;  // prompt rows beside too few decode rows: each run on its own path
  for (const RowSpan& span : *prompt) {
    linear_rows<Out>(a, next, span.row0 - next, ManyRows::kNone, par);
    linear_rows<Out>(a, span.row0, span.rows, many.path, par);
    next = span.row0 + span.rows;
  }
  linear_rows<Out>(a, next, M - next, ManyRows::kNone, par);
}

// ---- RMSNorm, as transformers computes it: normalised in float32, rounded to the model's dtype, then scaled
// by the weight in that dtype. With `residual`, first residual += x (in the model's dtype).
template <typename T>
void rms_norm_rows(T* x, T* residual, const T* w, T* out, int64_t rows, int64_t H, float eps, const Par& par) {
  par(rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* src = residual ? residual + r * H : x + r * H;
      VecF ss = zero();
      for (int64_t i = 0; i < H; i += kLanes) {
        VecF v = load_n(src + i, H - i);
        if (residual) {
          v = round_like<T>(add(v, load_n(x + r * H + i, H - i)));
          store_n(src + i, v, H - i);
        }
        ss = fma(v, v, ss);
      }
      const VecF inv = set1(1.0f / std::sqrt(reduce_add(ss) / H + eps));
      for (int64_t i = 0; i < H; i += kLanes) {
        const VecF v = round_like<T>(mul(load_n(src + i, H - i), inv));
        store_n(out + r * H + i, mul(v, load_n(w + i, H - i)), H - i);
      }
    }
  });
}

constexpr int64_t kMaxGroup = 16, kMaxHeadDim = 256, kChunk = 16;  // positions scored before each softmax update

// ---- LoRA: each row's adapter added to a linear's output (engine/lora.py add_lora is the definition) ---------
// a [slots, S * R, K] float32: slot s's A of each of the S slices in R rows (zeros past the adapter's rank);
// bt [slots, R, N] float32: B transposed, the scaling folded in; slice_ends: the slices' cumulative outputs. Row m
// of x [M, K] with slots[m] >= 0 gets y[m, n] += sum_j bt[slot, j, n] t[m, slice of n, j], t = a[slot] x[m], in
// float32, rounded to y once. `t`: M * S * R floats of scratch. Rows without a slot are left as they are.
inline float as_float(float x) { return x; }
inline float as_float(bf16 x) { return bf16_to_float(x); }
inline void put(float* p, float x) { *p = x; }
inline void put(bf16* p, float x) { *p = float_to_bf16(x); }

struct LoRAArgs {
  const float *a, *bt;
  const int64_t* slice_ends;
  int64_t slices, rank;  // S, R
};

// XR rows of x against four rows w, w + stride, ... (the last `rows` < 4 of them repeated): 4 * XR independent
// chains, each w vector loaded once for the XR rows (one chain per dot waited on each multiply-add's latency, and
// one load per multiply-add bound it: the shrink ran 4x, then 1.6x slower).
template <int XR, typename X>
inline void dot4(const X* const* x, const float* w, int64_t stride, int64_t rows, int64_t n, float* const* out) {
  const float* r[4];
  for (int q = 0; q < 4; ++q) r[q] = w + std::min<int64_t>(q, rows - 1) * stride;
  VecF acc[XR][4];
  for (int p = 0; p < XR; ++p)
    for (int q = 0; q < 4; ++q) acc[p][q] = zero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    VecF xv[XR];
    for (int p = 0; p < XR; ++p) xv[p] = load(x[p] + i);
    for (int q = 0; q < 4; ++q) {
      const VecF wv = load(r[q] + i);
      for (int p = 0; p < XR; ++p) acc[p][q] = fma(xv[p], wv, acc[p][q]);
    }
  }
  if (i < n) {
    for (int q = 0; q < 4; ++q) {
      const VecF wv = load_n(r[q] + i, n - i);
      for (int p = 0; p < XR; ++p) acc[p][q] = fma(load_n(x[p] + i, n - i), wv, acc[p][q]);
    }
  }
  for (int p = 0; p < XR; ++p)
    for (int64_t q = 0; q < rows; ++q) out[p][q] = reduce_add(acc[p][q]);
}

constexpr int64_t kLoRAVectors = 4;  // an expand item: this many vectors of a row's outputs, one chain each

// A step's rows by adapter slot: `rows` ordered by slot (rows without one left out), group g holding
// rows[starts[g] .. starts[g + 1]) of slot slot_of[g]. Each adapter's weights are read once per group, not per row:
// row by row, 32 decode rows over 4 adapters read 21 MB of A and B a layer (7 of 36 ms a step).
struct LoRARowGroups {
  std::vector<int32_t> rows, slot_of;
  std::vector<int64_t> starts;

  LoRARowGroups(const int32_t* slots, int64_t M) {
    for (int64_t m = 0; m < M; ++m)
      if (slots[m] >= 0) rows.push_back(int32_t(m));
    std::stable_sort(rows.begin(), rows.end(), [&](int32_t a, int32_t b) { return slots[a] < slots[b]; });
    for (size_t i = 0; i < rows.size(); ++i)
      if (i == 0 || slots[rows[i]] != slots[rows[i - 1]]) starts.push_back(int64_t(i)), slot_of.push_back(slots[rows[i]]);
    starts.push_back(int64_t(rows.size()));
  }
  int64_t count() const { return int64_t(slot_of.size()); }
};

// out[p][0 .. kLoRAVectors * kLanes) += sum_j bt[j * N + ...] ts[p][j] for XR rows: a piece of outputs within one
// slice, one chain per vector and row, each B vector loaded once for the XR rows.
template <int XR, typename T>
inline void expand_whole(const float* bt, int64_t N, int64_t rank, const float* const* ts, T* const* out) {
  VecF acc[XR][kLoRAVectors];
  for (int p = 0; p < XR; ++p)
    for (int64_t v = 0; v < kLoRAVectors; ++v) acc[p][v] = load(out[p] + v * kLanes);
  for (int64_t j = 0; j < rank; ++j) {
    VecF tj[XR];
    for (int p = 0; p < XR; ++p) tj[p] = set1(ts[p][j]);
    for (int64_t v = 0; v < kLoRAVectors; ++v) {
      const VecF b = load(bt + j * N + v * kLanes);
      for (int p = 0; p < XR; ++p) acc[p][v] = fma(tj[p], b, acc[p][v]);
    }
  }
  for (int p = 0; p < XR; ++p)
    for (int64_t v = 0; v < kLoRAVectors; ++v) store(out[p] + v * kLanes, acc[p][v]);
}

template <typename T>
void apply_lora(const LoRAArgs& l, const T* x, int64_t K, T* y, int64_t N, const LoRARowGroups& g, float* t,
                const Par& par) {
  const int64_t SR = l.slices * l.rank, quads = (SR + 3) / 4, columns = kLoRAVectors * kLanes;
  const int64_t pieces = (N + columns - 1) / columns;
  par(g.count() * quads, 16, [&](int64_t begin, int64_t end) {  // shrink: t = A x, four ranks at a time
    for (int64_t i = begin; i < end; ++i) {
      const int64_t group = i / quads, j = i % quads * 4;
      const float* a = l.a + (g.slot_of[group] * SR + j) * K;
      const int64_t rows = std::min<int64_t>(4, SR - j), end_r = g.starts[group + 1];
      int64_t r = g.starts[group];
      for (; r + 2 <= end_r; r += 2) {  // two of the group's rows at a time
        const int64_t m0 = g.rows[r], m1 = g.rows[r + 1];
        const T* xs[2] = {x + m0 * K, x + m1 * K};
        float* outs[2] = {t + m0 * SR + j, t + m1 * SR + j};
        dot4<2>(xs, a, K, rows, K, outs);
      }
      if (r < end_r) {
        const T* xs[1] = {x + g.rows[r] * K};
        float* outs[1] = {t + g.rows[r] * SR + j};
        dot4<1>(xs, a, K, rows, K, outs);
      }
    }
  });
  par(g.count() * pieces, 4, [&](int64_t begin, int64_t end) {  // expand: y += B t, vectors of outputs at a time
    for (int64_t i = begin; i < end; ++i) {
      const int64_t group = i / pieces, first = i % pieces * columns, last = std::min(N, first + columns);
      const float* bt = l.bt + g.slot_of[group] * l.rank * N;
      int64_t s0 = 0;
      while (first >= l.slice_ends[s0]) ++s0;
      const bool whole = last - first == columns && last <= l.slice_ends[s0];  // in one slice: independent chains
      const float* ts0 = t + s0 * l.rank;  // a row's ranks of the piece's slice, past its t
      int64_t r = g.starts[group];
      const int64_t end_r = g.starts[group + 1];
      if (whole) {
        for (; r + 2 <= end_r; r += 2) {  // two rows at a time, each B vector loaded once
          T* out[2] = {y + g.rows[r] * N + first, y + g.rows[r + 1] * N + first};
          const float* ts[2] = {ts0 + g.rows[r] * SR, ts0 + g.rows[r + 1] * SR};
          expand_whole<2>(bt + first, N, l.rank, ts, out);
        }
        if (r < end_r) {
          T* out[1] = {y + g.rows[r] * N + first};
          const float* ts[1] = {ts0 + g.rows[r] * SR};
          expand_whole<1>(bt + first, N, l.rank, ts, out);
        }
        continue;
      }
      for (; r < end_r; ++r) {
        const int64_t m = g.rows[r];
        T* out = y + m * N;
        for (int64_t n = first, s = s0; n < last;) {  // a piece's tail, or across slices
          while (n >= l.slice_ends[s]) ++s;
          const int64_t width = std::min<int64_t>(kLanes, std::min(last, l.slice_ends[s]) - n);
          const float* ts = t + m * SR + s * l.rank;
          VecF acc = load_n(out + n, width);
          for (int64_t j = 0; j < l.rank; ++j) acc = fma(set1(ts[j]), load_n(bt + j * N + n, width), acc);
          store_n(out + n, acc, width);
          n += width;
        }
      }
    }
  });
}

// ---- the KV cache's layout --------------------------------------------------------------------------------
// A layer's cache is [2 (keys, values), KVH, blocks, BS, D]; within one block of BS positions, where dim d of
// position s goes. float32: row-major, [BS][D]. bf16: each operand as the bf16 dot product reads it (dot2 pairs
// two bf16 of a 32-bit word): keys as K^T in pairs of dims, [D/2][BS] words (word (c, s) holds dims 2c and 2c+1
// of position s), so a chunk of positions is scored by broadcast query pairs with no transposes or horizontal
// sums; values in pairs of positions, [BS/2][D] words (word (u, d) holds dim d of positions 2u and 2u+1), so
// two positions' weights go into one instruction. BS is even for bf16 (backends.py checks it). vLLM's and
// SGLang's CPU attention transpose K per block likewise. int8 (kv_cache_dtype "int8"): codes in bf16's layout, then
// the block's BS scales (bf16, one per position: engine/kv_quant.py), so a position takes D + 2 bytes; integer
// dot products read the codes as int16 pairs (madd_pairs) where bf16's read bf16 pairs.
template <typename C>
constexpr int64_t row_elems(int64_t D) { return std::is_same<C, int8_t>::value ? D + 2 : D; }

template <typename T>
inline int64_t kv_index(bool value, int64_t row, int64_t d, int64_t D, int64_t BS) {
  if constexpr (std::is_same<T, float>::value) return row * D + d;
  const int64_t block = row / BS * BS * row_elems<T>(D), s = row % BS;
  return block + (value ? (s / 2 * D + d) * 2 + s % 2 : (d / 2 * BS + s) * 2 + d % 2);
}

// Where an int8 row's scale is, in bf16 from its head's first byte.
inline int64_t scale_index(int64_t row, int64_t D, int64_t BS) { return (row / BS * BS * (D + 2) + BS * D) / 2 + row % BS; }

constexpr float kMinScale = 1.17549435e-38f;  // 2^-126, a bf16: an all-zero row's scale

// A row of keys or values as int8 codes and its scale, as engine/kv_quant.py quantize defines them: the scale is
// the row's largest |x| / 127 rounded up to bf16 (so no code clips), each code x / scale rounded to nearest even.
template <typename T>
inline void write_codes(const T* x, int8_t* head_cache, bool value, int64_t row, int64_t D, int64_t BS) {
  float absmax = 0.f;
  for (int64_t d = 0; d < D; ++d) absmax = std::max(absmax, std::fabs(as_float(x[d])));
  float scale = absmax / 127.f;
  uint32_t bits;
  std::memcpy(&bits, &scale, 4);
  bits = (bits + 0xFFFFu) & 0xFFFF0000u;
  std::memcpy(&scale, &bits, 4);
  scale = std::max(scale, kMinScale);
  for (int64_t d = 0; d < D; ++d) {
    const float code = std::min(127.f, std::max(-127.f, std::nearbyint(as_float(x[d]) / scale)));
    head_cache[kv_index<int8_t>(value, row, d, D, BS)] = int8_t(code);
  }
  reinterpret_cast<bf16*>(head_cache)[scale_index(row, D, BS)] = float_to_bf16(scale);
}

inline const uint32_t* words(const bf16* p) { return reinterpret_cast<const uint32_t*>(p); }

// ---- rotary embedding of queries and keys, and the keys and values written into the paged cache ----------
// qkv: [T, (H + 2 KVH) * D]; cache: [2, KVH, num_blocks * block_size, D] as kv_index lays it out; cos/sin: [max_positions, D].
template <typename T, typename C = T>
void rope_write_kv(const T* qkv, T* q_out, C* cache, const float* cos, const float* sin, const int64_t* positions,
                   const int32_t* slots, int64_t tokens, int64_t H, int64_t KVH, int64_t D, int64_t BS,
                   int64_t cache_rows, const Par& par) {
  const int64_t half = D / 2, width = (H + 2 * KVH) * D;
  par(tokens * (H + 2 * KVH), 256, [&](int64_t begin, int64_t end) {
    T row[kMaxHeadDim];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t tok = t / (H + 2 * KVH), head = t % (H + 2 * KVH);
      const T* src = qkv + tok * width + head * D;
      const bool query = head < H, value = head >= H + KVH;
      T* dst = query ? q_out + (tok * H + head) * D : row;
      if (value) {
        std::memcpy(row, src, D * sizeof(T));
      } else {
        const float* c = cos + positions[tok] * D;
        const float* s = sin + positions[tok] * D;
        for (int64_t i = 0; i < half; i += kLanes) {
          const int64_t n = half - i;
          const VecF lo = load_n(src + i, n), hi = load_n(src + half + i, n);
          const VecF lo_out = fma(lo, load_n(c + i, n), sub(zero(), mul(hi, load_n(s + i, n))));
          const VecF hi_out = fma(hi, load_n(c + half + i, n), mul(lo, load_n(s + half + i, n)));
          store_n(dst + i, lo_out, n);
          store_n(dst + half + i, hi_out, n);
        }
      }
      if (query) continue;
      C* head_cache = cache + (head - H) * cache_rows * row_elems<C>(D);  // keys then values, by head
      if constexpr (std::is_same<C, int8_t>::value) write_codes(row, head_cache, value, slots[tok], D, BS);
      else for (int64_t d = 0; d < D; ++d) head_cache[kv_index<T>(value, slots[tok], d, D, BS)] = row[d];
    }
  });
}

// ---- paged attention for decode (one query token per sequence), split over long contexts ----------------
// Each work item is (sequence, KV head, split): it reads its share of the context once for all the query heads
// of its group, keeping a running max, sum and weighted values (flash-decoding); splits are merged afterwards.
// q, out: [B, H * D]; block tables: [B, max_blocks] int32; context_lens: [B] int32.
static_assert(kChunk == 16, "reduce_add_16 sums a chunk of scores");

// How a decode batch's contexts are split: enough splits that threads share the work evenly at batch 1, none
// shorter than 256 positions, each a whole number of blocks; and the float32 scratch the splits need. Threads take
// equal runs of the (sequence, KV head, split) items, so of the few split counts from the least that gives each
// thread 16 items, the plan takes the one whose busiest thread reads the fewest positions.
struct AttentionPlan {
  int64_t splits = 1, split_len = 1, scratch_floats = 0;
  bool fetch_ahead = true;  // decode rows fetch the blocks kFetchBlocks ahead by hand (its comment: on which CPUs)

  AttentionPlan(const int32_t* ctx, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t threads) {
    int64_t longest = 1;
    for (int64_t b = 0; b < B; ++b) longest = std::max<int64_t>(longest, ctx[b]);
    const int64_t items = std::max<int64_t>(1, B * KVH), most = std::min<int64_t>((longest + 255) / 256, 64);
    const int64_t fewest = std::max<int64_t>(1, std::min<int64_t>(most, (16 * threads + items - 1) / items));
    const int64_t last = fewest == 1 ? 1 : std::min(most, fewest + threads);  // a batch filling the threads: unsplit
    int64_t least = INT64_MAX;
    for (int64_t s = fewest; s <= last; ++s) {
      const int64_t len = ((longest + s - 1) / s + BS - 1) / BS * BS, n = (longest + len - 1) / len;
      const int64_t load = fewest == last ? 0 : busiest_thread(ctx, B, KVH, n, len, BS, threads);  // no choice, no walk
      if (load < least) least = load, splits = n, split_len = len;
    }
    scratch_floats = B * H * splits * (D + 2);
  }

  // The positions the busiest of `threads` reads, each taking an equal run of the items (as Par hands them out),
  // an item costing a block's worth more for its start and merge.
  static int64_t busiest_thread(const int32_t* ctx, int64_t B, int64_t KVH, int64_t splits, int64_t len, int64_t BS,
                                int64_t threads) {
    const int64_t n = B * KVH * splits, run = (n + threads - 1) / threads;
    int64_t busiest = 0, load = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = i / (KVH * splits), first = i % splits * len;
      load += std::min<int64_t>(len, std::max<int64_t>(0, ctx[b] - first)) + BS;
      if ((i + 1) % run == 0 || i + 1 == n) busiest = std::max(busiest, load), load = 0;
    }
    return busiest;
  }
};

// The softmax update for one chunk of nt scored positions: the running max m and sum l, the scores turned into
// weights in place (zero past nt); returns the factor the weighted values so far must be scaled by.
inline float softmax_update(float* scores, int64_t nt, float& m, float& l) {
  float m_new = m;
  for (int64_t t = 0; t < nt; ++t) m_new = std::max(m_new, scores[t]);
  for (int64_t t = nt; t < kChunk; ++t) scores[t] = -INFINITY;
  const float correction = std::exp(m - m_new);
  VecF sum = zero();
  for (int64_t t = 0; t < kChunk; t += kLanes) {
    VecF p = exp(sub(load(scores + t), set1(m_new)));
    store(scores + t, p);
  }
  for (int64_t t = nt; t < kChunk; ++t) scores[t] = 0.f;
  for (int64_t t = 0; t < kChunk; t += kLanes) sum = add(sum, load(scores + t));
  l = l * correction + reduce_add(sum);
  m = m_new;
  return correction;
}

// scores[g][t] = q_g . k for every query head g of the group (the queries scaled): float32 caches.
inline void scores_of_key(const float (*qf)[kMaxHeadDim], const float* k, int64_t D, int64_t group,
                          float (*scores)[kChunk], int64_t t) {
  for (int64_t g = 0; g < group; ++g) {
    VecF s = zero();
    for (int64_t d = 0; d < D; d += kLanes) s = fma(load_n(qf[g] + d, D - d), load_n(k + d, D - d), s);
    scores[g][t] = reduce_add(s);
  }
}

// The keys and values kFetchBlocks blocks ahead are fetched by hand, whether or not the block follows the one before
// in memory: left to the hardware's prefetcher, a cache read from memory came at half the machine's bandwidth. A
// chunk's fetches are spread over its loop (fetch_slice), a line or two of each a step. Measured on a Sapphire
// Rapids-class Xeon, 2 threads, decode attention at 4,096 positions over 30 layers' caches in turn, from memory
// (from the L3): 14-18 GB/s left to the hardware (30-40), 22-24 fetched at each chunk's start (33-35), 23-27 spread
// (37-42); batch-1 decode at 4,096 positions 1.13-1.16x faster, 3 alternating pairs. On Zen 4, fetches at the
// chunk's start made consecutive blocks slower (114 against 94 us a layer); spread ones measure level with the
// hardware's there (4 alternating pairs, alone from memory: 17-28 against 14-34 GB/s), and 4 blocks ahead no better;
// with the cache in huge pages and the weights fetched non-temporally (huge_pages.py, fetch_weights), batch-1 decode
// at 4,096 positions ran 2-10% faster left to the hardware (1.6% at 1,000; 16 rows at 500: 3.3%; in-process A/B),
// so AMD's CPUs leave it there (AttentionPlan::fetch_ahead; cpu_isa.py fetches_kv_ahead).
constexpr int64_t kFetchBlocks = 2;

template <typename T>
inline void fetch_row(const T* p, int64_t D) {
  for (int64_t b = 0; b < D * int64_t(sizeof(T)); b += 64) prefetch(reinterpret_cast<const char*>(p) + b);
}

// The first cache row of the block kFetchBlocks after the one at `pos`, or -1 where there is none before `end`.
inline int64_t fetch_block(const int32_t* table, int64_t pos, int64_t end, int64_t BS) {
  const int64_t ahead = pos + kFetchBlocks * BS;
  return ahead < end ? int64_t(table[ahead / BS]) * BS : -1;
}

// Step `step` of a loop of `steps` over a chunk: its slice of the `bytes` of the block ahead's keys and values
// (nullptr: none ahead), so that a chunk's fetches come a line or two a step.
inline void fetch_slice(const char* keys, const char* values, int64_t bytes, int64_t step, int64_t steps) {
  if (keys == nullptr) return;
  for (int64_t b = (step * bytes / steps) & ~int64_t(63), end = (step + 1) * bytes / steps; b < end; b += 64)
    prefetch(keys + b), prefetch(values + b);
}

// One split of a float32 cache for the query heads of KV head kv_head's group.
void attend_split(const float* q, const float* cache, const int32_t* table, int64_t first, int64_t last,
                  int64_t fetch_end, int64_t BS, int64_t D, int64_t group, int64_t cache_rows, int64_t kv_head,
                  int64_t KVH, float scale, float* m_out, float* l_out, float* acc_out) {
  const float* keys = cache + kv_head * cache_rows * D;
  const float* values = cache + (KVH + kv_head) * cache_rows * D;
  alignas(64) float qf[kMaxGroup][kMaxHeadDim];  // the scaled queries
  float m[kMaxGroup], l[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) {
    m[g] = -INFINITY, l[g] = 0.f;
    for (int64_t d = 0; d < D; d += kLanes) {
      store_n(qf[g] + d, mul(load_n(q + g * D + d, D - d), set1(scale)), D - d);
      store_n(acc_out + g * D + d, zero(), D - d);
    }
  }
  alignas(64) float scores[kMaxGroup][kChunk];
  for (int64_t pos = first; pos < last; pos += BS) {
    const int64_t n = std::min(BS, last - pos), row0 = int64_t(table[pos / BS]) * BS;
    for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
      const int64_t nt = std::min<int64_t>(kChunk, n - t0);
      for (int64_t t = 0; t < nt; ++t) scores_of_key(qf, keys + (row0 + t0 + t) * D, D, group, scores, t);
      for (int64_t g = 0; g < group; ++g) {
        const VecF correction = set1(softmax_update(scores[g], nt, m[g], l[g]));
        float* acc = acc_out + g * D;
        for (int64_t d = 0; d < D; d += kLanes) store_n(acc + d, mul(load_n(acc + d, D - d), correction), D - d);
      }
      const int64_t ahead = fetch_block(table, pos, fetch_end, BS);
      for (int64_t t = 0; t < nt; ++t) {
        if (ahead >= 0) fetch_row(keys + (ahead + t0 + t) * D, D), fetch_row(values + (ahead + t0 + t) * D, D);
        const float* v = values + (row0 + t0 + t) * D;
        for (int64_t d = 0; d < D; d += kLanes) {
          const VecF vv = load_n(v + d, D - d);
          for (int64_t g = 0; g < group; ++g) {
            float* acc = acc_out + g * D + d;
            store_n(acc, fma(set1(scores[g][t]), vv, load_n(acc, D - d)), D - d);
          }
        }
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) m_out[g] = m[g], l_out[g] = l[g];
}

// The first n words at p as a vector, the rest zero (n may be 0 or less).
inline VecW load_words_upto(const uint32_t* p, int64_t n) {
  return n >= kLanes ? load_words(p) : load_words_n(reinterpret_cast<const bf16*>(p), 2 * std::max<int64_t>(n, 0));
}

constexpr int kChunkVecs = int(kChunk / kLanes);  // a chunk's scores in vectors

// v's first n lanes, the rest `fill` (n may be 0 or less, or kLanes or more): scores past a row's positions become
// -inf (the keys there may be anything), and its weights there exactly 0, not exp's floor.
inline VecF keep_first(VecF v, int64_t n, float fill) {
  if (n >= kLanes) return v;
  alignas(64) float lanes[kLanes];
  store(lanes, v);
  for (int64_t t = std::max<int64_t>(n, 0); t < kLanes; ++t) lanes[t] = fill;
  return load(lanes);
}

// One chunk's online-softmax step for one query head, in registers: its scores sc (kChunk positions, the first nt
// real) become weights p, exactly 0 past nt; where the chunk passes the running max m, the weighted values so far
// (acc, nd vectors) and the sums lsum are scaled down first; lsum gains p.
[[gnu::always_inline]] inline void softmax_chunk(VecF* sc, int64_t nt, float& m, VecF* acc, int64_t nd, VecF* lsum,
                                                 VecF* p) {
  for (int v = 0; v < kChunkVecs; ++v) sc[v] = keep_first(sc[v], nt - v * kLanes, -INFINITY);
  VecF top = set1(-INFINITY);
  for (int v = 0; v < kChunkVecs; ++v) top = max(top, sc[v]);
  const float chunk_max = reduce_max(top);
  if (chunk_max > m) {
    const VecF correction = exp(set1(m - chunk_max));
    for (int64_t i = 0; i < nd; ++i) acc[i] = mul(acc[i], correction);
    for (int v = 0; v < kChunkVecs; ++v) lsum[v] = mul(lsum[v], correction);
    m = chunk_max;
  }
  for (int v = 0; v < kChunkVecs; ++v) {
    p[v] = keep_first(exp(sub(sc[v], set1(m))), nt - v * kLanes, 0.f);
    lsum[v] = add(lsum[v], p[v]);
  }
}

// One split of a bf16 cache in its block layout (kv_index) for the query heads of KV head kv_head's group. Per
// chunk of up to kChunk positions of one block: every head's scores as vectors over the positions (dot2 of K^T's
// rows against the query's pairs, broadcast), the running max raised only where the chunk passes it, the weights
// rounded to bf16 pairs and the values accumulated two positions per dot2 (torch's bf16 flash attention rounds its
// weights to bf16 for the same product). G and HEAD_DIM fixed (> 0): the accumulators stay in registers; 0: any
// group and head_dim, from the arguments (accumulators in memory). In L3 on Zen 4 (9 heads, 3 KV heads, head_dim
// 64, one thread), a 16-position chunk took 130 ns against 190-235 ns for row-major keys and values (the keys'
// horizontal sums, the values widened to float32 and one float32 FMA per position).
template <int G, int HEAD_DIM>
void attend_pairs(const bf16* q, const bf16* cache, const int32_t* table, int64_t first, int64_t last,
                  int64_t fetch_end, int64_t BS, int64_t head_dim, int64_t group_size, int64_t cache_rows,
                  int64_t kv_head, int64_t KVH, float scale, float* m_out, float* l_out, float* acc_out) {
  constexpr bool fixed = G > 0;
  constexpr int GM = fixed ? G : int(kMaxGroup), NDM = fixed ? HEAD_DIM / kLanes : int(kMaxHeadDim / kLanes);
  constexpr int NA = GM * kChunkVecs >= 8 ? 1 : 2;  // score accumulators per vector: chains of dot2 to overlap
  const int64_t group = fixed ? G : group_size, D = fixed ? HEAD_DIM : head_dim;
  const int64_t NC = D / 2, ND = (D + kLanes - 1) / kLanes;
  const uint32_t* keys = words(cache + kv_head * cache_rows * D);
  const uint32_t* values = words(cache + (KVH + kv_head) * cache_rows * D);
  const uint32_t* qw = words(q);  // [group][NC] pairs
  VecF acc[GM][NDM], lsum[GM][kChunkVecs];
  float m[GM];
  for (int g = 0; g < group; ++g) {
    m[g] = -INFINITY;
    for (int v = 0; v < kChunkVecs; ++v) lsum[g][v] = zero();
    for (int i = 0; i < ND; ++i) acc[g][i] = zero();
  }
  alignas(64) bf16 weights[GM][kChunk];
  alignas(64) uint32_t last_pair[kMaxHeadDim];
  for (int64_t pos = first; pos < last; pos += BS) {
    const int64_t n = std::min(BS, last - pos), block = int64_t(table[pos / BS]) * BS * NC;  // in words
    const uint32_t* kb = keys + block;
    const uint32_t* vb = values + block;
    const int64_t ahead = fetch_block(table, pos, fetch_end, BS);
    for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
      const int64_t nt = std::min<int64_t>(kChunk, n - t0);
      const char* fetch_keys = ahead >= 0 ? reinterpret_cast<const char*>(keys + (ahead + t0) * NC) : nullptr;
      const char* fetch_values = ahead >= 0 ? reinterpret_cast<const char*>(values + (ahead + t0) * NC) : nullptr;
      VecF s[GM][kChunkVecs][NA];
      PAGEDLLM_UNROLL
      for (int g = 0; g < group; ++g)
        for (int v = 0; v < kChunkVecs; ++v)
          for (int a = 0; a < NA; ++a) s[g][v][a] = zero();
      // A whole chunk's loads are plain: a test of nt at each load left GCC storing the scores to the stack at
      // every step of c (Zen 4: the stores, not the dot products, bound the loop).
      auto score = [&](auto whole) {
        for (int64_t c0 = 0; c0 < NC; c0 += NA) {  // NA is 2 for the fixed shapes only, whose NC is even
          fetch_slice(fetch_keys, fetch_values, nt * D * int64_t(sizeof(bf16)), c0 / NA, NC / NA);
          PAGEDLLM_UNROLL
          for (int a = 0; a < NA; ++a) {
            const int64_t c = c0 + a;
            VecW k[kChunkVecs];
            for (int v = 0; v < kChunkVecs; ++v)
              k[v] = whole ? load_words(kb + c * BS + t0 + v * kLanes)
                           : load_words_upto(kb + c * BS + t0 + v * kLanes, nt - v * kLanes);
            PAGEDLLM_UNROLL
            for (int g = 0; g < group; ++g) {
              const PairX x = broadcast_pair(qw[g * NC + c]);
              for (int v = 0; v < kChunkVecs; ++v) s[g][v][a] = dot2(s[g][v][a], k[v], x);
            }
          }
        }
      };
      if (nt == kChunk) score(std::true_type{});
      else score(std::false_type{});
      PAGEDLLM_UNROLL
      for (int g = 0; g < group; ++g) {
        VecF sc[kChunkVecs], p[kChunkVecs];
        for (int v = 0; v < kChunkVecs; ++v) {
          sc[v] = s[g][v][0];
          for (int a = 1; a < NA; ++a) sc[v] = add(sc[v], s[g][v][a]);
          sc[v] = mul(sc[v], set1(scale));
        }
        softmax_chunk(sc, nt, m[g], acc[g], ND, lsum[g], p);
        for (int v = 0; v < kChunkVecs; ++v) store(weights[g] + v * kLanes, p[v]);
      }
      const int64_t pairs = (nt + 1) / 2;
      for (int64_t u = 0; u < pairs; ++u) {
        const uint32_t* row = vb + (t0 / 2 + u) * D;
        if (nt % 2 == 1 && u == pairs - 1) {  // the position past the chunk may hold anything: 0 * inf is NaN
          for (int64_t d = 0; d < D; ++d) last_pair[d] = row[d] & 0xFFFFu;
          row = last_pair;
        }
        VecW vv[NDM];
        for (int i = 0; i < ND; ++i) vv[i] = load_words_upto(row + i * kLanes, D - i * kLanes);
        for (int g = 0; g < group; ++g) {
          const PairX x = broadcast_pair(words(weights[g])[u]);
          for (int i = 0; i < ND; ++i) acc[g][i] = dot2(acc[g][i], vv[i], x);
        }
      }
    }
  }
  for (int g = 0; g < group; ++g) {
    VecF l = lsum[g][0];
    for (int v = 1; v < kChunkVecs; ++v) l = add(l, lsum[g][v]);
    m_out[g] = m[g], l_out[g] = reduce_add(l);
    for (int i = 0; i < ND; ++i) store_n(acc_out + g * D + i * kLanes, acc[g][i], D - i * kLanes);
  }
}

// One split of an int8 cache (codes and scales as kv_index and scale_index lay them out) for the query heads of KV
// head kv_head's group, in integer dot products of int16 pairs: each query rounded to int16 with a scale of its own
// (an error of at most 2^-16 of its largest element), the keys' codes widened, exact sums in int32; then each
// chunk's weights, times the values' scales, rounded to int16 with a scale per chunk and head (2^-16 of the largest;
// torch's bf16 flash attention rounds them to bf16, 2^-9) against the values' codes, two positions per madd_pairs.
template <typename T, int G, int HEAD_DIM>
void attend_codes(const T* q, const int8_t* cache, const int32_t* table, int64_t first, int64_t last,
                  int64_t fetch_end, int64_t BS, int64_t head_dim, int64_t group_size, int64_t cache_rows,
                  int64_t kv_head, int64_t KVH, float scale, float* m_out, float* l_out, float* acc_out) {
  constexpr bool fixed = G > 0;
  constexpr int GM = fixed ? G : int(kMaxGroup), NDM = fixed ? HEAD_DIM / kLanes : int(kMaxHeadDim / kLanes);
  const int64_t group = fixed ? G : group_size, D = fixed ? HEAD_DIM : head_dim;
  const int64_t NC = D / 2, ND = (D + kLanes - 1) / kLanes, block_bytes = BS * (D + 2);
  const int8_t* keys = cache + kv_head * cache_rows * (D + 2);
  const int8_t* values = cache + (KVH + kv_head) * cache_rows * (D + 2);
  alignas(64) uint32_t qw[GM][kMaxHeadDim / 2];  // the queries as int16 pairs
  float q_scale[GM], w_scale[GM], m[GM];
  VecF acc[GM][NDM], lsum[GM][kChunkVecs];
  for (int g = 0; g < group; ++g) {
    float absmax = 0.f;
    for (int64_t d = 0; d < D; ++d) absmax = std::max(absmax, std::fabs(as_float(q[g * D + d])));
    const float qs = absmax > 0.f ? absmax / 32767.f : 1.f;
    for (int64_t c = 0; c < NC; ++c)
      qw[g][c] = int16_pair(int16_t(std::nearbyint(as_float(q[g * D + 2 * c]) / qs)),
                            int16_t(std::nearbyint(as_float(q[g * D + 2 * c + 1]) / qs)));
    q_scale[g] = qs * scale, m[g] = -INFINITY;
    for (int v = 0; v < kChunkVecs; ++v) lsum[g][v] = zero();
    for (int i = 0; i < ND; ++i) acc[g][i] = zero();
  }
  alignas(64) int16_t weights[GM][kChunk];
  for (int64_t pos = first; pos < last; pos += BS) {
    const int64_t n = std::min(BS, last - pos), block = int64_t(table[pos / BS]) * block_bytes;
    const int8_t* kb = keys + block;
    const int8_t* vb = values + block;
    const bf16* k_scales = reinterpret_cast<const bf16*>(kb + BS * D);
    const bf16* v_scales = reinterpret_cast<const bf16*>(vb + BS * D);
    const int64_t ahead = fetch_block(table, pos, fetch_end, BS);
    for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
      const int64_t nt = std::min<int64_t>(kChunk, n - t0);
      const int64_t at = ahead / BS * block_bytes;  // the block ahead's share of this chunk (and its scales, once)
      const char* fetch_keys = ahead >= 0 ? reinterpret_cast<const char*>(keys + at + t0 * D) : nullptr;
      const char* fetch_values = ahead >= 0 ? reinterpret_cast<const char*>(values + at + t0 * D) : nullptr;
      if (ahead >= 0 && t0 == 0) prefetch(keys + at + BS * D), prefetch(values + at + BS * D);
      constexpr int NA = kMaddChains;  // chains per score vector (pairs c, c + NA, ... in one)
      VecW s[GM][kChunkVecs][NA];
      for (int g = 0; g < group; ++g)
        for (int v = 0; v < kChunkVecs; ++v)
          for (int a = 0; a < NA; ++a) s[g][v][a] = broadcast_word(0);
      for (int64_t c0 = 0; c0 < NC; c0 += NA) {
        fetch_slice(fetch_keys, fetch_values, nt * D, c0 / NA, (NC + NA - 1) / NA);
        PAGEDLLM_UNROLL
        for (int a = 0; a < NA; ++a) {
          const int64_t c = c0 + a;
          if (c >= NC) break;
          VecW k[kChunkVecs];
          for (int v = 0; v < kChunkVecs; ++v)
            k[v] = load_code_pairs_n(kb + 2 * (c * BS + t0 + v * kLanes), 2 * (nt - v * kLanes));
          PAGEDLLM_UNROLL
          for (int g = 0; g < group; ++g) {
            const VecW x = broadcast_word(qw[g][c]);
            for (int v = 0; v < kChunkVecs; ++v) s[g][v][a] = madd_pairs(s[g][v][a], k[v], x);
          }
        }
      }
      for (int g = 0; g < group; ++g)
        for (int v = 0; v < kChunkVecs; ++v)
          for (int a = 1; a < NA; ++a) s[g][v][0] = add_words(s[g][v][0], s[g][v][a]);
      VecF ks[kChunkVecs], vs[kChunkVecs];  // zero past nt
      for (int v = 0; v < kChunkVecs; ++v) {
        const int64_t left = std::max<int64_t>(nt - v * kLanes, 0);
        ks[v] = left > 0 ? load_n(k_scales + t0 + v * kLanes, left) : zero();
        vs[v] = left > 0 ? load_n(v_scales + t0 + v * kLanes, left) : zero();
      }
      for (int g = 0; g < group; ++g) {
        VecF sc[kChunkVecs], p[kChunkVecs], w[kChunkVecs], wmax = zero();
        for (int v = 0; v < kChunkVecs; ++v) sc[v] = mul(mul(int_to_float(s[g][v][0]), ks[v]), set1(q_scale[g]));
        softmax_chunk(sc, nt, m[g], acc[g], ND, lsum[g], p);
        for (int v = 0; v < kChunkVecs; ++v) w[v] = mul(p[v], vs[v]), wmax = max(wmax, w[v]);
        const float largest = reduce_max(wmax);
        w_scale[g] = largest > 0.f ? largest / 32767.f : 1.f;
        const VecF inv = set1(1.f / w_scale[g]);
        for (int v = 0; v < kChunkVecs; ++v) store_int16(weights[g] + v * kLanes, mul(w[v], inv));
      }
      VecW iacc[GM][NDM];
      for (int g = 0; g < group; ++g)
        for (int i = 0; i < ND; ++i) iacc[g][i] = broadcast_word(0);
      const int64_t pairs = (nt + 1) / 2;  // an odd chunk's last pair: its second weight is 0
      for (int64_t u = 0; u < pairs; ++u) {
        const int8_t* row = vb + (t0 / 2 + u) * D * 2;
        VecW vv[NDM];
        for (int i = 0; i < ND; ++i) vv[i] = load_code_pairs_n(row + 2 * i * kLanes, 2 * (D - i * kLanes));
        for (int g = 0; g < group; ++g) {
          const VecW x = broadcast_word(reinterpret_cast<const uint32_t*>(weights[g])[u]);
          for (int i = 0; i < ND; ++i) iacc[g][i] = madd_pairs(iacc[g][i], vv[i], x);
        }
      }
      for (int g = 0; g < group; ++g)
        for (int i = 0; i < ND; ++i) acc[g][i] = fma(int_to_float(iacc[g][i]), set1(w_scale[g]), acc[g][i]);
    }
  }
  for (int g = 0; g < group; ++g) {
    VecF l = lsum[g][0];
    for (int v = 1; v < kChunkVecs; ++v) l = add(l, lsum[g][v]);
    m_out[g] = m[g], l_out[g] = reduce_add(l);
    for (int i = 0; i < ND; ++i) store_n(acc_out + g * D + i * kLanes, acc[g][i], D - i * kLanes);
  }
}

template <typename T>
using CodesSplit = void (*)(const T*, const int8_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, float, float*, float*, float*);

template <typename T, int HEAD_DIM>
CodesSplit<T> codes_for_group(int64_t group) {
  switch (group) {
    case 1: return attend_codes<T, 1, HEAD_DIM>;
    case 2: return attend_codes<T, 2, HEAD_DIM>;
    case 3: return attend_codes<T, 3, HEAD_DIM>;
    case 4: return attend_codes<T, 4, HEAD_DIM>;
    case 8: return attend_codes<T, 8, HEAD_DIM>;
    default: return attend_codes<T, 0, 0>;
  }
}

template <typename T>
inline CodesSplit<T> codes_split(int64_t group, int64_t D) {
  return D == 64 ? codes_for_group<T, 64>(group) : D == 128 ? codes_for_group<T, 128>(group) : attend_codes<T, 0, 0>;
}

using PairsSplit = void (*)(const bf16*, const bf16*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, float, float*, float*, float*);

template <int HEAD_DIM>
PairsSplit pairs_for_group(int64_t group) {
  switch (group) {
    case 1: return attend_pairs<1, HEAD_DIM>;
    case 2: return attend_pairs<2, HEAD_DIM>;
    case 3: return attend_pairs<3, HEAD_DIM>;
    case 4: return attend_pairs<4, HEAD_DIM>;
    case 8: return attend_pairs<8, HEAD_DIM>;
    default: return attend_pairs<0, 0>;
  }
}

// The split with registers for the shapes of common models (head_dim 64 or 128), else the general one.
inline PairsSplit pairs_split(int64_t group, int64_t D) {
  return D == 64 ? pairs_for_group<64>(group) : D == 128 ? pairs_for_group<128>(group) : attend_pairs<0, 0>;
}

// `rows`: which rows of q, out, tables and context_lens the B items are (nullptr: rows 0 to B - 1).
template <typename T, typename C = T>
void paged_attention_decode(const T* q, const C* cache, const int32_t* tables, int64_t max_blocks,
                            const int32_t* context_lens, T* out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                            int64_t BS, int64_t cache_rows, float scale, const AttentionPlan& plan, float* scratch,
                            const Par& par, const int32_t* rows = nullptr) {
  const int64_t group = H / KVH, splits = plan.splits;
  auto row_of = [rows](int64_t b) -> int64_t { return rows ? rows[b] : b; };
  float* ml = scratch;                                  // [item][2 * group]: running max, then sum
  float* acc = scratch + B * KVH * splits * group * 2;  // [item][group][D]
  PairsSplit split_pairs = nullptr;
  CodesSplit<T> split_codes = nullptr;
  if constexpr (std::is_same<C, int8_t>::value) split_codes = codes_split<T>(group, D);
  else if constexpr (std::is_same<T, bf16>::value) split_pairs = pairs_split(group, D);
  par(B * KVH * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = row_of(item / (KVH * splits)), h = item / splits % KVH, s = item % splits;
      const int64_t first = s * plan.split_len, last = std::min<int64_t>(first + plan.split_len, context_lens[b]);
      float* m = ml + item * group * 2;
      if (first >= last) {
        for (int64_t g = 0; g < group; ++g) m[g] = -INFINITY, m[group + g] = 0.f;
        continue;
      }
      // Blocks are fetched ahead up to the context's end, past the split's: a thread's next item is most often the
      // next split (Xeon with AMX, 2 threads, decode attention at 4,096 alone: 22.8-23.1 against 21.8-22.6 GB/s,
      // 3 alternating pairs).
      const int64_t fetch_end = plan.fetch_ahead ? context_lens[b] : 0;
      const int32_t* table = tables + b * max_blocks;
      if constexpr (std::is_same<C, int8_t>::value)
        split_codes(q + (b * H + h * group) * D, cache, table, first, last, fetch_end, BS, D, group, cache_rows, h,
                    KVH, scale, m, m + group, acc + item * group * D);
      else if constexpr (std::is_same<T, bf16>::value)
        split_pairs(q + (b * H + h * group) * D, cache, table, first, last, fetch_end, BS, D, group, cache_rows, h,
                    KVH, scale, m, m + group, acc + item * group * D);
      else
        attend_split(q + (b * H + h * group) * D, cache, table, first, last, fetch_end, BS, D, group, cache_rows, h,
                     KVH, scale, m, m + group, acc + item * group * D);
    }
  });
  par(B * H, 16, [&](int64_t begin, int64_t end) {
    float weights[64];  // at most 64 splits
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H / group, g = bh % group, base = (b * KVH + h) * splits;
      T* o_row = out + (row_of(b) * H + bh % H) * D;
      float m_all = -INFINITY, l_all = 0.f;
      for (int64_t s = 0; s < splits; ++s) m_all = std::max(m_all, ml[(base + s) * group * 2 + g]);
      for (int64_t s = 0; s < splits; ++s) {
        const float m = ml[(base + s) * group * 2 + g], l = ml[(base + s) * group * 2 + group + g];
        weights[s] = l == 0.f ? 0.f : std::exp(m - m_all);
        l_all += l * weights[s];
      }
      for (int64_t d = 0; d < D; d += kLanes) {
        VecF o = zero();
        for (int64_t s = 0; s < splits; ++s)
          if (weights[s] != 0.f) o = fma(load_n(acc + ((base + s) * group + g) * D + d, D - d), set1(weights[s]), o);
        store_n(o_row + d, div(o, set1(l_all)), D - d);
      }
    }
  });
}

// ---- paged attention for prefill chunks: a sequence's run of new tokens, attended in query tiles ------------
// A step's rows are grouped into runs of one sequence (token_seq). Decode rows (a generated token, or one with its
// speculative drafts) go one row at a time through paged_attention_decode, which splits long contexts across
// threads; prompt tokens (prefill chunks, however short) in tiles of kQueryTile tokens, which read each key and
// value once for the whole tile instead of once per token. Within a tile, a chunk of kChunk keys is transposed
// into K^T [D][kChunk] once, and every row (a token and one query head of the KV head's group) scores it as
// broadcast q[d] times K^T[d]: one vector of scores per instruction, no horizontal sums. Row i of a tile sees its
// own context only (causal), and chunks past the tile's last token are never read. A row's result does not depend
// on the other rows of its tile, so a prompt's last token comes out the same whether its prompt was computed with
// it or found in the prefix cache. Scores are float32 (bf16 products are exact there), as in decode.
constexpr int64_t kQueryTile = 16;

struct QueryTile {
  int32_t row0, rows;  // rows [row0, row0 + rows) of one sequence, their contexts ascending
};

// Which rows a step attends one by one and which in tiles (costliest first, for Par::each_dynamic).
struct AttentionWork {
  std::vector<int32_t> rows, row_ctx;  // attended one by one, and their context lengths
  std::vector<QueryTile> tiles;
  std::vector<RowSpan> prompt;  // the prompt tokens' rows, in ascending runs (linear() keeps them on one path)

  // token_seq [T]: each row's sequence (nullptr: every row its own); prefill [num_seqs]: whose rows are prompt
  // tokens (nullptr: none); ctx [T]: positions each row sees.
  AttentionWork(const int32_t* token_seq, const int32_t* prefill, const int32_t* ctx, int64_t T) {
    for (int64_t r0 = 0; r0 < T;) {
      int64_t r1 = r0 + 1;
      while (token_seq && r1 < T && token_seq[r1] == token_seq[r0]) ++r1;
      if (token_seq && prefill && prefill[token_seq[r0]]) {
        for (int64_t t = r0; t < r1; t += kQueryTile) tiles.push_back({int32_t(t), int32_t(std::min(kQueryTile, r1 - t))});
        if (!prompt.empty() && prompt.back().row0 + prompt.back().rows == r0) prompt.back().rows += r1 - r0;
        else prompt.push_back({r0, r1 - r0});
      } else {
        for (int64_t r = r0; r < r1; ++r) rows.push_back(int32_t(r)), row_ctx.push_back(ctx[r]);
      }
      r0 = r1;
    }
    std::stable_sort(tiles.begin(), tiles.end(), [ctx](const QueryTile& a, const QueryTile& b) {
      return ctx[a.row0 + a.rows - 1] > ctx[b.row0 + b.rows - 1];
    });
  }
};

// A chunk's keys and the queries, one step of d at a time: float32 (one d), or bf16 pairs where the CPU has a
// bf16 dot (two d; a key's pair is its 32-bit word, so the transpose moves words), half the instructions.
inline VecF key_step(const float* kt) { return load(kt); }
inline VecW key_step(const uint32_t* kt) { return load_words(kt); }
inline VecF query_step(float q) { return set1(q); }
inline PairX query_step(uint32_t q) { return broadcast_pair(q); }
inline VecF multiply_add(VecF acc, VecF k, VecF q) { return fma(q, k, acc); }
inline VecF multiply_add(VecF acc, VecW k, PairX q) { return dot2(acc, k, q); }

// RB rows' scores against one transposed chunk: scores[r][t] = scale * sum_d q[r][d] * kt[d][t], over `steps`
// steps of d (q [RB][steps], kt [steps][kChunk] with rows kt_stride apart, as float32 or bf16 pairs).
template <int RB, typename E>
inline void score_rows(const E* q, int64_t steps, const E* kt, int64_t kt_stride, float scale, float* scores) {
  constexpr int V = int(kChunk / kLanes);
  VecF s[RB][V];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < V; ++v) s[r][v] = zero();
  for (int64_t d = 0; d < steps; ++d) {
    decltype(key_step(kt)) k[V];
    for (int v = 0; v < V; ++v) k[v] = key_step(kt + d * kt_stride + v * kLanes);
    for (int r = 0; r < RB; ++r) {
      const auto qd = query_step(q[r * steps + d]);
      for (int v = 0; v < V; ++v) s[r][v] = multiply_add(s[r][v], k[v], qd);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < V; ++v) store(scores + r * kChunk + v * kLanes, mul(s[r][v], set1(scale)));
}

// RB rows' weighted values over one chunk: acc[r] = acc[r] * correction[r] + sum_t w[r][t] * v[t], for head
// sizes of whole 4-vector runs (64 and 128 on AVX-512): each value vector loaded once for RB rows.
constexpr int kValueRows = kLanes == 16 ? 4 : 2;  // RB x 4 accumulators, 4 values and a weight in registers

template <int RB>
inline void accumulate_rows(float* acc, int64_t D, const float* w, const float* correction, const float* vf,
                            int64_t nt) {
  for (int64_t d = 0; d < D; d += 4 * kLanes) {
    VecF a[RB][4];
    for (int r = 0; r < RB; ++r) {
      const VecF c = set1(correction[r]);
      for (int j = 0; j < 4; ++j) a[r][j] = mul(load(acc + r * D + d + j * kLanes), c);
    }
    for (int64_t t = 0; t < nt; ++t) {
      VecF v[4];
      for (int j = 0; j < 4; ++j) v[j] = load(vf + t * D + d + j * kLanes);
      for (int r = 0; r < RB; ++r) {
        const VecF p = set1(w[r * kChunk + t]);
        for (int j = 0; j < 4; ++j) a[r][j] = fma(p, v[j], a[r][j]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < 4; ++j) store(acc + r * D + d + j * kLanes, a[r][j]);
  }
}

// A chunk of kChunk positions of an int8 cache from `row` (all in its block) dequantized: keys into kt [D][kChunk],
// values into vf [kChunk][D], zeros past the first nt (codes times a scale of 0: whatever the stale scales hold).
inline void dequantize_chunk(const int8_t* keys, const int8_t* values, int64_t row, int64_t nt, int64_t D, int64_t BS,
                             float* kt, float* vf) {
  const int64_t block = row / BS * BS * (D + 2), s0 = row % BS;
  const int8_t* kb = keys + block;
  const int8_t* vb = values + block;
  const bf16* k_scales = reinterpret_cast<const bf16*>(kb + BS * D) + s0;
  const bf16* v_scales = reinterpret_cast<const bf16*>(vb + BS * D) + s0;
  VecF ks[kChunkVecs];
  for (int v = 0; v < kChunkVecs; ++v) ks[v] = nt > v * kLanes ? load_n(k_scales + v * kLanes, nt - v * kLanes) : zero();
  for (int64_t c = 0; c < D / 2; ++c)  // K^T's pair c: dims 2c and 2c + 1 of each position
    for (int v = 0; v < kChunkVecs; ++v) {
      const VecW w = load_code_pairs(kb + 2 * (c * BS + s0 + v * kLanes));
      store(kt + 2 * c * kChunk + v * kLanes, mul(low_codes(w), ks[v]));
      store(kt + (2 * c + 1) * kChunk + v * kLanes, mul(high_codes(w), ks[v]));
    }
  for (int64_t u = 0; u < kChunk / 2; ++u) {  // positions 2u and 2u + 1 of the chunk, dim by dim
    const int8_t* pair = vb + (s0 / 2 + u) * D * 2;
    const VecF lo = set1(2 * u < nt ? bf16_to_float(v_scales[2 * u]) : 0.f);
    const VecF hi = set1(2 * u + 1 < nt ? bf16_to_float(v_scales[2 * u + 1]) : 0.f);
    for (int64_t d = 0; d < D; d += kLanes) {
      const VecW w = load_code_pairs_n(pair + 2 * d, 2 * (D - d));
      store_n(vf + 2 * u * D + d, mul(low_codes(w), lo), D - d);
      store_n(vf + (2 * u + 1) * D + d, mul(high_codes(w), hi), D - d);
    }
  }
}

// The span of `width` positions from pos0 in `chunks` chunks of a bf16 cache in blocks of whole chunks: each chunk's
// K^T rows ([D/2][BS] words) and value pairs ([kChunk/2][D] words) where they are, but the last chunk's values
// copied into `zeroed` with zeros past the context (the cache there may hold anything, and 0 * NaN is not 0).
inline void span_chunks(const uint32_t* key_words, const uint32_t* value_words, const int32_t* table, int64_t pos0,
                        int64_t width, int64_t chunks, int64_t D, int64_t BS, const uint32_t** keys,
                        const uint32_t** pairs, uint32_t* zeroed) {
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t p = pos0 + c * kChunk, row = int64_t(table[p / BS]) * BS + p % BS;
    keys[c] = key_words + kv_index<bf16>(false, row, 0, D, BS) / 2;
    pairs[c] = value_words + kv_index<bf16>(true, row, 0, D, BS) / 2;
  }
  if (const int64_t nt = width - (chunks - 1) * kChunk; nt < kChunk) {
    const uint32_t* vp = pairs[chunks - 1];
    for (int64_t u = 0; u < kChunk / 2; ++u)
      for (int64_t d = 0; d < D; ++d)
        zeroed[u * D + d] = 2 * u + 1 < nt ? vp[u * D + d] : 2 * u < nt ? vp[u * D + d] & 0xFFFFu : 0u;
    pairs[chunks - 1] = zeroed;
  }
}

#if defined(PAGEDLLM_ISA_AMX)
// A bf16 tile on AMX (tier amx), where blocks hold whole chunks and D is whole steps of 32. Per 16 of the tile's
// rows and a span of up to kAmxSpan positions: each chunk's scores are a tdpbf16ps per 32 dims of q against the
// block's K^T read in place (a row of 16 positions' pairs is 64 bytes); one softmax update over the whole span
// (its fixed costs, a row's max and sum and the rescaling of its sums so far, once per 64 positions, not 16);
// the weights rounded to bf16, as the decode kernel and torch's bf16 flash attention round them; and each 16 dims
// of the weighted values a tdpbf16ps per chunk against the values' position pairs, also read in place.
constexpr int64_t kAmxSpan = 4 * kChunk;

inline bool attends_on_amx(int64_t D, int64_t BS) { return D % 32 == 0 && BS % kChunk == 0 && amx_permitted(); }

inline void configure_attention_tiles() {
  TileConfig config;
  for (int t = 0; t < 4; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;  // scores, values out, q, K^T
  config.bytes_per_row[4] = 32, config.rows[4] = 16;  // weights: 16 rows x a chunk's 8 position pairs
  config.bytes_per_row[5] = 64, config.rows[5] = 8;   // values: 8 position pairs x 16 dims
  _tile_loadconfig(&config);
}

inline void attend_tile_amx(const bf16* q, const bf16* cache, const int32_t* table, const int32_t* ctx,
                            const QueryTile& tile, int64_t h, int64_t H, int64_t KVH, int64_t D, int64_t BS,
                            int64_t cache_rows, float scale, bf16* out) {
  static_assert(kChunk == 16 && kLanes == 16, "a chunk is one tile's 16 columns and one vector");
  constexpr int64_t kSpanChunks = kAmxSpan / kChunk;
  const int64_t G = H / KVH, n = tile.rows, R = n * G, padded = (R + 15) / 16 * 16;
  thread_local Scratch<bf16> qb, values_copy;
  thread_local Scratch<float> acc, ml;
  qb.assign(padded * D, 0), acc.assign(padded * D, 0.f), ml.resize(2 * padded), values_copy.resize(kChunk * D);
  float* m = ml.data();
  float* l = m + padded;
  for (int64_t r = 0; r < padded; ++r) m[r] = -INFINITY, l[r] = 0.f;
  for (int64_t r = 0; r < R; ++r)  // row r = i * G + g: token row0 + i, query head h * G + g
    std::memcpy(qb.data() + r * D, q + ((tile.row0 + r / G) * H + h * G + r % G) * D, D * sizeof(bf16));
  alignas(64) float scores[16 * kAmxSpan], sums[16 * 16], corrections[16];
  alignas(64) bf16 weights[16 * kAmxSpan];
  const uint32_t* keys[kSpanChunks];
  const uint32_t* pairs[kSpanChunks];
  const uint32_t* key_words = words(cache + h * cache_rows * D);
  const uint32_t* value_words = words(cache + (KVH + h) * cache_rows * D);
  const int64_t last = ctx[tile.row0 + n - 1];
  configure_attention_tiles();
  for (int64_t pos0 = 0; pos0 < last; pos0 += kAmxSpan) {
    const int64_t width = std::min(kAmxSpan, last - pos0), chunks = (width + kChunk - 1) / kChunk;
    span_chunks(key_words, value_words, table, pos0, width, chunks, D, BS, keys, pairs,
                reinterpret_cast<uint32_t*>(values_copy.data()));
    int64_t first_row = 0;  // the tile's tokens before the span see none of it
    while (ctx[tile.row0 + first_row] <= pos0) ++first_row;
    for (int64_t r0 = first_row * G / 16 * 16; r0 < R; r0 += 16) {
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_zero(0);
        for (int64_t k = 0; k < D; k += 32) {
          _tile_loadd(2, qb.data() + r0 * D + k, D * 2);
          _tile_loadd(3, keys[c] + k / 2 * BS, BS * 4);
          _tile_dpbf16ps(0, 2, 3);
        }
        _tile_stored(0, scores + c * kChunk, kAmxSpan * 4);
      }
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t r = r0 + i;
        float* row_scores = scores + i * kAmxSpan;
        bf16* row_weights = weights + i * kAmxSpan;
        if (r >= R || r < first_row * G) {  // no weights, and its sums so far as they are
          for (int64_t c = 0; c < chunks; ++c) store(row_weights + c * kChunk, zero());
          corrections[i] = 1.f;
          continue;
        }
        const int64_t visible = std::min(width, ctx[tile.row0 + r / G] - pos0);
        VecF top = set1(-INFINITY);
        for (int64_t c = 0; c < chunks; ++c) {
          const VecF v = mul(load(row_scores + c * kChunk), set1(scale));
          store(row_scores + c * kChunk, v);
          if ((c + 1) * kChunk <= visible) top = max(top, v);
        }
        for (int64_t t = visible / kChunk * kChunk; t < visible; ++t) top = max(top, set1(row_scores[t]));
        const float m_new = std::max(m[r], reduce_max(top));
        corrections[i] = std::exp(m[r] - m_new);
        VecF sum = zero();
        for (int64_t c = 0; c < chunks; ++c) {
          VecF w = exp(sub(load(row_scores + c * kChunk), set1(m_new)));
          if ((c + 1) * kChunk > visible) {  // exactly 0 past the row's own position, not exp's floor
            store(row_scores + c * kChunk, w);
            for (int64_t t = std::max(visible - c * kChunk, int64_t(0)); t < kChunk; ++t) row_scores[c * kChunk + t] = 0.f;
            w = load(row_scores + c * kChunk);
          }
          sum = add(sum, w);
          store(row_weights + c * kChunk, w);
        }
        l[r] = l[r] * corrections[i] + reduce_add(sum);
        m[r] = m_new;
      }
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        _tile_zero(1);
        for (int64_t c = 0; c < chunks; ++c) {
          _tile_loadd(4, weights + c * kChunk, kAmxSpan * 2);
          _tile_loadd(5, pairs[c] + d0, D * 4);
          _tile_dpbf16ps(1, 4, 5);
        }
        _tile_stored(1, sums, 16 * 4);
        for (int64_t i = 0; i < 16; ++i) {
          float* a = acc.data() + (r0 + i) * D + d0;
          store(a, fma(load(a), set1(corrections[i]), load(sums + i * 16)));
        }
      }
    }
  }
  _tile_release();
  for (int64_t r = 0; r < R; ++r) {
    bf16* dst = out + ((tile.row0 + r / G) * H + h * G + r % G) * D;
    const VecF inv = set1(1.f / l[r]);
    for (int64_t d = 0; d < D; d += kLanes) store(dst + d, mul(load(acc.data() + r * D + d), inv));
  }
}
#endif

// ---- a tile on bf16 pairs (AVX-512: bf16 caches in blocks of whole chunks, head_dim a multiple of 64) ----
// Per span of kTileSpan positions and 4 rows at a time, everything in registers: the rows' scores (dot2 of K^T's
// rows, read in place, against each query's pairs, broadcast), one softmax update per row per span, and the values
// read in place as position pairs, widened in registers against float32 weights. The path it replaces gathers and
// widens every key and value to float32 and updates the softmax every 16 positions. A 4,096-token prompt on Zen 4:
// avx512_bf16 821-823 against 615-702 tok/s (half its time was in the path replaced), avx512 forced 518-525 against
// 406-411. The weights stay float32 as they were: rounded to bf16 pairs (one dot2 a pair, as the decode kernel
// rounds them) the prompt ran at 899-942, but the embedded model's greedy answers to the agents tests' prompts
// changed (a tool call became text). On AVX2 (16 registers, 2 rows at a time) it ran at 331-341 against 381-394, so
// AVX2 keeps the gathered path.
constexpr int64_t kTileSpan = 4 * kLanes;  // 4 vectors of scores a row

inline bool attends_in_pairs(int64_t D, int64_t BS) {
  return kLanes == 16 && BS % kChunk == 0 && D % (4 * kLanes) == 0 && D <= kMaxHeadDim;
}

// Rows r0 .. r0 + RB - 1 of a tile against one span: q [RB] their queries' pairs; keys[c], pairs[c] each chunk's
// K^T rows ([D/2][BS] words) and value pairs ([kChunk/2][D] words); visible[i] > 0 the positions row i sees.
template <int RB>
inline void span_rows(const uint32_t* const* q, const uint32_t* const* keys, const uint32_t* const* pairs,
                      int64_t width, const int64_t* visible, int64_t D, int64_t BS, float scale, float* m, float* l,
                      float* acc) {
  constexpr int kSpanVecs = 4;
  const int64_t NC = D / 2;
  VecF s[RB][kSpanVecs];
  PAGEDLLM_UNROLL
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < kSpanVecs; ++v) s[i][v] = zero();
  for (int64_t c = 0; c < NC; ++c) {
    VecW k[kSpanVecs];
    PAGEDLLM_UNROLL
    for (int v = 0; v < kSpanVecs; ++v) k[v] = load_words(keys[v * kLanes / kChunk] + c * BS + v * kLanes % kChunk);
    PAGEDLLM_UNROLL
    for (int i = 0; i < RB; ++i) {
      const PairX x = broadcast_pair(q[i][c]);
      for (int v = 0; v < kSpanVecs; ++v) s[i][v] = dot2(s[i][v], k[v], x);
    }
  }
  alignas(64) float weights[RB][kTileSpan];
  float corrections[RB];
  PAGEDLLM_UNROLL
  for (int i = 0; i < RB; ++i) {
    VecF top = set1(-INFINITY);
    for (int v = 0; v < kSpanVecs; ++v) {
      s[i][v] = keep_first(mul(s[i][v], set1(scale)), visible[i] - v * kLanes, -INFINITY);
      top = max(top, s[i][v]);
    }
    const float m_new = std::max(m[i], reduce_max(top));
    corrections[i] = std::exp(m[i] - m_new);
    VecF sum = zero();
    for (int v = 0; v < kSpanVecs; ++v) {
      const VecF p = keep_first(exp(sub(s[i][v], set1(m_new))), visible[i] - v * kLanes, 0.f);
      sum = add(sum, p);
      store(weights[i] + v * kLanes, p);
    }
    l[i] = l[i] * corrections[i] + reduce_add(sum);
    m[i] = m_new;
  }
  const int64_t span_pairs = (width + 1) / 2;
  for (int64_t d0 = 0; d0 < D; d0 += 4 * kLanes) {
    VecF a[RB][4];
    PAGEDLLM_UNROLL
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < 4; ++j) a[i][j] = mul(load(acc + i * D + d0 + j * kLanes), set1(corrections[i]));
    for (int64_t u = 0; u < span_pairs; ++u) {
      const uint32_t* row = pairs[2 * u / kChunk] + u % (kChunk / 2) * D + d0;
      VecF even[4], odd[4];  // the pair's two positions, widened
      for (int j = 0; j < 4; ++j) {
        const VecW w = load_words(row + j * kLanes);
        even[j] = low_halves(w), odd[j] = high_halves(w);
      }
      PAGEDLLM_UNROLL
      for (int i = 0; i < RB; ++i) {
        const VecF w0 = set1(weights[i][2 * u]), w1 = set1(weights[i][2 * u + 1]);
        for (int j = 0; j < 4; ++j) a[i][j] = fma(w1, odd[j], fma(w0, even[j], a[i][j]));
      }
    }
    PAGEDLLM_UNROLL
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < 4; ++j) store(acc + i * D + d0 + j * kLanes, a[i][j]);
  }
}

inline void attend_tile_pairs(const bf16* q, const bf16* cache, const int32_t* table, const int32_t* ctx,
                              const QueryTile& tile, int64_t h, int64_t H, int64_t KVH, int64_t D, int64_t BS,
                              int64_t cache_rows, float scale, bf16* out) {
  constexpr int64_t kSpanChunks = kTileSpan / kChunk;
  const int64_t G = H / KVH, n = tile.rows, R = n * G;
  thread_local Scratch<float> acc_rows;
  if (int64_t(acc_rows.size()) < R * D) acc_rows.resize(R * D);
  float* acc = acc_rows.data();  // [R][D]: row r = i * G + g is token row0 + i, query head h * G + g
  float m[kMaxGroup * kQueryTile], l[kMaxGroup * kQueryTile];
  const uint32_t* qrows[kMaxGroup * kQueryTile];
  for (int64_t r = 0; r < R; ++r) {
    m[r] = -INFINITY, l[r] = 0.f;
    qrows[r] = words(q + ((tile.row0 + r / G) * H + h * G + r % G) * D);
    std::fill(acc + r * D, acc + (r + 1) * D, 0.f);
  }
  alignas(64) uint32_t last_pairs[kChunk / 2 * kMaxHeadDim];
  const uint32_t* key_words = words(cache + h * cache_rows * D);
  const uint32_t* value_words = words(cache + (KVH + h) * cache_rows * D);
  const uint32_t* keys[kSpanChunks];
  const uint32_t* pairs[kSpanChunks];
  const int64_t last = ctx[tile.row0 + n - 1];
  for (int64_t pos0 = 0; pos0 < last; pos0 += kTileSpan) {
    const int64_t width = std::min(kTileSpan, last - pos0), chunks = (width + kChunk - 1) / kChunk;
    span_chunks(key_words, value_words, table, pos0, width, chunks, D, BS, keys, pairs, last_pairs);
    // past the context: keys scored and masked; values never read (span_rows reads the span's positions only)
    for (int64_t c = chunks; c < kSpanChunks; ++c) keys[c] = keys[0], pairs[c] = nullptr;
    int64_t first_row = 0;  // the tile's tokens before the span see none of it
    while (ctx[tile.row0 + first_row] <= pos0) ++first_row;
    int64_t visible[kMaxGroup * kQueryTile];
    for (int64_t r = first_row * G; r < R; ++r) visible[r] = std::min(width, ctx[tile.row0 + r / G] - pos0);
    int64_t r = first_row * G;
    for (; r + 4 <= R; r += 4)
      span_rows<4>(qrows + r, keys, pairs, width, visible + r, D, BS, scale, m + r, l + r, acc + r * D);
    for (; r < R; ++r)
      span_rows<1>(qrows + r, keys, pairs, width, visible + r, D, BS, scale, m + r, l + r, acc + r * D);
  }
  for (int64_t r = 0; r < R; ++r) {
    bf16* dst = out + ((tile.row0 + r / G) * H + h * G + r % G) * D;
    const VecF inv = set1(1.f / l[r]);
    for (int64_t d = 0; d < D; d += kLanes) store(dst + d, mul(load(acc + r * D + d), inv));
  }
}

// One tile for KV head h. q, out: [T, H * D]; table: the sequence's block table; ctx: per row.
template <typename T, typename C = T>
void attend_tile(const T* q, const C* cache, const int32_t* table, const int32_t* ctx, const QueryTile& tile,
                 int64_t h, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t cache_rows, float scale, T* out) {
  if constexpr (std::is_same<T, bf16>::value && std::is_same<C, bf16>::value) {
#if defined(PAGEDLLM_ISA_AMX)
    if (attends_on_amx(D, BS)) return attend_tile_amx(q, cache, table, ctx, tile, h, H, KVH, D, BS, cache_rows, scale, out);
#endif
    if (attends_in_pairs(D, BS)) return attend_tile_pairs(q, cache, table, ctx, tile, h, H, KVH, D, BS, cache_rows, scale, out);
  }
  const int64_t G = H / KVH, n = tile.rows, R = n * G;
  // else keys widened to float32 (int8 codes times their scale)
  constexpr bool pairs = kHasBf16Dot && std::is_same<C, bf16>::value;
  constexpr bool codes = std::is_same<C, int8_t>::value;
  thread_local Scratch<float> scratch;
  const int64_t need = 2 * R * D + R * (kChunk + 2) + 2 * kChunk * D;
  if (int64_t(scratch.size()) < need) scratch.resize(need);
  float* qf = scratch.data();      // [R][D]: row i * G + g is token row0 + i, query head h * G + g
  float* acc = qf + R * D;         // [R][D]: weighted values so far
  float* m = acc + R * D;          // [R]: running max
  float* l = m + R;                // [R]: running sum
  float* scores = l + R;           // [R][kChunk]
  float corrections[kMaxGroup * kQueryTile];
  float* kt = scores + R * kChunk; // [D][kChunk]: the chunk's keys, transposed
  float* vf = kt + D * kChunk;     // [kChunk][D]: its values
  uint32_t* qw = reinterpret_cast<uint32_t*>(qf);  // pairs: q [R][D/2] and kt [D/2][kChunk] as bf16 pairs
  uint32_t* ktw = reinterpret_cast<uint32_t*>(kt);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g;
      const T* src = q + ((tile.row0 + i) * H + h * G + g) * D;
      if constexpr (pairs) std::memcpy(qw + r * (D / 2), src, D * sizeof(T));
      for (int64_t d = 0; d < D; d += kLanes) {
        if constexpr (!pairs) store_n(qf + r * D + d, load_n(src + d, D - d), D - d);
        store_n(acc + r * D + d, zero(), D - d);
      }
      m[r] = -INFINITY, l[r] = 0.f;
    }
  const C* keys = cache + h * cache_rows * row_elems<C>(D);
  const C* values = cache + (KVH + h) * cache_rows * row_elems<C>(D);
  const int64_t last = ctx[tile.row0 + n - 1];
  for (int64_t pos0 = 0; pos0 < last; pos0 += kChunk) {
    const int64_t nt = std::min<int64_t>(kChunk, last - pos0);
    // bf16 pairs in blocks of whole chunks: the chunk's K^T rows are read where they are (past nt they may hold
    // anything; softmax_update masks those scores), else gathered into ktw.
    const uint32_t* kt_rows = ktw;
    int64_t kt_stride = kChunk;
    if constexpr (pairs) {
      if (BS % kChunk == 0) {
        kt_rows = words(keys) + kv_index<C>(false, int64_t(table[pos0 / BS]) * BS + pos0 % BS, 0, D, BS) / 2;
        kt_stride = BS;
      }
    }
    bool gathered = false;
    if constexpr (codes) {
      if (BS % kChunk == 0) {
        dequantize_chunk(keys, values, int64_t(table[pos0 / BS]) * BS + pos0 % BS, nt, D, BS, kt, vf);
        gathered = true;
      }
    }
    for (int64_t t = 0; t < kChunk && !gathered; ++t) {
      if (t < nt) {  // gathered through the cache's layout (kv_index)
        const int64_t p = pos0 + t, row = int64_t(table[p / BS]) * BS + p % BS;
        if constexpr (pairs) {
          if (kt_rows == ktw)
            for (int64_t c = 0; c < D / 2; ++c)
              ktw[c * kChunk + t] = words(keys)[kv_index<C>(false, row, 2 * c, D, BS) / 2];
        } else if constexpr (codes) {
          const float ks = bf16_to_float(reinterpret_cast<const bf16*>(keys)[scale_index(row, D, BS)]);
          const float vs = bf16_to_float(reinterpret_cast<const bf16*>(values)[scale_index(row, D, BS)]);
          for (int64_t d = 0; d < D; ++d) kt[d * kChunk + t] = float(keys[kv_index<C>(false, row, d, D, BS)]) * ks;
          for (int64_t d = 0; d < D; ++d) vf[t * D + d] = float(values[kv_index<C>(true, row, d, D, BS)]) * vs;
        } else {
          for (int64_t d = 0; d < D; ++d) kt[d * kChunk + t] = as_float(keys[kv_index<C>(false, row, d, D, BS)]);
        }
        if constexpr (codes) {
        } else if constexpr (std::is_same<C, float>::value) {
          for (int64_t d = 0; d < D; d += kLanes) store_n(vf + t * D + d, load_n(values + row * D + d, D - d), D - d);
        } else {  // the position's half of its pair's words
          const uint32_t* pair = words(values) + kv_index<C>(true, row, 0, D, BS) / 2;
          for (int64_t d = 0; d < D; d += kLanes) {
            const VecW w = load_words_upto(pair + d, D - d);
            store_n(vf + t * D + d, row % 2 ? high_halves(w) : low_halves(w), D - d);
          }
        }
      } else {  // zeros, not garbage: a masked weight is 0 and 0 * NaN is not
        for (int64_t d = 0; d < D; ++d) kt[d * kChunk + t] = 0.f;  // as many words as pairs need, and more
        for (int64_t d = 0; d < D; d += kLanes) store_n(vf + t * D + d, zero(), D - d);
      }
    }
    int64_t first_row = 0;  // the tile's rows before it see none of this chunk
    while (ctx[tile.row0 + first_row] <= pos0) ++first_row;
    int64_t r = first_row * G;
    if constexpr (pairs) {
      for (; r + 4 <= R; r += 4) score_rows<4>(qw + r * (D / 2), D / 2, kt_rows, kt_stride, scale, scores + r * kChunk);
      for (; r < R; ++r) score_rows<1>(qw + r * (D / 2), D / 2, kt_rows, kt_stride, scale, scores + r * kChunk);
    } else {
      for (; r + 4 <= R; r += 4) score_rows<4>(qf + r * D, D, kt, kChunk, scale, scores + r * kChunk);
      for (; r < R; ++r) score_rows<1>(qf + r * D, D, kt, kChunk, scale, scores + r * kChunk);
    }
    auto visible = [&](int64_t row) { return std::min<int64_t>(nt, ctx[tile.row0 + row / G] - pos0); };
    for (r = first_row * G; r < R; ++r)  // weights past a row's own position are 0 from here
      corrections[r] = softmax_update(scores + r * kChunk, visible(r), m[r], l[r]);
    r = first_row * G;
    if (D % (4 * kLanes) == 0)  // rows ascend in context: a block's last row sees the most of the chunk
      for (; r + kValueRows <= R; r += kValueRows)
        accumulate_rows<kValueRows>(acc + r * D, D, scores + r * kChunk, corrections + r, vf, visible(r + kValueRows - 1));
    for (; r < R; ++r) {
      const VecF correction = set1(corrections[r]);
      const float* w = scores + r * kChunk;
      for (int64_t d = 0; d < D; d += kLanes) {
        VecF a = mul(load_n(acc + r * D + d, D - d), correction);
        for (int64_t t = 0; t < visible(r); ++t) a = fma(set1(w[t]), load_n(vf + t * D + d, D - d), a);
        store_n(acc + r * D + d, a, D - d);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    T* dst = out + ((tile.row0 + r / G) * H + h * G + r % G) * D;
    const VecF inv = set1(1.f / l[r]);
    for (int64_t d = 0; d < D; d += kLanes) store_n(dst + d, mul(load_n(acc + r * D + d, D - d), inv), D - d);
  }
}

// A step's attention: the tiles of its prefill runs, then its single rows (paged_attention_decode).
// tables: [T, max_blocks], each row's sequence's block table.
template <typename T, typename C = T>
void paged_attention_step(const T* q, const C* cache, const int32_t* tables, int64_t max_blocks,
                          const int32_t* context_lens, T* out, int64_t H, int64_t KVH, int64_t D, int64_t BS,
                          int64_t cache_rows, float scale, const AttentionWork& work, const AttentionPlan& plan,
                          float* scratch, const Par& par) {
  const int64_t num_tiles = int64_t(work.tiles.size());
  if (num_tiles > 0)
    par.each_dynamic(num_tiles * KVH, [&](int64_t item) {
      const QueryTile& tile = work.tiles[item / KVH];  // its last row's table covers every position it reads
      attend_tile<T, C>(q, cache, tables + int64_t(tile.row0 + tile.rows - 1) * max_blocks, context_lens, tile,
                     item % KVH, H, KVH, D, BS, cache_rows, scale, out);
    });
  if (!work.rows.empty())
    paged_attention_decode<T, C>(q, cache, tables, max_blocks, context_lens, out, int64_t(work.rows.size()), H, KVH, D,
                              BS, cache_rows, scale, plan, scratch, par, work.rows.data());
}

// ---- the rest of a layer --------------------------------------------------------------------------------------
template <typename T>
void silu_and_mul(const T* gate_up, T* out, int64_t rows, int64_t I, const Par& par) {
  par(rows, 32, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < I; i += kLanes) {
        const VecF g = load_n(gate_up + r * 2 * I + i, I - i), u = load_n(gate_up + r * 2 * I + I + i, I - i);
        const VecF silu = div(g, add(set1(1.f), exp(sub(zero(), g))));
        store_n(out + r * I + i, mul(round_like<T>(silu), u), I - i);
      }
  });
}

template <typename T>
void add_into(T* x, const T* y, int64_t n, const Par& par) {  // x += y, rounded to T
  par((n + kLanes - 1) / kLanes, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * kLanes; i < std::min(n, end * kLanes); i += kLanes)
      store_n(x + i, add(load_n(x + i, n - i), load_n(y + i, n - i)), n - i);
  });
}

inline void widen(const bf16* x, float* out, int64_t n, const Par& par) {  // bf16 -> float32
  par((n + kLanes - 1) / kLanes, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * kLanes; i < std::min(n, end * kLanes); i += kLanes) store_n(out + i, load_n(x + i, n - i), n - i);
  });
}

// ---- greedy: a row's most likely token ------------------------------------------------------------------------
// The largest value of a stretch of logits and where it first is, NaN above everything, as torch.argmax and numpy's
// argmax rank them.
struct Best {
  float value;
  int64_t index;
};

inline bool beats(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }

// A vector pass finds the largest value; the scan then skips the blocks of 64 below it. A stretch whose sum is NaN
// (a NaN in it, or infinities of both signs) is scanned whole.
inline Best first_max(const float* x, int64_t n) {
  VecF top = set1(-INFINITY), sum = zero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const VecF v = load(x + i);
    top = max(top, v), sum = add(sum, v);
  }
  float largest = reduce_max(top), rest = 0.f;
  for (int64_t j = i; j < n; ++j) largest = std::max(largest, x[j]), rest += x[j];
  const bool whole = std::isnan(reduce_add(sum) + rest);
  constexpr int64_t kBlock = 4 * kLanes;
  int64_t from = 0;
  if (!whole)
    while (from + kBlock <= n && reduce_max(max(max(load(x + from), load(x + from + kLanes)),
                                                max(load(x + from + 2 * kLanes), load(x + from + 3 * kLanes)))) < largest)
      from += kBlock;
  Best best{x[from], from};
  for (int64_t j = from + 1; j < n && (whole || best.value != largest); ++j)
    if (beats(x[j], best.value)) best = {x[j], j};
  return best;
}

// argmax [S] of logits [S, V]: each of `parts` stretches of a row by a thread (inside forward_layers' region, the
// stretch it has just widened), into partial [S * parts], then each row's first best.
inline void argmax_rows(const float* logits, int64_t S, int64_t V, int64_t parts, Best* partial, int64_t* argmax,
                        const Par& par) {
  par(S * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = t / parts, lo = V * (t % parts) / parts, hi = V * (t % parts + 1) / parts;
      partial[t] = first_max(logits + row * V + lo, hi - lo);
      partial[t].index += lo;
    }
  });
  par(S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      Best best = partial[row * parts];
      for (int64_t p = 1; p < parts; ++p)
        if (beats(partial[row * parts + p].value, best.value)) best = partial[row * parts + p];
      argmax[row] = best.index;
    }
  });
}

// ---- sampling: one row of logits [V] at temperature 1 / inv_t ----------------------------------------------------
// Weights exp((x - max) * inv_t), piece by piece: kLanes logits at a time, the last piece padded with zero weights.
// exp() stops at e^-87 (2^n stays a normal float); the weights start there, so a logit of -inf, or 87 / inv_t
// below the largest, weighs exactly 0 (torch's float32 exp reaches 0 at e^-104).
struct RowWeights {
  const float* x;
  int64_t V;
  float max_logit, inv_t;
  VecF floor = exp(set1(-87.f));

  RowWeights(const float* x_, int64_t V_, float inv_t_) : x(x_), V(V_), max_logit(-INFINITY), inv_t(inv_t_) {
    VecF top = set1(-INFINITY);
    int64_t i = 0;
    for (; i + kLanes <= V; i += kLanes) top = max(top, load(x + i));
    max_logit = reduce_max(top);
    for (; i < V; ++i) max_logit = std::max(max_logit, x[i]);
  }
  int64_t pieces() const { return (V + kLanes - 1) / kLanes; }
  // The piece's weights into w (zero past V); returns their sum.
  float piece(int64_t k, float* w) const {
    const int64_t i = k * kLanes, n = std::min<int64_t>(kLanes, V - i);
    const VecF e = max(sub(exp(mul(sub(load_n(x + i, n), set1(max_logit)), set1(inv_t))), floor), zero());
    store(w, e);
    for (int64_t j = n; j < kLanes; ++j) w[j] = 0.f;
    return n == kLanes ? reduce_add(e) : reduce_add(load(w));
  }
  // Every piece's sum, added in double in the order draw_token's scan adds them.
  double total() const {
    alignas(64) float w[kLanes];
    double sum = 0;
    for (int64_t k = 0; k < pieces(); ++k) sum += piece(k, w);
    return sum;
  }
};

// Token i with probability exp(x_i * inv_t) / sum: the first whose cumulative weight passes u * total (u in
// [0, 1)), as torch's cumsum and searchsorted draw it; the sums in double, piece by piece, so the scan meets the
// total exactly; where rounding inside the piece that passes leaves its lanes short, that piece's last token of
// nonzero weight (never one of zero weight). The scan computes the weights again rather than keeping them (no
// row-sized buffer per thread) and stops at the drawn token.
inline int64_t draw_token(const float* x, int64_t V, float inv_t, double u) {
  const RowWeights row(x, V, inv_t);
  alignas(64) float w[kLanes];
  const double target = u * row.total();
  double run = 0;
  for (int64_t k = 0; k < row.pieces(); ++k) {
    const float s = row.piece(k, w);
    if (run + s <= target && k + 1 < row.pieces()) {
      run += s;
      continue;
    }
    int64_t last = -1;
    for (int j = 0; j < kLanes; ++j) {
      if (w[j] <= 0.f) continue;
      run += w[j], last = k * kLanes + j;
      if (run > target) return last;
    }
    if (last >= 0) return last;
  }
  return int64_t(std::max_element(x, x + V) - x);  // every weight zero: cannot happen with a finite max
}

// row_candidates: the `width` largest logits of a row, descending (the lower index first among equals), and the
// row's log(sum(exp(x * inv_t))) where `logsumexp` is not null. A min-heap of the best so far: past its first fill,
// nearly every logit fails the comparison with its worst and costs nothing more.
inline void row_candidates(const float* x, int64_t V, int64_t width, float inv_t, float* values, int64_t* ids,
                           float* logsumexp) {
  std::vector<std::pair<float, int64_t>> heap;
  heap.reserve(width);
  auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  auto offer = [&](int64_t i) {
    if (int64_t(heap.size()) < width) {
      heap.emplace_back(x[i], i);
      std::push_heap(heap.begin(), heap.end(), better);
    } else if (x[i] > heap.front().first) {  // the worst of the best is at the front
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = {x[i], i};
      std::push_heap(heap.begin(), heap.end(), better);
    }
  };
  constexpr int64_t kRun = 4 * kLanes;  // a run of logits whose largest does not beat the worst kept is skipped
  int64_t i = 0;
  for (; i + kRun <= V; i += kRun) {
    if (int64_t(heap.size()) == width) {
      const VecF top = max(max(load(x + i), load(x + i + kLanes)),
                           max(load(x + i + 2 * kLanes), load(x + i + 3 * kLanes)));
      if (reduce_max(top) <= heap.front().first) continue;
    }
    for (int64_t j = i; j < i + kRun; ++j) offer(j);
  }
  for (; i < V; ++i) offer(i);
  std::sort(heap.begin(), heap.end(), better);
  for (int64_t j = 0; j < width; ++j) values[j] = heap[j].first, ids[j] = heap[j].second;
  if (logsumexp == nullptr) return;
  const RowWeights row(x, V, inv_t);
  *logsumexp = float(double(row.max_logit) * inv_t + std::log(row.total()));
}

// A filtered draw among a row's `width` most likely tokens (values descending, as logits): as sampler.py's
// _Limits.keep and _draw define it, their probabilities relative to `norm` (the row's log-sum-exp where top-p covers
// the whole vocabulary, else its top logit: top-k renormalizes over its own and min-p compares ratios), which of
// them top-k (0: off), top-p and min-p keep, and the draw of u among the kept ones by their cumulative sum; -1
// where the kept set may run past them, unless they are the whole row.
inline int64_t draw_among(const float* values, const int64_t* ids, int64_t width, bool whole_row, float inv_t,
                          float norm, int64_t top_k, double top_p, double min_p, double u) {
  std::vector<double> probs(width), before(width);
  double mass = 0;
  for (int64_t j = 0; j < width; ++j) {
    probs[j] = top_k == 0 || j < top_k ? double(std::exp(values[j] * inv_t - norm)) : 0.0;
    mass += probs[j];
  }
  if (top_k > 0)
    for (auto& p : probs) p /= mass;
  double run = 0;
  for (int64_t j = 0; j < width; ++j) run += probs[j], before[j] = run - probs[j];
  const double last = probs[width - 1];
  const bool covered = top_k <= width && (top_k > 0 || (top_p < 1.0 && before[width - 1] + last >= top_p) ||
                                          (min_p > 0.0 && last < min_p * probs[0]));
  if (!covered && !whole_row) return -1;
  double total = 0;
  for (int64_t j = 0; j < width; ++j) {
    const bool keep = j == 0 || ((top_k == 0 || j < top_k) && (top_p >= 1.0 || before[j] < top_p) &&
                                 probs[j] >= min_p * probs[0]);
    total += keep ? probs[j] : 0.0;
    before[j] = total;  // now the kept tokens' cumulative sum
  }
  const double target = std::min(u * total, std::nextafter(total, 0.0));
  for (int64_t j = 0; j < width; ++j)
    if (before[j] > target) return ids[j];
  return ids[0];
}

// A row's filtered draw: among its `width` most likely tokens (row_candidates), then, where its kept set may run
// past them, among its `wider` most likely; -1 where it may run past those too (the caller looks at the whole row).
inline int64_t draw_filtered(const float* x, int64_t V, int64_t width, int64_t wider, float inv_t, int64_t top_k,
                             double top_p, double min_p, double u) {
  const bool whole = top_k == 0 && top_p < 1.0;  // top-p of the whole vocabulary's mass: its log-sum-exp
  float lse = 0.f;
  std::vector<float> values(std::max(width, wider));
  std::vector<int64_t> ids(values.size());
  const int64_t looks[2] = {width, wider};
  for (int look = 0; look < 2; ++look) {
    const int64_t w = looks[look];
    if (look == 1 && w <= width) break;
    row_candidates(x, V, w, inv_t, values.data(), ids.data(), whole && w == width ? &lse : nullptr);
    const int64_t token = draw_among(values.data(), ids.data(), w, w == V, inv_t, whole ? lse : values[0] * inv_t,
                                     top_k, top_p, min_p, u);
    if (token >= 0) return token;
  }
  return -1;
}

}  // namespace pagedllm
