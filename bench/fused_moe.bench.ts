/**
 * `deno task bench` (or `deno bench --allow-all bench/`): per layer shape and batch size, the
 * fused kernel with the tuned config ({@link pickConfig}: `ALPHA_MOE_CONFIG`, else the shipped
 * table of this card and shape, else the default) against the fused kernel with the default
 * config (`baseline: true`, so Deno prints the ratios) and against the unfused baseline (four
 * plain kernels, src/unfused.ts), in one `group` per (shape, batch size).
 *
 * Two kinds of numbers:
 *
 * - Deno's table is wall-clock time of one call as a caller sees it: each iteration is timed
 *   with `b.start()` / `b.end()` around the launch (with the output zeroing a real call needs)
 *   and a stream synchronize. It therefore includes the host side: argument checks, the FFI
 *   call, the launch latency (~5-10 µs) and the synchronize wake-up. For a kernel of 20 µs that
 *   overhead is a large share; the L2 cache is not flushed between iterations either (small
 *   batches find their weights warm).
 * - The table printed first is device time: CUDA-event medians of 50 launches (10 for the slow
 *   unfused path), L2 flushed before each, kernel only, beside the memory floor (bytes that must
 *   move / measured copy bandwidth, src/timing.ts). These are the numbers to compare kernels by,
 *   and what `deno task tune` measured.
 *
 * Default: the DeepSeek-V3 shape at M in {1, 32, 512, 4096}. `ALPHA_MOE_BENCH_FULL=1`: the four
 * shapes of src/tune.ts's MODEL_SHAPES at M in {1, 8, 32, 128, 512, 2048, 8192}.
 *
 * Without a Hopper GPU every bench is reported as ignored, with one line saying why.
 *
 * @module
 */
import { DeviceBuffer } from "../src/buffer.ts";
import {
  bundledConfig,
  CONFIG_ENV_VAR,
  configFromEnv,
  defaultConfig,
  type KernelConfig,
  pickConfig,
} from "../src/config.ts";
import { type DeviceInfo, probeHopperGpu } from "../src/device.ts";
import { DeviceMoeProblem } from "../src/problem.ts";
import { makeRandomMoeProblem } from "../src/random.ts";
import { memoryFloorBytes, Timer } from "../src/timing.ts";
import {
  balancedTopkIds,
  configKey,
  MODEL_SHAPES,
  sliceProblem,
  type TuneShape,
} from "../src/tune.ts";
import { runUnfusedMoe, unfusedWorkspaceBytes } from "../src/unfused.ts";

const FULL = Deno.env.get("ALPHA_MOE_BENCH_FULL") === "1";
const CASES: { name: string; shape: TuneShape; Ms: number[] }[] = FULL
  ? Object.entries(MODEL_SHAPES).map(([name, shape]) => ({
    name,
    shape,
    Ms: [1, 8, 32, 128, 512, 2048, 8192],
  }))
  : [{ name: "ds", shape: MODEL_SHAPES.ds, Ms: [1, 32, 512, 4096] }];

interface Point {
  shapeName: string;
  shape: TuneShape;
  M: number;
  dev: DeviceMoeProblem;
  tuned: KernelConfig;
  source: "env" | "table" | "default";
  def: KernelConfig;
  floorUs: number;
}

interface Setup {
  info: DeviceInfo;
  timer: Timer;
  bandwidth: number;
  points: Point[];
  workspace?: DeviceBuffer;
  owners: DeviceMoeProblem[];
}

function label(shapeName: string, s: TuneShape): string {
  return `${shapeName} E=${s.numExperts} N=${s.N} K=${s.K} top-k ${s.topK}`;
}

function prepare(info: DeviceInfo): Setup {
  const timer = new Timer();
  const setup: Setup = { info, timer, bandwidth: timer.copyBandwidth(), points: [], owners: [] };
  try {
    let workspaceBytes = 0;
    for (const c of CASES) {
      const { numExperts: E, N, K, topK, sharedExpert } = c.shape;
      const mMax = Math.max(...c.Ms);
      const base = makeRandomMoeProblem({
        M: mMax,
        K,
        N,
        numExperts: E,
        topK,
        blockM: 8,
        seed: 7,
        sharedExpert,
      });
      let owner: DeviceMoeProblem | undefined;
      for (const M of c.Ms) {
        // The tuner's routing (balancedness 1.0), drawn with another seed than the tuner's.
        const topkIds = balancedTopkIds({
          M,
          numExperts: E,
          topK,
          sharedExpert,
          balancedness: 1,
          seed: 0x5eed + M,
        });
        const dev = new DeviceMoeProblem(sliceProblem(base, M, topkIds), { weightsFrom: owner });
        if (owner === undefined) {
          owner = dev;
          setup.owners.push(dev);
        }
        const fromEnv = configFromEnv(M);
        const fromTable = fromEnv ? undefined : bundledConfig(info, c.shape, M);
        setup.points.push({
          shapeName: c.name,
          shape: c.shape,
          M,
          dev,
          tuned: pickConfig(c.shape, M, { card: info.name }),
          source: fromEnv ? "env" : fromTable ? "table" : "default",
          def: defaultConfig(M),
          floorUs: memoryFloorBytes({ M, K, N, numExperts: E, topK }, topkIds) /
            setup.bandwidth * 1e6,
        });
        workspaceBytes = Math.max(workspaceBytes, unfusedWorkspaceBytes({ M, K, N, topK }));
      }
    }
    setup.workspace = DeviceBuffer.alloc("fp8_e4m3", [workspaceBytes]);
    return setup;
  } catch (err) {
    release(setup);
    throw err;
  }
}

