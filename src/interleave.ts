/**
 * The gate/up row interleave the kernel expects for the first (up) projection.
 *
 * Checkpoints store `w` as `[..., N, K]` with the N/2 gate rows first and the N/2 up rows
 * after them. The kernel wants them in alternating chunks of `rep` rows: `rep` gate rows,
 * then the matching `rep` up rows, then the next `rep` gate rows, and so on. The weights use
 * `rep = 8`, their block scales `[..., N/128, K/128]` use `rep = 1`.
 *
 * This mirrors the seed's `interleave_tensor(w, rep)` (view both halves as
 * `[..., N/(2 rep), rep, K]`, stack them on a new axis after the chunk axis, flatten back),
 * generalised from 3 dimensions to any number >= 2.
 *
 * @module
 */

/** The arrays these functions accept: FP8 codes, float32 scales, bf16 bits. */
export type InterleavableArray = Uint8Array | Float32Array | Uint16Array;

interface Layout {
  outer: number;
  rows: number;
  inner: number;
}

function layout(length: number, shape: readonly number[], rep: number, what: string): Layout {
  if (shape.length < 2) {
    throw new RangeError(`${what}: shape [${shape.join(", ")}] needs at least 2 dimensions`);
  }
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new RangeError(`${what}: shape [${shape.join(", ")}] has a bad dimension ${d}`);
    }
  }
  if (!Number.isSafeInteger(rep) || rep < 1) {
    throw new RangeError(`${what}: rep must be a positive integer, got ${rep}`);
  }
  const rows = shape[shape.length - 2];
  const inner = shape[shape.length - 1];
  if (rows % 2 !== 0) {
    throw new RangeError(`${what}: the second-to-last dimension (${rows}) must be even`);
  }
  if ((rows / 2) % rep !== 0) {
    throw new RangeError(
      `${what}: half the second-to-last dimension (${rows / 2}) must be a multiple of rep ${rep}`,
    );
  }
  let total = 1;
  for (const d of shape) total *= d;
  if (length !== total) {
    throw new RangeError(
      `${what}: data has ${length} elements but shape [${shape.join(", ")}] needs ${total}`,
    );
  }
  return { outer: total === 0 ? 0 : total / (rows * inner), rows, inner };
}

function sameKind<T extends InterleavableArray>(data: T): T {
  return new (data.constructor as new (n: number) => T)(data.length);
}

// `toInterleaved` true: checkpoint -> kernel layout; false: the inverse. Both copy whole
// chunks of `rep` contiguous rows at a time.
function permute<T extends InterleavableArray>(
  data: T,
  shape: readonly number[],
  rep: number,
  toInterleaved: boolean,
  what: string,
): T {
  const { outer, rows, inner } = layout(data.length, shape, rep, what);
  const out = sameKind(data);
  const half = rows / 2;
  const chunk = rep * inner; // elements in one chunk of rep rows
  const chunks = half / rep;
  for (let o = 0; o < outer; o++) {
    const base = o * rows * inner;
    for (let c = 0; c < chunks; c++) {
      const gate = base + c * chunk; // chunk c of the gate half (checkpoint layout)
      const up = base + half * inner + c * chunk; // chunk c of the up half
      const inter = base + 2 * c * chunk; // gate chunk c in the kernel layout; up follows
      if (toInterleaved) {
        out.set(data.subarray(gate, gate + chunk), inter);
        out.set(data.subarray(up, up + chunk), inter + chunk);
      } else {
        out.set(data.subarray(inter, inter + chunk), gate);
        out.set(data.subarray(inter + chunk, inter + 2 * chunk), up);
      }
    }
  }
  return out;
}

/**
 * Reorders the second-to-last dimension (size N: N/2 gate rows, then N/2 up rows) into
 * alternating chunks of `rep` gate rows and `rep` up rows, like the seed's
 * `interleave_tensor(w, rep)`. Returns a new array of the same type and shape.
 *
 * @param data row-major elements of a tensor of `shape`
 * @param shape at least 2 dimensions; the second-to-last (N) must be even with N/2 a multiple
 *   of `rep`
 * @param rep rows per chunk: 8 for the FP8 weights, 1 for their 128x128 block scales
 * @throws {RangeError} if the shape, `rep` or the data length do not fit
 *
 * @example
 * ```ts
 * // rows g0 g1 u0 u1 (N = 4, K = 1), rep 1 -> g0 u0 g1 u1
 * interleaveGateUp(new Float32Array([0, 1, 10, 11]), [4, 1], 1); // [0, 10, 1, 11]
 * ```
 */
export function interleaveGateUp<T extends InterleavableArray>(
  data: T,
  shape: readonly number[],
  rep: number,
): T {
  return permute(data, shape, rep, true, "interleaveGateUp");
}

/**
 * The inverse of {@link interleaveGateUp}: from alternating chunks of `rep` gate and `rep` up
 * rows back to all gate rows followed by all up rows. Same validation.
 */
export function deinterleaveGateUp<T extends InterleavableArray>(
  data: T,
  shape: readonly number[],
  rep: number,
): T {
  return permute(data, shape, rep, false, "deinterleaveGateUp");
}
