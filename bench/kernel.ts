/**
 * `deno task bench:kernel`: times the fused kernel alone (CUDA events, warm-up, median of
 * >= 50 launches, L2 flushed before each) per shape and token count, for a grid of configs,
 * and prints the best with its achieved bandwidth and its ratio to the memory floor measured
 * in the same run. `--json FILE` also writes every measurement.
 *
 * The problems are bench:targets' (the same shapes, weights, routing and seeds), so a config
 * timed here and in the issue-6 table runs on the same data.
 *
 * @module
 */
import { parseArgs } from "node:util";
import type { KernelConfig } from "../src/config.ts";
import { deviceInfo } from "../src/device.ts";
import { checkKernelConfig } from "../src/fused_moe.ts";
import { DeviceMoeProblem } from "../src/problem.ts";
import { type L2Flush, memoryFloorBytes, Timer } from "../src/timing.ts";
import {
  configKey,
  configVariants,
  MODEL_SHAPES,
  tailVariants,
  tokensPerExpert,
  unitsOfWork,
  worthSplitting,
} from "../src/tune.ts";
import {
  benchPreamble,
  fractionList,
  intList,
  oneOf,
  positiveInt,
  runBench,
  shapeList,
} from "./_cli.ts";
import { targetBase, targetProblem } from "./_problems.ts";

const HELP = `Usage: deno task bench:kernel [options]
  --shapes LIST       comma-separated of ${
  Object.keys(MODEL_SHAPES).join(", ")
} (default ds,e512,ds2)
  --m LIST            token counts (default 1,8,32,128,512,2048,8192)
  --balancedness LIST routing balancedness values (default 1)
  --iterations N      timed launches per config (default 50)
  --block-m LIST      block_m values of the grid (default 8,16,32,64,128)
  --stages LIST       stages of the grid (default 2,3,4)
  --split LIST        splits of the grid (default 1,2,4,8,16; only those within two waves);
                      (32, 8) configs of split 1 (block_m up to 64, 72, 80) are also timed with
                      all_slices where N > 256
  --split-n           also time each (32, 8) config of split 1 with split_n 2
  --tail-split LIST   also time each config of split 1 with these tail splits (e.g. 2,4,8;
                      blocks of 72 and 80 take 2 only), where the launch has more units than SMs
  --flush HOW         how L2 is emptied before each launch: read (default), write, none
  --json FILE         write every measurement as JSON
  -h, --help`;

function candidates(
  M: number,
  blockMs: number[],
  stageList: number[],
  splits: number[],
  units: (blockM: number) => number,
  smCount: number,
  slices: number,
  splitN: boolean,
  tailSplits: number[],
): KernelConfig[] {
  const out: KernelConfig[] = [];
  for (const blockM of blockMs) {
    if (blockM > 8 * Math.max(1, M)) continue; // a block far larger than the tokens only pads
    for (const [blockN, warpN] of [[64, 4], [32, 8]]) {
      for (const stages of stageList) {
        for (const split of splits) {
          if (!worthSplitting(split, units(blockM), smCount)) continue;
          out.push(
            ...configVariants({ blockM, blockN, warpN, stages, split }, slices > 1, splitN)
              .filter((c) => worthSplitting(1, units(blockM), smCount, c.splitN)),
          );
          if (split === 1) {
            const base = { blockM, blockN, warpN, stages };
            out.push(...tailVariants(base, units(blockM), smCount, tailSplits));
          }
        }
      }
    }
  }
  return out;
}

