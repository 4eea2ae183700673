// FP8 e4m3 quantization with one float32 scale per 1x128 tile, the activation layout of DeepSeek-V3
// (DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437, section 3.3.2: fine-grained quantization).
//
// A row of D elements is cut into ceil(D/128) tiles along the last dimension (the last may be shorter).
// scale = amax(|tile|) / 448, or 1 for an all-zero tile; q = e4m3(x / scale). kernels/reference.py is the spec.

#include "common.cuh"

#define DSPARK_TILE 128

// One block of DSPARK_TILE threads per tile; a grid-stride loop covers grids larger than the launch.
extern "C" __global__ void fp8_quantize_tiles(const void* x, int dtype, unsigned char* q, float* scale,
                                              long long total_tiles, long long cols, long long tiles_per_row) {
    __shared__ float warp_amax[DSPARK_TILE / 32];
    for (long long tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        long long row = tile / tiles_per_row;
        long long col = (tile % tiles_per_row) * DSPARK_TILE + threadIdx.x;
        bool inside = col < cols;
        long long i = row * cols + col;
        float value = inside ? dspark_load(x, i, dtype) : 0.0f;

        float amax = fabsf(value);
        for (int offset = 16; offset > 0; offset >>= 1) {
            amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
        }
        if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = amax;
        __syncthreads();
        amax = fmaxf(fmaxf(warp_amax[0], warp_amax[1]), fmaxf(warp_amax[2], warp_amax[3]));
        __syncthreads();  // warp_amax is rewritten by the next tile

        float s = amax > 0.0f ? amax / DSPARK_E4M3_MAX : 1.0f;
        if (threadIdx.x == 0) scale[tile] = s;
        if (inside) q[i] = dspark_to_e4m3(value / s);
    }
}

// One thread per element: y = float(q) * scale[tile of the element], stored as `dtype`.
extern "C" __global__ void fp8_dequantize_tiles(const unsigned char* q, const float* scale, void* y, int dtype,
                                                long long n, long long cols, long long tiles_per_row) {
    long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        long long row = i / cols;
        long long col = i - row * cols;
        float s = scale[row * tiles_per_row + col / DSPARK_TILE];
        dspark_store(y, i, dtype, dspark_from_e4m3(q[i]) * s);
    }
}
