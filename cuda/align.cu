// align.cu: the exported moe_align_block_size entries. Validates every argument and launches
// the one-block kernel (up to kAlignSmallMaxSlots slots) or the count / scan / scatter kernels
// (more slots; they need the workspace amoe_moe_align_workspace_bytes asks for). No
// allocation, no synchronisation.
#include <cstdint>

#include "griddep.cuh"
#include "moe_ops/align.cuh"
#include "moe_ops/validate.cuh"
#include "status.cuh"

namespace amoe {
namespace ops {

// The kernels (the device code they run is in moe_ops/align.cuh).

// ---- small path: one block ----

// Both paths' first kernel follows the routing as a programmatic dependent, and the last one
// lets the quantiser's launch overlap it (griddep.cuh).
__global__ void __launch_bounds__(kAlignSmallThreads) align_small_kernel(const AlignParams p) {
  extern __shared__ int smem[];
  griddep::allow_dependents();
  griddep::wait();  // the ids; and a kernel before this one may still read the outputs
  fill_before_layout(p, threadIdx.x, blockDim.x);
  __syncthreads();  // up to 32 slots the layout overwrites part of it
  align_small_block(p, smem);
}

// ---- large path: count, scan, scatter ----

// One warp per segment: counts[g][e] = valid ids of segment g routed to e.
__global__ void __launch_bounds__(kAlignWarpsPerBlock * kWarp)
    align_count_kernel(const AlignParams p) {
  extern __shared__ int smem[];
  griddep::wait();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int g = blockIdx.x * kAlignWarpsPerBlock + warp;
  if (g >= p.segments) return;
  int* my = smem + warp * p.E;
  for (int e = lane; e < p.E; e += kWarp) my[e] = 0;
  __syncwarp();
  const int begin = g * p.segment;
  const int end = min(begin + p.segment, p.num_slots);
  warp_count(p.topk_ids, begin, end, p.E, my, lane);
  int32_t* row = p.counts + static_cast<size_t>(g) * p.E;
  for (int e = lane; e < p.E; e += kWarp) row[e] = my[e];
}

// One block, one thread per expert: counts become exclusive prefixes over segments, then the
// experts' padded runs are laid out (starts, num_tokens_post_padded, the pads inside runs).
__global__ void __launch_bounds__(kAlignScanThreads) align_scan_kernel(const AlignParams p) {
  __shared__ int scratch[kWarp + 1];
  const int e = threadIdx.x;
  int total = 0;
  if (e < p.E) {
    constexpr int kChunk = 8;  // loads first, then the dependent sums: keeps 8 loads in flight
    int g = 0;
    for (; g + kChunk <= p.segments; g += kChunk) {
      int c[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) c[j] = p.counts[static_cast<size_t>(g + j) * p.E + e];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        p.counts[static_cast<size_t>(g + j) * p.E + e] = total;
        total += c[j];
      }
    }
    for (; g < p.segments; ++g) {
      const int c = p.counts[static_cast<size_t>(g) * p.E + e];
      p.counts[static_cast<size_t>(g) * p.E + e] = total;
      total += c;
    }
  }
  const int padded = e < p.E ? round_up_to(total, p.block_m) : 0;
  int ntpp = 0;
  const int first = block_exclusive_scan(padded, scratch, &ntpp);
  if (e < p.E) {
    p.starts[e] = first;
    pad_run(p, first, total, padded);
  }
  if (e == 0) {
    p.starts[p.E] = ntpp;
    *p.ntpp = ntpp;
  }
}

// One warp per segment scatters its slots; all blocks together fill expert_ids and the tail.
__global__ void __launch_bounds__(kAlignWarpsPerBlock * kWarp)
    align_scatter_kernel(const AlignParams p) {
  extern __shared__ int smem[];
  griddep::allow_dependents();
  int* start = smem;               // [E + 1]
  int* run = smem + p.E + 1;       // [warps][E]
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  for (int e = tid; e <= p.E; e += blockDim.x) start[e] = p.starts[e];
  __syncthreads();
  const int ntpp = start[p.E];
  fill_expert_ids(start, p, blockIdx.x * blockDim.x + tid, gridDim.x * blockDim.x, p.num_blocks);
  fill_tail(p, ntpp, blockIdx.x * blockDim.x + tid, gridDim.x * blockDim.x, p.sorted_len);
  const int g = blockIdx.x * kAlignWarpsPerBlock + warp;
  if (g >= p.segments) return;
  int* my = run + warp * p.E;
  const int32_t* row = p.counts + static_cast<size_t>(g) * p.E;
  for (int e = lane; e < p.E; e += kWarp) my[e] = start[e] + row[e];
  __syncwarp();
  const int begin = g * p.segment;
  const int end = min(begin + p.segment, p.num_slots);
  warp_scatter(p.topk_ids, begin, end, p.E, my, p.sorted, lane);
}

}  // namespace ops
}  // namespace amoe

namespace amoe {
namespace {

// Bytes of workspace for num_slots slots over E experts: 0 on the one-block path.
size_t workspace_bytes(int num_slots, int E) {
  if (num_slots <= ops::kAlignSmallMaxSlots) return 0;
  int segment = 0, segments = 0;
  ops::align_segments(num_slots, &segment, &segments);
  return sizeof(int32_t) * (static_cast<size_t>(segments) * E + E + 1);
}

}  // namespace
}  // namespace amoe

extern "C" {

int amoe_moe_align_workspace_bytes(int32_t num_slots, int32_t num_experts, size_t* bytes) {
  using namespace amoe;
  AMOE_REQUIRE(bytes != nullptr, "amoe_moe_align_workspace_bytes: bytes is null");
  *bytes = 0;
  AMOE_TRY(ops::check_align_sizes("amoe_moe_align_workspace_bytes", num_slots, num_experts));
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
  AMOE_TRY(ops::check_align_sizes(what, num_slots, num_experts));
  AMOE_TRY(ops::check_align_outputs(what, topk_ids, num_slots, num_experts, block_m,
                                    sorted_token_ids, sorted_len, expert_ids, num_blocks,
                                    num_tokens_post_padded));
  AMOE_REQUIRE(ops::aligned_to(workspace, 4), "%s: every pointer must be 4-byte aligned", what);
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
    return check_cuda(griddep::launch_dependent(ops::align_small_kernel, dim3(1),
                                                dim3(ops::kAlignSmallThreads),
                                                ops::align_small_smem_bytes(num_experts), s, p),
                      "align_small_kernel launch");
  }
  ops::align_segments(num_slots, &p.segment, &p.segments);
  p.counts = static_cast<int32_t*>(workspace);
  p.starts = p.counts + static_cast<size_t>(p.segments) * num_experts;
  const int blocks = (p.segments + ops::kAlignWarpsPerBlock - 1) / ops::kAlignWarpsPerBlock;
  const int threads = ops::kAlignWarpsPerBlock * ops::kWarp;
  const size_t count_smem = sizeof(int) * ops::kAlignWarpsPerBlock * num_experts;
  AMOE_CUDA(griddep::launch_dependent(ops::align_count_kernel, dim3(blocks), dim3(threads),
                                      count_smem, s, p));
  ops::align_scan_kernel<<<1, ops::kAlignScanThreads, 0, s>>>(p);
  AMOE_CUDA(cudaGetLastError());
  const size_t scatter_smem = count_smem + sizeof(int) * (num_experts + 1);
  ops::align_scatter_kernel<<<blocks, threads, scatter_smem, s>>>(p);
  return check_cuda(cudaGetLastError(), "align_scatter_kernel launch");
}

}  // extern "C"
