// weights.cu: load-time weight preparation on the GPU. Row-major expert weights become the
// fused kernel's stored tiles (AMOE_WEIGHTS_TILES), with the up projection's gate/up rows
// interleaved on the way when they come as a checkpoint's two halves. On the host the same
// permutation ran at under 1 GB/s in TypeScript (src/tiles.ts), about a minute for a
// DeepSeek-V3 shard; here it is one pass over the bytes.
#include <algorithm>
#include <cstdint>

#include "status.cuh"

namespace amoe {
namespace weights {

constexpr int kTileRows = 256;
constexpr int kTileBytes = 128;
constexpr int kChunksPerRow = kTileBytes / 16;
constexpr int64_t kChunksPerTile = int64_t(kTileRows) * kChunksPerRow;  // 16-byte chunks
constexpr int kGateUpChunkRows = 8;  // the interleave the kernel's SwiGLU pairing expects
constexpr int kThreads = 256;

// Row of the interleaved [N, K] up weights taken from the checkpoint's row order (N/2 gate
// rows, then N/2 up rows): chunks of 8 rows alternate gate, up (as src/interleave.ts).
__device__ __forceinline__ int gate_up_source_row(int n, int N) {
  const int chunk = n / kGateUpChunkRows;
  const int base = (chunk / 2) * kGateUpChunkRows + n % kGateUpChunkRows;
  return chunk % 2 == 0 ? base : N / 2 + base;
}

// One thread per 16-byte chunk of the destination, which is written in order. Up: a tile
// (s, kb) of expert e holds rows 256 s.. and bytes 128 kb.. of its [N, K] (tiles kb-minor).
// Down: a tile (s, t) holds rows 256 t.. of its [K, N/2] and bytes 128 s.. (tiles t-minor),
// rows past K zero.
__global__ void __launch_bounds__(kThreads)
    tile_weights_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t chunks,
                        int rows, int cols, int row_tiles, int col_tiles, bool down,
                        bool gate_up_halves) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks; i += stride) {
    const int64_t tile = i / kChunksPerTile;
    const int in_tile = int(i % kChunksPerTile);
    const int per_expert = row_tiles * col_tiles;
    const int64_t e = tile / per_expert;
    const int t = int(tile % per_expert);
    const int row_tile = down ? t % row_tiles : t / col_tiles;
    const int col_tile = down ? t / row_tiles : t % col_tiles;
    int row = row_tile * kTileRows + in_tile / kChunksPerRow;
    const int col = col_tile * kTileBytes + (in_tile % kChunksPerRow) * 16;
    if (row >= rows) {
      dst[i] = make_uint4(0, 0, 0, 0);
      continue;
    }
    if (gate_up_halves) row = gate_up_source_row(row, rows);
    dst[i] = src[((e * rows + row) * cols + col) / 16];
  }
}

int check_shape(const char* what, int32_t N, int32_t K) {
  AMOE_REQUIRE(N > 0 && N % kTileRows == 0, "%s: N (%d) must be a positive multiple of %d", what,
               N, kTileRows);
  AMOE_REQUIRE(K > 0 && K % kTileBytes == 0, "%s: K (%d) must be a positive multiple of %d",
               what, K, kTileBytes);
  return AMOE_OK;
}

int launch(const char* what, const void* src, void* dst, int32_t experts, int32_t rows,
           int32_t cols, int32_t row_tiles, bool down, bool gate_up_halves, void* stream) {
  AMOE_REQUIRE(src != nullptr && dst != nullptr, "%s: src and dst must not be null", what);
  AMOE_REQUIRE(reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dst) % 16 == 0,
               "%s: src and dst must be 16-byte aligned", what);
  AMOE_REQUIRE(experts >= 1, "%s: experts (%d) must be at least 1", what, experts);
  const int64_t src_bytes = int64_t(experts) * rows * cols;
  const int64_t dst_bytes = int64_t(experts) * row_tiles * kTileRows * cols;
  const char* s = static_cast<const char*>(src);
  const char* d = static_cast<const char*>(dst);
  AMOE_REQUIRE(s + src_bytes <= d || d + dst_bytes <= s, "%s: src and dst overlap", what);
  AMOE_TRY(select_device());
  const int64_t chunks = dst_bytes / 16;
  const int64_t blocks = std::min<int64_t>((chunks + kThreads - 1) / kThreads, 65536);
  tile_weights_kernel<<<unsigned(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint4*>(src), static_cast<uint4*>(dst), chunks, rows, cols, row_tiles,
      cols / kTileBytes, down, gate_up_halves);
  return check_cuda(cudaGetLastError(), what);
}

}  // namespace weights
}  // namespace amoe

extern "C" {

int amoe_tile_up_weights(const void* src, void* dst, int32_t experts, int32_t N, int32_t K,
                         int32_t gate_up_halves, void* stream) {
  using namespace amoe::weights;
  const char* what = "amoe_tile_up_weights";
  AMOE_TRY(check_shape(what, N, K));
  return launch(what, src, dst, experts, N, K, N / kTileRows, false, gate_up_halves != 0,
                stream);
}

int amoe_tile_down_weights(const void* src, void* dst, int32_t experts, int32_t N, int32_t K,
                           void* stream) {
  using namespace amoe::weights;
  const char* what = "amoe_tile_down_weights";
  AMOE_TRY(check_shape(what, N, K));
  return launch(what, src, dst, experts, K, N / 2, (K + kTileRows - 1) / kTileRows, true, false,
                stream);
}

}  // extern "C"
