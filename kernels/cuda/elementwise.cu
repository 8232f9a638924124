// elementwise.cu: activations, residual/bias adds, KV-cache append, embedding gather.
// All use a grid-stride loop: any 1-D grid of 1-D blocks is correct; the launchers use 256
// threads and ceil(n / 256) blocks (capped). Formulas follow dvl_kernels::elementwise.

#define DVL_GRID_STRIDE(i, n)                                                                 \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n);  \
         i += (long long)gridDim.x * blockDim.x)

// SwiGLU gate, in place (spec §7.1): gate[i] = silu(gate[i]) · up[i], silu(g) = g / (1 + e^-g).
extern "C" __global__ void __launch_bounds__(256)
    silu_mul_f32(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    DVL_GRID_STRIDE(i, n) {
        const float g = gate[i];
        gate[i] = g / (1.f + expf(-g)) * up[i];
    }
}

// Exact GELU in place: 0.5·x·(1 + erf(x/√2)), evaluated in f64 like the CPU kernel (Qwen
// merger, SigLIP projector; spec §11 item 10).
extern "C" __global__ void __launch_bounds__(256) gelu_erf_f32(float* __restrict__ x, long long n) {
    DVL_GRID_STRIDE(i, n) {
        const double a = x[i];
        x[i] = (float)(0.5 * a * (1.0 + erf(a * 0.70710678118654752440)));
    }
}

// Tanh-approximated GELU in place (gelu_pytorch_tanh, SigLIP MLP), in f32.
extern "C" __global__ void __launch_bounds__(256) gelu_tanh_f32(float* __restrict__ x, long long n) {
    DVL_GRID_STRIDE(i, n) {
        const float a = x[i];
        x[i] = 0.5f * a * (1.f + tanhf(0.7978846f * (a + 0.044715f * a * a * a)));
    }
}

// acc[i] += x[i] (residual add).
extern "C" __global__ void __launch_bounds__(256)
    add_f32(float* __restrict__ acc, const float* __restrict__ x, long long n) {
    DVL_GRID_STRIDE(i, n) acc[i] += x[i];
}

// x[r, c] += bias[c] for x [rows, n] row-major.
extern "C" __global__ void __launch_bounds__(256)
    add_bias_f32(float* __restrict__ x, const float* __restrict__ bias, int rows, int n) {
    DVL_GRID_STRIDE(i, (long long)rows * n) x[i] += bias[i % n];
}

// KV-cache append (spec §7.3): rows r < rows of k_src / v_src ([rows, src_stride] f32, the first
// `width` columns) go to cache rows pos0 + r ([capacity, kv_stride]). The f32 cache keeps the
// values; the bf16 cache rounds them to nearest even (the model dtype's K/V, half the bytes).
extern "C" __global__ void __launch_bounds__(256)
    kv_append_f32(const float* __restrict__ k_src, const float* __restrict__ v_src, int rows,
                  int width, int src_stride, float* __restrict__ k_cache,
                  float* __restrict__ v_cache, int kv_stride, int pos0) {
    DVL_GRID_STRIDE(i, (long long)rows * width) {
        const int r = (int)(i / width), c = (int)(i % width);
        const size_t dst = (size_t)(pos0 + r) * kv_stride + c;
        k_cache[dst] = k_src[(size_t)r * src_stride + c];
        v_cache[dst] = v_src[(size_t)r * src_stride + c];
    }
}
extern "C" __global__ void __launch_bounds__(256)
    kv_append_bf16(const float* __restrict__ k_src, const float* __restrict__ v_src, int rows,
                   int width, int src_stride, bf16_t* __restrict__ k_cache,
                   bf16_t* __restrict__ v_cache, int kv_stride, int pos0) {
    DVL_GRID_STRIDE(i, (long long)rows * width) {
        const int r = (int)(i / width), c = (int)(i % width);
        const size_t dst = (size_t)(pos0 + r) * kv_stride + c;
        k_cache[dst] = f32_to_bf16(k_src[(size_t)r * src_stride + c]);
        v_cache[dst] = f32_to_bf16(v_src[(size_t)r * src_stride + c]);
    }
}

// Embedding gather (committing unmasked tokens, spec §8.5): out[r, c] = f32(table[ids[r], c]),
// table [vocab, dim] bf16, ids [rows] i32, out [rows, dim] f32. An id outside [0, vocab) gives a
// zero row instead of reading out of bounds.
extern "C" __global__ void __launch_bounds__(256)
    embed_rows_bf16(const bf16_t* __restrict__ table, int vocab, int dim,
                    const int* __restrict__ ids, int rows, float* __restrict__ out) {
    DVL_GRID_STRIDE(i, (long long)rows * dim) {
        const int r = (int)(i / dim), c = (int)(i % dim);
        const int id = ids[r];
        out[i] = (id >= 0 && id < vocab) ? bf16_to_f32(table[(size_t)id * dim + c]) : 0.f;
    }
}
