// The steps before the fused kernel on the GPU (src/routing.ts): routing, moe_align_block_size
// and FP8 quantisation against their CPU references on random inputs (ties and degenerate
// routings included) and against the golden vectors. Needs a Hopper GPU; ignored elsewhere.
import assert from "node:assert/strict";
import { InvalidArgumentError, UnsupportedError } from "../ffi/errors.ts";
import { DeviceBuffer } from "../src/buffer.ts";
import { decodeBf16, encodeBf16 } from "../src/codecs.ts";
import { moeAlignBlockSize, quantizePerTokenGroup } from "../src/reference.ts";
import { Rng } from "../src/random.ts";
import {
  alignBlockSize,
  alignedSizes,
  alignWorkspaceBytes,
  quantizeFp8,
  routeTopK,
  routeTopKReference,
  type RoutingMethod,
  type SharedExpertSlot,
} from "../src/routing.ts";
import { loadSafetensors } from "../src/safetensors.ts";
import { gpuTest } from "./_gpu.ts";

const MS = [1, 5, 128, 4097];
const ES = [8, 257, 512];

/** Logits with many exact ties (rows from 3 values), some rows all equal, the rest normal. */
function tieLogits(rng: Rng, M: number, E: number): Float32Array {
  const out = new Float32Array(M * E);
  for (let t = 0; t < M; t++) {
    const kind = t % 4;
    for (let e = 0; e < E; e++) {
      out[t * E + e] = kind === 0 ? rng.int(3) - 1 : kind === 1
        ? 0.25 // every expert equal
        : 2 * rng.normal();
    }
  }
  return out;
}

function methodsFor(E: number): RoutingMethod[] {
  const grouped: RoutingMethod = E === 8
    ? { kind: "grouped", topK: 3, nGroup: 4, topkGroup: 2 }
    : E === 257
    ? { kind: "grouped", topK: 8, nGroup: 1, topkGroup: 1 }
    : { kind: "grouped", topK: 8, nGroup: 16, topkGroup: 4 };
  return [
    { kind: "softmax", topK: Math.min(6, E) },
    { kind: "softmax", topK: 2, renormalize: false },
    grouped,
    { ...grouped, renormalize: false },
  ];
}

function runRouting(
  logits: Float32Array,
  M: number,
  E: number,
  method: RoutingMethod,
  options: { bias?: Float32Array; weightScale?: number; sharedExpert?: SharedExpertSlot },
): { ids: Int32Array; weights: Float32Array } {
  const width = method.topK + (options.sharedExpert ? 1 : 0);
  using l = DeviceBuffer.from("f32", [M, E], logits);
  using b = options.bias ? DeviceBuffer.from("f32", [E], options.bias) : undefined;
  using ids = DeviceBuffer.alloc("i32", [M, width]);
  using weights = DeviceBuffer.alloc("f32", [M, width]);
  routeTopK(l, method, { topkIds: ids, topkWeights: weights }, { ...options, bias: b });
  return { ids: ids.download(), weights: weights.download() };
}

gpuTest("routing equals the CPU reference: M x E x methods, ties, shared slot", () => {
  const rng = new Rng(1);
  let rows = 0, exactWeights = 0, slots = 0;
  for (const E of ES) {
    const bias = Float32Array.from({ length: E }, () => 0.05 * rng.normal());
    for (const M of MS) {
      const logits = tieLogits(rng, M, E);
      for (const method of methodsFor(E)) {
        const options = method.kind === "grouped"
          ? { bias, sharedExpert: { id: E, weight: 0.4 } }
          : { weightScale: 1.5 };
        const gpu = runRouting(logits, M, E, method, options);
        const ref = routeTopKReference(logits, M, E, method, options);
        const what = `E=${E} M=${M} ${JSON.stringify(method)}`;
        assert.deepEqual(gpu.ids, ref.topkIds, `${what}: ids`);
        for (let i = 0; i < gpu.weights.length; i++) {
          const d = Math.abs(gpu.weights[i] - ref.topkWeights[i]);
          assert.ok(
            d <= 1e-6 * Math.max(1, Math.abs(ref.topkWeights[i])),
            `${what}: slot ${i} off ${d}`,
          );
          if (d === 0) exactWeights++;
        }
        rows += M;
        slots += gpu.weights.length;
      }
    }
  }
  console.log(
    `${rows} rows: ids equal; ${exactWeights}/${slots} weights bit-equal, all within 1e-6`,
  );
});

