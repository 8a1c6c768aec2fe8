/**
 * alpha-moe: a fused FP8 Mixture-of-Experts layer for NVIDIA Hopper GPUs (H100/H200), driven
 * from Deno through `Deno.dlopen`.
 *
 * One kernel launch does the whole MoE layer of a tensor-parallel shard: FP8 W8A8 up/gate
 * projection with 128x128 block scales, SwiGLU, FP8 re-quantisation of the intermediate,
 * down projection and the top-k weighted accumulation into a bf16 output, with the argument
 * conventions of vLLM's and SGLang's fused MoE (`moe_align_block_size` layout).
 *
 * Pure-TypeScript helpers (codecs, gate/up interleave, config tables, the CPU reference,
 * safetensors) need no permissions beyond reading files; everything that touches the GPU
 * loads the native library lazily and needs `--allow-ffi`.
 *
 * @example Run the kernel on a random problem
 * ```ts
 * import {
 *   DeviceBuffer, fusedMoeW8A8UpDown, makeRandomMoeProblem, selectConfig, synchronize,
 *   defaultConfig,
 * } from "@alpha-moe/alpha-moe";
 *
 * const config = defaultConfig(64);
 * const p = makeRandomMoeProblem({
 *   M: 64, K: 512, N: 512, numExperts: 8, topK: 2, blockM: config.blockM, seed: 1,
 * });
 * const { M, K, N, numExperts: E } = p;
 * using x = DeviceBuffer.from("fp8_e4m3", [M, K], p.x);
 * // ... upload the other tensors the same way, then:
 * // fusedMoeW8A8UpDown({ x, xScale, w, wScale, w2, w2Scale, sortedTokenIds, expertIds,
 * //   numTokensPostPadded, topkWeights, out }, { topK: p.topK, config });
 * synchronize();
 * ```
 *
 * @module
 */

