// kernel.cuh: the fused FP8 MoE kernel (up projection, SwiGLU, FP8 re-quantisation, down
// projection, weighted bf16 accumulation) for one (token block, N slice) per CTA.
//
// Work split. A unit of work is (token block, N slice): a block of `block_m` sorted token
// slots that all go to one expert (moe_align_block_size layout) and a 256-row slice of the
// interleaved gate/up weights, i.e. 128 gate + 128 up rows = one 128-wide requantisation
// group of the intermediate. The token block is processed in sub-tiles of T tokens (T is the
// wgmma N dimension: tokens sit on the N side, weights on the 64-row M side, "swap AB").
//
// Split units. With `split` > 1 a cluster of `split` CTAs shares one unit, so that few tokens
// still spread the weight stream over many SMs. CTA r of the cluster takes the r-th share of
// the up projection's K blocks and of the down projection's output tiles. Its fp32 partial sums
// of the up projection go to its shared memory; the 16-row groups (8 gate/up pairs) of the
// slice are dealt round-robin to the CTAs, and each sums its groups over every CTA's partials
// through distributed shared memory and applies SwiGLU. Every CTA then copies the SwiGLU
// outputs of the pairs it does not own from their owners, and takes the per-token amax and
// writes the whole FP8 activation tile for its down-projection share by itself. Two cluster
// exchanges per sub-tile (ClusterExchange); the result is the same as with one CTA except for
// the order of the fp32 additions.
//
// N halves (kSplitN, the `split_n` config field). A cluster of two CTAs shares one unit by N
// instead: CTA r multiplies rows 128 r .. 128 r + 127 of the slice in the up projection, which
// are 64 whole gate/up pairs (the 8-row interleave), so it needs no partial sums from its peer.
// The two swap each token's amax over their 64 intermediates (one float per token) and then
// their halves of the FP8 activation tile (64 bytes per token); each takes half of the down
// projection's output tiles. A unit's bytes and tensor work are divided evenly without the
// split units' partial-sum buffer, so large token blocks can be split too (bench/NOTES.md,
// item 53). The result is the same as with one CTA.
//
// Warp roles. Warpgroup 0 is the producer: its four warps stream every operand (weight tiles
// by TMA, token rows and scales by cp.async) into a ring of `stages` shared-memory buffers.
// Warpgroups 1..WGS are consumers; each owns 256/WGS of the 256 weight rows of every stage.
// All-slices units (kAllSlices, the `all_slices` config field): one CTA per token block covers
// every N slice in turn (up tiles of slice 0, 1, ..., then each down tile's slice parts), sums
// the slices' down products in fp32 and adds each output row once. Such a unit is `slices` times
// as long as a one-slice unit, so the blocks past the launch's last full wave, which would run
// alone, run one CTA per slice instead (slice units, dealt after the whole blocks).
// Token halves (kHalves, blocks of 72-80 tokens): each consumer warpgroup owns all 256 rows
// for its own T tokens of a 2T-token sub-tile instead, so a weight tile serves 2T tokens where
// two sub-tiles of T would read it twice; the warpgroups then synchronise only with
// themselves between stages.
//
// The ring. Each stage holds one 256x128-byte weight tile (w for the up projection: the
// slice's rows at one 128-wide K block; w2 for the down projection: 256 output rows of the
// slice's 128 intermediate columns), the T x 128-byte token tile (up projection only) and
// the f32 scales that go with them. The producer runs the same sequence of tiles as the
// consumers: per sub-tile, the CTA's share of the K/128 up tiles, then of the ceil(K/256) down
// tiles.
//
// Barrier protocol. full[s]: 128 producer-thread arrivals + the weight tile's TMA transaction
// bytes (raised by thread 0 before it issues the copy); each thread's arrival is made by the
// async-copy unit once its share of the stage's token rows and scales has landed, so they are
// ordered before the consumers' acquire (the consumers then fence the token rows into the async
// proxy, which the wgmmas read through). empty[s]: one arrival per consumer thread, after its
// last read of the stage (its wgmmas have completed and its scale reads are done): every reader
// releases its own reads. Phase parity flips each time the ring wraps; the producer's first
// pass waits on parity 1, which a fresh barrier reports as complete (the prologue issues that
// pass's weight tiles without waiting at all).
//
// Cluster exchanges use two mbarriers in each CTA, alternating, each completing when every
// CTA of the cluster has arrived once (a shared-memory release fence before the arrivals, an
// acquire fence after the wait). A CTA can only reach exchange n+1 after all CTAs arrived for
// exchange n, so with two barriers an early arrival never lands in the phase before the one
// it is meant for. The cluster's barrier.cluster is used twice: arrived at (relaxed) by every
// thread in the prologue and waited for before the first exchange, and around the exit.
//
// Output. Each down tile's results (times the block scale, the activation scale, the top-k
// weight and the scaling factor) are rounded to bf16 into a staging tile, one 256-column row
// per token (each consumer warpgroup writes its columns, transposed out of the accumulator
// layout by stmatrix), and added into `out` by 16-byte vector reductions
// (red.global.add.v4.bf16x2), one warp instruction per 512-byte row.
//
// Shared-memory tiles are K-major rows of 128 bytes with the 128-byte swizzle (TMA writes the
// weight tiles swizzled; the token rows and the activation tile are placed by hand in the same
// pattern).
//
// Weight layouts. Row-major weights (the seed's [E, N, K] and [E, K, N/2]) make each 32 KiB
// tile 256 runs of 128 bytes, K or N/2 bytes apart. Stored tiles (AMOE_WEIGHTS_TILES, made once
// at load time) hold each tile's 256 rows of 128 bytes contiguously; the TMA unit reads them
// the same way and writes the same swizzled stage. Streamed from DRAM by every SM, contiguous
// tiles ran at 2970 GB/s against 2775 (bench/NOTES.md, item 42).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>

#include "../griddep.cuh"
#include "ptx.cuh"
#include "wgmma_fp8.cuh"

