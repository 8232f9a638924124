//! The fused vocabulary projection + greedy unmasking of a denoising step
//! (`cargo bench -p dvl --bench lm_head`): `Backend::logits_argmax` over the 151,936-entry
//! vocabulary for the rows still masked, on the private pool (all cores), for the shipped
//! tiny model's k = 64 (where this pass is most of the decode) and the 0.5b's k = 896.
//! One entry per kernel set: the default f32 path on weights as stored, the same on weights
//! in 16-output panels (`f32_panels`: the default on AVX2 machines), f32 on AMX tiles for
//! every shape (three bf16 terms), and bf16 matmul inputs.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dvl::weights::WData;
use dvl::{Backend, CpuBackend};
use dvl_kernels::packed::PackedBf16;
use half::bf16;

fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn lm_head(c: &mut Criterion) {
    let vocab = 151_936;
    let mut sets = vec![("f32", CpuBackend::with_threads(0).unwrap())];
    if dvl_kernels::amx::available() {
        sets.push((
            "f32_tiles",
            CpuBackend::with_threads(0)
                .unwrap()
                .with_f32_amx_min_work(0),
        ));
    }
    sets.push(("bf16", CpuBackend::with_threads(0).unwrap().with_bf16(true)));
    let mut g = c.benchmark_group("logits_argmax");
    for &k in &[64usize, 896] {
        let w: Vec<bf16> = data(vocab * k, 7).into_iter().map(bf16::from_f32).collect();
        let panels = PackedBf16::new(&w, vocab, k);
        g.throughput(Throughput::Bytes((vocab * k * 2) as u64));
        for &rows in &[1usize, 4, 8] {
            let hn = data(rows * k, 3);
            for (name, be) in &sets {
                g.bench_function(BenchmarkId::new(*name, format!("{rows}x{k}")), |b| {
                    b.iter(|| be.logits_argmax(&hn, rows, k, WData::BF16(&w), vocab, None))
                });
            }
            let be = &sets[0].1;
            g.bench_function(BenchmarkId::new("f32_panels", format!("{rows}x{k}")), |b| {
                b.iter(|| be.logits_argmax(&hn, rows, k, WData::Packed(&panels), vocab, None))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, lm_head);
criterion_main!(benches);
