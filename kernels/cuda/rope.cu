// rope.cu: rotary position embedding, rotate-half convention (spec §7.2, §5.1(f)), in place.
//
//   for row r < rows, head h < n_heads, i < hd/2, with a = x[r, h·hd + i], b = x[r, h·hd + i + hd/2]:
//     x[r, h·hd + i]        = a·cos[r, i]        − b·sin[r, i]
//     x[r, h·hd + i + hd/2] = b·cos[r, i + hd/2] + a·sin[r, i + hd/2]
//   x [rows, stride] f32 (heads contiguous from column 0); cos, sin [rows, hd] f32: the host's
//   angle tables (concat(θ, θ)), so angles are computed exactly as on the CPU (f64 there) and
//   the text model's 1-D and the vision tower's 2-D positions share one kernel.
//
// Geometry: any 1-D grid of 1-D blocks (grid-stride loop over rows·n_heads·hd/2 pairs); the
// launcher uses 256 threads and ceil(pairs / 256) blocks (capped).
extern "C" __global__ void __launch_bounds__(256)
    rope_rotate_half_f32(float* __restrict__ x, int rows, int n_heads, int hd, int stride,
                         const float* __restrict__ cos_t, const float* __restrict__ sin_t) {
    const int half = hd / 2;
    const long long total = (long long)rows * n_heads * half;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const long long rh = idx / half;
        const int h = (int)(rh % n_heads);
        const int r = (int)(rh / n_heads);
        float* p = x + (size_t)r * stride + h * hd;
        const float* c = cos_t + (size_t)r * hd;
        const float* s = sin_t + (size_t)r * hd;
        const float a = p[i], b = p[i + half];
        p[i] = a * c[i] - b * s[i];
        p[i + half] = b * c[i + half] + a * s[i + half];
    }
}
