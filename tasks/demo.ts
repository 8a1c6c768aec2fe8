/**
 * `deno task demo`: the main command. Runs one MoE layer end to end through `MoeLayer`.
 *
 * 1. Builds `build/libalpha_moe.so` if the sources changed (one line; skipped when
 *    `ALPHA_MOE_LIB` names a library or there is no nvcc).
 * 2. On a Hopper GPU: makes a layer (random FP8 experts of the chosen shape, or one layer of a
 *    checkpoint given by `--weights`), runs a batch of random tokens through it (routing,
 *    alignment, FP8 quantisation and the fused kernel, all on the GPU), prints each step's device
 *    time (median of a few forwards, L2 flushed before each) and the fused kernel's share, and
 *    checks sampled rows against the CPU reference of the whole layer (relative L2 <= 1e-2, else
 *    exit 1).
 * 3. Without one (or when the library cannot load): says so, runs the CPU reference of the whole
 *    layer on a small shape and prints a checksum and the row norms; exit 0.
 *
 * @module
 */
import { relative } from "node:path";
import { parseArgs } from "node:util";
import { bundledTableFile, configFromEnv } from "../src/config.ts";
import { type DeviceInfo, probeHopperGpu } from "../src/device.ts";
import { DeviceBuffer } from "../src/buffer.ts";
import { decodeBf16, encodeBf16 } from "../src/codecs.ts";
import { loadExperts } from "../src/checkpoint.ts";
import {
  type ExpertWeights,
  MoeLayer,
  moeLayerReference,
  type MoeLayerSpec,
  timeForward,
} from "../src/layer.ts";
import { fillRandomFp8, randomLogUniform, randomNormal, Rng } from "../src/random.ts";
import { relativeL2 } from "../src/reference.ts";
import type { RoutingMethod } from "../src/routing.ts";
import { LIBRARY_ENV } from "../ffi/library.ts";
import { buildLibrary, findNvcc } from "./nvcc.ts";

/** A layer shape: hidden size, this shard's intermediate size, experts and routing. */
interface Shape {
  hiddenSize: number;
  intermediateSize: number;
  numRoutedExperts: number;
  /** One more expert, the last, used by every token with weight 1. */
  sharedExpert: boolean;
  routing: RoutingMethod;
  routedScalingFactor: number;
}

const SHAPES: Readonly<Record<string, Shape>> = {
  // Qwen-style: softmax top-4 of 16 experts, renormalised.
  small: {
    hiddenSize: 1024,
    intermediateSize: 256,
    numRoutedExperts: 16,
    sharedExpert: false,
    routing: { kind: "softmax", topK: 4 },
    routedScalingFactor: 1,
  },
  // DeepSeek-V3/R1 on 8 GPUs: 256 routed experts + 1 shared, 8 + 1 per token, N = 2 x 128,
  // grouped sigmoid routing with correction bias, routed_scaling_factor 2.5.
  ds: {
    hiddenSize: 7168,
    intermediateSize: 128,
    numRoutedExperts: 256,
    sharedExpert: true,
    routing: { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 4 },
    routedScalingFactor: 2.5,
  },
};

/** The relative L2 error the check accepts (the kernel's output is bf16). */
const TOLERANCE = 1e-2;
/** Tokens of the CPU-only run. */
const CPU_TOKENS = 4;
/** Timed forwards on the GPU. */
const ITERATIONS = 20;

const HELP = `Usage: deno task demo [--m N] [--shape small|ds] [--seed N] [--rows N]
                      [--weights PATH --prefix P --rank R --world-size W]

Runs one FP8 MoE layer (W8A8, 128x128 block scales) end to end through MoeLayer: top-k routing,
moe_align_block_size, FP8 quantisation of the activations and the fused kernel, all on the GPU.
On a Hopper GPU: a batch of random tokens through the layer, each step timed (median of
${ITERATIONS} forwards, CUDA events, L2 flushed before each) and the output checked against the
CPU reference of the whole layer on sampled rows (relative L2 <= ${TOLERANCE}; exit 1 otherwise).
Without one: the CPU reference of the layer on a small shape (M=${CPU_TOKENS}, shape small), exit 0.
The library is built first when its sources changed (deno task build), unless ${LIBRARY_ENV} is set.

Options:
  --m N              tokens (default 64)
  --shape S          small: hidden 1024, 16 experts x intermediate 256, softmax top-4 (default)
                     ds:    hidden 7168, 256 experts x 128 + 1 shared, DeepSeek-V3 grouped
                            top-8 (8 groups, 4 kept), routed_scaling_factor 2.5
  --seed N           seed of the random weights and tokens (default 1)
  --rows N           rows checked against the CPU reference (default 8)
  --weights PATH     load the layer's experts from an FP8 checkpoint instead (a directory with
                     model.safetensors.index.json, an index, a .safetensors file); the routing
                     comes from config.json next to it when present, else from --shape
  --prefix P         the layer in the checkpoint (default model.layers.3)
  --rank R           tensor-parallel rank to load (default 0)
  --world-size W     tensor-parallel world size (default 1)
  -h, --help`;