namespace amoe {

constexpr int kSliceRows = 256;                         // weight rows per stage
constexpr int kKBlock = 128;                            // K bytes per stage = one scale block
constexpr int kWeightTileBytes = kSliceRows * kKBlock;  // 32 KiB
constexpr int kProducerThreads = 128;  // warpgroup 0: every thread arrives on full[s]
constexpr float kFp8Max = 448.0f;
// The up projection promotes the FP8 partial sums to fp32 once per K block (four wgmma k32
// steps), as DeepGEMM does. Hopper's FP8 accumulation keeps limited precision: over 128 of K it
// changes which way more intermediates round when re-quantised to FP8, but the layer's distance
// from the exact one stays within 1 % of what promoting every 64 gave. Half the promotions'
// FFMAs, which take the consumers' issue slots from the wgmmas: 0.5-10 % faster at M >= 2048
// (bench/NOTES.md, items 36 and 130).
constexpr int kUpPromoteSteps = 4;

struct FusedMoeParams {
  const int32_t* sorted_token_ids;
  const int32_t* expert_ids;
  const int32_t* num_tokens_post_padded;
  const uint8_t* x;       // [M, K] FP8 tokens
  const float* x_scale;   // [M, K/128]
  const float* w_scale;   // [E, N/128, K/128], gate/up interleaved in chunks of 1
  const float* w2_scale;  // [E, K/128, N/256]
  const float* topk_weights;
  __nv_bfloat16* out;  // [M, K]
  int32_t M, K, N, top_k, block_m, stages;
  int32_t split;  // CTAs per cluster sharing one (token block, N slice) unit (N halves: 2)
  int32_t tiled;  // weights stored as whole tiles (AMOE_WEIGHTS_TILES), else row-major
  int32_t sorted_len;  // entries of sorted_token_ids; expert_ids has ceil(sorted_len / block_m)
  float scaling_factor;
  // Tail units (TailPart): the units past the main launch's last full wave run in a launch of
  // their own, after it, whose clusters share each unit; the main launch skips them.
  int32_t tail_part;
  int32_t tail_wave;  // units the main launch (or an all-slices launch) runs at once
  int32_t tail_room;  // tail units (clusters) the tail launch runs at once
  int32_t out_streamed;  // `out` is larger than the L2: its reductions are evict-first
};

enum TailPart : int32_t { kWholeLaunch = 0, kMainUnits = 1, kTailUnits = 2 };

// How many of `units` the tail launch takes: those past the main launch's last full wave,
// if they all fit in the tail launch at once; none when everything fits in one wave.
__host__ __device__ constexpr int tail_units(int units, int wave, int room) {
  return units > wave && units % wave <= room ? units % wave : 0;
}

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Shared-memory layout of one CTA for T tokens per sub-tile and WGS consumer warpgroups.
template <int T, int WGS>
struct SmemLayout {
  static constexpr int kTokenTileBytes = T * kKBlock;
  static constexpr int kXOffset = kWeightTileBytes;
  static constexpr int kScaleOffset = kXOffset + kTokenTileBytes;  // x scales [T], 2 w scales
  static constexpr int kStageBytes = round_up(kScaleOffset + T * 4 + 8, 1024);
  // Output staging: a bf16 row of the down tile's 256 output columns per token (each consumer
  // warpgroup writes its 256/WGS of them), padded by 16 bytes so the four token rows a warp
  // writes at once hit other banks. One tile, not two alternating: the barrier that frees
  // it from the last tile's reads overlaps this tile's wgmmas, and the bytes go to the ring.
  static constexpr int kStagingRowBytes = kSliceRows * 2;
  static constexpr int kStagingStride = kStagingRowBytes + 16;
  static constexpr int kStagingBytes = T * kStagingStride;

  // What a split unit's CTAs exchange: the fp32 partial sums of the up projection (kSliceRows
  // x T) and the SwiGLU outputs of the pairs each owns (kSliceRows / 2 x T).
  static constexpr int kPartialBytes = (kSliceRows + kSliceRows / 2) * T * 4;

