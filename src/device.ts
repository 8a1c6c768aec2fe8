/**
 * Devices, streams, events and CUDA graphs. Nothing here loads the library at import time; the
 * first call does (see ffi/library.ts).
 *
 * Resources (`Stream`, `CudaEvent`, `CudaGraph`) follow one rule, the same as `DeviceBuffer`:
 * `destroy()` releases the resource and a second `destroy()` (or any use afterwards) throws an
 * {@link InvalidArgumentError}; `[Symbol.dispose]` (for `using`) releases it if it is still held
 * and never throws for an already released one; the garbage collector releases a forgotten one.
 *
 * @module
 */
import { InvalidArgumentError, NoDeviceError, unwrap } from "../ffi/errors.ts";
import { symbols } from "../ffi/library.ts";

/** What {@link deviceInfo} tells about a GPU. */
export interface DeviceInfo {
  /** The CUDA device index. */
  index: number;
  /** The marketing name, e.g. "NVIDIA H100 80GB HBM3". */
  name: string;
  /** [major, minor]: Hopper is [9, 0]. */
  computeCapability: readonly [number, number];
  /** Streaming multiprocessors. */
  smCount: number;
  /** L2 cache size in bytes. */
  l2Bytes: number;
}

/** The compute capability alpha-moe's kernels are built for (sm_90a). */
export const HOPPER_COMPUTE_CAPABILITY: readonly [number, number] = [9, 0];

function checkIndex(device: number): void {
  if (!Number.isInteger(device) || device < 0 || device > 0x7fffffff) {
    throw new InvalidArgumentError(`device index must be a non-negative integer, got ${device}`);
  }
}

/** Reads a `void**` out-parameter filled by `call`. */
function outHandle(call: (out: BigUint64Array) => number): Deno.PointerObject {
  const out = new BigUint64Array(1);
  unwrap(call(out));
  const handle = Deno.UnsafePointer.create(out[0]);
  if (handle === null) throw new InvalidArgumentError("the library returned a null handle");
  return handle;
}

/** The number of CUDA devices; 0 (not an error) when there is no GPU or no driver. */
export function deviceCount(): number {
  const count = new Int32Array(1);
  unwrap(symbols().amoe_device_count(count));
  return count[0];
}

/** Name, compute capability, SM count and L2 size of device `device`. */
export function deviceInfo(device = 0): DeviceInfo {
  checkIndex(device);
  const name = new Uint8Array(256);
  const major = new Int32Array(1);
  const minor = new Int32Array(1);
  const sms = new Int32Array(1);
  const l2 = new BigInt64Array(1);
  unwrap(
    symbols().amoe_device_info(device, name, BigInt(name.length), major, minor, sms, l2),
  );
  const end = name.indexOf(0);
  return {
    index: device,
    name: new TextDecoder().decode(name.subarray(0, end < 0 ? name.length : end)),
    computeCapability: [major[0], minor[0]],
    smCount: sms[0],
    l2Bytes: Number(l2[0]),
  };
}

/** Chooses the device every later call runs on (default 0), for every thread. */
export function setDevice(device: number): void {
  checkIndex(device);
  unwrap(symbols().amoe_set_device(device));
}

/** Waits until all work on the chosen device has finished. */
export function synchronize(): void {
  unwrap(symbols().amoe_device_synchronize());
}

/**
 * Checks that device `device` exists and is a Hopper GPU (compute capability 9.0); returns its
 * info.
 *
 * @throws {NoDeviceError} when there is no GPU, or it is not a Hopper one.
 */
export function requireHopper(device = 0): DeviceInfo {
  checkIndex(device);
  const count = deviceCount();
  if (count === 0) {
    throw new NoDeviceError(
      "no CUDA GPU found (no device, or no NVIDIA driver): alpha-moe needs a Hopper GPU " +
        "(H100/H200, compute capability 9.0) with its driver; `nvidia-smi` should list it.",
    );
  }
  if (device >= count) {
    throw new NoDeviceError(`there is no CUDA device ${device}: ${count} device(s) found`);
  }
  const info = deviceInfo(device);
  const [major, minor] = info.computeCapability;
  const [wantMajor, wantMinor] = HOPPER_COMPUTE_CAPABILITY;
  if (major !== wantMajor || minor !== wantMinor) {
    throw new NoDeviceError(
      `${info.name} (device ${device}) has compute capability ${major}.${minor}; alpha-moe's ` +
        `kernels are built for sm_90a and run only on a Hopper GPU (H100/H200, compute ` +
        `capability ${wantMajor}.${wantMinor}).`,
    );
  }
  return info;
}

