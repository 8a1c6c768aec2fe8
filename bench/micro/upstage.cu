// The fused kernel's up stage in isolation (bench/NOTES.md item 138): the consumers' loop of the
// blocks of 80 tokens (two consumer warpgroups; token halves: each warpgroup its own 40 tokens
// against all 256 rows of a 256 x 128-byte weight tile, four m64 tiles x four k32 steps of
// m64n40k32 per stage), the FP8 partial sums promoted into fp32 with both block scales once per
// tile and stage, fed through the kernel's ring protocol (four slots) by a producer warpgroup,
// one CTA per SM, 1,024 stages. No global memory in the loop unless a mode asks for it:
//   promote  the promotion FFMAs (else the partial sums are never read);
//   fence    fence.proxy.async after each full-barrier wait (the kernel's, for token rows written
//            by cp.async and read by wgmma);
//   weights  the producer loads each 32 KiB weight tile by a bulk copy from an L2-resident window;
//   tokens   the producer's 128 threads copy the stage's token rows (16-byte cp.async from an
//            L2-resident x, rows scattered) and x scales, each thread's arrival deferred until its
//            copies land, as the kernel's producer does (variants: without the L2::256B hint; one
//            128-byte bulk copy per row).
// Layouts: groups of 1, 2 or 4 m64 tiles per commit with 1-3 groups in flight; rows (the
// warpgroups share the tokens and split the rows: m64n72/m64n80 wgmmas, the kernel's layout up to
// 64 tokens); multicast pairs (clusters of two CTAs, each loading half of every weight tile into
// both). Prints clocks per stage, median CTA.
// Answer (H200, item 138): a stage of 80 tokens costs ~1,140 clocks with weights and tokens from
// L2, of which ~1,010 is the chain of 32 m64n40k32 alone (~2,600 multiply-adds per clock, 63 % of
// the FP8 peak); token rows add ~95, the fence ~30, promotions ~10-30; weight tiles from L2 add
// nothing. Regrouping moves it within 1 %, rows (m64n80, one group in flight) save 4 %, multicast
// pairs cost 6 %, and one bulk copy per token row doubles the stage.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "check.cuh"
#include "fused_moe/ptx.cuh"
#include "fused_moe/wgmma_fp8.cuh"
using namespace amoe;

constexpr int kStages = 4, kRounds = 256;  // ring slots; stages per CTA = kStages * kRounds
constexpr int kWeightBytes = 256 * 128;
constexpr int kWindowTiles = 256;  // 8 MiB of weight tiles, read by every CTA (L2-resident)
constexpr int kXRows = 2048, kK = 4096;  // token rows the copies read from (8 MiB of x)
enum : int { kPromote = 1, kFence = 2, kWeights = 4, kTokens = 8, kNoHint = 16, kBulkRows = 32 };

template <int S>  // tokens per stage
struct Layout {
  static constexpr int kTokenOffset = kWeightBytes;
  static constexpr int kScaleOffset = kTokenOffset + S * 128;
  static constexpr int kStageBytes = (kScaleOffset + (S + 2) * 4 + 1023) / 1024 * 1024;
};

// kRows: the two warpgroups share the stage's T tokens and take 128 rows each (two m64 tiles of
// m64nTk32), the kernel's layout for blocks of up to 64 tokens; else token halves: each takes its
// own T tokens against all 256 rows (four m64 tiles). Tokens per stage: T with kRows, 2 T else.
template <int T, int kGroupTiles, int kDepth, bool kRows, bool kPairs>
__device__ __forceinline__ void consume(int mode, uint8_t* smem, uint64_t* full, uint64_t* empty,
                                        uint32_t rank, long long* clocks, float* sink);

