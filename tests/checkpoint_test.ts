// Loading experts from FP8 safetensors checkpoints the tests write (src/checkpoint.ts): single
// and split files, an index, tensor-parallel shards, and every refusal naming its tensor. No GPU.
import assert from "node:assert/strict";
import { Checkpoint, CheckpointError, type LoadedExperts, loadExperts } from "../src/checkpoint.ts";
import { encodeBf16 } from "../src/codecs.ts";
import { moeLayerReference, stackKernelWeights } from "../src/layer.ts";
import { Rng } from "../src/random.ts";
import { type SafetensorsTensorInput, writeSafetensors } from "../src/safetensors.ts";

const H = 256; // hidden
const I = 512; // intermediate: shards of 256 (ws 2) and 128 (ws 4) work, 64 (ws 8) does not
const E = 3; // routed experts
const PREFIX = "model.layers.5";

type Tensors = Record<string, SafetensorsTensorInput>;

interface Expert {
  gate: Uint8Array;
  up: Uint8Array;
  down: Uint8Array;
  gateScale: Float32Array;
  upScale: Float32Array;
  downScale: Float32Array;
}

function randomBytes(rng: Rng, n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = rng.int(256) & 0x7e; // no NaN codes
  return out;
}

function randomScales(rng: Rng, n: number): Float32Array {
  return Float32Array.from({ length: n }, () => 1e-3 + 1e-2 * rng.next());
}

function makeExpert(rng: Rng, inter = I): Expert {
  const ib = Math.ceil(inter / 128), hb = H / 128;
  return {
    gate: randomBytes(rng, inter * H),
    up: randomBytes(rng, inter * H),
    down: randomBytes(rng, H * inter),
    gateScale: randomScales(rng, ib * hb),
    upScale: randomScales(rng, ib * hb),
    downScale: randomScales(rng, hb * ib),
  };
}

function expertTensors(prefix: string, x: Expert, inter = I): Tensors {
  const ib = Math.ceil(inter / 128), hb = H / 128;
  return {
    [`${prefix}gate_proj.weight`]: { dtype: "F8_E4M3", shape: [inter, H], data: x.gate },
    [`${prefix}gate_proj.weight_scale_inv`]: { dtype: "F32", shape: [ib, hb], data: x.gateScale },
    [`${prefix}up_proj.weight`]: { dtype: "F8_E4M3", shape: [inter, H], data: x.up },
    [`${prefix}up_proj.weight_scale_inv`]: { dtype: "F32", shape: [ib, hb], data: x.upScale },
    [`${prefix}down_proj.weight`]: { dtype: "F8_E4M3", shape: [H, inter], data: x.down },
    [`${prefix}down_proj.weight_scale_inv`]: { dtype: "F32", shape: [hb, ib], data: x.downScale },
  };
}

const rng = new Rng(11);
const routed = Array.from({ length: E }, () => makeExpert(rng));
const shared = makeExpert(rng);
const bias = Float32Array.from({ length: E }, (_, e) => 0.1 * e - 0.05);

function layerTensors(): Tensors {
  const t: Tensors = {};
  routed.forEach((x, i) => Object.assign(t, expertTensors(`${PREFIX}.mlp.experts.${i}.`, x)));
  Object.assign(t, expertTensors(`${PREFIX}.mlp.shared_experts.`, shared));
  t[`${PREFIX}.mlp.gate.e_score_correction_bias`] = { dtype: "F32", shape: [E], data: bias };
  t[`${PREFIX}.mlp.gate.weight`] = {
    dtype: "BF16",
    shape: [E, H],
    data: new Uint16Array(E * H),
  };
  t["model.embed_tokens.weight"] = { dtype: "BF16", shape: [4, H], data: new Uint16Array(4 * H) };
  return t;
}

async function write(dir: string, name: string, tensors: Tensors): Promise<string> {
  const path = `${dir}/${name}`;
  await Deno.writeFile(path, writeSafetensors(tensors));
  return path;
}

/** Splits the tensors over two files by name parity, with an index. */
async function writeSplit(dir: string, tensors: Tensors): Promise<string> {
  const parts: [Tensors, Tensors] = [{}, {}];
  const weightMap: Record<string, string> = {};
  Object.keys(tensors).forEach((name, i) => {
    parts[i % 2][name] = tensors[name];
    weightMap[name] = `model-0000${(i % 2) + 1}-of-00002.safetensors`;
  });
  await write(dir, "model-00001-of-00002.safetensors", parts[0]);
  await write(dir, "model-00002-of-00002.safetensors", parts[1]);
  const index = `${dir}/model.safetensors.index.json`;
  await Deno.writeTextFile(index, JSON.stringify({ metadata: {}, weight_map: weightMap }));
  return index;
}

