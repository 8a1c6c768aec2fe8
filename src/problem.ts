/**
 * A MoE problem held on the GPU: the inputs of the fused kernel uploaded once, the aligned
 * routing for each `blockM` made on demand, and an output buffer. Tests, benchmarks, the
 * tuner and the demo all drive the kernel through it.
 *
 * @module
 */
import { DeviceBuffer } from "./buffer.ts";
import { decodeBf16 } from "./codecs.ts";
import type { KernelConfig } from "./config.ts";
import { type Stream, synchronize } from "./device.ts";
import { type FusedMoeTensors, fusedMoeW8A8UpDown, type WeightLayout } from "./fused_moe.ts";
import type { MoeProblem } from "./random.ts";
import { type AlignedRouting, moeAlignBlockSize } from "./reference.ts";
import { tiledDownRows, tileDownWeightsOnDevice, tileUpWeightsOnDevice } from "./tiles.ts";

/** Options of {@link DeviceMoeProblem}. */
export interface DeviceMoeProblemOptions {
  /** Experts treated as living on another GPU: their blocks get expert id -1. */
  dropExperts?: readonly number[];
  /**
   * Use the weight buffers of this problem (same E, N, K) instead of uploading the weights
   * again; they stay owned by it.
   */
  weightsFrom?: DeviceMoeProblem;
  /**
   * How {@link DeviceMoeProblem.run} passes the weights to the kernel; default `"tiles"` (the
   * layout `MoeLayer` uses). The row-major weights are uploaded either way (the unfused
   * baseline and {@link DeviceMoeProblem.tensors} use them).
   */
  weightLayout?: WeightLayout;
}

interface DeviceRouting {
  host: AlignedRouting;
  sortedTokenIds: DeviceBuffer<"i32">;
  expertIds: DeviceBuffer<"i32">;
  numTokensPostPadded: DeviceBuffer<"i32">;
}

/** Inputs of the fused kernel on the device, plus routing per block size and an output. */
export class DeviceMoeProblem implements Disposable {
  /** Tokens. */
  readonly M: number;
  /** Hidden size. */
  readonly K: number;
  /** Up-projection rows. */
  readonly N: number;
  /** Experts. */
  readonly numExperts: number;
  /** Experts per token. */
  readonly topK: number;
  /** Routed scaling factor of the problem. */
  readonly scalingFactor: number;
  /** `bf16 [M, K]` output of the last {@link run}. */
  readonly out: DeviceBuffer<"bf16">;
  readonly #inputs: DeviceBuffer[];
  readonly #tensors: Omit<
    FusedMoeTensors<DeviceBuffer>,
    "sortedTokenIds" | "expertIds" | "numTokensPostPadded"
  >;
  readonly #tiles?: { w: DeviceBuffer<"fp8_e4m3">; w2: DeviceBuffer<"fp8_e4m3"> };
  readonly #topkIds: Int32Array;
  readonly #drop: ReadonlySet<number>;
  readonly #routing = new Map<number, DeviceRouting>();

