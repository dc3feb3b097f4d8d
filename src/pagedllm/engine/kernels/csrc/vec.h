// The vector layer under pagedllm's CPU kernels: one build per CPU tier, chosen by one macro
// (PAGEDLLM_ISA_AMX, _AVX512_BF16, _AVX512, _AVX2, _NEON_BF16, _NEON or _PORTABLE; cpu_isa.py passes it with the
// matching compiler flags). Kernels are written once against these few types and functions; only this file
// knows the intrinsics.
//
//   VecF     kLanes float32 lanes (16 on AVX-512, 8 on AVX2 and portable, 4 on NEON)
//   VecW     kLanes 32-bit words, each a pair of bfloat16 (element 2i in the low half, 2i+1 in the high)
//   PairX    the other side of a bf16 pair dot: broadcast from one pair, or a vector of pairs
//   dot2     acc + w.lo * x.lo + w.hi * x.hi, per lane: vdpbf16ps / bfdot where the CPU has a bf16 dot
//            product, else both halves widened to float32 (a shift and a mask) and two FMAs, as llama.cpp does.
//            Products of two bf16 are exact in float32 either way; only the order of the sums differs.
//   int8 KV codes meet queries and weights as int16 pairs in the same 32-bit words: load_code_pairs widens
//            2 * kLanes codes, madd_pairs multiplies pairs and adds them into int32 lanes (vpmaddwd or vpdpwssd,
//            exact); low_codes and high_codes are a vector of pairs' halves as float32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(PAGEDLLM_ISA_AMX)  // the avx512_bf16 tier's vectors, plus AMX tiles for many-row linears (kernels.h)
#define PAGEDLLM_ISA_AVX512_BF16 1
#endif

#if defined(PAGEDLLM_ISA_AVX512_BF16) || defined(PAGEDLLM_ISA_AVX512)
#define PAGEDLLM_X86_512 1
#include <immintrin.h>
#elif defined(PAGEDLLM_ISA_AVX2)
#include <immintrin.h>
#elif defined(PAGEDLLM_ISA_NEON_BF16) || defined(PAGEDLLM_ISA_NEON)
#define PAGEDLLM_ARM 1
#include <arm_neon.h>
#elif !defined(PAGEDLLM_ISA_PORTABLE)
#error "define one of PAGEDLLM_ISA_AMX, _AVX512_BF16, _AVX512, _AVX2, _NEON_BF16, _NEON, _PORTABLE"
#endif

