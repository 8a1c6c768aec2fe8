/**
 * CPU reference of the fused FP8 MoE layer: the oracle the GPU tests compare against.
 *
 * Layouts (row-major, all float32 scales are 128x128 block scales):
 *
 * | array        | shape                  | notes                                            |
 * |--------------|------------------------|--------------------------------------------------|
 * | `x`          | `[M, K]` FP8 codes     | per-token-group quantised activations            |
 * | `xScale`     | `[M, K/128]`           |                                                  |
 * | `w`          | `[E, N, K]` FP8 codes  | gate/up interleaved in chunks of 8 rows (kernel) |
 * | `wScale`     | `[E, N/128, K/128]`    | gate/up interleaved in chunks of 1 (kernel)      |
 * | `w2`         | `[E, K, N/2]` FP8 codes| down projection                                  |
 * | `w2Scale`    | `[E, K/128, N/256]`    |                                                  |
 * | `topkWeights`| `[M, topK]`            | indexed by the flat slot `token * topK + slot`   |
 *
 * Pure TypeScript; no permissions needed.
 *
 * @module
 */

import { FP8_E4M3_MAX, fp8e4m3Encode, fp8e4m3Table } from "./codecs.ts";

/** Width of a quantisation group / weight scale block. */
export const GROUP = 128;

// Same LUT as the codecs, private so that nobody can corrupt the oracle through it.
const LUT = fp8e4m3Table();

// The quantiser's floor on amax, as a float32 (torch and triton both hold it in float32).
const EPS = Math.fround(1e-10);

/**
 * Per-token, per-group FP8 quantisation (SGLang's `per_token_group_quant_fp8`): for each row
 * and each run of `group` columns, `scale = max(amax, 1e-10) / 448` and
 * `q = e4m3(clamp(x / scale, -448, 448))`, all in float32 arithmetic.
 *
 * @param x row-major `[M, K]` float32 values
 * @returns `q`: `[M, K]` e4m3fn codes; `scale`: `[M, K/group]` float32, row-major
 * @throws {RangeError} if `K` is not a multiple of `group` or `x` is not `M*K` long
 */
export function quantizePerTokenGroup(
  x: Float32Array,
  M: number,
  K: number,
  group: number = GROUP,
): { q: Uint8Array; scale: Float32Array } {
  if (!Number.isSafeInteger(group) || group < 1 || K % group !== 0) {
    throw new RangeError(`K (${K}) must be a positive multiple of the group size (${group})`);
  }
  if (x.length !== M * K) {
    throw new RangeError(`x has ${x.length} elements, M*K = ${M * K}`);
  }
  const groups = K / group;
  const q = new Uint8Array(M * K);
  const scale = new Float32Array(M * groups);
  for (let g = 0; g < M * groups; g++) {
    const start = g * group; // rows are contiguous, so group g of the flat array is (row, col)
    let amax = 0;
    for (let i = start; i < start + group; i++) {
      const a = Math.abs(x[i]);
      if (a > amax) amax = a;
    }
    // Division of two float32 values in float64, then rounded once: the exact float32 quotient.
    const s = Math.fround(Math.max(amax, EPS) / FP8_E4M3_MAX);
    scale[g] = s;
    for (let i = start; i < start + group; i++) {
      // fp8e4m3Encode saturates at ±448, which is the clamp.
      q[i] = fp8e4m3Encode(Math.fround(x[i] / s));
    }
  }
  return { q, scale };
}

/** What {@link moeAlignBlockSize} returns (SGLang's `moe_align_block_size` outputs). */
export interface AlignedRouting {
  /**
   * Flat slot ids (`token * topK + slot`) grouped by expert, each expert's run padded to a
   * multiple of `blockM` with the pad value `M * topK` (= `topkIds.length`). Length
   * `topkIds.length + numExperts * (blockM - 1)`; entries past the used part are pad too.
   */
  sortedTokenIds: Int32Array;
  /**
   * Expert of each block of `blockM` sorted entries; `ceil(sortedTokenIds.length / blockM)`
   * entries, those past the used blocks are 0 (as in the golden files).
   */
  expertIds: Int32Array;
  /** Used length of `sortedTokenIds` (a multiple of `blockM`). */
  numTokensPostPadded: number;
}

