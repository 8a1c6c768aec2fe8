// MoeLayer (src/layer.ts) against the CPU reference of the whole layer, the golden moe_small
// layer, scratch reuse, CUDA graph capture, the prologue path against the separate one,
// loading from a checkpoint and bad inputs. Needs a Hopper GPU; ignored elsewhere.
import assert from "node:assert/strict";
import { InvalidArgumentError } from "../ffi/errors.ts";
import { DeviceBuffer, liveDeviceBuffers } from "../src/buffer.ts";
import { decodeBf16, encodeBf16 } from "../src/codecs.ts";
import { loadExperts } from "../src/checkpoint.ts";
import { CudaGraph, Stream } from "../src/device.ts";
import {
  type ExpertWeights,
  FORWARD_STEPS,
  MoeLayer,
  moeLayerReference,
  type MoeLayerSpec,
  PROLOGUE_FORWARD_STEPS,
  PROLOGUE_MAX_TOKENS,
  stackKernelWeights,
  timeForward,
} from "../src/layer.ts";
import { fillRandomFp8, randomLogUniform, randomNormal, Rng } from "../src/random.ts";
import { relativeL2 } from "../src/reference.ts";
import { routeTopKReference } from "../src/routing.ts";
import { loadSafetensors, writeSafetensors } from "../src/safetensors.ts";
import { gpuTest } from "./_gpu.ts";

const TOLERANCE = 1e-2;

function randomExperts(rng: Rng, count: number, K: number, I: number): ExpertWeights[] {
  const N = 2 * I;
  return Array.from({ length: count }, () => {
    const w13 = new Uint8Array(N * K);
    fillRandomFp8(rng, w13, 50);
    const w2 = new Uint8Array(K * I);
    fillRandomFp8(rng, w2, 50);
    return {
      w13,
      w13Scale: randomLogUniform(rng, (N / 128) * (K / 128), 1e-3, 1e-2),
      w2,
      w2Scale: randomLogUniform(rng, (K / 128) * (I / 128), 1e-3, 1e-2),
    };
  });
}

interface Case {
  name: string;
  spec: MoeLayerSpec;
  Ms: number[];
}

const CASES: Case[] = [
  {
    name: "DeepSeek-like (grouped, bias, shared expert, rsf 2.5)",
    spec: {
      hiddenSize: 512,
      intermediateSize: 128,
      numRoutedExperts: 32,
      sharedExpert: true,
      routing: { kind: "grouped", topK: 6, nGroup: 8, topkGroup: 4 },
      routedScalingFactor: 2.5,
    },
    Ms: [1, 5, 128, 300],
  },
  {
    name: "Qwen-like (softmax top-4, renormalised)",
    spec: {
      hiddenSize: 384,
      intermediateSize: 256,
      numRoutedExperts: 24,
      routing: { kind: "softmax", topK: 4 },
    },
    Ms: [1, 33, 257],
  },
];

for (const c of CASES) {
  gpuTest(`MoeLayer = CPU reference within 1e-2 rel. L2: ${c.name}`, () => {
    const rng = new Rng(c.spec.numRoutedExperts);
    const { hiddenSize: K, intermediateSize: I, numRoutedExperts: E } = c.spec;
    const numExperts = E + (c.spec.sharedExpert ? 1 : 0);
    const experts = randomExperts(rng, numExperts, K, I);
    const bias = c.spec.routing.kind === "grouped"
      ? Float32Array.from({ length: E }, () => 0.1 * rng.normal())
      : undefined;
    const spec = { ...c.spec, correctionBias: bias };
    using layer = new MoeLayer({ ...spec, experts });
    const stacked = stackKernelWeights(experts, K, I);
    for (const M of c.Ms) {
      const hidden = encodeBf16(randomNormal(rng, M * K));
      const logits = randomNormal(rng, M * E, 0, 2);
      using h = DeviceBuffer.from("bf16", [M, K], hidden);
      using l = DeviceBuffer.from("f32", [M, E], logits);
      const out = layer.forward(h, l);
      layer.stream.synchronize();
      const got = decodeBf16(out.download());
      // Every row: the whole layer's relative L2 (single rows may be further off, where a
      // rounding difference flips an FP8 code of the re-quantised intermediate).
      const ref = moeLayerReference({
        ...spec,
        experts,
        stacked,
        M,
        hidden,
        routerLogits: logits,
      });
      // The routing the layer used is the reference's, id for id.
      const buffers = layer.buffersFor(M);
      assert.deepEqual(buffers.topkIds.download(), ref.topkIds, `M=${M}: routing`);
      const err = relativeL2(got, ref.out);
      let worst = 0;
      for (let t = 0; t < M; t++) {
        const row = (a: Float32Array): Float32Array => a.subarray(t * K, (t + 1) * K);
        worst = Math.max(worst, relativeL2(row(got), row(ref.out)));
      }
      console.log(
        `${c.name} M=${M} (block_m ${buffers.config.blockM}): rel L2 ${err.toExponential(2)}, ` +
          `worst row ${worst.toExponential(2)}`,
      );
      assert.ok(err <= TOLERANCE, `M=${M}: relative L2 ${err}`);
      assert.ok(got.every(Number.isFinite), `M=${M}: non-finite output`);
    }
  });
}

