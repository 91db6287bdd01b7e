// Paged attention for CPU: reads K/V blocks in place through the block tables.
//
// One kernel serves decodes and prefill chunks alike. A work item is
// (sequence, kv head, tile of query tokens, slice of the keys). It walks its key
// blocks once, keeping an online softmax (running max m, sum l, accumulator acc)
// for every query row of the tile: FlashAttention's tiling, so no score matrix
// larger than one block exists. All query heads sharing a kv head (GQA/MQA) are
// rows of the same item, so each K/V row is read from memory once per tile.
// A long decode is cut into key slices that run in parallel and are merged with
// their log-sum-exp afterwards: Flash-Decoding.
//
// With a sliding window W (> 0) the query at position i sees the keys i - W < j <= i only: a
// decode walks just its last W keys, a prefill tile starts at its first query's window, and each
// row masks the keys before its own window (`first`) as it masks those after its position
// (`visible`). Blocks wholly before every window are never read (the engine frees them).
//
// The cache holds K/V in the model's dtype, or quantized (--kv-cache-dtype int8 | fp8_e4m3): int8 or
// fp8 e4m3 values with one fp32 scale per (token, kv head) for K and one for V, symmetric
// (scale = amax / 127 or amax / 448), written by store_kv_quantized. The kernel reads the values in
// place and folds the scales in where that is cheapest: a chunk's 16 key scales multiply its 16
// scores once (q . (s k) = s (q . k)), and a value's scale multiplies its softmax weight; prefill
// tiles, which widen a chunk to fp32 once for many rows, multiply the rows as they widen them.

// Plain C++ with a C ABI (called through ctypes with tensor data pointers), so it builds in
// seconds with g++ alone: no torch headers, no pybind11, no ninja.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {

using kvserve::bf16;
using kvserve::fp8_e4m3;
using kvserve::from_float;
using kvserve::to_float;

// Cache element types whose rows carry a scale (one fp32 per token and kv head).
template <typename C>
constexpr bool kQuantized = std::is_same_v<C, int8_t> || std::is_same_v<C, fp8_e4m3>;

// Symmetric quantization's largest magnitude: the scale of a row is amax / kQMax.
template <typename C>
constexpr float kQMax = std::is_same_v<C, int8_t> ? 127.f : 448.f;

// exp(x[i] - shift) in place for i < n; returns their sum.
inline float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef KVSERVE_AVX2
  const __m256 s8 = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 p = kvserve::exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s8));
    _mm256_storeu_ps(x + i, p);
    acc = _mm256_add_ps(acc, p);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float v : lanes) sum += v;
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// Rows of a K or V block as fp32: the cache itself for fp32, else widened into `buf` (and multiplied by
// their `scales` where quantized).
template <typename C>
inline const float* rows_as_float(const C* src, int64_t n, int64_t stride, int64_t D, float* buf, const float* scales) {
  if constexpr (std::is_same_v<C, float>) {
    (void)n;
    (void)D;
    (void)buf;
    (void)scales;
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float s = kQuantized<C> ? scales[j] : 1.f;
      for (int64_t d = 0; d < D; ++d) buf[j * D + d] = to_float(src[j * stride + d]) * s;
    }
    return buf;
  }
}

// s[j] = q . k_j for j < n (keys `stride` floats apart), 8 keys per step: 8 vector accumulators
// over the head dim, then one transpose-and-add turns them into the 8 scores in key order.
inline void scores(const float* q, const float* k, int64_t stride, int64_t n, int64_t D, float* s) {
  int64_t j = 0;
#ifdef KVSERVE_AVX2
  if (D % 8 == 0) {
    for (; j + 8 <= n; j += 8) {
      __m256 a[8];
      for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k + (j + u) * stride + d), a[u]);
      }
      const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
      const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
      _mm256_storeu_ps(s + j, _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31)));
    }
  }
#endif
  for (; j < n; ++j) {
    const float* kj = k + j * stride;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += q[d] * kj[d];
    s[j] = dot;
  }
}

// acc = acc * correction + sum_j p[j] v_j, one 8-wide slice of the head dim at a time so the
// slice stays in a register across all keys.
inline void accumulate(float* acc, float correction, const float* p, const float* v, int64_t stride, int64_t n,
                       int64_t D) {
  int64_t d = 0;
#ifdef KVSERVE_AVX2
  const __m256 c = _mm256_set1_ps(correction);
  for (; d + 8 <= D; d += 8) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + d), c);
    for (int64_t j = 0; j < n; ++j) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + j * stride + d), a);
    _mm256_storeu_ps(acc + d, a);
  }
#endif
  for (; d < D; ++d) {
    float a = acc[d] * correction;
    for (int64_t j = 0; j < n; ++j) a += p[j] * v[j * stride + d];
    acc[d] = a;
  }
}

#ifdef KVSERVE_AVX512
// ---- AVX-512 ----
// An item's keys are taken a span of up to 512 at a time, in three passes over K/V rows read in
// place through the block table (each chunk of up to 16 keys within one block; the next chunk
// prefetched, since scattered blocks defeat the hardware prefetcher):
//   1. scores: per query row, 16 dot products with the head dim in the lanes become one vector of
//      16 scores by a transpose-add (hsum16); prefill tiles of 8+ rows instead share one transposed
//      copy of the chunk (keys in the lanes); masked causally;
//   2. softmax: the row's running max, sum and accumulator are rescaled once per span, not once
//      per block (FlashAttention's online softmax, at span granularity);
//   3. P.V: a few rows at a time with their accumulators in registers, each V row loaded (and
//      widened) once for all of them.
// Every pass is a long run of independent work (no per-16-key reductions chained through the
// running max), which keeps the FMA units busy. The scores kept per row are one span: rows x 512
// floats, never a score matrix of the whole context.
//
// bf16 rows with D % 32 == 0 are widened as (16 even, 16 odd elements) per 32 values: one shift
// or one mask per 16 values instead of a zero-extend and a shift. q is widened the same way, so q.k
// is unchanged; P.V accumulates in that order and the item undoes it once when it writes out.
//
// Quantized rows (int8, fp8) are in order. Their scales are folded in per chunk: scores times the
// key scales, softmax weights times the value scales (chunk_scales).

constexpr int64_t SPAN = 512;
constexpr int64_t SROW = SPAN + 16;  // a row of span scores, with room for a chunk's 16-wide store at its end

constexpr int64_t PREFETCH_CHUNKS = 2;

// Always inlined, as is every function that only prefetches: GCC finds such a function free of side effects
// and drops the calls to it (a prefetch_chunk lambda left the whole kernel without a prefetch: 21% slower).
template <typename T>
__attribute__((always_inline)) inline void prefetch_rows(const T* src, int64_t n, int64_t stride, int64_t D,
                                                         _mm_hint hint) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < D * int64_t(sizeof(T)); b += 64)
      hint == _MM_HINT_T0 ? _mm_prefetch(reinterpret_cast<const char*>(src + j * stride) + b, _MM_HINT_T0)
                          : _mm_prefetch(reinterpret_cast<const char*>(src + j * stride) + b, _MM_HINT_T1);
}

// Whether rows of T with DV vectors are held as (even, odd) halves (see above).
template <typename T, int DV>
constexpr bool kPairs = std::is_same_v<T, bf16> && DV % 2 == 0;

