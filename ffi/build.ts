/**
 * How libalpha_moe is compiled, defined once: nvcc's flags, the compile and link command lines,
 * where nvcc is found and which release it is. `deno task build` (tasks/nvcc.ts) and the build on
 * first use into the cache (ffi/cache.ts) both take their commands from here, so the two
 * libraries are built the same way.
 *
 * Runtime code: plain Deno APIs, no dependencies, synchronous where the loader needs it.
 *
 * @module
 */

/** The one target: sm_90a code (wgmma, TMA) runs on compute capability 9.0 exactly. */
export const TARGET_ARCH = "sm_90a";

/** Target: Hopper only. */
export const NVCC_ARCH_FLAGS: readonly string[] = [
  `-gencode=arch=compute_90a,code=${TARGET_ARCH}`,
];

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

/** Files that make up the sources: compiled (`.cu` at the top of the source dir) or included. */
export const SOURCE_EXTENSIONS: readonly string[] = [".cu", ".cuh", ".h", ".hpp", ".inc"];

/** Is `rel` (a path relative to the source dir) a source file? */
export function isSourceFile(rel: string): boolean {
  return SOURCE_EXTENSIONS.some((ext) => rel.endsWith(ext));
}

/** Is `rel` a translation unit, i.e. a `.cu` file at the top of the source dir? */
export function isCompileUnit(rel: string): boolean {
  return rel.endsWith(".cu") && !rel.includes("/");
}

/** nvcc's arguments that compile `sourceDir/unit` to `output`. */
export function compileArgs(
  options: { unit: string; sourceDir: string; output: string; debug?: boolean },
): string[] {
  const { unit, sourceDir, output } = options;
  return [
    ...NVCC_COMPILE_FLAGS,
    ...(options.debug ? NVCC_DEBUG_FLAGS : []),
    `-I${sourceDir}`,
    "-c",
    `${sourceDir}/${unit}`,
    "-o",
    output,
  ];
}

/** nvcc's arguments that link `objects` into the shared library `output`. */
export function linkArgs(objects: readonly string[], output: string): string[] {
  return [...NVCC_LINK_FLAGS, ...objects, "-o", output];
}

/**
 * The kernels whose wgmmas ptxas serialized, from its notes in nvcc's output ("wgmma.mma_async
 * instructions are serialized", "warpgroup.wait is injected"): where it cannot prove that the
 * accumulators an instruction touches are finished, it waits for every wgmma in flight. A change
 * that let this happen unnoticed ran up to 26 % slower (bench/NOTES.md, item 132).
 */
export function serializedWgmmaKernels(output: string): string[] {
  const kernels = new Set<string>();
  for (const line of output.split("\n")) {
    if (!/wgmma\.mma_async instructions are serialized|warpgroup\.wait is injected/.test(line)) {
      continue;
    }
    kernels.add(/in (?:the )?function '([^']+)'/.exec(line)?.[1] ?? line.trim());
  }
  return [...kernels];
}

/** nvcc exited non-zero. `output` holds what it printed; the message names the file. */
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

/** nvcc was not found; {@link NvccNotFoundError.looked} lists every place looked at. */
export class NvccNotFoundError extends Error {
  /** The error\'s name. */
  override name = "NvccNotFoundError";
  /** Every place looked at, in order, in words. */
  readonly looked: readonly string[];
  /** Makes the error. */
  constructor(message: string, looked: readonly string[]) {
    super(message);
    this.looked = looked;
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

/** What to install when nvcc is missing (one sentence). */
export const INSTALL_HINT: string =
  `Install the CUDA toolkit ${MIN_NVCC_VERSION.join(".")} or newer ` +
  `(e.g. the cuda-nvcc and cuda-cudart-dev packages of NVIDIA's apt repository), ` +
  `then put its bin/ on PATH or set CUDA_HOME to its root (e.g. /usr/local/cuda).`;

/**
 * Finds nvcc: on `PATH`, then in `$CUDA_HOME/bin` (or `$CUDA_PATH/bin`), then in
 * `/usr/local/cuda/bin`. Needs `--allow-env` (unless every option is given) and `--allow-read`;
 * a permission error is re-thrown as it is.
 *
 * @throws {NvccNotFoundError} naming every place looked at and what to install
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
  throw new NvccNotFoundError(
    `nvcc (the CUDA compiler) was not found. Looked on:\n${
      looked.map((place) => `  - ${place}`).join("\n")
    }\n${INSTALL_HINT}`,
    looked,
  );
}

/** nvcc's release, as {@link parseNvccVersion} reads it. */
export interface NvccVersion {
  /** The whole output of `nvcc --version`, trimmed. */
  text: string;
  /** e.g. 12 */
  major: number;
  /** e.g. 8 */
  minor: number;
}

/** Reads the release out of `nvcc --version`'s output. */
export function parseNvccVersion(text: string, nvcc = "nvcc"): NvccVersion {
  const match = /release (\d+)\.(\d+)/.exec(text);
  if (!match) {
    throw new Error(`could not read the CUDA release from \`${nvcc} --version\`:\n${text}`);
  }
  return { text: text.trim(), major: Number(match[1]), minor: Number(match[2]) };
}

/** Throws when `version` is older than {@link MIN_NVCC_VERSION}. */
export function checkNvccVersion(version: NvccVersion, nvcc: string): void {
  const [minMajor, minMinor] = MIN_NVCC_VERSION;
  if (version.major < minMajor || (version.major === minMajor && version.minor < minMinor)) {
    throw new Error(
      `${nvcc} is CUDA ${version.major}.${version.minor}; alpha-moe needs CUDA ` +
        `${minMajor}.${minMinor} or newer. Put a newer toolkit's bin/ first on PATH or set CUDA_HOME.`,
    );
  }
}

const decoder = new TextDecoder();

/** Runs `nvcc --version` synchronously (needs `--allow-run`). */
export function nvccVersionSync(nvcc: string): NvccVersion {
  const result = new Deno.Command(nvcc, {
    args: ["--version"],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).outputSync();
  const text = decoder.decode(result.stdout) + decoder.decode(result.stderr);
  if (result.code !== 0) {
    throw new Error(`${nvcc} --version failed (exit code ${result.code}):\n${text.trim()}`);
  }
  return parseNvccVersion(text, nvcc);
}
