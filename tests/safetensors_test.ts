import assert from "node:assert/strict";
import {
  loadSafetensors,
  loadSafetensorsSync,
  readSafetensors,
  SafetensorsError,
  type SafetensorsTensorInput,
  writeSafetensors,
} from "../src/safetensors.ts";

const fixture = (name: string): URL => new URL(`./fixtures/${name}`, import.meta.url);

/** A file from a raw header object and a data section, for malformed cases. */
function craft(
  header: unknown,
  data: Uint8Array = new Uint8Array(0),
  rawHeader?: string,
): Uint8Array {
  const json = new TextEncoder().encode(rawHeader ?? JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setUint32(0, json.length, true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

function assertError(fn: () => unknown, pattern: RegExp, tensor?: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof SafetensorsError, `expected SafetensorsError, got ${e}`);
    assert.match(e.message, pattern);
    assert.equal(e.name, "SafetensorsError");
    if (tensor !== undefined) {
      assert.equal(e.tensor, tensor);
      assert.ok(e.message.includes(tensor), "message names the tensor");
    }
    return true;
  });
}

Deno.test("reads the quant fixture: dtypes, shapes, typed data", async () => {
  const f = await loadSafetensors(fixture("quant.safetensors"));
  assert.deepEqual(f.names().sort(), ["q", "scale", "x"]);
  const x = f.get("x");
  assert.equal(x.dtype, "BF16");
  assert.deepEqual(x.shape, [6, 512]);
  assert.ok(x.data instanceof Uint16Array);
  assert.equal(x.data.length, 6 * 512);
  assert.ok(f.get("q").data instanceof Uint8Array);
  assert.equal(f.get("q").dtype, "F8_E4M3");
  const scale = f.f32("scale");
  assert.equal(scale.length, 24);
  assert.ok(scale.every((s) => s > 0));
  assert.deepEqual(f.metadata, {});
});

Deno.test("reads moe_small: metadata and every dtype accessor", () => {
  const f = loadSafetensorsSync(fixture("moe_small.safetensors"));
  assert.equal(f.metadata.M, "5");
  assert.equal(f.metadata.K, "256");
  assert.equal(f.i32("num_tokens_post_padded")[0], 128);
  assert.equal(f.f8("w").length, 9 * 256 * 256);
  assert.equal(f.bf16("x").length, 5 * 256);
  assert.deepEqual(f.get("w2_scale").shape, [9, 2, 1]);
  assert.ok(!f.has("nope"));
  assertError(() => f.get("nope"), /no tensor "nope"/, "nope");
  assertError(() => f.f32("x"), /dtype BF16, expected F32/, "x");
});

Deno.test("round-trips every dtype, metadata and scalars", () => {
  const tensors: Record<string, SafetensorsTensorInput> = {
    f32: { dtype: "F32", shape: [2, 3], data: Float32Array.from([1, -2, 3.5, 0, 1e-30, -7]) },
    i32: { dtype: "I32", shape: [3], data: Int32Array.from([-1, 0, 2 ** 31 - 1]) },
    bf16: { dtype: "BF16", shape: [2], data: Uint16Array.from([0x3f80, 0xc000]) },
    f16: { dtype: "F16", shape: [1], data: Uint16Array.from([0x3c00]) },
    fp8: { dtype: "F8_E4M3", shape: [5], data: Uint8Array.from([0, 0x38, 0x7e, 0xfe, 0x7f]) },
    u8: { dtype: "U8", shape: [1, 1], data: Uint8Array.from([255]) },
    i64: { dtype: "I64", shape: [2], data: BigInt64Array.from([-5n, 2n ** 40n]) },
    f64: { dtype: "F64", shape: [], data: Float64Array.from([Math.PI]) },
    empty: { dtype: "F32", shape: [0, 4], data: new Float32Array(0) },
  };
  const bytes = writeSafetensors(tensors, { format: "pt", note: "hello" });
  const f = readSafetensors(bytes);
  assert.deepEqual(f.metadata, { format: "pt", note: "hello" });
  for (const [name, t] of Object.entries(tensors)) {
    const got = f.get(name);
    assert.equal(got.dtype, t.dtype, name);
    assert.deepEqual(got.shape, [...t.shape], name);
    assert.equal(got.data.constructor, t.data.constructor, name);
    const values = (d: ArrayBufferView): unknown[] =>
      Array.from(d as unknown as ArrayLike<number | bigint>);
    assert.deepEqual(values(got.data), values(t.data), name);
  }
  // Header length is a multiple of 8, and every tensor is a zero-copy view (aligned).
  const headerLen = new DataView(bytes.buffer).getUint32(0, true);
  assert.equal(headerLen % 8, 0);
  for (const name of f.names()) assert.equal(f.get(name).data.buffer, bytes.buffer, name);
});

Deno.test("writes contiguous offsets that cover the data section (reference-library layout)", () => {
  const bytes = writeSafetensors({
    a: { dtype: "U8", shape: [3], data: new Uint8Array(3) },
    b: { dtype: "F32", shape: [1], data: new Float32Array(1) },
    c: { dtype: "BF16", shape: [1], data: new Uint16Array(1) },
  });
  const n = new DataView(bytes.buffer).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const spans = Object.values(header as Record<string, { data_offsets: number[] }>)
    .map((t) => t.data_offsets)
    .sort((x, y) => x[0] - y[0]);
  let at = 0;
  for (const [b, e] of spans) {
    assert.equal(b, at);
    at = e;
  }
  assert.equal(at, bytes.length - 8 - n);
});

