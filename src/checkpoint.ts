/**
 * Loading one layer's experts from FP8 `.safetensors` checkpoints (DeepSeek-V3, Qwen3-FP8
 * naming), with the tensor-parallel shard cut out at load.
 *
 * Tensors read, for a layer prefix such as `model.layers.3` and expert `i`:
 *
 * | tensor                                             | dtype    | shape                         |
 * |----------------------------------------------------|----------|-------------------------------|
 * | `{prefix}.mlp.experts.{i}.gate_proj.weight`        | F8_E4M3  | `[inter, hidden]`             |
 * | `{prefix}.mlp.experts.{i}.gate_proj.weight_scale_inv` | F32   | `[⌈inter/128⌉, ⌈hidden/128⌉]` |
 * | `… up_proj.weight`, `… up_proj.weight_scale_inv`   | the same |                               |
 * | `… down_proj.weight`                               | F8_E4M3  | `[hidden, inter]`             |
 * | `… down_proj.weight_scale_inv`                     | F32      | `[⌈hidden/128⌉, ⌈inter/128⌉]` |
 *
 * and the same under `{prefix}.mlp.shared_experts.` for the shared expert (loaded as the last
 * expert), plus `{prefix}.mlp.gate.e_score_correction_bias` (F32 or BF16 `[E]`) when present.
 *
 * Tensor parallelism: rank `r` of `worldSize` keeps intermediate rows `r·I/ws … (r+1)·I/ws` of
 * gate and up and the same columns of down (and the matching 128-blocks of their scales), so
 * the shard's intermediate size must be a multiple of 128 (the kernel's N = 2·I/ws is then a
 * multiple of 256). Only the shard's bytes of gate/up are read; down is read whole and sliced.
 *
 * The headers are parsed here (the format is a length, a JSON header and raw bytes; see
 * `./safetensors.ts`) so that only the bytes needed are read from files of many GB.
 *
 * @module
 */
import { fileURLToPath } from "node:url";
import { decodeBf16 } from "./codecs.ts";
import type { ExpertWeights } from "./layer.ts";
import { dtypeSize, type SafetensorsDtype } from "./safetensors.ts";

/** A missing tensor, a wrong dtype or shape, a shard that does not divide, a bad file. */
export class CheckpointError extends Error {
  /** The error's name. */
  override name = "CheckpointError";
  /** The tensor at fault, when there is one. */
  readonly tensor?: string;
  /** Makes the error. */
  constructor(message: string, tensor?: string, options?: ErrorOptions) {
    super(message, options);
    this.tensor = tensor;
  }
}

/** Where the tensors are: a directory (with `model.safetensors.index.json`, or
 * `model.safetensors`, or else every `*.safetensors` in it), an index `.json`, one
 * `.safetensors` file, or a list of `.safetensors` files. */
export type CheckpointSource = string | URL | readonly (string | URL)[];

/** One tensor's header entry, with absolute byte offsets in its file. */
export interface TensorEntry {
  /** The file holding it. */
  file: string;
  /** Element type. */
  dtype: SafetensorsDtype;
  /** Dimensions. */
  shape: number[];
  /** Absolute offset of its first byte in the file. */
  begin: number;
  /** Bytes. */
  bytes: number;
}

const DTYPES = new Set([
  "F32",
  "F64",
  "I32",
  "I64",
  "I16",
  "I8",
  "U8",
  "BOOL",
  "BF16",
  "F16",
  "F8_E4M3",
]);
const MAX_HEADER = 100_000_000;

function toPath(p: string | URL): string {
  return p instanceof URL ? fileURLToPath(p) : p;
}

function dirname(path: string): string {
  const i = path.lastIndexOf("/");
  return i < 0 ? "." : i === 0 ? "/" : path.slice(0, i);
}

async function readExactly(file: Deno.FsFile, position: number, out: Uint8Array): Promise<void> {
  await file.seek(position, Deno.SeekMode.Start);
  let done = 0;
  while (done < out.length) {
    const n = await file.read(out.subarray(done));
    if (n === null) throw new Error(`unexpected end of file at byte ${position + done}`);
    done += n;
  }
}

