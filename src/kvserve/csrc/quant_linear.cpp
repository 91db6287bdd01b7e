// Linear products on GGUF-quantized weights kept in their packed blocks, and their dequantization.
//
// Method, chosen by measurement: llama.cpp's. Each call quantizes every activation row once into
// int8 blocks of 32 with an fp32 scale per block, then multiplies 8-bit weight integers by 8-bit
// activation integers exactly in int32 (vpdpbusd on AVX-512 VNNI, vpmaddubsw + vpmaddwd on AVX2),
// scaled per block in fp32. The alternative, widening the weights to fp32 for FMAs against fp32
// activations (same decoders and row streaming; for 2+ rows, 4 weight rows dequantized into L1 and
// 4 x 4 FMA tiles), was slower everywhere in a C++ harness that interleaved the two (one core of a
// Zen 4 EPYC, SmolLM2-135M's shapes, weights streamed from memory, best of 5 x 4-64 calls):
//   rows                          1            4            16           32
//   Q4_1 (576..49152 x 576/1536)  2.2-2.4x     2.2-2.5x     2.5-2.8x     2.3-3.0x slower
//   Q8_0                          1.4-1.9x     1.8-2.5x     2.2-2.5x     2.6-2.8x slower
// (lm_head 49152 x 576 at 1 row: Q4_1 0.92 vs 2.21 ms, Q8_0 1.25 vs 1.93 ms). vpdpbusd does 64
// multiply-adds per instruction where an fp32 FMA does 16, and decoding nibbles to bytes takes fewer
// instructions than decoding them to fp32. The activation rounding is the only approximation:
// |error| <= sum_k |w_k| d_x(k) / 2 with d_x = max|x_block| / 127 (tests/test_quant_kernels.py
// checks it; activations that are exactly int8 times their block scale give fp32-rounding results).
//
// Threads split the output rows into chunks of 64-256 KB of packed weights, two per thread, taken
// dynamically, so that a thread sharing its core with another process takes fewer. On the VNNI
// path 1-4 x rows (1-6 for Q8_0/Q6_K) stream each weight row once through `gemv`; more rows go
// through 16-row panels (`build_panel`, `panel_tile`); the AVX2 and portable paths decode 4 weight
// rows into L1 and walk every x row over them.
//
// Formats (GGML type ids; rows of K / block_weights blocks stored row after row):
//   Q4_0 (2)  32 weights in 18 bytes: fp16 d, 16 bytes of nibbles; w = d (q - 8)
//   Q4_1 (3)  32 weights in 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles; w = d q + m
//   Q5_0 (6)  32 weights in 22 bytes: fp16 d, 4 bytes qh, 16 bytes of nibbles; w = d (q - 16), with
//             bit j of qh (little-endian uint32) the fifth bit of weight j
//   Q5_1 (7)  32 weights in 24 bytes: fp16 d, fp16 m, 4 bytes qh, 16 bytes of nibbles; w = d q + m
//   Q8_0 (8)  32 weights in 34 bytes: fp16 d, 32 int8; w = d q
//   Q4_K (12) 256 weights in 144 bytes: fp16 d, dmin, 8 x 6-bit (scale, min), 4-bit q; w = d sc q - dmin mn
//   Q5_K (13) 256 weights in 176 bytes: as Q4_K with a fifth bit per weight
//   Q6_K (14) 256 weights in 210 bytes: 6-bit q, 16 int8 scales, fp16 d; w = d sc (q - 32)
// (byte layouts: gguf.quants in the gguf package, or ggml-quants.c.) Everything below works on blocks
// of 32 weights -- a K-quant's sub-block -- decoded to w_j = s[j / 16] * q_j + t with q_j an 8-bit
// integer: unsigned (0..31) with the offset t for Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K, signed with t = 0 for
// Q8_0/Q6_K. In the 32-weight nibble formats byte j of the 16 holds weight j (low) and j + 16 (high).
//
// Plain C ABI (ctypes); AVX-512 VNNI, AVX2 and portable paths chosen at compile time (vec_math.h).
// It is also #included into other translation units (llama_layer.cpp), so everything internal lives
// in an anonymous namespace under `quant`, and the file has an include guard.

#ifndef KVSERVE_QUANT_LINEAR_CPP
#define KVSERVE_QUANT_LINEAR_CPP

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {
namespace quant {

using kvserve::bf16;
using kvserve::from_float;
using kvserve::to_float;

constexpr int Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14;
constexpr int64_t QK = 32;  // weights per block as this file handles them (a K-quant's sub-block)

struct FormatInfo {
  int64_t block_weights, block_bytes;
  bool is_signed;  // q is int8 (Q8_0, Q6_K) rather than unsigned with an offset
};
constexpr FormatInfo info(int format) {
  switch (format) {
    case Q4_0: return {32, 18, false};
    case Q4_1: return {32, 20, false};
    case Q5_0: return {32, 22, false};
    case Q5_1: return {32, 24, false};
    case Q8_0: return {32, 34, true};
    case Q4_K: return {256, 144, false};
    case Q5_K: return {256, 176, false};
    case Q6_K: return {256, 210, true};
    default: return {0, 0, false};
  }
}

// llama.cpp's "legacy" formats: one block of 32 weights, starting with fp16 d (then fp16 m for Q4_1 and
// Q5_1, then Q5_0 / Q5_1's 4 bytes of fifth bits qh), then the nibbles (Q8_0: int8 q).
constexpr bool is_legacy(int f) { return f == Q4_0 || f == Q4_1 || f == Q5_0 || f == Q5_1 || f == Q8_0; }
constexpr bool has_nibbles(int f) { return f == Q4_0 || f == Q4_1 || f == Q5_0 || f == Q5_1; }
constexpr bool has_fifth_bits(int f) { return f == Q5_0 || f == Q5_1; }
constexpr bool has_min(int f) { return f == Q4_1 || f == Q5_1; }  // w = d q + m
constexpr int64_t qh_offset(int f) { return has_min(f) ? 4 : 2; }
constexpr int64_t qs_offset(int f) { return qh_offset(f) + (has_fifth_bits(f) ? 4 : 0); }
// Q4_0 / Q5_0: w = d (q - zero_point), so t = -zero_point * d
constexpr float zero_point(int f) { return f == Q4_0 ? 8.f : f == Q5_0 ? 16.f : 0.f; }

// A grow-only per-thread buffer of at least n elements, 64-byte aligned.
template <typename T>
T* scratch(std::vector<T>& buf, int64_t n) {
  const int64_t pad = 64 / sizeof(T);
  if (static_cast<int64_t>(buf.size()) < n + pad) buf.resize(n + pad);
  return buf.data() + (pad - reinterpret_cast<uintptr_t>(buf.data()) / sizeof(T) % pad) % pad;
}

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef KVSERVE_AVX2
  return _cvtsh_ss(h);  // F16C, present on every AVX2 + FMA CPU
#else
  _Float16 f;
  std::memcpy(&f, &h, 2);
  return static_cast<float>(f);
#endif
}

// Q5_0 / Q5_1: the block's fifth bits, bit j for weight j.
template <int F>
inline uint32_t fifth_bits(const uint8_t* block) {
  uint32_t qh;
  std::memcpy(&qh, block + qh_offset(F), 4);  // little-endian, as x86 reads it
  return qh;
}

// q[j] |= 16 where bit j of qh is set: Q5_0 / Q5_1's fifth bits merged into the decoded nibbles (these
// overloads are the one place each path does it).
inline void merge_fifth_bits(uint8_t* q, uint32_t qh) {
  for (int j = 0; j < 32; ++j) q[j] |= ((qh >> j) & 1) << 4;
}

// Sub-block j's 6-bit scale and min of a Q4_K / Q5_K super-block (get_scale_min_k4 in ggml-quants.c).
inline void k_scale_min(const uint8_t* sc, int64_t j, int& scale, int& min) {
  if (j < 4) {
    scale = sc[j] & 63;
    min = sc[j + 4] & 63;
  } else {
    scale = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4);
    min = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
  }
}