gpuTest("routing reproduces the golden routing vectors", async () => {
  const f = await loadSafetensors(new URL("./fixtures/routing.safetensors", import.meta.url));
  const sm = runRouting(f.f32("softmax_logits"), 37, 64, { kind: "softmax", topK: 6 }, {});
  const ids = f.i32("softmax_ids"), w = f.f32("softmax_weights");
  for (let t = 0; t < 37; t++) {
    const got = [...sm.ids.subarray(t * 6, t * 6 + 6)];
    if (t === 3) assert.deepEqual(got, [0, 1, 2, 3, 4, 5]); // all ties: the lowest indexes
    else assert.deepEqual(got, [...ids.subarray(t * 6, t * 6 + 6)], `softmax row ${t}`);
  }
  sm.weights.forEach((v, i) => assert.ok(Math.abs(v - w[i]) <= 1e-6, `softmax weight ${i}`));
  const ds = runRouting(
    f.f32("ds_logits"),
    37,
    256,
    { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 4 },
    { bias: f.f32("ds_bias") },
  );
  assert.deepEqual(ds.ids, f.i32("ds_ids"));
  const dw = f.f32("ds_weights");
  ds.weights.forEach((v, i) => assert.ok(Math.abs(v - dw[i]) <= 1e-6, `ds weight ${i}`));
});

function runAlign(ids: Int32Array, E: number, blockM: number): {
  sorted: Int32Array;
  expertIds: Int32Array;
  ntpp: number;
} {
  const { sortedLen, numBlocks } = alignedSizes(ids.length, E, blockM);
  const ws = alignWorkspaceBytes(ids.length, E);
  using topk = DeviceBuffer.from("i32", [ids.length], ids);
  using sorted = DeviceBuffer.alloc("i32", [sortedLen]);
  using expertIds = DeviceBuffer.alloc("i32", [numBlocks]);
  using ntpp = DeviceBuffer.alloc("i32", [1]);
  using workspace = ws > 0 ? DeviceBuffer.alloc("i32", [ws / 4]) : undefined;
  sorted.fill(0xab); // garbage: every entry must be written
  expertIds.fill(0xcd);
  alignBlockSize(topk, E, blockM, {
    sortedTokenIds: sorted,
    expertIds,
    numTokensPostPadded: ntpp,
    workspace,
  });
  return { sorted: sorted.download(), expertIds: expertIds.download(), ntpp: ntpp.download()[0] };
}

function checkAlign(ids: Int32Array, E: number, blockM: number, what: string): void {
  const gpu = runAlign(ids, E, blockM);
  const ref = moeAlignBlockSize(ids, E, blockM);
  assert.equal(gpu.ntpp, ref.numTokensPostPadded, `${what}: num_tokens_post_padded`);
  if (!gpu.sorted.every((v, i) => v === ref.sortedTokenIds[i])) {
    const i = gpu.sorted.findIndex((v, j) => v !== ref.sortedTokenIds[j]);
    assert.fail(
      `${what}: sorted_token_ids[${i}] = ${gpu.sorted[i]}, expected ${ref.sortedTokenIds[i]}`,
    );
  }
  if (!gpu.expertIds.every((v, i) => v === ref.expertIds[i])) {
    const i = gpu.expertIds.findIndex((v, j) => v !== ref.expertIds[j]);
    assert.fail(`${what}: expert_ids[${i}] = ${gpu.expertIds[i]}, expected ${ref.expertIds[i]}`);
  }
}

