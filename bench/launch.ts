/**
 * `deno task bench:launch`: launches the fused kernel a few times on one cell of the issue-6
 * table (bench:targets' weights, tokens and routing) with one config, and times nothing: a
 * target for profilers. For example, the second launch under ncu, at the clocks the benchmarks
 * run at (ncu locks them at base by default, which changes which config is faster at mid M;
 * bench/NOTES.md, item 109):
 *
 * ```sh
 * ncu --clock-control none -k regex:fused_moe_kernel --launch-skip 1 --launch-count 1 \
 *   deno task bench:launch --shape ds --m 512 --config 64/32/8/2/t4
 * ```
 *
 * @module
 */
import { parseArgs } from "node:util";
import { configProblem, pickConfig } from "../src/config.ts";
import { deviceInfo, synchronize } from "../src/device.ts";
import { DeviceMoeProblem } from "../src/problem.ts";
import { configKey, MODEL_SHAPES, parseConfigKey } from "../src/tune.ts";
import { benchPreamble, fractionList, oneOf, positiveInt, runBench, UsageError } from "./_cli.ts";
import { targetBase, targetProblem } from "./_problems.ts";

const HELP = `Usage: deno task bench:launch --shape NAME --m M [options]
  --shape NAME        one of ${Object.keys(MODEL_SHAPES).join(", ")}
  --m M               token count
  --balancedness X    routing balancedness (default 1)
  --config KEY        block_m/block_n/warp_n/stages[xSPLIT][/all][/nN][/tN], e.g. 64/32/8/2/t4
                      (default: the config the shipped table picks)
  --launches N        launches, one after another (default 2: the first warms up)
  -h, --help`;

function main(): number {
  const { values } = parseArgs({
    options: {
      shape: { type: "string", default: "" },
      m: { type: "string", default: "" },
      balancedness: { type: "string", default: "1" },
      config: { type: "string" },
      launches: { type: "string", default: "2" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  const opts = benchPreamble("bench:launch", HELP, values.help, () => {
    const balancedness = fractionList("--balancedness", values.balancedness);
    if (balancedness.length !== 1) {
      throw new UsageError(`--balancedness takes one value, got "${values.balancedness}"`);
    }
    let config;
    try {
      config = values.config === undefined ? undefined : parseConfigKey(values.config);
    } catch (err) {
      if (!(err instanceof RangeError)) throw err;
      throw new UsageError(`--config: ${err.message}`);
    }
    const problem = config && configProblem(config);
    if (problem) throw new UsageError(`--config: "${values.config}": ${problem}`);
    return {
      shape: MODEL_SHAPES[oneOf("--shape", values.shape, Object.keys(MODEL_SHAPES))],
      M: positiveInt("--m", values.m),
      balancedness: balancedness[0],
      config,
      launches: positiveInt("--launches", values.launches),
    };
  });
  if (typeof opts === "number") return opts;
  const { shape, M, balancedness, launches } = opts;
  const config = opts.config ?? pickConfig(shape, M, { card: deviceInfo().name });
  const problem = targetProblem(targetBase(shape, M), shape, M, balancedness);
  using dev = new DeviceMoeProblem(problem);
  for (let i = 0; i < launches; i++) dev.run(config);
  synchronize();
  console.log(
    `bench:launch: ${launches} launches of ${configKey(config)}, M=${M}, balancedness ` +
      `${balancedness}`,
  );
  return 0;
}

if (import.meta.main) Deno.exit(await runBench("bench:launch", main));
