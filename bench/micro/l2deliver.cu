// What bounds the bytes the SMs receive from L2 (bench/NOTES.md items 88-89): the L2 slices'
// reads, or the crossing from L2 to the SMs? Multicast pairs (items 37, 86) halve the first and
// not the second, and gained 0-6 % at large M.
//
// Every CTA (one per SM, clusters of two) streams 32 KiB tiles from a window into a ring of
// `kStages` stages through the TMA unit (cp.async.bulk), as the fused kernel's producer does, and
// only waits for them (no consumer work). Three ways:
//   own    each CTA loads its own whole tiles (what the kernel does unpaired);
//   mcast  each CTA of a pair loads half of a tile into both CTAs (.multicast::cluster): the same
//          bytes received per SM, half of them read from L2;
//   half   each CTA loads its own 16 KiB half tiles: half the bytes received and read.
// Windows: 16 MiB (L2-resident, like an expert's weights shared by several blocks) and 1 GiB
// (DRAM). If mcast receives about what own does, the crossing is the ceiling; if about twice
// half's L2 reads, the slices are. Answer (H200, item 89): the slices. From 16 MiB own tiles
// arrive at 8.9 TB/s, multicast pairs at 15.7 (7.9 read), half tiles at 8.4.
// Build: nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -Icuda -o /tmp/l2deliver bench/micro/l2deliver.cu
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "check.cuh"
#include "fused_moe/ptx.cuh"
using namespace amoe;

constexpr int kTile = 32 * 1024, kStages = 4, kRounds = 64;
enum Mode { kOwn = 0, kMcast = 1, kHalf = 2 };

__device__ __forceinline__ void bulk_load(uint8_t* dst, const uint8_t* src, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          ptx::smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(ptx::smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void bulk_load_mcast(uint8_t* dst, const uint8_t* src, uint32_t bytes,
                                                uint64_t* bar, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1], %2, [%3], %4;" ::"r"(ptx::smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(ptx::smem_addr(bar)), "h"(mask)
      : "memory");
}

// Tile t of round r of CTA pair p: a multiplicative hash over the window's tiles, the same for
// both CTAs of a pair in mcast (they share it), each CTA's own otherwise.
__device__ __forceinline__ size_t tile_offset(uint32_t stream, uint32_t i, uint32_t tiles) {
  return size_t((stream * 40503u + i * 2654435761u) % tiles) * kTile;
}

// Thread 0's stream of kRounds x kStages tiles through the ring, then its wait for the last ones.
__device__ void issue_and_wait(uint8_t* smem, uint64_t* full, uint64_t* empty,
                               const uint8_t* window, uint32_t tiles, int mode, uint32_t rank,
                               uint32_t pair) {
  const uint32_t stream = mode == kMcast ? pair : pair * 2 + rank;
  const uint32_t bytes = mode == kHalf ? kTile / 2 : kTile;
  for (int i = 0; i < kRounds * kStages; ++i) {
    const int s = i % kStages;
    if (i >= kStages) {  // the stage's previous tile has landed here and, for mcast, in the peer
      const uint32_t previous = uint32_t(i / kStages - 1) & 1;
      ptx::mbar_wait(&full[s], previous);
      if (mode == kMcast) {
        asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(
                         ptx::cluster_addr(&empty[s], rank ^ 1))
                     : "memory");
        ptx::mbar_arrive(&empty[s]);
        ptx::mbar_wait(&empty[s], previous);
      }
    }
    const uint8_t* src = window + tile_offset(stream, i, tiles);
    ptx::mbar_expect_tx(&full[s], bytes);
    ptx::mbar_arrive(&full[s]);  // the phase completes when the bytes have landed too
    if (mode == kMcast) {
      bulk_load_mcast(smem + s * kTile + rank * (kTile / 2), src + rank * (kTile / 2), kTile / 2,
                      &full[s], 0x3);
    } else {
      bulk_load(smem + s * kTile, src, bytes, &full[s]);
    }
  }
  for (int s = 0; s < kStages; ++s) ptx::mbar_wait(&full[s], uint32_t(kRounds - 1) & 1);
}

__global__ void __cluster_dims__(2, 1, 1) stream_tiles(const uint8_t* window, uint32_t tiles,
                                                       int mode) {
  extern __shared__ __align__(1024) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kTile);
  uint64_t* empty = full + kStages;
  const uint32_t rank = ptx::cluster_ctarank();
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbar_init(&full[s], 1);
      ptx::mbar_init(&empty[s], 2);  // this CTA's and the peer's release (mcast)
    }
    ptx::fence_barrier_init();
  }
  ptx::cluster_arrive_relaxed();
  ptx::cluster_wait();
  if (threadIdx.x == 0) issue_and_wait(smem, full, empty, window, tiles, mode, rank, blockIdx.x / 2);
  __syncwarp();
  // No CTA leaves while its peer may still write into it (mcast): the whole warp, converged.
  ptx::cluster_sync_all();
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int ctas = sms / 2 * 2;
  const size_t big = size_t(1) << 30;
  uint8_t* window;
  CK(cudaMalloc(&window, big));
  CK(cudaMemset(window, 1, big));
  const int smem = kStages * kTile + 2 * kStages * 8;
  CK(cudaFuncSetAttribute(stream_tiles, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  const char* names[] = {"own", "mcast", "half"};
  for (size_t bytes : {size_t(16) << 20, big}) {
    const uint32_t tiles = uint32_t(bytes / kTile);
    for (int mode : {kOwn, kMcast, kHalf}) {
      std::vector<float> v;
      for (int r = 0; r < 7; ++r) {
        stream_tiles<<<ctas, 32, smem>>>(window, tiles, mode);  // warm-up (and L2 fill)
        CK(cudaEventRecord(a));
        stream_tiles<<<ctas, 32, smem>>>(window, tiles, mode);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, a, b));
        v.push_back(ms);
      }
      CK(cudaGetLastError());
      std::sort(v.begin(), v.end());
      const double s = v[3] * 1e-3;
      const double tile_bytes = mode == kHalf ? kTile / 2 : kTile;
      const double received = double(ctas) * kRounds * kStages * tile_bytes;
      const double read = mode == kMcast ? received / 2 : received;
      printf("window %5zu MiB %-6s %7.1f us: received %5.2f TB/s (%4.1f GB/s per SM), read %5.2f TB/s\n",
             bytes >> 20, names[mode], s * 1e6, received / s / 1e12, received / s / ctas / 1e9,
             read / s / 1e12);
    }
  }
  return 0;
}
