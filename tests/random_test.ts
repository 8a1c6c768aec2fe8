import assert from "node:assert/strict";
import { decodeFp8, fp8e4m3Decode, fp8e4m3Encode } from "../src/codecs.ts";
import { deinterleaveGateUp } from "../src/interleave.ts";
import {
  fillRandomFp8,
  makeProblemWithTail,
  makeRandomMoeProblem,
  randomLogUniform,
  randomNormal,
  randomUniform,
  Rng,
} from "../src/random.ts";
import { fusedMoeReference, moeAlignBlockSize, relativeL2 } from "../src/reference.ts";

function meanStd(a: ArrayLike<number>): [number, number] {
  let s = 0, s2 = 0;
  for (let i = 0; i < a.length; i++) {
    s += a[i];
    s2 += a[i] * a[i];
  }
  const m = s / a.length;
  return [m, Math.sqrt(s2 / a.length - m * m)];
}

Deno.test("Rng: deterministic per seed, fillU32 continues the same stream", () => {
  const a = new Rng(42), b = new Rng(42), c = new Rng(43);
  const xa = Array.from({ length: 10 }, () => a.nextU32());
  const xb = Array.from({ length: 10 }, () => b.nextU32());
  assert.deepEqual(xa, xb);
  assert.notDeepEqual(xa, Array.from({ length: 10 }, () => c.nextU32()));
  const buf = new Uint32Array(10);
  a.fillU32(buf);
  assert.deepEqual([...buf], Array.from({ length: 10 }, () => b.nextU32()));
  assert.equal(a.nextU32(), b.nextU32());
  for (const v of xa) assert.ok(Number.isInteger(v) && v >= 0 && v < 2 ** 32);
  // Seed 0 works (splitmix spreads it).
  assert.notEqual(new Rng(0).nextU32(), 0);
});

Deno.test("randomNormal / randomUniform / randomLogUniform: moments and ranges", () => {
  const n = randomNormal(7, 200_000, 3, 2);
  const [m, s] = meanStd(n);
  assert.ok(Math.abs(m - 3) < 0.02 && Math.abs(s - 2) < 0.02, `${m} ${s}`);
  const u = randomUniform(new Rng(8), 100_000, -1, 3);
  assert.ok(u.every((v) => v >= -1 && v < 3));
  assert.ok(Math.abs(meanStd(u)[0] - 1) < 0.02);
  const l = randomLogUniform(9, 10_000, 1e-3, 1e-2);
  assert.ok(l.every((v) => v >= Math.fround(1e-3) * 0.999999 && v <= 1e-2 * 1.000001));
  assert.deepEqual(randomNormal(5, 100), randomNormal(5, 100));
});

Deno.test("fillRandomFp8: normal-shaped codes, no NaN, odd lengths", () => {
  const codes = new Uint8Array(1_000_001);
  fillRandomFp8(new Rng(1), codes, 50);
  const hist = new Uint32Array(256);
  for (const c of codes) hist[c]++;
  assert.equal(hist[0x7f] + hist[0xff], 0, "no NaN codes");
  const [m, s] = meanStd(decodeFp8(codes));
  assert.ok(Math.abs(m) < 0.3, `mean ${m}`);
  assert.ok(Math.abs(s - 50) < 1, `std ${s}`);
  // Compare with encoding actual normal samples: same code frequencies to ~1 %.
  const rng = new Rng(2);
  const hist2 = new Uint32Array(256);
  for (let i = 0; i < 1_000_000; i++) hist2[fp8e4m3Encode(50 * rng.normal())]++;
  for (let c = 0; c < 256; c++) {
    if (hist2[c] > 5000) {
      assert.ok(Math.abs(hist[c] / hist2[c] - 1) < 0.1, `code ${c}: ${hist[c]} vs ${hist2[c]}`);
    }
  }
  // An odd length uses half of the last 32-bit draw: same prefix as an even length.
  const three = new Uint8Array(3), four = new Uint8Array(4);
  fillRandomFp8(new Rng(9), three, 50);
  fillRandomFp8(new Rng(9), four, 50);
  assert.deepEqual(three, four.subarray(0, 3));
  assert.throws(() => fillRandomFp8(new Rng(1), codes, 0), RangeError);
  // A small std reaches the subnormals; a large one saturates at ±448.
  const tiny = new Uint8Array(10_000);
  fillRandomFp8(new Rng(3), tiny, 0.01);
  assert.ok(tiny.some((c) => (c & 0x78) === 0 && (c & 7) !== 0));
  const huge = new Uint8Array(10_000);
  fillRandomFp8(new Rng(3), huge, 1e4);
  assert.ok(huge.some((c) => c === 0x7e) && huge.some((c) => c === 0xfe));
  assert.equal(fp8e4m3Decode(0x7e), 448);
});

