// routing.cu: the exported top-k routing entries (softmax, DeepSeek-V3 grouped sigmoid).
// Validates every argument, picks the kernel instantiation for E, launches on the caller's
// stream. No allocation, no synchronisation.
#include <cmath>
#include <cstdint>

#include "moe_ops/routing.cuh"
#include "status.cuh"

namespace amoe {
namespace {

using ops::RoutingParams;

bool aligned4(const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; }

// The slots per lane of the kernel for E experts: the smallest power of two with 32 * VPL >= E.
int slots_per_lane(int E) {
  int vpl = 1;
  while (vpl * ops::kWarp < E) vpl *= 2;
  return vpl;
}

using KernelFn = void (*)(RoutingParams);

KernelFn softmax_kernel_for(int vpl) {
  switch (vpl) {
    case 1: return ops::topk_softmax_kernel<1>;
    case 2: return ops::topk_softmax_kernel<2>;
    case 4: return ops::topk_softmax_kernel<4>;
    case 8: return ops::topk_softmax_kernel<8>;
    case 16: return ops::topk_softmax_kernel<16>;
    default: return nullptr;
  }
}

KernelFn grouped_kernel_for(int vpl) {
  switch (vpl) {
    case 1: return ops::topk_grouped_sigmoid_kernel<1>;
    case 2: return ops::topk_grouped_sigmoid_kernel<2>;
    case 4: return ops::topk_grouped_sigmoid_kernel<4>;
    case 8: return ops::topk_grouped_sigmoid_kernel<8>;
    case 16: return ops::topk_grouped_sigmoid_kernel<16>;
    default: return nullptr;
  }
}

// Checks what both entries share; `what` names the entry in messages.
int check_common(const char* what, const float* logits, int32_t M, int32_t E, int32_t top_k,
                 float weight_scale, int32_t shared_expert_id, float shared_weight,
                 const int32_t* topk_ids, const float* topk_weights) {
  AMOE_REQUIRE(M >= 0, "%s: M must be >= 0, got %d", what, M);
  AMOE_REQUIRE(M == 0 || (logits != nullptr && topk_ids != nullptr && topk_weights != nullptr),
               "%s: logits, topk_ids and topk_weights must not be null", what);
  AMOE_REQUIRE(aligned4(logits) && aligned4(topk_ids) && aligned4(topk_weights),
               "%s: logits, topk_ids and topk_weights must be 4-byte aligned", what);
  if (E < 1 || E > ops::kMaxRoutingExperts) {
    return fail(AMOE_ERR_UNSUPPORTED, "%s: num_experts %d is not supported: valid values are 1..%d",
                what, E, ops::kMaxRoutingExperts);
  }
  if (top_k < 1 || top_k > ops::kMaxTopK) {
    return fail(AMOE_ERR_UNSUPPORTED, "%s: top_k %d is not supported: valid values are 1..%d", what,
                top_k, ops::kMaxTopK);
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

RoutingParams params(const float* logits, const float* bias, int M, int E, int top_k,
                     int n_group, int topk_group, int renormalize, float weight_scale,
                     int shared_expert_id, float shared_weight, int32_t* topk_ids,
                     float* topk_weights) {
  RoutingParams p;
  p.logits = logits;
  p.bias = bias;
  p.M = M;
  p.E = E;
  p.top_k = top_k;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.renormalize = renormalize != 0;
  p.weight_scale = weight_scale;
  p.shared_expert_id = shared_expert_id;
  p.shared_weight = shared_weight;
  p.topk_ids = topk_ids;
  p.topk_weights = topk_weights;
  return p;
}

int launch(KernelFn kernel, const RoutingParams& p, void* stream) {
  AMOE_TRY(select_device());
  if (p.M == 0) return AMOE_OK;
  const int blocks = (p.M + ops::kRoutingWarpsPerBlock - 1) / ops::kRoutingWarpsPerBlock;
  kernel<<<blocks, ops::kRoutingWarpsPerBlock * ops::kWarp, 0,
           static_cast<cudaStream_t>(stream)>>>(p);
  return check_cuda(cudaGetLastError(), "routing kernel launch");
}

}  // namespace
}  // namespace amoe

extern "C" {

int amoe_topk_softmax(const float* logits, int32_t M, int32_t num_experts, int32_t top_k,
                      int32_t renormalize, float weight_scale, int32_t shared_expert_id,
                      float shared_weight, int32_t* topk_ids, float* topk_weights, void* stream) {
  using namespace amoe;
  AMOE_TRY(check_common("amoe_topk_softmax", logits, M, num_experts, top_k, weight_scale,
                        shared_expert_id, shared_weight, topk_ids, topk_weights));
  const RoutingParams p = params(logits, nullptr, M, num_experts, top_k, 1, 1, renormalize,
                                 weight_scale, shared_expert_id, shared_weight, topk_ids,
                                 topk_weights);
  return launch(softmax_kernel_for(slots_per_lane(num_experts)), p, stream);
}

int amoe_topk_grouped_sigmoid(const float* logits, const float* bias, int32_t M,
                              int32_t num_experts, int32_t n_group, int32_t topk_group,
                              int32_t top_k, int32_t renormalize, float weight_scale,
                              int32_t shared_expert_id, float shared_weight, int32_t* topk_ids,
                              float* topk_weights, void* stream) {
  using namespace amoe;
  const char* what = "amoe_topk_grouped_sigmoid";
  AMOE_TRY(check_common(what, logits, M, num_experts, top_k, weight_scale, shared_expert_id,
                        shared_weight, topk_ids, topk_weights));
  AMOE_REQUIRE(aligned4(bias), "%s: bias must be 4-byte aligned", what);
  if (n_group < 1 || n_group > ops::kMaxGroups) {
    return fail(AMOE_ERR_UNSUPPORTED, "%s: n_group %d is not supported: valid values are 1..%d",
                what, n_group, ops::kMaxGroups);
  }
  AMOE_REQUIRE(num_experts % n_group == 0,
               "%s: num_experts (%d) is not a multiple of n_group (%d)", what, num_experts,
               n_group);
  AMOE_REQUIRE(topk_group >= 1 && topk_group <= n_group,
               "%s: topk_group must be in 1..n_group (%d), got %d", what, n_group, topk_group);
  AMOE_REQUIRE(top_k <= topk_group * (num_experts / n_group),
               "%s: top_k (%d) is larger than the experts of topk_group (%d) groups of %d", what,
               top_k, topk_group, num_experts / n_group);
  const RoutingParams p = params(logits, bias, M, num_experts, top_k, n_group, topk_group,
                                 renormalize, weight_scale, shared_expert_id, shared_weight,
                                 topk_ids, topk_weights);
  return launch(grouped_kernel_for(slots_per_lane(num_experts)), p, stream);
}

}  // extern "C"
