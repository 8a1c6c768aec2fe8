/**
 * The steps before the fused kernel, on the GPU: top-k routing from router logits
 * ({@link routeTopK}: softmax top-k, or DeepSeek-V3's grouped sigmoid top-k with correction
 * bias), SGLang's `moe_align_block_size` ({@link alignBlockSize}) and per-token-group FP8
 * quantisation of bf16 activations ({@link quantizeFp8}); all three in one launch for small
 * batches ({@link moePrologue}); plus the CPU reference of the routing
 * ({@link routeTopKReference}; the references of the other two are `moeAlignBlockSize` and
 * `quantizePerTokenGroup` in `./reference.ts`).
 *
 * Every GPU function checks dtypes and shapes here first (an {@link InvalidArgumentError}
 * naming the tensor), then enqueues its work on the given stream and returns: no allocation,
 * no synchronisation.
 *
 * **Ties.** Every selection prefers the larger value and, between equal values, the lower
 * index (expert or group), on the GPU and in the reference alike. Ids come out in order of
 * choice.
 *
 * **Routed scaling factor.** The fused kernel multiplies every slot's weight by its
 * `scalingFactor`. To apply DeepSeek's `routed_scaling_factor` exactly once, leave
 * `weightScale` at 1 here, give a shared expert the weight `1 / routed_scaling_factor`, and pass
 * the factor to the kernel (this is what `MoeLayer` does). Pass it as `weightScale` only for a
 * consumer that does not scale.
 *
 * @module
 */
import { InvalidArgumentError, UnsupportedError, unwrap } from "../ffi/errors.ts";
import { symbols } from "../ffi/library.ts";
import type { DeviceBuffer, DType } from "./buffer.ts";
import { type Stream, streamHandle } from "./device.ts";

/** Softmax top-k routing (Mixtral, Qwen2/3-MoE). */
export interface SoftmaxRouting {
  /** Discriminant. */
  kind: "softmax";
  /** Experts chosen per token. */
  topK: number;
  /** Renormalise the chosen probabilities to sum 1 (`norm_topk_prob`); default true. */
  renormalize?: boolean;
}

/** DeepSeek-V3 routing: sigmoid scores, correction bias, grouped top-k (`noaux_tc`). */
export interface GroupedRouting {
  /** Discriminant. */
  kind: "grouped";
  /** Experts chosen per token (`num_experts_per_tok`). */
  topK: number;
  /** Groups the experts form (`n_group`); must divide the expert count; at most 32. */
  nGroup: number;
  /** Groups kept per token (`topk_group`). */
  topkGroup: number;
  /** Normalise the chosen scores to sum 1 (`norm_topk_prob`); default true. */
  renormalize?: boolean;
}

/** How tokens are routed. */
export type RoutingMethod = SoftmaxRouting | GroupedRouting;

/** An extra slot appended to every token's row (SGLang's fused shared expert). */
export interface SharedExpertSlot {
  /** Its expert id (the last expert: the routed count). */
  id: number;
  /** Its weight (`1 / routed_scaling_factor` when the kernel applies the factor). */
  weight: number;
}

/** Options of {@link routeTopK} and {@link routeTopKReference}. */
export interface RouteOptions {
  /** Multiplies every routed weight (not the shared slot's); default 1. */
  weightScale?: number;
  /** Appends this slot to every row. */
  sharedExpert?: SharedExpertSlot;
}

/** Largest expert count the routing kernels take. */
export const MAX_ROUTING_EXPERTS = 512;
/** Largest top-k the routing kernels take. */
export const MAX_TOP_K = 32;
/** Largest group count of grouped routing. */
export const MAX_GROUPS = 32;
/** Largest expert count of {@link alignBlockSize}. */
export const MAX_ALIGN_EXPERTS = 512;
/** Group width of {@link quantizeFp8}. */
export const QUANT_GROUP = 128;
/** Largest slot count (`M · width`) of {@link moePrologue} (`AMOE_PROLOGUE_MAX_SLOTS`). */
export const MAX_PROLOGUE_SLOTS = 4096;

/** Slots per token row: `topK`, plus one with a shared expert. */
export function routingWidth(method: RoutingMethod, sharedExpert?: SharedExpertSlot): number {
  return method.topK + (sharedExpert ? 1 : 0);
}

