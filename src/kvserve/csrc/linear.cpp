// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for the small M of decode steps.
//
// Why not torch: at M = 1..32 `F.linear` on this kind of CPU streams the weights at
// 10-14 GB/s, a quarter of the read bandwidth, and an fp32 product with 4 rows is
// slower than with 1 (docs/PERFORMANCE.md). A decode step is a chain of such
// products, so it runs at the speed of this loop.
//
// The loop: each thread owns a contiguous range of weight rows and streams it once.
// For 4 weight rows at a time it walks all M rows of x (which stay in L1/L2), 2 rows
// at a time, keeping 2 x 4 dot products in 8 AVX registers: 6 loads per 8 FMAs.
// bf16 weights are widened to fp32 once per 4-row block into an L1 buffer, so they
// cost half the memory traffic and nothing extra per x row. Accumulation is fp32.
//
// Plain C ABI (ctypes), built by g++ with -march=native; a scalar path covers CPUs
// without AVX2/FMA.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "vec_math.h"

namespace {

using kvserve::bf16;
using kvserve::from_float;
using kvserve::to_float;
#ifdef KVSERVE_AVX2
using kvserve::load8;
#endif

// Widen `n` values to fp32.
inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void widen(const bf16* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef KVSERVE_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

constexpr int64_t NR = 4;  // weight rows per block
constexpr int64_t MR = 2;  // x rows per micro-kernel call

#ifdef KVSERVE_AVX2
// The 4 horizontal sums of a, b, c, d as one 128-bit vector.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
#endif

// out[r][j] = dot(x_r, w_j) for `rows` (1 or 2) x rows and 4 weight rows.
inline void micro_kernel(const float* x0, const float* x1, int64_t rows, const float* w, int64_t K, float out[MR][NR]) {
  const float* w0 = w;
  const float* w1 = w + K;
  const float* w2 = w + 2 * K;
  const float* w3 = w + 3 * K;
  int64_t k = 0;
#ifdef KVSERVE_AVX2
  const int64_t k8 = K & ~int64_t(7);
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  if (rows == 2) {
    for (; k < k8; k += 8) {
      const __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k);
      const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
      const __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
      a00 = _mm256_fmadd_ps(xa, v0, a00);
      a01 = _mm256_fmadd_ps(xa, v1, a01);
      a02 = _mm256_fmadd_ps(xa, v2, a02);
      a03 = _mm256_fmadd_ps(xa, v3, a03);
      a10 = _mm256_fmadd_ps(xb, v0, a10);
      a11 = _mm256_fmadd_ps(xb, v1, a11);
      a12 = _mm256_fmadd_ps(xb, v2, a12);
      a13 = _mm256_fmadd_ps(xb, v3, a13);
    }
  } else {
    for (; k < k8; k += 8) {
      const __m256 xa = _mm256_loadu_ps(x0 + k);
      a00 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w0 + k), a00);
      a01 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w1 + k), a01);
      a02 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w2 + k), a02);
      a03 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w3 + k), a03);
    }
  }
  _mm_storeu_ps(out[0], hsum4(a00, a01, a02, a03));
  _mm_storeu_ps(out[1], hsum4(a10, a11, a12, a13));
#else
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t j = 0; j < NR; ++j) out[r][j] = 0.f;
#endif
  for (; k < K; ++k) {
    const float xs[MR] = {x0[k], rows == 2 ? x1[k] : 0.f};
    for (int64_t r = 0; r < rows; ++r) {
      out[r][0] += xs[r] * w0[k];
      out[r][1] += xs[r] * w1[k];
      out[r][2] += xs[r] * w2[k];
      out[r][3] += xs[r] * w3[k];
    }
  }
}

// dot(x, w) for one weight row, read front to back: one sequential stream per thread, which
// is what the hardware prefetcher follows best (the M = 1 case is pure weight streaming).
template <typename W>
inline float dot(const float* x, const W* w, int64_t K) {
  int64_t k = 0;
  float s = 0.f;
#ifdef KVSERVE_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8(w + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load8(w + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load8(w + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w + k), a0);
  const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  s = _mm_cvtss_f32(hsum4(a, a, a, a));
#endif
  for (; k < K; ++k) s += x[k] * to_float(w[k]);
  return s;
}

template <typename T, typename W>
void linear(const T* x, const W* w, const W* bias, T* y, int64_t M, int64_t N, int64_t K, int num_threads) {
  // x in fp32, read many times: once per block of 4 weight rows.
  std::vector<float> x_buf;
  const float* xf;
  if constexpr (std::is_same_v<T, float>) {
    xf = x;
  } else {
    x_buf.resize(M * K);
    widen(x, x_buf.data(), M * K);
    xf = x_buf.data();
  }
  const int64_t num_blocks = (N + NR - 1) / NR;
  num_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, num_blocks)));
#pragma omp parallel num_threads(num_threads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    const int64_t begin = num_blocks * tid / num_threads, end = num_blocks * (tid + 1) / num_threads;
    if (M == 1) {  // a matrix-vector product: stream this thread's weight rows in order
      for (int64_t n = begin * NR; n < std::min(N, end * NR); ++n)
        y[n] = from_float<T>(dot(xf, w + n * K, K) + (bias != nullptr ? to_float(bias[n]) : 0.f));
    } else {
    std::vector<float> w_buf(std::is_same_v<W, float> ? 0 : NR * K);
    float out[MR][NR];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * NR;
      const int64_t nr = std::min(NR, N - n0);
      const float* wf;
      if constexpr (std::is_same_v<W, float>) {
        wf = w + n0 * K;
      } else {
        widen(w + n0 * K, w_buf.data(), nr * K);
        wf = w_buf.data();
      }
      float bias_f[NR] = {0.f, 0.f, 0.f, 0.f};
      if (bias != nullptr)
        for (int64_t j = 0; j < nr; ++j) bias_f[j] = to_float(bias[n0 + j]);
      if (nr == NR) {
        for (int64_t m = 0; m < M; m += MR) {
          const int64_t rows = std::min(MR, M - m);
          micro_kernel(xf + m * K, xf + (m + rows - 1) * K, rows, wf, K, out);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < NR; ++j) y[(m + r) * N + n0 + j] = from_float<T>(out[r][j] + bias_f[j]);
        }
      } else {  // the last, partial block of weight rows
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = 0; j < nr; ++j)
            y[m * N + n0 + j] = from_float<T>(dot(xf + m * K, wf + j * K, K) + bias_f[j]);
      }
    }
    }
  }
}

}  // namespace

// x: [M, K] (dtype X), w: [N, K] (dtype W), bias: [N] (dtype W) or null, y: [M, N] (dtype X); all contiguous.
#define KVSERVE_LINEAR(NAME, X, W)                                                                         \
  extern "C" void NAME(const void* x, const void* w, const void* bias, void* y, int64_t M, int64_t N,        \
                       int64_t K, int num_threads) {                                                        \
    linear<X, W>(static_cast<const X*>(x), static_cast<const W*>(w), static_cast<const W*>(bias),            \
                 static_cast<X*>(y), M, N, K, num_threads);                                                 \
  }

KVSERVE_LINEAR(linear_f32_f32, float, float)
KVSERVE_LINEAR(linear_bf16_bf16, bf16, bf16)
KVSERVE_LINEAR(linear_f32_bf16, float, bf16)
