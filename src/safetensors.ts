/**
 * Reading and writing `.safetensors` files: an 8-byte little-endian header length, a JSON
 * header (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`)
 * and the raw little-endian tensor bytes, offsets relative to the end of the header.
 *
 * Read: F32, I32, BF16, F8_E4M3, F16, F64, I64, I16, I8, U8, BOOL. Write: the same.
 * Half-precision and FP8 tensors come back as their raw bits (Uint16Array / Uint8Array); use
 * `./codecs.ts` to get values.
 *
 * @module
 */

/** Element types this module reads and writes. */
export type SafetensorsDtype =
  | "F32"
  | "F64"
  | "I32"
  | "I64"
  | "I16"
  | "I8"
  | "U8"
  | "BOOL"
  | "BF16"
  | "F16"
  | "F8_E4M3";

/** The typed array a tensor's data comes back as (raw bits for BF16, F16 and F8_E4M3). */
export type TensorData =
  | Float32Array
  | Float64Array
  | Int32Array
  | BigInt64Array
  | Int16Array
  | Int8Array
  | Uint16Array
  | Uint8Array;

/** One tensor of a safetensors file. */
export interface SafetensorsTensor {
  /** Element type as named in the file. */
  dtype: SafetensorsDtype;
  /** Dimensions; `[]` is a scalar. */
  shape: number[];
  /**
   * Elements in row-major order: Float32Array for F32, Int32Array for I32, Uint16Array for
   * BF16 and F16 (bits), Uint8Array for F8_E4M3 (codes), U8 and BOOL, Float64Array for F64,
   * BigInt64Array for I64, Int16Array for I16, Int8Array for I8. When read, this may be a view
   * into the bytes that were read (see {@link readSafetensors}).
   */
  data: TensorData;
}

/** A tensor to write: `data` may be any typed array whose byte length fits dtype and shape. */
export interface SafetensorsTensorInput {
  /** Element type to record. */
  dtype: SafetensorsDtype;
  /** Dimensions; `[]` is a scalar. */
  shape: readonly number[];
  /** Raw elements, little-endian, row-major. */
  data: ArrayBufferView;
}

/** Raised for any malformed file or bad input; the message names the tensor where one is at fault. */
export class SafetensorsError extends Error {
  /** The tensor at fault, when there is one. */
  readonly tensor?: string;

  /** Creates the error; `tensor` names the offending tensor, if any. */
  constructor(message: string, tensor?: string) {
    super(message);
    this.name = "SafetensorsError";
    this.tensor = tensor;
  }
}

type TypedCtor = {
  new (buffer: ArrayBufferLike, byteOffset: number, length: number): TensorData;
  new (length: number): TensorData;
  readonly BYTES_PER_ELEMENT: number;
};

const DTYPES: Record<SafetensorsDtype, TypedCtor> = {
  F32: Float32Array,
  F64: Float64Array,
  I32: Int32Array,
  I64: BigInt64Array,
  I16: Int16Array,
  I8: Int8Array,
  U8: Uint8Array,
  BOOL: Uint8Array,
  BF16: Uint16Array,
  F16: Uint16Array,
  F8_E4M3: Uint8Array,
};

/** Byte size of one element of `dtype`. */
export function dtypeSize(dtype: SafetensorsDtype): number {
  return DTYPES[dtype].BYTES_PER_ELEMENT;
}

// Unknown dtypes sort as size 0 here; the loop below rejects them with a clear message.
function sizeOf(dtype: unknown): number {
  return isDtype(dtype) ? dtypeSize(dtype) : 0;
}

function isDtype(s: unknown): s is SafetensorsDtype {
  return typeof s === "string" && Object.hasOwn(DTYPES, s);
}

// Typed arrays use the host's byte order; the format is little-endian.
const HOST_LE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

// The reference implementation refuses headers over 100 MB; so do we, before allocating.
const MAX_HEADER = 100_000_000;

/** The tensors and metadata of one safetensors file. */
export class SafetensorsFile {
  /** Tensors by name, in header order. */
  readonly tensors: Map<string, SafetensorsTensor>;
  /** The header's `__metadata__` (string to string), `{}` if absent. */
  readonly metadata: Record<string, string>;

  /** Wraps already-parsed tensors and metadata. */
  constructor(tensors: Map<string, SafetensorsTensor>, metadata: Record<string, string> = {}) {
    this.tensors = tensors;
    this.metadata = metadata;
  }

  /** Tensor names in header order. */
  names(): string[] {
    return [...this.tensors.keys()];
  }

  /** Whether the file has a tensor called `name`. */
  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /** The tensor called `name`; throws {@link SafetensorsError} if there is none. */
  get(name: string): SafetensorsTensor {
    const t = this.tensors.get(name);
    if (!t) {
      throw new SafetensorsError(
        `no tensor "${name}" (have: ${this.names().join(", ") || "none"})`,
        name,
      );
    }
    return t;
  }

  /** Data of an F32 tensor; throws if it is missing or of another dtype. */
  f32(name: string): Float32Array {
    return this.#typed(name, ["F32"]) as Float32Array;
  }