  /** Uploads `problem`'s activations, weights, scales and routing weights. */
  constructor(problem: MoeProblem, options: DeviceMoeProblemOptions = {}) {
    const { M, K, N, numExperts: E, topK } = problem;
    this.M = M;
    this.K = K;
    this.N = N;
    this.numExperts = E;
    this.topK = topK;
    this.scalingFactor = problem.scalingFactor;
    this.#topkIds = problem.topkIds;
    this.#drop = new Set(options.dropExperts ?? []);
    const made: DeviceBuffer[] = [];
    const up = <B extends DeviceBuffer>(b: B): B => (made.push(b), b);
    const shared = options.weightsFrom ? options.weightsFrom.#tensors : undefined;
    if (
      options.weightsFrom &&
      (options.weightsFrom.numExperts !== E || options.weightsFrom.N !== N ||
        options.weightsFrom.K !== K)
    ) {
      throw new RangeError("weightsFrom: a problem of another E, N or K");
    }
    try {
      this.#tensors = {
        x: up(DeviceBuffer.from("fp8_e4m3", [M, K], problem.x)),
        xScale: up(DeviceBuffer.from("f32", [M, K / 128], problem.xScale)),
        w: shared?.w ?? up(DeviceBuffer.from("fp8_e4m3", [E, N, K], problem.w)),
        wScale: shared?.wScale ??
          up(DeviceBuffer.from("f32", [E, N / 128, K / 128], problem.wScale)),
        w2: shared?.w2 ?? up(DeviceBuffer.from("fp8_e4m3", [E, K, N / 2], problem.w2)),
        w2Scale: shared?.w2Scale ??
          up(DeviceBuffer.from("f32", [E, K / 128, N / 256], problem.w2Scale)),
        topkWeights: up(DeviceBuffer.from("f32", [M, topK], problem.topkWeights)),
        out: up(DeviceBuffer.alloc("bf16", [M, K])),
      };
      if ((options.weightLayout ?? "tiles") === "tiles") {
        this.#tiles = options.weightsFrom ? options.weightsFrom.#tiles : undefined;
        if (this.#tiles === undefined) {
          // Tiled on the GPU from the row-major copies (the host takes seconds for 257 experts).
          const tiles = {
            w: up(DeviceBuffer.alloc("fp8_e4m3", [E, N, K])),
            w2: up(DeviceBuffer.alloc("fp8_e4m3", [E, tiledDownRows(K), N / 2])),
          };
          tileUpWeightsOnDevice(this.#tensors.w as DeviceBuffer<"fp8_e4m3">, tiles.w);
          tileDownWeightsOnDevice(this.#tensors.w2 as DeviceBuffer<"fp8_e4m3">, tiles.w2);
          synchronize();
          this.#tiles = tiles;
        }
      }
    } catch (error) {
      for (const b of made) b.free();
      throw error;
    }
    this.#inputs = made;
    this.out = this.#tensors.out as DeviceBuffer<"bf16">;
  }

  /** The aligned routing for `blockM` (host copy), with dropped experts set to -1. */
  routing(blockM: number): AlignedRouting {
    return this.#deviceRouting(blockM).host;
  }

  #deviceRouting(blockM: number): DeviceRouting {
    let r = this.#routing.get(blockM);
    if (r === undefined) {
      const host = moeAlignBlockSize(this.#topkIds, this.numExperts, blockM);
      const used = host.numTokensPostPadded / blockM;
      for (let b = 0; b < used; b++) {
        if (this.#drop.has(host.expertIds[b])) host.expertIds[b] = -1;
      }
      const sortedTokenIds = DeviceBuffer.from(
        "i32",
        [host.sortedTokenIds.length],
        host.sortedTokenIds,
      );
      const expertIds = DeviceBuffer.from("i32", [host.expertIds.length], host.expertIds);
      const numTokensPostPadded = DeviceBuffer.from(
        "i32",
        [1],
        Int32Array.of(host.numTokensPostPadded),
      );
      r = { host, sortedTokenIds, expertIds, numTokensPostPadded };
      this.#routing.set(blockM, r);
    }
    return r;
  }

  /** Every tensor of a kernel call with `blockM`'s routing. */
  tensors(blockM: number): FusedMoeTensors<DeviceBuffer> {
    const r = this.#deviceRouting(blockM);
    return {
      ...this.#tensors,
      sortedTokenIds: r.sortedTokenIds,
      expertIds: r.expertIds,
      numTokensPostPadded: r.numTokensPostPadded,
    };
  }

  /** Enqueues the fused kernel with `config` (zeroing {@link out} first unless told not to). */
  run(config: KernelConfig, options: { stream?: Stream; outIsZeroed?: boolean } = {}): void {
    fusedMoeW8A8UpDown({ ...this.tensors(config.blockM), ...this.#tiles }, {
      topK: this.topK,
      config,
      scalingFactor: this.scalingFactor,
      stream: options.stream,
      outIsZeroed: options.outIsZeroed,
      weightLayout: this.#tiles ? "tiles" : "rows",
    });
  }

  /** How {@link run} passes the weights (see {@link DeviceMoeProblemOptions.weightLayout}). */
  get weightLayout(): WeightLayout {
    return this.#tiles ? "tiles" : "rows";
  }

  /** Downloads {@link out} as float32 (synchronous: waits for the work before it). */
  readOut(): Float32Array {
    return decodeBf16(this.out.download());
  }

  /** The routing of each token: `[M, topK]` expert ids. */
  get topkIds(): Int32Array {
    return this.#topkIds;
  }

  /** Frees every device buffer this problem owns. */
  [Symbol.dispose](): void {
    for (const b of this.#inputs) b[Symbol.dispose]();
    for (const r of this.#routing.values()) {
      r.sortedTokenIds[Symbol.dispose]();
      r.expertIds[Symbol.dispose]();
      r.numTokensPostPadded[Symbol.dispose]();
    }
    this.#routing.clear();
  }
}
