// routing.cu: the exported top-k routing entries (softmax, DeepSeek-V3 grouped sigmoid).
// Validates every argument (moe_ops/validate.cuh), picks the kernel instantiation for E,
// launches on the caller's stream. No allocation, no synchronisation.
#include <cstdint>

#include "griddep.cuh"
#include "moe_ops/routing.cuh"
#include "moe_ops/validate.cuh"
#include "status.cuh"

namespace amoe {
namespace ops {

// The kernels (the device code they run is in moe_ops/routing.cuh): one warp per token. Each
// lets the alignment's launch overlap it (griddep.cuh).

template <int VPL>
__global__ void __launch_bounds__(kRoutingWarpsPerBlock * kWarp)
    topk_softmax_kernel(const RoutingParams p) {
  griddep::allow_dependents();
  const int token = blockIdx.x * kRoutingWarpsPerBlock + threadIdx.x / kWarp;
  if (token >= p.M) return;
  route_softmax_token<VPL>(p, token, threadIdx.x % kWarp);
}

template <int VPL>
__global__ void __launch_bounds__(kRoutingWarpsPerBlock * kWarp)
    topk_grouped_sigmoid_kernel(const RoutingParams p) {
  __shared__ uint32_t smem[kRoutingWarpsPerBlock][VPL * kWarp];
  griddep::allow_dependents();
  const int warp = threadIdx.x / kWarp;
  const int token = blockIdx.x * kRoutingWarpsPerBlock + warp;
  if (token >= p.M) return;
  route_grouped_token<VPL>(p, token, threadIdx.x % kWarp, smem[warp]);
}

}  // namespace ops
}  // namespace amoe

namespace amoe {
namespace {

using ops::RoutingParams;

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
  AMOE_TRY(ops::check_routing_common("amoe_topk_softmax", logits, M, num_experts, top_k,
                                     weight_scale, shared_expert_id, shared_weight, topk_ids,
                                     topk_weights));
  const RoutingParams p = params(logits, nullptr, M, num_experts, top_k, 1, 1, renormalize,
                                 weight_scale, shared_expert_id, shared_weight, topk_ids,
                                 topk_weights);
  return launch(softmax_kernel_for(ops::routing_slots_per_lane(num_experts)), p, stream);
}

int amoe_topk_grouped_sigmoid(const float* logits, const float* bias, int32_t M,
                              int32_t num_experts, int32_t n_group, int32_t topk_group,
                              int32_t top_k, int32_t renormalize, float weight_scale,
                              int32_t shared_expert_id, float shared_weight, int32_t* topk_ids,
                              float* topk_weights, void* stream) {
  using namespace amoe;
  const char* what = "amoe_topk_grouped_sigmoid";
  AMOE_TRY(ops::check_routing_common(what, logits, M, num_experts, top_k, weight_scale,
                                     shared_expert_id, shared_weight, topk_ids, topk_weights));
  AMOE_TRY(ops::check_routing_grouped(what, bias, num_experts, n_group, topk_group, top_k));
  const RoutingParams p = params(logits, bias, M, num_experts, top_k, n_group, topk_group,
                                 renormalize, weight_scale, shared_expert_id, shared_weight,
                                 topk_ids, topk_weights);
  return launch(grouped_kernel_for(ops::routing_slots_per_lane(num_experts)), p, stream);
}

}  // extern "C"
