// DeviceBuffer, Stream, CudaEvent and CudaGraph. Argument checks that come before any allocation
// run everywhere; the rest needs a Hopper GPU and is reported as ignored without one.
import assert from "node:assert/strict";
import {
  DeviceBuffer,
  type DType,
  type HostArray,
  liveDeviceBuffers,
  numelOf,
} from "../src/buffer.ts";
import { CudaEvent, CudaGraph, Stream, synchronize } from "../src/device.ts";
import { AlphaMoeError, CudaError, InvalidArgumentError } from "../ffi/errors.ts";
import { gpu, gpuTest } from "./_gpu.ts";

function random<D extends DType>(dtype: D, n: number): HostArray<D> {
  const bytes = new Uint8Array(n * { fp8_e4m3: 1, bf16: 2, f32: 4, i32: 4 }[dtype]);
  for (let i = 0; i < bytes.length; i += 65536) {
    crypto.getRandomValues(bytes.subarray(i, Math.min(bytes.length, i + 65536)));
  }
  switch (dtype) {
    case "fp8_e4m3":
      return bytes as HostArray<D>;
    case "bf16":
      return new Uint16Array(bytes.buffer) as HostArray<D>;
    case "f32": {
      // Finite values only: NaN payloads need not survive a float round trip in JS.
      const f = new Float32Array(bytes.buffer);
      for (let i = 0; i < f.length; i++) if (!Number.isFinite(f[i])) f[i] = i;
      return f as HostArray<D>;
    }
    default:
      return new Int32Array(bytes.buffer) as HostArray<D>;
  }
}

Deno.test("DeviceBuffer: shape and typed-array checks come before any allocation", () => {
  assert.equal(numelOf([]), 1);
  assert.equal(numelOf([3, 0, 5]), 0);
  assert.equal(numelOf([2, 3, 4]), 24);
  assert.throws(() => numelOf([2, -1]), InvalidArgumentError);
  assert.throws(() => numelOf([2.5]), /not a non-negative integer/);
  assert.throws(() => DeviceBuffer.alloc("f64" as DType, [2]), /unknown dtype "f64"/);
  assert.throws(
    () => DeviceBuffer.from("f32", [2, 2], new Uint8Array(4) as unknown as Float32Array),
    (err: unknown) =>
      err instanceof InvalidArgumentError && err instanceof AlphaMoeError &&
      /a f32 buffer takes a Float32Array, got Uint8Array/.test(err.message),
  );
  assert.throws(
    () => DeviceBuffer.from("bf16", [4], new Int32Array(4) as unknown as Uint16Array),
    /takes a Uint16Array/,
  );
  assert.throws(
    () => DeviceBuffer.from("i32", [2, 3], new Int32Array(5)),
    /shape \[2, 3\] has 6 elements, but the Int32Array has 5/,
  );
});

for (const dtype of ["fp8_e4m3", "bf16", "f32", "i32"] as const) {
  gpuTest(`DeviceBuffer ${dtype}: upload/download round trip of random data`, () => {
    const shape = [3, 1029];
    const data = random(dtype, 3 * 1029);
    using buffer = DeviceBuffer.from(dtype, shape, data);
    assert.equal(buffer.dtype, dtype);
    assert.deepEqual(buffer.shape, shape);
    assert.equal(buffer.numel, 3 * 1029);
    assert.equal(buffer.bytes, data.byteLength);
    const back = buffer.download();
    assert.equal(back.constructor, data.constructor);
    assert.deepEqual(back, data);

    const next = random(dtype, 3 * 1029);
    buffer.upload(next);
    assert.deepEqual(buffer.download(), next);
  });
}

gpuTest("DeviceBuffer: a 0-element buffer, zero() and fill()", () => {
  using empty = DeviceBuffer.alloc("f32", [0, 7]);
  assert.equal(empty.bytes, 0);
  assert.equal(empty.pointer, null);
  assert.deepEqual(empty.download(), new Float32Array(0));
  empty.upload(new Float32Array(0));
  empty.zero();

  using b = DeviceBuffer.from("i32", [5], new Int32Array([1, 2, 3, 4, 5]));
  b.zero();
  assert.deepEqual(b.download(), new Int32Array(5));
  b.fill(0xff);
  assert.deepEqual(b.download(), new Int32Array(5).fill(-1));
  assert.throws(() => b.fill(256), /must be a byte/);
});

gpuTest("DeviceBuffer: shape and type mismatches on upload", () => {
  using b = DeviceBuffer.alloc("bf16", [4, 4]);
  assert.throws(() => b.upload(new Uint16Array(15)), /has 16 elements, but the Uint16Array has 15/);
  assert.throws(
    () => b.upload(new Float32Array(16) as unknown as Uint16Array),
    /a bf16 buffer takes a Uint16Array, got Float32Array/,
  );
  using other = DeviceBuffer.alloc("bf16", [15]);
  assert.throws(() => b.copyFrom(other), /does not match/);
});

gpuTest("DeviceBuffer: use after free and double free are errors, not crashes", () => {
  const live = liveDeviceBuffers();
  const b = DeviceBuffer.from("f32", [4], new Float32Array([1, 2, 3, 4]));
  assert.equal(liveDeviceBuffers(), live + 1);
  assert.equal(b.freed, false);
  b.free();
  assert.equal(b.freed, true);
  assert.equal(liveDeviceBuffers(), live);
  assert.throws(() => b.pointer, /used after free\(\)/);
  assert.throws(() => b.download(), InvalidArgumentError);
  assert.throws(() => b.upload(new Float32Array(4)), /used after free/);
  assert.throws(() => b.zero(), /used after free/);
  assert.throws(() => b.free(), /double free/);
  b[Symbol.dispose](); // no throw for a freed buffer
  assert.equal(liveDeviceBuffers(), live);
});

