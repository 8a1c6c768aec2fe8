/**
 * {@link MoeLayer}: a whole MoE layer (one tensor-parallel shard) on the GPU, from bf16 hidden
 * states and router logits to the layer's bf16 output, on one stream:
 *
 * 1. **route**: top-k experts and weights per token (`routeTopK`), plus the shared expert as
 *    one more slot;
 * 2. **align**: SGLang's `moe_align_block_size` layout (`alignBlockSize`);
 * 3. **quantize**: per-token-group FP8 activations (`quantizeFp8`), which also zeroes the
 *    output in the same pass (the kernel adds into it; a separate memset would cost one more
 *    launch, a few microseconds at M = 1);
 * 4. **fused**: the fused FP8 kernel (`fusedMoeW8A8UpDown` with `outIsZeroed`), which applies
 *    `routedScalingFactor` once to every slot (the shared slot's weight is its inverse).
 *
 * For small batches (up to {@link PROLOGUE_MAX_TOKENS} tokens, see {@link MoeLayer.pathFor})
 * steps 1-3 are one launch instead, **prologue** (`moePrologue`), with the same results bit for
 * bit: at M = 1 each launch costs more than its work. On either path each launch after the
 * first is a programmatic dependent of the one before it (cuda/griddep.cuh): it starts while
 * that one runs and waits for its writes, so its launch and set-up are off the forward's time.
 *
 * The experts' weights are uploaded once, as the checkpoint stores them, and turned into the
 * kernel's stored tiles on the GPU, gate/up interleaved on the way (`weightLayout: "tiles"`,
 * 2-4 % faster where the layer is bound by memory). The
 * scratch buffers of a token count are allocated by its first forward and reused after, so a
 * forward allocates nothing (and can be captured in a CUDA graph) once a count has been seen.
 *
 * {@link moeLayerReference} is the same layer on the CPU (routing, alignment, quantisation and
 * the kernel's reference), the oracle of the tests and the demo.
 *
 * @module
 */
import { InvalidArgumentError, unwrap } from "../ffi/errors.ts";
import { symbols } from "../ffi/library.ts";
import { DeviceBuffer, type DType, DTYPE_BYTES } from "./buffer.ts";
import {
  Checkpoint,
  loadCorrectionBias,
  loadExpert,
  type LoadExpertsOptions,
  planExperts,
} from "./checkpoint.ts";
import { decodeBf16 } from "./codecs.ts";
import { configProblem, type KernelConfig, pickConfig } from "./config.ts";
import { CudaEvent, CudaGraph, Stream } from "./device.ts";
import { fusedMoeW8A8UpDown } from "./fused_moe.ts";
import { interleaveGateUp } from "./interleave.ts";
import { tiledDownRows, tileDownWeightsOnDevice, tileUpWeightsOnDevice } from "./tiles.ts";
import { fusedMoeReference, moeAlignBlockSize, quantizePerTokenGroup } from "./reference.ts";
import {
  alignBlockSize,
  alignedSizes,
  alignWorkspaceBytes,
  checkRouting,
  moePrologue,
  prologueFits,
  quantizeFp8,
  routeTopK,
  routeTopKReference,
  type RoutingMethod,
  type SharedExpertSlot,
} from "./routing.ts";

/**
 * One expert's weights in checkpoint layout (one tensor-parallel shard), with K the hidden size
 * and N twice the shard's intermediate size.
 */
export interface ExpertWeights {
  /** `fp8 [N, K]`: the N/2 gate_proj rows, then the N/2 up_proj rows. */
  w13: Uint8Array;
  /** `f32 [N/128, K/128]`: their `weight_scale_inv` blocks, gate blocks then up blocks. */
  w13Scale: Float32Array;
  /** `fp8 [K, N/2]`: down_proj. */
  w2: Uint8Array;
  /** `f32 [K/128, N/256]`: its `weight_scale_inv`. */
  w2Scale: Float32Array;
}

/** The shape and routing of a layer. */
export interface MoeLayerSpec {
  /** Hidden size (the kernel's K), a multiple of 128. */
  hiddenSize: number;
  /** This shard's intermediate size (the kernel's N is twice it), a multiple of 128. */
  intermediateSize: number;
  /** Routed experts (the router's logits have this many columns). */
  numRoutedExperts: number;
  /** One more expert, the last, that every token uses with weight 1; default false. */
  sharedExpert?: boolean;
  /** How tokens choose their routed experts. */
  routing: RoutingMethod;
  /** `[numRoutedExperts]` correction bias of grouped routing (`e_score_correction_bias`). */
  correctionBias?: Float32Array;
  /** Multiplies the routed experts' weights (DeepSeek's `routed_scaling_factor`); default 1. */
  routedScalingFactor?: number;
}

/** Options of {@link MoeLayer}'s constructor. */
export interface MoeLayerOptions extends MoeLayerSpec {
  /** Every expert (routed, then the shared one); omit to upload them later with
   * {@link MoeLayer.setExpert}. */
  experts?: readonly ExpertWeights[];
  /** The stream every forward runs on; default a new stream owned by the layer. */
  stream?: Stream;
  /** A fixed kernel config, or a function of the token count; default: see
   * {@link MoeLayer.configFor}. */
  config?: KernelConfig | ((numTokens: number) => KernelConfig);
}

