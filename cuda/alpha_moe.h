/*
 * alpha_moe.h: the whole native contract of libalpha_moe.
 *
 * Every entry returns an amoe_status (0 = ok). On failure, amoe_last_error() returns a
 * message for the calling thread's last failure. Nothing here exits, aborts or prints.
 * Device pointers are plain void*; `stream` is a cudaStream_t (NULL: the legacy default
 * stream). Entries that touch the GPU first select the device chosen by amoe_set_device
 * (default 0), because CUDA's current device is per host thread and Deno calls from
 * several threads.
 *
 * Kernels in a stream: amoe_moe_align_block_size, amoe_quant_fp8_per_token_group and
 * amoe_fused_moe_w8a8_up_down launch as programmatic dependents of the kernel before them
 * and wait for its completion before touching memory, so any kernel may precede them. The
 * routing entries, the alignment, the quantiser and amoe_moe_prologue let the next kernel
 * launch early (griddepcontrol.launch_dependents): a kernel of yours launched after them
 * with programmatic stream serialization must run griddepcontrol.wait before it reads their
 * outputs; an ordinary launch needs nothing.
 */
#ifndef ALPHA_MOE_H
#define ALPHA_MOE_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define AMOE_API __attribute__((visibility("default")))
#else
#define AMOE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or a status code changes. */
#define AMOE_ABI_VERSION 7

typedef enum amoe_status {
  AMOE_OK = 0,
  AMOE_ERR_INVALID_ARGUMENT = 1, /* a null pointer, a bad shape or size */
  AMOE_ERR_UNSUPPORTED = 2,      /* a config or shape the kernel cannot run */
  AMOE_ERR_NO_DEVICE = 3,        /* no CUDA device, or not a Hopper one */
  AMOE_ERR_OUT_OF_MEMORY = 4,
  AMOE_ERR_CUDA = 5,             /* a CUDA error the context survives */
  AMOE_ERR_CUDA_FATAL = 6,       /* a sticky CUDA error: the process must restart */
} amoe_status;

AMOE_API int32_t amoe_abi_version(void);
/* The calling thread's last failure message ("" if none). Valid until its next call. */
AMOE_API const char* amoe_last_error(void);

/* ---- devices ---- */
AMOE_API int amoe_device_count(int32_t* count);
AMOE_API int amoe_set_device(int32_t device);
/* name: buffer of `len` bytes, NUL-terminated on return. */
AMOE_API int amoe_device_info(int32_t device, char* name, size_t len, int32_t* cc_major,
                              int32_t* cc_minor, int32_t* sm_count, int64_t* l2_bytes);
AMOE_API int amoe_device_synchronize(void);

/* ---- memory ---- */
AMOE_API int amoe_malloc(void** ptr, size_t bytes);
AMOE_API int amoe_free(void* ptr);
AMOE_API int amoe_memcpy_htod(void* dst, const void* src, size_t bytes);
AMOE_API int amoe_memcpy_dtoh(void* dst, const void* src, size_t bytes);
AMOE_API int amoe_memcpy_dtod_async(void* dst, const void* src, size_t bytes, void* stream);
AMOE_API int amoe_memset_async(void* dst, int32_t value, size_t bytes, void* stream);
/* Reads `bytes` (a multiple of 16, src 16-byte aligned) of src through L2 and discards them:
 * an L2 flush that leaves clean lines (a memset leaves dirty ones, which the next kernel
 * pays to write back). `sink`: 4 bytes of device memory the kernel may write. */
AMOE_API int amoe_read_async(const void* src, size_t bytes, void* sink, void* stream);

/* ---- streams, events, graphs ---- */
AMOE_API int amoe_stream_create(void** stream);
AMOE_API int amoe_stream_destroy(void* stream);
AMOE_API int amoe_stream_synchronize(void* stream);
AMOE_API int amoe_event_create(void** event);
AMOE_API int amoe_event_destroy(void* event);
AMOE_API int amoe_event_record(void* event, void* stream);
AMOE_API int amoe_event_elapsed_ms(float* ms, void* start, void* end);
/* Capture the work enqueued on `stream` between begin and end into an executable graph. */
AMOE_API int amoe_stream_begin_capture(void* stream);
AMOE_API int amoe_stream_end_capture(void* stream, void** graph_exec);
AMOE_API int amoe_graph_launch(void* graph_exec, void* stream);
AMOE_API int amoe_graph_destroy(void* graph_exec);

