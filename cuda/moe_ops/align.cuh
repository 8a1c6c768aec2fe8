// align.cuh: moe_align_block_size with SGLang's layout, deterministic.
//
// Output (the layout SGLang's and vLLM's fused MoE kernels read):
//   sorted_token_ids[sorted_len]: the flat slot ids (token * top_k + slot) grouped by expert in
//     expert order, each expert's run padded to a multiple of block_m with the pad value
//     num_slots (= M * top_k); everything past the used part is pad too.
//   expert_ids[num_blocks]: the expert of each block of block_m sorted entries; blocks past
//     num_tokens_post_padded get 0 (as the golden files do; the fused kernel never reads them).
//   num_tokens_post_padded[1]: the used length (a multiple of block_m).
// Ids < 0 or >= E (experts on another rank) are skipped. Within an expert the slots keep
// ascending order, which makes the result deterministic and equal to the CPU reference
// (src/reference.ts moeAlignBlockSize).
//
// How. The slots are cut into contiguous segments, one per warp. A warp walks its segment 32
// slots at a time; __match_any_sync groups the lanes that hold the same expert, so a lane's
// rank among them (popc of the lower peers) and one shared-memory update per group replace
// atomics, keeping the order. Pass 1 counts per (segment, expert); a scan over segments and
// experts gives every (segment, expert) its first position; pass 2 walks the segments again
// and writes each slot there.
//   - up to 32 slots (a few tokens): one warp lays them out over the padding the block wrote
//     (align_warp_block), inside the one-block path below;
//   - up to kAlignSmallMaxSlots slots: one block of 16 warps does all of it (one launch;
//     align_small_block, which the single-launch prologue (moe_ops/prologue.cuh) calls too,
//     after routing in the same block). Segments are whole warps' worth of slots, so a small
//     batch uses as few warps as it needs (one for up to 32 slots) and the per-expert prefix
//     walks only those;
//   - more: three launches (count, scan, scatter) over at most kAlignMaxSegments segments,
//     with the per-segment counts in a caller-provided workspace.
// The kernels are in align.cu (headers hold device functions only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "warp.cuh"

