// The kernels alone, without torch or Python: each op of kernels.h against a scalar reference, for the tier this
// program is compiled for. It is how the Arm builds are tested on an x86 machine (cross-compiled, run under
// qemu-aarch64: tests/test_cpu_isa.py); it runs natively too. Prints one line and exits 0 when all checks pass.
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"

using namespace pagedllm;

namespace {

int failures = 0, checks = 0;

void expect_close(const char* what, const std::vector<float>& got, const std::vector<double>& want, double tol) {
  ++checks;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::fabs(got[i] - want[i]) > tol * (1.0 + std::fabs(want[i])) || std::isnan(got[i])) {
      std::printf("FAIL %s: element %zu is %.6g, expected %.6g\n", what, i, got[i], want[i]);
      ++failures;
      return;
    }
  }
}

std::mt19937 rng(0);
float normal() { return std::normal_distribution<float>(0.f, 1.f)(rng); }
std::vector<float> randn(size_t n) {
  std::vector<float> v(n);
  for (auto& x : v) x = normal();
  return v;
}
float as_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

void check_bf16_rounding() {
  const float cases[] = {1.0f, -2.5f, 1.00390625f, 1.01171875f, 3.0e38f, -1e-30f, INFINITY, -INFINITY, NAN, 0.f};
  std::vector<float> in(kLanes, 0.f), got(kLanes);
  std::vector<double> want(kLanes);
  for (float c : cases) {
    for (int i = 0; i < kLanes; ++i) in[i] = c * (1.0f + i * 0.0009765625f);
    std::vector<bf16> out(kLanes);
    store(out.data(), load(in.data()));
    ++checks;
    for (int i = 0; i < kLanes; ++i)
      if (out[i] != float_to_bf16(in[i])) {
        std::printf("FAIL bf16 rounding of %.9g: got %04x, expected %04x\n", in[i], out[i], float_to_bf16(in[i]));
        ++failures;
        break;
      }
  }
}

void check_exp() {
  std::vector<float> in(kLanes), got(kLanes);
  std::vector<double> want(kLanes);
  for (float x0 = -87.f; x0 < 80.f; x0 += 1.37f) {
    for (int i = 0; i < kLanes; ++i) in[i] = x0 + 0.01f * i, want[i] = std::exp(double(in[i]));
    store(got.data(), exp(load(in.data())));
    for (int i = 0; i < kLanes; ++i) got[i] /= float(want[i]), want[i] = 1.0;  // relative error
    expect_close("exp", got, want, 1e-6);
  }
}

