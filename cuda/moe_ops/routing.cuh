// routing.cuh: top-k routing, one warp per token: the per-token device functions
// (route_softmax_token, route_grouped_token), shared by the routing kernels (routing.cu) and by
// the single-launch prologue (moe_ops/prologue.cuh).
//
// A token's E values live in registers, expert e in lane e % 32 at slot e / 32 (VPL = slots
// per lane, a power of two with 32 * VPL >= E), as order keys (moe_ops/warp.cuh order_key).
// The experts are picked in top_k rounds of a warp-wide arg-max: each lane's best key by a
// tree over its slots, then two single-instruction warp reductions, the largest key
// (__reduce_max_sync) and the lowest expert index holding it (__reduce_min_sync). That is the
// order of moe_ops/warp.cuh `better` (larger value first, the lower expert index on ties),
// which the CPU references (src/routing.ts) use too. The chosen ids come out in order of choice.
// A round is a short dependent chain (two reductions instead of a five-step butterfly of
// shuffles); the weights are computed afterwards, lane k for the k-th pick, all at once (the
// softmax's double exp and division leave the rounds). Grouped routing keeps its groups with a
// rank per group instead of topk_group rounds; groups of 32 (DeepSeek-V3) are scored by warp
// reductions, other sizes by a scan through shared memory. For one token everything is one
// warp's work: at M = 1 the latency is the logits' load, the lane's sigmoids, the group scores
// and top_k short rounds.
//
// Bit-exactness with the CPU references (src/routing.ts): the transcendental parts are
// computed in double precision and rounded once to float (sigmoid, exp of the softmax), so the
// float results agree with the references' Math.exp-based ones except when a double lands
// within a few ulps of a float rounding boundary; everything else is float arithmetic in a
// fixed order that the references reproduce (sums of the chosen weights in order of choice).
// NaN logits (and NaN group scores) count as -inf for the choice.
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
constexpr int kMaxRoutingSlotsPerLane = kMaxRoutingExperts / kWarp;
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

// The slots per lane for E experts: the smallest power of two with 32 * VPL >= E.
__host__ __device__ inline int routing_slots_per_lane(int E) {
  int vpl = 1;
  while (vpl * kWarp < E) vpl *= 2;
  return vpl;
}

// Shared memory a grouped-routing warp needs (a row of VPL * 32 words); softmax needs none.
__host__ __device__ inline int routing_grouped_smem_words(int vpl) { return vpl * kWarp; }

__device__ __forceinline__ float choice_value(float v) { return isnan(v) ? -INFINITY : v; }

// sigmoid in double, rounded once to float (the CPU reference does the same with Math.exp).
// Written without branches so that a lane's sigmoids overlap: libdevice's exp and the division
// each wrap a slow path in a convergence region, which ran a lane's sigmoids one after another
// (bench/NOTES.md, item 70). t = -x is clamped to [-40, 110]: below, 1 + e^t rounds to 1;
// above, the result is below half the smallest float denormal; so the float is the unclamped
// one. e^t: Cody-Waite reduction by ln 2 (k ln2_hi exact for |k| < 2^21), a degree-13 Taylor
// polynomial on |r| <= ln2 / 2 (truncation below 2^-57), 2^k through the exponent field. 1 / y:
// the hardware approximation and two Newton steps. Both within about an ulp of double, as
// libdevice's are, so the float agrees except within a few double ulps of a rounding boundary.
__device__ __forceinline__ float sigmoid_rounded(float x) {
  const double t = fmin(fmax(-static_cast<double>(x), -40.0), 110.0);
  const double k = rint(t * 1.4426950408889634);
  double r = fma(k, -6.93147180369123816490e-01, t);  // ln2_hi
  r = fma(k, -1.90821492927058770002e-10, r);         // ln2_lo
  double p = 1.6059043836821613e-10;  // 1/13!
  p = fma(p, r, 2.08767569878681e-09);  // 1/12!
  p = fma(p, r, 2.505210838544172e-08);  // 1/11!
  p = fma(p, r, 2.755731922398589e-07);  // 1/10!
  p = fma(p, r, 2.7557319223985893e-06);  // 1/9!
  p = fma(p, r, 2.48015873015873e-05);  // 1/8!
  p = fma(p, r, 0.0001984126984126984);  // 1/7!
  p = fma(p, r, 0.001388888888888889);  // 1/6!
  p = fma(p, r, 0.008333333333333333);  // 1/5!
  p = fma(p, r, 0.041666666666666664);  // 1/4!
  p = fma(p, r, 0.16666666666666666);  // 1/3!
  p = fma(p, r, 0.5);  // 1/2!
  p = fma(p, r, 1.0);  // 1/1!
  p = fma(p, r, 1.0);  // 1/0!
  const double e = p * __longlong_as_double((static_cast<long long>(k) + 1023) << 52);
  const double y = 1.0 + e;
  double q;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(q) : "d"(y));
  q = fma(q, fma(-y, q, 1.0), q);
  q = fma(q, fma(-y, q, 1.0), q);
  return isnan(x) ? x : static_cast<float>(q);
}

