// routing.cuh: top-k routing kernels, one warp per token.
//
// Both kernels hold a token's E scores in registers, expert e in lane e % 32 at slot e / 32
// (VPL = slots per lane, a power of two with 32 * VPL >= E), and pick experts in top_k
// rounds of a warp-wide arg-max (moe_ops/warp.cuh `better`: larger value first, the lower
// expert index on ties). The chosen ids come out in order of choice.
//
// Bit-exactness with the CPU references (src/routing.ts): the transcendental parts are
// computed in double precision and rounded once to float (sigmoid, exp of the softmax), so the
// float results agree with the references' Math.exp-based ones except when a double lands
// within a few ulps of a float rounding boundary; everything else is float arithmetic in a
// fixed order that the references reproduce (sums of the chosen weights in order of choice).
// NaN logits count as -inf for the choice.
//
// Output row of a token: `width` = top_k (+ 1 when shared_expert_id >= 0) ids and weights;
// the shared slot is last, with weight `shared_weight` (routed weights are multiplied by
// `weight_scale`, the shared one is not).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "warp.cuh"

namespace amoe {
namespace ops {

constexpr int kRoutingWarpsPerBlock = 4;
constexpr int kMaxRoutingExperts = 512;  // 16 slots per lane
constexpr int kMaxTopK = 32;
constexpr int kMaxGroups = 32;

struct RoutingParams {
  const float* logits;  // [M, E]
  const float* bias;    // [E] or null (grouped only)
  int M, E, top_k;
  int n_group, topk_group;  // grouped only
  bool renormalize;
  float weight_scale;
  int shared_expert_id;  // -1: none
  float shared_weight;
  int32_t* topk_ids;     // [M, width]
  float* topk_weights;   // [M, width]
};

__device__ __forceinline__ float choice_value(float v) { return isnan(v) ? -INFINITY : v; }

// sigmoid in double, rounded once to float (the CPU reference does the same with Math.exp).
__device__ __forceinline__ float sigmoid_rounded(float x) {
  return static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(x))));
}

// Writes lane k's pick (k < top_k), after the optional renormalisation, and the shared slot.
__device__ __forceinline__ void write_row(const RoutingParams& p, int token, int lane, int my_id,
                                          float my_weight, float chosen_sum) {
  const int width = p.top_k + (p.shared_expert_id >= 0 ? 1 : 0);
  const size_t row = static_cast<size_t>(token) * width;
  if (lane < p.top_k) {
    float w = p.renormalize ? my_weight / chosen_sum : my_weight;
    w = w * p.weight_scale;
    p.topk_ids[row + lane] = my_id;
    p.topk_weights[row + lane] = w;
  }
  if (p.shared_expert_id >= 0 && lane == 0) {
    p.topk_ids[row + p.top_k] = p.shared_expert_id;
    p.topk_weights[row + p.top_k] = p.shared_weight;
  }
}

// Softmax top-k (Mixtral / Qwen style): choose by logit, weight = softmax probability over all
// E experts, optionally renormalised over the chosen ones.
template <int VPL>
__global__ void __launch_bounds__(kRoutingWarpsPerBlock * kWarp)
    topk_softmax_kernel(const RoutingParams p) {
  const int lane = threadIdx.x % kWarp;
  const int token = blockIdx.x * kRoutingWarpsPerBlock + threadIdx.x / kWarp;
  if (token >= p.M) return;
  const float* row = p.logits + static_cast<size_t>(token) * p.E;

  float v[VPL];
  uint32_t taken = 0;  // bit s: slot s is chosen already or holds no expert
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const int e = lane + s * kWarp;
    const float x = __ldg(row + min(e, p.E - 1));  // unconditional: every load in flight
    if (e < p.E) {
      v[s] = choice_value(x);
    } else {
      v[s] = -INFINITY;
      taken |= 1u << s;
    }
  }
  float m = -INFINITY;
#pragma unroll
  for (int s = 0; s < VPL; ++s) m = fmaxf(m, v[s]);
  m = warp_max(m);
  double sum = 0.0;
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    if (!((taken >> s) & 1u)) sum += exp(static_cast<double>(v[s] - m));
  }
  sum = warp_sum(sum);

  int my_id = 0;
  float my_weight = 0.0f, chosen_sum = 0.0f;
  for (int k = 0; k < p.top_k; ++k) {
    Candidate c{-INFINITY, INT32_MAX};
#pragma unroll
    for (int s = 0; s < VPL; ++s) {
      const int e = lane + s * kWarp;
      if (!((taken >> s) & 1u) && better(v[s], e, c.value, c.index)) c = Candidate{v[s], e};
    }
    c = warp_best(c);
    if (c.index >= p.E) break;  // no candidate left (the entry point rules this out)
    if ((c.index & (kWarp - 1)) == lane) taken |= 1u << (c.index / kWarp);
    const float prob = static_cast<float>(exp(static_cast<double>(c.value - m)) / sum);
    chosen_sum += prob;  // warp-uniform, in order of choice
    if (lane == k) {
      my_id = c.index;
      my_weight = prob;
    }
  }
  write_row(p, token, lane, my_id, my_weight, chosen_sum);
}

