import assert from "node:assert/strict";
import {
  clearConfigCache,
  CONFIG_ENV_VAR,
  ConfigError,
  configFromEnv,
  configProblem,
  DEFAULT_CONFIGS,
  defaultConfig,
  type KernelConfig,
  loadConfigTable,
  loadConfigTableSync,
  parseConfigTable,
  selectConfig,
  tailSplitAllowed,
  VALID_BLOCK_N_WARP_N,
} from "../src/config.ts";

const seedConfig = (name: string): URL =>
  new URL(`../../shared/seed/configs/${name}`, import.meta.url);
const SEED_257 = seedConfig("moe_jit_257_256_7168.json");
const SEED_512 = seedConfig("moe_jit_512_256_2048.json");
const haveSeedConfigs = ((): boolean => {
  try {
    Deno.statSync(SEED_257);
    Deno.statSync(SEED_512);
    return true;
  } catch {
    return false;
  }
})();

const cfg = (blockM: number, blockN: number, warpN: number, stages: number): KernelConfig => ({
  blockM,
  blockN,
  warpN,
  stages,
});
const entry = (block_m: number, block_n = 32, warp_n = 8, stages = 4): Record<string, number> => ({
  block_m,
  block_n,
  warp_n,
  stages,
});

function assertConfigError(fn: () => unknown, pattern: RegExp, key?: string, field?: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ConfigError, `expected ConfigError, got ${e}`);
    assert.match(e.message, pattern);
    assert.equal(e.key, key);
    assert.equal(e.field, field);
    return true;
  });
}

Deno.test({
  name: "both seed tables parse, sync and async, and look up as the seed would",
  ignore: !haveSeedConfigs,
  fn: async () => {
    const t257 = await loadConfigTable(SEED_257);
    const t512 = loadConfigTableSync(SEED_512);
    assert.equal(t257.size, 48);
    assert.equal(t512.size, 48);
    const keys = [...t257.keys()];
    assert.deepEqual(keys, [...keys].sort((a, b) => a - b), "ascending");
    // Exact keys.
    assert.deepEqual(selectConfig(t257, 1), cfg(16, 32, 8, 5));
    assert.deepEqual(selectConfig(t257, 8192), cfg(72, 32, 8, 5));
    assert.deepEqual(selectConfig(t512, 2560), cfg(40, 32, 8, 5));
    // Nearest key.
    assert.deepEqual(selectConfig(t257, 0), selectConfig(t257, 1));
    assert.deepEqual(selectConfig(t257, 1000), cfg(32, 64, 4, 2)); // 1024
    assert.deepEqual(selectConfig(t257, 1_000_000), cfg(72, 32, 8, 5)); // 8192
    assert.deepEqual(selectConfig(t512, 150), cfg(8, 32, 8, 4)); // 160
    // Ties: the smaller key wins (the seed's strict "<" over an ascending file).
    assert.deepEqual(selectConfig(t257, 9), cfg(8, 32, 8, 4)); // 8 vs 10
    assert.deepEqual(selectConfig(t257, 352), cfg(8, 64, 4, 1)); // 320 vs 384 (384: 16,64,4,1)
    assert.deepEqual(selectConfig(t512, 22), cfg(8, 64, 4, 4)); // 20 vs 24 (24: 8,32,8,3)
  },
});

Deno.test("tie-breaking: the smaller key wins, whatever the JSON key order", () => {
  const a = parseConfigTable({ "8": entry(8), "10": entry(16) });
  const b = parseConfigTable({ "10": entry(16), "8": entry(8) });
  for (const t of [a, b]) {
    assert.equal(selectConfig(t, 9).blockM, 8);
    assert.equal(selectConfig(t, 9.5).blockM, 16);
    assert.equal(selectConfig(t, 8.5).blockM, 8);
    assert.equal(selectConfig(t, 11).blockM, 16);
  }
  // Three-way: 4 and 12 equally far from 8 once 8 is absent.
  const c = parseConfigTable({ "12": entry(24), "4": entry(16), "100": entry(32) });
  assert.equal(selectConfig(c, 8).blockM, 16);
  assert.equal(selectConfig(c, 56).blockM, 24); // 12 (44) vs 100 (44): smaller wins
});

