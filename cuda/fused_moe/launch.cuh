// launch.cuh: host-side launch of one fused_moe_kernel<T, WGS> instantiation, and the
// dispatch table type that maps runtime configs onto instantiations.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>

#include "../status.cuh"
#include "kernel.cuh"

namespace amoe {

struct FusedMoeLaunch {
  CUtensorMap x_map, w_map, w2_map;
  FusedMoeParams params;
  dim3 grid;
  cudaStream_t stream;
};

// One compiled variant: T tokens per wgmma, WGS consumer warpgroups.
struct FusedMoeVariant {
  int tokens;
  int consumer_wgs;
  int (*smem_bytes)(int stages, int block_m);
  int (*launch)(const FusedMoeLaunch& l, int smem_bytes);
};

template <int T, int WGS>
int fused_moe_smem_bytes(int stages, int block_m) {
  return SmemLayout<T, WGS>::total_bytes(stages, block_m);
}

template <int T, int WGS>
int fused_moe_launch(const FusedMoeLaunch& l, int smem_bytes) {
  auto kernel = fused_moe_kernel<T, WGS>;
  // Raising the dynamic shared-memory limit is per function and per device; do it once per
  // device at the largest size any config can ask for rather than on every call.
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> configured[kMaxDevices];
  int device = 0;
  AMOE_CUDA(cudaGetDevice(&device));
  if (device >= kMaxDevices || !configured[device].load(std::memory_order_acquire)) {
    int optin = 0;
    AMOE_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    AMOE_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    if (device < kMaxDevices) configured[device].store(true, std::memory_order_release);
  }
  kernel<<<l.grid, (WGS + 1) * 128, smem_bytes, l.stream>>>(l.x_map, l.w_map, l.w2_map,
                                                           l.params);
  return check_cuda(cudaGetLastError(), "fused_moe_kernel launch");
}

#define AMOE_FUSED_MOE_VARIANT(T, WGS) \
  FusedMoeVariant { T, WGS, fused_moe_smem_bytes<T, WGS>, fused_moe_launch<T, WGS> }

// Defined in fused_moe_wg1.cu / fused_moe_wg2.cu (split so they compile in parallel).
extern const FusedMoeVariant kVariantsWg1[];
extern const int kVariantsWg1Count;
extern const FusedMoeVariant kVariantsWg2[];
extern const int kVariantsWg2Count;

}  // namespace amoe