// Vector c (16 values) of a row, in the item's layout. fp8 rows come out divided by 256 (their
// scales make up for it, chunk_scales): e4m3's bits moved into fp16's place are a valid fp16 whose
// exponent bias is 15 instead of 7, subnormals included, so one conversion instruction widens them.
template <typename T, int DV>
inline __m512 row_vector(const T* row, int c) {
  if constexpr (kPairs<T, DV>) {
    const __m512i v = _mm512_loadu_si512(row + 32 * (c / 2));
    return _mm512_castsi512_ps(c % 2 == 0 ? _mm512_slli_epi32(v, 16)
                                          : _mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  } else if constexpr (std::is_same_v<T, int8_t>) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c))));
  } else if constexpr (std::is_same_v<T, fp8_e4m3>) {
    // sign-extended to 16 bits and shifted by 7: the sign at bit 15 (bit 14 cleared), exponent and mantissa below
    const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c)));
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(static_cast<int16_t>(0xbfff))));
  } else {
    return kvserve::load16(row + 16 * c);
  }
}

// The scales of a chunk's n (<= 16) rows as one vector (lanes past n are 0), times the 256 that
// row_vector leaves out of fp8 rows.
template <typename C>
inline __m512 chunk_scales(const float* scales, int64_t n) {
  const __m512 s = _mm512_maskz_loadu_ps(kvserve::first_lanes(n), scales);
  return std::is_same_v<C, fp8_e4m3> ? _mm512_mul_ps(s, _mm512_set1_ps(256.f)) : s;
}

// The lanes of a 16-key chunk a row sees: from `first` up to (not including) `visible`, both relative to
// the chunk, and no further than its n keys.
inline __mmask16 seen_lanes(int64_t n, int64_t first, int64_t visible) {
  return static_cast<__mmask16>(kvserve::first_lanes(std::min(n, visible)) & ~kvserve::first_lanes(first));
}

// s[0..16) = q . k_j for the n (<= 16) keys of a chunk (rows `stride` apart), times the keys' scales
// where quantized; keys before `first` or at or past `visible` get -inf.
template <typename T, int DV>
inline void chunk_scores(const float* q, const T* k, int64_t stride, int64_t n, int64_t first, int64_t visible,
                         float* s, const float* scales) {
  __m512 qv[DV];
  for (int c = 0; c < DV; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  __m512 dots[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {  // keys past n read key 0 again; their scores are masked below
    const T* kj = k + (j < n ? j : 0) * stride;
    __m512 a0 = _mm512_mul_ps(qv[0], row_vector<T, DV>(kj, 0)), a1 = _mm512_setzero_ps();
    for (int c = 1; c < DV; ++c) {
      if (c % 2) a1 = _mm512_fmadd_ps(qv[c], row_vector<T, DV>(kj, c), a1);
      else a0 = _mm512_fmadd_ps(qv[c], row_vector<T, DV>(kj, c), a0);
    }
    dots[j] = _mm512_add_ps(a0, a1);
  }
  __m512 dot = kvserve::hsum16(dots);
  if constexpr (kQuantized<T>) dot = _mm512_mul_ps(dot, chunk_scales<T>(scales, n));
  _mm512_storeu_ps(s, _mm512_mask_blend_ps(seen_lanes(n, first, visible), _mm512_set1_ps(-INFINITY), dot));
}

// chunk_scores for R rows at once (decodes: the query heads of one kv head): each key row is loaded
// and widened once for all R, not once per row.
template <typename T, int DV, int R>
inline void chunk_scores_rows(const float* q, const T* k, int64_t stride, int64_t n, const int64_t* first,
                              const int64_t* visible, int64_t offset, float* s, const float* scales) {
  __m512 dots[R][16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {  // keys past n read key 0 again; their scores are masked below
    const T* kj = k + (j < n ? j : 0) * stride;
    __m512 kv[DV];
    for (int c = 0; c < DV; ++c) kv[c] = row_vector<T, DV>(kj, c);
    for (int r = 0; r < R; ++r) {
      const float* qr = q + r * 16 * DV;
      __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(qr), kv[0]), a1 = _mm512_setzero_ps();
      for (int c = 1; c < DV; ++c) {
        if (c % 2) a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * c), kv[c], a1);
        else a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * c), kv[c], a0);
      }
      dots[r][j] = _mm512_add_ps(a0, a1);
    }
  }
  __m512 key_scales = _mm512_setzero_ps();
  if constexpr (kQuantized<T>) key_scales = chunk_scales<T>(scales, n);
  for (int r = 0; r < R; ++r) {
    if (visible[r] <= offset) continue;
    __m512 dot = kvserve::hsum16(dots[r]);
    if constexpr (kQuantized<T>) dot = _mm512_mul_ps(dot, key_scales);
    const __mmask16 seen = seen_lanes(n, first[r] - offset, visible[r] - offset);
    _mm512_storeu_ps(s + r * SROW + offset, _mm512_mask_blend_ps(seen, _mm512_set1_ps(-INFINITY), dot));
  }
}

