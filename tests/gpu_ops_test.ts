// The steps before the fused kernel on the GPU (src/routing.ts): routing, moe_align_block_size
// and FP8 quantisation against their CPU references on random inputs (ties and degenerate
// routings included) and against the golden vectors; the single-launch prologue against the
// three separate kernels (bit for bit) and the references. Needs a Hopper GPU; ignored
// elsewhere.
import assert from "node:assert/strict";
import { InvalidArgumentError, UnsupportedError, unwrap } from "../ffi/errors.ts";
import { symbols } from "../ffi/library.ts";
import { DeviceBuffer } from "../src/buffer.ts";
import { decodeBf16, encodeBf16 } from "../src/codecs.ts";
import { moeAlignBlockSize, quantizePerTokenGroup } from "../src/reference.ts";
import { Rng } from "../src/random.ts";
import {
  alignBlockSize,
  alignedSizes,
  alignWorkspaceBytes,
  MAX_PROLOGUE_SLOTS,
  moePrologue,
  quantizeFp8,
  routeTopK,
  routeTopKReference,
  type RoutingMethod,
  type SharedExpertSlot,
} from "../src/routing.ts";
import { loadSafetensors } from "../src/safetensors.ts";
import { gpuTest } from "./_gpu.ts";

const MS = [1, 3, 5, 128, 4097];
const ES = [8, 257, 512];
const ROUTING_ES = [...ES, 256]; // 256: DeepSeek-V3's groups of 32

/** Logits whose sigmoids sit at the edges: 0 and 1 exactly, float denormals, the clamps
 * (finite: an infinite logit makes the softmax NaN). */
const EXTREME_LOGITS = [
  -3e38,
  3e38,
  -800,
  800,
  -110.5,
  110.5,
  -104.5,
  -103.9,
  -103.2,
  103.2,
  -88.7,
  88.7,
  -40.5,
  40.5,
  -37.5,
  37.5,
  -16.6,
  16.6,
  1e-40,
  -1e-40,
];

/** Logits with many exact ties (rows from 3 values), some rows all equal, rows of extremes,
 * the rest normal. */
