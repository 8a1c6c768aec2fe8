/**
 * The launch wrapper of the fused FP8 MoE kernel, with the seed's arguments.
 *
 * Shapes and dtypes are checked in TypeScript before any native call (see
 * {@link validateFusedMoeArgs}, which needs no GPU); the native entry validates again and
 * checks what only it knows (shared memory of the device, pointer alignment).
 *
 * @module
 */
import { InvalidArgumentError, unwrap } from "../ffi/errors.ts";
import { symbols } from "../ffi/library.ts";
import type { DeviceBuffer, DType } from "./buffer.ts";
import { configProblem, type KernelConfig } from "./config.ts";
import { type Stream, streamHandle } from "./device.ts";
import { tiledDownRows } from "./tiles.ts";

/**
 * How the weights `w` and `w2` are stored: `"rows"`, row-major (the seed's and vLLM's layout),
 * or `"tiles"`, the kernel's tiles stored contiguously (`tileUpWeights`, `tileDownWeights`;
 * `w2` then has `tiledDownRows(K)` rows), 2-4 % faster where the layer is bound by memory.
 */
export type WeightLayout = "rows" | "tiles";

/** Anything with a dtype and a shape: a {@link DeviceBuffer}, or a plain description. */
export interface TensorLike {
  /** Element type. */
  readonly dtype: DType;
  /** Dimensions, outermost first. */
  readonly shape: readonly number[];
}

/** The kernel's tensors, described by dtype and shape. */
export interface FusedMoeTensors<T extends TensorLike = TensorLike> {
  /** `fp8_e4m3 [M, K]` quantised activations. */
  x: T;
  /** `f32 [M, K/128]` per-token-group activation scales. */
  xScale: T;
  /** `fp8_e4m3 [E, N, K]` gate/up weights, rows interleaved in chunks of 8. */
  w: T;
  /** `f32 [E, N/128, K/128]` block scales of `w`, interleaved in chunks of 1. */
  wScale: T;
  /** `fp8_e4m3 [E, K, N/2]` down-projection weights (`[E, tiledDownRows(K), N/2]` as tiles). */
  w2: T;
  /** `f32 [E, K/128, N/256]` block scales of `w2`. */
  w2Scale: T;
  /** `i32 [sorted_len]` from moe_align_block_size (padding = M * topK). */
  sortedTokenIds: T;
  /** `i32 [>= ceil(sorted_len / blockM)]` expert of each block, -1 to skip it. */
  expertIds: T;
  /** `i32 [1]` rows of `sortedTokenIds` in use (a multiple of blockM). */
  numTokensPostPadded: T;
  /** `f32 [M, topK]` routing weights. */
  topkWeights: T;
  /** `bf16 [M, K]` output; the kernel adds into it. */
  out: T;
}

/** Sizes read off the tensors by {@link validateFusedMoeArgs}. */
export interface FusedMoeDims {
  /** Tokens. */
  M: number;
  /** Hidden size. */
  K: number;
  /** Up-projection rows (2 x intermediate size). */
  N: number;
  /** Experts. */
  numExperts: number;
  /** Experts per token. */
  topK: number;
  /** Length of `sortedTokenIds`. */
  sortedLen: number;
}

function shapeText(t: TensorLike): string {
  return `${t.dtype} [${t.shape.join(", ")}]`;
}

function expect(name: string, t: TensorLike, dtype: DType, shape: readonly number[]): void {
  const same = t.dtype === dtype && t.shape.length === shape.length &&
    t.shape.every((d, i) => d === shape[i]);
  if (!same) {
    throw new InvalidArgumentError(
      `${name} is ${shapeText(t)}, expected ${dtype} [${shape.join(", ")}]`,
    );
  }
}

function rank(name: string, t: TensorLike, dims: number, dtype: DType): void {
  if (t.dtype !== dtype || t.shape.length !== dims) {
    throw new InvalidArgumentError(
      `${name} is ${shapeText(t)}, expected a ${dims}-d ${dtype} tensor`,
    );
  }
}

/**
 * Checks dtypes, shapes and the config of a fused MoE call and returns its sizes.
 *
 * @throws {InvalidArgumentError} naming the first tensor or value that does not fit
 */