/** Checks the shard of rank `r` of `ws` against the source experts. */
function checkShard(got: LoadedExperts, r: number, ws: number): void {
  const S = I / ws, Sb = S / 128, Ib = I / 128, Hb = H / 128;
  assert.equal(got.intermediateSize, S);
  assert.equal(got.fullIntermediateSize, I);
  assert.equal(got.hiddenSize, H);
  assert.equal(got.experts.length, E + 1);
  [...routed, shared].forEach((x, e) => {
    const w = got.experts[e];
    assert.deepEqual(w.w13.subarray(0, S * H), x.gate.subarray(r * S * H, (r + 1) * S * H));
    assert.deepEqual(w.w13.subarray(S * H), x.up.subarray(r * S * H, (r + 1) * S * H));
    assert.deepEqual(
      w.w13Scale,
      Float32Array.from([
        ...x.gateScale.subarray(r * Sb * Hb, (r + 1) * Sb * Hb),
        ...x.upScale.subarray(r * Sb * Hb, (r + 1) * Sb * Hb),
      ]),
    );
    for (let h = 0; h < H; h++) {
      assert.deepEqual(
        w.w2.subarray(h * S, (h + 1) * S),
        x.down.subarray(h * I + r * S, h * I + (r + 1) * S),
        `expert ${e} down row ${h}`,
      );
    }
    for (let h = 0; h < Hb; h++) {
      assert.deepEqual(
        w.w2Scale.subarray(h * Sb, (h + 1) * Sb),
        x.downScale.subarray(h * Ib + r * Sb, h * Ib + (r + 1) * Sb),
      );
    }
  });
}

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "amoe_ckpt_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("one file: every expert, the shared one last, and the correction bias", async () => {
  await withDir(async (dir) => {
    const file = await write(dir, "model.safetensors", layerTensors());
    const got = await loadExperts({ source: file, prefix: PREFIX });
    assert.equal(got.numRoutedExperts, E);
    assert.equal(got.sharedExpert, true);
    assert.deepEqual(got.correctionBias, bias);
    checkShard(got, 0, 1);
    // The directory form finds model.safetensors; sharedExpert: false leaves it out.
    const noShared = await loadExperts({ source: dir, prefix: `${PREFIX}.`, sharedExpert: false });
    assert.equal(noShared.experts.length, E);
    assert.equal(noShared.sharedExpert, false);
    const two = await loadExperts({
      source: new URL(`file://${file}`),
      prefix: PREFIX,
      numExperts: 2,
    });
    assert.equal(two.experts.length, 3);
  });
});

Deno.test("split over files with an index: tensor-parallel shards for ws 2 and 4", async () => {
  await withDir(async (dir) => {
    const index = await writeSplit(dir, layerTensors());
    for (const ws of [2, 4]) {
      for (let r = 0; r < ws; r++) {
        checkShard(
          await loadExperts({ source: index, prefix: PREFIX, rank: r, worldSize: ws }),
          r,
          ws,
        );
      }
    }
    // The directory (index found there) and an explicit list of files give the same.
    const fromDir = await loadExperts({ source: dir, prefix: PREFIX, rank: 1, worldSize: 2 });
    checkShard(fromDir, 1, 2);
    const files = [
      `${dir}/model-00001-of-00002.safetensors`,
      `${dir}/model-00002-of-00002.safetensors`,
    ];
    checkShard(await loadExperts({ source: files, prefix: PREFIX, rank: 3, worldSize: 4 }), 3, 4);
    using ckpt = await Checkpoint.open(files);
    assert.ok((await ckpt.names()).includes("model.embed_tokens.weight"));
  });
});

Deno.test("the loaded shard runs through the layer's CPU reference", async () => {
  await withDir(async (dir) => {
    const file = await write(dir, "model.safetensors", layerTensors());
    const got = await loadExperts({ source: file, prefix: PREFIX, rank: 0, worldSize: 2 });
    const M = 3;
    const r = new Rng(5);
    const hidden = encodeBf16(Float32Array.from({ length: M * H }, () => r.normal()));
    const logits = Float32Array.from({ length: M * E }, () => r.normal());
    const spec = {
      hiddenSize: got.hiddenSize,
      intermediateSize: got.intermediateSize,
      numRoutedExperts: got.numRoutedExperts,
      sharedExpert: got.sharedExpert,
      routing: { kind: "grouped", topK: 2, nGroup: 1, topkGroup: 1 } as const,
      correctionBias: got.correctionBias,
      routedScalingFactor: 2.5,
    };
    const ref = moeLayerReference({
      ...spec,
      experts: got.experts,
      M,
      hidden,
      routerLogits: logits,
    });
    assert.equal(ref.out.length, M * H);
    assert.ok(ref.out.some((v) => v !== 0) && ref.out.every(Number.isFinite));
    for (let t = 0; t < M; t++) assert.equal(ref.topkIds[t * 3 + 2], E); // shared slot last
    const stacked = stackKernelWeights(got.experts, H, got.intermediateSize);
    assert.equal(stacked.w.length, (E + 1) * 2 * got.intermediateSize * H);
  });
});

