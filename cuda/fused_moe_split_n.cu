// Instantiations for N halves (split_n 2): a cluster of two CTAs per unit, each multiplying
// 128 of its slice's 256 rows in the up projection, with two consumer warpgroups. Per
// sub-tile size, as fused_moe_wg2.cu, and on token halves (blocks of 72-80 tokens).
#include "fused_moe/launch.cuh"

namespace amoe {
const FusedMoeVariant kVariantsSplitN[] = {
    AMOE_FUSED_MOE_VARIANT_OF(8, 8, 2, false, false, true),
    AMOE_FUSED_MOE_VARIANT_OF(16, 16, 2, false, false, true),
    AMOE_FUSED_MOE_VARIANT_OF(24, 24, 2, false, false, true),
    AMOE_FUSED_MOE_VARIANT_OF(32, 32, 2, false, false, true),
    AMOE_FUSED_MOE_VARIANT_OF(40, 40, 2, false, false, true),
    AMOE_FUSED_MOE_VARIANT_OF(48, 48, 2, false, false, true),
    AMOE_FUSED_MOE_VARIANT_OF(56, 56, 2, false, false, true),
    AMOE_FUSED_MOE_VARIANT_OF(64, 64, 2, false, false, true),
};
const int kVariantsSplitNCount = sizeof(kVariantsSplitN) / sizeof(kVariantsSplitN[0]);
const FusedMoeVariant kVariantHalvesSplitN = AMOE_FUSED_MOE_VARIANT_OF(80, 40, 2, true, false, true);
}  // namespace amoe
