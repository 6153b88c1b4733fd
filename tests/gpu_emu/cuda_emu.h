// CPU emulation of the subset of CUDA that moecore's kernels use, so g++ compiles the
// unchanged cuda/*.cu sources (tests only; never shipped).
//
// Model: blocks run one after another; a block runs as one OS thread per CUDA thread, so
// ThreadSanitizer sees every real interleaving hazard between the threads of a block.
// - `__shared__` is `static`: one copy shared by the threads of the running block (blocks do
//   not overlap, and joining a block's threads orders it before the next block). Unlike on a
//   GPU it starts zeroed, so a kernel reading shared memory it never wrote is not caught.
// - `__syncthreads()` is a barrier over the block's threads, `__syncwarp()` and the warp
//   intrinsics (`__shfl_*_sync`, `__ballot_sync`) exchange values among the 32 threads of a
//   warp through a per-warp slot array between two warp barriers. Their `mask` is checked: it
//   must name the calling lane and only lanes still running (not past the end of a partial
//   warp, not returned). A GPU gives undefined results otherwise, while the exchange here would
//   still work, so a violation is recorded and the launch reports it (`emu_take_fault`).
// - A thread that returns leaves its block's and warp's barriers (as exited threads do on
//   Volta and later), so an early `return` past the bounds guard cannot deadlock.
// - Atomics are `std::atomic_ref` (sequentially consistent, stronger than CUDA's relaxed).
// - `__fmul_rn`/`__fadd_rn` are plain float operations; build with -ffp-contract=off so the
//   host compiler does not fuse them either.
// Dynamic shared memory, cooperative groups, textures and streams are not emulated.
#pragma once

#include <atomic>
#include <bit>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

// A reusable barrier whose party count shrinks when a thread leaves (arrive_and_drop).
// Mutex + condition variable so ThreadSanitizer models the happens-before edges exactly.
class Barrier {
public:
    explicit Barrier(int parties) : expected_(parties) {}
    void arrive_and_wait() {
        std::unique_lock<std::mutex> lock(m_);
        const unsigned long long gen = gen_;
        if (++arrived_ >= expected_) {
            release();
        } else {
            cv_.wait(lock, [&] { return gen_ != gen; });
        }
    }
    void arrive_and_drop() {
        std::lock_guard<std::mutex> lock(m_);
        --expected_;
        if (arrived_ > 0 && arrived_ >= expected_) release();
    }

private:
    void release() {
        arrived_ = 0;
        ++gen_;
        cv_.notify_all();
    }
    std::mutex m_;
    std::condition_variable cv_;
    int expected_;
    int arrived_ = 0;
    unsigned long long gen_ = 0;
};

struct Warp {
    explicit Warp(int lanes) : barrier(lanes) {
        for (int l = 0; l < 32; ++l) alive[l] = l < lanes;
    }
    Barrier barrier;
    unsigned long long slot[32] = {};
    bool alive[32];
    std::mutex alive_m;
};

struct ThreadCtx {
    dim3 thread_idx, block_idx;
    int lane = 0;
    Warp* warp = nullptr;
    Barrier* block = nullptr;
};

inline thread_local ThreadCtx ctx;
inline dim3 g_block_dim, g_grid_dim;

// The first misuse seen during a launch; read (and cleared) by the host after the launch,
// once every emulated thread has been joined.
inline std::atomic<int> g_faults{0};
inline char g_fault[256];

inline void fault(const char* fn, unsigned mask, unsigned live) {
    if (g_faults.fetch_add(1) == 0) {
        std::snprintf(g_fault, sizeof g_fault,
                      "%s with mask 0x%08x in block %u, lane %d: lanes running 0x%08x", fn, mask,
                      ctx.block_idx.x, ctx.lane, live);
    }
}

// A warp intrinsic's mask must name the calling lane and no lane that is not running.
// Called between the intrinsic's two warp barriers: by then every lane that will take part
// has arrived and every lane that returned has left (it clears `alive` before dropping out of
// the barrier), so the answer does not depend on how the threads happened to be scheduled.
inline void check_mask(const char* fn, unsigned mask) {
    Warp& w = *ctx.warp;
    unsigned live = 0;
    {
        std::lock_guard<std::mutex> lock(w.alive_m);
        for (int l = 0; l < 32; ++l)
            if (w.alive[l]) live |= 1u << l;
    }
    if (!((mask >> ctx.lane) & 1u) || (mask & ~live) != 0) fault(fn, mask, live);
}

