// status.cu: the thread-local last-error message and device selection.
#include <atomic>
#include <cstdarg>
#include <cstdio>

#include "status.cuh"

namespace {
thread_local char last_error[1024] = "";
std::atomic<int> chosen_device{0};

bool is_sticky(cudaError_t err) {
  switch (err) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
      return true;
    default:
      return false;
  }
}
}  // namespace

namespace amoe {

int fail(int code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, args);
  va_end(args);
  return code;
}

int check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return AMOE_OK;
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  if (err == cudaErrorMemoryAllocation) {
    return fail(AMOE_ERR_OUT_OF_MEMORY, "%s: out of device memory", what);
  }
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    return fail(AMOE_ERR_NO_DEVICE, "%s: %s", what, cudaGetErrorString(err));
  }
  if (is_sticky(err)) {
    return fail(AMOE_ERR_CUDA_FATAL,
                "%s: %s (a sticky CUDA error: this process's CUDA context is lost; restart it)",
                what, cudaGetErrorString(err));
  }
  return fail(AMOE_ERR_CUDA, "%s: %s", what, cudaGetErrorString(err));
}

int select_device(int* device) {
  const int chosen = chosen_device.load();
  if (device) *device = chosen;
  return check_cuda(cudaSetDevice(chosen), "cudaSetDevice");
}

}  // namespace amoe

extern "C" {

int32_t amoe_abi_version(void) { return AMOE_ABI_VERSION; }

const char* amoe_last_error(void) { return last_error; }

int amoe_set_device(int32_t device) {
  int count = 0;
  AMOE_CUDA(cudaGetDeviceCount(&count));
  AMOE_REQUIRE(device >= 0 && device < count, "device %d out of range: %d device(s)", device,
               count);
  chosen_device.store(device);
  return amoe::select_device();
}

}  // extern "C"
