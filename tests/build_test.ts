// buildLibrary: stamps, parallel objects, the debug variant, nvcc failures and a missing nvcc.
// The tests that run nvcc are ignored where there is none.
import assert from "node:assert/strict";
import {
  buildLibrary,
  DEBUG_LIBRARY_NAME,
  findNvcc,
  LIBRARY_NAME,
  NVCC_FLAGS,
  NvccError,
} from "../tasks/nvcc.ts";
import { serializedWgmmaKernels } from "../ffi/build.ts";

const hasNvcc = ((): boolean => {
  try {
    findNvcc();
    return true;
  } catch {
    return false;
  }
})();

Deno.test({
  name: "buildLibrary: the second build of the project is up to date",
  ignore: !hasNvcc,
  async fn(): Promise<void> {
    const first = await buildLibrary({ quiet: true });
    const second = await buildLibrary({ quiet: true });
    assert.equal(second.built, false);
    assert.equal(second.path, first.path);
    assert.ok(second.path.endsWith(`/build/${LIBRARY_NAME}`), second.path);
    assert.ok((await Deno.stat(second.path)).isFile);
  },
});

const TINY_HEADER = `#pragma once
#define TINY_ANSWER 42
`;
const TINY_UNIT = `#include "tiny.cuh"
__global__ void tiny_kernel(int* out) { *out = TINY_ANSWER; }
extern "C" __attribute__((visibility("default"))) int tiny_answer(void) { return TINY_ANSWER; }
extern "C" int tiny_hidden(void) { return 7; }
`;
const TINY_OTHER =
  `extern "C" __attribute__((visibility("default"))) int tiny_other(void) { return 1; }
`;

Deno.test({
  name: "buildLibrary: builds a source tree in parallel, stamps it, rebuilds on a header change",
  ignore: !hasNvcc,
  async fn(): Promise<void> {
    const root = await Deno.makeTempDir({ prefix: "amoe_build_test_" });
    try {
      const src = `${root}/cuda`;
      const out = `${root}/out`;
      await Deno.mkdir(`${src}/sub`, { recursive: true });
      await Deno.writeTextFile(`${src}/tiny.cuh`, TINY_HEADER);
      await Deno.writeTextFile(`${src}/tiny.cu`, TINY_UNIT);
      await Deno.writeTextFile(`${src}/other.cu`, TINY_OTHER);
      await Deno.writeTextFile(`${src}/sub/unused.cuh`, "// only hashed\n");

      const first = await buildLibrary({ sourceDir: src, outDir: out, quiet: true });
      assert.equal(first.built, true);
      assert.equal(first.path, `${out}/${LIBRARY_NAME}`);
      const objects = [...Deno.readDirSync(`${out}/obj/release`)].map((e) => e.name).sort();
      assert.equal(objects.length, 2, objects.join(" "));
      assert.match(objects[0], /^other-[0-9a-f]{16}\.o$/);

      // Only the API is exported (-fvisibility=hidden), and cudart is not a dependency.
      const lib = Deno.dlopen(first.path, { tiny_answer: { parameters: [], result: "i32" } });
      assert.equal(lib.symbols.tiny_answer(), 42);
      lib.close();
      assert.throws(() =>
        Deno.dlopen(first.path, { tiny_hidden: { parameters: [], result: "i32" } })
      );

      const again = await buildLibrary({ sourceDir: src, outDir: out, quiet: true });
      assert.equal(again.built, false);

      // A change to a nested header (hashed, not compiled) rebuilds.
      await Deno.writeTextFile(`${src}/sub/unused.cuh`, "// changed\n");
      const rebuilt = await buildLibrary({ sourceDir: src, outDir: out, quiet: true });
      assert.equal(rebuilt.built, true);
      const after = [...Deno.readDirSync(`${out}/obj/release`)].map((e) => e.name).sort();
      assert.equal(after.length, 2, "stale objects are removed");
      assert.notDeepEqual(after, objects);

      const forced = await buildLibrary({ sourceDir: src, outDir: out, quiet: true, force: true });
      assert.equal(forced.built, true);

      const debug = await buildLibrary({ sourceDir: src, outDir: out, quiet: true, debug: true });
      assert.equal(debug.path, `${out}/${DEBUG_LIBRARY_NAME}`);
      assert.equal(debug.built, true);
      assert.equal((await buildLibrary({ sourceDir: src, outDir: out, quiet: true })).built, false);

      // nvcc's failure names the file and, when quiet, carries nvcc's output.
      await Deno.writeTextFile(`${src}/broken.cu`, "this is not C++;\n");
      await assert.rejects(
        buildLibrary({ sourceDir: src, outDir: out, quiet: true }),
        (e: unknown) => {
          assert.ok(e instanceof NvccError);
          assert.ok(e.file.endsWith("/broken.cu"), e.file);
          assert.match(e.message, /nvcc failed on .*broken\.cu/);
          assert.match(e.message, /error/);
          assert.ok(e.output.length > 0);
          return true;
        },
      );
      // The library in place is the last good one.
      assert.ok((await Deno.stat(first.path)).isFile);
      assert.equal([...Deno.readDirSync(out)].filter((e) => e.name.includes(".tmp-")).length, 0);
    } finally {
      await Deno.remove(root, { recursive: true });
    }
  },
});