export {
  AlphaMoeError,
  CudaError,
  CudaFatalError,
  InvalidArgumentError,
  NoDeviceError,
  OutOfMemoryError,
  UnsupportedError,
} from "./ffi/errors.ts";
export {
  type AlphaMoeLibrary,
  CACHE_ENV,
  LIBRARY_ENV,
  type LibraryAttempt,
  LibraryLoadError,
  openLibrary,
  type OpenLibraryOptions,
} from "./ffi/library.ts";
export { DeviceBuffer, type DType, DTYPE_BYTES, type HostArray } from "./src/buffer.ts";
export {
  CudaEvent,
  CudaGraph,
  deviceCount,
  type DeviceInfo,
  deviceInfo,
  hasHopperGpu,
  requireHopper,
  setDevice,
  Stream,
  synchronize,
} from "./src/device.ts";
export {
  bf16Decode,
  bf16Encode,
  decodeBf16,
  decodeFp8,
  encodeBf16,
  encodeFp8,
  FP8_E4M3_MAX,
  fp8e4m3Decode,
  fp8e4m3Encode,
} from "./src/codecs.ts";
export { deinterleaveGateUp, type InterleavableArray, interleaveGateUp } from "./src/interleave.ts";
export {
  CONFIG_ENV_VAR,
  ConfigError,
  configFromEnv,
  type ConfigTable,
  defaultConfig,
  type KernelConfig,
  loadConfigTable,
  loadConfigTableSync,
  parseConfigTable,
  selectConfig,
  VALID_BLOCK_N_WARP_N,
} from "./src/config.ts";
export {
  type AlignedRouting,
  type FusedMoeArgs,
  fusedMoeReference,
  moeAlignBlockSize,
  quantizePerTokenGroup,
  relativeL2,
} from "./src/reference.ts";
export {
  makeRandomMoeProblem,
  type MoeProblem,
  type MoeWeights,
  type RandomMoeOptions,
} from "./src/random.ts";
export {
  loadSafetensors,
  loadSafetensorsSync,
  readSafetensors,
  SafetensorsError,
  SafetensorsFile,
  writeSafetensors,
} from "./src/safetensors.ts";
export {
  checkKernelConfig,
  type FusedMoeDims,
  type FusedMoeOptions,
  type FusedMoeTensors,
  fusedMoeW8A8UpDown,
  type TensorLike,
  validateFusedMoeArgs,
  type WeightLayout,
} from "./src/fused_moe.ts";
export {
  type DeviceTileOptions,
  type DeviceUpTileOptions,
  tiledDownRows,
  tileDownWeights,
  tileDownWeightsOnDevice,
  tileUpWeights,
  tileUpWeightsOnDevice,
} from "./src/tiles.ts";
// ---- config files per card and shape, the unfused baseline, tuning and plots ----
export {
  BUNDLED_CONFIG_DIR,
  bundledConfig,
  type BundledConfigOptions,
  bundledTableFile,
  configFileName,
  type ConfigShape,
  gpuShortName,
  pickConfig,
  type PickConfigOptions,
  TABLE_STAND_INS,
} from "./src/config.ts";
export {
  type UnfusedDims,
  type UnfusedMoeOptions,
  unfusedMoeW8A8,
  unfusedWorkspaceBytes,
} from "./src/unfused.ts";
export {
  type BalancedRoutingOptions,
  balancedTopkIds,
  type BatchResult,
  type KeptRun,
  type Measured,
  mergeResults,
  MODEL_SHAPES,
  parseBatchSizes,
  SEED_BATCH_SIZES,
  summaryTable,
  tableJson,
  tuneConfigs,
  type TuneMetadata,
  type TuneOptions,
  type TuneReport,
  type TuneReporter,
  type TuneResultsFile,
  type TuneShape,
} from "./src/tune.ts";
export {
  type LatencyPoint,
  type LatencySeries,
  type LatencySvgOptions,
  renderLatencySvg,
} from "./src/plot.ts";
// ---- routing, alignment, quantisation, MoeLayer, checkpoint loading (issue 4) ----
export {
  alignBlockSize,
  type AlignBuffers,
  alignedSizes,
  alignWorkspaceBytes,
  checkRouting,
  type GroupedRouting,
  MAX_ALIGN_EXPERTS,
  MAX_GROUPS,
  MAX_PROLOGUE_SLOTS,
  MAX_ROUTING_EXPERTS,
  MAX_TOP_K,
  moePrologue,
  prologueAvailable,
  type PrologueBuffers,
  prologueFits,
  type PrologueOptions,
  type QuantBuffers,
  quantizeFp8,
  type RouteOptions,
  routeTopK,
  routeTopKReference,
  type RoutingBuffers,
  type RoutingMethod,
  routingWidth,
  type SharedExpertSlot,
  type SoftmaxRouting,
  type TopKRouting,
} from "./src/routing.ts";
export {
  type ExpertWeights,
  FORWARD_STEPS,
  type ForwardOptions,
  type ForwardPath,
  type ForwardTiming,
  type LayerBuffers,
  type LayerStep,
  MAX_CACHED_TOKEN_COUNTS,
  MoeLayer,
  type MoeLayerOptions,
  moeLayerReference,
  type MoeLayerReferenceArgs,
  type MoeLayerSpec,
  PROLOGUE_FORWARD_STEPS,
  PROLOGUE_MAX_TOKENS,
  stackKernelWeights,
  type TimedStep,
  timeForward,
  type TimeForwardOptions,
} from "./src/layer.ts";
export {
  Checkpoint,
  CheckpointError,
  type CheckpointSource,
  type ExpertsPlan,
  loadCorrectionBias,
  type LoadedExperts,
  loadExpert,
  loadExperts,
  type LoadExpertsOptions,
  planExperts,
  type TensorEntry,
} from "./src/checkpoint.ts";
export type {
  ReadSafetensorsOptions,
  SafetensorsDtype,
  SafetensorsTensor,
  SafetensorsTensorInput,
  TensorData,
} from "./src/safetensors.ts";
export { SYMBOLS, type Symbols } from "./ffi/symbols.ts";
export type { FindNvccOptions } from "./ffi/build.ts";