/** The steps of a forward, as reported to {@link ForwardOptions.onStep}: route, align,
 * quantize, fused, done; or, on the prologue path, prologue, fused, done. */
export type LayerStep = "route" | "align" | "quantize" | "prologue" | "fused" | "done";

/** How a forward runs the steps before the fused kernel: "separate" launches route, align and
 * quantize; "prologue" does all three in one launch (small batches); "auto" picks (see
 * {@link MoeLayer.pathFor}). */
export type ForwardPath = "auto" | "prologue" | "separate";

/**
 * The largest token count for which "auto" takes the prologue path. The prologue routes in
 * one block (16 warps, a warp per token), so every further 16 tokens add about one token's
 * routing latency (a microsecond or two), while the separate path routes them all at once and
 * pays two more launches instead. Measured on an H100 (DeepSeek shard, outside the fused kernel):
 * M=1 11.1 vs 18.2 µs, M=16 13.4 vs 18.9 µs, M=32 20.5 vs 19.4 µs, M=64 34.8 vs 21.1 µs
 * (`deno task bench:layer --m 1,16,32,64`).
 */
export const PROLOGUE_MAX_TOKENS = 16;

/** Options of {@link MoeLayer.forward}. */
export interface ForwardOptions {
  /** Write here (`bf16 [M, K]`) instead of the layer's own output buffer for M. */
  out?: DeviceBuffer<"bf16">;
  /** Called before each step is enqueued and once at the end ("done"): e.g. to record CUDA
   * events on {@link MoeLayer.stream}. */
  onStep?: (step: LayerStep) => void;
  /** The path of the steps before the kernel; default "auto". "prologue" throws an
   * `UnsupportedError` where the prologue cannot run (see {@link MoeLayer.pathFor}). */
  path?: ForwardPath;
}

/** The device buffers a forward at one token count uses (see {@link MoeLayer.buffersFor}). */
export interface LayerBuffers {
  /** The kernel config of this token count. */
  config: KernelConfig;
  /** `i32 [M, width]`. */
  topkIds: DeviceBuffer<"i32">;
  /** `f32 [M, width]` (without the routed scaling factor). */
  topkWeights: DeviceBuffer<"f32">;
  /** `i32 [sortedLen]`. */
  sortedTokenIds: DeviceBuffer<"i32">;
  /** `i32 [numBlocks]`. */
  expertIds: DeviceBuffer<"i32">;
  /** `i32 [1]`. */
  numTokensPostPadded: DeviceBuffer<"i32">;
  /** Alignment workspace (absent when none is needed). */
  workspace?: DeviceBuffer<"i32">;
  /** `fp8 [M, K]` quantised activations. */
  xq: DeviceBuffer<"fp8_e4m3">;
  /** `f32 [M, K/128]` their scales. */
  xScale: DeviceBuffer<"f32">;
  /** `bf16 [M, K]` the layer's own output for M. */
  out: DeviceBuffer<"bf16">;
}

/** Token counts whose scratch buffers are kept (the oldest is freed past this). */
export const MAX_CACHED_TOKEN_COUNTS = 16;

function checkSpec(spec: MoeLayerSpec): void {
  const { hiddenSize: K, intermediateSize: I, numRoutedExperts: E } = spec;
  if (!Number.isSafeInteger(K) || K < 128 || K % 128 !== 0) {
    throw new InvalidArgumentError(`hiddenSize must be a positive multiple of 128, got ${K}`);
  }
  if (!Number.isSafeInteger(I) || I < 128 || I % 128 !== 0) {
    throw new InvalidArgumentError(
      `intermediateSize must be a positive multiple of 128 (N = 2·I a multiple of 256), got ${I}`,
    );
  }
  checkRouting(spec.routing, E);
  const rsf = spec.routedScalingFactor ?? 1;
  if (!Number.isFinite(rsf) || rsf === 0) {
    throw new InvalidArgumentError(`routedScalingFactor must be finite and non-zero, got ${rsf}`);
  }
  if (spec.correctionBias !== undefined) {
    if (spec.routing.kind !== "grouped") {
      throw new InvalidArgumentError("correctionBias applies to grouped routing only");
    }
    if (spec.correctionBias.length !== E) {
      throw new InvalidArgumentError(
        `correctionBias has ${spec.correctionBias.length} entries, numRoutedExperts is ${E}`,
      );
    }
  }
}

function checkExpert(index: number, w: ExpertWeights, N: number, K: number): void {
  const want: [keyof ExpertWeights, number, string][] = [
    ["w13", N * K, `[${N}, ${K}]`],
    ["w13Scale", (N / 128) * (K / 128), `[${N / 128}, ${K / 128}]`],
    ["w2", K * (N / 2), `[${K}, ${N / 2}]`],
    ["w2Scale", (K / 128) * (N / 256), `[${K / 128}, ${N / 256}]`],
  ];
  for (const [name, length, shape] of want) {
    const a = w[name];
    const kind = name.endsWith("Scale") ? Float32Array : Uint8Array;
    if (!(a instanceof kind) || a.length !== length) {
      throw new InvalidArgumentError(
        `expert ${index}: ${name} must be a ${kind.name} of ${shape} = ${length} elements, got ` +
          `${a?.constructor?.name ?? typeof a} of ${a?.length}`,
      );
    }
  }
}

