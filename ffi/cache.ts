/**
 * The per-version library cache and the build on first use.
 *
 * A package installed with `deno add` has the CUDA sources (ffi/sources.ts imports them as text,
 * so they come with the code, local or remote) but no compiled library. The first
 * {@link import("./library.ts").openLibrary} that finds no library builds one with the user's
 * nvcc into
 *
 * ```
 * <cache root>/<package version>/<arch>-cuda<release>-<key>/libalpha_moe.so
 *                                                          /stamp.json
 * ```
 *
 * The cache root is `$ALPHA_MOE_CACHE`, else `$XDG_CACHE_HOME/alpha-moe`, else
 * `~/.cache/alpha-moe`. `<key>` hashes everything the library depends on: the package version,
 * a hash of the packaged sources, `nvcc --version`, the target arch and the nvcc flags
 * (ffi/build.ts, the same as `deno task build`). The stamp repeats the key and adds the
 * library's SHA-256, so a stale (other sources) or corrupted (garbled, truncated, missing) entry
 * is detected and rebuilt, never loaded.
 *
 * Builds are serialised by a lock file next to the entry (`<entry>.lock`, created with
 * `createNew`, holding the builder's pid): a second process waits for the first and then loads
 * what it built. A lock whose process is gone (same machine, `/proc`) or that is older than
 * {@link LOCK_STALE_MS} is taken over. The library is built in a temporary directory beside the
 * entry and renamed into place, so a reader never sees a half-built entry.
 *
 * Everything here is synchronous (nvcc runs through `Deno.Command#outputSync`, the units in
 * parallel under one `/bin/sh`), because {@link import("./library.ts").openLibrary} is.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { resolve } from "node:path";
import denoJson from "../deno.json" with { type: "json" };
import {
  compileArgs,
  isCompileUnit,
  LIBRARY_NAME,
  linkArgs,
  NVCC_COMPILE_FLAGS,
  NVCC_LINK_FLAGS,
  NvccError,
  type NvccVersion,
  TARGET_ARCH,
} from "./build.ts";
import { CUDA_SOURCES } from "./sources.ts";

/** The environment variable that names the cache root. */
export const CACHE_ENV = "ALPHA_MOE_CACHE";
/** This package's version (deno.json), the first level of the cache. */
export const PACKAGE_VERSION: string = denoJson.version;
/** The stamp file of an entry. */
export const STAMP_NAME = "stamp.json";
/** A build lock older than this is taken over even when its process seems alive (30 min). */
export const LOCK_STALE_MS = 30 * 60 * 1000;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function trimSlash(path: string): string {
  return path.length > 1 ? path.replace(/\/+$/, "") : path;
}

/**
 * The cache root: `$ALPHA_MOE_CACHE`, else `$XDG_CACHE_HOME/alpha-moe`, else
 * `$HOME/.cache/alpha-moe` (absolute). Needs `--allow-env`.
 */
export function cacheRoot(): string {
  const fromEnv = Deno.env.get(CACHE_ENV);
  if (fromEnv) return trimSlash(resolve(fromEnv));
  const xdg = Deno.env.get("XDG_CACHE_HOME");
  if (xdg) return `${trimSlash(resolve(xdg))}/alpha-moe`;
  const home = Deno.env.get("HOME");
  if (home) return `${trimSlash(resolve(home))}/.cache/alpha-moe`;
  throw new Error(`no cache directory: set ${CACHE_ENV} (HOME and XDG_CACHE_HOME are not set)`);
}

/** SHA-256 (hex) of length-prefixed parts, so that concatenations cannot collide. */
export function sha256(parts: readonly (string | Uint8Array)[]): string {
  const hash = createHash("sha256");
  for (const part of parts) {
    const bytes = typeof part === "string" ? encoder.encode(part) : part;
    hash.update(`${bytes.length}:`);
    hash.update(bytes);
  }
  return hash.digest("hex");
}

