import assert from "node:assert/strict";
import {
  bf16Decode,
  bf16Encode,
  decodeBf16,
  decodeFp8,
  encodeBf16,
  encodeFp8,
  FP8_E4M3_MAX,
  fp8e4m3Decode,
  fp8e4m3Encode,
  fp8e4m3Table,
} from "../src/codecs.ts";

interface Fp8Golden {
  decode: (number | null)[];
  encode: { inputs: number[]; codes: number[] };
}

const golden: Fp8Golden = JSON.parse(
  await Deno.readTextFile(new URL("./fixtures/fp8_e4m3.json", import.meta.url)),
);

const isNegZero = (x: number): boolean => x === 0 && 1 / x < 0;

Deno.test("fp8 decode matches the golden table for all 256 codes", () => {
  assert.equal(golden.decode.length, 256);
  const bulk = decodeFp8(Uint8Array.from({ length: 256 }, (_, i) => i));
  const table = fp8e4m3Table();
  for (let c = 0; c < 256; c++) {
    const want = golden.decode[c];
    for (const got of [fp8e4m3Decode(c), bulk[c], table[c]]) {
      if (want === null) assert.ok(Number.isNaN(got), `code ${c} should be NaN`);
      else assert.equal(got, want, `code 0x${c.toString(16)}`);
    }
  }
  // JSON has no -0; check the sign of 0x80 separately.
  assert.ok(isNegZero(fp8e4m3Decode(0x80)));
});

Deno.test("fp8 decode: known values", () => {
  assert.equal(fp8e4m3Decode(0x00), 0);
  assert.equal(fp8e4m3Decode(0x01), 2 ** -9); // smallest subnormal
  assert.equal(fp8e4m3Decode(0x07), 7 * 2 ** -9); // largest subnormal
  assert.equal(fp8e4m3Decode(0x08), 2 ** -6); // smallest normal
  assert.equal(fp8e4m3Decode(0x38), 1);
  assert.equal(fp8e4m3Decode(0x7e), 448);
  assert.equal(fp8e4m3Decode(0xfe), -448);
  assert.ok(Number.isNaN(fp8e4m3Decode(0x7f)));
  assert.ok(Number.isNaN(fp8e4m3Decode(0xff)));
  assert.equal(fp8e4m3Decode(0x178), fp8e4m3Decode(0x78)); // only the low 8 bits count
  assert.equal(FP8_E4M3_MAX, 448);
});

Deno.test("fp8 encode matches torch on the golden inputs", () => {
  const { inputs, codes } = golden.encode;
  assert.equal(inputs.length, codes.length);
  const bulk = encodeFp8(Float32Array.from(inputs));
  let mismatches = 0;
  for (let i = 0; i < inputs.length; i++) {
    const x = Math.fround(inputs[i]);
    if (fp8e4m3Encode(x) !== codes[i] || bulk[i] !== codes[i]) mismatches++;
  }
  assert.equal(mismatches, 0);
});

Deno.test("fp8 encode: every finite code round-trips (exhaustive)", () => {
  for (let c = 0; c < 256; c++) {
    if ((c & 0x7f) === 0x7f) continue;
    assert.equal(fp8e4m3Encode(fp8e4m3Decode(c)), c, `code 0x${c.toString(16)}`);
  }
});

Deno.test("fp8 encode: ties go to the even code, everything else to the nearest (exhaustive)", () => {
  // Adjacent non-negative codes c, c+1 for every pair up to 448, both signs.
  for (let c = 0; c < 0x7e; c++) {
    const lo = fp8e4m3Decode(c);
    const hi = fp8e4m3Decode(c + 1);
    const mid = (lo + hi) / 2;
    const even = (c & 1) === 0 ? c : c + 1;
    const eps = (hi - lo) / 1024;
    for (const s of [1, -1]) {
      const sign = s < 0 ? 0x80 : 0;
      assert.equal(fp8e4m3Encode(s * mid), sign | even, `tie between 0x${c.toString(16)}, +1`);
      assert.equal(fp8e4m3Encode(s * (mid - eps)), sign | c);
      assert.equal(fp8e4m3Encode(s * (mid + eps)), sign | (c + 1));
      // A quarter of the way: nearest.
      assert.equal(fp8e4m3Encode(s * (lo + (hi - lo) / 4)), sign | c);
      assert.equal(fp8e4m3Encode(s * (hi - (hi - lo) / 4)), sign | (c + 1));
    }
  }
});