  // Bytes after the ring: `act_tiles` activation tiles (one per N slice the CTA covers), output
  // staging, [split > 1: partial sums], two amax buffers, [act_tiles > 1: each slice's
  // activation scales], per-slot token row and weight.
  __host__ __device__ static constexpr int act_scale_bytes(int act_tiles) {
    return act_tiles > 1 ? act_tiles * T * 4 : 0;
  }
  __host__ __device__ static constexpr int tail_bytes(int block_m, int split, int act_tiles) {
    return act_tiles * kTokenTileBytes + kStagingBytes + (split > 1 ? kPartialBytes : 0) +
           2 * T * 4 + act_scale_bytes(act_tiles) + block_m * 8;
  }
  __host__ __device__ static constexpr int total_bytes(int stages, int block_m, int split,
                                                       int act_tiles) {
    return 1024 /* alignment slack */ + stages * kStageBytes +
           tail_bytes(block_m, split, act_tiles) + (stages + 1) * 16 /* ring and exchange barriers */;
  }
};

// The stage ring as seen by one role: both roles walk the stages in the same order.
struct Ring {
  uint8_t* base;
  uint64_t* full;
  uint64_t* empty;
  int stages, stage_bytes;
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ uint8_t* current() const { return base + stage * stage_bytes; }
  __device__ __forceinline__ void advance() {
    if (++stage == stages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// Per-CTA facts both roles need.
struct BlockInfo {
  int expert, slice, kblocks, subtiles;
  int slices;            // N slices this CTA covers, from `slice` on (all-slices units: all)
  int kb_begin, kb_end;  // this CTA's share of the up projection's K blocks
  int dt_begin, dt_end;  // and of the down projection's 256-row output tiles
  int split, rank;       // CTAs sharing the unit, and this one's rank among them
  int up_row0, up_rows;  // the slice's rows this CTA's up tiles hold (N halves: 128 of 256)
  // How thread 0, which issues the weight tiles, loads them (only its copy is meaningful):
  bool streamed;  // a full block that is its expert's only one: nothing re-reads its weights
  const CUtensorMap* w_map;   // WeightMaps: the promoted or the streaming version
  const CUtensorMap* w2_map;
  const int32_t* tok_row;  // [block_m] output row of each sorted slot, or -1
  float* tok_weight;       // [block_m] topk weight * scaling factor (consume fills it in)
};

// A barrier over the consumer threads of every CTA in the cluster (see the protocol above).
// One consumer thread per CTA fences, arrives and waits, with fences restricted to shared
// memory: full cluster-scope fences and acquires are GPU-wide MEMBARs and L1 invalidations
// in SASS, which every consumer thread doing them made a tenth of the kernel's stall samples
// at M=1. The named barriers carry the ordering to the other threads.
struct ClusterExchange {
  uint64_t* bars;  // [2], each expecting one arrival per CTA
  int split;
  uint32_t uses = 0;
  __device__ __forceinline__ void sync(int ctid, int threads) {
    ptx::named_barrier_sync(1, threads);  // every consumer thread's writes precede the fence
    if (ctid == 0) {
      uint64_t* bar = &bars[uses & 1];
      ptx::fence_release_cluster_smem();
      for (int peer = 0; peer < split; ++peer) {
        ptx::mbar_arrive_relaxed_cluster(ptx::cluster_addr(bar, peer));
      }
      ptx::mbar_wait_relaxed_cluster(bar, (uses >> 1) & 1);
      ptx::fence_acquire_cluster_smem();
    }
    ptx::named_barrier_sync(1, threads);
    ++uses;
  }
};

// An IEEE divide compiles to a branch around a slow path, and those branches serialise the
// sub-tile's SwiGLU and requantisation: 0.8 µs each at 8 tokens on an H200, 2.4 µs at 24
// (bench/NOTES.md, item 62). The fast division returns 0 for a denominator above 2^126, which
// is silu's limit there.
__device__ __forceinline__ float silu(float g) { return __fdividef(g, 1.0f + __expf(-g)); }

// Byte offset of element (row, k) in a K-major 128-byte-swizzled tile (1024-aligned base).
__device__ __forceinline__ int sw128_offset(int row, int k) {
  return row * 128 + ((((k >> 4) ^ row) & 7) << 4) + (k & 15);
}

// ---------------------------------------------------------------------------------------
// Producer: warpgroup 0. Stage i of a sub-tile is up tile kb_begin + i for i < nkb, else down
// tile dt_begin + i - nkb. Per stage, thread 0 loads the weight tile, and every thread copies
// its chunks of the token rows and its share of the f32 scales through the async-copy unit
// (cp.async); each thread's arrival on the full barrier is deferred until its copies have
// landed (cp.async.mbarrier.arrive). The producer never waits for a load: with
// the scales read into registers one stage ahead, every stage waited a global-load latency,
// which capped one CTA at about 50 GB/s whatever the ring depth.
//
// Weight tiles do not depend on the tokens, so the first pass through the ring (every slot
// free) is issued by the kernel's prologue before the token rows are read (issue_first_pass).

// Stages of the first pass of sub-tile 0: every one of them finds its slot free.
__device__ __forceinline__ int first_pass_stages(const BlockInfo& b, int stages) {
  return min(stages, ((b.kb_end - b.kb_begin) + (b.dt_end - b.dt_begin)) * b.slices);
}

// Where stage i of a sub-tile reads. A CTA that covers several N slices (kAllSlices) runs the
// up tiles of each slice in turn, then for each down tile the slices' parts of it in turn.
struct StageSource {
  bool up;
  int slice;  // of the CTA's slices (add BlockInfo::slice)
  int index;  // K block (up) or down tile
};
template <bool kAllSlices>
__device__ __forceinline__ StageSource stage_source(const BlockInfo& b, int i) {
  const int nkb = b.kb_end - b.kb_begin;
  if (!kAllSlices) {
    return i < nkb ? StageSource{true, 0, b.kb_begin + i} : StageSource{false, 0, b.dt_begin + i - nkb};
  }
  const int up_stages = nkb * b.slices;
  if (i < up_stages) return StageSource{true, i / nkb, b.kb_begin + i % nkb};
  const int j = i - up_stages;
  return StageSource{false, j % b.slices, b.dt_begin + j / b.slices};
}

// Raises the expected bytes of stage i's slot and loads its weight tile, with the L2 policy
// of BlockInfo::streamed: the weights of a full block that is its expert's only one are read
// by no other CTA (its N slices read disjoint rows) and go first when L2 needs room, ahead of
// the token and output rows that other CTAs come back to. Several blocks of one expert run
// side by side and each reads the weights: there, and in blocks of a few tokens, evict-first
// cost up to 8 % (bench/NOTES.md, item 29).
template <bool kAllSlices>
__device__ __forceinline__ void issue_weight_tile(const BlockInfo& b, bool tiled, uint8_t* st,
                                                  uint64_t* full, int i) {
  const StageSource src = stage_source<kAllSlices>(b, i);
  const int slice = b.slice + src.slice;
  const uint64_t policy = b.streamed ? ptx::policy_evict_first() : ptx::policy_evict_normal();
  ptx::mbar_expect_tx(full, src.up ? b.up_rows * kKBlock : kWeightTileBytes);
  // Both layouts are 5-dim maps (see the host's w_key, w2_key). An up tile is (K block, slice,
  // expert) in both. A down tile is (tile, slice, expert) when stored as tiles; row-major, its
  // rows are dim 1 (so that rows past K read as zeros) and dim 2 has size 1.
  if (src.up) {
    ptx::tma_load_5d(st, b.w_map, full, b.up_row0, src.index, slice, b.expert, policy);
  } else {
    const int dt = src.index;
    ptx::tma_load_5d(st, b.w2_map, full, tiled ? 0 : dt * kSliceRows, tiled ? dt : 0, slice,
                     b.expert, policy);
  }
}

// Called by thread 0 (the producer's lane 0) right after the barriers are initialised.
template <bool kAllSlices>
__device__ __forceinline__ void issue_first_pass(const BlockInfo& b, bool tiled, const Ring& ring) {
  const int first = first_pass_stages(b, ring.stages);
  for (int i = 0; i < first; ++i) {
    issue_weight_tile<kAllSlices>(b, tiled, ring.base + i * ring.stage_bytes, &ring.full[i], i);
  }
}

template <int T, bool kAllSlices>
__device__ __forceinline__ void produce(const FusedMoeParams& p, const BlockInfo& b, Ring ring,
                                        int ptid) {
  using L = SmemLayout<T, 1>;  // the ring's layout does not depend on WGS
  const int slices = p.N / kSliceRows;
  // Gate block scales of slice `slice` (the up ones follow them).
  const float* ws_expert = p.w_scale + size_t(b.expert) * (p.N / 128) * b.kblocks;
  const float* w2s_expert = p.w2_scale + size_t(b.expert) * b.kblocks * slices;
  const int nkb = b.kb_end - b.kb_begin;
  const int stages_per_sub = (nkb + (b.dt_end - b.dt_begin)) * b.slices;
  const int first = first_pass_stages(b, ring.stages);
  // Token rows go through the async-copy unit in 16-byte chunks, not one TMA copy per row,
  // which left the TMA unit fewer requests besides the weight tiles (bench/NOTES.md, item 33).
  // Thread ptid copies chunk ptid % 8 of rows ptid / 8 + 16 j, placed where the 128-byte
  // swizzle puts it.
  constexpr int kRowsPerThread = (T + 15) / 16;
  const int chunk = ptid % 8;
  const int row0 = ptid / 8;
  // Token column of this thread for the x scales: warp w takes columns w * kColsPerWarp + lane.
  constexpr int kColsPerWarp = (T + 3) / 4;
  const int lane = ptid % 32;
  const int col = (ptid / 32) * kColsPerWarp + lane;
  const bool has_col = lane < kColsPerWarp && col < T;
  // The loops stay rolled: the producer has 56 registers after setmaxnreg, and unrolled
  // copies of them spill.
  for (int sub = 0; sub < b.subtiles; ++sub) {
    const int t0 = sub * T;
    const int tcount = min(T, p.block_m - t0);
    const int row = has_col && col < tcount ? b.tok_row[t0 + col] : -1;  // -1: no token
    const uint8_t* src[kRowsPerThread];  // this thread's chunk of K block 0, or null
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int r = row0 + 16 * j;
      const int token = r < tcount ? b.tok_row[t0 + r] : -1;
      src[j] = token >= 0 ? p.x + size_t(token) * p.K + chunk * 16 : nullptr;
    }
#pragma unroll 1
    for (int i = 0; i < stages_per_sub; ++i) {
      uint8_t* st = ring.current();
      uint64_t* full = &ring.full[ring.stage];
      if (!(sub == 0 && i < first)) {  // else issued by the prologue
        ptx::mbar_wait(&ring.empty[ring.stage], ring.phase ^ 1);
        if (ptid == 0) issue_weight_tile<kAllSlices>(b, p.tiled != 0, st, full, i);
      }
      const StageSource source = stage_source<kAllSlices>(b, i);
      const int slice = b.slice + source.slice;
      // Scales: x scales [T] and gate, up for an up tile; w2 scales of the two 128-row halves
      // (at T, T + 1) for a down tile. Absent ones are zero-filled (source size 0).
      float* sc = reinterpret_cast<float*>(st + L::kScaleOffset);
      if (source.up) {
        const int kb = source.index;
        const float* ws_gate = ws_expert + 2 * slice * b.kblocks;
        const float* ws_up = ws_gate + b.kblocks;
        // Rows without a token are not copied: their columns of the products are never used.
#pragma unroll
        for (int j = 0; j < kRowsPerThread; ++j) {
          const int r = row0 + 16 * j;
          if (src[j] != nullptr) {
            ptx::cp_async_16(st + L::kXOffset + r * kKBlock + ((chunk ^ (r & 7)) << 4),
                             src[j] + kb * kKBlock);
          }
        }
        if (has_col) {
          const bool live = row >= 0;
          ptx::cp_async_4(sc + col, live ? p.x_scale + size_t(row) * b.kblocks + kb : ws_gate,
                          live ? 4 : 0);
        }
        if (ptid == 0) {
          ptx::cp_async_4(sc + T, ws_gate + kb, 4);
          ptx::cp_async_4(sc + T + 1, ws_up + kb, 4);
        }
      } else if (ptid == 0) {
        const int half = 2 * source.index;
        const float* w2s = w2s_expert + slice;
        ptx::cp_async_4(sc + T, w2s + size_t(half) * slices, 4);
        const bool hi = half + 1 < b.kblocks;  // K % 256 == 128: the last tile has one half
        ptx::cp_async_4(sc + T + 1, hi ? w2s + size_t(half + 1) * slices : w2s, hi ? 4 : 0);
      }
      ptx::cp_async_mbar_arrive(full);  // this thread's arrival, once its copies have landed
      ring.advance();
    }
  }
}

// ---------------------------------------------------------------------------------------
// Consumers: WGS warpgroups, each owning 256/WGS rows of every weight tile.
template <int T, int WGS, bool kHalves, bool kAllSlices, bool kSplitN>
__device__ __forceinline__ void consume(const FusedMoeParams& p, const BlockInfo& b, Ring ring,
                                        uint8_t* act, uint8_t* staging, float* partial,
                                        uint32_t* amax, float* act_scale,
                                        ClusterExchange xc, int ctid) {
  // kHalves: each warpgroup takes its own T tokens of the sub-tile against all 256 rows, so a
  // weight tile serves WGS * T tokens; else the warpgroups share T tokens and split the rows.
  constexpr int S = kHalves ? WGS * T : T;  // tokens per sub-tile
  using L = SmemLayout<S, WGS>;
  constexpr int kRowsPerWg = kHalves ? kSliceRows : kSliceRows / WGS;
  constexpr int kTiles = kRowsPerWg / 64;  // m64 wgmma tiles per consumer warpgroup
  // Up tiles hold the CTA's rows of the slice (N halves: 128 of the 256), divided the same way.
  constexpr int kUpRowsPerWg = (kSplitN ? kSliceRows / 2 : kSliceRows) / (kHalves ? 1 : WGS);
  constexpr int kUpTiles = kUpRowsPerWg / 64;
  static_assert(kUpTiles >= 1, "an up tile gives each consumer warpgroup at least 64 rows");
  constexpr int kRegs = T / 2;             // accumulator registers per m64 x T tile
  constexpr int kConsumerThreads = WGS * 128;
  // Threads that synchronise within a sub-tile: the warpgroup alone with kHalves.
  constexpr int kSyncThreads = kHalves ? 128 : kConsumerThreads;
  // Broadcast from lane 0, so that the compiler knows it is the same in the whole warp: the
  // wgmma descriptors built from it (rows, tokens of this warpgroup) then live in uniform
  // registers, not in per-thread ones moved over (R2UR) before every wgmma (item 94).
  const int wg = __shfl_sync(0xffffffffu, ctid / 128, 0);
  const int sync_id = kHalves ? 2 + wg : 1;
  const int warp = (ctid % 128) / 32;
  const int lane = ctid % 32;
  const int quad = lane % 4;
  const int row_in_warp = lane / 4;  // fragment rows row_in_warp and row_in_warp + 8
  const int wg_row0 = kHalves ? 0 : wg * kRowsPerWg;
  const int wg_up_row0 = kHalves ? 0 : wg * kUpRowsPerWg;  // within the stage's up tile
  const int tw = kHalves ? wg * T : 0;  // this warpgroup's first token of the sub-tile
  const int stid = kHalves ? ctid % 128 : ctid;  // index among the kSyncThreads
  // The top-k weight of each slot (the prologue left the slot id in its place); first read
  // after the barrier that follows SwiGLU, which with kHalves is the warpgroup's own: there
  // each warpgroup converts its own tokens (blocks of token halves are one sub-tile).
  const int own = kHalves ? (stid < T ? tw + stid : p.block_m) : ctid;
  if (own < p.block_m) {
    const int slot = reinterpret_cast<const int32_t*>(b.tok_weight)[own];
    b.tok_weight[own] = slot >= 0 ? p.topk_weights[slot] * p.scaling_factor : 0.0f;
  }

  constexpr int kUpGroups = kUpTiles * 4 / kUpPromoteSteps;  // promotions per stage
  // Buffers of FP8 partial sums in flight: the tensor cores fill the next ones while the
  // oldest is promoted. With few tokens a wgmma is short and its latency is what counts, so
  // small T keeps more of them queued (up to 8, within 64 registers); 2 (ping-pong) for large T.
  // With kHalves, 4 m64 tiles of accumulators leave room for 2 (with 1, each warpgroup's
  // wgmma-wait-promote chain ran serially: 96-token blocks 7 % slower than blocks of 64).
  constexpr int kDepth = kHalves ? 2 : std::min({kUpGroups, 8, std::max(2, 64 / kRegs)});
  constexpr int kDownDepth = std::min(kTiles, kDepth);
  float acc[kTiles][kRegs];
  float part[kDepth][kRegs];
  // Each output row is added to top_k times: evict-last kept ds2 M=512 at 531 us, not 551
  // (bench/NOTES.md, item 33), while `out` fits the L2; past it, evict-last runs were slower
  // and unsteady (items 96-97).
  const uint64_t out_policy =
      p.out_streamed ? ptx::policy_evict_first() : ptx::policy_evict_last();
  constexpr int kPeersInFlight = T <= 16 ? 8 : T <= 32 ? 4 : 1;  // DSMEM loads issued together

  for (int sub = 0; sub < b.subtiles; ++sub) {
    const int t0 = sub * S;
    const int tcount = min(S, p.block_m - t0);
    // All-slices units (kAllSlices, one sub-tile) run the up projection of each slice in turn,
    // each into its own activation tile.
    float col_factor[T / 8][2];  // topk weight * scaling factor * activation scale
    for (int si = 0; si < (kAllSlices ? b.slices : 1); ++si) {
      // The amax buffers alternate per pass (sub-tile, or slice of an all-slices unit).
      const int pass = kAllSlices ? si : sub;
      uint32_t* amax_cur = amax + (pass & 1) * S + tw;
      uint8_t* act_s = act + si * L::kTokenTileBytes;  // this slice's FP8 activation tile

      // ---- up projection: acc = sum_kb (w_kb . x_kb^T) * w_scale * x_scale ----
#pragma unroll
      for (int m = 0; m < kUpTiles; ++m)
#pragma unroll
        for (int r = 0; r < kRegs; ++r) acc[m][r] = 0.0f;

      for (int kb = b.kb_begin; kb < b.kb_end; ++kb) {
        ptx::mbar_wait(&ring.full[ring.stage], ring.phase);
        // The token rows were written by the producer's async copies, i.e. through the generic
        // proxy; the wgmmas read them through the async proxy.
        ptx::fence_proxy_async_smem();
        const uint8_t* st = ring.current();
        // The scale of each accumulator register (block scale of its gate or up row times its
        // token's x scale), read once per stage: the steps' asm memory clobbers would otherwise
        // reload and re-multiply them at every promotion, twice the promotion's own FFMAs.
        float scale[T / 8][4];
        {
          const float* sc = reinterpret_cast<const float*>(st + L::kScaleOffset);
          const float ws_gate = sc[S];
          const float ws_up = sc[S + 1];
#pragma unroll
          for (int j = 0; j < T / 8; ++j) {
            const float2 x2 = *reinterpret_cast<const float2*>(sc + tw + j * 8 + quad * 2);
            scale[j][0] = ws_gate * x2.x;
            scale[j][1] = ws_gate * x2.y;
            scale[j][2] = ws_up * x2.x;
            scale[j][3] = ws_up * x2.y;
          }
        }
        // Group g: steps g * kUpPromoteSteps .. (g + 1) * kUpPromoteSteps - 1 (step = m * 4 + ks)
        // accumulate in part[g % kDepth].
        const uint64_t w_desc = ptx::sw128_desc(st + wg_up_row0 * kKBlock);
        const uint64_t x_desc = ptx::sw128_desc(st + L::kXOffset + tw * kKBlock);
        auto issue = [&](int g) {
          ptx::wgmma_fence();
#pragma unroll
          for (int s = 0; s < kUpPromoteSteps; ++s) {
            const int step = g * kUpPromoteSteps + s;
            WgmmaFp8<T>::mma(part[g % kDepth],
                             ptx::desc_plus(w_desc, (step / 4) * 64 * kKBlock + (step % 4) * 32),
                             ptx::desc_plus(x_desc, (step % 4) * 32), s);
          }
          ptx::wgmma_commit();
        };
#pragma unroll
        for (int g = 0; g < kDepth - 1; ++g) issue(g);
#pragma unroll
        for (int g = 0; g < kUpGroups; ++g) {
          if (g + kDepth - 1 < kUpGroups) issue(g + kDepth - 1);
          ptx::wgmma_wait_at_most(std::min(kDepth - 1, kUpGroups - 1 - g));  // group g is done
          ptx::fence_operands(part[g % kDepth]);
          float(&done)[kRegs] = part[g % kDepth];
          float(&into)[kRegs] = acc[g * kUpPromoteSteps / 4];
          // Promote the FP8 partial sums to fp32 with both block scales: one FFMA each.
#pragma unroll
          for (int j = 0; j < T / 8; ++j)
#pragma unroll
            for (int h = 0; h < 4; ++h) into[4 * j + h] += done[4 * j + h] * scale[j][h];
        }
        ptx::mbar_arrive(&ring.empty[ring.stage]);
        ring.advance();
      }

      // ---- split unit: sum the partials of this CTA's 16-row groups over the cluster ----
      // Thread-major slots: the same (thread, tile, register) place in every CTA's buffer.
      float4* const mine = reinterpret_cast<float4*>(partial);
      float2* const h_mine = reinterpret_cast<float2*>(partial + kSliceRows * T);
      auto slot = [&](int m, int q) { return (m * (kRegs / 4) + q) * kConsumerThreads + ctid; };
      auto h_slot = [&](int m, int j) { return (m * (T / 8) + j) * kConsumerThreads + ctid; };
      auto group_of = [&](int m) { return wg_row0 / 16 + m * 4 + warp; };
      if (!kHalves && !kSplitN && b.split > 1) {
#pragma unroll
        for (int m = 0; m < kTiles; ++m)
#pragma unroll
          for (int q = 0; q < kRegs / 4; ++q) {
            mine[slot(m, q)] =
                make_float4(acc[m][4 * q], acc[m][4 * q + 1], acc[m][4 * q + 2], acc[m][4 * q + 3]);
          }
        if (sub == 0) ptx::cluster_wait();  // the prologue's arrival: every peer is running
        xc.sync(ctid, kConsumerThreads);
#pragma unroll
        for (int m = 0; m < kTiles; ++m) {
          if (group_of(m) % b.split == b.rank) {
            // kPeersInFlight remote loads are issued before any is used: a loop of load-then-add
            // paid one DSMEM round trip per peer.
            for (int peer0 = 0; peer0 < b.split; peer0 += kPeersInFlight) {
#pragma unroll
              for (int q = 0; q < kRegs / 4; ++q) {
                float4 v[kPeersInFlight];
#pragma unroll
                for (int u = 0; u < kPeersInFlight; ++u) {
                  const int peer = peer0 + u;
                  v[u] = peer < b.split && peer != b.rank
                             ? ptx::ld_cluster_f32x4(ptx::cluster_addr(&mine[slot(m, q)], peer))
                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                }
#pragma unroll
                for (int u = 0; u < kPeersInFlight; ++u) {
                  acc[m][4 * q] += v[u].x;
                  acc[m][4 * q + 1] += v[u].y;
                  acc[m][4 * q + 2] += v[u].z;
                  acc[m][4 * q + 3] += v[u].w;
                }
              }
            }
          }
        }
      }

      // ---- SwiGLU in registers: fragment rows r (gate) and r + 8 (up) pair up ----
#pragma unroll
      for (int j = 0; j < T / 8; ++j)
#pragma unroll
        for (int m = 0; m < kUpTiles; ++m) {
          acc[m][4 * j + 0] = silu(acc[m][4 * j + 0]) * acc[m][4 * j + 2];
          acc[m][4 * j + 1] = silu(acc[m][4 * j + 1]) * acc[m][4 * j + 3];
        }
      if (!kHalves && !kSplitN && b.split > 1) {
        // The owners publish their pairs' SwiGLU outputs (fp32, 512 T bytes for the slice) and
        // every CTA copies the pairs it does not own, so each holds all 128 intermediates and
        // takes the amax and writes the FP8 tile by itself. Two exchanges per sub-tile; with
        // the amax and the FP8 tile traded separately it was three (~1 µs each at M=1). A peer
        // rewrites its partial sums only after the exchange below and its SwiGLU outputs only
        // after the next sub-tile's first one; every CTA reaches each after its reads.
#pragma unroll
        for (int m = 0; m < kTiles; ++m)
#pragma unroll
          for (int j = 0; j < T / 8; ++j) {
            h_mine[h_slot(m, j)] = make_float2(acc[m][4 * j + 0], acc[m][4 * j + 1]);
          }
        xc.sync(ctid, kConsumerThreads);
#pragma unroll
        for (int m = 0; m < kTiles; ++m) {
          const int owner = group_of(m) % b.split;
          if (owner != b.rank) {
#pragma unroll
            for (int j = 0; j < T / 8; ++j) {
              const float2 h = ptx::ld_cluster_f32x2(ptx::cluster_addr(&h_mine[h_slot(m, j)], owner));
              acc[m][4 * j + 0] = h.x;
              acc[m][4 * j + 1] = h.y;
            }
          }
        }
      }
      // The per-token amax over the slice's 128 intermediates (N halves: over this CTA's 64,
      // then over both CTAs').
#pragma unroll
      for (int j = 0; j < T / 8; ++j) {
        float m0 = 0.0f, m1 = 0.0f;
#pragma unroll
        for (int m = 0; m < kUpTiles; ++m) {
          m0 = fmaxf(m0, fabsf(acc[m][4 * j + 0]));
          m1 = fmaxf(m1, fabsf(acc[m][4 * j + 1]));
        }
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
          m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, off));
          m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, off));
        }
        if (row_in_warp == 0) {
          // Non-negative floats order like their bit patterns.
          atomicMax(&amax_cur[j * 8 + quad * 2], __float_as_uint(m0));
          atomicMax(&amax_cur[j * 8 + quad * 2 + 1], __float_as_uint(m1));
        }
      }
      uint32_t amax_col[T / 8][2];  // of this thread's token columns
      if constexpr (kSplitN) {
        if (sub == 0) ptx::cluster_wait();  // the prologue's arrival: the peer is running
        xc.sync(ctid, kConsumerThreads);    // both CTAs' amax buffers are complete
        const int peer = b.rank ^ 1;
#pragma unroll
        for (int j = 0; j < T / 8; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            amax_col[j][h] = ptx::ld_cluster_u32(ptx::cluster_addr(&amax_cur[j * 8 + quad * 2 + h], peer));
          }
      } else {
        ptx::named_barrier_sync(sync_id, kSyncThreads);
#pragma unroll
        for (int j = 0; j < T / 8; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) amax_col[j][h] = 0;
      }

