// gemm.cu: bf16 tensor-core GEMM for many activation rows (prefill, vision tower), mma.sync.
//
//   out[i, j] = (accumulate ? out[i, j] : 0) + bias[j] + sum_k bf16(x[i, k]) * W[j, k]
//   x [m, k] f32 (rounded to bf16 when staged in shared memory, like the CPU AMX path),
//   W [n, k] bf16 as stored (PyTorch Linear layout), f32 accumulation, out [m, n] f32.
//
// Tiling: a block computes a 128 (x rows) × 128 (W rows) tile of out, stepping k by 32. Both
// operand tiles are staged in shared memory as bf16 rows of 32 k values (64 bytes); two
// buffers, the next tile's global loads in registers while the current one is multiplied.
// 8 warps as 2 (m) × 4 (n), each warp 64 × 32 = 4 × 4 m16n8k16 tiles; fragments are read
// with 16-byte shared loads in the k order of common.cuh (mma_k32): a lane reads row g at byte
// 16t of its 64-byte row, so each 8-lane phase covers 128 contiguous bytes (no bank conflict).
//
// Geometry: block = 256 threads; grid = (ceil(n / 128), ceil(m / 128)); static shared memory
// 32 KiB. `gemm_bf16_tc` needs k % 8 == 0 and 16-byte aligned x and W; `gemm_bf16_tc_any`
// takes any k and alignment (element loads). Rows past m or n and k past the end are zeros.

#define GEMM_BM 128
#define GEMM_BN 128
#define GEMM_BK 32

template <bool VEC>
__device__ __forceinline__ void gemm_load_tile(const float* __restrict__ x, int m, int k,
                                               const bf16_t* __restrict__ w, int n, int bm,
                                               int bn, int k0, uint4 (&ra)[2], uint4 (&rb)[2]) {
    // Thread t loads half a row (16 k values) of each operand tile: row t / 2, k0 + 16·(t & 1).
    const int r = threadIdx.x >> 1;
    const int kc = k0 + 16 * (threadIdx.x & 1);
    const int xi = bm + r, wj = bn + r;
    if (VEC) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int kk = kc + 8 * h;
            if (xi < m && kk < k) {
                const float4* p = (const float4*)(x + (size_t)xi * k + kk);
                ra[h] = pack8_bf16(__ldg(p), __ldg(p + 1));
            } else {
                ra[h] = zero_u4();
            }
            rb[h] = (wj < n && kk < k) ? ld_stream_u4(w + (size_t)wj * k + kk) : zero_u4();
        }
    } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            u32 pa[4], pb[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int k0e = kc + 8 * h + 2 * e, k1e = k0e + 1;
                const float x0 = (xi < m && k0e < k) ? x[(size_t)xi * k + k0e] : 0.f;
                const float x1 = (xi < m && k1e < k) ? x[(size_t)xi * k + k1e] : 0.f;
                pa[e] = pack_bf16x2(x0, x1);
                const u32 w0 = (wj < n && k0e < k) ? w[(size_t)wj * k + k0e] : 0u;
                const u32 w1 = (wj < n && k1e < k) ? w[(size_t)wj * k + k1e] : 0u;
                pb[e] = w0 | (w1 << 16);
            }
            ra[h].x = pa[0]; ra[h].y = pa[1]; ra[h].z = pa[2]; ra[h].w = pa[3];
            rb[h].x = pb[0]; rb[h].y = pb[1]; rb[h].z = pb[2]; rb[h].w = pb[3];
        }
    }
}

template <bool VEC>
__device__ __forceinline__ void gemm_body(const float* __restrict__ x, int m, int k,
                                          const bf16_t* __restrict__ w, int n,
                                          const float* __restrict__ bias,
                                          float* __restrict__ out, int accumulate) {
    // [buffer][row][k / 8]: one uint4 = 8 bf16 of consecutive k.
    __shared__ uint4 As[2][GEMM_BM][GEMM_BK / 8];
    __shared__ uint4 Bs[2][GEMM_BN][GEMM_BK / 8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wn = warp & 3; // warp tile: rows wm·64.., cols wn·32..
    const int bn = blockIdx.x * GEMM_BN, bm = blockIdx.y * GEMM_BM;
    const int r_ld = threadIdx.x >> 1, h_ld = 2 * (threadIdx.x & 1);

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    uint4 ra[2], rb[2];
    gemm_load_tile<VEC>(x, m, k, w, n, bm, bn, 0, ra, rb);
    As[0][r_ld][h_ld] = ra[0];
    As[0][r_ld][h_ld + 1] = ra[1];
    Bs[0][r_ld][h_ld] = rb[0];
    Bs[0][r_ld][h_ld + 1] = rb[1];
    __syncthreads();

    const int kt_n = (k + GEMM_BK - 1) / GEMM_BK;
    for (int kt = 0; kt < kt_n; ++kt) {
        const int buf = kt & 1;
        const bool more = kt + 1 < kt_n;
        if (more) gemm_load_tile<VEC>(x, m, k, w, n, bm, bn, (kt + 1) * GEMM_BK, ra, rb);
        uint4 bf[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) bf[j] = Bs[buf][wn * 32 + j * 8 + g][t];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint4 a_r = As[buf][wm * 64 + i * 16 + g][t];
            const uint4 a_r8 = As[buf][wm * 64 + i * 16 + g + 8][t];
#pragma unroll
            for (int j = 0; j < 4; ++j) mma_k32(acc[i][j], a_r, a_r8, bf[j]);
        }
        if (more) {
            As[buf ^ 1][r_ld][h_ld] = ra[0];
            As[buf ^ 1][r_ld][h_ld + 1] = ra[1];
            Bs[buf ^ 1][r_ld][h_ld] = rb[0];
            Bs[buf ^ 1][r_ld][h_ld + 1] = rb[1];
        }
        __syncthreads();
    }

    // D fragment: e = 0,1 -> row g, cols 2t, 2t+1; e = 2,3 -> row g+8.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int xi = bm + wm * 64 + i * 16 + g + (e >= 2 ? 8 : 0);
                const int wj = bn + wn * 32 + j * 8 + 2 * t + (e & 1);
                if (xi < m && wj < n) {
                    float o = acc[i][j][e];
                    if (bias) o += bias[wj];
                    float* dst = out + (size_t)xi * n + wj;
                    if (accumulate) o += *dst;
                    *dst = o;
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_bf16_tc(const float* __restrict__ x, int m, int k, const bf16_t* __restrict__ w, int n,
                 const float* __restrict__ bias, float* __restrict__ out, int accumulate) {
    gemm_body<true>(x, m, k, w, n, bias, out, accumulate);
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_bf16_tc_any(const float* __restrict__ x, int m, int k, const bf16_t* __restrict__ w,
                     int n, const float* __restrict__ bias, float* __restrict__ out,
                     int accumulate) {
    gemm_body<false>(x, m, k, w, n, bias, out, accumulate);
}
