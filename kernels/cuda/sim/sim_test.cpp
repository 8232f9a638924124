// sim_test.cpp: runs every kernel of kernels/cuda/ under the CPU emulation (sim.hpp) on odd
// shapes and compares with plain f64 loops. Build and run: kernels/cuda/sim/run.sh.
#include "sim.hpp"
// clang-format off
#include "../common.cuh"
#include "../gemv.cu"
#include "../gemv_tc.cu"
#include "../gemm.cu"
#include "../attention.cu"
#include "../norm.cu"
#include "../rope.cu"
#include "../elementwise.cu"
#include "../unmask.cu"
// clang-format on

#include <string>

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float rnd() { // uniform in [-1, 1)
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) / (double)(1ull << 24)) * 2.f - 1.f;
}
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static float round_bf16(float f) { return from_bf16(to_bf16(f)); }

static int failures = 0, checks = 0;
static void check(const std::string& name, const std::vector<float>& got,
                  const std::vector<double>& want, double tol) {
    double num = 0, den = 0, worst = 0;
    bool bad = false;
    for (size_t i = 0; i < want.size(); ++i) {
        if (!std::isfinite(got[i])) bad = true;
        const double e = fabs(got[i] - want[i]);
        num += e * e;
        den += want[i] * want[i];
        worst = std::max(worst, e / (fabs(want[i]) + 1e-3));
    }
    const double rel = sqrt(num / (den > 0 ? den : 1));
    ++checks;
    const bool ok = !bad && rel <= tol;
    if (!ok) ++failures;
    printf("%-4s %-44s rel %.2e (tol %.0e) worst-elem %.2e\n", ok ? "ok" : "FAIL", name.c_str(), rel,
           tol, worst);
}

// ---------------------------------------------------------------------------------- matmuls
struct Mm {
    int m, n, k;
    std::vector<float> x, bias, out0;
    std::vector<uint16_t> w;
};
static Mm make_mm(int m, int n, int k) {
    Mm p{m, n, k, {}, {}, {}, {}};
    p.x.resize((size_t)m * k);
    p.w.resize((size_t)n * k);
    p.bias.resize(n);
    p.out0.resize((size_t)m * n);
    for (auto& v : p.x) v = rnd();
    for (auto& v : p.w) v = to_bf16(rnd() * 0.5f);
    for (auto& v : p.bias) v = rnd();
    for (auto& v : p.out0) v = rnd();
    return p;
}
static std::vector<double> mm_ref(const Mm& p, bool round_x, bool bias, bool acc) {
    std::vector<double> r((size_t)p.m * p.n);
    for (int i = 0; i < p.m; ++i)
        for (int j = 0; j < p.n; ++j) {
            double s = bias ? p.bias[j] : 0.0;
            if (acc) s += p.out0[(size_t)i * p.n + j];
            for (int kk = 0; kk < p.k; ++kk) {
                const float xv = p.x[(size_t)i * p.k + kk];
                s += (double)(round_x ? round_bf16(xv) : xv) * from_bf16(p.w[(size_t)j * p.k + kk]);
            }
            r[(size_t)i * p.n + j] = s;
        }
    return r;
}
typedef void (*MmKernel)(const float*, int, int, const bf16_t*, int, const float*, float*, int);

