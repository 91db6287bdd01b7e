// The per-layer small ops of a Llama-style layer, each one pass over its rows, and the
// sampler's per-row reduction of the logits (argmax and log-normalizer in one read).
//
// Why: at decode each of these touches a few KB, so their cost in torch is the
// dispatch of the 3-10 ops each is made of (RMSNorm with a residual is ~35 us in
// torch, ~10 ops), not arithmetic. Fused here they are one call each.
//
// Numerics follow the Hugging Face modules op by op, including where they round to
// the activation dtype (bf16) between ops; sums run in another order and exp is a
// polynomial (vec_math.h), so results agree with torch to rounding, not bit for bit.
// Plain C ABI (ctypes).

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "vec_math.h"

namespace {

using kvserve::bf16;
using kvserve::from_float;
using kvserve::round_to;
using kvserve::to_float;

#ifdef KVSERVE_AVX2
using kvserve::exp8;
using kvserve::load8;

// 8 values rounded as a T op would round them (bf16: to nearest even; fp32: unchanged).
inline __m256 round8(__m256 v, float*) { return v; }
inline __m256 round8(__m256 v, bf16*) {
  __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
template <typename T>
inline __m256 round8(__m256 v) { return round8(v, static_cast<T*>(nullptr)); }

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {  // v already rounded: keep the high halves
  const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(round8(v, p)), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#endif

#ifdef KVSERVE_AVX512
// The same at 16 lanes.
using kvserve::exp16;
using kvserve::load16;

inline __m512 round16(__m512 v, float*) { return v; }
inline __m512 round16(__m512 v, bf16*) { return kvserve::round_bf16(v); }
template <typename T>
inline __m512 round16(__m512 v) { return round16(v, static_cast<T*>(nullptr)); }

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16* p, __m512 v) {  // v already rounded: keep the high halves
  const __m512i u = _mm512_srli_epi32(_mm512_castps_si512(round16(v, p)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(u));
}
#endif

// Rows at which a call is worth splitting over the cores (prefill chunks).
constexpr int64_t PARALLEL_ROWS = 16;

// residual != null: residual = x + residual (in T), then out = norm(residual).
// HF: h = x.float(); h = h * rsqrt(mean(h^2) + eps); out = weight * h.to(T).
template <typename T>
void rms_norm(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t H, float eps) {
#pragma omp parallel for if (rows >= PARALLEL_ROWS)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * H;
    T* res = residual != nullptr ? residual + r * H : nullptr;
    T* o = out + r * H;
    int64_t i = 0;
    float sum = 0.f;
#ifdef KVSERVE_AVX512
    __m512 acc16 = _mm512_setzero_ps();
    for (; i + 16 <= H; i += 16) {
      __m512 v = load16(xr + i);
      if (res != nullptr) {
        v = round16<T>(_mm512_add_ps(v, load16(res + i)));
        store16(res + i, v);
      }
      acc16 = _mm512_fmadd_ps(v, v, acc16);
    }
    sum = _mm512_reduce_add_ps(acc16);
#endif
#ifdef KVSERVE_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= H; i += 8) {
      __m256 v = load8(xr + i);
      if (res != nullptr) {
        v = round8<T>(_mm256_add_ps(v, load8(res + i)));
        store8(res + i, v);
      }
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    sum += hsum(acc);
#endif
    for (; i < H; ++i) {
      float v = to_float(xr[i]);
      if (res != nullptr) {
        v = round_to<T>(v + to_float(res[i]));
        res[i] = from_float<T>(v);
      }
      sum += v * v;
    }
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(H) + eps);
    const T* src = res != nullptr ? res : xr;
    i = 0;
#ifdef KVSERVE_AVX512
    const __m512 inv16 = _mm512_set1_ps(inv);
    for (; i + 16 <= H; i += 16)
      store16(o + i, _mm512_mul_ps(load16(weight + i), round16<T>(_mm512_mul_ps(load16(src + i), inv16))));
#endif
#ifdef KVSERVE_AVX2
    const __m256 inv8 = _mm256_set1_ps(inv);
    for (; i + 8 <= H; i += 8)
      store8(o + i, _mm256_mul_ps(load8(weight + i), round8<T>(_mm256_mul_ps(load8(src + i), inv8))));
#endif
    for (; i < H; ++i) o[i] = from_float<T>(to_float(weight[i]) * round_to<T>(to_float(src[i]) * inv));
  }
}

// x: [rows, 2 * I] = [gate | up] -> out: [rows, I] = silu(gate) * up, each op rounded to T.
template <typename T>
void silu_and_mul(const T* x, T* out, int64_t rows, int64_t I) {
#pragma omp parallel for if (rows >= PARALLEL_ROWS)
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = x + r * 2 * I;
    const T* up = gate + I;
    T* o = out + r * I;
    int64_t i = 0;
#ifdef KVSERVE_AVX512
    const __m512 one16 = _mm512_set1_ps(1.f);
    for (; i + 16 <= I; i += 16) {
      const __m512 g = load16(gate + i);
      if constexpr (std::is_same_v<T, bf16>) {  // the same values linear.cpp's fused SiLU computes
        store16(o + i, kvserve::silu_mul_bf16(g, load16(up + i)));
      } else {
        const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one16, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        store16(o + i, _mm512_mul_ps(s, load16(up + i)));
      }
    }
#endif
#ifdef KVSERVE_AVX2
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= I; i += 8) {
      const __m256 g = load8(gate + i);
      const __m256 s = round8<T>(_mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))));
      store8(o + i, _mm256_mul_ps(s, load8(up + i)));
    }
