// prologue.cuh: routing, moe_align_block_size and FP8 quantisation (with the output zeroed) in
// one launch, for small batches, where every launch of the separate kernels costs more than
// its work.
//
// Block 0 (16 warps) first writes the padding the layout will not write (fill_before_layout: it
// needs no ids), then routes the tokens with the device functions of moe_ops/routing.cuh:
// DeepSeek-V3's groups of 32 for up to 8 tokens with the whole block (route_grouped_block),
// anything else a warp per token (warp w takes tokens w, w + 16, ...); after a __syncthreads it
// lays out the slots it has just written with align_small_block (moe_ops/align.cuh). Up to 32
// slots the ids come from a copy in shared memory; more are read back through L2 (coherent
// loads: never the read-only path for data written by the same launch).
// Blocks 1.. quantise meanwhile, a warp per 128-value group (moe_ops/quant.cuh quant_group),
// zeroing the output in the same pass: quantisation does not depend on routing. The results
// are those of the separate kernels bit for bit, because they are the same functions.
//
// Latency at M = 1: one launch, and block 0's critical path is the logits' load, the token's
// scores, group scores and top-k rounds, then the layout (one warp up to 32 slots), while the
// quantising blocks run on other SMs; the fused kernel's launch overlaps all of it. Routing in
// one block costs about a token's latency per 16 tokens, so the separate kernels (a block per 4
// tokens) win from a few dozen tokens on; the entry takes up to kPrologueMaxSlots slots either
// way.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../griddep.cuh"
#include "align.cuh"
#include "quant.cuh"
#include "routing.cuh"
#include "warp.cuh"

namespace amoe {
namespace ops {

constexpr int kPrologueWarps = kAlignSmallWarps;      // block 0 aligns: one thread per expert
constexpr int kPrologueThreads = kAlignSmallThreads;  // every block: 16 warps
constexpr int kPrologueMaxSlots = 4096;               // AMOE_PROLOGUE_MAX_SLOTS
static_assert(kPrologueMaxSlots <= kAlignSmallMaxSlots, "the one-block alignment");

struct PrologueParams {
  RoutingParams route;
  AlignParams align;  // align.topk_ids == route.topk_ids, num_slots = M * width
  const __nv_bfloat16* x;
  uint8_t* q;
  float* scale;
  __nv_bfloat16* zero_out;  // or null
  int64_t groups;           // M * K / 128
};

// Dynamic shared memory of block 0: the routing's (a row per routing warp, or the block's
// scores and keys, route_grouped_block), then, reused, the alignment's; after both, up to 32
// slots' ids (prologue_ids_offset).
__host__ __device__ inline int prologue_ids_offset(bool grouped, int vpl, int align_experts) {
  const int row_bytes = routing_grouped_smem_words(vpl) * static_cast<int>(sizeof(int));
  const int rows = grouped ? kPrologueWarps * row_bytes : 0;
  const int block = grouped ? block_routing_smem_bytes(vpl) : 0;
  const int routing = rows > block ? rows : block;
  const int align = align_small_smem_bytes(align_experts);
  return routing > align ? routing : align;
}
__host__ __device__ inline int prologue_smem_bytes(bool grouped, int vpl, int align_experts) {
  return prologue_ids_offset(grouped, vpl, align_experts) +
         kAlignWarpMaxSlots * static_cast<int>(sizeof(int32_t));
}
static_assert(kPrologueWarps * kMaxRoutingSlotsPerLane * kWarp * 4 <= 48 * 1024,
              "routing rows within the default dynamic shared memory limit");
static_assert(block_routing_smem_bytes(kBlockRoutingMaxVpl) + kAlignWarpMaxSlots * 4 <= 48 * 1024,
              "the block's routing within the default dynamic shared memory limit");
static_assert(kPrologueThreads / kWarp >= kBlockRoutingMaxTokens, "a warp per token at most");
static_assert((kAlignSmallWarps * kMaxAlignExperts + kMaxAlignExperts + 1 + kWarp + 1 +
               kAlignWarpMaxSlots) * 4 <=
                  48 * 1024,
              "alignment and ids within the default dynamic shared memory limit");

// A warp per token (warp w takes tokens w, w + 16, ...), each with its row of `smem`.
template <int VPL, bool kGrouped>
__device__ __forceinline__ void route_by_warps(const RoutingParams& route, int* smem,
                                               int32_t* ids_smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (route.M > kPrologueWarps) {
    // More tokens than warps: the logits of the later rounds are fetched into L2 now, so that a
    // warp's next token does not wait for DRAM again.
    const char* logits = reinterpret_cast<const char*>(route.logits);
    const size_t bytes = sizeof(float) * static_cast<size_t>(route.M) * route.E;
    const size_t first = sizeof(float) * size_t{kPrologueWarps} * route.E / 128 * 128;
    for (size_t off = first + threadIdx.x * size_t{128}; off < bytes;
         off += size_t{kPrologueThreads} * 128) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(logits + off));
    }
  }
  for (int token = warp; token < route.M; token += kPrologueWarps) {
    if constexpr (kGrouped) {
      uint32_t* row = reinterpret_cast<uint32_t*>(smem) + warp * routing_grouped_smem_words(VPL);
      route_grouped_token<VPL>(route, token, lane, row, ids_smem);
    } else {
      route_softmax_token<VPL>(route, token, lane, ids_smem);
    }
  }
}

// One block per SM is enough (block 0 routes, the others quantise), and lets a thread have the
// 128 registers a lane's overlapping double-precision sigmoids take; without it ptxas aimed at
// 64 and spilled.
template <int VPL, bool kGrouped>
__global__ void __launch_bounds__(kPrologueThreads, 1) moe_prologue_kernel(const PrologueParams p) {
  extern __shared__ int smem[];
  griddep::allow_dependents();  // the fused kernel's launch overlaps this one
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (blockIdx.x > 0) {
    const int64_t g = static_cast<int64_t>(blockIdx.x - 1) * kPrologueWarps + warp;
    if (g < p.groups) quant_group(p.x, g, p.q, p.scale, p.zero_out, lane);
    return;
  }
  fill_before_layout(p.align, threadIdx.x, kPrologueThreads);  // needs no ids: before routing
  // Up to 32 slots the routing warps also leave the ids in shared memory for the layout.
  int32_t* ids_smem =
      p.align.num_slots <= kAlignWarpMaxSlots
          ? reinterpret_cast<int32_t*>(reinterpret_cast<char*>(smem) +
                                       prologue_ids_offset(kGrouped, VPL, p.align.E))
          : nullptr;
  bool by_block = false;
  if constexpr (kGrouped && VPL <= kBlockRoutingMaxVpl) {
    by_block = block_routing_fits(p.route.M, p.route.E, p.route.n_group);
    if (by_block) route_grouped_block<VPL>(p.route, smem, ids_smem, kPrologueThreads);
  }
  if (!by_block) route_by_warps<VPL, kGrouped>(p.route, smem, ids_smem);
  __syncthreads();  // every token routed (ids in global memory), the routing rows free
  align_small_block(p.align, smem, ids_smem);
}

}  // namespace ops
}  // namespace amoe