// Picks top_k experts from the lane's keys (slot s: expert lane + 32 s; kNoKey: not a
// candidate), in order; lane k (< top_k) gets the k-th pick's expert and key. Returns the number
// of picks (top_k; fewer only when the candidates run out, which the entry points rule out).
// The picks are kept in a bit mask (an array written at a computed slot would live in local
// memory).
template <int VPL>
__device__ __forceinline__ int warp_top_k(const uint32_t (&key)[VPL], int top_k, int lane,
                                          int* my_id, uint32_t* my_key) {
  uint32_t taken = 0;  // bit s: slot s picked
  int picks = 0;
  for (; picks < top_k; ++picks) {
    uint32_t left[VPL];
#pragma unroll
    for (int s = 0; s < VPL; ++s) left[s] = (taken >> s) & 1u ? kNoKey : key[s];
    uint32_t best;
    int slot;
    lane_max_key(left, &best, &slot);
    const uint32_t top = __reduce_max_sync(kFullMask, best);
    if (top == kNoKey) break;
    const int mine = best == top ? lane + slot * kWarp : INT32_MAX;
    const int id = __reduce_min_sync(kFullMask, mine);
    if (lane == picks) {
      *my_id = id;
      *my_key = top;
    }
    if ((id & (kWarp - 1)) == lane) taken |= 1u << (id / kWarp);
  }
  return picks;
}

// The sum of lane 0..count-1's `v`, added in lane order (the order of choice), on every lane.
__device__ __forceinline__ float sum_in_lane_order(float v, int count) {
  float sum = 0.0f;
  for (int k = 0; k < count; ++k) sum += __shfl_sync(kFullMask, v, k);
  return sum;
}

// Writes lane k's pick (k < picks), after the optional renormalisation, and the shared slot.
// `ids_copy` (or null): the ids go there too, at the same flat slot (the prologue's shared
// memory, so that its alignment does not read them back through L2).
__device__ __forceinline__ void write_row(const RoutingParams& p, int token, int lane, int picks,
                                          int my_id, float my_weight, float chosen_sum,
                                          int32_t* ids_copy) {
  const int width = p.top_k + (p.shared_expert_id >= 0 ? 1 : 0);
  const size_t row = static_cast<size_t>(token) * width;
  if (lane < p.top_k) {
    float w = p.renormalize ? my_weight / chosen_sum : my_weight;
    w = w * p.weight_scale;
    const int id = lane < picks ? my_id : 0;
    p.topk_ids[row + lane] = id;
    p.topk_weights[row + lane] = lane < picks ? w : 0.0f;
    if (ids_copy != nullptr) ids_copy[row + lane] = id;
  }
  if (p.shared_expert_id >= 0 && lane == 0) {
    p.topk_ids[row + p.top_k] = p.shared_expert_id;
    p.topk_weights[row + p.top_k] = p.shared_weight;
    if (ids_copy != nullptr) ids_copy[row + p.top_k] = p.shared_expert_id;
  }
}