function isInt(v: number): boolean {
  return Number.isSafeInteger(v);
}

/**
 * Checks a routing method against `numExperts`; throws an {@link InvalidArgumentError} saying
 * what does not fit.
 */
export function checkRouting(
  method: RoutingMethod,
  numExperts: number,
  options: RouteOptions = {},
): void {
  const E = numExperts;
  if (!isInt(E) || E < 1 || E > MAX_ROUTING_EXPERTS) {
    throw new InvalidArgumentError(
      `routing: the expert count must be an integer in 1..${MAX_ROUTING_EXPERTS}, got ${E}`,
    );
  }
  const { topK } = method;
  if (!isInt(topK) || topK < 1 || topK > Math.min(MAX_TOP_K, E)) {
    throw new InvalidArgumentError(
      `routing: topK must be an integer in 1..${Math.min(MAX_TOP_K, E)}, got ${topK}`,
    );
  }
  if (method.kind === "grouped") {
    const { nGroup, topkGroup } = method;
    if (!isInt(nGroup) || nGroup < 1 || nGroup > MAX_GROUPS || E % nGroup !== 0) {
      throw new InvalidArgumentError(
        `routing: nGroup must divide the expert count (${E}) and be in 1..${MAX_GROUPS}, ` +
          `got ${nGroup}`,
      );
    }
    if (!isInt(topkGroup) || topkGroup < 1 || topkGroup > nGroup) {
      throw new InvalidArgumentError(
        `routing: topkGroup must be an integer in 1..nGroup (${nGroup}), got ${topkGroup}`,
      );
    }
    if (topK > topkGroup * (E / nGroup)) {
      throw new InvalidArgumentError(
        `routing: topK (${topK}) is more than the ${topkGroup * (E / nGroup)} experts of ` +
          `${topkGroup} groups of ${E / nGroup}`,
      );
    }
  } else if (method.kind !== "softmax") {
    throw new InvalidArgumentError(
      `routing: unknown kind ${JSON.stringify((method as { kind: unknown }).kind)}: ` +
        `"softmax" or "grouped"`,
    );
  }
  const scale = options.weightScale ?? 1;
  if (!Number.isFinite(scale)) {
    throw new InvalidArgumentError(`routing: weightScale must be finite, got ${scale}`);
  }
  const shared = options.sharedExpert;
  if (shared) {
    if (!isInt(shared.id) || shared.id < 0 || shared.id > 0x7fffffff) {
      throw new InvalidArgumentError(
        `routing: sharedExpert.id must be a non-negative integer, got ${shared.id}`,
      );
    }
    if (!Number.isFinite(shared.weight)) {
      throw new InvalidArgumentError(
        `routing: sharedExpert.weight must be finite, got ${shared.weight}`,
      );
    }
  }
}

// ---- CPU reference ----

/** Ids and weights of a routing, `[M, width]` row-major. */
export interface TopKRouting {
  /** Expert of each slot, in order of choice (the shared slot last). */
  topkIds: Int32Array;
  /** Weight of each slot. */
  topkWeights: Float32Array;
  /** Slots per row. */
  width: number;
}

const f32 = Math.fround;

/** Picks `k` of `values` (indexes `offset..offset+count-1` allowed by `allowed`): larger value
 * first, lower index on ties. Writes the picks into `out` in order of choice. */
function pickTop(
  values: Float32Array | Float64Array,
  offset: number,
  count: number,
  k: number,
  allowed: (i: number) => boolean,
  taken: Uint8Array,
  out: Int32Array,
): void {
  taken.fill(0, 0, count);
  for (let r = 0; r < k; r++) {
    let best = -1;
    let bv = -Infinity;
    for (let i = 0; i < count; i++) {
      if (taken[i] || !allowed(i)) continue;
      const v = values[offset + i];
      if (best < 0 || v > bv) {
        best = i;
        bv = v;
      }
    }
    taken[best] = 1;
    out[r] = best;
  }
}

/**
 * The routing of {@link routeTopK} on the CPU: the same choices (ties to the lower index) and
 * the same float32 arithmetic, with the transcendental parts (exp, sigmoid) in float64 rounded
 * once, as the kernels compute them. NaN logits (and NaN group scores, from an infinite bias)
 * count as -Infinity for the choice.
 *
 * @param logits `[M, numExperts]` router logits
 * @param bias `[numExperts]` correction bias (grouped routing only; default none)
 * @throws {InvalidArgumentError} for a method that does not fit `numExperts`, or wrong lengths
 */
