// Output reductions, three ways (bench/NOTES.md items 58-59; run on an H100 in session 14):
// 73728 row-adds of 7168 bf16 (ds M=8192's slots) into rows from a multiplicative hash, into an
// L2-resident output (1024 rows, 14 MB) and into the real footprint (8192 rows, 112 MiB):
//   vec   the kernel's 16-byte vector reductions (red.global.add.v4.bf16x2, evict-last), a warp
//         per row, as in the kernel's epilogue;
//   bulk  cp.reduce.async.bulk .add.noftz.bf16 of the whole 14 KiB row from shared memory, one
//         thread per warp issuing (the TMA unit's bulk reduction);
//   bulk xN the same in N pieces: 4 of 3584 bytes, 28 of 512 (the kernel's granularity: a
//         token's 256 output columns of one down tile);
//   store plain 16-byte stores (what the bytes cost without the read-modify-write).
//   vec f32 the same row-adds in fp32 (red.global.add.v4.f32) into an fp32 output: twice the
//         bytes, and on an H200 twice the time (item 129: the L2's cost is per 16-byte op).
// Question: is a bulk reduction's L2 cost per byte lower than a vector reduction's (2.4 read
// bytes per byte, item 44)? If so, the epilogue could go back to bulk reductions now that the TMA
// unit carries only weight tiles (item 33). Answer (item 59): no. Into 14 MB all reductions ran
// at 3.16-3.20 TB/s of bf16; into 112 MiB bulk ones were 8 % faster (870 against 944 us).
// `l2red sms` (item 90) adds from fewer CTAs: on an H200 one SM takes at most ~46 GB/s of
// reductions whatever issues them, all SMs together 3.65 TB/s.
// Build: nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -Icuda -o /tmp/l2red bench/micro/l2red.cu
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "check.cuh"
#include "fused_moe/ptx.cuh"
using namespace amoe;

constexpr int K = 7168, ADDS = 73728, ROW_BYTES = K * 2;

__device__ __forceinline__ int row_of(int i, int rows) {
  return int((uint32_t(i) * 2654435761u) % uint32_t(rows));
}

__global__ void vec(__nv_bfloat16* out, int rows) {
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * (blockDim.x / 32);
  const uint64_t pol = ptx::policy_evict_last();
  const uint4 v = make_uint4(0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u);
  for (int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < ADDS; i += warps) {
    __nv_bfloat16* r = out + size_t(row_of(i, rows)) * K;
    for (int c = 0; c < K; c += 256) ptx::red_add_bf16x8(r + c + lane * 8, v, pol);
  }
}

// The same row-adds in fp32, into an fp32 copy of the output: twice the bytes, but no bf16
// read-modify-write in the L2 (bench/NOTES.md item 129: 1.95-2x the bf16 time). 16 bytes per
// lane, a warp instruction per 128 columns.
__global__ void vec_f32(float* out, int rows) {
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * (blockDim.x / 32);
  for (int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < ADDS; i += warps) {
    float* r = out + size_t(row_of(i, rows)) * K;
    for (int c = 0; c < K; c += 128) {
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(r + c + lane * 4),
                   "f"(1.0f), "f"(1.0f), "f"(1.0f), "f"(1.0f)
                   : "memory");
    }
  }
}

__global__ void store(__nv_bfloat16* out, int rows) {
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * (blockDim.x / 32);
  const uint4 v = make_uint4(0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u);
  for (int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < ADDS; i += warps) {
    __nv_bfloat16* r = out + size_t(row_of(i, rows)) * K;
    for (int c = 0; c < K; c += 256) *reinterpret_cast<uint4*>(r + c + lane * 8) = v;
  }
}