Deno.test("makeRandomMoeProblem: shapes, distinct routing, weights, alignment", () => {
  const p = makeRandomMoeProblem({
    M: 37,
    K: 256,
    N: 512,
    numExperts: 12,
    topK: 4,
    blockM: 8,
    seed: 11,
  });
  assert.equal(p.x.length, 37 * 256);
  assert.equal(p.xScale.length, 37 * 2);
  assert.equal(p.w.length, 12 * 512 * 256);
  assert.equal(p.wScale.length, 12 * 4 * 2);
  assert.equal(p.w2.length, 12 * 256 * 256);
  assert.equal(p.w2Scale.length, 12 * 2 * 2);
  assert.ok(p.wScale.every((s) => s >= 0.000999 && s <= 0.010001));
  for (let t = 0; t < 37; t++) {
    const ids = [...p.topkIds.subarray(t * 4, t * 4 + 4)];
    assert.equal(new Set(ids).size, 4, `token ${t} has distinct experts`);
    assert.ok(ids.every((e) => e >= 0 && e < 12));
    const ws = p.topkWeights.subarray(t * 4, t * 4 + 4);
    assert.ok(ws.every((w) => w > 0));
    assert.ok(Math.abs(ws.reduce((a, b) => a + b, 0) - 1) < 1e-6);
  }
  const a = moeAlignBlockSize(p.topkIds, 12, 8);
  assert.deepEqual(p.sortedTokenIds, a.sortedTokenIds);
  assert.deepEqual(p.expertIds, a.expertIds);
  assert.equal(p.numTokensPostPadded, a.numTokensPostPadded);
  // Same seed, same problem; another seed, another.
  const again = makeRandomMoeProblem({
    M: 37,
    K: 256,
    N: 512,
    numExperts: 12,
    topK: 4,
    blockM: 8,
    seed: 11,
  });
  assert.deepEqual(again.w, p.w);
  assert.deepEqual(again.topkIds, p.topkIds);
  const other = makeRandomMoeProblem({
    M: 37,
    K: 256,
    N: 512,
    numExperts: 12,
    topK: 4,
    blockM: 8,
    seed: 12,
  });
  assert.notDeepEqual(other.w, p.w);
  // The reference runs on it and gives finite, non-trivial output.
  const out = fusedMoeReference({ ...p, requant: true });
  assert.ok(out.every(Number.isFinite));
  assert.ok(out.some((v) => v !== 0));
  // w is in kernel layout; going back to the checkpoint layout is possible and lossless.
  assert.equal(deinterleaveGateUp(p.w, [12, 512, 256], 8).length, p.w.length);
});

