/**
 * Loads libalpha_moe lazily (never at import time) and checks its ABI version.
 *
 * Resolution, in order:
 *
 * 1. an explicit `path` option;
 * 2. the `ALPHA_MOE_LIB` environment variable;
 * 3. `build/libalpha_moe.so` of this repository (what `deno task build` writes; only when this
 *    module is a local file);
 * 4. the per-version cache (ffi/cache.ts): `$ALPHA_MOE_CACHE`, else
 *    `$XDG_CACHE_HOME/alpha-moe`, else `~/.cache/alpha-moe`, keyed by the package version, a hash
 *    of the packaged `cuda/` sources, nvcc's version and the target arch. When the entry is
 *    missing, stale or corrupted and nvcc is found (PATH, `CUDA_HOME/bin`, `/usr/local/cuda/bin`),
 *    the packaged sources are built into it on first use, with one line on stderr.
 *
 * An explicit path, the variable, or a `build/` library that exists is authoritative: when it
 * does not load, nothing else is tried behind the user's back. When nothing loads, one
 * {@link LibraryLoadError} lists every path tried and why, where nvcc was looked for, the
 * variables to set and what to install.
 *
 * @module
 */
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import {
  checkNvccVersion,
  findNvcc,
  type FindNvccOptions,
  INSTALL_HINT,
  LIBRARY_NAME,
  MIN_NVCC_VERSION,
  NvccNotFoundError,
  nvccVersionSync,
} from "./build.ts";
import {
  buildIntoCache,
  CACHE_ENV,
  cacheEntry,
  cacheKey,
  cacheRoot,
  findCompatibleEntry,
  PACKAGE_VERSION,
  validateEntry,
} from "./cache.ts";
import { SYMBOLS, type Symbols } from "./symbols.ts";

export { CACHE_ENV } from "./cache.ts";

/** The ABI version this module speaks; `amoe_abi_version()` must return it. */
export const ABI_VERSION = 7;
/** The environment variable that names the library to load. */
export const LIBRARY_ENV = "ALPHA_MOE_LIB";
/** The command that builds the default library. */
export const BUILD_COMMAND = "deno task build";
/** Where `deno task build` writes the library. */
export const DEFAULT_LIBRARY_URL: URL = new URL(`../build/${LIBRARY_NAME}`, import.meta.url);

/** The opened library. */
export type AlphaMoeLibrary = Deno.DynamicLibrary<Symbols>;

/** Options of {@link openLibrary}; they matter only for the call that loads the library. */
export interface OpenLibraryOptions {
  /** Load this file; nothing else is tried. */
  path?: string | URL;
  /**
   * The cache root, instead of `$ALPHA_MOE_CACHE` (default `$XDG_CACHE_HOME/alpha-moe`, else
   * `~/.cache/alpha-moe`).
   */
  cacheDir?: string;
  /**
   * Build the packaged sources into the cache when no library is found (default true). With
   * false, nvcc is never run: a library already in the cache (built by any nvcc from these
   * sources) is loaded, or the error says what is missing.
   */
  build?: boolean;
  /** Where to look for nvcc (default: `PATH`, then `$CUDA_HOME/bin`, then `/usr/local/cuda/bin`). */
  nvccSearch?: FindNvccOptions;
}

/** One place {@link openLibrary} tried. */
export interface LibraryAttempt {
  /** The file path. */
  path: string;
  /** Where the path came from. */
  source: "path option" | typeof LIBRARY_ENV | "default build output" | "cache";
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

function firstLine(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).split("\n")[0];
}

/** Why a dlopen failed, in one line. */
function shortReason(err: unknown, path: string): string {
  if (!exists(path)) return "not found";
  return firstLine(err);
}

function causeOf(causes: unknown[]): ErrorOptions | undefined {
  if (causes.length === 0) return undefined;
  return { cause: causes.length === 1 ? causes[0] : new AggregateError(causes, "load failures") };
}

function listAttempts(attempts: readonly LibraryAttempt[]): string {
  return attempts.length === 0
    ? "  (none: this module is not a local file, so there is no default build output)"
    : attempts.map((a) => `  - ${a.path} (${a.source}): ${a.reason}`).join("\n");
}

/** The error of a library named by the user (path option, variable, build/) that did not load. */
function explicitError(attempts: LibraryAttempt[], causes: unknown[]): LibraryLoadError {
  const message = `libalpha_moe could not be loaded. Tried:\n${listAttempts(attempts)}\n` +
    `Build it with \`${BUILD_COMMAND}\` (needs nvcc from CUDA ` +
    `${MIN_NVCC_VERSION.join(".")}+; writes build/${LIBRARY_NAME}), or set ${LIBRARY_ENV} to ` +
    `the path of a built ${LIBRARY_NAME}.`;
  return new LibraryLoadError(message, attempts, causeOf(causes));
}