export function routeTopKReference(
  logits: Float32Array,
  M: number,
  numExperts: number,
  method: RoutingMethod,
  options: RouteOptions & { bias?: Float32Array } = {},
): TopKRouting {
  checkRouting(method, numExperts, options);
  const E = numExperts;
  if (!isInt(M) || M < 0 || logits.length !== M * E) {
    throw new InvalidArgumentError(
      `routeTopKReference: logits has ${logits.length} elements, [M=${M}, E=${E}] needs ${M * E}`,
    );
  }
  const bias = options.bias;
  if (bias !== undefined && bias.length !== E) {
    throw new InvalidArgumentError(
      `routeTopKReference: bias has ${bias.length} elements, not ${E}`,
    );
  }
  const { topK } = method;
  const shared = options.sharedExpert;
  const width = topK + (shared ? 1 : 0);
  const scale = f32(options.weightScale ?? 1);
  const renormalize = method.renormalize ?? true;
  const topkIds = new Int32Array(M * width);
  const topkWeights = new Float32Array(M * width);
  const choice = new Float32Array(E);
  const score = new Float32Array(E);
  const taken = new Uint8Array(E);
  const picks = new Int32Array(topK);
  const weights = new Float32Array(topK);
  const grouped = method.kind === "grouped";
  const nGroup = grouped ? method.nGroup : 1;
  const groupSize = E / nGroup;
  const groupScore = new Float32Array(nGroup);
  const groupPicks = new Int32Array(nGroup);
  const keep = new Uint8Array(nGroup);

  for (let t = 0; t < M; t++) {
    const row = t * E;
    if (!grouped) {
      let m = -Infinity;
      for (let e = 0; e < E; e++) {
        const v = logits[row + e];
        choice[e] = v !== v ? -Infinity : v;
        if (choice[e] > m) m = choice[e];
      }
      let sum = 0;
      for (let e = 0; e < E; e++) sum += Math.exp(f32(choice[e] - m));
      pickTop(choice, 0, E, topK, () => true, taken, picks);
      for (let k = 0; k < topK; k++) {
        weights[k] = f32(Math.exp(f32(choice[picks[k]] - m)) / sum);
      }
    } else {
      for (let e = 0; e < E; e++) {
        const s = f32(1 / (1 + Math.exp(-logits[row + e])));
        score[e] = s;
        const c = f32(s + (bias ? bias[e] : 0));
        choice[e] = c !== c ? -Infinity : c;
      }
      for (let g = 0; g < nGroup; g++) {
        let t1 = -Infinity;
        let t2 = -Infinity;
        for (let j = 0; j < groupSize; j++) {
          const x = choice[g * groupSize + j];
          if (x > t1) {
            t2 = t1;
            t1 = x;
          } else if (x > t2) {
            t2 = x;
          }
        }
        const gs = groupSize >= 2 ? f32(t1 + t2) : t1;
        groupScore[g] = gs !== gs ? -Infinity : gs; // +inf + -inf: NaN counts as -inf
      }
      pickTop(
        groupScore,
        0,
        nGroup,
        method.topkGroup,
        () => true,
        new Uint8Array(nGroup),
        groupPicks,
      );
      keep.fill(0);
      for (let k = 0; k < method.topkGroup; k++) keep[groupPicks[k]] = 1;
      pickTop(choice, 0, E, topK, (e) => keep[Math.floor(e / groupSize)] === 1, taken, picks);
      for (let k = 0; k < topK; k++) weights[k] = score[picks[k]];
    }
    let chosen = 0;
    for (let k = 0; k < topK; k++) chosen = f32(chosen + weights[k]);
    for (let k = 0; k < topK; k++) {
      const w = renormalize ? f32(weights[k] / chosen) : weights[k];
      topkIds[t * width + k] = picks[k];
      topkWeights[t * width + k] = f32(w * scale);
    }
    if (shared) {
      topkIds[t * width + topK] = shared.id;
      topkWeights[t * width + topK] = f32(shared.weight);
    }
  }
  return { topkIds, topkWeights, width };
}

// ---- GPU ----

