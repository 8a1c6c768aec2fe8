// device_api.cu: the device, memory, stream, event and graph entries of alpha_moe.h, on CUDA's
// runtime. Each entry validates its arguments, makes the chosen device current on the calling
// thread (CUDA's current device is per host thread) and checks every CUDA call; none prints,
// exits or aborts. The fused MoE entries live in their own files.
#include <cstdio>

#include "status.cuh"

namespace {

// Device pointers, streams, events and graphs cross the ABI as void*.
cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }
cudaEvent_t as_event(void* event) { return static_cast<cudaEvent_t>(event); }
cudaGraphExec_t as_graph(void* graph) { return static_cast<cudaGraphExec_t>(graph); }

}  // namespace

extern "C" {

// ---- devices ----

// No device selection here: with no GPU or no driver there is nothing to select, and that case
// is an answer (0 devices), not an error, so callers can say "no GPU" plainly.
int amoe_device_count(int32_t* count) {
  AMOE_REQUIRE(count != nullptr, "amoe_device_count: count is null");
  *count = 0;
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // not sticky: clear it so later calls start clean
    return AMOE_OK;
  }
  AMOE_CUDA(err);
  *count = n;
  return AMOE_OK;
}

// Queries the device named by `device`, which need not be the chosen one: no selection needed.
int amoe_device_info(int32_t device, char* name, size_t len, int32_t* cc_major, int32_t* cc_minor,
                     int32_t* sm_count, int64_t* l2_bytes) {
  AMOE_REQUIRE(name != nullptr && len > 0, "amoe_device_info: name buffer is null or empty");
  AMOE_REQUIRE(cc_major != nullptr && cc_minor != nullptr && sm_count != nullptr &&
                   l2_bytes != nullptr,
               "amoe_device_info: an out-parameter is null");
  name[0] = '\0';
  int count = 0;
  AMOE_TRY(amoe_device_count(&count));
  if (count == 0) return amoe::fail(AMOE_ERR_NO_DEVICE, "amoe_device_info: no CUDA device found");
  AMOE_REQUIRE(device >= 0 && device < count, "amoe_device_info: device %d out of range: %d device(s)",
               device, count);
  cudaDeviceProp prop;
  AMOE_CUDA(cudaGetDeviceProperties(&prop, device));
  snprintf(name, len, "%s", prop.name);
  *cc_major = prop.major;
  *cc_minor = prop.minor;
  *sm_count = prop.multiProcessorCount;
  *l2_bytes = static_cast<int64_t>(prop.l2CacheSize);
  return AMOE_OK;
}

int amoe_device_synchronize(void) {
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaDeviceSynchronize());
  return AMOE_OK;
}

// ---- memory ----

// bytes == 0 gives a null pointer and AMOE_OK (an empty buffer); amoe_free(NULL) is a no-op.
int amoe_malloc(void** ptr, size_t bytes) {
  AMOE_REQUIRE(ptr != nullptr, "amoe_malloc: ptr is null");
  *ptr = nullptr;
  if (bytes == 0) return AMOE_OK;
  AMOE_TRY(amoe::select_device());
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    return amoe::fail(AMOE_ERR_OUT_OF_MEMORY, "amoe_malloc: out of device memory allocating %zu bytes",
                      bytes);
  }
  AMOE_CUDA(err);
  *ptr = p;
  return AMOE_OK;
}

int amoe_free(void* ptr) {
  if (ptr == nullptr) return AMOE_OK;
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaFree(ptr));
  return AMOE_OK;
}

// Synchronous copies on the legacy default stream. The host buffer may be reused on return.
int amoe_memcpy_htod(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return AMOE_OK;
  AMOE_REQUIRE(dst != nullptr && src != nullptr, "amoe_memcpy_htod: null pointer for %zu bytes",
               bytes);
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  return AMOE_OK;
}

int amoe_memcpy_dtoh(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return AMOE_OK;
  AMOE_REQUIRE(dst != nullptr && src != nullptr, "amoe_memcpy_dtoh: null pointer for %zu bytes",
               bytes);
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  return AMOE_OK;
}

int amoe_memcpy_dtod_async(void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes == 0) return AMOE_OK;
  AMOE_REQUIRE(dst != nullptr && src != nullptr,
               "amoe_memcpy_dtod_async: null pointer for %zu bytes", bytes);
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, as_stream(stream)));
  return AMOE_OK;
}

int amoe_memset_async(void* dst, int32_t value, size_t bytes, void* stream) {
  if (bytes == 0) return AMOE_OK;
  AMOE_REQUIRE(dst != nullptr, "amoe_memset_async: dst is null for %zu bytes", bytes);
  AMOE_REQUIRE(value >= 0 && value <= 255, "amoe_memset_async: value %d is not a byte (0..255)",
               value);
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaMemsetAsync(dst, value, bytes, as_stream(stream)));
  return AMOE_OK;
}

namespace {
// Reads src (16-byte words) through L2. The loads must not be optimised away, so each thread
// folds what it read and writes it only when it equals a value no real data folds to in
// practice; `sink` is never written in practice.
__global__ void read_kernel(const uint4* src, size_t words, uint32_t* sink) {
  uint32_t fold = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < words;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(src + i);
    fold ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (fold == 0x9e3779b9u) *sink = fold;
}
}  // namespace

