/**
 * The unfused baseline: the same MoE layer as {@link fusedMoeW8A8UpDown}, with the same
 * arguments, in four plain launches (up GEMM, SwiGLU + FP8 quantisation, down GEMM, weighted
 * sum) through an fp32 workspace. It exists to be measured against: benchmarks and the tuner
 * show what fusing buys. It is written plainly (CUDA cores, shared-memory tiles) and not tuned.
 *
 * @module
 */
import { InvalidArgumentError, UnsupportedError, unwrap } from "../ffi/errors.ts";
import { symbols } from "../ffi/library.ts";
import type { DeviceBuffer } from "./buffer.ts";
import { type Stream, streamHandle } from "./device.ts";
import { type FusedMoeTensors, kernelPointers, validateFusedMoeArgs } from "./fused_moe.ts";
import type { DeviceMoeProblem } from "./problem.ts";

/** Sizes that fix the workspace of {@link unfusedMoeW8A8}. */
export interface UnfusedDims {
  /** Tokens. */
  M: number;
  /** Hidden size. */
  K: number;
  /** Up-projection rows. */
  N: number;
  /** Experts per token. */
  topK: number;
}

/** Options of {@link unfusedMoeW8A8}. */
export interface UnfusedMoeOptions {
  /** Experts per token. */
  topK: number;
  /** The block size the sorted layout (`sortedTokenIds`, `expertIds`) was aligned for. */
  blockM: number;
  /** Multiplies every expert's contribution (routed scaling factor); default 1. */
  scalingFactor?: number;
  /** Stream to enqueue on; default the legacy default stream. */
  stream?: Stream;
}

const REBUILD = "this libalpha_moe was built without the unfused baseline: rebuild it with " +
  "`deno task build`";

/**
 * Bytes of device workspace {@link unfusedMoeW8A8} needs: about `M * topK * (4N + N/2 + 4K)`
 * (the fp32 up-projection output, the FP8 intermediate, the fp32 down-projection output).
 *
 * @throws {InvalidArgumentError} for sizes the layer cannot have
 * @throws {UnsupportedError} when the loaded library lacks the baseline
 */
export function unfusedWorkspaceBytes(dims: UnfusedDims): number {
  const fn = symbols().amoe_unfused_workspace_bytes;
  if (fn === null) throw new UnsupportedError(REBUILD);
  const out = new BigUint64Array(1);
  unwrap(fn(dims.M, dims.K, dims.N, dims.topK, out));
  return Number(out[0]);
}

/**
 * Runs the layer unfused: `out[token] = Σ topkWeight * scalingFactor * (requant(silu(gate) * up)
 * · w2[e]ᵀ)` over the token's slots. Unlike the fused kernel, `out` is overwritten (it need not
 * be zero). `workspace` is any device buffer of at least {@link unfusedWorkspaceBytes} bytes.
 * Asynchronous on `options.stream`.
 *
 * @throws {InvalidArgumentError} for a wrong dtype or shape, a small workspace, a bad blockM
 * @throws {UnsupportedError} when the loaded library lacks the baseline
 */
export function unfusedMoeW8A8(
  tensors: FusedMoeTensors<DeviceBuffer>,
  workspace: DeviceBuffer,
  options: UnfusedMoeOptions,
): void {
  const fn = symbols().amoe_unfused_moe_w8a8;
  if (fn === null) throw new UnsupportedError(REBUILD);
  const { topK, blockM } = options;
  const scalingFactor = options.scalingFactor ?? 1;
  if (!Number.isFinite(scalingFactor)) {
    throw new InvalidArgumentError(`scalingFactor must be finite, got ${scalingFactor}`);
  }
  // The shape checks of the fused kernel; its tile parameters do not matter here.
  const d = validateFusedMoeArgs(tensors, topK, { blockM, blockN: 32, warpN: 8, stages: 1 });
  const need = unfusedWorkspaceBytes({ M: d.M, K: d.K, N: d.N, topK });
  if (workspace.bytes < need) {
    throw new InvalidArgumentError(
      `workspace has ${workspace.bytes} bytes; M=${d.M} K=${d.K} N=${d.N} topK=${topK} needs ` +
        `${need} (unfusedWorkspaceBytes)`,
    );
  }
  const t = tensors;
  const stream = streamHandle(options.stream);
  const p = [...kernelPointers(t), workspace.pointer];
  unwrap(
    fn(
      p[0],
      p[1],
      p[2],
      p[3],
      p[4],
      p[5],
      p[6],
      p[7],
      p[8],
      p[9],
      p[10],
      p[11],
      BigInt(workspace.bytes),
      d.M,
      d.K,
      d.N,
      d.numExperts,
      topK,
      d.sortedLen,
      blockM,
      scalingFactor,
      stream,
    ),
  );
}

/**
 * {@link unfusedMoeW8A8} on a {@link DeviceMoeProblem}, with its routing aligned for `blockM`,
 * writing {@link DeviceMoeProblem.out}.
 */
export function runUnfusedMoe(
  problem: DeviceMoeProblem,
  blockM: number,
  workspace: DeviceBuffer,
  options: { stream?: Stream } = {},
): void {
  unfusedMoeW8A8(problem.tensors(blockM), workspace, {
    topK: problem.topK,
    blockM,
    scalingFactor: problem.scalingFactor,
    stream: options.stream,
  });
}