interface Tensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly numel: number;
}

function describe(t: Tensor): string {
  return `${t.dtype} [${t.shape.join(", ")}]`;
}

function expectShape(name: string, t: Tensor, dtype: DType, shape: readonly number[]): void {
  const same = t.dtype === dtype && t.shape.length === shape.length &&
    t.shape.every((d, i) => d === shape[i]);
  if (!same) {
    throw new InvalidArgumentError(
      `${name} is ${describe(t)}, expected ${dtype} [${shape.join(", ")}]`,
    );
  }
}

function expectMatrix(name: string, t: Tensor, dtype: DType): [number, number] {
  if (t.dtype !== dtype || t.shape.length !== 2) {
    throw new InvalidArgumentError(`${name} is ${describe(t)}, expected a 2-d ${dtype} tensor`);
  }
  return [t.shape[0], t.shape[1]];
}

/** Output buffers of {@link routeTopK}: `i32` and `f32`, both `[M, width]`. */
export interface RoutingBuffers {
  /** `i32 [M, width]` chosen experts. */
  topkIds: DeviceBuffer<"i32">;
  /** `f32 [M, width]` their weights. */
  topkWeights: DeviceBuffer<"f32">;
}

/**
 * Routes every token on the GPU: `logits` `f32 [M, E]` to `out.topkIds` / `out.topkWeights`
 * (`[M, width]`, {@link routingWidth}). Grouped routing takes the correction bias as an
 * `f32 [E]` buffer (`options.bias`; none means zero). Asynchronous on `options.stream`.
 *
 * @throws {InvalidArgumentError} for a wrong dtype or shape (naming the buffer), a method that
 * does not fit E, a freed buffer
 */
export function routeTopK(
  logits: DeviceBuffer<"f32">,
  method: RoutingMethod,
  out: RoutingBuffers,
  options: RouteOptions & { bias?: DeviceBuffer<"f32">; stream?: Stream } = {},
): void {
  const [M, E] = expectMatrix("logits", logits, "f32");
  checkRouting(method, E, options);
  const width = routingWidth(method, options.sharedExpert);
  expectShape("topkIds", out.topkIds, "i32", [M, width]);
  expectShape("topkWeights", out.topkWeights, "f32", [M, width]);
  const renormalize = (method.renormalize ?? true) ? 1 : 0;
  const scale = options.weightScale ?? 1;
  const sharedId = options.sharedExpert?.id ?? -1;
  const sharedWeight = options.sharedExpert?.weight ?? 0;
  const stream = streamHandle(options.stream);
  const lib = symbols();
  if (method.kind === "softmax") {
    if (options.bias !== undefined) {
      throw new InvalidArgumentError("routing: a correction bias applies to grouped routing only");
    }
    unwrap(
      lib.amoe_topk_softmax(
        logits.pointer,
        M,
        E,
        method.topK,
        renormalize,
        scale,
        sharedId,
        sharedWeight,
        out.topkIds.pointer,
        out.topkWeights.pointer,
        stream,
      ),
    );
    return;
  }
  if (options.bias !== undefined) expectShape("bias", options.bias, "f32", [E]);
  unwrap(
    lib.amoe_topk_grouped_sigmoid(
      logits.pointer,
      options.bias?.pointer ?? null,
      M,
      E,
      method.nGroup,
      method.topkGroup,
      method.topK,
      renormalize,
      scale,
      sharedId,
      sharedWeight,
      out.topkIds.pointer,
      out.topkWeights.pointer,
      stream,
    ),
  );
}

/** Sizes of an aligned layout (SGLang's): `sortedLen = numSlots + numExperts * (blockM - 1)`,
 * `numBlocks = ceil(sortedLen / blockM)`. */
export function alignedSizes(
  numSlots: number,
  numExperts: number,
  blockM: number,
): { sortedLen: number; numBlocks: number } {
  for (const [name, v] of Object.entries({ numSlots, numExperts, blockM })) {
    if (!isInt(v) || v < (name === "numSlots" ? 0 : 1)) {
      throw new InvalidArgumentError(`alignedSizes: ${name} must be a valid integer, got ${v}`);
    }
  }
  const sortedLen = numSlots + numExperts * (blockM - 1);
  return { sortedLen, numBlocks: Math.ceil(sortedLen / blockM) };
}

