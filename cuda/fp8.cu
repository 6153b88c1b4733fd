// FP8 (e4m3, "fn": no infinity, max 448) quantization with fine-grained scales, DeepSeek-V3's
// recipe: activations per 1 x 128 tile (one row, 128 columns), weights per 128 x 128 block,
// each scale = amax / 448 (1 for an all-zero tile), values stored as e4m3 bytes.
//
// The same arithmetic as moecore/kernels/fp8.py (ml_dtypes' float8_e4m3fn): the scale and
// x / scale are single IEEE float32 divisions (__fdiv_rn), the conversion rounds to nearest,
// ties to even (rintf), so the bytes and scales are identical to the CPU's. The conversion
// is written with integer and power-of-two arithmetic rather than cuda_fp8.h, so it is the
// same code on every architecture and in the CPU emulation.
//
// Launch shape: blockDim.x == 128 (FP8_TILE), one block per tile (rows x column tiles) or
// per block (row blocks x column blocks); the host code (kernels/cuda/fp8.py) checks it.
#define FP8_TILE 128
#define E4M3_MAX 448.0f

// |v| <= 448 (after scaling) to its e4m3 byte, round to nearest even; saturates at 448.
__device__ __forceinline__ unsigned char f32_to_e4m3(float v) {
    const unsigned char sign = v < 0.0f ? 0x80 : 0x00;
    const float a = fabsf(v);
    if (a < 0.015625f) {  // below 2^-6: subnormals, quantum 2^-9 (exact scaling by 512)
        return sign | (unsigned char)rintf(a * 512.0f);  // 8 rounds up to the smallest normal
    }
    int e;
    frexpf(a, &e);  // a = f * 2^e, f in [0.5, 1): unbiased exponent e - 1
    int exp = e - 1;
    float r = rintf(ldexpf(a, 3 - exp));  // the significand times 8, in [8, 16]
    if (r == 16.0f) {
        r = 8.0f;
        exp += 1;
    }
    int bits = ((exp + 7) << 3) | ((int)r - 8);
    if (bits > 0x7E) bits = 0x7E;  // 448; 0x7F is NaN
    return sign | (unsigned char)bits;
}

__device__ __forceinline__ float e4m3_to_f32(unsigned char b) {
    const int e = (b >> 3) & 0xF;
    const int m = b & 7;
    const float a = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);
    return (b & 0x80) ? -a : a;
}

// Max over the block's 128 values of amax[] (shared), left in amax[0].
__device__ __forceinline__ void block_max(float* amax) {
    for (int s = FP8_TILE / 2; s > 0; s >>= 1) {
        __syncthreads();
        if ((int)threadIdx.x < s) amax[threadIdx.x] = fmaxf(amax[threadIdx.x], amax[threadIdx.x + s]);
    }
    __syncthreads();
}

__device__ __forceinline__ float scale_of(float amax) {
    return amax == 0.0f ? 1.0f : __fdiv_rn(amax, E4M3_MAX);
}

// x [rows, cols] -> q [rows, cols] bytes, scale [rows, ceil(cols/128)].
// grid = (ceil(cols/128), rows), block = 128.
extern "C" __global__ void fp8_quantize_tiles(const float* __restrict__ x,
                                              unsigned char* __restrict__ q,
                                              float* __restrict__ scale, int rows, int cols) {
    __shared__ float amax[FP8_TILE];
    const int row = blockIdx.y;
    const int col = blockIdx.x * FP8_TILE + threadIdx.x;
    const bool in = row < rows && col < cols;
    const float v = in ? x[(long long)row * cols + col] : 0.0f;
    amax[threadIdx.x] = fabsf(v);
    block_max(amax);
    const float s = scale_of(amax[0]);
    if (in) q[(long long)row * cols + col] = f32_to_e4m3(__fdiv_rn(v, s));
    if (threadIdx.x == 0 && row < rows) scale[(long long)row * gridDim.x + blockIdx.x] = s;
}

// w [rows, cols] -> q bytes, scale [ceil(rows/128), ceil(cols/128)]: one block per 128 x 128
// block of w, each thread one column of it. grid = (ceil(cols/128), ceil(rows/128)), block = 128.
extern "C" __global__ void fp8_quantize_blocks(const float* __restrict__ w,
                                               unsigned char* __restrict__ q,
                                               float* __restrict__ scale, int rows, int cols) {
    __shared__ float amax[FP8_TILE];
    const int col = blockIdx.x * FP8_TILE + threadIdx.x;
    const int row0 = blockIdx.y * FP8_TILE;
    const int row1 = row0 + FP8_TILE < rows ? row0 + FP8_TILE : rows;
    float m = 0.0f;
    if (col < cols) {
        for (int r = row0; r < row1; ++r) m = fmaxf(m, fabsf(w[(long long)r * cols + col]));
    }
    amax[threadIdx.x] = m;
    block_max(amax);
    const float s = scale_of(amax[0]);
    if (col < cols) {
        for (int r = row0; r < row1; ++r) {
            const long long i = (long long)r * cols + col;
            q[i] = f32_to_e4m3(__fdiv_rn(w[i], s));
        }
    }
    if (threadIdx.x == 0) scale[(long long)blockIdx.y * gridDim.x + blockIdx.x] = s;
}

// out = q * scale of its tile: scale [rows, ceil(cols/128)] (tiles) or, with block_rows = 128,
// [ceil(rows/128), ceil(cols/128)] (blocks). grid = (ceil(cols/128), rows), block = 128.
extern "C" __global__ void fp8_dequantize(const unsigned char* __restrict__ q,
                                          const float* __restrict__ scale,
                                          float* __restrict__ out, int rows, int cols,
                                          int block_rows) {
    const int row = blockIdx.y;
    const int col = blockIdx.x * FP8_TILE + threadIdx.x;
    if (row >= rows || col >= cols) return;
    const long long i = (long long)row * cols + col;
    const float s = scale[(long long)(row / block_rows) * gridDim.x + blockIdx.x];
    out[i] = __fmul_rn(e4m3_to_f32(q[i]), s);
}
