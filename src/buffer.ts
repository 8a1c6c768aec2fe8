/**
 * Typed device memory.
 *
 * Lifetime rule (the same as streams, events and graphs): `free()` releases the memory; any use
 * afterwards and a second `free()` throw an {@link InvalidArgumentError} ("used after free",
 * "double free") instead of reaching CUDA. `[Symbol.dispose]` (for `using`) frees a buffer still
 * held and does nothing for a freed one. A FinalizationRegistry frees buffers that were never
 * freed once they are garbage collected; `free()` unregisters them, so nothing is freed twice.
 *
 * @module
 */
import { InvalidArgumentError, unwrap } from "../ffi/errors.ts";
import { symbols } from "../ffi/library.ts";
import { type Stream, streamHandle } from "./device.ts";

/** Element types: FP8 e4m3 and bf16 are held as raw bits on the host. */
export type DType = "fp8_e4m3" | "bf16" | "f32" | "i32";

/** The host typed array of each dtype: Uint8Array (fp8 bits), Uint16Array (bf16 bits),
 * Float32Array, Int32Array. */
export type HostArray<D extends DType = DType> = D extends "fp8_e4m3" ? Uint8Array
  : D extends "bf16" ? Uint16Array
  : D extends "f32" ? Float32Array
  : D extends "i32" ? Int32Array
  : never;

/** Bytes per element of each dtype. */
export const DTYPE_BYTES: Readonly<Record<DType, number>> = {
  fp8_e4m3: 1,
  bf16: 2,
  f32: 4,
  i32: 4,
};

const HOST_ARRAYS = {
  fp8_e4m3: Uint8Array,
  bf16: Uint16Array,
  f32: Float32Array,
  i32: Int32Array,
} as const;

/** true when `dtype` is one of {@link DType}. */
export function isDType(dtype: unknown): dtype is DType {
  return typeof dtype === "string" && Object.hasOwn(DTYPE_BYTES, dtype);
}

function checkDType(dtype: unknown): asserts dtype is DType {
  if (!isDType(dtype)) {
    throw new InvalidArgumentError(
      `unknown dtype ${JSON.stringify(dtype)}: expected one of ${
        Object.keys(DTYPE_BYTES).join(", ")
      }`,
    );
  }
}

/** The number of elements of `shape`, after checking every dimension. */
export function numelOf(shape: readonly number[]): number {
  if (!Array.isArray(shape)) throw new InvalidArgumentError(`shape must be an array of integers`);
  let numel = 1;
  for (const dim of shape) {
    if (!Number.isSafeInteger(dim) || dim < 0) {
      throw new InvalidArgumentError(
        `shape [${shape.join(", ")}] has a dimension that is not a non-negative integer: ${dim}`,
      );
    }
    numel *= dim;
  }
  if (!Number.isSafeInteger(numel)) {
    throw new InvalidArgumentError(`shape [${shape.join(", ")}] is too large`);
  }
  return numel;
}

function typedArrayName(data: unknown): string {
  if (ArrayBuffer.isView(data)) return data.constructor.name;
  return data === null ? "null" : typeof data;
}

/** DeviceBuffers allocated and not yet freed, for {@link liveDeviceBuffers}. */
let live = 0;

// The safety net: frees buffers nobody freed. Errors are ignored: there is nobody to tell.
const registry = new FinalizationRegistry<Deno.PointerObject | null>((pointer) => {
  live--;
  if (pointer === null) return;
  try {
    symbols().amoe_free(pointer);
  } catch {
    // the library is gone or the context is lost; nothing to do
  }
});

/** How many DeviceBuffers are allocated and not yet freed (by free(), dispose or the GC). */
export function liveDeviceBuffers(): number {
  return live;
}

/**
 * A typed, shaped allocation of device memory.
 *
 * @example
 * ```ts
 * using x = DeviceBuffer.from("f32", [2, 3], new Float32Array([1, 2, 3, 4, 5, 6]));
 * const back = x.download(); // Float32Array [1, 2, 3, 4, 5, 6]
 * ```
 */
export class DeviceBuffer<D extends DType = DType> {
  /** The element type. */
  readonly dtype: D;
  /** The dimensions (frozen). */
  readonly shape: readonly number[];
  /** Elements: the product of the dimensions. */
  readonly numel: number;
  /** Size in bytes. */
  readonly bytes: number;
  #pointer: Deno.PointerValue;
  #freed = false;