Deno.test("serializedWgmmaKernels: ptxas's two serialization notes, one name per kernel", () => {
  const output = [
    "ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are " +
    "serialized due to non wgmma instructions reading accumulator registers of  a wgmma between " +
    "start and end of the pipeline stage in the function '_Z1av'",
    "ptxas info    : (C7517) warpgroup.wait is injected in around line 49 by compiler to allow " +
    "use of registers defined by GMMA in function '_Z1bv'",
    "ptxas info    : (C7517) warpgroup.wait is injected in around line 60 by compiler to allow " +
    "use of registers defined by GMMA in function '_Z1bv'",
    "ptxas warning : Registers are spilled to local memory in function '_Z1cv', 8 bytes spill",
  ].join("\n");
  assert.deepEqual(serializedWgmmaKernels(output), ["_Z1av", "_Z1bv"]);
  assert.deepEqual(serializedWgmmaKernels(""), []);
});

Deno.test({
  name: "buildLibrary: a kernel whose wgmma ptxas serializes fails the build, named",
  ignore: !hasNvcc,
  async fn(): Promise<void> {
    const root = await Deno.makeTempDir({ prefix: "amoe-serialized-" });
    try {
      // The accumulator is read while its wgmma may still run: ptxas injects a wait.
      await Deno.writeTextFile(
        `${root}/serialized.cu`,
        `#include <cstdint>
__global__ void serialized(float* out, uint64_t a, uint64_t b) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
  asm volatile("wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, %4, %5, 0, 1, 1;"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "l"(a), "l"(b));
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  out[threadIdx.x] = d[0];
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}
`,
      );
      await assert.rejects(
        buildLibrary({ sourceDir: root, outDir: `${root}/out`, quiet: true }),
        (e: unknown) => {
          assert.ok(e instanceof NvccError);
          assert.match(e.message, /ptxas serialized the wgmmas of .*serialized\.cu/);
          assert.match(e.message, /_Z10serializedPfmm/);
          return true;
        },
      );
    } finally {
      await Deno.remove(root, { recursive: true });
    }
  },
});

Deno.test("findNvcc: a clear error naming where it looked and what to install", () => {
  assert.throws(
    () =>
      findNvcc({
        path: "/nonexistent-bin-a:/nonexistent-bin-b",
        cudaHome: "/nonexistent-cuda",
        fallbackDir: "/nonexistent-fallback/bin",
      }),
    (err: unknown) => {
      assert.ok(err instanceof Error);
      assert.match(err.message, /nvcc \(the CUDA compiler\) was not found/);
      assert.match(err.message, /PATH \(\/nonexistent-bin-a:\/nonexistent-bin-b\)/);
      assert.match(err.message, /\/nonexistent-cuda\/bin\/nvcc \(from CUDA_HOME\)/);
      assert.match(err.message, /\/nonexistent-fallback\/bin\/nvcc/);
      assert.match(err.message, /Install the CUDA toolkit 12\.8/);
      return true;
    },
  );
});

Deno.test("NVCC_FLAGS: Hopper only, static cudart, hidden visibility", () => {
  for (
    const flag of [
      "-gencode=arch=compute_90a,code=sm_90a",
      "-O3",
      "-std=c++17",
      "-fPIC",
      "-fvisibility=hidden",
      "-shared",
      "-Xptxas=--warn-on-spills",
      "--expt-relaxed-constexpr",
    ]
  ) {
    assert.ok(NVCC_FLAGS.includes(flag), flag);
  }
  assert.equal(NVCC_FLAGS[NVCC_FLAGS.indexOf("-cudart") + 1], "static");
});

Deno.test("deno task build --help", async () => {
  const build = new URL("../tasks/build.ts", import.meta.url).pathname;
  const run = (args: string[]): Promise<Deno.CommandOutput> =>
    new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-read", "--allow-env", "--allow-run", "--allow-write", build, ...args],
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).output();
  const help = await run(["--help"]);
  assert.equal(help.code, 0);
  const text = new TextDecoder().decode(help.stdout);
  assert.match(text, /--debug/);
  assert.match(text, /--force/);
  const bad = await run(["--nope"]);
  assert.equal(bad.code, 2);
});
