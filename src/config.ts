/**
 * Kernel launch configurations and the tuned tables that map a token count to one.
 *
 * A table file (as written by the seed's `jit_moe.py`) is a JSON object keyed by token count:
 *
 * ```json
 * {"1": {"block_m": 16, "block_n": 32, "warp_n": 8, "stages": 5, "split": 8}, "8": {...}, ...}
 * ```
 *
 * `split`, `all_slices`, `split_n` and `tail_split` are ours (the seed's tables do not have them)
 * and optional: absent means 1, false, 1 and 1. An optional `"__metadata__"` key (any value) is
 * ignored; other fields in an entry are ignored too.
 *
 * @module
 */

/** One launch configuration of the fused MoE kernel. */
export interface KernelConfig {
  /** Rows (token slots) per block: a multiple of 8 in 8..128. */
  blockM: number;
  /** Columns of N per block; pairs with {@link KernelConfig.warpN}. */
  blockN: number;
  /** Warps along N; see {@link VALID_BLOCK_N_WARP_N}. */
  warpN: number;
  /** Pipeline stages, 1..8. */
  stages: number;
  /**
   * CTAs (one thread-block cluster) sharing each (token block, N slice) unit, 1..16: they
   * divide the up projection's K and the down projection's output rows, so that a few tokens
   * still stream the weights through many SMs. Absent: 1, the seed's kernel.
   */
  split?: number;
  /**
   * One CTA per token block covers every 256-row N slice of the layer and adds each output row
   * once (where N > 256; otherwise the same as false); the blocks past the launch's last full
   * wave run one CTA per slice. Only with (`blockN`, `warpN`) = (32, 8), `split` 1 and `blockM` at
   * most 64 or 72-80. Absent: false, one CTA per slice.
   */
  allSlices?: boolean;
  /**
   * 2: a cluster of two CTAs shares each (token block, N slice) unit by N: each multiplies 128
   * of the slice's 256 gate/up rows (64 whole pairs) and takes half of the down projection's
   * output rows, so a unit's weight stream is divided without the partial sums of `split`
   * (whose buffer limits it to small blocks). Only with (`blockN`, `warpN`) = (32, 8), `split`
   * 1 and no `allSlices`. Absent: 1.
   */
  splitN?: number;
  /**
   * CTAs per unit for the units past a launch's last full wave, 1..16: with more than 1 they
   * run in a second launch, which takes SMs as the main launch's last wave frees them, each
   * shared by a cluster of that many CTAs (by K for `blockM` up to 64, by N halves for 72 and
   * 80, which take 2 only), so that the last wave does not run on a few SMs. Only with `split`
   * 1, `splitN` 1 and no `allSlices`. Absent: 1, one launch.
   */
  tailSplit?: number;
}

/** A parsed table: token count -> config, iterating in ascending token count. */
export type ConfigTable = ReadonlyMap<number, KernelConfig>;

/**
 * The (block_n, warp_n) pairs a table may use. Extend this list (in this one place) when the
 * kernel gains instantiations.
 */
export const VALID_BLOCK_N_WARP_N: readonly (readonly [blockN: number, warpN: number])[] = Object
  .freeze([
    Object.freeze([64, 4] as const),
    Object.freeze([32, 8] as const),
  ]);

/** Inclusive range of `block_m` (which must also be a multiple of 8). */
export const BLOCK_M_RANGE: readonly [min: number, max: number] = Object.freeze([8, 128] as const);

/** Inclusive range of `stages`. */
export const STAGES_RANGE: readonly [min: number, max: number] = Object.freeze([1, 8] as const);

/** Inclusive range of `split` (16 is Hopper's largest, non-portable, cluster). */
export const SPLIT_RANGE: readonly [min: number, max: number] = Object.freeze([1, 16] as const);

/** The environment variable naming a table file, as in the seed. */
export const CONFIG_ENV_VAR = "ALPHA_MOE_CONFIG";

/** A malformed config table or config; names the source, key and field at fault. */
export class ConfigError extends Error {
  /** The table key at fault (e.g. `"8"`), if any. */
  readonly key?: string;
  /** The field at fault (e.g. `"block_m"`), if any. */
  readonly field?: string;