int amoe_read_async(const void* src, size_t bytes, void* sink, void* stream) {
  if (bytes == 0) return AMOE_OK;
  AMOE_REQUIRE(src != nullptr && sink != nullptr, "amoe_read_async: a pointer is null");
  AMOE_REQUIRE(bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0,
               "amoe_read_async: src must be 16-byte aligned and bytes a multiple of 16");
  AMOE_TRY(amoe::select_device());
  read_kernel<<<1024, 512, 0, as_stream(stream)>>>(static_cast<const uint4*>(src), bytes / 16,
                                                   static_cast<uint32_t*>(sink));
  return amoe::check_cuda(cudaGetLastError(), "read_kernel launch");
}

// ---- streams ----

// A blocking stream (it synchronizes with the legacy default stream), so that the synchronous
// copies above are ordered with the work enqueued on it.
int amoe_stream_create(void** stream) {
  AMOE_REQUIRE(stream != nullptr, "amoe_stream_create: stream is null");
  *stream = nullptr;
  AMOE_TRY(amoe::select_device());
  cudaStream_t s = nullptr;
  AMOE_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamDefault));
  *stream = s;
  return AMOE_OK;
}

int amoe_stream_destroy(void* stream) {
  AMOE_REQUIRE(stream != nullptr, "amoe_stream_destroy: the default stream (NULL) cannot be destroyed");
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaStreamDestroy(as_stream(stream)));
  return AMOE_OK;
}

int amoe_stream_synchronize(void* stream) {
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaStreamSynchronize(as_stream(stream)));
  return AMOE_OK;
}

// ---- events ----

int amoe_event_create(void** event) {
  AMOE_REQUIRE(event != nullptr, "amoe_event_create: event is null");
  *event = nullptr;
  AMOE_TRY(amoe::select_device());
  cudaEvent_t e = nullptr;
  AMOE_CUDA(cudaEventCreate(&e));
  *event = e;
  return AMOE_OK;
}

int amoe_event_destroy(void* event) {
  AMOE_REQUIRE(event != nullptr, "amoe_event_destroy: event is null");
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaEventDestroy(as_event(event)));
  return AMOE_OK;
}

int amoe_event_record(void* event, void* stream) {
  AMOE_REQUIRE(event != nullptr, "amoe_event_record: event is null");
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaEventRecord(as_event(event), as_stream(stream)));
  return AMOE_OK;
}

// Waits for `end` to complete first, so the answer never is cudaErrorNotReady.
int amoe_event_elapsed_ms(float* ms, void* start, void* end) {
  AMOE_REQUIRE(ms != nullptr, "amoe_event_elapsed_ms: ms is null");
  AMOE_REQUIRE(start != nullptr && end != nullptr, "amoe_event_elapsed_ms: an event is null");
  *ms = 0.0f;
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaEventSynchronize(as_event(end)));
  AMOE_CUDA(cudaEventElapsedTime(ms, as_event(start), as_event(end)));
  return AMOE_OK;
}

// ---- graphs ----

// Thread-local capture mode: only this thread's unsafe calls (a synchronous copy, a malloc) end
// the capture with an error; other threads are unaffected.
int amoe_stream_begin_capture(void* stream) {
  AMOE_REQUIRE(stream != nullptr,
               "amoe_stream_begin_capture: the legacy default stream (NULL) cannot be captured; "
               "create a stream");
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaStreamBeginCapture(as_stream(stream), cudaStreamCaptureModeThreadLocal));
  return AMOE_OK;
}

// Always ends the capture (also when it was invalidated), so the stream is usable afterwards.
int amoe_stream_end_capture(void* stream, void** graph_exec) {
  AMOE_REQUIRE(stream != nullptr, "amoe_stream_end_capture: stream is null");
  AMOE_REQUIRE(graph_exec != nullptr, "amoe_stream_end_capture: graph_exec is null");
  *graph_exec = nullptr;
  AMOE_TRY(amoe::select_device());
  cudaGraph_t graph = nullptr;
  const cudaError_t end_err = cudaStreamEndCapture(as_stream(stream), &graph);
  if (end_err != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    return amoe::check_cuda(end_err, "cudaStreamEndCapture");
  }
  if (graph == nullptr) {
    return amoe::fail(AMOE_ERR_CUDA, "cudaStreamEndCapture: no graph was captured");
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst_err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);  // the executable graph does not need it
  AMOE_CUDA(inst_err);
  *graph_exec = exec;
  return AMOE_OK;
}

int amoe_graph_launch(void* graph_exec, void* stream) {
  AMOE_REQUIRE(graph_exec != nullptr, "amoe_graph_launch: graph_exec is null");
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaGraphLaunch(as_graph(graph_exec), as_stream(stream)));
  return AMOE_OK;
}

int amoe_graph_destroy(void* graph_exec) {
  AMOE_REQUIRE(graph_exec != nullptr, "amoe_graph_destroy: graph_exec is null");
  AMOE_TRY(amoe::select_device());
  AMOE_CUDA(cudaGraphExecDestroy(as_graph(graph_exec)));
  return AMOE_OK;
}

}  // extern "C"
