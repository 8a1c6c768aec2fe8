// fused_moe.cu: the exported fused-MoE entries. Validates every argument, maps the runtime
// config onto a compiled variant, builds (and caches) the TMA tensor maps, launches.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

#include "fused_moe/launch.cuh"

namespace amoe {
namespace {

constexpr int kMaxStages = 8;
constexpr int kMaxSplit = 16;  // CTAs per cluster: the largest non-portable cluster on Hopper

struct Config {
  int block_m, block_n, warp_n, stages, split, all_slices, split_n;
  int tail_split = 1;  // CTAs per unit of the tail launch (1: no tail launch)
  int cluster() const { return split_n == 2 ? 2 : split; }  // CTAs per unit
};

// The (block_n, warp_n) pairs of the seed's search space: both cover a 256-row slice.
int consumer_wgs_for(int block_n, int warp_n) {
  if (block_n == 64 && warp_n == 4) return 1;
  if (block_n == 32 && warp_n == 8) return 2;
  return 0;
}

// Largest sub-tile (tokens per wgmma) whose accumulators fit the consumer registers.
int max_tokens(int wgs) { return wgs == 1 ? 32 : 64; }

const FusedMoeVariant* find_tokens(const FusedMoeVariant* table, int count, int tokens) {
  for (int i = 0; i < count; ++i) {
    if (table[i].tokens == tokens) return &table[i];
  }
  return nullptr;
}

const FusedMoeVariant* find_variant(int tokens, int wgs, bool split_n) {
  if (split_n) return find_tokens(kVariantsSplitN, kVariantsSplitNCount, tokens);
  return wgs == 1 ? find_tokens(kVariantsWg1, kVariantsWg1Count, tokens)
                  : find_tokens(kVariantsWg2, kVariantsWg2Count, tokens);
}

// Token halves: blocks of 72 or 80 tokens on two consumer warpgroups (bench/NOTES.md, item 45).
bool token_halves(const Config& c) {
  return consumer_wgs_for(c.block_n, c.warp_n) == 2 && c.block_m > 64 &&
         c.block_m <= kVariantHalves.tokens;
}

// Chooses the variant for a config on `device`: the fewest token sub-tiles (the
// largest T) whose accumulators fit the registers and whose shared memory fits the device,
// so that every config of the seed's search space runs. *smem receives its size.
int resolve_config(const Config& c, int N, int device, const FusedMoeVariant** variant,
                   int* smem) {
  const int slices = N / kSliceRows;
  if (c.block_m < 8 || c.block_m > 128 || c.block_m % 8 != 0) {
    return fail(AMOE_ERR_UNSUPPORTED,
                "block_m %d is not supported: valid values are 8..128 in steps of 8", c.block_m);
  }
  const int wgs = consumer_wgs_for(c.block_n, c.warp_n);
  if (wgs == 0) {
    return fail(AMOE_ERR_UNSUPPORTED,
                "(block_n, warp_n) = (%d, %d) is not supported: valid pairs are (64, 4) and (32, 8)",
                c.block_n, c.warp_n);
  }
  if (c.stages < 1 || c.stages > kMaxStages) {
    return fail(AMOE_ERR_UNSUPPORTED, "stages %d is not supported: valid values are 1..%d",
                c.stages, kMaxStages);
  }
  if (c.split < 1 || c.split > kMaxSplit) {
    return fail(AMOE_ERR_UNSUPPORTED, "split %d is not supported: valid values are 1..%d",
                c.split, kMaxSplit);
  }
  if (c.all_slices != 0 && c.all_slices != 1) {
    return fail(AMOE_ERR_UNSUPPORTED, "all_slices must be 0 or 1, got %d", c.all_slices);
  }
  const bool split_n = c.split_n == 2;
  if (c.split_n != 1 && !split_n) {
    return fail(AMOE_ERR_UNSUPPORTED, "split_n must be 1 or 2, got %d", c.split_n);
  }
  if (split_n && (wgs != 2 || c.split != 1 || c.all_slices)) {
    return fail(AMOE_ERR_UNSUPPORTED,
                "split_n 2 needs (block_n, warp_n) = (32, 8), split 1 and all_slices 0, got (%d, "
                "%d), split %d, all_slices %d",
                c.block_n, c.warp_n, c.split, c.all_slices);
  }
  int optin = 0;
  AMOE_TRY(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device, &optin));
  const bool halves = c.split == 1 && token_halves(c);
  // One CTA per token block for every N slice (bench/NOTES.md, items 47 and 111): on token halves
  // (blocks of 72 or 80), or on one sub-tile of up to 64 tokens that both warpgroups share (the
  // amax buffers alternate per slice, so a block is one sub-tile). With one slice it is the
  // one-slice kernel.
  if (c.all_slices) {
    const int tokens = round_up(c.block_m, 8);
    if (halves) {
      *variant = slices > 1 ? &kVariantHalvesAllSlices : &kVariantHalves;
    } else if (wgs == 2 && c.split == 1 && tokens <= max_tokens(2)) {
      *variant = slices > 1 ? find_tokens(kVariantsAllSlices, kVariantsAllSlicesCount, tokens)
                            : find_variant(tokens, 2, false);
    } else {
      return fail(AMOE_ERR_UNSUPPORTED,
                  "all_slices needs (block_n, warp_n) = (32, 8), split 1 and block_m at most 64 "
                  "or 72-80, got block_m %d, (%d, %d), split %d",
                  c.block_m, c.block_n, c.warp_n, c.split);
    }
    if (*variant == nullptr) {
      return fail(AMOE_ERR_UNSUPPORTED, "no compiled all-slices variant for %d tokens", tokens);
    }
    *smem = (*variant)->smem_bytes(c.stages, c.block_m, c.split, slices);
    if (*smem <= optin) return AMOE_OK;
    return fail(AMOE_ERR_UNSUPPORTED,
                "config (block_m %d, stages %d, all_slices) needs %d bytes of shared memory for "
                "%d N slices; this device allows %d per block: use fewer stages",
                c.block_m, c.stages, *smem, slices, optin);
  }
  // Blocks of 72 or 80 tokens: one sub-tile (each warpgroup on its own half of the tokens)
  // reads every weight tile once, where two sub-tiles read it twice (bench/NOTES.md, item 45).
  if (halves) {
    *variant = split_n ? &kVariantHalvesSplitN : &kVariantHalves;
    *smem = (*variant)->smem_bytes(c.stages, c.block_m, c.split, slices);
    if (*smem <= optin) return AMOE_OK;
  }
  int smallest = 0;
  for (int subtiles = (c.block_m + max_tokens(wgs) - 1) / max_tokens(wgs);; ++subtiles) {
    const int tokens = round_up((c.block_m + subtiles - 1) / subtiles, 8);
    *variant = find_variant(tokens, wgs, split_n);
    if (*variant == nullptr) {
      return fail(AMOE_ERR_UNSUPPORTED, "no compiled variant for %d tokens x %d warpgroups",
                  tokens, wgs);
    }
    *smem = (*variant)->smem_bytes(c.stages, c.block_m, c.split, slices);
    if (*smem <= optin) return AMOE_OK;
    smallest = *smem;
    if (tokens == 8) break;
  }
  return fail(AMOE_ERR_UNSUPPORTED,
              "config (block_m %d, block_n %d, warp_n %d, stages %d, split %d) needs at least %d "
              "bytes of shared memory; this device allows %d per block: use fewer stages",
              c.block_m, c.block_n, c.warp_n, c.stages, c.split, smallest, optin);
}

// How many clusters of a config's CTAs run at once, queried once per (device, variant, size).
int resident_clusters(int device, const FusedMoeVariant* variant, int smem, int cluster,
                      int* count) {
  struct Entry {
    int device;
    const FusedMoeVariant* variant;
    int smem, cluster, count;
  };
  static std::mutex mutex;
  static Entry entries[64];
  static int used = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (int i = 0; i < used; ++i) {
      const Entry& e = entries[i];
      if (e.device == device && e.variant == variant && e.smem == smem && e.cluster == cluster) {
        *count = e.count;
        return AMOE_OK;
      }
    }
  }
  AMOE_TRY(variant->max_clusters(device, smem, cluster, count));
  std::lock_guard<std::mutex> lock(mutex);
  entries[used < 64 ? used++ : device % 64] = Entry{device, variant, smem, cluster, *count};
  return AMOE_OK;
}

