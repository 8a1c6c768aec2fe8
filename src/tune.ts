/**
 * Finding the fastest kernel config per token count for a layer shape, as the seed's
 * `jit_moe.py` does, within a time budget: the library behind `deno task tune`.
 *
 * For each batch size it draws top-k ids at one or more balancedness values (the seed's
 * definition, see {@link balancedTopkIds}), prunes the search space (the seed's: block_m 8..128
 * step 8, every (block_n, warp_n) of {@link VALID_BLOCK_N_WARP_N}, stages 1..5, and our split
 * 1..16) to what the shape can use,
 * times every remaining config with CUDA events (L2 flushed before each launch, medians), and
 * re-times the best few with more launches (successive halving, see {@link searchConfigs}). The
 * result is a table in the seed's JSON format ({@link tableJson}) and a results file with the
 * timings and where they were taken ({@link TuneResultsFile}).
 *
 * The pure parts (routing, pruning, the search over a `measure` callback, file formats,
 * summary) need no GPU; {@link tuneConfigs} drives the GPU.
 *
 * @module
 */
import { AlphaMoeError, Status } from "../ffi/errors.ts";
import { loadedLibraryPath, symbols } from "../ffi/library.ts";
import { DeviceBuffer } from "./buffer.ts";
import {
  allSlicesAllowed,
  type ConfigTable,
  defaultConfig,
  gpuShortName,
  type KernelConfig,
  parseConfigTable,
  splitNAllowed,
  tailSplitAllowed,
  VALID_BLOCK_N_WARP_N,
} from "./config.ts";
import { type DeviceInfo, requireHopper } from "./device.ts";
import { checkKernelConfig } from "./fused_moe.ts";
import type { LatencySeries } from "./plot.ts";
import { DeviceMoeProblem } from "./problem.ts";
import { makeRandomMoeProblem, type MoeProblem, Rng } from "./random.ts";
import { memoryFloorBytes, Timer } from "./timing.ts";
import { runUnfusedMoe, unfusedWorkspaceBytes } from "./unfused.ts";

// ---------------------------------------------------------------------------------------------
// Shapes and batch sizes

/** A MoE layer shape as the tuner sees it. */
export interface TuneShape {
  /** Experts on the GPU, a shared expert included (DeepSeek-V3: 256 routed + 1 shared = 257). */
  numExperts: number;
  /** Up-projection rows: 2 x intermediate size (per GPU). */
  N: number;
  /** Hidden size. */
  K: number;
  /** Experts per token, the shared expert included (DeepSeek-V3: 8 + 1 = 9). */
  topK: number;
  /** The last expert is a shared expert: every token's last slot goes to it. */
  sharedExpert: boolean;
}

/** The layer shapes of the kernel issue (per GPU), by short name. */
export const MODEL_SHAPES: Readonly<Record<string, Readonly<TuneShape>>> = Object.freeze({
  /** DeepSeek-V3/R1 at TP 8: 256 routed experts + 1 shared, top-8 + shared. */
  ds: Object.freeze({ numExperts: 257, N: 256, K: 7168, topK: 9, sharedExpert: true }),
  /** 512 experts, top-10, hidden 2048 (the seed's second table). */
  e512: Object.freeze({ numExperts: 512, N: 256, K: 2048, topK: 10, sharedExpert: false }),
  /** DeepSeek-V3 at TP 4. */
  ds2: Object.freeze({ numExperts: 257, N: 512, K: 7168, topK: 9, sharedExpert: true }),
  /** 128 experts, top-8, hidden 4096, intermediate 384 per GPU. */
  e128: Object.freeze({ numExperts: 128, N: 768, K: 4096, topK: 8, sharedExpert: false }),
});

/** The token counts of the seed's shipped tables: 1..8 then 8 steps per doubling up to 8192. */
export const SEED_BATCH_SIZES: readonly number[] = Object.freeze([
  1,
  2,
  3,
  4,
  5,
  6,
  7,
  8,
  10,
  12,
  14,
  16,
  20,
  24,
  28,
  32,
  40,
  48,
  56,
  64,
  80,
  96,
  112,
  128,
  160,
  192,
  224,
  256,
  320,
  384,
  448,
  512,
  640,
  768,
  896,
  1024,
  1280,
  1536,
  1792,
  2048,
  2560,
  3072,
  3584,
  4096,
  5120,
  6144,
  7168,
  8192,
]);

/**
 * Parses "1,2,4" or "1-8,16,32" (ranges inclusive) into sorted, distinct positive integers.
 *
 * @throws {RangeError} for anything else
 */
export function parseBatchSizes(text: string): number[] {
  const out = new Set<number>();
  for (const part of text.split(",").map((p) => p.trim()).filter((p) => p !== "")) {
    const range = /^(\d+)-(\d+)$/.exec(part);
    if (range) {
      const [a, b] = [Number(range[1]), Number(range[2])];
      if (a < 1 || b < a) throw new RangeError(`bad batch-size range "${part}"`);
      for (let m = a; m <= b; m++) out.add(m);
    } else if (/^\d+$/.test(part) && Number(part) >= 1 && Number.isSafeInteger(Number(part))) {
      out.add(Number(part));
    } else {
      throw new RangeError(`bad batch size "${part}": expected positive integers like 1,8,64`);
    }
  }
  if (out.size === 0) throw new RangeError("no batch sizes given");
  return [...out].sort((a, b) => a - b);
}

// ---------------------------------------------------------------------------------------------
// Routing at a given balancedness

/** Options of {@link balancedTopkIds}. */
export interface BalancedRoutingOptions {
  /** Tokens. */
  M: number;
  /** Experts, a shared expert included. */
  numExperts: number;
  /** Experts per token, the shared expert included. */
  topK: number;
  /** The last expert is shared: slot `topK - 1` of every token is expert `numExperts - 1`. */
  sharedExpert?: boolean;
  /** 1.0: uniform; 0.0: every routed slot on expert 0; in between: the mixture. */
  balancedness: number;
  /** PRNG seed. */
  seed: number;
}

/**
 * Top-k ids `[M, topK]` at a balancedness, by the seed's definition (`generate_topk_ids` of
 * `jit_moe.py`): every routed slot independently draws an expert, with replacement, from
 * `balancedness * uniform + (1 - balancedness) * onehot(0)` over the routed experts; with a
 * shared expert, the last slot of every token is the last expert. (With replacement, a token
 * may draw an expert twice, as in the seed; the kernel handles that like two experts.)
 *
 * @throws {RangeError} for a balancedness outside [0, 1] or inconsistent sizes
 */
export function balancedTopkIds(options: BalancedRoutingOptions): Int32Array {
  const { M, numExperts: E, topK, balancedness: b } = options;
  const shared = options.sharedExpert ?? false;
  for (const [name, v] of Object.entries({ M, E, topK })) {
    if (!Number.isSafeInteger(v) || v < (name === "M" ? 0 : 1)) {
      throw new RangeError(`${name} must be a positive integer, got ${v}`);
    }
  }
  if (!(b >= 0 && b <= 1)) throw new RangeError(`balancedness must be in [0, 1], got ${b}`);
  const routedE = shared ? E - 1 : E;
  const routedK = shared ? topK - 1 : topK;
  if (routedK > 0 && routedE < 1) {
    throw new RangeError(`no routed experts: ${E} experts${shared ? " with a shared one" : ""}`);
  }
  const rng = new Rng(options.seed);
  const p0 = b / routedE + (1 - b); // probability of expert 0
  const pOther = b / routedE;
  const ids = new Int32Array(M * topK);
  for (let t = 0; t < M; t++) {
    for (let s = 0; s < routedK; s++) {
      const u = rng.next();
      ids[t * topK + s] = u < p0 ? 0 : Math.min(routedE - 1, 1 + Math.floor((u - p0) / pOther));
    }
    if (shared) ids[t * topK + topK - 1] = E - 1;
  }
  return ids;
}

/** Slots per expert (ids outside `0..numExperts-1` are not counted). */
export function tokensPerExpert(topkIds: Int32Array, numExperts: number): Int32Array {
  const counts = new Int32Array(numExperts);
  for (const e of topkIds) if (e >= 0 && e < numExperts) counts[e]++;
  return counts;
}

// ---------------------------------------------------------------------------------------------
// Search space and pruning

