// unmask.cu: the greedy unmasking reduction on the GPU (spec §8.6, §11 items 9 and 18), so only
// (token, confidence) per row crosses to the host instead of rows × vocab logits.
//
// For each row r of logits [rows, ld] f32 (n = vocabulary size <= ld):
//   token[r] = argmax over ids != never of z[r, id] (lowest id on ties; never < 0: none excluded)
//   conf[r]  = softmax(z[r])[token] = e^(z_tok − M) / sum_id e^(z_id − M), M = max over *all* ids
//   (the excluded id still counts in M and in the denominator, like the CPU reference).
// Two kernels: argmax_partial reduces vocabulary chunks, argmax_finish merges them in f64.
// A row with no eligible id gets token −1 and confidence 0.

// (value, id) order of the arg-max: larger value first, then lower id.
__device__ __forceinline__ bool am_better(float v, int id, float bv, int bid) {
    return v > bv || (v == bv && id < bid);
}

// Stage 1. Chunk c of row r covers ids [c·chunk, min(n, (c+1)·chunk)); its partial is stored at
// index r·n_chunks + c of pmax (chunk max), pbest / pbest_id (best eligible value and id) and
// psum (f64: sum of e^(z − chunk max), f32 terms summed per thread then across the block).
// Geometry: grid = (n_chunks = ceil(n / chunk), rows), block = 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    argmax_partial(const float* __restrict__ logits, int n, int ld, int chunk, int never,
                   float* __restrict__ pmax, float* __restrict__ pbest, int* __restrict__ pbest_id,
                   double* __restrict__ psum) {
    __shared__ float s_max[32], s_best[32];
    __shared__ int s_id[32];
    __shared__ double s_sum[32];
    const int c = blockIdx.x, r = blockIdx.y, n_chunks = gridDim.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const float* z = logits + (size_t)r * ld;
    const int lo = c * chunk, hi = min(n, lo + chunk);

    float mx = -INFINITY, best = -INFINITY;
    int best_id = 0x7fffffff;
    for (int id = lo + threadIdx.x; id < hi; id += blockDim.x) {
        const float v = z[id];
        mx = fmaxf(mx, v);
        if (id != never && am_better(v, id, best, best_id)) {
            best = v;
            best_id = id;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        mx = fmaxf(mx, __shfl_xor_sync(DVL_FULL_MASK, mx, off));
        const float ob = __shfl_xor_sync(DVL_FULL_MASK, best, off);
        const int oid = __shfl_xor_sync(DVL_FULL_MASK, best_id, off);
        if (am_better(ob, oid, best, best_id)) {
            best = ob;
            best_id = oid;
        }
    }
    if (lane == 0) {
        s_max[warp] = mx;
        s_best[warp] = best;
        s_id[warp] = best_id;
    }
    __syncthreads();
    mx = -INFINITY;
    best = -INFINITY;
    best_id = 0x7fffffff;
    for (int w = 0; w < n_warps; ++w) {
        mx = fmaxf(mx, s_max[w]);
        if (am_better(s_best[w], s_id[w], best, best_id)) {
            best = s_best[w];
            best_id = s_id[w];
        }
    }
    // Second pass over the chunk (cache-resident): sum of exponentials against the chunk max.
    float sum = 0.f;
    if (mx != -INFINITY)
        for (int id = lo + threadIdx.x; id < hi; id += blockDim.x) sum += expf(z[id] - mx);
    double dsum = warp_sum_f64((double)sum);
    if (lane == 0) s_sum[warp] = dsum;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < n_warps; ++w) t += s_sum[w];
        const size_t o = (size_t)r * n_chunks + c;
        pmax[o] = mx;
        pbest[o] = best;
        pbest_id[o] = best_id;
        psum[o] = t;
    }
}

// Stage 2: merge a row's n_chunks partials. M = max pmax; S = sum psum·e^(pmax − M) (f64);
// conf = f32(f64(e^(best − M)) / S).
// Geometry: grid = rows, block = 32 threads (one warp).
extern "C" __global__ void __launch_bounds__(32)
    argmax_finish(const float* __restrict__ pmax, const float* __restrict__ pbest,
                  const int* __restrict__ pbest_id, const double* __restrict__ psum, int n_chunks,
                  int* __restrict__ token, float* __restrict__ conf) {
    const int r = blockIdx.x, lane = threadIdx.x;
    const size_t base = (size_t)r * n_chunks;
    float mx = -INFINITY, best = -INFINITY;
    int best_id = 0x7fffffff;
    for (int c = lane; c < n_chunks; c += 32) {
        mx = fmaxf(mx, pmax[base + c]);
        if (am_better(pbest[base + c], pbest_id[base + c], best, best_id)) {
            best = pbest[base + c];
            best_id = pbest_id[base + c];
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        mx = fmaxf(mx, __shfl_xor_sync(DVL_FULL_MASK, mx, off));
        const float ob = __shfl_xor_sync(DVL_FULL_MASK, best, off);
        const int oid = __shfl_xor_sync(DVL_FULL_MASK, best_id, off);
        if (am_better(ob, oid, best, best_id)) {
            best = ob;
            best_id = oid;
        }
    }
    double s = 0.0;
    if (mx != -INFINITY)
        for (int c = lane; c < n_chunks; c += 32) {
            const float m = pmax[base + c];
            if (m != -INFINITY) s += psum[base + c] * exp((double)(m - mx));
        }
    s = warp_sum_f64(s);
    if (lane == 0) {
        const bool ok = best_id != 0x7fffffff && s > 0.0;
        token[r] = ok ? best_id : -1;
        conf[r] = ok ? (float)((double)expf(best - mx) / s) : 0.f;
    }
}