// kPairs: clusters of two CTAs, each loading half of every weight tile into both (TMA multicast),
// each with its own tokens; a slot is refilled once both CTAs' consumers have released it.
template <int T, int kGroupTiles, int kDepth, bool kRows, bool kPairs>
__global__ void __launch_bounds__(384, 1)
    up_stages(int mode, const uint8_t* window, const uint8_t* x, const float* x_scale,
              long long* clocks, float* sink) {
  constexpr int S = kRows ? T : 2 * T;  // tokens per stage
  using L = Layout<S>;
  extern __shared__ __align__(1024) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * L::kStageBytes);
  uint64_t* empty = full + kStages;
  const int tid = threadIdx.x;
  for (int i = tid; i < kStages * L::kStageBytes / 4; i += blockDim.x) {
    reinterpret_cast<uint32_t*>(smem)[i] = 0x30303030u;  // 0.125 in e4m3; scales 6.4e-10
  }
  const uint32_t rank = kPairs ? ptx::cluster_ctarank() : 0;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbar_init(&full[s], 128);
      ptx::mbar_init(&empty[s], kPairs ? 16 : 256);  // pairs: a warp's release, in both CTAs
    }
    ptx::fence_barrier_init();
  }
  __syncthreads();
  if (kPairs) ptx::cluster_sync_all();  // the peer's barriers are set before it is written to
  constexpr int kTotal = kStages * kRounds;
  if (tid < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;");
    // Token row r of the stage: chunk tid % 8 of rows tid / 8 + 16 j.
    constexpr int kRowsPerThread = (S + 15) / 16;
    for (int i = 0; i < kTotal; ++i) {
      const int s = i % kStages;
      uint8_t* st = smem + s * L::kStageBytes;
      if (i >= kStages) ptx::mbar_wait(&empty[s], ((i / kStages) & 1) ^ 1);
      if ((mode & kWeights) && tid == 0) {
        ptx::mbar_expect_tx(&full[s], kWeightBytes);
        const uint32_t stream = kPairs ? blockIdx.x / 2 : blockIdx.x;
        const uint8_t* src = window + size_t((stream * 97u + i * 13u) % kWindowTiles) * kWeightBytes;
        if (kPairs) {
          constexpr int kHalf = kWeightBytes / 2;
          asm volatile(
              "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
              "[%0], [%1], %2, [%3], %4;" ::"r"(ptx::smem_addr(st + rank * kHalf)),
              "l"(src + rank * kHalf), "r"(kHalf), "r"(ptx::smem_addr(&full[s])), "h"(uint16_t(3))
              : "memory");
        } else {
          asm volatile(
              "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
              "[%3];" ::"r"(ptx::smem_addr(st)),
              "l"(src), "r"(kWeightBytes), "r"(ptx::smem_addr(&full[s]))
              : "memory");
        }
      }
      if (mode & kTokens) {
        const int kb = i % (kK / 128);
        if (mode & kBulkRows) {  // one 128-byte bulk copy per row, counted in bytes on full[s]
          if (tid == 0) ptx::mbar_expect_tx(&full[s], S * 128);
          if (tid < S) {
            const int token = int((uint32_t(blockIdx.x * S + tid) * 2654435761u) % kXRows);
            asm volatile(
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], "
                "128, [%2];" ::"r"(ptx::smem_addr(st + L::kTokenOffset + tid * 128)),
                "l"(x + size_t(token) * kK + kb * 128), "r"(ptx::smem_addr(&full[s]))
                : "memory");
          }
        } else {
          for (int j = 0; j < kRowsPerThread; ++j) {
            const int r = tid / 8 + 16 * j;
            if (r < S) {
              const int token = int((uint32_t(blockIdx.x * S + r) * 2654435761u) % kXRows);
              const int chunk = tid % 8;
              uint8_t* dst = st + L::kTokenOffset + r * 128 + ((chunk ^ (r & 7)) << 4);
              const uint8_t* src = x + size_t(token) * kK + kb * 128 + chunk * 16;
              if (mode & kNoHint) {
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(ptx::smem_addr(dst)),
                             "l"(src)
                             : "memory");
              } else {
                ptx::cp_async_16(dst, src);
              }
            }
          }
        }
        if (tid < S) {
          const int token = int((uint32_t(blockIdx.x * S + tid) * 2654435761u) % kXRows);
          ptx::cp_async_4(st + L::kScaleOffset + tid * 4, x_scale + token * (kK / 128) + kb, 4);
        }
        ptx::cp_async_mbar_arrive(&full[s]);
      } else {
        ptx::mbar_arrive(&full[s]);
      }
    }
  } else {
    consume<T, kGroupTiles, kDepth, kRows, kPairs>(mode, smem, full, empty, rank, clocks, sink);
  }
  if (kPairs) ptx::cluster_sync_all();  // no CTA leaves while its peer may write into it
}

