// prologue.cu: the exported single-launch prologue (routing + moe_align_block_size + FP8
// quantisation with the output zeroed; moe_ops/prologue.cuh). Validates every argument with the
// checks of the three separate entries (moe_ops/validate.cuh), picks the kernel instantiation
// for the method and E, launches on the caller's stream. No allocation, no synchronisation.
#include <cstdint>

#include "moe_ops/prologue.cuh"
#include "moe_ops/validate.cuh"
#include "status.cuh"

static_assert(amoe::ops::kPrologueMaxSlots == AMOE_PROLOGUE_MAX_SLOTS, "one limit");

namespace amoe {
namespace {

using KernelFn = void (*)(ops::PrologueParams);

template <bool kGrouped>
KernelFn prologue_kernel_for(int vpl) {
  switch (vpl) {
    case 1: return ops::moe_prologue_kernel<1, kGrouped>;
    case 2: return ops::moe_prologue_kernel<2, kGrouped>;
    case 4: return ops::moe_prologue_kernel<4, kGrouped>;
    case 8: return ops::moe_prologue_kernel<8, kGrouped>;
    case 16: return ops::moe_prologue_kernel<16, kGrouped>;
    default: return nullptr;
  }
}

}  // namespace
}  // namespace amoe

extern "C" {

int amoe_moe_prologue(int32_t method, const float* logits, const float* bias, int32_t M,
                      int32_t num_experts, int32_t n_group, int32_t topk_group, int32_t top_k,
                      int32_t renormalize, float weight_scale, int32_t shared_expert_id,
                      float shared_weight, int32_t* topk_ids, float* topk_weights,
                      int32_t align_experts, int32_t block_m, int32_t* sorted_token_ids,
                      int32_t sorted_len, int32_t* expert_ids, int32_t num_blocks,
                      int32_t* num_tokens_post_padded, const void* x, int32_t K, void* q,
                      float* scale, void* zero_out, void* stream) {
  using namespace amoe;
  const char* what = "amoe_moe_prologue";
  if (method != AMOE_ROUTING_SOFTMAX && method != AMOE_ROUTING_GROUPED_SIGMOID) {
    return fail(AMOE_ERR_INVALID_ARGUMENT,
                "%s: method must be AMOE_ROUTING_SOFTMAX (0) or AMOE_ROUTING_GROUPED_SIGMOID (1), "
                "got %d",
                what, method);
  }
  const bool grouped = method == AMOE_ROUTING_GROUPED_SIGMOID;
  AMOE_TRY(ops::check_routing_common(what, logits, M, num_experts, top_k, weight_scale,
                                     shared_expert_id, shared_weight, topk_ids, topk_weights));
  if (grouped) {
    AMOE_TRY(ops::check_routing_grouped(what, bias, num_experts, n_group, topk_group, top_k));
  } else {
    AMOE_REQUIRE(bias == nullptr, "%s: a correction bias applies to grouped routing only", what);
  }
  const int width = top_k + (shared_expert_id >= 0 ? 1 : 0);
  const int64_t slots = static_cast<int64_t>(M) * width;
  if (slots > ops::kPrologueMaxSlots) {
    return fail(AMOE_ERR_UNSUPPORTED,
                "%s: %lld slots (M %d x %d per token) are more than the prologue's %d: use the "
                "separate routing, alignment and quantisation entries",
                what, static_cast<long long>(slots), M, width, ops::kPrologueMaxSlots);
  }
  const int num_slots = static_cast<int>(slots);
  AMOE_TRY(ops::check_align_sizes(what, num_slots, align_experts));
  AMOE_TRY(ops::check_align_outputs(what, topk_ids, num_slots, align_experts, block_m,
                                    sorted_token_ids, sorted_len, expert_ids, num_blocks,
                                    num_tokens_post_padded));
  AMOE_TRY(ops::check_quant(what, x, M, K, q, scale, zero_out));
  AMOE_TRY(select_device());

  ops::PrologueParams p{};
  p.route.logits = logits;
  p.route.bias = grouped ? bias : nullptr;
  p.route.M = M;
  p.route.E = num_experts;
  p.route.top_k = top_k;
  p.route.n_group = grouped ? n_group : 1;
  p.route.topk_group = grouped ? topk_group : 1;
  p.route.renormalize = renormalize != 0;
  p.route.weight_scale = weight_scale;
  p.route.shared_expert_id = shared_expert_id;
  p.route.shared_weight = shared_weight;
  p.route.topk_ids = topk_ids;
  p.route.topk_weights = topk_weights;
  p.align.topk_ids = topk_ids;
  p.align.num_slots = num_slots;
  p.align.E = align_experts;
  p.align.block_m = block_m;
  p.align.sorted = sorted_token_ids;
  p.align.sorted_len = sorted_len;
  p.align.expert_ids = expert_ids;
  p.align.num_blocks = num_blocks;
  p.align.ntpp = num_tokens_post_padded;
  p.x = static_cast<const __nv_bfloat16*>(x);
  p.q = static_cast<uint8_t*>(q);
  p.scale = scale;
  p.zero_out = static_cast<__nv_bfloat16*>(zero_out);
  p.groups = static_cast<int64_t>(M) * (K / ops::kQuantGroup);

  const int vpl = ops::routing_slots_per_lane(num_experts);
  const KernelFn kernel =
      grouped ? prologue_kernel_for<true>(vpl) : prologue_kernel_for<false>(vpl);
  const int64_t quant_blocks = (p.groups + ops::kPrologueWarps - 1) / ops::kPrologueWarps;
  const size_t smem = ops::prologue_smem_bytes(grouped, vpl, align_experts);
  kernel<<<static_cast<unsigned>(1 + quant_blocks), ops::kPrologueThreads, smem,
           static_cast<cudaStream_t>(stream)>>>(p);
  return check_cuda(cudaGetLastError(), "moe_prologue_kernel launch");
}

}  // extern "C"