function tieLogits(rng: Rng, M: number, E: number): Float32Array {
  const out = new Float32Array(M * E);
  for (let t = 0; t < M; t++) {
    const kind = t % 5;
    for (let e = 0; e < E; e++) {
      out[t * E + e] = kind === 0 ? rng.int(3) - 1 : kind === 1
        ? 0.25 // every expert equal
        : kind === 4
        ? EXTREME_LOGITS[(e + t) % EXTREME_LOGITS.length]
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
    : E === 256 // groups of 32, scored by warp reductions
    ? { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 4 }
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
  for (const E of ROUTING_ES) {
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
  // Around the one-warp limit (32 slots) and the one-launch limit (8192), and no slots at all.
  for (const n of [0, 31, 32, 33, 8191, 8192, 8193, 16384]) {
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

// ---- the single-launch prologue (routing + alignment + quantisation + zeroing) ----

const PROLOGUE_MS = [1, 3, 5, 128, 400];

/** The layouts' expert counts (routed + a shared expert when there is one), and the routing
 * methods of each routed count: grouped ones that exercise groups of one, of 32 and of more
 * than 32 (73: past a warp), one group, and every group kept. */
function prologueMethods(routed: number): RoutingMethod[] {
  const grouped: Record<number, RoutingMethod[]> = {
    8: [{ kind: "grouped", topK: 3, nGroup: 4, topkGroup: 2 }],
    7: [{ kind: "grouped", topK: 3, nGroup: 7, topkGroup: 4 }],
    257: [{ kind: "grouped", topK: 8, nGroup: 1, topkGroup: 1 }],
    256: [
      { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 4 },
      { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 8 },
    ],
    512: [{ kind: "grouped", topK: 8, nGroup: 16, topkGroup: 4 }],
    511: [{ kind: "grouped", topK: 8, nGroup: 7, topkGroup: 3 }],
  };
  const g = grouped[routed];
  return [
    { kind: "softmax", topK: Math.min(6, routed) },
    { kind: "softmax", topK: 2, renormalize: false },
    ...g,
    { ...g[0], renormalize: false },
  ];
}

interface StepsOut {
  ids: Int32Array;
  weights: Float32Array;
  sorted: Int32Array;
  expertIds: Int32Array;
  ntpp: number;
  q: Uint8Array;
  scale: Float32Array;
  zeroed: boolean;
}

/** Runs the prologue, or the three separate steps, on fresh buffers full of garbage. */
function runSteps(
  prologue: boolean,
  logits: DeviceBuffer<"f32">,
  x: DeviceBuffer<"bf16">,
  method: RoutingMethod,
  numExperts: number,
  blockM: number,
  options: { bias?: DeviceBuffer<"f32">; weightScale?: number; sharedExpert?: SharedExpertSlot },
): StepsOut {
  const [M, K] = x.shape;
  const width = method.topK + (options.sharedExpert ? 1 : 0);
  const { sortedLen, numBlocks } = alignedSizes(M * width, numExperts, blockM);
  using topkIds = DeviceBuffer.alloc("i32", [M, width]);
  using topkWeights = DeviceBuffer.alloc("f32", [M, width]);
  using sortedTokenIds = DeviceBuffer.alloc("i32", [sortedLen]);
  using expertIds = DeviceBuffer.alloc("i32", [numBlocks]);
  using numTokensPostPadded = DeviceBuffer.alloc("i32", [1]);
  using q = DeviceBuffer.alloc("fp8_e4m3", [M, K]);
  using scale = DeviceBuffer.alloc("f32", [M, K / 128]);
  using zeroOut = DeviceBuffer.alloc("bf16", [M, K]);
  for (
    const b of [topkIds, topkWeights, sortedTokenIds, expertIds, numTokensPostPadded, q, scale]
  ) {
    b.fill(0xab); // garbage: every entry must be written
  }
  zeroOut.fill(0x5a);
  if (prologue) {
    moePrologue(logits, x, method, {
      topkIds,
      topkWeights,
      sortedTokenIds,
      expertIds,
      numTokensPostPadded,
      q,
      scale,
      zeroOut,
    }, { ...options, numExperts, blockM });
  } else {
    routeTopK(logits, method, { topkIds, topkWeights }, options);
    const ws = alignWorkspaceBytes(M * width, numExperts);
    using workspace = ws > 0 ? DeviceBuffer.alloc("i32", [ws / 4]) : undefined;
    alignBlockSize(topkIds, numExperts, blockM, {
      sortedTokenIds,
      expertIds,
      numTokensPostPadded,
      workspace,
    });
    quantizeFp8(x, { q, scale, zeroOut });
  }
  return {
    ids: topkIds.download(),
    weights: topkWeights.download(),
    sorted: sortedTokenIds.download(),
    expertIds: expertIds.download(),
    ntpp: numTokensPostPadded.download()[0],
    q: q.download(),
    scale: scale.download(),
    zeroed: zeroOut.download().every((v) => v === 0),
  };
}

function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

function assertBitEqual(a: ArrayBufferView, b: ArrayBufferView, what: string): void {
  const x = bytesOf(a), y = bytesOf(b);
  assert.equal(x.length, y.length, `${what}: lengths`);
  const i = x.findIndex((v, j) => v !== y[j]);
  if (i >= 0) assert.fail(`${what}: byte ${i} differs (${x[i]} vs ${y[i]})`);
}

gpuTest("the prologue equals the separate kernels bit for bit, and the CPU references", () => {
  const rng = new Rng(11);
  let cases = 0, exactWeights = 0, slots = 0;
  for (const total of ES) {
    for (const shared of [false, true]) {
      const routed = shared ? total - 1 : total;
      const bias = Float32Array.from({ length: routed }, () => 0.05 * rng.normal());
      using biasBuf = DeviceBuffer.from("f32", [routed], bias);
      for (const M of PROLOGUE_MS) {
        const K = M >= 128 ? 256 : 512;
        const logits = prologueLogits(rng, M, routed);
        const xs = new Float32Array(M * K).map((_, i) =>
          (Math.floor(i / 128) % 5 === 2 ? 0 : 1) *
          rng.normal()
        );
        const xBits = encodeBf16(xs);
        using l = DeviceBuffer.from("f32", [M, routed], logits);
        using x = DeviceBuffer.from("bf16", [M, K], xBits);
        const quant = quantizePerTokenGroup(decodeBf16(xBits), M, K);
        for (const method of prologueMethods(routed)) {
          const width = method.topK + (shared ? 1 : 0);
          if (M * width > MAX_PROLOGUE_SLOTS) continue;
          const grouped = method.kind === "grouped";
          const sharedExpert = shared ? { id: routed, weight: 0.4 } : undefined;
          const options = { bias: grouped ? biasBuf : undefined, weightScale: 1.5, sharedExpert };
          const blockM = M >= 128 ? 64 : 16;
          const what = `E=${total} (${routed} routed${shared ? " + shared" : ""}) M=${M} ` +
            JSON.stringify(method);
          const one = runSteps(true, l, x, method, total, blockM, options);
          const three = runSteps(false, l, x, method, total, blockM, options);
          for (const k of ["ids", "weights", "sorted", "expertIds", "q", "scale"] as const) {
            assertBitEqual(one[k], three[k], `${what}: ${k}, prologue vs separate`);
          }
          assert.equal(one.ntpp, three.ntpp, `${what}: num_tokens_post_padded`);
          assert.ok(one.zeroed && three.zeroed, `${what}: zeroOut not zeroed`);
          // The CPU references: ids, layout and quantisation exactly, weights as the routing
          // test does (the double-precision exp may differ from Math.exp in the last bit).
          const ref = routeTopKReference(logits, M, routed, method, {
            bias: grouped ? bias : undefined,
            weightScale: 1.5,
            sharedExpert,
          });
          assert.deepEqual(one.ids, ref.topkIds, `${what}: ids vs reference`);
          for (let i = 0; i < one.weights.length; i++) {
            const a = one.weights[i], b = ref.topkWeights[i];
            if (Number.isNaN(a) && Number.isNaN(b)) continue; // a NaN logit's expert picked
            const d = Math.abs(a - b);
            assert.ok(d <= 1e-6 * Math.max(1, Math.abs(b)), `${what}: slot ${i}: ${a} vs ${b}`);
            if (d === 0) exactWeights++;
          }
          slots += one.weights.length;
          const aligned = moeAlignBlockSize(ref.topkIds, total, blockM);
          assert.equal(one.ntpp, aligned.numTokensPostPadded, `${what}: ntpp vs reference`);
          assertBitEqual(one.sorted, aligned.sortedTokenIds, `${what}: sorted vs reference`);
          assertBitEqual(one.expertIds, aligned.expertIds, `${what}: expert_ids vs reference`);
          assertBitEqual(one.q, quant.q, `${what}: codes vs reference`);
          assertBitEqual(one.scale, quant.scale, `${what}: scales vs reference`);
          cases++;
        }
      }
    }
  }
  console.log(
    `${cases} cases: prologue = separate kernels bit for bit; = CPU references ` +
      `(${exactWeights}/${slots} weights bit-equal, all within 1e-6)`,
  );
});

// Groups of 32 experts and up to 8 tokens take the prologue's block-wide routing
// (route_grouped_block); the separate kernel routes a warp per token. 9 and 16 tokens: past the
// block's limit, the prologue's warps too. Logits with ties, NaN and -0 (prologueLogits).
gpuTest("the block's routing of groups of 32 equals a warp per token, bit for bit", () => {
  const rng = new Rng(13);
  let cases = 0;
  for (const routed of [64, 96, 256]) {
    const nGroup = routed / 32;
    const bias = Float32Array.from({ length: routed }, () => 0.05 * rng.normal());
    using biasBuf = DeviceBuffer.from("f32", [routed], bias);
    const methods: RoutingMethod[] = [
      { kind: "grouped", topK: 8, nGroup, topkGroup: Math.max(1, nGroup >> 1) },
      { kind: "grouped", topK: 6, nGroup, topkGroup: nGroup },
      { kind: "grouped", topK: 4, nGroup, topkGroup: 1, renormalize: false },
    ];
    for (const shared of [false, true]) {
      const total = routed + (shared ? 1 : 0);
      for (const M of [1, 2, 7, 8, 9, 16]) {
        const K = 256;
        const logits = prologueLogits(rng, M, routed);
        const xs = Float32Array.from({ length: M * K }, () => rng.normal());
        using l = DeviceBuffer.from("f32", [M, routed], logits);
        using x = DeviceBuffer.from("bf16", [M, K], encodeBf16(xs));
        for (const method of methods) {
          const sharedExpert = shared ? { id: routed, weight: 0.4 } : undefined;
          const options = { bias: biasBuf, weightScale: 1.5, sharedExpert };
          const what = `E=${total} M=${M} ${JSON.stringify(method)}`;
          const one = runSteps(true, l, x, method, total, 16, options);
          const three = runSteps(false, l, x, method, total, 16, options);
          for (const k of ["ids", "weights", "sorted", "expertIds"] as const) {
            assertBitEqual(one[k], three[k], `${what}: ${k}, prologue vs separate`);
          }
          const ref = routeTopKReference(logits, M, routed, method, {
            bias,
            weightScale: 1.5,
            sharedExpert,
          });
          assert.deepEqual(one.ids, ref.topkIds, `${what}: ids vs reference`);
          cases++;
        }
      }
    }
  }
  console.log(`${cases} cases: the block's routing = a warp per token, bit for bit`);
});

gpuTest("the prologue at the DeepSeek shard shape, and its limits", () => {
  const rng = new Rng(12);
  const routed = 256, total = 257, K = 7168;
  const method = { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 4 } as const;
  using bias = DeviceBuffer.from(
    "f32",
    [routed],
    Float32Array.from({ length: routed }, () => 0.05 * rng.normal()),
  );
  const sharedExpert = { id: routed, weight: 1 / 2.5 };
  for (const M of [1, 2, 16, 17, 32, 455]) {
    using l = DeviceBuffer.from("f32", [M, routed], randomLogitsRows(rng, M, routed));
    using x = DeviceBuffer.from("bf16", [M, K], encodeBf16(randomRows(rng, M * K)));
    const options = { bias, sharedExpert };
    const one = runSteps(true, l, x, method, total, 16, options);
    const three = runSteps(false, l, x, method, total, 16, options);
    for (const k of ["ids", "weights", "sorted", "expertIds", "q", "scale"] as const) {
      assertBitEqual(one[k], three[k], `M=${M}: ${k}, prologue vs separate`);
    }
    assert.equal(one.ntpp, three.ntpp);
    assert.ok(one.zeroed);
  }
  // More than MAX_PROLOGUE_SLOTS slots: refused (455 * 9 = 4095 fits, 456 * 9 does not).
  using l = DeviceBuffer.alloc("f32", [456, routed]);
  using x = DeviceBuffer.alloc("bf16", [456, 128]);
  assert.throws(
    () => runSteps(true, l, x, method, total, 16, { bias, sharedExpert }),
    (e: unknown) => e instanceof UnsupportedError && /4104 slots/.test(e.message),
  );
  // A bias with softmax routing, a layout of more than 512 experts, a wrong hidden shape.
  using l1 = DeviceBuffer.alloc("f32", [1, routed]);
  using x1 = DeviceBuffer.alloc("bf16", [1, 128]);
  assert.throws(
    () => runSteps(true, l1, x1, { kind: "softmax", topK: 2 }, total, 16, { bias }),
    /bias applies to grouped routing only/,
  );
  assert.throws(
    () => runSteps(true, l1, x1, method, 513, 16, { bias }),
    /numExperts must be an integer in 1\.\.512/,
  );
  using x2 = DeviceBuffer.alloc("bf16", [2, 128]);
  using ids = DeviceBuffer.alloc("i32", [1, 8]);
  using w = DeviceBuffer.alloc("f32", [1, 8]);
  using sorted = DeviceBuffer.alloc("i32", [8 + 257 * 15]);
  using eids = DeviceBuffer.alloc("i32", [258]);
  using ntpp = DeviceBuffer.alloc("i32", [1]);
  using q = DeviceBuffer.alloc("fp8_e4m3", [1, 128]);
  using s = DeviceBuffer.alloc("f32", [1, 1]);
  const bufs = {
    topkIds: ids,
    topkWeights: w,
    sortedTokenIds: sorted,
    expertIds: eids,
    numTokensPostPadded: ntpp,
    q,
    scale: s,
  };
  assert.throws(
    () => moePrologue(l1, x2, method, bufs, { numExperts: total, blockM: 16, bias }),
    /hidden is bf16 \[2, 128\], logits has 1 rows/,
  );
  moePrologue(l1, x1, method, bufs, { numExperts: total, blockM: 16, bias }); // the same, fitting
  unwrap(symbols().amoe_device_synchronize());
});

gpuTest("the prologue's native checks refuse what the wrapper would", () => {
  const fn = symbols().amoe_moe_prologue;
  assert.ok(fn !== null, "the library lacks amoe_moe_prologue: rebuild it");
  using l = DeviceBuffer.alloc("f32", [1, 16]);
  using ids = DeviceBuffer.alloc("i32", [1, 2]);
  using w = DeviceBuffer.alloc("f32", [1, 2]);
  using sorted = DeviceBuffer.alloc("i32", [64]);
  using eids = DeviceBuffer.alloc("i32", [16]);
  using ntpp = DeviceBuffer.alloc("i32", [1]);
  using x = DeviceBuffer.alloc("bf16", [1, 128]);
  using q = DeviceBuffer.alloc("fp8_e4m3", [1, 128]);
  using s = DeviceBuffer.alloc("f32", [1, 1]);
  const call = (method: number, K: number, sortedLen: number, bias: Deno.PointerValue): number =>
    fn!(
      method,
      l.pointer,
      bias,
      1,
      16,
      1,
      1,
      2,
      1,
      1,
      -1,
      0,
      ids.pointer,
      w.pointer,
      16,
      4,
      sorted.pointer,
      sortedLen,
      eids.pointer,
      16,
      ntpp.pointer,
      x.pointer,
      K,
      q.pointer,
      s.pointer,
      null,
      null,
    );
  assert.throws(() => unwrap(call(2, 128, 64, null)), /method must be/);
  assert.throws(() => unwrap(call(0, 128, 64, l.pointer)), /bias applies to grouped routing/);
  assert.throws(() => unwrap(call(0, 100, 64, null)), /multiple of 128/);
  assert.throws(() => unwrap(call(0, 128, 40, null)), /sorted_token_ids has 40 entries/);
  unwrap(call(0, 128, 64, null));
  unwrap(call(1, 128, 64, null));
  unwrap(symbols().amoe_device_synchronize());
});

/** Logits with exact ties (rows from 3 values, rows all equal), rows of -0 with NaNs, and
 * normal rows. */
function prologueLogits(rng: Rng, M: number, E: number): Float32Array {
  const out = new Float32Array(M * E);
  for (let t = 0; t < M; t++) {
    const kind = t % 5;
    for (let e = 0; e < E; e++) {
      out[t * E + e] = kind === 0
        ? rng.int(3) - 1
        : kind === 1
        ? 0.25
        : kind === 2
        ? (e % 7 === 3 ? NaN : -0)
        : 2 * rng.normal();
    }
  }
  return out;
}

/** Normal logits with a few exact ties per row. */
function randomLogitsRows(rng: Rng, M: number, E: number): Float32Array {
  const out = new Float32Array(M * E);
  for (let i = 0; i < out.length; i++) out[i] = i % 11 === 0 ? 0.5 : rng.normal();
  return out;
}

function randomRows(rng: Rng, n: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = rng.normal();
  return out;
}