// [N, K] -> [ceil(N/48), K/2, 48, 2] (cpu.py's pack_bf16) and the int8 [ceil(N/48), K, 48] (pack_int8).
std::vector<bf16> pack_bf16(const std::vector<float>& w, int64_t N, int64_t K) {
  const int64_t groups = (N + kGroupChannels - 1) / kGroupChannels;
  std::vector<bf16> out(groups * kGroupChannels * K, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      out[((n / kGroupChannels * (K / 2) + k / 2) * kGroupChannels + n % kGroupChannels) * 2 + k % 2] =
          float_to_bf16(w[n * K + k]);
  return out;
}

void check_linears() {
  // direct tiles; on narrow tiers, strips from 32 rows, panels from 97; amx: AMX tiles from 8, in blocks of 16 or 32
  for (int64_t M : {1, 2, 3, 9, 16, 33, 61, 150}) {
    const int64_t N = 100, K = 64;
    std::vector<float> w = randn(N * K), x = randn(M * K), bias = randn(N);
    std::vector<bf16> xb(M * K);
    for (int64_t i = 0; i < M * K; ++i) xb[i] = float_to_bf16(x[i]);
    std::vector<bf16> packed = pack_bf16(w, N, K);
    std::vector<float> y(M * N);
    std::vector<double> want(M * N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = bias[n];
        for (int64_t k = 0; k < K; ++k) s += double(as_bf16(w[n * K + k])) * as_bf16(x[m * K + k]);
        want[m * N + n] = s;
      }
    std::vector<float> xw(M * K);  // x as the bf16 kind's strip path reads it
    for (int64_t i = 0; i < M * K; ++i) xw[i] = bf16_to_float(xb[i]);
    linear<float>(LinearArgs{xb.data(), xw.data(), nullptr, K, packed.data(), nullptr, bias.data(), y.data(), N}, M,
                  Par{});
    expect_close("bf16 linear", y, want, 1e-4);

    // int8: per-channel codes and scales, float32 activations
    const int64_t groups = (N + kGroupChannels - 1) / kGroupChannels;
    std::vector<int8_t> codes(groups * kGroupChannels * K, 0);
    std::vector<float> scale(N);
    for (int64_t n = 0; n < N; ++n) {
      scale[n] = 0.01f * (1 + n % 7);
      for (int64_t k = 0; k < K; ++k) {
        const int8_t c = int8_t(int(w[n * K + k] * 40) % 127);
        codes[(n / kGroupChannels * K + k) * kGroupChannels + n % kGroupChannels] = c;
        w[n * K + k] = c;
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += double(w[n * K + k]) * x[m * K + k];
        want[m * N + n] = s * scale[n] + bias[n];
      }
    linear<float>(LinearArgs{x.data(), x.data(), nullptr, K, codes.data(), scale.data(), bias.data(), y.data(), N},
                  M, Par{});
    expect_close("int8 linear", y, want, 1e-4);

    // int8 with bf16 activations (a bf16 model's): from 8 rows on a bf16 dot, the codes run as bf16 pairs
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += double(w[n * K + k]) * xw[m * K + k];
        want[m * N + n] = s * scale[n] + bias[n];
      }
    linear<float>(LinearArgs{xw.data(), xw.data(), xb.data(), K, codes.data(), scale.data(), bias.data(), y.data(), N},
                  M, Par{});
    expect_close("int8 linear, bf16 activations", y, want, 1e-4);
  }
}

void check_norm_and_silu() {
  const int64_t rows = 3, H = 72;
  std::vector<float> x = randn(rows * H), w = randn(H), out(rows * H);
  std::vector<double> want(rows * H);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += double(x[r * H + i]) * x[r * H + i];
    const double inv = 1.0 / std::sqrt(ss / H + 1e-5);
    for (int64_t i = 0; i < H; ++i) want[r * H + i] = x[r * H + i] * inv * w[i];
  }
  rms_norm_rows<float>(x.data(), nullptr, w.data(), out.data(), rows, H, 1e-5f, Par{});
  expect_close("rms_norm", out, want, 1e-5);

  const int64_t I = 40;
  std::vector<float> gate_up = randn(rows * 2 * I), act(rows * I);
  std::vector<double> silu(rows * I);
  for (auto& g : gate_up) g *= 4;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < I; ++i) {
      const double g = gate_up[r * 2 * I + i], u = gate_up[r * 2 * I + I + i];
      silu[r * I + i] = g / (1 + std::exp(-g)) * u;
    }
  silu_and_mul<float>(gate_up.data(), act.data(), rows, I, Par{});
  expect_close("silu_mul", act, silu, 1e-5);
}

// LoRA over three slices of unequal width and rank 5 in slots of 6 (tails past the lanes in both products), rows
// on two slots and none, against a scalar y + B (A x) per slice; in bf16 the output is rounded once.
template <typename T>
void check_lora() {
  const int64_t K = 37, slots = 2, S = 3, R = 6, rank = 5, M = 5;
  const int64_t ends[S] = {20, 29, 160}, N = ends[S - 1];  // whole expand items in the last slice, and parts
  std::vector<float> a(slots * S * R * K, 0.f), bt(slots * R * N, 0.f), xf = randn(M * K), y0 = randn(M * N);
  for (int64_t s = 0; s < slots; ++s)
    for (int64_t j = 0; j < S * R; ++j)
      for (int64_t k = 0; k < K; ++k) a[(s * S * R + j) * K + k] = j % R < rank ? normal() : 0.f;
  for (int64_t s = 0; s < slots; ++s)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < rank; ++j) bt[(s * R + j) * N + n] = normal();
  std::vector<T> x(M * K), y(M * N);
  for (int64_t i = 0; i < M * K; ++i) put(&x[i], xf[i]), xf[i] = as_float(x[i]);
  for (int64_t i = 0; i < M * N; ++i) put(&y[i], y0[i]), y0[i] = as_float(y[i]);
  const int32_t row_slots[M] = {1, -1, 0, 1, 1};  // slot 1: a pair of rows and one more
  std::vector<double> want(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t s = n < ends[0] ? 0 : n < ends[1] ? 1 : 2;
      double delta = 0;
      for (int64_t j = 0; j < rank && row_slots[m] >= 0; ++j) {
        double t = 0;
        for (int64_t k = 0; k < K; ++k) t += double(xf[m * K + k]) * a[((row_slots[m] * S + s) * R + j) * K + k];
        delta += t * bt[(row_slots[m] * R + j) * N + n];
      }
      want[m * N + n] = y0[m * N + n] + delta;
    }
  std::vector<float> t(M * S * R);
  apply_lora<T>(LoRAArgs{a.data(), bt.data(), ends, S, R}, x.data(), K, y.data(), N, LoRARowGroups(row_slots, M),
                t.data(), Par{});
  std::vector<float> got(M * N);
  for (int64_t i = 0; i < M * N; ++i) got[i] = as_float(y[i]);
  expect_close(std::is_same<T, bf16>::value ? "lora bf16" : "lora float", got, want,
               std::is_same<T, bf16>::value ? 1e-2 : 1e-5);
}

