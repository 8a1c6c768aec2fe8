/**
 * `deno task build [--debug] [--force]`: builds build/libalpha_moe.so (or libalpha_moe_debug.so)
 * with nvcc. The flags and the build itself live in tasks/nvcc.ts.
 *
 * @module
 */
import { relative } from "node:path";
import { parseArgs } from "node:util";
import { buildLibrary, NVCC_DEBUG_FLAGS, NVCC_FLAGS, NvccError } from "./nvcc.ts";

const HELP = `Usage: deno task build [--debug] [--force] [--quiet]

Compiles cuda/*.cu (in parallel) and links build/libalpha_moe.so with nvcc.
Nothing is rebuilt when the sources, the flags and nvcc's version are unchanged.

Options:
  --debug   build build/libalpha_moe_debug.so, adding ${NVCC_DEBUG_FLAGS.join(" ")}
  --force   rebuild even when up to date
  --quiet   print nvcc's warnings only when it fails
  -h, --help

Flags: ${NVCC_FLAGS.join(" ")}
nvcc is looked for on PATH, then in $CUDA_HOME/bin, then in /usr/local/cuda/bin.`;

/** Parses the arguments, builds, prints one line; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        debug: { type: "boolean", default: false },
        force: { type: "boolean", default: false },
        quiet: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    console.error(`${(err as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  try {
    const result = await buildLibrary({
      debug: values.debug,
      force: values.force,
      quiet: values.quiet,
    });
    const shown = relative(Deno.cwd(), result.path);
    const path = shown.startsWith("..") ? result.path : shown;
    console.log(
      `${result.built ? "built" : "up-to-date"} ${path} (${result.seconds.toFixed(1)} s)`,
    );
    return 0;
  } catch (err) {
    // nvcc's own output is already printed (or, with --quiet, inside the message).
    console.error(`build failed: ${err instanceof NvccError ? err.message : String(err)}`);
    if (!(err instanceof NvccError) && err instanceof Error && err.cause) {
      console.error("cause:", err.cause);
    }
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
