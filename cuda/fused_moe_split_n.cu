// Instantiations for N halves (split_n 2): a cluster of two CTAs per unit, each multiplying
// 128 of its slice's 256 rows in the up projection, with two consumer warpgroups. Per
// sub-tile size, as fused_moe_wg2.cu, and on token halves (blocks of 72-80 tokens).
#include "fused_moe/launch.cuh"

namespace amoe {
#define AMOE_SPLIT_N(T) AMOE_FUSED_MOE_VARIANT_OF(T, T, 2, false, false, true),
const FusedMoeVariant kVariantsSplitN[] = {AMOE_TWO_WG_SUB_TILES(AMOE_SPLIT_N)};
const int kVariantsSplitNCount = sizeof(kVariantsSplitN) / sizeof(kVariantsSplitN[0]);
const FusedMoeVariant kVariantHalvesSplitN = AMOE_FUSED_MOE_VARIANT_OF(80, 40, 2, true, false, true);
}  // namespace amoe
