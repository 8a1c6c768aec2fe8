// align.cu: the exported moe_align_block_size entries. Validates every argument and launches
// the one-block kernel (up to kAlignSmallMaxSlots slots) or the count / scan / scatter kernels
// (more slots; they need the workspace amoe_moe_align_workspace_bytes asks for). No
// allocation, no synchronisation.
#include <cstdint>

#include "moe_ops/align.cuh"
#include "status.cuh"

namespace amoe {
namespace {

bool aligned4(const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; }

// Bytes of workspace for num_slots slots over E experts: 0 on the one-block path.
size_t workspace_bytes(int num_slots, int E) {
  if (num_slots <= ops::kAlignSmallMaxSlots) return 0;
  int segment = 0, segments = 0;
  ops::align_segments(num_slots, &segment, &segments);
  return sizeof(int32_t) * (static_cast<size_t>(segments) * E + E + 1);
}

int check_sizes(const char* what, int32_t num_slots, int32_t E) {
  AMOE_REQUIRE(num_slots >= 0, "%s: num_slots must be >= 0, got %d", what, num_slots);
  if (E < 1 || E > ops::kMaxAlignExperts) {
    return fail(AMOE_ERR_UNSUPPORTED, "%s: num_experts %d is not supported: valid values are 1..%d",
                what, E, ops::kMaxAlignExperts);
  }
  return AMOE_OK;
}

}  // namespace
}  // namespace amoe

extern "C" {

int amoe_moe_align_workspace_bytes(int32_t num_slots, int32_t num_experts, size_t* bytes) {
  using namespace amoe;
  AMOE_REQUIRE(bytes != nullptr, "amoe_moe_align_workspace_bytes: bytes is null");
  *bytes = 0;
  AMOE_TRY(check_sizes("amoe_moe_align_workspace_bytes", num_slots, num_experts));
  *bytes = workspace_bytes(num_slots, num_experts);
  return AMOE_OK;
}

int amoe_moe_align_block_size(const int32_t* topk_ids, int32_t num_slots, int32_t num_experts,
                              int32_t block_m, int32_t* sorted_token_ids, int32_t sorted_len,
                              int32_t* expert_ids, int32_t num_blocks,
                              int32_t* num_tokens_post_padded, void* workspace,
                              size_t workspace_size, void* stream) {
  using namespace amoe;
  const char* what = "amoe_moe_align_block_size";
  AMOE_TRY(check_sizes(what, num_slots, num_experts));
  AMOE_REQUIRE(block_m >= 1 && block_m <= 1024, "%s: block_m must be in 1..1024, got %d", what,
               block_m);
  AMOE_REQUIRE(sorted_token_ids != nullptr && expert_ids != nullptr &&
                   num_tokens_post_padded != nullptr && (num_slots == 0 || topk_ids != nullptr),
               "%s: topk_ids, sorted_token_ids, expert_ids and num_tokens_post_padded must not "
               "be null",
               what);
  AMOE_REQUIRE(aligned4(topk_ids) && aligned4(sorted_token_ids) && aligned4(expert_ids) &&
                   aligned4(num_tokens_post_padded) && aligned4(workspace),
               "%s: every pointer must be 4-byte aligned", what);
  const int64_t min_sorted =
      static_cast<int64_t>(num_slots) + static_cast<int64_t>(num_experts) * (block_m - 1);
  AMOE_REQUIRE(min_sorted <= INT32_MAX, "%s: num_slots + num_experts * (block_m - 1) overflows int32",
               what);
  AMOE_REQUIRE(sorted_len >= min_sorted,
               "%s: sorted_token_ids has %d entries; %d slots over %d experts in blocks of %d "
               "need num_slots + num_experts * (block_m - 1) = %lld",
               what, sorted_len, num_slots, num_experts, block_m,
               static_cast<long long>(min_sorted));
  const int64_t min_blocks = (min_sorted + block_m - 1) / block_m;
  AMOE_REQUIRE(num_blocks >= min_blocks,
               "%s: expert_ids has %d entries; the layout needs ceil(%lld / %d) = %lld", what,
               num_blocks, static_cast<long long>(min_sorted), block_m,
               static_cast<long long>(min_blocks));
  AMOE_REQUIRE(static_cast<int64_t>(num_blocks) * block_m <= INT32_MAX,
               "%s: expert_ids (%d entries) times block_m (%d) overflows int32", what, num_blocks,
               block_m);
  const size_t need = workspace_bytes(num_slots, num_experts);
  AMOE_REQUIRE(workspace_size >= need && (need == 0 || workspace != nullptr),
               "%s: the workspace has %zu bytes, %d slots over %d experts need %zu "
               "(amoe_moe_align_workspace_bytes)",
               what, workspace != nullptr ? workspace_size : size_t(0), num_slots, num_experts,
               need);
  AMOE_TRY(select_device());

  ops::AlignParams p{};
  p.topk_ids = topk_ids;
  p.num_slots = num_slots;
  p.E = num_experts;
  p.block_m = block_m;
  p.sorted = sorted_token_ids;
  p.sorted_len = sorted_len;
  p.expert_ids = expert_ids;
  p.num_blocks = num_blocks;
  p.ntpp = num_tokens_post_padded;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);

  if (need == 0) {
    ops::align_small_kernel<<<1, ops::kAlignSmallThreads, ops::align_small_smem_bytes(num_experts),
                              s>>>(p);
    return check_cuda(cudaGetLastError(), "align_small_kernel launch");
  }
  ops::align_segments(num_slots, &p.segment, &p.segments);
  p.counts = static_cast<int32_t*>(workspace);
  p.starts = p.counts + static_cast<size_t>(p.segments) * num_experts;
  const int blocks = (p.segments + ops::kAlignWarpsPerBlock - 1) / ops::kAlignWarpsPerBlock;
  const int threads = ops::kAlignWarpsPerBlock * ops::kWarp;
  const size_t count_smem = sizeof(int) * ops::kAlignWarpsPerBlock * num_experts;
  ops::align_count_kernel<<<blocks, threads, count_smem, s>>>(p);
  AMOE_CUDA(cudaGetLastError());
  ops::align_scan_kernel<<<1, ops::kAlignScanThreads, 0, s>>>(p);
  AMOE_CUDA(cudaGetLastError());
  const size_t scatter_smem = count_smem + sizeof(int) * (num_experts + 1);
  ops::align_scatter_kernel<<<blocks, threads, scatter_smem, s>>>(p);
  return check_cuda(cudaGetLastError(), "align_scatter_kernel launch");
}

}  // extern "C"
