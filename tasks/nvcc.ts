/**
 * The one definition of how libalpha_moe is compiled: nvcc's flags, where nvcc is found, and
 * {@link buildLibrary}, which compiles every `cuda/*.cu` to an object in parallel, links them into
 * one shared library with CUDA's runtime linked statically, and skips all of it when nothing
 * changed (a stamp hashes every source, the flags and nvcc's version).
 *
 * Used by `deno task build` (tasks/build.ts), the tests, and later for a build on first use into
 * a cache directory.
 *
 * @module
 */
import $ from "@david/dax";
import { fileURLToPath } from "node:url";

/** Target: Hopper only. sm_90a code (wgmma, TMA) runs on compute capability 9.0 exactly. */
export const NVCC_ARCH_FLAGS: readonly string[] = ["-gencode=arch=compute_90a,code=sm_90a"];

/** Flags for compiling each `.cu` file to an object (release build). */
export const NVCC_COMPILE_FLAGS: readonly string[] = [
  ...NVCC_ARCH_FLAGS,
  "-O3",
  "-std=c++17",
  "-Xcompiler",
  "-fPIC",
  "-Xcompiler",
  "-fvisibility=hidden",
  "-Xptxas=--warn-on-spills",
  "--expt-relaxed-constexpr",
];

/** Extra compile flags of the debug variant (source lines for Nsight Compute / sanitizer). */
export const NVCC_DEBUG_FLAGS: readonly string[] = ["-lineinfo"];

/** Flags for linking the objects into the shared library. CUDA's runtime is linked statically, so
 * the library needs only the driver (libcuda.so.1) at run time. */
export const NVCC_LINK_FLAGS: readonly string[] = [
  ...NVCC_ARCH_FLAGS,
  "-shared",
  "-cudart",
  "static",
];

/** Every flag of a release build (compile and link), for display and docs. */
export const NVCC_FLAGS: readonly string[] = [
  ...NVCC_COMPILE_FLAGS,
  ...NVCC_LINK_FLAGS.filter((flag) => !NVCC_ARCH_FLAGS.includes(flag)),
];

/** The oldest nvcc accepted (sm_90a needs 12.0; the project is tested with 12.8+). */
export const MIN_NVCC_VERSION: readonly [number, number] = [12, 8];

/** File name of the release library. */
export const LIBRARY_NAME = "libalpha_moe.so";
/** File name of the debug (`-lineinfo`) library. */
export const DEBUG_LIBRARY_NAME = "libalpha_moe_debug.so";

const DEFAULT_OUT_DIR = new URL("../build/", import.meta.url);
const DEFAULT_SOURCE_DIR = new URL("../cuda/", import.meta.url);
/** Files that make up the sources: compiled (`.cu` at the top of the source dir) or included. */
const SOURCE_EXTENSIONS = [".cu", ".cuh", ".h", ".hpp", ".inc"];

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

/** nvcc exited non-zero. `stderr` holds its output; the message names the file. */
export class NvccError extends Error {
  /** The error\'s name. */
  override name = "NvccError";
  /** The source being compiled (or the library being linked). */
  readonly file: string;
  /** nvcc's stderr and stdout. */
  readonly output: string;
  /** nvcc's exit code. */
  readonly exitCode: number;
  /** Makes the error. */
  constructor(message: string, file: string, output: string, exitCode: number) {
    super(message);
    this.file = file;
    this.output = output;
    this.exitCode = exitCode;
  }
}

/** Where {@link findNvcc} looks; every field defaults to the process environment. */
export interface FindNvccOptions {
  /** The search path (default `PATH`). */
  path?: string;
  /** The toolkit root (default `CUDA_HOME`, then `CUDA_PATH`). */
  cudaHome?: string;
  /** The last resort (default `/usr/local/cuda/bin`). */
  fallbackDir?: string;
}

function isExecutableFile(path: string): boolean {
  try {
    const info = Deno.statSync(path);
    return info.isFile && ((info.mode ?? 0o111) & 0o111) !== 0;
  } catch (err) {
    if (err instanceof Deno.errors.NotCapable) throw err;
    return false;
  }
}