Deno.test("re-writing a fixture reproduces the same tensors", () => {
  const src = loadSafetensorsSync(fixture("moe_small.safetensors"));
  const again = readSafetensors(writeSafetensors(src));
  assert.deepEqual(again.metadata, src.metadata);
  assert.deepEqual(again.names().sort(), src.names().sort());
  for (const name of src.names()) {
    const a = src.get(name);
    const b = again.get(name);
    assert.equal(a.dtype, b.dtype);
    assert.deepEqual(a.shape, b.shape);
    assert.deepEqual(
      new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength),
      new Uint8Array(b.data.buffer, b.data.byteOffset, b.data.byteLength),
    );
  }
});

Deno.test("unaligned input bytes and copy: data is copied, values unchanged", () => {
  const bytes = writeSafetensors({
    v: { dtype: "F32", shape: [3], data: Float32Array.from([1.5, 2.5, -3]) },
  });
  const shifted = new Uint8Array(bytes.length + 1).subarray(1);
  shifted.set(bytes);
  const f = readSafetensors(shifted);
  assert.deepEqual([...f.f32("v")], [1.5, 2.5, -3]);
  assert.notEqual(f.f32("v").buffer, shifted.buffer);
  const c = readSafetensors(bytes, { copy: true });
  assert.notEqual(c.f32("v").buffer, bytes.buffer);
  assert.deepEqual([...c.f32("v")], [1.5, 2.5, -3]);
});

Deno.test("error: truncated file (too short, header past the end, data cut)", () => {
  assertError(() => readSafetensors(new Uint8Array(5)), /truncated file: 5 bytes/);
  const ok = writeSafetensors({ t: { dtype: "F32", shape: [4], data: new Float32Array(4) } });
  const headerLen = new DataView(ok.buffer).getUint32(0, true);
  assertError(() => readSafetensors(ok.subarray(0, 8 + headerLen - 1)), /truncated file: header/);
  assertError(() => readSafetensors(ok.subarray(0, ok.length - 1)), /out of range/, "t");
  // An absurd header length is refused before anything is allocated.
  const huge = new Uint8Array(16);
  new DataView(huge.buffer).setUint32(4, 1, true);
  assertError(() => readSafetensors(huge), /over the .* limit/);
});

Deno.test("error: bad header JSON", () => {
  assertError(() => readSafetensors(craft(null, undefined, "{not json")), /bad header JSON/);
  assertError(() => readSafetensors(craft([1, 2])), /not a JSON object/);
  assertError(() => readSafetensors(craft({ __metadata__: { a: 1 } })), /__metadata__\["a"\]/);
  assertError(() => readSafetensors(craft({ t: 5 })), /tensor "t": header entry/, "t");
  const invalidUtf8 = craft({});
  const broken = new Uint8Array([...invalidUtf8.subarray(0, 8), 0xff, 0xfe]);
  new DataView(broken.buffer).setUint32(0, 2, true);
  assertError(() => readSafetensors(broken), /bad header JSON/);
});

Deno.test("error: unknown dtype names the tensor", () => {
  const file = craft(
    { weird: { dtype: "F4", shape: [1], data_offsets: [0, 1] } },
    new Uint8Array(1),
  );
  assertError(() => readSafetensors(file), /tensor "weird": unknown dtype "F4"/, "weird");
});

Deno.test("error: offsets out of range or malformed name the tensor", () => {
  const data = new Uint8Array(8);
  assertError(
    () => readSafetensors(craft({ w: { dtype: "F32", shape: [4], data_offsets: [0, 16] } }, data)),
    /tensor "w": data_offsets \[0, 16\] out of range/,
    "w",
  );
  assertError(
    () => readSafetensors(craft({ w: { dtype: "F32", shape: [1], data_offsets: [8, 4] } }, data)),
    /tensor "w": data_offsets/,
    "w",
  );
  assertError(
    () => readSafetensors(craft({ w: { dtype: "F32", shape: [1], data_offsets: [0] } }, data)),
    /tensor "w": data_offsets/,
    "w",
  );
});

Deno.test("error: shape/bytes mismatch and bad shapes name the tensor", () => {
  const data = new Uint8Array(16);
  assertError(
    () =>
      readSafetensors(craft({ s: { dtype: "F32", shape: [2, 3], data_offsets: [0, 16] } }, data)),
    /tensor "s": 16 bytes do not match dtype F32 and shape \[2, 3\] \(24 bytes expected\)/,
    "s",
  );
  assertError(
    () =>
      readSafetensors(craft({ s: { dtype: "F32", shape: [-1, 4], data_offsets: [0, 16] } }, data)),
    /tensor "s": shape/,
    "s",
  );
});

Deno.test("write errors: byte mismatch, unknown dtype, reserved name, bad metadata", () => {
  assertError(
    () => writeSafetensors({ a: { dtype: "F32", shape: [3], data: new Float32Array(2) } }),
    /tensor "a": data has 8 bytes/,
    "a",
  );
  assertError(
    () => writeSafetensors({ a: { dtype: "BF16", shape: [2], data: new Float32Array(2) } }),
    /tensor "a"/,
    "a",
  );
  assertError(
    () =>
      writeSafetensors({
        a: { dtype: "Q4" as "F32", shape: [1], data: new Float32Array(1) },
      }),
    /unknown dtype "Q4"/,
    "a",
  );
  assertError(
    () =>
      writeSafetensors(
        new Map([["__metadata__", { dtype: "U8", shape: [1], data: new Uint8Array(1) }]]),
      ),
    /reserved/,
  );
  assertError(
    () => writeSafetensors({}, { n: 1 as unknown as string }),
    /metadata\["n"\] is not a string/,
  );
});
