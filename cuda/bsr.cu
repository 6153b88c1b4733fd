// Block-sparse (BSR) linear layer for CuPy arrays: y = x·Wᵀ (+ bias), dx = dy·W, and the
// SDDMM dW = dyᵀ·x at the kept blocks only. W is [out, in] in blocks of b x b: block-row R
// holds blocks indptr[R] .. indptr[R+1], block `blk` at block-column indices[blk], its values
// data[blk, i, j] (row-major). Index arrays are int32 on the device (the loader converts).
//
// One thread per output element, accumulating in a fixed order (blocks in storage order, then
// j): simple and deterministic; results agree with the CPU kernels to float rounding (they
// sum in another order), not bitwise. Memory access is coalesced along the output's last
// axis; no shared-memory tiling yet (a later optimisation, measured first on a GPU).

// Thread indices are ints computed as blockIdx.x * blockDim.x + threadIdx.x: that cannot
// overflow for n < 2^31 with the loader's launch shape (see THREADS in
// moecore/kernels/cuda/launch.py), which also checks each count passed as an int < 2^31.

// y[row, o] = bias[o] + sum over the blocks of block-row o / b of W[o, :] · x[row, :].
// n = m * out_features; bias may be null.
extern "C" __global__ void bsr_forward(const float* __restrict__ x, int n, int in_features,
                                       int out_features, int b, const int* __restrict__ indptr,
                                       const int* __restrict__ indices,
                                       const float* __restrict__ data,
                                       const float* __restrict__ bias, float* __restrict__ y) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const int row = t / out_features, o = t - row * out_features;
    const int block_row = o / b, i = o - block_row * b;
    const float* xr = x + (long long)row * in_features;
    float acc = bias ? bias[o] : 0.0f;
    for (int blk = indptr[block_row]; blk < indptr[block_row + 1]; ++blk) {
        const float* w = data + ((long long)blk * b + i) * b;
        const float* xs = xr + indices[blk] * b;
        for (int j = 0; j < b; ++j) acc += w[j] * xs[j];
    }
    y[t] = acc;
}

// dx[row, c] = sum over the blocks of block-column c / b of dy[row, R·b + i] · W[blk, i, j],
// with j = c mod b. The column view (t_indptr over block-columns; t_block = the stored block,
// t_row = its block-row) is W's pattern transposed, built once by the loader. n = m * in.
extern "C" __global__ void bsr_dx(const float* __restrict__ dy, int n, int out_features,
                                  int in_features, int b, const int* __restrict__ t_indptr,
                                  const int* __restrict__ t_row, const int* __restrict__ t_block,
                                  const float* __restrict__ data, float* __restrict__ dx) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const int row = t / in_features, c = t - row * in_features;
    const int block_col = c / b, j = c - block_col * b;
    const float* g = dy + (long long)row * out_features;
    float acc = 0.0f;
    for (int e = t_indptr[block_col]; e < t_indptr[block_col + 1]; ++e) {
        const float* w = data + (long long)t_block[e] * b * b + j;
        const float* gs = g + t_row[e] * b;
        for (int i = 0; i < b; ++i) acc += gs[i] * w[i * b];
    }
    dx[t] = acc;
}

// dw[blk, i, j] = sum over rows of dy[row, R·b + i] · x[row, C·b + j] for every stored block
// (R = block_row[blk], C = indices[blk]). n = nnzb * b * b, m = rows.
extern "C" __global__ void bsr_sddmm(const float* __restrict__ dy, const float* __restrict__ x,
                                     int n, int m, int out_features, int in_features, int b,
                                     const int* __restrict__ block_row,
                                     const int* __restrict__ indices, float* __restrict__ dw) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const int bb = b * b;
    const int blk = t / bb, ij = t - blk * bb;
    const int i = ij / b, j = ij - i * b;
    const int o = block_row[blk] * b + i, c = indices[blk] * b + j;
    float acc = 0.0f;
    for (int row = 0; row < m; ++row) {
        acc += dy[(long long)row * out_features + o] * x[(long long)row * in_features + c];
    }
    dw[t] = acc;
}
