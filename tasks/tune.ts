/**
 * `deno task tune`: finds the fastest kernel config per token count for one layer shape on this
 * GPU and writes it as a table in the seed's format (see src/tune.ts for the method), with a
 * results file beside it, a summary table, and optionally an SVG plot.
 *
 * @module
 */
import $ from "@david/dax";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { BUNDLED_CONFIG_DIR, configFileName } from "../src/config.ts";
import { probeHopperGpu } from "../src/device.ts";
import { renderLatencySvg } from "../src/plot.ts";
import {
  type BatchResult,
  formatDuration,
  latencySeries,
  parseBatchSizes,
  readResultsFile,
  resultsList,
  SEED_BATCH_SIZES,
  summaryTable,
  tuneConfigs,
  type TuneMetadata,
  type TuneReporter,
  type TuneShape,
  writeTextFileAtomic,
} from "../src/tune.ts";

const HELP = `Usage: deno task tune --E 257 --N 256 --K 7168 --top-k 9 --shared-expert [options]
       deno task tune --plot FILE.svg --from RESULTS.meta.json

Times every kernel config the shape can use for each batch size (CUDA events, L2 flushed,
medians; a quick round over all, then the best few again with more launches) and writes the
fastest per batch size in the seed's JSON format. Needs a Hopper GPU (H100/H200).

Shape (the layer on one GPU):
  --E N                experts, a shared expert included (DeepSeek-V3 at TP8: 257)
  --N N                up-projection rows = 2 x intermediate size (256)
  --K N                hidden size (7168)
  --top-k N            experts per token, the shared expert included (9)
  --shared-expert      the last expert is shared: every token's last slot goes to it
                       (the seed's --E/--top-k count routed experts only; here both count it)
Options:
  --batch-sizes LIST   token counts, e.g. 1,8,64 or 1-8,16 (default: the seed's 48, 1..8192)
  --balancedness LIST  routing: 1.0 uniform ... 0.0 every routed slot on expert 0 (default 1.0);
                       several (1,0.6): the config fastest on average over draws of each
  --out FILE           the table (default configs/<gpu>_E<e>_N<n>_K<k>.json of this module);
                       timings and provenance go to FILE's .meta.json, progress to FILE.partial
  --iterations N       timed launches per finalist in the last round (default 40)
  --resume             skip the batch sizes FILE.partial already has
  --update             keep FILE's entries for the batch sizes this run does not time (its
                       .meta.json says which run each came from): re-tune part of a table
  --budget-seconds S   time budget of the search, setup excluded (default 420)
  --plot FILE.svg      also write a plot of µs against batch size
  --from RESULTS       with --plot: plot an existing results file (no GPU needed), then stop
  --no-unfused         do not time the unfused baseline
  --seed N             seed of the random problem and routing (default 42)
  -h, --help`;

class UsageError extends Error {}

// dax draws (colours, a progress bar, line clearing) for a terminal; a log gets plain lines.
const TERMINAL = Deno.stderr.isTerminal();

function step(title: string, message: string): void {
  if (TERMINAL) $.logStep(title, message);
  else console.log(`${title} ${message}`);
}

function positiveInt(name: string, text: string | undefined): number {
  if (text === undefined) throw new UsageError(`--${name} is required`);
  const v = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(v) || v < 1) {
    throw new UsageError(`--${name} must be a positive integer, got "${text}"`);
  }
  return v;
}

async function commandLine(cmd: string[]): Promise<string | undefined> {
  try {
    if (!(await $.commandExists(cmd[0]))) return undefined;
    const r = await $`${cmd}`.quiet().noThrow().timeout("10s");
    const text = r.stdout.trim().split("\n")[0]?.trim();
    return r.code === 0 && text ? text : undefined;
  } catch {
    return undefined;
  }
}

async function moduleVersion(): Promise<string | undefined> {
  try {
    const json = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
    return typeof json.version === "string" ? json.version : undefined;
  } catch {
    return undefined;
  }
}

function plotTitle(meta: TuneMetadata): { title: string; subtitle: string } {
  const s = meta.shape;
  return {
    title: `fused FP8 MoE: E=${s.numExperts} N=${s.N} K=${s.K} top-k ${s.topK}` +
      `${s.sharedExpert ? " (shared expert)" : ""}, balancedness ${meta.balancedness}`,
    subtitle: `${meta.card}, driver ${meta.driver ?? "?"}, ${meta.date.slice(0, 10)}; ` +
      `CUDA-event medians, L2 flushed; floor = bytes / ${meta.copyBandwidthGBs} GB/s`,
  };
}

async function writePlot(path: string, meta: TuneMetadata, results: BatchResult[]): Promise<void> {
  await writeTextFileAtomic(path, renderLatencySvg(latencySeries(results), plotTitle(meta)));
  step("Plotted", `${path} (${results.length} batch sizes)`);
}

/**
 * A reporter on dax: log lines above a progress bar with the ETA (on a terminal; redrawn at
 * most every 200 ms).
 */
function daxReporter(): TuneReporter {
  let bar: ReturnType<typeof $.progress> | undefined;
  let lastRender = 0;
  return {
    log: (line): void => (TERMINAL ? $.log(line) : console.log(line)),
    warn: (
      line,
    ): void => (TERMINAL ? $.logWarn("warning", line) : console.error(`warning ${line}`)),
    start(total): void {
      // A bar only on a terminal: in a log, the line per batch size is the progress.
      if (TERMINAL) bar = $.progress("Tuning", { length: total });
    },
    progress(done, message): void {
      if (!bar) return;
      bar.position(done).message(message);
      const now = performance.now();
      if (now - lastRender > 200) {
        lastRender = now;
        bar.forceRender(); // the measurements are synchronous: the event loop never runs
      }
    },
    finish(): void {
      bar?.finish();
      bar = undefined;
    },
  };
}