  /** Creates the error. */
  constructor(message: string, key?: string, field?: string) {
    super(message);
    this.name = "ConfigError";
    this.key = key;
    this.field = field;
  }
}

interface Problem {
  field: string;
  message: string;
}

function findProblem(c: KernelConfig): Problem | undefined {
  const names = { blockM: "block_m", blockN: "block_n", warpN: "warp_n", stages: "stages" };
  for (const f of ["blockM", "blockN", "warpN", "stages"] as const) {
    if (!Number.isSafeInteger(c[f])) {
      return { field: names[f], message: `${names[f]} must be an integer, got ${c[f]}` };
    }
  }
  if (c.blockM % 8 !== 0 || c.blockM < BLOCK_M_RANGE[0] || c.blockM > BLOCK_M_RANGE[1]) {
    return {
      field: "block_m",
      message: `block_m must be a multiple of 8 in ${BLOCK_M_RANGE[0]}..${BLOCK_M_RANGE[1]}, ` +
        `got ${c.blockM}`,
    };
  }
  if (!VALID_BLOCK_N_WARP_N.some(([bn, wn]) => bn === c.blockN && wn === c.warpN)) {
    return {
      field: "block_n/warp_n",
      message: `(block_n, warp_n) = (${c.blockN}, ${c.warpN}) is not one of ` +
        VALID_BLOCK_N_WARP_N.map(([bn, wn]) => `(${bn}, ${wn})`).join(", "),
    };
  }
  if (c.stages < STAGES_RANGE[0] || c.stages > STAGES_RANGE[1]) {
    return {
      field: "stages",
      message: `stages must be in ${STAGES_RANGE[0]}..${STAGES_RANGE[1]}, got ${c.stages}`,
    };
  }
  const split = c.split ?? 1;
  if (!Number.isSafeInteger(split) || split < SPLIT_RANGE[0] || split > SPLIT_RANGE[1]) {
    return {
      field: "split",
      message: `split must be an integer in ${SPLIT_RANGE[0]}..${SPLIT_RANGE[1]}, got ${split}`,
    };
  }
  const splitN = c.splitN ?? 1;
  if (splitN !== 1 && splitN !== 2) {
    return { field: "split_n", message: `split_n must be 1 or 2, got ${splitN}` };
  }
  if (splitN === 2 && !splitNAllowed(c)) {
    return {
      field: "split_n",
      message: `split_n 2 needs (block_n, warp_n) = (32, 8), split 1 and no all_slices, got ` +
        `(${c.blockN}, ${c.warpN}), split ${split}, all_slices ${c.allSlices ?? false}`,
    };
  }
  const tailSplit = c.tailSplit ?? 1;
  if (!Number.isSafeInteger(tailSplit) || tailSplit < 1 || tailSplit > SPLIT_RANGE[1]) {
    return {
      field: "tail_split",
      message: `tail_split must be an integer in 1..${SPLIT_RANGE[1]}, got ${tailSplit}`,
    };
  }
  if (tailSplit > 1 && !tailSplitAllowed(c, tailSplit)) {
    return {
      field: "tail_split",
      message: `tail_split ${tailSplit} needs split 1, split_n 1 and no all_slices, and 2 for ` +
        `block_m 72 or 80 with (32, 8); got block_m ${c.blockM}, (${c.blockN}, ${c.warpN}), ` +
        `split ${split}, split_n ${splitN}, all_slices ${c.allSlices ?? false}`,
    };
  }
  if (c.allSlices && !allSlicesAllowed(c)) {
    return {
      field: "all_slices",
      message: `all_slices needs (block_n, warp_n) = (32, 8), split 1 and block_m at most 64 ` +
        `or 72-80, got block_m ${c.blockM}, (${c.blockN}, ${c.warpN}), split ${split}`,
    };
  }
  return undefined;
}

/** Whether a config's block shape can take `allSlices` (see {@link KernelConfig.allSlices}). */
export function allSlicesAllowed(c: KernelConfig): boolean {
  return (c.blockM <= 64 || c.blockM === 72 || c.blockM === 80) && c.blockN === 32 &&
    c.warpN === 8 && (c.split ?? 1) === 1;
}

