// MoE kernels for CuPy arrays: routing, permute (gather tokens into expert-contiguous order),
// unpermute (weighted combine back) and the backward scatters. Semantics of
// rust/sparse/moe (see moecore.moe_kernels): assignment f = token * k + slot; `order[r]` is
// the assignment held by sorted row r (-1 for padding rows); `pos[f]` its inverse (-1 if f
// was dropped). Experts' rows are contiguous, in increasing expert order, and within one
// expert in increasing assignment order (a stable counting sort).
//
// Combining is written as a gather over each token's k rows (never a float atomicAdd), so
// results are deterministic; sums run over the slots in increasing order as on the CPU, but
// the GPU may fuse multiply-adds there, so they agree with the CPU to rounding, not bitwise.
//
// One-thread-per-item indices are ints computed as blockIdx.x * blockDim.x + threadIdx.x:
// that cannot overflow for n < 2^31 with the loader's launch shape (see THREADS in
// moecore/kernels/cuda/launch.py), which also checks each count passed as an int < 2^31.

#define MOE_MAX_EXPERTS 1024
#define MOE_ORDER_TILE 256

// One thread per token: probs = softmax (score 0) or sigmoid (score 1) of its logits; the k
// experts with the largest probs + bias (bias may be null), by descending choice, ties to the
// lower expert index; weights = their probs, divided by their sum if `normalize` (0 if the
// sum is 0). Group-limited routing is not implemented here (the loader refuses it).
extern "C" __global__ void moe_route(const float* __restrict__ logits,
                                     const float* __restrict__ bias, int t, int e, int k,
                                     int score, int normalize, int* __restrict__ expert_idx,
                                     float* __restrict__ weights, float* __restrict__ probs) {
    const int tok = blockIdx.x * blockDim.x + threadIdx.x;
    if (tok >= t) return;
    const float* row = logits + (long long)tok * e;
    float* prow = probs + (long long)tok * e;
    if (score == 0) {
        float mx = row[0];
        for (int c = 1; c < e; ++c) mx = fmaxf(mx, row[c]);
        float total = 0.0f;
        for (int c = 0; c < e; ++c) {
            prow[c] = expf(row[c] - mx);
            total += prow[c];
        }
        for (int c = 0; c < e; ++c) prow[c] = prow[c] / total;
    } else {
        for (int c = 0; c < e; ++c) prow[c] = 1.0f / (1.0f + expf(-row[c]));
    }
    int* irow = expert_idx + (long long)tok * k;
    float* wrow = weights + (long long)tok * k;
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
        int best = -1;
        float best_choice = 0.0f;
        for (int c = 0; c < e; ++c) {
            bool taken = false;
            for (int q = 0; q < j; ++q) taken = taken || irow[q] == c;
            if (taken) continue;
            const float choice = bias ? prow[c] + bias[c] : prow[c];
            if (best < 0 || choice > best_choice) {  // strict: ties stay with the lower index
                best = c;
                best_choice = choice;
            }
        }
        irow[j] = best;
        wrow[j] = prow[best];
        sum += prow[best];
    }
    if (normalize) {
        for (int j = 0; j < k; ++j) wrow[j] = sum > 0.0f ? wrow[j] / sum : 0.0f;
    }
}

// counts[e] += #{f : expert_idx[f] == e}. counts is zeroed by the caller; ids outside
// [0, n_experts) are ignored (the loader validates them first).
extern "C" __global__ void moe_count(const int* __restrict__ expert_idx, int n, int n_experts,
                                     int* __restrict__ counts) {
    const int f = blockIdx.x * blockDim.x + threadIdx.x;
    if (f >= n) return;
    const int ex = expert_idx[f];
    if (ex < 0 || ex >= n_experts) return;
    atomicAdd(&counts[ex], 1);
}