// Attention over a paged cache [2, KVH, blocks * BS, D] (as kv_index lays it out; int8 codes C with their scales, as
// write_codes quantizes) against a scalar softmax over what the cache holds: each row its own sequence (decode), or
// with `one_sequence` every row a token of one prefill chunk (same block table, contexts ascending), in query tiles.
template <typename T, typename C = T>
void check_attention(int64_t H, int64_t KVH, int64_t D, int64_t BS, std::vector<int32_t> ctx, bool one_sequence = false) {
  constexpr bool codes = std::is_same<C, int8_t>::value;
  const int64_t B = ctx.size(), blocks = 64, rows = blocks * BS, group = H / KVH, row_len = row_elems<C>(D);
  std::vector<float> cache_f = randn(2 * KVH * rows * D), q_f = randn(B * H * D);
  std::vector<C> cache(2 * KVH * rows * row_len);
  std::vector<T> q(q_f.size()), out(q_f.size());
  auto to_t = [](float v) { if constexpr (std::is_same<T, bf16>::value) return float_to_bf16(v); else return v; };
  auto from_t = [](T v) { if constexpr (std::is_same<T, bf16>::value) return bf16_to_float(v); else return float(v); };
  for (int64_t head = 0; head < 2 * KVH; ++head)
    for (int64_t row = 0; row < rows; ++row) {
      const float* x = cache_f.data() + (head * rows + row) * D;
      C* head_cache = cache.data() + head * rows * row_len;
      if constexpr (codes) write_codes(x, head_cache, head >= KVH, row, D, BS);
      else for (int64_t d = 0; d < D; ++d) head_cache[kv_index<T>(head >= KVH, row, d, D, BS)] = to_t(x[d]);
    }
  for (size_t i = 0; i < q.size(); ++i) q[i] = to_t(q_f[i]);
  int64_t max_blocks = 0;
  for (int32_t c : ctx) max_blocks = std::max<int64_t>(max_blocks, (c + BS - 1) / BS);
  std::vector<int32_t> tables(B * max_blocks, 0);
  for (int64_t b = 0, next = 0; b < B; ++b)
    for (int64_t i = 0; i < (ctx[b] + BS - 1) / BS; ++i)
      tables[b * max_blocks + i] = one_sequence ? int32_t((i * 7) % blocks) : int32_t((next++ * 7) % blocks);
  const float scale = 1.f / std::sqrt(float(D));
  std::vector<int32_t> token_seq(B, 0);
  const int32_t prefill[1] = {1};
  AttentionWork work(one_sequence ? token_seq.data() : nullptr, one_sequence ? prefill : nullptr, ctx.data(), B);
  AttentionPlan plan(work.row_ctx.data(), int64_t(work.row_ctx.size()), H, KVH, D, BS, 2);
  std::vector<float> scratch(plan.scratch_floats);
  paged_attention_step<T, C>(q.data(), cache.data(), tables.data(), max_blocks, ctx.data(), out.data(), H, KVH, D, BS,
                          rows, scale, work, plan, scratch.data(), Par{});
  std::vector<float> got(out.size());
  std::vector<double> want(out.size());
  for (size_t i = 0; i < out.size(); ++i) got[i] = from_t(out[i]);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / group;
      std::vector<double> p(ctx[b]);
      double mx = -1e300, sum = 0;
      auto at = [&](int64_t kv, int64_t pos, int64_t d) {  // through the cache's layout
        const int64_t row = int64_t(tables[b * max_blocks + pos / BS]) * BS + pos % BS;
        const C* head_cache = cache.data() + (kv * KVH + kvh) * rows * row_len;
        if constexpr (codes)
          return float(head_cache[kv_index<C>(kv == 1, row, d, D, BS)]) *
                 bf16_to_float(reinterpret_cast<const bf16*>(head_cache)[scale_index(row, D, BS)]);
        else return from_t(head_cache[kv_index<T>(kv == 1, row, d, D, BS)]);
      };
      for (int64_t t = 0; t < ctx[b]; ++t) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += double(from_t(q[(b * H + h) * D + d])) * at(0, t, d);
        p[t] = s * scale, mx = std::max(mx, p[t]);
      }
      for (auto& v : p) v = std::exp(v - mx), sum += v;
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t t = 0; t < ctx[b]; ++t) o += p[t] * at(1, t, d);
        want[(b * H + h) * D + d] = o / sum;
      }
    }
  const std::string what = std::string(one_sequence ? "prefill attention (" : "paged attention (") +
                           (std::is_same<T, bf16>::value ? "bf16" : "float32") + (codes ? ", int8 cache)" : ")");
  // int8: decode rounds queries and weights to int16 (2^-16 of the largest)
  expect_close(what.c_str(), got, want, std::is_same<T, bf16>::value ? 1e-2 : codes ? 2e-3 : 1e-5);
}

