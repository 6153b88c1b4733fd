// Decompression scatter, for moecore.compress.decompress* on CuPy arrays.
//
// The payload (on the host, as it came off the wire) is validated and its index and value
// sections decoded by the CPU codec; these kernels scatter the k (index, value) pairs into the
// dense float32 output. Indices within one payload are strictly increasing (the codec checks),
// so no two threads of a launch write the same element: no atomics, and decompress_sum is one
// launch per payload, in payload order, which makes the sum deterministic and equal to the
// CPU's `out[i] += scale * v` per payload (no fused multiply-add: __fmul_rn/__fadd_rn).

// Thread indices are ints computed as blockIdx.x * blockDim.x + threadIdx.x: that cannot
// overflow for n < 2^31 with the loader's launch shape (see THREADS in
// moecore/kernels/cuda/launch.py), which also checks each count passed as an int < 2^31.

// out[idx[j]] = val[j] (the caller zeroed out for a plain decompress).
extern "C" __global__ void codec_scatter(float* __restrict__ out, int n, const int* __restrict__ idx,
                                         const float* __restrict__ val, int k) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= k) return;
    const int i = idx[j];
    if (i < 0 || i >= n) return;
    out[i] = val[j];
}

// out[idx[j]] += scale * val[j].
extern "C" __global__ void codec_scatter_add(float* __restrict__ out, int n,
                                             const int* __restrict__ idx,
                                             const float* __restrict__ val, int k, float scale) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= k) return;
    const int i = idx[j];
    if (i < 0 || i >= n) return;
    out[i] = __fadd_rn(out[i], __fmul_rn(scale, val[j]));
}
