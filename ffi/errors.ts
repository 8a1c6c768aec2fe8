/**
 * The status codes of `cuda/alpha_moe.h` and the one place they become exceptions:
 * {@link unwrap}. Each code has its own subclass of {@link AlphaMoeError}; a
 * {@link CudaFatalError} (`fatal: true`) means the process's CUDA context is lost and the process
 * must restart.
 *
 * @module
 */
import { symbols } from "./library.ts";

/** `amoe_status` of alpha_moe.h. */
export const Status = {
  OK: 0,
  INVALID_ARGUMENT: 1,
  UNSUPPORTED: 2,
  NO_DEVICE: 3,
  OUT_OF_MEMORY: 4,
  CUDA: 5,
  CUDA_FATAL: 6,
} as const;

/** One of the {@link Status} codes. */
export type StatusCode = typeof Status[keyof typeof Status];

const STATUS_NAMES: Record<number, string> = {
  0: "AMOE_OK",
  1: "AMOE_ERR_INVALID_ARGUMENT",
  2: "AMOE_ERR_UNSUPPORTED",
  3: "AMOE_ERR_NO_DEVICE",
  4: "AMOE_ERR_OUT_OF_MEMORY",
  5: "AMOE_ERR_CUDA",
  6: "AMOE_ERR_CUDA_FATAL",
};

/** The C name of a status code (`AMOE_ERR_…`), or `unknown status N`. */
export function statusName(code: number): string {
  return STATUS_NAMES[code] ?? `unknown status ${code}`;
}

/** A failure reported by libalpha_moe (or by this module's own checks). */
export class AlphaMoeError extends Error {
  /** The error\'s name. */
  override name = "AlphaMoeError";
  /** The `amoe_status` code. */
  readonly code: number;
  /** true when the process's CUDA context is lost: restart the process. */
  readonly fatal: boolean;
  /** Makes the error. */
  constructor(message: string, code: number, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
    this.fatal = code === Status.CUDA_FATAL;
  }
}

/** A null pointer, a bad shape or size, a wrong typed array, a freed buffer. */
export class InvalidArgumentError extends AlphaMoeError {
  /** The error\'s name. */
  override name = "InvalidArgumentError";
  /** Makes the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, Status.INVALID_ARGUMENT, options);
  }
}

/** A config or shape the kernel cannot run; the message lists the valid values. */
export class UnsupportedError extends AlphaMoeError {
  /** The error\'s name. */
  override name = "UnsupportedError";
  /** Makes the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, Status.UNSUPPORTED, options);
  }
}

/** No CUDA device (or driver), or not a Hopper one. */
export class NoDeviceError extends AlphaMoeError {
  /** The error\'s name. */
  override name = "NoDeviceError";
  /** Makes the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, Status.NO_DEVICE, options);
  }
}

/** The device is out of memory. */
export class OutOfMemoryError extends AlphaMoeError {
  /** The error\'s name. */
  override name = "OutOfMemoryError";
  /** Makes the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, Status.OUT_OF_MEMORY, options);
  }
}

/** A CUDA error the context survives. */
export class CudaError extends AlphaMoeError {
  /** The error\'s name. */
  override name = "CudaError";
  /** Makes the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, Status.CUDA, options);
  }
}

/** A sticky CUDA error (illegal address, launch failure…): every later CUDA call in this process
 * fails too. Restart the process. */
export class CudaFatalError extends AlphaMoeError {
  /** The error\'s name. */
  override name = "CudaFatalError";
  /** Makes the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, Status.CUDA_FATAL, options);
  }
}

/** The error class for a status code and message. */
export function errorForStatus(code: number, message: string): AlphaMoeError {
  switch (code) {
    case Status.INVALID_ARGUMENT:
      return new InvalidArgumentError(message);
    case Status.UNSUPPORTED:
      return new UnsupportedError(message);
    case Status.NO_DEVICE:
      return new NoDeviceError(message);
    case Status.OUT_OF_MEMORY:
      return new OutOfMemoryError(message);
    case Status.CUDA:
      return new CudaError(message);
    case Status.CUDA_FATAL:
      return new CudaFatalError(
        /restart/i.test(message)
          ? message
          : `${message} (a sticky CUDA error: the CUDA context is lost; restart the process)`,
      );
    default:
      return new AlphaMoeError(message, code);
  }
}

/** The calling thread's last failure message from the library ("" when none). */
export function lastError(): string {
  const ptr = symbols().amoe_last_error();
  return ptr === null ? "" : Deno.UnsafePointerView.getCString(ptr);
}

/**
 * Throws the {@link AlphaMoeError} subclass for `status`, with the library's message for the
 * failure, unless `status` is `AMOE_OK`. Call it right after the call that returned `status`
 * (the message is per thread and overwritten by the next failure).
 */
export function unwrap(status: number): void {
  if (status === Status.OK) return;
  const message = lastError() || "no message";
  throw errorForStatus(status, `${message} [${statusName(status)}]`);
}
