/**
 * `deno task build`'s build: {@link buildLibrary} compiles every `cuda/*.cu` to an object in
 * parallel, links them into one shared library with CUDA's runtime linked statically, and skips
 * all of it when nothing changed (a stamp hashes every source, the flags and nvcc's version).
 *
 * The flags, the nvcc command lines and the nvcc search are defined once, in ffi/build.ts, and
 * re-exported here: the build on first use into the cache (ffi/cache.ts) uses the same ones.
 * Building the repository's `cuda/` also keeps ffi/sources.ts (the text imports of every CUDA
 * file, which the published package builds from) in step with the files.
 *
 * Used by `deno task build` (tasks/build.ts), the demo and the tests.
 *
 * @module
 */
import $ from "@david/dax";
import { fileURLToPath } from "node:url";
import {
  checkNvccVersion,
  compileArgs,
  DEBUG_LIBRARY_NAME,
  findNvcc,
  isCompileUnit,
  isSourceFile,
  LIBRARY_NAME,
  linkArgs,
  NVCC_COMPILE_FLAGS,
  NVCC_DEBUG_FLAGS,
  NVCC_LINK_FLAGS,
  NvccError,
  type NvccVersion,
  parseNvccVersion,
  serializedWgmmaKernels,
} from "../ffi/build.ts";

export {
  DEBUG_LIBRARY_NAME,
  findNvcc,
  type FindNvccOptions,
  LIBRARY_NAME,
  MIN_NVCC_VERSION,
  NVCC_ARCH_FLAGS,
  NVCC_COMPILE_FLAGS,
  NVCC_DEBUG_FLAGS,
  NVCC_FLAGS,
  NVCC_LINK_FLAGS,
  NvccError,
  NvccNotFoundError,
  TARGET_ARCH,
} from "../ffi/build.ts";

const DEFAULT_OUT_DIR = new URL("../build/", import.meta.url);
const DEFAULT_SOURCE_DIR = new URL("../cuda/", import.meta.url);
/** ffi/sources.ts: the text imports of every file under `cuda/` (see {@link sourceManifest}). */
export const SOURCE_MANIFEST_URL: URL = new URL("../ffi/sources.ts", import.meta.url);

/** Options of {@link buildLibrary}. */
export interface BuildOptions {
  /** Build the `-lineinfo` variant into {@link DEBUG_LIBRARY_NAME}. */
  debug?: boolean;
  /** Where the library, its stamp and the objects go (default: `build/` of this repository). */
  outDir?: string | URL;
  /** Where the CUDA sources are (default: `cuda/` of this repository). */
  sourceDir?: string | URL;
  /** Print nothing: nvcc's warnings are dropped and a failure's output goes into the error. */
  quiet?: boolean;
  /** Rebuild everything even when the stamp is unchanged. */
  force?: boolean;
  /** Use this nvcc instead of looking for one (see {@link findNvcc}). */
  nvcc?: string;
}

/** What {@link buildLibrary} did. */
export interface BuildResult {
  /** Absolute path of the library. */
  path: string;
  /** false when the stamp was unchanged and nothing was compiled. */
  built: boolean;
  /** Wall time of the call. */
  seconds: number;
}

/** Runs `nvcc --version`; returns its full text and the parsed release. */
export async function nvccVersion(nvcc: string = findNvcc()): Promise<NvccVersion> {
  const result = await $`${nvcc} --version`.quiet().noThrow();
  const text = result.stdout + result.stderr;
  if (result.code !== 0) {
    throw new Error(`${nvcc} --version failed (exit code ${result.code}):\n${text.trim()}`);
  }
  return parseNvccVersion(text, nvcc);
}

function toPath(location: string | URL): string {
  if (location instanceof URL) {
    if (location.protocol !== "file:") {
      throw new TypeError(`${location.href} is not a local directory (file: URL)`);
    }
    return fileURLToPath(location);
  }
  return location;
}

function trimSlash(path: string): string {
  return path.length > 1 ? path.replace(/\/+$/, "") : path;
}

/** Relative paths (sorted) of every source file under `root`. */
async function listSources(root: string, prefix = ""): Promise<string[]> {
  const found: string[] = [];
  for await (const entry of Deno.readDir(prefix ? `${root}/${prefix}` : root)) {
    const rel = prefix ? `${prefix}/${entry.name}` : entry.name;
    if (entry.isDirectory) {
      found.push(...await listSources(root, rel));
    } else if (isSourceFile(entry.name)) {
      found.push(rel);
    }
  }
  return found.sort();
}

const encoder = new TextEncoder();