  /** Data of an I32 tensor; throws if it is missing or of another dtype. */
  i32(name: string): Int32Array {
    return this.#typed(name, ["I32"]) as Int32Array;
  }

  /** Bits of a BF16 tensor; throws if it is missing or of another dtype. */
  bf16(name: string): Uint16Array {
    return this.#typed(name, ["BF16"]) as Uint16Array;
  }

  /** Codes of an F8_E4M3 tensor; throws if it is missing or of another dtype. */
  f8(name: string): Uint8Array {
    return this.#typed(name, ["F8_E4M3"]) as Uint8Array;
  }

  #typed(name: string, want: SafetensorsDtype[]): TensorData {
    const t = this.get(name);
    if (!want.includes(t.dtype)) {
      throw new SafetensorsError(
        `tensor "${name}" has dtype ${t.dtype}, expected ${want.join(" or ")}`,
        name,
      );
    }
    return t.data;
  }
}

function product(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

function isShape(v: unknown): v is number[] {
  return Array.isArray(v) && v.every((d) => Number.isSafeInteger(d) && d >= 0);
}

/** Options for {@link readSafetensors}. */
export interface ReadSafetensorsOptions {
  /**
   * Copy every tensor's data instead of viewing `bytes` where alignment allows. Views are
   * faster but share memory with `bytes`. Default false.
   */
  copy?: boolean;
}

/**
 * Parses a safetensors file held in memory.
 *
 * Where a tensor's data is suitably aligned in `bytes`, its `data` is a view into `bytes`
 * (no copy) unless `options.copy` is set; otherwise it is a copy.
 *
 * @throws {SafetensorsError} for a truncated file, a header that is not valid JSON or not of
 * the expected form, an unknown dtype, offsets outside the data, or a byte count that does not
 * match dtype and shape (the message names the tensor).
 */
export function readSafetensors(
  bytes: Uint8Array,
  options: ReadSafetensorsOptions = {},
): SafetensorsFile {
  if (!HOST_LE) throw new SafetensorsError("big-endian hosts are not supported");
  if (bytes.length < 8) {
    throw new SafetensorsError(
      `truncated file: ${bytes.length} bytes, need at least 8 for the header length`,
    );
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const lenHi = dv.getUint32(4, true);
  const headerLen = lenHi * 2 ** 32 + dv.getUint32(0, true);
  if (headerLen > MAX_HEADER) {
    throw new SafetensorsError(`header length ${headerLen} is over the ${MAX_HEADER}-byte limit`);
  }
  if (8 + headerLen > bytes.length) {
    throw new SafetensorsError(
      `truncated file: header claims ${headerLen} bytes but only ${bytes.length - 8} follow`,
    );
  }
  let header: unknown;
  try {
    const text = new TextDecoder("utf-8", { fatal: true }).decode(
      bytes.subarray(8, 8 + headerLen),
    );
    header = JSON.parse(text);
  } catch (e) {
    throw new SafetensorsError(`bad header JSON: ${(e as Error).message}`);
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) {
    throw new SafetensorsError("bad header JSON: the header is not a JSON object");
  }

  const dataStart = 8 + headerLen;
  const dataLen = bytes.length - dataStart;
  const copy = options.copy ?? false;
  let metadata: Record<string, string> = {};
  const tensors = new Map<string, SafetensorsTensor>();

  for (const [name, info] of Object.entries(header as Record<string, unknown>)) {
    if (name === "__metadata__") {
      metadata = parseMetadata(info);
      continue;
    }
    if (typeof info !== "object" || info === null || Array.isArray(info)) {
      throw new SafetensorsError(`tensor "${name}": header entry is not an object`, name);
    }
    const { dtype, shape, data_offsets: offsets } = info as Record<string, unknown>;
    if (!isDtype(dtype)) {
      throw new SafetensorsError(`tensor "${name}": unknown dtype ${JSON.stringify(dtype)}`, name);
    }
    if (!isShape(shape)) {
      throw new SafetensorsError(
        `tensor "${name}": shape ${JSON.stringify(shape)} is not a list of non-negative integers`,
        name,
      );
    }
    if (
      !Array.isArray(offsets) || offsets.length !== 2 ||
      !offsets.every((o) => Number.isSafeInteger(o) && o >= 0) || offsets[0] > offsets[1]
    ) {
      throw new SafetensorsError(
        `tensor "${name}": data_offsets ${JSON.stringify(offsets)} is not [begin, end] with ` +
          `0 <= begin <= end`,
        name,
      );
    }
    const [begin, end] = offsets as [number, number];
    if (end > dataLen) {
      throw new SafetensorsError(
        `tensor "${name}": data_offsets [${begin}, ${end}] out of range: the data section ` +
          `has ${dataLen} bytes (file truncated?)`,
        name,
      );
    }
    const ctor = DTYPES[dtype];
    const count = product(shape);
    if (end - begin !== count * ctor.BYTES_PER_ELEMENT) {
      throw new SafetensorsError(
        `tensor "${name}": ${end - begin} bytes do not match dtype ${dtype} and shape ` +
          `[${shape.join(", ")}] (${count * ctor.BYTES_PER_ELEMENT} bytes expected)`,
        name,
      );
    }
    const byteOffset = bytes.byteOffset + dataStart + begin;
    let data: TensorData;
    if (!copy && byteOffset % ctor.BYTES_PER_ELEMENT === 0) {
      data = new ctor(bytes.buffer, byteOffset, count);
    } else {
      // Unaligned (or asked to copy): copy the bytes into a fresh, aligned buffer.
      data = new ctor(count);
      new Uint8Array(data.buffer).set(bytes.subarray(dataStart + begin, dataStart + end));
    }
    tensors.set(name, { dtype, shape: [...shape], data });
  }
  return new SafetensorsFile(tensors, metadata);
}

function parseMetadata(info: unknown): Record<string, string> {
  if (typeof info !== "object" || info === null || Array.isArray(info)) {
    throw new SafetensorsError("bad header JSON: __metadata__ is not an object");
  }
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(info as Record<string, unknown>)) {
    if (typeof v !== "string") {
      throw new SafetensorsError(`bad header JSON: __metadata__["${k}"] is not a string`);
    }
    out[k] = v;
  }
  return out;
}

/** Reads and parses a safetensors file (needs `--allow-read`). */
export async function loadSafetensors(path: string | URL): Promise<SafetensorsFile> {
  return readSafetensors(await Deno.readFile(path));
}

/** Synchronous {@link loadSafetensors}. */
export function loadSafetensorsSync(path: string | URL): SafetensorsFile {
  return readSafetensors(Deno.readFileSync(path));
}

/**
 * Serialises tensors and optional string metadata to safetensors bytes.
 * Tensors are laid out largest element size first (stable otherwise) with no gaps, and the
 * header is padded with spaces to a multiple of 8 bytes, so every tensor is aligned to its
 * element size and readers can view it without copying. The output is readable by the
 * reference `safetensors` library (contiguous offsets covering the data section).
 *
 * @throws {SafetensorsError} for an unknown dtype, a bad shape, a data byte length that does
 * not match dtype and shape, the reserved name `__metadata__`, or non-string metadata.
 */
export function writeSafetensors(
  tensors:
    | Record<string, SafetensorsTensorInput>
    | Map<string, SafetensorsTensorInput | SafetensorsTensor>
    | SafetensorsFile,
  metadata?: Record<string, string>,
): Uint8Array {
  const entries: [string, SafetensorsTensorInput][] = tensors instanceof SafetensorsFile
    ? [...tensors.tensors]
    : tensors instanceof Map
    ? [...tensors]
    : Object.entries(tensors);
  if (metadata === undefined && tensors instanceof SafetensorsFile) metadata = tensors.metadata;

  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") {
        throw new SafetensorsError(`metadata["${k}"] is not a string`);
      }
    }
    header.__metadata__ = { ...metadata };
  }
  // Largest elements first (stable otherwise): with the header padded to 8 bytes, every
  // tensor then starts aligned to its element size, so readers can view it without copying.
  // Offsets stay contiguous with no gaps, which the reference implementation requires.
  entries.sort((a, b) => sizeOf(b[1].dtype) - sizeOf(a[1].dtype));
  let offset = 0;
  const chunks: [number, Uint8Array][] = [];
  for (const [name, t] of entries) {
    if (name === "__metadata__") {
      throw new SafetensorsError(`"__metadata__" is reserved and cannot name a tensor`, name);
    }
    if (!isDtype(t.dtype)) {
      throw new SafetensorsError(
        `tensor "${name}": unknown dtype ${JSON.stringify(t.dtype)}`,
        name,
      );
    }
    if (!isShape(t.shape)) {
      throw new SafetensorsError(
        `tensor "${name}": shape ${JSON.stringify(t.shape)} is not a list of non-negative integers`,
        name,
      );
    }
    const nbytes = product(t.shape) * dtypeSize(t.dtype);
    if (!ArrayBuffer.isView(t.data) || t.data.byteLength !== nbytes) {
      throw new SafetensorsError(
        `tensor "${name}": data has ${
          ArrayBuffer.isView(t.data) ? t.data.byteLength : "no"
        } bytes, dtype ${t.dtype} and shape [${t.shape.join(", ")}] need ${nbytes}`,
        name,
      );
    }
    header[name] = { dtype: t.dtype, shape: [...t.shape], data_offsets: [offset, offset + nbytes] };
    chunks.push([offset, new Uint8Array(t.data.buffer, t.data.byteOffset, nbytes)]);
    offset += nbytes;
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  if (padded !== json.length) {
    const p = new Uint8Array(padded).fill(0x20);
    p.set(json);
    json = p;
  }
  const out = new Uint8Array(8 + json.length + offset);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, json.length % 2 ** 32, true);
  dv.setUint32(4, Math.floor(json.length / 2 ** 32), true);
  out.set(json, 8);
  const base = 8 + json.length;
  for (const [off, bytes] of chunks) out.set(bytes, base + off);
  return out;
}