gpuTest("the DeepSeek-V3 shard shape (256 routed + 1 shared, N=256, K=7168)", () => {
  const rng = new Rng(257);
  const K = 7168, I = 128, E = 256, M = 3;
  const experts = randomExperts(rng, E + 1, K, I);
  const spec: MoeLayerSpec = {
    hiddenSize: K,
    intermediateSize: I,
    numRoutedExperts: E,
    sharedExpert: true,
    routing: { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 4 },
    correctionBias: Float32Array.from({ length: E }, () => 0.05 * rng.normal()),
    routedScalingFactor: 2.5,
  };
  using layer = new MoeLayer({ ...spec, experts });
  const hidden = encodeBf16(randomNormal(rng, M * K));
  const logits = randomNormal(rng, M * E);
  using h = DeviceBuffer.from("bf16", [M, K], hidden);
  using l = DeviceBuffer.from("f32", [M, E], logits);
  const got = decodeBf16(layer.forward(h, l).download());
  const ref = moeLayerReference({ ...spec, experts, M, hidden, routerLogits: logits });
  const err = relativeL2(got, ref.out);
  console.log(`DeepSeek shard M=${M}: rel L2 ${err.toExponential(2)}`);
  assert.ok(err <= TOLERANCE, `relative L2 ${err}`);
});

gpuTest("golden moe_small through MoeLayer.forwardRouted: <= 1 % of out_requant", async () => {
  const f = await loadSafetensors(new URL("./fixtures/moe_small.safetensors", import.meta.url));
  const [M, K] = f.get("x").shape;
  const [E, N] = f.get("w").shape;
  const topK = f.get("topk_ids").shape[1];
  const rsf = Number(f.metadata.rsf);
  const w = f.f8("w"), ws = f.f32("w_scale"), w2 = f.f8("w2"), w2s = f.f32("w2_scale");
  const kb = K / 128, nb = N / 128;
  const experts: ExpertWeights[] = Array.from({ length: E }, (_, e) => ({
    w13: w.slice(e * N * K, (e + 1) * N * K),
    w13Scale: ws.slice(e * nb * kb, (e + 1) * nb * kb),
    w2: w2.slice(e * K * (N / 2), (e + 1) * K * (N / 2)),
    w2Scale: w2s.slice(e * kb * (N / 256), (e + 1) * kb * (N / 256)),
  }));
  using layer = new MoeLayer({
    hiddenSize: K,
    intermediateSize: N / 2,
    numRoutedExperts: E - 1,
    sharedExpert: true,
    routing: { kind: "grouped", topK: topK - 1, nGroup: 1, topkGroup: 1 },
    routedScalingFactor: rsf,
    experts,
    config: { blockM: 16, blockN: 32, warpN: 8, stages: 3 },
  });
  using x = DeviceBuffer.from("bf16", [M, K], f.bf16("x"));
  using ids = DeviceBuffer.from("i32", [M, topK], f.i32("topk_ids"));
  using tw = DeviceBuffer.from("f32", [M, topK], f.f32("topk_weights"));
  const out = decodeBf16(layer.forwardRouted(x, ids, tw).download());
  const b = layer.buffersFor(M);
  assert.deepEqual(b.xq.download(), f.f8("x_q"));
  assert.deepEqual(b.xScale.download(), f.f32("x_scale"));
  assert.deepEqual(b.sortedTokenIds.download(), f.i32("sorted_token_ids"));
  const err = relativeL2(out, f.f32("out_requant"));
  console.log(`moe_small via MoeLayer: ${(err * 100).toFixed(2)} % of out_requant`);
  assert.ok(err <= TOLERANCE, `relative L2 ${err}`);
});