// DeepSeek-V3 routing: sigmoid scores, + bias for the choice only, groups of E / n_group
// experts scored by the sum of their two best choice values (the best one alone for groups of
// one), the topk_group best groups kept, top_k experts chosen among them; weights are the
// chosen experts' sigmoid scores (without bias), optionally normalised to sum 1.
template <int VPL>
__global__ void __launch_bounds__(kRoutingWarpsPerBlock * kWarp)
    topk_grouped_sigmoid_kernel(const RoutingParams p) {
  __shared__ float choice_smem[kRoutingWarpsPerBlock][VPL * kWarp];
  __shared__ float score_smem[kRoutingWarpsPerBlock][VPL * kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int token = blockIdx.x * kRoutingWarpsPerBlock + warp;
  if (token >= p.M) return;
  const float* row = p.logits + static_cast<size_t>(token) * p.E;
  float* choice_row = choice_smem[warp];
  float* score_row = score_smem[warp];
  const int group_size = p.E / p.n_group;

  // Loads first, all in flight: unconditional (a clamped index; the bias read from the row
  // itself and dropped when there is none), unrolled, then staged in shared memory. A load per
  // iteration of the loop below would wait for memory once per slot.
  const float* bias = p.bias != nullptr ? p.bias : row;
  float logit[VPL], b[VPL];
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const int e = min(lane + s * kWarp, p.E - 1);
    logit[s] = __ldg(row + e);
    b[s] = __ldg(bias + e);
  }
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const int e = lane + s * kWarp;
    if (e < p.E) {
      score_row[e] = logit[s];
      choice_row[e] = p.bias != nullptr ? b[s] : 0.0f;
    }
  }
  // Then the scores (not unrolled: the double-precision exp is large). Each lane touches only
  // its own experts here.
  for (int e = lane; e < p.E; e += kWarp) {
    const float score = sigmoid_rounded(score_row[e]);
    choice_row[e] = choice_value(__fadd_rn(score, choice_row[e]));
    score_row[e] = score;
  }
  __syncwarp();
  float c[VPL];
  uint32_t taken = 0;
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const int e = lane + s * kWarp;
    if (e < p.E) {
      c[s] = choice_row[e];
    } else {
      c[s] = -INFINITY;
      taken |= 1u << s;
    }
  }
  __syncwarp();

  // Group scores: lane g scores group g.
  Candidate g{-INFINITY, INT32_MAX};
  if (lane < p.n_group) {
    float t1 = -INFINITY, t2 = -INFINITY;
    const float* gp = choice_row + lane * group_size;
    for (int j = 0; j < group_size; ++j) {
      const float x = gp[j];
      if (x > t1) {
        t2 = t1;
        t1 = x;
      } else if (x > t2) {
        t2 = x;
      }
    }
    g = Candidate{group_size >= 2 ? __fadd_rn(t1, t2) : t1, lane};
  }
  uint32_t groups = 0;  // bit g: group g is kept (warp-uniform)
  for (int k = 0; k < p.topk_group; ++k) {
    const Candidate best = warp_best(g);
    if (best.index >= p.n_group) break;
    groups |= 1u << best.index;
    if (lane == best.index) g = Candidate{-INFINITY, INT32_MAX};
  }
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const int e = lane + s * kWarp;
    if (e < p.E && !((groups >> (e / group_size)) & 1u)) taken |= 1u << s;
  }

  int my_id = 0;
  float my_weight = 0.0f, chosen_sum = 0.0f;
  for (int k = 0; k < p.top_k; ++k) {
    Candidate best{-INFINITY, INT32_MAX};
#pragma unroll
    for (int s = 0; s < VPL; ++s) {
      const int e = lane + s * kWarp;
      if (!((taken >> s) & 1u) && better(c[s], e, best.value, best.index)) {
        best = Candidate{c[s], e};
      }
    }
    best = warp_best(best);
    if (best.index >= p.E) break;  // no candidate left (the entry point rules this out)
    if ((best.index & (kWarp - 1)) == lane) taken |= 1u << (best.index / kWarp);
    const float score = score_row[best.index];
    chosen_sum += score;
    if (lane == k) {
      my_id = best.index;
      my_weight = score;
    }
  }
  write_row(p, token, lane, my_id, my_weight, chosen_sum);
}

}  // namespace ops
}  // namespace amoe
