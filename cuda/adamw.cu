// Fused AdamW step (decoupled weight decay, bias-corrected moments), one pass over memory.
//
// Same arithmetic, in the same order and without fused multiply-adds (__fmul_rn/__fadd_rn),
// as rust/optim/adamw.rs, so a GPU step is bit-identical to the CPU step given the same
// scalars. The host computes the per-step scalars exactly as the CPU does:
//   step_size = lr / (1 - beta1^t),  inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t),  decay = 1 - lr * wd.
//
// Thread indices are ints computed as blockIdx.x * blockDim.x + threadIdx.x: that cannot
// overflow for n < 2^31 with the loader's launch shape (see THREADS in
// moecore/kernels/cuda/launch.py), which also checks each count passed as an int < 2^31.
extern "C" __global__ void adamw_step(float* __restrict__ p, const float* __restrict__ g,
                                      float* __restrict__ m, float* __restrict__ v, int n,
                                      float beta1, float beta2, float eps, float step_size,
                                      float inv_sqrt_bc2, float decay) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gi = g[i];
    const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(1.0f - beta1, gi));
    const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(1.0f - beta2, gi), gi));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_sqrt_bc2), eps);
    m[i] = mi;
    v[i] = vi;
    p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fdiv_rn(__fmul_rn(step_size, mi), denom));
}