// acc[r] += sum_j p[r][j] w_j v_j for R rows (p rows SROW apart, acc rows 16 * DV apart) and n keys, with w the
// values' scales (chunk_scales) where quantized, else 1.
template <typename T, int DV, int R>
inline void chunk_pv(const float* p, const T* v, int64_t stride, int64_t n, float* acc, const float* w) {
  __m512 a[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) a[r][c] = _mm512_loadu_ps(acc + r * 16 * DV + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    __m512 vj[DV];
    for (int c = 0; c < DV; ++c) vj[c] = row_vector<T, DV>(v + j * stride, c);
    for (int r = 0; r < R; ++r) {
      const __m512 pb = _mm512_set1_ps(kQuantized<T> ? p[r * SROW + j] * w[j] : p[r * SROW + j]);
      for (int c = 0; c < DV; ++c) a[r][c] = _mm512_fmadd_ps(pb, vj[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(acc + r * 16 * DV + 16 * c, a[r][c]);
}

// The rows' scores s[r][0..n) for a span -> probabilities, with the online-softmax rescale of m, l
// and acc (once per span). Row r sees the span's keys from first[r] to visible[r]; the scores
// before first[r] are -inf already (chunk_scores).
template <int DV>
void span_softmax(float* s, int64_t n, const int64_t* first, const int64_t* visible, int64_t rows, float* m, float* l,
                  float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = s + r * SROW;
    const int64_t seen = std::min(n, visible[r]);
    if (seen <= first[r]) {
      std::fill(sr, sr + n, 0.f);
      continue;
    }
    // scores past `seen` in the last vector are whatever the chunks left there: read as -inf
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    auto scores_at = [&](int64_t j) { return _mm512_mask_loadu_ps(minus_inf, kvserve::first_lanes(seen - j), sr + j); };
    __m512 mx = _mm512_set1_ps(m[r]);
    for (int64_t j = 0; j < seen; j += 16) mx = _mm512_max_ps(mx, scores_at(j));
    const float m_new = _mm512_reduce_max_ps(mx);
    const __m512 shift = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < seen; j += 16) {
      const __m512 e = kvserve::exp16_nonpositive(_mm512_sub_ps(scores_at(j), shift));
      _mm512_storeu_ps(sr + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    for (int64_t j = (seen + 15) / 16 * 16; j < n; ++j) sr[j] = 0.f;  // keys this row does not see weigh 0
    const float correction = std::exp(m[r] - m_new);  // 0 on the first span (m = -inf)
    l[r] = l[r] * correction + _mm512_reduce_add_ps(sum);
    m[r] = m_new;
    const __m512 corr = _mm512_set1_ps(correction);
    for (int64_t d = 0; d < 16 * DV; d += 16)
      _mm512_storeu_ps(acc + r * 16 * DV + d, _mm512_mul_ps(_mm512_loadu_ps(acc + r * 16 * DV + d), corr));
  }
}

// One chunk's scores for every row that sees any of its keys, for the few rows of a decode item
// (prefill tiles take tile_scores): a GQA group's rows share each key's load.
template <typename T, int DV>
void rows_scores(const float* qf, const T* k, int64_t stride, int64_t n, const int64_t* first, const int64_t* visible,
                 int64_t rows, int64_t offset, float* s, const float* scales) {
  if constexpr (DV <= 8) {
    switch (rows) {  // decodes of a GQA group: its rows share each key's load
      case 2: return chunk_scores_rows<T, DV, 2>(qf, k, stride, n, first, visible, offset, s, scales);
      case 3: return chunk_scores_rows<T, DV, 3>(qf, k, stride, n, first, visible, offset, s, scales);
      case 4: return chunk_scores_rows<T, DV, 4>(qf, k, stride, n, first, visible, offset, s, scales);
      case 5: return chunk_scores_rows<T, DV, 5>(qf, k, stride, n, first, visible, offset, s, scales);
      case 6: return chunk_scores_rows<T, DV, 6>(qf, k, stride, n, first, visible, offset, s, scales);
      case 7: return chunk_scores_rows<T, DV, 7>(qf, k, stride, n, first, visible, offset, s, scales);
      default: break;
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    if (visible[r] > offset)
      chunk_scores<T, DV>(qf + r * 16 * DV, k, stride, n, first[r] - offset, visible[r] - offset, s + r * SROW + offset,
                          scales);
}

// One chunk's P.V for every row, R at a time (R x DV accumulators + DV V vectors fit 32 registers).
template <typename T, int DV>
void rows_pv(const float* p, const T* v, int64_t stride, int64_t n, int64_t rows, float* acc, const float* scales) {
  constexpr int R = DV <= 4 ? 4 : DV <= 8 ? 2 : 1;
  alignas(64) float w[16];  // the values' scales, for quantized rows
  if constexpr (kQuantized<T>) _mm512_store_ps(w, chunk_scales<T>(scales, n));
  int64_t r = 0;
  for (; r + R <= rows; r += R) chunk_pv<T, DV, R>(p + r * SROW, v, stride, n, acc + r * 16 * DV, w);
  if constexpr (R >= 4) {
    if (rows - r == 3) {
      chunk_pv<T, DV, 3>(p + r * SROW, v, stride, n, acc + r * 16 * DV, w);
      return;
    }
  }
  if constexpr (R >= 2) {
    for (; r + 2 <= rows; r += 2) chunk_pv<T, DV, 2>(p + r * SROW, v, stride, n, acc + r * 16 * DV, w);
  }
  for (; r < rows; ++r) chunk_pv<T, DV, 1>(p + r * SROW, v, stride, n, acc + r * 16 * DV, w);
}

// ---- Prefill tiles (TILE_ROWS+ rows): two small GEMMs per span, with the rows in the lanes ----
// A prefill tile's scores are held transposed, st[key][row] (rp = rows rounded up to 16 floats per
// key), against q^T[d][row] built once per item and each chunk's K/V rows widened to fp32 once:
//   scores: per head-dim element, RVB vectors of q^T and KJ broadcast key elements feed KJ x RVB
//           accumulators: RVB + KJ loads per KJ x RVB FMAs (row-major scores with keys in the lanes
//           need R + 1 loads per R FMAs, and the load ports, not the FMAs, set their pace);
//   softmax: a row's max, sum and rescale are lane-wise across keys: no horizontal reductions;
//   P.V: R rows x DV accumulators, each widened V row loaded once for R rows (not re-widened per R).
constexpr int64_t TILE_ROWS = 8;

// q^T[d][r] (rp floats per d) of the rows x D query rows q; rows from `rows` to rp are 0.
inline void transpose_rows(const float* q, int64_t rows, int64_t D, int64_t rp, float* qt) {
  for (int64_t r0 = 0; r0 < rp; r0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512 block[16];
      for (int64_t i = 0; i < 16; ++i)
        block[i] = r0 + i < rows ? _mm512_loadu_ps(q + (r0 + i) * D + d0) : _mm512_setzero_ps();
      kvserve::transpose16(block);
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_ps(qt + (d0 + i) * rp + r0, block[i]);
    }
}

// A chunk's n (<= 16) rows widened to fp32 in the item's layout, 16 * DV floats apart, and multiplied by
// their scales where quantized; rows past n are 0.
template <typename T, int DV>
inline void widen_chunk(const T* src, int64_t stride, int64_t n, float* dst, const float* scales) {
  alignas(64) float w[16];
  if constexpr (kQuantized<T>) _mm512_store_ps(w, chunk_scales<T>(scales, n));
  for (int64_t j = 0; j < 16; ++j)
    for (int c = 0; c < DV; ++c) {
      __m512 x = j < n ? row_vector<T, DV>(src + j * stride, c) : _mm512_setzero_ps();
      if constexpr (kQuantized<T>) x = _mm512_mul_ps(x, _mm512_set1_ps(w[j]));
      _mm512_storeu_ps(dst + (j * DV + c) * 16, x);
    }
}

// Scores of KJ keys (kf rows 16 * DV floats apart, span offsets off..off + KJ) for RVB row vectors:
// st[(off + j) * rp + 16 b], -inf where the key is before the row's `fst` or at or past its `vis`; mx keeps
// each row's max.
template <int DV, int KJ, int RVB>
inline void tile_scores_block(const float* qt, int64_t rp, const float* kf, const float* fst, const float* vis,
                              int64_t off, float* st, float* mx) {
  __m512 acc[KJ][RVB];
  for (int j = 0; j < KJ; ++j)
    for (int b = 0; b < RVB; ++b) acc[j][b] = _mm512_setzero_ps();
  for (int d = 0; d < 16 * DV; ++d) {
    __m512 qv[RVB];
    for (int b = 0; b < RVB; ++b) qv[b] = _mm512_loadu_ps(qt + d * rp + 16 * b);
    for (int j = 0; j < KJ; ++j) {
      const __m512 kb = _mm512_set1_ps(kf[j * 16 * DV + d]);
      for (int b = 0; b < RVB; ++b) acc[j][b] = _mm512_fmadd_ps(kb, qv[b], acc[j][b]);
    }
  }
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  for (int b = 0; b < RVB; ++b) {
    const __m512 first = _mm512_loadu_ps(fst + 16 * b);
    const __m512 visible = _mm512_loadu_ps(vis + 16 * b);
    __m512 m = _mm512_loadu_ps(mx + 16 * b);
    for (int j = 0; j < KJ; ++j) {
      const __m512 key = _mm512_set1_ps(static_cast<float>(off + j));
      const __mmask16 sees = _mm512_cmp_ps_mask(visible, key, _CMP_GT_OQ) & _mm512_cmp_ps_mask(first, key, _CMP_LE_OQ);
      const __m512 s = _mm512_mask_blend_ps(sees, minus_inf, acc[j][b]);
      _mm512_storeu_ps(st + (off + j) * rp + 16 * b, s);
      m = _mm512_max_ps(m, s);
    }
    _mm512_storeu_ps(mx + 16 * b, m);
  }
}

// Keys per block for RVB row vectors: KJ x RVB accumulators plus RVB q^T vectors fit 32 registers.
template <int RVB>
constexpr int kTileKeys = RVB == 1 ? 16 : RVB <= 3 ? 8 : 4;

template <int DV, int RVB>
inline void tile_scores_rows(const float* qt, int64_t rp, const float* kf, const float* fst, const float* vis,
                             int64_t off, float* st, float* mx) {
  constexpr int KJ = kTileKeys<RVB>;
  for (int j = 0; j < 16; j += KJ) tile_scores_block<DV, KJ, RVB>(qt, rp, kf + j * 16 * DV, fst, vis, off + j, st, mx);
}

// One chunk's (n <= 16 keys at span offset off) transposed scores for all rp rows.
template <typename T, int DV>
void tile_scores(const float* qt, int64_t rp, const T* k, int64_t stride, int64_t n, const float* fst, const float* vis,
                 int64_t off, float* st, float* mx, const float* scales) {
  alignas(64) float kf[16 * 16 * DV];
  widen_chunk<T, DV>(k, stride, n, kf, scales);
  for (int64_t b = 0; b < rp / 16; b += 6) {
    const float* q = qt + 16 * b;
    switch (std::min<int64_t>(6, rp / 16 - b)) {
      case 1: tile_scores_rows<DV, 1>(q, rp, kf, fst + 16 * b, vis + 16 * b, off, st + 16 * b, mx + 16 * b); break;
      case 2: tile_scores_rows<DV, 2>(q, rp, kf, fst + 16 * b, vis + 16 * b, off, st + 16 * b, mx + 16 * b); break;
      case 3: tile_scores_rows<DV, 3>(q, rp, kf, fst + 16 * b, vis + 16 * b, off, st + 16 * b, mx + 16 * b); break;
      case 4: tile_scores_rows<DV, 4>(q, rp, kf, fst + 16 * b, vis + 16 * b, off, st + 16 * b, mx + 16 * b); break;
      case 5: tile_scores_rows<DV, 5>(q, rp, kf, fst + 16 * b, vis + 16 * b, off, st + 16 * b, mx + 16 * b); break;
      default: tile_scores_rows<DV, 6>(q, rp, kf, fst + 16 * b, vis + 16 * b, off, st + 16 * b, mx + 16 * b); break;
    }
  }
}

// The span's n keys of transposed scores -> probabilities, lane-wise per row: m, l (rp floats) take
// the span's max mx, acc rows are rescaled once. Rows that have seen no key yet keep m = -inf and
// weigh every key 0 (their shift is 0, not -inf, so no inf - inf).
template <int DV>
void tile_softmax(float* st, int64_t rp, int64_t n, const float* mx, int64_t rows, float* m, float* l, float* acc) {
  alignas(64) float corr[16];
  for (int64_t b = 0; b < rp / 16; ++b) {
    const __m512 m_old = _mm512_loadu_ps(m + 16 * b);
    const __m512 m_new = _mm512_max_ps(m_old, _mm512_loadu_ps(mx + 16 * b));
    const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_new, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), m_new,
                                              _mm512_setzero_ps());
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      float* s = st + j * rp + 16 * b;
      const __m512 e = kvserve::exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s), shift));
      _mm512_storeu_ps(s, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 c = kvserve::exp16_nonpositive(_mm512_sub_ps(m_old, shift));  // 0 on the first span (m = -inf)
    _mm512_storeu_ps(l + 16 * b, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * b), c, sum));
    _mm512_storeu_ps(m + 16 * b, m_new);
    _mm512_store_ps(corr, c);
    for (int64_t r = 16 * b; r < std::min(rows, 16 * b + 16); ++r) {
      const __m512 cr = _mm512_set1_ps(corr[r - 16 * b]);
      for (int c2 = 0; c2 < DV; ++c2)
        _mm512_storeu_ps(acc + (r * DV + c2) * 16, _mm512_mul_ps(_mm512_loadu_ps(acc + (r * DV + c2) * 16), cr));
    }
  }
}