template <int T, int kGroupTiles, int kDepth, bool kRows, bool kPairs>
__device__ __forceinline__ void consume(int mode, uint8_t* smem, uint64_t* full, uint64_t* empty,
                                        uint32_t rank, long long* clocks, float* sink) {
  constexpr int S = kRows ? T : 2 * T;
  constexpr int kTiles = kRows ? 2 : 4;
  constexpr int kRegs = T / 2;
  constexpr int kTotal = kStages * kRounds;
  using L = Layout<S>;
  const int tid = threadIdx.x;
  asm volatile("setmaxnreg.inc.sync.aligned.u32 224;");
  const int ctid = tid - 128;
  const int wg = __shfl_sync(0xffffffffu, ctid / 128, 0);
  const int quad = (ctid % 32) % 4;
  const int tw = kRows ? 0 : wg * T;
  const int row0 = kRows ? wg * 128 : 0;
  // A group: kGroupTiles m64 tiles x 4 k32 steps, each tile into its own partial sums, promoted
  // together once the group is done; kDepth groups in flight.
  constexpr int kGroups = kTiles / kGroupTiles;
  float acc[kTiles][kRegs];
  float part[kDepth][kGroupTiles][kRegs];
#pragma unroll
  for (int m = 0; m < kTiles; ++m)
#pragma unroll
    for (int r = 0; r < kRegs; ++r) acc[m][r] = 0.0f;
  const long long t0 = clock64();
  for (int i = 0; i < kTotal; ++i) {
    const int s = i % kStages;
    const uint8_t* st = smem + s * L::kStageBytes;
    ptx::mbar_wait(&full[s], (i / kStages) & 1);
    if (mode & kFence) ptx::fence_proxy_async_smem();
    float scale[T / 8][4];
    {
      const float* sc = reinterpret_cast<const float*>(st + L::kScaleOffset);
      const float ws_gate = sc[S], ws_up = sc[S + 1];
#pragma unroll
      for (int j = 0; j < T / 8; ++j) {
        const float2 x2 = *reinterpret_cast<const float2*>(sc + tw + j * 8 + quad * 2);
        scale[j][0] = ws_gate * x2.x;
        scale[j][1] = ws_gate * x2.y;
        scale[j][2] = ws_up * x2.x;
        scale[j][3] = ws_up * x2.y;
      }
    }
    const uint64_t w_desc = ptx::sw128_desc(st + row0 * 128);
    const uint64_t x_desc = ptx::sw128_desc(st + L::kTokenOffset + tw * 128);
    auto issue = [&](int g) {
      ptx::wgmma_fence();
#pragma unroll
      for (int t = 0; t < kGroupTiles; ++t)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int m = g * kGroupTiles + t;
          WgmmaFp8<T>::mma(part[g % kDepth][t], ptx::desc_plus(w_desc, m * 64 * 128 + k * 32),
                           ptx::desc_plus(x_desc, k * 32), k);
        }
      ptx::wgmma_commit();
    };
    {
#pragma unroll
      for (int g = 0; g < kDepth - 1; ++g) issue(g);
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        if (g + kDepth - 1 < kGroups) issue(g + kDepth - 1);
        ptx::wgmma_wait_at_most(kDepth - 1 < kGroups - 1 - g ? kDepth - 1 : kGroups - 1 - g);
#pragma unroll
        for (int t = 0; t < kGroupTiles; ++t) {
          ptx::fence_operands(part[g % kDepth][t]);
          if (mode & kPromote) {
            float(&into)[kRegs] = acc[g * kGroupTiles + t];
#pragma unroll
            for (int j = 0; j < T / 8; ++j)
#pragma unroll
              for (int h = 0; h < 4; ++h) {
                into[4 * j + h] += part[g % kDepth][t][4 * j + h] * scale[j][h];
              }
          }
        }
      }
    }
    if (kPairs) {
      __syncwarp();
      if (tid % 32 == 0) {
        for (uint32_t r = 0; r < 2; ++r) {
          // Default semantics (release, CTA scope), as CUTLASS's ClusterBarrier::arrive: with
          // .release.cluster each arrival was a cluster-wide fence, ~400 clocks per stage.
          asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(
                           ptx::cluster_addr(&empty[s], r))
                       : "memory");
        }
      }
    } else {
      ptx::mbar_arrive(&empty[s]);
    }
  }
  const long long t = (clock64() - t0) / kTotal;
  float sum = 0.0f;
#pragma unroll
  for (int m = 0; m < kTiles; ++m)
#pragma unroll
    for (int r = 0; r < kRegs; ++r) sum += acc[m][r] + part[m % kDepth][0][r];
  if (sum == 1.2345f) sink[tid] = sum;  // keeps the accumulators live
  if (ctid == 0) clocks[blockIdx.x] = t;
}

