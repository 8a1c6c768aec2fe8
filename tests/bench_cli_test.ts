// The benchmark scripts' option parsing (bench/_cli.ts): the parsers, the preamble's order (help,
// then usage errors (exit 2), then the GPU probe (exit 1)), and the scripts run as subprocesses
// with bad options, which must exit 2 naming the option on any machine, GPU or not.
import assert from "node:assert/strict";
import { runScript } from "./_run.ts";
import {
  benchPreamble,
  fractionList,
  intList,
  oneOf,
  positiveInt,
  shapeList,
  UsageError,
} from "../bench/_cli.ts";
import { MODEL_SHAPES } from "../src/tune.ts";

/** The permissions of the `bench:*` tasks in deno.json. */
const PERMISSIONS = ["--allow-read", "--allow-write", "--allow-env", "--allow-ffi"];

/** Asserts that `fn` throws a UsageError whose message names `option` and contains `bad`. */
function assertUsage(fn: () => unknown, option: string, bad: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof UsageError, String(err));
    assert.ok(err.message.startsWith(option), err.message);
    assert.ok(err.message.includes(`"${bad}"`), err.message);
    return true;
  });
}

Deno.test("intList: positive integers in order, repeats and spaces kept", () => {
  assert.deepEqual(intList("--m", "1,8,32"), [1, 8, 32]);
  assert.deepEqual(intList("--m", "8"), [8]);
  assert.deepEqual(intList("--m", "16, 8,16"), [16, 8, 16]);
  assert.deepEqual(intList("--tail-split", "", { allowEmpty: true }), []);
  assert.deepEqual(intList("--tail-split", "2,4", { allowEmpty: true }), [2, 4]);
});

Deno.test("intList: bad items and empty lists are usage errors naming the option", () => {
  for (const bad of ["x", "1.5", "0", "-8", "1e3", "0x10", "99999999999999999"]) {
    assertUsage(() => intList("--block-m", `8,${bad}`), "--block-m", bad);
  }
  assertUsage(() => intList("--block-m", "8,,16"), "--block-m", "8,,16");
  assertUsage(() => intList("--block-m", "8,"), "--block-m", "8,");
  assertUsage(() => intList("--m", ""), "--m", "");
  assertUsage(() => intList("--m", " "), "--m", " ");
  assertUsage(() => intList("--tail-split", "2,", { allowEmpty: true }), "--tail-split", "2,");
});

Deno.test("fractionList: balancedness values in [0, 1]", () => {
  assert.deepEqual(fractionList("--balancedness", "1,0.6"), [1, 0.6]);
  assert.deepEqual(fractionList("--balancedness", "0, .5,1.0"), [0, 0.5, 1]);
  for (const bad of ["1.5", "-0.1", "x", "NaN", "Infinity", "1e-1"]) {
    assertUsage(() => fractionList("--balancedness", `1,${bad}`), "--balancedness", bad);
  }
  assertUsage(() => fractionList("--balancedness", ""), "--balancedness", "");
  assertUsage(() => fractionList("--balancedness", "1,,0.5"), "--balancedness", "1,,0.5");
});

Deno.test("positiveInt, oneOf, shapeList", () => {
  assert.equal(positiveInt("--iterations", "50"), 50);
  for (const bad of ["0", "-1", "2.5", "x", ""]) {
    assertUsage(() => positiveInt("--iterations", bad), "--iterations", bad);
  }
  assert.equal(oneOf("--flush", "write", ["read", "write", "none"]), "write");
  assertUsage(() => oneOf("--flush", "wirte", ["read", "write", "none"]), "--flush", "wirte");
  const names = Object.keys(MODEL_SHAPES);
  assert.deepEqual(shapeList("--shapes", names.join(",")), names);
  assert.deepEqual(shapeList("--shapes", "ds"), ["ds"]);
  for (const bad of ["dsx", "toString", "__proto__"]) {
    assertUsage(() => shapeList("--shapes", `ds,${bad}`), "--shapes", bad);
  }
  assertUsage(() => shapeList("--shapes", ""), "--shapes", "");
});

