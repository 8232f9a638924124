//! Per-kernel throughput (`cargo bench -p dvl-kernels`): GB/s of weights streamed for the
//! skinny matmuls of a denoising step, GFLOP/s for the large-M matmuls of prefill and
//! vision (and the packed AVX2 GEMM they take there), both also on weights repacked into
//! panels (`avx2_panels`: what the engine runs on AVX2 machines), the unmasking pass over a full
//! vocabulary row (and, on AMX, fused into the projection of one vocabulary slice), and
//! attention (FLOP/s over the visible keys). Single thread, every ISA the CPU has.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dvl_kernels::bf16;
use dvl_kernels::matmul::{matmul, matmul_many_rows, Isa};
use dvl_kernels::packed::{matmul_many_rows_packed, matmul_packed, PackedBf16};

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn isa_name(i: Isa) -> &'static str {
    match i {
        Isa::Portable => "portable",
        Isa::Avx2 => "avx2",
        Isa::Avx512 => "avx512",
    }
}

fn skinny(c: &mut Criterion) {
    // 3B shapes: q/o projection 2048×2048 and the MLP 11008×2048, block of 8 rows.
    let mut g = c.benchmark_group("matmul_step_bf16");
    for &(m, k, n) in &[
        (8usize, 2048usize, 2048usize),
        (8, 2048, 11008),
        (8, 11008, 2048),
        // The shipped tiny model's tied lm_head: short rows, a long vocabulary.
        (8, 64, 151936),
        // One 2048-id slice of that projection (how the fused unmasking pass runs it):
        // L2-resident, so the per-block cost of each kernel shows.
        (8, 64, 2048),
        // L2-resident weights: the kernel's compute rate without memory stalls.
        (8, 1024, 256),
        // 268 MB: streams from DRAM whatever the L3 (the step's real regime).
        (8, 4096, 32768),
    ] {
        let x = data(m * k);
        let w: Vec<bf16> = data(n * k).into_iter().map(bf16::from_f32).collect();
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Bytes((n * k * 2) as u64));
        for &isa in dvl_kernels::cpu::supported_isas() {
            g.bench_with_input(
                BenchmarkId::new(isa_name(isa), format!("{m}x{k}x{n}")),
                &isa,
                |b, &isa| b.iter(|| matmul(isa, &x, m, k, &w, n, None, &mut out, n)),
            );
        }
        if dvl_kernels::cpu::supported_isas().contains(&Isa::Avx2) {
            // The same weights in 16-output panels (rows prepared in each call, as the
            // engine does per matmul).
            let panels = PackedBf16::new(&w, n, k);
            g.bench_function(
                BenchmarkId::new("avx2_panels", format!("{m}x{k}x{n}")),
                |b| b.iter(|| matmul_packed(Isa::Avx2, &x, m, k, &panels, 0, n, None, &mut out, n)),
            );
        }
        #[cfg(target_arch = "x86_64")]
        if dvl_kernels::cpu::has_avx512_bf16() {
            g.bench_function(BenchmarkId::new("dpbf16", format!("{m}x{k}x{n}")), |b| {
                // SAFETY: has_avx512_bf16() checked CPU and OS support; shapes match.
                b.iter(|| unsafe {
                    dvl_kernels::dpbf16::matmul_dpbf16(&x, m, k, &w, n, None, &mut out, n)
                })
            });
        }
        #[cfg(target_arch = "x86_64")]
        if dvl_kernels::amx::available() {
            // The default f32 path's step kernel on AMX machines (three bf16 terms per input).
            g.bench_function(BenchmarkId::new("amx_f32x3", format!("{m}x{k}x{n}")), |b| {
                // SAFETY: available() checked CPU, OS and permission; shapes match.
                b.iter(|| unsafe {
                    dvl_kernels::amx::matmul_amx_f32x3(&x, m, k, &w, n, None, &mut out, n)
                })
            });
            g.bench_function(BenchmarkId::new("amx_bf16", format!("{m}x{k}x{n}")), |b| {
                // SAFETY: available() checked CPU, OS and permission; shapes match.
                b.iter(|| unsafe {
                    dvl_kernels::amx::matmul_amx_bf16(&x, m, k, &w, n, None, &mut out, n)
                })
            });
        }
    }
    g.finish();
}