/** SHA-256 (hex) of a file's bytes. */
export function sha256File(path: string): string {
  return createHash("sha256").update(Deno.readFileSync(path)).digest("hex");
}

const sourceHashes = new WeakMap<object, string>();

/** Hash of the packaged CUDA sources (every path and its content, in sorted order). */
export function sourceHash(sources: Readonly<Record<string, string>> = CUDA_SOURCES): string {
  let hash = sourceHashes.get(sources);
  if (hash === undefined) {
    const paths = Object.keys(sources).sort();
    hash = sha256(paths.flatMap((rel) => [rel, sources[rel]]));
    sourceHashes.set(sources, hash);
  }
  return hash;
}

/** Everything a cached library depends on. Two builds with equal keys are interchangeable. */
export interface CacheKey {
  /** Version of this package. */
  packageVersion: string;
  /** {@link sourceHash} of the sources it was built from. */
  sourceHash: string;
  /** The CUDA release, e.g. "12.8". */
  cudaRelease: string;
  /** The whole output of `nvcc --version`. */
  nvccVersion: string;
  /** The target, e.g. "sm_90a". */
  arch: string;
  /** nvcc's compile flags. */
  compileFlags: string[];
  /** nvcc's link flags. */
  linkFlags: string[];
}

/** The key of a library built by `nvcc` (of release `version`) from `sources`. */
export function cacheKey(
  version: NvccVersion,
  sources: Readonly<Record<string, string>> = CUDA_SOURCES,
): CacheKey {
  return {
    packageVersion: PACKAGE_VERSION,
    sourceHash: sourceHash(sources),
    cudaRelease: `${version.major}.${version.minor}`,
    nvccVersion: version.text,
    arch: TARGET_ARCH,
    compileFlags: [...NVCC_COMPILE_FLAGS],
    linkFlags: [...NVCC_LINK_FLAGS],
  };
}

/** The fields of {@link CacheKey} that do not depend on nvcc. */
const SOURCE_FIELDS = [
  "packageVersion",
  "sourceHash",
  "arch",
  "compileFlags",
  "linkFlags",
] as const;
const KEY_FIELDS = [...SOURCE_FIELDS, "cudaRelease", "nvccVersion"] as const;

/** One cache entry: a directory holding the library and its stamp. */
export interface CacheEntry {
  /** The entry's directory. */
  dir: string;
  /** The library in it. */
  library: string;
  /** Its stamp (JSON: the key, the library's SHA-256, when and how it was built). */
  stamp: string;
  /** The lock file that serialises builds of this entry. */
  lock: string;
  /** What the entry must have been built from. */
  key: CacheKey;
}

/** The entry of `key` under the cache root `root`. */
export function cacheEntry(root: string, key: CacheKey): CacheEntry {
  const id = sha256(KEY_FIELDS.map((f) => JSON.stringify(key[f]))).slice(0, 16);
  const dir = `${trimSlash(root)}/${key.packageVersion}/${key.arch}-cuda${key.cudaRelease}-${id}`;
  return {
    dir,
    library: `${dir}/${LIBRARY_NAME}`,
    stamp: `${dir}/${STAMP_NAME}`,
    lock: `${dir}.lock`,
    key,
  };
}

/** What an entry's stamp holds. */
export interface CacheStamp extends CacheKey {
  /** SHA-256 (hex) of the library. */
  librarySha256: string;
  /** When it was built (ISO 8601). */
  builtAt: string;
  /** The nvcc that built it. */
  nvcc: string;
  /** How long the build took. */
  seconds: number;
}

function readStamp(path: string): CacheStamp | string {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotCapable) throw err;
    return err instanceof Deno.errors.NotFound ? "not built yet" : `stamp unreadable (${err})`;
  }
  try {
    const stamp = JSON.parse(text);
    if (typeof stamp === "object" && stamp !== null && typeof stamp.librarySha256 === "string") {
      return stamp as CacheStamp;
    }
  } catch {
    // reported below
  }
  return "stamp garbled";
}

