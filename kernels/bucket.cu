// Fused "flatten many gradients into one bucket and scale": one launch copies every input tensor into its slice
// of a flat bucket, multiplying by a scale (e.g. 1/world_size before an all-reduce) and converting dtype on the way.
// The chunk table follows the multi-tensor-apply pattern of NVIDIA Apex (csrc/multi_tensor_apply.cuh).
//
// The host cuts every input into chunks of at most a few thousand elements and passes a table of int64 rows
// {source address of the chunk, offset in the bucket, element count, source dtype}; one block handles one chunk.

#include "common.cuh"

extern "C" __global__ void flatten_scale_chunks(const long long* chunks, long long n_chunks, void* out,
                                                int out_dtype, float scale) {
    for (long long c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const long long* chunk = chunks + 4 * c;
        const void* src = reinterpret_cast<const void*>(chunk[0]);
        long long offset = chunk[1];
        long long count = chunk[2];
        int dtype = static_cast<int>(chunk[3]);
        for (long long k = threadIdx.x; k < count; k += blockDim.x) {
            dspark_store(out, offset + k, out_dtype, dspark_load(src, k, dtype) * scale);
        }
    }
}
