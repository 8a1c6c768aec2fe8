// validate.cuh: the argument checks of the routing, alignment and quantisation entries (host
// code), defined once: routing.cu, align.cu and quant.cu use them, and so does the
// single-launch prologue (prologue.cu), which takes the arguments of all three. Each returns
// AMOE_OK or the status of the first failure, with `what` (the entry's name) in the message.
#pragma once

#include <cmath>
#include <cstdint>

#include "../status.cuh"
#include "align.cuh"
#include "quant.cuh"
#include "routing.cuh"

namespace amoe {
namespace ops {

inline bool aligned_to(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Routing (amoe_topk_softmax / amoe_topk_grouped_sigmoid): what both methods share.
inline int check_routing_common(const char* what, const float* logits, int32_t M, int32_t E,
                                int32_t top_k, float weight_scale, int32_t shared_expert_id,
                                float shared_weight, const int32_t* topk_ids,
                                const float* topk_weights) {
  AMOE_REQUIRE(M >= 0, "%s: M must be >= 0, got %d", what, M);
  AMOE_REQUIRE(M == 0 || (logits != nullptr && topk_ids != nullptr && topk_weights != nullptr),
               "%s: logits, topk_ids and topk_weights must not be null", what);
  AMOE_REQUIRE(aligned_to(logits, 4) && aligned_to(topk_ids, 4) && aligned_to(topk_weights, 4),
               "%s: logits, topk_ids and topk_weights must be 4-byte aligned", what);
  if (E < 1 || E > kMaxRoutingExperts) {
    return fail(AMOE_ERR_UNSUPPORTED, "%s: num_experts %d is not supported: valid values are 1..%d",
                what, E, kMaxRoutingExperts);
  }
  if (top_k < 1 || top_k > kMaxTopK) {
    return fail(AMOE_ERR_UNSUPPORTED, "%s: top_k %d is not supported: valid values are 1..%d", what,
                top_k, kMaxTopK);
  }
  AMOE_REQUIRE(top_k <= E, "%s: top_k (%d) is larger than num_experts (%d)", what, top_k, E);
  AMOE_REQUIRE(std::isfinite(weight_scale), "%s: weight_scale must be finite", what);
  AMOE_REQUIRE(shared_expert_id >= -1,
               "%s: shared_expert_id must be -1 (no shared expert) or an expert id, got %d", what,
               shared_expert_id);
  AMOE_REQUIRE(shared_expert_id < 0 || std::isfinite(shared_weight),
               "%s: shared_weight must be finite", what);
  AMOE_REQUIRE(static_cast<int64_t>(M) * (top_k + 1) <= INT32_MAX,
               "%s: M * top_k overflows int32", what);
  return AMOE_OK;
}

// Routing: what grouped sigmoid routing adds.
inline int check_routing_grouped(const char* what, const float* bias, int32_t E, int32_t n_group,
                                 int32_t topk_group, int32_t top_k) {
  AMOE_REQUIRE(aligned_to(bias, 4), "%s: bias must be 4-byte aligned", what);
  if (n_group < 1 || n_group > kMaxGroups) {
    return fail(AMOE_ERR_UNSUPPORTED, "%s: n_group %d is not supported: valid values are 1..%d",
                what, n_group, kMaxGroups);
  }
  AMOE_REQUIRE(E % n_group == 0, "%s: num_experts (%d) is not a multiple of n_group (%d)", what,
               E, n_group);
  AMOE_REQUIRE(topk_group >= 1 && topk_group <= n_group,
               "%s: topk_group must be in 1..n_group (%d), got %d", what, n_group, topk_group);
  AMOE_REQUIRE(top_k <= topk_group * (E / n_group),
               "%s: top_k (%d) is larger than the experts of topk_group (%d) groups of %d", what,
               top_k, topk_group, E / n_group);
  return AMOE_OK;
}

// Alignment (amoe_moe_align_block_size): the expert count.
inline int check_align_sizes(const char* what, int32_t num_slots, int32_t E) {
  AMOE_REQUIRE(num_slots >= 0, "%s: num_slots must be >= 0, got %d", what, num_slots);
  if (E < 1 || E > kMaxAlignExperts) {
    return fail(AMOE_ERR_UNSUPPORTED, "%s: num_experts %d is not supported: valid values are 1..%d",
                what, E, kMaxAlignExperts);
  }
  return AMOE_OK;
}

// Alignment: block_m, the output pointers and lengths (not the workspace).
inline int check_align_outputs(const char* what, const int32_t* topk_ids, int32_t num_slots,
                               int32_t E, int32_t block_m, const int32_t* sorted_token_ids,
                               int32_t sorted_len, const int32_t* expert_ids, int32_t num_blocks,
                               const int32_t* num_tokens_post_padded) {
  AMOE_REQUIRE(block_m >= 1 && block_m <= 1024, "%s: block_m must be in 1..1024, got %d", what,
               block_m);
  AMOE_REQUIRE(sorted_token_ids != nullptr && expert_ids != nullptr &&
                   num_tokens_post_padded != nullptr && (num_slots == 0 || topk_ids != nullptr),
               "%s: topk_ids, sorted_token_ids, expert_ids and num_tokens_post_padded must not "
               "be null",
               what);
  AMOE_REQUIRE(aligned_to(topk_ids, 4) && aligned_to(sorted_token_ids, 4) &&
                   aligned_to(expert_ids, 4) && aligned_to(num_tokens_post_padded, 4),
               "%s: every pointer must be 4-byte aligned", what);
  const int64_t min_sorted =
      static_cast<int64_t>(num_slots) + static_cast<int64_t>(E) * (block_m - 1);
  AMOE_REQUIRE(min_sorted <= INT32_MAX,
               "%s: num_slots + num_experts * (block_m - 1) overflows int32", what);
  AMOE_REQUIRE(sorted_len >= min_sorted,
               "%s: sorted_token_ids has %d entries; %d slots over %d experts in blocks of %d "
               "need num_slots + num_experts * (block_m - 1) = %lld",
               what, sorted_len, num_slots, E, block_m, static_cast<long long>(min_sorted));
  const int64_t min_blocks = (min_sorted + block_m - 1) / block_m;
  AMOE_REQUIRE(num_blocks >= min_blocks,
               "%s: expert_ids has %d entries; the layout needs ceil(%lld / %d) = %lld", what,
               num_blocks, static_cast<long long>(min_sorted), block_m,
               static_cast<long long>(min_blocks));
  AMOE_REQUIRE(static_cast<int64_t>(num_blocks) * block_m <= INT32_MAX,
               "%s: expert_ids (%d entries) times block_m (%d) overflows int32", what, num_blocks,
               block_m);
  return AMOE_OK;
}

// Quantisation (amoe_quant_fp8_per_token_group).
inline int check_quant(const char* what, const void* x, int32_t M, int32_t K, const void* q,
                       const float* scale, const void* zero_out) {
  AMOE_REQUIRE(M >= 0, "%s: M must be >= 0, got %d", what, M);
  AMOE_REQUIRE(K > 0 && K % kQuantGroup == 0, "%s: K must be a positive multiple of %d, got %d",
               what, kQuantGroup, K);
  AMOE_REQUIRE(M == 0 || (x != nullptr && q != nullptr && scale != nullptr),
               "%s: x, q and scale must not be null", what);
  AMOE_REQUIRE(aligned_to(x, 8) && aligned_to(q, 4) && aligned_to(scale, 4) &&
                   aligned_to(zero_out, 8),
               "%s: x and zero_out must be 8-byte aligned, q and scale 4-byte aligned", what);
  AMOE_REQUIRE(zero_out == nullptr || (zero_out != x && zero_out != q),
               "%s: zero_out must not be x or q", what);
  return AMOE_OK;
}

}  // namespace ops
}  // namespace amoe
