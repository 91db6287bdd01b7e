// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for the small M of decode steps.
//
// Why not torch: at M = 1..32 `F.linear` on this kind of CPU streams the weights at
// 10-14 GB/s, a quarter of the read bandwidth, and an fp32 product with 4 rows is
// slower than with 1 (docs/PERFORMANCE.md). A decode step is a chain of such
// products, so it runs at the speed of this loop.
//
// The loop: threads take chunks of weight rows (two per thread, 64-256 KB of weights each)
// dynamically and stream each once, so that a thread whose core another process keeps busy
// takes fewer instead of holding up the others at the end (the GEMM of batched steps splits
// whole panels evenly instead). Portable and AVX2 paths: up to 6 x rows (FEW_ROWS), each weight row is
// streamed once, in order, against two x rows at a time (dot_rows), each row accumulated as the one-row
// product accumulates it, so its outputs do not depend on the row count; above, for 4 weight rows at a
// time it walks all M rows of x (which stay in L1/L2), 2 rows at a time, keeping 2 x 4 dot products in
// 8 AVX registers: 6 loads per 8 FMAs, where dot_rows needs 12 (measured on the AVX2 build: dot_rows
// 1.2-1.6x faster at 2-6 rows, 10% slower at 8). bf16 weights are widened to fp32 once per 4-row block
// into an L1 buffer, so they cost half the memory traffic and nothing extra per x row. Accumulation is
// fp32. The AVX-512 BF16 path is described where it starts.
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

#ifdef _OPENMP
inline int64_t thread_index() { return omp_get_thread_num(); }
inline int64_t thread_count() { return omp_get_num_threads(); }
#else
inline int64_t thread_index() { return 0; }
inline int64_t thread_count() { return 1; }
#endif

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
constexpr int64_t FEW_ROWS = 6;  // up to this many x rows each weight row is streamed once (dot_rows); above, 4 x 2 tiles

// Weight rows per dynamically taken chunk of a few-row product: two chunks per thread, at least 64 KB and at
// most 256 KB of weights, a multiple of `align` rows (quant_linear.cpp's split, measured there: smaller chunks
// restart each thread's prefetch stream).
inline int64_t chunk_rows(int64_t N, int64_t row_bytes, int threads, int64_t align) {
  const int64_t bytes = std::clamp<int64_t>(N * row_bytes / (2 * std::max(threads, 1)), 64 << 10, 256 << 10);
  return std::max<int64_t>(align, bytes / row_bytes / align * align);
}

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

// out[r] = dot(x_r, w) for R (1 or 2) x rows and one weight row, read front to back: one sequential stream
// per thread, which is what the hardware prefetcher follows best (the one-row case is pure weight
// streaming). Every row is accumulated the same way at any R (four vector sums over 32 k at a time, a tail
// of 8 k into the first, their sum, then the last k one by one), so a row's output does not depend on how
// many rows share the call.
template <int R, typename W>
inline void dot_rows(const float* const* xr, const W* w, int64_t K, float* out) {
  int64_t k = 0;
  float s[R];
  for (int r = 0; r < R; ++r) s[r] = 0.f;
#ifdef KVSERVE_AVX2
  __m256 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) a[r][i] = _mm256_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    const __m256 w0 = load8(w + k), w1 = load8(w + k + 8), w2 = load8(w + k + 16), w3 = load8(w + k + 24);
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r] + k), w0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r] + k + 8), w1, a[r][1]);
      a[r][2] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r] + k + 16), w2, a[r][2]);
      a[r][3] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r] + k + 24), w3, a[r][3]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 w0 = load8(w + k);
    for (int r = 0; r < R; ++r) a[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r] + k), w0, a[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    const __m256 v = _mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3]));
    s[r] = _mm_cvtss_f32(hsum4(v, v, v, v));
  }
#endif
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r) s[r] += xr[r][k] * to_float(w[k]);
  for (int r = 0; r < R; ++r) out[r] = s[r];
}

template <typename W>
inline float dot(const float* x, const W* w, int64_t K) {
  float s;
  dot_rows<1>(&x, w, K, &s);
  return s;
}