function keyMismatch(
  stamp: CacheStamp,
  key: CacheKey,
  fields: readonly (keyof CacheKey)[],
): string | undefined {
  for (const field of fields) {
    if (JSON.stringify(stamp[field]) !== JSON.stringify(key[field])) {
      const words = field.replace(/[A-Z]/g, (c) => ` ${c.toLowerCase()}`);
      return `stale: built from another ${words}`;
    }
  }
  return undefined;
}

function checkLibrary(entry: CacheEntry, stamp: CacheStamp): string | undefined {
  let digest: string;
  try {
    digest = sha256File(entry.library);
  } catch (err) {
    if (err instanceof Deno.errors.NotCapable) throw err;
    return err instanceof Deno.errors.NotFound ? "library missing" : `library unreadable (${err})`;
  }
  return digest === stamp.librarySha256
    ? undefined
    : "corrupted: the library's checksum differs from its stamp";
}

/**
 * Why `entry` must not be loaded (not built yet, stale, corrupted), or undefined when its stamp
 * matches its key and the library matches the stamp's checksum. Needs `--allow-read`.
 */
export function validateEntry(entry: CacheEntry): string | undefined {
  const stamp = readStamp(entry.stamp);
  if (typeof stamp === "string") return stamp;
  return keyMismatch(stamp, entry.key, KEY_FIELDS) ?? checkLibrary(entry, stamp);
}

/**
 * A valid entry built from the packaged sources by any nvcc (the newest such), for when nvcc is
 * not available to compute the exact key; undefined when there is none.
 */
export function findCompatibleEntry(
  root: string,
  sources: Readonly<Record<string, string>> = CUDA_SOURCES,
): CacheEntry | undefined {
  const partial: CacheKey = {
    ...cacheKey({ text: "", major: 0, minor: 0 }, sources),
    cudaRelease: "",
    nvccVersion: "",
  };
  const versionDir = `${trimSlash(root)}/${PACKAGE_VERSION}`;
  let names: string[];
  try {
    names = [...Deno.readDirSync(versionDir)]
      .filter((e) => e.isDirectory && e.name.startsWith(`${TARGET_ARCH}-`))
      .map((e) => e.name);
  } catch (err) {
    if (err instanceof Deno.errors.NotCapable) throw err;
    return undefined;
  }
  let best: { entry: CacheEntry; builtAt: string } | undefined;
  for (const name of names) {
    const stamp = readStamp(`${versionDir}/${name}/${STAMP_NAME}`);
    if (typeof stamp === "string" || keyMismatch(stamp, partial, SOURCE_FIELDS)) continue;
    const key: CacheKey = {
      ...partial,
      cudaRelease: stamp.cudaRelease,
      nvccVersion: stamp.nvccVersion,
    };
    const entry = cacheEntry(root, key);
    if (entry.dir !== `${versionDir}/${name}` || validateEntry(entry) !== undefined) continue;
    if (!best || String(stamp.builtAt) > best.builtAt) {
      best = { entry, builtAt: String(stamp.builtAt) };
    }
  }
  return best?.entry;
}

// ---- the lock ----

/** What a lock file holds. */
export interface LockInfo {
  /** The process that holds it. */
  pid: number;
  /** When it took it (ms since the epoch). */
  startedAt: number;
}

/** Options of {@link acquireLock}. */
export interface LockOptions {
  /** Take over a lock older than this (default {@link LOCK_STALE_MS}). */
  staleMs?: number;
  /** How often to look again while another process holds it (default 200 ms). */
  pollMs?: number;
  /** Give up after this long (default: never; a dead holder's lock is taken over). */
  timeoutMs?: number;
  /** Called once, when the lock is found held by a live process. */
  onWait?: (holder: LockInfo | undefined) => void;
}

/** Blocks the thread for `ms` milliseconds. */
export function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/**
 * false only when `pid` surely does not run on this machine: through `/proc/<pid>/stat` (a zombie
 * counts as gone) where it may be read (Deno allows /proc only with --allow-all), else through
 * `kill(pid, 0)` (needs --allow-run, which a build has anyway). When neither can tell, true:
 * the lock's age decides.
 */