// acc[r] += sum_j pt[j][r] vf_j for R rows and n keys (pt rows rp apart, vf rows 16 * DV apart).
template <int DV, int R>
inline void tile_pv_rows(const float* pt, int64_t rp, const float* vf, int64_t n, float* acc) {
  __m512 a[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) a[r][c] = _mm512_loadu_ps(acc + (r * DV + c) * 16);
  for (int64_t j = 0; j < n; ++j) {
    __m512 vj[DV];
    for (int c = 0; c < DV; ++c) vj[c] = _mm512_loadu_ps(vf + (j * DV + c) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 pb = _mm512_set1_ps(pt[j * rp + r]);
      for (int c = 0; c < DV; ++c) a[r][c] = _mm512_fmadd_ps(pb, vj[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(acc + (r * DV + c) * 16, a[r][c]);
}

// One chunk's P.V (n <= 16 keys, pt = its transposed probabilities) for every row.
template <typename T, int DV>
void tile_pv(const float* pt, int64_t rp, const T* v, int64_t stride, int64_t n, int64_t rows, float* acc,
             const float* scales) {
  constexpr int R = std::max(1, std::min(6, 24 / DV));  // R x DV accumulators + DV V vectors
  alignas(64) float vf[16 * 16 * DV];
  widen_chunk<T, DV>(v, stride, n, vf, scales);
  int64_t r = 0;
  for (; r + R <= rows; r += R) tile_pv_rows<DV, R>(pt + r, rp, vf, n, acc + r * 16 * DV);
  switch (rows - r) {  // the last few rows together, each V row still loaded once for them
    case 0: break;
    case 1: tile_pv_rows<DV, 1>(pt + r, rp, vf, n, acc + r * 16 * DV); break;
    case 2: tile_pv_rows<DV, std::min(R, 2)>(pt + r, rp, vf, n, acc + r * 16 * DV); break;
    case 3: tile_pv_rows<DV, std::min(R, 3)>(pt + r, rp, vf, n, acc + r * 16 * DV); break;
    case 4: tile_pv_rows<DV, std::min(R, 4)>(pt + r, rp, vf, n, acc + r * 16 * DV); break;
    default: tile_pv_rows<DV, std::min(R, 5)>(pt + r, rp, vf, n, acc + r * 16 * DV); break;
  }
}

// A query row in the item's layout (bf16 (even, odd) halves where Pairs, else in order), times `scale`.
template <typename T, bool Pairs, int DV>
void load_q(const T* src, float scale, float* dst) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int c = 0; c < DV; ++c) {
    const __m512 x = Pairs ? row_vector<T, DV>(src, c) : kvserve::load16(src + 16 * c);
    _mm512_storeu_ps(dst + 16 * c, _mm512_mul_ps(x, sc));
  }
}

// fp32 bits rounded so that their high half is v as bf16 (to nearest even; NaN stays NaN, as from_float).
inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  return _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x400000));
}