// One 14 KiB row of bf16 1.0 in shared memory, added by the TMA unit: lane 0 of each warp
// issues its rows' reductions in `chunks` pieces; the source never changes, so nothing waits
// until the end.
__global__ void bulk(__nv_bfloat16* out, int rows, int chunks, int hint) {
  extern __shared__ __align__(128) uint8_t smem[];
  for (int i = threadIdx.x; i < ROW_BYTES / 4; i += blockDim.x) {
    reinterpret_cast<uint32_t*>(smem)[i] = 0x3f803f80u;
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  if (threadIdx.x % 32 != 0) return;
  const int warps = gridDim.x * (blockDim.x / 32);
  const int piece = ROW_BYTES / chunks;
  const uint64_t pol = ptx::policy_evict_last();
  for (int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < ADDS; i += warps) {
    uint8_t* r = reinterpret_cast<uint8_t*>(out + size_t(row_of(i, rows)) * K);
    for (int c = 0; c < chunks; ++c) {
      if (hint) {
        asm volatile(
            "cp.reduce.async.bulk.global.shared::cta.bulk_group.L2::cache_hint.add.noftz.bf16 "
            "[%0], [%1], %2, %3;" ::"l"(r + c * piece),
            "r"(ptx::smem_addr(smem + c * piece)), "r"(piece), "l"(pol)
            : "memory");
      } else {
        asm volatile(
            "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.noftz.bf16 [%0], [%1], %2;" ::"l"(
                r + c * piece),
            "r"(ptx::smem_addr(smem + c * piece)), "r"(piece)
            : "memory");
      }
    }
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

int main(int argc, char** argv) {
  const bool sweep = argc > 1 && std::string(argv[1]) == "sms";
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  __nv_bfloat16* out;
  CK(cudaMalloc(&out, size_t(8192) * ROW_BYTES));
  CK(cudaMemset(out, 0, size_t(8192) * ROW_BYTES));
  float* out_f32;
  CK(cudaMalloc(&out_f32, size_t(8192) * K * 4));
  CK(cudaMemset(out_f32, 0, size_t(8192) * K * 4));
  CK(cudaFuncSetAttribute(bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, ROW_BYTES));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  auto timeit = [&](auto launch) {
    std::vector<float> v;
    for (int r = 0; r < 7; ++r) {
      cudaEventRecord(a);
      launch();
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      float ms;
      cudaEventElapsedTime(&ms, a, b);
      v.push_back(ms);
    }
    std::sort(v.begin(), v.end());
    return v[3];
  };
  const double bytes = double(ADDS) * ROW_BYTES;
  auto report = [&](const char* what, int rows, int warps_per_cta, float ms) {
    printf("%-22s rows %4d (%3zu MB) warps/CTA %2d: %7.1f us, %5.0f GB/s of bf16\n", what, rows,
           size_t(rows) * ROW_BYTES >> 20, warps_per_cta, ms * 1e3, bytes / (ms * 1e-3) / 1e9);
  };
  if (sweep) {
    // Per SM or per L2? The same adds from fewer CTAs (one per SM, 16 warps each) into the
    // L2-resident window: if GB/s per CTA stays flat as CTAs drop, each SM's path to the L2 is
    // the limit, not the L2 (bench/NOTES.md item 90).
    for (int ctas : {sms, sms / 4}) {
      for (int w : {4, 8, 16, 32}) {
        const float vec_ms = timeit([&] { vec<<<ctas, 32 * w>>>(out, 1024); });
        CK(cudaGetLastError());
        const float bulk_ms =
            timeit([&] { bulk<<<ctas, 32 * w, ROW_BYTES>>>(out, 1024, 28, 1); });
        CK(cudaGetLastError());
        const float store_ms = timeit([&] { store<<<ctas, 32 * w>>>(out, 1024); });
        CK(cudaGetLastError());
        auto rate = [&](float ms) { return bytes / (ms * 1e-3) / 1e9; };
        printf("CTAs %3d warps %2d: GB/s per CTA: vec %5.1f, bulk x28 %5.1f, store %5.1f (vec all %4.0f)\n",
               ctas, w, rate(vec_ms) / ctas, rate(bulk_ms) / ctas, rate(store_ms) / ctas, rate(vec_ms));
      }
    }
    CK(cudaDeviceSynchronize());
    return 0;
  }
  for (int rows : {1024, 8192}) {
    for (int w : {8, 16}) {
      report("vec (kernel's)", rows, w, timeit([&] { vec<<<sms, 32 * w>>>(out, rows); }));
      CK(cudaGetLastError());
      report("store", rows, w, timeit([&] { store<<<sms, 32 * w>>>(out, rows); }));
      CK(cudaGetLastError());
      // The bf16 rate column of the f32 line is the same row-adds' rate, for comparison: its
      // own bytes are twice as many.
      report("vec f32 (same rows)", rows, w,
             timeit([&] { vec_f32<<<sms, 32 * w>>>(out_f32, rows); }));
      CK(cudaGetLastError());
      for (int chunks : {1, 4, 28}) {
        for (int hint : {0, 1}) {
          char name[64];
          snprintf(name, sizeof name, "bulk x%d%s", chunks, hint ? " evict-last" : "");
          report(name, rows, w,
                 timeit([&] { bulk<<<sms, 32 * w, ROW_BYTES>>>(out, rows, chunks, hint); }));
          CK(cudaGetLastError());
        }
      }
    }
  }
  CK(cudaDeviceSynchronize());
  return 0;
}
