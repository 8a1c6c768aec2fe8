# The comparison the mission is about: the same FP8 MoE layer computed the way vLLM and SGLang run
# it today, a Triton grouped GEMM per projection with everything else in separate launches, timed
# the way bench:targets times our fused kernel. Written here from the published design (vLLM's
# `fused_moe` with block FP8 weights): no code of theirs is used, and their tuned tables are not;
# each cell takes the best of a small grid of Triton configs on this card, so the baseline gets a
# tuning pass as ours does.
#
# What is timed, per cell (inputs already quantised and routed, as for our kernel alone):
#   up     Triton GEMM: each block of BLOCK_M slots (sorted by expert, padded per expert) against
#          its expert's [N, K] FP8 rows, per-128 block scales on both sides, bf16 out [M*top_k, N]
#   act    Triton: SwiGLU over the gate and up halves, then per-token-group FP8 quantisation
#          (128 values per group; vLLM runs these as two launches)
#   down   the same GEMM against [K, N/2], the routing weight applied, bf16 out [M*top_k, K]
#   sum    torch.sum over the top_k slots of each token into the bf16 output [M, K]
# The four launches are captured in one CUDA graph, as servers replay them at decode; CUDA events
# around each replay, 10 replays of warm-up, the L2 emptied (a read of 512 MiB) before each timed
# one, the median of `--iterations`. The parts are each launch's own graph, timed the same way.
# Every config is checked against an fp32 torch reference on random data before any cell is timed.
#
# Run on the GPU machine: `python3 bench/triton_moe.py [--shapes ds,e128] [--m 1,8,...]`.
import argparse
import statistics
import sys

import torch
import triton
import triton.language as tl

SHAPES = {  # E, N (gate and up rows), K, top_k: bench:targets' MODEL_SHAPES
    "ds": (257, 256, 7168, 9),
    "e512": (512, 256, 2048, 10),
    "ds2": (257, 512, 7168, 9),
    "e128": (128, 768, 4096, 8),
}
GROUP = 128  # block-scale granularity of weights (128 x 128) and activations (1 x 128)
SCALE_GROUP = tl.constexpr(GROUP)  # the same, as Triton kernels see it
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
CHECK_BAR = 1e-2  # relative L2 against the reference (measured: 4-5e-3 on every shape)


