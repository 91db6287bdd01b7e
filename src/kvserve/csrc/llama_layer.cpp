// One Llama-family decoder layer in one call, for small batches on CPU.
//
// Why: at decode a layer is ~10 kernel calls and ~11 module calls whose Python and
// dispatch cost (~300 us per layer, ~9 ms per step of SmolLM2) rivals the weight
// streaming itself (docs/PERFORMANCE.md). This runs the same kernels in the same
// order as LlamaDecoderLayer.forward (models/llama.py) with the loop in C++:
//
//   residual += x; h = rms_norm(residual)            (first layer: residual = x)
//   qkv = h W_qkv^T (+b); rotary(q, k); store k, v in the paged cache by slot (quantized for an int8 / fp8 cache)
//   a = paged_attention(q, cache); residual += a W_o^T (+b); h = rms_norm(residual)
//   out = silu(h W_gate^T) * (h W_up^T) W_down^T    (bf16 on AVX-512 BF16: the SiLU fused into the product)
//
// Each projection's weight is either in the model's dtype or kept in GGUF blocks (quant_linear.cpp);
// its `*_format` field says which (0, or the GGML type id).
//
// It includes the kernel sources so that everything is one translation unit and one
// library; each kernel keeps its own file, tests and entry point.

#include <cstddef>
#include <iterator>
#include <memory>

#include "linear.cpp"
#include "paged_attention.cpp"
#include "pointwise.cpp"
#include "quant_linear.cpp"