/** Pipeline stages searched (the seed's range; more rarely fits in shared memory). */
export const TUNE_STAGES: readonly number[] = Object.freeze([1, 2, 3, 4, 5]);

/**
 * Split factors searched (CTAs per cluster sharing one unit of work; 1 = the seed's kernel).
 * 3, 5, 6 and 7 fill the SMs where a power of two leaves them idle or overfills them: 1-5 %
 * at M = 2-4 (bench/RESULTS.md, 2026-11-27 session 7); 10-14 never won there.
 */
export const TUNE_SPLITS: readonly number[] = Object.freeze([1, 2, 3, 4, 5, 6, 7, 8, 16]);

/**
 * The seed's search space (block_m 8..128 step 8 x (block_n, warp_n) pairs x stages 1..5), each
 * with every split of {@link TUNE_SPLITS}, plus `allSlices` for the block shapes that take it
 * ({@link allSlicesAllowed}) and `splitN` 2 for those that take it ({@link splitNAllowed});
 * {@link worthSplitting} prunes the splits per batch, and the tuner drops `allSlices` where N
 * has one slice (the same kernel).
 */
export function searchSpace(): KernelConfig[] {
  const out: KernelConfig[] = [];
  for (let blockM = 8; blockM <= 128; blockM += 8) {
    for (const [blockN, warpN] of VALID_BLOCK_N_WARP_N) {
      for (const stages of TUNE_STAGES) {
        for (const split of TUNE_SPLITS) {
          out.push(...configVariants({ blockM, blockN, warpN, stages, split }, true, true));
        }
      }
    }
  }
  return out;
}

/**
 * `c` in canonical form (no split field for 1, as in the seed's tables), then, when `allSlices`
 * is wanted and the block shape takes it ({@link allSlicesAllowed}), the same with allSlices,
 * and when `splitN` is wanted and the config takes it ({@link splitNAllowed}), with splitN 2.
 */
export function configVariants(
  c: KernelConfig,
  allSlices: boolean,
  splitN = false,
): KernelConfig[] {
  const { split, allSlices: _a, splitN: _n, ...rest } = c;
  const base: KernelConfig = { ...rest, ...((split ?? 1) > 1 ? { split } : {}) };
  const out = [base];
  if (allSlices && allSlicesAllowed(base)) out.push({ ...base, allSlices: true });
  if (splitN && splitNAllowed(base)) out.push({ ...base, splitN: 2 });
  return out;
}

/**
 * Tail splits the tuner tries ({@link tailVariants}): clusters of 2 to 8 CTAs per unit of the
 * last wave (bench/NOTES.md, item 57).
 */
export const TUNE_TAIL_SPLITS: readonly number[] = Object.freeze([2, 4, 8]);

/**
 * `c` with each of `splits` (default {@link TUNE_TAIL_SPLITS}) it can take as its tail split
 * ({@link tailSplitAllowed}), for a launch of `units` units on `smCount` SMs; none when the
 * units fit in one wave (there is no tail) or `c` has a tail split already.
 */
export function tailVariants(
  c: KernelConfig,
  units: number,
  smCount: number,
  splits: readonly number[] = TUNE_TAIL_SPLITS,
): KernelConfig[] {
  if (units <= smCount || (c.tailSplit ?? 1) > 1) return [];
  return splits.filter((n) => tailSplitAllowed(c, n)).map((n) => ({
    ...c,
    tailSplit: n,
  }));
}

/**
 * Units of work (token blocks x 256-row N slices) of a launch with `blockM`, for `counts` slots
 * per expert.
 */
export function unitsOfWork(counts: ArrayLike<number>, blockM: number, N: number): number {
  let blocks = 0;
  for (let e = 0; e < counts.length; e++) blocks += Math.ceil(counts[e] / blockM);
  return blocks * (N / 256);
}

/**
 * Is `split` worth timing for a launch of `units` units on `smCount` SMs? Splitting only helps
 * while the CTAs do not fill the GPU: keep splits whose CTAs still fit in two waves. N halves
 * (`splitN` 2) also shorten the last wave of a launch of a few waves: kept up to four.
 */
export function worthSplitting(
  split: number,
  units: number,
  smCount: number,
  splitN = 1,
): boolean {
  if (splitN > 1) return units <= 4 * smCount;
  return split === 1 || units * split <= 2 * smCount;
}

/**
 * The largest block_m worth timing when the busiest expert has `maxTokensPerExpert` slots: the
 * multiple of 8 at or above twice that, at least 16 (the seed always tries 16, and picks it for
 * a handful of tokens), at most 128. A larger block only adds padding rows to every block.
 */
export function blockMLimit(maxTokensPerExpert: number): number {
  const twice = Math.ceil((2 * Math.max(0, maxTokensPerExpert)) / 8) * 8;
  return Math.min(128, Math.max(16, twice));
}

/**
 * `block_m/block_n/warp_n/stages`, then `xSPLIT` when split > 1, `/all` with allSlices, `/n2`
 * with splitN 2 and `/tN` with tailSplit N: `16/32/8/4`, `8/64/4/3x8`, `80/32/8/3/all`,
 * `80/32/8/4/n2`, `32/32/8/5/t4`.
 */
export function configKey(c: KernelConfig): string {
  const split = c.split ?? 1;
  return `${c.blockM}/${c.blockN}/${c.warpN}/${c.stages}${split > 1 ? `x${split}` : ""}` +
    (c.allSlices ? "/all" : "") + ((c.splitN ?? 1) > 1 ? `/n${c.splitN}` : "") +
    ((c.tailSplit ?? 1) > 1 ? `/t${c.tailSplit}` : "");
}

const CONFIG_KEY = /^(\d+)\/(\d+)\/(\d+)\/(\d+)(?:x(\d+))?(\/all)?(?:\/n(\d+))?(?:\/t(\d+))?$/;

/**
 * The config a {@link configKey} names (`64/32/8/2/t4` -> blockM 64, ..., tailSplit 4); fields at
 * their default are left out, as configKey leaves them out. Whether the library runs it is not
 * checked here.
 *
 * @throws {RangeError} for text that is not a key
 */
export function parseConfigKey(key: string): KernelConfig {
  const m = CONFIG_KEY.exec(key.trim());
  if (m === null) {
    throw new RangeError(
      `"${key}" is not a config key: block_m/block_n/warp_n/stages[xSPLIT][/all][/nN][/tN], ` +
        `e.g. 64/32/8/2/t4`,
    );
  }
  const [blockM, blockN, warpN, stages] = m.slice(1, 5).map(Number);
  const split = m[5] ? Number(m[5]) : 1;
  const splitN = m[7] ? Number(m[7]) : 1;
  const tailSplit = m[8] ? Number(m[8]) : 1;
  return {
    blockM,
    blockN,
    warpN,
    stages,
    ...(split > 1 ? { split } : {}),
    ...(m[6] ? { allSlices: true } : {}),
    ...(splitN > 1 ? { splitN } : {}),
    ...(tailSplit > 1 ? { tailSplit } : {}),
  };
}

/** Same eight fields (an absent split, splitN or tailSplit is 1, an absent allSlices false). */
export function sameConfig(a: KernelConfig, b: KernelConfig): boolean {
  return a.blockM === b.blockM && a.blockN === b.blockN && a.warpN === b.warpN &&
    a.stages === b.stages && (a.split ?? 1) === (b.split ?? 1) &&
    (a.allSlices ?? false) === (b.allSlices ?? false) && (a.splitN ?? 1) === (b.splitN ?? 1) &&
    (a.tailSplit ?? 1) === (b.tailSplit ?? 1);
}

/**
 * Orders configs so that those nearest `hint` come first (stable otherwise): when the time
 * budget cuts a round short, what is left out is what is least likely to win. Distance: block_m
 * and split in octaves, plus 0.35 per stage, plus 0.5 for another (block_n, warp_n) pair.
 */
export function orderByHint(configs: readonly KernelConfig[], hint: KernelConfig): KernelConfig[] {
  const d = (c: KernelConfig): number =>
    Math.abs(Math.log2(c.blockM) - Math.log2(hint.blockM)) +
    Math.abs(Math.log2(c.split ?? 1) - Math.log2(hint.split ?? 1)) +
    0.35 * Math.abs(c.stages - hint.stages) +
    (c.blockN === hint.blockN && c.warpN === hint.warpN ? 0 : 0.5) +
    ((c.allSlices ?? false) === (hint.allSlices ?? false) ? 0 : 0.5) +
    ((c.splitN ?? 1) === (hint.splitN ?? 1) ? 0 : 0.5);
  return configs.map((c, i) => ({ c, i, d: d(c) }))
    .sort((a, b) => a.d - b.d || a.i - b.i)
    .map((x) => x.c);
}

