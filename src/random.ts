/**
 * Seeded random numbers and random MoE problems for GPU tests and benchmarks.
 *
 * The generator is xoshiro128** (seeded through splitmix32), so a seed gives the same
 * problem on every machine. Problems at real sizes (E = 257, N = 256, K = 7168: about 700 MB
 * of FP8 weights) take a few seconds: FP8 codes are drawn from a precomputed 65536-entry
 * table, two codes per 32-bit draw, with no per-element float work.
 *
 * @module
 */

import { fp8e4m3Table } from "./codecs.ts";
import { type FusedMoeArgs, moeAlignBlockSize, quantizePerTokenGroup } from "./reference.ts";

/** A seeded xoshiro128** generator. Not for cryptography. */
export class Rng {
  #s0: number;
  #s1: number;
  #s2: number;
  #s3: number;
  #spare: number | undefined;

  /** Seeds the state from a 32-bit integer (other numbers are truncated to 32 bits). */
  constructor(seed: number) {
    // splitmix32 spreads any seed (even 0) over the 128-bit state.
    let z = seed >>> 0;
    const next = (): number => {
      z = (z + 0x9e3779b9) >>> 0;
      let t = z;
      t = Math.imul(t ^ (t >>> 16), 0x85ebca6b);
      t = Math.imul(t ^ (t >>> 13), 0xc2b2ae35);
      return (t ^ (t >>> 16)) >>> 0;
    };
    this.#s0 = next();
    this.#s1 = next();
    this.#s2 = next();
    this.#s3 = next();
  }

  /** The next 32 random bits as an unsigned integer. */
  nextU32(): number {
    const s0 = this.#s0, s1 = this.#s1, s2 = this.#s2, s3 = this.#s3;
    const m = Math.imul(s1, 5);
    const r = Math.imul((m << 7) | (m >>> 25), 9) >>> 0;
    const t = s1 << 9;
    const n2 = s2 ^ s0;
    const n3 = s3 ^ s1;
    this.#s1 = s1 ^ n2;
    this.#s0 = s0 ^ n3;
    this.#s2 = n2 ^ t;
    this.#s3 = (n3 << 11) | (n3 >>> 21);
    return r;
  }

  /** Fills `out` with random 32-bit words (same stream as repeated {@link Rng.nextU32}). */
  fillU32(out: Uint32Array): void {
    // The state lives in locals for the loop: several times faster than field access.
    let s0 = this.#s0, s1 = this.#s1, s2 = this.#s2, s3 = this.#s3;
    for (let i = 0; i < out.length; i++) {
      const m = Math.imul(s1, 5);
      out[i] = Math.imul((m << 7) | (m >>> 25), 9);
      const t = s1 << 9;
      s2 ^= s0;
      s3 ^= s1;
      s1 ^= s2;
      s0 ^= s3;
      s2 ^= t;
      s3 = (s3 << 11) | (s3 >>> 21);
    }
    this.#s0 = s0;
    this.#s1 = s1;
    this.#s2 = s2;
    this.#s3 = s3;
  }

  /** Uniform in [0, 1) with 32 bits of resolution. */
  next(): number {
    return this.nextU32() / 4294967296;
  }