@triton.jit(do_not_specialize=["num_slots", "top_k"])
def grouped_gemm(a, a_scale, w, w_scale, c, sorted_slots, block_expert, slot_weight,
                 num_slots, N, K, top_k,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, A_PER_TOKEN: tl.constexpr, WEIGHTED: tl.constexpr):
    """c[slot, n] = sum_k a[row(slot), k] * w[e, n, k] with both block scales, for one tile of
    BLOCK_M sorted slots (all of one expert e) by BLOCK_N outputs. row(slot) = slot // top_k when
    A_PER_TOKEN (the up projection reads token rows), else slot. Padding slots (>= num_slots) are
    neither read nor written."""
    pid = tl.program_id(0)
    m_blocks = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    n_blocks = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share each weight column block while it is in L2.
    per_group = GROUP_M * n_blocks
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    slots = tl.load(sorted_slots + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    live = slots < num_slots
    if A_PER_TOKEN:
        rows = slots // top_k
    else:
        rows = slots
    e = tl.load(block_expert + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_groups = tl.cdiv(K, SCALE_GROUP)
    a_ptr = a + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_ptr = w + e * N * K + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]
    a_s_ptr = a_scale + rows.to(tl.int64) * k_groups
    w_s_ptr = w_scale + e * tl.cdiv(N, SCALE_GROUP) * k_groups + (offs_n // SCALE_GROUP) * k_groups
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        x = tl.load(a_ptr, mask=live[:, None] & (offs_k[None, :] < k_left), other=0.0)
        y = tl.load(w_ptr, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        kg = (kb * BLOCK_K) // SCALE_GROUP
        xs = tl.load(a_s_ptr + kg, mask=live, other=0.0)
        ys = tl.load(w_s_ptr + kg, mask=offs_n < N, other=0.0)
        acc += tl.dot(x, y) * xs[:, None] * ys[None, :]
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
    if WEIGHTED:
        acc = acc * tl.load(slot_weight + slots, mask=live, other=0.0)[:, None]
    c_ptr = c + slots.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(c_ptr, acc.to(tl.bfloat16), mask=live[:, None] & (offs_n[None, :] < N))


@triton.jit
def swiglu_quant(h, q, q_scale, I, BLOCK: tl.constexpr):
    """One program per (slot, group of 128): silu(gate) * up, rounded to bf16 as vLLM's separate
    activation kernel stores it, then FP8 with the group's amax / 448 as its scale."""
    slot = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * BLOCK + tl.arange(0, BLOCK)
    gate = tl.load(h + slot * 2 * I + offs).to(tl.float32)
    up = tl.load(h + slot * 2 * I + I + offs).to(tl.float32)
    v = (gate / (1.0 + tl.exp(-gate)) * up).to(tl.bfloat16).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(v)), 1e-10) / 448.0
    tl.store(q + slot * I + offs, (v / scale).to(tl.float8e4nv))
    tl.store(q_scale + slot * tl.cdiv(I, BLOCK) + g, scale)


def quantise_rows(x):
    """Per-(row, 128 columns) FP8: the activation quantisation both paths take as given."""
    rows, cols = x.shape
    g = x.float().view(rows, cols // GROUP, GROUP)
    scale = g.abs().amax(-1).clamp(min=1e-10) / FP8_MAX
    return (g / scale[..., None]).to(FP8).view(rows, cols), scale.contiguous()


def quantise_blocks(w):
    """[E, R, C] -> FP8 with a scale per 128 x 128 block (rows and columns divisible by 128)."""
    E, R, C = w.shape
    b = w.view(E, R // GROUP, GROUP, C // GROUP, GROUP)
    scale = b.abs().amax(dim=(2, 4)).clamp(min=1e-10) / FP8_MAX
    q = (b / scale[:, :, None, :, None]).to(FP8).view(E, R, C)
    return q, scale.contiguous()


def dequantise_blocks(q, scale):
    E, R, C = q.shape
    s = scale.repeat_interleave(GROUP, 1).repeat_interleave(GROUP, 2)
    return q.float() * s


class Layer:
    """One shape's FP8 weights (random, block-scaled); `tokens` sets the batch."""

    def __init__(self, shape, seed):
        E, N, K, top_k = SHAPES[shape]
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.E, self.N, self.K, self.top_k = E, N, K, top_k
        self.w1, self.w1s = quantise_blocks(
            torch.randn(E, N, K, device="cuda", generator=gen) * K**-0.5)
        self.w2, self.w2s = quantise_blocks(
            torch.randn(E, K, N // 2, device="cuda", generator=gen) * (N // 2) ** -0.5)

    def tokens(self, M, seed):
        E, N, K, top_k = self.E, self.N, self.K, self.top_k
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.M = M
        x = torch.randn(M, K, device="cuda", generator=gen)
        self.xq, self.xs = quantise_rows(x)
        # Uniform routing: top_k distinct experts per token, weights from a softmax.
        self.ids = torch.rand(M, E, device="cuda", generator=gen).topk(top_k, dim=1).indices
        self.weights = torch.softmax(torch.randn(M, top_k, device="cuda", generator=gen), 1)
        self.slots = M * top_k
        self.h = torch.empty(self.slots, N, device="cuda", dtype=torch.bfloat16)
        self.q2 = torch.empty(self.slots, N // 2, device="cuda", dtype=FP8)
        self.q2s = torch.empty(self.slots, N // 2 // GROUP, device="cuda", dtype=torch.float32)
        self.c3 = torch.empty(self.slots, K, device="cuda", dtype=torch.bfloat16)
        self.out = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
        self.routed_for = None
        return self

    def route(self, block_m):
        """Slots sorted by expert, each expert's run padded to block_m with the slot count."""
        if self.routed_for == block_m:
            return
        flat = self.ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.E)
        padded = (counts + block_m - 1) // block_m * block_m
        start = torch.cumsum(padded, 0) - padded
        first = torch.cumsum(counts, 0) - counts
        experts = flat[order]
        dest = start[experts] + torch.arange(self.slots, device="cuda") - first[experts]
        total = int(padded.sum())
        self.sorted_slots = torch.full((total,), self.slots, device="cuda", dtype=torch.int32)
        self.sorted_slots[dest] = order.to(torch.int32)
        self.block_expert = torch.repeat_interleave(
            torch.arange(self.E, device="cuda", dtype=torch.int32), padded // block_m)
        self.slot_weight = self.weights.flatten().float().contiguous()
        self.routed_for = block_m

    def forward(self, cfg, only=None):
        """The four launches (or only the one numbered `only`: up, act, down, sum)."""
        bm, bn, bk, gm, warps, stages = cfg
        self.route(bm)
        m_blocks = self.block_expert.numel()
        N, K, I = self.N, self.K, self.N // 2
        common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps,
                      num_stages=stages)
        if only in (None, 0):
            grouped_gemm[(m_blocks * triton.cdiv(N, bn),)](
                self.xq, self.xs, self.w1, self.w1s, self.h, self.sorted_slots,
                self.block_expert, self.slot_weight, self.slots, N, K, self.top_k,
                A_PER_TOKEN=True, WEIGHTED=False, **common)
        if only in (None, 1):
            swiglu_quant[(self.slots, I // GROUP)](self.h, self.q2, self.q2s, I, BLOCK=GROUP)
        if only in (None, 2):
            grouped_gemm[(m_blocks * triton.cdiv(K, bn),)](
                self.q2, self.q2s, self.w2, self.w2s, self.c3, self.sorted_slots,
                self.block_expert, self.slot_weight, self.slots, K, I, self.top_k,
                A_PER_TOKEN=False, WEIGHTED=True, **common)
        if only in (None, 3):
            torch.sum(self.c3.view(self.M, self.top_k, K), dim=1, out=self.out)
        return self.out

    def reference(self):
        """fp32 layer from the same FP8 operands, rounding and re-quantising the intermediate where
        the Triton path does (so the check measures the GEMMs, not the FP8 intermediate)."""
        w1 = dequantise_blocks(self.w1, self.w1s)
        w2 = dequantise_blocks(self.w2, self.w2s)
        x = (self.xq.float().view(self.M, -1, GROUP) * self.xs[..., None]).view(self.M, -1)
        out = torch.zeros(self.M, self.K, device="cuda")
        I = self.N // 2
        for j in range(self.top_k):
            for e in self.ids[:, j].unique().tolist():
                t = (self.ids[:, j] == e).nonzero().flatten()
                h = (x[t] @ w1[e].t()).bfloat16().float()  # stored as bf16 between launches
                v = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]).bfloat16().float()
                vq, vs = quantise_rows(v)
                v = (vq.float().view(len(t), -1, GROUP) * vs[..., None]).view(len(t), -1)
                out[t] += self.weights[t, j, None] * (v @ w2[e].t())
        return out


def grid_configs():
    """The tuning grid: block_m x block_n x (warps, stages); BLOCK_K 128 (the scale group) and
    GROUP_M 16. vLLM's shipped H200 tables for two of these shapes (E=257 N=256 and E=128 N=384,
    block FP8) pick from the same family: block_m 16 up to ~512 tokens and 64 above, block_n 128
    (64 at one size), 4 warps, 3-5 stages, GROUP_M 1-64."""
    for bm in (16, 32, 64, 128):
        for bn in (64, 128):
            for warps, stages in ((4, 3), (4, 4), (4, 5), (8, 3)):
                yield (bm, bn, 128, 16, warps, stages)


flush_buffer = None


def flush_l2():
    global flush_buffer
    if flush_buffer is None:
        flush_buffer = torch.ones(512 << 20, device="cuda", dtype=torch.uint8)
    flush_buffer.max()


def replay_us(graph, iterations):
    """Median µs of `graph`'s replays, CUDA events around each, the L2 emptied before each."""
    for _ in range(10):
        graph.replay()
    times = []
    for _ in range(iterations):
        flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def capture(fn):
    """`fn`'s launches as one CUDA graph, as a server replays them at decode (no host time per
    launch; Triton's Python launch path alone takes longer than the small batches' kernels)."""
    fn()  # compile and route outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_cell(layer, cfg, iterations, with_parts=False):
    """Median µs of the layer's four launches replayed as one graph; with_parts, also of each
    launch alone (its own graph, from an emptied L2)."""
    us = [replay_us(capture(lambda: layer.forward(cfg)), iterations)]
    if with_parts:
        us += [replay_us(capture(lambda i=i: layer.forward(cfg, only=i)), iterations)
               for i in range(4)]
    return us


def check(layer, M):
    """Worst relative L2 of every grid config against the reference, on one batch of M tokens."""
    layer.tokens(M, seed=7)
    ref = layer.reference()
    worst = 0.0
    for cfg in grid_configs():
        for buf in (layer.h, layer.q2s, layer.c3, layer.out):  # poison: each launch must write
            buf.fill_(float("nan"))
        layer.q2.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
        got = layer.forward(cfg).float()
        err = float((got - ref).norm() / ref.norm())
        if not torch.isfinite(got).all() or err > CHECK_BAR:
            raise SystemExit(f"check failed: M={M} config {cfg}: relative L2 {err:.3e}")
        worst = max(worst, err)
    return worst


def main():
    p = argparse.ArgumentParser(description="The Triton MoE path of vLLM and SGLang's design, "
                                "checked and timed as bench:targets times ours.")
    p.add_argument("--shapes", default="ds,e512,ds2,e128")
    p.add_argument("--m", default="1,8,32,128,512,2048,8192")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--tune-iterations", type=int, default=5)
    args = p.parse_args()
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}: choose from {','.join(SHAPES)}")
    try:
        ms = [int(m) for m in args.m.split(",")]
    except ValueError:
        ms = []
    if not ms or min(ms) < 1:
        p.error(f"--m wants positive token counts separated by commas, not {args.m!r}")
    if args.iterations < 1 or args.tune_iterations < 1:
        p.error("--iterations and --tune-iterations want at least 1")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    print("shape    M  config (bm/bn/bk/gm/warps/stages)      µs     up    act   down    sum",
          flush=True)
    for shape in shapes:
        layer = Layer(shape, seed=1)
        # Correctness first: every grid config on one small, ragged batch.
        worst = check(layer, 37)
        print(f"# check {shape} M=37: {len(list(grid_configs()))} configs, worst relative L2 "
              f"{worst:.3e} (bar {CHECK_BAR:g})", flush=True)
        for M in ms:
            layer.tokens(M, seed=1)
            tuned = min(grid_configs(), key=lambda c: time_cell(layer, c, args.tune_iterations)[0])
            us = time_cell(layer, tuned, args.iterations)[0]
            parts = time_cell(layer, tuned, args.iterations, with_parts=True)[1:]
            cfg = "/".join(map(str, tuned))
            print(f"{shape:5} {M:5}  {cfg:36} {us:7.1f} " + " ".join(f"{x:6.1f}" for x in parts),
                  flush=True)
        del layer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
