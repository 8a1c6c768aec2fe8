// The ring's barrier protocol alone (bench/NOTES.md item 137): what a stage costs in barrier
// traffic when nothing else runs. One CTA per SM of 384 threads, as the fused kernel's
// two-consumer variants: 128 producer threads arrive on full[s] (the kernel's deferred cp.async
// arrivals, here plain ones), 256 consumer threads wait for full[s], spin `work` clocks and
// release empty[s]; the producer waits for empty[s] before the next arrival on that slot.
// Release modes of the consumers:
//   thread  every consumer thread arrives (empty counts 256): the kernel's protocol;
//   warp    __syncwarp, then lane 0 arrives (empty counts 8);
//   wg      a named barrier per warpgroup, then its thread 0 arrives (empty counts 2).
// Prints clocks per stage (median CTA) for each mode at work = 0 and at `work` of about a large-M
// stage's up work.
// Build: nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -Icuda -o /tmp/mbar bench/micro/mbar.cu
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "check.cuh"
#include "fused_moe/ptx.cuh"
using namespace amoe;

constexpr int kStages = 4, kRounds = 4096;

__device__ __forceinline__ void spin(long long clocks) {
  const long long t0 = clock64();
  while (clock64() - t0 < clocks) {
  }
}

template <int kMode>  // 0 thread, 1 warp, 2 warpgroup
__global__ void __launch_bounds__(384, 1) ring(long long work, long long* clocks_per_stage) {
  __shared__ uint64_t full[kStages], empty[kStages];
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbar_init(&full[s], 128);
      ptx::mbar_init(&empty[s], kMode == 0 ? 256 : kMode == 1 ? 8 : 2);
    }
    ptx::fence_barrier_init();
  }
  __syncthreads();
  const long long t0 = clock64();
  if (tid < 128) {
    for (int i = 0; i < kRounds; ++i) {
      const int s = i % kStages;
      ptx::mbar_wait(&empty[s], ((i / kStages) & 1) ^ 1);
      ptx::mbar_arrive(&full[s]);
    }
  } else {
    const int ctid = tid - 128, wg = ctid / 128, lane = tid % 32;
    for (int i = 0; i < kRounds; ++i) {
      const int s = i % kStages;
      ptx::mbar_wait(&full[s], (i / kStages) & 1);
      if (work > 0) spin(work);
      if (kMode == 0) {
        ptx::mbar_arrive(&empty[s]);
      } else if (kMode == 1) {
        __syncwarp();
        if (lane == 0) ptx::mbar_arrive(&empty[s]);
      } else {
        ptx::named_barrier_sync(4 + wg, 128);
        if (ctid % 128 == 0) ptx::mbar_arrive(&empty[s]);
      }
    }
    if (ctid == 0) clocks_per_stage[blockIdx.x] = (clock64() - t0) / kRounds;
  }
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  long long* d = nullptr;
  CK(cudaMalloc(&d, sms * sizeof(long long)));
  std::vector<long long> h(sms);
  const char* names[] = {"thread", "warp", "wg"};
  for (long long work : {0LL, 1200LL}) {
    for (int mode = 0; mode < 3; ++mode) {
      for (int rep = 0; rep < 2; ++rep) {  // the first launch warms up
        if (mode == 0) ring<0><<<sms, 384>>>(work, d);
        if (mode == 1) ring<1><<<sms, 384>>>(work, d);
        if (mode == 2) ring<2><<<sms, 384>>>(work, d);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
      }
      CK(cudaMemcpy(h.data(), d, sms * sizeof(long long), cudaMemcpyDeviceToHost));
      std::sort(h.begin(), h.end());
      printf("work %5lld  release %-6s  clocks per stage: median %lld  max %lld\n", work,
             names[mode], h[sms / 2], h[sms - 1]);
    }
  }
  CK(cudaFree(d));
  return 0;
}
