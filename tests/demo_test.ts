// `deno task demo` (the main command) as a user runs it: a subprocess with the task's
// permissions. On a Hopper GPU it must run and check the fused kernel; elsewhere it must say
// that it ran the CPU reference only, and still succeed.
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { gpu } from "./_gpu.ts";
import { runScript } from "./_run.ts";

const DEMO = fileURLToPath(new URL("../tasks/demo.ts", import.meta.url));
/** The permissions of the `demo` task in deno.json. */
const PERMISSIONS = [
  "--allow-read",
  "--allow-write",
  "--allow-run",
  "--allow-env",
  "--allow-ffi",
];

function demo(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return runScript(DEMO, PERMISSIONS, args);
}

Deno.test(`deno task demo: exit 0, ${gpu ? "the fused kernel checked" : "the CPU path"}`, async () => {
  const { code, stdout, stderr } = await demo([]);
  const all = `${stdout}\n${stderr}`;
  assert.equal(code, 0, all);
  assert.match(stdout, /^library: /m, all);
  if (gpu) {
    assert.match(stdout, /^fused kernel: [\d.]+ µs/m, all);
    assert.match(stdout, /relative L2 \S+ <= 0\.01: ok$/m, all);
    assert.doesNotMatch(stdout, /no Hopper GPU/, all);
  } else {
    assert.match(stdout, /^no Hopper GPU: ran the CPU reference only \(.+\)$/m, all);
    assert.match(stdout, /checksum: sum -?[\d.e+-]+, sum\|x\| [\d.e+-]+/, all);
    assert.match(stdout, /row 3: L2 norm [\d.e+]+/, all);
    // The CPU reference is deterministic for a seed.
    const again = await demo([]);
    const checksum = (text: string): string | undefined => /checksum: .*/.exec(text)?.[0];
    assert.equal(checksum(again.stdout), checksum(stdout));
  }
});

Deno.test("deno task demo --help, and bad options exit 2", async () => {
  const help = await demo(["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /--shape/);
  assert.match(help.stdout, /--rows/);
  for (const bad of [["--shape", "huge"], ["--m", "0"], ["--rows", "x"], ["--nope"]]) {
    const result = await demo(bad);
    assert.equal(result.code, 2, `${bad.join(" ")}: ${result.stderr}`);
    assert.match(result.stderr, /Usage: deno task demo/);
  }
});