Deno.test("fp8 encode: hand-picked values", () => {
  // Subnormals: the grid is 2^-9.
  assert.equal(fp8e4m3Encode(2 ** -9), 0x01);
  assert.equal(fp8e4m3Encode(2 ** -10), 0x00); // tie 0 / 2^-9 -> even (0)
  assert.equal(fp8e4m3Encode(3 * 2 ** -10), 0x02); // tie 1 / 2 -> even (2)
  assert.equal(fp8e4m3Encode(15 * 2 ** -10), 0x08); // tie 7 / 8 -> 8, the smallest normal
  assert.equal(fp8e4m3Encode(2 ** -6), 0x08);
  // Normals.
  assert.equal(fp8e4m3Encode(1), 0x38);
  assert.equal(fp8e4m3Encode(1.0625), 0x38); // tie 1 / 1.125 -> even (1)
  assert.equal(fp8e4m3Encode(1.1875), 0x3a); // tie 1.125 / 1.25 -> even (1.25)
  assert.equal(fp8e4m3Encode(-3.5), 0xc6);
  assert.equal(fp8e4m3Encode(240), 0x77);
  // Exactly above a tie in float64 only (not representable in float32): must round up.
  assert.equal(fp8e4m3Encode(1.0625 + 2 ** -40), 0x39);
  assert.equal(fp8e4m3Encode(1.0625 - 2 ** -40), 0x38);
  // Carry from the mantissa into the exponent.
  assert.equal(fp8e4m3Encode(1.9375), 0x40); // tie 1.875 / 2 -> 2
  assert.equal(fp8e4m3Encode(1.95), 0x40);
  // Saturation at +-448.
  assert.equal(fp8e4m3Encode(416), 0x7d);
  assert.equal(fp8e4m3Encode(440), 0x7e); // tie 432 / 448 -> even (448)
  assert.equal(fp8e4m3Encode(448), 0x7e);
  assert.equal(fp8e4m3Encode(464), 0x7e);
  assert.equal(fp8e4m3Encode(1e30), 0x7e);
  assert.equal(fp8e4m3Encode(Infinity), 0x7e);
  assert.equal(fp8e4m3Encode(-500), 0xfe);
  assert.equal(fp8e4m3Encode(-Infinity), 0xfe);
  // NaN and signed zeros.
  assert.equal(fp8e4m3Encode(NaN), 0x7f);
  assert.equal(fp8e4m3Encode(-NaN), 0x7f);
  assert.equal(fp8e4m3Encode(0), 0x00);
  assert.equal(fp8e4m3Encode(-0), 0x80);
  assert.equal(fp8e4m3Encode(-1e-9), 0x80); // rounds to zero, keeps the sign
  assert.equal(fp8e4m3Encode(Number.MIN_VALUE), 0x00);
  assert.deepEqual([...encodeFp8([1, -0, NaN, 1e9])], [0x38, 0x80, 0x7f, 0x7e]);
});

Deno.test("fp8 encode: bulk equals scalar on random inputs of all magnitudes", () => {
  let seed = 12345;
  const rand = (): number => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return seed / 2 ** 32;
  };
  const xs = new Float64Array(20000);
  for (let i = 0; i < xs.length; i++) xs[i] = (rand() - 0.5) * 2 ** (rand() * 30 - 15);
  const bulk = encodeFp8(xs);
  for (let i = 0; i < xs.length; i++) assert.equal(bulk[i], fp8e4m3Encode(xs[i]));
  // The result is always the nearest code (checked against a brute-force scan).
  const values = fp8e4m3Table();
  for (let i = 0; i < 2000; i++) {
    const x = Math.max(-448, Math.min(448, xs[i]));
    const got = Math.abs(values[bulk[i]] - x);
    for (let c = 0; c < 256; c++) {
      if (!Number.isNaN(values[c])) assert.ok(got <= Math.abs(values[c] - x), `x = ${x}`);
    }
  }
});