/** Whether a config can take `tailSplit` n > 1 (see {@link KernelConfig.tailSplit}). */
export function tailSplitAllowed(c: KernelConfig, n: number): boolean {
  const halves = c.blockN === 32 && c.warpN === 8 && c.blockM > 64 && c.blockM <= 80;
  return (c.split ?? 1) === 1 && (c.splitN ?? 1) === 1 && !c.allSlices && (!halves || n === 2);
}

/** Whether a config can take `splitN` 2 (see {@link KernelConfig.splitN}). */
export function splitNAllowed(c: KernelConfig): boolean {
  return c.blockN === 32 && c.warpN === 8 && (c.split ?? 1) === 1 && !c.allSlices;
}

/**
 * Checks one config against the kernel's constraints (the same rules as
 * {@link parseConfigTable}); returns why it is invalid, or undefined when it is valid.
 */
export function configProblem(c: KernelConfig): string | undefined {
  return findProblem(c)?.message;
}

const FIELDS = [
  ["block_m", "blockM"],
  ["block_n", "blockN"],
  ["warp_n", "warpN"],
  ["stages", "stages"],
] as const;

// Canonical non-negative decimal integers only: "08", "+8", " 8" or "1e3" would all be read
// by Python's int() (or not), but they are ambiguous and no tuner writes them.
const KEY_RE = /^(0|[1-9][0-9]*)$/;

/**
 * Validates a parsed JSON table and converts it to a {@link ConfigTable} (ascending keys,
 * frozen entries).
 *
 * @param json the result of `JSON.parse` on a table file
 * @param source where it came from, for error messages (a path, say)
 * @throws {ConfigError} naming the key and field for: a non-object table, a key that is not
 * a non-negative integer, an entry that is not an object, a missing or non-integer field,
 * `block_m` not a multiple of 8 in 8..128, a (block_n, warp_n) pair not in
 * {@link VALID_BLOCK_N_WARP_N}, `stages` outside 1..8, a `split` (optional) outside 1..16, an
 * `all_slices` (optional) that is not a boolean or is true for a block shape that cannot take it
 * ({@link allSlicesAllowed}), a `split_n` (optional) other than 1 or 2 or 2 where the config
 * cannot take it ({@link splitNAllowed}), a `tail_split` (optional) outside 1..16 or above 1
 * where the config cannot take it ({@link tailSplitAllowed}), or a table with no entries.
 */
export function parseConfigTable(json: unknown, source = "config table"): ConfigTable {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new ConfigError(`${source}: expected a JSON object keyed by token count`);
  }
  const entries: [number, KernelConfig][] = [];
  for (const [key, value] of Object.entries(json as Record<string, unknown>)) {
    if (key === "__metadata__") continue;
    const where = `${source}: key "${key}"`;
    if (!KEY_RE.test(key) || !Number.isSafeInteger(Number(key))) {
      throw new ConfigError(`${where}: not a non-negative integer token count`, key);
    }
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw new ConfigError(`${where}: entry is not an object`, key);
    }
    const v = value as Record<string, unknown>;
    const c: KernelConfig = { blockM: 0, blockN: 0, warpN: 0, stages: 0 };
    const integer = (jsonName: string): number => {
      const x = v[jsonName];
      if (typeof x !== "number" || !Number.isSafeInteger(x)) {
        throw new ConfigError(
          `${where}: field "${jsonName}" must be an integer, got ${JSON.stringify(x)}`,
          key,
          jsonName,
        );
      }
      return x;
    };
    for (const [jsonName, name] of FIELDS) {
      if (!(jsonName in v)) {
        throw new ConfigError(`${where}: missing field "${jsonName}"`, key, jsonName);
      }
      c[name] = integer(jsonName);
    }
    if ("split" in v) c.split = integer("split");
    if ("all_slices" in v) {
      const x = v.all_slices;
      if (typeof x !== "boolean") {
        throw new ConfigError(
          `${where}: field "all_slices" must be true or false, got ${JSON.stringify(x)}`,
          key,
          "all_slices",
        );
      }
      if (x) c.allSlices = true;
    }
    if ("split_n" in v) {
      const x = integer("split_n");
      if (x !== 1) c.splitN = x;
    }
    if ("tail_split" in v) {
      const x = integer("tail_split");
      if (x !== 1) c.tailSplit = x;
    }
    const problem = findProblem(c);
    if (problem !== undefined) {
      throw new ConfigError(`${where}: ${problem.message}`, key, problem.field);
    }
    entries.push([Number(key), Object.freeze(c)]);
  }
  if (entries.length === 0) throw new ConfigError(`${source}: the table has no entries`);
  entries.sort((a, b) => a[0] - b[0]);
  return new Map(entries);
}