/** Copies `data` into `dst` starting at element `offset` (synchronous). */
function uploadAt(dst: DeviceBuffer, offset: number, data: Uint8Array | Float32Array): void {
  const start = offset * DTYPE_BYTES[dst.dtype];
  if (start + data.byteLength > dst.bytes) {
    throw new RangeError(
      `upload of ${data.byteLength} bytes at ${start} past a ${dst.bytes}-byte buffer`,
    );
  }
  const base = dst.pointer;
  if (base === null || data.byteLength === 0) return;
  const ptr = Deno.UnsafePointer.offset(base, start);
  unwrap(symbols().amoe_memcpy_htod(ptr, data, BigInt(data.byteLength)));
}

/**
 * A MoE layer on the GPU (see the module doc).
 *
 * @example
 * ```ts
 * using layer = new MoeLayer({
 *   hiddenSize: 7168, intermediateSize: 128, numRoutedExperts: 256, sharedExpert: true,
 *   routing: { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 4 },
 *   correctionBias, routedScalingFactor: 2.5, experts,
 * });
 * const out = layer.forward(hidden, routerLogits); // bf16 [M, 7168], on layer.stream
 * layer.stream.synchronize();
 * ```
 */
export class MoeLayer implements Disposable {
  /** Hidden size K. */
  readonly hiddenSize: number;
  /** Shard intermediate size (N / 2). */
  readonly intermediateSize: number;
  /** Up-projection rows N = 2 · intermediateSize. */
  readonly N: number;
  /** Routed experts. */
  readonly numRoutedExperts: number;
  /** Experts held (routed + shared). */
  readonly numExperts: number;
  /** Whether the last expert is a shared one. */
  readonly sharedExpert: boolean;
  /** The routing method. */
  readonly routing: RoutingMethod;
  /** The routed scaling factor (applied by the kernel). */
  readonly routedScalingFactor: number;
  /** Slots per token (top-k, plus the shared expert). */
  readonly width: number;
  /** The stream every forward is enqueued on. */
  readonly stream: Stream;
  readonly #ownsStream: boolean;
  readonly #config?: KernelConfig | ((numTokens: number) => KernelConfig);
  readonly #shared?: SharedExpertSlot;
  readonly #w: DeviceBuffer<"fp8_e4m3">;
  readonly #wScale: DeviceBuffer<"f32">;
  readonly #w2: DeviceBuffer<"fp8_e4m3">;
  readonly #w2Scale: DeviceBuffer<"f32">;
  readonly #bias?: DeviceBuffer<"f32">;
  readonly #loaded: Uint8Array;
  /** One expert's row-major weights on the device, on their way into tiles (setExpert). */
  #staging?: { w13: DeviceBuffer<"fp8_e4m3">; w2: DeviceBuffer<"fp8_e4m3"> };
  readonly #scratch = new Map<number, LayerBuffers>();
  #disposed = false;

  /** Allocates the weights on the device and uploads `options.experts` (if given). */
  constructor(options: MoeLayerOptions) {
    checkSpec(options);
    const K = options.hiddenSize;
    this.hiddenSize = K;
    this.intermediateSize = options.intermediateSize;
    this.N = 2 * options.intermediateSize;
    this.numRoutedExperts = options.numRoutedExperts;
    this.sharedExpert = options.sharedExpert ?? false;
    this.numExperts = this.numRoutedExperts + (this.sharedExpert ? 1 : 0);
    this.routing = options.routing;
    this.routedScalingFactor = options.routedScalingFactor ?? 1;
    this.#shared = this.sharedExpert
      ? { id: this.numRoutedExperts, weight: 1 / this.routedScalingFactor }
      : undefined;
    this.width = options.routing.topK + (this.sharedExpert ? 1 : 0);
    this.#config = options.config;
    if (typeof this.#config === "object") {
      const problem = configProblem(this.#config);
      if (problem !== undefined) throw new InvalidArgumentError(`bad kernel config: ${problem}`);
    }
    if (options.experts !== undefined && options.experts.length !== this.numExperts) {
      throw new InvalidArgumentError(
        `experts has ${options.experts.length} entries, the layer has ${this.numExperts} ` +
          `(${this.numRoutedExperts} routed${this.sharedExpert ? " + 1 shared" : ""})`,
      );
    }
    const E = this.numExperts, N = this.N;
    const made: { [Symbol.dispose](): void }[] = [];
    const keep = <T extends { [Symbol.dispose](): void }>(x: T): T => (made.push(x), x);
    try {
      this.#ownsStream = options.stream === undefined;
      this.stream = options.stream ?? keep(new Stream());
      this.#w = keep(DeviceBuffer.alloc("fp8_e4m3", [E, N, K]));
      this.#wScale = keep(DeviceBuffer.alloc("f32", [E, N / 128, K / 128]));
      this.#w2 = keep(DeviceBuffer.alloc("fp8_e4m3", [E, tiledDownRows(K), N / 2]));
      this.#w2Scale = keep(DeviceBuffer.alloc("f32", [E, K / 128, N / 256]));
      if (options.correctionBias !== undefined) {
        this.#bias = keep(
          DeviceBuffer.from(
            "f32",
            [this.numRoutedExperts],
            Float32Array.from(options.correctionBias),
          ),
        );
      }
      this.#loaded = new Uint8Array(E);
      options.experts?.forEach((w, i) => this.setExpert(i, w));
      this.#releaseStaging();
    } catch (error) {
      this.#releaseStaging();
      for (const x of made.reverse()) x[Symbol.dispose]();
      throw error;
    }
  }

