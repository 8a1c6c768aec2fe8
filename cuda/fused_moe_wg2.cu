// Instantiations with two consumer warpgroups ((block_n, warp_n) = (32, 8)): 2 m64 tiles of
// accumulators per thread, so up to 64 tokens fit per sub-tile without spills (ptxas -v).
#include "fused_moe/launch.cuh"

namespace amoe {
#define AMOE_WG2(T) AMOE_FUSED_MOE_VARIANT(T, 2),
const FusedMoeVariant kVariantsWg2[] = {AMOE_TWO_WG_SUB_TILES(AMOE_WG2)};
const int kVariantsWg2Count = sizeof(kVariantsWg2) / sizeof(kVariantsWg2[0]);
// Each consumer warpgroup on its own 40 tokens of a sub-tile of 80 against all 256 rows: 4 m64
// tiles of accumulators and two groups of partial sums in flight fit without spills at 40, not
// at 48 (88 bytes of spills; 96-token blocks gained 0-4 % more at M = 8192 only).
const FusedMoeVariant kVariantHalves = AMOE_FUSED_MOE_HALVES_VARIANT(40, 2, false);
const FusedMoeVariant kVariantHalvesAllSlices = AMOE_FUSED_MOE_HALVES_VARIANT(40, 2, true);
// One CTA for every N slice of a block of up to 64 tokens (one sub-tile, the warpgroups sharing
// its tokens): each slot's output row is added once, not once per slice (bench/NOTES.md, item
// 111).
#define AMOE_ALL_SLICES(T) AMOE_FUSED_MOE_VARIANT_OF(T, T, 2, false, true, false),
const FusedMoeVariant kVariantsAllSlices[] = {AMOE_TWO_WG_SUB_TILES(AMOE_ALL_SLICES)};
const int kVariantsAllSlicesCount = sizeof(kVariantsAllSlices) / sizeof(kVariantsAllSlices[0]);
}  // namespace amoe