static void test_gemv() {
    struct V { const char* name; MmKernel f; int mt, r; bool vec; };
    const V vs[] = {
        {"gemv_bf16_m1_r2", gemv_bf16_m1_r2, 1, 2, true}, {"gemv_bf16_m1_r4", gemv_bf16_m1_r4, 1, 4, true},
        {"gemv_bf16_m2_r2", gemv_bf16_m2_r2, 2, 2, true}, {"gemv_bf16_m2_r4", gemv_bf16_m2_r4, 2, 4, true},
        {"gemv_bf16_m4_r2", gemv_bf16_m4_r2, 4, 2, true}, {"gemv_bf16_m4_r4", gemv_bf16_m4_r4, 4, 4, true},
        {"gemv_bf16_m8_r2", gemv_bf16_m8_r2, 8, 2, true}, {"gemv_bf16_m8_r4", gemv_bf16_m8_r4, 8, 4, true},
        {"gemv_bf16_m8_r4_any", gemv_bf16_m8_r4_any, 8, 4, false},
        {"gemv_bf16_m1_r2_any", gemv_bf16_m1_r2_any, 1, 2, false},
        {"gemv_bf16_m4_r4_any", gemv_bf16_m4_r4_any, 4, 4, false},
    };
    for (const V& v : vs) {
        const int m = v.mt == 1 ? 1 : v.mt + 3; // > MT: several blockIdx.y
        const int n = 75, k = v.vec ? 8 * 77 : 8 * 77 + 5;
        for (int mode = 0; mode < 2; ++mode) {
            Mm p = make_mm(m, n, k);
            std::vector<float> out = p.out0;
            const bool bias = mode == 1, acc = mode == 1;
            dim3 grid{(unsigned)((n + 8 * v.r - 1) / (8 * v.r)), (unsigned)((m + v.mt - 1) / v.mt), 1};
            sim_launch(grid, dim3{256, 1, 1}, [&] {
                v.f(p.x.data(), m, k, p.w.data(), n, bias ? p.bias.data() : nullptr, out.data(), acc);
            });
            check(std::string(v.name) + (mode ? " +bias +acc" : ""), out, mm_ref(p, false, bias, acc), 2e-6);
        }
    }
}

static void test_gemv_tc() {
    struct V { const char* name; MmKernel f; int nt; bool vec; };
    const V vs[] = {
        {"gemv_tc_bf16_n1", gemv_tc_bf16_n1, 1, true}, {"gemv_tc_bf16_n2", gemv_tc_bf16_n2, 2, true},
        {"gemv_tc_bf16_n4", gemv_tc_bf16_n4, 4, true}, {"gemv_tc_bf16_n8", gemv_tc_bf16_n8, 8, true},
        {"gemv_tc_bf16_n8_any", gemv_tc_bf16_n8_any, 8, false},
        {"gemv_tc_bf16_n2_any", gemv_tc_bf16_n2_any, 2, false},
    };
    for (const V& v : vs) {
        const int m = v.nt * 8 + 3, n = 45, k = v.vec ? 8 * 71 : 8 * 71 + 3;
        for (int mode = 0; mode < 2; ++mode) {
            Mm p = make_mm(m, n, k);
            std::vector<float> out = p.out0;
            const bool bias = mode == 1, acc = mode == 1;
            dim3 grid{(unsigned)((n + 15) / 16), (unsigned)((m + 8 * v.nt - 1) / (8 * v.nt)), 1};
            sim_launch(grid, dim3{256, 1, 1}, [&] {
                v.f(p.x.data(), m, k, p.w.data(), n, bias ? p.bias.data() : nullptr, out.data(), acc);
            });
            check(std::string(v.name) + (mode ? " +bias +acc" : ""), out, mm_ref(p, true, bias, acc), 2e-6);
        }
    }
}

static void test_gemm() {
    struct V { const char* name; MmKernel f; bool vec; };
    const V vs[] = {{"gemm_bf16_tc", gemm_bf16_tc, true}, {"gemm_bf16_tc_any", gemm_bf16_tc_any, false}};
    for (const V& v : vs) {
        const int m = 141, n = 133, k = v.vec ? 8 * 13 : 8 * 13 + 5;
        for (int mode = 0; mode < 2; ++mode) {
            Mm p = make_mm(m, n, k);
            std::vector<float> out = p.out0;
            const bool bias = mode == 1, acc = mode == 1;
            dim3 grid{(unsigned)((n + 127) / 128), (unsigned)((m + 127) / 128), 1};
            sim_launch(grid, dim3{256, 1, 1}, [&] {
                v.f(p.x.data(), m, k, p.w.data(), n, bias ? p.bias.data() : nullptr, out.data(), acc);
            });
            check(std::string(v.name) + (mode ? " +bias +acc" : ""), out, mm_ref(p, true, bias, acc), 2e-6);
        }
    }
}