/** Bytes of workspace {@link alignBlockSize} needs for `numSlots` slots over `numExperts`
 * experts (0 up to 8192 slots: one launch; more take three and a workspace). */
export function alignWorkspaceBytes(numSlots: number, numExperts: number): number {
  const out = new BigUint64Array(1);
  unwrap(symbols().amoe_moe_align_workspace_bytes(numSlots, numExperts, out));
  return Number(out[0]);
}

/** Output buffers of {@link alignBlockSize}. */
export interface AlignBuffers {
  /** `i32 [>= sortedLen]` ({@link alignedSizes}). */
  sortedTokenIds: DeviceBuffer<"i32">;
  /** `i32 [>= numBlocks]`. */
  expertIds: DeviceBuffer<"i32">;
  /** `i32 [1]`. */
  numTokensPostPadded: DeviceBuffer<"i32">;
  /** At least {@link alignWorkspaceBytes} bytes (any dtype); may be absent when that is 0. */
  workspace?: DeviceBuffer;
}

/** Checks the aligned-layout outputs a launch writes: sizes from {@link alignedSizes}. */
function checkAlignOutputs(
  out: Pick<AlignBuffers, "sortedTokenIds" | "expertIds" | "numTokensPostPadded">,
  numSlots: number,
  numExperts: number,
  blockM: number,
  sortedLen: number,
  numBlocks: number,
): void {
  const check = (name: string, t: Tensor, min: number): void => {
    if (t.dtype !== "i32" || t.shape.length !== 1 || t.numel < min) {
      throw new InvalidArgumentError(
        `${name} is ${describe(t)}, expected i32 [>= ${min}] (${numSlots} slots, ` +
          `${numExperts} experts, blockM ${blockM})`,
      );
    }
  };
  check("sortedTokenIds", out.sortedTokenIds, sortedLen);
  check("expertIds", out.expertIds, numBlocks);
  expectShape("numTokensPostPadded", out.numTokensPostPadded, "i32", [1]);
}

/**
 * SGLang's `moe_align_block_size` on the GPU, deterministic: the slots of `topkIds` (any shape;
 * `numel` = M·top_k slots) grouped by expert, ascending within an expert, each run padded to
 * a multiple of `blockM` with the value `numel`; `expertIds` gets each block's expert (0 past
 * the used blocks), `numTokensPostPadded` the used length. Ids outside `0..numExperts-1` are
 * skipped. Equal to `moeAlignBlockSize` of `./reference.ts`, entry for entry. Asynchronous.
 *
 * @throws {InvalidArgumentError} for a wrong dtype, a buffer too short, a missing workspace
 */
export function alignBlockSize(
  topkIds: DeviceBuffer<"i32">,
  numExperts: number,
  blockM: number,
  out: AlignBuffers,
  stream?: Stream,
): void {
  if (topkIds.dtype !== "i32") {
    throw new InvalidArgumentError(`topkIds is ${describe(topkIds)}, expected an i32 tensor`);
  }
  if (!isInt(numExperts) || numExperts < 1 || numExperts > MAX_ALIGN_EXPERTS) {
    throw new InvalidArgumentError(
      `alignBlockSize: numExperts must be an integer in 1..${MAX_ALIGN_EXPERTS}, got ${numExperts}`,
    );
  }
  if (!isInt(blockM) || blockM < 1 || blockM > 1024) {
    throw new InvalidArgumentError(`alignBlockSize: blockM must be in 1..1024, got ${blockM}`);
  }
  const numSlots = topkIds.numel;
  const { sortedLen, numBlocks } = alignedSizes(numSlots, numExperts, blockM);
  checkAlignOutputs(out, numSlots, numExperts, blockM, sortedLen, numBlocks);
  const workspace = out.workspace;
  unwrap(
    symbols().amoe_moe_align_block_size(
      topkIds.pointer,
      numSlots,
      numExperts,
      blockM,
      out.sortedTokenIds.pointer,
      out.sortedTokenIds.numel,
      out.expertIds.pointer,
      out.expertIds.numel,
      out.numTokensPostPadded.pointer,
      workspace?.pointer ?? null,
      BigInt(workspace?.bytes ?? 0),
      streamHandle(stream),
    ),
  );
}