/** [M, topK] distinct random experts per token; `skew` crowds them onto low ids. */
function randomIds(rng: Rng, M: number, topK: number, E: number, skew = 0): Int32Array {
  const ids = new Int32Array(M * topK);
  const used = new Set<number>();
  for (let t = 0; t < M; t++) {
    used.clear();
    for (let k = 0; k < topK; k++) {
      let e: number;
      do {
        e = skew > 0 ? Math.min(E - 1, Math.floor(E * rng.next() ** (1 + skew))) : rng.int(E);
      } while (used.has(e) && used.size < E);
      used.add(e);
      ids[t * topK + k] = e;
    }
  }
  return ids;
}

gpuTest("moe_align_block_size equals the CPU reference entry for entry", () => {
  const rng = new Rng(2);
  let cases = 0;
  for (const E of ES) {
    const topK = Math.min(9, E);
    for (const M of [...MS, 1000, 65536]) {
      for (const blockM of M >= 4097 ? [16, 64] : [8, 16, 64, 128]) {
        checkAlign(randomIds(rng, M, topK, E), E, blockM, `E=${E} M=${M} bm=${blockM} uniform`);
        checkAlign(randomIds(rng, M, topK, E, 3), E, blockM, `E=${E} M=${M} bm=${blockM} skewed`);
        cases += 2;
      }
      // Every slot the same expert; every token the same experts; experts on other ranks.
      checkAlign(new Int32Array(M * topK).fill(E - 1), E, 16, `E=${E} M=${M} all one expert`);
      const first = randomIds(rng, 1, topK, E);
      const same = new Int32Array(M * topK).map((_, i) => first[i % topK]);
      checkAlign(same, E, 16, `E=${E} M=${M} same experts for every token`);
      const ep = randomIds(rng, M, topK, E).map((
        e,
        i,
      ) => (i % 5 === 0 ? -1 : i % 7 === 0 ? E + e : e));
      checkAlign(ep, E, 32, `E=${E} M=${M} ids -1 and >= E skipped`);
      cases += 3;
    }
  }
  // Around the one-launch limit (8192 slots), and no slots at all.
  for (const n of [0, 8191, 8192, 8193, 16384]) {
    checkAlign(randomIds(rng, n, 1, 257), 257, 16, `${n} slots`);
    cases++;
  }
  console.log(`${cases} layouts equal to moeAlignBlockSize`);
});

gpuTest("moe_align_block_size reproduces the golden moe_small layout", async () => {
  const f = await loadSafetensors(new URL("./fixtures/moe_small.safetensors", import.meta.url));
  const gpu = runAlign(f.i32("topk_ids"), 9, 16);
  const sorted = f.i32("sorted_token_ids");
  assert.deepEqual(gpu.sorted, sorted);
  assert.deepEqual(gpu.expertIds, f.i32("expert_ids"));
  assert.equal(gpu.ntpp, f.i32("num_tokens_post_padded")[0]);
});

function runQuant(bits: Uint16Array, M: number, K: number): { q: Uint8Array; scale: Float32Array } {
  using x = DeviceBuffer.from("bf16", [M, K], bits);
  using q = DeviceBuffer.alloc("fp8_e4m3", [M, K]);
  using scale = DeviceBuffer.alloc("f32", [M, K / 128]);
  quantizeFp8(x, { q, scale });
  return { q: q.download(), scale: scale.download() };
}