      // ---- re-quantise per token over the slice's 128 intermediates; write the B tile ----
#pragma unroll
      for (int j = 0; j < T / 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int col = j * 8 + quad * 2 + h;
          const uint32_t amax_bits = max(amax_cur[col], amax_col[j][h]);
          const float amax_f = fmaxf(__uint_as_float(amax_bits), 1e-10f);
          const float scale = amax_f * (1.0f / kFp8Max);  // within an ulp of amax / 448
          const float inv_scale = __fdividef(kFp8Max, amax_f);
          const bool live = tw + col < tcount;
          if constexpr (kAllSlices) {
            if (warp == 0 && row_in_warp == 0) act_scale[si * S + tw + col] = scale;
          } else {
            col_factor[j][h] = live ? b.tok_weight[t0 + tw + col] * scale : 0.0f;
          }
#pragma unroll
          for (int m = 0; m < kUpTiles; ++m) {
            // Intermediate index of this fragment row within the slice: 16-row groups hold
            // 8 gate + 8 up rows, so group g holds intermediates 8g .. 8g + 7.
            const int inter =
                ((b.up_row0 + wg_up_row0 + m * 64 + warp * 16) / 16) * 8 + row_in_warp;
            const __nv_fp8_e4m3 q(acc[m][4 * j + h] * inv_scale);  // saturates at 448
            act_s[sw128_offset(tw + col, inter)] = q.__x;
          }
        }
      }
      if (stid < T) amax[((pass + 1) & 1) * S + tw + stid] = 0;  // the other buffer is free now
      if constexpr (kSplitN) {
        // Copy the peer's 64 columns (4 of the 8 16-byte chunks of each token row, where the
        // swizzle put them). The peer overwrites them only after the next sub-tile's first
        // exchange, which this CTA reaches after these reads.
        xc.sync(ctid, kConsumerThreads);
        const int peer = b.rank ^ 1;
        for (int i = ctid; i < S * 4; i += kConsumerThreads) {
          const int t = i / 4;
          const int offset = t * kKBlock + ((((peer * 4 + i % 4) ^ t) & 7) << 4);
          *reinterpret_cast<float4*>(act_s + offset) =
              ptx::ld_cluster_f32x4(ptx::cluster_addr(act_s + offset, peer));
        }
      }
      ptx::fence_proxy_async_smem();
      ptx::named_barrier_sync(kSplitN ? 1 : sync_id, kSplitN ? kConsumerThreads : kSyncThreads);
    }

    // ---- down projection and weighted accumulation into out ----
    // The consumers stage the tile's bf16 results as one 256-column row per token, so that a
    // warp adds a whole row into out with one instruction of 16-byte vector reductions.
    // stmatrix row address of this lane: matrix i = lane / 8 is token group (i / 2) and
    // fragment rows + 8 (i % 2); r = lane % 8 is the token within the group.
    constexpr int kTokenGroupsPerStore = (T / 8) % 2 == 0 ? 2 : 1;
    const uint32_t staging_lane =
        ptx::smem_addr(staging) + (tw + 8 * ((lane >> 4) & 1) + (lane & 7)) * L::kStagingStride +
        (wg_row0 + warp * 16 + 8 * ((lane >> 3) & 1)) * 2;
    // Each 8x8 block of a tile's fragment (8 output columns k of the tile, 8 tokens) is stored
    // transposed by stmatrix, so the staging row of a token gets its 8 columns as 16
    // contiguous bytes; two token groups per instruction where T / 8 is even. Element 4j + 2h
    // + c of y belongs to token column j * 8 + quad * 2 + c, scaled by tile_factor * factor[j][c].
    auto stage_tile = [&](int m, const float(&y)[kRegs], const float(&factor)[T / 8][2],
                          float tile_factor) {
#pragma unroll
      for (int j = 0; j < T / 8; j += kTokenGroupsPerStore) {
        uint32_t packed[2 * kTokenGroupsPerStore];
#pragma unroll
        for (int jj = 0; jj < kTokenGroupsPerStore; ++jj) {
          const float f0 = tile_factor * factor[j + jj][0];
          const float f1 = tile_factor * factor[j + jj][1];
#pragma unroll
          for (int half = 0; half < 2; ++half) {  // fragment rows row_in_warp, + 8
            const __nv_bfloat162 v = __floats2bfloat162_rn(y[4 * (j + jj) + 2 * half] * f0,
                                                           y[4 * (j + jj) + 2 * half + 1] * f1);
            packed[2 * jj + half] = *reinterpret_cast<const uint32_t*>(&v);
          }
        }
        const uint32_t addr = staging_lane + (m * 64) * 2 + j * 8 * L::kStagingStride;
        if constexpr (kTokenGroupsPerStore == 2) {
          ptx::stmatrix_trans_x4(addr, packed[0], packed[1], packed[2], packed[3]);
        } else {
          ptx::stmatrix_trans_x2(addr, packed[0], packed[1]);
        }
      }
    };
    // Each staged token row (512 bytes) is added into out by one warp instruction: lane l adds
    // bf16 columns 8l .. 8l + 7 with a 16-byte vector reduction through the load/store path.
    // Bulk reductions went through the TMA unit, one request per row, next to the weight
    // tiles; these were 3-9 % faster at M >= 512 (bench/NOTES.md, item 33). A warp's rows are
    // loaded together before any is added: one row at a time paid two dependent shared-memory
    // loads (its output row, its staged values) per reduction.
    auto add_rows = [&](int dt) {
      constexpr int kWarps = kSyncThreads / 32;
      constexpr int kRowsPerWarp = (T + kWarps - 1) / kWarps;  // of the T tokens it adds
      const int k_first = dt * kSliceRows;
      const bool lane_live = lane * 8 < min(kSliceRows, p.K - k_first);  // 128 if K % 256 == 128
      const int t_end = kHalves ? min(tw + T, tcount) : tcount;
      constexpr int kChunk = 4;  // staged rows held in registers at once: more spilled
      int row[kRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const int t = tw + stid / 32 + i * kWarps;
        row[i] = t < t_end && lane_live ? b.tok_row[t0 + t] : -1;
      }
#pragma unroll
      for (int i0 = 0; i0 < kRowsPerWarp; i0 += kChunk) {
        uint4 v[kChunk];
#pragma unroll
        for (int i = i0; i < min(i0 + kChunk, kRowsPerWarp); ++i) {
          const uint8_t* staged = staging + (tw + stid / 32 + i * kWarps) * L::kStagingStride;
          if (row[i] >= 0) v[i - i0] = *reinterpret_cast<const uint4*>(staged + lane * 16);
        }
#pragma unroll
        for (int i = i0; i < min(i0 + kChunk, kRowsPerWarp); ++i) {
          if (row[i] >= 0) {
            ptx::red_add_bf16x8(p.out + size_t(row[i]) * p.K + k_first + lane * 8, v[i - i0],
                                out_policy);
          }
        }
      }
    };
    // Reads of a down stage: w2 tile rows 64m .. 64m + 63 of this warpgroup against the
    // activation tile `a`, four k32 steps into part[m % kDepth].
    auto issue_down = [&](const uint8_t* st, const uint8_t* a, int m) {
      const uint64_t w_desc = ptx::sw128_desc(st + (wg_row0 + m * 64) * kKBlock);
      const uint64_t a_desc = ptx::sw128_desc(a + tw * kKBlock);
      ptx::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        WgmmaFp8<T>::mma(part[m % kDepth], ptx::desc_plus(w_desc, ks * 32),
                         ptx::desc_plus(a_desc, ks * 32), ks);
      }
      ptx::wgmma_commit();
    };
    auto tile_scales = [&](const uint8_t* st, float(&tile_scale)[kTiles]) {
      const float* w2s = reinterpret_cast<const float*>(st + L::kScaleOffset) + S;
#pragma unroll
      for (int m = 0; m < kTiles; ++m) tile_scale[m] = w2s[(wg_row0 + m * 64) / 128];
    };

    if constexpr (kAllSlices) {
      // All-slices units: each down tile sums the slices' products in fp32 (in acc, free since
      // the last requantisation) and adds the sum into out once, where one CTA per slice adds
      // each slice's share (bench/NOTES.md, item 47).
      for (int dt = b.dt_begin; dt < b.dt_end; ++dt) {
#pragma unroll
        for (int m = 0; m < kTiles; ++m)
#pragma unroll
          for (int r = 0; r < kRegs; ++r) acc[m][r] = 0.0f;
        for (int si = 0; si < b.slices; ++si) {
          ptx::mbar_wait(&ring.full[ring.stage], ring.phase);
          const uint8_t* st = ring.current();
          const uint8_t* act_s = act + si * L::kTokenTileBytes;
          float tile_scale[kTiles];
          tile_scales(st, tile_scale);
          float as[T / 8][2];  // this slice's activation scale of each column
#pragma unroll
          for (int j = 0; j < T / 8; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) as[j][c] = act_scale[si * S + tw + j * 8 + quad * 2 + c];
#pragma unroll
          for (int m = 0; m < kDownDepth - 1; ++m) issue_down(st, act_s, m);
#pragma unroll
          for (int m = 0; m < kTiles; ++m) {
            if (m + kDownDepth - 1 < kTiles) issue_down(st, act_s, m + kDownDepth - 1);
            ptx::wgmma_wait_at_most(std::min(kDownDepth - 1, kTiles - 1 - m));  // tile m done
            if (m == kTiles - 1) ptx::mbar_arrive(&ring.empty[ring.stage]);  // reads done
            ptx::fence_operands(part[m % kDepth]);
            const float(&y)[kRegs] = part[m % kDepth];
#pragma unroll
            for (int j = 0; j < T / 8; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                acc[m][4 * j + e] += y[4 * j + e] * (tile_scale[m] * as[j][e % 2]);
              }
          }
          ring.advance();
        }
        // Every thread has read the last tile's rows out of the staging tile.
        ptx::named_barrier_sync(sync_id, kSyncThreads);
        // topk weight * scaling factor of each column, 0 past the block (read here, not held
        // across the loop: registers)
        float tok_w[T / 8][2];
#pragma unroll
        for (int j = 0; j < T / 8; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int col = j * 8 + quad * 2 + c;
            tok_w[j][c] = tw + col < tcount ? b.tok_weight[t0 + tw + col] : 0.0f;
          }
#pragma unroll
        for (int m = 0; m < kTiles; ++m) stage_tile(m, acc[m], tok_w, 1.0f);
        ptx::named_barrier_sync(sync_id, kSyncThreads);
        add_rows(dt);
      }
    } else {
      for (int dt = b.dt_begin; dt < b.dt_end; ++dt) {
        ptx::mbar_wait(&ring.full[ring.stage], ring.phase);
        const uint8_t* st = ring.current();
        float tile_scale[kTiles];
        tile_scales(st, tile_scale);
#pragma unroll
        for (int m = 0; m < kDownDepth - 1; ++m) issue_down(st, act, m);
        // Every thread has read the last tile's rows out of the staging tile (its reductions
        // took them from registers), checked while this tile's first wgmmas run.
        ptx::named_barrier_sync(sync_id, kSyncThreads);
#pragma unroll
        for (int m = 0; m < kTiles; ++m) {
          if (m + kDownDepth - 1 < kTiles) issue_down(st, act, m + kDownDepth - 1);
          ptx::wgmma_wait_at_most(std::min(kDownDepth - 1, kTiles - 1 - m));  // tile m is done
          if (m == kTiles - 1) ptx::mbar_arrive(&ring.empty[ring.stage]);  // every read is done
          ptx::fence_operands(part[m % kDepth]);
          stage_tile(m, part[m % kDepth], col_factor, tile_scale[m]);
        }
        ptx::named_barrier_sync(sync_id, kSyncThreads);
        add_rows(dt);
        ring.advance();
      }
    }
  }
  // No CTA leaves while a peer may still read its shared memory or arrive on its barriers.
  // barrier.cluster rather than another exchange: compute-sanitizer's racecheck understands it
  // (with an exchange it reported every DSMEM read as a read of a block that may have exited),
  // and the producer warps, which have exited by then, do not hold it up (PTX `exit`).
  if (b.split > 1) ptx::cluster_sync_all();
}