Deno.test("parse: __metadata__ and extra fields are ignored, entries frozen", () => {
  const t = parseConfigTable({
    __metadata__: { tuned_on: "H100", E: 257 },
    "64": { ...entry(64, 64, 4, 3), time_us: 12.5 },
  });
  assert.equal(t.size, 1);
  const c = t.get(64)!;
  assert.deepEqual(c, cfg(64, 64, 4, 3));
  assert.ok(Object.isFrozen(c));
});

Deno.test("parse: malformed tables name the key and field", () => {
  assertConfigError(() => parseConfigTable([]), /expected a JSON object/);
  assertConfigError(() => parseConfigTable(null, "x.json"), /^x\.json: expected/);
  assertConfigError(() => parseConfigTable({}), /no entries/);
  assertConfigError(() => parseConfigTable({ __metadata__: {} }), /no entries/);
  for (const key of ["abc", "1.5", "-8", "08", "+8", " 8", "1e3", ""]) {
    assertConfigError(
      () => parseConfigTable({ [key]: entry(8) }),
      /not a non-negative integer token count/,
      key,
    );
  }
  assertConfigError(() => parseConfigTable({ "8": 5 }), /key "8": entry is not an object/, "8");
  const { block_n: _, ...noBlockN } = entry(8);
  assertConfigError(
    () => parseConfigTable({ "8": noBlockN }, "t.json"),
    /^t\.json: key "8": missing field "block_n"/,
    "8",
    "block_n",
  );
  assertConfigError(
    () => parseConfigTable({ "8": { ...entry(8), stages: 2.5 } }),
    /key "8": field "stages" must be an integer, got 2.5/,
    "8",
    "stages",
  );
  assertConfigError(
    () => parseConfigTable({ "8": { ...entry(8), warp_n: "8" } }),
    /field "warp_n" must be an integer, got "8"/,
    "8",
    "warp_n",
  );
  for (const bm of [0, 4, 12, 136, -8]) {
    assertConfigError(
      () => parseConfigTable({ "16": entry(bm) }),
      /key "16": block_m must be a multiple of 8 in 8\.\.128/,
      "16",
      "block_m",
    );
  }
  for (const [bn, wn] of [[64, 8], [32, 4], [128, 2], [16, 16]]) {
    assertConfigError(
      () => parseConfigTable({ "16": entry(8, bn, wn) }),
      /\(block_n, warp_n\) = .* is not one of \(64, 4\), \(32, 8\)/,
      "16",
      "block_n/warp_n",
    );
  }
  for (const st of [0, 9]) {
    assertConfigError(
      () => parseConfigTable({ "16": entry(8, 32, 8, st) }),
      /stages must be in 1\.\.8/,
      "16",
      "stages",
    );
  }
  // Bounds are inclusive.
  assert.equal(parseConfigTable({ "1": entry(128, 32, 8, 8) }).get(1)!.blockM, 128);
  assert.equal(parseConfigTable({ "1": entry(8, 64, 4, 1) }).get(1)!.stages, 1);
});

const writeGranted = (await Deno.permissions.query({ name: "write" })).state === "granted";