// -------------------------------------------------------------------------------- attention
static void test_attention() {
    const int heads = 4, kvh = 2, hd = 80, qs = heads * hd, kvs = kvh * hd;
    for (int mode = 0; mode < 4; ++mode) {
        const bool segments = mode >= 2, bf = mode & 1;
        const int n_q = segments ? 37 : 8, block = 8, pos0 = 40;
        const int n_keys = segments ? 37 : pos0 + n_q;
        std::vector<float> q((size_t)n_q * qs), kf((size_t)n_keys * kvs), vf((size_t)n_keys * kvs);
        for (auto& x : q) x = rnd();
        for (auto& x : kf) x = rnd();
        for (auto& x : vf) x = rnd();
        std::vector<uint16_t> kb(kf.size()), vb(vf.size());
        if (bf) {
            for (size_t i = 0; i < kf.size(); ++i) { kb[i] = to_bf16(kf[i]); kf[i] = from_bf16(kb[i]); }
            for (size_t i = 0; i < vf.size(); ++i) { vb[i] = to_bf16(vf[i]); vf[i] = from_bf16(vb[i]); }
        }
        std::vector<int> ranges;
        if (segments) { // segments [0,10) [10,11) [11,37)
            for (int i = 0; i < n_q; ++i) {
                const int lo = i < 10 ? 0 : i < 11 ? 10 : 11, hi = i < 10 ? 10 : i < 11 ? 11 : 37;
                ranges.push_back(lo);
                ranges.push_back(hi);
            }
        }
        auto range = [&](int i, int& lo, int& hi) {
            if (segments) { lo = ranges[2 * i]; hi = ranges[2 * i + 1]; }
            else { lo = 0; hi = std::min(n_keys, ((pos0 + i) / block + 1) * block); }
        };
        const float scale = 1.f / sqrtf((float)hd);
        std::vector<double> want((size_t)n_q * qs);
        for (int i = 0; i < n_q; ++i)
            for (int h = 0; h < heads; ++h) {
                const int g = h / (heads / kvh);
                int lo, hi;
                range(i, lo, hi);
                std::vector<double> s(hi - lo);
                double mx = -1e300;
                for (int j = lo; j < hi; ++j) {
                    double d = 0;
                    for (int t = 0; t < hd; ++t) d += (double)q[(size_t)i * qs + h * hd + t] * kf[(size_t)j * kvs + g * hd + t];
                    s[j - lo] = d * scale;
                    mx = std::max(mx, s[j - lo]);
                }
                double sum = 0;
                for (auto& x : s) { x = exp(x - mx); sum += x; }
                for (int t = 0; t < hd; ++t) {
                    double o = 0;
                    for (int j = lo; j < hi; ++j) o += s[j - lo] / sum * vf[(size_t)j * kvs + g * hd + t];
                    want[(size_t)i * qs + h * hd + t] = o;
                }
            }
        for (int n_splits : {1, 3}) {
            std::vector<float> out((size_t)n_q * qs, NAN);
            std::vector<float> po((size_t)n_splits * n_q * heads * hd), pml((size_t)n_splits * n_q * heads * 2);
            dim3 grid{(unsigned)((n_q + 15) / 16), (unsigned)heads, (unsigned)n_splits};
            const int* rp = segments ? ranges.data() : nullptr;
            sim_launch(grid, dim3{128, 1, 1}, [&] {
                if (bf)
                    attn_bf16kv(q.data(), n_q, qs, kb.data(), vb.data(), kvs, heads, kvh, hd, scale, rp, pos0, block, n_keys, out.data(), po.data(), pml.data());
                else
                    attn_f32kv(q.data(), n_q, qs, kf.data(), vf.data(), kvs, heads, kvh, hd, scale, rp, pos0, block, n_keys, out.data(), po.data(), pml.data());
            });
            if (n_splits > 1)
                sim_launch(dim3{(unsigned)n_q, (unsigned)heads, 1}, dim3{128, 1, 1}, [&] {
                    attn_combine(po.data(), pml.data(), n_splits, n_q, heads, hd, qs, out.data());
                });
            char name[96];
            snprintf(name, sizeof name, "attn_%s %s splits=%d", bf ? "bf16kv" : "f32kv", segments ? "segments" : "block-causal", n_splits);
            check(name, out, want, 2e-6);
        }
    }
}