export function processAlive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  if (pid === Deno.pid) return true;
  try {
    // "pid (comm) S ...": a zombie (Z) or dead (X) process holds nothing.
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch (err) {
    if (err instanceof Deno.errors.NotFound && procReadable()) return false;
  }
  try {
    Deno.kill(pid, 0 as unknown as Deno.Signal); // signal 0: only "does it exist?"
    return true;
  } catch (err) {
    return !(err instanceof Deno.errors.NotFound); // ESRCH: gone; EPERM: another user's
  }
}

let procOk: boolean | undefined;

function procReadable(): boolean {
  if (procOk === undefined) {
    try {
      procOk = Deno.readTextFileSync(`/proc/${Deno.pid}/stat`).length > 0;
    } catch {
      procOk = false;
    }
  }
  return procOk;
}

function writeAllSync(file: { writeSync(p: Uint8Array): number }, bytes: Uint8Array): void {
  let offset = 0;
  while (offset < bytes.length) offset += file.writeSync(bytes.subarray(offset));
}

function readLock(path: string): { text: string; info?: LockInfo; mtime?: number } | undefined {
  try {
    const text = Deno.readTextFileSync(path);
    const mtime = Deno.statSync(path).mtime?.getTime();
    try {
      const info = JSON.parse(text);
      if (Number.isSafeInteger(info?.pid) && Number.isFinite(info?.startedAt)) {
        return { text, info, mtime };
      }
    } catch {
      // a lock being written, or garbage: judged by its age
    }
    return { text, mtime };
  } catch (err) {
    if (err instanceof Deno.errors.NotCapable) throw err;
    return undefined; // released meanwhile
  }
}

/**
 * Takes the lock file `path` (created with `createNew`), waiting while a live process holds it;
 * returns the function that releases it. A lock whose process is gone, or older than `staleMs`,
 * is taken over.
 */
export function acquireLock(path: string, options: LockOptions = {}): () => void {
  const staleMs = options.staleMs ?? LOCK_STALE_MS;
  const pollMs = options.pollMs ?? 200;
  const started = Date.now();
  let told = false;
  for (;;) {
    const mine = JSON.stringify({ pid: Deno.pid, startedAt: Date.now() } satisfies LockInfo);
    let file: Deno.FsFile | undefined;
    try {
      file = Deno.openSync(path, { write: true, createNew: true });
    } catch (err) {
      if (!(err instanceof Deno.errors.AlreadyExists)) throw err;
    }
    if (file) {
      try {
        writeAllSync(file, encoder.encode(mine));
      } finally {
        file.close();
      }
      return () => {
        // Remove it only if it is still ours (it was not taken over as stale).
        const now = readLock(path);
        if (now?.text === mine) Deno.removeSync(path);
      };
    }
    const held = readLock(path);
    if (held === undefined) continue; // released between our open and our read
    const age = Date.now() - (held.info?.startedAt ?? held.mtime ?? Date.now());
    // An unparseable lock is one being written (a moment) or debris: give it 10 s.
    const stale = held.info ? !processAlive(held.info.pid) || age > staleMs : age > 10_000;
    if (stale) {
      // Re-read right before removing, so that a lock taken meanwhile is not removed.
      if (readLock(path)?.text === held.text) Deno.removeSync(path);
      continue;
    }
    if (!told) {
      told = true;
      options.onWait?.(held.info);
    }
    if (options.timeoutMs !== undefined && Date.now() - started > options.timeoutMs) {
      throw new Error(
        `timed out after ${options.timeoutMs} ms waiting for the lock ${path}` +
          (held.info ? ` (held by process ${held.info.pid})` : ""),
      );
    }
    sleepSync(pollMs);
  }
}

// ---- the build ----