Deno.test("load: a file that is not JSON", {
  ignore: !writeGranted, // needs a temp file; the parse tests cover the rest without it
}, async () => {
  const dir = await Deno.makeTempDir();
  try {
    const bad = `${dir}/bad.json`;
    await Deno.writeTextFile(bad, "{oops");
    await assert.rejects(() => loadConfigTable(bad), /bad\.json: not valid JSON/);
    assert.throws(() => loadConfigTableSync(bad), ConfigError);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("VALID_BLOCK_N_WARP_N lists the kernel's two pairs and cannot be mutated", () => {
  assert.deepEqual(VALID_BLOCK_N_WARP_N.map((p) => [...p]), [[64, 4], [32, 8]]);
  assert.ok(Object.isFrozen(VALID_BLOCK_N_WARP_N));
});

Deno.test("selectConfig rejects non-finite token counts and empty tables", () => {
  const t = parseConfigTable({ "8": entry(8) });
  assert.throws(() => selectConfig(t, NaN), RangeError);
  assert.throws(() => selectConfig(t, Infinity), RangeError);
  assert.throws(() => selectConfig(new Map(), 8), ConfigError);
});

Deno.test("defaultConfig follows its documented table; all defaults are valid", () => {
  assert.deepEqual(defaultConfig(1), cfg(16, 32, 8, 4));
  assert.deepEqual(defaultConfig(32), cfg(16, 32, 8, 4));
  assert.deepEqual(defaultConfig(33), cfg(32, 32, 8, 4));
  assert.deepEqual(defaultConfig(512), cfg(32, 32, 8, 4));
  assert.deepEqual(defaultConfig(513), cfg(64, 32, 8, 3));
  assert.deepEqual(defaultConfig(1e9), cfg(64, 32, 8, 3));
  for (const row of DEFAULT_CONFIGS) assert.equal(configProblem(row.config), undefined);
  assert.match(configProblem(cfg(8, 64, 8, 2))!, /block_n, warp_n/);
  assert.match(configProblem(cfg(8.5, 64, 4, 2))!, /integer/);
});

const envGranted = (await Deno.permissions.query({ name: "env", variable: CONFIG_ENV_VAR }))
  .state === "granted";

Deno.test({
  name: "configFromEnv: unset or empty -> undefined; a path -> nearest config",
  ignore: !envGranted || !haveSeedConfigs,
  fn: () => {
    const saved = Deno.env.get(CONFIG_ENV_VAR);
    try {
      Deno.env.delete(CONFIG_ENV_VAR);
      assert.equal(configFromEnv(8), undefined);
      Deno.env.set(CONFIG_ENV_VAR, "");
      assert.equal(configFromEnv(8), undefined);
      Deno.env.set(CONFIG_ENV_VAR, SEED_257.pathname);
      clearConfigCache();
      assert.deepEqual(configFromEnv(9), cfg(8, 32, 8, 4));
      assert.deepEqual(configFromEnv(7000), cfg(80, 32, 8, 4)); // 7168
      Deno.env.set(CONFIG_ENV_VAR, SEED_257.pathname + ".missing");
      assert.throws(() => configFromEnv(8), Deno.errors.NotFound);
    } finally {
      if (saved === undefined) Deno.env.delete(CONFIG_ENV_VAR);
      else Deno.env.set(CONFIG_ENV_VAR, saved);
      clearConfigCache();
    }
  },
});

const runGranted = (await Deno.permissions.query({ name: "run", command: Deno.execPath() }))
  .state === "granted";

Deno.test({
  name: "configFromEnv: without --allow-env the NotCapable error propagates",
  ignore: !runGranted,
  fn: async () => {
    const mod = new URL("../src/config.ts", import.meta.url).href;
    const code = `import { configFromEnv } from ${JSON.stringify(mod)};
try { configFromEnv(8); console.log("no error"); }
catch (e) { console.log(e instanceof Deno.errors.NotCapable ? "NotCapable" : String(e)); }`;
    // `deno run -` (program on stdin) with no permission flags: `deno eval` would grant all.
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--no-prompt", "--no-lock", "-"],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1", [CONFIG_ENV_VAR]: "/nonexistent.json" },
    }).spawn();
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(code));
    await writer.close();
    const out = await child.output();
    const text = new TextDecoder().decode(out.stdout).trim();
    assert.equal(text, "NotCapable", new TextDecoder().decode(out.stderr));
  },
});

Deno.test("parse: split is optional (absent = 1), an integer in 1..16", () => {
  const t = parseConfigTable({ "1": { ...entry(8), split: 8 }, "64": entry(16) });
  assert.equal(t.get(1)!.split, 8);
  assert.equal(t.get(64)!.split, undefined);
  for (const bad of [0, 17, -1]) {
    assertConfigError(
      () => parseConfigTable({ "1": { ...entry(8), split: bad } }),
      /key "1": split must be an integer in 1\.\.16/,
      "1",
      "split",
    );
  }
  assertConfigError(
    () => parseConfigTable({ "1": { ...entry(8), split: "8" } }),
    /field "split" must be an integer/,
    "1",
    "split",
  );
  assert.match(configProblem({ blockM: 8, blockN: 32, warpN: 8, stages: 2, split: 1.5 })!, /split/);
});