// ---------------------------------------------------------------------------- norms, rope, ew
static void test_norms() {
    const int rows = 3, d = 1000;
    std::vector<float> x((size_t)rows * d), delta(x.size()), w(d), b(d);
    for (auto& v : x) v = rnd() * 3;
    for (auto& v : delta) v = rnd();
    for (auto& v : w) v = rnd();
    for (auto& v : b) v = rnd();
    for (int fused = 0; fused < 2; ++fused) {
        std::vector<float> xs = x, out(x.size(), NAN);
        std::vector<double> want(x.size()), want_x(x.size());
        for (int r = 0; r < rows; ++r) {
            double ss = 0;
            for (int i = 0; i < d; ++i) {
                float v = x[(size_t)r * d + i];
                if (fused) v += delta[(size_t)r * d + i];
                want_x[(size_t)r * d + i] = v;
                ss += (double)v * v;
            }
            const double inv = 1.0 / sqrt(ss / d + 1e-6);
            for (int i = 0; i < d; ++i) want[(size_t)r * d + i] = (double)(float)(want_x[(size_t)r * d + i] * inv) * w[i];
        }
        sim_launch(dim3{(unsigned)rows, 1, 1}, dim3{256, 1, 1}, [&] {
            rms_norm_f32(xs.data(), fused ? delta.data() : nullptr, w.data(), 1e-6f, d, out.data());
        });
        check(fused ? "rms_norm_f32 +residual" : "rms_norm_f32", out, want, 1e-7);
        if (fused) check("rms_norm_f32 residual written back", xs, want_x, 1e-7);
    }
    std::vector<float> out(x.size(), NAN);
    std::vector<double> want(x.size());
    for (int r = 0; r < rows; ++r) {
        double mean = 0, var = 0;
        for (int i = 0; i < d; ++i) mean += x[(size_t)r * d + i];
        mean /= d;
        for (int i = 0; i < d; ++i) var += (x[(size_t)r * d + i] - mean) * (x[(size_t)r * d + i] - mean);
        const double inv = 1.0 / sqrt(var / d + 1e-6);
        for (int i = 0; i < d; ++i) want[(size_t)r * d + i] = (double)(float)((x[(size_t)r * d + i] - mean) * inv) * w[i] + b[i];
    }
    sim_launch(dim3{(unsigned)rows, 1, 1}, dim3{128, 1, 1}, [&] {
        layer_norm_f32(x.data(), w.data(), b.data(), 1e-6f, d, out.data());
    });
    check("layer_norm_f32", out, want, 1e-7);
}