/** Options of {@link buildIntoCache}. */
export interface CacheBuildOptions {
  /** The nvcc to run. */
  nvcc: string;
  /** Why the entry is (re)built, as {@link validateEntry} said; shown in the one line. */
  reason?: string;
  /** Rebuild even when the entry validates (its library failed the ABI handshake). */
  force?: boolean;
  /** The sources (default: the packaged ones, {@link CUDA_SOURCES}). */
  sources?: Readonly<Record<string, string>>;
  /** Where the line goes (default: stderr). */
  log?: (text: string) => void;
  /** Parallel compiles (default `navigator.hardwareConcurrency`). */
  jobs?: number;
  /** Lock options (tests). */
  lock?: LockOptions;
}

/** What {@link buildIntoCache} did. */
export interface CacheBuildResult {
  /** The library. */
  path: string;
  /** false when another process built it while this one waited. */
  built: boolean;
  /** Wall time of the build (0 when not built). */
  seconds: number;
}

function writeStderr(text: string): void {
  writeAllSync(Deno.stderr, encoder.encode(text));
}

function shellQuote(arg: string): string {
  return `'${arg.replaceAll("'", `'\\''`)}'`;
}

function tail(text: string, lines = 60): string {
  return text.trimEnd().split("\n").slice(-lines).join("\n");
}

/** Compiles every unit in parallel under one shell (Deno has no synchronous wait for several
 * children); throws an {@link NvccError} for the first unit that failed. */
function compileUnits(
  nvcc: string,
  sourceDir: string,
  objDir: string,
  units: readonly string[],
  jobs: number,
): string[] {
  const objects = units.map((unit) => `${objDir}/${unit.replace(/\.cu$/, "")}.o`);
  const lines = ["set -u"];
  units.forEach((unit, i) => {
    const command = [nvcc, ...compileArgs({ unit, sourceDir, output: objects[i] })]
      .map(shellQuote).join(" ");
    const log = shellQuote(`${objDir}/${i}.log`);
    lines.push(`(${command} >${log} 2>&1; echo $? >${shellQuote(`${objDir}/${i}.rc`)}) &`);
    if ((i + 1) % jobs === 0) lines.push("wait");
  });
  lines.push("wait");
  const script = `${objDir}/compile.sh`;
  Deno.writeTextFileSync(script, `${lines.join("\n")}\n`);
  const shell = new Deno.Command("/bin/sh", {
    args: [script],
    cwd: sourceDir,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).outputSync();
  units.forEach((unit, i) => {
    let code = -1;
    let output = "";
    try {
      code = Number(Deno.readTextFileSync(`${objDir}/${i}.rc`).trim());
      output = Deno.readTextFileSync(`${objDir}/${i}.log`);
    } catch {
      output = decoder.decode(shell.stderr) + decoder.decode(shell.stdout);
    }
    if (code !== 0) {
      throw new NvccError(
        `nvcc failed on ${unit} (exit code ${code}):\n${tail(output)}`,
        `${sourceDir}/${unit}`,
        output,
        code,
      );
    }
  });
  return objects;
}

function linkLibrary(nvcc: string, objects: string[], output: string, cwd: string): void {
  const result = new Deno.Command(nvcc, {
    args: linkArgs(objects, output),
    cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).outputSync();
  if (result.code !== 0) {
    const text = decoder.decode(result.stderr) + decoder.decode(result.stdout);
    throw new NvccError(
      `nvcc failed on the link of ${LIBRARY_NAME} (exit code ${result.code}):\n${tail(text)}`,
      output,
      text,
      result.code,
    );
  }
}

/** Removes temporary build directories left by builders that died (their pid is gone). */
function removeDebris(versionDir: string): void {
  for (const entry of Deno.readDirSync(versionDir)) {
    const match = /^\.build-(\d+)-/.exec(entry.name);
    if (entry.isDirectory && match && !processAlive(Number(match[1]))) {
      try {
        Deno.removeSync(`${versionDir}/${entry.name}`, { recursive: true });
      } catch {
        // someone else's to clean up
      }
    }
  }
}

/**
 * Builds the packaged sources into `entry` under its lock, writing one line to stderr (what it
 * builds, where, and how long it took). When another process built the entry while this one
 * waited for the lock, it returns without building. Needs `--allow-read`, `--allow-write`,
 * `--allow-run` (nvcc and /bin/sh) and `--allow-env`.
 *
 * @throws {NvccError} when nvcc fails (its output's tail is in the message)
 */
export function buildIntoCache(entry: CacheEntry, options: CacheBuildOptions): CacheBuildResult {
  const log = options.log ?? writeStderr;
  const sources = options.sources ?? CUDA_SOURCES;
  const versionDir = entry.dir.slice(0, entry.dir.lastIndexOf("/"));
  Deno.mkdirSync(versionDir, { recursive: true });
  const release = acquireLock(entry.lock, {
    ...options.lock,
    onWait: (holder) => {
      log(
        `alpha-moe: waiting for another process${
          holder ? ` (pid ${holder.pid})` : ""
        } to finish building ${entry.dir}\n`,
      );
      options.lock?.onWait?.(holder);
    },
  });
  try {
    const reason = validateEntry(entry);
    if (reason === undefined && !options.force) {
      return { path: entry.library, built: false, seconds: 0 };
    }
    removeDebris(versionDir);
    const started = performance.now();
    const tmp = Deno.makeTempDirSync({ dir: versionDir, prefix: `.build-${Deno.pid}-` });
    const why = options.force
      ? options.reason ?? "forced"
      : reason === "not built yet"
      ? `first use of alpha-moe ${entry.key.packageVersion}`
      : reason ?? "forced";
    log(
      `alpha-moe: ${reason === "not built yet" ? "building" : "rebuilding"} ${LIBRARY_NAME} ` +
        `for ${entry.key.arch} with CUDA ${entry.key.cudaRelease} (${why}) into ${entry.dir} ...`,
    );
    const seconds = (): string => ((performance.now() - started) / 1000).toFixed(1);
    try {
      const sourceDir = `${tmp}/cuda`;
      for (const [rel, text] of Object.entries(sources)) {
        const path = `${sourceDir}/${rel}`;
        Deno.mkdirSync(path.slice(0, path.lastIndexOf("/")), { recursive: true });
        Deno.writeTextFileSync(path, text);
      }
      const units = Object.keys(sources).filter(isCompileUnit).sort();
      if (units.length === 0) throw new Error("no .cu files among the packaged sources");
      const objDir = `${tmp}/obj`;
      const outDir = `${tmp}/out`;
      Deno.mkdirSync(objDir);
      Deno.mkdirSync(outDir);
      const jobs = Math.max(1, options.jobs ?? navigator.hardwareConcurrency ?? 1);
      const objects = compileUnits(options.nvcc, sourceDir, objDir, units, jobs);
      const library = `${outDir}/${LIBRARY_NAME}`;
      linkLibrary(options.nvcc, objects, library, sourceDir);
      const stamp: CacheStamp = {
        ...entry.key,
        librarySha256: sha256File(library),
        builtAt: new Date().toISOString(),
        nvcc: options.nvcc,
        seconds: Number(seconds()),
      };
      Deno.writeTextFileSync(`${outDir}/${STAMP_NAME}`, `${JSON.stringify(stamp, null, 2)}\n`);
      // Swap the new entry in: move an old one (stale or corrupted) aside, rename the new one.
      try {
        Deno.renameSync(entry.dir, `${tmp}/old`);
      } catch (err) {
        if (!(err instanceof Deno.errors.NotFound)) throw err;
      }
      Deno.renameSync(outDir, entry.dir);
    } catch (err) {
      log(` failed after ${seconds()} s\n`);
      throw err;
    } finally {
      try {
        Deno.removeSync(tmp, { recursive: true });
      } catch {
        // debris, removed by a later build
      }
    }
    log(` done in ${seconds()} s\n`);
    return { path: entry.library, built: true, seconds: Number(seconds()) };
  } finally {
    release();
  }
}