// Sampling against scalar references: the draw inverts the cumulative weights in double, the candidates are a
// partial sort, the log-normalizer a plain sum.
void check_sampling() {
  const int64_t V = 1003;  // not a whole number of vectors
  std::vector<float> x = randn(V);
  for (auto& v : x) v *= 3.f;
  const float inv_t = 1.f / 0.7f;
  std::vector<double> cdf(V);
  const float mx = *std::max_element(x.begin(), x.end());
  double total = 0;
  for (int64_t i = 0; i < V; ++i) cdf[i] = total += std::exp(double(x[i] - mx) * inv_t);
  ++checks;
  for (double u : {0.0, 0.1, 0.5, 0.93, 0.999999}) {
    const int64_t want = std::upper_bound(cdf.begin(), cdf.end(), u * total) - cdf.begin();
    const int64_t got = draw_token(x.data(), V, inv_t, u);
    if (std::llabs(got - want) > 1) {  // float32 weights against double: a boundary may move by one token
      std::printf("FAIL draw_token at u = %g: token %lld, expected %lld\n", u, (long long)got, (long long)want);
      ++failures;
    }
  }
  std::vector<int64_t> order(V);
  for (int64_t i = 0; i < V; ++i) order[i] = i;
  std::partial_sort(order.begin(), order.begin() + 64, order.end(), [&](int64_t a, int64_t b) { return x[a] > x[b]; });
  std::vector<float> values(64);
  std::vector<int64_t> ids(64);
  float lse;
  row_candidates(x.data(), V, 64, inv_t, values.data(), ids.data(), &lse);
  ++checks;
  if (!std::equal(ids.begin(), ids.end(), order.begin())) std::printf("FAIL row_candidates: ids\n"), ++failures;
  expect_close("row_candidates: logsumexp", {lse}, {double(mx) * inv_t + std::log(total)}, 1e-5);
}

// Greedy against std::max_element's first of equals, in 3 stretches a row (the threads of forward_layers' region):
// a tie across stretches, a NaN (above everything), a row that is -inf but one token.
void check_argmax() {
  const int64_t V = 1003, S = 4, parts = 3;
  std::vector<float> x = randn(S * V);
  x[10] = x[900] = 50.f;                         // row 0: the first of a tie in two stretches
  x[V + 700] = NAN, x[V + 5] = 60.f;             // row 1: the NaN
  for (int64_t i = 2 * V; i < 3 * V; ++i) x[i] = -INFINITY;
  x[2 * V + 1002] = -1e30f;                      // row 2: the last token, past the vectors
  std::vector<Best> partial(S * parts);
  std::vector<int64_t> got(S);
  argmax_rows(x.data(), S, V, parts, partial.data(), got.data(), Par{});
  const int64_t want[S] = {10, 700, 1002, std::max_element(x.begin() + 3 * V, x.end()) - x.begin() - 3 * V};
  for (int64_t r = 0; r < S; ++r) {
    ++checks;
    if (got[r] != want[r])
      std::printf("FAIL argmax_rows row %lld: %lld, expected %lld\n", (long long)r, (long long)got[r], (long long)want[r]), ++failures;
  }
}

