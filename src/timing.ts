/**
 * Timing device work honestly: CUDA events around each launch, warm-up, the median of many
 * launches, the L2 cache flushed before each one, and the memory floor the timings are judged
 * against (bytes that must move, over the device-to-device copy bandwidth measured the same
 * way). Benchmarks and the tuner use it; tests do not (timings belong in benchmarks).
 *
 * @module
 */
import { unwrap } from "../ffi/errors.ts";
import { symbols } from "../ffi/library.ts";
import { DeviceBuffer } from "./buffer.ts";
import { CudaEvent, deviceInfo, Stream, streamHandle } from "./device.ts";

/** One timed series. */
export interface Timing {
  /** Median of the samples, microseconds. */
  medianUs: number;
  /** Every sample, microseconds, in launch order. */
  samplesUs: number[];
}

/** Options of {@link Timer.time}. */
export interface TimeOptions {
  /** Untimed launches first (module load, caches, clocks); default 5. */
  warmup?: number;
  /** Timed launches; default 50. */
  iterations?: number;
  /**
   * How the L2 cache is emptied before each timed launch: `"read"` (default) reads a buffer of
   * twice its size, leaving clean lines; `"write"` overwrites one (a memset, as many benchmarks
   * do), leaving dirty lines the timed kernel then pays to write back; `"none"` keeps it.
   */
  flush?: L2Flush;
}

/** See {@link TimeOptions.flush}. */
export type L2Flush = "read" | "write" | "none";

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/** Times work enqueued on its own stream. */
export class Timer implements Disposable {
  /** The stream timed work must be enqueued on. */
  readonly stream: Stream;
  readonly #flush: DeviceBuffer<"fp8_e4m3">;
  readonly #sink: DeviceBuffer<"i32">;

  /** Creates a stream and an L2-flush buffer of twice the device's L2 size. */
  constructor() {
    this.stream = new Stream();
    const l2 = Math.max(deviceInfo().l2Bytes, 1 << 20);
    this.#flush = DeviceBuffer.alloc("fp8_e4m3", [Math.ceil(l2 / 8) * 16]);
    this.#flush.zero(this.stream);
    this.#sink = DeviceBuffer.alloc("i32", [4]);
  }

  /** Empties the L2 cache (asynchronous, on {@link stream}); see {@link TimeOptions.flush}. */
  flushL2(how: L2Flush = "read"): void {
    if (how === "write") this.#flush.zero(this.stream);
    if (how === "read") {
      unwrap(
        symbols().amoe_read_async(
          this.#flush.pointer,
          BigInt(this.#flush.bytes),
          this.#sink.pointer,
          streamHandle(this.stream),
        ),
      );
    }
  }

  /**
   * Times `launch` (which must enqueue on {@link stream}) with a pair of events around each
   * launch; returns the median and the samples.
   */
  time(launch: () => void, options: TimeOptions = {}): Timing {
    const warmup = options.warmup ?? 5;
    const iterations = options.iterations ?? 50;
    const flush = options.flush ?? "read";
    for (let i = 0; i < warmup; i++) launch();
    const events: [CudaEvent, CudaEvent][] = [];
    try {
      for (let i = 0; i < iterations; i++) {
        const pair: [CudaEvent, CudaEvent] = [new CudaEvent(), new CudaEvent()];
        events.push(pair);
        this.flushL2(flush);
        pair[0].record(this.stream);
        launch();
        pair[1].record(this.stream);
      }
      this.stream.synchronize();
      const samplesUs = events.map(([a, b]) => CudaEvent.elapsed(a, b) * 1000);
      return { medianUs: median(samplesUs), samplesUs };
    } finally {
      for (const [a, b] of events) {
        a.destroy();
        b.destroy();
      }
    }
  }

  /**
   * Device-to-device copy bandwidth in bytes per second, counting bytes read plus bytes
   * written (a 1 GiB copy by default, median of 10).
   */
  copyBandwidth(bytes = 1 << 30): number {
    using src = DeviceBuffer.alloc("fp8_e4m3", [bytes]);
    using dst = DeviceBuffer.alloc("fp8_e4m3", [bytes]);
    src.fill(1, this.stream);
    const t = this.time(() => dst.copyFrom(src, this.stream), { warmup: 3, iterations: 10 });
    return (2 * bytes) / (t.medianUs * 1e-6);
  }

  /** Frees the stream and the flush buffer. */
  [Symbol.dispose](): void {
    this.#flush[Symbol.dispose]();
    this.#sink[Symbol.dispose]();
    this.stream[Symbol.dispose]();
  }
}

/** Sizes of a MoE layer call, for {@link memoryFloorBytes}. */
export interface MoeShape {
  /** Tokens. */
  M: number;
  /** Hidden size. */
  K: number;
  /** Up-projection rows (2 x intermediate). */
  N: number;
  /** Experts on this GPU. */
  numExperts: number;
  /** Experts per token. */
  topK: number;
}

/**
 * The fewest bytes a MoE layer call must move through device memory: the weights and block
 * scales of every distinct expert the routing touches (each read once), the FP8 activations
 * and their scales, the routing arrays, and the bf16 output written once.
 *
 * @param topkIds `[M, topK]` expert of each slot; ids outside `0..numExperts-1` are ignored
 */
export function memoryFloorBytes(shape: MoeShape, topkIds: Int32Array): number {
  const { M, K, N, numExperts: E, topK } = shape;
  const hit = new Uint8Array(E);
  for (const e of topkIds) if (e >= 0 && e < E) hit[e] = 1;
  const experts = hit.reduce((a, b) => a + b, 0);
  const perExpert = N * K + K * (N / 2) + 4 * ((N / 128) * (K / 128) + (K / 128) * (N / 256));
  const activations = M * K + 4 * M * (K / 128);
  const routing = 4 * (M * topK) * 3; // ids, weights, sorted ids (at least)
  const output = 2 * M * K;
  return experts * perExpert + activations + routing + output;
}