namespace pagedllm {

using bf16 = uint16_t;  // bfloat16 bits, the layout of at::BFloat16

// Two int16 as one 32-bit word, lo in the low half: what madd_pairs multiplies pair by pair.
inline uint32_t int16_pair(int16_t lo, int16_t hi) { return uint32_t(uint16_t(lo)) | uint32_t(uint16_t(hi)) << 16; }

inline float bf16_to_float(bf16 b) {
  uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline bf16 float_to_bf16(float f) {  // round to nearest even, NaN kept quiet: what c10::BFloat16 does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return 0x7FC0;
  return bf16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// ---------------------------------------------------------------------------------------------------------
#if defined(PAGEDLLM_X86_512)
constexpr int kLanes = 16;
constexpr const char* kIsaName =
#if defined(PAGEDLLM_ISA_AMX)
    "amx";
#elif defined(PAGEDLLM_ISA_AVX512_BF16)
    "avx512_bf16";
#else
    "avx512";
#endif
using VecF = __m512;
using VecW = __m512i;

inline VecF zero() { return _mm512_setzero_ps(); }
inline VecF set1(float x) { return _mm512_set1_ps(x); }
inline VecF load(const float* p) { return _mm512_loadu_ps(p); }
inline VecF load(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline VecF load(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline void store(float* p, VecF a) { _mm512_storeu_ps(p, a); }
inline __m256i to_bf16_bits(__m512 v) {
#if defined(PAGEDLLM_ISA_AVX512_BF16)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  __m512i b = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}
inline void store(bf16* p, VecF a) { _mm256_storeu_si256((__m256i*)p, to_bf16_bits(a)); }
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }
// Loads of the first n lanes (the rest zero) and stores of the first n: masked, no copies.
inline VecF load_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
inline VecF load_n(const bf16* p, int64_t n) {
  __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store_n(float* p, VecF a, int64_t n) { _mm512_mask_storeu_ps(p, tail_mask(n), a); }
inline void store_n(bf16* p, VecF a, int64_t n) { _mm256_mask_storeu_epi16(p, tail_mask(n), to_bf16_bits(a)); }

inline VecF add(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF sub(VecF a, VecF b) { return _mm512_sub_ps(a, b); }
inline VecF mul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF div(VecF a, VecF b) { return _mm512_div_ps(a, b); }
inline VecF max(VecF a, VecF b) { return _mm512_max_ps(a, b); }
inline VecF min(VecF a, VecF b) { return _mm512_min_ps(a, b); }
inline VecF fma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline float reduce_add(VecF a) { return _mm512_reduce_add_ps(a); }
inline float reduce_max(VecF a) { return _mm512_reduce_max_ps(a); }
inline VecF round_nearest(VecF a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VecF scale_by_pow2(VecF a, VecF n) { return _mm512_scalef_ps(a, n); }  // a * 2^n, n integral

inline VecW load_words(const void* p) { return _mm512_loadu_si512(p); }
inline VecW load_words_n(const bf16* p, int64_t n_bf16) {  // n_bf16 halves, the rest zero
  return _mm512_maskz_loadu_epi16(n_bf16 >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << n_bf16) - 1), p);
}
inline VecF low_halves(VecW w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
inline VecF high_halves(VecW w) { return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(-65536))); }
inline VecW broadcast_word(uint32_t w) { return _mm512_set1_epi32(int(w)); }

inline VecW load_code_pairs(const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
inline VecW load_code_pairs_n(const int8_t* p, int64_t n) {  // the first n codes, the rest zero
  return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(n >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << std::max<int64_t>(n, 0)) - 1), p));
}
#if defined(__AVX512VNNI__)
// One instruction, 5 cycles from acc to acc: a sum over many pairs runs in kMaddChains chains of it.
inline VecW madd_pairs(VecW acc, VecW a, VecW b) { return _mm512_dpwssd_epi32(acc, a, b); }
#define PAGEDLLM_FUSED_MADD 1
#else
inline VecW madd_pairs(VecW acc, VecW a, VecW b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
#endif
inline VecF int_to_float(VecW a) { return _mm512_cvtepi32_ps(a); }
inline VecW add_words(VecW a, VecW b) { return _mm512_add_epi32(a, b); }
inline VecF low_codes(VecW w) { return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 16), 16)); }
inline VecF high_codes(VecW w) { return _mm512_cvtepi32_ps(_mm512_srai_epi32(w, 16)); }
inline void store_int16(int16_t* p, VecF a) {  // rounded to nearest; |a| <= 32767
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(a)));
}

// ---------------------------------------------------------------------------------------------------------
#elif defined(PAGEDLLM_ISA_AVX2)
constexpr int kLanes = 8;
constexpr const char* kIsaName = "avx2";
using VecF = __m256;
using VecW = __m256i;

