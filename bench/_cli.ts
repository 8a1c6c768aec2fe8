/**
 * What every GPU benchmark script does before measuring: print its help when asked, parse its
 * options (exit 2 on a usage error, saying which option), and refuse (exit 1, saying why)
 * without a Hopper GPU. Also the option parsers the scripts share.
 *
 * @module
 */
import { probeHopperGpu } from "../src/device.ts";
import { MODEL_SHAPES } from "../src/tune.ts";

/** A bad command-line option: the script prints its message and exits 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

/** The items of a comma-separated `text`, trimmed; throws on an empty item or list. */
function items(option: string, text: string, what: string): string[] {
  const parts = text.split(",").map((p) => p.trim());
  if (parts.length === 1 && parts[0] === "") {
    throw new UsageError(`${option} must be a comma-separated list of ${what}, got "${text}"`);
  }
  if (parts.includes("")) throw new UsageError(`${option}: empty item in "${text}"`);
  return parts;
}

/** Digits only, at least 1, a safe integer. */
function isPositiveInt(text: string): boolean {
  return /^\d+$/.test(text) && Number.isSafeInteger(Number(text)) && Number(text) >= 1;
}

/** `text` as a positive integer, or a {@link UsageError} naming `option`. */
export function positiveInt(option: string, text: string): number {
  if (!isPositiveInt(text.trim())) {
    throw new UsageError(`${option} must be a positive integer, got "${text}"`);
  }
  return Number(text);
}

/**
 * A comma-separated list of positive integers (in the given order, repeats kept). With
 * `allowEmpty`, "" is the empty list ("none"); otherwise it is a {@link UsageError}.
 */
export function intList(
  option: string,
  text: string,
  options: { allowEmpty?: boolean } = {},
): number[] {
  if (options.allowEmpty && text.trim() === "") return [];
  return items(option, text, "positive integers").map((p) => {
    if (!isPositiveInt(p)) {
      throw new UsageError(`${option}: "${p}" is not a positive integer (in "${text}")`);
    }
    return Number(p);
  });
}

/** A comma-separated list of routing balancedness values, each a decimal in [0, 1]. */
export function fractionList(option: string, text: string): number[] {
  return items(option, text, "numbers in [0, 1]").map((p) => {
    const v = Number(p);
    if (!/^(?:\d+(?:\.\d*)?|\.\d+)$/.test(p) || !(v >= 0 && v <= 1)) {
      throw new UsageError(`${option}: "${p}" is not a number in [0, 1] (in "${text}")`);
    }
    return v;
  });
}

/** A comma-separated list of names of src/tune.ts's MODEL_SHAPES. */
export function shapeList(option: string, text: string): string[] {
  const known = Object.keys(MODEL_SHAPES);
  return items(option, text, `shapes (${known.join(", ")})`).map((p) => {
    if (!Object.hasOwn(MODEL_SHAPES, p)) {
      throw new UsageError(`${option}: unknown shape "${p}": one of ${known.join(", ")}`);
    }
    return p;
  });
}

/** `text` if it is one of `choices`, else a {@link UsageError} naming `option`. */
export function oneOf<T extends string>(option: string, text: string, choices: readonly T[]): T {
  if (!(choices as readonly string[]).includes(text)) {
    throw new UsageError(`${option} must be one of ${choices.join(", ")}, got "${text}"`);
  }
  return text as T;
}

/**
 * Runs a script's `main`: an option node:util's `parseArgs` refuses (unknown, or missing its
 * value) prints `${task}: <why>` and gives 2, like the usage errors of {@link benchPreamble}.
 */
export async function runBench(
  task: string,
  main: () => number | Promise<number>,
): Promise<number> {
  try {
    return await main();
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    if (!(err instanceof TypeError) || !String(code).startsWith("ERR_PARSE_ARGS")) throw err;
    console.error(`${task}: ${err.message}`);
    return 2;
  }
}

/**
 * Help (printed: 0), then `parse` (a {@link UsageError} printed: 2), then the GPU probe (no
 * Hopper GPU: 1): the exit code to stop with, or the parsed options to go on with.
 */
export function benchPreamble<T extends object>(
  task: string,
  help: string,
  helpRequested: boolean,
  parse: () => T,
): T | number {
  if (helpRequested) {
    console.log(help);
    return 0;
  }
  let options: T;
  try {
    options = parse();
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`${task}: ${err.message}`);
    return 2;
  }
  const probe = probeHopperGpu();
  if (!probe.ok) {
    console.error(`${task} needs a Hopper GPU: ${probe.reason}`);
    return 1;
  }
  return options;
}