  /** Uniform integer in 0..n-1 (n up to 2^32). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** Standard normal (Box-Muller; the second value of each pair is kept for the next call). */
  normal(): number {
    if (this.#spare !== undefined) {
      const v = this.#spare;
      this.#spare = undefined;
      return v;
    }
    const u = 1 - this.next(); // (0, 1]: log stays finite
    const v = this.next();
    const r = Math.sqrt(-2 * Math.log(u));
    this.#spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }
}

function rngOf(rng: Rng | number): Rng {
  return typeof rng === "number" ? new Rng(rng) : rng;
}

/** `n` normal samples (float32) with the given mean and standard deviation. */
export function randomNormal(rng: Rng | number, n: number, mean = 0, std = 1): Float32Array {
  const r = rngOf(rng);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = mean + std * r.normal();
  return out;
}

/** `n` uniform samples (float32) in [lo, hi). */
export function randomUniform(rng: Rng | number, n: number, lo = 0, hi = 1): Float32Array {
  const r = rngOf(rng);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = lo + (hi - lo) * r.next();
  return out;
}

// erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): plenty for 2^-16 table resolution.
function erf(x: number): number {
  const s = x < 0 ? -1 : 1;
  const a = Math.abs(x);
  const t = 1 / (1 + 0.3275911 * a);
  const p = t * (0.254829592 +
    t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
  return s * (1 - p * Math.exp(-a * a));
}

function normalCdf(x: number): number {
  return 0.5 * (1 + erf(x / Math.SQRT2));
}

const codeTables = new Map<number, Uint8Array>();

/**
 * A 65536-entry table such that `table[u16]` for uniform 16-bit `u16` is distributed as
 * `fp8e4m3Encode(std * Z)`, Z standard normal (to 2^-16 in probability; codes rarer than that
 * never appear). Never contains a NaN code.
 */
function fp8NormalTable(std: number): Uint8Array {
  let table = codeTables.get(std);
  if (table) return table;
  const lut = fp8e4m3Table();
  // Signed bins in increasing value order: -448 .. -0, +0 .. 448. Each code takes the values
  // that round to it: up to the midpoints with its neighbours; +-448 take the saturated tails.
  const bins: { code: number; lo: number; hi: number }[] = [];
  const edge = (c: number): number => (c >= 0x7e ? Infinity : (lut[c] + lut[c + 1]) / 2);
  // Codes 0x00..0x7e are the finite non-negative values in increasing order.
  for (let c = 0x7e; c >= 0; c--) {
    bins.push({ code: 0x80 | c, lo: -edge(c), hi: c === 0 ? 0 : -edge(c - 1) });
  }
  for (let c = 0; c <= 0x7e; c++) {
    bins.push({ code: c, lo: c === 0 ? 0 : edge(c - 1), hi: edge(c) });
  }
  table = new Uint8Array(65536);
  let b = 0;
  for (let i = 0; i < 65536; i++) {
    const u = (i + 0.5) / 65536;
    while (b < bins.length - 1 && normalCdf(bins[b].hi / std) < u) b++;
    table[i] = bins[b].code;
  }
  codeTables.set(std, table);
  return table;
}

/**
 * Fills `out` with random e4m3fn codes distributed as `fp8e4m3Encode(std * Z)`, Z standard
 * normal. No NaN codes. Fast enough for hundreds of MB (two codes per 32-bit draw).
 */
export function fillRandomFp8(rng: Rng, out: Uint8Array, std: number): void {
  if (!(std > 0) || !Number.isFinite(std)) {
    throw new RangeError(`std must be positive and finite, got ${std}`);
  }
  const table = fp8NormalTable(std);
  const chunk = new Uint32Array(1 << 16);
  for (let start = 0; start < out.length; start += 2 * chunk.length) {
    const n = Math.min(2 * chunk.length, out.length - start);
    const words = (n + 1) >> 1;
    const buf = words === chunk.length ? chunk : chunk.subarray(0, words);
    rng.fillU32(buf);
    let o = start;
    const end = start + n;
    for (let i = 0; i < words; i++) {
      const r = buf[i];
      out[o++] = table[r & 0xffff];
      if (o < end) out[o++] = table[r >>> 16];
    }
  }
}

/** Random block scales, log-uniform in [lo, hi]. */
export function randomLogUniform(
  rng: Rng | number,
  n: number,
  lo: number,
  hi: number,
): Float32Array {
  if (!(lo > 0) || !(hi >= lo)) throw new RangeError(`need 0 < lo <= hi, got ${lo}, ${hi}`);
  const r = rngOf(rng);
  const out = new Float32Array(n);
  const a = Math.log(lo), span = Math.log(hi) - a;
  for (let i = 0; i < n; i++) out[i] = Math.exp(a + span * r.next());
  return out;
}

/** Options of {@link makeRandomMoeProblem}. */
export interface RandomMoeOptions {
  /** Tokens. */
  M: number;
  /** Hidden size (multiple of 128). */
  K: number;
  /** Up-projection rows, 2 x intermediate (multiple of 256). */
  N: number;
  /** Experts (including the shared one, if any). */
  numExperts: number;
  /** Experts per token (including the shared one, if any). */
  topK: number;
  /** Block size of the aligned layout. */
  blockM: number;
  /** PRNG seed. */
  seed: number;
  /**
   * Routing skew: expert e is chosen with weight `(e + 1) ** -skew` (without replacement).
   * 0 (default) is uniform; larger values crowd tokens onto the low-numbered experts.
   */
  skew?: number;
  /** Experts whose blocks get expert id -1 (as if on another rank): the kernel skips them. */
  dropExperts?: readonly number[];
  /**
   * Make the last expert a shared expert, like the golden files: slot `topK - 1` of every
   * token is expert `numExperts - 1` with weight `1 / scalingFactor`, the other slots are
   * routed among the remaining experts. Default false.
   */
  sharedExpert?: boolean;
  /** Routed scaling factor; default 1. */
  scalingFactor?: number;
  /** Standard deviation of the activations before quantisation; default 1. */
  xStd?: number;
  /**
   * Standard deviation of the FP8 weight *values* before encoding (the codes are
   * `e4m3(std * Z)`); default 50, as in the seed's tests (values mostly within ±200).
   */
  weightCodeStd?: number;
  /** Range of the log-uniform weight block scales; default [1e-3, 1e-2]. */
  scaleRange?: readonly [number, number];
  /**
   * Reuse these weights (from an earlier problem of the same E, N, K) instead of drawing new
   * ones: benchmarks vary M and the routing over one set of weights.
   */
  weights?: MoeWeights;
}

/** The expert weights and block scales of a problem (kernel layout). */
export type MoeWeights = Pick<FusedMoeArgs, "w" | "wScale" | "w2" | "w2Scale">;

/**
 * A random MoE layer problem: every argument of the kernel (and of
 * {@link fusedMoeReference}, bar `requant` and `rows`) as host arrays, plus the routing it
 * came from. `w` and `wScale` are already in the kernel's interleaved layout (the values are
 * random, so the layout only matters for consistency; use `deinterleaveGateUp` for the
 * checkpoint layout).
 */
export interface MoeProblem extends Omit<FusedMoeArgs, "requant" | "rows"> {
  /** `[M, topK]` expert of each slot. */
  topkIds: Int32Array;
  /** `[M, K]` activations before quantisation (`x`, `xScale` quantise them). */
  xValues: Float32Array;
}

function randomWeights(
  rng: Rng,
  E: number,
  N: number,
  K: number,
  codeStd: number,
  sLo: number,
  sHi: number,
): MoeWeights {
  const w = new Uint8Array(E * N * K);
  fillRandomFp8(rng, w, codeStd);
  const wScale = randomLogUniform(rng, E * (N / 128) * (K / 128), sLo, sHi);
  const w2 = new Uint8Array(E * K * (N / 2));
  fillRandomFp8(rng, w2, codeStd);
  const w2Scale = randomLogUniform(rng, E * (K / 128) * (N / 256), sLo, sHi);
  return { w, wScale, w2, w2Scale };
}

/**
 * Builds a random, reproducible MoE problem (see {@link RandomMoeOptions}).
 *
 * @throws {RangeError} for inconsistent sizes (K not a multiple of 128, N not a multiple of
 * 256, topK larger than the experts available, a dropped expert out of range)
 */
export function makeRandomMoeProblem(opts: RandomMoeOptions): MoeProblem {
  const { M, K, N, numExperts: E, topK, blockM, seed } = opts;
  const skew = opts.skew ?? 0;
  const shared = opts.sharedExpert ?? false;
  const scalingFactor = opts.scalingFactor ?? 1;
  const xStd = opts.xStd ?? 1;
  const codeStd = opts.weightCodeStd ?? 50;
  const [sLo, sHi] = opts.scaleRange ?? [1e-3, 1e-2];
  for (const [name, v] of Object.entries({ M, K, N, E, topK, blockM })) {
    if (!Number.isSafeInteger(v) || v < 1) {
      throw new RangeError(`${name} must be a positive integer, got ${v}`);
    }
  }
  if (K % 128 !== 0) throw new RangeError(`K (${K}) must be a multiple of 128`);
  if (N % 256 !== 0) throw new RangeError(`N (${N}) must be a multiple of 256`);
  const routedExperts = shared ? E - 1 : E;
  const routedK = shared ? topK - 1 : topK;
  if (routedK < 0 || routedK > routedExperts) {
    throw new RangeError(
      `topK (${topK}) does not fit ${E} experts${shared ? " with a shared expert" : ""}`,
    );
  }
  if (!(scalingFactor !== 0 && Number.isFinite(scalingFactor))) {
    throw new RangeError(`scalingFactor must be finite and non-zero, got ${scalingFactor}`);
  }
  const rng = new Rng(seed);

  // Activations, quantised like the serving path does.
  const xValues = randomNormal(rng, M * K, 0, xStd);
  const { q: x, scale: xScale } = quantizePerTokenGroup(xValues, M, K);

  // Weights: normal-ish FP8 codes and positive block scales.
  const { w, wScale, w2, w2Scale } = opts.weights ?? randomWeights(rng, E, N, K, codeStd, sLo, sHi);
  if (w.length !== E * N * K || w2.length !== E * K * (N / 2)) {
    throw new RangeError(`weights: not the weights of E=${E}, N=${N}, K=${K}`);
  }

  // Routing: distinct experts per token, drawn without replacement with weights
  // (e + 1)^-skew; routing weights are a softmax of normal logits, summing to 1.
  const prefs = new Float64Array(routedExperts);
  for (let e = 0; e < routedExperts; e++) prefs[e] = (e + 1) ** -skew;
  const topkIds = new Int32Array(M * topK);
  const topkWeights = new Float32Array(M * topK);
  const left = new Float64Array(routedExperts);
  const logits = new Float64Array(routedK);
  for (let t = 0; t < M; t++) {
    left.set(prefs);
    let total = 0;
    for (let e = 0; e < routedExperts; e++) total += left[e];
    for (let s = 0; s < routedK; s++) {
      let u = rng.next() * total;
      let e = 0;
      while (e < routedExperts - 1 && (left[e] === 0 || u >= left[e])) {
        u -= left[e];
        e++;
      }
      // Rounding can walk past the end; fall back to the last expert still available.
      while (left[e] === 0) e--;
      topkIds[t * topK + s] = e;
      total -= left[e];
      left[e] = 0;
    }
    let max = -Infinity;
    for (let s = 0; s < routedK; s++) {
      logits[s] = rng.normal();
      if (logits[s] > max) max = logits[s];
    }
    let sum = 0;
    for (let s = 0; s < routedK; s++) sum += logits[s] = Math.exp(logits[s] - max);
    for (let s = 0; s < routedK; s++) topkWeights[t * topK + s] = logits[s] / sum;
    if (shared) {
      topkIds[t * topK + topK - 1] = E - 1;
      topkWeights[t * topK + topK - 1] = 1 / scalingFactor;
    }
  }

  const aligned = moeAlignBlockSize(topkIds, E, blockM);
  if (opts.dropExperts && opts.dropExperts.length > 0) {
    const drop = new Uint8Array(E);
    for (const e of opts.dropExperts) {
      if (!Number.isSafeInteger(e) || e < 0 || e >= E) {
        throw new RangeError(`dropExperts: ${e} is not an expert in 0..${E - 1}`);
      }
      drop[e] = 1;
    }
    const used = aligned.numTokensPostPadded / blockM;
    for (let b = 0; b < used; b++) {
      if (drop[aligned.expertIds[b]] === 1) aligned.expertIds[b] = -1;
    }
  }

  return {
    x,
    xScale,
    xValues,
    w,
    wScale,
    w2,
    w2Scale,
    topkIds,
    topkWeights,
    sortedTokenIds: aligned.sortedTokenIds,
    expertIds: aligned.expertIds,
    numTokensPostPadded: aligned.numTokensPostPadded,
    M,
    K,
    N,
    numExperts: E,
    topK,
    blockM,
    scalingFactor,
  };
}

/**
 * A problem like `opts` whose launch at `blockM` has more units of work (token blocks x 256-row
 * N slices, or token blocks alone with `unitsPerBlock` 1) than the `smCount` CTAs of one wave,
 * and leaves past its last full wave a tail that a launch of clusters of `cluster` CTAs takes
 * at once (the kernel's `tail_units`): token counts are tried from `opts.M` up, on the same
 * weights. For the tests of tail units and of an all-slices launch's slice units (`cluster` =
 * the N slices, `unitsPerBlock` 1).
 *
 * @throws {RangeError} if no token count up to twice `opts.M` leaves such a tail
 */
export function makeProblemWithTail(
  opts: RandomMoeOptions,
  blockM: number,
  cluster: number,
  smCount: number,
  unitsPerBlock: number = opts.N / 256,
): MoeProblem {
  const first = makeRandomMoeProblem(opts);
  const room = Math.floor(smCount / cluster);
  for (let M = opts.M, p = first; M < 2 * opts.M; M += 8) {
    if (M > opts.M) p = makeRandomMoeProblem({ ...opts, M, weights: first });
    const aligned = moeAlignBlockSize(p.topkIds, opts.numExperts, blockM);
    const units = aligned.numTokensPostPadded / blockM * unitsPerBlock;
    if (units > smCount && units % smCount >= 1 && units % smCount <= room) return p;
  }
  throw new RangeError(`no token count from ${opts.M} leaves a tail at block_m ${blockM}`);
}