// Block b's scales and offset: s[0] for weights 0..15, s[1] for 16..31, t added to each weight. The
// products below are exact in fp32 (an fp16 scale times an integer of at most 8 bits; a K-quant's
// d * sc, then times q, at most 22 bits), so however the compiler contracts s * q + t into an FMA,
// the value is rounded once, as gguf.quants.dequantize's is.
template <int F>
inline void block_scales(const uint8_t* row, int64_t b, float s[2], float& t) {
  constexpr FormatInfo fi = info(F);
  if constexpr (is_legacy(F)) {
    const uint8_t* base = row + b * fi.block_bytes;
    s[0] = s[1] = fp16(base);
    t = has_min(F) ? fp16(base + 2) : -zero_point(F) * s[0];
  } else if constexpr (F == Q4_K || F == Q5_K) {
    const uint8_t* base = row + b / 8 * fi.block_bytes;
    int scale, min;
    k_scale_min(base + 4, b % 8, scale, min);
    s[0] = s[1] = fp16(base) * static_cast<float>(scale);
    t = -(fp16(base + 2) * static_cast<float>(min));
  } else {  // Q6_K: one int8 scale per 16 weights
    const uint8_t* base = row + b / 8 * fi.block_bytes;
    const float d = fp16(base + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(base + 192) + 2 * (b % 8);
    s[0] = d * static_cast<float>(sc[0]);
    s[1] = d * static_cast<float>(sc[1]);
    t = 0.f;
  }
}

// Block b's 32 integers q (uint8, or int8 stored as uint8 for the signed formats), portable code.
template <int F>
inline void block_q(const uint8_t* row, int64_t b, uint8_t* q) {
  constexpr FormatInfo fi = info(F);
  if constexpr (has_nibbles(F)) {
    const uint8_t* block = row + b * fi.block_bytes;
    const uint8_t* qs = block + qs_offset(F);
    for (int j = 0; j < 16; ++j) {
      q[j] = qs[j] & 0xF;
      q[j + 16] = qs[j] >> 4;
    }
    if constexpr (has_fifth_bits(F)) merge_fifth_bits(q, fifth_bits<F>(block));
  } else if constexpr (F == Q8_0) {
    std::memcpy(q, row + b * fi.block_bytes + 2, 32);
  } else if constexpr (F == Q4_K || F == Q5_K) {
    const uint8_t* base = row + b / 8 * fi.block_bytes;
    const int64_t j = b % 8;
    const uint8_t* qs = base + (F == Q4_K ? 16 : 48) + 32 * (j / 2);  // 32 bytes: sub-blocks 2i (low), 2i+1 (high)
    for (int l = 0; l < 32; ++l) q[l] = j % 2 ? qs[l] >> 4 : qs[l] & 0xF;
    if constexpr (F == Q5_K)
      for (int l = 0; l < 32; ++l) q[l] |= ((base[16 + l] >> j) & 1) << 4;  // bit j of qh[l]
  } else {  // Q6_K: sub-block j = 4h + s of the 128-weight half h: low 4 bits from ql, high 2 from qh
    const uint8_t* base = row + b / 8 * fi.block_bytes;
    const int64_t h = b % 8 / 4, s = b % 4;
    const uint8_t* ql = base + 64 * h + 32 * (s % 2);
    const uint8_t* qh = base + 128 + 32 * h;
    for (int l = 0; l < 32; ++l) {
      const int low = s < 2 ? ql[l] & 0xF : ql[l] >> 4;
      q[l] = static_cast<uint8_t>(static_cast<int8_t>((low | (((qh[l] >> (2 * s)) & 3) << 4)) - 32));
    }
  }
}

#ifdef KVSERVE_AVX2
// Block b as one vector of 32 integers, and st = [s[0], s[1], t, 0] (block_q and block_scales in
// 256-bit code; the scales are a few scalar ops per block).
struct Block {
  __m256i q;
  __m128 st;
};

inline __m256i nibbles(__m128i packed) {  // bytes 0..15: low nibbles, 16..31: high nibbles
  const __m128i low = _mm_set1_epi8(0xF);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
}

inline __m256i merge_fifth_bits(__m256i q, uint32_t qh) {
#ifdef KVSERVE_AVX512
  // qh is the byte mask as it stands; a masked add, as there is no byte-masked OR (bit 4 of q is 0)
  return _mm256_mask_add_epi8(q, qh, q, _mm256_set1_epi8(16));
#else
  // byte j <- byte j / 8 of qh, then 0xFF where its bit j % 8 is set (llama.cpp's bytes_from_bits_32)
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(qh)),
                                            _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
  return _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16)));
#endif
}

// Block b's 32 integers.
template <int F>
inline __m256i block_qv(const uint8_t* row, int64_t b) {
  constexpr FormatInfo fi = info(F);
  const __m256i low4 = _mm256_set1_epi8(0xF);
  if constexpr (has_nibbles(F)) {
    const uint8_t* block = row + b * fi.block_bytes;
    const __m256i q = nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + qs_offset(F))));
    if constexpr (has_fifth_bits(F)) return merge_fifth_bits(q, fifth_bits<F>(block));
    return q;
  } else if constexpr (F == Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * fi.block_bytes + 2));
  } else {
    const uint8_t* base = row + b / 8 * fi.block_bytes;
    const int64_t j = b % 8;
    if constexpr (F == Q4_K || F == Q5_K) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + (F == Q4_K ? 16 : 48) + 32 * (j / 2)));
      __m256i q = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, low4);
      if constexpr (F == Q5_K) {  // bit j of each qh byte, moved to bit 4
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + 16));
        const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi64_si128(j)), _mm256_set1_epi8(1));
        q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
      }
      return q;
    } else {  // Q6_K
      const int64_t h = j / 4, s4 = j % 4;
      const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + 64 * h + 32 * (s4 % 2)));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + 128 + 32 * h));
      const __m256i low = _mm256_and_si256(s4 < 2 ? ql : _mm256_srli_epi16(ql, 4), low4);
      const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi64_si128(2 * s4)), _mm256_set1_epi8(3));
      return _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
    }
  }
}

// Block b's [s[0], s[1], t, 0].
template <int F>
inline __m128 block_st(const uint8_t* row, int64_t b) {
  if constexpr (is_legacy(F)) {
    int32_t head;  // d (and m)
    std::memcpy(&head, row + b * info(F).block_bytes, 4);
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(head));  // [d, m or garbage, 0, 0]
    if constexpr (has_min(F)) return _mm_shuffle_ps(dm, dm, _MM_SHUFFLE(3, 1, 0, 0));
    const __m128 d = _mm_shuffle_ps(dm, dm, _MM_SHUFFLE(3, 0, 0, 0));  // [d, d, d, 0]
    return _mm_mul_ps(d, _mm_setr_ps(1.f, 1.f, -zero_point(F), 0.f));
  } else {
    float s[2], t;
    block_scales<F>(row, b, s, t);
    return _mm_setr_ps(s[0], s[1], t, 0.f);
  }
}