function parseText(text: string, source: string): ConfigTable {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(`${source}: not valid JSON: ${(e as Error).message}`);
  }
  return parseConfigTable(json, source);
}

function sourceName(path: string | URL): string {
  return path instanceof URL ? path.href : path;
}

/** Reads and parses a table file (needs `--allow-read`). */
export async function loadConfigTable(path: string | URL): Promise<ConfigTable> {
  return parseText(await Deno.readTextFile(path), sourceName(path));
}

/** Synchronous {@link loadConfigTable}. */
export function loadConfigTableSync(path: string | URL): ConfigTable {
  return parseText(Deno.readTextFileSync(path), sourceName(path));
}

/**
 * Picks the config of the key nearest to `numTokens`, exactly like the seed's
 * `get_best_config`, which scans the table's keys in order and replaces its pick only when
 * `abs(key - n_tokens) < best` (strictly less).
 *
 * Tie-breaking: when two keys are equally far (e.g. keys 8 and 10 for 9 tokens), the one seen
 * first wins. The seed scans in the file's order; both of its shipped tables, and every table
 * its tuner writes, are in ascending order, so **the smaller key wins**. A {@link ConfigTable}
 * iterates in ascending order, so this gives the same answer. (For a hand-made file with keys
 * out of order the seed would prefer whichever tied key comes first in the file; JavaScript
 * objects enumerate integer keys in ascending order, so that order is not recoverable from
 * parsed JSON. We always prefer the smaller key.)
 *
 * @throws {RangeError} if `numTokens` is not a finite number
 * @throws {ConfigError} if the table is empty
 */
export function selectConfig(table: ConfigTable, numTokens: number): KernelConfig {
  if (!Number.isFinite(numTokens)) {
    throw new RangeError(`numTokens must be a finite number, got ${numTokens}`);
  }
  let best = Infinity;
  let pick: KernelConfig | undefined;
  for (const [key, config] of table) {
    const d = Math.abs(key - numTokens);
    if (d < best) {
      best = d;
      pick = config;
    }
  }
  if (pick === undefined) throw new ConfigError("the config table has no entries");
  return pick;
}

// Parsed tables by path, like the seed's functools.lru_cache on get_best_config: the file is
// read once per process. clearConfigCache() forgets them.
const tableCache = new Map<string, ConfigTable>();

/** Forgets the tables {@link configFromEnv} has read, so edited files are read again. */
export function clearConfigCache(): void {
  tableCache.clear();
}

/**
 * The config for `numTokens` from the table named by the `ALPHA_MOE_CONFIG` environment
 * variable (a path), or undefined when the variable is unset or empty. The table is read
 * once per path and cached (see {@link clearConfigCache}).
 *
 * Permission errors are not swallowed: without `--allow-env` (or `--allow-read` for the file)
 * Deno's `NotCapable` error propagates unchanged.
 *
 * @throws {ConfigError} if the file is not a valid table
 */
export function configFromEnv(numTokens: number): KernelConfig | undefined {
  const path = Deno.env.get(CONFIG_ENV_VAR);
  if (path === undefined || path === "") return undefined;
  let table = tableCache.get(path);
  if (table === undefined) {
    table = loadConfigTableSync(path);
    tableCache.set(path, table);
  }
  return selectConfig(table, numTokens);
}

