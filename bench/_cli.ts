/**
 * What every GPU benchmark script does before measuring: print its help when asked, and refuse
 * (exit 1, saying why) without a Hopper GPU.
 *
 * @module
 */
import { probeHopperGpu } from "../src/device.ts";

/** The exit code to stop with (help printed: 0; no Hopper GPU: 1), or undefined to go on. */
export function benchPreamble(
  task: string,
  help: string,
  helpRequested: boolean,
): number | undefined {
  if (helpRequested) {
    console.log(help);
    return 0;
  }
  const probe = probeHopperGpu();
  if (!probe.ok) {
    console.error(`${task} needs a Hopper GPU: ${probe.reason}`);
    return 1;
  }
  return undefined;
}
