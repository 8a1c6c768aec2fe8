/**
 * The problems of the issue-6 table, shared by bench:targets and bench:kernel so that a config
 * timed by either runs on the same weights, tokens and routing.
 *
 * @module
 */
import { makeRandomMoeProblem, type MoeProblem } from "../src/random.ts";
import { balancedTopkIds, sliceProblem, type TuneShape } from "../src/tune.ts";

/** Weights and tokens for up to `maxM` tokens of `shape` (fixed seed). */
export function targetBase(shape: TuneShape, maxM: number): MoeProblem {
  return makeRandomMoeProblem({
    M: maxM,
    K: shape.K,
    N: shape.N,
    numExperts: shape.numExperts,
    topK: shape.topK,
    blockM: 8,
    seed: 42,
    sharedExpert: shape.sharedExpert,
  });
}

/** The first `M` tokens of `base`, routed at `balancedness` (seeded by M). */
export function targetProblem(
  base: MoeProblem,
  shape: TuneShape,
  M: number,
  balancedness: number,
): MoeProblem {
  const ids = balancedTopkIds({
    M,
    numExperts: shape.numExperts,
    topK: shape.topK,
    sharedExpert: shape.sharedExpert,
    balancedness,
    seed: M * 7919 + 1,
  });
  return sliceProblem(base, M, ids);
}