// A split config also needs the device to fit one cluster of `split` such CTAs.
int check_clusters(const Config& c, int device, const FusedMoeVariant* variant, int smem) {
  if (c.cluster() == 1) return AMOE_OK;
  int clusters = 0;  // cached: resolve_tail checks the tail config on every launch
  AMOE_TRY(resident_clusters(device, variant, smem, c.cluster(), &clusters));
  if (clusters == 0) {
    return fail(AMOE_ERR_UNSUPPORTED,
                "this device cannot run a cluster of %d CTAs of %d bytes of shared memory each "
                "(split %d, split_n %d); use a smaller split",
                c.cluster(), smem, c.split, c.split_n);
  }
  return AMOE_OK;
}

// Tail units (bench/NOTES.md, item 57): the units past the last full wave of a launch run
// alone while most SMs idle. With tail_split > 1 they run in a launch of their own, after the
// main one, as clusters that share each unit: split units (K) for blocks of up to 64 tokens,
// N halves for the token-halves blocks (72, 80), whose partial sums would not fit. Its ring
// has as many stages as fit, up to the main config's.
int resolve_tail(const Config& c, int N, int device, Config* tail,
                 const FusedMoeVariant** variant, int* smem) {
  if (c.tail_split < 1 || c.tail_split > kMaxSplit) {
    return fail(AMOE_ERR_UNSUPPORTED, "tail_split %d is not supported: valid values are 1..%d",
                c.tail_split, kMaxSplit);
  }
  if (c.split != 1 || c.split_n != 1 || c.all_slices) {
    return fail(AMOE_ERR_UNSUPPORTED,
                "tail_split needs split 1, split_n 1 and all_slices 0, got split %d, split_n %d, "
                "all_slices %d",
                c.split, c.split_n, c.all_slices);
  }
  const bool halves = token_halves(c);
  if (halves && c.tail_split != 2) {
    return fail(AMOE_ERR_UNSUPPORTED,
                "block_m %d runs its tail units as N halves: tail_split must be 2, got %d",
                c.block_m, c.tail_split);
  }
  *tail = c;
  tail->split = halves ? 1 : c.tail_split;
  tail->split_n = halves ? 2 : 1;
  tail->tail_split = 1;
  for (tail->stages = c.stages;; --tail->stages) {
    const int status = resolve_config(*tail, N, device, variant, smem);
    if (status == AMOE_OK) return check_clusters(*tail, device, *variant, *smem);
    if (tail->stages == 1) return status;
  }
}

