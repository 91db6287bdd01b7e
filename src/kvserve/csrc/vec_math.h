// Small shared helpers for kvserve's C++ kernels: bf16 and fp8 e4m3 <-> fp32 and an 8-wide exp.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVSERVE_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KVSERVE_AVX512 1
#endif
#if defined(KVSERVE_AVX512) && defined(__AVX512BF16__)
#define KVSERVE_AVX512_BF16 1  // vdpbf16ps: bf16 pair products accumulated into fp32, 32 per instruction
#endif
#if defined(KVSERVE_AVX512) && defined(__AVX512VNNI__)
#define KVSERVE_AVX512_VNNI 1  // vpdpbusd: u8 x s8 products, 4 per int32 lane, accumulated (quant_linear.cpp)
#endif

// The widest of the paths above that this library was compiled with (the kernel plan reports it).
// Defined here, not only declared: every kernel library is one translation unit that includes this once.
extern "C" const char* kvserve_isa() {
#if defined(KVSERVE_AVX512_BF16)
  return "avx512_bf16";
#elif defined(KVSERVE_AVX512)
  return "avx512";
#elif defined(KVSERVE_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

namespace kvserve {

struct bf16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_float(_Float16 x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }

// fp8 e4m3 as torch.float8_e4m3fn (OCP "E4M3"): 1 sign, 4 exponent (bias 7) and 3 mantissa bits,
// subnormals below 2^-6, no infinities, 0x7f and 0xff are NaN, the largest finite value is 448.
struct fp8_e4m3 {
  uint8_t bits;
};

// The 256 values of fp8_e4m3, built at compile time (exact: powers of two times 3-bit integers).
constexpr std::array<float, 256> fp8_e4m3_values() {
  std::array<float, 256> table{};
  for (int b = 0; b < 256; ++b) {
    const int exponent = (b >> 3) & 15, mantissa = b & 7;
    float value = 0.f;
    if (exponent == 15 && mantissa == 7) {
      value = std::numeric_limits<float>::quiet_NaN();
    } else {
      value = exponent == 0 ? mantissa : 8 + mantissa;  // times 2^-9, and 2^(exponent - 1) more for normals
      for (int e = 1; e < exponent; ++e) value *= 2.f;
      for (int e = 0; e < 9; ++e) value *= 0.5f;
    }
    table[b] = b & 0x80 ? -value : value;
  }
  return table;
}
inline constexpr std::array<float, 256> kFp8E4m3Values = fp8_e4m3_values();

inline float to_float(fp8_e4m3 x) { return kFp8E4m3Values[x.bits]; }

// x as fp8 e4m3, rounded to nearest even; |x| >= 448 (and infinities) saturate to +-448, NaN stays NaN.
inline fp8_e4m3 fp8_e4m3_from_float(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  u &= 0x7fffffff;
  if (u > 0x7f800000) return fp8_e4m3{static_cast<uint8_t>(sign | 0x7f)};  // NaN
  if (u >= 0x43e00000) return fp8_e4m3{static_cast<uint8_t>(sign | 0x7e)};  // 448 and beyond
  if (u < 0x3c800000) {
    // below 2^-6 (the smallest normal) the values are multiples of 2^-9: adding 2^14, whose fp32 ulp is
    // 2^-9, lets the FPU round |x| to one (to nearest even); the low bits are then that multiple, and a
    // carry to 8 is 2^-6 itself, the encoding of the smallest normal
    float magnitude;
    std::memcpy(&magnitude, &u, sizeof(u));
    const float rounded = magnitude + 16384.f;
    uint32_t r;
    std::memcpy(&r, &rounded, sizeof(r));
    return fp8_e4m3{static_cast<uint8_t>(sign | (r - 0x46800000u))};  // 0x46800000: 2^14
  }
  // normal: keep 3 of the 23 mantissa bits, to nearest even (a carry moves into the exponent), and rebias
  // the exponent from 127 to 7
  u += 0x7ffff + ((u >> 20) & 1);
  return fp8_e4m3{static_cast<uint8_t>(sign | ((u >> 20) - ((127 - 7) << 3)))};
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline bf16 from_float<bf16>(float x) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffff) > 0x7f800000) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fff + ((u >> 16) & 1);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
template <>
inline _Float16 from_float<_Float16>(float x) { return static_cast<_Float16>(x); }

// The value an op computed in T would have: rounds to bf16/fp16, leaves fp32 alone.
template <typename T>
inline float round_to(float x) { return to_float(from_float<T>(x)); }

// exp(x) = 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, p a degree-6 polynomial (Cephes expf),
// about 1 ulp; 0 below -87.3 (so exp(-inf) = 0), +inf above 88.7. exp8 and exp16 evaluate it
// 8 and 16 wide.
namespace expf_poly {
constexpr float hi = 88.7228f, lo = -87.3365f, log2e = 1.44269504088896341f;
constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;  // ln 2 in two parts: n * ln2_hi is exact
constexpr float c[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                        4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace expf_poly

#ifdef KVSERVE_AVX2
inline __m256 exp8(__m256 x) {
  namespace e = expf_poly;
  const __m256 hi = _mm256_set1_ps(e::hi), lo = _mm256_set1_ps(e::lo);
  const __m256 overflow = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(e::log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(e::ln2_hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(e::ln2_lo), r);
  __m256 p = _mm256_set1_ps(e::c[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(e::c[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n by building the exponent bits; n in [-126, 128] after the clamp, split so 2^n never overflows
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  __m256 result = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  result = _mm256_blendv_ps(result, _mm256_set1_ps(INFINITY), overflow);
  return _mm256_blendv_ps(result, _mm256_setzero_ps(), underflow);
}

#ifdef KVSERVE_AVX512
inline __m512 exp16(__m512 x) {
  namespace e = expf_poly;
  const __m512 hi = _mm512_set1_ps(e::hi), lo = _mm512_set1_ps(e::lo);
  const __mmask16 overflow = _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(e::log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(e::ln2_hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(e::ln2_lo), r);
  __m512 p = _mm512_set1_ps(e::c[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(e::c[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  // p * 2^n in two halves of n (n is up to 128 after the clamp: 2^128 alone would overflow)
  const __m512 half = _mm512_roundscale_ps(_mm512_mul_ps(n, _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 result = _mm512_scalef_ps(_mm512_scalef_ps(p, half), _mm512_sub_ps(n, half));
  result = _mm512_mask_blend_ps(overflow, result, _mm512_set1_ps(INFINITY));
  return _mm512_mask_blend_ps(underflow, result, _mm512_setzero_ps());
}

// exp(x) for x <= 0 only (softmax's shifted scores; -inf gives 0): exp16's reduction and polynomial,
// with n rounded by adding 1.5 * 2^23 and 2^n added straight into the exponent bits, since n is in
// [-126, 0] after the clamp. No overflow side and no scalef/roundscale: ~16 instructions, not ~26.
inline __m512 exp16_nonpositive(__m512 x) {
  namespace e = expf_poly;
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(e::lo), _CMP_GE_OQ);  // below lo: 0
  x = _mm512_max_ps(x, _mm512_set1_ps(e::lo));
  const __m512 shifter = _mm512_set1_ps(12582912.f);  // 1.5 * 2^23: the sum's low bits hold round(x log2 e)
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(e::log2e), shifter);
  const __m512 n = _mm512_sub_ps(t, shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(e::ln2_hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(e::ln2_lo), r);
  __m512 p = _mm512_set1_ps(e::c[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(e::c[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i exponent = _mm512_slli_epi32(_mm512_castps_si512(t), 23);  // n << 23 (two's complement)
  return _mm512_castsi512_ps(_mm512_maskz_add_epi32(keep, _mm512_castps_si512(p), exponent));
}

// v rounded to bf16 precision (to nearest even), kept as fp32: what storing v in a bf16 tensor keeps.
// No NaN case (a hot path; paged_attention.cpp's bf16_bits keeps NaNs where it must match from_float).
inline __m512 round_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// silu(gate) * up as a bf16 model computes it: silu rounded to bf16, the product rounded again.
inline __m512 silu_mul_bf16(__m512 gate, __m512 up) {
  const __m512 silu = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate))));
  return round_bf16(_mm512_mul_ps(round_bf16(silu), up));
}

// The mask of the first n of 16 lanes (n clamped to [0, 16]).
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << n) - 1);
}

// Transposes the 16 x 16 matrix whose rows are r[0..16) in place: r[i] lane j <- r[j] lane i.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: pairs of rows interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: 4 rows' values of one column; r[4i + b] holds column 4L + b
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {  // 128-bit lanes of rows 0-3 with 4-7, and of 8-11 with 12-15
    t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);
    t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xdd);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
  for (int j = 0; j < 8; ++j) {  // and those halves together: r[c] = column c
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

// 16 values of a bf16 / fp16 / fp32 row as fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const bf16* p, __mmask16 m) {  // lanes outside m are 0
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 load16(const _Float16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// Lane i of the result = the sum of the 16 lanes of v[i]: a transpose-and-add in four rounds
// (45 shuffles and adds for 16 sums, against ~120 for 16 separate reductions).
inline __m512 hsum16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: (v2i_0+v2i_2, v2i+1_0+.., v2i_1+v2i_3, ..)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per chunk: the chunk's sums of rows 4i..4i+3
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xee));
  for (int i = 0; i < 2; ++i)  // chunks (rows 8i..8i+3 half-summed, 8i+4..8i+7 half-summed)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}

#endif

#ifdef KVSERVE_AVX512_BF16
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }  // a bit cast
#endif

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

}  // namespace kvserve
