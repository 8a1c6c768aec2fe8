import assert from "node:assert/strict";
import {
  tiledDownRows,
  tileDownWeights,
  tileDownWeightsOnDevice,
  tileUpWeights,
  tileUpWeightsOnDevice,
} from "../src/tiles.ts";
import { DeviceBuffer } from "../src/buffer.ts";
import { interleaveGateUp } from "../src/interleave.ts";
import { InvalidArgumentError } from "../ffi/errors.ts";
import { gpuTest } from "./_gpu.ts";

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

// ---- on the GPU: the same bytes as the host functions ----

function randomBytes(n: number): Uint8Array {
  const a = new Uint8Array(n);
  for (let i = 0; i < n; i += 65536) crypto.getRandomValues(a.subarray(i, Math.min(n, i + 65536)));
  return a;
}

function poisoned(shape: number[]): DeviceBuffer<"fp8_e4m3"> {
  const b = DeviceBuffer.alloc("fp8_e4m3", shape);
  b.fill(0xab);
  return b;
}

gpuTest(
  "tileUpWeightsOnDevice equals tileUpWeights, with and without the gate/up interleave",
  () => {
    const E = 3, N = 512, K = 384;
    const w = randomBytes(E * N * K);
    using src = DeviceBuffer.from("fp8_e4m3", [E, N, K], w);
    for (const gateUpHalves of [false, true]) {
      using dst = poisoned([E, N, K]);
      tileUpWeightsOnDevice(src, dst, { gateUpHalves });
      const rows = gateUpHalves ? interleaveGateUp(w, [E, N, K], 8) : w;
      assert.deepEqual(dst.download(), tileUpWeights(rows, N, K), `gateUpHalves ${gateUpHalves}`);
    }
  },
);

gpuTest("tileDownWeightsOnDevice equals tileDownWeights, padding rows zero", () => {
  for (const K of [384, 512]) {
    const E = 3, N = 512;
    const w2 = randomBytes(E * K * (N / 2));
    using src = DeviceBuffer.from("fp8_e4m3", [E, K, N / 2], w2);
    using dst = poisoned([E, tiledDownRows(K), N / 2]);
    tileDownWeightsOnDevice(src, dst);
    assert.deepEqual(dst.download(), tileDownWeights(w2, N, K), `K ${K}`);
  }
});

gpuTest("tile*OnDevice: firstExpert writes that expert only", () => {
  const N = 256, K = 384;
  const w = randomBytes(N * K), w2 = randomBytes(K * (N / 2));
  using srcW = DeviceBuffer.from("fp8_e4m3", [1, N, K], w);
  using srcW2 = DeviceBuffer.from("fp8_e4m3", [1, K, N / 2], w2);
  using dstW = poisoned([3, N, K]);
  using dstW2 = poisoned([3, tiledDownRows(K), N / 2]);
  tileUpWeightsOnDevice(srcW, dstW, { firstExpert: 1, gateUpHalves: true });
  tileDownWeightsOnDevice(srcW2, dstW2, { firstExpert: 2 });
  const up = dstW.download(), down = dstW2.download();
  const upBytes = N * K, downBytes = tiledDownRows(K) * (N / 2);
  assert.deepEqual(
    up.subarray(upBytes, 2 * upBytes),
    tileUpWeights(interleaveGateUp(w, [N, K], 8), N, K),
  );
  assert.ok(up.subarray(0, upBytes).every((v) => v === 0xab), "expert 0 untouched");
  assert.ok(up.subarray(2 * upBytes).every((v) => v === 0xab), "expert 2 untouched");
  assert.deepEqual(down.subarray(2 * downBytes), tileDownWeights(w2, N, K));
  assert.ok(down.subarray(0, 2 * downBytes).every((v) => v === 0xab), "experts 0-1 untouched");
});

gpuTest("tile*OnDevice: bad shapes and experts are InvalidArgumentErrors", () => {
  using a = DeviceBuffer.alloc("fp8_e4m3", [1, 256, 384]);
  using b = DeviceBuffer.alloc("fp8_e4m3", [2, 256, 384]);
  using narrow = DeviceBuffer.alloc("fp8_e4m3", [1, 128, 128]);
  using scales = DeviceBuffer.alloc("f32", [1, 256, 384]);
  assert.throws(() => tileUpWeightsOnDevice(a, b, { firstExpert: 2 }), InvalidArgumentError);
  assert.throws(() => tileUpWeightsOnDevice(b, a), InvalidArgumentError);
  assert.throws(() => tileUpWeightsOnDevice(a, narrow), InvalidArgumentError);
  assert.throws(() => tileUpWeightsOnDevice(narrow, narrow), /multiple of 256/);
  using down = DeviceBuffer.alloc("fp8_e4m3", [1, 384, 256]);
  assert.throws(() => tileDownWeightsOnDevice(down, down), /expected \[E, 512, 256\]/);
  assert.throws(() => tileDownWeightsOnDevice(a, a), /overlap/);
  assert.throws(
    () => tileUpWeightsOnDevice(scales as unknown as DeviceBuffer<"fp8_e4m3">, a),
    InvalidArgumentError,
  );
});