const show = configKey;

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      shapes: { type: "string", default: "ds,e512,ds2" },
      m: { type: "string", default: "1,8,32,128,512,2048,8192" },
      balancedness: { type: "string", default: "1" },
      iterations: { type: "string", default: "50" },
      "block-m": { type: "string", default: "8,16,32,64,128" },
      stages: { type: "string", default: "2,3,4" },
      split: { type: "string", default: "1,2,4,8,16" },
      "split-n": { type: "boolean", default: false },
      "tail-split": { type: "string", default: "" },
      flush: { type: "string", default: "read" },
      json: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  const opts = benchPreamble("bench:kernel", HELP, values.help, () => ({
    shapes: shapeList("--shapes", values.shapes),
    Ms: intList("--m", values.m),
    balancedness: fractionList("--balancedness", values.balancedness),
    iterations: positiveInt("--iterations", values.iterations),
    blockMs: intList("--block-m", values["block-m"]),
    stages: intList("--stages", values.stages),
    splits: intList("--split", values.split),
    tailSplits: intList("--tail-split", values["tail-split"], { allowEmpty: true }),
    flush: oneOf<L2Flush>("--flush", values.flush, ["read", "write", "none"]),
  }));
  if (typeof opts === "number") return opts;
  const { Ms, iterations } = opts;
  const { name: card, smCount } = deviceInfo();
  using timer = new Timer();
  const bandwidth = timer.copyBandwidth();
  console.log(
    `${card}, ${new Date().toISOString()}: copy bandwidth ${(bandwidth / 1e9).toFixed(0)} GB/s`,
  );
  const rows: Record<string, unknown>[] = [];
  const table: string[] = [];
  for (const name of opts.shapes) {
    const shape = MODEL_SHAPES[name];
    const { numExperts: E, N, K, topK } = shape;
    const base = targetBase(shape, Math.max(...Ms));
    let owner: DeviceMoeProblem | undefined;
    try {
      for (const balancedness of opts.balancedness) {
        for (const M of Ms) {
          const problem = targetProblem(base, shape, M, balancedness);
          const ids = problem.topkIds;
          const dev = new DeviceMoeProblem(problem, { weightsFrom: owner });
          const floorBytes = memoryFloorBytes({ M, K, N, numExperts: E, topK }, ids);
          const floorUs = floorBytes / bandwidth * 1e6;
          let best: { config: KernelConfig; us: number } | undefined;
          const grid = candidates(
            M,
            opts.blockMs,
            opts.stages,
            opts.splits,
            (blockM) => unitsOfWork(tokensPerExpert(ids, E), blockM, N),
            smCount,
            N / 256,
            values["split-n"],
            opts.tailSplits,
          );
          for (const config of grid) {
            try {
              checkKernelConfig(K, N, config);
            } catch {
              continue; // e.g. too much shared memory for this card
            }
            const t = timer.time(
              () => dev.run(config, { stream: timer.stream, outIsZeroed: true }),
              { iterations, flush: opts.flush },
            );
            rows.push({
              shape: name,
              E,
              N,
              K,
              topK,
              balancedness,
              M,
              config,
              us: t.medianUs,
              floorUs,
            });
            if (!best || t.medianUs < best.us) best = { config, us: t.medianUs };
          }
          if (owner) dev[Symbol.dispose]();
          else owner = dev;
          if (!best) continue; // no config of the grid fits this card
          const line =
            `${name.padEnd(5)} bal ${balancedness.toFixed(1)} M=${String(M).padStart(5)}  ${
              show(best.config).padEnd(11)
            } ${best.us.toFixed(1).padStart(8)} us  ` +
            `${(floorBytes / (best.us * 1e-6) / 1e9).toFixed(0).padStart(5)} GB/s  ` +
            `floor ${floorUs.toFixed(1).padStart(7)} us  ratio ${(best.us / floorUs).toFixed(2)}`;
          console.log(line);
          table.push(line);
        }
      }
    } finally {
      owner?.[Symbol.dispose]();
    }
  }
  if (values.json) {
    await Deno.writeTextFile(
      values.json,
      JSON.stringify({ card, date: new Date().toISOString(), bandwidth, rows }, null, 1),
    );
  }
  console.log(`\nbest config per point (block_m/block_n/warp_n/stages[xsplit]), ${card}:`);
  for (const line of table) console.log(line);
  return 0;
}

if (import.meta.main) Deno.exit(await runBench("bench:kernel", main));