template <int F>
inline Block load_block(const uint8_t* row, int64_t b) {
  return {block_qv<F>(row, b), block_st<F>(row, b)};
}
#endif

// ---- activations: int8 blocks of 32 with a scale, as llama.cpp's q8_0 / q8_1 ----
//
// x_j ~ d qx_j, qx_j = round(x_j / d), d = max|x_block| / 127: |x_j - d qx_j| <= d / 2. Also
// xs = d * sum(qx) per block, the x sum that multiplies an unsigned format's offset t. With `biased`
// (signed formats on the VNNI path) qx is stored + 128, as the unsigned operand of vpdpbusd. Rows
// hold nb2 = the block count rounded up to even, the last block 0 when it pads: gemv reads pairs.

struct QuantizedX {
  int8_t* q;  // [M][nb2 * 32]
  float* d;   // [M][nb2]
  float* xs;  // [M][nb2]
};

template <typename T>
void quantize_row(const T* x, int64_t nb, int64_t nb2, bool biased, int8_t* q, float* d, float* xs) {
  for (int64_t b = 0; b < nb; ++b) {
    const T* xb = x + b * QK;
    int8_t* qb = q + b * QK;
    float amax = 0.f;
    int32_t sum = 0;
#if defined(KVSERVE_AVX512)
    const __m512 v0 = kvserve::load16(xb), v1 = kvserve::load16(xb + 16);
    amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    const __m128i flip = _mm_set1_epi8(biased ? static_cast<char>(0x80) : 0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm_xor_si128(_mm512_cvtepi32_epi8(q0), flip));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm_xor_si128(_mm512_cvtepi32_epi8(q1), flip));
#elif defined(KVSERVE_AVX2)
    __m256 v[4];
    __m256 m = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int i = 0; i < 4; ++i) {
      v[i] = kvserve::load8(xb + 8 * i);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i qi[4];
    for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1))));
    // packs work within 128-bit lanes: 4-byte groups come out in the order 0 4 1 5 2 6 3 7
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), _mm256_xor_si256(ordered, _mm256_set1_epi8(biased ? static_cast<char>(0x80) : 0)));
#else
    for (int64_t j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(to_float(xb[j])));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t j = 0; j < QK; ++j) {
      const int v = static_cast<int>(std::nearbyint(to_float(xb[j]) * inv));
      sum += v;
      qb[j] = static_cast<int8_t>(biased ? v ^ 0x80 : v);
    }
#endif
    d[b] = amax / 127.f;
    xs[b] = d[b] * static_cast<float>(sum);
  }
  for (int64_t b = nb; b < nb2; ++b) {  // the padding block: nothing (its weights are 0 too)
    std::memset(q + b * QK, 0, QK);
    d[b] = xs[b] = 0.f;
  }
}

template <typename T>
inline float bias_at(const T* bias, int64_t n) {
  return bias != nullptr ? to_float(bias[n]) : 0.f;
}

// ---- the products ----
//
// Each path computes, for x row r and weight row c,
//   y = sum_b dx_b (s_b,lo dot_lo + s_b,hi dot_hi) + sum_b t_b xs_b
// with dot the exact integer dot product of block b's q and qx (over weights 0..15 and 16..31).

#ifdef KVSERVE_AVX512_VNNI
// ---- AVX-512 VNNI: two blocks (64 weights) per vpdpbusd ----
//
// Lanes of a pair's int32 dot products: 0-3 block b weights 0..15, 4-7 b 16..31, 8-11 b+1 0..15,
// 12-15 b+1 16..31; the scales are spread to match by one permute each (SCALE_LANES, X_LANES).
// Unsigned formats: vpdpbusd(q, qx). Signed formats: vpdpbusd(qx + 128, q), started from
// -128 * (the lane's sum of q) (`seed`), so the lane holds the signed dot product exactly.
// Q4_0 / Q5_0 (w = d (q - z)) start from -z * (the lane's sum of qx), made once per call from x: the
// lane then holds the dot product of q - z, and no offset term is left to add per pair (one row of
// 1536 x 576 on one core, weights in cache: Q4_0 29 -> 26 us, Q5_0 36 -> 32, Q4_1 26).

inline __m512i scale_lanes() { return _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3); }
inline __m512i x_lanes() { return _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1); }
inline __m512 load2(const float* p) { return _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)))); }

// Two blocks' q (64 bytes in weight order) with both blocks' fifth bits, qh_b | qh_b+1 << 32 (joined in
// general registers: 3-6% faster than two 32-bit mask loads and kunpckdq).
inline __m512i merge_fifth_bits(__m512i q, uint64_t qh) { return _mm512_mask_add_epi8(q, qh, q, _mm512_set1_epi8(16)); }

// The 16 lanes' dot products, added to `start` (0, or the zero-point seed).
template <bool SIGNED>
inline __m512 pair_dot(__m512i w, __m512i xq, __m512i start) {
  if constexpr (SIGNED) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i seed = _mm512_sub_epi32(start, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(static_cast<char>(0x80)), w));
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(seed, xq, w));
  } else {
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, w, xq));
  }
}

// Blocks b and b + 1 of a row (b + 1 absent, all 0, unless TWO): q in pair_dot's lanes, the scale of
// each lane, and the offsets t in lanes 1 and 3 (t_b, t_b+1), which gemv does not read for Q4_0 /
// Q5_0 (their t = -z d enters through its seeds).
struct Pair {
  __m512i q;
  __m512 s;
  __m128 t;
};

template <int F, bool TWO>
inline Pair load_pair(const uint8_t* row, int64_t b) {
  constexpr FormatInfo fi = info(F);
  if constexpr (has_nibbles(F) && TWO) {
    // 11 instructions for both blocks, against 21 for two load_block: the 16 packed bytes of each
    // block twice, [qs_b, qs_b, qs_b+1, qs_b+1], the 2nd and 4th copies shifted to their high
    // nibbles; both blocks' fp16 header words converted by one vcvtph2ps (one-row products of
    // SmolLM2's Q4_1 lm_head shape on one core: 12.7 -> 16 GB/s). Q5_0 / Q5_1 add their 64 fifth
    // bits with one masked byte add.
    const uint8_t* base = row + b * fi.block_bytes;
    constexpr int64_t QS = qs_offset(F);
    const __m256i packed = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(base + QS))),
                                                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + fi.block_bytes + QS)), 1);
    __m512i q = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(packed));
    q = _mm512_and_si512(_mm512_mask_srli_epi16(q, 0xFF00FF00u, q, 4), _mm512_set1_epi8(0xF));
    if constexpr (has_fifth_bits(F)) q = merge_fifth_bits(q, fifth_bits<F>(base) | uint64_t{fifth_bits<F>(base + fi.block_bytes)} << 32);
    int32_t head0, head1;
    std::memcpy(&head0, base, 4);
    std::memcpy(&head1, base + fi.block_bytes, 4);
    // [d_b, m_b, d_b+1, m_b+1] (Q4_0 / Q5_0: garbage in place of m)
    const __m128 dm = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(head0), head1, 1));
    const __m512 s = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), _mm512_castps128_ps512(dm));
    return {q, s, has_min(F) ? dm : _mm_setzero_ps()};
  } else {
    const Block k0 = load_block<F>(row, b);
    Block k1{_mm256_setzero_si256(), _mm_setzero_ps()};
    if constexpr (TWO) k1 = load_block<F>(row, b + 1);
    return {_mm512_inserti64x4(_mm512_castsi256_si512(k0.q), k1.q, 1),
            _mm512_permutexvar_ps(scale_lanes(), _mm512_castps128_ps512(_mm_movelh_ps(k0.st, k1.st))),
            _mm_shuffle_ps(k0.st, k1.st, _MM_SHUFFLE(2, 2, 2, 2))};
  }
}