/**
 * SGLang's `moe_align_block_size`: groups the flat slots of `topkIds` (`[M, topK]`, row-major)
 * by expert, in expert order, keeping ascending slot order within an expert, and pads every
 * expert's run to a multiple of `blockM`. Experts with no slots get no block. Ids that are
 * negative or `>= numExperts` (expert parallelism: not on this rank) are skipped.
 *
 * @throws {RangeError} for a non-positive `numExperts` or `blockM`
 */
export function moeAlignBlockSize(
  topkIds: Int32Array,
  numExperts: number,
  blockM: number,
): AlignedRouting {
  if (!Number.isSafeInteger(numExperts) || numExperts < 1) {
    throw new RangeError(`numExperts must be a positive integer, got ${numExperts}`);
  }
  if (!Number.isSafeInteger(blockM) || blockM < 1) {
    throw new RangeError(`blockM must be a positive integer, got ${blockM}`);
  }
  const numel = topkIds.length;
  const counts = new Int32Array(numExperts);
  for (let i = 0; i < numel; i++) {
    const e = topkIds[i];
    if (e >= 0 && e < numExperts) counts[e]++;
  }
  // Start of each expert's run in the sorted array.
  const starts = new Int32Array(numExperts);
  let total = 0;
  for (let e = 0; e < numExperts; e++) {
    starts[e] = total;
    total += Math.ceil(counts[e] / blockM) * blockM;
  }
  const sortedLen = numel + numExperts * (blockM - 1);
  const sortedTokenIds = new Int32Array(sortedLen).fill(numel);
  const expertIds = new Int32Array(Math.ceil(sortedLen / blockM));
  const fill = starts.slice();
  // Scanning slots in ascending order keeps each expert's slots ascending.
  for (let i = 0; i < numel; i++) {
    const e = topkIds[i];
    if (e >= 0 && e < numExperts) sortedTokenIds[fill[e]++] = i;
  }
  for (let e = 0; e < numExperts; e++) {
    const end = starts[e] + Math.ceil(counts[e] / blockM) * blockM;
    for (let b = starts[e] / blockM; b < end / blockM; b++) expertIds[b] = e;
  }
  return { sortedTokenIds, expertIds, numTokensPostPadded: total };
}

/** Inputs of {@link fusedMoeReference}: the kernel's arguments, as host arrays. */
export interface FusedMoeArgs {
  /** `[M, K]` e4m3fn activation codes. */
  x: Uint8Array;
  /** `[M, K/128]` activation scales. */
  xScale: Float32Array;
  /** `[E, N, K]` e4m3fn up-projection codes, gate/up interleaved in chunks of 8 rows. */
  w: Uint8Array;
  /** `[E, N/128, K/128]` up-projection scales, gate/up interleaved in chunks of 1 row. */
  wScale: Float32Array;
  /** `[E, K, N/2]` e4m3fn down-projection codes. */
  w2: Uint8Array;
  /** `[E, K/128, N/256]` down-projection scales. */
  w2Scale: Float32Array;
  /** From {@link moeAlignBlockSize}. */
  sortedTokenIds: Int32Array;
  /** From {@link moeAlignBlockSize}; blocks whose expert is negative are skipped. */
  expertIds: Int32Array;
  /** From {@link moeAlignBlockSize}. */
  numTokensPostPadded: number;
  /** `[M, topK]` routing weights, indexed by flat slot. */
  topkWeights: Float32Array;
  /** Tokens. */
  M: number;
  /** Hidden size (multiple of 128). */
  K: number;
  /** Rows of the up projection: 2 x intermediate size (multiple of 256). */
  N: number;
  /** Experts in `w`, `w2` (E). */
  numExperts: number;
  /** Experts per token. */
  topK: number;
  /** Rows per block of the sorted layout. */
  blockM: number;
  /** Multiplies the output (routed scaling factor). */
  scalingFactor: number;
  /**
   * true: quantise the SwiGLU output to FP8 per token per 128 intermediate channels
   * (`scale = max(amax, 1e-10)/448`) before the down projection, as the kernel does;
   * false: keep it float32.
   */
  requant: boolean;
  /** Compute only these tokens (others stay 0): for shapes too big to check in full. */
  rows?: readonly number[];
}

function checkLength(name: string, a: ArrayLike<number>, want: number, shape: string): void {
  if (a.length !== want) {
    throw new RangeError(`${name} has ${a.length} elements, ${shape} needs ${want}`);
  }
}