  private constructor(dtype: D, shape: readonly number[], numel: number) {
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.numel = numel;
    this.bytes = numel * DTYPE_BYTES[dtype];
    const out = new BigUint64Array(1);
    unwrap(symbols().amoe_malloc(out, BigInt(this.bytes)));
    this.#pointer = Deno.UnsafePointer.create(out[0]);
    live++;
    registry.register(this, this.#pointer, this);
  }

  /** Allocates an uninitialised buffer of `shape` (a 0-element buffer holds no memory). */
  static alloc<D extends DType>(dtype: D, shape: readonly number[]): DeviceBuffer<D> {
    checkDType(dtype);
    return new DeviceBuffer(dtype, shape, numelOf(shape));
  }

  /** Allocates a buffer and uploads `data`, whose kind must match `dtype` and whose length must
   * be the number of elements of `shape`. */
  static from<D extends DType>(
    dtype: D,
    shape: readonly number[],
    data: HostArray<D>,
  ): DeviceBuffer<D> {
    checkDType(dtype);
    const numel = numelOf(shape);
    checkHostArray(dtype, shape, numel, data);
    const buffer = new DeviceBuffer(dtype, shape, numel);
    try {
      buffer.upload(data);
    } catch (err) {
      buffer.free();
      throw err;
    }
    return buffer;
  }

  /** The device pointer (null for a 0-element buffer). Throws once freed. */
  get pointer(): Deno.PointerValue {
    if (this.#freed) {
      throw new InvalidArgumentError(`${this.#describe()} used after free()`);
    }
    return this.#pointer;
  }

  /** true once freed. */
  get freed(): boolean {
    return this.#freed;
  }

  /** Copies `data` (same dtype kind, `numel` elements) to the device; synchronous. */
  upload(data: HostArray<D>): void {
    const pointer = this.pointer;
    checkHostArray(this.dtype, this.shape, this.numel, data);
    // A synchronous call: `data` stays alive (held by this frame) until the copy has been made.
    unwrap(symbols().amoe_memcpy_htod(pointer, data, BigInt(this.bytes)));
  }

  /** Copies the buffer to a new host array of its dtype's kind; synchronous. */
  download(): HostArray<D> {
    const pointer = this.pointer;
    const out = new HOST_ARRAYS[this.dtype](this.numel) as HostArray<D>;
    unwrap(symbols().amoe_memcpy_dtoh(out, pointer, BigInt(this.bytes)));
    return out;
  }

  /** Sets every byte to zero, asynchronously on `stream` (default: the legacy default stream). */
  zero(stream?: Stream): void {
    this.fill(0, stream);
  }

  /** Sets every byte to `byte` (0..255), asynchronously on `stream`. */
  fill(byte: number, stream?: Stream): void {
    if (!Number.isInteger(byte) || byte < 0 || byte > 255) {
      throw new InvalidArgumentError(`fill value must be a byte (0..255), got ${byte}`);
    }
    const pointer = this.pointer;
    unwrap(symbols().amoe_memset_async(pointer, byte, BigInt(this.bytes), streamHandle(stream)));
  }

  /** Copies `source` (same dtype and number of elements) into this buffer, asynchronously on
   * `stream`. */
  copyFrom(source: DeviceBuffer<D>, stream?: Stream): void {
    if (source.dtype !== this.dtype || source.numel !== this.numel) {
      throw new InvalidArgumentError(
        `copyFrom: ${source.#describe()} does not match ${this.#describe()}`,
      );
    }
    const dst = this.pointer;
    const src = source.pointer;
    unwrap(symbols().amoe_memcpy_dtod_async(dst, src, BigInt(this.bytes), streamHandle(stream)));
  }

  /**
   * Frees the device memory (CUDA waits for the device's pending work first). A second call
   * throws an {@link InvalidArgumentError} ("double free"); use `using` or `[Symbol.dispose]` to
   * free only if not yet freed.
   */
  free(): void {
    if (this.#freed) throw new InvalidArgumentError(`${this.#describe()} double free`);
    const pointer = this.#pointer;
    this.#freed = true;
    this.#pointer = null;
    registry.unregister(this);
    live--;
    unwrap(symbols().amoe_free(pointer));
  }

  /** Frees the buffer unless already freed (for `using`). */
  [Symbol.dispose](): void {
    if (!this.#freed) this.free();
  }

  #describe(): string {
    return `DeviceBuffer(${this.dtype}, [${this.shape.join(", ")}])`;
  }
}

function checkHostArray(
  dtype: DType,
  shape: readonly number[],
  numel: number,
  data: unknown,
): void {
  const Kind = HOST_ARRAYS[dtype];
  if (!(data instanceof Kind)) {
    throw new InvalidArgumentError(
      `a ${dtype} buffer takes a ${Kind.name}, got ${typedArrayName(data)}`,
    );
  }
  if (data.length !== numel) {
    throw new InvalidArgumentError(
      `shape [${shape.join(", ")}] has ${numel} elements, but the ${Kind.name} has ${data.length}`,
    );
  }
}