Deno.test("parse: split_n is optional (absent = 1), 1 or 2, 2 only for (32, 8) split 1", () => {
  const halves = { block_m: 80, block_n: 32, warp_n: 8, stages: 4, split_n: 2 };
  const t = parseConfigTable({
    "512": halves,
    "1024": { ...halves, split_n: 1 },
    "2048": { ...halves, block_m: 8 },
  });
  assert.equal(t.get(512)!.splitN, 2);
  assert.equal(t.get(1024)!.splitN, undefined);
  assert.equal(t.get(2048)!.splitN, 2);
  assertConfigError(
    () => parseConfigTable({ "1": { ...halves, split_n: true } }),
    /field "split_n" must be an integer/,
    "1",
    "split_n",
  );
  assertConfigError(
    () => parseConfigTable({ "1": { ...halves, split_n: 4 } }),
    /key "1": split_n must be 1 or 2, got 4/,
    "1",
    "split_n",
  );
  for (const bad of [{ block_n: 64, warp_n: 4 }, { split: 2 }, { all_slices: true }]) {
    assertConfigError(
      () => parseConfigTable({ "1": { ...halves, ...bad } }),
      /key "1": split_n 2 needs \(block_n, warp_n\) = \(32, 8\), split 1 and no all_slices/,
      "1",
      "split_n",
    );
  }
});

Deno.test("parse: tail_split is optional (absent = 1), 1..16, 2 only for blocks of 72-80 with (32, 8)", () => {
  const base = { block_m: 32, block_n: 32, warp_n: 8, stages: 4 };
  const t = parseConfigTable({
    "512": { ...base, tail_split: 8 },
    "1024": { ...base, tail_split: 1 },
    "2048": { ...base, block_m: 80, tail_split: 2 },
  });
  assert.equal(t.get(512)!.tailSplit, 8);
  assert.equal(t.get(1024)!.tailSplit, undefined);
  assert.equal(t.get(2048)!.tailSplit, 2);
  assertConfigError(
    () => parseConfigTable({ "1": { ...base, tail_split: "4" } }),
    /field "tail_split" must be an integer/,
    "1",
    "tail_split",
  );
  assertConfigError(
    () => parseConfigTable({ "1": { ...base, tail_split: 17 } }),
    /key "1": tail_split must be an integer in 1..16, got 17/,
    "1",
    "tail_split",
  );
  for (
    const bad of [{ split: 2 }, { split_n: 2 }, { block_m: 80, all_slices: true }, {
      block_m: 80,
    }]
  ) {
    assertConfigError(
      () => parseConfigTable({ "1": { ...base, tail_split: 4, ...bad } }),
      /key "1": tail_split 4 needs split 1, split_n 1 and no all_slices, and 2 for block_m 72 or 80/,
      "1",
      "tail_split",
    );
  }
  assert.ok(tailSplitAllowed({ blockM: 80, blockN: 64, warpN: 4, stages: 3 }, 4));
});

Deno.test("parse: all_slices is optional (absent = false), a boolean, only for 72/80 (32, 8) split 1", () => {
  const all = { block_m: 80, block_n: 32, warp_n: 8, stages: 3, all_slices: true };
  const t = parseConfigTable({
    "2048": all,
    "4096": { ...all, all_slices: false },
    "8192": { ...all, block_m: 72 },
  });
  assert.equal(t.get(2048)!.allSlices, true);
  assert.equal(t.get(4096)!.allSlices, undefined);
  assert.equal(t.get(8192)!.allSlices, true);
  assertConfigError(
    () => parseConfigTable({ "1": { ...all, all_slices: 1 } }),
    /field "all_slices" must be true or false/,
    "1",
    "all_slices",
  );
  for (const bad of [{ block_m: 96 }, { block_n: 64, warp_n: 4 }, { split: 2 }]) {
    assertConfigError(
      () => parseConfigTable({ "1": { ...all, ...bad } }),
      /key "1": all_slices needs \(block_n, warp_n\) = \(32, 8\), split 1 and block_m at most 64/,
      "1",
      "all_slices",
    );
  }
  assert.equal(
    configProblem({ blockM: 80, blockN: 32, warpN: 8, stages: 3, allSlices: true }),
    undefined,
  );
});
