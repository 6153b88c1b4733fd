// Top-k selection by magnitude, for moecore.compress.TopK on CuPy arrays.
//
// The magnitude key of a float is its bit pattern with the sign cleared: as an unsigned
// integer it orders finite values by |x| and puts NaN/±inf (key >= 0x7f800000) above all of
// them, exactly as the CPU path (rust/compress/scan.rs) does.
//
// Selection is an exact radix select, then an order-preserving compaction:
// 1. topk_radix_histogram, three passes (key bits 30..20, 19..9, 8..0): each pass counts
//    the keys that share the prefix fixed so far, per next digit; the host walks the counts
//    from the top to fix the digit holding the k-th largest key. After the third pass the
//    k-th largest key T is known, as is how many entries equal to T are taken (`ties`).
//    Non-finite input shows up in the first pass (digits >= 0x7f8) and is refused by the host.
//    (topk_count_at_least gives the count above a sampled threshold in one pass, for the DGC
//    estimate; a successful estimate only narrows the work, the result stays the exact top-k.)
// 2. topk_tile_counts counts, per tile of blockDim.x entries, keys > T and keys == T; the
//    host takes exclusive prefix sums over tiles; topk_compact writes each selected entry at
//    (keys > T before it) + min(keys == T before it, ties).
// Ties rule: among entries equal to T the lower indices are taken, and the output indices are
// increasing: the same k entries, in the same order, as the CPU's exact method (and as its
// sampled method whenever it returns exactly k). The selection itself is deterministic: it
// only counts (integer atomics), it never sums floats.
//
// Error feedback: topk_residual_accumulate (r += g) before selection, topk_residual_update
// (r[idx] -= sent value as decoded) after it, as on the CPU (zero for f32 values).
//
// One-thread-per-entry indices are ints computed as blockIdx.x * blockDim.x + threadIdx.x:
// that cannot overflow for n < 2^31 with the loader's launch shape (see THREADS in
// moecore/kernels/cuda/launch.py), which also checks each count passed as an int < 2^31.

#define TOPK_DIGITS 2048  // 11-bit digits
#define TOPK_MAX_WARPS 32

__device__ __forceinline__ unsigned topk_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// hist[d] += #{i : (key_i & prefix_mask) == prefix and (key_i >> shift) & 2047 == d}.
// hist has TOPK_DIGITS entries and is zeroed by the caller.
extern "C" __global__ void topk_radix_histogram(const float* __restrict__ x, int n,
                                                unsigned prefix, unsigned prefix_mask, int shift,
                                                unsigned* __restrict__ hist) {
    __shared__ unsigned s_hist[TOPK_DIGITS];
    for (int d = threadIdx.x; d < TOPK_DIGITS; d += blockDim.x) s_hist[d] = 0;
    __syncthreads();
    // Unsigned: i + stride stays below 2^32 for every n < 2^31, where an int would overflow
    // (undefined) once n is within one grid stride (up to 2^18 entries) of 2^31.
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)n; i += stride) {
        const unsigned key = topk_key(x[i]);
        if ((key & prefix_mask) == prefix) atomicAdd(&s_hist[(key >> shift) & 2047u], 1u);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < TOPK_DIGITS; d += blockDim.x) {
        if (s_hist[d] != 0) atomicAdd(&hist[d], s_hist[d]);
    }
}

// *count += #{i : key_i >= threshold}; a warp votes and one lane adds its population count.
extern "C" __global__ void topk_count_at_least(const float* __restrict__ x, int n,
                                               unsigned threshold, unsigned* __restrict__ count) {
    const int lane = threadIdx.x & 31;
    // Unsigned, as in topk_radix_histogram: no overflow of base + stride for n near 2^31.
    const unsigned stride = gridDim.x * blockDim.x;
    // The loop bound is uniform across the warp (base, not i), so every lane votes each round;
    // with blockDim.x a multiple of 32 (the loader's THREADS) the full mask names live lanes.
    for (unsigned base = blockIdx.x * blockDim.x; base < (unsigned)n; base += stride) {
        const unsigned i = base + threadIdx.x;
        const bool hit = i < (unsigned)n && topk_key(x[i]) >= threshold;
        const unsigned votes = __ballot_sync(0xffffffffu, hit);
        if (lane == 0 && votes != 0) atomicAdd(count, (unsigned)__popc(votes));
    }
}