// dst = acc * inv for one output row, acc in the item's layout (undoing the (even, odd) halves where Pairs).
template <typename T, bool Pairs, int DV>
void store_out(const float* acc, float inv, T* dst) {
  const __m512 iv = _mm512_set1_ps(inv);
  if constexpr (Pairs) {
    for (int c = 0; c < DV; c += 2) {  // element 2i is lane i of the even half, 2i + 1 of the odd half
      const __m512i even = bf16_bits(_mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), iv));
      const __m512i odd = bf16_bits(_mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c + 16), iv));
      const __m512i pairs = _mm512_or_si512(_mm512_srli_epi32(even, 16), _mm512_and_si512(odd, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
      _mm512_storeu_si512(dst + 16 * c, pairs);
    }
  } else {
    for (int c = 0; c < DV; ++c) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), iv);
      if constexpr (std::is_same_v<T, float>)
        _mm512_storeu_ps(dst + 16 * c, v);
      else if constexpr (std::is_same_v<T, bf16>)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(v), 16)));
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}

// The kernels over cache rows of C; each takes the scales of its chunk's rows (read where C is quantized).
template <typename C>
struct SpanKernels {
  void (*scores)(const float*, const C*, int64_t, int64_t, const int64_t*, const int64_t*, int64_t, int64_t, float*,
                 const float*);
  void (*softmax)(float*, int64_t, const int64_t*, const int64_t*, int64_t, float*, float*, float*);
  void (*pv)(const float*, const C*, int64_t, int64_t, int64_t, float*, const float*);
  void (*tile_scores)(const float*, int64_t, const C*, int64_t, int64_t, const float*, const float*, int64_t, float*,
                      float*, const float*);
  void (*tile_softmax)(float*, int64_t, int64_t, const float*, int64_t, float*, float*, float*);
  void (*tile_pv)(const float*, int64_t, const C*, int64_t, int64_t, int64_t, float*, const float*);
  bool pairs;  // rows held as (even, odd) halves
};

// Query rows in and output rows out, for queries of T (the model's dtype) in the layout of the cache rows.
template <typename T>
struct QueryIO {
  void (*load_q)(const T*, float, float*);
  void (*store_out)(const float*, float, T*);
};

template <typename C, int DV>
constexpr SpanKernels<C> span_kernels() {
  return {rows_scores<C, DV>,  span_softmax<DV>, rows_pv<C, DV>, tile_scores<C, DV>,
          tile_softmax<DV>,   tile_pv<C, DV>,   kPairs<C, DV>};
}

template <typename T, bool Pairs, int DV>
constexpr QueryIO<T> query_io() {
  return {load_q<T, Pairs, DV>, store_out<T, Pairs, DV>};
}

// Which of the head dims the vector kernels specialise D is (64, 80, 96, 128, 256), or -1.
inline int head_dim_index(int64_t D) {
  switch (D) {
    case 64: return 0;
    case 80: return 1;
    case 96: return 2;
    case 128: return 3;
    case 256: return 4;
    default: return -1;
  }
}

// The kernels for this head dim, or null where the portable loop must do it.
template <typename C>
const SpanKernels<C>* span_for(int64_t D) {
  static constexpr SpanKernels<C> kernels[] = {span_kernels<C, 4>(), span_kernels<C, 5>(), span_kernels<C, 6>(),
                                               span_kernels<C, 8>(), span_kernels<C, 16>()};
  const int i = head_dim_index(D);
  return i < 0 ? nullptr : &kernels[i];
}

// Query loads and output stores for a head dim that span_for has kernels for, in their layout.
template <typename T>
const QueryIO<T>* query_io_for(int64_t D, bool pairs) {
  static constexpr QueryIO<T> in_order[] = {query_io<T, false, 4>(), query_io<T, false, 5>(), query_io<T, false, 6>(),
                                            query_io<T, false, 8>(), query_io<T, false, 16>()};
  const int i = head_dim_index(D);
  if constexpr (std::is_same_v<T, bf16>) {
    // pairs only for even DV (kPairs); D = 80 (DV 5) never asks for them
    static constexpr QueryIO<T> paired[] = {query_io<T, true, 4>(), query_io<T, false, 5>(), query_io<T, true, 6>(),
                                            query_io<T, true, 8>(), query_io<T, true, 16>()};
    if (pairs) return &paired[i];
  }
  return &in_order[i];
}
#endif

// log(sum exp(s_j)) of a softmax kept as its running max m and sum l of exp(s_j - m); -inf for no keys.
inline float log_sum_exp(float m, float l) {
  return l > 0.f ? m + std::log(l) : -std::numeric_limits<float>::infinity();
}

struct WorkItem {
  int64_t seq;
  int64_t kv_head;
  int64_t q_begin;  // token rows of q, absolute in the flat batch
  int64_t q_end;
  int64_t k_begin;  // key positions of this slice
  int64_t k_end;
  int64_t partial;  // index into the partial buffers, or -1 when the item writes out directly
};

// One work item: queries of T (the model's dtype) over cache rows of C (T, or int8 / fp8 with the scales
// k_scale, v_scale: [blocks, kv heads, block_size] fp32, null for caches in T); `window` > 0: each query
// sees its last `window` keys only.
template <typename T, typename C>
void run_item(const WorkItem& w, const T* q, const C* k_cache, const C* v_cache, const float* k_scale,
              const float* v_scale, const int64_t* block_table, int64_t query_start, int64_t num_heads,
              int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int64_t window, T* out,
              float* lse, float* part_acc, float* part_ml, bool next_head) {
  // next_head: the calling thread runs (same sequence, same keys, kv head + 1) next
  const int64_t group = num_heads / num_kv_heads;
  const int64_t num_q = w.q_end - w.q_begin;
  const int64_t rows = num_q * group;
  const int64_t D = head_dim;
#ifdef KVSERVE_AVX512
  const SpanKernels<C>* kern = span_for<C>(D);
  const bool pairs = kern != nullptr && kern->pairs;
  const QueryIO<T>* io = kern != nullptr ? query_io_for<T>(D, pairs) : nullptr;
#else
  const bool pairs = false;
#endif
  // where element d of a row is held: in order, or (even, odd) per 32 (row_vector, kPairs)
  auto at = [pairs](int64_t d) { return pairs ? d / 32 * 32 + d % 2 * 16 + d % 32 / 2 : d; };
  // the scales of key j and the keys after it in its block (this item's kv head), or null
  auto scales_at = [&](const float* scales, int64_t j) -> const float* {
    if (scales == nullptr) return nullptr;
    return scales + (block_table[j / block_size] * num_kv_heads + w.kv_head) * block_size + j % block_size;
  };
  // `query_start` is the flat row a query at absolute position 0 would have, so row - query_start = position
  // per-thread buffers, reused from item to item: decode items are small (~1 us each) and five
  // allocations apiece were a measurable share
  thread_local std::vector<float> qf, acc, m, l;
  thread_local std::vector<int64_t> pos, lo;  // each row's position and the first key it sees
  qf.resize(rows * D);
  acc.assign(rows * D, 0.f);
  const int64_t rp = (rows + 15) / 16 * 16;  // rows padded to whole vectors (prefill tiles hold rows in lanes)
  m.assign(rp, -std::numeric_limits<float>::infinity());
  l.assign(rp, 0.f);
  pos.resize(rows);
  lo.resize(rows);
  for (int64_t t = 0; t < num_q; ++t) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = t * group + g;
      const T* src = q + ((w.q_begin + t) * num_heads + w.kv_head * group + g) * D;
#ifdef KVSERVE_AVX512
      if (kern != nullptr)
        io->load_q(src, scale, &qf[r * D]);
      else
#endif
        for (int64_t d = 0; d < D; ++d) qf[r * D + at(d)] = to_float(src[d]) * scale;
      pos[r] = w.q_begin + t - query_start;
      lo[r] = window > 0 ? std::max<int64_t>(0, pos[r] - window + 1) : 0;
    }
  }
  const int64_t row_stride = num_kv_heads * D;