// ---- TMA tensor maps, encoded through the driver entry point (no link against libcuda) ----

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult query;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &query) != cudaSuccess ||
        query != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return PFN_cuTensorMapEncodeTiled_v12000(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// A weight tensor read in 32 KiB tiles (256 rows of 128 bytes; N halves' up tiles: 128 rows)
// with the 128-byte swizzle the wgmma descriptors expect, as a 5-dim map with a box of (128
// bytes, box_rows, 1, 1, 1); the kernel's coordinates are (0, c1, c2, slice, expert)
// (issue_weight_tile).
struct MapKey {
  int64_t device;  // 64-bit so the key has no padding bytes (compared with memcmp)
  const void* base;
  uint64_t dims[5];
  uint64_t strides[4];  // bytes, of dims 1..4
  uint64_t promote_l2;  // 1: CU_TENSOR_MAP_L2_PROMOTION_L2_256B, 0: none
  uint64_t box_rows;
  bool operator==(const MapKey& o) const { return std::memcmp(this, &o, sizeof o) == 0; }
};

constexpr uint64_t kTileBytes = uint64_t(kSliceRows) * kKBlock;

// Up tiles, (K block, slice, expert): row-major [E, N, K] (rows K bytes apart) or stored tiles.
MapKey w_key(int64_t device, const void* w, int K, int N, int E, bool tiled, bool promote,
             int box_rows) {
  const uint64_t kblocks = K / kKBlock, slices = N / kSliceRows;
  const uint64_t dims[5] = {kKBlock, kSliceRows, kblocks, slices, uint64_t(E)};
  if (!tiled) {
    return MapKey{device, w, {dims[0], dims[1], dims[2], dims[3], dims[4]},
                  {uint64_t(K), kKBlock, kSliceRows * uint64_t(K), uint64_t(N) * K}, promote,
                  uint64_t(box_rows)};
  }
  return MapKey{device, w, {dims[0], dims[1], dims[2], dims[3], dims[4]},
                {kKBlock, kTileBytes, kTileBytes * kblocks, uint64_t(N) * K}, promote,
                uint64_t(box_rows)};
}

// Down tiles. Row-major [E, K, N/2]: (row, 1, slice, expert), all K rows in dim 1, so that the
// last tile's rows past K (K % 256 == 128) read as zeros. Stored tiles: (tile, slice, expert).
MapKey w2_key(int64_t device, const void* w2, int K, int N, int E, bool tiled, bool promote) {
  const uint64_t slices = N / kSliceRows, tiles = (K + kSliceRows - 1) / kSliceRows;
  const uint64_t row = N / 2;
  if (!tiled) {
    return MapKey{device, w2, {kKBlock, uint64_t(K), 1, slices, uint64_t(E)},
                  {row, row * K, kKBlock, row * K}, promote, kSliceRows};
  }
  return MapKey{device, w2, {kKBlock, kSliceRows, tiles, slices, uint64_t(E)},
                {kKBlock, kTileBytes, kTileBytes * tiles, kTileBytes * tiles * slices}, promote,
                kSliceRows};
}

struct MapCache {
  static constexpr int kSlots = 64;
  std::mutex mutex;
  MapKey keys[kSlots];
  CUtensorMap maps[kSlots];
  int used = 0, next = 0;
};

int tensor_map(const MapKey& key, CUtensorMap* out) {
  static MapCache cache;
  std::lock_guard<std::mutex> lock(cache.mutex);
  for (int i = 0; i < cache.used; ++i) {
    if (cache.keys[i] == key) {
      *out = cache.maps[i];
      return AMOE_OK;
    }
  }
  auto encode = encode_fn();
  if (encode == nullptr) {
    return fail(AMOE_ERR_CUDA, "cuTensorMapEncodeTiled is unavailable: the driver is too old");
  }
  cuuint64_t dims[5], strides[4];
  cuuint32_t box[5] = {kKBlock, cuuint32_t(key.box_rows), 1, 1, 1};
  cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  for (int d = 0; d < 5; ++d) dims[d] = key.dims[d];
  for (int d = 0; d < 4; ++d) strides[d] = key.strides[d];
  CUtensorMap map;
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 5,
                            const_cast<void*>(key.base), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B,
                            key.promote_l2 ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B
                                           : CU_TENSOR_MAP_L2_PROMOTION_NONE,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return fail(AMOE_ERR_CUDA,
                "cuTensorMapEncodeTiled failed (CUresult %d) for a weight tensor viewed as [%llu, "
                "%llu, %llu, %llu, %llu]",
                int(r), (unsigned long long)key.dims[0],
                (unsigned long long)key.dims[1], (unsigned long long)key.dims[2],
                (unsigned long long)key.dims[3], (unsigned long long)key.dims[4]);
  }
  const int slot = cache.used < MapCache::kSlots ? cache.used++ : cache.next++ % MapCache::kSlots;
  cache.keys[slot] = key;
  cache.maps[slot] = map;
  *out = map;
  return AMOE_OK;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace
}  // namespace amoe