#endif
    for (; i < I; ++i) {
      const float g = to_float(gate[i]);
      const float s = round_to<T>(g / (1.f + std::exp(-g)));
      o[i] = from_float<T>(s * to_float(up[i]));
    }
  }
}

// In place on q [T, Hq, D] and k [T, Hkv, D] (rows `q_stride` / `k_stride` apart, heads
// contiguous), half-split layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with
// cos/sin [max_positions, D / 2] in fp32 rounded to T first, as HF casts them.
template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    T* v = x + h * D;
    int64_t i = 0;
#ifdef KVSERVE_AVX2
    for (; i + 8 <= half; i += 8) {
      const __m256 c = round8<T>(_mm256_loadu_ps(cos + i)), s = round8<T>(_mm256_loadu_ps(sin + i));
      const __m256 x1 = load8(v + i), x2 = load8(v + i + half);
      store8(v + i, _mm256_sub_ps(round8<T>(_mm256_mul_ps(x1, c)), round8<T>(_mm256_mul_ps(x2, s))));
      store8(v + i + half, _mm256_add_ps(round8<T>(_mm256_mul_ps(x2, c)), round8<T>(_mm256_mul_ps(x1, s))));
    }
#endif
    for (; i < half; ++i) {
      const float c = round_to<T>(cos[i]), s = round_to<T>(sin[i]);
      const float x1 = to_float(v[i]), x2 = to_float(v[i + half]);
      v[i] = from_float<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
      v[i + half] = from_float<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
    }
  }
}

template <typename T>
void rotary(const int64_t* positions, T* q, int64_t q_stride, int64_t num_heads, T* k, int64_t k_stride,
            int64_t num_kv_heads, int64_t D, const float* cos, const float* sin, int64_t tokens) {
  const int64_t half = D / 2;
#pragma omp parallel for if (tokens >= PARALLEL_ROWS)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos + positions[t] * half;
    const float* s = sin + positions[t] * half;
    rotate_heads(q + t * q_stride, num_heads, D, c, s);
    rotate_heads(k + t * k_stride, num_kv_heads, D, c, s);
  }
}

// For each row of logits [rows, V] (fp32, or bf16 as the lm_head wrote them: widening is exact): the
// index of the first maximum (as torch.argmax) and log(sum(exp(x))) (as torch.logsumexp). One pass for
// the max and its index, one for the sum, while the row is still in cache; torch takes a separate
// slower pass for each, and on bf16 logits a third to widen them.
template <typename T>
void argmax_logsumexp(const T* x, int64_t rows, int64_t V, int64_t* index, float* lse) {
#pragma omp parallel for
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * V;
    float best = -INFINITY;
    int64_t best_i = 0;
    int64_t i = 0;
#if defined(KVSERVE_AVX512)
    if (V >= 16) {  // per lane: its first maximum (strictly greater replaces) and where it was
      __m512 vmax = kvserve::load16(row);
      __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      __m512i cur = vidx;
      const __m512i step = _mm512_set1_epi32(16);
      for (i = 16; i + 16 <= V; i += 16) {
        cur = _mm512_add_epi32(cur, step);
        const __m512 v = kvserve::load16(row + i);
        const __mmask16 greater = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
        vmax = _mm512_mask_mov_ps(vmax, greater, v);
        vidx = _mm512_mask_mov_epi32(vidx, greater, cur);
      }
      best = _mm512_reduce_max_ps(vmax);
      const __mmask16 at_best = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(best), _CMP_EQ_OQ);
      best_i = _mm512_mask_reduce_min_epi32(at_best, vidx);  // the first of the lanes that hold it
    }
