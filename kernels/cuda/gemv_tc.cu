// gemv_tc.cu: skinny GEMM (m up to 64 activation rows) on the tensor cores (mma.sync, sm_80+).
//
//   out[i, j] = (accumulate ? out[i, j] : 0) + bias[j] + sum_k bf16(x[i, k]) * W[j, k]
//   x [m, k] f32 (rounded to bf16 as it is loaded: the CPU AMX path's "bf16 matmul inputs"
//   numerics, ~1e-3 relative), W [n, k] bf16 as stored, f32 accumulation, out [m, n] f32.
//
// Roles are swapped so the long dimension fills the instruction's 16 rows: the weight rows are
// mma's A (16 rows per tile) and the activation rows its B (8 per tile, NT tiles = 8·NT rows).
// Each lane loads its A and B fragments straight from global memory with 16-byte loads in the
// k order described in common.cuh (mma_k32), so W is streamed once, fully coalesced per row.
//
// Geometry: block = 256 threads = 8 warps; block b owns weight rows 16b .. 16b+15 and splits k
// between its warps (warp w takes the 32-wide chunks w, w+8, w+16, ...); the 8 partial tiles
// are summed in shared memory in a fixed order (deterministic).
//   grid = (ceil(n / 16), ceil(m / (8·NT))); blockIdx.y selects activation rows y·8·NT ...
//   `gemv_tc_bf16_n{NT}` needs k % 8 == 0 and 16-byte aligned x and W; `..._any` takes any k
//   (element loads). Static shared memory: 8·NT·4·32·4 bytes (32 KiB for NT = 8).

template <int NT, bool VEC>
__device__ __forceinline__ void gemv_tc_load(const bf16_t* wr0, const bf16_t* wr8,
                                             const float* const (&xr)[NT], int k, int kk,
                                             uint4& a0, uint4& a8, uint4 (&b)[NT]) {
    // kk: first of this lane's 8 consecutive k values.
    if (VEC) {
        if (kk < k) {
            a0 = ld_stream_u4(wr0 + kk);
            a8 = ld_stream_u4(wr8 + kk);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const float4* p = (const float4*)(xr[j] + kk);
                b[j] = pack8_bf16(__ldg(p), __ldg(p + 1));
            }
        } else {
            a0 = a8 = zero_u4();
#pragma unroll
            for (int j = 0; j < NT; ++j) b[j] = zero_u4();
        }
    } else {
        u32 wa[4], wb[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int k0 = kk + 2 * e, k1 = kk + 2 * e + 1;
            const u32 a_lo = k0 < k ? wr0[k0] : 0u, a_hi = k1 < k ? wr0[k1] : 0u;
            const u32 b_lo = k0 < k ? wr8[k0] : 0u, b_hi = k1 < k ? wr8[k1] : 0u;
            wa[e] = a_lo | (a_hi << 16);
            wb[e] = b_lo | (b_hi << 16);
        }
        a0.x = wa[0]; a0.y = wa[1]; a0.z = wa[2]; a0.w = wa[3];
        a8.x = wb[0]; a8.y = wb[1]; a8.z = wb[2]; a8.w = wb[3];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            float f[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) f[e] = kk + e < k ? xr[j][kk + e] : 0.f;
            b[j].x = pack_bf16x2(f[0], f[1]);
            b[j].y = pack_bf16x2(f[2], f[3]);
            b[j].z = pack_bf16x2(f[4], f[5]);
            b[j].w = pack_bf16x2(f[6], f[7]);
        }
    }
}

template <int NT, bool VEC>
__device__ __forceinline__ void gemv_tc_body(const float* __restrict__ x, int m, int k,
                                             const bf16_t* __restrict__ w, int n,
                                             const float* __restrict__ bias,
                                             float* __restrict__ out, int accumulate) {
    __shared__ float red[8][NT * 4][32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    const int m0 = blockIdx.y * NT * 8;
    const bf16_t* wr0 = w + (size_t)min(row0 + g, n - 1) * k;
    const bf16_t* wr8 = w + (size_t)min(row0 + g + 8, n - 1) * k;
    const float* xr[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) xr[j] = x + (size_t)min(m0 + 8 * j + g, m - 1) * k;

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

    const int chunks = (k + 31) >> 5;
    int c = warp;
    // Two chunks per iteration so the second's loads are in flight during the first's mma.
    for (; c + 8 < chunks; c += 16) {
        uint4 a0, a8, b[NT], a0n, a8n, bn[NT];
        gemv_tc_load<NT, VEC>(wr0, wr8, xr, k, c * 32 + 8 * t, a0, a8, b);
        gemv_tc_load<NT, VEC>(wr0, wr8, xr, k, (c + 8) * 32 + 8 * t, a0n, a8n, bn);
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_k32(acc[j], a0, a8, b[j]);
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_k32(acc[j], a0n, a8n, bn[j]);
    }
    if (c < chunks) {
        uint4 a0, a8, b[NT];
        gemv_tc_load<NT, VEC>(wr0, wr8, xr, k, c * 32 + 8 * t, a0, a8, b);
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_k32(acc[j], a0, a8, b[j]);
    }

#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[warp][j * 4 + e][lane] = acc[j][e];
    __syncthreads();
    // Element (j, e, lane) of the tile: weight row g (+8 for e >= 2), activation row
    // 8j + 2t + (e & 1).
    for (int idx = threadIdx.x; idx < NT * 4 * 32; idx += blockDim.x) {
        const int ln = idx & 31, je = idx >> 5;
        const int j = je >> 2, e = je & 3;
        float s = 0.f;
#pragma unroll
        for (int wp = 0; wp < 8; ++wp) s += red[wp][je][ln];
        const int row = row0 + (ln >> 2) + (e >= 2 ? 8 : 0);
        const int xi = m0 + 8 * j + 2 * (ln & 3) + (e & 1);
        if (row < n && xi < m) {
            if (bias) s += bias[row];
            float* dst = out + (size_t)xi * n + row;
            if (accumulate) s += *dst;
            *dst = s;
        }
    }
}

#define DVL_GEMV_TC(NT)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) gemv_tc_bf16_n##NT(                     \
        const float* __restrict__ x, int m, int k, const bf16_t* __restrict__ w, int n,       \
        const float* __restrict__ bias, float* __restrict__ out, int accumulate) {            \
        gemv_tc_body<NT, true>(x, m, k, w, n, bias, out, accumulate);                         \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) gemv_tc_bf16_n##NT##_any(               \
        const float* __restrict__ x, int m, int k, const bf16_t* __restrict__ w, int n,       \
        const float* __restrict__ bias, float* __restrict__ out, int accumulate) {            \
        gemv_tc_body<NT, false>(x, m, k, w, n, bias, out, accumulate);                        \
    }

DVL_GEMV_TC(1)
DVL_GEMV_TC(2)
DVL_GEMV_TC(4)
DVL_GEMV_TC(8)