/** Parses the arguments and runs; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        E: { type: "string" },
        N: { type: "string" },
        K: { type: "string" },
        "top-k": { type: "string" },
        "shared-expert": { type: "boolean", default: false },
        "batch-sizes": { type: "string" },
        balancedness: { type: "string", default: "1.0" },
        out: { type: "string" },
        iterations: { type: "string", default: "40" },
        resume: { type: "boolean", default: false },
        update: { type: "boolean", default: false },
        "budget-seconds": { type: "string", default: "420" },
        plot: { type: "string" },
        from: { type: "string" },
        "no-unfused": { type: "boolean", default: false },
        seed: { type: "string", default: "42" },
        help: { type: "boolean", short: "h", default: false },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    console.error(`tune: ${(err as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (values.help) {
    console.log(HELP);
    return 0;
  }

  // Re-plot only.
  if (values.from !== undefined) {
    if (values.plot === undefined) {
      console.error("tune: --from needs --plot FILE.svg");
      return 2;
    }
    try {
      const file = await readResultsFile(values.from);
      const results = resultsList(file);
      console.log(summaryTable(results));
      await writePlot(values.plot, file.metadata, results);
      return 0;
    } catch (err) {
      console.error(`tune: ${(err as Error).message}`);
      return 1;
    }
  }

  let shape: TuneShape;
  let batchSizes: number[];
  let balancedness: number[];
  let iterations: number;
  let budgetSeconds: number;
  let seed: number;
  try {
    shape = {
      numExperts: positiveInt("E", values.E),
      N: positiveInt("N", values.N),
      K: positiveInt("K", values.K),
      topK: positiveInt("top-k", values["top-k"]),
      sharedExpert: values["shared-expert"],
    };
    if (shape.K % 128 !== 0) throw new UsageError(`--K must be a multiple of 128, got ${shape.K}`);
    if (shape.N % 256 !== 0) throw new UsageError(`--N must be a multiple of 256, got ${shape.N}`);
    const routed = shape.sharedExpert ? shape.numExperts - 1 : shape.numExperts;
    if (shape.sharedExpert && (shape.numExperts < 2 || shape.topK < 2)) {
      throw new UsageError("--shared-expert needs --E >= 2 and --top-k >= 2");
    }
    if (routed < 1) throw new UsageError("no routed experts");
    batchSizes = values["batch-sizes"] === undefined
      ? [...SEED_BATCH_SIZES]
      : parseBatchSizes(values["batch-sizes"]);
    balancedness = values.balancedness.split(",").map((v) => v.trim() === "" ? NaN : Number(v));
    if (!balancedness.every((b) => b >= 0 && b <= 1)) {
      throw new UsageError(
        `--balancedness must be values in [0, 1] separated by commas, got "${values.balancedness}"`,
      );
    }
    iterations = positiveInt("iterations", values.iterations);
    budgetSeconds = positiveInt("budget-seconds", values["budget-seconds"]);
    seed = Number(values.seed);
    if (!Number.isSafeInteger(seed) || seed < 0) {
      throw new UsageError(`--seed must be a non-negative integer, got "${values.seed}"`);
    }
  } catch (err) {
    if (err instanceof UsageError || err instanceof RangeError) {
      console.error(`tune: ${err.message}\n(deno task tune --help for the options)`);
      return 2;
    }
    throw err;
  }

  const probe = probeHopperGpu();
  if (!probe.ok) {
    console.error(`tune: needs a Hopper GPU (H100/H200): ${probe.reason.split("\n")[0]}`);
    return 1;
  }
  const info = probe.info;
  const out = values.out ??
    fileURLToPath(
      new URL(configFileName(info, shape.numExperts, shape.N, shape.K), BUNDLED_CONFIG_DIR),
    );

  const [driver, gitCommit, version] = await Promise.all([
    commandLine(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]),
    commandLine([
      "git",
      "-C",
      fileURLToPath(new URL("..", import.meta.url)),
      "describe",
      "--always",
      "--dirty",
    ]),
    moduleVersion(),
  ]);
  step(
    "Tuning",
    `E=${shape.numExperts} N=${shape.N} K=${shape.K} top-k ${shape.topK}` +
      `${shape.sharedExpert ? " (shared expert)" : ""}, balancedness ${balancedness}, ` +
      `${batchSizes.length} batch sizes -> ${out}`,
  );
  const started = performance.now();
  try {
    const report = await tuneConfigs({
      shape,
      batchSizes,
      balancedness,
      out,
      iterations,
      resume: values.resume,
      update: values.update,
      budgetSeconds,
      unfused: !values["no-unfused"],
      seed,
      provenance: { driver, gitCommit, moduleVersion: version },
      device: info,
    }, daxReporter());
    console.log(`\n${info.name}, ${report.file.metadata.date}:\n${summaryTable(report.results)}`);
    step("Wrote", `${report.table} (seed format) and ${report.resultsPath}`);
    if (values.plot !== undefined) {
      await writePlot(values.plot, report.file.metadata, report.results);
    }
    step("Done", `in ${formatDuration((performance.now() - started) / 1000)}`);
    return 0;
  } catch (err) {
    let e = err;
    while (e instanceof SuppressedError) e = e.suppressed; // the first failure, not a dispose's
    const message = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
    console.error(
      `tune: failed after ${formatDuration((performance.now() - started) / 1000)}: ${message}`,
    );
    console.error(
      `Finished batch sizes are kept in ${out}.partial; rerun the same command with --resume ` +
        `to continue.`,
    );
    if (Deno.env.get("ALPHA_MOE_DEBUG") && e instanceof Error) console.error(e.stack);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