fn large(c: &mut Criterion) {
    // Vision qkv (1024 patches × 1280 → 3840) and a 3B prefill MLP slice.
    let mut g = c.benchmark_group("matmul_large_bf16");
    g.sample_size(10);
    for &(m, k, n) in &[(1024usize, 1280usize, 3840usize), (288, 2048, 2752)] {
        let x = data(m * k);
        let w: Vec<bf16> = data(n * k).into_iter().map(bf16::from_f32).collect();
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for &isa in dvl_kernels::cpu::supported_isas() {
            g.bench_with_input(
                BenchmarkId::new(isa_name(isa), format!("{m}x{k}x{n}")),
                &isa,
                |b, &isa| b.iter(|| matmul(isa, &x, m, k, &w, n, None, &mut out, n)),
            );
        }
        if dvl_kernels::cpu::supported_isas().contains(&Isa::Avx2) {
            // The packed GEMM that prefill and vision take on AVX2 (matmul_many_rows).
            g.bench_function(BenchmarkId::new("avx2_gemm", format!("{m}x{k}x{n}")), |b| {
                b.iter(|| matmul_many_rows(Isa::Avx2, &x, m, k, &w, n, None, &mut out, n))
            });
            let panels = PackedBf16::new(&w, n, k);
            g.bench_function(
                BenchmarkId::new("avx2_panels", format!("{m}x{k}x{n}")),
                |b| {
                    b.iter(|| {
                        matmul_many_rows_packed(
                            Isa::Avx2,
                            &x,
                            m,
                            k,
                            &panels,
                            0,
                            n,
                            None,
                            &mut out,
                            n,
                        )
                    })
                },
            );
        }
        #[cfg(target_arch = "x86_64")]
        if dvl_kernels::amx::available() {
            g.bench_function(BenchmarkId::new("amx_bf16", format!("{m}x{k}x{n}")), |b| {
                // SAFETY: available() checked CPU, OS and permission; shapes match.
                b.iter(|| unsafe {
                    dvl_kernels::amx::matmul_amx_bf16(&x, m, k, &w, n, None, &mut out, n)
                })
            });
        }
    }
    g.finish();
}

fn unmask(c: &mut Criterion) {
    let z = data(151_936);
    let mut g = c.benchmark_group("unmask_row");
    g.throughput(Throughput::Bytes((z.len() * 4) as u64));
    for &isa in dvl_kernels::cpu::supported_isas() {
        g.bench_with_input(
            BenchmarkId::new(isa_name(isa), "argmax_confidence_151936"),
            &isa,
            |b, &isa| {
                b.iter(|| {
                    dvl_kernels::softmax::ArgmaxPartial::of_isa(isa, &z, 0, Some(151_671)).finish()
                })
            },
        );
    }
    g.finish();
    #[cfg(target_arch = "x86_64")]
    if dvl_kernels::amx::available() {
        unmask_amx_slice(c);
    }
}