// ---- K-quants in gemv: a super-block (8 sub-blocks, 4 pairs) at a time ----
//
// Decoded sub-block by sub-block (load_pair through load_block), a K-quant pair costs two scalar decodes
// of 6-bit scales or int8 scale pairs, four fp16 conversions and a branchy q address; Q4_K and Q6_K gemv
// ran 2.4x slower per core than Q5_0 at SmolLM2's down projection (576 x 1536), which every layer of its
// Q4_K_M file has in one of them. Here a super-block's scales are decoded once, as one vector (llama.cpp's
// bit-mask unpacking of the 6-bit pairs for Q4_K / Q5_K), and a pair's q bytes come from one load: pair p
// of Q4_K / Q5_K is the low and high nibbles of qs[32p, 32p + 32); of Q6_K, the low or high nibbles of
// ql[64h, 64h + 64) (h = p / 2) with two bits of qh[32h, 32h + 32) each. The sub-blocks' offsets
// (-dmin * min, Q4_K / Q5_K) meet the x block sums eight at a time.

constexpr bool is_kquant(int f) { return f == Q4_K || f == Q5_K || f == Q6_K; }

// A super-block's scales, in fp32: Q4_K / Q5_K d * scale of sub-blocks 0..7 in lanes 0..7 and -dmin * min
// in lanes 8..15; Q6_K d * scale of its 16 groups of 16 weights. Exact, as block_scales' products.
template <int F>
inline __m512 superblock_scales(const uint8_t* base) {
  if constexpr (F == Q6_K) {
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(base + 192))));
    return _mm512_mul_ps(sc, _mm512_set1_ps(fp16(base + 208)));
  } else {
    // 12 bytes of 6-bit (scale, min) pairs -> 8 scale bytes, then 8 min bytes (k_scale_min for all j at once)
    constexpr uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
    uint32_t u[4];
    std::memcpy(u, base + 4, 12);
    u[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4);
    const uint32_t mins_low = u[1] & low6;
    u[1] = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);
    u[2] = mins_low;
    u[0] &= low6;
    int32_t head;  // d, dmin
    std::memcpy(&head, base, 4);
    const __m128 dm = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(head)), _mm_setr_ps(1.f, -1.f, 0.f, 0.f));
    const __m512 factor = _mm512_permutexvar_ps(x_lanes(), _mm512_castps128_ps512(dm));  // d x 8, -dmin x 8
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)))), factor);
  }
}

// Pair p's q in pair_dot's byte order (sub-block 2p, then 2p + 1); `high` holds the super-block's fifth bits
// (Q5_K: qh twice) or two high bits (Q6_K: qh[32h, 32h + 32) twice), loaded once per super-block or half.
template <int F, int P>
inline __m512i superblock_pair(const uint8_t* base, __m512i high) {
  const __m512i low4 = _mm512_set1_epi8(0xF);
  if constexpr (F == Q6_K) {
    constexpr int h = P / 2, s = 2 * (P % 2);  // sub-blocks 4h + s, 4h + s + 1
    const __m512i ql = _mm512_loadu_si512(base + 64 * h);
    const __m512i lo = _mm512_and_si512(s ? _mm512_srli_epi16(ql, 4) : ql, low4);
    const __m512i shift = _mm512_inserti64x4(_mm512_set1_epi16(2 * s), _mm256_set1_epi16(2 * s + 2), 1);
    const __m512i hi = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(high, shift), _mm512_set1_epi8(3)), 4);
    return _mm512_sub_epi8(_mm512_or_si512(lo, hi), _mm512_set1_epi8(32));
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + (F == Q4_K ? 16 : 48) + 32 * P));
    __m512i q = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1), low4);
    if constexpr (F == Q5_K) {  // bit 2P of qh[l] for sub-block 2P, bit 2P + 1 for 2P + 1
      const __m512i bits = _mm512_inserti64x4(_mm512_set1_epi8(1 << (2 * P)), _mm256_set1_epi8(static_cast<char>(1 << (2 * P + 1))), 1);
      q = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(high, bits), q, _mm512_set1_epi8(16));
    }
    return q;
  }
}

// Pair p's scales in pair_dot's lanes, from superblock_scales: Q4_K / Q5_K one per sub-block (8 lanes),
// Q6_K one per 16 weights (4 lanes).
template <int F, int P>
inline __m512 pair_scales(__m512 scales) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i index = F == Q6_K ? _mm512_add_epi32(_mm512_set1_epi32(4 * P), _mm512_srli_epi32(lane, 2))
                                  : _mm512_add_epi32(_mm512_set1_epi32(2 * P), _mm512_srli_epi32(lane, 3));
  return _mm512_permutexvar_ps(index, scales);
}

// One weight row of a K-quant against R x rows, as gemv's per-row sums (before hsum16); dxp as gemv's.
template <int F, int R>
inline void superblock_dots(const uint8_t* row, const QuantizedX& x, int64_t kq, int64_t nb, int64_t nb2, const float* dxp,
                            __m512 out[R]) {
  constexpr bool SIGNED = info(F).is_signed;
  __m512 a0[R], a1[R];  // even and odd pairs
  __m256 t[R];  // sum of -dmin * min * xs, 8 sub-blocks a time
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps(), t[r] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    const uint8_t* base = row + sb * info(F).block_bytes;
    const __m512 scales = superblock_scales<F>(base);
    __m512i high = _mm512_setzero_si512();
    if constexpr (F == Q5_K) high = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + 16)));
    auto pair = [&](auto p, __m512* a) __attribute__((always_inline)) {
      constexpr int P = decltype(p)::value;
      if constexpr (F == Q6_K && P % 2 == 0)
        high = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + 128 + 16 * P)));
      const __m512i q = superblock_pair<F, P>(base, high);
      const __m512 s = pair_scales<F, P>(scales);
      const int64_t i = 4 * sb + P;
      for (int r = 0; r < R; ++r) {
        const __m512 dot = pair_dot<SIGNED>(q, _mm512_loadu_si512(x.q + r * kq + 2 * i * QK), _mm512_setzero_si512());
        a[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(s, _mm512_load_ps(dxp + 16 * (i * R + r))), a[r]);
      }
    };
    pair(std::integral_constant<int, 0>{}, a0);
    pair(std::integral_constant<int, 1>{}, a1);
    pair(std::integral_constant<int, 2>{}, a0);
    pair(std::integral_constant<int, 3>{}, a1);
    if constexpr (!SIGNED) {
      const __m256 mins = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(scales), 1));
      for (int r = 0; r < R; ++r) t[r] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(x.xs + r * nb2 + 8 * sb), t[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_add_ps(_mm512_add_ps(a0[r], a1[r]), _mm512_zextps256_ps512(t[r]));
}