#ifdef KVSERVE_AVX512_BF16
// ---- bf16 x bf16 on CPUs with AVX-512 BF16 ----
//
// vdpbf16ps everywhere: on Zen 4 it issues at the fp32 FMA's rate and multiplies two k per lane, so it
// has twice the FMA's FLOP/s (232 vs 115 GFLOP/s per core, measured), and it reads bf16 as it is.
// 1-23 rows (decode steps, speculative verification, small batches): each weight row streamed once, in
// place and prefetched, dotted with up to 8 x rows at a time (dot_rows_bf16); every row's outputs equal
// its one-row product bit for bit.
// 24+ rows: a GEMM over packed panels of weight pairs (gemm_bf16).

using kvserve::as_bh;
using kvserve::first_lanes;
using kvserve::hsum16;

// A grow-only per-thread buffer, 64-byte aligned: a fresh allocation of this size per call would be
// an mmap with page faults every time.
inline float* scratch(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n + 16) buf.resize(n + 16);
  return buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) / 4 % 16) % 16;
}

inline __mmask32 tail_mask(int64_t n) { return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }
inline __m512bh load32(const bf16* p, __mmask32 mask) { return as_bh(_mm512_maskz_loadu_epi16(mask, p)); }

// y = round(sums + bias) for 16 outputs of which the first n are stored.
inline void store_row(const __m512 sums, const bf16* bias, bf16* y, int64_t n) {
  const __mmask16 mask = first_lanes(n);
  __m512 v = sums;
  if (bias != nullptr)
    v = _mm512_add_ps(v, kvserve::load16(bias, mask));
  _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

constexpr int64_t PREFETCH_AHEAD = 2048;  // elements: 4 KB ahead of the row being read

// XR (1-8) bf16 x rows against one weight row streamed in place: d[i] = the dot vector of x row i and the
// weight row, accumulated the same way at every XR (k in [0, 32) of each 64 into one sum and [32, 64) into
// another, a tail into the first, then their sum), so after hsum16 every output equals the single-row
// product's bit for bit: a sequence's logits do not depend on how many rows share its step (speculative
// verification, small batches).
template <int XR>
inline void dot_row(const bf16* const* xr, const bf16* row, int64_t K, __m512* d) {
  __m512 a0[XR], a1[XR];
  for (int i = 0; i < XR; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(row + k + PREFETCH_AHEAD), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row + k + PREFETCH_AHEAD + 32), _MM_HINT_T0);
    const __m512bh u = load32(row + k, ~__mmask32(0)), v = load32(row + k + 32, ~__mmask32(0));
    for (int i = 0; i < XR; ++i) {
      a0[i] = _mm512_dpbf16_ps(a0[i], load32(xr[i] + k, ~__mmask32(0)), u);
      a1[i] = _mm512_dpbf16_ps(a1[i], load32(xr[i] + k + 32, ~__mmask32(0)), v);
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 m = tail_mask(K - k);
    const __m512bh u = load32(row + k, m);
    for (int i = 0; i < XR; ++i) a0[i] = _mm512_dpbf16_ps(a0[i], load32(xr[i] + k, m), u);
  }
  for (int i = 0; i < XR; ++i) d[i] = _mm512_add_ps(a0[i], a1[i]);
}