/// The fused AMX projection + unmasking of one L2-resident 2048-id slice of k = 64 (the
/// tiny model's vocabulary, as `logits_argmax` runs it per slice) against the unfused pass
/// (tile matmul writing the logits, then `ArgmaxPartial` per row), for bf16 rows and f32
/// rows as three bf16 terms.
#[cfg(target_arch = "x86_64")]
fn unmask_amx_slice(c: &mut Criterion) {
    use dvl_kernels::amx::{self, unmask};
    use dvl_kernels::softmax::ArgmaxPartial;
    let (k, n) = (64usize, 2048usize);
    let w: Vec<bf16> = data(n * k).into_iter().map(bf16::from_f32).collect();
    let mut g = c.benchmark_group("unmask_amx_slice");
    g.throughput(Throughput::Bytes((n * k * 2) as u64));
    for rows in [1usize, 4, 8] {
        let x = data(rows * k);
        for (terms, packed) in [
            ("bf16", amx::pack_activations(&x, rows, k)),
            ("f32x3", amx::pack_activations_f32x3(&x, rows, k)),
        ] {
            let acts = unmask::UnmaskActs::new(&packed).expect("rows within a tile");
            let mut parts = vec![ArgmaxPartial::EMPTY; rows];
            let mut z = vec![0f32; rows * n];
            let id = format!("{terms}/{rows}x{k}x{n}");
            g.bench_function(BenchmarkId::new("fused", &id), |b| {
                // SAFETY: available() checked CPU, OS and permission; shapes match.
                b.iter(|| unsafe {
                    unmask::argmax_partials(&acts, &w, n, 0, Some(77), &mut parts);
                    parts[0].best_id
                })
            });
            g.bench_function(BenchmarkId::new("unfused", &id), |b| {
                b.iter(|| {
                    // SAFETY: as above; z holds rows × n.
                    unsafe { amx::matmul_amx_bf16_packed(&packed, &w, n, None, z.as_mut_ptr(), n) };
                    for (p, zr) in parts.iter_mut().zip(z.chunks_exact(n)) {
                        *p = ArgmaxPartial::of_isa(Isa::Avx512, zr, 0, Some(77));
                    }
                    parts[0].best_id
                })
            });
        }
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    use dvl_kernels::attention::{attention, AttnShape};
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    // (name, queries, keys, q heads, kv heads, head_dim, key range of query i)
    type Range = fn(usize) -> (usize, usize);
    let cases: [(&str, usize, usize, usize, usize, usize, Range); 5] = [
        // Vision tower: 1024 patches, 16 heads of 80, full attention and 64-patch windows.
        ("vision_full_1024", 1024, 1024, 16, 16, 80, |_| (0, 1024)),
        ("vision_window64_1024", 1024, 1024, 16, 16, 80, |i| {
            (i / 64 * 64, i / 64 * 64 + 64)
        }),
        // 3B text prefill: 288 prompt rows after a 736-row cache, block-causal (32), GQA 16/2.
        ("text_prefill_288", 288, 1024, 16, 2, 128, |i| {
            (0, ((736 + i) / 32 + 1) * 32)
        }),
        // 0.5B text prefill of a 1024-row prompt, block-causal (8), GQA 14/2.
        ("text_prefill_1024_05b", 1024, 1024, 14, 2, 64, |i| {
            (0, (i / 8 + 1) * 8)
        }),
        // One denoising step: an 8-row block over a 296-row cache.
        ("denoise_step_8", 8, 304, 16, 2, 128, |_| (0, 304)),
    ];
    for (name, n_q, n_k, nh, nkv, hd, keys) in cases {
        let q = data(n_q * nh * hd);
        let k = data(n_k * nkv * hd);
        let v: Vec<f32> = data(n_k * nkv * hd).iter().map(|x| x * 0.7).collect();
        let mut out = vec![0f32; n_q * nh * hd];
        let mut scores = vec![0f32; n_k];
        let shape = AttnShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            q_stride: nh * hd,
            kv_stride: nkv * hd,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        // Multiply-adds of Q·Kᵀ and P·V over the visible keys only.
        let visible: usize = (0..n_q).map(|i| keys(i).1 - keys(i).0).sum();
        g.throughput(Throughput::Elements((4 * visible * nh * hd) as u64));
        for &isa in dvl_kernels::cpu::supported_isas() {
            g.bench_with_input(BenchmarkId::new(isa_name(isa), name), &isa, |b, &isa| {
                b.iter(|| {
                    attention(
                        isa,
                        &q,
                        n_q,
                        &k,
                        &v,
                        &mut out,
                        shape,
                        scale,
                        keys,
                        &mut scores,
                    )
                })
            });
        }
        // bf16 inputs on AMX tiles (the engine's bf16 mode), packing K and V included.
        #[cfg(target_arch = "x86_64")]
        if dvl_kernels::attention::amx::supported(&shape) {
            use dvl_kernels::attention::amx::{attention_amx, pack_kv};
            g.bench_function(BenchmarkId::new("amx_bf16", name), |b| {
                b.iter(|| {
                    let kv = pack_kv(&k, &v, n_k, shape);
                    attention_amx(&q, n_q, &kv, &mut out, shape, scale, keys)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, skinny, large, unmask, attention);
criterion_main!(benches);
