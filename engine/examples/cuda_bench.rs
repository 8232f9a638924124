//! Kernel micro-benchmarks on a CUDA device; one JSON line per figure on stdout.
//!
//!   cargo run --release -p dvl --features cuda --example cuda_bench [-- --quick]
//!
//! Figures:
//!   device          name, SMs, compute capability, driver / NVRTC versions, peak DRAM GB/s
//!                   (memory clock × bus width)
//!   copy_bandwidth  device-to-device memcpy of 1 GiB, bytes read + written per second: the
//!                   practical HBM ceiling
//!   gemv_bandwidth  the denoising-step matmuls of the 3B model at m = 8 rows (q/o 2048×2048,
//!                   gate/up 11008×2048, down 2048×11008, lm_head 151936×2048) per kernel
//!                   variant: bytes = weights + activations + outputs, GB/s and % of the copy
//!                   and peak figures (target: >= 80% of peak)
//!   gemm_tflops     prefill / vision matmul shapes on the tensor-core GEMM
//!   attention_us    one denoising step's attention over a 4096-row cache (3B shapes)
//!   unmask_us       greedy unmasking of 8 × 151936 logits
//! Timing: CUDA events around batches of back-to-back launches (weights rotated across copies
//! totalling >= 4× L2 so no launch reads from cache), median of 7 batches, after a warm-up.
//! Inputs are random (never zeros).

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = run() {
        println!("{{\"figure\":\"error\",\"detail\":{:?}}}", e.to_string());
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
fn run() -> dvl::Result<()> {
    use dvl::cuda::kernels::bf16_bits;
    use dvl::cuda::{AttnMask, Gpu, MatmulAlgo};
    use dvl_kernels::attention::AttnShape;

    let quick = std::env::args().any(|a| a == "--quick");
    let g = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("{{\"figure\":\"skipped\",\"detail\":{:?}}}", e.to_string());
            return Ok(());
        }
    };
    let info = g.info().clone();
    println!(
        "{{\"figure\":\"device\",\"name\":{:?},\"sms\":{},\"cc\":\"{}.{}\",\"target\":{:?},\"memory_gib\":{:.1},\"l2_mib\":{:.1},\"driver\":{},\"nvrtc\":\"{}.{}\",\"peak_gbs\":{:.0}}}",
        info.name,
        info.multiprocessors,
        info.compute_capability.0,
        info.compute_capability.1,
        info.target,
        info.memory_bytes as f64 / (1u64 << 30) as f64,
        info.l2_bytes as f64 / (1u64 << 20) as f64,
        info.driver_version,
        info.nvrtc_version.0,
        info.nvrtc_version.1,
        info.peak_bandwidth_gbs
    );
    let batches = if quick { 3 } else { 7 };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    };

    // Copy bandwidth: the ceiling a streaming kernel can reach.
    let bytes = 1usize << 30;
    let src = g.upload(&rnd(bytes / 4, 1.0))?;
    let mut dst = g.zeros::<f32>(bytes / 4)?;
    let mut times = Vec::new();
    for b in 0..=batches {
        let ms = g.time_ms(|| {
            for _ in 0..5 {
                g.stream()
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(|e| dvl::Error::InvalidArgument(format!("{e:?}")))?;
            }
            Ok(())
        })?;
        if b > 0 {
            times.push(ms as f64 / 5.0);
        }
    }
    drop((src, dst));
    let copy_gbs = 2.0 * bytes as f64 / (median(times) * 1e-3) / 1e9;
    println!("{{\"figure\":\"copy_bandwidth\",\"bytes\":{bytes},\"gbs\":{copy_gbs:.0}}}");

    // GEMV: the 3B denoising step (8 rows).
    let m = 8usize;
    for &(label, n, k) in &[
        ("q_o_proj", 2048usize, 2048usize),
        ("gate_up_proj", 11008, 2048),
        ("down_proj", 2048, 11008),
        ("lm_head", 151_936, 2048),
    ] {
        let wbytes = n * k * 2;
        let copies = (4 * info.l2_bytes.max(1 << 20))
            .div_ceil(wbytes)
            .clamp(1, 64);
        let w0 = g.upload(&bf16_bits(&rnd(n * k, 0.05)))?;
        let mut ws = Vec::new();
        for _ in 1..copies {
            let mut c = g.zeros::<u16>(n * k)?;
            g.stream()
                .memcpy_dtod(&w0, &mut c)
                .map_err(|e| dvl::Error::InvalidArgument(format!("{e:?}")))?;
            ws.push(c);
        }
        let x = g.upload(&rnd(m * k, 1.0))?;
        let mut out = g.zeros::<f32>(m * n)?;
        let moved = (wbytes + m * k * 4 + m * n * 4) as f64;
        for algo in [
            MatmulAlgo::Gemv,
            MatmulAlgo::GemvRows(4),
            MatmulAlgo::GemvRows(2),
            MatmulAlgo::GemvTc,
        ] {
            let per_batch = copies.max(10);
            let mut times = Vec::new();
            for b in 0..=batches {
                let ms = g.time_ms(|| {
                    for i in 0..per_batch {
                        let w = if i % copies == 0 {
                            &w0
                        } else {
                            &ws[i % copies - 1]
                        };
                        g.matmul(&x, m, k, w, n, None, &mut out, false, algo)?;
                    }
                    Ok(())
                })?;
                if b > 0 {
                    times.push(ms as f64 / per_batch as f64);
                }
            }
            let ms = median(times);
            let gbs = moved / (ms * 1e-3) / 1e9;
            println!(
                "{{\"figure\":\"gemv_bandwidth\",\"shape\":\"{label}\",\"algo\":\"{algo:?}\",\"m\":{m},\"n\":{n},\"k\":{k},\"us\":{:.2},\"gbs\":{gbs:.0},\"pct_of_copy\":{:.1},\"pct_of_peak\":{:.1}}}",
                ms * 1e3,
                100.0 * gbs / copy_gbs,
                100.0 * gbs / info.peak_bandwidth_gbs.max(1.0)
            );
        }
    }

    // Tensor-core GEMM: prefill of a 1024-token prompt and a vision-tower MLP.
    for &(label, m, n, k) in &[
        ("prefill_q_o", 1024usize, 2048usize, 2048usize),
        ("prefill_gate_up", 1024, 11008, 2048),
        ("vision_mlp_up", 4096, 3420, 1280),
        ("square_4096", 4096, 4096, 4096),
    ] {
        let x = g.upload(&rnd(m * k, 1.0))?;
        let w = g.upload(&bf16_bits(&rnd(n * k, 0.05)))?;
        let mut out = g.zeros::<f32>(m * n)?;
        let mut times = Vec::new();
        for b in 0..=batches {
            let ms = g.time_ms(|| {
                for _ in 0..3 {
                    g.matmul(&x, m, k, &w, n, None, &mut out, false, MatmulAlgo::Gemm)?;
                }
                Ok(())
            })?;
            if b > 0 {
                times.push(ms as f64 / 3.0);
            }
        }
        let ms = median(times);
        let tflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
        println!(
            "{{\"figure\":\"gemm_tflops\",\"shape\":\"{label}\",\"m\":{m},\"n\":{n},\"k\":{k},\"us\":{:.1},\"tflops\":{tflops:.1}}}",
            ms * 1e3
        );
    }

    // Attention of one denoising step: 8 queries over 4088 committed rows + the block.
    let s = AttnShape {
        n_heads: 16,
        n_kv_heads: 2,
        head_dim: 128,
        q_stride: 2048,
        kv_stride: 256,
    };
    let (n_q, pos0) = (8usize, 4088usize);
    let n_keys = pos0 + n_q;
    let q = g.upload(&rnd(n_q * 2048, 1.0))?;
    let kf = rnd(n_keys * 256, 1.0);
    let vf = rnd(n_keys * 256, 1.0);
    let (k32, v32) = (g.upload(&kf)?, g.upload(&vf)?);
    let (k16, v16) = (g.upload(&bf16_bits(&kf))?, g.upload(&bf16_bits(&vf))?);
    let mut out = g.zeros::<f32>(n_q * 2048)?;
    let mut scratch = g.attn_scratch(64, n_q, 16, 128)?;
    for (cache, splits) in [("f32", 0usize), ("bf16", 0), ("bf16", 1)] {
        let mut times = Vec::new();
        for b in 0..=batches {
            let ms = g.time_ms(|| {
                for _ in 0..20 {
                    let mask = AttnMask::BlockCausal { pos0, block: 8 };
                    if cache == "f32" {
                        g.attention(
                            &q,
                            n_q,
                            &k32,
                            &v32,
                            n_keys,
                            s,
                            0.088,
                            mask,
                            &mut out,
                            splits,
                            Some(&mut scratch),
                        )?;
                    } else {
                        g.attention(
                            &q,
                            n_q,
                            &k16,
                            &v16,
                            n_keys,
                            s,
                            0.088,
                            mask,
                            &mut out,
                            splits,
                            Some(&mut scratch),
                        )?;
                    }
                }
                Ok(())
            })?;
            if b > 0 {
                times.push(ms as f64 / 20.0);
            }
        }
        println!(
            "{{\"figure\":\"attention_us\",\"cache\":\"{cache}\",\"n_q\":{n_q},\"n_keys\":{n_keys},\"splits\":\"{}\",\"us\":{:.2}}}",
            if splits == 0 { "auto".to_string() } else { splits.to_string() },
            median(times) * 1e3
        );
    }

    // Unmasking: 8 rows of the 3B vocabulary (includes the 64-byte download and its sync).
    let (rows, vocab) = (8usize, 151_936usize);
    let z = g.upload(&rnd(rows * vocab, 8.0))?;
    let mut us = g.unmask_scratch(rows, vocab)?;
    let mut times = Vec::new();
    for b in 0..=batches {
        let t = std::time::Instant::now();
        let r = g.unmask(&z, rows, vocab, vocab, Some(151_671), &mut us)?;
        if b > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        assert_eq!(r.len(), rows);
    }
    println!(
        "{{\"figure\":\"unmask_us\",\"rows\":{rows},\"vocab\":{vocab},\"us_with_sync\":{:.1}}}",
        median(times)
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cuda_bench needs the `cuda` feature: cargo run --release -p dvl --features cuda --example cuda_bench");
    std::process::exit(2);
}