namespace {

// Mirrored by `LayerArgs` in models/llama_cpu_layer.py, which checks itself against
// llama_layer_args_layout below before the layer is used.
struct LayerArgs {
  // weights (T) and optional biases (null when absent)
  const void* input_norm;
  const void* qkv_w;
  const void* qkv_b;
  const void* o_w;
  const void* o_b;
  const void* post_norm;
  const void* gate_up_w;
  const void* gate_up_b;
  const void* down_w;
  const void* down_b;
  const float* cos;
  const float* sin;
  // this layer's cache
  void* k_cache;  // [blocks, block_size, Hkv, D]: T, or int8 / fp8 e4m3 values (kv_format)
  void* v_cache;
  float* k_scale;  // [blocks, Hkv, block_size]: the scales of int8 / fp8 values, else null
  float* v_scale;
  int64_t kv_format;  // 0: the cache holds T; 1: int8; 2: fp8 e4m3
  // shapes
  int64_t hidden, num_heads, num_kv_heads, head_dim, inner, block_size;
  // attention tiling: QUERY_TILE and SPLIT_LEN of attention/cpu.py, so that both callers tile alike
  int64_t query_tile, split_len;
  int64_t sliding_window;  // each query sees its last sliding_window keys; 0: full causal attention
  // each projection's weight format: 0 for T, else the GGML type id of its blocks
  int64_t qkv_format, o_format, gate_up_format, down_format;
  float eps, scale;
};

// The step, the same for every layer of it: set once per step (models/llama_cpu_layer.py, SharedStep), not
// once per layer. Mirrored by `StepArgs` there, checked against llama_step_args_layout.
struct StepArgs {
  const int64_t* positions;  // [M]
  const int64_t* slot_mapping;  // [M]
  const int64_t* block_tables;  // [S, max_blocks]
  int64_t max_blocks;
  const int64_t* seq_lens;  // [S]
  const int64_t* query_start_loc;  // [S + 1]
  int64_t num_seqs;
  int64_t tokens;  // M
  int num_threads;
};

// y[M, N] = x[M, K] @ W^T (+ b) for W in T (format 0) or in GGUF blocks of `format`.
template <typename T>
void project(const T* x, const void* w, int64_t format, const void* b, T* y, int64_t M, int64_t N, int64_t K,
             int num_threads) {
  if (format == 0) {
    linear<T, T>(x, static_cast<const T*>(w), static_cast<const T*>(b), y, M, N, K, num_threads);
    return;
  }
  quant::dispatch(static_cast<int>(format), [&](auto f) {
    quant::linear<decltype(f)::value>(x, static_cast<const uint8_t*>(w), static_cast<const T*>(b), y, M, N, K,
                                      num_threads);
  });
}

// This step's K/V (views of qkv) into the cache, then q attending over it: the cache in T, or quantized into C.
template <typename T, typename C>
void store_and_attend(const LayerArgs& a, const StepArgs& s, const T* qkv, const T* q, T* attn) {
  const int64_t D = a.head_dim, q_size = a.num_heads * D, kv_size = a.num_kv_heads * D, qkv_size = q_size + 2 * kv_size;
  C* kc = static_cast<C*>(a.k_cache);
  C* vc = static_cast<C*>(a.v_cache);
  if constexpr (std::is_same_v<C, T>)
    store_kv<T>(qkv + q_size, qkv_size, qkv + q_size + kv_size, qkv_size, s.slot_mapping, s.tokens, kv_size, kc, vc);
  else
    store_kv_quantized<T, C>(qkv + q_size, qkv_size, qkv + q_size + kv_size, qkv_size, s.slot_mapping, s.tokens,
                             a.num_kv_heads, D, a.block_size, kc, vc, a.k_scale, a.v_scale);
  paged_attention<T, C>(q, kc, vc, a.k_scale, a.v_scale, s.block_tables, s.max_blocks, s.seq_lens, s.query_start_loc,
                        s.num_seqs, a.num_heads, a.num_kv_heads, D, a.block_size, a.scale, a.query_tile, a.split_len,
                        a.sliding_window, s.num_threads, attn);
}

template <typename T>
void llama_layer(const LayerArgs& a, const StepArgs& s, T* x, T* residual, int first_layer, T* out) {
  const int64_t M = s.tokens, H = a.hidden, D = a.head_dim;
  const int64_t q_size = a.num_heads * D, kv_size = a.num_kv_heads * D, qkv_size = q_size + 2 * kv_size;
  auto W = [](const void* p) { return static_cast<const T*>(p); };
  // scratch, uninitialized (every element is written before it is read)
  std::unique_ptr<T[]> h(new T[M * H]), qkv(new T[M * qkv_size]), q(new T[M * q_size]), attn(new T[M * q_size]),
      gu(new T[M * 2 * a.inner]);

  if (first_layer) {
    std::memcpy(residual, x, M * H * sizeof(T));
    rms_norm<T>(x, nullptr, W(a.input_norm), h.get(), M, H, a.eps);
  } else {
    rms_norm<T>(x, residual, W(a.input_norm), h.get(), M, H, a.eps);
  }
  project<T>(h.get(), a.qkv_w, a.qkv_format, a.qkv_b, qkv.get(), M, qkv_size, H, s.num_threads);
  rotary<T>(s.positions, qkv.get(), qkv_size, a.num_heads, qkv.get() + q_size, qkv_size, a.num_kv_heads, D, a.cos,
            a.sin, M);
  for (int64_t t = 0; t < M; ++t) std::memcpy(q.get() + t * q_size, qkv.get() + t * qkv_size, q_size * sizeof(T));
  switch (a.kv_format) {
    case 1: store_and_attend<T, int8_t>(a, s, qkv.get(), q.get(), attn.get()); break;
    case 2: store_and_attend<T, fp8_e4m3>(a, s, qkv.get(), q.get(), attn.get()); break;
    default: store_and_attend<T, T>(a, s, qkv.get(), q.get(), attn.get()); break;
  }
  project<T>(attn.get(), a.o_w, a.o_format, a.o_b, out, M, H, q_size, s.num_threads);
  rms_norm<T>(out, residual, W(a.post_norm), h.get(), M, H, a.eps);
  project<T>(h.get(), a.gate_up_w, a.gate_up_format, a.gate_up_b, gu.get(), M, 2 * a.inner, H, s.num_threads);
#ifdef KVSERVE_AVX512_BF16
  if constexpr (std::is_same_v<T, bf16>) {  // SiLU-and-mul fused into a dense down projection (same bits)
    if (a.down_format == 0) {
      linear_bf16_avx512(gu.get(), W(a.down_w), W(a.down_b), out, M, H, a.inner, s.num_threads, true);
      return;
    }
  }
#endif
  std::unique_ptr<T[]> act(new T[M * a.inner]);
  silu_and_mul<T>(gu.get(), act.get(), M, a.inner);
  project<T>(act.get(), a.down_w, a.down_format, a.down_b, out, M, H, a.inner, s.num_threads);
}

}  // namespace