/**
 * Built-in configs by token count, used by {@link defaultConfig}: the first row whose
 * `maxTokens` is at least the token count applies. Plain, valid everywhere, not tuned.
 *
 * | tokens     | block_m | block_n | warp_n | stages |
 * |------------|---------|---------|--------|--------|
 * | <= 32      | 16      | 32      | 8      | 4      |
 * | <= 512     | 32      | 32      | 8      | 4      |
 * | more       | 64      | 32      | 8      | 3      |
 */
export const DEFAULT_CONFIGS: readonly {
  readonly maxTokens: number;
  readonly config: KernelConfig;
}[] = Object.freeze([
  { maxTokens: 32, config: Object.freeze({ blockM: 16, blockN: 32, warpN: 8, stages: 4 }) },
  { maxTokens: 512, config: Object.freeze({ blockM: 32, blockN: 32, warpN: 8, stages: 4 }) },
  {
    maxTokens: Infinity,
    config: Object.freeze({ blockM: 64, blockN: 32, warpN: 8, stages: 3 }),
  },
]);

/** A sensible untuned config for `numTokens`, from {@link DEFAULT_CONFIGS}. */
export function defaultConfig(numTokens: number): KernelConfig {
  for (const row of DEFAULT_CONFIGS) {
    if (numTokens <= row.maxTokens) return row.config;
  }
  return DEFAULT_CONFIGS[DEFAULT_CONFIGS.length - 1].config;
}

// ---- per-card, per-shape config files (configs/) ----
// Imports may stand anywhere at a module's top level; this one is kept with the code using it.
// device.ts loads nothing at import time, so this module still needs no --allow-ffi.
import { deviceInfo } from "./device.ts";

/** The directory of the tables shipped with this module (`configs/`). */
export const BUNDLED_CONFIG_DIR: URL = new URL("../configs/", import.meta.url);

/**
 * The short GPU name used in table file names, from a CUDA device name: the first word after
 * "NVIDIA", letters and digits only. "NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA H200" -> "H200",
 * "NVIDIA GH200 480GB" -> "GH200".
 *
 * @throws {ConfigError} for a name with no letters or digits
 */
export function gpuShortName(deviceName: string): string {
  const words = deviceName.trim().split(/\s+/).filter((w) => w !== "" && !/^nvidia$/i.test(w));
  const word = (words[0] ?? "").replace(/[^A-Za-z0-9]/g, "");
  if (word === "") throw new ConfigError(`cannot make a GPU name out of "${deviceName}"`);
  return word;
}

/**
 * The file name of the table for a card and a layer shape: `<gpu>_E<e>_N<n>_K<k>.json`, e.g.
 * `H100_E257_N256_K7168.json` (`gpu` from {@link gpuShortName}; E counts every expert on the GPU,
 * a shared expert included, as the seed's file names do). The bundled tables are in
 * {@link BUNDLED_CONFIG_DIR}.
 *
 * @param card a CUDA device name ("NVIDIA H100 80GB HBM3"), or anything with such a `name`
 */
export function configFileName(
  card: string | { readonly name: string },
  E: number,
  N: number,
  K: number,
): string {
  for (const [name, v] of Object.entries({ E, N, K })) {
    if (!Number.isSafeInteger(v) || v < 1) {
      throw new ConfigError(`${name} must be a positive integer, got ${v}`);
    }
  }
  const gpu = gpuShortName(typeof card === "string" ? card : card.name);
  return `${gpu}_E${E}_N${N}_K${K}.json`;
}

/** The sizes that select a table file. */
export interface ConfigShape {
  /** Experts on the GPU (a shared expert included). */
  numExperts: number;
  /** Up-projection rows (2 x intermediate size). */
  N: number;
  /** Hidden size. */
  K: number;
}

/** Options of {@link bundledConfig} and {@link pickConfig}. */
export interface BundledConfigOptions {
  /** Look for table files here instead of {@link BUNDLED_CONFIG_DIR}. */
  dir?: URL;
}

// A table file known to be absent (cached like a table, so clearConfigCache forgets it too).
const ABSENT: ConfigTable = new Map();