gpuTest("no allocation per forward at a seen M; a captured forward replays exactly", () => {
  const rng = new Rng(9);
  const K = 256, I = 128, E = 16, M = 40;
  const spec: MoeLayerSpec = {
    hiddenSize: K,
    intermediateSize: I,
    numRoutedExperts: E,
    sharedExpert: true,
    routing: { kind: "grouped", topK: 4, nGroup: 4, topkGroup: 2 },
    routedScalingFactor: 2,
  };
  using stream = new Stream();
  const experts = randomExperts(rng, E + 1, K, I);
  using layer = new MoeLayer({ ...spec, experts, stream });
  using h = DeviceBuffer.from("bf16", [M, K], encodeBf16(randomNormal(rng, M * K)));
  using l = DeviceBuffer.from("f32", [M, E], randomNormal(rng, M * E));
  const first = layer.forward(h, l).download();
  const live = liveDeviceBuffers();
  for (let i = 0; i < 5; i++) layer.forward(h, l);
  stream.synchronize();
  assert.equal(liveDeviceBuffers(), live, "a forward at a seen M allocated device memory");
  // Each output element sums 5 slots with bf16 atomics whose order may vary: compare within
  // bf16 rounding (the bitwise race check is tests/gpu_fused_moe_test.ts, with top_k = 1).
  const again = decodeBf16(layer.forward(h, l).download());
  assert.ok(relativeL2(again, decodeBf16(first)) < 1e-2);
  using out = DeviceBuffer.alloc("bf16", [M, K]);
  using graph = CudaGraph.capture(stream, () => layer.forward(h, l, { out }));
  out.fill(0x3f);
  graph.launch(stream);
  graph.launch(stream);
  stream.synchronize();
  const a = decodeBf16(out.download()), b = decodeBf16(first);
  assert.ok(relativeL2(a, b) < 1e-2, `graph replay differs: ${relativeL2(a, b)}`);
  // The prologue path captures and replays too.
  using out2 = DeviceBuffer.alloc("bf16", [M, K]);
  using graph2 = CudaGraph.capture(
    stream,
    () => layer.forward(h, l, { out: out2, path: "prologue" }),
  );
  out2.fill(0x3f);
  graph2.launch(stream);
  graph2.launch(stream);
  stream.synchronize();
  const c = decodeBf16(out2.download());
  assert.ok(relativeL2(c, b) < 1e-2, `prologue graph replay differs: ${relativeL2(c, b)}`);
  // New inputs between replays reach every step: on either path each launch after the first
  // starts while the one before it runs (programmatic launch) and must wait for its writes, not
  // read the last replay's. Checked against the CPU reference of the new inputs.
  const hidden2 = encodeBf16(randomNormal(rng, M * K));
  const logits2 = randomNormal(rng, M * E, 0, 2);
  h.upload(hidden2);
  l.upload(logits2);
  graph.launch(stream);
  graph2.launch(stream);
  stream.synchronize();
  const ref2 = moeLayerReference({ ...spec, experts, M, hidden: hidden2, routerLogits: logits2 });
  for (const [name, buffer] of [["separate", out], ["prologue", out2]] as const) {
    const got = decodeBf16(buffer.download());
    const err = relativeL2(got, ref2.out);
    assert.ok(err <= TOLERANCE, `${name} path, new inputs: relative L2 ${err}`);
  }
  // The steps are reported in order, on either path (M = 40: "auto" is the separate path).
  assert.equal(layer.pathFor(M), "separate");
  const steps: string[] = [];
  layer.forward(h, l, { onStep: (s) => steps.push(s) });
  assert.deepEqual(steps, ["route", "align", "quantize", "fused", "done"]);
  steps.length = 0;
  layer.forward(h, l, { onStep: (s) => steps.push(s), path: "prologue" });
  assert.deepEqual(steps, ["prologue", "fused", "done"]);
  // timeForward reports the path's steps, each timed (the figures themselves belong to
  // benchmarks: medians of a few samples need not add up exactly, so nothing here depends on them).
  for (const path of ["separate", "prologue"] as const) {
    for (const pace of ["device", "host"] as const) {
      const t = timeForward(layer, h, l, { iterations: 3, pace, path });
      assert.equal(t.path, path);
      assert.deepEqual(t.steps, path === "prologue" ? PROLOGUE_FORWARD_STEPS : FORWARD_STEPS);
      assert.ok(
        t.fused > 0 && t.outside > 0 && t.whole > 0 && t.graph > 0 && t.hostUs > 0,
        JSON.stringify(t),
      );
      assert.ok(t.steps.every((step) => t[step] > 0), JSON.stringify(t));
    }
  }
});

