// attention.cu: scaled dot-product attention where each query row sees one contiguous key range
// (flash-decoding style: online softmax over key tiles, the key range optionally split across
// blocks and merged by `attn_combine`).
//
//   out[i, h·hd + d] = sum_{j in [lo_i, hi_i)} softmax_j(scale · q_i,h · k_j,kvh) · v_j,kvh[d]
//   q / out [n_q, q_stride] f32 (heads contiguous, head h at h·hd); k / v [n_keys, kv_stride]
//   f32 (`attn_f32kv`) or bf16 (`attn_bf16kv`), kv head kvh = h / (n_heads / n_kv_heads) (GQA).
//   Key range of query row i: ranges[2i], ranges[2i+1] when `ranges` is non-null (vision tower
//   segments / windows, spec §5.1), else block-causal over a KV cache (spec §7.3):
//   [0, min(n_keys, ((pos0 + i) / block + 1) · block)), with pos0 the absolute position of
//   query row 0 (the cache length) and `block` the diffusion block size.
//   The denoising step attends over the committed cache plus its own chunk, whose K/V the
//   caller has appended after the committed rows (kv_append) without advancing the cache.
//   A row with no visible key gets zeros.
//
// Geometry: block = 128 threads = 4 warps, 16 query rows of one head (warp w: rows 4w..4w+3);
//   grid = (ceil(n_q / 16), n_heads, n_splits); head_dim <= 128. Split s of a block takes an
//   equal, 32-aligned share of the block's key span (union of its rows' ranges).
//   n_splits == 1: writes `out` directly. n_splits > 1: writes unnormalised partials
//   part_o [n_splits, n_q, n_heads, hd] and part_ml [n_splits, n_q, n_heads, 2] (running max,
//   sum of exponentials), merged by attn_combine.
//   Static shared memory: 16·128·4 + 32·129·4 + 32·128·4 = 40.6 KiB.
// Arithmetic in f32 (q is pre-multiplied by scale), softmax exponentials with expf.

#define ATT_QB 16
#define ATT_KT 32
#define ATT_HD 128

__device__ __forceinline__ float att_load(const float* p) { return *p; }
__device__ __forceinline__ float att_load(const bf16_t* p) { return bf16_to_f32(*p); }

__device__ __forceinline__ void att_range(const int* __restrict__ ranges, int i, int pos0,
                                          int block, int n_keys, int& lo, int& hi) {
    if (ranges) {
        lo = ranges[2 * i];
        hi = ranges[2 * i + 1];
    } else {
        lo = 0;
        hi = min(n_keys, ((pos0 + i) / block + 1) * block);
    }
}

template <typename KV>
__device__ __forceinline__ void attn_body(const float* __restrict__ q, int n_q, int q_stride,
                                          const KV* __restrict__ k, const KV* __restrict__ v,
                                          int kv_stride, int n_heads, int n_kv_heads, int hd,
                                          float scale, const int* __restrict__ ranges, int pos0,
                                          int block, int n_keys, float* __restrict__ out,
                                          float* __restrict__ part_o,
                                          float* __restrict__ part_ml) {
    __shared__ float qs[ATT_QB][ATT_HD];
    __shared__ float ks[ATT_KT][ATT_HD + 1];
    __shared__ float vs[ATT_KT][ATT_HD];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int i0 = blockIdx.x * ATT_QB;
    const int h = blockIdx.y;
    const int split = blockIdx.z, n_splits = gridDim.z;
    const int kvh = h / (n_heads / n_kv_heads);

    // The block's key span: the union of its rows' ranges (same result in every thread).
    int span_lo = 0x7fffffff, span_hi = 0;
    for (int r = 0; r < ATT_QB && i0 + r < n_q; ++r) {
        int lo, hi;
        att_range(ranges, i0 + r, pos0, block, n_keys, lo, hi);
        if (hi > lo) {
            span_lo = min(span_lo, lo);
            span_hi = max(span_hi, hi);
        }
    }
    int s_lo = 0, s_hi = 0;
    if (span_hi > span_lo) {
        const int per = ((span_hi - span_lo + n_splits - 1) / n_splits + ATT_KT - 1) / ATT_KT * ATT_KT;
        s_lo = min(span_hi, span_lo + split * per);
        s_hi = min(span_hi, s_lo + per);
    }

    for (int idx = threadIdx.x; idx < ATT_QB * ATT_HD; idx += blockDim.x) {
        const int r = idx / ATT_HD, d = idx % ATT_HD;
        qs[r][d] = (i0 + r < n_q && d < hd) ? q[(size_t)(i0 + r) * q_stride + h * hd + d] * scale : 0.f;
    }

    float m_run[4], l_run[4], o[4][4];
    int lo_r[4], hi_r[4];
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
        m_run[rr] = -INFINITY;
        l_run[rr] = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) o[rr][j] = 0.f;
        const int i = i0 + warp * 4 + rr;
        if (i < n_q) {
            att_range(ranges, i, pos0, block, n_keys, lo_r[rr], hi_r[rr]);
        } else {
            lo_r[rr] = 0;
            hi_r[rr] = 0;
        }
    }

    for (int t0 = s_lo; t0 < s_hi; t0 += ATT_KT) {
        __syncthreads(); // previous tile fully consumed (and qs written, first time)
        for (int idx = threadIdx.x; idx < ATT_KT * hd; idx += blockDim.x) {
            const int j = idx / hd, d = idx % hd;
            const int key = t0 + j;
            float kv = 0.f, vv = 0.f;
            if (key < s_hi) {
                const size_t off = (size_t)key * kv_stride + kvh * hd + d;
                kv = att_load(k + off);
                vv = att_load(v + off);
            }
            ks[j][d] = kv;
            vs[j][d] = vv;
        }
        __syncthreads();
        const int key = t0 + lane;
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
            const int r = warp * 4 + rr;
            const bool visible = key >= lo_r[rr] && key < hi_r[rr] && key < s_hi;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            int d = 0;
            for (; d + 4 <= hd; d += 4) {
                s0 = fmaf(qs[r][d], ks[lane][d], s0);
                s1 = fmaf(qs[r][d + 1], ks[lane][d + 1], s1);
                s2 = fmaf(qs[r][d + 2], ks[lane][d + 2], s2);
                s3 = fmaf(qs[r][d + 3], ks[lane][d + 3], s3);
            }
            for (; d < hd; ++d) s0 = fmaf(qs[r][d], ks[lane][d], s0);
            const float s = visible ? (s0 + s1) + (s2 + s3) : -INFINITY;
            const float m_new = fmaxf(m_run[rr], warp_max(s));
            if (m_new == -INFINITY) continue; // nothing visible yet (warp-uniform)
            const float p = visible ? expf(s - m_new) : 0.f;
            const float alpha = expf(m_run[rr] - m_new); // 0 when m_run was -inf
            l_run[rr] = l_run[rr] * alpha + warp_sum(p);
            m_run[rr] = m_new;
#pragma unroll
            for (int j = 0; j < 4; ++j) o[rr][j] *= alpha;
            for (int jj = 0; jj < ATT_KT; ++jj) {
                const float pj = __shfl_sync(DVL_FULL_MASK, p, jj);
#pragma unroll
                for (int j = 0; j < 4; ++j) o[rr][j] = fmaf(pj, vs[jj][lane + 32 * j], o[rr][j]);
            }
        }
    }