template <int T, int kGroupTiles, int kDepth, bool kRows, bool kPairs = false>
int run(const char* name, int mode, const uint8_t* window, const uint8_t* x, const float* xs,
        long long* d_clocks, float* sink, int sms, double base_clocks, double* out_clocks) {
  const int bytes = kStages * Layout<kRows ? T : 2 * T>::kStageBytes + 2 * kStages * 8;
  auto kernel = up_stages<T, kGroupTiles, kDepth, kRows, kPairs>;
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  std::vector<long long> h(sms);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(sms / 2 * 2);
  cfg.blockDim = dim3(384);
  cfg.dynamicSmemBytes = bytes;
  cudaLaunchAttribute cluster = {};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = kPairs ? 2 : 1;
  cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
  cfg.attrs = &cluster;
  cfg.numAttrs = 1;
  sms = sms / 2 * 2;
  for (int rep = 0; rep < 2; ++rep) {  // the first launch warms up
    CK(cudaLaunchKernelEx(&cfg, kernel, mode, window, x, xs, d_clocks, sink));
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
  }
  CK(cudaMemcpy(h.data(), d_clocks, sms * sizeof(long long), cudaMemcpyDeviceToHost));
  std::sort(h.begin(), h.end());
  const double med = double(h[sms / 2]);
  if (out_clocks) *out_clocks = med;
  const int tokens = kRows ? T : 2 * T;
  printf("%3d tokens, %-6s%-6s (m64n%-3d, groups of %d tiles, %d in flight)  %-31s clocks per "
         "stage: median %5.0f  max %5lld  per token %5.2f",
         tokens, kRows ? "rows" : "halves", kPairs ? " pairs" : "", T, kGroupTiles, kDepth, name,
         med, h[sms - 1], med / tokens);
  if (base_clocks > 0) printf("  wgmma only / this %.2f", base_clocks / med);
  printf("\n");
  return 0;
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  uint8_t *window = nullptr, *x = nullptr;
  float *xs = nullptr, *sink = nullptr;
  long long* d_clocks = nullptr;
  CK(cudaMalloc(&window, size_t(kWindowTiles) * kWeightBytes));
  CK(cudaMalloc(&x, size_t(kXRows) * kK));
  CK(cudaMalloc(&xs, size_t(kXRows) * (kK / 128) * 4));
  CK(cudaMalloc(&sink, 384 * 4));
  CK(cudaMalloc(&d_clocks, sms * sizeof(long long)));
  CK(cudaMemset(window, 0x30, size_t(kWindowTiles) * kWeightBytes));
  CK(cudaMemset(x, 0x30, size_t(kXRows) * kK));
  CK(cudaMemset(xs, 0x30, size_t(kXRows) * (kK / 128) * 4));
  struct Mode {
    const char* name;
    int bits;
  };
  const Mode modes[] = {
      {"wgmma only", 0},
      {"+ promote", kPromote},
      {"+ fence", kFence},
      {"+ promote + fence", kPromote | kFence},
      {"+ weights (L2)", kWeights},
      {"+ weights + tokens (L2)", kWeights | kTokens},
      {"+ weights + tokens + fence", kWeights | kTokens | kFence},
      {"all (the kernel's up stage)", kWeights | kTokens | kFence | kPromote},
      {"all, rows without L2::256B", kWeights | kTokens | kFence | kPromote | kNoHint},
      {"all, rows by bulk copies", kWeights | kTokens | kFence | kPromote | kBulkRows},
      {"all, bulk rows, no fence", kWeights | kTokens | kPromote | kBulkRows},
  };
  double base = 0;
  for (const Mode& m : modes) {
    if (run<40, 1, 2, false>(m.name, m.bits, window, x, xs, d_clocks, sink, sms, base,
                             m.bits ? nullptr : &base)) {
      return 1;
    }
  }
#define ROW(T, GT, D, ROWS, PAIRS, ...)                                                       \
  for (const Mode& m : {__VA_ARGS__}) {                                                       \
    if (run<T, GT, D, ROWS, PAIRS>(m.name, m.bits, window, x, xs, d_clocks, sink, sms, 0,     \
                                   nullptr)) {                                                \
      return 1;                                                                               \
    }                                                                                         \
  }
  // Token halves of 80 tokens (blocks of 72-80 at large M): the kernel's groups of one tile, two
  // in flight, against groups of two and four tiles and a third group in flight.
  ROW(40, 2, 1, false, false, modes[0], modes[7])
  ROW(40, 2, 2, false, false, modes[0], modes[7])
  ROW(40, 4, 1, false, false, modes[0], modes[7])
  ROW(40, 1, 3, false, false, modes[0], modes[7])
  // The same blocks with the warpgroups sharing the tokens and splitting the rows (m64n72/80).
  // Two groups in flight do not fit beside 72-80 tokens' accumulators: ptxas serializes them.
  ROW(72, 1, 1, true, false, modes[0], modes[7])
  ROW(80, 1, 1, true, false, modes[0], modes[3], modes[5], modes[7], modes[8], modes[9])
  // Blocks of 64 as the kernel runs them (rows), and as token halves.
  ROW(64, 1, 2, true, false, modes[0], modes[7])
  ROW(32, 1, 2, false, false, modes[0], modes[7])
  // Multicast pairs (weights read once from L2 for two CTAs).
  ROW(40, 1, 2, false, true, modes[0], modes[5], modes[7])
  ROW(80, 1, 1, true, true, modes[0], modes[5], modes[7])
  printf("tensor work per stage: tokens x 256 rows x 128 of K (80 tokens: %d MAC)\n",
         80 * 256 * 128);
  return 0;
}
