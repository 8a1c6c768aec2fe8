// The tuner's pure parts (routing at a balancedness, pruning, the successive-halving search over
// a synthetic cost, file formats, the budget model) and the per-card config file lookup. No GPU.
import assert from "node:assert/strict";
import { pathToFileURL } from "node:url";
import { CudaFatalError, UnsupportedError } from "../ffi/errors.ts";
import {
  allSlicesAllowed,
  BUNDLED_CONFIG_DIR,
  bundledConfig,
  bundledTableFile,
  clearConfigCache,
  CONFIG_ENV_VAR,
  ConfigError,
  configFileName,
  defaultConfig,
  gpuShortName,
  type KernelConfig,
  loadConfigTableSync,
  parseConfigTable,
  pickConfig,
  splitNAllowed,
} from "../src/config.ts";
import { makeRandomMoeProblem } from "../src/random.ts";
import {
  balancedTopkIds,
  type BatchResult,
  blockMLimit,
  chooseConfig,
  configKey,
  defaultRounds,
  drawFor,
  formatDuration,
  type MeasureFn,
  mergeResults,
  MODEL_SHAPES,
  orderByHint,
  parseBatchSizes,
  parseConfigKey,
  partialPathFor,
  predictSeconds,
  readResultsFile,
  resultLine,
  resultsList,
  resultsPathFor,
  sameConfig,
  searchConfigs,
  searchSpace,
  SEED_BATCH_SIZES,
  sliceProblem,
  summaryTable,
  tableJson,
  tailVariants,
  tokensPerExpert,
  TUNE_SPLITS,
  type TuneMetadata,
  type TuneResultsFile,
  unitsOfWork,
  worthSplitting,
  writeTextFileAtomic,
} from "../src/tune.ts";
import { memoryFloorBytes } from "../src/timing.ts";

const cfg = (blockM: number, blockN: number, warpN: number, stages: number): KernelConfig => ({
  blockM,
  blockN,
  warpN,
  stages,
});