// x rows [0, M) (bf16) against weight rows [n_begin, n_end): each weight row is streamed from memory once,
// in order, and dotted with up to 8 x rows at a time (the x rows stay in L1); each x row's 16 dot vectors
// of a group of 16 weight rows are reduced together by hsum16. vdpbf16ps on the bf16 values in place:
// widening the weights to fp32 first (for fp32 FMAs) held 2-4 rows to 16 GB/s, 1-row decode's 25.
void dot_rows_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int64_t M, int64_t N, int64_t n_begin,
                   int64_t n_end, int64_t K) {
  thread_local std::vector<float> d_buf;
  __m512* dots = reinterpret_cast<__m512*>(scratch(d_buf, M * 16 * 16));  // [M][16] dot vectors
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 16) {
    const int64_t nr = std::min<int64_t>(16, n_end - n0);
    for (int64_t j = 0; j < 16; ++j) {
      const bf16* row = w + (n0 + std::min(j, nr - 1)) * K;  // rows past nr repeat the last (not stored)
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const bf16* xr[8];
        for (int64_t i = 0; i < 8; ++i) xr[i] = x + std::min(m0 + i, M - 1) * K;
        __m512 d[8];
        const int64_t mr = std::min<int64_t>(8, M - m0);
        switch (mr) {
          case 1: dot_row<1>(xr, row, K, d); break;
          case 2: dot_row<2>(xr, row, K, d); break;
          case 3: dot_row<3>(xr, row, K, d); break;
          case 4: dot_row<4>(xr, row, K, d); break;
          case 5: dot_row<5>(xr, row, K, d); break;
          case 6: dot_row<6>(xr, row, K, d); break;
          case 7: dot_row<7>(xr, row, K, d); break;
          default: dot_row<8>(xr, row, K, d);
        }
        for (int64_t i = 0; i < mr; ++i) dots[(m0 + i) * 16 + j] = d[i];
      }
    }
    for (int64_t m = 0; m < M; ++m)
      store_row(hsum16(dots + m * 16), bias != nullptr ? bias + n0 : nullptr, y + m * N + n0, nr);
  }
}

constexpr int64_t PANEL_ROWS = 64;  // weight rows per packed panel: 4 vectors of 16 lanes
constexpr int64_t GEMM_ROWS = 6;  // x rows per micro-kernel: 6 x 4 accumulators of the 32 registers
constexpr int64_t MAX_PANEL_K = 768;  // k per packed chunk (K is cut into equal chunks no longer than this)
// ... except up to this K, taken whole: one chunk needs no fp32 partial sums between chunks, which beat
// the L2 savings of shorter chunks for SmolLM2's down projection (K = 1,536: +3.6-4.5% at 128-2,048 rows),
// while 2 chunks of 1,024 lost 5% against 3 of 683 at K = 2,048 (interleaved A/B)
constexpr int64_t SINGLE_CHUNK_K = 1536;
constexpr int64_t PACKED_BYTES = 640 << 10;  // panels packed together: kept in L2 with room for x rows

// panel[p][r] = the pair (w[n0 + r][k0 + 2p], w[n0 + r][k0 + 2p + 1]) as one dword, for 2p < nk (an odd
// last k pairs with 0); rows r >= nr are 0. 16 rows x 32 k at a time: each row's 32 values are one load of
// 16 pairs, and one 16 x 16 dword transpose turns them into 16 vectors of a pair for 16 rows, which
// vdpbf16ps takes as they are. (A dword gather per pair instead costs ~4x the time.)
void pack_panel(const bf16* w, int64_t K, int64_t n0, int64_t nr, int64_t k0, int64_t nk, uint32_t* panel) {
  const int64_t pairs = nk / 2;
  for (int64_t g = 0; g < PANEL_ROWS / 16; ++g) {
    const int64_t valid = std::clamp<int64_t>(nr - 16 * g, 0, 16);
    const bf16* base = w + (n0 + 16 * g) * K + k0;
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      const int64_t np = std::min<int64_t>(16, pairs - p0);
      const __mmask16 mask = first_lanes(np);
      __m512 r[16];
      for (int64_t j = 0; j < 16; ++j)
        r[j] = j < valid ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mask, base + j * K + 2 * p0)) : _mm512_setzero_ps();
      kvserve::transpose16(r);
      for (int64_t c = 0; c < np; ++c) _mm512_store_ps(panel + (p0 + c) * PANEL_ROWS + 16 * g, r[c]);
    }
    if (nk % 2 == 1)  // an odd last k: its pair's second value is 0
      for (int64_t r = 0; r < 16; ++r) {
        uint16_t bits = 0;
        if (r < valid) std::memcpy(&bits, base + r * K + nk - 1, sizeof(bits));
        panel[pairs * PANEL_ROWS + 16 * g + r] = bits;
      }
  }
}

