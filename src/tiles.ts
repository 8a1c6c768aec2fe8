/**
 * The kernel's stored-tile weight layout (`weightLayout: "tiles"`), made once at load time.
 *
 * The kernel reads its weights in tiles of 256 rows x 128 bytes. Row-major weights make each
 * tile 256 runs of 128 bytes, a whole row apart; stored tiles keep each tile's 32 KiB together,
 * which the GPU streams from memory faster (2-4 % for the layer where it is bound by memory,
 * bench/NOTES.md item 42). Per expert:
 *
 * - up weights `[N, K]` (gate/up already interleaved) become `[N/256][K/128][256][128]`: tile
 *   `(s, kb)` holds rows `256 s ..` and bytes `128 kb ..`; the same number of bytes;
 * - down weights `[K, N/2]` become `[N/256][ceil(K/256)][256][128]`: tile `(s, t)` holds rows
 *   `256 t ..` and bytes `128 s ..`, rows past K zero ({@link tiledDownRows} rows in all).
 *
 * Scales are not affected. Both functions take any number of experts stacked (`[E, N, K]`,
 * `[E, K, N/2]`).
 *
 * @module
 */

const TILE_ROWS = 256;
const TILE_BYTES = 128;

function check(what: string, length: number, rows: number, cols: number): number {
  for (const [name, d, m] of [["rows", rows, 128], ["columns", cols, 128]] as const) {
    if (!Number.isSafeInteger(d) || d <= 0 || d % m !== 0) {
      throw new RangeError(`${what}: ${name} (${d}) must be a positive multiple of ${m}`);
    }
  }
  const per = rows * cols;
  if (length % per !== 0) {
    throw new RangeError(
      `${what}: ${length} bytes are not a whole number of [${rows}, ${cols}] experts`,
    );
  }
  return length / per;
}

/** Rows of one expert's stored down tiles: K rounded up to a multiple of 256. */
export function tiledDownRows(K: number): number {
  return Math.ceil(K / TILE_ROWS) * TILE_ROWS;
}

/**
 * Up-projection weights `[E, N, K]` (FP8 codes, gate/up interleaved) in stored tiles.
 *
 * @throws {RangeError} if N is not a multiple of 256, K not a multiple of 128, or the length
 * not a whole number of experts
 */
export function tileUpWeights(w: Uint8Array, N: number, K: number): Uint8Array {
  if (N % TILE_ROWS !== 0) {
    throw new RangeError(`tileUpWeights: N (${N}) must be a multiple of ${TILE_ROWS}`);
  }
  const E = check("tileUpWeights", w.length, N, K);
  const out = new Uint8Array(w.length);
  let o = 0;
  for (let e = 0; e < E; e++) {
    for (let s = 0; s < N / TILE_ROWS; s++) {
      for (let kb = 0; kb < K / TILE_BYTES; kb++) {
        let src = (e * N + s * TILE_ROWS) * K + kb * TILE_BYTES;
        for (let r = 0; r < TILE_ROWS; r++, src += K, o += TILE_BYTES) {
          out.set(w.subarray(src, src + TILE_BYTES), o);
        }
      }
    }
  }
  return out;
}

/**
 * Down-projection weights `[E, K, N/2]` (FP8 codes) in stored tiles: `E * tiledDownRows(K) *
 * N/2` bytes.
 *
 * @throws {RangeError} if N is not a multiple of 256, K not a multiple of 128, or the length
 * not a whole number of experts
 */
export function tileDownWeights(w2: Uint8Array, N: number, K: number): Uint8Array {
  if (N % TILE_ROWS !== 0) {
    throw new RangeError(`tileDownWeights: N (${N}) must be a multiple of ${TILE_ROWS}`);
  }
  const row = N / 2;
  const E = check("tileDownWeights", w2.length, K, row);
  const rows = tiledDownRows(K);
  const out = new Uint8Array(E * rows * row);
  let o = 0;
  for (let e = 0; e < E; e++) {
    for (let s = 0; s < row / TILE_BYTES; s++) {
      for (let t = 0; t < rows / TILE_ROWS; t++) {
        for (let r = t * TILE_ROWS; r < (t + 1) * TILE_ROWS; r++, o += TILE_BYTES) {
          if (r >= K) continue; // zero padding
          const src = (e * K + r) * row + s * TILE_BYTES;
          out.set(w2.subarray(src, src + TILE_BYTES), o);
        }
      }
    }
  }
  return out;
}
