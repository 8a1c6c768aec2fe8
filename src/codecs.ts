/**
 * Scalar and bulk codecs for the two narrow float formats the kernel uses:
 *
 * - FP8 **e4m3fn** (1 sign, 4 exponent bits with bias 7, 3 mantissa bits). There are no
 *   infinities; only `0x7f` and `0xff` are NaN, so the largest finite value is 448.
 * - **bfloat16** (the top 16 bits of an IEEE float32).
 *
 * Everything here is pure TypeScript and needs no permissions.
 *
 * @module
 */

/** Largest finite e4m3fn magnitude. */
export const FP8_E4M3_MAX = 448;

/** The canonical NaN code that {@link fp8e4m3Encode} produces. */
export const FP8_E4M3_NAN = 0x7f;

// One shared scratch word for float64 <-> bits. The index of the high half depends on the
// host's byte order, so find it once instead of assuming little-endian.
const f64Scratch = new Float64Array(1);
const f64Words = new Uint32Array(f64Scratch.buffer);
f64Scratch[0] = 1; // 0x3ff00000_00000000: the high word is the non-zero one.
const HI = f64Words[1] !== 0 ? 1 : 0;
const LO = 1 - HI;

const f32Scratch = new Float32Array(1);
const f32Bits = new Uint32Array(f32Scratch.buffer);

/** Decodes one e4m3fn code (its low 8 bits) arithmetically; the table below is built from it. */
function decodeArith(code: number): number {
  const sign = code & 0x80 ? -1 : 1;
  const exp = (code >>> 3) & 0xf;
  const man = code & 7;
  if (exp === 0xf && man === 7) return NaN;
  // exp 0 is subnormal: man * 2^-9 (2^(1-7) * man/8).
  if (exp === 0) return sign * man * 2 ** -9;
  return sign * (1 + man / 8) * 2 ** (exp - 7);
}

// Every code's value. float32 holds every e4m3 value exactly.
const FP8_TABLE = new Float32Array(256);
for (let c = 0; c < 256; c++) FP8_TABLE[c] = decodeArith(c);

/**
 * A fresh copy of the 256-entry e4m3fn decode table (`table[code]` is the code's value;
 * `table[0x7f]` and `table[0xff]` are NaN). Hot loops should index this rather than call
 * {@link fp8e4m3Decode}.
 */
export function fp8e4m3Table(): Float32Array {
  return FP8_TABLE.slice();
}

/**
 * Value of one FP8 e4m3fn code. Only the low 8 bits of `code` are used.
 *
 * @example
 * ```ts
 * fp8e4m3Decode(0x38); // 1
 * fp8e4m3Decode(0x7e); // 448
 * ```
 */
export function fp8e4m3Decode(code: number): number {
  return FP8_TABLE[code & 0xff];
}

/**
 * Encodes a number as FP8 e4m3fn, rounding to nearest with ties to even.
 *
 * The rounding is done from the exact (float64) value, so a float32 input gives what torch's
 * `x.clamp(-448, 448).to(torch.float8_e4m3fn)` gives. Magnitudes above 448 (including
 * infinities) saturate to ±448; NaN becomes {@link FP8_E4M3_NAN}; the sign of zero and of
 * values that round to zero is kept (`-0` -> `0x80`).
 */