// Where a micro-kernel's 6 x 64 block goes: the bf16 output (last k chunk) or fp32 partial sums.
struct Tile {
  float* c;  // partial sums, `ldc` floats apart (null on the last k chunk)
  int64_t ldc;
  bf16* y;  // output rows, `ldy` apart (on the last k chunk)
  int64_t ldy;
  const float* bias;  // 64 fp32 (zeros when the layer has none)
  int64_t cols;  // valid output columns of the panel (< 64 for the last panel)
};

// x[r][2p], x[r][2p + 1] as one dword in every lane.
inline __m512bh broadcast_pair(const bf16* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return as_bh(_mm512_set1_epi32(pair));
}

// sum_k x[r][k] w[k][0..64) for the R rows of x (bf16, `ldx` apart, `pairs` pairs of k each) against a
// packed panel, added to the partial sums unless `first`, then stored as partial sums or as the bf16
// output. vdpbf16ps: two k per multiply-add (on Zen 4 it issues at the fp32 FMA's rate, so twice the
// FLOP/s: 232 vs 115 GFLOP/s per core, measured with 12 independent chains each).
template <int R>
inline void gemm_micro(const bf16* x, int64_t ldx, const uint32_t* panel, int64_t pairs, bool first, const Tile& t) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(t.c + r * t.ldc + 16 * j);
  for (int64_t p = 0; p < pairs; ++p) {
    const uint32_t* pk = panel + p * PANEL_ROWS;
    const __m512bh w0 = as_bh(_mm512_load_si512(pk)), w1 = as_bh(_mm512_load_si512(pk + 16));
    const __m512bh w2 = as_bh(_mm512_load_si512(pk + 32)), w3 = as_bh(_mm512_load_si512(pk + 48));
    for (int r = 0; r < R; ++r) {
      const __m512bh xr = broadcast_pair(x + r * ldx + 2 * p);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xr, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xr, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xr, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xr, w3);
    }
  }
  if (t.y == nullptr) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(t.c + r * t.ldc + 16 * j, acc[r][j]);
    return;
  }
  for (int j = 0; j < 4; ++j) {
    if (t.cols <= 16 * j) break;
    const __mmask16 mask = first_lanes(t.cols - 16 * j);
    const __m512 b = _mm512_loadu_ps(t.bias + 16 * j);
    for (int r = 0; r < R; ++r)
      _mm256_mask_storeu_epi16(t.y + r * t.ldy + 16 * j, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][j], b)));
  }
}

using MicroKernel = void (*)(const bf16*, int64_t, const uint32_t*, int64_t, bool, const Tile&);
constexpr MicroKernel GEMM_MICRO[GEMM_ROWS + 1] = {nullptr, gemm_micro<1>, gemm_micro<2>, gemm_micro<3>,
                                                   gemm_micro<4>, gemm_micro<5>, gemm_micro<6>};