async function readHeader(path: string, file: Deno.FsFile): Promise<Map<string, TensorEntry>> {
  const size = (await file.stat()).size;
  if (size < 8) throw new CheckpointError(`${path}: not a safetensors file (${size} bytes)`);
  const lenBytes = new Uint8Array(8);
  await readExactly(file, 0, lenBytes);
  const dv = new DataView(lenBytes.buffer);
  const headerLen = dv.getUint32(4, true) * 2 ** 32 + dv.getUint32(0, true);
  if (headerLen > MAX_HEADER || 8 + headerLen > size) {
    throw new CheckpointError(
      `${path}: not a safetensors file (header length ${headerLen}, file ${size} bytes)`,
    );
  }
  const text = new Uint8Array(headerLen);
  await readExactly(file, 8, text);
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(text));
  } catch (e) {
    throw new CheckpointError(`${path}: bad safetensors header: ${(e as Error).message}`);
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) {
    throw new CheckpointError(`${path}: bad safetensors header: not a JSON object`);
  }
  const dataStart = 8 + headerLen;
  const entries = new Map<string, TensorEntry>();
  for (const [name, info] of Object.entries(header as Record<string, unknown>)) {
    if (name === "__metadata__") continue;
    const { dtype, shape, data_offsets: off } = (info ?? {}) as Record<string, unknown>;
    const ok = typeof dtype === "string" && DTYPES.has(dtype) && Array.isArray(shape) &&
      shape.every((d) => Number.isSafeInteger(d) && d >= 0) && Array.isArray(off) &&
      off.length === 2 && off.every((o) => Number.isSafeInteger(o) && o >= 0) && off[0] <= off[1];
    if (!ok) {
      throw new CheckpointError(`${path}: tensor "${name}" has a malformed header entry`, name);
    }
    const bytes = (off as number[])[1] - (off as number[])[0];
    const want = (shape as number[]).reduce((a, b) => a * b, 1) *
      dtypeSize(dtype as SafetensorsDtype);
    if (bytes !== want || dataStart + (off as number[])[1] > size) {
      throw new CheckpointError(
        `${path}: tensor "${name}": data_offsets [${off}] do not fit its dtype and shape or the ` +
          `file (${size} bytes; truncated?)`,
        name,
      );
    }
    entries.set(name, {
      file: path,
      dtype: dtype as SafetensorsDtype,
      shape: [...(shape as number[])],
      begin: dataStart + (off as number[])[0],
      bytes,
    });
  }
  return entries;
}

/**
 * An opened checkpoint: tensor names, header entries, ranged reads. Files are opened on first
 * use and stay open until {@link Checkpoint.close} (or `using` / `await using`).
 */
export class Checkpoint implements Disposable {
  /** The safetensors files, in order. */
  readonly files: readonly string[];
  readonly #weightMap?: ReadonlyMap<string, string>;
  readonly #headers = new Map<string, Map<string, TensorEntry>>();
  readonly #open = new Map<string, Deno.FsFile>();

  private constructor(files: string[], weightMap?: Map<string, string>) {
    this.files = files;
    this.#weightMap = weightMap;
  }

