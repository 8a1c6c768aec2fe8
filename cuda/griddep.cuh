// griddep.cuh: programmatic dependent launch, the way the library's kernels follow one another
// in a stream (route -> align -> quantise -> fused kernel, or prologue -> fused kernel).
//
// A kernel launched with launch_dependent may start before the kernel ahead of it in the stream
// ends: once every CTA of that kernel has run allow_dependents (or exited). It must run wait
// before it reads or writes global memory; wait returns once the kernel ahead has completed and
// its writes are visible (at once when the launch was an ordinary one). Each kernel waits for
// the one ahead, which waited for its own, so completion carries down the chain. What overlaps
// is the launch and a CTA's set-up, about 1-2 µs per kernel (bench/NOTES.md, items 65-66).
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace amoe {
namespace griddep {

__device__ __forceinline__ void allow_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ void wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// `kernel<<<grid, block, smem, stream>>>(args...)` as a programmatic dependent.
template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace griddep
}  // namespace amoe