// ---------------------------------------------------------------------------------------------
// The search, over any measure function

/** One round of the search. */
export interface SearchRound {
  /** Configs this round times: the best `keep` of the previous round (all in the first). */
  keep: number;
  /** Untimed launches before each series. */
  warmup: number;
  /** Timed launches per series. */
  iterations: number;
  /** Series per config, interleaved across the configs (drift hits them alike). */
  repeats: number;
}

/**
 * The default rounds: every candidate with 5 launches, the best 8 with 15 per routing draw
 * (`draws`: one per balancedness value, see {@link drawFor}), the best 3 (plus the default
 * config) with `finalIterations` launches in 4 interleaved series.
 */
export function defaultRounds(finalIterations = 40, draws = 1): SearchRound[] {
  const per = Math.max(1, Math.ceil(finalIterations / 4));
  return [
    { keep: Infinity, warmup: 2, iterations: 5, repeats: 1 },
    { keep: 8, warmup: 1, iterations: 15, repeats: Math.max(1, draws) },
    { keep: 3, warmup: 1, iterations: per, repeats: 4 },
  ];
}

/** "all x5 (warm-up 2) -> best 8 x15 (warm-up 1) -> best 3 + baseline 4x10 (warm-up 1)". */
export function describeRounds(rounds: readonly SearchRound[]): string {
  return rounds.map((r, i) => {
    const who = r.keep === Infinity ? "all" : `best ${r.keep}`;
    const base = i === rounds.length - 1 && i > 0 ? " + default" : "";
    const times = r.repeats > 1 ? `${r.repeats}x${r.iterations}` : `x${r.iterations}`;
    return `${who}${base} ${times} (warm-up ${r.warmup})`;
  }).join(" -> ");
}

/** A config and its median time. */
export interface Measured {
  /** The config. */
  config: KernelConfig;
  /** Median microseconds. */
  us: number;
  /** Timed launches behind the median. */
  samples: number;
}

/**
 * Times `config`: returns the samples (µs) of `iterations` launches after `warmup` untimed.
 * `round` (0-based) and `series` (the repeat within the round) say which series this is.
 */
export type MeasureFn = (
  config: KernelConfig,
  run: { warmup: number; iterations: number; round: number; series: number },
) => number[];

/** Options of {@link searchConfigs}. */
export interface SearchOptions {
  /** Rounds; default {@link defaultRounds}(). */
  rounds?: readonly SearchRound[];
  /** Also time this config in the last round (the default config, to report the gain). */
  baseline?: KernelConfig;
  /**
   * Also time these in the last round, whatever the first rounds made of them: the table's
   * current entry, so that a re-tune replaces it only after timing both the same way.
   */
  incumbents?: readonly KernelConfig[];
  /**
   * Configs to time beside each config of every round after the first (e.g.
   * {@link tailVariants}): options that change only how a launch ends, whose worth shows only
   * once the base config is good. They join from the second round on, so that a config that
   * is slow on some routings without its variant (ds M=512: 64/32/8/2 at balancedness 0.6,
   * 266 µs alone, 223 with tail split 4) is ranked with it before the finalists are picked.
   */
  variants?: (c: KernelConfig) => KernelConfig[];
  /**
   * Stop the first round at this time (of `now`), once `minFirstRound` configs are timed:
   * the remaining candidates are left out (they come last in the order given).
   */
  deadline?: number;
  /** The clock of `deadline`, in ms; default `performance.now`. */
  now?: () => number;
  /** Configs the first round times before a deadline may stop it; default 12. */
  minFirstRound?: number;
  /** Called after each config of the first round. */
  onTimed?: (timed: number, total: number) => void;
}

/** What {@link searchConfigs} found. */
export interface SearchOutcome {
  /** The last round, fastest first (the baseline included). */
  ranked: Measured[];
  /** The baseline's measurement, if it was given and could run. */
  baseline?: Measured;
  /** The first incumbent's measurement in the last round, if one was given and could run. */
  incumbent?: Measured;
  /** Configs the first round timed. */
  timed: number;
  /** Candidates left out by the deadline. */
  cut: number;
  /** Configs that could not run (with the reason), skipped. */
  refused: { config: KernelConfig; reason: string }[];
  /** Launches made (warm-up included). */
  launches: number;
}