async function refusal(
  tensors: Tensors,
  options: { rank?: number; worldSize?: number; sharedExpert?: boolean },
  tensor: string,
  message: RegExp,
): Promise<void> {
  await withDir(async (dir) => {
    const file = await write(dir, "model.safetensors", tensors);
    await assert.rejects(
      () => loadExperts({ source: file, prefix: PREFIX, ...options }),
      (e: unknown) => {
        assert.ok(e instanceof CheckpointError, `not a CheckpointError: ${e}`);
        assert.equal(e.tensor, tensor);
        assert.match(e.message, message);
        assert.ok(e.message.includes(tensor), `the message names ${tensor}: ${e.message}`);
        return true;
      },
    );
  });
}

Deno.test("a missing tensor is refused, naming it", async () => {
  const t = layerTensors();
  const name = `${PREFIX}.mlp.experts.1.up_proj.weight_scale_inv`;
  delete t[name];
  await refusal(t, {}, name, /not found/);
  // No experts at all under the prefix (a wrong prefix).
  const none: Tensors = { x: { dtype: "F32", shape: [1], data: new Float32Array(1) } };
  await refusal(none, {}, `${PREFIX}.mlp.experts.0.gate_proj.weight`, /prefix/);
  // sharedExpert: true when there is none.
  const noShared = layerTensors();
  for (const k of Object.keys(noShared)) if (k.includes("shared_experts")) delete noShared[k];
  await refusal(
    noShared,
    { sharedExpert: true },
    `${PREFIX}.mlp.shared_experts.gate_proj.weight`,
    /not found/,
  );
});

Deno.test("a wrong dtype is refused, naming the tensor", async () => {
  const t = layerTensors();
  const name = `${PREFIX}.mlp.experts.2.down_proj.weight`;
  t[name] = { dtype: "BF16", shape: [H, I], data: new Uint16Array(H * I) };
  await refusal(t, {}, name, /dtype BF16, expected F8_E4M3/);
  const s = layerTensors();
  const scale = `${PREFIX}.mlp.experts.0.gate_proj.weight_scale_inv`;
  s[scale] = { dtype: "BF16", shape: [I / 128, H / 128], data: new Uint16Array(8) };
  await refusal(s, {}, scale, /dtype BF16, expected F32/);
});

Deno.test("a wrong shape is refused, naming the tensor", async () => {
  const t = layerTensors();
  const name = `${PREFIX}.mlp.experts.1.gate_proj.weight`;
  t[name] = { dtype: "F8_E4M3", shape: [I, H + 128], data: new Uint8Array(I * (H + 128)) };
  await refusal(t, {}, name, /has shape \[512, 384\], expected \[512, 256\]/);
  const s = layerTensors();
  const scale = `${PREFIX}.mlp.experts.0.down_proj.weight_scale_inv`;
  s[scale] = { dtype: "F32", shape: [H / 128, I / 128 + 1], data: new Float32Array(10) };
  await refusal(s, {}, scale, /expected \[2, 4\]/);
  // A shared expert of another intermediate size cannot be one more expert slot.
  const u = layerTensors();
  Object.assign(u, expertTensors(`${PREFIX}.mlp.shared_experts.`, makeExpert(rng, 2 * I), 2 * I));
  await refusal(u, {}, `${PREFIX}.mlp.shared_experts.gate_proj.weight`, /shared expert must match/);
});

Deno.test("a shard that does not divide is refused, naming the tensor", async () => {
  const first = `${PREFIX}.mlp.experts.0.gate_proj.weight`;
  await refusal(layerTensors(), { worldSize: 3 }, first, /512 does not split over worldSize 3/);
  await refusal(
    layerTensors(),
    { worldSize: 8 },
    first,
    /512\/8 = 64 is not a positive multiple of 128/,
  );
  await assert.rejects(
    () => loadExperts({ source: "/nonexistent/ckpt", prefix: PREFIX }),
    CheckpointError,
  );
  await withDir(async (dir) => {
    const file = await write(dir, "model.safetensors", layerTensors());
    await assert.rejects(
      () => loadExperts({ source: file, prefix: PREFIX, rank: 2, worldSize: 2 }),
      /rank must be an integer in 0\.\.1/,
    );
  });
});
