// Instantiations with one consumer warpgroup ((block_n, warp_n) = (64, 4)): each consumer
// thread holds 4 m64 tiles of accumulators, so at most 32 tokens fit per sub-tile without spills
// (ptxas -v; 40 fitted until the split-unit exchange added its registers).
#include "fused_moe/launch.cuh"

namespace amoe {
const FusedMoeVariant kVariantsWg1[] = {
    AMOE_FUSED_MOE_VARIANT(8, 1),  AMOE_FUSED_MOE_VARIANT(16, 1), AMOE_FUSED_MOE_VARIANT(24, 1),
    AMOE_FUSED_MOE_VARIANT(32, 1),
};
const int kVariantsWg1Count = sizeof(kVariantsWg1) / sizeof(kVariantsWg1[0]);
}  // namespace amoe
