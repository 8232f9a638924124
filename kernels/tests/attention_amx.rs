//! AMX attention (bf16 inputs) against the f64 reference on the same bf16-rounded inputs,
//! on odd shapes, and its rows against other thread splits bit for bit. Skips (passing,
//! with a note) where AMX is not granted.
#![cfg(target_arch = "x86_64")]

use dvl_kernels::amx::to_bf16_bits;
use dvl_kernels::attention::amx::{attention_amx, pack_kv, supported};
use dvl_kernels::attention::AttnShape;
use dvl_kernels::reference;

mod common;
use common::rand_vec;

fn round_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16_bits(x) as u32) << 16)
}

fn rel_l2_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn shape(nh: usize, nkv: usize, hd: usize, pad: usize) -> AttnShape {
    AttnShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        q_stride: nh * hd + pad,
        kv_stride: nkv * hd + pad,
    }
}

fn amx_or_skip(s: &AttnShape) -> bool {
    if !supported(s) {
        eprintln!("AMX attention not available here: skipped");
        return false;
    }
    true
}

/// Rows of `x` (width `w`) followed by `pad` filler values each.
fn strided(x: &[f32], w: usize, pad: usize) -> Vec<f32> {
    x.chunks(w)
        .flat_map(|r| r.iter().copied().chain((0..pad).map(|p| 100.0 + p as f32)))
        .collect()
}

/// One case: the AMX result against the f64 reference on bf16-rounded q·scale, k and v.
/// The remaining difference is P's rounding to bf16 (relative 2⁻⁹ per probability) and f32
/// accumulation; a key off by one or a missing rescale moves rows by far more.
#[allow(clippy::too_many_arguments)]
fn check(
    name: &str,
    n_q: usize,
    n_k: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    pad: usize,
    amp: f32,
    keys: impl Fn(usize) -> (usize, usize),
) {
    let s = shape(nh, nkv, hd, pad);
    if !amx_or_skip(&s) {
        return;
    }
    let (qs, ks) = (nh * hd, nkv * hd);
    let seed = (n_q * 1000 + n_k * 10 + hd) as u64;
    let q: Vec<f32> = rand_vec(n_q * qs, seed).iter().map(|x| x * amp).collect();
    let k = rand_vec(n_k * ks, seed + 1);
    let v = rand_vec(n_k * ks, seed + 2);
    let scale = 1.0 / (hd as f32).sqrt();
    let qr: Vec<f32> = q.iter().map(|&x| round_bf16(x * scale)).collect();
    let kr: Vec<f32> = k.iter().map(|&x| round_bf16(x)).collect();
    let vr: Vec<f32> = v.iter().map(|&x| round_bf16(x)).collect();
    let mut want = vec![0f32; n_q * qs];
    let visible = |i: usize, j: usize| {
        let (lo, hi) = keys(i);
        lo <= j && j < hi
    };
    reference::attention(
        &qr, n_q, &kr, &vr, n_k, nh, nkv, hd, 1.0, visible, &mut want,
    );

    let (qp, kp, vp) = (
        strided(&q, qs, pad),
        strided(&k, ks, pad),
        strided(&v, ks, pad),
    );
    let packed = pack_kv(&kp, &vp, n_k, s);
    let mut got = vec![f32::NAN; n_q * (qs + pad)];
    attention_amx(&qp, n_q, &packed, &mut got, s, scale, &keys);
    assert!(
        got.chunks(qs + pad)
            .all(|r| r[qs..].iter().all(|x| x.is_nan())),
        "{name}: wrote past the heads of a row"
    );
    let heads: Vec<f32> = got
        .chunks(qs + pad)
        .flat_map(|r| r[..qs].iter().copied())
        .collect();
    let e = rel_l2_err(&heads, &want);
    assert!(e <= 3e-3, "{name}: relative L2 error {e}");
    // Per row too: a wrong mask on one short row hides in the whole's L2 norm.
    for (i, (a, b)) in heads.chunks(qs).zip(want.chunks(qs)).enumerate() {
        if keys(i).0 == keys(i).1 {
            assert!(
                a.iter().all(|&x| x == 0.0),
                "{name}: empty row {i} not zero"
            );
            continue;
        }
        let e = rel_l2_err(a, b);
        assert!(e <= 1e-2, "{name}: row {i} relative L2 error {e}");
    }
}

#[test]
fn amx_attention_full_ranges_with_odd_shapes() {
    for hd in [16usize, 20, 64, 72, 80, 128] {
        for (n_q, n_k) in [(1usize, 1usize), (3, 17), (17, 33), (40, 100)] {
            check("full", n_q, n_k, 3, 3, hd, 0, 1.0, |_| (0, n_k));
        }
    }
    check("offset", 33, 90, 2, 2, 20, 0, 1.0, |_| (17, 61));
    check("strided", 33, 47, 4, 2, 80, 5, 1.0, |_| (0, 47));
}