#elif defined(KVSERVE_AVX2)
    if (V >= 8) {
      __m256 vmax = load8(row);
      __m256i vidx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      __m256i cur = vidx;
      const __m256i step = _mm256_set1_epi32(8);
      for (i = 8; i + 8 <= V; i += 8) {
        cur = _mm256_add_epi32(cur, step);
        const __m256 v = load8(row + i);
        const __m256 greater = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);  // strict: a lane keeps its first maximum
        vmax = _mm256_blendv_ps(vmax, v, greater);
        vidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(cur), greater));
      }
      alignas(32) float lane_max[8];
      alignas(32) int32_t lane_idx[8];
      _mm256_store_ps(lane_max, vmax);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lane_idx), vidx);
      best = lane_max[0];
      best_i = lane_idx[0];
      for (int u = 1; u < 8; ++u)
        if (lane_max[u] > best || (lane_max[u] == best && lane_idx[u] < best_i)) {
          best = lane_max[u];
          best_i = lane_idx[u];
        }
    }
#endif
    for (; i < V; ++i)
      if (to_float(row[i]) > best) {
        best = to_float(row[i]);
        best_i = i;
      }
    float sum = 0.f;
    i = 0;
#if defined(KVSERVE_AVX512)
    const __m512 shift16 = _mm512_set1_ps(best);
    __m512 acc16 = _mm512_setzero_ps();
    for (; i + 16 <= V; i += 16) acc16 = _mm512_add_ps(acc16, kvserve::exp16(_mm512_sub_ps(kvserve::load16(row + i), shift16)));
    sum = _mm512_reduce_add_ps(acc16);
#elif defined(KVSERVE_AVX2)
    const __m256 shift = _mm256_set1_ps(best);
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= V; i += 8) acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(load8(row + i), shift)));
    sum = hsum(acc);
#endif
    for (; i < V; ++i) sum += std::exp(to_float(row[i]) - best);
    index[r] = best_i;
    lse[r] = best + std::log(sum);
  }
}

}  // namespace

#define KVSERVE_POINTWISE(SUFFIX, T)                                                                              \
  extern "C" void rms_norm_##SUFFIX(const void* x, void* residual, const void* weight, void* out, int64_t rows,  \
                                    int64_t hidden, float eps) {                                                \
    rms_norm<T>(static_cast<const T*>(x), static_cast<T*>(residual), static_cast<const T*>(weight),            \
                static_cast<T*>(out), rows, hidden, eps);                                                        \
  }                                                                                                              \
  extern "C" void silu_and_mul_##SUFFIX(const void* x, void* out, int64_t rows, int64_t inner) {                 \
    silu_and_mul<T>(static_cast<const T*>(x), static_cast<T*>(out), rows, inner);                                \
  }                                                                                                              \
  extern "C" void rotary_##SUFFIX(const int64_t* positions, void* q, int64_t q_stride, int64_t num_heads, void* k, \
                                  int64_t k_stride, int64_t num_kv_heads, int64_t head_dim, const float* cos,    \
                                  const float* sin, int64_t tokens) {                                            \
    rotary<T>(positions, static_cast<T*>(q), q_stride, num_heads, static_cast<T*>(k), k_stride, num_kv_heads,    \
              head_dim, cos, sin, tokens);                                                                       \
  }

KVSERVE_POINTWISE(f32, float)
KVSERVE_POINTWISE(bf16, bf16)

extern "C" void argmax_logsumexp_f32(const void* logits, int64_t rows, int64_t vocab, int64_t* index, float* lse) {
  argmax_logsumexp(static_cast<const float*>(logits), rows, vocab, index, lse);
}
extern "C" void argmax_logsumexp_bf16(const void* logits, int64_t rows, int64_t vocab, int64_t* index, float* lse) {
  argmax_logsumexp(static_cast<const bf16*>(logits), rows, vocab, index, lse);
}
