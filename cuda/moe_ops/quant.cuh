// quant.cuh: per-token-group FP8 quantisation of bf16 activations (SGLang's
// per_token_group_quant_fp8 with group 128, row-major float scales).
//
// One warp per group of 128 values (a row of K holds K / 128 groups; rows are contiguous, so
// group g of the flat array is row g / (K/128), columns 128 * (g % (K/128)) onward, and its
// scale is scale[g] of the row-major [M, K/128] array). Each lane reads 4 bf16 (8 bytes) and
// writes 4 FP8 codes (4 bytes).
//   scale = max(amax, 1e-10) / 448           (float division, IEEE round to nearest)
//   q     = e4m3(x / scale), saturated to ±448, round to nearest even
// which is what src/reference.ts quantizePerTokenGroup computes, bit for bit.
// With `zero_out` (bf16 [M, K], the fused kernel's output) each lane also writes zeros over the
// same 4 elements of it: the layer's "zero the output" step rides along, saving a launch.
//
// quant_group is the device code; the kernel that runs it is in quant.cu, and the prologue
// (moe_ops/prologue.cuh) runs it too. Headers hold device functions only: a __global__ defined
// here would be defined again in every translation unit that includes it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "warp.cuh"

namespace amoe {
namespace ops {

constexpr int kQuantGroup = 128;
constexpr int kQuantWarpsPerBlock = 8;
constexpr float kQuantFp8Max = 448.0f;
constexpr float kQuantEps = 1e-10f;

__device__ __forceinline__ uint32_t fp8_code(float v) {
  return static_cast<uint32_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// Quantises group g of x (one warp; lane holds 4 values) and zeroes the same elements of
// zero_out when it is not null. Used by quant_fp8_group_kernel and the prologue.
__device__ __forceinline__ void quant_group(const __nv_bfloat16* __restrict__ x, int64_t g,
                                            uint8_t* __restrict__ q, float* __restrict__ scale,
                                            __nv_bfloat16* __restrict__ zero_out, int lane) {
  const int64_t base = g * kQuantGroup + lane * 4;
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(x + base));
  if (zero_out != nullptr) *reinterpret_cast<uint2*>(zero_out + base) = make_uint2(0, 0);
  const __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(&raw.x);
  const __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(&raw.y);
  const float v[4] = {__low2float(lo), __high2float(lo), __low2float(hi), __high2float(hi)};
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = warp_max(amax);
  const float s = fmaxf(amax, kQuantEps) / kQuantFp8Max;
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) packed |= fp8_code(v[i] / s) << (8 * i);
  *reinterpret_cast<uint32_t*>(q + base) = packed;
  if (lane == 0) scale[g] = s;
}

}  // namespace ops
}  // namespace amoe