Deno.test("benchPreamble: help first, then usage errors (2), other errors thrown", () => {
  const logged: string[] = [];
  const { log, error } = console;
  console.log = (...args: unknown[]) => logged.push(`out: ${args.join(" ")}`);
  console.error = (...args: unknown[]) => logged.push(`err: ${args.join(" ")}`);
  try {
    const never = (): never => {
      throw new Error("parsed with --help");
    };
    assert.equal(benchPreamble("bench:x", "HELP TEXT", true, never), 0);
    assert.deepEqual(logged, ["out: HELP TEXT"]);
    logged.length = 0;
    const bad = (): { m: number[] } => ({ m: intList("--m", "1,y") });
    assert.equal(benchPreamble("bench:x", "HELP TEXT", false, bad), 2);
    assert.equal(logged.length, 1);
    assert.match(logged[0], /^err: bench:x: --m: "y" is not a positive integer/);
    assert.throws(() => benchPreamble("bench:x", "", false, never), /parsed with --help/);
  } finally {
    console.log = log;
    console.error = error;
  }
});

function bench(
  script: string,
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  return runScript(`bench/${script}`, PERMISSIONS, args);
}

Deno.test("bench scripts: bad options exit 2 naming the option, before the GPU probe", async () => {
  const cases: [string, string[], RegExp][] = [
    ["kernel.ts", ["--block-m", "8,x"], /^bench:kernel: --block-m: "x" .*"8,x"/m],
    ["kernel.ts", ["--shapes", "ds,nope"], /^bench:kernel: --shapes: unknown shape "nope"/m],
    ["kernel.ts", ["--tail-split", "2,,4"], /^bench:kernel: --tail-split: empty item/m],
    ["kernel.ts", ["--flush", "never"], /^bench:kernel: --flush must be one of .*"never"/m],
    ["targets.ts", ["--m", "1,0"], /^bench:targets: --m: "0" .*"1,0"/m],
    ["targets.ts", ["--balancedness", "2"], /^bench:targets: --balancedness: "2"/m],
    ["targets.ts", ["--fp8-tflops=-3"], /^bench:targets: --fp8-tflops .*"-3"/m],
    ["layer.ts", ["--iterations", "ten"], /^bench:layer: --iterations .*"ten"/m],
    ["layer.ts", ["--path", "fast"], /^bench:layer: --path must be one of .*"fast"/m],
    ["kernel.ts", ["--nope"], /^bench:kernel: .*--nope/m],
    ["targets.ts", ["--m"], /^bench:targets: .*--m/m],
    ["launch.ts", ["--shape", "dx", "--m", "8"], /^bench:launch: --shape must be one of .*"dx"/m],
    ["launch.ts", ["--shape", "ds"], /^bench:launch: --m .*""/m],
    [
      "launch.ts",
      ["--shape", "ds", "--m", "8", "--config", "12/32/8/2"],
      /^bench:launch: --config: "12\/32\/8\/2": block_m/m,
    ],
    [
      "launch.ts",
      ["--shape", "ds", "--m", "8", "--config", "64/32/x"],
      /^bench:launch: --config: "64\/32\/x" is not a config key/m,
    ],
    [
      "launch.ts",
      ["--shape", "ds", "--m", "8", "--balancedness", "1,0.6"],
      /^bench:launch: --balancedness takes one value/m,
    ],
  ];
  await Promise.all(cases.map(async ([script, args, expected]) => {
    const { code, stdout, stderr } = await bench(script, args);
    const what = `${script} ${args.join(" ")}: ${stdout}\n${stderr}`;
    assert.equal(code, 2, what);
    assert.match(stderr, expected, what);
    assert.doesNotMatch(stderr, /needs a Hopper GPU/, what);
  }));
});

Deno.test("bench scripts: --help exits 0 even with bad options", async () => {
  for (const script of ["kernel.ts", "targets.ts", "layer.ts", "launch.ts"]) {
    const { code, stdout, stderr } = await bench(script, ["--help", "--m", "x"]);
    assert.equal(code, 0, `${script}: ${stderr}`);
    assert.match(stdout, /^Usage: deno task bench:/, script);
  }
});