inline VecF zero() { return _mm256_setzero_ps(); }
inline VecF set1(float x) { return _mm256_set1_ps(x); }
inline VecF load(const float* p) { return _mm256_loadu_ps(p); }
inline VecF load(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline VecF load(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
inline void store(float* p, VecF a) { _mm256_storeu_ps(p, a); }
inline void store(bf16* p, VecF a) {
  __m256i b = _mm256_castps_si256(a);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // lanes 0-3, 4-7 of each half
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}

inline VecF add(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF sub(VecF a, VecF b) { return _mm256_sub_ps(a, b); }
inline VecF mul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF div(VecF a, VecF b) { return _mm256_div_ps(a, b); }
inline VecF max(VecF a, VecF b) { return _mm256_max_ps(a, b); }
inline VecF min(VecF a, VecF b) { return _mm256_min_ps(a, b); }
inline VecF fma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline float reduce_add(VecF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_max(VecF a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline VecF round_nearest(VecF a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VecF scale_by_pow2(VecF a, VecF n) {  // n in [-126, 127]: the exponent built directly
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
}

inline VecW load_words(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline VecF low_halves(VecW w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
// Two shifts rather than an AND: a mask would hold one of the 16 registers, and the 6-row strip tiles need all
// of them (with it, GCC spilled four accumulators a step).
inline VecF high_halves(VecW w) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(w, 16), 16)); }
inline VecW broadcast_word(uint32_t w) { return _mm256_set1_epi32(int(w)); }

inline VecW load_code_pairs(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
inline VecW madd_pairs(VecW acc, VecW a, VecW b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
inline VecF int_to_float(VecW a) { return _mm256_cvtepi32_ps(a); }
inline VecW add_words(VecW a, VecW b) { return _mm256_add_epi32(a, b); }
inline VecF low_codes(VecW w) { return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, 16), 16)); }
inline VecF high_codes(VecW w) { return _mm256_cvtepi32_ps(_mm256_srai_epi32(w, 16)); }
inline void store_int16(int16_t* p, VecF a) {
  const __m256i i = _mm256_cvtps_epi32(a);
  _mm_storeu_si128((__m128i*)p, _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
}

// ---------------------------------------------------------------------------------------------------------
#elif defined(PAGEDLLM_ARM)
constexpr int kLanes = 4;
constexpr const char* kIsaName =
#if defined(PAGEDLLM_ISA_NEON_BF16)
    "neon_bf16";
#else
    "neon";
#endif
using VecF = float32x4_t;
using VecW = uint32x4_t;

inline VecF zero() { return vdupq_n_f32(0.f); }
inline VecF set1(float x) { return vdupq_n_f32(x); }
inline VecF load(const float* p) { return vld1q_f32(p); }
inline VecF load(const bf16* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
inline VecF load(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  int16x8_t wide = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide)));
}
inline void store(float* p, VecF a) { vst1q_f32(p, a); }
inline void store(bf16* p, VecF a) {
  uint32x4_t b = vreinterpretq_u32_f32(a);
  uint32x4_t lsb = vandq_u32(vshrq_n_u32(b, 16), vdupq_n_u32(1));
  uint32x4_t r = vshrq_n_u32(vaddq_u32(b, vaddq_u32(lsb, vdupq_n_u32(0x7FFF))), 16);
  r = vbslq_u32(vceqq_f32(a, a), r, vdupq_n_u32(0x7FC0));  // NaN compares unequal to itself
  vst1_u16(p, vmovn_u32(r));
}

inline VecF add(VecF a, VecF b) { return vaddq_f32(a, b); }
inline VecF sub(VecF a, VecF b) { return vsubq_f32(a, b); }
inline VecF mul(VecF a, VecF b) { return vmulq_f32(a, b); }
inline VecF div(VecF a, VecF b) { return vdivq_f32(a, b); }
inline VecF max(VecF a, VecF b) { return vmaxq_f32(a, b); }
inline VecF min(VecF a, VecF b) { return vminq_f32(a, b); }
inline VecF fma(VecF a, VecF b, VecF c) { return vfmaq_f32(c, a, b); }
inline float reduce_add(VecF a) { return vaddvq_f32(a); }
inline float reduce_max(VecF a) { return vmaxvq_f32(a); }
inline VecF round_nearest(VecF a) { return vrndnq_f32(a); }
inline VecF scale_by_pow2(VecF a, VecF n) {
  int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(a, vreinterpretq_f32_s32(e));
}

inline VecW load_words(const void* p) { return vld1q_u32((const uint32_t*)p); }
inline VecF low_halves(VecW w) { return vreinterpretq_f32_u32(vshlq_n_u32(w, 16)); }
inline VecF high_halves(VecW w) { return vreinterpretq_f32_u32(vandq_u32(w, vdupq_n_u32(0xFFFF0000u))); }
inline VecW broadcast_word(uint32_t w) { return vdupq_n_u32(w); }

inline VecW load_code_pairs(const int8_t* p) { return vreinterpretq_u32_s16(vmovl_s8(vld1_s8(p))); }
inline VecW madd_pairs(VecW acc, VecW a, VecW b) {
  const int16x8_t x = vreinterpretq_s16_u32(a), y = vreinterpretq_s16_u32(b);
  const int32x4_t lo = vmull_s16(vget_low_s16(x), vget_low_s16(y)), hi = vmull_high_s16(x, y);
  return vreinterpretq_u32_s32(vaddq_s32(vreinterpretq_s32_u32(acc), vpaddq_s32(lo, hi)));
}
inline VecF int_to_float(VecW a) { return vcvtq_f32_s32(vreinterpretq_s32_u32(a)); }
inline VecW add_words(VecW a, VecW b) { return vaddq_u32(a, b); }
inline VecF low_codes(VecW w) { return vcvtq_f32_s32(vshrq_n_s32(vshlq_n_s32(vreinterpretq_s32_u32(w), 16), 16)); }
inline VecF high_codes(VecW w) { return vcvtq_f32_s32(vshrq_n_s32(vreinterpretq_s32_u32(w), 16)); }
inline void store_int16(int16_t* p, VecF a) { vst1_s16(p, vmovn_s32(vcvtnq_s32_f32(a))); }

// ---------------------------------------------------------------------------------------------------------
#else  // portable: GCC/Clang vector types and plain loops, no intrinsics; the compiler vectorizes what it can
// Four lanes, 16 bytes: the vector width every target has (SSE2, NEON). Eight-lane vectors on an x86 target
// without AVX go through memory at every call (GCC's -Wpsabi): 64-row decode and a 512-token prompt ran 10x
// slower (19 against 198 and 185 tok/s, SmolLM2 on 2 threads of a Zen 4).
constexpr int kLanes = 4;
constexpr const char* kIsaName = "portable";
typedef float VecF __attribute__((vector_size(4 * kLanes)));
typedef uint32_t VecW __attribute__((vector_size(4 * kLanes)));

#define PAGEDLLM_LANES(expr) for (int i = 0; i < kLanes; ++i) expr
inline VecF zero() { return VecF{} ; }
inline VecF set1(float x) { return VecF{} + x; }
inline VecF load(const float* p) { VecF r; std::memcpy(&r, p, sizeof r); return r; }
inline VecF load(const bf16* p) { VecF r; PAGEDLLM_LANES(r[i] = bf16_to_float(p[i])); return r; }
inline VecF load(const int8_t* p) { VecF r; PAGEDLLM_LANES(r[i] = float(p[i])); return r; }
inline void store(float* p, VecF a) { std::memcpy(p, &a, sizeof a); }
inline void store(bf16* p, VecF a) { PAGEDLLM_LANES(p[i] = float_to_bf16(a[i])); }
inline VecF add(VecF a, VecF b) { return a + b; }
inline VecF sub(VecF a, VecF b) { return a - b; }
inline VecF mul(VecF a, VecF b) { return a * b; }
inline VecF div(VecF a, VecF b) { return a / b; }
inline VecF max(VecF a, VecF b) { PAGEDLLM_LANES(a[i] = a[i] > b[i] ? a[i] : b[i]); return a; }
inline VecF min(VecF a, VecF b) { PAGEDLLM_LANES(a[i] = a[i] < b[i] ? a[i] : b[i]); return a; }
inline VecF fma(VecF a, VecF b, VecF c) { return a * b + c; }  // fused where the target has FMA
inline float reduce_add(VecF a) { float s = 0.f; PAGEDLLM_LANES(s += a[i]); return s; }
inline float reduce_max(VecF a) { float s = a[0]; PAGEDLLM_LANES(s = a[i] > s ? a[i] : s); return s; }
inline VecF round_nearest(VecF a) { PAGEDLLM_LANES(a[i] = std::nearbyint(a[i])); return a; }
inline VecF scale_by_pow2(VecF a, VecF n) { PAGEDLLM_LANES(a[i] = std::ldexp(a[i], int(n[i]))); return a; }

inline VecW load_words(const void* p) { VecW r; std::memcpy(&r, p, sizeof r); return r; }
inline VecF low_halves(VecW w) { VecW b = w << 16; VecF r; std::memcpy(&r, &b, sizeof r); return r; }
inline VecF high_halves(VecW w) { VecW b = w & 0xFFFF0000u; VecF r; std::memcpy(&r, &b, sizeof r); return r; }
inline VecW broadcast_word(uint32_t w) { return VecW{} + w; }

inline VecW load_code_pairs(const int8_t* p) { VecW r; PAGEDLLM_LANES(r[i] = int16_pair(p[2 * i], p[2 * i + 1])); return r; }
inline VecW madd_pairs(VecW acc, VecW a, VecW b) {  // in uint32: wraps as int32 lanes do
  PAGEDLLM_LANES(acc[i] += uint32_t(int32_t(int16_t(a[i] & 0xFFFF)) * int16_t(b[i] & 0xFFFF) +
                                    int32_t(int16_t(a[i] >> 16)) * int16_t(b[i] >> 16)));
  return acc;
}
inline VecF int_to_float(VecW a) { VecF r; PAGEDLLM_LANES(r[i] = float(int32_t(a[i]))); return r; }
inline VecW add_words(VecW a, VecW b) { return a + b; }
inline VecF low_codes(VecW w) { VecF r; PAGEDLLM_LANES(r[i] = float(int16_t(w[i] & 0xFFFF))); return r; }
inline VecF high_codes(VecW w) { VecF r; PAGEDLLM_LANES(r[i] = float(int16_t(w[i] >> 16))); return r; }
inline void store_int16(int16_t* p, VecF a) { PAGEDLLM_LANES(p[i] = int16_t(std::nearbyint(a[i]))); }
#undef PAGEDLLM_LANES
#endif

// ---- what every tier shares --------------------------------------------------------------------------------
#if defined(PAGEDLLM_FUSED_MADD)
constexpr int kMaddChains = 4;
#else
constexpr int kMaddChains = 1;  // the chain runs through a 1-cycle add
#endif

#if !defined(PAGEDLLM_X86_512)
// Partial loads and stores through a small buffer: only at the ends of rows whose length is not a multiple
// of kLanes (AVX-512 masks them instead).
template <typename T>
inline VecF load_n(const T* p, int64_t n) {
  if (n >= kLanes) return load(p);
  T buf[kLanes] = {};
  std::memcpy(buf, p, n * sizeof(T));
  return load(buf);
}
template <typename T>
inline void store_n(T* p, VecF a, int64_t n) {
  if (n >= kLanes) return store(p, a);
  T buf[kLanes];
  store(buf, a);
  std::memcpy(p, buf, n * sizeof(T));
}
inline VecW load_words_n(const bf16* p, int64_t n_bf16) {
  if (n_bf16 >= 2 * kLanes) return load_words(p);
  bf16 buf[2 * kLanes] = {};
  std::memcpy(buf, p, n_bf16 * sizeof(bf16));
  return load_words(buf);
}
inline VecW load_code_pairs_n(const int8_t* p, int64_t n) {
  if (n >= 2 * kLanes) return load_code_pairs(p);
  int8_t buf[2 * kLanes] = {};
  if (n > 0) std::memcpy(buf, p, n);
  return load_code_pairs(buf);
}
#endif

template <typename T>
inline VecF round_like(VecF v) { return v; }  // v as an op in T would leave it: unchanged for float32
template <>
inline VecF round_like<bf16>(VecF v) {
  bf16 tmp[kLanes];
  store(tmp, v);
  return load(tmp);
}

// out[t] = the sum of v[t]'s lanes, for 16 vectors (a chunk of attention scores). AVX-512 adds them as a tree of
// shuffles, 46 instructions where 16 reductions take about 130 (each a scalar result to store).
#if defined(PAGEDLLM_X86_512)
inline void reduce_add_16(const VecF* v, float* out) {
  VecF a[8], b[4];
  for (int i = 0; i < 8; ++i)  // 128-bit lanes: v[2i]'s two half sums, then v[2i+1]'s
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // 128-bit lane j: four partial sums of v[4i + j]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  const VecF c0 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
  const VecF c1 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
  const VecF d = _mm512_add_ps(_mm512_shuffle_ps(c0, c1, _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_ps(c0, c1, _MM_SHUFFLE(3, 2, 3, 2)));
  // lane 4j + i holds v[4i + j]'s sum
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(out, _mm512_permutexvar_ps(order, d));
}
#else
inline void reduce_add_16(const VecF* v, float* out) {
  for (int t = 0; t < 16; ++t) out[t] = reduce_add(v[t]);
}
#endif

// Two vectors of floats with at most 8 significant bits (int8 codes) as bf16 pairs, lo's in the low halves:
// exact by truncation.
inline VecW bf16_pairs(VecF lo, VecF hi) {
  uint32_t l[kLanes], h[kLanes], w[kLanes];
  std::memcpy(l, &lo, sizeof l), std::memcpy(h, &hi, sizeof h);
  for (int i = 0; i < kLanes; ++i) w[i] = (l[i] >> 16) | (h[i] & 0xFFFF0000u);
  return load_words(w);
}
inline void store_words(uint32_t* p, VecW w) { std::memcpy(p, &w, sizeof w); }

// The x side of dot2 is bf16 pairs too: broadcast from one pair (a linear's input), or a vector of pairs (a
// query against keys).
using PairX = VecW;
inline PairX pair_of(VecW w) { return w; }
inline PairX broadcast_pair(uint32_t w) { return broadcast_word(w); }
#if defined(PAGEDLLM_ISA_AVX512_BF16)
constexpr bool kHasBf16Dot = true;
inline VecF dot2(VecF acc, VecW w, PairX x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
#elif defined(PAGEDLLM_ISA_NEON_BF16)
constexpr bool kHasBf16Dot = true;
inline VecF dot2(VecF acc, VecW w, PairX x) {
  return vbfdotq_f32(acc, vreinterpretq_bf16_u32(w), vreinterpretq_bf16_u32(x));
}
#else
constexpr bool kHasBf16Dot = false;
inline VecF dot2(VecF acc, VecW w, PairX x) {
  return fma(high_halves(w), high_halves(x), fma(low_halves(w), low_halves(x), acc));
}
#endif

// exp for the softmax and SiLU: 2^n * e^r with |r| <= ln2/2 and a degree-6 polynomial (< 2 ulp).
inline VecF exp(VecF x) {
  x = min(max(x, set1(-87.0f)), set1(88.0f));  // 2^n stays a normal float
  VecF n = round_nearest(mul(x, set1(1.44269504f)));
  VecF r = fma(n, set1(-0.693145751953125f), x);
  r = fma(n, set1(-1.428606765330187e-06f), r);
  VecF p = set1(1.0f / 720);
  p = fma(p, r, set1(1.0f / 120));
  p = fma(p, r, set1(1.0f / 24));
  p = fma(p, r, set1(1.0f / 6));
  p = fma(p, r, set1(0.5f));
  p = fma(p, r, set1(1.0f));
  p = fma(p, r, set1(1.0f));
  return scale_by_pow2(p, n);
}

}  // namespace pagedllm