// ---------------------------------------------------------------------------------------
// The weights' tensor maps in two versions that differ only in L2 promotion. With 256-byte
// promotion a 128-byte row read also brings the row's next K block into L2, which this CTA
// reads one stage later: a prefetch that blocks of a few tokens, bound by latency, gain from
// (ds M=32: 6 %). Full blocks are bound by bandwidth; without promotion they ran 1-4 % faster
// at M >= 512 (bench/NOTES.md, item 29), presumably because the promoted halves were evicted
// before their stage came or displaced other CTAs' lines.
struct WeightMaps {
  CUtensorMap w, w2;                // 256-byte L2 promotion
  CUtensorMap w_stream, w2_stream;  // no promotion
  CUtensorMap w_half, w_half_stream;  // up tiles of 128 rows, for N halves (else unset)
};

// A block with at least this many tokens is a full one (WeightMaps, BlockInfo::streamed).
constexpr int kFullBlockTokens = 16;

template <int T, int WGS, bool kHalves, bool kAllSlices, bool kSplitN>
__global__ void __launch_bounds__((WGS + 1) * 128, 1)
    fused_moe_kernel(const __grid_constant__ WeightMaps weights, const FusedMoeParams p) {
  constexpr int S = kHalves ? WGS * T : T;  // tokens per sub-tile (see consume)
  using L = SmemLayout<S, WGS>;
  // Slices of one token block are neighbours in launch order: they run at the same time, so
  // their halves of each w2 row (N/2 > 128) are read from DRAM together. The `split` CTAs of
  // a unit are one cluster, so they return here together.
  // All-slices units (kAllSlices) cover every slice of their token block.
  const int slices = p.N / kSliceRows;
  const int unit_slices = kAllSlices ? 1 : slices;
  const int tid = threadIdx.x;
  int unit = blockIdx.x / p.split;
  const int blocks = (p.sorted_len + p.block_m - 1) / p.block_m;
  // The tensor maps' descriptors are fetched before anything else, not on the first TMA.
  if (tid == 0) {
    ptx::prefetch_tensor_map(&weights.w);
    ptx::prefetch_tensor_map(&weights.w2);
    ptx::prefetch_tensor_map(&weights.w_stream);
    ptx::prefetch_tensor_map(&weights.w2_stream);
    if (kSplitN) {
      ptx::prefetch_tensor_map(&weights.w_half);
      ptx::prefetch_tensor_map(&weights.w_half_stream);
    }
  }
  // The launch (the main one, or the only one) is a programmatic dependent of the kernel
  // before it in the stream (griddep.cuh): after the prologue or the quantiser the CTAs start
  // while that kernel runs and wait here for its writes (the routing, x, and `out` zeroed).
  // Nothing global is read or written above this line.
  if (p.tail_part != kTailUnits) griddep::wait();
  // The tail launch (this grid's dependent) takes SMs as they free up once every CTA of the
  // main launch has started (and passed the wait above): when its last wave drains. The tail
  // launch's first CTA waits for the main launch before it exits, whether it has a unit or
  // not, so that the tail launch ends after the main one and the pair keeps stream order; the
  // other tail CTAs need not wait.
  if (p.tail_part == kMainUnits) griddep::allow_dependents();
  const bool keeps_order = p.tail_part == kTailUnits && blockIdx.x == 0 && tid == 0;
  if (p.tail_part == kTailUnits) {
    const int units = (*p.num_tokens_post_padded + p.block_m - 1) / p.block_m * unit_slices;
    const int tail = tail_units(units, p.tail_wave, p.tail_room);
    if (unit >= tail) {
      if (keeps_order) griddep::wait();
      return;
    }
    unit += units - tail;
  }
  int block = unit / unit_slices;
  int slice = kAllSlices ? 0 : unit % slices, unit_slice_count = kAllSlices ? slices : 1;
  // An all-slices launch deals the blocks past its last full wave (tail_units, with room for
  // a wave's worth of slice units) as one unit per slice after the whole blocks. A unit of the
  // first wave is its block whatever the routing; later ones read the block count first.
  if (kAllSlices && slices > 1 && p.tail_wave > 0 && unit >= p.tail_wave) {
    const int used_blocks = (*p.num_tokens_post_padded + p.block_m - 1) / p.block_m;
    const int whole = used_blocks - tail_units(used_blocks, p.tail_wave, p.tail_wave / slices);
    if (unit >= whole) {
      block = whole + (unit - whole) / slices;
      slice = (unit - whole) % slices;
      unit_slice_count = 1;
    }
  }
  if (block >= blocks) {  // past the routing (an all-slices grid's room for slice units)
    if (keeps_order) griddep::wait();
    return;
  }
  // The routing values are independent loads, issued together: one memory latency before the
  // first TMA, not three. The neighbours' experts say whether this block is its expert's only
  // one. sorted_len need not be a multiple of block_m: the last block's tail is not read. The
  // top-k weights are needed last; the consumers load them (consume).
  const int used = *p.num_tokens_post_padded;
  const int expert = p.expert_ids[block];
  const int expert_before = block > 0 ? p.expert_ids[block - 1] : -1;
  const int expert_after = block + 1 < blocks ? p.expert_ids[block + 1] : -1;
  const int first_slot = block * p.block_m;
  const bool in_array = tid < p.block_m && first_slot + tid < p.sorted_len;
  const int slot = in_array ? p.sorted_token_ids[first_slot + tid] : -1;
  extern __shared__ uint8_t smem_raw[];
  // Swizzled tiles need 1024-byte alignment; dynamic shared memory only promises 16.
  uint8_t* smem = smem_raw + ((1024 - ptx::smem_addr(smem_raw) % 1024) % 1024);
  const int act_tiles = kAllSlices ? slices : 1;
  uint8_t* act = smem + p.stages * L::kStageBytes;  // FP8 intermediate, [act_tiles][T x 128]
  uint8_t* staging = act + act_tiles * L::kTokenTileBytes;  // [T][kStagingStride] bf16 rows
  float* partial = reinterpret_cast<float*>(staging + L::kStagingBytes);  // split > 1
  const bool has_partial = p.split > 1 && !kSplitN;  // split units' partial sums
  uint32_t* amax = reinterpret_cast<uint32_t*>(reinterpret_cast<uint8_t*>(partial) +
                                               (has_partial ? L::kPartialBytes : 0));  // [2][S]
  float* act_scale = reinterpret_cast<float*>(amax + 2 * S);  // [act_tiles][S] if act_tiles > 1
  int32_t* tok_row = reinterpret_cast<int32_t*>(reinterpret_cast<uint8_t*>(act_scale) +
                                                L::act_scale_bytes(act_tiles));  // [block_m]
  float* tok_weight = reinterpret_cast<float*>(tok_row + p.block_m);        // [block_m]
  uint64_t* full = reinterpret_cast<uint64_t*>(tok_weight + p.block_m);
  uint64_t* empty = full + p.stages;
  uint64_t* exchange = empty + p.stages;  // [2]

  const int kblocks = p.K / kKBlock;
  const int down_tiles = (p.K + kSliceRows - 1) / kSliceRows;
  const int rank = p.split > 1 ? int(ptx::cluster_ctarank()) : 0;
  const int k_split = kSplitN ? 1 : p.split, k_rank = kSplitN ? 0 : rank;  // up K blocks
  const int k_lo = k_rank * kblocks / k_split, k_hi = (k_rank + 1) * kblocks / k_split;
  const int dt_lo = rank * down_tiles / p.split, dt_hi = (rank + 1) * down_tiles / p.split;
  // The ring's barriers do not depend on the routing: they are set up while its loads are in
  // flight, not after them (bench/NOTES.md, item 64).
  if (tid == 0) {
    for (int s = 0; s < p.stages; ++s) {
      ptx::mbar_init(&full[s], kProducerThreads);
      ptx::mbar_init(&empty[s], WGS * 128);
    }
    ptx::mbar_init(&exchange[0], p.split);
    ptx::mbar_init(&exchange[1], p.split);
    ptx::fence_barrier_init();
  }
  if (first_slot >= used || expert < 0) {  // no tokens, or an expert not on this GPU
    if (keeps_order) griddep::wait();
    return;
  }
  if (p.tail_part == kMainUnits) {
    const int units = (used + p.block_m - 1) / p.block_m * unit_slices;
    if (unit >= units - tail_units(units, p.tail_wave, p.tail_room)) return;  // the tail's
  }
  // Slots fill a block from its start, so its first 32 tell whether it holds 16 tokens: warp
  // 0 counts them for thread 0 (every warp counts its own slots; the others' counts go unused).
  const bool valid = slot >= 0 && slot < p.M * p.top_k;
  const bool full_block = __popc(__ballot_sync(0xffffffffu, valid)) >= kFullBlockTokens;
  const bool only_block =
      expert_before != expert && (expert_after != expert || first_slot + p.block_m >= used);

  const BlockInfo info{expert,
                       slice,
                       kblocks,
                       (p.block_m + S - 1) / S,
                       unit_slice_count,
                       k_lo,
                       k_hi,
                       dt_lo,
                       dt_hi,
                       p.split,
                       rank,
                       kSplitN ? rank * kSliceRows / 2 : 0,
                       kSplitN ? kSliceRows / 2 : kSliceRows,
                       full_block && only_block,
                       kSplitN ? (full_block ? &weights.w_half_stream : &weights.w_half)
                               : (full_block ? &weights.w_stream : &weights.w),
                       full_block ? &weights.w2_stream : &weights.w2,
                       tok_row,
                       tok_weight};
  const Ring ring{smem, full, empty, p.stages, L::kStageBytes};
  if (tid == 0) {
    issue_first_pass<kAllSlices>(info, p.tiled != 0, ring);  // while the token rows load
  }
  if (tid < p.block_m) {  // block_m <= 128 <= blockDim.x
    tok_row[tid] = valid ? slot / p.top_k : -1;
    reinterpret_cast<int32_t*>(tok_weight)[tid] = valid ? slot : -1;  // the slot until consume
  }
  for (int i = tid; i < 2 * S; i += blockDim.x) amax[i] = 0;
  __syncthreads();
  // Peers arrive on this CTA's exchange barriers and read its shared memory: all of the
  // cluster must be running, with barriers initialised (fence_barrier_init released them),
  // before the first exchange. Every thread arrives here; only the consumers wait, just
  // before that exchange (consume).
  if (p.split > 1) ptx::cluster_arrive_relaxed();
  // Each role is one branch of a single if/else with no code after it, the shape in which
  // setmaxnreg moves registers from the producer warpgroup to the consumers (shared code after
  // the branches made ptxas spill).
  if (__shfl_sync(0xffffffffu, tid / 128, 0) == 0) {  // warp-uniform, as consume's wg
    if constexpr (WGS > 1) ptx::setmaxnreg_dec<56>();
    produce<S, kAllSlices>(p, info, ring, tid);
    if (keeps_order) griddep::wait();  // after its own unit's tiles are issued
  } else {
    if constexpr (WGS > 1) ptx::setmaxnreg_inc<224>();
    consume<T, WGS, kHalves, kAllSlices, kSplitN>(p, info, ring, act, staging, partial, amax, act_scale,
                    ClusterExchange{exchange, p.split}, tid - 128);
  }
}

}  // namespace amoe