function positiveInt(name: string, text: string): number {
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value) || value < 1) {
    throw new RangeError(`--${name} must be a positive integer, got ${JSON.stringify(text)}`);
  }
  return value;
}

function nonNegativeInt(name: string, text: string): number {
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value)) {
    throw new RangeError(`--${name} must be a non-negative integer, got ${JSON.stringify(text)}`);
  }
  return value;
}

function routingText(r: RoutingMethod): string {
  return r.kind === "softmax"
    ? `softmax top-${r.topK}`
    : `grouped sigmoid top-${r.topK} (${r.nGroup} groups, ${r.topkGroup} kept)`;
}

function shapeText(name: string, s: Shape): string {
  return `${name} (hidden ${s.hiddenSize}, ${s.numRoutedExperts} experts x intermediate ` +
    `${s.intermediateSize}${s.sharedExpert ? " + 1 shared" : ""}, ${routingText(s.routing)}` +
    `${s.routedScalingFactor !== 1 ? `, rsf ${s.routedScalingFactor}` : ""})`;
}

/** Builds build/libalpha_moe.so when needed; prints one line. false when the build failed. */
async function ensureLibrary(): Promise<boolean> {
  const fromEnv = Deno.env.get(LIBRARY_ENV);
  if (fromEnv) {
    console.log(`library: ${LIBRARY_ENV}=${fromEnv} (not built here)`);
    return true;
  }
  try {
    findNvcc();
  } catch {
    console.log("library: not built (nvcc not found); using one that is already built, if any");
    return true;
  }
  try {
    const result = await buildLibrary({ quiet: true });
    const shown = relative(Deno.cwd(), result.path);
    const path = shown.startsWith("..") ? result.path : shown;
    console.log(
      `library: ${result.built ? "built" : "up to date"} ${path} (${result.seconds.toFixed(1)} s)`,
    );
    return true;
  } catch (err) {
    console.error(`library: the build failed: ${err instanceof Error ? err.message : err}`);
    return false;
  }
}

/** `count` distinct rows spread evenly over 0..M-1 (first and last included). */
function sampleRows(M: number, count: number): number[] {
  const n = Math.min(count, M);
  if (n === 1) return [0];
  const rows = new Set<number>();
  for (let i = 0; i < n; i++) rows.add(Math.round((i * (M - 1)) / (n - 1)));
  return [...rows].sort((a, b) => a - b);
}

function pickRows(a: Float32Array, K: number, rows: readonly number[]): Float32Array {
  const out = new Float32Array(rows.length * K);
  rows.forEach((r, i) => out.set(a.subarray(r * K, (r + 1) * K), i * K));
  return out;
}

/** Random FP8 experts in checkpoint layout (codes ~ e4m3(50 Z), block scales in [1e-3, 1e-2]). */
function randomExperts(rng: Rng, s: Shape): ExpertWeights[] {
  const K = s.hiddenSize, I = s.intermediateSize;
  const count = s.numRoutedExperts + (s.sharedExpert ? 1 : 0);
  return Array.from({ length: count }, () => {
    const w13 = new Uint8Array(2 * I * K);
    fillRandomFp8(rng, w13, 50);
    const w2 = new Uint8Array(K * I);
    fillRandomFp8(rng, w2, 50);
    return {
      w13,
      w13Scale: randomLogUniform(rng, ((2 * I) / 128) * (K / 128), 1e-3, 1e-2),
      w2,
      w2Scale: randomLogUniform(rng, (K / 128) * (I / 128), 1e-3, 1e-2),
    };
  });
}

/** The layer's routing from a Hugging Face config.json (DeepSeek-V3 or Qwen MoE keys), if any. */
async function routingFromConfig(
  weights: string,
): Promise<{ routing: RoutingMethod; rsf: number } | undefined> {
  const dir = weights.endsWith(".json") || weights.endsWith(".safetensors")
    ? weights.slice(0, Math.max(0, weights.lastIndexOf("/"))) || "."
    : weights;
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(await Deno.readTextFile(`${dir}/config.json`));
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
  const num = (key: string): number | undefined =>
    typeof json[key] === "number" ? (json[key] as number) : undefined;
  const topK = num("num_experts_per_tok");
  if (topK === undefined) return undefined;
  const renormalize = json.norm_topk_prob === undefined ? true : Boolean(json.norm_topk_prob);
  const rsf = num("routed_scaling_factor") ?? 1;
  const nGroup = num("n_group");
  if (json.scoring_func === "sigmoid" || nGroup !== undefined) {
    return {
      routing: {
        kind: "grouped",
        topK,
        nGroup: nGroup ?? 1,
        topkGroup: num("topk_group") ?? nGroup ?? 1,
        renormalize,
      },
      rsf,
    };
  }
  return { routing: { kind: "softmax", topK, renormalize }, rsf };
}