#ifdef KVSERVE_AVX512
  if (kern != nullptr) {
    thread_local std::vector<float> scores;
    thread_local std::vector<int64_t> first, visible;  // per row, relative to the span: its first key and its end
    first.resize(rows);
    visible.resize(rows);
    // where key j's row (this item's kv head) is in `cache`; the keys after it in its block follow
    auto rows_at = [&](const C* cache, int64_t j) {
      return cache + (block_table[j / block_size] * block_size + j % block_size) * row_stride + w.kv_head * D;
    };
    auto chunk_end = [&](int64_t j, int64_t end) { return std::min({end, (j / block_size + 1) * block_size, j + 16}); };
    auto prefetch_chunk = [&](const C* cache, const float* scales, int64_t j, int64_t n,
                              _mm_hint hint) __attribute__((always_inline)) {
      prefetch_rows(rows_at(cache, j), n, row_stride, D, hint);
      if (scales != nullptr) prefetch_rows(scales_at(scales, j), 1, 0, 1, hint);
    };
    // each chunk of <= 16 keys (never across a block) of a span, read in place, with its rows' scales. Scattered
    // blocks defeat the hardware prefetcher, so the chunk PREFETCH_CHUNKS ahead is prefetched, and the same chunk
    // of `later` is brought into L2 for what comes next: V while the scores read K, and while P.V reads V,
    // the next kv head's K when this thread runs that head next (`next_head`). The P.V pass finds V in
    // L2 and would leave memory idle; the scores pass is bound by line-fill buffers waiting on DRAM, so
    // starting the next head's K there took a W1-sized decode step's attention from 60-61 to 58.5-59.3 ms
    // (its V as well: no better than none).
    auto for_chunks = [&](int64_t s0, int64_t n, const C* cache, const float* scales, const C* later,
                          const float* later_scales, auto&& use) {
      const int64_t end = s0 + n;
      int64_t ahead = s0;
      for (int64_t i = 0; i < PREFETCH_CHUNKS && ahead < end; ++i) {
        prefetch_chunk(cache, scales, ahead, chunk_end(ahead, end) - ahead, _MM_HINT_T0);
        ahead = chunk_end(ahead, end);
      }
      for (int64_t j0 = s0; j0 < end;) {
        const int64_t j1 = chunk_end(j0, end);
        if (ahead < end) {
          prefetch_chunk(cache, scales, ahead, chunk_end(ahead, end) - ahead, _MM_HINT_T0);
          ahead = chunk_end(ahead, end);
        }
        if (later != nullptr) prefetch_chunk(later, later_scales, j0, j1 - j0, _MM_HINT_T1);
        use(j0 - s0, j1 - j0, rows_at(cache, j0), scales_at(scales, j0));
        j0 = j1;
      }
    };
    const C* next_k = next_head ? k_cache + D : nullptr;
    const float* next_k_scale = next_head && k_scale != nullptr ? k_scale + block_size : nullptr;
    if (rows >= TILE_ROWS) {
      thread_local std::vector<float> qt, fst, vis, mx;
      qt.resize(D * rp);
      transpose_rows(qf.data(), rows, D, rp, qt.data());
      fst.resize(rp);
      vis.resize(rp);
      mx.resize(rp);
      scores.resize((SPAN + 16) * rp);
      for (int64_t s0 = w.k_begin; s0 < w.k_end; s0 += SPAN) {
        const int64_t n = std::min(SPAN, w.k_end - s0);
        for (int64_t r = 0; r < rp; ++r) {  // causal, within the window; padding rows see nothing
          fst[r] = r < rows ? static_cast<float>(std::clamp<int64_t>(lo[r] - s0, 0, n)) : 0.f;
          vis[r] = r < rows ? static_cast<float>(std::clamp<int64_t>(pos[r] + 1 - s0, 0, n)) : 0.f;
        }
        std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
        for_chunks(s0, n, k_cache, k_scale, v_cache, v_scale, [&](int64_t off, int64_t nk, const C* k, const float* ks) {
          kern->tile_scores(qt.data(), rp, k, row_stride, nk, fst.data(), vis.data(), off, scores.data(), mx.data(), ks);
        });
        kern->tile_softmax(scores.data(), rp, n, mx.data(), rows, m.data(), l.data(), acc.data());
        for_chunks(s0, n, v_cache, v_scale, next_k, next_k_scale, [&](int64_t off, int64_t nk, const C* v, const float* vs) {
          kern->tile_pv(scores.data() + off * rp, rp, v, row_stride, nk, rows, acc.data(), vs);
        });
      }
    } else {
      scores.resize(rows * SROW);
      for (int64_t s0 = w.k_begin; s0 < w.k_end; s0 += SPAN) {
        const int64_t n = std::min(SPAN, w.k_end - s0);
        for (int64_t r = 0; r < rows; ++r) {  // causal, within the window
          first[r] = std::max<int64_t>(0, lo[r] - s0);
          visible[r] = std::min(n, pos[r] + 1 - s0);
        }
        for_chunks(s0, n, k_cache, k_scale, v_cache, v_scale, [&](int64_t off, int64_t nk, const C* k, const float* ks) {
          kern->scores(qf.data(), k, row_stride, nk, first.data(), visible.data(), rows, off, scores.data(), ks);
        });
        kern->softmax(scores.data(), n, first.data(), visible.data(), rows, m.data(), l.data(), acc.data());
        for_chunks(s0, n, v_cache, v_scale, next_k, next_k_scale, [&](int64_t off, int64_t nk, const C* v, const float* vs) {
          kern->pv(scores.data() + off, v, row_stride, nk, rows, acc.data(), vs);
        });
      }
    }
  } else
#endif
  {
    // fp32 caches are read in place (row stride = all kv heads); others are widened per block
    const int64_t kv_stride = std::is_same_v<C, float> ? row_stride : D;
    std::vector<float> kf(block_size * D), vf(block_size * D), s(block_size);
    for (int64_t j0 = w.k_begin; j0 < w.k_end; j0 = (j0 / block_size + 1) * block_size) {
      const int64_t j1 = std::min(w.k_end, (j0 / block_size + 1) * block_size);
      const int64_t nk = j1 - j0;
      const int64_t block = block_table[j0 / block_size];
      const int64_t base = (block * block_size + j0 % block_size) * row_stride + w.kv_head * D;
      const float* kb = rows_as_float(k_cache + base, nk, row_stride, D, kf.data(), scales_at(k_scale, j0));
      const float* vb = rows_as_float(v_cache + base, nk, row_stride, D, vf.data(), scales_at(v_scale, j0));
      for (int64_t r = 0; r < rows; ++r) {
        // causal: keys up to the query's own position; within the window: from lo[r] on
        const int64_t skip = std::max<int64_t>(0, lo[r] - j0);
        const int64_t valid = std::min(nk, pos[r] + 1 - j0) - skip;
        if (valid <= 0) continue;
        scores(&qf[r * D], kb + skip * kv_stride, kv_stride, valid, D, s.data());
        const float block_max = *std::max_element(s.begin(), s.begin() + valid);
        const float m_new = std::max(m[r], block_max);
        const float correction = std::exp(m[r] - m_new);
        l[r] = l[r] * correction + exp_shifted(s.data(), valid, m_new);
        accumulate(&acc[r * D], correction, s.data(), vb + skip * kv_stride, kv_stride, valid, D);
        m[r] = m_new;
      }
    }
  }
  for (int64_t t = 0; t < num_q; ++t) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = t * group + g;
      const int64_t head = w.kv_head * group + g;
      if (w.partial < 0) {
        T* dst = out + ((w.q_begin + t) * num_heads + head) * D;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#ifdef KVSERVE_AVX512
        if (kern != nullptr)
          io->store_out(&acc[r * D], inv, dst);
        else
#endif
          for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(acc[r * D + at(d)] * inv);
        if (lse != nullptr) lse[(w.q_begin + t) * num_heads + head] = log_sum_exp(m[r], l[r]);
      } else {
        float* dst = part_acc + (w.partial * group + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + at(d)];
        part_ml[(w.partial * group + g) * 2] = m[r];
        part_ml[(w.partial * group + g) * 2 + 1] = l[r];
      }
    }
  }
}