// Softmax top-k (Mixtral / Qwen style) of one token, by one warp: choose by logit, weight =
// softmax probability over all E experts, optionally renormalised over the chosen ones.
template <int VPL>
__device__ __forceinline__ void route_softmax_token(const RoutingParams& p, int token, int lane,
                                                    int32_t* ids_copy = nullptr) {
  const float* row = p.logits + static_cast<size_t>(token) * p.E;
  float x[VPL];
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    x[s] = __ldg(row + min(lane + s * kWarp, p.E - 1));  // unconditional: every load in flight
  }
  uint32_t key[VPL];
  uint32_t lane_max = kNoKey;
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    key[s] = lane + s * kWarp < p.E ? order_key(choice_value(x[s])) : kNoKey;
    lane_max = max(lane_max, key[s]);
  }
  const float m = key_value(__reduce_max_sync(kFullMask, lane_max));
  double sum = 0.0;
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    if (key[s] != kNoKey) sum += exp(static_cast<double>(choice_value(x[s]) - m));
  }
  sum = warp_sum(sum);

  int my_id = 0;
  uint32_t my_key = kNoKey;
  const int picks = warp_top_k(key, p.top_k, lane, &my_id, &my_key);
  float prob = 0.0f;
  if (lane < picks) {
    prob = static_cast<float>(exp(static_cast<double>(key_value(my_key) - m)) / sum);
  }
  const float chosen_sum = sum_in_lane_order(prob, picks);
  write_row(p, token, lane, picks, my_id, prob, chosen_sum, ids_copy);
}

// The groups a token keeps, from lane g's score of group g (-inf on lanes past n_group): bit
// g set when fewer than topk_group groups beat group g (`better`: ties to the lower group),
// i.e. group g is among those topk_group rounds of arg-max would pick. One shuffle per group,
// all in flight together.
__device__ __forceinline__ uint32_t kept_groups(float gscore, int n_group, int topk_group,
                                                int lane) {
  int rank = 0;
  for (int g = 0; g < n_group; ++g) {
    const float other = __shfl_sync(kFullMask, gscore, g);
    rank += better(other, g, gscore, lane) ? 1 : 0;
  }
  return __ballot_sync(kFullMask, lane < n_group && rank < topk_group);
}

// A group's score is the sum of its two largest choice values (with multiplicity; the largest
// alone for groups of one).
//
// The score of a group of 32 keys, one per lane, on every lane: its two largest keys come from
// warp reductions (the largest, whether two lanes hold it, the largest of the rest).
__device__ __forceinline__ float warp_group_score(uint32_t key) {
  const uint32_t t1 = __reduce_max_sync(kFullMask, key);
  const bool top = key == t1;
  const uint32_t rest = __reduce_max_sync(kFullMask, top ? kNoKey : key);
  const uint32_t t2 = __popc(__ballot_sync(kFullMask, top)) >= 2 ? t1 : rest;
  return choice_value(__fadd_rn(key_value(t1), key_value(t2)));
}

// Groups of 32 experts, slot s of every lane being group s: drops the slots of the groups not
// in `kept` (past the groups the keys are kNoKey already).
template <int VPL>
__device__ __forceinline__ void drop_slot_groups(uint32_t (&key)[VPL], uint32_t kept) {
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    if (!((kept >> s) & 1u)) key[s] = kNoKey;
  }
}

// group_score_of_slot and group_score_by_scan return group `lane`'s score on lanes < n_group.
//
// Groups of 32 experts (DeepSeek-V3's 256 / 8): group g is slot g of every lane, so each
// group's score is one warp_group_score, independent across groups.
template <int VPL>
__device__ __forceinline__ float group_score_of_slot(const uint32_t (&key)[VPL], int n_group,
                                                     int lane) {
  float mine = -INFINITY;
#pragma unroll
  for (int g = 0; g < VPL; ++g) {
    if (g < n_group) {
      const float score = warp_group_score(key[g]);
      if (lane == g) mine = score;
    }
  }
  return mine;
}

