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
using kvserve::from_float;
using kvserve::to_float;

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

// Rows of a K or V block as fp32: the cache itself for fp32, else widened into `buf`.
template <typename scalar_t>
inline const float* rows_as_float(const scalar_t* src, int64_t n, int64_t stride, int64_t D, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    (void)n;
    (void)D;
    (void)buf;
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; ++d) buf[j * D + d] = to_float(src[j * stride + d]);
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

struct WorkItem {
  int64_t seq;
  int64_t kv_head;
  int64_t q_begin;  // token rows of q, absolute in the flat batch
  int64_t q_end;
  int64_t k_begin;  // key positions of this slice
  int64_t k_end;
  int64_t partial;  // index into the partial buffers, or -1 when the item writes out directly
};

template <typename scalar_t>
void run_item(const WorkItem& w, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
              const int64_t* block_table, int64_t query_start, int64_t num_heads,
              int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, scalar_t* out,
              float* part_acc, float* part_ml) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t num_q = w.q_end - w.q_begin;
  const int64_t rows = num_q * group;
  const int64_t D = head_dim;
  // `query_start` is the flat row a query at absolute position 0 would have, so row - query_start = position
  std::vector<float> qf(rows * D), acc(rows * D, 0.f), m(rows, -std::numeric_limits<float>::infinity()), l(rows, 0.f);
  std::vector<int64_t> pos(rows);
  std::vector<float> kf(block_size * D), vf(block_size * D), s(block_size);
  for (int64_t t = 0; t < num_q; ++t) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = t * group + g;
      const scalar_t* src = q + ((w.q_begin + t) * num_heads + w.kv_head * group + g) * D;
      for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_float(src[d]) * scale;
      pos[r] = w.q_begin + t - query_start;
    }
  }
  const int64_t row_stride = num_kv_heads * D;
  // fp32 caches are read in place (row stride = all kv heads); others are widened per block
  const int64_t kv_stride = std::is_same_v<scalar_t, float> ? row_stride : D;
  for (int64_t j0 = w.k_begin; j0 < w.k_end; j0 = (j0 / block_size + 1) * block_size) {
    const int64_t j1 = std::min(w.k_end, (j0 / block_size + 1) * block_size);
    const int64_t nk = j1 - j0;
    const int64_t block = block_table[j0 / block_size];
    const int64_t base = (block * block_size + j0 % block_size) * row_stride + w.kv_head * D;
    const float* kb = rows_as_float(k_cache + base, nk, row_stride, D, kf.data());
    const float* vb = rows_as_float(v_cache + base, nk, row_stride, D, vf.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t valid = std::min(nk, pos[r] + 1 - j0);  // causal: keys up to the query's own position
      if (valid <= 0) continue;
      scores(&qf[r * D], kb, kv_stride, valid, D, s.data());
      const float block_max = *std::max_element(s.begin(), s.begin() + valid);
      const float m_new = std::max(m[r], block_max);
      const float correction = std::exp(m[r] - m_new);
      l[r] = l[r] * correction + exp_shifted(s.data(), valid, m_new);
      accumulate(&acc[r * D], correction, s.data(), vb, kv_stride, valid, D);
      m[r] = m_new;
    }
  }
  for (int64_t t = 0; t < num_q; ++t) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = t * group + g;
      const int64_t head = w.kv_head * group + g;
      if (w.partial < 0) {
        scalar_t* dst = out + ((w.q_begin + t) * num_heads + head) * D;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t d = 0; d < D; ++d) dst[d] = from_float<scalar_t>(acc[r * D + d] * inv);
      } else {
        float* dst = part_acc + (w.partial * group + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d];
        part_ml[(w.partial * group + g) * 2] = m[r];
        part_ml[(w.partial * group + g) * 2 + 1] = l[r];
      }
    }
  }
}

template <typename scalar_t>
void paged_attention(const scalar_t* qp, const scalar_t* kp, const scalar_t* vp, const int64_t* tp, int64_t max_blocks,
                     const int64_t* lens_p, const int64_t* qsl_p, int64_t S, int64_t num_heads, int64_t num_kv_heads,
                     int64_t D, int64_t block_size, float scale, int64_t query_tile, int64_t split_len, int num_threads,
                     scalar_t* op) {
  const int64_t group = num_heads / num_kv_heads;

  // Plan the work: query tiles for prefill chunks, key slices for long decodes.
  std::vector<WorkItem> items;
  std::vector<int64_t> item_query_start;
  int64_t num_partials = 0;
  std::vector<std::pair<int64_t, int64_t>> merges;        // (first partial, count) per split decode (seq, kv head)
  std::vector<std::pair<int64_t, int64_t>> merge_target;  // (q row, kv head)
  for (int64_t s = 0; s < S; ++s) {
    const int64_t qb = qsl_p[s], qe = qsl_p[s + 1], L = lens_p[s];
    const int64_t q_len = qe - qb;
    if (q_len == 0) continue;
    const int64_t context = L - q_len;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      if (q_len == 1 && split_len > 0 && L > split_len) {
        const int64_t n = (L + split_len - 1) / split_len;
        merges.emplace_back(num_partials, n);
        merge_target.emplace_back(qb, h);
        for (int64_t i = 0; i < n; ++i) {
          items.push_back({s, h, qb, qe, i * split_len, std::min(L, (i + 1) * split_len), num_partials++});
          item_query_start.push_back(qb - context);
        }
        continue;
      }
      for (int64_t t = qb; t < qe; t += query_tile) {
        const int64_t te = std::min(qe, t + query_tile);
        items.push_back({s, h, t, te, 0, context + (te - qb), -1});
        item_query_start.push_back(qb - context);
      }
    }
  }

  std::vector<float> part_acc(std::max<int64_t>(num_partials, 1) * group * D);
  std::vector<float> part_ml(std::max<int64_t>(num_partials, 1) * group * 2);
  float* pa = part_acc.data();
  float* pm = part_ml.data();
  const int64_t num_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t i = 0; i < num_items; ++i) {
    const WorkItem& w = items[i];
    run_item<scalar_t>(w, qp, kp, vp, tp + w.seq * max_blocks, item_query_start[i], num_heads, num_kv_heads, D,
                       block_size, scale, op, pa, pm);
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
      scalar_t* dst = op + (row * num_heads + h * group + g) * D;
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<scalar_t>(acc[d] * inv);
    }
  }
}

}  // namespace

// q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [S, max_blocks];
// seq_lens: [S]; query_start_loc: [S + 1] (all int64, contiguous); out: [T, Hq, D], same dtype as q.
#define KVSERVE_ENTRY(NAME, T)                                                                                       \
  extern "C" void NAME(const void* q, const void* k, const void* v, const int64_t* tables, int64_t max_blocks,        \
                       const int64_t* seq_lens, const int64_t* qsl, int64_t num_seqs, int64_t num_heads,              \
                       int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int64_t query_tile,   \
                       int64_t split_len, int num_threads, void* out) {                                                \
    paged_attention<T>(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), tables,          \
                       max_blocks, seq_lens, qsl, num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale,    \
                       query_tile, split_len, num_threads, static_cast<T*>(out));                                    \
  }

KVSERVE_ENTRY(paged_attention_f32, float)
KVSERVE_ENTRY(paged_attention_bf16, bf16)
KVSERVE_ENTRY(paged_attention_f16, _Float16)
