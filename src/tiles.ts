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
 * Scales are not affected. Every function takes any number of experts stacked (`[E, N, K]`,
 * `[E, K, N/2]`). {@link tileUpWeights} and {@link tileDownWeights} run on the host (under 1
 * GB/s); {@link tileUpWeightsOnDevice} and {@link tileDownWeightsOnDevice} do the same on the
 * GPU from row-major device buffers, and the up one can also interleave a checkpoint's gate and
 * up halves on the way (what `MoeLayer` loads with).
 *
 * @module
 */
import { InvalidArgumentError, unwrap } from "../ffi/errors.ts";
import { symbols } from "../ffi/library.ts";
import type { DeviceBuffer } from "./buffer.ts";
import { type Stream, streamHandle } from "./device.ts";

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

/** Options of {@link tileUpWeightsOnDevice} and {@link tileDownWeightsOnDevice}. */
export interface DeviceTileOptions {
  /** The expert of `dst` that `src`'s first expert goes to (default 0). */
  firstExpert?: number;
  /** The stream (default: the legacy default stream). */
  stream?: Stream;
}

/** Options of {@link tileUpWeightsOnDevice}. */
export interface DeviceUpTileOptions extends DeviceTileOptions {
  /** `src` rows are a checkpoint's `w13`: N/2 gate rows, then N/2 up rows. They are
   * interleaved in chunks of 8 on the way, as `interleaveGateUp(w13, [N, K], 8)` would. Default
   * false: the rows are interleaved already. */
  gateUpHalves?: boolean;
}

function deviceTileArgs(
  what: string,
  src: DeviceBuffer<"fp8_e4m3">,
  dst: DeviceBuffer<"fp8_e4m3">,
  dstRows: (rows: number) => number,
  firstExpert: number,
): { E: number; rows: number; cols: number; dstPointer: Deno.PointerValue } {
  for (const [name, t] of [["src", src], ["dst", dst]] as const) {
    if (t.dtype !== "fp8_e4m3" || t.shape.length !== 3) {
      throw new InvalidArgumentError(
        `${what}: ${name} is ${t.dtype} [${t.shape.join(", ")}], expected fp8_e4m3 [E, rows, cols]`,
      );
    }
  }
  const [E, rows, cols] = src.shape;
  const [dstE, dRows, dCols] = dst.shape;
  if (dRows !== dstRows(rows) || dCols !== cols) {
    throw new InvalidArgumentError(
      `${what}: dst is [${dst.shape.join(", ")}], expected [E, ${dstRows(rows)}, ${cols}] for ` +
        `src [${src.shape.join(", ")}]`,
    );
  }
  if (!Number.isSafeInteger(firstExpert) || firstExpert < 0 || firstExpert + E > dstE) {
    throw new InvalidArgumentError(
      `${what}: experts ${firstExpert}..${firstExpert + E - 1} are not all in dst's ${dstE}`,
    );
  }
  const base = dst.pointer;
  const offset = firstExpert * dRows * dCols;
  const dstPointer = base === null ? null : Deno.UnsafePointer.offset(base, offset);
  return { E, rows, cols, dstPointer };
}

/**
 * Up-projection weights `src` `fp8_e4m3 [E, N, K]` (row-major, on the GPU) into stored tiles in
 * `dst` `[E', N, K]`, experts `firstExpert ..` of it. Asynchronous on `options.stream`.
 *
 * @throws {InvalidArgumentError} for a wrong dtype or shape, N not a multiple of 256, K not a
 * multiple of 128, or experts past the end of `dst`
 */
export function tileUpWeightsOnDevice(
  src: DeviceBuffer<"fp8_e4m3">,
  dst: DeviceBuffer<"fp8_e4m3">,
  options: DeviceUpTileOptions = {},
): void {
  const what = "tileUpWeightsOnDevice";
  const a = deviceTileArgs(what, src, dst, (n) => n, options.firstExpert ?? 0);
  if (a.E === 0) return;
  unwrap(
    symbols().amoe_tile_up_weights(
      src.pointer,
      a.dstPointer,
      a.E,
      a.rows,
      a.cols,
      options.gateUpHalves ? 1 : 0,
      streamHandle(options.stream),
    ),
  );
}

/**
 * Down-projection weights `src` `fp8_e4m3 [E, K, N/2]` (row-major, on the GPU) into stored tiles
 * in `dst` `[E', tiledDownRows(K), N/2]`, experts `firstExpert ..` of it; rows past K are
 * written as zeros. Asynchronous on `options.stream`.
 *
 * @throws {InvalidArgumentError} for a wrong dtype or shape, N not a multiple of 256, K not a
 * multiple of 128, or experts past the end of `dst`
 */
export function tileDownWeightsOnDevice(
  src: DeviceBuffer<"fp8_e4m3">,
  dst: DeviceBuffer<"fp8_e4m3">,
  options: DeviceTileOptions = {},
): void {
  const what = "tileDownWeightsOnDevice";
  const a = deviceTileArgs(what, src, dst, tiledDownRows, options.firstExpert ?? 0);
  if (a.E === 0) return;
  unwrap(
    symbols().amoe_tile_down_weights(
      src.pointer,
      a.dstPointer,
      a.E,
      2 * a.cols,
      a.rows,
      streamHandle(options.stream),
    ),
  );
}