/** The answer of {@link probeHopperGpu}. */
export type HopperProbe = { ok: true; info: DeviceInfo } | { ok: false; reason: string };

/** Like {@link requireHopper}, but returns the reason instead of throwing (a missing library or
 * permission included). */
export function probeHopperGpu(device = 0): HopperProbe {
  try {
    return { ok: true, info: requireHopper(device) };
  } catch (err) {
    return { ok: false, reason: err instanceof Error ? err.message : String(err) };
  }
}

/** true when the library loads and device 0 is a Hopper GPU; never throws (tests skip on false). */
export function hasHopperGpu(): boolean {
  return probeHopperGpu().ok;
}

type Kind = "stream" | "event" | "graph";
const DESTROY = {
  stream: "amoe_stream_destroy",
  event: "amoe_event_destroy",
  graph: "amoe_graph_destroy",
} as const;

// The safety net for resources nobody destroyed. Errors are ignored: there is nobody to tell.
const registry = new FinalizationRegistry<{ kind: Kind; handle: Deno.PointerObject }>(
  ({ kind, handle }) => {
    try {
      symbols()[DESTROY[kind]](handle);
    } catch {
      // the library is gone or the context is lost; nothing to do
    }
  },
);

/** A handle owned by a JS object: destroy once, use-after-destroy is an error. */
class Handle {
  #handle: Deno.PointerObject | null;
  #destroyed = false;
  constructor(readonly kind: Kind, readonly label: string, handle: Deno.PointerObject | null) {
    this.#handle = handle;
  }
  track(owner: object): void {
    if (this.#handle !== null) {
      registry.register(owner, { kind: this.kind, handle: this.#handle }, owner);
    }
  }
  get destroyed(): boolean {
    return this.#destroyed;
  }
  get(): Deno.PointerValue {
    if (this.#destroyed) throw new InvalidArgumentError(`${this.label} used after destroy()`);
    return this.#handle;
  }
  destroy(owner: object): void {
    if (this.#destroyed) throw new InvalidArgumentError(`${this.label} destroyed twice`);
    const handle = this.#handle;
    this.#destroyed = true;
    this.#handle = null;
    registry.unregister(owner);
    if (handle !== null) unwrap(symbols()[DESTROY[this.kind]](handle));
  }
}

const DEFAULT_STREAM = Symbol("default stream");

/**
 * A CUDA stream (blocking with respect to the legacy default stream, so synchronous copies stay
 * ordered with it). `new Stream()` creates one; {@link Stream.default} is the legacy default
 * stream (a null handle).
 *
 * @example
 * ```ts
 * using stream = new Stream();
 * buffer.zero(stream);
 * stream.synchronize();
 * ```
 */
export class Stream {
  /** The legacy default stream (handle null). It cannot be destroyed; disposing it does nothing. */
  static readonly default: Stream = new Stream(DEFAULT_STREAM);
  #h: Handle;

  /** Creates a stream on the chosen device. */
  constructor();
  /** @internal */
  constructor(token: typeof DEFAULT_STREAM);
  constructor(token?: typeof DEFAULT_STREAM) {
    if (token === DEFAULT_STREAM) {
      this.#h = new Handle("stream", "the default Stream", null);
      return;
    }
    this.#h = new Handle("stream", "Stream", outHandle((out) => symbols().amoe_stream_create(out)));
    this.#h.track(this);
  }

  /** true for {@link Stream.default}. */
  get isDefault(): boolean {
    return this === Stream.default;
  }

  /** The `cudaStream_t` (null for the default stream). Throws after destroy(). */
  get handle(): Deno.PointerValue {
    return this.#h.get();
  }

  /** true once destroyed. */
  get destroyed(): boolean {
    return this.#h.destroyed;
  }

  /** Waits until all work enqueued on this stream has finished. */
  synchronize(): void {
    unwrap(symbols().amoe_stream_synchronize(this.handle));
  }

  /** Destroys the stream (pending work still completes). A second call throws. */
  destroy(): void {
    if (this.isDefault) throw new InvalidArgumentError("the default Stream cannot be destroyed");
    this.#h.destroy(this);
  }

  /** Destroys the stream unless already destroyed (for `using`). */
  [Symbol.dispose](): void {
    if (!this.isDefault && !this.#h.destroyed) this.destroy();
  }
}

/** The handle of an optional stream argument (default: the legacy default stream). */
export function streamHandle(stream?: Stream): Deno.PointerValue {
  return (stream ?? Stream.default).handle;
}

/**
 * A CUDA event with timing, to time device work.
 *
 * @example
 * ```ts
 * using start = new CudaEvent(), end = new CudaEvent();
 * start.record(stream);
 * // ... enqueue work on stream ...
 * end.record(stream);
 * const ms = CudaEvent.elapsed(start, end); // waits for `end`
 * ```
 */
export class CudaEvent {
  #h: Handle;

  /** Creates an event on the chosen device. */
  constructor() {
    this.#h = new Handle(
      "event",
      "CudaEvent",
      outHandle((out) => symbols().amoe_event_create(out)),
    );
    this.#h.track(this);
  }

  /** The `cudaEvent_t`. Throws after destroy(). */
  get handle(): Deno.PointerValue {
    return this.#h.get();
  }

  /** true once destroyed. */
  get destroyed(): boolean {
    return this.#h.destroyed;
  }

  /** Records the event on `stream` (default: the legacy default stream). */
  record(stream?: Stream): void {
    unwrap(symbols().amoe_event_record(this.handle, streamHandle(stream)));
  }

  /** Milliseconds between two recorded events; waits for `end` to complete. */
  static elapsed(start: CudaEvent, end: CudaEvent): number {
    const ms = new Float32Array(1);
    unwrap(symbols().amoe_event_elapsed_ms(ms, start.handle, end.handle));
    return ms[0];
  }

  /** Destroys the event. A second call throws. */
  destroy(): void {
    this.#h.destroy(this);
  }

  /** Destroys the event unless already destroyed (for `using`). */
  [Symbol.dispose](): void {
    if (!this.#h.destroyed) this.destroy();
  }
}

/**
 * An executable CUDA graph captured from the work a function enqueues on a stream.
 *
 * @example
 * ```ts
 * using stream = new Stream();
 * using graph = CudaGraph.capture(stream, () => {
 *   out.zero(stream);
 *   // ... launch the layer on stream ...
 * });
 * graph.launch(stream);
 * stream.synchronize();
 * ```
 */
export class CudaGraph {
  #h: Handle;

  private constructor(handle: Deno.PointerObject) {
    this.#h = new Handle("graph", "CudaGraph", handle);
    this.#h.track(this);
  }

  /**
   * Captures what `fn` enqueues on `stream` (not the default stream) into a graph. `fn` must be
   * synchronous and only enqueue work on `stream`: a synchronous copy or an allocation inside it
   * invalidates the capture (the error says so). The capture always ends, also when `fn` throws
   * (its error is re-thrown).
   */
  static capture(stream: Stream, fn: () => void): CudaGraph {
    if (stream.isDefault) {
      throw new InvalidArgumentError(
        "the legacy default stream cannot be captured: capture on a `new Stream()`",
      );
    }
    const lib = symbols();
    const handle = stream.handle;
    unwrap(lib.amoe_stream_begin_capture(handle));
    let failure: { error: unknown } | undefined;
    try {
      const result: unknown = fn();
      if (result instanceof Promise) {
        result.catch(() => {}); // it is reported below, not as an unhandled rejection
        failure = {
          error: new InvalidArgumentError("CudaGraph.capture: the function must be synchronous"),
        };
      }
    } catch (error) {
      failure = { error };
    }
    const out = new BigUint64Array(1);
    const status = lib.amoe_stream_end_capture(handle, out);
    if (failure) {
      const exec = Deno.UnsafePointer.create(out[0]);
      if (status === 0 && exec !== null) lib.amoe_graph_destroy(exec);
      throw failure.error;
    }
    unwrap(status);
    const exec = Deno.UnsafePointer.create(out[0]);
    if (exec === null) throw new InvalidArgumentError("the library returned a null graph");
    return new CudaGraph(exec);
  }

  /** The `cudaGraphExec_t`. Throws after destroy(). */
  get handle(): Deno.PointerValue {
    return this.#h.get();
  }

  /** true once destroyed. */
  get destroyed(): boolean {
    return this.#h.destroyed;
  }

  /** Enqueues the whole graph on `stream` (default: the legacy default stream). */
  launch(stream?: Stream): void {
    unwrap(symbols().amoe_graph_launch(this.handle, streamHandle(stream)));
  }

  /** Destroys the graph (a launch in flight still completes). A second call throws. */
  destroy(): void {
    this.#h.destroy(this);
  }

  /** Destroys the graph unless already destroyed (for `using`). */
  [Symbol.dispose](): void {
    if (!this.#h.destroyed) this.destroy();
  }
}