/** The error when neither a library nor a way to build one was found. */
function cacheError(
  attempts: LibraryAttempt[],
  causes: unknown[],
  root: string,
  nvccProblem: unknown,
): LibraryLoadError {
  let why = "";
  if (nvccProblem instanceof NvccNotFoundError) {
    why = `It could not be built on first use either: nvcc (the CUDA compiler) was not found. ` +
      `Looked on:\n${nvccProblem.looked.map((place) => `  - ${place}`).join("\n")}\n`;
  } else if (nvccProblem !== undefined) {
    why = `It could not be built on first use either: ${
      nvccProblem instanceof Error ? nvccProblem.message : String(nvccProblem)
    }\n`;
  }
  const message = `libalpha_moe could not be loaded. Tried:\n${listAttempts(attempts)}\n${why}` +
    `To fix it, either:\n` +
    `  - ${INSTALL_HINT} The library is then built on first use into the cache ` +
    `(${CACHE_ENV}, now ${root}); this needs --allow-run, --allow-write, --allow-read and ` +
    `--allow-env;\n` +
    `  - or set ${LIBRARY_ENV} to the path of a built ${LIBRARY_NAME};\n` +
    `  - or, in a checkout of alpha-moe, build it with \`${BUILD_COMMAND}\`.`;
  return new LibraryLoadError(message, attempts, causeOf(causes));
}

type Loaded = { lib: AlphaMoeLibrary } | { error: unknown } | { abi: number };

/** dlopen + ABI handshake; permission errors propagate. */
function tryLoad(path: string): Loaded {
  let lib: AlphaMoeLibrary;
  try {
    lib = Deno.dlopen(path, SYMBOLS);
  } catch (error) {
    if (error instanceof Deno.errors.NotCapable) throw error;
    return { error };
  }
  const version = lib.symbols.amoe_abi_version();
  if (version !== ABI_VERSION) {
    lib.close();
    return { abi: version };
  }
  return { lib };
}

function keep(lib: AlphaMoeLibrary, path: string): AlphaMoeLibrary {
  loaded = { lib, path };
  return lib;
}

/** Loads a library the user (or the repository) named; it is the only one tried. */
function openNamed(
  path: string,
  source: LibraryAttempt["source"],
  earlier: LibraryAttempt[],
): AlphaMoeLibrary {
  const result = tryLoad(path);
  if ("lib" in result) return keep(result.lib, path);
  if ("error" in result) {
    throw explicitError([...earlier, { path, source, reason: shortReason(result.error, path) }], [
      result.error,
    ]);
  }
  throw new LibraryLoadError(
    `${path} has ABI version ${result.abi}, but this module expects ${ABI_VERSION}: ` +
      `the library and the TypeScript code come from different versions. Rebuild it with ` +
      `\`${BUILD_COMMAND}\`${source === LIBRARY_ENV ? ` or fix ${LIBRARY_ENV}` : ""}.`,
    [{ path, source, reason: `ABI version ${result.abi}, expected ${ABI_VERSION}` }],
  );
}

