// Loading the library, the ABI handshake, error mapping and the no-GPU answers. Runs everywhere:
// without nvcc the build-and-load tests are ignored; with a Hopper GPU the no-GPU ones are.
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import {
  ABI_VERSION,
  BUILD_COMMAND,
  CACHE_ENV,
  DEFAULT_LIBRARY_URL,
  LIBRARY_ENV,
  LibraryLoadError,
  loadedLibraryPath,
  openLibrary,
} from "../ffi/library.ts";
import {
  AlphaMoeError,
  CudaFatalError,
  errorForStatus,
  InvalidArgumentError,
  NoDeviceError,
  OutOfMemoryError,
  Status,
  statusName,
  UnsupportedError,
  unwrap,
} from "../ffi/errors.ts";
import { deviceCount, deviceInfo, hasHopperGpu, requireHopper } from "../src/device.ts";
import { buildLibrary, findNvcc } from "../tasks/nvcc.ts";
import { gpu, gpuTest } from "./_gpu.ts";

const nvcc: string | undefined = (() => {
  try {
    return findNvcc();
  } catch {
    return undefined;
  }
})();
const libraryCanLoad = nvcc !== undefined || existsSync(fileURLToPath(DEFAULT_LIBRARY_URL));

/** Runs a script in a fresh Deno process; returns its exit code and output. */
async function runScript(
  script: string,
  options: { permissions: string[]; env?: Record<string, string> },
): Promise<{ code: number; output: string }> {
  const file = await Deno.makeTempFile({ suffix: ".ts" });
  try {
    await Deno.writeTextFile(file, script);
    const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--no-prompt", "--no-lock", ...options.permissions, file],
      env: { NO_COLOR: "1", ...options.env },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const decoder = new TextDecoder();
    return { code, output: decoder.decode(stdout) + decoder.decode(stderr) };
  } finally {
    await Deno.remove(file);
  }
}

const libraryModule = new URL("../ffi/library.ts", import.meta.url).href;

// First: nothing is loaded yet in this process.
Deno.test("openLibrary: a missing library lists every path tried, the env var and the build command", () => {
  try {
    openLibrary({ path: "/nonexistent.so" });
    assert.fail("openLibrary should throw");
  } catch (error) {
    assert.ok(error instanceof LibraryLoadError);
    assert.match(error.message, /\/nonexistent\.so \(path option\): not found/);
    assert.match(error.message, new RegExp(LIBRARY_ENV));
    assert.ok(error.message.includes(BUILD_COMMAND), error.message);
    assert.equal(error.attempts.length, 1);
    assert.equal(error.attempts[0].path, "/nonexistent.so");
  }
});

Deno.test("openLibrary: ALPHA_MOE_LIB is tried, and named in the error", async () => {
  const { code, output } = await runScript(
    `import { openLibrary } from ${JSON.stringify(libraryModule)};
     try { openLibrary(); } catch (err) { console.log(err.name); console.log(err.message);
       console.log("cause:", err.cause !== undefined); Deno.exit(3); }`,
    {
      permissions: ["--allow-ffi", "--allow-env", "--allow-read"],
      env: { [LIBRARY_ENV]: "/nonexistent/from-env.so" },
    },
  );
  assert.equal(code, 3, output);
  assert.match(output, /LibraryLoadError/);
  assert.match(output, /\/nonexistent\/from-env\.so \(ALPHA_MOE_LIB\): not found/);
  assert.match(output, /deno task build/);
  assert.match(output, /cause: true/);
});

Deno.test("importing the modules needs no permission; loading without --allow-ffi re-throws NotCapable", async () => {
  const device = new URL("../src/device.ts", import.meta.url).href;
  const buffer = new URL("../src/buffer.ts", import.meta.url).href;
  const { code, output } = await runScript(
    `import { openLibrary } from ${JSON.stringify(libraryModule)};
     import { Stream } from ${JSON.stringify(device)};
     import { DeviceBuffer } from ${JSON.stringify(buffer)};
     console.log("imported", Stream.default.handle === null, typeof DeviceBuffer.alloc);
     try { openLibrary({ path: "/nonexistent.so" }); }
     catch (err) { console.log(err instanceof Deno.errors.NotCapable ? "NotCapable" : err.name); }`,
    { permissions: [] },
  );
  assert.equal(code, 0, output);
  assert.match(output, /imported true function/);
  assert.match(output, /NotCapable/);
});