// x rows [0, R) against weight rows [n0, n1): each weight row read front to back on its own (one
// sequential stream per thread, which the hardware prefetcher follows: 4 rows read side by side ran
// at 9.7 GB/s on Q8_0 with a software prefetch, 6.8 without; one at a time at 21 GB/s, on a core
// that reads 24 GB/s, and a software prefetch 4 KB ahead then made no difference or cost 3-10%),
// each pair of blocks decoded in registers once for the R rows; 16 weight rows' sums reduced
// together by hsum16.
template <int F, int R, typename T>
void gemv(const QuantizedX& x, int64_t kq, int64_t nb, int64_t nb2, const uint8_t* w, int64_t row_bytes, const T* bias, T* y,
          int64_t N, int64_t n0, int64_t n1) {
  constexpr bool SIGNED = info(F).is_signed, ZERO_POINT = zero_point(F) != 0.f;
  // per pair of blocks, in the lanes they serve: dx in 16 lanes, then [0, xs_b, 0, xs_b+1] (the x
  // sums that multiply t) or, for Q4_0 / Q5_0, the 16 lanes' seeds -z * sum(qx)
  thread_local std::vector<float> pattern_buf;
  const int64_t pairs = (nb + 1) / 2;
  float* dxp = scratch(pattern_buf, (ZERO_POINT ? 32 : 20) * pairs * R);
  float* xsp = dxp + 16 * pairs * R;
  __m512i* seeds = reinterpret_cast<__m512i*>(xsp);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < pairs; ++i) {
      const int64_t b = r * nb2 + 2 * i;
      _mm512_store_ps(dxp + 16 * (i * R + r), _mm512_permutexvar_ps(x_lanes(), load2(x.d + b)));
      if constexpr (ZERO_POINT) {
        const __m512i zero = _mm512_setzero_si512(), xq = _mm512_loadu_si512(x.q + r * kq + 2 * i * QK);
        seeds[i * R + r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(static_cast<char>(zero_point(F))), xq));
      } else {
        _mm_storeu_ps(xsp + 4 * (i * R + r), _mm_unpacklo_ps(_mm_setzero_ps(), _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x.xs + b)))));
      }
    }
  for (int64_t g = n0; g < n1; g += 16) {
    const int64_t nr = std::min<int64_t>(16, n1 - g);
    __m512 acc[R][16];
    for (int64_t j = 0; j < 16; ++j) {
      const uint8_t* row = w + (g + std::min(j, nr - 1)) * row_bytes;
      if constexpr (is_kquant(F)) {
        __m512 out[R];
        superblock_dots<F, R>(row, x, kq, nb, nb2, dxp, out);
        for (int r = 0; r < R; ++r) acc[r][j] = out[r];
        continue;
      }
      __m512 a0[R], a1[R];  // two chains per x row: even and odd pairs
      __m128 ta[R];  // sum t xs in lanes 1 and 3
      for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps(), ta[r] = _mm_setzero_ps();
      // pair i into a; two: std::true_type unless the pair is the odd last block alone. Always
      // inlined: GCC kept some instantiations out of line, with the accumulators in memory (-30%).
      auto step = [&](int64_t i, __m512* a, auto two) __attribute__((always_inline)) {
        const Pair p = load_pair<F, decltype(two)::value>(row, 2 * i);
        for (int r = 0; r < R; ++r) {
          const __m512i start = ZERO_POINT ? _mm512_load_si512(seeds + i * R + r) : _mm512_setzero_si512();
          const __m512 dot = pair_dot<SIGNED>(p.q, _mm512_loadu_si512(x.q + r * kq + 2 * i * QK), start);
          a[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(p.s, _mm512_load_ps(dxp + 16 * (i * R + r))), a[r]);
          if constexpr (!SIGNED && !ZERO_POINT) ta[r] = _mm_fmadd_ps(p.t, _mm_loadu_ps(xsp + 4 * (i * R + r)), ta[r]);
        }
      };
      const int64_t full = nb / 2;  // pairs of two blocks
      int64_t i = 0;
      for (; i + 2 <= full; i += 2) {
        step(i, a0, std::true_type{});
        step(i + 1, a1, std::true_type{});
      }
      if (i < full) step(i++, a0, std::true_type{});
      if (nb % 2) step(i, a1, std::false_type{});
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_add_ps(_mm512_add_ps(a0[r], a1[r]), _mm512_zextps128_ps512(ta[r]));
    }
    for (int r = 0; r < R; ++r) {
      alignas(64) float sums[16];
      _mm512_store_ps(sums, kvserve::hsum16(acc[r]));
      for (int64_t j = 0; j < nr; ++j) y[r * N + g + j] = from_float<T>(sums[j] + bias_at(bias, g + j));
    }
  }
}

// Up to this many x rows gemv beats the panels (one core, 1536 x 576 and 576 x 1536, interleaved):
// Q4_1 at 4 rows 67 vs 79 us, at 5 rows even, at 6 rows 5% slower; Q8_0 at 6 rows still 13% faster
// (its panels carry more bytes and the seeds). More rows would keep more accumulators than registers.
template <int F>
constexpr int64_t gemv_max_rows() { return info(F).is_signed ? 6 : 4; }

// gemv<F, M> for M <= gemv_max_rows<F>().
template <int F, int R = 1, typename T>
void gemv_rows(int64_t M, const QuantizedX& x, int64_t kq, int64_t nb, int64_t nb2, const uint8_t* w, int64_t row_bytes,
               const T* bias, T* y, int64_t N, int64_t n0, int64_t n1) {
  if constexpr (R < gemv_max_rows<F>()) {
    if (M > R) return gemv_rows<F, R + 1>(M, x, kq, nb, nb2, w, row_bytes, bias, y, N, n0, n1);
  }
  gemv<F, R>(x, kq, nb, nb2, w, row_bytes, bias, y, N, n0, n1);
}

// ---- AVX-512 VNNI, more x rows: weight rows in the lanes ----
//
// With the blocks in the lanes (as in gemv), each x row times each weight row costs a vpdpbusd, a
// conversion, a scale multiply and an FMA per 64 weights, three of them on the two FP multiply
// pipes: ~14 products per cycle on one core (1536 x 576 Q4_1: 17 us per added x row). Here 16
// weight rows are decoded and transposed into a panel, once for all M rows: per block, 8 vectors
// whose lane i holds 4 bytes (weights 4k..4k+3) of row i, and the 16 rows' scales as vectors. An x
// row's block is then 8 vpdpbusd with its 4-byte groups broadcast, one conversion, one multiply and
// one or two FMAs for 16 rows' 512 products, landing in the rows' lanes (no horizontal sums):
// 7.5 us per added x row, where vpdpbusd's throughput is the limit (tiles of 6 or 8 x rows, which
// read the panel fewer times, ran no faster than 4).

constexpr int64_t PANEL_ROWS = 16;
// vectors per block: 8 of q, the scales of weights 0..15 and 16..31, then the offsets t (unsigned
// formats) or the seeds -128 * sum(q) of both halves (signed formats)
constexpr int64_t PANEL_VECS = 12;

