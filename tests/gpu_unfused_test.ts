// The unfused baseline (four plain kernels) against the CPU reference with the intermediate
// re-quantised, like the fused kernel. Needs a Hopper GPU; ignored elsewhere.
import assert from "node:assert/strict";
import { DeviceBuffer } from "../src/buffer.ts";
import { DeviceMoeProblem } from "../src/problem.ts";
import { makeRandomMoeProblem } from "../src/random.ts";
import { fusedMoeReference, relativeL2 } from "../src/reference.ts";
import { runUnfusedMoe, unfusedMoeW8A8, unfusedWorkspaceBytes } from "../src/unfused.ts";
import { InvalidArgumentError } from "../ffi/errors.ts";
import { gpuTest } from "./_gpu.ts";

const TOLERANCE = 1e-2;

function check(got: Float32Array, ref: Float32Array, what: string): number {
  for (let i = 0; i < got.length; i++) {
    if (!Number.isFinite(got[i])) assert.fail(`${what}: ${got[i]} at ${i}`);
  }
  const err = relativeL2(got, ref);
  assert.ok(err <= TOLERANCE, `${what}: relative L2 ${err.toExponential(3)} > ${TOLERANCE}`);
  return err;
}

gpuTest("unfused: matches the reference (requant) for several block_m, shared expert", () => {
  const p = makeRandomMoeProblem({
    M: 37,
    K: 384,
    N: 512,
    numExperts: 9,
    topK: 3,
    blockM: 8,
    seed: 11,
    sharedExpert: true,
    scalingFactor: 2.5,
  });
  using dev = new DeviceMoeProblem(p);
  using ws = DeviceBuffer.alloc("fp8_e4m3", [unfusedWorkspaceBytes(p)]);
  for (const blockM of [8, 16, 24, 64, 128]) {
    const ref = fusedMoeReference({ ...p, ...dev.routing(blockM), blockM, requant: true });
    dev.out.fill(0x7f); // garbage: the unfused path overwrites `out`
    runUnfusedMoe(dev, blockM, ws);
    const err = check(dev.readOut(), ref, `block_m ${blockM}`);
    console.log(`block_m ${blockM}: relative L2 ${err.toExponential(3)}`);
  }
});

gpuTest("unfused: dropped experts add nothing, M = 1, skewed routing", () => {
  for (const [M, skew] of [[1, 0], [64, 1.5]]) {
    const p = makeRandomMoeProblem({
      M,
      K: 256,
      N: 256,
      numExperts: 16,
      topK: 4,
      blockM: 16,
      seed: 5 + M,
      skew,
    });
    const drop = M > 1 ? [...p.topkIds.subarray(0, 4)] : [];
    using dev = new DeviceMoeProblem(p, { dropExperts: drop });
    using ws = DeviceBuffer.alloc("fp8_e4m3", [unfusedWorkspaceBytes(p)]);
    const routing = dev.routing(16);
    const ref = fusedMoeReference({ ...p, ...routing, blockM: 16, requant: true });
    runUnfusedMoe(dev, 16, ws);
    const out = dev.readOut();
    check(out, ref, `M=${M} skew ${skew}`);
    if (M > 1) {
      // Token 0's experts are all dropped: its row is exactly zero.
      assert.ok(out.subarray(0, p.K).every((v) => v === 0), "token 0 must stay zero");
    }
  }
});

gpuTest("unfused: agrees with the fused kernel on the same inputs", () => {
  const p = makeRandomMoeProblem({
    M: 20,
    K: 512,
    N: 768,
    numExperts: 6,
    topK: 2,
    blockM: 16,
    seed: 2,
  });
  using dev = new DeviceMoeProblem(p);
  using ws = DeviceBuffer.alloc("fp8_e4m3", [unfusedWorkspaceBytes(p)]);
  dev.run({ blockM: 16, blockN: 32, warpN: 8, stages: 3 });
  const fused = dev.readOut();
  runUnfusedMoe(dev, 16, ws);
  const unfused = dev.readOut();
  const err = relativeL2(unfused, fused);
  assert.ok(err <= 2 * TOLERANCE, `fused vs unfused: relative L2 ${err}`);
});

gpuTest("unfused: a small workspace and bad arguments are refused", () => {
  const p = makeRandomMoeProblem({
    M: 8,
    K: 256,
    N: 256,
    numExperts: 4,
    topK: 2,
    blockM: 8,
    seed: 1,
  });
  using dev = new DeviceMoeProblem(p);
  const need = unfusedWorkspaceBytes(p);
  assert.ok(need >= 8 * 2 * (4 * 256 + 128 + 4 * 256), `workspace ${need} bytes`);
  using small = DeviceBuffer.alloc("fp8_e4m3", [need - 1]);
  assert.throws(() => runUnfusedMoe(dev, 8, small), InvalidArgumentError);
  using ws = DeviceBuffer.alloc("fp8_e4m3", [need]);
  // A layout aligned for block_m 64 has too few expert ids for blocks of 8: refused.
  assert.throws(
    () => unfusedMoeW8A8(dev.tensors(64), ws, { topK: 2, blockM: 8, scalingFactor: 1 }),
    InvalidArgumentError,
  );
  assert.throws(
    () => unfusedWorkspaceBytes({ M: 8, K: 100, N: 256, topK: 2 }),
    InvalidArgumentError,
  );
});