  /**
   * Loads a layer from a checkpoint (see `./checkpoint.ts`): the experts of `checkpoint.prefix`
   * for the tensor-parallel rank, uploaded one at a time (host memory holds one expert), and
   * the correction bias when the checkpoint has one and the routing is grouped.
   */
  static async fromCheckpoint(
    checkpoint: LoadExpertsOptions,
    layer: Omit<
      MoeLayerOptions,
      "hiddenSize" | "intermediateSize" | "numRoutedExperts" | "sharedExpert" | "experts"
    >,
  ): Promise<MoeLayer> {
    const owned = !(checkpoint.source instanceof Checkpoint);
    const ckpt = checkpoint.source instanceof Checkpoint
      ? checkpoint.source
      : await Checkpoint.open(checkpoint.source);
    try {
      const plan = await planExperts(ckpt, checkpoint);
      const bias = layer.correctionBias ??
        (layer.routing.kind === "grouped" ? await loadCorrectionBias(ckpt, plan) : undefined);
      const moe = new MoeLayer({
        ...layer,
        hiddenSize: plan.hiddenSize,
        intermediateSize: plan.intermediateSize,
        numRoutedExperts: plan.numRoutedExperts,
        sharedExpert: plan.sharedExpert,
        correctionBias: bias,
      });
      try {
        for (let i = 0; i < plan.expertPrefixes.length; i++) {
          moe.setExpert(i, await loadExpert(ckpt, plan, i));
        }
        moe.#releaseStaging();
      } catch (error) {
        moe[Symbol.dispose]();
        throw error;
      }
      return moe;
    } finally {
      if (owned) ckpt.close();
    }
  }

