// gemv.cu: bf16-weight GEMV / skinny GEMM on the CUDA cores, exact f32 activations.
//
//   out[i, j] = (accumulate ? out[i, j] : 0) + bias[j] + sum_k x[i, k] * W[j, k]
//   x [m, k] f32 row-major, W [n, k] bf16 row-major (PyTorch Linear), bias [n] f32 or null,
//   out [m, n] f32 row-major. f32 products and sums (the CPU kernels' numerics: no rounding of
//   the activations), per-lane partial sums then a warp reduction.
//
// This is the denoising-step matmul (m = 8 rows per block-diffusion step, spec §8.13): it is
// bound by streaming W once from HBM, so each weight is loaded with a 16-byte, L1-bypassing
// load, and the activations (a few KB, re-read by every warp) stay in L1/L2.
//
// Geometry (every kernel here):
//   block = 256 threads = 8 warps; warp w of block b owns the R weight rows
//   (b·8 + w)·R .. +R-1 and, across its 32 lanes, the whole k range;
//   grid = (ceil(n / (8·R)), ceil(m / MT)); blockIdx.y selects activation rows y·MT .. y·MT+MT-1.
//   Kernel `gemv_bf16_m{MT}_r{R}` needs k % 8 == 0 and 16-byte aligned x and W (16-byte loads);
//   `gemv_bf16_m{MT}_r{R}_any` takes any k and any 4-/2-byte alignment (scalar loads).
//   Rows past m or n are clamped on load and never stored.

// acc[r][i] += dot(x row i [c·8 .. c·8+8), W row r [same]) for a lane's 8-element chunk.
template <int MT, int R>
__device__ __forceinline__ void gemv_fma8(float (&acc)[R][MT], const uint4 (&wv)[R],
                                          const float* const (&xr)[MT], int c) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const float4* p = (const float4*)(xr[i] + (size_t)c * 8);
        const float4 xa = __ldg(p), xb = __ldg(p + 1);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float a = acc[r][i];
            a = fmaf(xa.x, bf16_lo(wv[r].x), a);
            a = fmaf(xa.y, bf16_hi(wv[r].x), a);
            a = fmaf(xa.z, bf16_lo(wv[r].y), a);
            a = fmaf(xa.w, bf16_hi(wv[r].y), a);
            a = fmaf(xb.x, bf16_lo(wv[r].z), a);
            a = fmaf(xb.y, bf16_hi(wv[r].z), a);
            a = fmaf(xb.z, bf16_lo(wv[r].w), a);
            a = fmaf(xb.w, bf16_hi(wv[r].w), a);
            acc[r][i] = a;
        }
    }
}

template <int MT, int R, bool VEC>
__device__ __forceinline__ void gemv_body(const float* __restrict__ x, int m, int k,
                                          const bf16_t* __restrict__ w, int n,
                                          const float* __restrict__ bias, float* __restrict__ out,
                                          int accumulate) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.x * (blockDim.x >> 5) + warp) * R;
    const int m0 = blockIdx.y * MT;
    // Clamped row pointers: out-of-range rows read valid memory and are never stored.
    const bf16_t* wr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wr[r] = w + (size_t)min(row0 + r, n - 1) * k;
    const float* xr[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) xr[i] = x + (size_t)min(m0 + i, m - 1) * k;

    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < MT; ++i) acc[r][i] = 0.f;

    if (VEC) {
        const int k8 = k >> 3;
        // Two 8-element chunks per lane per iteration: all weight loads issued before use.
        int c = lane;
        for (; c + 32 < k8; c += 64) {
            uint4 w0[R], w1[R];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                w0[r] = ld_stream_u4(wr[r] + (size_t)c * 8);
                w1[r] = ld_stream_u4(wr[r] + (size_t)(c + 32) * 8);
            }
            gemv_fma8<MT, R>(acc, w0, xr, c);
            gemv_fma8<MT, R>(acc, w1, xr, c + 32);
        }
        if (c < k8) {
            uint4 w0[R];
#pragma unroll
            for (int r = 0; r < R; ++r) w0[r] = ld_stream_u4(wr[r] + (size_t)c * 8);
            gemv_fma8<MT, R>(acc, w0, xr, c);
        }
    } else {
        for (int kk = lane; kk < k; kk += 32) {
            float wv[R];
#pragma unroll
            for (int r = 0; r < R; ++r) wv[r] = bf16_to_f32(wr[r][kk]);
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const float xv = xr[i][kk];
#pragma unroll
                for (int r = 0; r < R; ++r) acc[r][i] = fmaf(xv, wv[r], acc[r][i]);
            }
        }
    }

    // Lane l ends up with the total of value l % (R·MT), value index r·MT + i.
    float v[R * MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < MT; ++i) v[r * MT + i] = acc[r][i];
    const float total = warp_reduce_scatter<R * MT>(v);
    if (lane < R * MT) {
        const int r = lane / MT, i = lane % MT;
        const int row = row0 + r, xi = m0 + i;
        if (row < n && xi < m) {
            float o = total;
            if (bias) o += bias[row];
            float* dst = out + (size_t)xi * n + row;
            if (accumulate) o += *dst;
            *dst = o;
        }
    }
}

#define DVL_GEMV(MT, R)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) gemv_bf16_m##MT##_r##R(                 \
        const float* __restrict__ x, int m, int k, const bf16_t* __restrict__ w, int n,       \
        const float* __restrict__ bias, float* __restrict__ out, int accumulate) {            \
        gemv_body<MT, R, true>(x, m, k, w, n, bias, out, accumulate);                         \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) gemv_bf16_m##MT##_r##R##_any(           \
        const float* __restrict__ x, int m, int k, const bf16_t* __restrict__ w, int n,       \
        const float* __restrict__ bias, float* __restrict__ out, int accumulate) {            \
        gemv_body<MT, R, false>(x, m, k, w, n, bias, out, accumulate);                        \
    }

DVL_GEMV(1, 2)
DVL_GEMV(1, 4)
DVL_GEMV(2, 2)
DVL_GEMV(2, 4)
DVL_GEMV(4, 2)
DVL_GEMV(4, 4)
DVL_GEMV(8, 2)
DVL_GEMV(8, 4)