// Any group size: the keys go through `row_smem` (E words) and lane g scans group g. The lane
// starts at its own offset in the group, so that the lanes read different banks; the order
// does not change the two values (zeros' signs aside, which compare equal).
template <int VPL>
__device__ __forceinline__ float group_score_by_scan(const uint32_t (&key)[VPL], int E,
                                                     int n_group, int lane, uint32_t* row_smem) {
  const int group_size = E / n_group;
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const int e = lane + s * kWarp;
    if (e < E) row_smem[e] = key[s];
  }
  __syncwarp();
  float gscore = -INFINITY;
  if (lane < n_group) {
    const uint32_t* gp = row_smem + lane * group_size;
    uint32_t t1 = kNoKey, t2 = kNoKey;
    int j = lane % group_size;
#pragma unroll 4
    for (int i = 0; i < group_size; ++i) {
      const uint32_t v = gp[j];
      t2 = max(t2, min(t1, v));
      t1 = max(t1, v);
      j = j + 1 == group_size ? 0 : j + 1;
    }
    gscore = group_size >= 2 ? choice_value(__fadd_rn(key_value(t1), key_value(t2)))
                             : key_value(t1);
  }
  __syncwarp();  // every lane has read its group before the row is overwritten
  return gscore;
}

// DeepSeek-V3 routing of one token, by one warp: sigmoid scores, + bias for the choice only,
// groups of E / n_group experts scored by the sum of their two best choice values (the best
// one alone for groups of one), the topk_group best groups kept, top_k experts chosen among
// them; weights are the chosen experts' sigmoid scores (without bias), optionally normalised to
// sum 1. `row_smem`: routing_grouped_smem_words(VPL) words of shared memory for this warp.
// `ids_copy`: see write_row.
template <int VPL>
__device__ __forceinline__ void route_grouped_token(const RoutingParams& p, int token, int lane,
                                                    uint32_t* row_smem,
                                                    int32_t* ids_copy = nullptr) {
  const float* row = p.logits + static_cast<size_t>(token) * p.E;
  // Loads first, all in flight: unconditional (a clamped index; the bias read from the row
  // itself and dropped when there is none), unrolled.
  const float* bias = p.bias != nullptr ? p.bias : row;
  float logit[VPL], b[VPL];
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const int e = min(lane + s * kWarp, p.E - 1);
    logit[s] = __ldg(row + e);
    b[s] = __ldg(bias + e);
  }
  // The scores: straight-line code over every slot (those past E hold a copy of the last
  // expert and are dropped), so that the lane's double-precision sigmoids overlap.
  float score[VPL];
  uint32_t key[VPL];
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    score[s] = sigmoid_rounded(logit[s]);
    const float choice = choice_value(__fadd_rn(score[s], p.bias != nullptr ? b[s] : 0.0f));
    key[s] = lane + s * kWarp < p.E ? order_key(choice) : kNoKey;
  }

  // Group selection (nothing to do when every group is kept).
  if (p.topk_group < p.n_group) {
    const int group_size = p.E / p.n_group;
    // (Up to 8 slots per lane: at 16, E > 256, ptxas spills in the routing kernel.)
    if (group_size == kWarp && VPL <= 8) {
      const float gscore = group_score_of_slot(key, p.n_group, lane);
      drop_slot_groups(key, kept_groups(gscore, p.n_group, p.topk_group, lane));
    } else {
      const float gscore = group_score_by_scan(key, p.E, p.n_group, lane, row_smem);
      const uint32_t kept = kept_groups(gscore, p.n_group, p.topk_group, lane);
#pragma unroll
      for (int s = 0; s < VPL; ++s) {
        const int e = lane + s * kWarp;
        if (e < p.E && !((kept >> (e / group_size)) & 1u)) key[s] = kNoKey;
      }
    }
  }
  // The scores, for the weights of the picks.
  float* score_row = reinterpret_cast<float*>(row_smem);
#pragma unroll
  for (int s = 0; s < VPL; ++s) {
    const int e = lane + s * kWarp;
    if (e < p.E) score_row[e] = score[s];
  }
  __syncwarp();

  int my_id = 0;
  uint32_t my_key = kNoKey;
  const int picks = warp_top_k(key, p.top_k, lane, &my_id, &my_key);
  const float weight = lane < picks ? score_row[my_id] : 0.0f;
  const float chosen_sum = sum_in_lane_order(weight, picks);
  write_row(p, token, lane, picks, my_id, weight, chosen_sum, ids_copy);
  __syncwarp();  // the row may be reused by this warp's next token
}