Deno.test("SEED_BATCH_SIZES: the 48 token counts of the seed's tables", async () => {
  assert.equal(SEED_BATCH_SIZES.length, 48);
  assert.equal(SEED_BATCH_SIZES[0], 1);
  assert.equal(SEED_BATCH_SIZES.at(-1), 8192);
  const seed = new URL("../../shared/seed/configs/moe_jit_257_256_7168.json", import.meta.url);
  try {
    const keys = Object.keys(JSON.parse(await Deno.readTextFile(seed))).map(Number);
    assert.deepEqual(keys, [...SEED_BATCH_SIZES]);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
});

Deno.test("parseBatchSizes: lists, ranges, errors", () => {
  assert.deepEqual(parseBatchSizes("8,1,2,8"), [1, 2, 8]);
  assert.deepEqual(parseBatchSizes("1-4, 16"), [1, 2, 3, 4, 16]);
  for (const bad of ["", "0", "-1", "1.5", "a", "4-2"]) {
    assert.throws(() => parseBatchSizes(bad), RangeError, bad);
  }
});

Deno.test("balancedTopkIds: the seed's balancedness (uniform, one-hot, mixture), shared expert", () => {
  const E = 257, topK = 9, M = 4000;
  const uniform = balancedTopkIds({
    M,
    numExperts: E,
    topK,
    sharedExpert: true,
    balancedness: 1,
    seed: 1,
  });
  assert.equal(uniform.length, M * topK);
  for (let t = 0; t < M; t++) assert.equal(uniform[t * topK + topK - 1], E - 1, "shared slot");
  const counts = tokensPerExpert(uniform, E);
  assert.equal(counts[E - 1], M);
  const routed = [...counts.subarray(0, E - 1)];
  const mean = (M * (topK - 1)) / (E - 1); // 124.5
  assert.ok(Math.min(...routed) > mean * 0.6 && Math.max(...routed) < mean * 1.4, "uniform");

  const onehot = balancedTopkIds({ M: 50, numExperts: 8, topK: 3, balancedness: 0, seed: 2 });
  assert.ok(onehot.every((e) => e === 0), "balancedness 0: everything on expert 0");

  const half = balancedTopkIds({ M, numExperts: 64, topK: 4, balancedness: 0.5, seed: 3 });
  const share0 = tokensPerExpert(half, 64)[0] / half.length;
  assert.ok(Math.abs(share0 - (0.5 + 0.5 / 64)) < 0.03, `expert 0 share ${share0}`);
  assert.ok(half.every((e) => e >= 0 && e < 64));

  // Deterministic per seed.
  const again = balancedTopkIds({ M, numExperts: 64, topK: 4, balancedness: 0.5, seed: 3 });
  assert.deepEqual(again, half);
  assert.throws(
    () => balancedTopkIds({ M: 1, numExperts: 4, topK: 2, balancedness: 1.5, seed: 1 }),
    RangeError,
  );
});

/** The seed's part of the search space (split 1): the synthetic kernels below ignore split. */
function seedSpace(): KernelConfig[] {
  return searchSpace().filter((c) => (c.split ?? 1) === 1 && !c.allSlices && !c.splitN);
}

Deno.test("search space and pruning", () => {
  const space = searchSpace();
  // all_slices: block_m 8..64 and 72, 80 with (32, 8), split 1, stages 1..5; split_n 2: every
  // block_m with (32, 8), split 1, stages 1..5.
  assert.equal(space.length, 16 * 2 * 5 * TUNE_SPLITS.length + 10 * 5 + 16 * 5);
  assert.equal(space.filter((c) => c.allSlices).length, 50);
  assert.ok(space.filter((c) => c.allSlices).every(allSlicesAllowed));
  const halvesN = space.filter((c) => c.splitN === 2);
  assert.equal(halvesN.length, 80);
  assert.ok(halvesN.every((c) => splitNAllowed(c) && c.blockN === 32 && !c.split));
  assert.equal(configKey({ ...cfg(80, 32, 8, 4), splitN: 2 }), "80/32/8/4/n2");
  assert.equal(configKey({ ...cfg(32, 32, 8, 5), tailSplit: 4 }), "32/32/8/5/t4");
  assert.ok(!sameConfig(cfg(32, 32, 8, 5), { ...cfg(32, 32, 8, 5), tailSplit: 4 }));
  // Tail splits: only where the units overflow a wave; blocks of 80 on token halves take 2.
  assert.deepEqual(tailVariants(cfg(32, 32, 8, 5), 272, 132).map(configKey), [
    "32/32/8/5/t2",
    "32/32/8/5/t4",
    "32/32/8/5/t8",
  ]);
  assert.deepEqual(tailVariants(cfg(80, 32, 8, 4), 284, 132).map(configKey), ["80/32/8/4/t2"]);
  assert.deepEqual(tailVariants(cfg(32, 32, 8, 5), 132, 132), []);
  assert.deepEqual(tailVariants({ ...cfg(80, 32, 8, 3), allSlices: true }, 284, 132), []);
  assert.deepEqual(tailVariants({ ...cfg(8, 32, 8, 3), split: 2 }, 284, 132), []);
  assert.ok(!sameConfig(cfg(80, 32, 8, 4), { ...cfg(80, 32, 8, 4), splitN: 2 }));
  // N halves are timed up to four waves of units, whatever the K split rule says.
  assert.ok(worthSplitting(1, 4 * 132, 132, 2));
  assert.ok(!worthSplitting(1, 4 * 132 + 1, 132, 2));
  assert.equal(seedSpace().length, 160);
  assert.equal(new Set(space.map(configKey)).size, space.length);
  assert.equal(configKey({ ...cfg(8, 64, 4, 3), split: 8 }), "8/64/4/3x8");
  assert.equal(configKey({ ...cfg(80, 32, 8, 3), allSlices: true }), "80/32/8/3/all");
  assert.ok(!sameConfig(cfg(80, 32, 8, 3), { ...cfg(80, 32, 8, 3), allSlices: true }));
  // One token over 9 experts: 9 units; splits up to 16 keep 144 CTAs within two waves of 132.
  assert.equal(unitsOfWork([1, 0, 2, 9], 8, 512), 2 * (1 + 1 + 2));
  assert.ok(worthSplitting(16, 9, 132));
  assert.ok(!worthSplitting(2, 200, 132));
  assert.ok(worthSplitting(1, 5000, 132));
  assert.equal(blockMLimit(0), 16);
  assert.equal(blockMLimit(1), 16);
  assert.equal(blockMLimit(9), 24);
  assert.equal(blockMLimit(32), 64);
  assert.equal(blockMLimit(1000), 128);
  const hint = cfg(32, 64, 4, 3);
  const ordered = orderByHint(space, hint);
  assert.deepEqual(ordered[0], hint);
  assert.equal(ordered.length, space.length);
  assert.ok(Math.abs(Math.log2(ordered[1].blockM / 32)) <= 1);
});

/** A synthetic kernel: smooth cost with a minimum at 24/32/8/3, plus small noise. */
function syntheticMeasure(noise = 0.01): MeasureFn & { calls: number } {
  let state = 12345;
  const rand = (): number => {
    state = (state * 1103515245 + 12345) & 0x7fffffff;
    return state / 0x7fffffff;
  };
  const cost = (c: KernelConfig): number =>
    100 + 4 * (Math.log2(c.blockM) - Math.log2(24)) ** 2 + 3 * (c.stages - 3) ** 2 +
    (c.blockN === 32 ? 0 : 5);
  const fn = ((c: KernelConfig, run: Parameters<MeasureFn>[1]) => {
    fn.calls++;
    return Array.from({ length: run.iterations }, () => cost(c) * (1 + noise * (rand() - 0.5)));
  }) as MeasureFn & { calls: number };
  fn.calls = 0;
  return fn;
}

Deno.test("searchConfigs: successive halving finds the minimum and times the baseline", () => {
  const measure = syntheticMeasure();
  const def = cfg(64, 32, 8, 3);
  const out = searchConfigs(seedSpace(), measure, { rounds: defaultRounds(40), baseline: def });
  assert.equal(configKey(out.ranked[0].config), "24/32/8/3");
  assert.equal(out.timed, 160);
  assert.ok(out.baseline !== undefined && configKey(out.baseline.config) === "64/32/8/3");
  assert.equal(out.ranked.length, 4, "the best 3 and the baseline in the last round");
  assert.equal(out.ranked[0].samples, 40);
  // 160 first-round series + 8 + 4 x 4 interleaved.
  assert.equal(measure.calls, 160 + 8 + 16);
  const chosen = chooseConfig(out);
  assert.equal(configKey(chosen.config), "24/32/8/3");
});

Deno.test("searchConfigs: the replaced table's entry reaches the last round whatever round 1 said", () => {
  // Round 1 sees the incumbent at twice its real time (one bad series) and would cut it; as an
  // incumbent it is timed in the last round like the finalists, and wins there.
  const incumbent = cfg(32, 32, 8, 5);
  const measure: MeasureFn = (c, run) => {
    const us = sameConfig(c, incumbent) ? (run.round === 0 ? 200 : 90) : 100 + c.blockM / 8;
    return Array.from({ length: run.iterations }, () => us);
  };
  const rounds = [
    { keep: Infinity, warmup: 0, iterations: 3, repeats: 1 },
    { keep: 2, warmup: 0, iterations: 10, repeats: 2 },
  ];
  const space = [cfg(8, 32, 8, 2), cfg(16, 32, 8, 2), cfg(24, 32, 8, 2), incumbent];
  const without = searchConfigs(space, measure, { rounds });
  assert.ok(!without.ranked.some((m) => sameConfig(m.config, incumbent)));
  const out = searchConfigs(space, measure, { rounds, incumbents: [incumbent] });
  assert.deepEqual(out.ranked.map((m) => configKey(m.config)), [
    "32/32/8/5",
    "8/32/8/2",
    "16/32/8/2",
  ]);
  assert.equal(configKey(chooseConfig(out).config), "32/32/8/5");
  // Variants of the finalists join the last round (the tuner's tail splits).
  const withTail = searchConfigs(space, measure, {
    rounds,
    variants: (c) => c.blockM === 8 ? [{ ...c, tailSplit: 4 }] : [],
  });
  assert.deepEqual(withTail.ranked.map((m) => configKey(m.config)), [
    "8/32/8/2",
    "8/32/8/2/t4",
    "16/32/8/2",
  ]);
});

Deno.test("searchConfigs: a variant joins the middle round, so a config good only with it is kept", () => {
  // ds M=512 on the H200 (bench/NOTES.md item 107): 64/32/8/2 is the fastest at balancedness 1
  // but slow at 0.6 unless its last wave runs as tail units (tail split 4). The middle round's
  // series 1 runs at 0.6; ranked without its variant there, the config never reaches the last
  // round.
  const good = cfg(64, 32, 8, 2), rival = cfg(64, 32, 8, 4);
  const times = new Map([
    ["64/32/8/2", [189, 266]],
    ["64/32/8/2/t4", [189, 223]],
    ["64/32/8/4", [206, 241]],
    ["64/32/8/3", [211, 248]],
    ["24/32/8/2", [202, 234]],
  ]);
  const measure: MeasureFn = (c, run) => {
    const us = times.get(configKey(c))![drawFor(run, 2)];
    return Array.from({ length: run.iterations }, () => us);
  };
  const rounds = [
    { keep: Infinity, warmup: 0, iterations: 3, repeats: 1 },
    { keep: 2, warmup: 0, iterations: 5, repeats: 2 },
    { keep: 1, warmup: 0, iterations: 5, repeats: 4 },
  ];
  const space = [good, rival, cfg(64, 32, 8, 3), cfg(24, 32, 8, 2)];
  const variants = (c: KernelConfig) => sameConfig(c, good) ? [{ ...c, tailSplit: 4 }] : [];
  const out = searchConfigs(space, measure, { rounds, variants });
  assert.equal(configKey(out.ranked[0].config), "64/32/8/2/t4");
  assert.equal(out.ranked[0].us, (189 + 223) / 2);
});

Deno.test("searchConfigs: each series says its round and repeat (the tuner's routing draws)", () => {
  const inner = syntheticMeasure();
  const seen = new Map<string, number>();
  const recording: MeasureFn = (c, run) => {
    const key = `${run.round}:${run.series}`;
    seen.set(key, (seen.get(key) ?? 0) + 1);
    return inner(c, run);
  };
  searchConfigs(seedSpace(), recording, { rounds: defaultRounds(40), baseline: cfg(64, 32, 8, 3) });
  // 160 single series, 8 single series, then the best 3 and the baseline in 4 repeats each.
  assert.deepEqual(
    [...seen].sort(),
    [["0:0", 160], ["1:0", 8], ["2:0", 4], ["2:1", 4], ["2:2", 4], ["2:3", 4]],
  );
});

Deno.test("searchConfigs: the last round averages its series, so one slow routing counts", () => {
  // Config A is 1 % faster than B on three series (routings) and 15 % slower on the fourth: a
  // pooled median of its samples would rank it first, the mean of the series' medians does not.
  const a = cfg(16, 32, 8, 2), b = cfg(16, 32, 8, 4);
  const measure: MeasureFn = (c, run) => {
    const us = sameConfig(c, a) ? (run.round === 1 && run.series === 3 ? 115 : 100) : 101;
    return Array.from({ length: run.iterations }, () => us);
  };
  const rounds = [
    { keep: Infinity, warmup: 0, iterations: 3, repeats: 1 },
    { keep: 2, warmup: 0, iterations: 10, repeats: 4 },
  ];
  const out = searchConfigs([a, b], measure, { rounds });
  assert.deepEqual(out.ranked.map((m) => configKey(m.config)), ["16/32/8/4", "16/32/8/2"]);
  assert.equal(out.ranked[1].us, 103.75);
  assert.equal(out.ranked[1].samples, 40);
});

Deno.test("searchConfigs: refused configs are skipped, fatal errors stop the search", () => {
  const inner = syntheticMeasure();
  const refusing: MeasureFn = (c, run) => {
    if (c.stages === 3) throw new UnsupportedError("needs too much shared memory");
    return inner(c, run);
  };
  const out = searchConfigs(seedSpace(), refusing);
  assert.equal(out.refused.length, 32);
  assert.equal(out.ranked[0].config.stages === 3, false);
  const fatal: MeasureFn = () => {
    throw new CudaFatalError("illegal address");
  };
  assert.throws(() => searchConfigs(seedSpace(), fatal), CudaFatalError);
  const none: MeasureFn = () => {
    throw new UnsupportedError("no");
  };
  assert.throws(() => searchConfigs([cfg(8, 32, 8, 1)], none), RangeError);
});

Deno.test("searchConfigs: a deadline cuts the first round after the minimum", () => {
  let clock = 0;
  const measure = syntheticMeasure();
  const timed: MeasureFn = (c, run) => {
    clock += 10;
    return measure(c, run);
  };
  const candidates = orderByHint(seedSpace(), cfg(24, 32, 8, 3));
  const out = searchConfigs(candidates, timed, { deadline: 200, now: () => clock });
  assert.ok(out.timed >= 12 && out.timed <= 21, `timed ${out.timed}`);
  assert.equal(out.timed + out.cut, 160);
  assert.equal(configKey(out.ranked[0].config), "24/32/8/3", "the hint came first");
});

Deno.test("chooseConfig: keeps the default config unless beaten by more than 1 %", () => {
  const def = cfg(16, 32, 8, 4);
  const other = cfg(8, 32, 8, 4);
  const m = (
    config: KernelConfig,
    us: number,
  ): { config: KernelConfig; us: number; samples: number } => ({
    config,
    us,
    samples: 40,
  });
  const base = { timed: 2, cut: 0, refused: [], launches: 0 };
  assert.deepEqual(
    chooseConfig({ ...base, ranked: [m(other, 99.5), m(def, 100)], baseline: m(def, 100) }).config,
    def,
  );
  assert.deepEqual(
    chooseConfig({ ...base, ranked: [m(other, 95), m(def, 100)], baseline: m(def, 100) }).config,
    other,
  );
  assert.deepEqual(chooseConfig({ ...base, ranked: [m(other, 95)] }).config, other);
});

Deno.test("chooseConfig: in a re-tune, the current entry is kept before the default", () => {
  const def = cfg(16, 32, 8, 4);
  const current = cfg(8, 32, 8, 2);
  const other = cfg(24, 32, 8, 2);
  const m = (config: KernelConfig, us: number) => ({ config, us, samples: 40 });
  const base = { timed: 3, cut: 0, refused: [], launches: 0 };
  // The default is the fastest by 0.4 %: the current entry stays.
  const near = [m(def, 99.6), m(current, 100), m(other, 101)];
  assert.deepEqual(
    chooseConfig({ ...base, ranked: near, baseline: near[0], incumbent: near[1] }).config,
    current,
  );
  // Beaten by more than 1 %: the fastest replaces it, whichever it is.
  const far = [m(other, 95), m(def, 99.6), m(current, 100)];
  assert.deepEqual(
    chooseConfig({ ...base, ranked: far, baseline: far[1], incumbent: far[2] }).config,
    other,
  );
});

Deno.test("searchConfigs reports the incumbent's last-round measurement", () => {
  const incumbent = cfg(32, 32, 8, 5);
  const measure: MeasureFn = (c) => [sameConfig(c, incumbent) ? 100.5 : 100 + c.blockM / 8];
  const space = [cfg(8, 32, 8, 2), cfg(16, 32, 8, 2), cfg(24, 32, 8, 2)];
  const rounds = [{ keep: 3, repeats: 1, warmup: 0, iterations: 3 }, {
    keep: 1,
    repeats: 2,
    warmup: 0,
    iterations: 3,
  }];
  const out = searchConfigs(space, measure, { rounds, incumbents: [incumbent] });
  assert.equal(configKey(out.incumbent!.config), "32/32/8/5");
  assert.equal(out.incumbent!.us, 100.5);
  // The incumbent (100.5 µs) beats every candidate (101-103 µs).
  assert.equal(configKey(chooseConfig(out).config), "32/32/8/5");
  assert.equal(searchConfigs(space, measure, { rounds }).incumbent, undefined);
});

Deno.test("tableJson: the seed's format, sorted, read back by parseConfigTable", () => {
  const text = tableJson([[512, cfg(32, 64, 4, 2)], [1, cfg(16, 32, 8, 5)], [
    64,
    cfg(8, 32, 8, 2),
  ]]);
  const json = JSON.parse(text);
  // The seed's get_best_config calls int() on every key: only integer keys.
  assert.deepEqual(Object.keys(json), ["1", "64", "512"]);
  assert.deepEqual(json["1"], { block_m: 16, block_n: 32, warp_n: 8, stages: 5 });
  assert.ok(text.indexOf(`"64"`) < text.indexOf(`"512"`), "keys in ascending order in the text");
  const table = parseConfigTable(json);
  assert.deepEqual(table.get(512), cfg(32, 64, 4, 2));
  assert.throws(() => tableJson([[1, cfg(12, 32, 8, 2)]]), ConfigError);
  // Our fields, only where they differ from the seed's kernel, each read back.
  const ours: [number, KernelConfig, string][] = [
    [2048, { ...cfg(80, 32, 8, 4), splitN: 2 }, `"stages": 4, "split_n": 2}`],
    [1, { ...cfg(8, 32, 8, 3), split: 7 }, `"stages": 3, "split": 7}`],
    [512, { ...cfg(32, 32, 8, 5), tailSplit: 4 }, `"stages": 5, "tail_split": 4}`],
  ];
  const oursText = tableJson(ours.map(([m, c]) => [m, c] as const));
  const oursTable = parseConfigTable(JSON.parse(oursText));
  for (const [m, c, tail] of ours) {
    assert.ok(oursText.includes(`"${m}": {"block_m": ${c.blockM}`), `key ${m}`);
    assert.ok(oursText.includes(`"warp_n": ${c.warpN}, ${tail}`), `${m}: ${tail}`);
    assert.deepEqual(oursTable.get(m), c);
  }
});

function result(M: number, bestUs: number, defUs: number): BatchResult {
  const c = defaultConfig(M);
  return {
    M,
    best: { config: c, us: bestUs, samples: 40 },
    fastest: { config: c, us: bestUs, samples: 40 },
    default: { config: c, us: defUs, samples: 40 },
    floorUs: bestUs / 2,
    floorBytes: 1e6,
    distinctExperts: 9,
    maxTokensPerExpert: M,
    candidates: 20,
    timed: 20,
    cut: 0,
    refused: 0,
    seconds: 0.5,
  };
}

Deno.test("results files: atomic write, read back, paths", async () => {
  assert.equal(
    resultsPathFor("configs/H100_E8_N256_K256.json"),
    "configs/H100_E8_N256_K256.meta.json",
  );
  assert.equal(resultsPathFor("table"), "table.meta.json");
  assert.equal(partialPathFor("x.json"), "x.json.partial");
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/sub/r.meta.json`;
    const file = {
      format: "alpha-moe tune results",
      version: 1,
      table: "r.json",
      metadata: { shape: MODEL_SHAPES.ds } as unknown as TuneResultsFile["metadata"],
      results: { "8": result(8, 20, 25), "1": result(1, 10, 10) },
    } satisfies TuneResultsFile;
    await writeTextFileAtomic(path, JSON.stringify(file));
    await writeTextFileAtomic(path, JSON.stringify(file)); // replacing works too
    const back = await readResultsFile(path);
    assert.deepEqual(resultsList(back).map((r) => r.M), [1, 8]);
    assert.deepEqual([...Deno.readDirSync(`${dir}/sub`)].map((e) => e.name), ["r.meta.json"]);
    await Deno.writeTextFile(`${dir}/bad.json`, `{"1": {}}`);
    await assert.rejects(() => readResultsFile(`${dir}/bad.json`), /not a tune results file/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

function resultsFile(date: string, budget: number, sizes: number[], us: number): TuneResultsFile {
  const metadata = {
    gpu: "H100",
    shape: MODEL_SHAPES.ds,
    balancedness: 1,
    date,
    gitCommit: `c-${date}`,
    search: { budgetSeconds: budget },
  } as unknown as TuneMetadata;
  return {
    format: "alpha-moe tune results",
    version: 1,
    table: "t.json",
    metadata,
    results: Object.fromEntries(sizes.map((m) => [String(m), result(m, us, us)])),
  };
}

Deno.test("mergeResults: new batch sizes replace, the others are kept and say which run", () => {
  const first = resultsFile("d1", 50, [1, 8, 64, 1024, 2048], 100);
  const second = mergeResults(first, resultsFile("d2", 45, [1024, 2048, 4096], 50));
  assert.deepEqual(resultsList(second).map((r) => [r.M, r.best.us]), [
    [1, 100],
    [8, 100],
    [64, 100],
    [1024, 50],
    [2048, 50],
    [4096, 50],
  ]);
  assert.equal(second.metadata.date, "d2");
  assert.deepEqual(second.metadata.kept, [
    { batchSizes: [1, 8, 64], date: "d1", gitCommit: "c-d1", budgetSeconds: 50, balancedness: 1 },
  ]);
  // A third run over part of the kept sizes: each kept size still names the run it came from.
  const third = mergeResults(second, resultsFile("d3", 30, [8, 4096], 20));
  assert.deepEqual(third.metadata.kept, [
    { batchSizes: [1024, 2048], date: "d2", gitCommit: "c-d2", budgetSeconds: 45, balancedness: 1 },
    { batchSizes: [1, 64], date: "d1", gitCommit: "c-d1", budgetSeconds: 50, balancedness: 1 },
  ]);
  // Nothing kept: no `kept`.
  assert.equal(
    mergeResults(first, resultsFile("d4", 10, [1, 8, 64, 1024, 2048], 1)).metadata.kept,
    undefined,
  );
  // Another routing: the merged file is the new run's, and each kept run names its own.
  const mixed = resultsFile("d5", 10, [1024, 2048], 1);
  mixed.metadata.balancedness = [1, 0.6];
  const fourth = mergeResults(first, mixed);
  assert.deepEqual(fourth.metadata.balancedness, [1, 0.6]);
  assert.deepEqual(fourth.metadata.kept, [
    { batchSizes: [1, 8, 64], date: "d1", gitCommit: "c-d1", budgetSeconds: 50, balancedness: 1 },
  ]);
  const other = resultsFile("d6", 10, [8], 1);
  other.metadata.gpu = "H200";
  assert.throws(() => mergeResults(first, other), /card H100, not H200/);
});

Deno.test("summaryTable and formatDuration", () => {
  const table = summaryTable([result(1, 10, 10), result(8, 20, 25)]);
  const lines = table.split("\n");
  assert.match(
    lines[0],
    /tokens\s+best \(bm\/bn\/wn\/st\)\s+best µs\s+default\s+default µs\s+gain/,
  );
  assert.match(table, /\+20\.0%/);
  assert.match(table, /\+0\.0%/);
  assert.match(table, /gain over the default config: median 10\.0%, max 20\.0%/);
  assert.equal(formatDuration(42.4), "42s");
  assert.equal(formatDuration(185), "3m05s");
});

Deno.test("resultLine says which config was kept over a faster one within noise", () => {
  const r = result(32, 100, 100);
  const faster = { config: cfg(8, 32, 8, 2), us: 99.6, samples: 40 };
  assert.match(
    resultLine({ ...r, fastest: faster }),
    /kept the default: 8\/32\/8\/2 was only 0\.4% faster/,
  );
  const current = { config: cfg(24, 32, 8, 2), us: 100, samples: 40 };
  assert.match(
    resultLine({ ...r, best: current, fastest: faster }),
    /kept the current entry: 8\/32\/8\/2 was only 0\.4% faster/,
  );
  assert.doesNotMatch(resultLine(r), /kept/);
});

Deno.test("the budget model: E=257 N=256 K=7168 top-k 9 over the seed's sizes fits in minutes", () => {
  const shape = MODEL_SHAPES.ds;
  const space = searchSpace();
  let seconds = 0;
  let configs = 0;
  for (const M of SEED_BATCH_SIZES) {
    const ids = balancedTopkIds({
      M,
      numExperts: shape.numExperts,
      topK: shape.topK,
      sharedExpert: true,
      balancedness: 1,
      seed: M,
    });
    const counts = tokensPerExpert(ids, shape.numExperts);
    const limit = blockMLimit(Math.max(...counts));
    const n = space.filter((c) =>
      c.blockM <= limit &&
      worthSplitting(c.split ?? 1, unitsOfWork(counts, c.blockM, shape.N), 132, c.splitN)
    ).length;
    configs += n;
    const floorUs = memoryFloorBytes({ M, ...shape }, ids) / 3e12 * 1e6;
    seconds += predictSeconds(shape, M, n, floorUs, defaultRounds(40), true);
  }
  // At most the seed's 160 per batch size plus our 80 of split_n 2 and a few splits.
  assert.ok(configs > 4000 && configs < 250 * SEED_BATCH_SIZES.length, `configs ${configs}`);
  // The model (kernel at 1.6x its floor or compute time, plus a 45 µs L2 flush per launch)
  // predicts well under the 420 s default budget; the budget itself is the guarantee.
  assert.ok(seconds > 10 && seconds < 120, `predicted ${seconds.toFixed(0)} s`);
});

Deno.test("sliceProblem: the first M tokens of a larger problem, new routing", () => {
  const base = makeRandomMoeProblem({
    M: 10,
    K: 256,
    N: 256,
    numExperts: 4,
    topK: 2,
    blockM: 8,
    seed: 1,
  });
  const ids = Int32Array.from([0, 1, 2, 3, 1, 2]);
  const p = sliceProblem(base, 3, ids);
  assert.equal(p.M, 3);
  assert.equal(p.x.length, 3 * 256);
  assert.equal(p.xScale.length, 3 * 2);
  assert.equal(p.topkWeights.length, 6);
  assert.equal(p.w, base.w);
  assert.equal(p.topkIds, ids);
  assert.throws(() => sliceProblem(base, 11, new Int32Array(22)), RangeError);
  assert.throws(() => sliceProblem(base, 3, new Int32Array(5)), RangeError);
});

// ---- per-card config files (src/config.ts) ----

Deno.test("gpuShortName and configFileName", () => {
  assert.equal(gpuShortName("NVIDIA H100 80GB HBM3"), "H100");
  assert.equal(gpuShortName("NVIDIA H200"), "H200");
  assert.equal(gpuShortName("NVIDIA H100 PCIe"), "H100");
  assert.equal(gpuShortName("NVIDIA GH200 480GB"), "GH200");
  assert.equal(gpuShortName("H800"), "H800");
  assert.throws(() => gpuShortName("NVIDIA"), ConfigError);
  assert.equal(
    configFileName("NVIDIA H100 80GB HBM3", 257, 256, 7168),
    "H100_E257_N256_K7168.json",
  );
  assert.equal(
    configFileName({ name: "NVIDIA H200" }, 512, 256, 2048),
    "H200_E512_N256_K2048.json",
  );
  assert.throws(() => configFileName("NVIDIA H100", 0, 256, 7168), ConfigError);
});

Deno.test("bundledConfig, pickConfig: ALPHA_MOE_CONFIG, own table, stand-in table, default", async () => {
  const dir = await Deno.makeTempDir();
  const dirUrl = pathToFileURL(`${dir}/`);
  const saved = Deno.env.get(CONFIG_ENV_VAR);
  Deno.env.delete(CONFIG_ENV_VAR);
  clearConfigCache();
  try {
    const shape = { numExperts: 257, N: 256, K: 7168 };
    const card = "NVIDIA H100 80GB HBM3";
    // No file: undefined, and pickConfig falls back to the default.
    assert.equal(bundledConfig(card, shape, 8, { dir: dirUrl }), undefined);
    assert.deepEqual(pickConfig(shape, 8, { card, dir: dirUrl }), defaultConfig(8));

    await Deno.writeTextFile(
      `${dir}/H100_E257_N256_K7168.json`,
      tableJson([[1, cfg(16, 32, 8, 5)], [64, cfg(8, 64, 4, 2)], [4096, cfg(80, 32, 8, 5)]]),
    );
    clearConfigCache(); // the absence was cached
    assert.deepEqual(bundledConfig(card, shape, 3000, { dir: dirUrl }), cfg(80, 32, 8, 5));
    assert.deepEqual(pickConfig(shape, 40, { card, dir: dirUrl }), cfg(8, 64, 4, 2));
    // An H200 without a table of its own takes the H100's; a card with no stand-in, or another
    // shape, has no table.
    assert.deepEqual(pickConfig(shape, 40, { card: "NVIDIA H200", dir: dirUrl }), cfg(8, 64, 4, 2));
    assert.equal(
      bundledTableFile("NVIDIA H200", shape, { dir: dirUrl })?.href,
      `${dirUrl.href}H100_E257_N256_K7168.json`,
    );
    assert.deepEqual(
      pickConfig(shape, 40, { card: "NVIDIA A100-SXM4-80GB", dir: dirUrl }),
      defaultConfig(40),
    );
    assert.deepEqual(
      pickConfig({ ...shape, K: 4096 }, 40, { card, dir: dirUrl }),
      defaultConfig(40),
    );
    // The seed's files (no metadata) and files with a "__metadata__" key both load.
    await Deno.writeTextFile(
      `${dir}/H200_E257_N256_K7168.json`,
      JSON.stringify({
        __metadata__: { card: "NVIDIA H200" },
        "1": { block_m: 24, block_n: 32, warp_n: 8, stages: 3 },
      }),
    );
    clearConfigCache(); // H200's absence was cached above
    // Its own table, once there, wins over the stand-in's.
    assert.deepEqual(bundledConfig("NVIDIA H200", shape, 5, { dir: dirUrl }), cfg(24, 32, 8, 3));
    assert.equal(
      bundledTableFile("NVIDIA H200", shape, { dir: dirUrl })?.href,
      `${dirUrl.href}H200_E257_N256_K7168.json`,
    );

    // ALPHA_MOE_CONFIG wins over the card's table.
    const envTable = `${dir}/mine.json`;
    await Deno.writeTextFile(envTable, tableJson([[1, cfg(128, 32, 8, 1)]]));
    Deno.env.set(CONFIG_ENV_VAR, envTable);
    assert.deepEqual(pickConfig(shape, 40, { card, dir: dirUrl }), cfg(128, 32, 8, 1));
    Deno.env.delete(CONFIG_ENV_VAR);

    // A broken table is an error, not a silent fallback.
    await Deno.writeTextFile(`${dir}/H100_E8_N256_K256.json`, `{"1": {"block_m": 12}}`);
    assert.throws(
      () => bundledConfig(card, { numExperts: 8, N: 256, K: 256 }, 1, { dir: dirUrl }),
      ConfigError,
    );
    // Not a local directory: no lookup.
    assert.equal(
      bundledConfig(card, shape, 1, { dir: new URL("https://example.com/configs/") }),
      undefined,
    );
  } finally {
    if (saved === undefined) Deno.env.delete(CONFIG_ENV_VAR);
    else Deno.env.set(CONFIG_ENV_VAR, saved);
    clearConfigCache();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("shipped tables: valid, every seed batch size, matching results files", async () => {
  const names = [...Deno.readDirSync(BUNDLED_CONFIG_DIR)].map((e) => e.name)
    .filter((n) => /^[A-Za-z0-9]+_E\d+_N\d+_K\d+\.json$/.test(n)).sort();
  assert.ok(names.length >= 8, `tables: ${names.join(", ")}`);
  for (const name of names) {
    const url = new URL(name, BUNDLED_CONFIG_DIR);
    const table = loadConfigTableSync(url); // throws on any invalid entry
    assert.deepEqual([...table.keys()], [...SEED_BATCH_SIZES], name);
    const [gpu, e, n, k] = name.replace(".json", "").split("_");
    const meta = await readResultsFile(resultsPathFor(url.pathname));
    assert.equal(meta.metadata.gpu, gpu, name);
    assert.equal(gpuShortName(meta.metadata.card), gpu, name);
    const { numExperts, N, K } = meta.metadata.shape;
    assert.deepEqual([`E${numExperts}`, `N${N}`, `K${K}`], [e, n, k], name);
    // Each entry is the config its results file chose.
    for (const r of resultsList(meta)) {
      assert.ok(sameConfig(table.get(r.M)!, r.best.config), `${name} M=${r.M}`);
    }
  }
});

Deno.test("parseConfigKey: the inverse of configKey; anything else is a RangeError", () => {
  for (
    const key of [
      "16/32/8/4",
      "8/64/4/3x8",
      "80/32/8/3/all",
      "80/32/8/4/n2",
      "32/32/8/5/t4",
      "8/32/8/2x8/t2",
    ]
  ) {
    assert.equal(configKey(parseConfigKey(key)), key);
  }
  assert.deepEqual(parseConfigKey(" 64/32/8/2/t4 "), {
    blockM: 64,
    blockN: 32,
    warpN: 8,
    stages: 2,
    tailSplit: 4,
  });
  // Fields at their default are absent, as in the tables.
  assert.deepEqual(parseConfigKey("16/32/8/4x1/n1/t1"), {
    blockM: 16,
    blockN: 32,
    warpN: 8,
    stages: 4,
  });
  for (
    const bad of [
      "",
      "16/32/8",
      "16/32/8/4/",
      "16/32/8/4/t",
      "a/32/8/4",
      "16/32/8/4/all/x2",
      "16/32/8/-4",
    ]
  ) {
    assert.throws(() => parseConfigKey(bad), RangeError, bad);
  }
});

Deno.test("drawFor: the first round on draw 0, series r of every later round on draw r", () => {
  const seq = (draws: number) =>
    [0, 1, 2].map((series) => drawFor({ round: 0, series }, draws)).concat(
      [0, 1, 2, 3, 4].flatMap((series) => [1, 2].map((round) => drawFor({ round, series }, draws))),
    );
  assert.deepEqual(seq(1), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
  assert.deepEqual(seq(2), [0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]);
  assert.deepEqual(seq(4), [0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 0, 0]);
});

Deno.test("defaultRounds: the middle round has one series per routing draw", () => {
  assert.equal(defaultRounds(40)[1].repeats, 1);
  assert.equal(defaultRounds(40, 2)[1].repeats, 2);
  assert.equal(defaultRounds(40, 2)[2].repeats, 4);
});