// y rows [m_begin, m_end) for the weight rows of panels [panel_begin, panel_end); x: all M rows, bf16.
// K is cut into equal chunks of at most MAX_PANEL_K; a few panels of a chunk are packed together
// (PACKED_BYTES) so that each 6-row block of x, in L1, serves all of them before the next is read.
// With one chunk the micro-kernels write the bf16 output directly; with more, fp32 partial sums
// wait in `c` until the last chunk. x is read in place, except a chunk of odd length: its rows are
// copied with a 0 after them, so the last pair holds no value from past the chunk.
void gemm_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int64_t m_begin, int64_t m_end, int64_t N,
               int64_t K, int64_t panel_begin, int64_t panel_end) {
  const int64_t chunks = K <= SINGLE_CHUNK_K ? 1 : (K + MAX_PANEL_K - 1) / MAX_PANEL_K;
  const int64_t kc = ((K + chunks - 1) / chunks + 1) / 2 * 2;  // even, so chunks start on bf16 pairs
  const int64_t pairs_max = kc / 2;
  const int64_t group = std::clamp<int64_t>(PACKED_BYTES / (pairs_max * PANEL_ROWS * 4), 1, 4);
  const int64_t rows = m_end - m_begin;
  thread_local std::vector<float> panel_buf, c_buf, bias_buf;
  uint32_t* panels = reinterpret_cast<uint32_t*>(scratch(panel_buf, group * pairs_max * PANEL_ROWS));
  float* c = chunks > 1 ? scratch(c_buf, rows * group * PANEL_ROWS) : nullptr;
  float* bias_f = scratch(bias_buf, group * PANEL_ROWS);
  thread_local std::vector<bf16> block_buf;
  if (static_cast<int64_t>(block_buf.size()) < GEMM_ROWS * (kc + 2)) block_buf.resize(GEMM_ROWS * (kc + 2));
  for (int64_t p0 = panel_begin; p0 < panel_end; p0 += group) {
    const int64_t np = std::min(group, panel_end - p0);
    for (int64_t i = 0; i < np * PANEL_ROWS; ++i) {
      const int64_t n = p0 * PANEL_ROWS + i;
      bias_f[i] = bias != nullptr && n < N ? to_float(bias[n]) : 0.f;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t nk = std::min(kc, K - k0), pairs = (nk + 1) / 2;
      const bool first = k0 == 0, last = k0 + nk == K;
      for (int64_t i = 0; i < np; ++i) {
        const int64_t n0 = (p0 + i) * PANEL_ROWS;
        pack_panel(w, K, n0, std::min(PANEL_ROWS, N - n0), k0, nk, panels + i * pairs_max * PANEL_ROWS);
      }
      for (int64_t m = 0; m < rows; m += GEMM_ROWS) {
        const int64_t r = std::min(GEMM_ROWS, rows - m);
        const bf16* xb = x + (m_begin + m) * K + k0;  // the block's rows from k0, `ldx` apart
        int64_t ldx = K;
        if (nk % 2 == 1) {
          for (int64_t i = 0; i < r; ++i) {
            std::memcpy(block_buf.data() + i * (nk + 1), xb + i * K, nk * sizeof(bf16));
            block_buf[i * (nk + 1) + nk] = bf16{};
          }
          xb = block_buf.data(), ldx = nk + 1;
        }
        for (int64_t i = 0; i < np; ++i) {
          const int64_t n0 = (p0 + i) * PANEL_ROWS;
          const Tile tile{c != nullptr ? c + m * group * PANEL_ROWS + i * PANEL_ROWS : nullptr, group * PANEL_ROWS,
                          last ? y + (m_begin + m) * N + n0 : nullptr, N, bias_f + i * PANEL_ROWS,
                          std::min(PANEL_ROWS, N - n0)};
          GEMM_MICRO[r](xb, ldx, panels + i * pairs_max * PANEL_ROWS, pairs, first, tile);
        }
      }
    }
  }
}