function release(setup: Setup): void {
  for (const p of setup.points) if (!setup.owners.includes(p.dev)) p.dev[Symbol.dispose]();
  for (const o of setup.owners) o[Symbol.dispose]();
  setup.workspace?.[Symbol.dispose]();
  setup.timer[Symbol.dispose]();
}

/** CUDA-event medians of every point, printed once before Deno's own table. */
function deviceTable(setup: Setup): string {
  const { timer } = setup;
  const fused = (p: Point, c: KernelConfig): number =>
    timer.time(() => p.dev.run(c, { stream: timer.stream, outIsZeroed: true }), {
      iterations: 50,
    }).medianUs;
  const head = [
    "shape",
    "tokens",
    "tuned (bm/bn/wn/st)",
    "from",
    "tuned µs",
    "default µs",
    "gain",
    "unfused µs",
    "floor µs",
    "tuned/floor",
  ];
  const rows: string[][] = [];
  for (const p of setup.points) {
    const tunedUs = fused(p, p.tuned);
    const defUs = fused(p, p.def);
    const unfusedUs = timer.time(
      () => runUnfusedMoe(p.dev, p.def.blockM, setup.workspace!, { stream: timer.stream }),
      { warmup: 2, iterations: 10 },
    ).medianUs;
    const gain = (defUs - tunedUs) / defUs * 100;
    rows.push([
      label(p.shapeName, p.shape),
      String(p.M),
      configKey(p.tuned),
      p.source,
      tunedUs.toFixed(1),
      defUs.toFixed(1),
      `${gain >= 0 ? "+" : ""}${gain.toFixed(1)}%`,
      unfusedUs.toFixed(1),
      p.floorUs.toFixed(1),
      (tunedUs / p.floorUs).toFixed(2),
    ]);
  }
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]): string =>
    cells.map((c, i) => i === 0 || i === 2 || i === 3 ? c.padEnd(widths[i]) : c.padStart(widths[i]))
      .join("  ");
  return [
    `${setup.info.name}, ${new Date().toISOString()}: device time (CUDA events, L2 flushed, ` +
    `medians); copy bandwidth ${(setup.bandwidth / 1e9).toFixed(0)} GB/s; tuned config from ` +
    `${CONFIG_ENV_VAR} (env), the shipped table (table) or the default`,
    line(head),
    line(widths.map((w) => "-".repeat(w))),
    ...rows.map(line),
  ].join("\n");
}

const probe = probeHopperGpu();
let setup: Setup | undefined;
let skip = probe.ok ? "" : probe.reason.split("\n")[0];
if (probe.ok) {
  try {
    setup = prepare(probe.info);
    console.log(deviceTable(setup));
  } catch (err) {
    skip = `setup failed: ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`;
    if (setup) release(setup);
    setup = undefined;
  }
}
if (setup === undefined) console.log(`bench/fused_moe.bench.ts: every bench ignored: ${skip}`);

for (const c of CASES) {
  for (const M of c.Ms) {
    const group = `${label(c.name, c.shape)}, M=${M}`;
    const point = setup?.points.find((p) => p.shapeName === c.name && p.M === M);
    const stream = setup?.timer.stream;
    Deno.bench({
      name: point ? `tuned ${configKey(point.tuned)} (${point.source})` : "tuned",
      group,
      ignore: point === undefined,
      fn(b): void {
        const p = point!;
        b.start();
        p.dev.run(p.tuned, { stream });
        stream!.synchronize();
        b.end();
      },
    });
    Deno.bench({
      name: point ? `default ${configKey(point.def)}` : "default",
      group,
      baseline: true,
      ignore: point === undefined,
      fn(b): void {
        const p = point!;
        b.start();
        p.dev.run(p.def, { stream });
        stream!.synchronize();
        b.end();
      },
    });
    Deno.bench({
      name: "unfused (4 plain kernels)",
      group,
      ignore: point === undefined,
      fn(b): void {
        const p = point!;
        b.start();
        runUnfusedMoe(p.dev, p.def.blockM, setup!.workspace!, { stream });
        stream!.synchronize();
        b.end();
      },
    });
  }
}