// z[j] = [row j | row j + 8] (8 int32 each) -> out[k] lane i = int32 k of row i.
inline void transpose_rows(const __m512i z[8], __m512i out[8]) {
  __m512i t[8], u[8];
  for (int j = 0; j < 4; ++j) {  // per 128-bit chunk: int32 pairs of rows 2j, 2j+1
    t[2 * j] = _mm512_unpacklo_epi32(z[2 * j], z[2 * j + 1]);
    t[2 * j + 1] = _mm512_unpackhi_epi32(z[2 * j], z[2 * j + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // per chunk: int32 i of rows 4h..4h+3 (chunks 0, 2) or int32 4 + i (chunks 1, 3)
    u[4 * h] = _mm512_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int i = 0; i < 4; ++i) {
    out[i] = _mm512_permutex2var_epi64(u[i], first, u[4 + i]);
    out[4 + i] = _mm512_permutex2var_epi64(u[i], second, u[4 + i]);
  }
}

// The panel of rows [0, nr) of w (nr <= 16; missing rows repeat the last): nb blocks of PANEL_VECS.
// Block by block, the 16 rows' q are decoded straight into transpose_rows and, for the legacy formats,
// the 16 block headers (d, m) converted by one vcvtph2ps (16 scalar loads: 10% faster than a
// vpgatherdd). The next panel's bytes are prefetched meanwhile, spread over the blocks: without
// it, each panel start waits for DRAM after the tiles' compute (1536 x 576 Q4_1, 2 rows: 99 -> 70 us;
// 2 or 3 panels ahead: no different).
template <int F>
void build_panel(const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t nr, __m512i* panel) {
  constexpr FormatInfo fi = info(F);
  const uint8_t* rows[PANEL_ROWS];
  for (int64_t i = 0; i < PANEL_ROWS; ++i) rows[i] = w + std::min(i, nr - 1) * row_bytes;
  const int64_t lines = PANEL_ROWS * row_bytes / 64;  // of the next panel, which starts 16 rows on
  const uint8_t* next = w + PANEL_ROWS * row_bytes;
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t l = b * lines / nb; l < (b + 1) * lines / nb; ++l) _mm_prefetch(reinterpret_cast<const char*>(next + 64 * l), _MM_HINT_T0);
    __m512i z[8];
    for (int j = 0; j < 8; ++j)
      z[j] = _mm512_inserti64x4(_mm512_castsi256_si512(block_qv<F>(rows[j], b)), block_qv<F>(rows[j + 8], b), 1);
    __m512i* out = panel + b * PANEL_VECS;
    transpose_rows(z, out);
    __m512 s_lo, s_hi, t;
    if constexpr (is_legacy(F)) {
      int32_t h[PANEL_ROWS];
      for (int64_t i = 0; i < PANEL_ROWS; ++i) std::memcpy(&h[i], rows[i] + b * fi.block_bytes, 4);
      const __m512i head = _mm512_loadu_si512(h);  // d | m << 16
      s_lo = s_hi = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
      t = has_min(F) ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16)))
                     : _mm512_mul_ps(s_lo, _mm512_set1_ps(-zero_point(F)));
    } else {
      alignas(64) float sc[3][PANEL_ROWS];
      for (int64_t i = 0; i < PANEL_ROWS; ++i) {
        float s2[2];
        block_scales<F>(rows[i], b, s2, sc[2][i]);
        sc[0][i] = s2[0];
        sc[1][i] = s2[1];
      }
      s_lo = _mm512_load_ps(sc[0]), s_hi = _mm512_load_ps(sc[1]), t = _mm512_load_ps(sc[2]);
    }
    out[8] = _mm512_castps_si512(s_lo);
    out[9] = _mm512_castps_si512(s_hi);
    if constexpr (fi.is_signed) {
      const __m512i zero = _mm512_setzero_si512(), bias = _mm512_set1_epi8(static_cast<char>(0x80));
      __m512i lo = zero, hi = zero;
      for (int k = 0; k < 4; ++k) {
        lo = _mm512_dpbusd_epi32(lo, bias, out[k]);
        hi = _mm512_dpbusd_epi32(hi, bias, out[4 + k]);
      }
      out[10] = _mm512_sub_epi32(zero, lo);
      out[11] = _mm512_sub_epi32(zero, hi);
    } else {
      out[10] = _mm512_castps_si512(t);
    }
  }
}

// acc[r] lane i = x row m0 + r times panel row i, r < R.
template <int R, int F>
void panel_tile(const QuantizedX& x, int64_t kq, int64_t nb, int64_t nb2, int64_t m0, const __m512i* panel, __m512 acc[R]) {
  constexpr bool SIGNED = info(F).is_signed, TWO_SCALES = F == Q6_K;
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m512i* p = panel + b * PANEL_VECS;
    __m512i q[8];
    for (int k = 0; k < 8; ++k) q[k] = _mm512_load_si512(p + k);
    const __m512 s_lo = _mm512_castsi512_ps(p[8]), s_hi = _mm512_castsi512_ps(p[9]);
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = x.q + (m0 + r) * kq + b * QK;
      int32_t xw[8];
      std::memcpy(xw, xb, QK);
      __m512i lo = SIGNED ? p[10] : _mm512_setzero_si512(), hi = SIGNED ? p[11] : _mm512_setzero_si512();
      for (int k = 0; k < 4; ++k) {
        if constexpr (SIGNED) {
          lo = _mm512_dpbusd_epi32(lo, _mm512_set1_epi32(xw[k]), q[k]);
          hi = _mm512_dpbusd_epi32(hi, _mm512_set1_epi32(xw[4 + k]), q[4 + k]);
        } else {
          lo = _mm512_dpbusd_epi32(lo, q[k], _mm512_set1_epi32(xw[k]));
          hi = _mm512_dpbusd_epi32(hi, q[4 + k], _mm512_set1_epi32(xw[4 + k]));
        }
      }
      const __m512 dx = _mm512_set1_ps(x.d[(m0 + r) * nb2 + b]);
      if constexpr (TWO_SCALES) {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(s_lo, dx), acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(s_hi, dx), acc[r]);
      } else {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), _mm512_mul_ps(s_lo, dx), acc[r]);
      }
      if constexpr (!SIGNED) acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(p[10]), _mm512_set1_ps(x.xs[(m0 + r) * nb2 + b]), acc[r]);
    }
  }
}

constexpr int64_t TILE_ROWS = 4;  // x rows per panel_tile: 4 accumulators and their chains next to 8 panel vectors

inline __m512 load16_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_masked(const bf16* p, __mmask16 m) { return kvserve::load16(p, m); }
inline void store16_masked(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16_masked(bf16* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(kvserve::round_bf16(v)), 16)));
}

// Weight rows [n0, n1) for all M x rows: a panel per 16 rows, then every tile of x rows against it.
template <int F, typename T>
void few_rows(const QuantizedX& x, int64_t M, int64_t kq, int64_t nb, int64_t nb2, const uint8_t* w, int64_t row_bytes,
              const T* bias, T* y, int64_t N, int64_t n0, int64_t n1) {
  thread_local std::vector<float> panel_buf;
  __m512i* panel = reinterpret_cast<__m512i*>(scratch(panel_buf, nb * PANEL_VECS * 16));
  for (int64_t g = n0; g < n1; g += PANEL_ROWS) {
    const int64_t nr = std::min(PANEL_ROWS, n1 - g);
    const __mmask16 mask = kvserve::first_lanes(nr);
    build_panel<F>(w + g * row_bytes, row_bytes, nb, nr, panel);
    const __m512 b16 = bias != nullptr ? load16_masked(bias + g, mask) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
      __m512 acc[TILE_ROWS];
      const int64_t rows = std::min(TILE_ROWS, M - m0);
      switch (rows) {
        case 1: panel_tile<1, F>(x, kq, nb, nb2, m0, panel, acc); break;
        case 2: panel_tile<2, F>(x, kq, nb, nb2, m0, panel, acc); break;
        case 3: panel_tile<3, F>(x, kq, nb, nb2, m0, panel, acc); break;
        default: panel_tile<4, F>(x, kq, nb, nb2, m0, panel, acc); break;
      }
      for (int64_t r = 0; r < rows; ++r) store16_masked(y + (m0 + r) * N + g, mask, _mm512_add_ps(acc[r], b16));
    }
  }
}

#else

constexpr int64_t GROUP = 4;  // weight rows decoded and multiplied together

// One weight row decoded for the few-row product: q [nb][32], s [nb][2], t [nb].
struct Prepared {
  uint8_t* q;
  float* s;
  float* t;
};