export function fp8e4m3Encode(x: number): number {
  if (x !== x) return FP8_E4M3_NAN;
  const sign = x < 0 || (x === 0 && 1 / x < 0) ? 0x80 : 0;
  const a = Math.abs(x);
  if (a >= FP8_E4M3_MAX) return sign | 0x7e;
  if (a < 0.015625) {
    // Below the smallest normal (2^-6) the grid is uniform with step 2^-9. a * 512 is exact
    // and below 8; rounding up to 8 lands on code 0x08, which is 2^-6, as it should.
    const v = a * 512;
    const f = Math.floor(v);
    const d = v - f;
    const q = d > 0.5 || (d === 0.5 && (f & 1) === 1) ? f + 1 : f;
    return sign | q;
  }
  // Normal range 2^-6 <= a < 448: keep 3 mantissa bits of the float64 and round on the rest.
  f64Scratch[0] = a;
  const hi = f64Words[HI];
  const lo = f64Words[LO];
  const exp = ((hi >>> 20) & 0x7ff) - 1023; // -6..8
  let code = ((exp + 7) << 3) | ((hi >>> 17) & 7);
  const roundBit = (hi >>> 16) & 1;
  const sticky = (hi & 0xffff) !== 0 || lo !== 0;
  // A carry out of the mantissa bumps the exponent, which is exactly the right code. It
  // cannot reach 0x7f: a < 448 means mantissa <= 5 at exponent 8 before rounding.
  if (roundBit === 1 && (sticky || (code & 1) === 1)) code++;
  return sign | code;
}

/** Encodes every element with {@link fp8e4m3Encode}. */
export function encodeFp8(src: ArrayLike<number>): Uint8Array {
  const n = src.length;
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = fp8e4m3Encode(src[i]);
  return out;
}

/** Decodes every FP8 e4m3fn code through the lookup table. */
export function decodeFp8(src: Uint8Array): Float32Array {
  const n = src.length;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = FP8_TABLE[src[i]];
  return out;
}

/**
 * Rounds float32 bits to bfloat16 bits, nearest with ties to even; NaN stays NaN (quiet).
 * Overflow past the largest bfloat16 rounds to infinity, as IEEE rounding does.
 */
function bf16FromF32Bits(bits: number): number {
  if ((bits & 0x7fffffff) > 0x7f800000) return ((bits >>> 16) | 0x0040) & 0xffff;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

/**
 * Encodes a number as bfloat16 bits (an integer in 0..0xffff), rounding to nearest with ties
 * to even; NaN gives a quiet NaN with the input's sign.
 *
 * The rounding is correct for any float64 input, not only float32 ones: the value is first
 * rounded to float32 *to odd*, which makes the second rounding to bfloat16 exact (no double
 * rounding error).
 */
export function bf16Encode(x: number): number {
  if (x !== x) {
    f32Scratch[0] = x;
    return bf16FromF32Bits(f32Bits[0] | 0x7fc00000);
  }
  f32Scratch[0] = x;
  let bits = f32Bits[0];
  const f = f32Scratch[0];
  // Round-to-odd: if float32 rounding was inexact and left an even mantissa, step one ulp
  // toward x. Sign-magnitude bits make "+1" mean "larger magnitude".
  if (f !== x && Number.isFinite(f) && (bits & 1) === 0) {
    bits = Math.abs(x) > Math.abs(f) ? bits + 1 : bits - 1;
  }
  return bf16FromF32Bits(bits >>> 0);
}

/** Value of one bfloat16 bit pattern (the low 16 bits of `bits`). */
export function bf16Decode(bits: number): number {
  f32Bits[0] = (bits & 0xffff) << 16;
  return f32Scratch[0];
}

/** Encodes every element with {@link bf16Encode}. */
export function encodeBf16(src: ArrayLike<number>): Uint16Array {
  const n = src.length;
  const out = new Uint16Array(n);
  if (src instanceof Float32Array) {
    // float32 input: no first rounding is needed, so work on the bits directly.
    const bits = new Uint32Array(src.buffer, src.byteOffset, n);
    for (let i = 0; i < n; i++) out[i] = bf16FromF32Bits(bits[i]);
    return out;
  }
  for (let i = 0; i < n; i++) out[i] = bf16Encode(src[i]);
  return out;
}

/** Decodes bfloat16 bit patterns to float32 (exact: bfloat16 is a prefix of float32). */
export function decodeBf16(src: Uint16Array): Float32Array {
  const n = src.length;
  const bits = new Uint32Array(n);
  for (let i = 0; i < n; i++) bits[i] = src[i] << 16;
  return new Float32Array(bits.buffer);
}
