// Argument checks of the launch wrapper: pure TypeScript, they run without a GPU.
import assert from "node:assert/strict";
import { InvalidArgumentError } from "../ffi/errors.ts";
import type { DType } from "../src/buffer.ts";
import { type FusedMoeTensors, type TensorLike, validateFusedMoeArgs } from "../src/fused_moe.ts";

const t = (dtype: DType, ...shape: number[]): TensorLike => ({ dtype, shape });
const config = { blockM: 16, blockN: 32, warpN: 8, stages: 3 };

function tensors(M = 5, K = 256, N = 512, E = 9, topK = 4, sortedLen = 155): FusedMoeTensors {
  return {
    x: t("fp8_e4m3", M, K),
    xScale: t("f32", M, K / 128),
    w: t("fp8_e4m3", E, N, K),
    wScale: t("f32", E, N / 128, K / 128),
    w2: t("fp8_e4m3", E, K, N / 2),
    w2Scale: t("f32", E, K / 128, N / 256),
    sortedTokenIds: t("i32", sortedLen),
    expertIds: t("i32", Math.ceil(sortedLen / 16)),
    numTokensPostPadded: t("i32", 1),
    topkWeights: t("f32", M, topK),
    out: t("bf16", M, K),
  };
}

Deno.test("validateFusedMoeArgs reads the sizes off consistent tensors", () => {
  assert.deepEqual(validateFusedMoeArgs(tensors(), 4, config), {
    M: 5,
    K: 256,
    N: 512,
    numExperts: 9,
    topK: 4,
    sortedLen: 155,
  });
});

Deno.test("validateFusedMoeArgs names the tensor that does not fit", () => {
  const cases: [Partial<FusedMoeTensors>, RegExp][] = [
    [{ x: t("bf16", 5, 256) }, /x is bf16 \[5, 256\], expected a 2-d fp8_e4m3 tensor/],
    [{ out: t("f32", 5, 256) }, /out is f32 \[5, 256\], expected bf16 \[5, 256\]/],
    [{ out: t("bf16", 4, 256) }, /out is bf16 \[4, 256\], expected bf16 \[5, 256\]/],
    [{ xScale: t("f32", 5, 3) }, /xScale .* expected f32 \[5, 2\]/],
    [{ wScale: t("f32", 9, 2, 2) }, /wScale .* expected f32 \[9, 4, 2\]/],
    [{ w2: t("fp8_e4m3", 9, 256, 512) }, /w2 .* expected fp8_e4m3 \[9, 256, 256\]/],
    [{ w2Scale: t("f32", 9, 2, 1) }, /w2Scale .* expected f32 \[9, 2, 2\]/],
    [{ topkWeights: t("f32", 5, 3) }, /topkWeights .* expected f32 \[5, 4\]/],
    [{ numTokensPostPadded: t("i32", 2) }, /numTokensPostPadded/],
    [{ expertIds: t("i32", 3) }, /expertIds has 3 entries; 155 sorted ids in blocks of 16 need 10/],
    [{ sortedTokenIds: t("f32", 155) }, /sortedTokenIds .* 1-d i32/],
  ];
  for (const [change, message] of cases) {
    assert.throws(
      () => validateFusedMoeArgs({ ...tensors(), ...change }, 4, config),
      (e: unknown) => e instanceof InvalidArgumentError && message.test(e.message),
      String(message),
    );
  }
});

Deno.test("validateFusedMoeArgs: stored tiles take w2 with K rounded up to 256 rows", () => {
  const K = 384, N = 512, E = 9;
  const tiles = { ...tensors(5, K, N, E), w2: t("fp8_e4m3", E, 512, N / 2) };
  assert.equal(validateFusedMoeArgs(tiles, 4, config, "tiles").K, K);
  assert.throws(
    () => validateFusedMoeArgs(tensors(5, K, N, E), 4, config, "tiles"),
    /w2 .* expected fp8_e4m3 \[9, 512, 256\]/,
  );
  assert.throws(
    () => validateFusedMoeArgs(tiles, 4, config, "rows"),
    /w2 .* expected fp8_e4m3 \[9, 384, 256\]/,
  );
  assert.throws(
    // @ts-expect-error: not a layout
    () => validateFusedMoeArgs(tensors(), 4, config, "columns"),
    /weightLayout must be "rows" or "tiles", got columns/,
  );
});

Deno.test("validateFusedMoeArgs refuses shapes and configs the kernel cannot run", () => {
  assert.throws(() => validateFusedMoeArgs(tensors(5, 200), 4, config), /K \(200\)/);
  assert.throws(() => validateFusedMoeArgs(tensors(5, 256, 384), 4, config), /N \(384\)/);
  assert.throws(() => validateFusedMoeArgs(tensors(), 0, config), /topK/);
  assert.throws(
    () => validateFusedMoeArgs(tensors(), 4, { ...config, blockN: 64 }),
    /bad kernel config: .*\(block_n, warp_n\)/,
  );
  assert.throws(() => validateFusedMoeArgs(tensors(), 4, { ...config, stages: 0 }), /stages/);
});