#[test]
fn amx_attention_segments_and_windows() {
    // Vision tower: segments of 64 patches (windows) and of a whole image, 16 heads of 80.
    let seg = |i: usize| (i / 64 * 64, (i / 64 * 64 + 64).min(200));
    check("windows", 200, 200, 4, 4, 80, 3, 2.0, seg);
    let odd = |i: usize| (i / 9 * 9, (i / 9 * 9 + 9).min(131));
    check("segments of 9", 131, 131, 4, 4, 16, 0, 2.0, odd);
}

#[test]
fn amx_attention_block_causal_gqa() {
    let keys = |i: usize| (0, (i / 8 + 1) * 8 + 40);
    check("causal g7", 45, 45 + 48, 14, 2, 64, 0, 1.0, |i| {
        let (lo, hi) = keys(i);
        (lo, hi.min(93))
    });
    check("causal g8", 37, 90, 16, 2, 128, 0, 1.0, |i| {
        (0, ((i / 8 + 1) * 8 + 50).min(90))
    });
    check("step", 8, 300, 16, 2, 128, 0, 1.0, |_| (0, 300));
    check("step1", 1, 300, 14, 2, 64, 0, 1.0, |_| (0, 300));
}

#[test]
fn amx_attention_long_ranges_rescale_across_chunks() {
    // Several 512-key chunks, ranges starting and ending mid-chunk, peaky rows (a late
    // maximum forces the running output to be rescaled).
    let n_k = 1300;
    check("long full", 33, n_k, 2, 1, 64, 0, 4.0, |_| (0, n_k));
    check("long ragged", 40, n_k, 2, 2, 80, 0, 4.0, |i| {
        ((i * 37) % 600, n_k - i * 3)
    });
}

#[test]
fn amx_attention_empty_ranges_give_zero_rows() {
    check("empty in tile", 33, 40, 2, 2, 20, 0, 1.0, |i| {
        if i % 3 == 0 {
            (5, 5)
        } else {
            (0, 40)
        }
    });
    check("all empty", 20, 40, 2, 2, 20, 0, 1.0, |_| (7, 7));
    check("no keys", 5, 0, 2, 2, 20, 0, 1.0, |_| (0, 0));
}

#[test]
fn amx_attention_rows_do_not_depend_on_the_split() {
    // As for the FMA tiles: the engine splits query rows across threads, so a row's bits
    // must not depend on which rows share its call (other tiles, another union of ranges).
    let n_k = 1300;
    let keys = |i: usize| {
        if i < 30 {
            (i / 9 * 9, i / 9 * 9 + 9)
        } else {
            ((i * 37) % 600, n_k - i * 3)
        }
    };
    for (nh, nkv, hd) in [(14usize, 2usize, 64usize), (3, 3, 80), (4, 2, 20)] {
        let s = shape(nh, nkv, hd, 0);
        if !amx_or_skip(&s) {
            return;
        }
        let n_q = 70;
        let q = rand_vec(n_q * nh * hd, 41);
        let k = rand_vec(n_k * nkv * hd, 42);
        let v = rand_vec(n_k * nkv * hd, 43);
        let packed = pack_kv(&k, &v, n_k, s);
        let run = |chunk: usize| {
            let qs = s.q_stride;
            let mut out = vec![f32::NAN; n_q * qs];
            for r0 in (0..n_q).step_by(chunk) {
                let rows = chunk.min(n_q - r0);
                attention_amx(
                    &q[r0 * qs..(r0 + rows) * qs],
                    rows,
                    &packed,
                    &mut out[r0 * qs..(r0 + rows) * qs],
                    s,
                    0.3,
                    |i| keys(r0 + i),
                );
            }
            out
        };
        let whole = run(n_q);
        assert!(whole.iter().all(|x| x.is_finite()));
        for chunk in [1usize, 2, 5, 13, 32, 33] {
            let split = run(chunk);
            for (i, (a, b)) in whole.chunks(nh * hd).zip(split.chunks(nh * hd)).enumerate() {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{nh}/{nkv} heads of {hd}, chunks of {chunk}: row {i} differs"
                );
            }
        }
    }
}

#[test]
fn amx_attention_rejects_ranges_past_the_packed_keys() {
    let s = shape(2, 2, 16, 0);
    if !amx_or_skip(&s) {
        return;
    }
    let k = rand_vec(10 * 32, 1);
    let packed = pack_kv(&k, &k, 10, s);
    let q = rand_vec(32, 2);
    let mut out = vec![0f32; 32];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        attention_amx(&q, 1, &packed, &mut out, s, 1.0, |_| (0, 11))
    }));
    assert!(r.is_err(), "a range past the packed keys was accepted");
}
