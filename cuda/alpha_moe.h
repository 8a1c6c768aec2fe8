/*
 * alpha_moe.h: the whole native contract of libalpha_moe.
 *
 * Every entry returns an amoe_status (0 = ok). On failure, amoe_last_error() returns a
 * message for the calling thread's last failure. Nothing here exits, aborts or prints.
 * Device pointers are plain void*; `stream` is a cudaStream_t (NULL: the legacy default
 * stream). Entries that touch the GPU first select the device chosen by amoe_set_device
 * (default 0), because CUDA's current device is per host thread and Deno calls from
 * several threads.
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
#define AMOE_ABI_VERSION 1

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
 * (N, K), AMOE_ERR_UNSUPPORTED with the valid values in the message otherwise. */
AMOE_API int amoe_fused_moe_check_config(int32_t K, int32_t N, int32_t block_m, int32_t block_n,
                                         int32_t warp_n, int32_t stages);

/*
 * out[token] += topk_weight * scaling_factor * (requant(silu(gate) * up) @ w2[e]^T)
 * for every (token, slot) routed to expert e, in one launch. FP8 e4m3 operands with
 * per-token-group (x: 1x128) and block (w, w2: 128x128) f32 scales; `w` rows interleave
 * gate and up in chunks of 8; `out` bf16 [M, K] must be zero on entry. Asynchronous
 * on `stream`; validates every argument before launching.
 */
AMOE_API int amoe_fused_moe_w8a8_up_down(
    const void* x, const float* x_scale, const void* w, const float* w_scale, const void* w2,
    const float* w2_scale, const int32_t* sorted_token_ids, const int32_t* expert_ids,
    const int32_t* num_tokens_post_padded, const float* topk_weights, void* out, int32_t M,
    int32_t K, int32_t N, int32_t num_experts, int32_t top_k, int32_t sorted_len,
    int32_t block_m, int32_t block_n, int32_t warp_n, int32_t stages, float scaling_factor,
    void* stream);

#ifdef __cplusplus
}
#endif

#endif /* ALPHA_MOE_H */