/** Output buffers of {@link quantizeFp8}. */
export interface QuantBuffers {
  /** `fp8_e4m3 [M, K]` codes. */
  q: DeviceBuffer<"fp8_e4m3">;
  /** `f32 [M, K/128]` scales, row-major (the fused kernel's `xScale`). */
  scale: DeviceBuffer<"f32">;
  /** `bf16 [M, K]`, set to zero in the same pass (the fused kernel's output); optional. */
  zeroOut?: DeviceBuffer<"bf16">;
}

/**
 * Per-token-group FP8 quantisation of `x` `bf16 [M, K]` (group 128, `scale = max(amax,
 * 1e-10) / 448`, `q = e4m3(x / scale)` saturated, round to nearest even): bit-exact with
 * `quantizePerTokenGroup` of `./reference.ts` on the bf16 values. With `out.zeroOut` it also
 * zeroes that buffer in the same pass (the layer's output, saving a memset launch).
 * Asynchronous.
 *
 * @throws {InvalidArgumentError} for a wrong dtype or shape, K not a multiple of 128
 */
export function quantizeFp8(x: DeviceBuffer<"bf16">, out: QuantBuffers, stream?: Stream): void {
  const [M, K] = expectMatrix("x", x, "bf16");
  if (K === 0 || K % QUANT_GROUP !== 0) {
    throw new InvalidArgumentError(`x: K (${K}) must be a positive multiple of ${QUANT_GROUP}`);
  }
  expectShape("q", out.q, "fp8_e4m3", [M, K]);
  expectShape("scale", out.scale, "f32", [M, K / QUANT_GROUP]);
  if (out.zeroOut !== undefined) {
    expectShape("zeroOut", out.zeroOut, "bf16", [M, K]);
    if (out.zeroOut === x) throw new InvalidArgumentError("zeroOut must not be x itself");
  }
  unwrap(
    symbols().amoe_quant_fp8_per_token_group(
      x.pointer,
      M,
      K,
      out.q.pointer,
      out.scale.pointer,
      out.zeroOut?.pointer ?? null,
      streamHandle(stream),
    ),
  );
}

// ---- all three in one launch ----

/** Output buffers of {@link moePrologue}: those of {@link routeTopK}, {@link alignBlockSize}
 * (no workspace) and {@link quantizeFp8}. */
export interface PrologueBuffers
  extends RoutingBuffers, Omit<AlignBuffers, "workspace">, QuantBuffers {}

/** Options of {@link moePrologue}. */
export interface PrologueOptions extends RouteOptions {
  /** Experts of the aligned layout: the routed ones, plus one for a shared expert slot. */
  numExperts: number;
  /** Block size of the aligned layout (the fused kernel's `blockM`). */
  blockM: number;
  /** `f32 [E]` correction bias of grouped routing; none means zero. */
  bias?: DeviceBuffer<"f32">;
  /** The stream; default the legacy default stream. */
  stream?: Stream;
}

/** Whether the loaded library has {@link moePrologue} (a library built before it lacks it). */
export function prologueAvailable(): boolean {
  return symbols().amoe_moe_prologue !== null;
}

/**
 * Whether {@link moePrologue} takes `M` tokens of `width` slots (`M · width` at most
 * {@link MAX_PROLOGUE_SLOTS}) over `numExperts` experts (at most {@link MAX_ALIGN_EXPERTS}), and
 * the loaded library has it.
 */
export function prologueFits(M: number, width: number, numExperts: number): boolean {
  return M * width <= MAX_PROLOGUE_SLOTS && numExperts <= MAX_ALIGN_EXPERTS &&
    prologueAvailable();
}

/**
 * {@link routeTopK}, then {@link alignBlockSize} of the ids it wrote (over
 * `options.numExperts` experts, blocks of `options.blockM`), and {@link quantizeFp8} of
 * `hidden` (zeroing `out.zeroOut` if given), in one launch: block 0 routes the tokens (a warp
 * per token) and lays out the slots, the other blocks quantise meanwhile. Every output equals,
 * bit for bit, that of the three functions called in turn. Fastest for a few dozen tokens at
 * most (the routing runs in one block); takes up to {@link MAX_PROLOGUE_SLOTS} slots.
 * Asynchronous on `options.stream`.
 *
 * @param logits `f32 [M, E]` router logits
 * @param hidden `bf16 [M, K]` activations, K a multiple of 128
 * @throws {InvalidArgumentError} for a wrong dtype or shape (naming the buffer), a method that
 * does not fit E, a bias with softmax routing
 * @throws {UnsupportedError} for more than {@link MAX_PROLOGUE_SLOTS} slots, or a library built
 * without the prologue
 */