  /** Uploads expert `index` (routed experts first, the shared one last), interleaving gate
   * and up rows and storing both weights as the kernel's tiles, on the GPU. Synchronous. The
   * first call allocates one expert's row-major weights on the device to stage them; loading
   * through the constructor or {@link MoeLayer.fromCheckpoint} frees that at the end. */
  setExpert(index: number, weights: ExpertWeights): void {
    this.#alive();
    if (!Number.isSafeInteger(index) || index < 0 || index >= this.numExperts) {
      throw new InvalidArgumentError(`expert index ${index} is not in 0..${this.numExperts - 1}`);
    }
    const N = this.N, K = this.hiddenSize;
    checkExpert(index, weights, N, K);
    const staging = this.#staging ??= {
      w13: DeviceBuffer.alloc("fp8_e4m3", [1, N, K]),
      w2: DeviceBuffer.alloc("fp8_e4m3", [1, K, N / 2]),
    };
    // The uploads are cudaMemcpy on the legacy default stream, which may return before their
    // DMA lands; the tiling runs on that stream too, and is waited for before the staging
    // buffers are written again.
    staging.w13.upload(weights.w13);
    staging.w2.upload(weights.w2);
    tileUpWeightsOnDevice(staging.w13, this.#w, { firstExpert: index, gateUpHalves: true });
    tileDownWeightsOnDevice(staging.w2, this.#w2, { firstExpert: index });
    unwrap(symbols().amoe_stream_synchronize(null));
    uploadAt(
      this.#wScale,
      index * (N / 128) * (K / 128),
      interleaveGateUp(weights.w13Scale, [N / 128, K / 128], 1),
    );
    uploadAt(this.#w2Scale, index * (K / 128) * (N / 256), weights.w2Scale);
    this.#loaded[index] = 1;
  }

  /**
   * The kernel config for `numTokens`: the `config` option if given, else `pickConfig` (the
   * table named by `ALPHA_MOE_CONFIG`, else the bundled table for this card and shape, else
   * `defaultConfig`). This is the one place a forward picks its config.
   */
  configFor(numTokens: number): KernelConfig {
    const c = this.#config;
    if (typeof c === "function") return c(numTokens);
    if (c !== undefined) return c;
    return pickConfig({ numExperts: this.numExperts, N: this.N, K: this.hiddenSize }, numTokens);
  }

  /**
   * The path a forward at `M` tokens takes for `path` (default "auto"): "auto" is "prologue"
   * when M is at most {@link PROLOGUE_MAX_TOKENS}, the slots (M · width) and experts fit the
   * prologue (`prologueFits`) and the library has it, else "separate".
   */
  pathFor(M: number, path: ForwardPath = "auto"): "prologue" | "separate" {
    if (path === "prologue" || path === "separate") return path;
    if (path !== "auto") {
      throw new InvalidArgumentError(
        `path must be "auto", "prologue" or "separate", got ${JSON.stringify(path)}`,
      );
    }
    return M <= PROLOGUE_MAX_TOKENS && prologueFits(M, this.width, this.numExperts)
      ? "prologue"
      : "separate";
  }

  /** The scratch buffers of a forward at `M` tokens, allocated on first use. */
  buffersFor(M: number): LayerBuffers {
    this.#alive();
    let s = this.#scratch.get(M);
    if (s !== undefined) {
      this.#scratch.delete(M); // re-insert: most recently used last
      this.#scratch.set(M, s);
      return s;
    }
    if (!Number.isSafeInteger(M) || M < 1) {
      throw new InvalidArgumentError(`the token count must be a positive integer, got ${M}`);
    }
    const config = this.configFor(M);
    const problem = configProblem(config);
    if (problem !== undefined) throw new InvalidArgumentError(`bad kernel config: ${problem}`);
    const K = this.hiddenSize;
    const slots = M * this.width;
    const { sortedLen, numBlocks } = alignedSizes(slots, this.numExperts, config.blockM);
    const wsBytes = alignWorkspaceBytes(slots, this.numExperts);
    const made: DeviceBuffer[] = [];
    const alloc = <D extends DType>(dtype: D, shape: number[]): DeviceBuffer<D> => {
      const b = DeviceBuffer.alloc(dtype, shape);
      made.push(b);
      return b;
    };
    try {
      s = {
        config,
        topkIds: alloc("i32", [M, this.width]),
        topkWeights: alloc("f32", [M, this.width]),
        sortedTokenIds: alloc("i32", [sortedLen]),
        expertIds: alloc("i32", [numBlocks]),
        numTokensPostPadded: alloc("i32", [1]),
        workspace: wsBytes > 0 ? alloc("i32", [Math.ceil(wsBytes / 4)]) : undefined,
        xq: alloc("fp8_e4m3", [M, K]),
        xScale: alloc("f32", [M, K / 128]),
        out: alloc("bf16", [M, K]),
      };
    } catch (error) {
      for (const b of made) b.free();
      throw error;
    }
    if (this.#scratch.size >= MAX_CACHED_TOKEN_COUNTS) {
      const [oldest, buffers] = this.#scratch.entries().next().value!;
      this.#scratch.delete(oldest);
      freeBuffers(buffers);
    }
    this.#scratch.set(M, s);
    return s;
  }

  /**
   * The layer's output for `hidden` (`bf16 [M, K]`) and `routerLogits` (`f32 [M, routed
   * experts]`): route → align → quantise (and zero the output) → fused kernel, enqueued on
   * {@link stream}; the first three in one launch on the prologue path ({@link pathFor}).
   * Returns `options.out`, or the layer's own output buffer for M (overwritten by the next
   * forward at the same M; valid until then). Asynchronous: synchronise {@link stream} before
   * reading it on the host.
   *
   * @throws {InvalidArgumentError} for a wrong dtype or shape, or an expert never uploaded
   */
  forward(
    hidden: DeviceBuffer<"bf16">,
    routerLogits: DeviceBuffer<"f32">,
    options: ForwardOptions = {},
  ): DeviceBuffer<"bf16"> {
    const M = this.#checkHidden(hidden);
    expectShape("routerLogits", routerLogits, "f32", [M, this.numRoutedExperts]);
    if (M === 0) return options.out ?? DeviceBuffer.alloc("bf16", [0, this.hiddenSize]);
    const path = this.pathFor(M, options.path ?? "auto");
    const s = this.buffersFor(M);
    if (path === "prologue") {
      const out = this.#checkOut(hidden, s, options);
      options.onStep?.("prologue");
      moePrologue(routerLogits, hidden, this.routing, {
        topkIds: s.topkIds,
        topkWeights: s.topkWeights,
        sortedTokenIds: s.sortedTokenIds,
        expertIds: s.expertIds,
        numTokensPostPadded: s.numTokensPostPadded,
        q: s.xq,
        scale: s.xScale,
        zeroOut: out,
      }, {
        numExperts: this.numExperts,
        blockM: s.config.blockM,
        bias: this.#bias,
        sharedExpert: this.#shared,
        stream: this.stream,
      });
      return this.#fused(s, s.topkWeights, out, options);
    }
    options.onStep?.("route");
    routeTopK(routerLogits, this.routing, s, {
      bias: this.#bias,
      sharedExpert: this.#shared,
      stream: this.stream,
    });
    return this.#afterRouting(hidden, s, s.topkIds, s.topkWeights, options);
  }

  /**
   * Like {@link forward} with the routing given: `topkIds` `i32 [M, width]` and `topkWeights`
   * `f32 [M, width]` (weights without the routed scaling factor, which the kernel applies; a
   * shared expert's slot included, weight `1 / routedScalingFactor`).
   */
  forwardRouted(
    hidden: DeviceBuffer<"bf16">,
    topkIds: DeviceBuffer<"i32">,
    topkWeights: DeviceBuffer<"f32">,
    options: ForwardOptions = {},
  ): DeviceBuffer<"bf16"> {
    const M = this.#checkHidden(hidden);
    expectShape("topkIds", topkIds, "i32", [M, this.width]);
    expectShape("topkWeights", topkWeights, "f32", [M, this.width]);
    if (M === 0) return options.out ?? DeviceBuffer.alloc("bf16", [0, this.hiddenSize]);
    return this.#afterRouting(hidden, this.buffersFor(M), topkIds, topkWeights, options);
  }

  #checkHidden(hidden: DeviceBuffer<"bf16">): number {
    this.#alive();
    if (
      hidden.dtype !== "bf16" || hidden.shape.length !== 2 || hidden.shape[1] !== this.hiddenSize
    ) {
      throw new InvalidArgumentError(
        `hidden is ${hidden.dtype} [${
          hidden.shape.join(", ")
        }], expected bf16 [M, ${this.hiddenSize}]`,
      );
    }
    const missing = this.#loaded.indexOf(0);
    if (missing >= 0) {
      throw new InvalidArgumentError(`expert ${missing} was never uploaded (setExpert)`);
    }
    return hidden.shape[0];
  }

  #afterRouting(
    hidden: DeviceBuffer<"bf16">,
    s: LayerBuffers,
    topkIds: DeviceBuffer<"i32">,
    topkWeights: DeviceBuffer<"f32">,
    options: ForwardOptions,
  ): DeviceBuffer<"bf16"> {
    const out = this.#checkOut(hidden, s, options);
    const stream = this.stream;
    options.onStep?.("align");
    alignBlockSize(topkIds, this.numExperts, s.config.blockM, s, stream);
    options.onStep?.("quantize");
    quantizeFp8(hidden, { q: s.xq, scale: s.xScale, zeroOut: out }, stream);
    return this.#fused(s, topkWeights, out, options);
  }

