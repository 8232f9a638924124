//! Per-kernel throughput (`cargo bench -p dvl-kernels`): GB/s of weights streamed for the
//! skinny matmuls of a denoising step, GFLOP/s for the large-M matmuls of prefill and
//! vision, and the unmasking pass over a full vocabulary row. Single thread, every ISA the
//! CPU has.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dvl_kernels::bf16;
use dvl_kernels::matmul::{matmul, Isa};

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
    g.bench_function("argmax_confidence_151936", |b| {
        b.iter(|| dvl_kernels::softmax::argmax_confidence(&z, Some(151_671)))
    });
    g.finish();
}

criterion_group!(benches, skinny, large, unmask);
criterion_main!(benches);