// Per tile t (entries t*blockDim.x ...): gt[t] = #{key > T}, eq[t] = #{key == T}.
extern "C" __global__ void topk_tile_counts(const float* __restrict__ x, int n, unsigned kth_key,
                                            unsigned* __restrict__ gt, unsigned* __restrict__ eq) {
    __shared__ unsigned s_gt, s_eq;
    if (threadIdx.x == 0) {
        s_gt = 0;
        s_eq = 0;
    }
    __syncthreads();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned key = i < n ? topk_key(x[i]) : 0u;
    const unsigned vote_gt = __ballot_sync(0xffffffffu, i < n && key > kth_key);
    const unsigned vote_eq = __ballot_sync(0xffffffffu, i < n && key == kth_key);
    if ((threadIdx.x & 31) == 0) {
        atomicAdd(&s_gt, (unsigned)__popc(vote_gt));
        atomicAdd(&s_eq, (unsigned)__popc(vote_eq));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        gt[blockIdx.x] = s_gt;
        eq[blockIdx.x] = s_eq;
    }
}

// Writes the selected entries in increasing index order: entry i (key > T, or key == T and
// fewer than `ties` equal keys before it) goes to (gt before i) + min(eq before i, ties).
// gt_before/eq_before are the exclusive prefix sums over tiles of topk_tile_counts, computed
// with the same blockDim.x (at most 1024, a multiple of 32).
extern "C" __global__ void topk_compact(const float* __restrict__ x, int n, unsigned kth_key,
                                        unsigned ties, const unsigned* __restrict__ gt_before,
                                        const unsigned* __restrict__ eq_before,
                                        int* __restrict__ out_idx, float* __restrict__ out_val) {
    __shared__ unsigned s_warp_gt[TOPK_MAX_WARPS], s_warp_eq[TOPK_MAX_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = i < n ? x[i] : 0.0f;
    const unsigned key = topk_key(v);
    const bool is_gt = i < n && key > kth_key, is_eq = i < n && key == kth_key;
    const unsigned vote_gt = __ballot_sync(0xffffffffu, is_gt);
    const unsigned vote_eq = __ballot_sync(0xffffffffu, is_eq);
    if (lane == 0) {
        s_warp_gt[warp] = __popc(vote_gt);
        s_warp_eq[warp] = __popc(vote_eq);
    }
    __syncthreads();
    if (i >= n || !(is_gt || is_eq)) return;  // after the only barrier
    const unsigned below = (1u << lane) - 1u;  // lanes before this one
    unsigned n_gt = gt_before[blockIdx.x] + __popc(vote_gt & below);
    unsigned n_eq = eq_before[blockIdx.x] + __popc(vote_eq & below);
    for (int w = 0; w < warp; ++w) {
        n_gt += s_warp_gt[w];
        n_eq += s_warp_eq[w];
    }
    if (is_eq && n_eq >= ties) return;  // a tie beyond the k-th: left for a lower index
    const unsigned pos = n_gt + (n_eq < ties ? n_eq : ties);
    out_idx[pos] = i;
    out_val[pos] = v;
}

// Error feedback, before selection: r += g.
extern "C" __global__ void topk_residual_accumulate(float* __restrict__ r,
                                                    const float* __restrict__ g, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    r[i] = __fadd_rn(r[i], g[i]);
}

// Error feedback, after selection: the sent entries keep what the value encoding lost,
// r[idx[j]] -= sent[j] (sent = the values as the receiver decodes them; 0 left for f32).
extern "C" __global__ void topk_residual_update(float* __restrict__ r, int n,
                                                const int* __restrict__ idx,
                                                const float* __restrict__ sent, int k) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= k) return;
    const int i = idx[j];
    if (i < 0 || i >= n) return;
    r[i] = __fsub_rn(r[i], sent[j]);
}