namespace amoe {
namespace ops {

constexpr int kMaxAlignExperts = 512;
constexpr int kAlignSmallWarps = 16;
constexpr int kAlignSmallThreads = kAlignSmallWarps * kWarp;  // 512 = kMaxAlignExperts
constexpr int kAlignSmallMaxSlots = 8192;
constexpr int kAlignWarpsPerBlock = 8;
constexpr int kAlignMaxSegments = 256;
constexpr int kAlignMinSegment = 256;
constexpr int kAlignScanThreads = 512;  // one thread per expert

static_assert(kAlignSmallThreads >= kMaxAlignExperts, "one thread per expert in the scan");
static_assert(kAlignScanThreads >= kMaxAlignExperts, "one thread per expert in the scan");

struct AlignParams {
  const int32_t* topk_ids;  // [num_slots]
  int num_slots, E, block_m;
  int32_t* sorted;  // [sorted_len]
  int sorted_len;
  int32_t* expert_ids;  // [num_blocks]
  int num_blocks;
  int32_t* ntpp;  // [1]
  // Large path only: per-segment counts [segments, E] (exclusive prefix over segments after
  // the scan) and each expert's first position [E + 1] (the last one is the used length).
  int32_t* counts;
  int32_t* starts;
  int segment;   // slots per segment
  int segments;
};

// Slots per segment and segment count of the large path (the small one uses one block).
__host__ __device__ inline void align_segments(int num_slots, int* segment, int* segments) {
  int s = (num_slots + kAlignMaxSegments - 1) / kAlignMaxSegments;
  s = (s + kWarp - 1) / kWarp * kWarp;
  if (s < kAlignMinSegment) s = kAlignMinSegment;
  *segment = s;
  *segments = (num_slots + s - 1) / s;
}

__device__ __forceinline__ bool valid_expert(int e, int E) { return e >= 0 && e < E; }

// The ids are read with ld.global.cg (coherent, L2), never through the read-only path: in the
// prologue they were written by the same launch.
//
// Adds the number of valid ids in [begin, end) per expert into cnt[E] (shared memory, owned
// by this warp).
__device__ __forceinline__ void warp_count(const int32_t* ids, int begin, int end, int E,
                                           int* cnt, int lane) {
  for (int base = begin; base < end; base += kWarp) {
    const int i = base + lane;
    const int e = i < end ? __ldcg(ids + i) : -1;
    const bool valid = valid_expert(e, E);
    const unsigned peers = __match_any_sync(kFullMask, valid ? e : -1);
    if (valid && lane == 31 - __clz(peers)) cnt[e] += __popc(peers);
    __syncwarp();
  }
}

// Writes every valid slot i of [begin, end) at run[e]++ (run: shared memory, owned by this
// warp), in ascending order of i within each expert.
__device__ __forceinline__ void warp_scatter(const int32_t* ids, int begin, int end, int E,
                                             int* run, int32_t* sorted, int lane) {
  const unsigned lower = lanemask_lt();
  for (int base = begin; base < end; base += kWarp) {
    const int i = base + lane;
    const int e = i < end ? __ldcg(ids + i) : -1;
    const bool valid = valid_expert(e, E);
    const unsigned peers = __match_any_sync(kFullMask, valid ? e : -1);
    if (valid) sorted[run[e] + __popc(peers & lower)] = i;
    __syncwarp();
    if (valid && lane == 31 - __clz(peers)) run[e] += __popc(peers);
    __syncwarp();
  }
}

// expert_ids of blocks first, first + stride, ... below `end`: the expert whose run holds the
// block's first entry (a binary search over start[0..E], start[E] = ntpp), 0 past ntpp.
__device__ __forceinline__ void fill_expert_ids(const int* start, const AlignParams& p, int first,
                                                int stride, int end) {
  const int ntpp = start[p.E];
  for (int b = first; b < end; b += stride) {
    const int64_t pos = static_cast<int64_t>(b) * p.block_m;
    int e = 0;
    if (pos < ntpp) {
      int lo = 0, hi = p.E - 1;  // the last expert whose run starts at or before pos
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (start[mid] <= pos) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      e = lo;
    }
    p.expert_ids[b] = e;
  }
}

// Pads sorted_token_ids from ntpp up to `end`.
__device__ __forceinline__ void fill_tail(const AlignParams& p, int ntpp, int first, int stride,
                                          int end) {
  for (int i = ntpp + first; i < end; i += stride) p.sorted[i] = p.num_slots;
}

// How far a layout can reach: each expert that gets slots pads them with at most block_m - 1
// entries, so num_tokens_post_padded <= num_slots + min(E, num_slots) * (block_m - 1), while
// the buffers are sized for E experts. At small batches most of sorted_token_ids lies past it.
__device__ __forceinline__ int layout_bound(const AlignParams& p) {
  const int64_t reach =
      p.num_slots + static_cast<int64_t>(min(p.E, p.num_slots)) * (p.block_m - 1);
  return static_cast<int>(min(reach, static_cast<int64_t>(p.sorted_len)));
}

// The first block past layout_bound (its first entry is past any ntpp).
__device__ __forceinline__ int blocks_in_bound(const AlignParams& p) {
  return min((layout_bound(p) + p.block_m - 1) / p.block_m, p.num_blocks);
}

constexpr int kAlignWarpMaxSlots = kWarp;  // align_warp_block's slots at most

// What the one-block layouts do not write, written before them (the prologue's even before it
// routes): everything past layout_bound is pad, in blocks of expert 0, whatever the ids; up to
// 32 slots (align_warp_block) everything is, and the layout overwrites its slots and blocks.
// Every thread of the block calls it, and a barrier separates it from the layout.
__device__ __forceinline__ void fill_before_layout(const AlignParams& p, int first, int stride) {
  const bool all = p.num_slots <= kAlignWarpMaxSlots;
  fill_tail(p, all ? 0 : layout_bound(p), first, stride, p.sorted_len);
  for (int b = (all ? 0 : blocks_in_bound(p)) + first; b < p.num_blocks; b += stride) {
    p.expert_ids[b] = 0;
  }
}

// Thread e (< E) knows its expert's count and first position: pads the end of its run.
__device__ __forceinline__ void pad_run(const AlignParams& p, int start, int count, int padded) {
  for (int i = start + count; i < start + padded; ++i) p.sorted[i] = p.num_slots;
}

__device__ __forceinline__ int round_up_to(int v, int m) { return (v + m - 1) / m * m; }

// ---- up to 32 slots: one warp lays them out, the block writes the padding ----

// The layout of at most 32 slots (a few tokens: decode) without the count / scan / scatter
// passes: lane i holds slot i, the lanes of one expert find each other (__match_any_sync),
// and each expert's first block is the block counts of the smaller experts, summed over the
// lanes that lead their expert. One read of the ids instead of two, no barrier, no scan. The
// same layout as align_small_block. It writes only the slots, their blocks' experts and ntpp:
// fill_before_layout has written everything else (pad, expert 0) beforehand, so that nothing
// after the count waits for it (bench/NOTES.md, item 79). Warp 0 runs it; `ids_smem`: the ids
// in shared memory, or null to read them from topk_ids.
__device__ __forceinline__ void align_warp_block(const AlignParams& p, const int32_t* ids_smem) {
  const int lane = threadIdx.x % kWarp;
  if (threadIdx.x >= kWarp) return;
  const int e = lane >= p.num_slots      ? -1
                : ids_smem != nullptr ? ids_smem[lane]
                                      : __ldcg(p.topk_ids + lane);
  const bool valid = valid_expert(e, p.E);
  const unsigned peers = __match_any_sync(kFullMask, valid ? e : -1);
  const int count = __popc(peers);
  const bool leads = valid && lane == __ffs(peers) - 1;
  const int blocks = leads ? (count + p.block_m - 1) / p.block_m : 0;
  int first = 0, used = 0;  // in blocks
  for (int j = 0; j < kWarp; ++j) {
    const int ej = __shfl_sync(kFullMask, e, j);
    const int bj = __shfl_sync(kFullMask, blocks, j);  // 0 unless lane j leads its expert
    if (ej < e) first += bj;
    used += bj;
  }
  if (valid) p.sorted[first * p.block_m + __popc(peers & lanemask_lt())] = lane;
  for (int b = first; b < first + blocks; ++b) p.expert_ids[b] = e;
  if (lane == 0) *p.ntpp = used * p.block_m;
}

// ---- small path: one block does everything ----
// Shared memory: cnt[16][E], start[E + 1], scan scratch[33].
__host__ __device__ inline int align_small_smem_bytes(int E) {
  return static_cast<int>(sizeof(int)) * (kAlignSmallWarps * E + E + 1 + kWarp + 1);
}

// The whole layout by one block of kAlignSmallThreads threads up to layout_bound (past it:
// fill_before_layout); every thread of the block must call it (it contains __syncthreads).
// `smem`: align_small_smem_bytes(E) bytes; `ids_smem`: see align_warp_block (up to 32 slots).
__device__ __forceinline__ void align_small_block(const AlignParams& p, int* smem,
                                                  const int32_t* ids_smem = nullptr) {
  if (p.num_slots <= kAlignWarpMaxSlots) {
    align_warp_block(p, ids_smem);
    return;
  }
  int* cnt = smem;  // [warps][E]: per-warp counts, then each warp's first position per expert
  int* start = cnt + kAlignSmallWarps * p.E;
  int* scratch = start + p.E + 1;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  // Segments of whole warps' worth of slots, as few warps as that takes (0 with no slots).
  const int segment =
      round_up_to(max((p.num_slots + kAlignSmallWarps - 1) / kAlignSmallWarps, 1), kWarp);
  const int warps = (p.num_slots + segment - 1) / segment;
  for (int i = tid; i < warps * p.E; i += blockDim.x) cnt[i] = 0;
  __syncthreads();

  const int begin = min(warp * segment, p.num_slots);
  const int end = min(begin + segment, p.num_slots);
  int* my = cnt + warp * p.E;
  if (warp < warps) warp_count(p.topk_ids, begin, end, p.E, my, lane);
  __syncthreads();

  int total = 0;
  if (tid < p.E) {
    for (int w = 0; w < warps; ++w) {
      const int c = cnt[w * p.E + tid];
      cnt[w * p.E + tid] = total;  // this warp's first rank within the expert
      total += c;
    }
  }
  const int padded = tid < p.E ? round_up_to(total, p.block_m) : 0;
  int ntpp = 0;
  const int first = block_exclusive_scan(padded, scratch, &ntpp);
  if (tid < p.E) {
    start[tid] = first;
    for (int w = 0; w < warps; ++w) cnt[w * p.E + tid] += first;
    pad_run(p, first, total, padded);
  }
  if (tid == 0) {
    start[p.E] = ntpp;
    *p.ntpp = ntpp;
  }
  __syncthreads();
  fill_expert_ids(start, p, tid, blockDim.x, blocks_in_bound(p));
  fill_tail(p, ntpp, tid, blockDim.x, layout_bound(p));
  if (warp < warps) warp_scatter(p.topk_ids, begin, end, p.E, my, p.sorted, lane);
}

}  // namespace ops
}  // namespace amoe