template <int F>
void prepare(const uint8_t* row, int64_t nb, const Prepared& p) {
  for (int64_t b = 0; b < nb; ++b) {
#ifdef KVSERVE_AVX2
    const Block k = load_block<F>(row, b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.q + b * QK), k.q);
    _mm_storel_pi(reinterpret_cast<__m64*>(p.s + 2 * b), k.st);
    p.t[b] = _mm_cvtss_f32(_mm_movehl_ps(k.st, k.st));
#else
    block_q<F>(row, b, p.q + b * QK);
    block_scales<F>(row, b, p.s + 2 * b, p.t[b]);
#endif
  }
}

#if defined(KVSERVE_AVX2)
// ---- AVX2: one block per vpmaddubsw + vpmaddwd ----
//
// vpmaddubsw multiplies unsigned by signed bytes and adds pairs into saturating int16: unsigned
// formats (q <= 31, |qx| <= 127) never saturate; signed ones use |q| and qx with q's sign, as
// llama.cpp does (at most 2 * 128 * 127 = 32,512 per pair). Then int16 pairs -> int32 lanes 0-3
// (weights 0..15) and 4-7 (16..31), scaled and accumulated in fp32.

constexpr int64_t TILE_ROWS = 1;

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <bool SIGNED>
void group_sums(const QuantizedX& x, int64_t kq, int64_t nb, int64_t nb2, int64_t m0, int64_t, const Prepared p[GROUP],
                float sums[TILE_ROWS][GROUP]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const int8_t* xq = x.q + m0 * kq;
  const float* dx = x.d + m0 * nb2;
  __m256 a[GROUP];
  for (auto& v : a) v = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * QK));
    const __m256 d = _mm256_set1_ps(dx[b]);
    for (int64_t c = 0; c < GROUP; ++c) {
      const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i*>(p[c].q + b * QK));
      const __m128 s2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p[c].s + 2 * b)));
      const __m256 s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s2), halves);
      const __m256i pairs = SIGNED ? _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q)) : _mm256_maddubs_epi16(q, xv);
      a[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), _mm256_mul_ps(s, d), a[c]);
    }
  }
  for (int64_t c = 0; c < GROUP; ++c) {
    float term = 0.f;
    if constexpr (!SIGNED) {
      const float* xs = x.xs + m0 * nb2;
      __m256 t = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) t = _mm256_fmadd_ps(_mm256_loadu_ps(p[c].t + b), _mm256_loadu_ps(xs + b), t);
      for (; b < nb; ++b) term += p[c].t[b] * xs[b];
      term += hsum8(t);
    }
    sums[0][c] = hsum8(a[c]) + term;
  }
}

#else
// ---- portable: integer dot products per half block ----

constexpr int64_t TILE_ROWS = 1;

template <bool SIGNED>
void group_sums(const QuantizedX& x, int64_t kq, int64_t nb, int64_t nb2, int64_t m0, int64_t, const Prepared p[GROUP],
                float sums[TILE_ROWS][GROUP]) {
  const int8_t* xq = x.q + m0 * kq;
  const float* dx = x.d + m0 * nb2;
  const float* xs = x.xs + m0 * nb2;
  for (int64_t c = 0; c < GROUP; ++c) {
    float sum = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* q = p[c].q + b * QK;
      const int8_t* xb = xq + b * QK;
      int32_t dot[2] = {0, 0};
      for (int64_t j = 0; j < QK; ++j) dot[j / 16] += (SIGNED ? static_cast<int8_t>(q[j]) : q[j]) * xb[j];
      sum += dx[b] * (p[c].s[2 * b] * static_cast<float>(dot[0]) + p[c].s[2 * b + 1] * static_cast<float>(dot[1]));
      if constexpr (!SIGNED) sum += p[c].t[b] * xs[b];
    }
    sums[0][c] = sum;
  }
}
#endif

// Weight rows [n0, n1) for all M x rows: GROUP weight rows at a time are decoded into L1 (each
// packed block is read from memory once), then every tile of TILE_ROWS x rows multiplies them.
template <int F, typename T>
void few_rows(const QuantizedX& x, int64_t M, int64_t kq, int64_t nb, int64_t nb2, const uint8_t* w, int64_t row_bytes,
              const T* bias, T* y, int64_t N, int64_t n0, int64_t n1) {
  thread_local std::vector<uint8_t> q_buf;
  thread_local std::vector<float> f_buf;
  uint8_t* q = scratch(q_buf, GROUP * nb * QK);
  float* f = scratch(f_buf, GROUP * 3 * nb);
  Prepared p[GROUP];
  for (int64_t c = 0; c < GROUP; ++c) p[c] = {q + c * nb * QK, f + c * 3 * nb, f + c * 3 * nb + 2 * nb};
  for (int64_t g = n0; g < n1; g += GROUP) {
    const int64_t nr = std::min(GROUP, n1 - g);
    for (int64_t c = 0; c < GROUP; ++c) prepare<F>(w + (g + std::min(c, nr - 1)) * row_bytes, nb, p[c]);
    float bias_f[GROUP];
    for (int64_t c = 0; c < nr; ++c) bias_f[c] = bias_at(bias, g + c);
    for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
      const int64_t rows = std::min(TILE_ROWS, M - m0);
      float sums[TILE_ROWS][GROUP];
      group_sums<info(F).is_signed>(x, kq, nb, nb2, m0, rows, p, sums);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < nr; ++c) y[(m0 + r) * N + g + c] = from_float<T>(sums[r][c] + bias_f[c]);
    }
  }
}

#endif

// Weight rows per dynamically scheduled chunk: two per thread, but at least 64 KB and at most 256
// KB of packed weights at one x row (fewer bytes as x rows add work), a multiple of 16 (gemv's
// reductions and the panels take 16 rows). Measured on 2 threads at one x row: chunks of 16 KB
// streamed Q8_0's lm_head (49152 x 576) at 12-15 GB/s and 256 KB at 29-31 (the dense bf16 kernel's
// static halves: 30), each chunk restarting a thread's prefetch stream; the 576 x 576 layers were
// fastest at 64-128 KB (4-2 chunks) and slower as one 256 KB chunk on one thread.
constexpr int64_t MIN_CHUNK_BYTES = 64 << 10, MAX_CHUNK_BYTES = 256 << 10;

template <int F, typename T>
void linear(const T* x, const uint8_t* w, const T* bias, T* y, int64_t M, int64_t N, int64_t K, int num_threads) {
  if (M <= 0 || N <= 0) return;
  constexpr FormatInfo fi = info(F);
  const int64_t nb = K / QK, nb2 = (nb + 1) / 2 * 2, kq = nb2 * QK, row_bytes = K / fi.block_weights * fi.block_bytes;
#ifdef KVSERVE_AVX512_VNNI
  const bool biased = fi.is_signed;
#else
  const bool biased = false;
#endif
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<float> xf_buf;
  float* xf = scratch(xf_buf, 2 * M * nb2);
  const QuantizedX qx{scratch(xq_buf, M * kq), xf, xf + M * nb2};
  const int64_t work = row_bytes * (M == 1 ? 1 : 1 + (M + TILE_ROWS - 1) / TILE_ROWS);  // per weight row
  const int64_t chunk_bytes = std::clamp<int64_t>(N * work / (2 * std::max(num_threads, 1)), MIN_CHUNK_BYTES, MAX_CHUNK_BYTES);
  const int64_t chunk = std::max<int64_t>(16, chunk_bytes / work / 16 * 16);
  const int64_t chunks = (N + chunk - 1) / chunk;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, chunks)));
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, nb, nb2, biased, qx.q + m * kq, qx.d + m * nb2, qx.xs + m * nb2);
    // dynamic: a thread whose core is busy with another process takes fewer chunks
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t n0 = i * chunk, n1 = std::min(N, n0 + chunk);
#ifdef KVSERVE_AVX512_VNNI
      if (M <= gemv_max_rows<F>()) {
        gemv_rows<F>(M, qx, kq, nb, nb2, w, row_bytes, bias, y, N, n0, n1);
        continue;
      }
