// The CPU reference of the routing (src/routing.ts) against the golden routing vectors, an
// independent sort-based formulation, ties, the shared slot and bad arguments. No GPU.
import assert from "node:assert/strict";
import { InvalidArgumentError } from "../ffi/errors.ts";
import { Rng } from "../src/random.ts";
import {
  alignedSizes,
  checkRouting,
  type GroupedRouting,
  routeTopKReference,
  routingWidth,
} from "../src/routing.ts";
import { loadSafetensorsSync } from "../src/safetensors.ts";

const golden = loadSafetensorsSync(new URL("./fixtures/routing.safetensors", import.meta.url));

function rows<T extends Int32Array | Float32Array>(a: T, width: number, t: number): T {
  return a.subarray(t * width, (t + 1) * width) as T;
}

Deno.test("softmax top-6 reproduces the golden routing (row 3: all ties)", () => {
  const logits = golden.f32("softmax_logits");
  const [M, E] = golden.get("softmax_logits").shape;
  const ids = golden.i32("softmax_ids");
  const weights = golden.f32("softmax_weights");
  const r = routeTopKReference(logits, M, E, { kind: "softmax", topK: 6 });
  assert.equal(r.width, 6);
  for (let t = 0; t < M; t++) {
    const got = rows(r.topkIds, 6, t);
    const want = rows(ids, 6, t);
    if (t === 3) {
      // Every logit is equal: any 6 distinct experts are right; ours are the lowest indexes.
      assert.ok(rows(logits, E, 3).every((v) => v === logits[3 * E]));
      assert.deepEqual([...got], [0, 1, 2, 3, 4, 5]);
      assert.equal(new Set(want).size, 6);
    } else {
      assert.deepEqual([...got], [...want], `row ${t}`);
    }
    for (let k = 0; k < 6; k++) {
      const d = Math.abs(r.topkWeights[t * 6 + k] - weights[t * 6 + k]);
      assert.ok(d <= 1e-6, `row ${t} slot ${k}: weight off by ${d}`);
    }
  }
});

Deno.test("DeepSeek-V3 grouped routing reproduces the golden routing", () => {
  const [M, E] = golden.get("ds_logits").shape;
  const r = routeTopKReference(
    golden.f32("ds_logits"),
    M,
    E,
    { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 4 },
    { bias: golden.f32("ds_bias") },
  );
  assert.deepEqual(r.topkIds, golden.i32("ds_ids"));
  const want = golden.f32("ds_weights");
  for (let i = 0; i < want.length; i++) {
    assert.ok(Math.abs(r.topkWeights[i] - want[i]) <= 1e-6, `slot ${i}`);
  }
});

/** The grouped routing written the way torch code writes it: sorts instead of rounds. */
function groupedBySorting(
  logits: Float32Array,
  bias: Float32Array,
  M: number,
  E: number,
  m: GroupedRouting,
): Int32Array {
  const out = new Int32Array(M * m.topK);
  const size = E / m.nGroup;
  const byValueThenIndex = (v: ArrayLike<number>) => (a: number, b: number): number =>
    v[b] - v[a] || a - b;
  for (let t = 0; t < M; t++) {
    const choice = new Float32Array(E);
    for (let e = 0; e < E; e++) {
      choice[e] = Math.fround(Math.fround(1 / (1 + Math.exp(-logits[t * E + e]))) + bias[e]);
    }
    const groupScore = new Float32Array(m.nGroup);
    for (let g = 0; g < m.nGroup; g++) {
      const members = [...choice.subarray(g * size, (g + 1) * size)].sort((a, b) => b - a);
      groupScore[g] = size >= 2 ? Math.fround(members[0] + members[1]) : members[0];
    }
    const groups = [...Array(m.nGroup).keys()].sort(byValueThenIndex(groupScore));
    const kept = new Set(groups.slice(0, m.topkGroup));
    const experts = [...Array(E).keys()].filter((e) => kept.has(Math.floor(e / size)))
      .sort(byValueThenIndex(choice));
    out.set(experts.slice(0, m.topK), t * m.topK);
  }
  return out;
}

Deno.test("grouped routing equals a sort-based formulation, ties included", () => {
  const rng = new Rng(7);
  for (
    const [E, nGroup, topkGroup, topK] of [[256, 8, 4, 8], [64, 4, 2, 6], [8, 4, 1, 2], [
      32,
      32,
      5,
      5,
    ], [257, 1, 1, 9]]
  ) {
    const M = 40;
    const logits = new Float32Array(M * E);
    // Half the rows from 4 distinct values only: plenty of exact ties in scores and groups.
    for (let i = 0; i < logits.length; i++) {
      logits[i] = i < logits.length / 2 ? rng.int(4) - 1.5 : 2 * rng.normal();
    }
    const bias = new Float32Array(E);
    for (let e = 0; e < E; e++) bias[e] = e % 3 === 0 ? 0 : 0.01 * rng.normal();
    const method: GroupedRouting = { kind: "grouped", topK, nGroup, topkGroup };
    const r = routeTopKReference(logits, M, E, method, { bias });
    assert.deepEqual(r.topkIds, groupedBySorting(logits, bias, M, E, method), `E=${E}`);
    for (let t = 0; t < M; t++) {
      const s = rows(r.topkWeights, topK, t).reduce((a, b) => a + b, 0);
      assert.ok(Math.abs(s - 1) < 1e-5, `E=${E} row ${t}: weights sum to ${s}`);
    }
  }
});