interface WeightsOptions {
  path: string;
  prefix: string;
  rank: number;
  worldSize: number;
}

async function runOnGpu(
  info: DeviceInfo,
  shapeName: string,
  M: number,
  seed: number,
  rowCount: number,
  weights?: WeightsOptions,
): Promise<number> {
  console.log(`device: ${info.name} (${info.smCount} SMs)`);
  const rng = new Rng(seed);
  let shape = SHAPES[shapeName];
  let experts: ExpertWeights[];
  let bias: Float32Array | undefined;
  if (weights) {
    const fromConfig = await routingFromConfig(weights.path);
    const source = {
      source: weights.path,
      prefix: weights.prefix,
      rank: weights.rank,
      worldSize: weights.worldSize,
    };
    const loaded = await loadExperts(source);
    shape = {
      hiddenSize: loaded.hiddenSize,
      intermediateSize: loaded.intermediateSize,
      numRoutedExperts: loaded.numRoutedExperts,
      sharedExpert: loaded.sharedExpert,
      routing: fromConfig?.routing ?? shape.routing,
      routedScalingFactor: fromConfig?.rsf ?? shape.routedScalingFactor,
    };
    experts = loaded.experts;
    bias = shape.routing.kind === "grouped" ? loaded.correctionBias : undefined;
    console.log(
      `layer: ${weights.prefix} of ${weights.path}, rank ${weights.rank} of ` +
        `${weights.worldSize}: ${shapeText("checkpoint", shape)}` +
        `${bias ? ", correction bias" : ""}${fromConfig ? " (routing from config.json)" : ""}`,
    );
  } else {
    experts = randomExperts(rng, shape);
    bias = shape.routing.kind === "grouped"
      ? randomNormal(rng, shape.numRoutedExperts, 0, 0.05)
      : undefined;
    console.log(`layer: random FP8 experts, shape ${shapeText(shapeName, shape)}, seed ${seed}`);
  }
  const spec: MoeLayerSpec = { ...shape, correctionBias: bias };
  using layer = new MoeLayer({ ...spec, experts });
  const K = shape.hiddenSize, E = shape.numRoutedExperts;
  const hidden = encodeBf16(randomNormal(rng, M * K));
  const logits = randomNormal(rng, M * E);
  using h = DeviceBuffer.from("bf16", [M, K], hidden);
  using l = DeviceBuffer.from("f32", [M, E], logits);

  const config = layer.buffersFor(M).config;
  const c = `block_m=${config.blockM} block_n=${config.blockN} warp_n=${config.warpN} ` +
    `stages=${config.stages}`;
  const shapeKey = { numExperts: layer.numExperts, N: layer.N, K };
  const table = bundledTableFile(info, shapeKey);
  const source = configFromEnv(M)
    ? "ALPHA_MOE_CONFIG"
    : table
    ? `configs/${table.pathname.slice(table.pathname.lastIndexOf("/") + 1)}`
    : "built-in default";
  console.log(`tokens: M=${M}; kernel config ${c} (${source})`);

  // The checked forward.
  const out = decodeBf16(layer.forward(h, l).download());

  const t = timeForward(layer, h, l, { iterations: ITERATIONS });
  console.log(
    `steps (device time, median of ${ITERATIONS} forwards, L2 flushed before each; ` +
      `host enqueue ${t.hostUs.toFixed(0)} µs):`,
  );
  const names = {
    route: "route",
    align: "align",
    quantize: "quantize + zero",
    prologue: "route+align+quant",
    fused: "fused",
  };
  for (const s of t.steps) console.log(`  ${names[s].padEnd(18)} ${t[s].toFixed(1)} µs`);
  console.log(
    `fused kernel: ${t.fused.toFixed(1)} µs, ${(100 * t.fused / t.total).toFixed(0)} % of the ` +
      `${t.total.toFixed(1)} µs forward (outside the kernel: ${t.outside.toFixed(1)} µs); ` +
      `${t.whole.toFixed(1)} µs without events between the steps, ${t.graph.toFixed(1)} µs ` +
      `as a CUDA graph`,
  );

  const rows = sampleRows(M, rowCount);
  const ref = moeLayerReference({ ...spec, experts, M, hidden, routerLogits: logits, rows });
  const got = pickRows(out, K, rows);
  const want = pickRows(ref.out, K, rows);
  const nan = got.findIndex((v) => Number.isNaN(v));
  const err = nan >= 0 ? NaN : relativeL2(got, want);
  const ok = err <= TOLERANCE;
  console.log(
    `check: ${rows.length} of ${M} rows against the CPU reference of the layer: relative L2 ` +
      `${Number.isNaN(err) ? "NaN" : err.toExponential(2)} ${ok ? "<=" : "exceeds"} ` +
      `${TOLERANCE}: ${ok ? "ok" : "FAILED"}`,
  );
  return ok ? 0 : 1;
}

