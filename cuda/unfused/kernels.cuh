// unfused/kernels.cuh: the four kernels of the unfused MoE baseline, written plainly (shared-
// memory tiles, fp32 CUDA-core FMAs, no tensor cores, no tuning). They compute the same layer as
// the fused kernel, one step per launch, through an fp32 workspace:
//
//   1. grouped_gemm_kernel (up):   h[slot, n]  = sum_k (x[t, k] * xs[t, k/128]) * (w[e, n, k] * ws)
//   2. swiglu_quant_kernel:        a[slot, j]  = e4m3(silu(gate_j) * up_j / scale), one f32 scale
//                                  per 128 intermediate channels, scale = max(amax, 1e-10) / 448
//   3. grouped_gemm_kernel (down): y[slot, k]  = sum_j (a[slot, j] * as[slot, j/128]) * (w2 * w2s)
//   4. weighted_sum_kernel:        out[t, k]   = bf16(sum_s topk_weight[t, s] * scaling * y[slot, k])
//
// A "slot" is the flat id token * top_k + s of sorted_token_ids; workspace rows are indexed by
// slot. Kernel 1 marks every slot it computes in `valid`, so slots that no block covers (experts
// of another rank, expert id -1) add nothing in kernel 4.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstddef>
#include <cstdint>

