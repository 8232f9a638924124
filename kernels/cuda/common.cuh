// common.cuh: prelude the engine prepends to every kernels/cuda/*.cu source before handing it
// to NVRTC (engine/src/cuda/nvrtc.rs), so the .cu files never #include anything.
//
// No CUDA or system header is used anywhere: bf16 is handled as raw bits (the checkpoint's
// storage) and the tensor-core instruction is inline PTX, so the kernels compile with nothing
// but libnvrtc present (no toolkit headers on the user's machine).
//
// Conventions shared by all kernels:
//   * weights are bf16 as stored in the checkpoint, PyTorch Linear layout [out, in], row-major;
//   * activations are f32 unless a kernel says otherwise; accumulation is f32 (f64 where a
//     kernel says so, to match the CPU reference's statistics);
//   * every kernel is `extern "C"` (stable, unmangled names for cuModuleGetFunction) and states
//     the launch geometry it requires; the Rust launchers in engine/src/cuda/kernels.rs use it.
//
// DVL_SIM is defined only by the CPU emulation harness (kernels/cuda/sim/), which compiles
// these same sources as C++ to check indexing and reductions on a machine with no GPU.

typedef unsigned short bf16_t; // raw bf16 bits
typedef unsigned int u32;

#define DVL_FULL_MASK 0xffffffffu
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// bf16 -> f32 is exact: bf16 is the top half of an f32.
__device__ __forceinline__ float bf16_to_f32(bf16_t v) { return __uint_as_float(((u32)v) << 16); }
// The two bf16 packed in a 32-bit word (low half = lower address = lower index).
__device__ __forceinline__ float bf16_lo(u32 p) { return __uint_as_float(p << 16); }
__device__ __forceinline__ float bf16_hi(u32 p) { return __uint_as_float(p & 0xffff0000u); }

// f32 -> bf16, round to nearest even (what `half::bf16::from_f32` and PyTorch do); NaN stays a
// (quiet) NaN.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}
// Two f32 rounded to bf16 and packed: `lo` in the low half (the lower k index).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(DVL_FULL_MASK, v, off);
    return v;
}
__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(DVL_FULL_MASK, v, off);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(DVL_FULL_MASK, v, off));
    return v;
}

// Warp reduce-scatter of V values per lane (V a power of two, 1..32): afterwards lane l holds
// the warp-wide sum of the original v[l % V] (returned). Costs (5 - log2 V)·V + V - 1 shuffles
// instead of 5·V for V separate butterflies. Written as template recursion so every array
// index is a compile-time constant (a run-time index would move `v` to local memory).
template <int V, int OFF, bool FULL = (OFF >= V)>
struct WarpRs;
// Offsets >= V: plain butterfly on all V values.
template <int V, int OFF>
struct WarpRs<V, OFF, true> {
    static __device__ __forceinline__ void run(float (&v)[V], int lane) {
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] += __shfl_xor_sync(DVL_FULL_MASK, v[i], OFF);
        WarpRs<V, OFF / 2>::run(v, lane);
    }
};
// Offsets < V: lanes with bit OFF set keep the upper half of the live values, the others the
// lower half; each sends the half it drops to its partner.
template <int V, int OFF>
struct WarpRs<V, OFF, false> {
    static __device__ __forceinline__ void run(float (&v)[V], int lane) {
        const bool upper = (lane & OFF) != 0;
#pragma unroll
        for (int i = 0; i < OFF; ++i) {
            const float send = upper ? v[i] : v[i + OFF];
            const float keep = upper ? v[i + OFF] : v[i];
            v[i] = keep + __shfl_xor_sync(DVL_FULL_MASK, send, OFF);
        }
        WarpRs<V, OFF / 2>::run(v, lane);
    }
};
template <int V>
struct WarpRs<V, 0, false> {
    static __device__ __forceinline__ void run(float (&)[V], int) {}
};
template <int V>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[V]) {
    WarpRs<V, 16>::run(v, threadIdx.x & 31);
    return v[0];
}

// 16-byte load of data read exactly once (weights): bypasses L1 allocation so the activations,
// which every warp re-reads, stay there.
__device__ __forceinline__ uint4 ld_stream_u4(const void* p) {
#ifdef DVL_SIM
    return *(const uint4*)p;
#else
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
#endif
}

// D = A·B + D for one m16n8k16 tile: A 16×16 bf16 (row), B 16×8 bf16 (col), D f32 (sm_80+).
// Fragment ownership (PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type"),
// g = lane >> 2, t = lane & 3:
//   a0: A[g][2t..2t+1]    a1: A[g+8][2t..2t+1]    a2: A[g][2t+8..2t+9]    a3: A[g+8][2t+8..2t+9]
//   b0: B[2t..2t+1][g]    b1: B[2t+8..2t+9][g]
//   d0,d1: D[g][2t], D[g][2t+1]                   d2,d3: D[g+8][2t], D[g+8][2t+1]
// (the lower k index in the low 16 bits of each register).
#ifdef DVL_SIM
void sim_mma_bf16_16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1);
#endif
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                               u32 b0, u32 b1) {
#ifdef DVL_SIM
    sim_mma_bf16_16816(d, a0, a1, a2, a3, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Tensor-core k order. A 32-wide k chunk is fed to two m16n8k16 instructions so that each lane
// needs 8 *consecutive* k values per matrix row (one 16-byte load) instead of four scattered
// pairs: the mma's logical column 2t+e takes physical k 8t+e (first instruction) or 8t+4+e
// (second), and logical column 2t+8+e takes physical 8t+2+e or 8t+6+e. A and B use the same
// permutation, so the dot products are unchanged (only their summation order differs).
//   lane (g, t) holds, for a row r of A (or column r of B): u = the 8 bf16 at k0+8t .. k0+8t+7
//   first mma:  a = {u_r.x, u_r8.x, u_r.y, u_r8.y}   b = {u.x, u.y}
//   second mma: a = {u_r.z, u_r8.z, u_r.w, u_r8.w}   b = {u.z, u.w}
__device__ __forceinline__ void mma_k32(float (&d)[4], const uint4& a_r, const uint4& a_r8,
                                        const uint4& b) {
    mma_bf16_16816(d, a_r.x, a_r8.x, a_r.y, a_r8.y, b.x, b.y);
    mma_bf16_16816(d, a_r.z, a_r8.z, a_r.w, a_r8.w, b.z, b.w);
}

// 8 f32 rounded to bf16, packed in k order (element 0 in the low half of .x).
__device__ __forceinline__ uint4 pack8_bf16(const float4& lo, const float4& hi) {
    uint4 r;
    r.x = pack_bf16x2(lo.x, lo.y);
    r.y = pack_bf16x2(lo.z, lo.w);
    r.z = pack_bf16x2(hi.x, hi.y);
    r.w = pack_bf16x2(hi.z, hi.w);
    return r;
}

__device__ __forceinline__ uint4 zero_u4() {
    uint4 r;
    r.x = r.y = r.z = r.w = 0u;
    return r;
}
__device__ __forceinline__ float4 zero_f4() {
    float4 r;
    r.x = r.y = r.z = r.w = 0.f;
    return r;
}