  /** The output buffer of a forward: `options.out` (checked) or the layer's own for M. */
  #checkOut(
    hidden: DeviceBuffer<"bf16">,
    s: LayerBuffers,
    options: ForwardOptions,
  ): DeviceBuffer<"bf16"> {
    const out = options.out ?? s.out;
    expectShape("out", out, "bf16", [hidden.shape[0], this.hiddenSize]);
    if (out === hidden) throw new InvalidArgumentError("out must not be the hidden states buffer");
    return out;
  }

  /** Enqueues the fused kernel on the prepared buffers (the last step of a forward). */
  #fused(
    s: LayerBuffers,
    topkWeights: DeviceBuffer<"f32">,
    out: DeviceBuffer<"bf16">,
    options: ForwardOptions,
  ): DeviceBuffer<"bf16"> {
    const stream = this.stream;
    options.onStep?.("fused");
    fusedMoeW8A8UpDown(
      {
        x: s.xq,
        xScale: s.xScale,
        w: this.#w,
        wScale: this.#wScale,
        w2: this.#w2,
        w2Scale: this.#w2Scale,
        sortedTokenIds: s.sortedTokenIds,
        expertIds: s.expertIds,
        numTokensPostPadded: s.numTokensPostPadded,
        topkWeights,
        out,
      },
      {
        topK: this.width,
        config: s.config,
        scalingFactor: this.routedScalingFactor,
        stream,
        outIsZeroed: true,
        weightLayout: "tiles",
      },
    );
    options.onStep?.("done");
    return out;
  }

  #releaseStaging(): void {
    this.#staging?.w13[Symbol.dispose]();
    this.#staging?.w2[Symbol.dispose]();
    this.#staging = undefined;
  }

  #alive(): void {
    if (this.#disposed) throw new InvalidArgumentError("MoeLayer used after dispose");
  }

  /** Frees the weights, every scratch buffer and the layer's own stream. */
  [Symbol.dispose](): void {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const s of this.#scratch.values()) freeBuffers(s);
    this.#scratch.clear();
    this.#releaseStaging();
    for (const b of [this.#w, this.#wScale, this.#w2, this.#w2Scale, this.#bias]) {
      b?.[Symbol.dispose]();
    }
    if (this.#ownsStream) this.stream[Symbol.dispose]();
  }
}

function freeBuffers(s: LayerBuffers): void {
  for (const v of Object.values(s)) {
    if (v instanceof DeviceBuffer) v[Symbol.dispose]();
  }
}

function expectShape(
  name: string,
  t: DeviceBuffer,
  dtype: DType,
  shape: readonly number[],
): void {
  const same = t.dtype === dtype && t.shape.length === shape.length &&
    t.shape.every((d, i) => d === shape[i]);
  if (!same) {
    throw new InvalidArgumentError(
      `${name} is ${t.dtype} [${t.shape.join(", ")}], expected ${dtype} [${shape.join(", ")}]`,
    );
  }
}

// ---- timing ----

/** A step {@link timeForward} times (every {@link LayerStep} but "done"). */
export type TimedStep = Exclude<LayerStep, "done">;

/** The steps of the separate path, in order (what {@link timeForward} reports for it). */
export const FORWARD_STEPS: readonly ("route" | "align" | "quantize" | "fused")[] = Object.freeze(
  [
    "route",
    "align",
    "quantize",
    "fused",
  ] as const,
);

/** The steps of the prologue path, in order. */
export const PROLOGUE_FORWARD_STEPS: readonly ("prologue" | "fused")[] = Object.freeze(
  ["prologue", "fused"] as const,
);

/** Medians of {@link timeForward}, in microseconds. A step the timed path does not run is 0
 * (`steps` lists those it runs). */
export interface ForwardTiming {
  /** The path the timed forwards took. */
  path: "prologue" | "separate";
  /** The steps of that path, in order ({@link FORWARD_STEPS} or
   * {@link PROLOGUE_FORWARD_STEPS}). */
  steps: readonly TimedStep[];
  /** Routing (separate path). */
  route: number;
  /** moe_align_block_size (separate path). */
  align: number;
  /** FP8 quantisation of the activations, with the output zeroed in the same pass (separate
   * path). */
  quantize: number;
  /** Routing, alignment and quantisation in one launch (prologue path). */
  prologue: number;
  /** The fused kernel. */
  fused: number;
  /** Everything outside the fused kernel (route + align + quantize, or prologue). */
  outside: number;
  /** The whole forward, with events between its steps (which keep the steps apart). */
  total: number;
  /** The whole forward with events at its ends only, as it runs in use: the fused kernel's
   * launch overlaps the step before it. */
  whole: number;
  /** The whole forward captured once as a CUDA graph and replayed between two events, as
   * servers run their decode steps. */
  graph: number;
  /** Host time of one `forward()` call (enqueueing only, no waiting). */
  hostUs: number;
  /** Timed forwards. */
  iterations: number;
}

/** Options of {@link timeForward}. */
export interface TimeForwardOptions {
  /** Timed forwards; default 50 (after 3 untimed ones). */
  iterations?: number;
  /**
   * "device" (default): a 1 GiB memset is queued before each forward, so the host has enqueued
   * the whole forward before the device reaches it: the intervals are device time, steps back
   * to back. "host": the stream is drained before each forward, so the device waits for the
   * host between steps and the intervals include the host's launch overhead. Both flush the
   * L2 cache before each forward (the memset).
   */
  pace?: "device" | "host";
  /** The forwards' path (default "auto": {@link MoeLayer.pathFor}). */
  path?: ForwardPath;
}

function medianOf(v: number[]): number {
  const s = [...v].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/**
 * Times `layer.forward(hidden, routerLogits)` step by step with CUDA events recorded on the
 * layer's stream between the steps, whole with events at its ends only, and as one CUDA graph
 * (captured once, replayed each time); returns the medians. Synchronous (waits for every
 * forward).
 * Allocates a 1 GiB scratch buffer for the duration of the call.
 */
export function timeForward(
  layer: MoeLayer,
  hidden: DeviceBuffer<"bf16">,
  routerLogits: DeviceBuffer<"f32">,
  options: TimeForwardOptions = {},
): ForwardTiming {
  const iterations = options.iterations ?? 50;
  if (!Number.isSafeInteger(iterations) || iterations < 1) {
    throw new InvalidArgumentError(`iterations must be a positive integer, got ${iterations}`);
  }
  const path = layer.pathFor(hidden.shape[0], options.path ?? "auto");
  const steps: readonly TimedStep[] = path === "prologue" ? PROLOGUE_FORWARD_STEPS : FORWARD_STEPS;
  const order: LayerStep[] = [...steps, "done"];
  const events = new Map<LayerStep, CudaEvent>();
  const stream = layer.stream;
  try {
    for (const s of order) events.set(s, new CudaEvent());
    using delay = DeviceBuffer.alloc("fp8_e4m3", [1 << 30]);
    for (let i = 0; i < 3; i++) layer.forward(hidden, routerLogits, { path });
    using graph = CudaGraph.capture(stream, () => layer.forward(hidden, routerLogits, { path }));
    const onStep = (step: LayerStep): void => {
      const event = events.get(step);
      if (event === undefined) throw new Error(`timeForward: unexpected step ${step} on ${path}`);
      event.record(stream);
    };
    const us = (a: LayerStep, b: LayerStep): number =>
      1000 * CudaEvent.elapsed(events.get(a)!, events.get(b)!);
    const onEnds = (step: LayerStep): void => {
      if (step === order[0] || step === "done") onStep(step);
    };
    type Key = TimedStep | "outside" | "total" | "whole" | "graph" | "hostUs";
    const samples = new Map<Key, number[]>();
    const push = (key: Key, v: number): void => {
      const list = samples.get(key) ?? [];
      list.push(v);
      samples.set(key, list);
    };
    // Before each timed forward: the stream busy on a 1 GiB clear (device pace) or drained
    // after it (host pace).
    const settle = (): void => {
      delay.zero(stream);
      if (options.pace === "host") stream.synchronize();
    };
    for (let i = 0; i < iterations; i++) {
      settle();
      const t0 = performance.now();
      layer.forward(hidden, routerLogits, { onStep, path });
      push("hostUs", 1000 * (performance.now() - t0));
      stream.synchronize();
      for (let s = 0; s < steps.length; s++) push(steps[s], us(order[s], order[s + 1]));
      push("outside", us(order[0], "fused"));
      push("total", us(order[0], "done"));
      settle();
      layer.forward(hidden, routerLogits, { onStep: onEnds, path });
      stream.synchronize();
      push("whole", us(order[0], "done"));
      settle();
      onStep(order[0]);
      graph.launch(stream);
      onStep("done");
      stream.synchronize();
      push("graph", us(order[0], "done"));
    }
    const median = (key: Key): number => {
      const list = samples.get(key);
      return list === undefined ? 0 : medianOf(list);
    };
    return {
      path,
      steps,
      route: median("route"),
      align: median("align"),
      quantize: median("quantize"),
      prologue: median("prologue"),
      fused: median("fused"),
      outside: median("outside"),
      total: median("total"),
      whole: median("whole"),
      graph: median("graph"),
      hostUs: median("hostUs"),
      iterations,
    };
  } finally {
    for (const e of events.values()) e.destroy();
  }
}

// ---- CPU reference ----

/** The kernel-layout weights of every expert, stacked: what `fusedMoeReference` takes. */
export function stackKernelWeights(
  experts: readonly ExpertWeights[],
  hiddenSize: number,
  intermediateSize: number,
): { w: Uint8Array; wScale: Float32Array; w2: Uint8Array; w2Scale: Float32Array } {
  const K = hiddenSize, N = 2 * intermediateSize, E = experts.length;
  const w = new Uint8Array(E * N * K);
  const wScale = new Float32Array(E * (N / 128) * (K / 128));
  const w2 = new Uint8Array(E * K * (N / 2));
  const w2Scale = new Float32Array(E * (K / 128) * (N / 256));
  experts.forEach((x, e) => {
    checkExpert(e, x, N, K);
    w.set(interleaveGateUp(x.w13, [N, K], 8), e * N * K);
    wScale.set(interleaveGateUp(x.w13Scale, [N / 128, K / 128], 1), e * (N / 128) * (K / 128));
    w2.set(x.w2, e * K * (N / 2));
    w2Scale.set(x.w2Scale, e * (K / 128) * (N / 256));
  });
  return { w, wScale, w2, w2Scale };
}

/** Inputs of {@link moeLayerReference}. */
export interface MoeLayerReferenceArgs extends MoeLayerSpec {
  /** Every expert (routed, then the shared one). */
  experts: readonly ExpertWeights[];
  /** Tokens. */
  M: number;
  /** `[M, hiddenSize]` hidden states: bf16 bits (Uint16Array) or float32 values. */
  hidden: Uint16Array | Float32Array;
  /** `[M, numRoutedExperts]` router logits. */
  routerLogits: Float32Array;
  /** Compute only these tokens (others stay 0). */
  rows?: readonly number[];
  /** Weights already stacked by {@link stackKernelWeights} (saves the work across calls). */
  stacked?: ReturnType<typeof stackKernelWeights>;
}

/**
 * The whole layer on the CPU: {@link routeTopKReference} (shared slot weight
 * `1 / routedScalingFactor`), `quantizePerTokenGroup`, `moeAlignBlockSize` and
 * `fusedMoeReference` with the intermediate re-quantised (as the kernel does) and the routed
 * scaling factor as the kernel's scaling factor. Returns float32 `[M, hiddenSize]` and the
 * routing it used.
 */
export function moeLayerReference(
  args: MoeLayerReferenceArgs,
): { out: Float32Array; topkIds: Int32Array; topkWeights: Float32Array } {
  checkSpec(args);
  const { M, hiddenSize: K, intermediateSize: I, numRoutedExperts: E } = args;
  const shared = args.sharedExpert ?? false;
  const rsf = args.routedScalingFactor ?? 1;
  const numExperts = E + (shared ? 1 : 0);
  if (args.experts.length !== numExperts) {
    throw new InvalidArgumentError(`experts has ${args.experts.length} entries, not ${numExperts}`);
  }
  const route = routeTopKReference(args.routerLogits, M, E, args.routing, {
    bias: args.correctionBias,
    sharedExpert: shared ? { id: E, weight: 1 / rsf } : undefined,
  });
  const values = args.hidden instanceof Uint16Array ? decodeBf16(args.hidden) : args.hidden;
  const { q, scale } = quantizePerTokenGroup(values, M, K);
  const blockM = 16;
  const aligned = moeAlignBlockSize(route.topkIds, numExperts, blockM);
  const stacked = args.stacked ?? stackKernelWeights(args.experts, K, I);
  const out = fusedMoeReference({
    x: q,
    xScale: scale,
    ...stacked,
    ...aligned,
    topkWeights: route.topkWeights,
    M,
    K,
    N: 2 * I,
    numExperts,
    topK: route.width,
    blockM,
    scalingFactor: rsf,
    requant: true,
    rows: args.rows,
  });
  return { out, topkIds: route.topkIds, topkWeights: route.topkWeights };
}
