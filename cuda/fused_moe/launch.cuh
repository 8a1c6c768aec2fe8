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
  WeightMaps weights;
  FusedMoeParams params;
  dim3 grid;
  cudaStream_t stream;
  int device = 0;  // current, selected by the entry
  bool dependent = false;  // may start before the previous kernel ends (programmatic launch)
};

// One compiled variant: T tokens per wgmma, WGS consumer warpgroups.
struct FusedMoeVariant {
  int tokens;
  int consumer_wgs;
  bool all_slices;  // one CTA per token block covers every N slice
  bool split_n;     // a cluster of two CTAs shares each unit by N (kSplitN)
  // Shared memory of a config; `slices` = N / 256.
  int (*smem_bytes)(int stages, int block_m, int split, int slices);
  int (*launch)(const FusedMoeLaunch& l, int smem_bytes);
  // How many clusters of `split` CTAs (split 1: CTAs) of `smem_bytes` each `device` (the
  // current one) can run at once.
  int (*max_clusters)(int device, int smem_bytes, int split, int* count);
};

template <int T, int WGS, bool kHalves, bool kAllSlices, bool kSplitN>
int fused_moe_smem_bytes(int stages, int block_m, int split, int slices) {
  return SmemLayout<kHalves ? WGS * T : T, WGS>::total_bytes(stages, block_m, kSplitN ? 1 : split,
                                                            kAllSlices ? slices : 1);
}

constexpr int kMaxDevices = 64;

// An attribute of a device (the per-block shared-memory limit, the L2 size, the SM count),
// queried once per device.
template <cudaDeviceAttr kAttribute>
int device_attribute(int device, int* value) {
  static std::atomic<int> cached[kMaxDevices];
  if (device < kMaxDevices && (*value = cached[device].load(std::memory_order_relaxed)) > 0) {
    return AMOE_OK;
  }
  AMOE_CUDA(cudaDeviceGetAttribute(value, kAttribute, device));
  if (device < kMaxDevices) cached[device].store(*value, std::memory_order_relaxed);
  return AMOE_OK;
}

// Raising the dynamic shared-memory limit is per function and per device; do it once per
// device at the largest size any config can ask for rather than on every call.
template <int T, int WGS, bool kHalves, bool kAllSlices, bool kSplitN>
int configure_kernel(int device) {
  static std::atomic<bool> configured[kMaxDevices];
  auto kernel = fused_moe_kernel<T, WGS, kHalves, kAllSlices, kSplitN>;
  if (device >= kMaxDevices || !configured[device].load(std::memory_order_acquire)) {
    int optin = 0;
    AMOE_TRY(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device, &optin));
    AMOE_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    // Clusters of more than 8 (split units) are beyond the portable size.
    AMOE_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    if (device < kMaxDevices) configured[device].store(true, std::memory_order_release);
  }
  return AMOE_OK;
}

// The launch configuration of one kernel: a cluster of `split` CTAs when split > 1, and
// programmatic stream serialization when `dependent` (griddepcontrol in the kernel).
struct LaunchConfig {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attrs[2] = {};
  LaunchConfig(dim3 grid, int threads, int smem_bytes, cudaStream_t stream, int split,
               bool dependent = false) {
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem_bytes;
    config.stream = stream;
    config.attrs = attrs;
    if (split > 1) {
      cudaLaunchAttribute& a = attrs[config.numAttrs++];
      a.id = cudaLaunchAttributeClusterDimension;
      a.val.clusterDim.x = split;
      a.val.clusterDim.y = 1;
      a.val.clusterDim.z = 1;
    }
    if (dependent) {
      cudaLaunchAttribute& a = attrs[config.numAttrs++];
      a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      a.val.programmaticStreamSerializationAllowed = 1;
    }
  }
  LaunchConfig(const LaunchConfig&) = delete;  // config.attrs points into this object
};