// The fields of LayerArgs and StepArgs in declaration order, for the layouts their ctypes mirrors check.
#define KVSERVE_LAYER_ARGS_FIELDS(X)                                                                        \
  X(input_norm) X(qkv_w) X(qkv_b) X(o_w) X(o_b) X(post_norm) X(gate_up_w) X(gate_up_b) X(down_w) X(down_b)  \
  X(cos) X(sin) X(k_cache) X(v_cache) X(k_scale) X(v_scale) X(kv_format) X(hidden) X(num_heads)             \
  X(num_kv_heads) X(head_dim) X(inner) X(block_size) X(query_tile) X(split_len) X(sliding_window)            \
  X(qkv_format) X(o_format) X(gate_up_format) X(down_format) X(eps) X(scale)
#define KVSERVE_STEP_ARGS_FIELDS(X) \
  X(positions) X(slot_mapping) X(block_tables) X(max_blocks) X(seq_lens) X(query_start_loc) X(num_seqs) X(tokens) X(num_threads)

// The layout of a struct for its ctypes mirror (models/llama_cpu_layer.py) to compare with itself:
// layout[0] = its size, layout[1 + 2i] and layout[2 + 2i] = the offset and size of field i, at most
// `capacity` values written. Returns the fields' names in declaration order, separated by spaces.
#define KVSERVE_LAYOUT_FN(NAME, TYPE, FIELDS)                                                                   \
  extern "C" const char* NAME(int64_t* layout, int64_t capacity) {                                            \
    using Args = TYPE;                                                                                        \
    const int64_t values[] = {static_cast<int64_t>(sizeof(Args)), FIELDS(KVSERVE_PLACE)};                     \
    for (int64_t i = 0; i < static_cast<int64_t>(std::size(values)) && i < capacity; ++i) layout[i] = values[i]; \
    return FIELDS(KVSERVE_NAME);                                                                              \
  }
#define KVSERVE_PLACE(field) static_cast<int64_t>(offsetof(Args, field)), static_cast<int64_t>(sizeof(Args::field)),
#define KVSERVE_NAME(field) #field " "
KVSERVE_LAYOUT_FN(llama_layer_args_layout, LayerArgs, KVSERVE_LAYER_ARGS_FIELDS)
KVSERVE_LAYOUT_FN(llama_step_args_layout, StepArgs, KVSERVE_STEP_ARGS_FIELDS)

// x: this layer's input [M, H]; residual: [M, H], read and updated (written when first_layer);
// out: [M, H], the MLP output (the next layer's x). All tensors contiguous, dtype T.
extern "C" void llama_layer_f32(const LayerArgs* args, const StepArgs* step, void* x, void* residual, int first_layer,
                                void* out) {
  llama_layer<float>(*args, *step, static_cast<float*>(x), static_cast<float*>(residual), first_layer,
                     static_cast<float*>(out));
}
extern "C" void llama_layer_bf16(const LayerArgs* args, const StepArgs* step, void* x, void* residual, int first_layer,
                                 void* out) {
  llama_layer<bf16>(*args, *step, static_cast<bf16*>(x), static_cast<bf16*>(residual), first_layer,
                    static_cast<bf16*>(out));
}