// The decode split plan: whole blocks covering each context; at batch 1 over 4,096 positions (3 KV heads, 2
// threads) the split count whose busiest thread reads least (12 splits: 6,208 positions against 6,400 for the 11
// that give each thread 16 items); a large batch unsplit.
void check_attention_plan() {
  const int32_t long_ctx[1] = {4096};
  const AttentionPlan one(long_ctx, 1, 9, 3, 64, 16, 2);
  const int64_t busiest = AttentionPlan::busiest_thread(long_ctx, 1, 3, one.splits, one.split_len, 16, 2);
  const int64_t busiest_fewest = AttentionPlan::busiest_thread(long_ctx, 1, 3, 11, 384, 16, 2);  // 11 splits of 384
  std::vector<int32_t> many(32, 100);
  const AttentionPlan batch(many.data(), 32, 9, 3, 64, 16, 2);
  ++checks;
  if (one.split_len % 16 || one.splits * one.split_len < 4096 || (one.splits - 1) * one.split_len >= 4096 ||
      busiest >= busiest_fewest || one.splits != 12 || batch.splits != 1)
    std::printf("FAIL AttentionPlan: %lld splits of %lld (busiest thread %lld positions, %lld with 11), batch of "
                "32: %lld splits\n", (long long)one.splits, (long long)one.split_len, (long long)busiest,
                (long long)busiest_fewest, (long long)batch.splits), ++failures;
}

// SpinBarrier, forward_layers' barrier: 3 threads through 4,000 waits, every thread seeing each other's write of a
// phase after the wait that ends it (the barrier orders plain memory), none running ahead into the next phase. On
// fewer than 3 CPUs it is the oversubscribed case, which must not spin long.
void check_spin_barrier() {
#if defined(_OPENMP)
  constexpr int kPhases = 2000;
  SpinBarrier barrier;
  std::vector<int> slots(3, -1);
  int wrong = 0;
#pragma omp parallel num_threads(3) reduction(+ : wrong)
  {
    const int tid = omp_get_thread_num(), threads = omp_get_num_threads();
    barrier.join(threads);
    for (int phase = 0; phase < kPhases; ++phase) {
      slots[tid] = phase;
      barrier.wait();
      for (int t = 0; t < threads; ++t) wrong += slots[t] != phase;
      barrier.wait();
    }
  }
  ++checks;
  if (wrong) std::printf("FAIL SpinBarrier: %d reads of a thread's write saw another phase\n", wrong), ++failures;
#endif
}

}  // namespace

int main() {
#if defined(PAGEDLLM_ISA_AMX)
  ++checks;
  if (!amx_permitted()) {  // the linears below would check the vector tiles instead
    std::printf("FAIL the OS refused AMX's tile state (arch_prctl ARCH_REQ_XCOMP_PERM)\n");
    ++failures;
  }
#endif
  check_bf16_rounding();
  check_exp();
  check_linears();
  check_norm_and_silu();
  check_sampling();
  check_argmax();
  check_attention_plan();
  check_spin_barrier();
  check_lora<float>();
  check_lora<bf16>();
  for (auto ctx : {std::vector<int32_t>{1}, std::vector<int32_t>{5, 16, 33}, std::vector<int32_t>{700},
                   std::vector<int32_t>{4000}}) {  // 4,000: 12 splits, each fetching ahead into the next
    check_attention<float>(6, 2, 32, 8, ctx);
    check_attention<bf16>(6, 2, 32, 8, ctx);
    check_attention<bf16>(9, 3, 64, 16, ctx);  // the register-resident split
    check_attention<bf16>(10, 2, 80, 16, ctx);  // the general one (group 5, head_dim 80)
    check_attention<float, int8_t>(6, 2, 32, 8, ctx);  // int8 caches: the general split
    check_attention<bf16, int8_t>(9, 3, 64, 16, ctx);  // and the register-resident one
  }
  std::vector<int32_t> chunk(37);  // a prefill chunk of 37 tokens after 60 cached positions: three query tiles
  for (int32_t i = 0; i < 37; ++i) chunk[i] = 61 + i;
  check_attention<float>(6, 2, 32, 8, chunk, true);
  check_attention<bf16>(9, 3, 64, 12, chunk, true);  // keys gathered into K^T
  check_attention<bf16>(9, 3, 64, 16, chunk, true);  // K^T read in place (amx: on AMX tiles)
  check_attention<bf16>(8, 2, 128, 32, chunk, true);  // two chunks a block (amx: spans across blocks)
  check_attention<bf16, int8_t>(9, 3, 64, 12, chunk, true);  // an int8 cache's chunks dequantized
  std::printf("kernels_selftest %s: %d of %d checks passed\n", kIsaName, checks - failures, checks);
  return failures ? 1 : 0;
}
