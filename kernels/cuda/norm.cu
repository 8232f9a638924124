// norm.cu: row normalisations, one block per row. Statistics in f64 and the same formula as the
// CPU kernels (dvl_kernels::norm), so results match them to f32 rounding.
//
// Geometry (both kernels): grid = rows, block = 256 threads (any multiple of 32 up to 1024
// works; the reduction buffer holds 32 warps).

__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double part[32];
    __shared__ double total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_f64(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0;
        s = warp_sum_f64(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    const double r = total;
    __syncthreads(); // `part`/`total` may be reused by a second call
    return r;
}

// RMSNorm (spec §7.1): out[r, i] = f32(x[r, i] / sqrt(mean_i(x[r]^2) + eps)) * w[i].
// Fused residual add when `delta` is non-null: first x[r, i] += delta[r, i] (written back to
// x), then the norm of the sum (the decoder layer's "x = x + proj; a = RMSNorm(x)").
// x, delta, out [rows, d] f32 row-major (out may not alias x); w [d] f32.
extern "C" __global__ void __launch_bounds__(1024)
    rms_norm_f32(float* __restrict__ x, const float* __restrict__ delta,
                 const float* __restrict__ w, float eps, int d, float* __restrict__ out) {
    float* xr = x + (size_t)blockIdx.x * d;
    double ss = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = xr[i];
        if (delta) {
            v += delta[(size_t)blockIdx.x * d + i];
            xr[i] = v;
        }
        ss += (double)v * (double)v;
    }
    ss = block_sum_f64(ss);
    const double inv = 1.0 / sqrt(ss / d + (double)eps);
    float* orow = out + (size_t)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = (float)((double)xr[i] * inv) * w[i];
}

// LayerNorm with affine weight and bias (SigLIP, spec §5.2):
// out[r, i] = f32((x - mean) / sqrt(var + eps)) * w[i] + b[i], mean/var over the row in f64.
// x, out [rows, d] f32; w, b [d] f32.
extern "C" __global__ void __launch_bounds__(1024)
    layer_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                   const float* __restrict__ b, float eps, int d, float* __restrict__ out) {
    const float* xr = x + (size_t)blockIdx.x * d;
    double s = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += (double)xr[i];
    const double mean = block_sum_f64(s) / d;
    double vs = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const double c = (double)xr[i] - mean;
        vs += c * c;
    }
    const double inv = 1.0 / sqrt(block_sum_f64(vs) / d + (double)eps);
    float* orow = out + (size_t)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        orow[i] = (float)(((double)xr[i] - mean) * inv) * w[i] + b[i];
}
