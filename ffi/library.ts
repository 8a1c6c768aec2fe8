/**
 * Loads libalpha_moe lazily (never at import time) and checks its ABI version.
 *
 * Resolution order: an explicit `path` → the `ALPHA_MOE_LIB` environment variable →
 * `build/libalpha_moe.so` of this repository (what `deno task build` writes). An explicit path or
 * the variable is authoritative: when it does not load, the default is not tried behind the
 * user's back. When nothing loads, one {@link LibraryLoadError} lists every path tried and why,
 * the variable to set and the build command.
 *
 * @module
 */
import { fileURLToPath } from "node:url";
import { SYMBOLS, type Symbols } from "./symbols.ts";

/** The ABI version this module speaks; `amoe_abi_version()` must return it. */
export const ABI_VERSION = 1;
/** The environment variable that names the library to load. */
export const LIBRARY_ENV = "ALPHA_MOE_LIB";
/** The command that builds the default library. */
export const BUILD_COMMAND = "deno task build";
/** Where `deno task build` writes the library. */
export const DEFAULT_LIBRARY_URL: URL = new URL("../build/libalpha_moe.so", import.meta.url);

/** The opened library. */
export type AlphaMoeLibrary = Deno.DynamicLibrary<Symbols>;

/** Options of {@link openLibrary}. */
export interface OpenLibraryOptions {
  /** Load this file; nothing else is tried. */
  path?: string | URL;
}

/** One place {@link openLibrary} tried. */
export interface LibraryAttempt {
  /** The file path. */
  path: string;
  /** Where the path came from. */
  source: "path option" | typeof LIBRARY_ENV | "default build output";
  /** Why it did not load. */
  reason: string;
}

/** No library could be loaded (or the one loaded speaks another ABI version). */
export class LibraryLoadError extends Error {
  /** The error\'s name. */
  override name = "LibraryLoadError";
  /** Every path tried, in order. */
  readonly attempts: readonly LibraryAttempt[];
  /** Makes the error. */
  constructor(message: string, attempts: readonly LibraryAttempt[], options?: ErrorOptions) {
    super(message, options);
    this.attempts = attempts;
  }
}

let loaded: { lib: AlphaMoeLibrary; path: string } | undefined;

function toPath(location: string | URL): string {
  if (typeof location === "string") return location;
  if (location.protocol !== "file:") {
    throw new TypeError(`${location.href} is not a local file (file: URL)`);
  }
  return fileURLToPath(location);
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.NotCapable) throw err;
    return false;
  }
}

/** Why a dlopen failed, in one line. */
function shortReason(err: unknown, path: string): string {
  if (!exists(path)) return "not found";
  return (err instanceof Error ? err.message : String(err)).split("\n")[0];
}

function candidates(options: OpenLibraryOptions): Omit<LibraryAttempt, "reason">[] {
  if (options.path !== undefined) return [{ path: toPath(options.path), source: "path option" }];
  const fromEnv = Deno.env.get(LIBRARY_ENV); // NotCapable propagates untouched
  if (fromEnv) return [{ path: fromEnv, source: LIBRARY_ENV }];
  if (DEFAULT_LIBRARY_URL.protocol !== "file:") return [];
  return [{ path: fileURLToPath(DEFAULT_LIBRARY_URL), source: "default build output" }];
}

function notLoadedError(attempts: LibraryAttempt[], causes: unknown[]): LibraryLoadError {
  const tried = attempts.length === 0
    ? "  (none: this module is not a local file, so there is no default build output)"
    : attempts.map((a) => `  - ${a.path} (${a.source}): ${a.reason}`).join("\n");
  const message = `libalpha_moe could not be loaded. Tried:\n${tried}\n` +
    `Build it with \`${BUILD_COMMAND}\` (needs nvcc from CUDA 12.8+; writes build/libalpha_moe.so), ` +
    `or set ${LIBRARY_ENV} to the path of a built libalpha_moe.so.`;
  const cause = causes.length === 1 ? causes[0] : new AggregateError(causes, "dlopen failures");
  return new LibraryLoadError(message, attempts, causes.length > 0 ? { cause } : undefined);
}

/**
 * Opens libalpha_moe (once; later calls return the same library) and checks that its ABI version
 * is {@link ABI_VERSION}. Needs `--allow-ffi` (a permission error is re-thrown as it is) and
 * `--allow-env` to read `ALPHA_MOE_LIB`.
 *
 * @throws {LibraryLoadError} when no library loads, listing every path tried.
 */
export function openLibrary(options: OpenLibraryOptions = {}): AlphaMoeLibrary {
  if (loaded) {
    if (options.path === undefined) return loaded.lib;
    const wanted = toPath(options.path);
    if (wanted === loaded.path) return loaded.lib;
    if (!exists(wanted)) {
      throw notLoadedError([{ path: wanted, source: "path option", reason: "not found" }], []);
    }
    if (Deno.realPathSync(wanted) === Deno.realPathSync(loaded.path)) return loaded.lib;
    throw new LibraryLoadError(
      `libalpha_moe is already loaded from ${loaded.path}; it cannot also be loaded from ` +
        `${wanted} in the same process.`,
      [],
    );
  }
  const attempts: LibraryAttempt[] = [];
  const causes: unknown[] = [];
  for (const candidate of candidates(options)) {
    let lib: AlphaMoeLibrary;
    try {
      lib = Deno.dlopen(candidate.path, SYMBOLS);
    } catch (err) {
      if (err instanceof Deno.errors.NotCapable) throw err;
      attempts.push({ ...candidate, reason: shortReason(err, candidate.path) });
      causes.push(err);
      continue;
    }
    const version = lib.symbols.amoe_abi_version();
    if (version !== ABI_VERSION) {
      lib.close();
      throw new LibraryLoadError(
        `${candidate.path} has ABI version ${version}, but this module expects ${ABI_VERSION}: ` +
          `the library and the TypeScript code come from different versions. Rebuild it with ` +
          `\`${BUILD_COMMAND}\`${
            candidate.source === LIBRARY_ENV ? ` or fix ${LIBRARY_ENV}` : ""
          }.`,
        [{ ...candidate, reason: `ABI version ${version}, expected ${ABI_VERSION}` }],
      );
    }
    loaded = { lib, path: candidate.path };
    return lib;
  }
  throw notLoadedError(attempts, causes);
}

/** The path of the loaded library, or undefined when none is loaded yet (loads nothing). */
export function loadedLibraryPath(): string | undefined {
  return loaded?.path;
}

/** The library's symbols, loading it on first use (see {@link openLibrary}). */
export function symbols(): AlphaMoeLibrary["symbols"] {
  return (loaded ?? { lib: openLibrary() }).lib.symbols;
}