/* ---- the fused MoE layer ---- */

/* Checks a kernel config without launching: AMOE_OK if the kernel can run it for
 * (N, K), AMOE_ERR_UNSUPPORTED with the valid values in the message otherwise.
 * `split` (1..16) is the number of CTAs, one cluster, that share each (token block, N slice)
 * unit: the up projection's K and the down projection's output rows are divided among them
 * (1 = one CTA per unit, the seed's kernel).
 * `all_slices` (0 or 1): one CTA per token block covers every 256-row N slice and adds each
 * output row once, where 0 gives each slice its own CTA (the blocks past the launch's last full
 * wave still get one CTA per slice); for (block_n, warp_n) = (32, 8), split 1 and block_m at
 * most 64 (one sub-tile) or 72-80 (token halves) only.
 * `split_n` (1 or 2): with 2, a cluster of two CTAs shares each unit by N instead, each
 * multiplying 128 of the slice's 256 gate/up rows (64 whole pairs) and taking half of the down
 * projection's output rows; for (block_n, warp_n) = (32, 8), split 1 and all_slices 0 only.
 * `tail_split` (1..16): with more than 1, the units past the launch's last full wave (which
 * would run while most SMs idle) run in a second launch that fills SMs as they free up, each
 * shared by a cluster of tail_split CTAs: by K for block_m up to 64, by N halves for block_m
 * 72 and 80 (tail_split 2 only); needs split 1, split_n 1 and all_slices 0. 1 = one launch.
 * Same result up to the order of f32 additions. */
AMOE_API int amoe_fused_moe_check_config(int32_t K, int32_t N, int32_t block_m, int32_t block_n,
                                         int32_t warp_n, int32_t stages, int32_t split,
                                         int32_t all_slices, int32_t split_n, int32_t tail_split);

/* How `w` and `w2` are stored (amoe_fused_moe_w8a8_up_down's weight_layout).
 * AMOE_WEIGHTS_ROWS: row-major, w [E, N, K] and w2 [E, K, N/2] (the seed's and vLLM's layout).
 * AMOE_WEIGHTS_TILES: the kernel's 32 KiB tiles stored one after another, each 256 rows of 128
 *   bytes: w as [E][N/256][K/128][256][128] (tile (s, kb) = rows 256s.., bytes 128kb.. of the
 *   expert's [N, K]); w2 as [E][N/256][ceil(K/256)][256][128] (tile (s, t) = rows 256t.. of
 *   the expert's [K, N/2], bytes 128s..; rows past K zero). Same bytes as the row-major w;
 *   w2 has ceil(K/256) * 256 rows. Made once at load time; streamed 2-4 % faster where the
 *   layer is bound by memory. */
#define AMOE_WEIGHTS_ROWS 0
#define AMOE_WEIGHTS_TILES 1

/*
 * Stored tiles (AMOE_WEIGHTS_TILES) made on the GPU from row-major weights, at load time.
 * Asynchronous on `stream`; src and dst device memory, 16-byte aligned, not overlapping.
 * Up: src [experts, N, K] -> dst [experts, N/256, K/128, 256, 128]; with gate_up_halves != 0
 *   src rows are a checkpoint's N/2 gate rows then N/2 up rows, interleaved on the way in
 *   chunks of 8 (as the kernel's `w` expects); with 0 they are already interleaved.
 * Down: src [experts, K, N/2] -> dst [experts, N/256, ceil(K/256), 256, 128], rows past K zero.
 * N a multiple of 256, K a multiple of 128.
 */
AMOE_API int amoe_tile_up_weights(const void* src, void* dst, int32_t experts, int32_t N,
                                  int32_t K, int32_t gate_up_halves, void* stream);
AMOE_API int amoe_tile_down_weights(const void* src, void* dst, int32_t experts, int32_t N,
                                    int32_t K, void* stream);

/*
 * out[token] += topk_weight * scaling_factor * (requant(silu(gate) * up) @ w2[e]^T)
 * for every (token, slot) routed to expert e, in one launch. FP8 e4m3 operands with
 * per-token-group (x: 1x128) and block (w, w2: 128x128) f32 scales; `w` rows interleave
 * gate and up in chunks of 8; `out` bf16 [M, K] must be zero on entry. The routing arrays are
 * moe_align_block_size's for this block_m: each expert's slots padded to a multiple of
 * block_m, so at most M*top_k/block_m + min(num_experts, M*top_k) blocks are used (blocks
 * past that are not read). Asynchronous
 * on `stream`; validates every argument before launching.
 */