gpuTest("the prologue path equals the separate path, buffer for buffer", () => {
  const rng = new Rng(33);
  const cases: { spec: MoeLayerSpec; Ms: number[] }[] = [
    {
      spec: {
        hiddenSize: 7168,
        intermediateSize: 128,
        numRoutedExperts: 256,
        sharedExpert: true,
        routing: { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 4 },
        correctionBias: Float32Array.from({ length: 256 }, () => 0.05 * rng.normal()),
        routedScalingFactor: 2.5,
      },
      Ms: [1, 5, 32],
    },
    {
      spec: {
        hiddenSize: 384,
        intermediateSize: 128,
        numRoutedExperts: 24,
        routing: { kind: "softmax", topK: 4 },
      },
      Ms: [1, 17, 200],
    },
  ];
  for (const { spec, Ms } of cases) {
    const { hiddenSize: K, intermediateSize: I, numRoutedExperts: E } = spec;
    const numExperts = E + (spec.sharedExpert ? 1 : 0);
    const experts = randomExperts(rng, numExperts, K, I);
    using layer = new MoeLayer({ ...spec, experts });
    for (const M of Ms) {
      assert.equal(layer.pathFor(M), M <= PROLOGUE_MAX_TOKENS ? "prologue" : "separate");
      const hidden = encodeBf16(randomNormal(rng, M * K));
      const logits = randomNormal(rng, M * E, 0, 2);
      using h = DeviceBuffer.from("bf16", [M, K], hidden);
      using l = DeviceBuffer.from("f32", [M, E], logits);
      const b = layer.buffersFor(M);
      const snapshot = (): ArrayBufferView[] =>
        [b.topkIds, b.topkWeights, b.sortedTokenIds, b.expertIds, b.numTokensPostPadded, b.xq]
          .map((x) => x.download() as ArrayBufferView).concat([b.xScale.download()]);
      for (const x of [b.topkIds, b.sortedTokenIds, b.expertIds, b.xq, b.xScale]) x.fill(0xab);
      const separate = decodeBf16(layer.forward(h, l, { path: "separate" }).download());
      const before = snapshot();
      for (const x of [b.topkIds, b.sortedTokenIds, b.expertIds, b.xq, b.xScale]) x.fill(0xcd);
      const prologue = decodeBf16(layer.forward(h, l, { path: "prologue" }).download());
      const after = snapshot();
      before.forEach((x, i) => {
        const u = new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
        const v = new Uint8Array(after[i].buffer, after[i].byteOffset, after[i].byteLength);
        assert.deepEqual(v, u, `${spec.routing.kind} M=${M}: scratch buffer ${i} differs`);
      });
      // Same inputs to the fused kernel (checked above, byte for byte); it adds the slots into
      // bf16 in no fixed order, so the outputs agree within bf16 rounding of the partial sums
      // (2^-8 per addition; one token of 9 slots measured 5.2e-3 on an H100).
      const err = relativeL2(prologue, separate);
      assert.ok(err < 1e-2, `${spec.routing.kind} M=${M}: outputs differ by ${err}`);
      const ref = moeLayerReference({ ...spec, experts, M, hidden, routerLogits: logits });
      const refErr = relativeL2(prologue, ref.out);
      assert.ok(refErr <= 1e-2, `${spec.routing.kind} M=${M}: ${refErr} from the reference`);
      console.log(
        `${spec.routing.kind} M=${M} (auto: ${layer.pathFor(M)}): prologue = separate ` +
          `buffers; rel L2 to the reference ${refErr.toExponential(2)}`,
      );
      assert.ok(refErr <= TOLERANCE, `M=${M}: relative L2 ${refErr}`);
    }
  }
});