/**
 * Cards whose tables stand in for another card's when that card has none of its own: Hopper
 * parts with the H100 SXM's 132 SMs and 228 KB of shared memory per SM, so that every config of
 * an H100 table runs on them, and the same tile shapes suit them (the H200's faster memory
 * moves the times, not which tile shapes fit). A card's own table, once tuned, wins.
 */
export const TABLE_STAND_INS: Readonly<Record<string, string>> = Object.freeze({
  H200: "H100",
  H800: "H100",
  GH200: "H100",
});

function loadTable(url: URL): ConfigTable {
  let table = tableCache.get(url.href);
  if (table === undefined) {
    try {
      table = loadConfigTableSync(url);
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
      table = ABSENT;
    }
    tableCache.set(url.href, table);
  }
  return table;
}

/**
 * The shipped table file that {@link bundledConfig} reads for this card and shape: the card's
 * own (`<gpu>_E<e>_N<n>_K<k>.json`), else that of its stand-in ({@link TABLE_STAND_INS}: an H200
 * without its own table uses the H100's), or undefined when neither exists (or this module is not
 * loaded from local files).
 *
 * @throws {ConfigError} if a file exists but is not a valid table
 */
export function bundledTableFile(
  card: string | { readonly name: string },
  shape: ConfigShape,
  options: BundledConfigOptions = {},
): URL | undefined {
  const dir = options.dir ?? BUNDLED_CONFIG_DIR;
  if (dir.protocol !== "file:") return undefined;
  const name = configFileName(card, shape.numExperts, shape.N, shape.K);
  const gpu = gpuShortName(typeof card === "string" ? card : card.name);
  const standIn = TABLE_STAND_INS[gpu];
  for (const file of [name, ...(standIn ? [standIn + name.slice(gpu.length)] : [])]) {
    const url = new URL(file, dir);
    if (loadTable(url) !== ABSENT) return url;
  }
  return undefined;
}

/**
 * The config for `numTokens` from the shipped table of this card and shape
 * ({@link bundledTableFile}: the card's own, else its stand-in's), or undefined when there is
 * none. Each file is read once (see {@link clearConfigCache}).
 *
 * @throws {ConfigError} if a file exists but is not a valid table
 */
export function bundledConfig(
  card: string | { readonly name: string },
  shape: ConfigShape,
  numTokens: number,
  options: BundledConfigOptions = {},
): KernelConfig | undefined {
  const url = bundledTableFile(card, shape, options);
  return url === undefined ? undefined : selectConfig(loadTable(url), numTokens);
}

/** Options of {@link pickConfig}. */
export interface PickConfigOptions extends BundledConfigOptions {
  /** The CUDA device name to pick for; default: device 0's, when a GPU is there. */
  card?: string;
}

let detectedCard: string | null | undefined;

function currentCard(): string | undefined {
  if (detectedCard === undefined) {
    try {
      detectedCard = deviceInfo().name;
    } catch (err) {
      if (err instanceof Deno.errors.NotCapable) throw err;
      detectedCard = null; // no library or no GPU: no card-specific table
    }
  }
  return detectedCard ?? undefined;
}

/**
 * The kernel config for `numTokens` tokens of a layer of `shape`, in this order:
 *
 * 1. the table named by `ALPHA_MOE_CONFIG` ({@link configFromEnv}), when the variable is set;
 * 2. the shipped table for this card and shape, or for its stand-in ({@link bundledConfig},
 *    {@link TABLE_STAND_INS}), when there is one;
 * 3. {@link defaultConfig}.
 *
 * Needs `--allow-env` (and `--allow-read` for the tables); the card is read from device 0 once
 * (needs `--allow-ffi`; without a GPU step 2 is skipped).
 *
 * @throws {ConfigError} if a table file is not valid
 */
export function pickConfig(
  shape: ConfigShape,
  numTokens: number,
  options: PickConfigOptions = {},
): KernelConfig {
  const fromEnv = configFromEnv(numTokens);
  if (fromEnv !== undefined) return fromEnv;
  const card = options.card ?? currentCard();
  if (card !== undefined) {
    const bundled = bundledConfig(card, shape, numTokens, options);
    if (bundled !== undefined) return bundled;
  }
  return defaultConfig(numTokens);
}