// q, out: [T, Hq, D] of T; k, v: the cache's rows of C, with their scales where C is quantized (see run_item);
// lse: null, or [T, Hq] fp32 receiving each row's log-sum-exp of its scaled scores (attention sinks merge with it).
template <typename T, typename C>
void paged_attention(const T* qp, const C* kp, const C* vp, const float* k_scale, const float* v_scale,
                     const int64_t* tp, int64_t max_blocks, const int64_t* lens_p, const int64_t* qsl_p, int64_t S,
                     int64_t num_heads, int64_t num_kv_heads, int64_t D, int64_t block_size, float scale,
                     int64_t query_tile, int64_t split_len, int64_t window, int num_threads, T* op,
                     float* lse = nullptr) {
  const int64_t group = num_heads / num_kv_heads;

  // Plan the work: query tiles for prefill chunks, key slices for long decodes.
  std::vector<WorkItem> items;
  std::vector<int64_t> item_query_start;
  int64_t num_partials = 0;
  std::vector<std::pair<int64_t, int64_t>> merges;        // (first partial, count) per split decode (seq, kv head)
  std::vector<std::pair<int64_t, int64_t>> merge_target;  // (q row, kv head)
  // With fewer (decode, kv head) pairs than 2 per thread, decodes are split finer than split_len
  // (down to MIN_SLICE keys) so that every thread has work: a single stream uses both cores.
  constexpr int64_t MIN_SLICE = 64;
  int64_t decode_pairs = 0;
  for (int64_t s = 0; s < S; ++s) decode_pairs += (qsl_p[s + 1] - qsl_p[s] == 1) * num_kv_heads;
  const int64_t pieces = decode_pairs > 0 ? (2 * num_threads + decode_pairs - 1) / decode_pairs : 1;
  const int64_t tile_tokens = std::max<int64_t>(1, query_tile / group);  // query_tile counts rows (tokens x group)
  for (int64_t s = 0; s < S; ++s) {
    const int64_t qb = qsl_p[s], qe = qsl_p[s + 1], L = lens_p[s];
    const int64_t q_len = qe - qb;
    if (q_len == 0) continue;
    const int64_t context = L - q_len;
    // the first key a query at position p sees
    auto window_start = [window](int64_t p) { return window > 0 ? std::max<int64_t>(0, p - window + 1) : 0; };
    const int64_t decode_start = window_start(L - 1);  // a decode's keys: decode_start .. L
    const int64_t keys = L - decode_start;
    const int64_t slice = split_len <= 0 ? 0 : std::min(split_len, std::max(MIN_SLICE, (keys + pieces - 1) / pieces));
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      if (q_len == 1 && slice > 0 && keys > slice) {
        const int64_t n = (keys + slice - 1) / slice;
        merges.emplace_back(num_partials, n);
        merge_target.emplace_back(qb, h);
        for (int64_t i = 0; i < n; ++i) {
          items.push_back({s, h, qb, qe, decode_start + i * slice, std::min(L, decode_start + (i + 1) * slice),
                           num_partials++});
          item_query_start.push_back(qb - context);
        }
        continue;
      }
      for (int64_t t = qb; t < qe; t += tile_tokens) {
        const int64_t te = std::min(qe, t + tile_tokens);
        items.push_back({s, h, t, te, window_start(context + (t - qb)), context + (te - qb), -1});
        item_query_start.push_back(qb - context);
      }
    }
  }

  std::vector<float> part_acc(std::max<int64_t>(num_partials, 1) * group * D);
  std::vector<float> part_ml(std::max<int64_t>(num_partials, 1) * group * 2);
  float* pa = part_acc.data();
  float* pm = part_ml.data();
  const int64_t num_items = static_cast<int64_t>(items.size());
  // A thread takes the items of all kv heads of a sequence together (they are adjacent in `items`) when
  // there are enough to go round: the heads' rows share cache lines and pages (a token's K row holds
  // every kv head), so one core reading them in turn finds the lines its first head brought in.
  const int64_t heads_per_grab = std::max<int64_t>(1, std::min<int64_t>(num_kv_heads, num_items / (4 * num_threads)));
#pragma omp parallel for schedule(dynamic, heads_per_grab) num_threads(num_threads)
  for (int64_t i = 0; i < num_items; ++i) {
    const WorkItem& w = items[i];
    // whether this thread's next item is the next kv head over the same keys (a grab's items are consecutive)
    const bool next_head = (i + 1) % heads_per_grab != 0 && i + 1 < num_items && items[i + 1].seq == w.seq &&
                           items[i + 1].kv_head == w.kv_head + 1 && items[i + 1].k_begin == w.k_begin &&
                           items[i + 1].k_end == w.k_end;
    run_item<T, C>(w, qp, kp, vp, k_scale, v_scale, tp + w.seq * max_blocks, item_query_start[i], num_heads, num_kv_heads, D,
                   block_size, scale, window, op, lse, pa, pm, next_head);
  }
  const int64_t num_merges = static_cast<int64_t>(merges.size());
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t i = 0; i < num_merges; ++i) {
    const int64_t first = merges[i].first, n = merges[i].second;
    const int64_t row = merge_target[i].first, h = merge_target[i].second;
    std::vector<float> acc(D);
    for (int64_t g = 0; g < group; ++g) {
      float m_max = -std::numeric_limits<float>::infinity();
      for (int64_t p = 0; p < n; ++p) m_max = std::max(m_max, pm[((first + p) * group + g) * 2]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float total = 0.f;
      for (int64_t p = 0; p < n; ++p) {
        const float m_p = pm[((first + p) * group + g) * 2];
        const float l_p = pm[((first + p) * group + g) * 2 + 1];
        if (l_p == 0.f) continue;
        const float w = std::exp(m_p - m_max);
        total += w * l_p;
        const float* src = pa + ((first + p) * group + g) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * src[d];
      }
      T* dst = op + (row * num_heads + h * group + g) * D;
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(acc[d] * inv);
      if (lse != nullptr) lse[row * num_heads + h * group + g] = log_sum_exp(m_max, total);
    }
  }
}

// Rows t < tokens of k and v (`row` elements each, `k_stride`/`v_stride` apart: views of a fused QKV
// output) copied to their cache slots: one memcpy per row, in parallel when there are many.
template <typename T>
void store_kv(const T* k, int64_t k_stride, const T* v, int64_t v_stride, const int64_t* slots, int64_t tokens,
              int64_t row, T* k_cache, T* v_cache) {
#pragma omp parallel for if (tokens >= 256)
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(k_cache + slots[t] * row, k + t * k_stride, row * sizeof(T));
    std::memcpy(v_cache + slots[t] * row, v + t * v_stride, row * sizeof(T));
  }
}

