# The FP8 rate behind bench:targets' compute floor (`--fp8-tflops`): torch._scaled_mm on 8192^3
# e4m3 operands (random, never zeros) with a bf16 output, CUDA events, 10 launches of warm-up, the
# median of 50. Prints TFLOP/s. Python because the reference GEMM is torch's. The FP8 rates of
# sessions 11 and 12 in RESULTS.md were measured with this script (then .scratch/fp8rate.py), in
# the call that ran bench:targets: `deno task bench:targets --fp8-tflops $(python3
# bench/fp8_rate.py)`.
# It varies by machine and by run (1122-1424 TFLOP/s on H100s on 2026-11-28), and the M=8192
# targets with it.
import torch

n = 8192
a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
one = torch.tensor(1.0, device="cuda")


def gemm():
    return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


for _ in range(10):
    gemm()
times = []
for _ in range(50):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    gemm()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end))
times.sort()
ms = times[len(times) // 2]
print(f"{2 * n**3 / (ms * 1e-3) / 1e12:.0f}")