#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
        const int i = i0 + warp * 4 + rr;
        if (i >= n_q) continue;
        if (n_splits == 1) {
            const float inv = l_run[rr] > 0.f ? 1.f / l_run[rr] : 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int d = lane + 32 * j;
                if (d < hd) out[(size_t)i * q_stride + h * hd + d] = o[rr][j] * inv;
            }
        } else {
            const size_t base = ((size_t)split * n_q + i) * n_heads + h;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int d = lane + 32 * j;
                if (d < hd) part_o[base * hd + d] = o[rr][j];
            }
            if (lane == 0) {
                part_ml[base * 2] = m_run[rr];
                part_ml[base * 2 + 1] = l_run[rr];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
    attn_f32kv(const float* __restrict__ q, int n_q, int q_stride, const float* __restrict__ k,
               const float* __restrict__ v, int kv_stride, int n_heads, int n_kv_heads, int hd,
               float scale, const int* __restrict__ ranges, int pos0, int block, int n_keys,
               float* __restrict__ out, float* __restrict__ part_o,
               float* __restrict__ part_ml) {
    attn_body<float>(q, n_q, q_stride, k, v, kv_stride, n_heads, n_kv_heads, hd, scale, ranges,
                     pos0, block, n_keys, out, part_o, part_ml);
}

extern "C" __global__ void __launch_bounds__(128)
    attn_bf16kv(const float* __restrict__ q, int n_q, int q_stride, const bf16_t* __restrict__ k,
                const bf16_t* __restrict__ v, int kv_stride, int n_heads, int n_kv_heads, int hd,
                float scale, const int* __restrict__ ranges, int pos0, int block, int n_keys,
                float* __restrict__ out, float* __restrict__ part_o,
                float* __restrict__ part_ml) {
    attn_body<bf16_t>(q, n_q, q_stride, k, v, kv_stride, n_heads, n_kv_heads, hd, scale, ranges,
                      pos0, block, n_keys, out, part_o, part_ml);
}

// Merge the n_splits partials of attn_*kv: out = sum_s o_s·e^(m_s − M) / sum_s l_s·e^(m_s − M),
// M = max_s m_s (zeros when no split saw a key).
// Geometry: grid = (n_q, n_heads), block = 128 threads (thread d < hd owns dimension d).
extern "C" __global__ void __launch_bounds__(128)
    attn_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml, int n_splits,
                 int n_q, int n_heads, int hd, int q_stride, float* __restrict__ out) {
    const int i = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    float mx = -INFINITY;
    for (int s = 0; s < n_splits; ++s)
        mx = fmaxf(mx, part_ml[(((size_t)s * n_q + i) * n_heads + h) * 2]);
    if (d >= hd) return;
    float l = 0.f, acc = 0.f;
    if (mx != -INFINITY) {
        for (int s = 0; s < n_splits; ++s) {
            const size_t base = ((size_t)s * n_q + i) * n_heads + h;
            const float ms = part_ml[base * 2];
            if (ms == -INFINITY) continue;
            const float wgt = expf(ms - mx);
            l += part_ml[base * 2 + 1] * wgt;
            acc += part_o[base * hd + d] * wgt;
        }
    }
    out[(size_t)i * q_stride + h * hd + d] = l > 0.f ? acc / l : 0.f;
}