static void test_rope_ew() {
    const int rows = 5, heads = 3, hd = 80, stride = heads * hd + 16;
    std::vector<float> x((size_t)rows * stride), c((size_t)rows * hd), s((size_t)rows * hd);
    for (auto& v : x) v = rnd();
    for (int r = 0; r < rows; ++r)
        for (int i = 0; i < hd / 2; ++i) {
            const double a = (r + 3) * pow(10000.0, -2.0 * i / hd);
            c[(size_t)r * hd + i] = c[(size_t)r * hd + i + hd / 2] = (float)cos(a);
            s[(size_t)r * hd + i] = s[(size_t)r * hd + i + hd / 2] = (float)sin(a);
        }
    std::vector<double> want(x.begin(), x.end());
    for (int r = 0; r < rows; ++r)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < hd / 2; ++i) {
                const size_t o = (size_t)r * stride + h * hd;
                const double a = x[o + i], b = x[o + i + hd / 2];
                want[o + i] = a * c[(size_t)r * hd + i] - b * s[(size_t)r * hd + i];
                want[o + i + hd / 2] = b * c[(size_t)r * hd + i + hd / 2] + a * s[(size_t)r * hd + i + hd / 2];
            }
    sim_launch(dim3{3, 1, 1}, dim3{64, 1, 1}, [&] { rope_rotate_half_f32(x.data(), rows, heads, hd, stride, c.data(), s.data()); });
    check("rope_rotate_half_f32", x, want, 1e-7);

    const int n = 1234;
    std::vector<float> g(n), u(n), e1(n), e2(n);
    for (int i = 0; i < n; ++i) { g[i] = rnd() * 6; u[i] = rnd(); e1[i] = rnd() * 4; e2[i] = rnd() * 4; }
    std::vector<double> wg(n), w1(n), w2(n);
    for (int i = 0; i < n; ++i) {
        wg[i] = g[i] / (1 + exp(-(double)g[i])) * u[i];
        w1[i] = 0.5 * e1[i] * (1 + erf(e1[i] / sqrt(2.0)));
        const double a = e2[i];
        w2[i] = 0.5 * a * (1 + tanh(sqrt(2 / M_PI) * (a + 0.044715 * a * a * a)));
    }
    sim_launch(dim3{2, 1, 1}, dim3{256, 1, 1}, [&] { silu_mul_f32(g.data(), u.data(), n); });
    check("silu_mul_f32", g, wg, 1e-6);
    sim_launch(dim3{2, 1, 1}, dim3{256, 1, 1}, [&] { gelu_erf_f32(e1.data(), n); });
    check("gelu_erf_f32", e1, w1, 1e-7);
    sim_launch(dim3{2, 1, 1}, dim3{256, 1, 1}, [&] { gelu_tanh_f32(e2.data(), n); });
    check("gelu_tanh_f32", e2, w2, 1e-5);

    const int brows = 7, bn = 33;
    std::vector<float> bx((size_t)brows * bn), bb(bn), ad((size_t)brows * bn);
    for (auto& v : bx) v = rnd();
    for (auto& v : bb) v = rnd();
    for (auto& v : ad) v = rnd();
    std::vector<double> wb(bx.size()), wa(bx.size());
    for (int r = 0; r < brows; ++r)
        for (int cc = 0; cc < bn; ++cc) {
            wb[(size_t)r * bn + cc] = (double)bx[(size_t)r * bn + cc] + bb[cc];
            wa[(size_t)r * bn + cc] = wb[(size_t)r * bn + cc] + ad[(size_t)r * bn + cc];
        }
    sim_launch(dim3{1, 1, 1}, dim3{64, 1, 1}, [&] { add_bias_f32(bx.data(), bb.data(), brows, bn); });
    check("add_bias_f32", bx, wb, 1e-7);
    sim_launch(dim3{1, 1, 1}, dim3{64, 1, 1}, [&] { add_f32(bx.data(), ad.data(), (long long)bx.size()); });
    check("add_f32", bx, wa, 1e-7);

    // KV append: 3 rows of width 20 (stride 24) into a cache of stride 22 at row 4.
    const int kr = 3, kw = 20, ks = 24, cs = 22, cap = 9, p0 = 4;
    std::vector<float> ksrc((size_t)kr * ks), vsrc((size_t)kr * ks);
    for (auto& v : ksrc) v = rnd();
    for (auto& v : vsrc) v = rnd();
    std::vector<float> kc((size_t)cap * cs, 7.f), vc((size_t)cap * cs, 7.f);
    std::vector<uint16_t> kcb((size_t)cap * cs, to_bf16(7.f)), vcb((size_t)cap * cs, to_bf16(7.f));
    std::vector<double> wk(kc.size(), 7.0), wv(vc.size(), 7.0), wkb(kc.size(), 7.0), wvb(vc.size(), 7.0);
    for (int r = 0; r < kr; ++r)
        for (int cc = 0; cc < kw; ++cc) {
            const size_t d = (size_t)(p0 + r) * cs + cc, sidx = (size_t)r * ks + cc;
            wk[d] = ksrc[sidx]; wv[d] = vsrc[sidx];
            wkb[d] = round_bf16(ksrc[sidx]); wvb[d] = round_bf16(vsrc[sidx]);
        }
    sim_launch(dim3{1, 1, 1}, dim3{32, 1, 1}, [&] { kv_append_f32(ksrc.data(), vsrc.data(), kr, kw, ks, kc.data(), vc.data(), cs, p0); });
    check("kv_append_f32 k", kc, wk, 0);
    check("kv_append_f32 v", vc, wv, 0);
    sim_launch(dim3{1, 1, 1}, dim3{32, 1, 1}, [&] { kv_append_bf16(ksrc.data(), vsrc.data(), kr, kw, ks, kcb.data(), vcb.data(), cs, p0); });
    std::vector<float> kcbf(kcb.size()), vcbf(vcb.size());
    for (size_t i = 0; i < kcb.size(); ++i) { kcbf[i] = from_bf16(kcb[i]); vcbf[i] = from_bf16(vcb[i]); }
    check("kv_append_bf16 k", kcbf, wkb, 0);
    check("kv_append_bf16 v", vcbf, wvb, 0);

    const int vocab = 11, dim = 13;
    std::vector<uint16_t> table((size_t)vocab * dim);
    for (auto& v : table) v = to_bf16(rnd());
    std::vector<int> ids = {3, 0, 10, 3, -1, 11};
    std::vector<float> eo(ids.size() * dim, NAN);
    std::vector<double> we(eo.size());
    for (size_t r = 0; r < ids.size(); ++r)
        for (int cc = 0; cc < dim; ++cc)
            we[r * dim + cc] = ids[r] >= 0 && ids[r] < vocab ? from_bf16(table[(size_t)ids[r] * dim + cc]) : 0.0;
    sim_launch(dim3{1, 1, 1}, dim3{32, 1, 1}, [&] { embed_rows_bf16(table.data(), vocab, dim, ids.data(), (int)ids.size(), eo.data()); });
    check("embed_rows_bf16", eo, we, 0);
}

