// warp.cuh: warp- and block-level helpers shared by the routing, alignment and quantisation
// kernels (moe_ops/*.cuh). Device code only; every function is inline.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace amoe {
namespace ops {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// A candidate of a top-k round: a value and the expert index it belongs to. `index` is
// INT32_MAX for "no candidate" (so any real candidate, even one of value -inf, beats it).
struct Candidate {
  float value;
  int index;
};

// Ordering of top-k candidates: the larger value wins; equal values go to the lower index.
// Every selection in this library uses it, so ties are broken the same way everywhere (and
// the same way as the CPU references in src/routing.ts).
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

// The best candidate of the warp (every lane gets the same answer).
__device__ __forceinline__ Candidate warp_best(Candidate c) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const float v = __shfl_xor_sync(kFullMask, c.value, offset);
    const int i = __shfl_xor_sync(kFullMask, c.index, offset);
    if (better(v, i, c.value, c.index)) c = Candidate{v, i};
  }
  return c;
}

// Butterfly reductions: every lane ends with the same value (each step adds the same two
// partial results, in either order, which is exact under commutativity).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const int other = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += other;
  }
  return v;
}

// Exclusive prefix sum of one int per thread over the whole block (blockDim.x a multiple of
// 32, at most 1024). `scratch` holds 33 ints of shared memory; `*total` receives the sum.
// Contains __syncthreads: every thread of the block must call it.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int* total) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int inclusive = warp_inclusive_scan(v, lane);
  if (lane == kWarp - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < warps ? scratch[lane] : 0;
    const int scanned = warp_inclusive_scan(w, lane);
    scratch[lane] = scanned - w;  // exclusive prefix of the warp totals
    if (lane == kWarp - 1) scratch[kWarp] = scanned;
  }
  __syncthreads();
  const int result = scratch[warp] + inclusive - v;
  *total = scratch[kWarp];
  __syncthreads();  // scratch may be reused by the caller
  return result;
}

// Order keys: a non-NaN float's bits mapped to an unsigned int with the same order, so that a
// single integer reduction (__reduce_max_sync: one REDUX instruction on sm_80+, where a
// butterfly of shuffles takes five dependent steps) finds a warp's largest value. -0 gets +0's
// key (the two compare equal). Every value's key is at least 0x007fffff (that of -inf), so the
// key 0 can stand for "no candidate".
constexpr uint32_t kNoKey = 0;

__device__ __forceinline__ uint32_t order_key(float v) {
  uint32_t u = __float_as_uint(v);
  if (u == 0x80000000u) u = 0;  // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The float of a key (the inverse of order_key; -0 comes back as +0).
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The largest of a lane's N keys and its position, the lowest position among equal keys: a tree
// of depth log2(N) over adjacent ranges (the left range of a pair always holds the lower
// positions, so "the right one only if strictly larger" keeps the lowest on ties).
template <int N>
__device__ __forceinline__ void lane_max_key(const uint32_t (&key)[N], uint32_t* best, int* pos) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N must be a power of two");
  constexpr int kLevels = N >= 32 ? 5 : N >= 16 ? 4 : N >= 8 ? 3 : N >= 4 ? 2 : N >= 2 ? 1 : 0;
  uint32_t k[N];
  int s[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    k[i] = key[i];
    s[i] = i;
  }
#pragma unroll
  for (int level = 0; level < kLevels; ++level) {
    const int stride = 1 << level;
#pragma unroll
    for (int i = 0; i < N; i += 2 * stride) {
      const bool right = k[i + stride] > k[i];
      s[i] = right ? s[i + stride] : s[i];
      k[i] = right ? k[i + stride] : k[i];
    }
  }
  *best = k[0];
  *pos = s[0];
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
}

}  // namespace ops
}  // namespace amoe
