/**
 * The symbol table of libalpha_moe: the C ABI of `cuda/alpha_moe.h`, declared once. Every entry
 * but `amoe_abi_version` and `amoe_last_error` returns an `amoe_status` (see ffi/errors.ts).
 *
 * Conventions: device pointers, streams, events and graphs are `"pointer"` (never read from JS);
 * host arrays and out-parameters are `"buffer"` (out-parameters as `BigUint64Array(1)` for a
 * `void**`, `Int32Array(1)`/`BigInt64Array(1)`/`Float32Array(1)` for scalars); byte counts are
 * `"usize"`; dimensions are `"i32"`. Every call is synchronous (`nonblocking: false`): the JS
 * thread holds its arguments alive for the whole call.
 *
 * @module
 */

/** The libalpha_moe C ABI (`cuda/alpha_moe.h`). */
export const SYMBOLS = {
  /** int32_t amoe_abi_version(void); */
  amoe_abi_version: { parameters: [], result: "i32" },
  /** const char* amoe_last_error(void);  (thread-local, valid until the thread's next call) */
  amoe_last_error: { parameters: [], result: "pointer" },

  // ---- devices ----
  /** int amoe_device_count(int32_t* count);  (OK with 0 when there is no GPU or driver) */
  amoe_device_count: { parameters: ["buffer"], result: "i32" },
  /** int amoe_set_device(int32_t device); */
  amoe_set_device: { parameters: ["i32"], result: "i32" },
  /**
   * int amoe_device_info(int32_t device, char* name, size_t len, int32_t* cc_major,
   *                      int32_t* cc_minor, int32_t* sm_count, int64_t* l2_bytes);
   */
  amoe_device_info: {
    parameters: ["i32", "buffer", "usize", "buffer", "buffer", "buffer", "buffer"],
    result: "i32",
  },
  /** int amoe_device_synchronize(void); */
  amoe_device_synchronize: { parameters: [], result: "i32" },

  // ---- memory ----
  /** int amoe_malloc(void** ptr, size_t bytes); */
  amoe_malloc: { parameters: ["buffer", "usize"], result: "i32" },
  /** int amoe_free(void* ptr); */
  amoe_free: { parameters: ["pointer"], result: "i32" },
  /** int amoe_memcpy_htod(void* dst, const void* src, size_t bytes); */
  amoe_memcpy_htod: { parameters: ["pointer", "buffer", "usize"], result: "i32" },
  /** int amoe_memcpy_dtoh(void* dst, const void* src, size_t bytes); */
  amoe_memcpy_dtoh: { parameters: ["buffer", "pointer", "usize"], result: "i32" },
  /** int amoe_memcpy_dtod_async(void* dst, const void* src, size_t bytes, void* stream); */
  amoe_memcpy_dtod_async: {
    parameters: ["pointer", "pointer", "usize", "pointer"],
    result: "i32",
  },
  /** int amoe_memset_async(void* dst, int32_t value, size_t bytes, void* stream); */
  amoe_memset_async: { parameters: ["pointer", "i32", "usize", "pointer"], result: "i32" },
  /** int amoe_read_async(const void* src, size_t bytes, void* sink, void* stream); */
  amoe_read_async: { parameters: ["pointer", "usize", "pointer", "pointer"], result: "i32" },

  // ---- streams, events, graphs ----
  /** int amoe_stream_create(void** stream); */
  amoe_stream_create: { parameters: ["buffer"], result: "i32" },
  /** int amoe_stream_destroy(void* stream); */
  amoe_stream_destroy: { parameters: ["pointer"], result: "i32" },
  /** int amoe_stream_synchronize(void* stream); */
  amoe_stream_synchronize: { parameters: ["pointer"], result: "i32" },
  /** int amoe_event_create(void** event); */
  amoe_event_create: { parameters: ["buffer"], result: "i32" },
  /** int amoe_event_destroy(void* event); */
  amoe_event_destroy: { parameters: ["pointer"], result: "i32" },
  /** int amoe_event_record(void* event, void* stream); */
  amoe_event_record: { parameters: ["pointer", "pointer"], result: "i32" },
  /** int amoe_event_elapsed_ms(float* ms, void* start, void* end); */
  amoe_event_elapsed_ms: { parameters: ["buffer", "pointer", "pointer"], result: "i32" },
  /** int amoe_stream_begin_capture(void* stream); */
  amoe_stream_begin_capture: { parameters: ["pointer"], result: "i32" },
  /** int amoe_stream_end_capture(void* stream, void** graph_exec); */
  amoe_stream_end_capture: { parameters: ["pointer", "buffer"], result: "i32" },
  /** int amoe_graph_launch(void* graph_exec, void* stream); */
  amoe_graph_launch: { parameters: ["pointer", "pointer"], result: "i32" },
  /** int amoe_graph_destroy(void* graph_exec); */
  amoe_graph_destroy: { parameters: ["pointer"], result: "i32" },

  // ---- weight preparation (cuda/weights.cu) ----
  /**
   * int amoe_tile_up_weights(const void* src, void* dst, int32_t experts, int32_t N,
   *                          int32_t K, int32_t gate_up_halves, void* stream);
   */
  amoe_tile_up_weights: {
    parameters: ["pointer", "pointer", "i32", "i32", "i32", "i32", "pointer"],
    result: "i32",
  },
  /**
   * int amoe_tile_down_weights(const void* src, void* dst, int32_t experts, int32_t N,
   *                            int32_t K, void* stream);
   */
  amoe_tile_down_weights: {
    parameters: ["pointer", "pointer", "i32", "i32", "i32", "pointer"],
    result: "i32",
  },

  // ---- the fused MoE layer ----
  /**
   * int amoe_fused_moe_check_config(int32_t K, int32_t N, int32_t block_m, int32_t block_n,
   *                                 int32_t warp_n, int32_t stages, int32_t split,
   *                                 int32_t all_slices, int32_t split_n, int32_t tail_split);
   */
  amoe_fused_moe_check_config: {
    parameters: ["i32", "i32", "i32", "i32", "i32", "i32", "i32", "i32", "i32", "i32"],
    result: "i32",
  },
  /**
   * int amoe_fused_moe_w8a8_up_down(
   *     const void* x, const float* x_scale, const void* w, const float* w_scale,
   *     const void* w2, const float* w2_scale, const int32_t* sorted_token_ids,
   *     const int32_t* expert_ids, const int32_t* num_tokens_post_padded,
   *     const float* topk_weights, void* out, int32_t M, int32_t K, int32_t N,
   *     int32_t num_experts, int32_t top_k, int32_t sorted_len, int32_t block_m,
   *     int32_t block_n, int32_t warp_n, int32_t stages, int32_t split,
   *     int32_t all_slices, int32_t split_n, int32_t tail_split, int32_t weight_layout,
   *     float scaling_factor, void* stream);
   *
   * All eleven array arguments are device pointers.
   */
  amoe_fused_moe_w8a8_up_down: {
    parameters: [
      "pointer", // x (fp8 [M, K])
      "pointer", // x_scale (f32, per token per 128 channels)
      "pointer", // w (fp8, gate/up rows interleaved in chunks of 8)
      "pointer", // w_scale (f32, 128x128 blocks)
      "pointer", // w2 (fp8)
      "pointer", // w2_scale (f32, 128x128 blocks)
      "pointer", // sorted_token_ids (i32 [sorted_len])
      "pointer", // expert_ids (i32, one per block of block_m rows)
      "pointer", // num_tokens_post_padded (i32 [1])
      "pointer", // topk_weights (f32 [M, top_k])
      "pointer", // out (bf16 [M, K], zero on entry)
      "i32", // M
      "i32", // K
      "i32", // N
      "i32", // num_experts
      "i32", // top_k
      "i32", // sorted_len
      "i32", // block_m
      "i32", // block_n
      "i32", // warp_n
      "i32", // stages
      "i32", // split
      "i32", // all_slices
      "i32", // split_n
      "i32", // tail_split (1: one launch)
      "i32", // weight_layout (AMOE_WEIGHTS_ROWS 0, AMOE_WEIGHTS_TILES 1)
      "f32", // scaling_factor
      "pointer", // stream
    ],
    result: "i32",
    nonblocking: false,
  },

  // ---- routing, alignment, quantisation (cuda/routing.cu, align.cu, quant.cu) ----
  /**
   * int amoe_topk_softmax(const float* logits, int32_t M, int32_t num_experts, int32_t top_k,
   *                       int32_t renormalize, float weight_scale, int32_t shared_expert_id,
   *                       float shared_weight, int32_t* topk_ids, float* topk_weights,
   *                       void* stream);
   */
  amoe_topk_softmax: {
    parameters: [
      "pointer", // logits (f32 [M, E])
      "i32", // M
      "i32", // num_experts
      "i32", // top_k
      "i32", // renormalize
      "f32", // weight_scale
      "i32", // shared_expert_id (-1: none)
      "f32", // shared_weight
      "pointer", // topk_ids (i32 [M, width])
      "pointer", // topk_weights (f32 [M, width])
      "pointer", // stream
    ],
    result: "i32",
  },
  /**
   * int amoe_topk_grouped_sigmoid(const float* logits, const float* bias, int32_t M,
   *                               int32_t num_experts, int32_t n_group, int32_t topk_group,
   *                               int32_t top_k, int32_t renormalize, float weight_scale,
   *                               int32_t shared_expert_id, float shared_weight,
   *                               int32_t* topk_ids, float* topk_weights, void* stream);
   */
  amoe_topk_grouped_sigmoid: {
    parameters: [
      "pointer", // logits (f32 [M, E])
      "pointer", // bias (f32 [E]) or null
      "i32", // M
      "i32", // num_experts
      "i32", // n_group
      "i32", // topk_group
      "i32", // top_k
      "i32", // renormalize
      "f32", // weight_scale
      "i32", // shared_expert_id (-1: none)
      "f32", // shared_weight
      "pointer", // topk_ids (i32 [M, width])
      "pointer", // topk_weights (f32 [M, width])
      "pointer", // stream
    ],
    result: "i32",
  },
  /** int amoe_moe_align_workspace_bytes(int32_t num_slots, int32_t num_experts, size_t* bytes); */
  amoe_moe_align_workspace_bytes: { parameters: ["i32", "i32", "buffer"], result: "i32" },
  /**
   * int amoe_moe_align_block_size(const int32_t* topk_ids, int32_t num_slots,
   *                               int32_t num_experts, int32_t block_m,
   *                               int32_t* sorted_token_ids, int32_t sorted_len,
   *                               int32_t* expert_ids, int32_t num_blocks,
   *                               int32_t* num_tokens_post_padded, void* workspace,
   *                               size_t workspace_bytes, void* stream);
   */
  amoe_moe_align_block_size: {
    parameters: [
      "pointer", // topk_ids (i32 [num_slots])
      "i32", // num_slots
      "i32", // num_experts
      "i32", // block_m
      "pointer", // sorted_token_ids (i32 [sorted_len])
      "i32", // sorted_len
      "pointer", // expert_ids (i32 [num_blocks])
      "i32", // num_blocks
      "pointer", // num_tokens_post_padded (i32 [1])
      "pointer", // workspace
      "usize", // workspace_bytes
      "pointer", // stream
    ],
    result: "i32",
  },
  /**
   * int amoe_quant_fp8_per_token_group(const void* x, int32_t M, int32_t K, void* q,
   *                                    float* scale, void* zero_out, void* stream);
   */
  amoe_quant_fp8_per_token_group: {
    parameters: [
      "pointer", // x (bf16 [M, K])
      "i32", // M
      "i32", // K
      "pointer", // q (fp8 [M, K])
      "pointer", // scale (f32 [M, K/128])
      "pointer", // zero_out (bf16 [M, K]) or null
      "pointer", // stream
    ],
    result: "i32",
  },

  // ---- unfused baseline ----
  // Optional: a library built before the baseline existed still loads (src/unfused.ts says to
  // rebuild when they are missing).
  /**
   * int amoe_unfused_workspace_bytes(int32_t M, int32_t K, int32_t N, int32_t top_k,
   *                                  size_t* bytes);
   */
  amoe_unfused_workspace_bytes: {
    parameters: ["i32", "i32", "i32", "i32", "buffer"],
    result: "i32",
    optional: true,
  },
  /**
   * int amoe_unfused_moe_w8a8(
   *     const void* x, const float* x_scale, const void* w, const float* w_scale,
   *     const void* w2, const float* w2_scale, const int32_t* sorted_token_ids,
   *     const int32_t* expert_ids, const int32_t* num_tokens_post_padded,
   *     const float* topk_weights, void* out, void* workspace, size_t workspace_bytes,
   *     int32_t M, int32_t K, int32_t N, int32_t num_experts, int32_t top_k,
   *     int32_t sorted_len, int32_t block_m, float scaling_factor, void* stream);
   */
  amoe_unfused_moe_w8a8: {
    parameters: [
      "pointer", // x (fp8 [M, K])
      "pointer", // x_scale (f32 [M, K/128])
      "pointer", // w (fp8 [E, N, K], gate/up interleaved in chunks of 8)
      "pointer", // w_scale (f32 [E, N/128, K/128])
      "pointer", // w2 (fp8 [E, K, N/2])
      "pointer", // w2_scale (f32 [E, K/128, N/256])
      "pointer", // sorted_token_ids (i32 [sorted_len])
      "pointer", // expert_ids (i32, one per block of block_m rows)
      "pointer", // num_tokens_post_padded (i32 [1])
      "pointer", // topk_weights (f32 [M, top_k])
      "pointer", // out (bf16 [M, K], overwritten)
      "pointer", // workspace
      "usize", // workspace_bytes
      "i32", // M
      "i32", // K
      "i32", // N
      "i32", // num_experts
      "i32", // top_k
      "i32", // sorted_len
      "i32", // block_m
      "f32", // scaling_factor
      "pointer", // stream
    ],
    result: "i32",
    nonblocking: false,
    optional: true,
  },

  // ---- the single-launch prologue (cuda/prologue.cu) ----
  // Optional: a library built before the prologue existed still loads (MoeLayer then runs the
  // separate routing, alignment and quantisation entries).
  /**
   * int amoe_moe_prologue(int32_t method, const float* logits, const float* bias, int32_t M,
   *                       int32_t num_experts, int32_t n_group, int32_t topk_group,
   *                       int32_t top_k, int32_t renormalize, float weight_scale,
   *                       int32_t shared_expert_id, float shared_weight, int32_t* topk_ids,
   *                       float* topk_weights, int32_t align_experts, int32_t block_m,
   *                       int32_t* sorted_token_ids, int32_t sorted_len, int32_t* expert_ids,
   *                       int32_t num_blocks, int32_t* num_tokens_post_padded, const void* x,
   *                       int32_t K, void* q, float* scale, void* zero_out, void* stream);
   */
  amoe_moe_prologue: {
    parameters: [
      "i32", // method (0 softmax, 1 grouped sigmoid)
      "pointer", // logits (f32 [M, E])
      "pointer", // bias (f32 [E]) or null
      "i32", // M
      "i32", // num_experts (routed: the logits' columns)
      "i32", // n_group
      "i32", // topk_group
      "i32", // top_k
      "i32", // renormalize
      "f32", // weight_scale
      "i32", // shared_expert_id (-1: none)
      "f32", // shared_weight
      "pointer", // topk_ids (i32 [M, width])
      "pointer", // topk_weights (f32 [M, width])
      "i32", // align_experts (experts of the layout: routed + shared)
      "i32", // block_m
      "pointer", // sorted_token_ids (i32 [sorted_len])
      "i32", // sorted_len
      "pointer", // expert_ids (i32 [num_blocks])
      "i32", // num_blocks
      "pointer", // num_tokens_post_padded (i32 [1])
      "pointer", // x (bf16 [M, K])
      "i32", // K
      "pointer", // q (fp8 [M, K])
      "pointer", // scale (f32 [M, K/128])
      "pointer", // zero_out (bf16 [M, K]) or null
      "pointer", // stream
    ],
    result: "i32",
    optional: true,
  },
} as const satisfies Deno.ForeignLibraryInterface;

/** The symbol table's type. */
export type Symbols = typeof SYMBOLS;
