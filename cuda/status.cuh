// status.cuh: how every exported entry reports failure. The message of the last failure is
// thread-local (amoe_last_error); codes are amoe_status. Nothing here exits or prints.
#pragma once

#include <cuda_runtime.h>

#include "alpha_moe.h"

namespace amoe {

// Records a printf-style message for the calling thread and returns `code`.
int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// Maps a CUDA error to a status (OOM, sticky = fatal, other) and records "what: reason".
int check_cuda(cudaError_t err, const char* what);

// Makes the device chosen by amoe_set_device current on the calling thread; `device`, if
// given, receives its ordinal.
int select_device(int* device = nullptr);

}  // namespace amoe

#define AMOE_TRY(expr)                 \
  do {                                 \
    const int amoe_status_ = (expr);   \
    if (amoe_status_ != AMOE_OK) return amoe_status_; \
  } while (0)

#define AMOE_CUDA(expr) AMOE_TRY(::amoe::check_cuda((expr), #expr))

#define AMOE_REQUIRE(cond, ...)                                             \
  do {                                                                      \
    if (!(cond)) return ::amoe::fail(AMOE_ERR_INVALID_ARGUMENT, __VA_ARGS__); \
  } while (0)
