// quant.cu: the exported per-token-group FP8 quantisation entry. Validates every argument and
// launches one warp per 128-value group on the caller's stream (optionally zeroing the fused
// kernel's output in the same pass). No allocation, no synchronisation.
#include <cstdint>

#include "moe_ops/quant.cuh"
#include "status.cuh"

namespace {
bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }
}  // namespace

extern "C" {

int amoe_quant_fp8_per_token_group(const void* x, int32_t M, int32_t K, void* q, float* scale,
                                   void* zero_out, void* stream) {
  using namespace amoe;
  const char* what = "amoe_quant_fp8_per_token_group";
  AMOE_REQUIRE(M >= 0, "%s: M must be >= 0, got %d", what, M);
  AMOE_REQUIRE(K > 0 && K % ops::kQuantGroup == 0,
               "%s: K must be a positive multiple of %d, got %d", what, ops::kQuantGroup, K);
  AMOE_REQUIRE(M == 0 || (x != nullptr && q != nullptr && scale != nullptr),
               "%s: x, q and scale must not be null", what);
  AMOE_REQUIRE(aligned(x, 8) && aligned(q, 4) && aligned(scale, 4) && aligned(zero_out, 8),
               "%s: x and zero_out must be 8-byte aligned, q and scale 4-byte aligned", what);
  AMOE_REQUIRE(zero_out == nullptr || (zero_out != x && zero_out != q),
               "%s: zero_out must not be x or q", what);
  AMOE_TRY(select_device());
  const int64_t groups = static_cast<int64_t>(M) * (K / ops::kQuantGroup);
  if (groups == 0) return AMOE_OK;
  const int64_t blocks = (groups + ops::kQuantWarpsPerBlock - 1) / ops::kQuantWarpsPerBlock;
  ops::quant_fp8_group_kernel<<<static_cast<unsigned>(blocks),
                                ops::kQuantWarpsPerBlock * ops::kWarp, 0,
                                static_cast<cudaStream_t>(stream)>>>(
      static_cast<const __nv_bfloat16*>(x), groups, static_cast<uint8_t*>(q), scale,
      static_cast<__nv_bfloat16*>(zero_out));
  return check_cuda(cudaGetLastError(), "quant_fp8_group_kernel launch");
}

}  // extern "C"