Deno.test("makeRandomMoeProblem: shared expert, skew, dropExperts", () => {
  const shared = makeRandomMoeProblem({
    M: 20,
    K: 128,
    N: 256,
    numExperts: 9,
    topK: 4,
    blockM: 16,
    seed: 3,
    sharedExpert: true,
    scalingFactor: 2.5,
  });
  for (let t = 0; t < 20; t++) {
    assert.equal(shared.topkIds[t * 4 + 3], 8);
    assert.ok(Math.abs(shared.topkWeights[t * 4 + 3] - 0.4) < 1e-7);
    for (let s = 0; s < 3; s++) assert.ok(shared.topkIds[t * 4 + s] < 8);
  }
  assert.equal(shared.scalingFactor, 2.5);

  const skewed = makeRandomMoeProblem({
    M: 400,
    K: 128,
    N: 256,
    numExperts: 32,
    topK: 2,
    blockM: 8,
    seed: 4,
    skew: 2,
  });
  const counts = new Uint32Array(32);
  for (const e of skewed.topkIds) counts[e]++;
  assert.ok(counts[0] > 5 * counts[20], `skewed: ${counts[0]} vs ${counts[20]}`);

  const base = { M: 30, K: 128, N: 256, numExperts: 6, topK: 2, blockM: 8, seed: 5 };
  const full = makeRandomMoeProblem(base);
  const dropped = makeRandomMoeProblem({ ...base, dropExperts: [1, 4] });
  const used = full.numTokensPostPadded / 8;
  for (let b = 0; b < full.expertIds.length; b++) {
    const e = full.expertIds[b];
    const want = b < used && (e === 1 || e === 4) ? -1 : e;
    assert.equal(dropped.expertIds[b], want);
  }
  assert.ok(dropped.expertIds.includes(-1));
  // Dropped experts contribute nothing: same as removing their slots from the routing.
  const outDropped = fusedMoeReference({ ...dropped, requant: false });
  const ids = full.topkIds.map((e) => (e === 1 || e === 4 ? -1 : e));
  const outRemoved = fusedMoeReference({
    ...full,
    ...moeAlignBlockSize(ids, 6, 8),
    requant: false,
  });
  assert.ok(relativeL2(outDropped, outRemoved) === 0);

  assert.throws(() => makeRandomMoeProblem({ ...base, dropExperts: [6] }), /dropExperts/);
  assert.throws(() => makeRandomMoeProblem({ ...base, topK: 7 }), /topK/);
  assert.throws(() => makeRandomMoeProblem({ ...base, K: 100 }), /multiple of 128/);
});

Deno.test("makeRandomMoeProblem at real size (E=257, N=256, K=7168: 700 MB of weights)", () => {
  const t0 = performance.now();
  const p = makeRandomMoeProblem({
    M: 16,
    K: 7168,
    N: 256,
    numExperts: 257,
    topK: 9,
    blockM: 16,
    seed: 1,
    sharedExpert: true,
    scalingFactor: 2.5,
  });
  const genMs = performance.now() - t0;
  assert.equal(p.w.length + p.w2.length, 257 * 256 * 7168 * 1.5);
  const t1 = performance.now();
  const out = fusedMoeReference({ ...p, requant: true, rows: [0, 15] });
  const refMs = performance.now() - t1;
  console.log(`generate ${genMs.toFixed(0)} ms, reference (2 rows) ${refMs.toFixed(0)} ms`);
  assert.ok(out.subarray(0, 7168).every(Number.isFinite));
  assert.ok(out.subarray(0, 7168).some((v) => v !== 0));
  assert.ok(genMs < 60_000, "generation should take seconds, not minutes");
});

Deno.test("makeProblemWithTail: more units than a wave, and a tail the given room takes", () => {
  // The problems of the GPU tests of tail units and of slice units, on a 132-SM card: units are
  // token blocks x N slices, or token blocks alone (unitsPerBlock 1) for an all-slices launch
  // whose room is a wave's worth of slice units.
  const smCount = 132;
  const cases = [
    { N: 512, blockM: 32, cluster: 4, unitsPerBlock: undefined, M: 500 },
    { N: 768, blockM: 64, cluster: 3, unitsPerBlock: 1, M: 2200 },
    { N: 512, blockM: 16, cluster: 2, unitsPerBlock: 1, M: 600 },
  ];
  for (const { N, blockM, cluster, unitsPerBlock, M } of cases) {
    const opts = { M, K: 256, N, numExperts: 16, topK: 4, blockM: 8, seed: 41 };
    const p = makeProblemWithTail(opts, blockM, cluster, smCount, unitsPerBlock);
    const blocks = moeAlignBlockSize(p.topkIds, 16, blockM).numTokensPostPadded / blockM;
    const units = blocks * (unitsPerBlock ?? N / 256);
    const what = `N ${N} block_m ${blockM} M ${p.M}: ${units} units`;
    assert.ok(p.M >= M && p.M < 2 * M, what);
    assert.ok(units > smCount, what);
    assert.ok(units % smCount >= 1 && units % smCount <= Math.floor(smCount / cluster), what);
  }
  assert.throws(
    () =>
      makeProblemWithTail(
        { M: 8, K: 256, N: 256, numExperts: 16, topK: 1, blockM: 8, seed: 1 },
        8,
        1,
        132,
      ),
    RangeError,
  );
});