/** Step 4: the cache, building into it on first use. */
function openFromCache(options: OpenLibraryOptions, attempts: LibraryAttempt[]): AlphaMoeLibrary {
  let root: string;
  try {
    root = options.cacheDir !== undefined ? resolve(options.cacheDir) : cacheRoot();
  } catch (err) {
    if (err instanceof Deno.errors.NotCapable) throw err;
    throw new LibraryLoadError(
      `libalpha_moe could not be loaded. Tried:\n${listAttempts(attempts)}\n${firstLine(err)}; ` +
        `set ${CACHE_ENV} to a directory, or ${LIBRARY_ENV} to the path of a built ${LIBRARY_NAME}.`,
      attempts,
      { cause: err },
    );
  }
  const causes: unknown[] = [];
  let nvcc: string | undefined;
  let version: ReturnType<typeof nvccVersionSync> | undefined;
  let nvccProblem: unknown;
  if (options.build !== false) {
    try {
      nvcc = findNvcc(options.nvccSearch);
    } catch (err) {
      if (err instanceof Deno.errors.NotCapable) throw err;
      nvccProblem = err;
    }
  }
  // Without the permission to run nvcc (a run after the first build, say), a library already
  // built from these sources is loaded rather than asking for it.
  if (
    nvcc !== undefined &&
    Deno.permissions.querySync({ name: "run", command: nvcc }).state !== "granted"
  ) {
    const entry = findCompatibleEntry(root);
    const result = entry ? tryLoad(entry.library) : undefined;
    if (entry && result && "lib" in result) return keep(result.lib, entry.library);
  }
  if (nvcc !== undefined) {
    try {
      version = nvccVersionSync(nvcc); // NotCapable without --allow-run: untouched
      checkNvccVersion(version, nvcc);
    } catch (err) {
      if (err instanceof Deno.errors.NotCapable) throw err;
      nvccProblem = err;
      version = undefined;
    }
  }

  if (nvcc === undefined || version === undefined) {
    // No usable nvcc (or building is off): a library built from these sources by any nvcc.
    const entry = findCompatibleEntry(root);
    if (entry) {
      const result = tryLoad(entry.library);
      if ("lib" in result) return keep(result.lib, entry.library);
      attempts.push({
        path: entry.library,
        source: "cache",
        reason: "error" in result
          ? shortReason(result.error, entry.library)
          : `ABI version ${result.abi}, expected ${ABI_VERSION}`,
      });
      if ("error" in result) causes.push(result.error);
    } else {
      attempts.push({
        path: `${root}/${PACKAGE_VERSION}/`,
        source: "cache",
        reason: `no library built from this version's sources${
          options.build === false ? " (building is off: build: false)" : ""
        }`,
      });
    }
    throw cacheError(attempts, causes, root, nvccProblem);
  }

  const entry = cacheEntry(root, cacheKey(version));
  let reason = validateEntry(entry);
  for (let round = 0;; round++) {
    if (reason !== undefined) {
      try {
        buildIntoCache(entry, { nvcc, reason, force: round > 0 });
      } catch (err) {
        if (err instanceof Deno.errors.NotCapable) throw err;
        attempts.push({
          path: entry.library,
          source: "cache",
          reason: `build failed: ${firstLine(err)}`,
        });
        throw new LibraryLoadError(
          `libalpha_moe could not be loaded. Tried:\n${listAttempts(attempts)}\n` +
            `Building the packaged sources with ${nvcc} failed:\n` +
            `${err instanceof Error ? err.message : String(err)}\n` +
            `Set ${LIBRARY_ENV} to the path of a built ${LIBRARY_NAME} to skip the build.`,
          attempts,
          { cause: err },
        );
      }
    }
    const result = tryLoad(entry.library);
    if ("lib" in result) return keep(result.lib, entry.library);
    if ("abi" in result && round === 0) {
      // Not what these sources build: rebuild it once.
      reason = `ABI handshake failed (version ${result.abi}, expected ${ABI_VERSION})`;
      continue;
    }
    attempts.push({
      path: entry.library,
      source: "cache",
      reason: "error" in result
        ? shortReason(result.error, entry.library)
        : `ABI version ${result.abi}, expected ${ABI_VERSION}`,
    });
    throw explicitError(attempts, "error" in result ? [result.error] : []);
  }
}

/**
 * Opens libalpha_moe (once; later calls return the same library) and checks that its ABI version
 * is {@link ABI_VERSION}; see the module documentation for where it looks. Needs `--allow-ffi`
 * and `--allow-env`; `--allow-read` for the build output and the cache; and, to build into the
 * cache on first use, `--allow-run` (nvcc, /bin/sh) and `--allow-write`. A missing permission is
 * re-thrown as Deno's `NotCapable` error, untouched.
 *
 * @throws {LibraryLoadError} when no library loads, listing every path tried.
 */
export function openLibrary(options: OpenLibraryOptions = {}): AlphaMoeLibrary {
  if (loaded) {
    if (options.path === undefined) return loaded.lib;
    const wanted = toPath(options.path);
    if (wanted === loaded.path) return loaded.lib;
    if (!exists(wanted)) {
      throw explicitError([{ path: wanted, source: "path option", reason: "not found" }], []);
    }
    if (Deno.realPathSync(wanted) === Deno.realPathSync(loaded.path)) return loaded.lib;
    throw new LibraryLoadError(
      `libalpha_moe is already loaded from ${loaded.path}; it cannot also be loaded from ` +
        `${wanted} in the same process.`,
      [],
    );
  }
  if (options.path !== undefined) return openNamed(toPath(options.path), "path option", []);
  const fromEnv = Deno.env.get(LIBRARY_ENV); // NotCapable propagates untouched
  if (fromEnv) return openNamed(fromEnv, LIBRARY_ENV, []);
  const attempts: LibraryAttempt[] = [];
  if (DEFAULT_LIBRARY_URL.protocol === "file:") {
    const dev = fileURLToPath(DEFAULT_LIBRARY_URL);
    if (exists(dev)) return openNamed(dev, "default build output", []);
    attempts.push({ path: dev, source: "default build output", reason: "not found" });
  }
  return openFromCache(options, attempts);
}

/** The path of the loaded library, or undefined when none is loaded yet (loads nothing). */
export function loadedLibraryPath(): string | undefined {
  return loaded?.path;
}

/** The library's symbols, loading it on first use (see {@link openLibrary}). */
export function symbols(): AlphaMoeLibrary["symbols"] {
  return (loaded ?? { lib: openLibrary() }).lib.symbols;
}
