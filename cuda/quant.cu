// quant.cu: the exported per-token-group FP8 quantisation entry. Validates every argument and
// launches one warp per 128-value group on the caller's stream (optionally zeroing the fused
// kernel's output in the same pass). No allocation, no synchronisation.
#include <cstdint>

#include "griddep.cuh"
#include "moe_ops/quant.cuh"
#include "moe_ops/validate.cuh"
#include "status.cuh"

namespace amoe {
namespace ops {

// The kernel (the device code it runs is in moe_ops/quant.cuh): one warp per group.
__global__ void __launch_bounds__(kQuantWarpsPerBlock * kWarp)
    quant_fp8_group_kernel(const __nv_bfloat16* __restrict__ x, int64_t groups,
                           uint8_t* __restrict__ q, float* __restrict__ scale,
                           __nv_bfloat16* __restrict__ zero_out) {
  griddep::allow_dependents();  // the fused kernel's launch overlaps this one
  griddep::wait();  // launched after the alignment (griddep.cuh)
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kQuantWarpsPerBlock + threadIdx.x / kWarp;
  if (g >= groups) return;
  quant_group(x, g, q, scale, zero_out, threadIdx.x % kWarp);
}

}  // namespace ops
}  // namespace amoe

extern "C" {

int amoe_quant_fp8_per_token_group(const void* x, int32_t M, int32_t K, void* q, float* scale,
                                   void* zero_out, void* stream) {
  using namespace amoe;
  const char* what = "amoe_quant_fp8_per_token_group";
  AMOE_TRY(ops::check_quant(what, x, M, K, q, scale, zero_out));
  AMOE_TRY(select_device());
  const int64_t groups = static_cast<int64_t>(M) * (K / ops::kQuantGroup);
  if (groups == 0) return AMOE_OK;
  const int64_t blocks = (groups + ops::kQuantWarpsPerBlock - 1) / ops::kQuantWarpsPerBlock;
  return check_cuda(
      griddep::launch_dependent(ops::quant_fp8_group_kernel, dim3(static_cast<unsigned>(blocks)),
                                dim3(ops::kQuantWarpsPerBlock * ops::kWarp), 0,
                                static_cast<cudaStream_t>(stream),
                                static_cast<const __nv_bfloat16*>(x), groups,
                                static_cast<uint8_t*>(q), scale,
                                static_cast<__nv_bfloat16*>(zero_out)),
      "quant_fp8_group_kernel launch");
}

}  // extern "C"
