// unfused.cu: the exported entries of the unfused MoE baseline (alpha_moe.h, "unfused
// baseline"): the same layer as amoe_fused_moe_w8a8_up_down in four plain launches through a
// caller-provided workspace. A yardstick for benchmarks, not a fast path: nothing here is tuned.
#include <cmath>
#include <cstdint>

#include "status.cuh"
#include "unfused/kernels.cuh"

namespace amoe {
namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Byte offsets of the workspace regions, each aligned to 256 bytes.
struct Workspace {
  size_t h, act, act_scale, y, valid, total;
};

Workspace workspace_layout(int64_t M, int64_t K, int64_t N, int64_t top_k) {
  const size_t slots = size_t(M * top_k);
  Workspace w{};
  size_t at = 0;
  w.h = at;
  at += align_up(slots * size_t(N) * sizeof(float));  // f32 [slots, N]
  w.act = at;
  at += align_up(slots * size_t(N / 2));  // e4m3 [slots, N/2]
  w.act_scale = at;
  at += align_up(slots * size_t(N / 256) * sizeof(float));  // f32 [slots, N/256]
  w.y = at;
  at += align_up(slots * size_t(K) * sizeof(float));  // f32 [slots, K]
  w.valid = at;
  at += align_up(slots * sizeof(int32_t));  // i32 [slots]
  w.total = at;
  return w;
}

int check_dims(int32_t M, int32_t K, int32_t N, int32_t top_k) {
  AMOE_REQUIRE(M >= 0, "M must be >= 0, got %d", M);
  AMOE_REQUIRE(K > 0 && K % 128 == 0, "K must be a positive multiple of 128, got %d", K);
  AMOE_REQUIRE(N > 0 && N % 256 == 0, "N must be a positive multiple of 256, got %d", N);
  AMOE_REQUIRE(top_k > 0, "top_k must be > 0, got %d", top_k);
  AMOE_REQUIRE(int64_t(M) * top_k <= INT32_MAX, "M * top_k overflows int32");
  return AMOE_OK;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace
}  // namespace amoe

extern "C" {

int amoe_unfused_workspace_bytes(int32_t M, int32_t K, int32_t N, int32_t top_k, size_t* bytes) {
  using namespace amoe;
  AMOE_REQUIRE(bytes != nullptr, "amoe_unfused_workspace_bytes: bytes is null");
  *bytes = 0;
  AMOE_TRY(check_dims(M, K, N, top_k));
  *bytes = workspace_layout(M, K, N, top_k).total;
  return AMOE_OK;
}

int amoe_unfused_moe_w8a8(const void* x, const float* x_scale, const void* w, const float* w_scale,
                          const void* w2, const float* w2_scale, const int32_t* sorted_token_ids,
                          const int32_t* expert_ids, const int32_t* num_tokens_post_padded,
                          const float* topk_weights, void* out, void* workspace,
                          size_t workspace_bytes, int32_t M, int32_t K, int32_t N,
                          int32_t num_experts, int32_t top_k, int32_t sorted_len, int32_t block_m,
                          float scaling_factor, void* stream) {
  using namespace amoe;
  using namespace amoe::unfused;
  AMOE_REQUIRE(x && x_scale && w && w_scale && w2 && w2_scale && sorted_token_ids && expert_ids &&
                   num_tokens_post_padded && topk_weights && out,
               "a required device pointer is null");
  AMOE_TRY(check_dims(M, K, N, top_k));
  AMOE_REQUIRE(num_experts > 0, "num_experts must be > 0, got %d", num_experts);
  AMOE_REQUIRE(sorted_len >= 0, "sorted_len must be >= 0, got %d", sorted_len);
  AMOE_REQUIRE(block_m >= 1 && block_m <= kMaxBlockM, "block_m must be in 1..%d, got %d",
               kMaxBlockM, block_m);
  AMOE_REQUIRE(std::isfinite(scaling_factor), "scaling_factor must be finite");
  AMOE_REQUIRE(aligned(out, 2), "out must be 2-byte aligned (bf16)");
  AMOE_REQUIRE(aligned(x_scale, 4) && aligned(w_scale, 4) && aligned(w2_scale, 4) &&
                   aligned(topk_weights, 4) && aligned(sorted_token_ids, 4) &&
                   aligned(expert_ids, 4) && aligned(num_tokens_post_padded, 4),
               "scale, weight and id pointers must be 4-byte aligned");
  const Workspace layout = workspace_layout(M, K, N, top_k);
  AMOE_REQUIRE(workspace_bytes >= layout.total,
               "workspace has %zu bytes; M=%d K=%d N=%d top_k=%d needs %zu "
               "(amoe_unfused_workspace_bytes)",
               workspace_bytes, M, K, N, top_k, layout.total);
  AMOE_REQUIRE(layout.total == 0 || workspace != nullptr, "workspace is null");
  AMOE_REQUIRE(workspace == nullptr || aligned(workspace, kAlign),
               "workspace must be 256-byte aligned (as cudaMalloc returns it)");
  AMOE_TRY(select_device());
  if (M == 0) return AMOE_OK;

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  char* base = static_cast<char*>(workspace);
  float* h = reinterpret_cast<float*>(base + layout.h);
  uint8_t* act = reinterpret_cast<uint8_t*>(base + layout.act);
  float* act_scale = reinterpret_cast<float*>(base + layout.act_scale);
  float* y = reinterpret_cast<float*>(base + layout.y);
  int32_t* valid = reinterpret_cast<int32_t*>(base + layout.valid);
  const int slots = M * top_k;

  AMOE_CUDA(cudaMemsetAsync(valid, 0, size_t(slots) * sizeof(int32_t), s));
  const unsigned blocks = unsigned((int64_t(sorted_len) + block_m - 1) / block_m);
  if (blocks > 0) {
    GemmParams up{static_cast<const uint8_t*>(x),
                  x_scale,
                  top_k,
                  static_cast<const uint8_t*>(w),
                  w_scale,
                  h,
                  valid,
                  sorted_token_ids,
                  expert_ids,
                  num_tokens_post_padded,
                  sorted_len,
                  slots,
                  num_experts,
                  K,
                  N,
                  block_m,
                  true};
    grouped_gemm_kernel<<<dim3(blocks, N / kTileCols), kGemmThreads, 0, s>>>(up);
    AMOE_CUDA(cudaGetLastError());

    swiglu_quant_kernel<<<dim3(slots, N / 256), kGroup, 0, s>>>(h, valid, act, act_scale, N);
    AMOE_CUDA(cudaGetLastError());

    GemmParams down{act,
                    act_scale,
                    1,
                    static_cast<const uint8_t*>(w2),
                    w2_scale,
                    y,
                    nullptr,
                    sorted_token_ids,
                    expert_ids,
                    num_tokens_post_padded,
                    sorted_len,
                    slots,
                    num_experts,
                    N / 2,
                    K,
                    block_m,
                    false};
    grouped_gemm_kernel<<<dim3(blocks, K / kTileCols), kGemmThreads, 0, s>>>(down);
    AMOE_CUDA(cudaGetLastError());
  }
  weighted_sum_kernel<<<dim3(M, (K + kSumThreads - 1) / kSumThreads), kSumThreads, 0, s>>>(
      y, valid, topk_weights, static_cast<__nv_bfloat16*>(out), K, top_k, scaling_factor);
  AMOE_CUDA(cudaGetLastError());
  return AMOE_OK;
}

}  // extern "C"