Deno.test({
  name: "the library builds with nvcc, loads, and passes the ABI handshake",
  ignore: nvcc === undefined,
  async fn(): Promise<void> {
    const built = await buildLibrary({ quiet: true });
    assert.equal(built.path, fileURLToPath(DEFAULT_LIBRARY_URL));
    const lib = openLibrary();
    assert.equal(lib.symbols.amoe_abi_version(), ABI_VERSION);
    assert.equal(loadedLibraryPath(), built.path, "build/ comes before the cache");
    assert.equal(openLibrary(), lib, "openLibrary() is cached");
    assert.equal(openLibrary({ path: built.path }), lib, "the same path gives the same library");
    // Once loaded, another (missing) path still gets the listing error.
    assert.throws(() => openLibrary({ path: "/nonexistent.so" }), /deno task build/);
  },
});

Deno.test({
  name: "resolution order: build/ of the repository is used before the cache, which is untouched",
  ignore: nvcc === undefined,
  async fn(): Promise<void> {
    const built = await buildLibrary({ quiet: true });
    const cache = await Deno.makeTempDir({ prefix: "amoe_ffi_cache_" });
    try {
      const { code, output } = await runScript(
        `import { loadedLibraryPath, openLibrary } from ${JSON.stringify(libraryModule)};
         openLibrary(); console.log("loaded from", loadedLibraryPath());`,
        {
          permissions: ["--allow-ffi", "--allow-env", "--allow-read", "--allow-run"],
          env: { [CACHE_ENV]: cache },
        },
      );
      assert.equal(code, 0, output);
      assert.ok(output.includes(`loaded from ${built.path}`), output);
      assert.deepEqual([...Deno.readDirSync(cache)], [], "the cache is not touched");
    } finally {
      await Deno.remove(cache, { recursive: true });
    }
  },
});

Deno.test("errorForStatus: one class per status, fatal only for sticky errors", () => {
  const cases = [
    [Status.INVALID_ARGUMENT, InvalidArgumentError],
    [Status.UNSUPPORTED, UnsupportedError],
    [Status.NO_DEVICE, NoDeviceError],
    [Status.OUT_OF_MEMORY, OutOfMemoryError],
    [Status.CUDA_FATAL, CudaFatalError],
  ] as const;
  for (const [code, Class] of cases) {
    const err = errorForStatus(code, "boom");
    assert.ok(err instanceof Class && err instanceof AlphaMoeError && err instanceof Error);
    assert.equal(err.code, code);
    assert.equal(err.name, Class.name);
    assert.equal(err.fatal, code === Status.CUDA_FATAL);
  }
  assert.match(errorForStatus(Status.CUDA_FATAL, "illegal address").message, /restart/);
  assert.equal(statusName(Status.OUT_OF_MEMORY), "AMOE_ERR_OUT_OF_MEMORY");
  assert.equal(statusName(42), "unknown status 42");
  unwrap(Status.OK); // no throw, and no library needed
});

Deno.test({
  name: "unwrap: the library's message and status become the error",
  ignore: !libraryCanLoad,
  fn(): void {
    const lib = openLibrary();
    // Argument checks come before any device work, so this runs without a GPU.
    assert.throws(
      () => unwrap(lib.symbols.amoe_malloc(null, 16n)),
      (err: unknown) =>
        err instanceof InvalidArgumentError &&
        /amoe_malloc: ptr is null \[AMOE_ERR_INVALID_ARGUMENT\]/.test(err.message),
    );
    assert.throws(
      () => unwrap(lib.symbols.amoe_memset_async(null, 300, 4n, null)),
      /dst is null/,
    );
    assert.throws(() => unwrap(lib.symbols.amoe_stream_destroy(null)), InvalidArgumentError);
    assert.throws(
      () => unwrap(lib.symbols.amoe_stream_begin_capture(null)),
      /legacy default stream \(NULL\) cannot be captured/,
    );
  },
});

Deno.test({
  name: "no Hopper GPU: deviceCount() answers, requireHopper() explains, hasHopperGpu() is false",
  ignore: gpu || !libraryCanLoad,
  fn(): void {
    const count = deviceCount();
    assert.ok(count >= 0);
    assert.equal(hasHopperGpu(), false);
    if (count === 0) {
      assert.throws(
        () => requireHopper(),
        (err: unknown) => err instanceof NoDeviceError && /no CUDA GPU found/.test(err.message),
      );
      assert.throws(() => deviceInfo(0), NoDeviceError);
    } else {
      assert.throws(() => requireHopper(), /Hopper GPU/);
    }
  },
});

gpuTest("a Hopper GPU: deviceInfo() and requireHopper() agree", () => {
  const info = requireHopper();
  assert.deepEqual(info.computeCapability, [9, 0]);
  assert.deepEqual(deviceInfo(0), info);
  assert.ok(info.name.length > 0);
  assert.ok(info.smCount > 0, `smCount ${info.smCount}`);
  assert.ok(info.l2Bytes > 0, `l2Bytes ${info.l2Bytes}`);
  assert.ok(deviceCount() >= 1);
  assert.equal(hasHopperGpu(), true);
  assert.throws(() => deviceInfo(deviceCount()), InvalidArgumentError);
});