extern "C" {

int amoe_fused_moe_check_config(int32_t K, int32_t N, int32_t block_m, int32_t block_n,
                                int32_t warp_n, int32_t stages, int32_t split,
                                int32_t all_slices, int32_t split_n, int32_t tail_split) {
  using namespace amoe;
  AMOE_REQUIRE(K > 0 && K % 128 == 0, "K must be a positive multiple of 128, got %d", K);
  AMOE_REQUIRE(N > 0 && N % 256 == 0, "N must be a positive multiple of 256, got %d", N);
  const Config c{block_m, block_n, warp_n, stages, split, all_slices, split_n, tail_split};
  const FusedMoeVariant* variant = nullptr;
  int smem = 0, device = 0;
  AMOE_TRY(select_device(&device));
  AMOE_TRY(resolve_config(c, N, device, &variant, &smem));
  AMOE_TRY(check_clusters(c, device, variant, smem));
  if (c.tail_split == 1) return AMOE_OK;
  Config tail;
  return resolve_tail(c, N, device, &tail, &variant, &smem);
}

int amoe_fused_moe_w8a8_up_down(const void* x, const float* x_scale, const void* w,
                                const float* w_scale, const void* w2, const float* w2_scale,
                                const int32_t* sorted_token_ids, const int32_t* expert_ids,
                                const int32_t* num_tokens_post_padded, const float* topk_weights,
                                void* out, int32_t M, int32_t K, int32_t N, int32_t num_experts,
                                int32_t top_k, int32_t sorted_len, int32_t block_m, int32_t block_n,
                                int32_t warp_n, int32_t stages, int32_t split,
                                int32_t all_slices, int32_t split_n, int32_t tail_split,
                                int32_t weight_layout, float scaling_factor, void* stream) {
  using namespace amoe;
  AMOE_REQUIRE(x && x_scale && w && w_scale && w2 && w2_scale && sorted_token_ids && expert_ids &&
                   num_tokens_post_padded && topk_weights && out,
               "a required device pointer is null");
  AMOE_REQUIRE(M >= 0, "M must be >= 0, got %d", M);
  AMOE_REQUIRE(K > 0 && K % 128 == 0, "K must be a positive multiple of 128, got %d", K);
  AMOE_REQUIRE(N > 0 && N % 256 == 0, "N must be a positive multiple of 256, got %d", N);
  AMOE_REQUIRE(num_experts > 0, "num_experts must be > 0, got %d", num_experts);
  AMOE_REQUIRE(top_k > 0, "top_k must be > 0, got %d", top_k);
  AMOE_REQUIRE(int64_t(M) * top_k <= INT32_MAX, "M * top_k overflows int32");
  AMOE_REQUIRE(sorted_len >= 0, "sorted_len must be >= 0, got %d", sorted_len);
  AMOE_REQUIRE(std::isfinite(scaling_factor), "scaling_factor must be finite");
  AMOE_REQUIRE(weight_layout == AMOE_WEIGHTS_ROWS || weight_layout == AMOE_WEIGHTS_TILES,
               "weight_layout must be AMOE_WEIGHTS_ROWS (0) or AMOE_WEIGHTS_TILES (1), got %d",
               weight_layout);
  AMOE_REQUIRE(aligned(x, 16) && aligned(w, 16) && aligned(w2, 16),
               "x, w and w2 must be 16-byte aligned (TMA)");
  AMOE_REQUIRE(aligned(out, 16), "out must be 16-byte aligned (vector reductions)");
  AMOE_REQUIRE(aligned(x_scale, 4) && aligned(w_scale, 4) &&
                   aligned(w2_scale, 4) && aligned(topk_weights, 4) &&
                   aligned(sorted_token_ids, 4) && aligned(expert_ids, 4),
               "scale, weight, id and output pointers must be 4-byte aligned");
  const Config c{block_m, block_n, warp_n, stages, split, all_slices, split_n, tail_split};
  const FusedMoeVariant* variant = nullptr;
  int smem = 0, device = 0;
  AMOE_TRY(select_device(&device));
  AMOE_TRY(resolve_config(c, N, device, &variant, &smem));
  Config tail;
  const FusedMoeVariant* tail_variant = nullptr;
  int tail_smem = 0;
  if (c.tail_split > 1) AMOE_TRY(resolve_tail(c, N, device, &tail, &tail_variant, &tail_smem));
  if (M == 0 || sorted_len == 0) return AMOE_OK;

  FusedMoeLaunch l;
  l.device = device;
  const bool tiled = weight_layout == AMOE_WEIGHTS_TILES;
  for (const bool promote : {true, false}) {  // the two versions of WeightMaps
    AMOE_TRY(tensor_map(w_key(device, w, K, N, num_experts, tiled, promote, kSliceRows),
                        promote ? &l.weights.w : &l.weights.w_stream));
    if (variant->split_n || (tail_variant && tail_variant->split_n)) {
      AMOE_TRY(tensor_map(w_key(device, w, K, N, num_experts, tiled, promote, kSliceRows / 2),
                          promote ? &l.weights.w_half : &l.weights.w_half_stream));
    }
    AMOE_TRY(tensor_map(w2_key(device, w2, K, N, num_experts, tiled, promote),
                        promote ? &l.weights.w2 : &l.weights.w2_stream));
  }
  l.params = FusedMoeParams{sorted_token_ids, expert_ids, num_tokens_post_padded,
                            static_cast<const uint8_t*>(x), x_scale,
                            w_scale, w2_scale, topk_weights,
                            static_cast<__nv_bfloat16*>(out), M, K, N, top_k, block_m, stages,
                            c.cluster(), tiled ? 1 : 0, sorted_len, scaling_factor,
                            kWholeLaunch, 0, 0, 0};
  // An output larger than the L2 cannot stay there between a row's top_k additions: its
  // reductions go evict-first (bench/NOTES.md, items 96-97).
  int l2_bytes = 0;
  AMOE_TRY(device_attribute<cudaDevAttrL2CacheSize>(device, &l2_bytes));
  l.params.out_streamed = int64_t(M) * K * 2 > l2_bytes ? 1 : 0;
  // moe_align_block_size pads each expert's run of slots to a multiple of block_m, so at most
  // floor(slots / block_m) + min(E, slots) blocks hold tokens; the rest of sorted_len is
  // padding whose CTAs would only start and exit (at M=1 on E=257, 217 of 226 blocks: 13 waves
  // of empty CTAs, most of the kernel's time).
  const int64_t slots = int64_t(M) * top_k;
  const int64_t blocks = std::min<int64_t>((int64_t(sorted_len) + block_m - 1) / block_m,
                                           slots / block_m + std::min<int64_t>(num_experts, slots));
  const int slices = N / kSliceRows;
  int64_t ctas = blocks * (variant->all_slices ? 1 : slices) * c.cluster();
  if (variant->all_slices && slices > 1) {
    // The blocks past the last full wave run one CTA per slice (kernel.cuh): at most
    // wave / slices of them, each `slices - 1` CTAs more than as one all-slices unit.
    int wave = 0;
    AMOE_TRY(resident_clusters(device, variant, smem, 1, &wave));
    AMOE_REQUIRE(wave > 0, "the device runs no CTA of this config");
    l.params.tail_wave = wave;
    if (blocks > wave) ctas += int64_t(wave / slices) * (slices - 1);
  }
  AMOE_REQUIRE(ctas <= INT32_MAX, "too many token blocks x N slices x split for one launch");
  l.grid = dim3(unsigned(ctas), 1, 1);
  l.stream = static_cast<cudaStream_t>(stream);
  l.dependent = true;  // overlaps the prologue or the quantiser (griddep.cuh)
  if (c.tail_split == 1) return variant->launch(l, smem);

  // Tail units: which units they are depends on the routing, so both launches work it out on
  // the device (tail_units) from the units per wave of the main launch and the tail clusters
  // that fit at once. The tail launch comes second, as a programmatic dependent: its CTAs take
  // SMs as the main launch's last wave frees them, and its first CTA waits for the main launch
  // before it exits, so that the pair completes in stream order.
  int wave = 0, room = 0;
  AMOE_TRY(resident_clusters(device, variant, smem, 1, &wave));
  AMOE_TRY(resident_clusters(device, tail_variant, tail_smem, tail.cluster(), &room));
  AMOE_REQUIRE(wave > 0 && room > 0, "the device runs no CTA of this config");
  FusedMoeLaunch t = l;
  t.params.stages = tail.stages;
  t.params.split = tail.cluster();
  t.params.tail_part = kTailUnits;
  t.params.tail_wave = wave;
  t.params.tail_room = room;
  t.grid = dim3(unsigned(std::min<int64_t>(room, wave - 1) * tail.cluster()), 1, 1);
  t.dependent = true;
  l.params.tail_part = kMainUnits;
  l.params.tail_wave = wave;
  l.params.tail_room = room;
  AMOE_TRY(variant->launch(l, smem));
  return tail_variant->launch(t, tail_smem);
}

}  // extern "C"