// The stable counting sort, in ONE block of at most MOE_ORDER_TILE threads (the loader
// launches <<<1, 256>>>): starts[e] is expert e's first row (exclusive scan of the padded
// counts); order (pre-filled with -1) and pos get every assignment's row. Tiles of blockDim.x
// assignments in turn: a thread's rank is the number of earlier threads of its tile with the
// same expert, added to the expert's running cursor in shared memory.
extern "C" __global__ void moe_build_order(const int* __restrict__ expert_idx, int n,
                                           int n_experts, const int* __restrict__ starts,
                                           int* __restrict__ order, int* __restrict__ pos) {
    __shared__ int s_cursor[MOE_MAX_EXPERTS];
    __shared__ int s_expert[MOE_ORDER_TILE];
    if (blockDim.x > MOE_ORDER_TILE || n_experts > MOE_MAX_EXPERTS || gridDim.x != 1) return;
    for (int ex = threadIdx.x; ex < n_experts; ex += blockDim.x) s_cursor[ex] = starts[ex];
    // Unsigned: base + blockDim.x must not overflow when n is within one tile of 2^31.
    for (unsigned base = 0; base < (unsigned)n; base += blockDim.x) {
        const unsigned f = base + threadIdx.x;
        int ex = f < (unsigned)n ? expert_idx[f] : -1;
        if (ex >= n_experts) ex = -1;
        s_expert[threadIdx.x] = ex;
        __syncthreads();  // the tile's experts (and, first time, the cursors) are visible
        int rank = 0;
        bool last = true;
        if (ex >= 0) {
            for (int q = 0; q < (int)threadIdx.x; ++q) rank += s_expert[q] == ex;
            for (int q = threadIdx.x + 1; q < (int)blockDim.x; ++q) last = last && s_expert[q] != ex;
            const int row = s_cursor[ex] + rank;
            order[row] = (int)f;  // f < n <= INT_MAX
            pos[f] = row;
        }
        __syncthreads();  // every thread read its cursor and the tile before either changes
        if (ex >= 0 && last) s_cursor[ex] += rank + 1;
        // The next round's first barrier orders this update before the cursors are read again.
    }
}

// x_sorted[r, :] = x[order[r] / k, :], zeros for padding rows. n = rows * d.
extern "C" __global__ void moe_permute_rows(const float* __restrict__ x,
                                            const int* __restrict__ order, int n, int d, int k,
                                            float* __restrict__ x_sorted) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int r = i / d, c = i - r * d;
    const int f = order[r];
    x_sorted[i] = f >= 0 ? x[(long long)(f / k) * d + c] : 0.0f;
}

// y[tok, :] = sum over slots s (in order) of w[tok, s] * y_sorted[pos[tok*k + s], :], skipping
// dropped slots (pos -1); weights may be null (all ones: permute's backward). n = t * d.
extern "C" __global__ void moe_unpermute(const float* __restrict__ y_sorted,
                                         const int* __restrict__ pos,
                                         const float* __restrict__ weights, int n, int d, int k,
                                         float* __restrict__ y) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int tok = i / d, c = i - tok * d;
    float acc = 0.0f;
    for (int s = 0; s < k; ++s) {
        const int f = tok * k + s;
        const int r = pos[f];
        if (r < 0) continue;
        const float v = y_sorted[(long long)r * d + c];
        acc += weights ? weights[f] * v : v;
    }
    y[i] = acc;
}

// Backward of unpermute, one warp per sorted row r (rows = n): d_y_sorted[r] = w[f] * dy[tok]
// (zeros for padding), d_weights[f] = dot(dy[tok], y_sorted[r]) reduced across the warp with
// shuffles. d_weights is zeroed by the caller (dropped assignments get 0). blockDim.x must be
// a multiple of 32 so a warp never straddles the `r >= n` guard.
extern "C" __global__ void moe_unpermute_backward(const float* __restrict__ dy,
                                                  const float* __restrict__ y_sorted,
                                                  const int* __restrict__ order,
                                                  const float* __restrict__ weights, int n, int d,
                                                  int k, float* __restrict__ d_y_sorted,
                                                  float* __restrict__ d_weights) {
    const int lane = threadIdx.x & 31;
    // Warps before this block plus this thread's warp. Not (blockIdx.x * blockDim.x +
    // threadIdx.x) >> 5: 32 threads per row make that product wrap past 2^32 for more than
    // 2^27 rows (possible when d < 16), which would give rows to the wrong warps.
    const int r = (int)(blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
    if (r >= n) return;  // uniform across the warp
    const int f = order[r];
    float* drow = d_y_sorted + (long long)r * d;
    if (f < 0) {
        for (int c = lane; c < d; c += 32) drow[c] = 0.0f;
        return;  // uniform too: f is the warp's
    }
    const float w = weights[f];
    const float* g = dy + (long long)(f / k) * d;
    const float* ys = y_sorted + (long long)r * d;
    float partial = 0.0f;
    for (int c = lane; c < d; c += 32) {
        drow[c] = w * g[c];
        partial += g[c] * ys[c];
    }
    for (int delta = 16; delta > 0; delta >>= 1) partial += __shfl_down_sync(0xffffffffu, partial, delta);
    if (lane == 0) d_weights[f] = partial;
}