/**
 * The whole fused MoE layer on the CPU, returning float32 `[M, K]` (not rounded to bf16).
 *
 * For each used block `b < numTokensPostPadded / blockM` with `e = expertIds[b] >= 0`, and
 * each slot id in it below `M * topK` (`token = floor(id / topK)`):
 *
 * 1. `h = dequant(x[token]) · dequant(w[e])ᵀ`, where `dequant` multiplies each code's value
 *    by its block scale (in float32, as a torch reference that dequantises first does), the
 *    dot products accumulate in float64 and each `h[n]` is rounded to float32. (The kernel
 *    instead accumulates each 128-wide K block in float32 and scales the partial sum; the
 *    two differ only by float32 rounding.)
 * 2. SwiGLU on the interleaved rows: intermediate `j` pairs gate row `16*(j>>3) + (j&7)`
 *    with the up row 8 below it; `a[j] = silu(gate) * up`, `silu(g) = g / (1 + exp(-g))`.
 *    The scale of gate row `j` is interleaved scale row `2*(j>>7)`, of up row `j` it is
 *    `2*(j>>7) + 1` (gate block `j>>7` and up block `j>>7` after the rep-1 interleave).
 * 3. Optionally re-quantise `a` to FP8 per 128-group (see {@link FusedMoeArgs.requant}).
 * 4. `y = a · dequant(w2[e])ᵀ` (float64 accumulation), and
 *    `out[token] += topkWeights[id] * scalingFactor * y` (float64 accumulation, float32 out).
 *
 * Each expert's weights are dequantised only when a block needs them, one expert at a time
 * (blocks of one expert are contiguous), so memory stays at one expert's weights.
 *
 * @throws {RangeError} on inconsistent shapes, an expert id `>= numExperts`, or a
 * `numTokensPostPadded` past the sorted arrays
 */