Deno.test("bf16 decode/encode: known values", () => {
  assert.equal(bf16Decode(0x3f80), 1);
  assert.equal(bf16Decode(0xc000), -2);
  assert.equal(bf16Decode(0x7f80), Infinity);
  assert.equal(bf16Decode(0xff80), -Infinity);
  assert.ok(Number.isNaN(bf16Decode(0x7fc0)));
  assert.ok(isNegZero(bf16Decode(0x8000)));
  assert.equal(bf16Decode(0x0001), 2 ** -133); // smallest subnormal
  assert.equal(bf16Decode(0x7f7f), 3.3895313892515355e38); // largest finite

  assert.equal(bf16Encode(1), 0x3f80);
  assert.equal(bf16Encode(-2), 0xc000);
  assert.equal(bf16Encode(0), 0x0000);
  assert.equal(bf16Encode(-0), 0x8000);
  assert.equal(bf16Encode(Infinity), 0x7f80);
  assert.equal(bf16Encode(-Infinity), 0xff80);
  assert.equal(bf16Encode(1 + 2 ** -8), 0x3f80); // tie 1 / 1+2^-7 -> even
  assert.equal(bf16Encode(1 + 3 * 2 ** -8), 0x3f82); // tie -> even
  assert.equal(bf16Encode(1 + 2 ** -8 + 2 ** -30), 0x3f81); // just above the tie
  // Above the tie only in float64: a naive float32-first conversion would round to even.
  assert.equal(bf16Encode(1 + 2 ** -8 + 2 ** -40), 0x3f81);
  assert.equal(bf16Encode(1 + 2 ** -8 - 2 ** -40), 0x3f80);
  assert.equal(bf16Encode(2 ** -133), 0x0001);
  assert.equal(bf16Encode(3.4028234663852886e38), 0x7f80); // float32 max rounds to infinity
  assert.equal(bf16Encode(3.3895313892515355e38), 0x7f7f);
  assert.equal(bf16Encode(1e300), 0x7f80);
  const nan = bf16Encode(NaN);
  assert.equal(nan & 0x7f80, 0x7f80, "NaN exponent");
  assert.ok((nan & 0x7f) !== 0 && (nan & 0x40) !== 0, "quiet NaN");
  assert.ok(Number.isNaN(bf16Decode(nan)));
});

Deno.test("bf16: every pattern round-trips, and quiet NaNs stay NaN (exhaustive)", () => {
  const all = Uint16Array.from({ length: 65536 }, (_, i) => i);
  const values = decodeBf16(all);
  const back = encodeBf16(values);
  for (let b = 0; b < 65536; b++) {
    assert.equal(bf16Decode(b), values[b]);
    const isNan = (b & 0x7f80) === 0x7f80 && (b & 0x7f) !== 0;
    if (isNan) {
      assert.ok(Number.isNaN(bf16Decode(back[b])), `0x${b.toString(16)}`);
      assert.ok((back[b] & 0x40) !== 0, "quiet");
    } else {
      assert.equal(back[b], b, `0x${b.toString(16)}`);
      assert.equal(bf16Encode(values[b]), b);
    }
  }
});

Deno.test("bf16 encode: Float32Array fast path equals the scalar path and RNE", () => {
  const bits = new Uint32Array(50000);
  let s = 99;
  for (let i = 0; i < bits.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    bits[i] = s;
  }
  const f = new Float32Array(bits.buffer);
  const fast = encodeBf16(f);
  const slow = encodeBf16(Array.from(f));
  for (let i = 0; i < f.length; i++) {
    if (Number.isNaN(f[i])) {
      assert.ok(Number.isNaN(bf16Decode(fast[i])) && Number.isNaN(bf16Decode(slow[i])));
      continue;
    }
    assert.equal(fast[i], slow[i]);
    // Nearest of the two neighbours that bracket the float32 value. IEEE rounding treats the
    // infinity above the largest finite value as if it were 2^128.
    const lo = bits[i] >>> 16;
    const hiVal = bf16Decode(lo + 1);
    const hiFinite = Number.isFinite(hiVal) ? hiVal : Math.sign(hiVal) * 2 ** 128;
    const dLo = Math.abs(bf16Decode(lo) - f[i]);
    const dHi = Math.abs(hiFinite - f[i]);
    const want = dLo < dHi ? lo : dHi < dLo ? lo + 1 : (lo & 1) === 0 ? lo : lo + 1;
    assert.equal(fast[i], want & 0xffff);
  }
});