/**
 * Finds nvcc: on `PATH`, then in `$CUDA_HOME/bin` (or `$CUDA_PATH/bin`), then in
 * `/usr/local/cuda/bin`. Throws an error naming every place looked at and what to install.
 */
export function findNvcc(options: FindNvccOptions = {}): string {
  const searchPath = options.path ?? Deno.env.get("PATH") ?? "";
  const cudaHome = options.cudaHome ?? Deno.env.get("CUDA_HOME") ?? Deno.env.get("CUDA_PATH");
  const fallbackDir = options.fallbackDir ?? "/usr/local/cuda/bin";
  const looked: string[] = [];
  const pathDirs = searchPath.split(":").filter((dir) => dir !== "");
  for (const dir of pathDirs) {
    if (isExecutableFile(`${dir}/nvcc`)) return `${dir}/nvcc`;
  }
  looked.push(`PATH (${pathDirs.length === 0 ? "empty" : pathDirs.join(":")})`);
  if (cudaHome) {
    const candidate = `${cudaHome.replace(/\/+$/, "")}/bin/nvcc`;
    if (isExecutableFile(candidate)) return candidate;
    looked.push(`${candidate} (from CUDA_HOME)`);
  } else {
    looked.push("$CUDA_HOME/bin (CUDA_HOME is not set)");
  }
  const fallback = `${fallbackDir.replace(/\/+$/, "")}/nvcc`;
  if (isExecutableFile(fallback)) return fallback;
  looked.push(fallback);
  throw new Error(
    `nvcc (the CUDA compiler) was not found. Looked on:\n${
      looked.map((place) => `  - ${place}`).join("\n")
    }\nInstall the CUDA toolkit ${MIN_NVCC_VERSION.join(".")} or newer ` +
      `(e.g. the cuda-nvcc and cuda-cudart-dev packages of NVIDIA's apt repository), ` +
      `then put its bin/ on PATH or set CUDA_HOME to its root (e.g. /usr/local/cuda).`,
  );
}

/** Runs `nvcc --version`; returns its full text and the parsed release. */
export async function nvccVersion(
  nvcc: string = findNvcc(),
): Promise<{ text: string; major: number; minor: number }> {
  const result = await $`${nvcc} --version`.quiet().noThrow();
  const text = result.stdout + result.stderr;
  if (result.code !== 0) {
    throw new Error(`${nvcc} --version failed (exit code ${result.code}):\n${text.trim()}`);
  }
  const match = /release (\d+)\.(\d+)/.exec(text);
  if (!match) {
    throw new Error(`could not read the CUDA release from \`${nvcc} --version\`:\n${text}`);
  }
  return { text: text.trim(), major: Number(match[1]), minor: Number(match[2]) };
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
    } else if (SOURCE_EXTENSIONS.some((ext) => entry.name.endsWith(ext))) {
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
  const [minMajor, minMinor] = MIN_NVCC_VERSION;
  if (version.major < minMajor || (version.major === minMajor && version.minor < minMinor)) {
    throw new Error(
      `${nvcc} is CUDA ${version.major}.${version.minor}; alpha-moe needs CUDA ` +
        `${minMajor}.${minMinor} or newer. Put a newer toolkit's bin/ first on PATH or set CUDA_HOME.`,
    );
  }

  const compileFlags = [...NVCC_COMPILE_FLAGS, ...(debug ? NVCC_DEBUG_FLAGS : [])];
  const sources = await listSources(sourceDir);
  const units = sources.filter((rel) => rel.endsWith(".cu") && !rel.includes("/"));
  if (units.length === 0) throw new Error(`no .cu files in ${sourceDir}`);
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
        [...compileFlags, `-I${sourceDir}`, "-c", `${sourceDir}/${unit}`, "-o", tmp],
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
      [...NVCC_LINK_FLAGS, ...objects.map((o) => o.object), "-o", tmpLib],
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