export function fusedMoeReference(args: FusedMoeArgs): Float32Array {
  const { M, K, N, numExperts: E, topK, blockM, scalingFactor } = args;
  for (const [name, v] of Object.entries({ M, K, N, E, topK, blockM })) {
    if (!Number.isSafeInteger(v) || v < 0) {
      throw new RangeError(`${name} must be a non-negative integer, got ${v}`);
    }
  }
  if (K % GROUP !== 0 || K === 0) throw new RangeError(`K (${K}) must be a multiple of 128`);
  if (N % (2 * GROUP) !== 0 || N === 0) {
    throw new RangeError(`N (${N}) must be a multiple of 256`);
  }
  if (blockM < 1 || topK < 1) throw new RangeError("blockM and topK must be positive");
  const I = N / 2; // intermediate size
  const kb = K / GROUP;
  const nb = N / GROUP;
  const ib = I / GROUP;
  checkLength("x", args.x, M * K, "[M, K]");
  checkLength("xScale", args.xScale, M * kb, "[M, K/128]");
  checkLength("w", args.w, E * N * K, "[E, N, K]");
  checkLength("wScale", args.wScale, E * nb * kb, "[E, N/128, K/128]");
  checkLength("w2", args.w2, E * K * I, "[E, K, N/2]");
  checkLength("w2Scale", args.w2Scale, E * kb * ib, "[E, K/128, N/256]");
  checkLength("topkWeights", args.topkWeights, M * topK, "[M, topK]");
  const ntpp = args.numTokensPostPadded;
  if (!Number.isSafeInteger(ntpp) || ntpp < 0 || ntpp > args.sortedTokenIds.length) {
    throw new RangeError(
      `numTokensPostPadded (${ntpp}) must be an integer in 0..${args.sortedTokenIds.length}`,
    );
  }
  const numBlocks = Math.floor(ntpp / blockM);
  if (numBlocks > args.expertIds.length) {
    throw new RangeError(
      `numTokensPostPadded (${ntpp}) needs ${numBlocks} expert ids, have ${args.expertIds.length}`,
    );
  }

  const numSlots = M * topK;
  let wanted: Uint8Array | undefined;
  if (args.rows !== undefined) {
    wanted = new Uint8Array(M);
    for (const r of args.rows) {
      if (!Number.isSafeInteger(r) || r < 0 || r >= M) {
        throw new RangeError(`rows: ${r} is not a token index in 0..${M - 1}`);
      }
      wanted[r] = 1;
    }
  }

  // Dequantised activations, computed per token on first use.
  const xDeq = new Float32Array(M * K);
  const xDone = new Uint8Array(M);
  const xRow = (t: number): number => {
    const base = t * K;
    if (xDone[t] === 0) {
      for (let k = 0; k < K; k++) {
        xDeq[base + k] = LUT[args.x[base + k]] * args.xScale[t * kb + (k >> 7)];
      }
      xDone[t] = 1;
    }
    return base;
  };

  // One expert's dequantised weights at a time.
  const wDeq = new Float32Array(N * K);
  const w2Deq = new Float32Array(K * I);
  let loaded = -1;
  const load = (e: number): void => {
    if (loaded === e) return;
    const w = args.w, ws = args.wScale, w2 = args.w2, w2s = args.w2Scale;
    for (let n = 0; n < N; n++) {
      // Interleaved row n -> intermediate j and gate/up; its scale row after the rep-1
      // interleave of [gate blocks..., up blocks...] is 2 * (j / 128) + isUp.
      const j = ((n >> 4) << 3) | (n & 7);
      const isUp = (n >> 3) & 1;
      const sBase = (e * nb + 2 * (j >> 7) + isUp) * kb;
      const src = (e * N + n) * K;
      const dst = n * K;
      for (let k = 0; k < K; k++) wDeq[dst + k] = LUT[w[src + k]] * ws[sBase + (k >> 7)];
    }
    for (let k = 0; k < K; k++) {
      const sBase = (e * kb + (k >> 7)) * ib;
      const src = (e * K + k) * I;
      const dst = k * I;
      for (let j = 0; j < I; j++) w2Deq[dst + j] = LUT[w2[src + j]] * w2s[sBase + (j >> 7)];
    }
    loaded = e;
  };

  const out = new Float64Array(M * K);
  const act = new Float32Array(I);
  const ids: number[] = [];
  for (let b = 0; b < numBlocks; b++) {
    const e = args.expertIds[b];
    if (e < 0) continue; // expert not on this rank
    if (e >= E) throw new RangeError(`expertIds[${b}] = ${e} is not below numExperts (${E})`);
    ids.length = 0;
    for (let i = b * blockM; i < (b + 1) * blockM; i++) {
      const id = args.sortedTokenIds[i];
      if (id < 0 || id >= numSlots) continue; // padding
      if (wanted !== undefined && wanted[Math.floor(id / topK)] === 0) continue;
      ids.push(id);
    }
    if (ids.length === 0) continue;
    load(e);
    for (const id of ids) {
      const token = Math.floor(id / topK);
      const xb = xRow(token);
      // Up projection fused with SwiGLU.
      for (let j = 0; j < I; j++) {
        const gRow = (((j >> 3) << 4) | (j & 7)) * K;
        const uRow = gRow + 8 * K;
        let g = 0;
        let u = 0;
        for (let k = 0; k < K; k++) {
          const xv = xDeq[xb + k];
          g += xv * wDeq[gRow + k];
          u += xv * wDeq[uRow + k];
        }
        g = Math.fround(g);
        u = Math.fround(u);
        act[j] = (g / (1 + Math.exp(-g))) * u;
      }
      if (args.requant) requantize(act);
      // Down projection.
      const coef = args.topkWeights[id] * scalingFactor;
      const ob = token * K;
      for (let k = 0; k < K; k++) {
        const row = k * I;
        let y = 0;
        for (let j = 0; j < I; j++) y += act[j] * w2Deq[row + j];
        out[ob + k] += coef * Math.fround(y);
      }
    }
  }
  return Float32Array.from(out);
}

// Quantise-dequantise in place, per 128-wide group: what the kernel does to the SwiGLU output
// before the down projection.
function requantize(a: Float32Array): void {
  for (let start = 0; start < a.length; start += GROUP) {
    let amax = 0;
    for (let i = start; i < start + GROUP; i++) {
      const v = Math.abs(a[i]);
      if (v > amax) amax = v;
    }
    const s = Math.fround(Math.max(amax, EPS) / FP8_E4M3_MAX);
    for (let i = start; i < start + GROUP; i++) {
      a[i] = LUT[fp8e4m3Encode(Math.fround(a[i] / s))] * s;
    }
  }
}

/**
 * Relative L2 distance `||a - b|| / ||b||` (float64 sums). Returns 0 when both are all
 * zero and Infinity when only `b` is.
 *
 * @throws {RangeError} if the lengths differ
 */
export function relativeL2(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) {
    throw new RangeError(`lengths differ: ${a.length} vs ${b.length}`);
  }
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    const d = a[i] - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  if (den === 0) return num === 0 ? 0 : Infinity;
  return Math.sqrt(num / den);
}
