/**
 * `deno task bench:targets`: the issue-6 table. For each layer shape, token count and routing
 * balancedness, times the fused kernel alone with the config the lookup picks (the shipped
 * tables in `configs/`), CUDA events, median of >= 50 launches, L2 emptied before each; beside
 * it the memory floor (distinct experts' weights and scales plus activations and output, over
 * the copy bandwidth measured in the same run) and the compute floor (the layer's FP8 FLOPs
 * over `--fp8-tflops`, the rate of a large FP8 GEMM measured on the same card), the target and
 * whether it holds.
 *
 * Targets: M=1 at most 2x the memory floor + 3 µs; 8 <= M <= 512 at most 1.1x; M=2048 1.25x;
 * M=8192 2.2x the larger floor; at balancedness < 1, 1.2x those.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { bundledTableFile, CONFIG_ENV_VAR, pickConfig } from "../src/config.ts";
import { deviceInfo } from "../src/device.ts";
import { DeviceMoeProblem } from "../src/problem.ts";
import { memoryFloorBytes, Timer } from "../src/timing.ts";
import { configKey, MODEL_SHAPES } from "../src/tune.ts";
import {
  benchPreamble,
  fractionList,
  intList,
  positiveInt,
  runBench,
  shapeList,
  UsageError,
} from "./_cli.ts";
import { targetBase, targetProblem } from "./_problems.ts";

const HELP = `Usage: deno task bench:targets [options]
  --shapes LIST        of ${Object.keys(MODEL_SHAPES).join(", ")} (default: all)
  --m LIST             token counts (default 1,8,32,128,512,2048,8192)
  --balancedness LIST  routing balancedness values (default 1,0.6)
  --fp8-tflops X       dense FP8 GEMM rate of this card, for the compute floor (no default:
                       without it the M=8192 cells use the memory floor alone); on the GPU
                       machine: --fp8-tflops $(python3 bench/fp8_rate.py)
  --iterations N       timed launches per cell (default 50)
  --json FILE          write every cell as JSON
  -h, --help`;

/** The target of a cell as a time in µs, given its floors. */
export function targetUs(
  M: number,
  memoryUs: number,
  computeUs: number,
  balanced: boolean,
): number {
  const slack = balanced ? 1 : 1.2;
  if (M <= 1) return slack * (2 * memoryUs + 3);
  if (M <= 512) return slack * 1.1 * memoryUs;
  if (M <= 2048) return slack * 1.25 * memoryUs;
  return slack * 2.2 * Math.max(memoryUs, computeUs);
}

/** FP8 FLOPs of the layer: up (N x K) and down (K x N/2) per routed slot, 2 per multiply-add. */
export function layerFlops(M: number, topK: number, N: number, K: number): number {
  return 2 * M * topK * (N * K + K * (N / 2));
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      shapes: { type: "string", default: Object.keys(MODEL_SHAPES).join(",") },
      m: { type: "string", default: "1,8,32,128,512,2048,8192" },
      balancedness: { type: "string", default: "1,0.6" },
      "fp8-tflops": { type: "string" },
      iterations: { type: "string", default: "50" },
      json: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  const opts = benchPreamble("bench:targets", HELP, values.help, () => {
    const tflops = values["fp8-tflops"] ? Number(values["fp8-tflops"]) : undefined;
    if (tflops !== undefined && !(tflops > 0 && Number.isFinite(tflops))) {
      throw new UsageError(`--fp8-tflops must be a positive number, got "${values["fp8-tflops"]}"`);
    }
    return {
      shapes: shapeList("--shapes", values.shapes),
      Ms: intList("--m", values.m),
      balancedness: fractionList("--balancedness", values.balancedness),
      iterations: positiveInt("--iterations", values.iterations),
      tflops,
    };
  });
  if (typeof opts === "number") return opts;
  const { Ms, iterations, tflops } = opts;
  const card = deviceInfo().name;
  const date = new Date().toISOString();
  using timer = new Timer();
  const bandwidth = timer.copyBandwidth();
  console.log(
    `${card}, ${date}: copy bandwidth ${(bandwidth / 1e9).toFixed(0)} GB/s, FP8 GEMM ` +
      `${tflops ? `${tflops} TFLOP/s` : "not given"}; kernel alone, median of ${iterations}, ` +
      `L2 emptied (read) before each launch`,
  );
  const header =
    `shape  bal    M     config          µs    mem floor  cmp floor  ratio  target µs  ok`;
  const lines: string[] = [header];
  console.log(header);
  const cells: Record<string, unknown>[] = [];
  for (const name of opts.shapes) {
    const shape = MODEL_SHAPES[name];
    const { numExperts: E, N, K, topK } = shape;
    const base = targetBase(shape, Math.max(...Ms));
    // Where the configs come from (pickConfig's order), e.g. the H100's tables on an H200.
    const tableUrl = bundledTableFile(card, shape);
    const table = Deno.env.get(CONFIG_ENV_VAR)
      ? `${CONFIG_ENV_VAR}=${Deno.env.get(CONFIG_ENV_VAR)}`
      : tableUrl
      ? `configs/${tableUrl.pathname.slice(tableUrl.pathname.lastIndexOf("/") + 1)}`
      : "built-in defaults";
    console.log(`${name}: configs from ${table}`);
    let owner: DeviceMoeProblem | undefined;
    try {
      for (const balancedness of opts.balancedness) {
        for (const M of Ms) {
          const problem = targetProblem(base, shape, M, balancedness);
          const ids = problem.topkIds;
          const dev = new DeviceMoeProblem(problem, { weightsFrom: owner });
          const config = pickConfig(shape, M, { card });
          const t = timer.time(
            () => dev.run(config, { stream: timer.stream, outIsZeroed: true }),
            { iterations },
          );
          if (owner) dev[Symbol.dispose]();
          else owner = dev;
          const memoryUs = memoryFloorBytes({ M, K, N, numExperts: E, topK }, ids) / bandwidth *
            1e6;
          const computeUs = tflops ? layerFlops(M, topK, N, K) / (tflops * 1e12) * 1e6 : 0;
          const target = targetUs(M, memoryUs, computeUs, balancedness >= 1);
          const floor = M > 2048 ? Math.max(memoryUs, computeUs) : memoryUs;
          const ok = t.medianUs <= target;
          cells.push({
            shape: name,
            E,
            N,
            K,
            topK,
            balancedness,
            M,
            config,
            table,
            us: t.medianUs,
            memoryUs,
            computeUs,
            targetUs: target,
            ok,
          });
          const line = `${name.padEnd(6)} ${balancedness.toFixed(1)} ${String(M).padStart(5)}  ` +
            `${configKey(config).padEnd(12)} ${t.medianUs.toFixed(1).padStart(8)} ` +
            `${memoryUs.toFixed(1).padStart(10)} ${
              (tflops ? computeUs.toFixed(1) : "-").padStart(10)
            } ${(t.medianUs / floor).toFixed(2).padStart(6)} ${target.toFixed(1).padStart(10)}  ${
              ok ? "yes" : "no"
            }`;
          console.log(line);
          lines.push(line);
        }
      }
    } finally {
      owner?.[Symbol.dispose]();
    }
  }
  const met = cells.filter((c) => c.ok).length;
  console.log(`\n${card}, ${date}: ${met} of ${cells.length} cells within target`);
  for (const line of lines) console.log(line);
  if (values.json) {
    await Deno.writeTextFile(
      values.json,
      JSON.stringify({ card, date, bandwidth, fp8Tflops: tflops, cells }, null, 1),
    );
  }
  return 0;
}

if (import.meta.main) Deno.exit(await runBench("bench:targets", main));