AMOE_API int amoe_fused_moe_w8a8_up_down(
    const void* x, const float* x_scale, const void* w, const float* w_scale, const void* w2,
    const float* w2_scale, const int32_t* sorted_token_ids, const int32_t* expert_ids,
    const int32_t* num_tokens_post_padded, const float* topk_weights, void* out, int32_t M,
    int32_t K, int32_t N, int32_t num_experts, int32_t top_k, int32_t sorted_len,
    int32_t block_m, int32_t block_n, int32_t warp_n, int32_t stages, int32_t split,
    int32_t all_slices, int32_t split_n, int32_t tail_split, int32_t weight_layout,
    float scaling_factor, void* stream);

/* ---- routing, alignment, quantisation ---- */
/* The steps before the fused kernel. All asynchronous on `stream`; no allocation. Device
 * pointers, row-major. */

/*
 * Softmax top-k routing (Mixtral/Qwen): for each of M tokens, the top_k experts by logit
 * (ties: the lower expert index first), in order of choice; weight = softmax probability over
 * all E experts, renormalised over the chosen ones when `renormalize` != 0, then times
 * `weight_scale`. With shared_expert_id >= 0 each row gets one more slot, last: that id with
 * weight `shared_weight` (not scaled). logits f32 [M, E]; topk_ids i32 / topk_weights f32
 * [M, top_k (+1)]. E in 1..512, top_k in 1..32.
 */
AMOE_API int amoe_topk_softmax(const float* logits, int32_t M, int32_t num_experts, int32_t top_k,
                               int32_t renormalize, float weight_scale, int32_t shared_expert_id,
                               float shared_weight, int32_t* topk_ids, float* topk_weights,
                               void* stream);

/*
 * DeepSeek-V3 routing: score = sigmoid(logit); choice = score + bias (bias f32 [E], NULL for
 * none); the E experts form n_group groups of E / n_group, each scored by the sum of its two
 * best choice values; the topk_group best groups are kept and the top_k experts by choice
 * value among them are chosen (ties: lower index). Weight = the chosen expert's score (without
 * bias), normalised to sum 1 when `renormalize` != 0, then times `weight_scale` (pass
 * routed_scaling_factor here only if the consumer does not apply it itself). Shared slot and
 * outputs as amoe_topk_softmax. n_group in 1..32.
 */
AMOE_API int amoe_topk_grouped_sigmoid(const float* logits, const float* bias, int32_t M,
                                       int32_t num_experts, int32_t n_group, int32_t topk_group,
                                       int32_t top_k, int32_t renormalize, float weight_scale,
                                       int32_t shared_expert_id, float shared_weight,
                                       int32_t* topk_ids, float* topk_weights, void* stream);

/* Bytes of workspace amoe_moe_align_block_size needs for num_slots (= M * top_k) slots over
 * num_experts experts (0 for up to 8192 slots). */
AMOE_API int amoe_moe_align_workspace_bytes(int32_t num_slots, int32_t num_experts,
                                            size_t* bytes);

/*
 * SGLang's moe_align_block_size: groups the num_slots flat slots of topk_ids by expert (in
 * expert order, ascending slot order within an expert: deterministic), pads each expert's run
 * to a multiple of block_m with the value num_slots, and writes the expert of every block.
 * Ids < 0 or >= num_experts are skipped (expert parallelism). sorted_token_ids has sorted_len
 * >= num_slots + num_experts * (block_m - 1) entries, all written (pad past the used part);
 * expert_ids has num_blocks >= ceil(that minimum / block_m) entries, 0 past the used blocks;
 * num_tokens_post_padded[0] = the used length. num_experts in 1..512, block_m in 1..1024.
 */
AMOE_API int amoe_moe_align_block_size(const int32_t* topk_ids, int32_t num_slots,
                                       int32_t num_experts, int32_t block_m,
                                       int32_t* sorted_token_ids, int32_t sorted_len,
                                       int32_t* expert_ids, int32_t num_blocks,
                                       int32_t* num_tokens_post_padded, void* workspace,
                                       size_t workspace_bytes, void* stream);

/*
 * Per-token-group FP8 quantisation (group 128): x bf16 [M, K] -> q e4m3 [M, K] and scale f32
 * [M, K/128] (row-major, as the fused kernel reads x_scale), scale = max(amax, 1e-10) / 448,
 * q = e4m3(x / scale) saturated to +-448, round to nearest even. K a multiple of 128; x
 * 8-byte aligned. When zero_out (bf16 [M, K], 8-byte aligned) is not NULL it is set to zero in
 * the same pass: the fused kernel's output, zeroed without a launch of its own.
 */