export function validateFusedMoeArgs(
  t: FusedMoeTensors,
  topK: number,
  config: KernelConfig,
  weightLayout: WeightLayout = "rows",
): FusedMoeDims {
  if (weightLayout !== "rows" && weightLayout !== "tiles") {
    throw new InvalidArgumentError(`weightLayout must be "rows" or "tiles", got ${weightLayout}`);
  }
  rank("x", t.x, 2, "fp8_e4m3");
  rank("w", t.w, 3, "fp8_e4m3");
  const [M, K] = t.x.shape;
  const [E, N] = t.w.shape;
  if (K % 128 !== 0 || K === 0) {
    throw new InvalidArgumentError(`K (${K}) must be a positive multiple of 128`);
  }
  if (N % 256 !== 0 || N === 0) {
    throw new InvalidArgumentError(`N (${N}) must be a positive multiple of 256`);
  }
  if (!Number.isSafeInteger(topK) || topK < 1) {
    throw new InvalidArgumentError(`topK must be a positive integer, got ${topK}`);
  }
  const problem = configProblem(config);
  if (problem !== undefined) throw new InvalidArgumentError(`bad kernel config: ${problem}`);
  expect("w", t.w, "fp8_e4m3", [E, N, K]);
  expect("xScale", t.xScale, "f32", [M, K / 128]);
  expect("wScale", t.wScale, "f32", [E, N / 128, K / 128]);
  expect("w2", t.w2, "fp8_e4m3", [E, weightLayout === "tiles" ? tiledDownRows(K) : K, N / 2]);
  expect("w2Scale", t.w2Scale, "f32", [E, K / 128, N / 256]);
  rank("sortedTokenIds", t.sortedTokenIds, 1, "i32");
  const sortedLen = t.sortedTokenIds.shape[0];
  rank("expertIds", t.expertIds, 1, "i32");
  const blocks = Math.ceil(sortedLen / config.blockM);
  if (t.expertIds.shape[0] < blocks) {
    throw new InvalidArgumentError(
      `expertIds has ${t.expertIds.shape[0]} entries; ${sortedLen} sorted ids in blocks of ` +
        `${config.blockM} need ${blocks} (was the layout aligned for another blockM?)`,
    );
  }
  expect("numTokensPostPadded", t.numTokensPostPadded, "i32", [1]);
  expect("topkWeights", t.topkWeights, "f32", [M, topK]);
  expect("out", t.out, "bf16", [M, K]);
  return { M, K, N, numExperts: E, topK, sortedLen };
}

/**
 * The device pointers of the kernel's eleven tensors, in the C ABI's argument order. Reading
 * every pointer first turns a freed buffer into an error before anything is queued.
 */
export function kernelPointers(t: FusedMoeTensors<DeviceBuffer>): Deno.PointerValue[] {
  return [
    t.x,
    t.xScale,
    t.w,
    t.wScale,
    t.w2,
    t.w2Scale,
    t.sortedTokenIds,
    t.expertIds,
    t.numTokensPostPadded,
    t.topkWeights,
    t.out,
  ].map((b) => b.pointer);
}

/** Options of {@link fusedMoeW8A8UpDown}. */
export interface FusedMoeOptions {
  /** Experts per token. */
  topK: number;
  /** Kernel tuning parameters (see `selectConfig`). */
  config: KernelConfig;
  /** Multiplies every expert's contribution (routed scaling factor); default 1. */
  scalingFactor?: number;
  /** Stream to enqueue on; default the legacy default stream. */
  stream?: Stream;
  /** true when `out` is already zero; otherwise it is zeroed first, on the same stream. */
  outIsZeroed?: boolean;
  /** How `w` and `w2` are stored; default `"rows"`. */
  weightLayout?: WeightLayout;
}

/**
 * The whole MoE layer in one launch: `out[token] += topkWeight * scalingFactor *
 * (requant(silu(gate) * up) · w2[e]ᵀ)` for every (token, slot) routed to expert `e`,
 * with FP8 e4m3 operands and f32 block scales (the seed's `fused_moe_w8a8_up_down`).
 *
 * Asynchronous: it returns once the work is enqueued on `stream`.
 *
 * @throws {InvalidArgumentError} for a wrong dtype or shape, a freed buffer, a bad config
 * @throws {UnsupportedError} for a config the device cannot run (e.g. shared memory)
 */
export function fusedMoeW8A8UpDown(
  tensors: FusedMoeTensors<DeviceBuffer>,
  options: FusedMoeOptions,
): void {
  const { topK, config } = options;
  const scalingFactor = options.scalingFactor ?? 1;
  if (!Number.isFinite(scalingFactor)) {
    throw new InvalidArgumentError(`scalingFactor must be finite, got ${scalingFactor}`);
  }
  const layout = options.weightLayout ?? "rows";
  const d = validateFusedMoeArgs(tensors, topK, config, layout);
  const t = tensors;
  const stream = streamHandle(options.stream);
  const ptrs = kernelPointers(t);
  if (!options.outIsZeroed) t.out.zero(options.stream);
  unwrap(
    symbols().amoe_fused_moe_w8a8_up_down(
      ptrs[0],
      ptrs[1],
      ptrs[2],
      ptrs[3],
      ptrs[4],
      ptrs[5],
      ptrs[6],
      ptrs[7],
      ptrs[8],
      ptrs[9],
      ptrs[10],
      d.M,
      d.K,
      d.N,
      d.numExperts,
      topK,
      d.sortedLen,
      config.blockM,
      config.blockN,
      config.warpN,
      config.stages,
      config.split ?? 1,
      config.allSlices ? 1 : 0,
      config.splitN ?? 1,
      config.tailSplit ?? 1,
      layout === "tiles" ? 1 : 0,
      scalingFactor,
      stream,
    ),
  );
}

/**
 * Asks the native library whether it can run `config` for hidden size `K` and `N` up-projection
 * rows on the current device (shared memory included), without launching anything.
 *
 * @throws {UnsupportedError} with the valid values when it cannot
 */
export function checkKernelConfig(K: number, N: number, config: KernelConfig): void {
  unwrap(
    symbols().amoe_fused_moe_check_config(
      K,
      N,
      config.blockM,
      config.blockN,
      config.warpN,
      config.stages,
      config.split ?? 1,
      config.allSlices ? 1 : 0,
      config.splitN ?? 1,
      config.tailSplit ?? 1,
    ),
  );
}