// Rows [r0, r1) of x = [gate | up] (2K bf16 each) -> silu(gate) * up as bf16 rows of K, with the bf16 roundings
// of an unfused model (pointwise.cpp's silu_and_mul stores the same values).
void silu_rows(const bf16* x, int64_t K, int64_t r0, int64_t r1, bf16* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const bf16* gate = x + r * 2 * K;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = first_lanes(K - k);
      const __m512 v = kvserve::silu_mul_bf16(kvserve::load16(gate + k, m), kvserve::load16(gate + K + k, m));
      _mm256_mask_storeu_epi16(out + r * K + k, m, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

constexpr int64_t GEMM_MIN_ROWS = 24;  // from here on the GEMM beats dot_rows_bf16 (benchmarks/linear_kernel.py: level at 20)

// silu: x is [M, 2K] = [gate | up] and the product is silu(gate) * up times w (fused SiLU-and-mul).
void linear_bf16_avx512(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int64_t M, int64_t N, int64_t K,
                        int num_threads, bool silu = false) {
  const int64_t panels = (N + PANEL_ROWS - 1) / PANEL_ROWS, groups = (N + 15) / 16;
  const bool gemm = M >= GEMM_MIN_ROWS;
  // the GEMM gives each thread an equal number of whole weight panels and splits the x rows of the
  // panels left over (960 outputs = 15 panels: 7 each, and half the rows of the 15th), so no thread
  // waits for another and no panel is packed twice except a leftover one; the few-row paths split
  // groups of 16 weight rows
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, gemm ? M / GEMM_ROWS : groups)));
  // the fused SiLU is computed once, not per weight group (each thread its share of the rows, then a
  // barrier; one row before the threads start)
  thread_local std::vector<bf16> silu_buf;
  if (silu && static_cast<int64_t>(silu_buf.size()) < M * K) silu_buf.resize(M * K);
  bf16* xs = silu ? silu_buf.data() : nullptr;  // this thread's buffer, filled by the team (not by its name)
  if (silu && M == 1) silu_rows(x, K, 0, 1, xs);
  const bf16* xr = silu ? xs : x;
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = thread_index(), T = thread_count();
    if (silu && M > 1) {
      silu_rows(x, K, M * t / T, M * (t + 1) / T, xs);
#pragma omp barrier
    }
    if (gemm) {
      const int64_t whole = panels / T * T;
      if (whole > 0) gemm_bf16(xr, w, bias, y, 0, M, N, K, whole * t / T, whole * (t + 1) / T);
      if (whole < panels) gemm_bf16(xr, w, bias, y, M * t / T, M * (t + 1) / T, N, K, whole, panels);
    } else {
      const int64_t chunk = chunk_rows(N, K * int64_t(sizeof(bf16)), threads, 16), chunks = (N + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t i = 0; i < chunks; ++i) {
        const int64_t n_begin = i * chunk, n_end = std::min(N, n_begin + chunk);
        dot_rows_bf16(xr, w, bias, y, M, N, n_begin, n_end, K);
      }
    }
  }
}
#endif

template <typename T, typename W>
void linear(const T* x, const W* w, const W* bias, T* y, int64_t M, int64_t N, int64_t K, int num_threads) {
#ifdef KVSERVE_AVX512_BF16
  if constexpr (std::is_same_v<T, bf16> && std::is_same_v<W, bf16>) {
    linear_bf16_avx512(x, w, bias, y, M, N, K, num_threads);
    return;
  }
#endif
  // x in fp32, read many times (from L1/L2)
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
  const int64_t chunk = chunk_rows(N, K * int64_t(sizeof(W)), num_threads, NR) / NR, chunks = (num_blocks + chunk - 1) / chunk;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> w_buf(std::is_same_v<W, float> || M <= FEW_ROWS ? 0 : NR * K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = c * chunk, end = std::min(num_blocks, begin + chunk);
      if (M <= FEW_ROWS) {  // each weight row streamed once, in order, against the x rows two at a time
        for (int64_t n = begin * NR; n < std::min(N, end * NR); ++n) {
          const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
          int64_t m = 0;
          for (; m + 2 <= M; m += 2) {
            const float* xr[2] = {xf + m * K, xf + (m + 1) * K};
            float out[2];
            dot_rows<2>(xr, w + n * K, K, out);
            y[m * N + n] = from_float<T>(out[0] + b);
            y[(m + 1) * N + n] = from_float<T>(out[1] + b);
          }
          if (m < M) y[m * N + n] = from_float<T>(dot(xf + m * K, w + n * K, K) + b);
        }
        continue;
      }
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

#ifdef KVSERVE_AVX512_BF16
// y = (silu(x[:, :K]) * x[:, K:]) @ w^T (+ bias): x [M, 2K], w [N, K], y [M, N], all bf16 (the MLP's
// SiLU-and-mul fused into the down projection; present only where the AVX-512 BF16 path is built).
extern "C" void linear_silu_bf16_bf16(const void* x, const void* w, const void* bias, void* y, int64_t M, int64_t N,
                                      int64_t K, int num_threads) {
  linear_bf16_avx512(static_cast<const bf16*>(x), static_cast<const bf16*>(w), static_cast<const bf16*>(bias),
                     static_cast<bf16*>(y), M, N, K, num_threads, true);
}
#endif

KVSERVE_LINEAR(linear_f32_f32, float, float)
KVSERVE_LINEAR(linear_bf16_bf16, bf16, bf16)
KVSERVE_LINEAR(linear_f32_bf16, float, bf16)