AMOE_API int amoe_quant_fp8_per_token_group(const void* x, int32_t M, int32_t K, void* q,
                                            float* scale, void* zero_out, void* stream);

/* Routing methods of amoe_moe_prologue. */
typedef enum amoe_routing_method {
  AMOE_ROUTING_SOFTMAX = 0,         /* as amoe_topk_softmax */
  AMOE_ROUTING_GROUPED_SIGMOID = 1, /* as amoe_topk_grouped_sigmoid */
} amoe_routing_method;

/* Largest number of slots (M * (top_k (+1))) amoe_moe_prologue takes. */
#define AMOE_PROLOGUE_MAX_SLOTS 4096

/*
 * The three steps above in one launch, for small batches (M up to a few dozen tokens, where
 * the launches of the separate entries cost more than their work):
 *   1. routing of logits f32 [M, num_experts] by `method`, with the arguments and outputs of
 *      amoe_topk_softmax / amoe_topk_grouped_sigmoid (n_group, topk_group and bias apply to
 *      grouped routing only: pass bias NULL for softmax);
 *   2. moe_align_block_size of the M * width slots of topk_ids over align_experts experts, as
 *      amoe_moe_align_block_size (no workspace);
 *   3. FP8 quantisation of x bf16 [M, K] into q and scale, zeroing zero_out (NULL: none), as
 *      amoe_quant_fp8_per_token_group.
 * Every output equals, bit for bit, what the three entries write when called in turn with the
 * same arguments. M * width must be at most AMOE_PROLOGUE_MAX_SLOTS (AMOE_ERR_UNSUPPORTED
 * otherwise: use the separate entries). Validates everything before launching; asynchronous on
 * `stream`; no allocation, no synchronisation.
 */
AMOE_API int amoe_moe_prologue(int32_t method, const float* logits, const float* bias, int32_t M,
                               int32_t num_experts, int32_t n_group, int32_t topk_group,
                               int32_t top_k, int32_t renormalize, float weight_scale,
                               int32_t shared_expert_id, float shared_weight, int32_t* topk_ids,
                               float* topk_weights, int32_t align_experts, int32_t block_m,
                               int32_t* sorted_token_ids, int32_t sorted_len, int32_t* expert_ids,
                               int32_t num_blocks, int32_t* num_tokens_post_padded,
                               const void* x, int32_t K, void* q, float* scale, void* zero_out,
                               void* stream);

/* ---- unfused baseline ---- */

/* Bytes of device workspace amoe_unfused_moe_w8a8 needs for (M, K, N, top_k): an f32
 * [M*top_k, N] up-projection output, the e4m3 [M*top_k, N/2] intermediate and its f32 scales,
 * an f32 [M*top_k, K] down-projection output and an i32 flag per slot, each 256-byte aligned. */
AMOE_API int amoe_unfused_workspace_bytes(int32_t M, int32_t K, int32_t N, int32_t top_k,
                                          size_t* bytes);

/*
 * The layer of amoe_fused_moe_w8a8_up_down (same arguments, row-major weights) in four plain,
 * untuned launches, as a baseline: up GEMM (fp32 accumulation of dequantised FP8) into the
 * workspace; SwiGLU on the interleaved rows and per-128-channel FP8 quantisation of the
 * intermediate (scale = max(amax, 1e-10) / 448); down GEMM into f32; the top-k weighted sum
 * (x scaling_factor) into `out`, which is overwritten (it need not be zero). block_m (1..128)
 * is the block size the sorted layout was aligned for. `workspace` (256-byte aligned, at least
 * amoe_unfused_workspace_bytes) is scratch. Asynchronous on `stream`.
 */
AMOE_API int amoe_unfused_moe_w8a8(
    const void* x, const float* x_scale, const void* w, const float* w_scale, const void* w2,
    const float* w2_scale, const int32_t* sorted_token_ids, const int32_t* expert_ids,
    const int32_t* num_tokens_post_padded, const float* topk_weights, void* out, void* workspace,
    size_t workspace_bytes, int32_t M, int32_t K, int32_t N, int32_t num_experts, int32_t top_k,
    int32_t sorted_len, int32_t block_m, float scaling_factor, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* ALPHA_MOE_H */