namespace amoe {
namespace unfused {

constexpr int kGroup = 128;                           // quantisation group / scale block
constexpr int kTileCols = 64;                         // output columns per CUDA block
constexpr int kTileDepth = 32;                        // reduction depth per shared-memory step
constexpr int kGemmThreads = 256;                     // kTileCols columns x 4 row groups
constexpr int kRowGroups = kGemmThreads / kTileCols;  // rows r, r + 4, r + 8, ... per thread
constexpr int kMaxBlockM = 128;
constexpr int kAccRows = kMaxBlockM / kRowGroups;  // accumulators per thread
constexpr int kSumThreads = 256;
constexpr float kFp8Max = 448.0f;

__device__ __forceinline__ float fp8_value(uint8_t code) {
  __nv_fp8_e4m3 v;
  v.__x = code;
  return static_cast<float>(v);
}

// One grouped GEMM over the sorted layout: C[slot, col] = sum_d A[row(slot), d] * B[e, col, d],
// both operands dequantised (FP8 code x its f32 scale) before an fp32 FMA.
struct GemmParams {
  const uint8_t* a;        // [a_rows, depth] e4m3 codes
  const float* a_scale;    // [a_rows, depth / 128]
  int a_row_div;           // A row of slot id s = s / a_row_div (top_k for x, 1 for the act.)
  const uint8_t* b;        // [num_experts, cols, depth] e4m3 codes
  const float* b_scale;    // [num_experts, cols / 128, depth / 128]
  float* c;                // [num_slots, cols]
  int32_t* valid;          // [num_slots]: set to 1 for each slot written (null: not recorded)
  const int32_t* sorted_ids;
  const int32_t* expert_ids;
  const int32_t* num_tokens_post_padded;
  int sorted_len, num_slots, num_experts, depth, cols, block_m;
  // B's rows are gate/up interleaved in chunks of 8 and its scale rows in chunks of 1 (w):
  // row n belongs to intermediate j = 8 * (n / 16) + n % 8, whose scale row is
  // 2 * (j / 128) for gate rows and 2 * (j / 128) + 1 for up rows, not n / 128.
  bool interleaved_scales;
};

__device__ __forceinline__ int scale_row(int col, bool interleaved) {
  if (!interleaved) return col / kGroup;
  const int j = ((col >> 4) << 3) | (col & 7);
  return 2 * (j / kGroup) + ((col >> 3) & 1);
}

// grid (ceil(sorted_len / block_m), cols / 64), 256 threads. CUDA block (b, y) computes the
// block_m sorted rows of block b (one expert) x 64 columns; blocks past num_tokens_post_padded
// or with a negative expert id return at once.
__global__ void __launch_bounds__(kGemmThreads) grouped_gemm_kernel(GemmParams p) {
  __shared__ float a_tile[kMaxBlockM][kTileDepth + 1];
  __shared__ float b_tile[kTileCols][kTileDepth + 1];
  __shared__ int slots[kMaxBlockM];

  const int block = blockIdx.x;
  const int row0 = block * p.block_m;
  if (row0 >= *p.num_tokens_post_padded) return;
  const int expert = p.expert_ids[block];
  if (expert < 0 || expert >= p.num_experts) return;
  const int col0 = blockIdx.y * kTileCols;

  for (int r = threadIdx.x; r < p.block_m; r += kGemmThreads) {
    const int id = row0 + r < p.sorted_len ? p.sorted_ids[row0 + r] : -1;
    slots[r] = (id >= 0 && id < p.num_slots) ? id : -1;  // padding rows compute zeros
  }
  __syncthreads();

  const int tc = threadIdx.x % kTileCols;
  const int tr = threadIdx.x / kTileCols;
  float acc[kAccRows];
#pragma unroll
  for (int i = 0; i < kAccRows; ++i) acc[i] = 0.0f;

  const int scale_depth = p.depth / kGroup;
  const uint8_t* b_rows = p.b + (size_t(expert) * p.cols + col0) * p.depth;
  const float* b_scales = p.b_scale + size_t(expert) * (p.cols / kGroup) * scale_depth;

  for (int d0 = 0; d0 < p.depth; d0 += kTileDepth) {
    const int group = d0 / kGroup;
    for (int i = threadIdx.x; i < p.block_m * kTileDepth; i += kGemmThreads) {
      const int r = i / kTileDepth, d = i % kTileDepth;
      const int slot = slots[r];
      float v = 0.0f;
      if (slot >= 0) {
        const size_t row = size_t(slot / p.a_row_div);
        v = fp8_value(p.a[row * p.depth + d0 + d]) * p.a_scale[row * scale_depth + group];
      }
      a_tile[r][d] = v;
    }
    for (int i = threadIdx.x; i < kTileCols * kTileDepth; i += kGemmThreads) {
      const int c = i / kTileDepth, d = i % kTileDepth;
      const int col = col0 + c;
      b_tile[c][d] = fp8_value(b_rows[size_t(c) * p.depth + d0 + d]) *
                     b_scales[scale_row(col, p.interleaved_scales) * scale_depth + group];
    }
    __syncthreads();
    for (int d = 0; d < kTileDepth; ++d) {
      const float bv = b_tile[tc][d];
#pragma unroll
      for (int i = 0; i < kAccRows; ++i) {
        const int r = tr + kRowGroups * i;
        if (r < p.block_m) acc[i] = fmaf(a_tile[r][d], bv, acc[i]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kAccRows; ++i) {
    const int r = tr + kRowGroups * i;
    if (r < p.block_m && slots[r] >= 0) p.c[size_t(slots[r]) * p.cols + col0 + tc] = acc[i];
  }
  if (p.valid != nullptr && blockIdx.y == 0) {
    for (int r = threadIdx.x; r < p.block_m; r += kGemmThreads) {
      if (slots[r] >= 0) p.valid[slots[r]] = 1;
    }
  }
}

// grid (num_slots, N / 256), 128 threads: thread j of CUDA block (s, g) makes intermediate
// channel g * 128 + j of slot s. Rows of h interleave gate and up in chunks of 8: channel j
// pairs gate row 16 * (j / 8) + j % 8 with the up row 8 below it.
__global__ void __launch_bounds__(kGroup)
    swiglu_quant_kernel(const float* h, const int32_t* valid, uint8_t* act, float* act_scale,
                        int N) {
  const int slot = blockIdx.x;
  if (valid[slot] == 0) return;
  const int inter = N / 2;
  const int j = blockIdx.y * kGroup + threadIdx.x;
  const float* row = h + size_t(slot) * N;
  const int gate = ((j >> 3) << 4) | (j & 7);
  const float g = row[gate];
  const float u = row[gate + 8];
  const float value = g / (1.0f + expf(-g)) * u;

  __shared__ float warp_max[kGroup / 32];
  float m = fabsf(value);
  for (int offset = 16; offset > 0; offset >>= 1) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  }
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  float amax = warp_max[0];
  for (int w = 1; w < kGroup / 32; ++w) amax = fmaxf(amax, warp_max[w]);
  const float scale = fmaxf(amax, 1e-10f) / kFp8Max;
  act[size_t(slot) * inter + j] = __nv_cvt_float_to_fp8(value / scale, __NV_SATFINITE, __NV_E4M3);
  if (threadIdx.x == 0) act_scale[size_t(slot) * (inter / kGroup) + blockIdx.y] = scale;
}

// grid (M, ceil(K / 256)), 256 threads: out[t, k] = bf16(sum over the token's valid slots of
// topk_weight * scaling_factor * y[slot, k]). `out` is overwritten.
__global__ void __launch_bounds__(kSumThreads)
    weighted_sum_kernel(const float* y, const int32_t* valid, const float* topk_weights,
                        __nv_bfloat16* out, int K, int top_k, float scaling_factor) {
  const int token = blockIdx.x;
  const int k = blockIdx.y * kSumThreads + threadIdx.x;
  if (k >= K) return;
  float sum = 0.0f;
  for (int s = 0; s < top_k; ++s) {
    const size_t slot = size_t(token) * top_k + s;
    if (valid[slot] != 0) sum += topk_weights[slot] * scaling_factor * y[slot * K + k];
  }
  out[size_t(token) * K + k] = __float2bfloat16(sum);
}

}  // namespace unfused
}  // namespace amoe