// DeepSeek-V3 routing of a few tokens by a whole block (the prologue's block 0), for groups of
// 32 experts. A warp per token spent half of its ~5 µs on its lanes' eight double-precision
// sigmoids and its eight groups' reductions, one after another, while the block's other warps
// waited (bench/NOTES.md, items 77-78). Here every thread scores one or a few (token, expert)
// pairs into shared memory, a warp per (token, group) takes the group's two largest keys, and a
// warp per token keeps its groups and picks its top-k from there: the same functions on the
// same values as route_grouped_token, so every output is bit-equal to it.
// Up to 8 tokens: at 16 every thread has as many sigmoids as a lane of a warp per token, and the
// barriers made the prologue 1.3 µs slower (bench/NOTES.md, item 78).
constexpr int kBlockRoutingMaxTokens = 8;
constexpr int kBlockRoutingMaxVpl = 8;  // E <= 256

__host__ __device__ inline bool block_routing_fits(int M, int E, int n_group) {
  return n_group * kWarp == E && E <= kBlockRoutingMaxVpl * kWarp && M >= 1 &&
         M <= kBlockRoutingMaxTokens;
}
// Shared memory for any M and E that fit, with VPL slots per lane: keys and scores [M][E],
// group scores [M][n_group].
__host__ __device__ constexpr int block_routing_smem_bytes(int vpl) {
  const int values = kBlockRoutingMaxTokens * vpl * kWarp;
  return vpl > kBlockRoutingMaxVpl ? 0 : values * 8 + kBlockRoutingMaxTokens * vpl * 4;
}

template <int VPL>
__device__ __forceinline__ void route_grouped_block(const RoutingParams& p, void* smem,
                                                    int32_t* ids_copy, int threads) {
  const int E = p.E, values = p.M * E;
  uint32_t* keys = static_cast<uint32_t*>(smem);            // [M][E]
  float* scores = reinterpret_cast<float*>(keys + values);  // [M][E]
  float* gscores = scores + values;                          // [M][n_group]
#pragma unroll 4
  for (int i = threadIdx.x; i < values; i += threads) {
    const float score = sigmoid_rounded(__ldg(p.logits + i));  // logits [M, E]: i = t E + e
    const float bias = p.bias != nullptr ? __ldg(p.bias + i % E) : 0.0f;
    scores[i] = score;
    keys[i] = order_key(choice_value(__fadd_rn(score, bias)));
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = threads / kWarp;
  const bool select = p.topk_group < p.n_group;
  if (select) {
    // Task (t, g) reads keys [t][32 g + lane] = keys[32 task + lane], since E = 32 n_group.
    for (int task = warp; task < p.M * p.n_group; task += warps) {
      const float score = warp_group_score(keys[task * kWarp + lane]);
      if (lane == 0) gscores[task] = score;
    }
    __syncthreads();
  }
  for (int token = warp; token < p.M; token += warps) {
    uint32_t key[VPL];
#pragma unroll
    for (int s = 0; s < VPL; ++s) {
      const int e = lane + s * kWarp;
      key[s] = e < E ? keys[token * E + e] : kNoKey;
    }
    if (select) {
      const float gscore = lane < p.n_group ? gscores[token * p.n_group + lane] : -INFINITY;
      drop_slot_groups(key, kept_groups(gscore, p.n_group, p.topk_group, lane));
    }
    int my_id = 0;
    uint32_t my_key = kNoKey;
    const int picks = warp_top_k(key, p.top_k, lane, &my_id, &my_key);
    const float weight = lane < picks ? scores[token * E + my_id] : 0.0f;
    const float chosen_sum = sum_in_lane_order(weight, picks);
    write_row(p, token, lane, picks, my_id, weight, chosen_sum, ids_copy);
  }
}

}  // namespace ops
}  // namespace amoe