// --------------------------------------------------------------------------------- unmasking
static void test_unmask() {
    const int rows = 4, n = 5000, ld = 5003, chunk = 1024, n_chunks = (n + chunk - 1) / chunk;
    std::vector<float> z((size_t)rows * ld, 1e30f); // padding past n must be ignored
    for (int r = 0; r < rows; ++r)
        for (int i = 0; i < n; ++i) z[(size_t)r * ld + i] = rnd() * 8;
    // Row 1: tie between ids 3000 and 1200 -> 1200. Row 2: max at `never` (77) -> runner-up.
    // Row 3: tie across chunks, ids 4999 and 2048 -> 2048.
    z[(size_t)1 * ld + 3000] = z[(size_t)1 * ld + 1200] = 20.f;
    z[(size_t)2 * ld + 77] = 30.f;
    z[(size_t)3 * ld + 4999] = z[(size_t)3 * ld + 2048] = 15.f;
    const int never = 77;
    std::vector<float> pmax((size_t)rows * n_chunks), pbest(pmax.size());
    std::vector<int> pid(pmax.size());
    std::vector<double> psum(pmax.size());
    std::vector<int> tok(rows, -7);
    std::vector<float> conf(rows, NAN);
    sim_launch(dim3{(unsigned)n_chunks, (unsigned)rows, 1}, dim3{256, 1, 1}, [&] {
        argmax_partial(z.data(), n, ld, chunk, never, pmax.data(), pbest.data(), pid.data(), psum.data());
    });
    sim_launch(dim3{(unsigned)rows, 1, 1}, dim3{32, 1, 1}, [&] {
        argmax_finish(pmax.data(), pbest.data(), pid.data(), psum.data(), n_chunks, tok.data(), conf.data());
    });
    std::vector<double> wc(rows);
    std::vector<float> gc(rows);
    bool ids_ok = true;
    for (int r = 0; r < rows; ++r) {
        const float* zr = &z[(size_t)r * ld];
        int best = -1;
        double mx = -1e300;
        for (int i = 0; i < n; ++i) mx = std::max(mx, (double)zr[i]);
        for (int i = 0; i < n; ++i)
            if (i != never && (best < 0 || zr[i] > zr[best])) best = i;
        double sum = 0;
        for (int i = 0; i < n; ++i) sum += exp(zr[i] - mx);
        wc[r] = exp(zr[best] - mx) / sum;
        gc[r] = conf[r];
        if (tok[r] != best) {
            ids_ok = false;
            printf("     row %d: token %d, want %d\n", r, tok[r], best);
        }
    }
    ++checks;
    if (!ids_ok) ++failures;
    printf("%-4s %-44s\n", ids_ok ? "ok" : "FAIL", "argmax tokens (ties, excluded id)");
    check("argmax confidence", gc, wc, 1e-6);
}

int main(int argc, char** argv) {
    const std::string only = argc > 1 ? argv[1] : "";
    if (only.empty() || only == "gemv") test_gemv();
    if (only.empty() || only == "gemv_tc") test_gemv_tc();
    if (only.empty() || only == "gemm") test_gemm();
    if (only.empty() || only == "attention") test_attention();
    if (only.empty() || only == "norm") test_norms();
    if (only.empty() || only == "ew") test_rope_ew();
    if (only.empty() || only == "unmask") test_unmask();
    printf("%d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
