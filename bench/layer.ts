/**
 * `deno task bench:layer`: times one MoeLayer forward per step with CUDA events recorded between
 * the steps, on the DeepSeek-V3 shard shape (256 routed experts + 1 shared, N = 256, K = 7168,
 * top-8 of 8 groups keeping 4, plus the shared slot), and prints the time spent outside the
 * fused kernel (target: at most 15 us at M = 1). Each path of the steps before the kernel is
 * timed (`--path`): "separate" (route, align, quantise (which also zeroes the output): three
 * launches) and "prologue" (the three in one launch, what the layer takes for small batches).
 *
 * Two modes:
 * - device: a 1 GiB memset is queued before each forward (it also flushes the L2 cache), so the
 *   host has enqueued the whole forward before the device reaches it and the intervals are
 *   device time, steps back to back (what a CUDA graph or a busy stream gets);
 * - host-paced: the L2 is flushed and the stream drained before each forward, so the device
 *   waits for the host between steps and the intervals include the host's launch overhead.
 * It also prints the host time of one `forward()` call (enqueueing only).
 *
 * (Events recorded inside a CUDA graph capture are not timing records with
 * `amoe_event_record`, so the graph path is not timed here.)
 *
 * @module
 */
import { parseArgs } from "node:util";
import { DeviceBuffer } from "../src/buffer.ts";
import { encodeBf16 } from "../src/codecs.ts";
import { deviceInfo } from "../src/device.ts";
import { type ForwardPath, MoeLayer, timeForward } from "../src/layer.ts";
import { prologueFits } from "../src/routing.ts";
import { fillRandomFp8, randomLogUniform, randomNormal, Rng } from "../src/random.ts";
import { Timer } from "../src/timing.ts";
import { configKey } from "../src/tune.ts";
import { benchPreamble, intList, oneOf, positiveInt, runBench } from "./_cli.ts";

const HELP = `Usage: deno task bench:layer [options]
  --m LIST          token counts (default 1)
  --path P          both (default), auto, prologue or separate: the path(s) of the steps
                    before the fused kernel to time (auto: the one MoeLayer picks for M)
  --iterations N    timed forwards per mode (default 200)
  --json FILE       write the medians as JSON
  -h, --help

Shape: DeepSeek-V3 shard, 256 routed experts + 1 shared, N=256 (intermediate 128), K=7168,
grouped routing top-8 (n_group 8, topk_group 4), routed_scaling_factor 2.5.`;

const K = 7168, I = 128, E = 256;
const PATHS = ["both", "auto", "prologue", "separate"] as const;

function main(): number {
  const { values } = parseArgs({
    options: {
      m: { type: "string", default: "1" },
      iterations: { type: "string", default: "200" },
      path: { type: "string", default: "both" },
      json: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  const opts = benchPreamble("bench:layer", HELP, values.help, () => ({
    Ms: intList("--m", values.m),
    iterations: positiveInt("--iterations", values.iterations),
    path: oneOf("--path", values.path, PATHS),
  }));
  if (typeof opts === "number") return opts;
  const { iterations, path: pathArg } = opts;
  const card = deviceInfo().name;
  const rng = new Rng(1);
  using timer = new Timer();
  const started = performance.now();
  using layer = new MoeLayer({
    hiddenSize: K,
    intermediateSize: I,
    numRoutedExperts: E,
    sharedExpert: true,
    routing: { kind: "grouped", topK: 8, nGroup: 8, topkGroup: 4 },
    correctionBias: randomNormal(rng, E, 0, 0.05),
    routedScalingFactor: 2.5,
    stream: timer.stream,
  });
  for (let e = 0; e <= E; e++) {
    const w13 = new Uint8Array(2 * I * K);
    fillRandomFp8(rng, w13, 50);
    const w2 = new Uint8Array(K * I);
    fillRandomFp8(rng, w2, 50);
    layer.setExpert(e, {
      w13,
      w13Scale: randomLogUniform(rng, (2 * I / 128) * (K / 128), 1e-3, 1e-2),
      w2,
      w2Scale: randomLogUniform(rng, (K / 128) * (I / 128), 1e-3, 1e-2),
    });
  }
  console.log(
    `${card}: DeepSeek-V3 shard E=257 N=256 K=7168 top_k 8+1, weights uploaded in ` +
      `${((performance.now() - started) / 1000).toFixed(1)} s`,
  );
  const results: Record<string, unknown>[] = [];
  for (const M of opts.Ms) {
    using hidden = DeviceBuffer.from("bf16", [M, K], encodeBf16(randomNormal(rng, M * K)));
    using logits = DeviceBuffer.from("f32", [M, E], randomNormal(rng, M * E));
    layer.forward(hidden, logits); // scratch buffers, modules, tensor maps
    timer.stream.synchronize();
    const config = layer.buffersFor(M).config;
    const auto = layer.pathFor(M);
    const paths: ForwardPath[] = pathArg === "both"
      ? ["separate", "prologue"]
      : [pathArg === "auto" ? auto : pathArg];
    const fmt = (v: number): string => v.toFixed(2).padStart(12);
    const timings: Record<string, unknown> = {};
    for (const path of paths) {
      if (path === "prologue" && !prologueFits(M, layer.width, layer.numExperts)) {
        console.log(`\nM=${M}: the prologue does not take ${M * layer.width} slots; skipped`);
        continue;
      }
      layer.forward(hidden, logits, { path });
      timer.stream.synchronize();
      const device = timeForward(layer, hidden, logits, { iterations, pace: "device", path });
      const paced = timeForward(layer, hidden, logits, { iterations, pace: "host", path });
      console.log(
        `\nM=${M}, ${path} path${path === auto ? " (the layer's choice)" : ""}, config ` +
          `${configKey(config)}, median of ` +
          `${iterations} (us):`,
      );
      console.log(`  ${"step".padEnd(24)}${"device".padStart(12)}${"host-paced".padStart(12)}`);
      for (const s of device.steps) {
        console.log(`  ${s.padEnd(24)}${fmt(device[s])}${fmt(paced[s])}`);
      }
      console.log(
        `  ${"outside the kernel".padEnd(24)}${fmt(device.outside)}${fmt(paced.outside)}`,
      );
      console.log(`  ${"whole forward".padEnd(24)}${fmt(device.total)}${fmt(paced.total)}`);
      console.log(
        `  ${"whole, no step events".padEnd(24)}${fmt(device.whole)}${fmt(paced.whole)}`,
      );
      console.log(`  ${"whole, CUDA graph".padEnd(24)}${fmt(device.graph)}${fmt(paced.graph)}`);
      console.log(`  host time of forward(): ${device.hostUs.toFixed(1)} us (enqueue only)`);
      const outside = device.steps.filter((s) => s !== "fused");
      console.log(
        `  outside the fused kernel: ${device.outside.toFixed(2)} us of device time ` +
          `(${outside.join(" + ")}, the output zeroed inside ` +
          `${path === "prologue" ? "the prologue" : "quantize"}; ${outside.length} ` +
          `launch${outside.length === 1 ? "" : "es"}; target <= 15 us: ` +
          `${device.outside <= 15 ? "met" : "NOT met"}); the kernel is ` +
          `${(100 * (device.total - device.outside) / device.total).toFixed(0)} % of the forward`,
      );
      timings[path] = { device, hostPaced: paced };
    }
    results.push({ M, config, auto, ...timings });
  }
  if (values.json) {
    Deno.writeTextFileSync(
      values.json,
      JSON.stringify({ card, date: new Date().toISOString(), results }, null, 1),
    );
  }
  return 0;
}

if (import.meta.main) Deno.exit(await runBench("bench:layer", main));
