// Device helpers shared by the DSpark Lab kernel sources: dtype codes, loads, stores and FP8 e4m3 conversions.
//
// Written without CUDA headers (no cuda_fp16.h / cuda_bf16.h / cuda_fp8.h) so the same text compiles under nvcc
// and under NVRTC through cupy.RawModule, where those headers may not be on the include path. The conversions use
// the PTX instructions the headers wrap (PTX ISA: cvt with .bf16, .f16 and .e4m3x2 operands; e4m3 needs sm_89+).
#pragma once

// Element types a kernel reads or writes; kernels/cuda.py holds the same table (DEVICE_DTYPES).
#define DSPARK_F32 0
#define DSPARK_BF16 1
#define DSPARK_F16 2

// Largest finite float8 e4m3fn value: 1.75 * 2^8.
#define DSPARK_E4M3_MAX 448.0f

__device__ __forceinline__ float dspark_load(const void* base, long long i, int dtype) {
    if (dtype == DSPARK_F32) return static_cast<const float*>(base)[i];
    unsigned short bits = static_cast<const unsigned short*>(base)[i];
    if (dtype == DSPARK_BF16) return __uint_as_float(static_cast<unsigned int>(bits) << 16);
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
    return value;
}

// Round to nearest even, as torch's .to(dtype) does.
__device__ __forceinline__ void dspark_store(void* base, long long i, int dtype, float value) {
    if (dtype == DSPARK_F32) {
        static_cast<float*>(base)[i] = value;
        return;
    }
    unsigned short bits;
    if (dtype == DSPARK_BF16) {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(value));
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
    }
    static_cast<unsigned short*>(base)[i] = bits;
}

// float -> e4m3fn, round to nearest even, saturating to +-448 (NaN stays NaN). The instruction packs two values;
// the second source operand lands in the low byte.
__device__ __forceinline__ unsigned char dspark_to_e4m3(float value) {
    unsigned short pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(value));
    return static_cast<unsigned char>(pair & 0xFFu);
}

// e4m3fn -> float, exactly: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN, no infinities.
__device__ __forceinline__ float dspark_from_e4m3(unsigned char byte) {
    unsigned int exponent = (byte >> 3) & 0xFu;
    unsigned int mantissa = byte & 0x7u;
    float magnitude;
    if (exponent == 0xFu && mantissa == 0x7u) {
        magnitude = __uint_as_float(0x7FC00000u);
    } else if (exponent == 0u) {
        magnitude = static_cast<float>(mantissa) * 0.001953125f;  // subnormal: mantissa/8 * 2^-6
    } else {
        magnitude = __uint_as_float(((exponent + 120u) << 23) | (mantissa << 20));  // rebias 7 -> 127
    }
    return __uint_as_float(__float_as_uint(magnitude) | (static_cast<unsigned int>(byte & 0x80u) << 24));
}