gpuTest("DeviceBuffer: `using` frees at the end of the block", () => {
  const live = liveDeviceBuffers();
  let escaped: DeviceBuffer<"i32"> | undefined;
  {
    using b = DeviceBuffer.alloc("i32", [1024]);
    escaped = b;
    assert.equal(liveDeviceBuffers(), live + 1);
  }
  assert.equal(escaped.freed, true);
  assert.equal(liveDeviceBuffers(), live);
  assert.throws(() => escaped.pointer, /used after free/);
});

gpuTest("Stream and CudaEvent: async fill and copy, timing, destroy rules", () => {
  using stream = new Stream();
  assert.notEqual(stream.handle, null);
  using start = new CudaEvent();
  using end = new CudaEvent();
  using src = DeviceBuffer.alloc("i32", [1 << 20]);
  using dst = DeviceBuffer.alloc("i32", [1 << 20]);
  start.record(stream);
  src.fill(0x01, stream);
  dst.copyFrom(src, stream);
  end.record(stream);
  const ms = CudaEvent.elapsed(start, end);
  assert.ok(ms >= 0 && Number.isFinite(ms), `elapsed ${ms} ms`);
  stream.synchronize();
  assert.deepEqual(dst.download(), new Int32Array(1 << 20).fill(0x01010101));
  synchronize();

  const other = new Stream();
  other.destroy();
  assert.throws(() => other.handle, /used after destroy/);
  assert.throws(() => other.destroy(), /destroyed twice/);
  other[Symbol.dispose]();
  assert.throws(() => Stream.default.destroy(), /cannot be destroyed/);
  Stream.default[Symbol.dispose]();
  Stream.default.synchronize();
});

gpuTest("CudaGraph: capture a memset + copy, replay it, errors end the capture", () => {
  const n = 4096;
  using stream = new Stream();
  using src = DeviceBuffer.from("i32", [n], random("i32", n));
  using dst = DeviceBuffer.alloc("i32", [n]);
  dst.fill(0xab);
  synchronize();

  using graph = CudaGraph.capture(stream, () => {
    dst.zero(stream);
    dst.copyFrom(src, stream);
  });
  // Capturing does not run anything.
  assert.deepEqual(dst.download(), new Int32Array(n).fill(0xabababab | 0));
  graph.launch(stream);
  stream.synchronize();
  assert.deepEqual(dst.download(), src.download());

  // The graph replays with the buffers' new contents.
  const next = random("i32", n);
  src.upload(next);
  graph.launch(stream);
  stream.synchronize();
  assert.deepEqual(dst.download(), next);

  // A throwing callback ends the capture and its error comes through; the stream still works.
  assert.throws(
    () =>
      CudaGraph.capture(stream, () => {
        dst.zero(stream);
        throw new RangeError("from the callback");
      }),
    RangeError,
  );
  // A synchronous copy inside a capture is a CUDA error, not a crash.
  assert.throws(
    () => CudaGraph.capture(stream, () => src.upload(next)),
    (err: unknown) => err instanceof CudaError && !err.fatal,
  );
  assert.throws(
    () => CudaGraph.capture(stream, (async () => {}) as unknown as () => void),
    /must be synchronous/,
  );
  assert.throws(() => CudaGraph.capture(Stream.default, () => {}), /cannot be captured/);
  dst.zero(stream);
  stream.synchronize();
  assert.deepEqual(dst.download(), new Int32Array(n));

  graph.destroy();
  assert.throws(() => graph.launch(stream), /used after destroy/);
});

Deno.test({
  name: "DeviceBuffer: the garbage collector frees forgotten buffers, and never a freed one twice",
  ignore: !gpu,
  async fn(): Promise<void> {
    // A fresh process with --expose-gc: 96 forgotten 2 GiB buffers (192 GiB) only fit on one GPU
    // when the FinalizationRegistry frees them.
    const buffer = new URL("../src/buffer.ts", import.meta.url).href;
    const script = `
      import { DeviceBuffer, liveDeviceBuffers } from ${JSON.stringify(buffer)};
      const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
      async function collect() { for (let i = 0; i < 3; i++) { globalThis.gc(); await tick(); } }
      for (let i = 0; i < 96; i++) {
        DeviceBuffer.alloc("fp8_e4m3", [2 ** 31]);
        if (i % 8 === 7) await collect();
      }
      await collect();
      const afterForgotten = liveDeviceBuffers();
      for (let i = 0; i < 32; i++) DeviceBuffer.alloc("f32", [256]).free();
      await collect();
      console.log(JSON.stringify({ afterForgotten, afterFreed: liveDeviceBuffers() }));
    `;
    const file = await Deno.makeTempFile({ suffix: ".ts" });
    try {
      await Deno.writeTextFile(file, script);
      const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", "--no-lock", "--v8-flags=--expose-gc", file],
        stdout: "piped",
        stderr: "piped",
      }).output();
      const out = new TextDecoder().decode(stdout);
      assert.equal(code, 0, out + new TextDecoder().decode(stderr));
      const { afterForgotten, afterFreed } = JSON.parse(out.trim().split("\n").at(-1)!);
      assert.ok(afterForgotten <= 8, `live after GC: ${afterForgotten}`);
      assert.ok(afterFreed >= 0 && afterFreed <= afterForgotten, `after frees: ${afterFreed}`);
    } finally {
      await Deno.remove(file);
    }
  },
});