function median(values: readonly number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/** A failure that rules out one config but leaves the GPU usable. */
function isConfigFailure(err: unknown): err is AlphaMoeError {
  return err instanceof AlphaMoeError && !err.fatal &&
    (err.code === Status.UNSUPPORTED || err.code === Status.INVALID_ARGUMENT ||
      err.code === Status.OUT_OF_MEMORY || err.code === Status.CUDA);
}

/**
 * Successive halving over `candidates` (timed in the order given): round 1 times every one
 * briefly, each later round re-times the best `keep` of the round before with more launches,
 * every later round also times the `variants` of its configs, and the last round `baseline` and
 * `incumbents`.
 * Configs whose launch fails with a non-fatal library error are skipped and reported; a fatal
 * (sticky) CUDA error is thrown.
 *
 * @throws {RangeError} if nothing could be timed
 */
export function searchConfigs(
  candidates: readonly KernelConfig[],
  measure: MeasureFn,
  options: SearchOptions = {},
): SearchOutcome {
  const rounds = options.rounds ?? defaultRounds();
  if (rounds.length === 0) throw new RangeError("searchConfigs: no rounds");
  const now = options.now ?? (() => performance.now());
  const minFirst = options.minFirstRound ?? 12;
  const refused: { config: KernelConfig; reason: string }[] = [];
  let launches = 0;
  let cut = 0;
  let timed = 0;

  const tryMeasure = (
    c: KernelConfig,
    warmup: number,
    iterations: number,
    round = 0,
    series = 0,
  ): number[] | null => {
    try {
      launches += warmup + iterations;
      return measure(c, { warmup, iterations, round, series });
    } catch (err) {
      if (!isConfigFailure(err)) throw err;
      refused.push({ config: c, reason: err.message.split("\n")[0] });
      return null;
    }
  };

  // Round 1.
  const first = rounds[0];
  let scored: Measured[] = [];
  for (let i = 0; i < candidates.length; i++) {
    if (options.deadline !== undefined && i >= minFirst && now() > options.deadline) {
      cut = candidates.length - i;
      break;
    }
    const c = candidates[i];
    const samples: number[] = [];
    let ok = true;
    for (let r = 0; r < first.repeats && ok; r++) {
      const got = tryMeasure(c, first.warmup, first.iterations, 0, r);
      if (got === null) ok = false;
      else samples.push(...got);
    }
    if (ok) {
      scored.push({ config: c, us: median(samples), samples: samples.length });
      timed++;
    }
    options.onTimed?.(i + 1, candidates.length);
  }

  // Later rounds.
  let baseline: Measured | undefined;
  for (let ri = 1; ri < rounds.length; ri++) {
    const round = rounds[ri];
    const last = ri === rounds.length - 1;
    const list = [...scored].sort((a, b) => a.us - b.us).slice(0, round.keep).map((m) => m.config);
    const joining = list.flatMap((c) => options.variants?.(c) ?? []);
    if (last) {
      joining.push(...[options.baseline, ...(options.incumbents ?? [])].flatMap((c) => c ?? []));
    }
    for (const c of joining) {
      if (!list.some((x) => sameConfig(x, c))) list.push(c);
    }
    // Each config's time is the mean of its series' medians: the series may run on different
    // routings (the tuner's later rounds), and a pooled median would hide one that is slower on
    // a minority of them.
    const series = list.map(() => [] as number[][]);
    const failed = new Set<number>();
    for (let r = 0; r < round.repeats; r++) {
      list.forEach((c, i) => {
        if (failed.has(i)) return;
        const got = tryMeasure(c, round.warmup, round.iterations, ri, r);
        if (got === null) failed.add(i);
        else if (got.length > 0) series[i].push(got);
      });
    }
    scored = list.flatMap((c, i) =>
      failed.has(i) || series[i].length === 0 ? [] : [{
        config: c,
        us: series[i].reduce((sum, s) => sum + median(s), 0) / series[i].length,
        samples: series[i].reduce((n, s) => n + s.length, 0),
      }]
    );
  }
  // With a single round, the baseline is timed like any candidate.
  if (rounds.length === 1 && options.baseline) {
    const b = options.baseline;
    if (!scored.some((m) => sameConfig(m.config, b))) {
      const got = tryMeasure(b, first.warmup, first.iterations * first.repeats);
      if (got !== null) scored.push({ config: b, us: median(got), samples: got.length });
    }
  }
  if (options.baseline) baseline = scored.find((m) => sameConfig(m.config, options.baseline!));
  const current = options.incumbents?.[0];
  const incumbent = current && scored.find((m) => sameConfig(m.config, current));
  const ranked = scored.sort((a, b) => a.us - b.us);
  if (ranked.length === 0) {
    throw new RangeError(
      `no config could be timed (${refused.length} refused` +
        (refused.length > 0 ? `, e.g. ${configKey(refused[0].config)}: ${refused[0].reason}` : "") +
        ")",
    );
  }
  return { ranked, baseline, incumbent, timed, cut, refused, launches };
}

/**
 * The table's current entry, else the default config, is kept unless the fastest config beats
 * it by more than this fraction: closer than that is within run-to-run noise, and the reported
 * gain would not reproduce.
 */
export const KEEP_DEFAULT_WITHIN = 0.01;

/**
 * The config to ship: the fastest, unless the incumbent (the table's current entry, in a
 * re-tune) or else the default is within {@link KEEP_DEFAULT_WITHIN} of it. A re-tune that
 * preferred the default to a tuned entry within noise would swap configs on one routing
 * draw's evidence (bench/NOTES.md, item 59).
 */
export function chooseConfig(outcome: SearchOutcome): Measured {
  const fastest = outcome.ranked[0];
  const keep = outcome.incumbent ?? outcome.baseline;
  if (keep !== undefined && keep.us <= fastest.us * (1 + KEEP_DEFAULT_WITHIN)) return keep;
  return fastest;
}

// ---------------------------------------------------------------------------------------------
// Results and files

/** Everything the tuner learned about one batch size. */
export interface BatchResult {
  /** Tokens. */
  M: number;
  /** The config written to the table and its median µs. */
  best: Measured;
  /** The fastest config of the last round (differs from `best` when the default was kept). */
  fastest: Measured;
  /** {@link defaultConfig}(M) and its median µs (absent if it could not run). */
  default?: Measured;
  /** Median µs of the unfused baseline, if timed. */
  unfusedUs?: number;
  /**
   * The memory floor in µs (bytes / measured copy bandwidth), averaged over the routing draws
   * of the last round, as the times are.
   */
  floorUs: number;
  /** Bytes behind {@link floorUs}. */
  floorBytes: number;
  /** Distinct experts the first routing draw touches. */
  distinctExperts: number;
  /** Slots of the busiest expert in the first routing draw. */
  maxTokensPerExpert: number;
  /** Configs in the first round (after pruning). */
  candidates: number;
  /** Configs the first round timed. */
  timed: number;
  /** Candidates left out by the time budget. */
  cut: number;
  /** Configs that could not run. */
  refused: number;
  /** Wall seconds spent on this batch size. */
  seconds: number;
}

/** Where and how a tuning run was made. */
export interface TuneMetadata {
  /** CUDA device name. */
  card: string;
  /** Short name used in file names (H100, H200). */
  gpu: string;
  /** "9.0". */
  computeCapability: string;
  /** Streaming multiprocessors. */
  smCount: number;
  /** NVIDIA driver version (from nvidia-smi), if known. */
  driver?: string;
  /** `amoe_abi_version()` of the library used. */
  abiVersion: number;
  /** Version of this module. */
  moduleVersion?: string;
  /** Git commit of the sources, if known. */
  gitCommit?: string;
  /** The loaded library's build stamp (a hash of its sources, nvcc flags and nvcc version), when
   * one lies beside it: it names the kernel the timings are of whatever git says. */
  libraryStamp?: string;
  /** ISO date of the run. */
  date: string;
  /** The layer shape. */
  shape: TuneShape;
  /** Routing balancedness: one value, or the values whose draws the timings alternate over. */
  balancedness: number | number[];
  /** Seed of the random problem and routing. */
  seed: number;
  /** Measured device-to-device copy bandwidth, GB/s (the memory floor's yardstick). */
  copyBandwidthGBs: number;
  /** How the search ran. */
  search: {
    space: string;
    pruning: string;
    rounds: string;
    /** {@link KEEP_DEFAULT_WITHIN}: the table's entry, else the default, is kept within it. */
    keepDefaultWithin: number;
    budgetSeconds: number;
    timing: string;
  };
  /** Wall seconds of the whole search (absent while partial). */
  seconds?: number;
  /** Batch sizes whose results come from earlier runs ({@link mergeResults}), newest first. */
  kept?: KeptRun[];
}

/** Batch sizes of a results file that an earlier run measured, and how that run was made. */
export interface KeptRun {
  /** The token counts whose results and table entries that run gave. */
  batchSizes: number[];
  /** Its date, commit and budget. */
  date: string;
  /** Git commit of its sources, if known. */
  gitCommit?: string;
  /** Its `--budget-seconds`. */
  budgetSeconds: number;
  /** Its routing balancedness (files older than this field: the file's own). */
  balancedness?: number | number[];
}

/** The results file written beside a table (`X.meta.json` for `X.json`), and the resume file. */
export interface TuneResultsFile {
  /** Always "alpha-moe tune results". */
  format: "alpha-moe tune results";
  /** Format version: 1. */
  version: 1;
  /** File name of the table these results belong to. */
  table: string;
  /** Where and how. */
  metadata: TuneMetadata;
  /** Per batch size (keys: token counts). */
  results: Record<string, BatchResult>;
  /** true in a `.partial` file: the run has not finished. */
  partial?: boolean;
}

/**
 * A table in the seed's format: `{"<tokens>": {"block_m", "block_n", "warp_n", "stages"}}`, plus
 * `"split"` on entries whose split is above 1, `"all_slices": true`, `"split_n": 2` and
 * `"tail_split"` where set (ours; the seed has none of these fields), keys in ascending numeric
 * order, one entry per line, nothing else, so that the seed's `get_best_config` (which calls
 * `int()` on every key) reads it as well as {@link parseConfigTable} does. The timings and
 * provenance go to the results file instead.
 */
export function tableJson(entries: Iterable<readonly [number, KernelConfig]>): string {
  const sorted = [...entries].sort((a, b) => a[0] - b[0]);
  const lines = sorted.map(([m, c]) =>
    `  "${m}": {"block_m": ${c.blockM}, "block_n": ${c.blockN}, "warp_n": ${c.warpN}, ` +
    `"stages": ${c.stages}${(c.split ?? 1) > 1 ? `, "split": ${c.split}` : ""}` +
    `${c.allSlices ? `, "all_slices": true` : ""}` +
    `${(c.splitN ?? 1) > 1 ? `, "split_n": ${c.splitN}` : ""}` +
    `${(c.tailSplit ?? 1) > 1 ? `, "tail_split": ${c.tailSplit}` : ""}}`
  );
  const text = `{\n${lines.join(",\n")}\n}\n`;
  parseConfigTable(JSON.parse(text), "tableJson"); // never write what we could not read back
  return text;
}

/** The results file of a table: `X.meta.json` for `X.json` (else `X.meta.json` for `X`). */
export function resultsPathFor(tablePath: string): string {
  return tablePath.endsWith(".json")
    ? `${tablePath.slice(0, -5)}.meta.json`
    : `${tablePath}.meta.json`;
}

/** The resume file of a table: `X.json.partial`. */
export function partialPathFor(tablePath: string): string {
  return `${tablePath}.partial`;
}

/** Writes `text` to a temporary file beside `path` and renames it into place. */
export async function writeTextFileAtomic(path: string, text: string): Promise<void> {
  const slash = path.lastIndexOf("/");
  if (slash > 0) await Deno.mkdir(path.slice(0, slash), { recursive: true });
  const tmp = `${path}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  try {
    await Deno.writeTextFile(tmp, text);
    await Deno.rename(tmp, path);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw err;
  }
}

/**
 * Reads a results (or partial) file.
 *
 * @throws {Error} naming the file when it is not one
 */
export async function readResultsFile(path: string): Promise<TuneResultsFile> {
  const json = JSON.parse(await Deno.readTextFile(path));
  if (json?.format !== "alpha-moe tune results" || typeof json.results !== "object") {
    throw new Error(
      `${path} is not a tune results file (X.meta.json or X.json.partial written by deno task tune)`,
    );
  }
  return json as TuneResultsFile;
}

/** `JSON.stringify` of a results file: µs and other fractions rounded to 0.001. */
export function resultsJson(file: TuneResultsFile): string {
  const round = (_key: string, v: unknown): unknown =>
    typeof v === "number" && !Number.isInteger(v) ? Math.round(v * 1000) / 1000 : v;
  return JSON.stringify(file, round, 1) + "\n";
}

/** Why results of `b`'s run cannot update those of `a`'s, or undefined when they can. */
export function updateMismatch(a: TuneMetadata, b: TuneMetadata): string | undefined {
  if (a.gpu !== b.gpu) return `card ${a.gpu}, not ${b.gpu}`;
  if (JSON.stringify(a.shape) !== JSON.stringify(b.shape)) {
    return `shape ${JSON.stringify(a.shape)}, not ${JSON.stringify(b.shape)}`;
  }
  return undefined;
}

/** `b` as a list of balancedness values. */
export function balancednessList(b: number | readonly number[]): number[] {
  return typeof b === "number" ? [b] : [...b];
}

/** "1" or "1,0.6". */
function balancednessText(b: number | readonly number[]): string {
  return balancednessList(b).join(",");
}

/**
 * `previous` updated by `current`: the batch sizes `current` measured take its results, the
 * others keep `previous`'s, and `metadata.kept` says which earlier run each kept batch size
 * comes from (its date, commit, budget and balancedness: the two runs may route differently).
 * The metadata is otherwise `current`'s. This is `deno task tune --update`: re-tune part of a
 * table (say, the large batch sizes after a kernel change) and keep the rest.
 *
 * @throws {Error} when the two are of another card or shape
 */
export function mergeResults(
  previous: TuneResultsFile,
  current: TuneResultsFile,
): TuneResultsFile {
  const a = previous.metadata, b = current.metadata;
  const why = updateMismatch(a, b);
  if (why !== undefined) throw new Error(`cannot merge tune results: ${why}`);
  const fresh = new Set(Object.keys(current.results).map(Number));
  const kept = new Set(
    Object.values(previous.results).map((r) => r.M).filter((m) => !fresh.has(m)),
  );
  // Kept sizes that `previous` itself had kept still name their own run; the rest are its own.
  const runs: KeptRun[] = [];
  const own = new Set(kept);
  for (const run of a.kept ?? []) {
    const sizes = run.batchSizes.filter((m) => kept.has(m));
    for (const m of sizes) own.delete(m);
    if (sizes.length > 0) {
      runs.push({ balancedness: a.balancedness, ...run, batchSizes: sizes });
    }
  }
  if (own.size > 0) {
    runs.unshift({
      batchSizes: [...own].sort((x, y) => x - y),
      date: a.date,
      ...(a.gitCommit !== undefined ? { gitCommit: a.gitCommit } : {}),
      budgetSeconds: a.search.budgetSeconds,
      balancedness: a.balancedness,
    });
  }
  const results = [
    ...Object.values(previous.results).filter((r) => kept.has(r.M)),
    ...Object.values(current.results),
  ].sort((x, y) => x.M - y.M);
  const { kept: _, ...metadata } = b;
  return {
    ...current,
    metadata: runs.length > 0 ? { ...metadata, kept: runs } : metadata,
    results: Object.fromEntries(results.map((r) => [String(r.M), r])),
  };
}

/** The results of a file, ascending by batch size. */
export function resultsList(file: TuneResultsFile): BatchResult[] {
  return Object.values(file.results).sort((a, b) => a.M - b.M);
}

// ---------------------------------------------------------------------------------------------
// Reporting

/** "42s", "3m05s". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "?";
  const s = Math.max(0, Math.round(seconds));
  return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
}

/** Gain of `best` over `baseline` in percent of the baseline's time (positive: faster). */
export function gainPercent(bestUs: number, baselineUs: number | undefined): number | undefined {
  if (baselineUs === undefined || !(baselineUs > 0) || !Number.isFinite(bestUs)) return undefined;
  return (baselineUs - bestUs) / baselineUs * 100;
}

function fmt(v: number | undefined, digits = 1): string {
  return v === undefined || !Number.isFinite(v) ? "-" : v.toFixed(digits);
}

/** One line per batch size, as printed after each one. */
export function resultLine(r: BatchResult): string {
  const gain = gainPercent(r.best.us, r.default?.us);
  const which = r.default && sameConfig(r.best.config, r.default.config)
    ? "the default"
    : "the current entry";
  const kept = !sameConfig(r.fastest.config, r.best.config)
    ? ` (kept ${which}: ${configKey(r.fastest.config)} was only ${
      fmt(gainPercent(r.fastest.us, r.best.us))
    }% faster)`
    : "";
  return `M=${r.M}: ${configKey(r.best.config)} ${fmt(r.best.us)} µs, default ` +
    `${r.default ? configKey(r.default.config) : "-"} ${fmt(r.default?.us)} µs ` +
    `(${gain === undefined ? "-" : `${gain >= 0 ? "+" : ""}${gain.toFixed(1)}%`})${kept}, ` +
    `floor ${fmt(r.floorUs)} µs, unfused ${fmt(r.unfusedUs)} µs; ${r.timed}/${r.candidates} ` +
    `configs${r.cut > 0 ? ` (${r.cut} cut by the budget)` : ""}` +
    `${r.refused > 0 ? `, ${r.refused} refused` : ""}, ${r.seconds.toFixed(1)} s`;
}

/**
 * The summary table: batch size, best config and µs, default config and µs, gain, memory floor
 * µs, best / floor, unfused µs.
 */
export function summaryTable(results: readonly BatchResult[]): string {
  const head = [
    "tokens",
    "best (bm/bn/wn/st)",
    "best µs",
    "default",
    "default µs",
    "gain",
    "floor µs",
    "best/floor",
    "unfused µs",
  ];
  const rows = results.map((r) => {
    const gain = gainPercent(r.best.us, r.default?.us);
    return [
      String(r.M),
      configKey(r.best.config),
      fmt(r.best.us),
      r.default ? configKey(r.default.config) : "-",
      fmt(r.default?.us),
      gain === undefined ? "-" : `${gain >= 0 ? "+" : ""}${gain.toFixed(1)}%`,
      fmt(r.floorUs),
      r.floorUs > 0 ? (r.best.us / r.floorUs).toFixed(2) : "-",
      fmt(r.unfusedUs),
    ];
  });
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]): string =>
    cells.map((c, i) => (i === 1 || i === 3 ? c.padEnd(widths[i]) : c.padStart(widths[i])))
      .join("  ");
  const gains = results.map((r) => gainPercent(r.best.us, r.default?.us)).filter((g) =>
    g !== undefined
  ) as number[];
  const total = (key: (r: BatchResult) => number | undefined): number =>
    results.reduce((s, r) => s + (key(r) ?? 0), 0);
  const sumBest = total((r) => r.default ? r.best.us : undefined);
  const sumDefault = total((r) => r.default?.us);
  const footer = gains.length === 0
    ? ""
    : `\ngain over the default config: median ${median(gains).toFixed(1)}%, max ${
      Math.max(...gains).toFixed(1)
    }%, summed time ${(gainPercent(sumBest, sumDefault) ?? 0).toFixed(1)}% (${
      gains.filter((g) => g > 0).length
    }/${gains.length} batch sizes changed)`;
  return [line(head), line(widths.map((w) => "-".repeat(w))), ...rows.map(line)].join("\n") +
    footer;
}

/** The plot's series from results: tuned, default, unfused and the memory floor. */
export function latencySeries(results: readonly BatchResult[]): LatencySeries[] {
  const pts = (f: (r: BatchResult) => number | undefined): { batchSize: number; us: number }[] =>
    results.flatMap((r) => {
      const us = f(r);
      return us !== undefined && Number.isFinite(us) ? [{ batchSize: r.M, us }] : [];
    });
  return [
    { name: "tuned config", points: pts((r) => r.best.us), color: "#1f77b4" },
    { name: "default config", points: pts((r) => r.default?.us), color: "#ff7f0e" },
    { name: "unfused baseline", points: pts((r) => r.unfusedUs), color: "#d62728" },
    { name: "memory floor", points: pts((r) => r.floorUs), kind: "floor" },
  ];
}

// ---------------------------------------------------------------------------------------------
// Planning: a cost model for the budget and the ETA

/** Predicted seconds of a batch size: launches x (L2 flush + a rough kernel time). */
export function predictSeconds(
  shape: TuneShape,
  M: number,
  candidates: number,
  floorUs: number,
  rounds: readonly SearchRound[],
  withUnfused: boolean,
): number {
  const slots = M * shape.topK;
  const computeUs = 2 * slots * 1.5 * shape.N * shape.K / 400e12 * 1e6; // ~400 TFLOP/s reached
  const kernelUs = Math.max(floorUs, computeUs) * 1.6 + 5; // the average config is slower
  // L2 flush (~100 MB read) and launch gaps; the host needs ~40 µs per timed launch anyway.
  const perLaunchUs = Math.max(60, 45 + kernelUs);
  let launches = 0;
  let configs = candidates;
  rounds.forEach((r, i) => {
    if (i > 0) configs = Math.min(configs, r.keep) + (i === rounds.length - 1 ? 1 : 0);
    launches += configs * r.repeats * (r.warmup + r.iterations);
  });
  // The unfused path: fp32 CUDA-core GEMMs at a few TFLOP/s, 6 launches.
  const unfusedUs = withUnfused ? 6 * (2 * slots * 1.5 * shape.N * shape.K / 4e12 * 1e6 + 50) : 0;
  return (launches * perLaunchUs + unfusedUs) * 1e-6 + 0.02 + slots * 2e-7;
}

// ---------------------------------------------------------------------------------------------
// The GPU driver

/**
 * The first `M` tokens of `base` (a problem made for at least `M` tokens), routed by `topkIds`
 * (`[M, topK]`): activations and routing weights are views, the weights are shared. Only what
 * {@link DeviceMoeProblem} reads is consistent (its aligned layout comes from `topkIds`); the
 * `sortedTokenIds`, `expertIds` and `numTokensPostPadded` of `base` are left as they are.
 *
 * @throws {RangeError} if `base` has fewer than `M` tokens or `topkIds` is not `[M, topK]`
 */
export function sliceProblem(base: MoeProblem, M: number, topkIds: Int32Array): MoeProblem {
  const { K, topK } = base;
  if (!Number.isSafeInteger(M) || M < 1 || M > base.M) {
    throw new RangeError(`M must be in 1..${base.M}, got ${M}`);
  }
  if (topkIds.length !== M * topK) {
    throw new RangeError(`topkIds has ${topkIds.length} entries, [M, topK] needs ${M * topK}`);
  }
  return {
    ...base,
    M,
    x: base.x.subarray(0, M * K),
    xScale: base.xScale.subarray(0, M * (K / 128)),
    xValues: base.xValues.subarray(0, M * K),
    topkWeights: base.topkWeights.subarray(0, M * topK),
    topkIds,
  };
}

/** Options of {@link tuneConfigs}. */
export interface TuneOptions {
  /** The layer. */
  shape: TuneShape;
  /** Token counts. */
  batchSizes: readonly number[];
  /** Routing balancedness (1.0 uniform). With several values, the first round ranks on a draw
   * of the first, and the later rounds' series alternate over draws of each ({@link drawFor}),
   * so the config chosen is the fastest on average over those routings. */
  balancedness: number | readonly number[];
  /** The table to write (its results file and resume file go beside it). */
  out: string;
  /** Timed launches of each finalist (default 40). */
  iterations?: number;
  /** Continue from the `.partial` file of `out`. */
  resume?: boolean;
  /** Keep the batch sizes of `out`'s existing results file that this run does not measure
   * ({@link mergeResults}); without one, a plain run. */
  update?: boolean;
  /** Seconds the search may take, setup excluded (default 420). */
  budgetSeconds?: number;
  /** Time the unfused baseline per batch size (default true). */
  unfused?: boolean;
  /** Seed of the random problem and routing (default 42). */
  seed?: number;
  /** Driver version, module version, git commit: recorded in the results. */
  provenance?: { driver?: string; moduleVersion?: string; gitCommit?: string };
  /** The device, if already checked (default: requireHopper()). */
  device?: DeviceInfo;
}

/** How {@link tuneConfigs} reports; the task renders it with dax. */
export interface TuneReporter {
  /** A line worth keeping in a log. */
  log(line: string): void;
  /** A warning. */
  warn(line: string): void;
  /** The search starts: `total` configs to time in first rounds. */
  start(total: number): void;
  /** Progress: `done` of `total` configs, and a status message (batch size, ETA). */
  progress(done: number, message: string): void;
  /** The search is over. */
  finish(): void;
}

/** What {@link tuneConfigs} wrote and found. */
export interface TuneReport {
  /** The table path. */
  table: string;
  /** The results path. */
  resultsPath: string;
  /** The results file's content. */
  file: TuneResultsFile;
  /** Per batch size, ascending. */
  results: BatchResult[];
}

const silentReporter: TuneReporter = {
  log(): void {},
  warn(): void {},
  start(): void {},
  progress(): void {},
  finish(): void {},
};

interface BatchPlan {
  M: number;
  topkIds: Int32Array;
  /** Further draws: series r of a later round runs on draw r, whose balancedness is value
   * r mod n of the run's ({@link drawFor}). */
  moreTopkIds: Int32Array[];
  counts: Int32Array;
  candidates: KernelConfig[];
  floorBytes: number;
  predicted: number;
}

/**
 * Which routing draw a series of the search times on, of `draws` (draw r is at balancedness value
 * r mod the number of values): the first round on draw 0, series r of every later round on draw
 * r. The middle rounds have one series per value ({@link defaultRounds}), so they rank on the
 * mean over every balancedness; the last round's series run on draws of their own.
 */
export function drawFor(run: { round: number; series: number }, draws: number): number {
  return run.round === 0 ? 0 : run.series % draws;
}

/** The build stamp beside the loaded library (`<library>.stamp`), if there is one. */
function libraryStamp(): string | undefined {
  const path = loadedLibraryPath();
  if (path === undefined) return undefined;
  try {
    return Deno.readTextFileSync(`${path}.stamp`).trim() || undefined;
  } catch (err) {
    if (err instanceof Deno.errors.NotCapable) throw err;
    return undefined; // a library without a stamp (not built by tasks/build.ts)
  }
}

/** Why a resume file cannot continue this run, or undefined when it can. */
function checkResume(partial: TuneResultsFile, meta: TuneMetadata): string | undefined {
  const a = partial.metadata, s = meta.shape;
  if (JSON.stringify(a.shape) !== JSON.stringify(s)) {
    return `its shape ${JSON.stringify(a.shape)} is not ${JSON.stringify(s)}`;
  }
  if (balancednessText(a.balancedness) !== balancednessText(meta.balancedness)) {
    return `its balancedness ${balancednessText(a.balancedness)} is not ${
      balancednessText(meta.balancedness)
    }`;
  }
  if (a.gpu !== meta.gpu) return `it was measured on ${a.card}, this is ${meta.card}`;
  if (a.seed !== meta.seed) return `its seed ${a.seed} is not ${meta.seed}`;
  return undefined;
}

interface BatchContext {
  shape: TuneShape;
  seed: number;
  rounds: SearchRound[];
  budget: number;
  batchSizes: number[];
  todo: BatchPlan[];
  results: Map<number, BatchResult>;
  metadata: TuneMetadata;
  info: DeviceInfo;
  unfused: boolean;
  partialPath: string;
  tableName: string;
  /** The table this run replaces, if there is one: its entries join each last round. */
  current?: ConfigTable;
}

/** The table at `path` before this run replaces it; undefined if absent or unreadable. */
async function readCurrentTable(
  path: string,
  reporter: TuneReporter,
): Promise<ConfigTable | undefined> {
  try {
    return parseConfigTable(JSON.parse(await Deno.readTextFile(path)), path);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) {
      reporter.warn(`${path} is not a readable table (${(err as Error).message}); not timing it`);
    }
    return undefined;
  }
}

/** The GPU part of {@link tuneConfigs}: times every batch size of `ctx.todo`. */
async function measureBatches(ctx: BatchContext, reporter: TuneReporter): Promise<void> {
  const { shape, seed, rounds, budget, batchSizes, todo, results, metadata, info } = ctx;
  const { partialPath, tableName } = ctx;
  const { numExperts: E, N, K, topK } = shape;
  // The problem: one set of weights, activations for the largest batch, sliced per batch size.
  const mMax = Math.max(...batchSizes);
  let t0 = performance.now();
  const base = makeRandomMoeProblem({
    M: mMax,
    K,
    N,
    numExperts: E,
    topK,
    blockM: 8,
    seed,
    sharedExpert: shape.sharedExpert,
  });
  reporter.log(
    `random problem: ${(E * N * K * 1.5 / 1e9).toFixed(2)} GB of FP8 weights, ${mMax} tokens ` +
      `(${((performance.now() - t0) / 1000).toFixed(1)} s)`,
  );
  const view = (M: number, topkIds: Int32Array): MoeProblem => sliceProblem(base, M, topkIds);

  using timer = new Timer();
  t0 = performance.now();
  const bandwidth = timer.copyBandwidth();
  metadata.copyBandwidthGBs = Math.round(bandwidth / 1e9);
  using owner = new DeviceMoeProblem(view(1, todo[0].topkIds.subarray(0, topK)));
  reporter.log(
    `${info.name} (cc ${metadata.computeCapability}, ${info.smCount} SMs` +
      `${metadata.driver ? `, driver ${metadata.driver}` : ""}): copy bandwidth ` +
      `${metadata.copyBandwidthGBs} GB/s; weights uploaded ` +
      `(${((performance.now() - t0) / 1000).toFixed(1)} s)`,
  );

  // The unfused baseline's workspace, sized for the largest batch.
  let workspace: DeviceBuffer | undefined;
  if (ctx.unfused) {
    if (symbols().amoe_unfused_moe_w8a8 === null) {
      reporter.warn("the library has no unfused baseline (rebuild it): not timing it");
    } else {
      try {
        const bytes = unfusedWorkspaceBytes({ M: Math.max(...todo.map((p) => p.M)), K, N, topK });
        workspace = DeviceBuffer.alloc("fp8_e4m3", [bytes]);
      } catch (err) {
        if (!isConfigFailure(err)) throw err;
        reporter.warn(`unfused baseline: ${err.message.split("\n")[0]}; not timing it`);
      }
    }
  }

  const searchStart = performance.now();
  const budgetEnd = searchStart + budget * 1000;
  let predictedDone = 0;
  let configsDone = 0;
  reporter.start(todo.reduce((sum, p) => sum + p.candidates.length, 0));
  const eta = (predictedLeft: number): string => {
    const elapsed = (performance.now() - searchStart) / 1000;
    const rate = predictedDone > 0 ? elapsed / predictedDone : 1;
    return formatDuration(predictedLeft * rate);
  };
  try {
    let hint: KernelConfig | undefined;
    for (let i = 0; i < todo.length; i++) {
      const plan = todo[i];
      const { M } = plan;
      const batchStart = performance.now();
      const predictedLeft = todo.slice(i).reduce((s, p) => s + p.predicted, 0);
      // This batch size's fair share of what is left of the budget.
      const share = Math.max(0, budgetEnd - batchStart) * plan.predicted / predictedLeft;
      const deadline = batchStart + 0.75 * share;
      const def = defaultConfig(M);
      const ordered = orderByHint(plan.candidates, hint ?? def);
      const status = (done: number): string =>
        `M=${M} (${i + 1}/${todo.length}), ${done}/${ordered.length} configs, ETA ${
          eta(predictedLeft - plan.predicted * done / Math.max(1, ordered.length))
        }`;
      reporter.progress(configsDone, status(0));

      using dev = new DeviceMoeProblem(view(M, plan.topkIds), { weightsFrom: owner });
      // Series r of every round after the first runs on routing draw r (draw 0 is `dev`'s), so
      // that the config shipped is not one that suits a single draw: the number of units of
      // work, and with it how many are left over for a last partial wave of CTAs, changes from
      // one draw to the next (e512 M=512 at block_m 16: 518-532 units; at 532, four past four
      // waves of 132, 16/32/8/2 ran 8 % slower than on the others, 16/32/8/4 1 %).
      using moreDraws = new DisposableStack();
      const draws = [dev];
      for (const ids of plan.moreTopkIds) {
        draws.push(moreDraws.use(new DeviceMoeProblem(view(M, ids), { weightsFrom: owner })));
      }
      const measure: MeasureFn = (config, run) => {
        const d = draws[drawFor(run, draws.length)];
        return timer.time(
          () => d.run(config, { stream: timer.stream, outIsZeroed: true }),
          { warmup: run.warmup, iterations: run.iterations },
        ).samplesUs;
      };
      const current = ctx.current?.get(M);
      const outcome = searchConfigs(ordered, measure, {
        rounds,
        baseline: def,
        incumbents: current !== undefined ? [current] : [],
        variants: (c) => tailVariants(c, unitsOfWork(plan.counts, c.blockM, N), info.smCount),
        deadline,
        onTimed: (done) => reporter.progress(configsDone + done, status(done)),
      });
      const best = chooseConfig(outcome);
      hint = outcome.ranked[0].config;
      for (const r of outcome.refused) {
        reporter.warn(`M=${M}: ${configKey(r.config)} skipped: ${r.reason}`);
      }

      let unfusedUs: number | undefined;
      if (workspace) {
        const ws = workspace;
        const blockM = def.blockM;
        try {
          unfusedUs = timer.time(
            () => runUnfusedMoe(dev, blockM, ws, { stream: timer.stream }),
            { warmup: 1, iterations: 5 },
          ).medianUs;
        } catch (err) {
          if (!isConfigFailure(err)) throw err;
          reporter.warn(`M=${M}: unfused baseline failed: ${err.message.split("\n")[0]}`);
        }
      }

      const result: BatchResult = {
        M,
        best,
        fastest: outcome.ranked[0],
        default: outcome.baseline,
        unfusedUs,
        floorUs: plan.floorBytes / bandwidth * 1e6,
        floorBytes: plan.floorBytes,
        distinctExperts: plan.counts.reduce((s, c) => s + (c > 0 ? 1 : 0), 0),
        maxTokensPerExpert: Math.max(...plan.counts),
        candidates: ordered.length,
        timed: outcome.timed,
        cut: outcome.cut,
        refused: outcome.refused.length,
        seconds: (performance.now() - batchStart) / 1000,
      };
      results.set(M, result);
      predictedDone += plan.predicted;
      configsDone += ordered.length;
      await writeTextFileAtomic(
        partialPath,
        resultsJson({
          format: "alpha-moe tune results",
          version: 1,
          table: tableName,
          metadata,
          results: Object.fromEntries([...results].map(([m, r]) => [String(m), r])),
          partial: true,
        }),
      );
      reporter.progress(configsDone, status(ordered.length));
      reporter.log(
        `[${i + 1}/${todo.length}] ${resultLine(result)}; ETA ${
          eta(predictedLeft - plan.predicted)
        }`,
      );
    }
  } finally {
    reporter.finish();
    workspace?.free();
  }
}

/**
 * Tunes the configs of one layer shape on device 0 and writes the table (seed format), its
 * results file and, after every batch size, the resume file. See the module doc for the
 * method. Needs `--allow-ffi --allow-read --allow-write` (and a Hopper GPU).
 *
 * @throws {NoDeviceError} without a Hopper GPU
 * @throws {Error} when `resume` is set and the resume file belongs to another run
 */
export async function tuneConfigs(
  options: TuneOptions,
  reporter: TuneReporter = silentReporter,
): Promise<TuneReport> {
  const started = performance.now();
  const { shape } = options;
  const balancedness = balancednessList(options.balancedness);
  if (balancedness.length === 0) throw new RangeError("no balancedness given");
  for (const b of balancedness) {
    if (!(b >= 0 && b <= 1)) throw new RangeError(`balancedness must be in [0, 1], got ${b}`);
  }
  const { numExperts: E, N, K, topK } = shape;
  const rounds = defaultRounds(options.iterations ?? 40, balancedness.length);
  const budget = options.budgetSeconds ?? 420;
  const seed = options.seed ?? 42;
  const batchSizes = [...new Set(options.batchSizes)].sort((a, b) => a - b);
  const info = options.device ?? requireHopper();
  const partialPath = partialPathFor(options.out);
  const resultsPath = resultsPathFor(options.out);
  const tableName = options.out.slice(options.out.lastIndexOf("/") + 1);

  const metadata: TuneMetadata = {
    card: info.name,
    gpu: gpuShortName(info.name),
    computeCapability: info.computeCapability.join("."),
    smCount: info.smCount,
    driver: options.provenance?.driver,
    abiVersion: symbols().amoe_abi_version(),
    moduleVersion: options.provenance?.moduleVersion,
    gitCommit: options.provenance?.gitCommit,
    libraryStamp: libraryStamp(),
    date: new Date().toISOString(),
    shape: { ...shape },
    balancedness: balancedness.length === 1 ? balancedness[0] : balancedness,
    seed,
    copyBandwidthGBs: 0,
    search: {
      space:
        `block_m 8..128 step 8 x (block_n, warp_n) in ${
          VALID_BLOCK_N_WARP_N.map(([a, b]) => `(${a}, ${b})`).join(", ")
        } x stages ${TUNE_STAGES[0]}..${TUNE_STAGES[TUNE_STAGES.length - 1]} x split ${
          TUNE_SPLITS.join("/")
        }, plus all_slices for block_m <= 64 or 72/80 (32, 8) split 1 where N > 256 and split_n 2 for ` +
        `(32, 8) split 1, less what ` +
        `checkKernelConfig refuses`,
      pruning: "block_m <= max(16, 2 x the busiest expert's slots rounded up to 8); " +
        "split > 1 only while units x split <= 2 x SMs; split_n 2 only while units <= 4 x SMs",
      rounds: `${describeRounds(rounds)}; the last round's series each on its own routing draw; ` +
        "the last round also times the default config, the replaced table's entry and tail " +
        `splits ${
          TUNE_TAIL_SPLITS.join("/")
        } of its split-1 configs where the units overflow a wave; the table's entry (else the ` +
        "default) is kept unless a config beats it by more than keepDefaultWithin",
      keepDefaultWithin: KEEP_DEFAULT_WITHIN,
      budgetSeconds: budget,
      timing: "CUDA events around each launch on its own stream, L2 emptied (a buffer of twice " +
        "its size read) before each, medians; kernel only (out not re-zeroed)",
    },
  };

  // Update: the results to keep are checked before any time is spent.
  let previous: TuneResultsFile | undefined;
  if (options.update) {
    try {
      previous = await readResultsFile(resultsPath);
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
      reporter.warn(`--update: no ${resultsPath}; nothing to keep`);
    }
    const why = previous && updateMismatch(previous.metadata, metadata);
    if (why) throw new Error(`--update: ${resultsPath} is of another run (${why})`);
  }

  // Resume.
  const results = new Map<number, BatchResult>();
  if (options.resume) {
    let partial: TuneResultsFile | undefined;
    try {
      partial = await readResultsFile(partialPath);
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
      reporter.warn(`--resume: no ${partialPath}; starting from the beginning`);
    }
    if (partial) {
      const why = checkResume(partial, metadata);
      if (why !== undefined) {
        throw new Error(
          `--resume: ${partialPath} belongs to another run (${why}); delete it or drop --resume`,
        );
      }
      for (const r of resultsList(partial)) {
        if (batchSizes.includes(r.M)) results.set(r.M, r);
      }
      reporter.log(
        `resuming from ${partialPath}: ${results.size} of ${batchSizes.length} batch sizes done`,
      );
    }
  }

  // Which configs can run at all for this (N, K) on this card.
  const runnable: KernelConfig[] = [];
  const refusedUpFront: string[] = [];
  for (const c of searchSpace()) {
    if (c.allSlices && N === 256) continue; // one slice: the same kernel as without
    try {
      checkKernelConfig(K, N, c);
      runnable.push(c);
    } catch (err) {
      if (!isConfigFailure(err)) throw err;
      refusedUpFront.push(configKey(c));
    }
  }
  if (runnable.length === 0) {
    throw new Error(`no config of the search space runs for N=${N} K=${K}`);
  }
  if (refusedUpFront.length > 0) {
    reporter.log(
      `${refusedUpFront.length} configs refused by the library for N=${N} K=${K} ` +
        `(e.g. shared memory): ${refusedUpFront.slice(0, 6).join(", ")}` +
        `${refusedUpFront.length > 6 ? ", ..." : ""}`,
    );
  }

  // Routing and candidates of every batch size, up front (cheap): the plan and the ETA.
  const assumedBandwidth = 3.0e12;
  const plans: BatchPlan[] = batchSizes.map((M) => {
    // Draw r is at balancedness value r mod n (salt 0 for the first: one value gives the draws
    // of earlier versions).
    const draw = (r: number): Int32Array =>
      balancedTopkIds({
        M,
        numExperts: E,
        topK,
        sharedExpert: shape.sharedExpert,
        balancedness: balancedness[r % balancedness.length],
        seed: (seed * 1000003 + M * 7919 + 104729 * r) >>> 0,
      });
    const topkIds = draw(0);
    // One draw per series of the last round, and at least one per balancedness value.
    const draws = Math.max(
      balancedness.length,
      rounds.length > 1 ? rounds[rounds.length - 1].repeats : 1,
    );
    const moreTopkIds = Array.from({ length: draws - 1 }, (_, j) => draw(j + 1));
    const counts = tokensPerExpert(topkIds, E);
    // Block sizes up to what the busiest expert of any draw could use.
    const busiest = Math.max(
      ...[topkIds, ...moreTopkIds].map((ids) => Math.max(...tokensPerExpert(ids, E))),
    );
    const limit = blockMLimit(busiest);
    const candidates = runnable.filter((c) =>
      c.blockM <= limit &&
      worthSplitting(c.split ?? 1, unitsOfWork(counts, c.blockM, N), info.smCount, c.splitN)
    );
    // The floor beside a reported time is of the draws that time is the mean over.
    const floorBytes = [topkIds, ...moreTopkIds].reduce(
      (sum, ids) => sum + memoryFloorBytes({ M, K, N, numExperts: E, topK }, ids),
      0,
    ) / (1 + moreTopkIds.length);
    const predicted = predictSeconds(
      shape,
      M,
      candidates.length,
      floorBytes / assumedBandwidth * 1e6,
      rounds,
      options.unfused ?? true,
    );
    return { M, topkIds, moreTopkIds, counts, candidates, floorBytes, predicted };
  });
  const todo = plans.filter((p) => !results.has(p.M));
  const totalConfigs = todo.reduce((s, p) => s + p.candidates.length, 0);
  const predictedTotal = todo.reduce((s, p) => s + p.predicted, 0);
  reporter.log(
    `plan: ${todo.length} batch sizes (${batchSizes[0]}..${batchSizes[batchSizes.length - 1]}), ` +
      `${totalConfigs} configs in first rounds (of ${runnable.length} runnable); rounds: ` +
      `${describeRounds(rounds)}; predicted ~${formatDuration(predictedTotal)}, ` +
      `budget ${formatDuration(budget)}`,
  );
  if (todo.length === 0) reporter.log("every batch size is done already");

  if (todo.length > 0) {
    await measureBatches({
      shape,
      seed,
      rounds,
      budget,
      batchSizes,
      todo,
      results,
      metadata,
      info,
      unfused: options.unfused ?? true,
      partialPath,
      tableName,
      current: await readCurrentTable(options.out, reporter),
    }, reporter);
  }

  metadata.seconds = Math.round((performance.now() - started) / 100) / 10;
  let file: TuneResultsFile = {
    format: "alpha-moe tune results",
    version: 1,
    table: tableName,
    metadata,
    results: Object.fromEntries(
      [...results.values()].sort((a, b) => a.M - b.M).map((r) => [String(r.M), r]),
    ),
  };
  if (previous !== undefined) file = mergeResults(previous, file);
  const list = resultsList(file);
  await writeTextFileAtomic(options.out, tableJson(list.map((r) => [r.M, r.best.config])));
  await writeTextFileAtomic(resultsPath, resultsJson(file));
  await Deno.remove(partialPath).catch(() => {});
  return { table: options.out, resultsPath, file, results: list };
}