// Exchanges a 64-bit value among the live lanes of the calling thread's warp: every lane
// publishes `mine`, then reads lane `src`'s value (its own when `src` is out of range). `fn`
// and `mask` are the intrinsic's, checked once the lanes have met.
inline unsigned long long warp_exchange(unsigned long long mine, int src, const char* fn,
                                        unsigned mask) {
    Warp& w = *ctx.warp;
    w.slot[ctx.lane] = mine;
    w.barrier.arrive_and_wait();
    check_mask(fn, mask);
    const unsigned long long got = (src >= 0 && src < 32) ? w.slot[src] : mine;
    w.barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read
    return got;
}

template <class T>
inline T shuffle(T v, int src, const char* fn, unsigned mask) {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 64 bits");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = warp_exchange(bits, src, fn, mask);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

inline unsigned ballot(bool pred, unsigned mask) {
    Warp& w = *ctx.warp;
    w.slot[ctx.lane] = pred ? 1 : 0;
    w.barrier.arrive_and_wait();
    check_mask("__ballot_sync", mask);
    unsigned bits = 0;
    {
        std::lock_guard<std::mutex> lock(w.alive_m);
        for (int l = 0; l < 32; ++l)
            if (w.alive[l] && w.slot[l]) bits |= 1u << l;
    }
    w.barrier.arrive_and_wait();
    return bits;
}

// Runs `kernel(args...)` over `grid` x `block`: one OS thread per CUDA thread of a block,
// reused for every block in turn (creating threads dominates the cost under ThreadSanitizer).
// Each block has its own barrier and warps (a thread that returns leaves them); between two
// blocks every thread meets at `between`, which orders one block's memory accesses before
// the next block's, as a fresh launch would.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
    g_grid_dim = grid;
    g_block_dim = block;
    const int threads = static_cast<int>(block.x * block.y * block.z);
    const long long blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
    Barrier between(threads);
    struct BlockState {
        explicit BlockState(int threads) : barrier(threads) {
            for (int first = 0; first < threads; first += 32)
                warps.emplace_back(new Warp(threads - first < 32 ? threads - first : 32));
        }
        ~BlockState() {
            for (Warp* w : warps) delete w;
        }
        Barrier barrier;
        std::vector<Warp*> warps;
    };
    std::unique_ptr<BlockState> state;  // the running block's; replaced by thread 0 between
    state.reset(new BlockState(threads));
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            ctx.thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            ctx.lane = t % 32;
            for (long long b = 0; b < blocks; ++b) {
                ctx.block_idx = dim3(static_cast<unsigned>(b % grid.x),
                                     static_cast<unsigned>((b / grid.x) % grid.y),
                                     static_cast<unsigned>(b / (static_cast<long long>(grid.x) * grid.y)));
                ctx.warp = state->warps[t / 32];
                ctx.block = &state->barrier;
                kernel(args...);
                {
                    std::lock_guard<std::mutex> lock(ctx.warp->alive_m);
                    ctx.warp->alive[ctx.lane] = false;
                }
                ctx.warp->barrier.arrive_and_drop();
                ctx.block->arrive_and_drop();
                between.arrive_and_wait();  // every thread is done with this block
                if (t == 0 && b + 1 < blocks) state.reset(new BlockState(threads));
                between.arrive_and_wait();  // the next block's state is ready
            }
        });
    }
    for (auto& th : pool) th.join();
}

}  // namespace emu

// ---- the CUDA vocabulary -------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (::emu::ctx.thread_idx)
#define blockIdx (::emu::ctx.block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define warpSize 32

inline void __syncthreads() { ::emu::ctx.block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::ctx.warp->barrier.arrive_and_wait(); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) {
    return ::emu::shuffle(v, src, "__shfl_sync", mask);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    const int src = ::emu::ctx.lane + static_cast<int>(delta);
    return ::emu::shuffle(v, src < 32 ? src : ::emu::ctx.lane, "__shfl_down_sync", mask);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
    const int src = ::emu::ctx.lane - static_cast<int>(delta);
    return ::emu::shuffle(v, src >= 0 ? src : ::emu::ctx.lane, "__shfl_up_sync", mask);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return ::emu::shuffle(v, ::emu::ctx.lane ^ lane_mask, "__shfl_xor_sync", mask);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return ::emu::ballot(pred != 0, mask);
}

template <class T>
inline T atomicAdd(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v);
}
template <class T>
inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
template <class T>
inline T atomicCAS(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
    return expected;
}

inline int __popc(unsigned x) { return std::popcount(x); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

// Copies the first fault of the last launch into buf (empty if none), clears it and returns
// how many there were.
extern "C" int emu_take_fault(char* buf, int len) {
    const int n = ::emu::g_faults.exchange(0);
    std::snprintf(buf, static_cast<std::size_t>(len), "%s", n ? ::emu::g_fault : "");
    return n;
}