Deno.test("ties go to the lower index; NaN logits are never chosen before real ones", () => {
  const E = 8;
  const logits = Float32Array.from([1, 3, 3, 0, 3, NaN, 2, 3]);
  const r = routeTopKReference(logits, 1, E, { kind: "softmax", topK: 5 });
  assert.deepEqual([...r.topkIds], [1, 2, 4, 7, 6]);
  const same = routeTopKReference(new Float32Array(E).fill(0.5), 1, E, {
    kind: "grouped",
    topK: 3,
    nGroup: 4,
    topkGroup: 2,
  });
  assert.deepEqual([...same.topkIds], [0, 1, 2]); // groups 0 and 1 win the tie, then 0, 1, 2
  for (const w of same.topkWeights) assert.equal(w, Math.fround(1 / 3));
});

Deno.test("shared slot, weightScale and renormalize", () => {
  const rng = new Rng(3);
  const E = 16, M = 5;
  const logits = Float32Array.from({ length: M * E }, () => rng.normal());
  const method = { kind: "softmax", topK: 4, renormalize: false } as const;
  const plain = routeTopKReference(logits, M, E, method);
  const scaled = routeTopKReference(logits, M, E, method, {
    weightScale: 2.5,
    sharedExpert: { id: E, weight: 0.4 },
  });
  assert.equal(routingWidth(method, { id: E, weight: 0.4 }), 5);
  assert.equal(scaled.width, 5);
  for (let t = 0; t < M; t++) {
    assert.deepEqual([...rows(scaled.topkIds, 5, t)], [...rows(plain.topkIds, 4, t), E]);
    assert.equal(scaled.topkWeights[t * 5 + 4], Math.fround(0.4));
    for (let k = 0; k < 4; k++) {
      assert.equal(scaled.topkWeights[t * 5 + k], Math.fround(plain.topkWeights[t * 4 + k] * 2.5));
    }
    // Not renormalised: the softmax probabilities themselves, decreasing, summing below 1.
    const p = rows(plain.topkWeights, 4, t);
    let all = 0;
    for (let e = 0; e < E; e++) all += Math.exp(logits[t * E + e]);
    const top = Math.exp(logits[t * E + plain.topkIds[t * 4]]) / all;
    assert.ok(Math.abs(p[0] - top) < 1e-6);
    assert.ok(p[0] >= p[1] && p[1] >= p[2] && p[2] >= p[3]);
  }
  const renorm = routeTopKReference(logits, M, E, { kind: "softmax", topK: 4 });
  for (let t = 0; t < M; t++) {
    const s = rows(renorm.topkWeights, 4, t).reduce((a, b) => a + b, 0);
    assert.ok(Math.abs(s - 1) < 1e-6);
  }
});

Deno.test("routing arguments that do not fit are refused with the reason", () => {
  const bad = (f: () => unknown, re: RegExp): void => {
    assert.throws(f, (e: unknown) => e instanceof InvalidArgumentError && re.test(e.message));
  };
  bad(() => checkRouting({ kind: "softmax", topK: 9 }, 8), /topK must be an integer in 1\.\.8/);
  bad(() => checkRouting({ kind: "softmax", topK: 2 }, 513), /expert count/);
  bad(
    () => checkRouting({ kind: "grouped", topK: 2, nGroup: 3, topkGroup: 1 }, 8),
    /nGroup must divide/,
  );
  bad(
    () => checkRouting({ kind: "grouped", topK: 2, nGroup: 4, topkGroup: 5 }, 8),
    /topkGroup/,
  );
  bad(
    () => checkRouting({ kind: "grouped", topK: 5, nGroup: 4, topkGroup: 2 }, 8),
    /more than the 4 experts/,
  );
  bad(
    () => checkRouting({ kind: "softmax", topK: 2 }, 8, { sharedExpert: { id: 8, weight: NaN } }),
    /weight must be finite/,
  );
  bad(
    () => routeTopKReference(new Float32Array(10), 2, 8, { kind: "softmax", topK: 2 }),
    /logits has 10 elements/,
  );
  assert.deepEqual(alignedSizes(9, 257, 16), { sortedLen: 9 + 257 * 15, numBlocks: 242 });
});