#endif
      few_rows<F>(qx, M, kq, nb, nb2, w, row_bytes, bias, y, N, n0, n1);
    }
  }
}

// ---- dequantization: w = s q + t, exactly gguf.quants.dequantize's fp32 values (bf16: those rounded) ----

template <int F, typename T>
void dequantize_row(const uint8_t* row, int64_t nb, T* out) {
  constexpr bool SIGNED = info(F).is_signed;
  for (int64_t b = 0; b < nb; ++b) {
    T* o = out + b * QK;
#if defined(KVSERVE_AVX512)
    const Block k = load_block<F>(row, b);
    const __m512 st = _mm512_castps128_ps512(k.st);
    const __m512 t = _mm512_permutexvar_ps(_mm512_set1_epi32(2), st);
    for (int h = 0; h < 2; ++h) {
      const __m128i q16 = h ? _mm256_extracti128_si256(k.q, 1) : _mm256_castsi256_si128(k.q);
      const __m512 q = _mm512_cvtepi32_ps(SIGNED ? _mm512_cvtepi8_epi32(q16) : _mm512_cvtepu8_epi32(q16));
      __m512 v = _mm512_mul_ps(q, _mm512_permutexvar_ps(_mm512_set1_epi32(h), st));
      if constexpr (!SIGNED) v = _mm512_add_ps(v, t);
      if constexpr (std::is_same_v<T, float>) {
        _mm512_storeu_ps(o + 16 * h, v);
      } else {
        const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(kvserve::round_bf16(v)), 16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * h), _mm512_cvtepi32_epi16(bits));
      }
    }
#elif defined(KVSERVE_AVX2)
    const Block k = load_block<F>(row, b);
    alignas(32) uint8_t q[QK];
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), k.q);
    alignas(16) float st[4];
    _mm_store_ps(st, k.st);
    for (int i = 0; i < 4; ++i) {  // 8 weights at a time
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(SIGNED ? _mm256_cvtepi8_epi32(q8) : _mm256_cvtepu8_epi32(q8)), _mm256_set1_ps(st[i / 2]));
      if constexpr (!SIGNED) v = _mm256_add_ps(v, _mm256_set1_ps(st[2]));
      if constexpr (std::is_same_v<T, float>) {
        _mm256_storeu_ps(o + 8 * i, v);
      } else {  // round to nearest even, keep the high halves
        __m256i u = _mm256_castps_si256(v);
        u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
        u = _mm256_srli_epi32(u, 16);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 8 * i), _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
      }
    }
#else
    uint8_t q[QK];
    float s[2], t;
    block_q<F>(row, b, q);
    block_scales<F>(row, b, s, t);
    for (int64_t j = 0; j < QK; ++j) {
      const float v = s[j / 16] * static_cast<float>(SIGNED ? static_cast<int8_t>(q[j]) : q[j]);
      o[j] = from_float<T>(SIGNED ? v : v + t);
    }
#endif
  }
}

constexpr int64_t DEQUANT_PARALLEL_MIN = 1 << 16;  // weights: below this, one thread (a thread team costs a few us)

// Rows ids[i] (or row_begin + i without ids), i < n, into out[n][K]; threads: OpenMP's default
// team (torch.set_num_threads sets it for the calling thread).
template <int F, typename T>
void dequantize(const uint8_t* w, int64_t K, const int64_t* ids, int64_t row_begin, int64_t n, T* out) {
  constexpr FormatInfo fi = info(F);
  const int64_t row_bytes = K / fi.block_weights * fi.block_bytes;
#pragma omp parallel for schedule(static) if (n * K >= DEQUANT_PARALLEL_MIN)
  for (int64_t i = 0; i < n; ++i) dequantize_row<F>(w + (ids != nullptr ? ids[i] : row_begin + i) * row_bytes, K / QK, out + i * K);
}

// Calls fn(std::integral_constant<int, format>) for a supported format; nothing otherwise.
template <typename Fn>
void dispatch(int format, Fn&& fn) {
  switch (format) {
    case Q4_0: fn(std::integral_constant<int, Q4_0>{}); break;
    case Q4_1: fn(std::integral_constant<int, Q4_1>{}); break;
    case Q5_0: fn(std::integral_constant<int, Q5_0>{}); break;
    case Q5_1: fn(std::integral_constant<int, Q5_1>{}); break;
    case Q8_0: fn(std::integral_constant<int, Q8_0>{}); break;
    case Q4_K: fn(std::integral_constant<int, Q4_K>{}); break;
    case Q5_K: fn(std::integral_constant<int, Q5_K>{}); break;
    case Q6_K: fn(std::integral_constant<int, Q6_K>{}); break;
    default: break;  // unsupported: the Python wrapper refuses it before calling
  }
}

}  // namespace quant
}  // namespace

// y[M, N] = x[M, K] @ dequant(w)[N, K]^T (+ bias[N]); x, bias, y in fp32 or bf16, w: N rows of packed
// blocks of `format` (a GGML type id), K a multiple of the format's block size; all contiguous.
#define KVSERVE_QUANT_LINEAR(NAME, T)                                                                              \
  extern "C" void NAME(const T* x, const uint8_t* w, int format, const T* bias, T* y, int64_t M, int64_t N,        \
                       int64_t K, int num_threads) {                                                               \
    quant::dispatch(format, [&](auto f) { quant::linear<decltype(f)::value>(x, w, bias, y, M, N, K, num_threads); }); \
  }
// Rows [row_begin, row_end) of w dequantized into out[row_end - row_begin, K].
#define KVSERVE_DEQUANTIZE(NAME, T)                                                                                \
  extern "C" void NAME(const uint8_t* w, int format, int64_t row_begin, int64_t row_end, int64_t K, T* out) {      \
    quant::dispatch(format, [&](auto f) { quant::dequantize<decltype(f)::value>(w, K, nullptr, row_begin, row_end - row_begin, out); }); \
  }
// Rows rows[0..n) of w dequantized into out[n, K] (an embedding lookup).
#define KVSERVE_DEQUANTIZE_ROWS(NAME, T)                                                                           \
  extern "C" void NAME(const uint8_t* w, int format, const int64_t* rows, int64_t n, int64_t K, T* out) {          \
    quant::dispatch(format, [&](auto f) { quant::dequantize<decltype(f)::value>(w, K, rows, 0, n, out); });         \
  }

KVSERVE_QUANT_LINEAR(quant_linear_f32, float)
KVSERVE_QUANT_LINEAR(quant_linear_bf16, kvserve::bf16)
KVSERVE_DEQUANTIZE(dequantize_f32, float)
KVSERVE_DEQUANTIZE(dequantize_bf16, kvserve::bf16)
KVSERVE_DEQUANTIZE_ROWS(dequantize_rows_f32, float)
KVSERVE_DEQUANTIZE_ROWS(dequantize_rows_bf16, kvserve::bf16)

#undef KVSERVE_QUANT_LINEAR
#undef KVSERVE_DEQUANTIZE
#undef KVSERVE_DEQUANTIZE_ROWS

#endif  // KVSERVE_QUANT_LINEAR_CPP