// x (D values) quantized symmetrically into dst: *scale = amax / kQMax, dst = x / scale rounded to C (to
// nearest even; int8 clamped to +-127, fp8 saturating at +-448); an all-zero row gets scale 0 and zeros.
// The arithmetic of kvserve.attention.kv_quant.quantize, step for step, so both write the same bytes.
template <typename T, typename C>
void quantize_row(const T* x, int64_t D, C* dst, float* scale) {
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(to_float(x[d])));
  const float s = amax / kQMax<C>;
  *scale = s;
  const float divisor = s > 0.f ? s : 1.f;
  for (int64_t d = 0; d < D; ++d) {
    const float y = to_float(x[d]) / divisor;
    if constexpr (std::is_same_v<C, int8_t>)
      dst[d] = static_cast<int8_t>(std::clamp(std::nearbyint(y), -127.f, 127.f));
    else
      dst[d] = kvserve::fp8_e4m3_from_float(y);
  }
}

// store_kv into an int8 / fp8 cache: each (token, kv head) row of k and v quantized into its slot, its scale
// into k_scale / v_scale ([blocks, kv heads, block_size]).
template <typename T, typename C>
void store_kv_quantized(const T* k, int64_t k_stride, const T* v, int64_t v_stride, const int64_t* slots,
                        int64_t tokens, int64_t num_kv_heads, int64_t D, int64_t block_size, C* k_cache, C* v_cache,
                        float* k_scale, float* v_scale) {
#pragma omp parallel for if (tokens >= 256)
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = slots[t];
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const int64_t row = (slot * num_kv_heads + h) * D;
      const int64_t at = (slot / block_size * num_kv_heads + h) * block_size + slot % block_size;
      quantize_row(k + t * k_stride + h * D, D, k_cache + row, k_scale + at);
      quantize_row(v + t * v_stride + h * D, D, v_cache + row, v_scale + at);
    }
  }
}

}  // namespace

// k, v: [T, Hkv, D] with rows `k_stride`/`v_stride` elements apart; slots: [T] int64; caches as below.
#define KVSERVE_STORE(NAME, T)                                                                                       \
  extern "C" void NAME(const void* k, int64_t k_stride, const void* v, int64_t v_stride, const int64_t* slots,      \
                       int64_t tokens, int64_t row, void* k_cache, void* v_cache) {                                 \
    store_kv<T>(static_cast<const T*>(k), k_stride, static_cast<const T*>(v), v_stride, slots, tokens, row,          \
                static_cast<T*>(k_cache), static_cast<T*>(v_cache));                                                \
  }

KVSERVE_STORE(store_kv_f32, float)
KVSERVE_STORE(store_kv_bf16, bf16)
KVSERVE_STORE(store_kv_f16, _Float16)

// The same into an int8 / fp8 e4m3 cache (C) with its scales k_scale, v_scale: [num_blocks, Hkv, block_size] fp32.
#define KVSERVE_QUANTIZED_STORE(NAME, T, C)                                                                          \
  extern "C" void NAME(const void* k, int64_t k_stride, const void* v, int64_t v_stride, const int64_t* slots,      \
                       int64_t tokens, int64_t num_kv_heads, int64_t head_dim, int64_t block_size, void* k_cache,    \
                       void* v_cache, float* k_scale, float* v_scale) {                                              \
    store_kv_quantized<T, C>(static_cast<const T*>(k), k_stride, static_cast<const T*>(v), v_stride, slots, tokens,  \
                             num_kv_heads, head_dim, block_size, static_cast<C*>(k_cache), static_cast<C*>(v_cache), \
                             k_scale, v_scale);                                                                      \
  }

KVSERVE_QUANTIZED_STORE(store_kv_f32_int8, float, int8_t)
KVSERVE_QUANTIZED_STORE(store_kv_bf16_int8, bf16, int8_t)
KVSERVE_QUANTIZED_STORE(store_kv_f16_int8, _Float16, int8_t)
KVSERVE_QUANTIZED_STORE(store_kv_f32_fp8_e4m3, float, fp8_e4m3)
KVSERVE_QUANTIZED_STORE(store_kv_bf16_fp8_e4m3, bf16, fp8_e4m3)
KVSERVE_QUANTIZED_STORE(store_kv_f16_fp8_e4m3, _Float16, fp8_e4m3)

// q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [S, max_blocks];
// seq_lens: [S]; query_start_loc: [S + 1] (all int64, contiguous); out: [T, Hq, D], same dtype as q;
// window: the sliding window (each query sees its last `window` keys), 0 for full causal attention;
// lse: null, or [T, Hq] fp32 for each row's log-sum-exp.
#define KVSERVE_ENTRY(NAME, T)                                                                                       \
  extern "C" void NAME(const void* q, const void* k, const void* v, const int64_t* tables, int64_t max_blocks,        \
                       const int64_t* seq_lens, const int64_t* qsl, int64_t num_seqs, int64_t num_heads,              \
                       int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int64_t query_tile,   \
                       int64_t split_len, int64_t window, int num_threads, void* out, float* lse) {                    \
    paged_attention<T, T>(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), nullptr,     \
                          nullptr, tables, max_blocks, seq_lens, qsl, num_seqs, num_heads, num_kv_heads, head_dim,   \
                          block_size, scale, query_tile, split_len, window, num_threads, static_cast<T*>(out), lse); \
  }

KVSERVE_ENTRY(paged_attention_f32, float)
KVSERVE_ENTRY(paged_attention_bf16, bf16)
KVSERVE_ENTRY(paged_attention_f16, _Float16)

// The same over an int8 / fp8 e4m3 cache (C) with its scales k_scale, v_scale: [num_blocks, Hkv, block_size] fp32.
#define KVSERVE_QUANTIZED_ENTRY(NAME, T, C)                                                                          \
  extern "C" void NAME(const void* q, const void* k, const void* v, const float* k_scale, const float* v_scale,     \
                       const int64_t* tables, int64_t max_blocks, const int64_t* seq_lens, const int64_t* qsl,        \
                       int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,                   \
                       int64_t block_size, float scale, int64_t query_tile, int64_t split_len, int64_t window,        \
                       int num_threads, void* out, float* lse) {                                                       \
    paged_attention<T, C>(static_cast<const T*>(q), static_cast<const C*>(k), static_cast<const C*>(v), k_scale,     \
                          v_scale, tables, max_blocks, seq_lens, qsl, num_seqs, num_heads, num_kv_heads, head_dim,   \
                          block_size, scale, query_tile, split_len, window, num_threads, static_cast<T*>(out), lse); \
  }

KVSERVE_QUANTIZED_ENTRY(paged_attention_f32_int8, float, int8_t)
KVSERVE_QUANTIZED_ENTRY(paged_attention_bf16_int8, bf16, int8_t)
KVSERVE_QUANTIZED_ENTRY(paged_attention_f16_int8, _Float16, int8_t)
KVSERVE_QUANTIZED_ENTRY(paged_attention_f32_fp8_e4m3, float, fp8_e4m3)
KVSERVE_QUANTIZED_ENTRY(paged_attention_bf16_fp8_e4m3, bf16, fp8_e4m3)
KVSERVE_QUANTIZED_ENTRY(paged_attention_f16_fp8_e4m3, _Float16, fp8_e4m3)