async function sha256(parts: readonly (string | Uint8Array)[]): Promise<string> {
  // Length-prefix every part so that concatenations cannot collide.
  const chunks: Uint8Array[] = [];
  for (const part of parts) {
    const bytes = typeof part === "string" ? encoder.encode(part) : part;
    chunks.push(encoder.encode(`${bytes.length}:`), bytes);
  }
  const total = chunks.reduce((n, c) => n + c.length, 0);
  const all = new Uint8Array(total);
  let offset = 0;
  for (const chunk of chunks) {
    all.set(chunk, offset);
    offset += chunk.length;
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", all));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function runPool<T>(
  items: readonly T[],
  jobs: number,
  fn: (item: T) => Promise<void>,
): Promise<void> {
  let next = 0;
  let failed = false;
  const errors: unknown[] = [];
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      const item = items[next++];
      try {
        await fn(item);
      } catch (err) {
        failed = true; // start no new compile; let the running ones finish
        errors.push(err);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(jobs, items.length)) }, worker));
  if (errors.length > 0) throw errors[0];
}

function tempName(path: string): string {
  return `${path}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
}

async function removeQuietly(path: string): Promise<void> {
  await Deno.remove(path).catch(() => {});
}

async function runNvcc(
  nvcc: string,
  args: readonly string[],
  what: string,
  cwd: string,
  quiet: boolean,
): Promise<void> {
  const result = await $`${nvcc} ${args}`.cwd(cwd).stdout("piped").stderr("piped").noThrow();
  const output = (result.stderr + result.stdout).trimEnd();
  if (result.code !== 0) {
    if (!quiet && output) console.error(output);
    const shown = quiet && output
      ? `:\n${output.split("\n").slice(-60).join("\n")}`
      : " (its output is above)";
    throw new NvccError(
      `nvcc failed on ${what} (exit code ${result.code})${shown}`,
      what,
      output,
      result.code,
    );
  }
  // Warnings (register spills above all, from --warn-on-spills) are worth seeing.
  if (!quiet && output) console.error(output);
  // A build that runs but serializes its wgmmas is a silent regression (up to 26 %, item 132).
  const serialized = serializedWgmmaKernels(output);
  if (serialized.length > 0) {
    throw new NvccError(
      `ptxas serialized the wgmmas of ${what} in ${serialized.length} kernel(s), ` +
        `${serialized.join(", ")}: an instruction touches accumulators that ptxas cannot ` +
        `prove finished (nvcc's output is in the error)`,
      what,
      output,
      result.code,
    );
  }
}

/**
 * Compiles every `*.cu` at the top of `sourceDir` to an object, in parallel
 * (`navigator.hardwareConcurrency` jobs), and links them into `outDir/libalpha_moe.so`
 * (`libalpha_moe_debug.so` with `debug`). Does nothing when the stamp (a hash of every source
 * under `sourceDir`, the flags and nvcc's version) matches the last build. Objects are cached by
 * their own hash, so editing one `.cu` recompiles only that file. Results are written to a
 * temporary name and renamed into place, so a reader never sees a half-written library.
 */