gpuTest(
  "MoeLayer.fromCheckpoint loads a tensor-parallel shard that matches the reference",
  async () => {
    const rng = new Rng(21);
    const H = 256, I = 512, E = 8, ws = 2, rank = 1, M = 7;
    const tensors: Record<
      string,
      { dtype: "F8_E4M3" | "F32"; shape: number[]; data: ArrayBufferView }
    > = {};
    const put = (p: string): void => {
      for (
        const [proj, shape] of [["gate_proj", [I, H]], ["up_proj", [I, H]], ["down_proj", [
          H,
          I,
        ]]] as const
      ) {
        const data = new Uint8Array(shape[0] * shape[1]);
        fillRandomFp8(rng, data, 50);
        tensors[`${p}${proj}.weight`] = { dtype: "F8_E4M3", shape: [...shape], data };
        const sshape = [shape[0] / 128, shape[1] / 128];
        tensors[`${p}${proj}.weight_scale_inv`] = {
          dtype: "F32",
          shape: sshape,
          data: randomLogUniform(rng, sshape[0] * sshape[1], 1e-3, 1e-2),
        };
      }
    };
    for (let e = 0; e < E; e++) put(`model.layers.1.mlp.experts.${e}.`);
    put("model.layers.1.mlp.shared_experts.");
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = {
      dtype: "F32",
      shape: [E],
      data: Float32Array.from({ length: E }, () => 0.1 * rng.normal()),
    };
    const dir = await Deno.makeTempDir({ prefix: "amoe_layer_" });
    try {
      await Deno.writeFile(`${dir}/model.safetensors`, writeSafetensors(tensors));
      const source = { source: dir, prefix: "model.layers.1", rank, worldSize: ws };
      const routing = { kind: "grouped", topK: 3, nGroup: 4, topkGroup: 2 } as const;
      using layer = await MoeLayer.fromCheckpoint(source, { routing, routedScalingFactor: 2.5 });
      assert.equal(layer.intermediateSize, I / ws);
      assert.equal(layer.numExperts, E + 1);
      const loaded = await loadExperts(source);
      const hidden = encodeBf16(randomNormal(rng, M * H));
      const logits = randomNormal(rng, M * E);
      using h = DeviceBuffer.from("bf16", [M, H], hidden);
      using l = DeviceBuffer.from("f32", [M, E], logits);
      const got = decodeBf16(layer.forward(h, l).download());
      const ref = moeLayerReference({
        hiddenSize: H,
        intermediateSize: I / ws,
        numRoutedExperts: E,
        sharedExpert: true,
        routing,
        correctionBias: loaded.correctionBias,
        routedScalingFactor: 2.5,
        experts: loaded.experts,
        M,
        hidden,
        routerLogits: logits,
      });
      const err = relativeL2(got, ref.out);
      console.log(`checkpoint shard ${rank}/${ws}: rel L2 ${err.toExponential(2)}`);
      assert.ok(err <= TOLERANCE, `relative L2 ${err}`);
      // The layer routed with the checkpoint's correction bias, as the reference did (and
      // the bias changes the routing of these tokens).
      assert.deepEqual(layer.buffersFor(M).topkIds.download(), ref.topkIds);
      const plain = routeTopKReference(logits, M, E, routing);
      assert.notDeepEqual(ref.topkIds.filter((_, i) => i % 4 !== 3), plain.topkIds);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

gpuTest("MoeLayer refuses bad inputs and experts never uploaded", () => {
  const spec: MoeLayerSpec = {
    hiddenSize: 256,
    intermediateSize: 128,
    numRoutedExperts: 4,
    routing: { kind: "softmax", topK: 2 },
  };
  using layer = new MoeLayer(spec);
  using h = DeviceBuffer.alloc("bf16", [3, 256]);
  using l = DeviceBuffer.alloc("f32", [3, 4]);
  assert.throws(() => layer.forward(h, l), /expert 0 was never uploaded/);
  const rng = new Rng(1);
  randomExperts(rng, 4, 256, 128).forEach((w, i) => layer.setExpert(i, w));
  using badH = DeviceBuffer.alloc("bf16", [3, 128]);
  assert.throws(
    () => layer.forward(badH, l),
    /hidden is bf16 \[3, 128\], expected bf16 \[M, 256\]/,
  );
  using badL = DeviceBuffer.alloc("f32", [3, 5]);
  assert.throws(() => layer.forward(h, badL), /routerLogits is f32 \[3, 5\]/);
  assert.throws(
    () => layer.setExpert(4, randomExperts(rng, 1, 256, 128)[0]),
    /expert index 4 is not in 0\.\.3/,
  );
  assert.throws(
    () => new MoeLayer({ ...spec, intermediateSize: 100 }),
    (e: unknown) => e instanceof InvalidArgumentError && /multiple of 128/.test(e.message),
  );
  assert.throws(
    () => layer.setExpert(0, { ...randomExperts(rng, 1, 256, 128)[0], w2: new Uint8Array(3) }),
    /w2 must be a Uint8Array/,
  );
  h.zero();
  l.zero();
  const out = decodeBf16(layer.forward(h, l).download());
  assert.ok(out.every((v) => v === 0)); // zero input, zero output
});
