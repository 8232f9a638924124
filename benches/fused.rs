//! Projections of one input, fused or one call each (`cargo bench -p dvl --bench fused`):
//! `Backend::matmul_many` for an attention layer's q, k and v against three `matmul`s, and
//! `Backend::matmul_swiglu` for the MLP's gate, up and SiLU product against two `matmul`s
//! and `silu_mul`, on the 0.5B text shapes (8 and 288 rows) and the Qwen2.5-VL vision MLP
//! (1024 rows), private pool of two threads, f32 (default) and bf16 kernels.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dvl::backend::Projection;
use dvl::weights::WData;
use dvl::{Backend, CpuBackend};
use half::bf16;

fn weights(rows: usize, k: usize, seed: usize) -> Vec<bf16> {
    (0..rows * k)
        .map(|i| bf16::from_f32((((i + seed) * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5))
        .collect()
}

fn fused(c: &mut Criterion) {
    let sets = [
        ("f32", CpuBackend::with_threads(2).unwrap()),
        ("bf16", CpuBackend::with_threads(2).unwrap().with_bf16(true)),
    ];
    let mut g = c.benchmark_group("fused");
    g.sample_size(10);
    // (name, rows, k, q rows, k/v rows, MLP rows)
    let shapes = [
        ("0.5b", 8usize, 896usize, 896usize, 128usize, 4864usize),
        ("0.5b", 288, 896, 896, 128, 4864),
        ("vision", 1024, 1280, 0, 0, 3420),
    ];
    for (name, m, k, nq, nkv, ni) in shapes {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let (wq, wk, wv) = (weights(nq, k, 1), weights(nkv, k, 2), weights(nkv, k, 3));
        let (wg, wu) = (weights(ni, k, 4), weights(ni, k, 5));
        let (bq, bkv) = (vec![0.1f32; nq], vec![0.1f32; nkv]);
        let (mut q, mut kk, mut v) = (vec![0f32; m * nq], vec![0f32; m * nkv], vec![0f32; m * nkv]);
        let (mut gate, mut up) = (vec![0f32; m * ni], vec![0f32; m * ni]);
        for (set, be) in &sets {
            let id = format!("{set}/{name}/{m}");
            if nq > 0 {
                g.bench_function(BenchmarkId::new("qkv_separate", &id), |b| {
                    b.iter(|| {
                        be.matmul(&x, m, k, WData::BF16(&wq), nq, Some(&bq), &mut q);
                        be.matmul(&x, m, k, WData::BF16(&wk), nkv, Some(&bkv), &mut kk);
                        be.matmul(&x, m, k, WData::BF16(&wv), nkv, Some(&bkv), &mut v);
                    })
                });
                g.bench_function(BenchmarkId::new("qkv_many", &id), |b| {
                    b.iter(|| {
                        be.matmul_many(
                            &x,
                            m,
                            k,
                            &mut [
                                Projection {
                                    w: WData::BF16(&wq),
                                    n: nq,
                                    bias: Some(&bq),
                                    out: &mut q,
                                },
                                Projection {
                                    w: WData::BF16(&wk),
                                    n: nkv,
                                    bias: Some(&bkv),
                                    out: &mut kk,
                                },
                                Projection {
                                    w: WData::BF16(&wv),
                                    n: nkv,
                                    bias: Some(&bkv),
                                    out: &mut v,
                                },
                            ],
                        )
                    })
                });
            }
            g.bench_function(BenchmarkId::new("swiglu_separate", &id), |b| {
                b.iter(|| {
                    be.matmul(&x, m, k, WData::BF16(&wg), ni, None, &mut gate);
                    be.matmul(&x, m, k, WData::BF16(&wu), ni, None, &mut up);
                    be.silu_mul(&mut gate, &up);
                })
            });
            g.bench_function(BenchmarkId::new("swiglu_fused", &id), |b| {
                b.iter(|| {
                    be.matmul_swiglu(
                        &x,
                        m,
                        k,
                        (WData::BF16(&wg), None),
                        (WData::BF16(&wu), None),
                        ni,
                        &mut gate,
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, fused);
criterion_main!(benches);