export async function buildLibrary(options: BuildOptions = {}): Promise<BuildResult> {
  const started = performance.now();
  const debug = options.debug ?? false;
  const quiet = options.quiet ?? false;
  const outDir = trimSlash(toPath(options.outDir ?? DEFAULT_OUT_DIR));
  const sourceDir = trimSlash(toPath(options.sourceDir ?? DEFAULT_SOURCE_DIR));
  const libPath = `${outDir}/${debug ? DEBUG_LIBRARY_NAME : LIBRARY_NAME}`;
  const stampPath = `${libPath}.stamp`;
  const objDir = `${outDir}/obj/${debug ? "debug" : "release"}`;

  const nvcc = options.nvcc ?? findNvcc();
  const version = await nvccVersion(nvcc);
  checkNvccVersion(version, nvcc);

  const compileFlags = [...NVCC_COMPILE_FLAGS, ...(debug ? NVCC_DEBUG_FLAGS : [])];
  const sources = await listSources(sourceDir);
  const units = sources.filter(isCompileUnit);
  if (units.length === 0) throw new Error(`no .cu files in ${sourceDir}`);
  if (options.sourceDir === undefined) await updateSourceManifest(sources);
  const contents = new Map<string, Uint8Array>();
  for (const rel of sources) contents.set(rel, await Deno.readFile(`${sourceDir}/${rel}`));

  // Everything a unit may include: every source but the units themselves.
  const shared = await sha256(
    sources.filter((rel) => !units.includes(rel)).flatMap((rel) => [rel, contents.get(rel)!]),
  );
  const objects: { unit: string; object: string }[] = [];
  for (const unit of units) {
    const hash = await sha256([
      version.text,
      compileFlags.join(" "),
      shared,
      unit,
      contents.get(unit)!,
    ]);
    objects.push({ unit, object: `${objDir}/${unit.replace(/\.cu$/, "")}-${hash.slice(0, 16)}.o` });
  }
  const stamp = await sha256([
    version.text,
    NVCC_LINK_FLAGS.join(" "),
    ...objects.map((o) => o.object.slice(objDir.length + 1)),
  ]);

  const elapsed = (): number => Math.round((performance.now() - started) / 10) / 100;
  if (!options.force) {
    const previous = await Deno.readTextFile(stampPath).catch(() => "");
    const libExists = await Deno.stat(libPath).then((s) => s.isFile, () => false);
    if (libExists && previous.trim() === stamp) {
      return { path: libPath, built: false, seconds: elapsed() };
    }
  }

  await Deno.mkdir(objDir, { recursive: true });
  const pending = options.force ? objects : [];
  if (!options.force) {
    for (const o of objects) {
      if (!await Deno.stat(o.object).then((s) => s.isFile, () => false)) pending.push(o);
    }
  }
  const jobs = Math.max(1, navigator.hardwareConcurrency || 1);
  await runPool(pending, jobs, async ({ unit, object }) => {
    const tmp = tempName(object);
    try {
      await runNvcc(
        nvcc,
        compileArgs({ unit, sourceDir, output: tmp, debug }),
        `${sourceDir}/${unit}`,
        sourceDir,
        quiet,
      );
      await Deno.rename(tmp, object);
    } finally {
      await removeQuietly(tmp);
    }
  });

  const tmpLib = tempName(libPath);
  try {
    await runNvcc(
      nvcc,
      linkArgs(objects.map((o) => o.object), tmpLib),
      `the link of ${libPath}`,
      sourceDir,
      quiet,
    );
    await Deno.rename(tmpLib, libPath);
  } finally {
    await removeQuietly(tmpLib);
  }
  const tmpStamp = tempName(stampPath);
  await Deno.writeTextFile(tmpStamp, `${stamp}\n`);
  await Deno.rename(tmpStamp, stampPath);

  // Drop objects that no current source produces (older versions of edited files).
  const keep = new Set(objects.map((o) => o.object));
  for await (const entry of Deno.readDir(objDir)) {
    const path = `${objDir}/${entry.name}`;
    if (entry.isFile && entry.name.endsWith(".o") && !keep.has(path)) await removeQuietly(path);
  }
  return { path: libPath, built: true, seconds: elapsed() };
}

/**
 * The text of ffi/sources.ts for the files `paths` (relative to `cuda/`): one text import per
 * file and the `CUDA_SOURCES` record of them, formatted as `deno fmt` would.
 */
export function sourceManifest(paths: readonly string[]): string {
  const sorted = [...paths].sort();
  const imports = sorted.map((rel, i) =>
    `import s${i} from ${JSON.stringify(`../cuda/${rel}`)} with { type: "text" };`
  );
  const entries = sorted.map((rel, i) => `  ${JSON.stringify(rel)}: s${i},`);
  return `/**
 * Every file under \`cuda/\`, imported as text. Generated by \`deno task build\` (tasks/nvcc.ts
 * rewrites it whenever the files under \`cuda/\` change): do not edit by hand.
 *
 * Text imports put the CUDA sources into the module graph, so they travel with the code:
 * \`deno add\`, \`deno install\` and \`deno cache\` fetch them, deno.lock checks their integrity, and
 * the build on first use (ffi/cache.ts) reads them synchronously, offline and without extra
 * permissions, whether the package is a local checkout or a remote (JSR) one.
 *
 * @module
 */
${imports.join("\n")}

/** Every CUDA source and header of the package, by path relative to \`cuda/\`, sorted. */
export const CUDA_SOURCES: Readonly<Record<string, string>> = Object.freeze({
${entries.join("\n")}
});
`;
}

/**
 * Rewrites ffi/sources.ts when the files under `cuda/` are not the ones it imports (default: the
 * repository's `cuda/`). Returns true when it wrote the file.
 */
export async function updateSourceManifest(paths?: readonly string[]): Promise<boolean> {
  const files = paths ?? await listSources(toPath(DEFAULT_SOURCE_DIR));
  const wanted = sourceManifest(files);
  const path = fileURLToPath(SOURCE_MANIFEST_URL);
  const current = await Deno.readTextFile(path).catch(() => "");
  if (current === wanted) return false;
  const tmp = tempName(path);
  await Deno.writeTextFile(tmp, wanted);
  await Deno.rename(tmp, path);
  return true;
}

/** Relative paths (sorted) of every source file under the repository's `cuda/`. */
export function listRepositorySources(): Promise<string[]> {
  return listSources(toPath(DEFAULT_SOURCE_DIR));
}
