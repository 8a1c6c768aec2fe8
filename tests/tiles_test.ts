import assert from "node:assert/strict";
import { tiledDownRows, tileDownWeights, tileUpWeights } from "../src/tiles.ts";

// Byte (e, row, col) of a stacked [E, rows, cols] tensor, as a value that names its position.
function tagged(E: number, rows: number, cols: number): Uint8Array {
  const a = new Uint8Array(E * rows * cols);
  for (let i = 0; i < a.length; i++) a[i] = (i * 2654435761) >>> 24;
  return a;
}

Deno.test("tileUpWeights: tile (s, kb) holds rows 256 s.. and bytes 128 kb.. contiguously", () => {
  const E = 2, N = 512, K = 384;
  const w = tagged(E, N, K);
  const t = tileUpWeights(w, N, K);
  assert.equal(t.length, w.length);
  for (const [e, n, k] of [[0, 0, 0], [0, 255, 127], [1, 300, 200], [1, 511, 383], [0, 256, 128]]) {
    const s = Math.floor(n / 256), kb = Math.floor(k / 128);
    const tile = (e * (N / 256) + s) * (K / 128) + kb;
    assert.equal(
      t[tile * 32768 + (n % 256) * 128 + (k % 128)],
      w[(e * N + n) * K + k],
      `${e} ${n} ${k}`,
    );
  }
});

Deno.test("tileDownWeights: rows past K are zero, tile (s, t) holds bytes 128 s..", () => {
  const E = 2, N = 512, K = 384; // K % 256 == 128: the last tile has 128 rows of padding
  const w2 = tagged(E, K, N / 2);
  const t = tileDownWeights(w2, N, K);
  assert.equal(tiledDownRows(K), 512);
  assert.equal(t.length, E * 512 * (N / 2));
  const at = (e: number, s: number, tt: number, r: number, c: number) =>
    t[((e * (N / 256) + s) * 2 + tt) * 32768 + r * 128 + c];
  for (const [e, k, c] of [[0, 0, 0], [0, 383, 255], [1, 256, 130], [1, 17, 5]]) {
    assert.equal(
      at(e, Math.floor(c / 128), Math.floor(k / 256), k % 256, c % 128),
      w2[(e * K + k) * (N / 2) + c],
    );
  }
  for (let r = 128; r < 256; r++) assert.equal(at(1, 1, 1, r, 77), 0);
});

Deno.test("tileUpWeights, tileDownWeights: a bad size is a RangeError", () => {
  assert.throws(() => tileUpWeights(new Uint8Array(128 * 128), 128, 128), RangeError);
  assert.throws(() => tileUpWeights(new Uint8Array(256 * 100), 256, 100), RangeError);
  assert.throws(() => tileDownWeights(new Uint8Array(128 * 128 + 1), 256, 128), RangeError);
});
