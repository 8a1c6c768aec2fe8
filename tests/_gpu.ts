/**
 * Probes the GPU once for every GPU test: `Deno.test({ ignore: !gpu, … })` reports a skipped test
 * as "ignored" (never as a silent pass), and the reason is printed once per test module.
 *
 * @module
 */
import { probeHopperGpu } from "../src/device.ts";

const probe = probeHopperGpu();

/** true when the library loads and device 0 is a Hopper GPU. */
export const gpu: boolean = probe.ok;

/** Why the GPU tests are skipped ("" when they run). */
export const gpuIgnoreReason: string = probe.ok ? "" : probe.reason.split("\n")[0];

if (!gpu) console.log(`GPU tests ignored: ${gpuIgnoreReason}`);

/** A test that runs only on a Hopper GPU (reported as ignored elsewhere). */
export function gpuTest(name: string, fn: (t: Deno.TestContext) => void | Promise<void>): void {
  Deno.test({ name, ignore: !gpu, fn });
}
