// sim.hpp: a CPU emulation of the small part of CUDA the kernels in kernels/cuda/ use, so their
// indexing, reductions and fragment bookkeeping can be checked on a machine with no GPU
// (run.sh). Each CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one
// after another (so `__shared__` becomes `static`); __syncthreads is a block barrier; warp
// shuffles and mma.sync exchange values through a per-warp buffer between two warp barriers.
// A fiber waiting at a barrier yields to a round-robin scheduler. mma.sync is emulated from
// the PTX ISA's fragment layout (f32 sums in k order), so this checks everything *around* the
// tensor-core instruction, not the hardware's layout itself: engine/tests/cuda.rs on a real GPU
// is the final word. Not a performance model.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <vector>

#define DVL_SIM 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

inline dim3 sim_threadIdx, sim_blockIdx;
inline dim3 sim_blockDim, sim_gridDim;
#define threadIdx sim_threadIdx
#define blockIdx sim_blockIdx
#define blockDim sim_blockDim
#define gridDim sim_gridDim

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
template <class T>
inline T __ldg(const T* p) { return *p; }

// Cooperative scheduling: the running fiber, the scheduler's context.
struct SimFiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    bool done = false;
};
inline ucontext_t sim_sched_ctx;
inline SimFiber* sim_cur = nullptr;
inline int sim_tid = 0;
inline void sim_yield() { swapcontext(&sim_cur->ctx, &sim_sched_ctx); }

// Generation barrier for n fibers: the last to arrive releases the others.
struct SimBarrier {
    int n = 0, count = 0;
    unsigned gen = 0;
    void wait() {
        const unsigned g = gen;
        if (++count == n) {
            count = 0;
            ++gen;
            return;
        }
        while (gen == g) sim_yield();
    }
    void drop() { // a participant exited
        --n;
        if (count > 0 && count == n) {
            count = 0;
            ++gen;
        }
    }
};

struct SimWarp {
    SimBarrier bar;
    uint64_t slot[32];
    unsigned a[32][4], b[32][2];
};
struct SimBlock {
    SimBarrier bar;
    std::vector<SimWarp> warps;
};
inline SimBlock sim_block;

inline void __syncthreads() { sim_block.bar.wait(); }

template <class T>
inline T sim_shfl(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    SimWarp& w = sim_block.warps[sim_tid >> 5];
    const int lane = sim_tid & 31;
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    w.slot[lane] = bits;
    w.bar.wait();
    T r;
    memcpy(&r, &w.slot[src & 31], sizeof(T));
    w.bar.wait();
    return r;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int off) { return sim_shfl(v, (sim_tid & 31) ^ off); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src) { return sim_shfl(v, src); }

inline float sim_bf(unsigned reg, int half) { return __uint_as_float(half ? (reg & 0xffff0000u) : (reg << 16)); }

// m16n8k16 bf16 mma with the PTX fragment layout (see common.cuh).
inline void sim_mma_bf16_16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                               unsigned b0, unsigned b1) {
    SimWarp& w = sim_block.warps[sim_tid >> 5];
    const int lane = sim_tid & 31;
    w.a[lane][0] = a0; w.a[lane][1] = a1; w.a[lane][2] = a2; w.a[lane][3] = a3;
    w.b[lane][0] = b0; w.b[lane][1] = b1;
    w.bar.wait();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int e = 0; e < 2; ++e) {
            A[g][2 * t + e] = sim_bf(w.a[l][0], e);
            A[g + 8][2 * t + e] = sim_bf(w.a[l][1], e);
            A[g][2 * t + 8 + e] = sim_bf(w.a[l][2], e);
            A[g + 8][2 * t + 8 + e] = sim_bf(w.a[l][3], e);
            B[2 * t + e][g] = sim_bf(w.b[l][0], e);
            B[2 * t + 8 + e][g] = sim_bf(w.b[l][1], e);
        }
    }
    w.bar.wait();
    const int g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        float s = d[e];
        for (int kk = 0; kk < 16; ++kk) s += A[row][kk] * B[kk][col];
        d[e] = s;
    }
}

inline std::function<void()> sim_kernel;
inline uint64_t sim_rng = 0x853c49e6748fea9bull;
inline void sim_entry() {
    sim_kernel();
    sim_cur->done = true;
    swapcontext(&sim_cur->ctx, &sim_sched_ctx);
}

// Run `kernel()` over grid × block (1-D blocks, a multiple of 32 threads).
template <class F>
void sim_launch(dim3 grid, dim3 block, F kernel) {
    const int nt = (int)block.x;
    if (nt % 32 != 0 || block.y != 1 || block.z != 1) {
        fprintf(stderr, "sim: blocks must be 1-D multiples of 32 threads\n");
        abort();
    }
    constexpr size_t stack_bytes = 256 * 1024;
    sim_gridDim = grid;
    sim_blockDim = block;
    sim_kernel = kernel;
    std::vector<SimFiber> fibers(nt);
    std::vector<int> order(nt);
    for (int t = 0; t < nt; ++t) order[t] = t;
    for (auto& f : fibers) f.stack.reset(new char[stack_bytes]);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                sim_blockIdx = dim3{x, y, z};
                sim_block.bar = SimBarrier{nt, 0, 0};
                sim_block.warps.assign(nt / 32, SimWarp{});
                for (auto& w : sim_block.warps) w.bar = SimBarrier{32, 0, 0};
                for (auto& f : fibers) {
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.get();
                    f.ctx.uc_stack.ss_size = stack_bytes;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, sim_entry, 0);
                    f.done = false;
                }
                int remaining = nt;
                while (remaining > 0) {
                    // A random order each round, so a read of shared memory that lacks a
                    // barrier after its write sees stale data at some point.
                    for (int i = nt - 1; i > 0; --i) {
                        sim_rng ^= sim_rng << 13;
                        sim_rng ^= sim_rng >> 7;
                        sim_rng ^= sim_rng << 17;
                        std::swap(order[i], order[sim_rng % (uint64_t)(i + 1)]);
                    }
                    for (int t : order) {
                        SimFiber& f = fibers[t];
                        if (f.done) continue;
                        sim_cur = &f;
                        sim_tid = t;
                        sim_threadIdx = dim3{(unsigned)t, 0, 0};
                        swapcontext(&sim_sched_ctx, &f.ctx);
                        if (f.done) {
                            --remaining;
                            sim_block.bar.drop();
                            sim_block.warps[t >> 5].bar.drop();
                        }
                    }
                }
            }
}