template <int T, int WGS, bool kHalves, bool kAllSlices, bool kSplitN>
int fused_moe_launch(const FusedMoeLaunch& l, int smem_bytes) {
  AMOE_TRY((configure_kernel<T, WGS, kHalves, kAllSlices, kSplitN>(l.device)));
  const LaunchConfig c(l.grid, (WGS + 1) * 128, smem_bytes, l.stream, l.params.split,
                       l.dependent);
  return check_cuda(cudaLaunchKernelEx(&c.config, fused_moe_kernel<T, WGS, kHalves, kAllSlices, kSplitN>, l.weights,
                                       l.params),
                    "fused_moe_kernel launch");
}

template <int T, int WGS, bool kHalves, bool kAllSlices, bool kSplitN>
int fused_moe_max_clusters(int device, int smem_bytes, int split, int* count) {
  AMOE_TRY((configure_kernel<T, WGS, kHalves, kAllSlices, kSplitN>(device)));
  if (split == 1) {
    int per_sm = 0, sms = 0;
    AMOE_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, fused_moe_kernel<T, WGS, kHalves, kAllSlices, kSplitN>, (WGS + 1) * 128,
        smem_bytes));
    AMOE_TRY(device_attribute<cudaDevAttrMultiProcessorCount>(device, &sms));
    *count = per_sm * sms;
    return AMOE_OK;
  }
  const LaunchConfig c(dim3(split), (WGS + 1) * 128, smem_bytes, nullptr, split);
  return check_cuda(
      cudaOccupancyMaxActiveClusters(count, fused_moe_kernel<T, WGS, kHalves, kAllSlices, kSplitN>, &c.config),
      "cudaOccupancyMaxActiveClusters");
}

// TOKENS per sub-tile; HALVES: T tokens per consumer warpgroup, each on its own tokens
// against all 256 rows (kHalves); ALL: one CTA per token block for every N slice; SPLIT_N: a
// cluster of two CTAs per unit, one per 128 rows of its slice.
#define AMOE_FUSED_MOE_VARIANT_OF(TOKENS, T, WGS, HALVES, ALL, SPLIT_N)               \
  FusedMoeVariant {                                                                  \
    TOKENS, WGS, ALL, SPLIT_N, fused_moe_smem_bytes<T, WGS, HALVES, ALL, SPLIT_N>,   \
        fused_moe_launch<T, WGS, HALVES, ALL, SPLIT_N>,                              \
        fused_moe_max_clusters<T, WGS, HALVES, ALL, SPLIT_N>                         \
  }
#define AMOE_FUSED_MOE_VARIANT(T, WGS) AMOE_FUSED_MOE_VARIANT_OF(T, T, WGS, false, false, false)
// Every sub-tile size compiled for two consumer warpgroups (up to 64 tokens fit their
// registers): X(T) for each, for the tables of fused_moe_wg2.cu and fused_moe_split_n.cu.
#define AMOE_TWO_WG_SUB_TILES(X) X(8) X(16) X(24) X(32) X(40) X(48) X(56) X(64)
#define AMOE_FUSED_MOE_HALVES_VARIANT(T, WGS, ALL) \
  AMOE_FUSED_MOE_VARIANT_OF((T) * (WGS), T, WGS, true, ALL, false)

// Defined in fused_moe_wg1.cu / fused_moe_wg2.cu (split so they compile in parallel).
extern const FusedMoeVariant kVariantsWg1[];
extern const int kVariantsWg1Count;
extern const FusedMoeVariant kVariantsWg2[];
extern const int kVariantsWg2Count;
// Two consumer warpgroups, each on its own half of a sub-tile of 80 tokens (blocks of 72, 80);
// the second for N > 256, one CTA per token block for all slices.
extern const FusedMoeVariant kVariantHalves;
extern const FusedMoeVariant kVariantHalvesAllSlices;
// Two consumer warpgroups sharing one sub-tile of up to 64 tokens, one CTA for every N slice.
extern const FusedMoeVariant kVariantsAllSlices[];
extern const int kVariantsAllSlicesCount;
// N halves (split_n 2), two consumer warpgroups: per sub-tile size, and on token halves.
extern const FusedMoeVariant kVariantsSplitN[];
extern const int kVariantsSplitNCount;
extern const FusedMoeVariant kVariantHalvesSplitN;

}  // namespace amoe