export function moePrologue(
  logits: DeviceBuffer<"f32">,
  hidden: DeviceBuffer<"bf16">,
  method: RoutingMethod,
  out: PrologueBuffers,
  options: PrologueOptions,
): void {
  const fn = symbols().amoe_moe_prologue;
  if (fn === null) {
    throw new UnsupportedError(
      "this libalpha_moe was built without amoe_moe_prologue: rebuild it with `deno task build`",
    );
  }
  const [M, E] = expectMatrix("logits", logits, "f32");
  checkRouting(method, E, options);
  const width = routingWidth(method, options.sharedExpert);
  expectShape("topkIds", out.topkIds, "i32", [M, width]);
  expectShape("topkWeights", out.topkWeights, "f32", [M, width]);
  if (method.kind === "softmax" && options.bias !== undefined) {
    throw new InvalidArgumentError("routing: a correction bias applies to grouped routing only");
  }
  if (options.bias !== undefined) expectShape("bias", options.bias, "f32", [E]);
  const numSlots = M * width;
  if (numSlots > MAX_PROLOGUE_SLOTS) {
    throw new UnsupportedError(
      `moePrologue: ${numSlots} slots (M ${M} x ${width}) are more than ${MAX_PROLOGUE_SLOTS}: ` +
        "use routeTopK, alignBlockSize and quantizeFp8",
    );
  }
  const { numExperts, blockM } = options;
  if (!isInt(numExperts) || numExperts < 1 || numExperts > MAX_ALIGN_EXPERTS) {
    throw new InvalidArgumentError(
      `moePrologue: numExperts must be an integer in 1..${MAX_ALIGN_EXPERTS}, got ${numExperts}`,
    );
  }
  if (!isInt(blockM) || blockM < 1 || blockM > 1024) {
    throw new InvalidArgumentError(`moePrologue: blockM must be in 1..1024, got ${blockM}`);
  }
  const { sortedLen, numBlocks } = alignedSizes(numSlots, numExperts, blockM);
  checkAlignOutputs(out, numSlots, numExperts, blockM, sortedLen, numBlocks);
  const [hm, K] = expectMatrix("hidden", hidden, "bf16");
  if (hm !== M) {
    throw new InvalidArgumentError(
      `hidden is ${describe(hidden)}, logits has ${M} rows: expected bf16 [${M}, K]`,
    );
  }
  if (K === 0 || K % QUANT_GROUP !== 0) {
    throw new InvalidArgumentError(
      `hidden: K (${K}) must be a positive multiple of ${QUANT_GROUP}`,
    );
  }
  expectShape("q", out.q, "fp8_e4m3", [M, K]);
  expectShape("scale", out.scale, "f32", [M, K / QUANT_GROUP]);
  if (out.zeroOut !== undefined) {
    expectShape("zeroOut", out.zeroOut, "bf16", [M, K]);
    if (out.zeroOut === hidden) {
      throw new InvalidArgumentError("zeroOut must not be the hidden states themselves");
    }
  }
  const grouped = method.kind === "grouped";
  unwrap(
    fn(
      grouped ? 1 : 0,
      logits.pointer,
      options.bias?.pointer ?? null,
      M,
      E,
      grouped ? method.nGroup : 1,
      grouped ? method.topkGroup : 1,
      method.topK,
      (method.renormalize ?? true) ? 1 : 0,
      options.weightScale ?? 1,
      options.sharedExpert?.id ?? -1,
      options.sharedExpert?.weight ?? 0,
      out.topkIds.pointer,
      out.topkWeights.pointer,
      numExperts,
      blockM,
      out.sortedTokenIds.pointer,
      out.sortedTokenIds.numel,
      out.expertIds.pointer,
      out.expertIds.numel,
      out.numTokensPostPadded.pointer,
      hidden.pointer,
      K,
      out.q.pointer,
      out.scale.pointer,
      out.zeroOut?.pointer ?? null,
      streamHandle(options.stream),
    ),
  );
}
