/**
 * `deno task sanitize`: runs the fused kernel once per (block_n, warp_n) pair, without and with
 * split units (clusters of 4), with both weight layouts, on a small random problem under
 * compute-sanitizer (memcheck, then racecheck), with the -lineinfo build. block_m 8 leaves the
 * routing's last block part-filled, which the kernel must not read past; K = 384 leaves the last
 * down tile half past K (zero-filled from row-major weights, padding in stored tiles). One more
 * run at block_m 80 per N of 256 and 768 covers the warpgroups on separate token halves, one CTA
 * per slice and as N halves (split_n 2: pairs of CTAs that swap their amax and FP8 halves through
 * distributed shared memory), as is block_m 8 with (32, 8); then all_slices at block_m 80 and 24
 * (one CTA over every slice, on token halves and on one shared sub-tile).
 * A problem with more units than SMs runs its last wave's units as tail units, and one with more
 * token blocks than SMs runs its last wave's blocks one CTA per slice in an all-slices launch.
 * `--child` is the part that runs under the sanitizer.
 *
 * @module
 */
import $ from "@david/dax";
import { DeviceMoeProblem } from "../src/problem.ts";
import type { KernelConfig } from "../src/config.ts";
import { deviceInfo } from "../src/device.ts";
import { makeProblemWithTail, makeRandomMoeProblem, type MoeProblem } from "../src/random.ts";
import { fusedMoeReference, relativeL2 } from "../src/reference.ts";
import { buildLibrary } from "./nvcc.ts";

const PAIRS = [[64, 4], [32, 8]] as const;

function child(): void {
  const p = makeRandomMoeProblem({
    M: 37,
    K: 384,
    N: 512,
    numExperts: 8,
    topK: 3,
    blockM: 8,
    seed: 11,
  });
  for (const weightLayout of ["tiles", "rows"] as const) {
    using dev = new DeviceMoeProblem(p, { dropExperts: [2], weightLayout });
    const ref = reference(dev, p);
    for (const [blockN, warpN] of PAIRS) {
      for (const split of [1, 4]) {
        check(dev, ref, { blockM: 8, blockN, warpN, stages: 2, split }, weightLayout);
      }
    }
    check(
      dev,
      ref,
      { blockM: 8, blockN: 32, warpN: 8, stages: 2, split: 1, splitN: 2 },
      weightLayout,
    );
  }
  // ~75 slots per expert: blocks of 80 are one sub-tile with each consumer warpgroup on its own
  // half of the tokens, the second half part-filled; with N = 768 one CTA covers three slices.
  for (const N of [256, 768]) {
    const big = makeRandomMoeProblem({
      M: 150,
      K: 384,
      N,
      numExperts: 4,
      topK: 2,
      blockM: 8,
      seed: 12,
    });
    using dev = new DeviceMoeProblem(big);
    const ref = reference(dev, big);
    for (const splitN of [1, 2]) {
      check(
        dev,
        ref,
        { blockM: 80, blockN: 32, warpN: 8, stages: 2, split: 1, splitN },
        `tiles, N ${N}`,
      );
    }
    // One CTA over every slice: on token halves, and on one shared sub-tile of 24 tokens.
    for (const blockM of [80, 24]) {
      check(
        dev,
        ref,
        { blockM, blockN: 32, warpN: 8, stages: 2, split: 1, allSlices: true },
        `tiles, N ${N}`,
      );
    }
  }
  // More units than one wave: the last wave's units run in a second, dependent launch, as
  // clusters of 4 CTAs that split each unit by K.
  const { smCount } = deviceInfo();
  const opts = { M: 200, K: 256, N: 512, numExperts: 16, topK: 4, blockM: 8, seed: 13 };
  const tail = makeProblemWithTail(opts, 8, 4, smCount);
  using dev = new DeviceMoeProblem(tail);
  check(
    dev,
    reference(dev, tail),
    { blockM: 8, blockN: 32, warpN: 8, stages: 2, split: 1, tailSplit: 4 },
    `tiles, M ${tail.M}`,
  );
  // An all-slices launch of more blocks than one wave: it runs its last partial wave's blocks
  // one CTA per slice, after the whole blocks.
  const wideOpts = { M: 600, K: 256, N: 768, numExperts: 16, topK: 4, blockM: 8, seed: 14 };
  const wide = makeProblemWithTail(wideOpts, 16, 3, smCount, 1);
  using wideDev = new DeviceMoeProblem(wide);
  check(
    wideDev,
    reference(wideDev, wide),
    { blockM: 16, blockN: 32, warpN: 8, stages: 4, split: 1, allSlices: true },
    `tiles, M ${wide.M}, N 768`,
  );
}

function reference(dev: DeviceMoeProblem, p: MoeProblem): Float32Array {
  return fusedMoeReference({ ...p, ...dev.routing(8), requant: true });
}

function check(
  dev: DeviceMoeProblem,
  ref: Float32Array,
  config: KernelConfig & { split: number },
  weightLayout: string,
): void {
  dev.run(config);
  const err = relativeL2(dev.readOut(), ref);
  const what = `${weightLayout}, block_m ${config.blockM} (${config.blockN}, ${config.warpN}) ` +
    `split ${config.split}` + (config.allSlices ? " all_slices" : "") +
    ((config.splitN ?? 1) > 1 ? ` split_n ${config.splitN}` : "") +
    ((config.tailSplit ?? 1) > 1 ? ` tail_split ${config.tailSplit}` : "");
  console.log(`${what}: relative L2 ${err.toExponential(3)}`);
  if (!(err <= 1e-2)) throw new Error(`${what} is wrong under the sanitizer`);
}

async function main(): Promise<number> {
  if (!(await $.commandExists("compute-sanitizer"))) {
    console.error("compute-sanitizer is not on PATH (it ships with the CUDA toolkit)");
    return 1;
  }
  const lib = await buildLibrary({ debug: true, quiet: true });
  const script = $.path(new URL(import.meta.url)).toString();
  let failed = 0;
  for (const tool of ["memcheck", "racecheck"]) {
    const result =
      await $`compute-sanitizer --tool ${tool} --error-exitcode 3 ${Deno.execPath()} run -A --cached-only ${script} --child`
        .env({ ALPHA_MOE_LIB: lib.path })
        .noThrow();
    console.log(`${tool}: ${result.code === 0 ? "clean" : `FAILED (exit ${result.code})`}`);
    if (result.code !== 0) failed++;
  }
  return failed === 0 ? 0 : 1;
}

if (import.meta.main) {
  if (Deno.args.includes("--child")) child();
  else Deno.exit(await main());
}