gpuTest("FP8 quantisation is bit-exact with the golden vectors and the CPU reference", async () => {
  const f = await loadSafetensors(new URL("./fixtures/quant.safetensors", import.meta.url));
  const golden = runQuant(f.bf16("x"), 6, 512);
  assert.deepEqual(golden.q, f.f8("q"));
  assert.deepEqual(golden.scale, f.f32("scale"));
  // zeroOut: the same codes, and the other buffer zeroed in the same pass.
  {
    using x = DeviceBuffer.from("bf16", [6, 512], f.bf16("x"));
    using q = DeviceBuffer.alloc("fp8_e4m3", [6, 512]);
    using scale = DeviceBuffer.alloc("f32", [6, 4]);
    using zeroOut = DeviceBuffer.alloc("bf16", [6, 512]);
    zeroOut.fill(0x5a);
    quantizeFp8(x, { q, scale, zeroOut });
    assert.deepEqual(q.download(), f.f8("q"));
    assert.ok(zeroOut.download().every((v) => v === 0));
    assert.throws(() => quantizeFp8(x, { q, scale, zeroOut: x }), /zeroOut must not be x/);
  }

  const rng = new Rng(4);
  for (const M of MS) {
    for (const K of M > 128 ? [1024] : [128, 7168]) {
      const values = new Float32Array(M * K);
      for (let i = 0; i < values.length; i++) {
        const group = Math.floor(i / 128);
        // Zero groups, tiny groups (fp8 subnormals), huge ones, and normal ones.
        const mag = group % 7 === 3 ? 0 : group % 7 === 4 ? 1e-6 : group % 7 === 5 ? 3e4 : 1;
        values[i] = mag * rng.normal();
      }
      const bits = encodeBf16(values);
      const gpu = runQuant(bits, M, K);
      const ref = quantizePerTokenGroup(decodeBf16(bits), M, K);
      assert.deepEqual(gpu.scale, ref.scale, `M=${M} K=${K}: scales`);
      assert.deepEqual(gpu.q, ref.q, `M=${M} K=${K}: codes`);
    }
  }
});

gpuTest("bad arguments are refused before anything is enqueued", () => {
  using logits = DeviceBuffer.alloc("f32", [4, 16]);
  using ids = DeviceBuffer.alloc("i32", [4, 2]);
  using w = DeviceBuffer.alloc("f32", [4, 2]);
  using wrong = DeviceBuffer.alloc("f32", [4, 3]);
  const softmax = { kind: "softmax", topK: 2 } as const;
  assert.throws(
    () => routeTopK(logits, softmax, { topkIds: ids, topkWeights: wrong }),
    /topkWeights is f32 \[4, 3\], expected f32 \[4, 2\]/,
  );
  assert.throws(
    () =>
      routeTopK(logits, { kind: "grouped", topK: 2, nGroup: 3, topkGroup: 1 }, {
        topkIds: ids,
        topkWeights: w,
      }),
    InvalidArgumentError,
  );
  using big = DeviceBuffer.alloc("f32", [1, 513]);
  using ids1 = DeviceBuffer.alloc("i32", [1, 2]);
  using w1 = DeviceBuffer.alloc("f32", [1, 2]);
  assert.throws(() => routeTopK(big, softmax, { topkIds: ids1, topkWeights: w1 }), /expert count/);
  // Native checks: the workspace of a large alignment.
  const n = 20000;
  using topk = DeviceBuffer.alloc("i32", [n]);
  const { sortedLen, numBlocks } = alignedSizes(n, 8, 16);
  using sorted = DeviceBuffer.alloc("i32", [sortedLen]);
  using short = DeviceBuffer.alloc("i32", [sortedLen - 1]);
  using eids = DeviceBuffer.alloc("i32", [numBlocks]);
  using ntpp = DeviceBuffer.alloc("i32", [1]);
  assert.throws(
    () =>
      alignBlockSize(topk, 8, 16, {
        sortedTokenIds: sorted,
        expertIds: eids,
        numTokensPostPadded: ntpp,
      }),
    (e: unknown) => e instanceof InvalidArgumentError && /workspace/.test(e.message),
  );
  assert.throws(
    () =>
      alignBlockSize(topk, 8, 16, {
        sortedTokenIds: short,
        expertIds: eids,
        numTokensPostPadded: ntpp,
      }),
    /sortedTokenIds is i32/,
  );
  assert.throws(() => alignWorkspaceBytes(10, 600), UnsupportedError);
  using x = DeviceBuffer.alloc("bf16", [2, 200]);
  using q = DeviceBuffer.alloc("fp8_e4m3", [2, 200]);
  using s = DeviceBuffer.alloc("f32", [2, 2]);
  assert.throws(() => quantizeFp8(x, { q, scale: s }), /multiple of 128/);
});