function runOnCpu(seed: number, reason: string): number {
  const shape = SHAPES.small;
  const M = CPU_TOKENS;
  console.log(
    `CPU reference of the layer (routing, alignment, quantisation, experts): shape ` +
      `${shapeText("small", shape)}, M=${M} tokens, seed ${seed} (--m, --shape, --rows and ` +
      `--weights apply to the GPU run)`,
  );
  const rng = new Rng(seed);
  const experts = randomExperts(rng, shape);
  const K = shape.hiddenSize;
  const hidden = encodeBf16(randomNormal(rng, M * K));
  const logits = randomNormal(rng, M * shape.numRoutedExperts);
  const started = performance.now();
  const { out } = moeLayerReference({ ...shape, experts, M, hidden, routerLogits: logits });
  const ms = performance.now() - started;
  let sum = 0;
  let sumAbs = 0;
  for (const v of out) {
    sum += v;
    sumAbs += Math.abs(v);
  }
  console.log(`  checksum: sum ${sum.toPrecision(8)}, sum|x| ${sumAbs.toPrecision(8)}`);
  for (let r = 0; r < M; r++) {
    let sq = 0;
    for (let k = 0; k < K; k++) sq += out[r * K + k] ** 2;
    console.log(`  row ${r}: L2 norm ${Math.sqrt(sq).toPrecision(6)}`);
  }
  console.log(`  (${ms.toFixed(0)} ms on the CPU)`);
  console.log(`no Hopper GPU: ran the CPU reference only (${reason})`);
  return 0;
}

/** Why the probe failed, in one line (the first attempt of a load error included). */
function oneLine(reason: string): string {
  const lines = reason.split("\n").map((l) => l.trim()).filter((l) => l !== "");
  if (lines.length > 1 && lines[0].endsWith("Tried:")) {
    return `${lines[0].replace(/\. Tried:$/, "")}: ${lines[1].replace(/^- /, "")}`;
  }
  return lines[0] ?? "unknown reason";
}

/** Parses the arguments and runs the demo; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  let m: number, seed: number, rows: number, shape: string;
  let weights: WeightsOptions | undefined;
  try {
    const { values } = parseArgs({
      args,
      options: {
        m: { type: "string", default: "64" },
        shape: { type: "string", default: "small" },
        seed: { type: "string", default: "1" },
        rows: { type: "string", default: "8" },
        weights: { type: "string" },
        prefix: { type: "string", default: "model.layers.3" },
        rank: { type: "string", default: "0" },
        "world-size": { type: "string", default: "1" },
        help: { type: "boolean", short: "h", default: false },
      },
      strict: true,
      allowPositionals: false,
    });
    if (values.help) {
      console.log(HELP);
      return 0;
    }
    m = positiveInt("m", values.m);
    rows = positiveInt("rows", values.rows);
    seed = Number(values.seed);
    if (!/^\d+$/.test(values.seed) || !Number.isSafeInteger(seed)) {
      throw new RangeError(`--seed must be a non-negative integer, got ${values.seed}`);
    }
    shape = values.shape;
    if (!(shape in SHAPES)) {
      throw new RangeError(`--shape must be one of ${Object.keys(SHAPES).join(", ")}: ${shape}`);
    }
    const worldSize = positiveInt("world-size", values["world-size"]);
    const rank = nonNegativeInt("rank", values.rank);
    if (rank >= worldSize) {
      throw new RangeError(`--rank must be below --world-size (${worldSize}), got ${rank}`);
    }
    if (values.weights !== undefined) {
      weights = { path: values.weights, prefix: values.prefix, rank, worldSize };
    }
  } catch (err) {
    console.error(`${(err as Error).message}\n\n${HELP}`);
    return 2;
  }

  console.log(
    "alpha-moe demo: one FP8 MoE layer (W8A8, 128x128 block scales) through MoeLayer",
  );
  if (!await ensureLibrary()) return 1;
  const probe = probeHopperGpu();
  if (!probe.ok) return runOnCpu(seed, oneLine(probe.reason));
  return await runOnGpu(probe.info, shape, m, seed, rows, weights);
}

if (import.meta.main) Deno.exit(await main(Deno.args));