  /** Resolves `source` (see {@link CheckpointSource}); reads the index, not the files yet. */
  static async open(source: CheckpointSource): Promise<Checkpoint> {
    if (typeof source !== "string" && !(source instanceof URL)) {
      const files = source.map(toPath);
      if (files.length === 0) throw new CheckpointError("checkpoint: the list of files is empty");
      return new Checkpoint(files);
    }
    const path = toPath(source);
    let stat: Deno.FileInfo;
    try {
      stat = await Deno.stat(path);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) {
        throw new CheckpointError(`checkpoint: ${path} does not exist`, undefined, { cause: e });
      }
      throw e;
    }
    if (stat.isDirectory) {
      const index = `${path}/model.safetensors.index.json`;
      if (await exists(index)) return await Checkpoint.#fromIndex(index);
      if (await exists(`${path}/model.safetensors`)) {
        return new Checkpoint([`${path}/model.safetensors`]);
      }
      const files: string[] = [];
      for await (const e of Deno.readDir(path)) {
        if (e.isFile && e.name.endsWith(".safetensors")) files.push(`${path}/${e.name}`);
      }
      if (files.length === 0) {
        throw new CheckpointError(`checkpoint: no .safetensors files in ${path}`);
      }
      return new Checkpoint(files.sort());
    }
    if (path.endsWith(".json")) return await Checkpoint.#fromIndex(path);
    return new Checkpoint([path]);
  }

  static async #fromIndex(indexPath: string): Promise<Checkpoint> {
    let json: unknown;
    try {
      json = JSON.parse(await Deno.readTextFile(indexPath));
    } catch (e) {
      throw new CheckpointError(`${indexPath}: not a readable JSON index: ${(e as Error).message}`);
    }
    const map = (json as { weight_map?: unknown })?.weight_map;
    if (typeof map !== "object" || map === null || Array.isArray(map)) {
      throw new CheckpointError(`${indexPath}: no "weight_map" object`);
    }
    const dir = dirname(indexPath);
    const weightMap = new Map<string, string>();
    const files = new Set<string>();
    for (const [name, file] of Object.entries(map as Record<string, unknown>)) {
      if (typeof file !== "string") {
        throw new CheckpointError(`${indexPath}: weight_map["${name}"] is not a file name`, name);
      }
      const full = file.startsWith("/") ? file : `${dir}/${file}`;
      weightMap.set(name, full);
      files.add(full);
    }
    return new Checkpoint([...files].sort(), weightMap);
  }

  async #file(path: string): Promise<Deno.FsFile> {
    let f = this.#open.get(path);
    if (f === undefined) {
      try {
        f = await Deno.open(path, { read: true });
      } catch (e) {
        if (e instanceof Deno.errors.NotFound) {
          throw new CheckpointError(`checkpoint: ${path} does not exist`, undefined, { cause: e });
        }
        throw e;
      }
      this.#open.set(path, f);
    }
    return f;
  }

  async #header(path: string): Promise<Map<string, TensorEntry>> {
    let h = this.#headers.get(path);
    if (h === undefined) {
      h = await readHeader(path, await this.#file(path));
      this.#headers.set(path, h);
    }
    return h;
  }

  /** Every tensor name (from the index, or from every file's header). */
  async names(): Promise<string[]> {
    if (this.#weightMap) return [...this.#weightMap.keys()];
    const names: string[] = [];
    for (const f of this.files) names.push(...(await this.#header(f)).keys());
    return names;
  }

  /** The header entry of `name`, or undefined when no file has it. */
  async find(name: string): Promise<TensorEntry | undefined> {
    if (this.#weightMap) {
      const file = this.#weightMap.get(name);
      if (file === undefined) return undefined;
      const entry = (await this.#header(file)).get(name);
      if (entry === undefined) {
        throw new CheckpointError(
          `tensor "${name}": the index puts it in ${file}, whose header does not have it`,
          name,
        );
      }
      return entry;
    }
    let found: TensorEntry | undefined;
    for (const f of this.files) {
      const entry = (await this.#header(f)).get(name);
      if (entry === undefined) continue;
      if (found !== undefined) {
        throw new CheckpointError(
          `tensor "${name}" is in both ${found.file} and ${entry.file}`,
          name,
        );
      }
      found = entry;
    }
    return found;
  }

  /** The header entry of `name`; a {@link CheckpointError} naming it when it is missing, or
   * has another dtype (one of `dtypes`) or shape. */
  async require(
    name: string,
    dtypes: readonly SafetensorsDtype[],
    shape?: readonly number[],
    note = "",
  ): Promise<TensorEntry> {
    const entry = await this.find(name);
    if (entry === undefined) {
      throw new CheckpointError(
        `tensor "${name}" not found in the checkpoint (${this.files.length} file(s): ` +
          `${this.files.slice(0, 3).join(", ")}${this.files.length > 3 ? ", …" : ""})`,
        name,
      );
    }
    if (!dtypes.includes(entry.dtype)) {
      throw new CheckpointError(
        `tensor "${name}" has dtype ${entry.dtype}, expected ${dtypes.join(" or ")}`,
        name,
      );
    }
    if (
      shape !== undefined &&
      (entry.shape.length !== shape.length || entry.shape.some((d, i) => d !== shape[i]))
    ) {
      throw new CheckpointError(
        `tensor "${name}" has shape [${entry.shape.join(", ")}], expected ` +
          `[${shape.join(", ")}]${note}`,
        name,
      );
    }
    return entry;
  }

  /** Reads `bytes` bytes of `entry`'s data from byte `offset` of the tensor. */
  async readBytes(
    entry: TensorEntry,
    offset: number = 0,
    bytes: number = entry.bytes - offset,
  ): Promise<Uint8Array> {
    if (offset < 0 || bytes < 0 || offset + bytes > entry.bytes) {
      throw new RangeError(
        `read of ${bytes} bytes at ${offset} is outside a ${entry.bytes}-byte tensor`,
      );
    }
    const out = new Uint8Array(bytes);
    await readExactly(await this.#file(entry.file), entry.begin + offset, out);
    return out;
  }

  /** Closes every file opened. */
  close(): void {
    for (const f of this.#open.values()) f.close();
    this.#open.clear();
  }

  /** Same as {@link close}. */
  [Symbol.dispose](): void {
    this.close();
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** Options of {@link loadExperts} and {@link planExperts}. */
export interface LoadExpertsOptions {
  /** The checkpoint (see {@link CheckpointSource}), or one already opened. */
  source: CheckpointSource | Checkpoint;
  /** The layer's prefix, e.g. `"model.layers.3"`. */
  prefix: string;
  /** Routed experts to load, `0..numExperts-1`; default: as many as the checkpoint has. */
  numExperts?: number;
  /** Load the shared expert as the last one: true requires it, false skips it; default: load
   * it when present. */
  sharedExpert?: boolean;
  /** Tensor-parallel rank; default 0. */
  rank?: number;
  /** Tensor-parallel world size; default 1. */
  worldSize?: number;
}

/** What {@link planExperts} found out, before reading any weight. */
export interface ExpertsPlan {
  /** The layer's prefix. */
  prefix: string;
  /** Hidden size (the kernel's K). */
  hiddenSize: number;
  /** The full intermediate size. */
  fullIntermediateSize: number;
  /** This rank's intermediate size (the kernel's N is twice it). */
  intermediateSize: number;
  /** Routed experts. */
  numRoutedExperts: number;
  /** Whether the shared expert is loaded (as the last expert). */
  sharedExpert: boolean;
  /** Tensor-parallel rank. */
  rank: number;
  /** Tensor-parallel world size. */
  worldSize: number;
  /** Name prefix of each expert to load (routed, then shared), ending with a dot. */
  expertPrefixes: string[];
}

/** One layer's experts, loaded: see {@link loadExperts}. */
export interface LoadedExperts extends ExpertsPlan {
  /** Every expert's weights (routed, then the shared one), this rank's shard. */
  experts: ExpertWeights[];
  /** `{prefix}.mlp.gate.e_score_correction_bias` as float32, when the checkpoint has it. */
  correctionBias?: Float32Array;
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

const ceil128 = (n: number): number => Math.ceil(n / 128);

/**
 * Checks the layer's tensors without reading their data: the names, dtypes and shapes of every
 * expert to load, and that the shard divides. Throws a {@link CheckpointError} naming the
 * tensor at fault.
 */
export async function planExperts(
  ckpt: Checkpoint,
  options: Omit<LoadExpertsOptions, "source">,
): Promise<ExpertsPlan> {
  const prefix = options.prefix.replace(/\.$/, "");
  const rank = options.rank ?? 0;
  const worldSize = options.worldSize ?? 1;
  if (!Number.isSafeInteger(worldSize) || worldSize < 1) {
    throw new CheckpointError(`worldSize must be a positive integer, got ${worldSize}`);
  }
  if (!Number.isSafeInteger(rank) || rank < 0 || rank >= worldSize) {
    throw new CheckpointError(`rank must be an integer in 0..${worldSize - 1}, got ${rank}`);
  }
  const routed = `${prefix}.mlp.experts.`;
  let numExperts = options.numExperts;
  if (numExperts === undefined) {
    const re = new RegExp(`^${escapeRegExp(routed)}(\\d+)\\.gate_proj\\.weight$`);
    let max = -1;
    for (const name of await ckpt.names()) {
      const m = re.exec(name);
      if (m) max = Math.max(max, Number(m[1]));
    }
    if (max < 0) {
      throw new CheckpointError(
        `tensor "${routed}0.gate_proj.weight" not found: no experts under "${routed}" in the ` +
          `checkpoint (is the prefix right?)`,
        `${routed}0.gate_proj.weight`,
      );
    }
    numExperts = max + 1;
  } else if (!Number.isSafeInteger(numExperts) || numExperts < 1) {
    throw new CheckpointError(`numExperts must be a positive integer, got ${numExperts}`);
  }
  const sharedPrefix = `${prefix}.mlp.shared_experts.`;
  let shared = options.sharedExpert;
  if (shared === undefined) {
    shared = (await ckpt.find(`${sharedPrefix}gate_proj.weight`)) !== undefined;
  }
  const expertPrefixes = Array.from({ length: numExperts }, (_, i) => `${routed}${i}.`);
  if (shared) expertPrefixes.push(sharedPrefix);

  // Sizes from the first expert's gate_proj.
  const first = `${expertPrefixes[0]}gate_proj.weight`;
  const g0 = await ckpt.require(first, ["F8_E4M3"]);
  if (g0.shape.length !== 2) {
    throw new CheckpointError(
      `tensor "${first}" has shape [${g0.shape.join(", ")}], expected [intermediate, hidden]`,
      first,
    );
  }
  const [inter, hidden] = g0.shape;
  if (hidden % 128 !== 0 || hidden === 0) {
    throw new CheckpointError(
      `tensor "${first}": hidden size ${hidden} is not a positive multiple of 128 (the kernel's K)`,
      first,
    );
  }
  if (inter % worldSize !== 0) {
    throw new CheckpointError(
      `tensor "${first}": intermediate size ${inter} does not split over worldSize ${worldSize}`,
      first,
    );
  }
  const shard = inter / worldSize;
  if (shard % 128 !== 0 || shard === 0) {
    throw new CheckpointError(
      `tensor "${first}": the shard's intermediate size ${inter}/${worldSize} = ${shard} is not a ` +
        `positive multiple of 128 (scale blocks would straddle ranks; the kernel needs N = 2·${shard} ` +
        `to be a multiple of 256)`,
      first,
    );
  }
  for (const p of expertPrefixes) {
    const note = p === sharedPrefix && shared
      ? " (the shared expert must match the routed experts to run as one more expert)"
      : "";
    for (const proj of ["gate_proj", "up_proj"]) {
      await ckpt.require(`${p}${proj}.weight`, ["F8_E4M3"], [inter, hidden], note);
      await ckpt.require(
        `${p}${proj}.weight_scale_inv`,
        ["F32"],
        [ceil128(inter), ceil128(hidden)],
        note,
      );
    }
    await ckpt.require(`${p}down_proj.weight`, ["F8_E4M3"], [hidden, inter], note);
    await ckpt.require(
      `${p}down_proj.weight_scale_inv`,
      ["F32"],
      [ceil128(hidden), ceil128(inter)],
      note,
    );
  }
  return {
    prefix,
    hiddenSize: hidden,
    fullIntermediateSize: inter,
    intermediateSize: shard,
    numRoutedExperts: numExperts,
    sharedExpert: shared,
    rank,
    worldSize,
    expertPrefixes,
  };
}

function f32View(bytes: Uint8Array): Float32Array {
  return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
}

/** Reads expert `index` of a plan (routed experts first, then the shared one): this rank's
 * shard, in checkpoint layout (gate rows, then up rows). */
export async function loadExpert(
  ckpt: Checkpoint,
  plan: ExpertsPlan,
  index: number,
): Promise<ExpertWeights> {
  const p = plan.expertPrefixes[index];
  if (p === undefined) {
    throw new RangeError(`expert ${index} is not in 0..${plan.expertPrefixes.length - 1}`);
  }
  const H = plan.hiddenSize, I = plan.fullIntermediateSize, S = plan.intermediateSize;
  const Hb = ceil128(H), Ib = ceil128(I), Sb = S / 128;
  const r = plan.rank;
  const find = async (name: string): Promise<TensorEntry> => {
    const e = await ckpt.find(name);
    if (e === undefined) throw new CheckpointError(`tensor "${name}" not found`, name);
    return e;
  };
  const w13 = new Uint8Array(2 * S * H);
  const w13Scale = new Float32Array(2 * Sb * Hb);
  for (const [half, proj] of [[0, "gate_proj"], [1, "up_proj"]] as const) {
    const w = await find(`${p}${proj}.weight`);
    w13.set(await ckpt.readBytes(w, r * S * H, S * H), half * S * H);
    const s = await find(`${p}${proj}.weight_scale_inv`);
    w13Scale.set(f32View(await ckpt.readBytes(s, r * Sb * Hb * 4, Sb * Hb * 4)), half * Sb * Hb);
  }
  const downAll = await ckpt.readBytes(await find(`${p}down_proj.weight`));
  const w2 = new Uint8Array(H * S);
  for (let h = 0; h < H; h++) w2.set(downAll.subarray(h * I + r * S, h * I + r * S + S), h * S);
  const scaleAll = f32View(await ckpt.readBytes(await find(`${p}down_proj.weight_scale_inv`)));
  const w2Scale = new Float32Array(Hb * Sb);
  for (let h = 0; h < Hb; h++) {
    w2Scale.set(scaleAll.subarray(h * Ib + r * Sb, h * Ib + r * Sb + Sb), h * Sb);
  }
  return { w13, w13Scale, w2, w2Scale };
}

/** Reads `{prefix}.mlp.gate.e_score_correction_bias` (F32 or BF16 `[E]`) as float32, its first
 * `numRoutedExperts` entries (all of them unless `numExperts` asked for fewer experts), or
 * undefined when the checkpoint has none. */
export async function loadCorrectionBias(
  ckpt: Checkpoint,
  plan: ExpertsPlan,
): Promise<Float32Array | undefined> {
  const name = `${plan.prefix}.mlp.gate.e_score_correction_bias`;
  const found = await ckpt.find(name);
  if (found === undefined) return undefined;
  const e = await ckpt.require(name, ["F32", "BF16"]);
  if (e.shape.length !== 1 || e.shape[0] < plan.numRoutedExperts) {
    throw new CheckpointError(
      `tensor "${name}" has shape [${e.shape.join(", ")}], expected [${plan.numRoutedExperts}]`,
      name,
    );
  }
  const bytes = await ckpt.readBytes(e);
  const all = e.dtype === "F32"
    ? f32View(bytes)
    : decodeBf16(new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2));
  return all.slice(0, plan.numRoutedExperts);
}

/**
 * Loads one layer's experts (this rank's shard) from a checkpoint: see the module doc for the
 * tensors read. Needs `--allow-read`.
 *
 * @throws {CheckpointError} naming the tensor for a missing tensor, a wrong dtype or shape, or
 * a shard that does not divide
 */
export async function loadExperts(options: LoadExpertsOptions): Promise<LoadedExperts> {
  const owned = !(options.source instanceof Checkpoint);
  const ckpt = options.source instanceof Checkpoint
    ? options.source
    : await Checkpoint.open(options.source);
  try {
    const plan = await planExperts(ckpt, options);
    const experts: ExpertWeights[] = [];
    for (let i = 0; i < plan.expertPrefixes.length; i++) {
      experts.push(await loadExpert(ckpt, plan, i));
    }
    const correctionBias = await loadCorrectionBias(ckpt, plan);
    return { ...plan, experts, ...(correctionBias ? { correctionBias } : {}) };
  } finally {
    if (owned) ckpt.close();
  }
}
