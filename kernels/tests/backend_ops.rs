//! Every fast kernel against its reference on odd shapes (ggml test-backend-ops style):
//! sizes that are not multiples of the SIMD width, single rows, empty operands, and every
//! instruction set this CPU supports.

use dvl_kernels::attention::{attention, AttnShape};
use dvl_kernels::matmul::{matmul, matmul_bf16_paired, matmul_many_rows, Isa, PairedRows};
use dvl_kernels::{bf16, f16, reference, WeightElem};

mod common;
use common::rand_vec;

fn isas() -> Vec<Isa> {
    dvl_kernels::cpu::supported_isas().to_vec()
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

fn check_matmul<W: WeightElem>(conv: impl Fn(f32) -> W, name: &str) {
    let shapes = [
        (1, 1, 1),
        (1, 7, 3),
        (3, 13, 9),
        (5, 31, 17),
        (8, 64, 40),
        (9, 100, 33),
        (33, 17, 65),
        (64, 129, 7),
        // Row chunks past the L2-sized chunk, k tails of every parity, model-like widths.
        (300, 64, 48),
        (41, 160, 70),
        (19, 1176, 33),
        (16, 95, 151),
        (0, 8, 8),
        (4, 0, 5),
    ];
    for &(m, k, n) in &shapes {
        let x = rand_vec(m * k, 1 + m as u64);
        let w: Vec<W> = rand_vec(n * k, 7 + k as u64)
            .into_iter()
            .map(&conv)
            .collect();
        let bias = rand_vec(n, 3);
        let mut want = vec![0f32; m * n];
        reference::matmul(&x, m, k, &w, n, Some(&bias), &mut want);
        for isa in isas() {
            let mut got = vec![f32::NAN; m * n];
            matmul(isa, &x, m, k, &w, n, Some(&bias), &mut got, n);
            let e = max_rel_err(&got, &want);
            assert!(
                e < 1e-5,
                "{name} {isa:?} m={m} k={k} n={n}: max rel err {e}"
            );
        }
    }
}

#[test]
fn matmul_matches_reference_for_every_weight_type_and_isa() {
    check_matmul(|v| v, "f32");
    check_matmul(bf16::from_f32, "bf16");
    check_matmul(f16::from_f32, "f16");
}

#[test]
fn many_row_matmul_matches_reference_for_every_weight_type_and_isa() {
    // The packed GEMM's blocks: 6-row tiles, 16-output panels, 256-k blocks (sums carried
    // through `out`), 96-row blocks, 1024-output packs; every edge of each, and ldo > n.
    let shapes = [
        (1, 1, 1),
        (5, 7, 3),
        (6, 16, 16),
        (7, 9, 17),
        (13, 33, 31),
        (32, 256, 16),
        (33, 257, 40),
        (97, 100, 33),
        (101, 513, 50),
        (40, 64, 1030),
        (12, 0, 9),
        (0, 8, 8),
        (4, 5, 0),
    ];
    fn check<W: WeightElem>(conv: impl Fn(f32) -> W, name: &str, shapes: &[(usize, usize, usize)]) {
        for &(m, k, n) in shapes {
            let x = rand_vec(m * k, 21 + m as u64);
            let w: Vec<W> = rand_vec(n * k, 8 + k as u64)
                .into_iter()
                .map(&conv)
                .collect();
            let bias = rand_vec(n, 4);
            let mut want = vec![0f32; m * n];
            reference::matmul(&x, m, k, &w, n, Some(&bias), &mut want);
            // f32 summation bound: k + 1 roundings of at most 2^-24 of Σ|terms| each.
            let bound = |i: usize, j: usize| {
                let terms: f64 = (0..k)
                    .map(|t| (x[i * k + t] as f64 * w[j * k + t].to_f32() as f64).abs())
                    .sum();
                (k as f64 + 2.0) * 2f64.powi(-24) * (terms + bias[j].abs() as f64)
            };
            let ldo = n + 3;
            for isa in isas() {
                let mut got = vec![f32::NAN; m * ldo];
                matmul_many_rows(isa, &x, m, k, &w, n, Some(&bias), &mut got, ldo);
                for i in 0..m {
                    for j in 0..n {
                        let (g, r) = (got[i * ldo + j], want[i * n + j]);
                        assert!(
                            ((g - r) as f64).abs() <= bound(i, j),
                            "{name} {isa:?} m={m} k={k} n={n} [{i}, {j}]: {g} vs {r}"
                        );
                    }
                    assert!(
                        got[i * ldo + n..(i + 1) * ldo].iter().all(|v| v.is_nan()),
                        "{name} {isa:?} m={m} k={k} n={n}: wrote past n in row {i}"
                    );
                }
            }
        }
    }
    check(|v| v, "f32", &shapes);
    check(bf16::from_f32, "bf16", &shapes);
    check(f16::from_f32, "f16", &shapes);
}

#[test]
fn many_row_matmul_rows_do_not_depend_on_the_call() {
    // A row's bits are the same whatever other rows share the call, and whatever column
    // range a piece computes (the engine splits outputs across threads).
    let (m, k, n) = (50, 300, 70);
    let x = rand_vec(m * k, 31);
    let w: Vec<bf16> = rand_vec(n * k, 32)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let bias = rand_vec(n, 33);
    for isa in isas() {
        let mut all = vec![0f32; m * n];
        matmul_many_rows(isa, &x, m, k, &w, n, Some(&bias), &mut all, n);
        for (r0, r1) in [(0, 1), (7, 8), (13, 50), (44, 49)] {
            let rows = r1 - r0;
            let mut part = vec![0f32; rows * n];
            matmul_many_rows(
                isa,
                &x[r0 * k..r1 * k],
                rows,
                k,
                &w,
                n,
                Some(&bias),
                &mut part,
                n,
            );
            assert_eq!(&all[r0 * n..r1 * n], &part[..], "{isa:?} rows {r0}..{r1}");
        }
        for (n0, n1) in [(0, 16), (16, 70), (5, 21), (64, 70)] {
            let mut part = vec![0f32; m * (n1 - n0)];
            let b = &bias[n0..n1];
            let ws = &w[n0 * k..n1 * k];
            matmul_many_rows(isa, &x, m, k, ws, n1 - n0, Some(b), &mut part, n1 - n0);
            for i in 0..m {
                assert_eq!(
                    &all[i * n + n0..i * n + n1],
                    &part[i * (n1 - n0)..(i + 1) * (n1 - n0)],
                    "{isa:?} columns {n0}..{n1}, row {i}"
                );
            }
        }
    }
}

#[test]
fn prepared_rows_give_the_same_bits_as_matmul() {
    // Rows prepared once and shared by the pieces of a split (column ranges) give each
    // piece exactly what `matmul` gives it.
    for &(m, k, n) in &[
        (1, 1, 1),
        (8, 896, 40),
        (3, 33, 17),
        (16, 100, 70),
        (5, 0, 4),
    ] {
        let x = rand_vec(m * k, 41 + k as u64);
        let w: Vec<bf16> = rand_vec(n * k, 42)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let bias = rand_vec(n, 43);
        for isa in isas() {
            let Some(rows) = PairedRows::new(isa, &x, m, k) else {
                assert_eq!(isa, Isa::Portable, "{isa:?} prepares rows");
                continue;
            };
            assert_eq!((rows.rows(), rows.k()), (m, k));
            for (n0, n1) in [(0, n), (0, n / 2), (n / 2, n)] {
                let (ws, b) = (&w[n0 * k..n1 * k], &bias[n0..n1]);
                let mut want = vec![0f32; m * (n1 - n0)];
                let mut got = vec![f32::NAN; m * (n1 - n0)];
                matmul(isa, &x, m, k, ws, n1 - n0, Some(b), &mut want, n1 - n0);
                matmul_bf16_paired(&rows, ws, n1 - n0, Some(b), &mut got, n1 - n0);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{isa:?} m={m} k={k} n={n} {n0}..{n1}"
                );
            }
        }
    }
}

#[test]
fn matmul_writes_with_leading_dimension() {
    let (m, k, n, ldo) = (3, 10, 4, 7);
    let x = rand_vec(m * k, 5);
    let w = rand_vec(n * k, 6);
    let mut out = vec![-9f32; m * ldo];
    matmul(Isa::Portable, &x, m, k, &w, n, None, &mut out, ldo);
    let mut want = vec![0f32; m * n];
    reference::matmul(&x, m, k, &w, n, None, &mut want);
    for i in 0..m {
        assert!(max_rel_err(&out[i * ldo..i * ldo + n], &want[i * n..(i + 1) * n]) < 1e-5);
        assert!(
            out[i * ldo + n..(i + 1) * ldo].iter().all(|&v| v == -9.0),
            "columns past n untouched"
        );
    }
}

#[test]
fn matmul_is_identical_across_isas_row_counts() {
    // A row's result must not depend on how many rows are computed together (this is what
    // makes fused commit passes and thread splits bit-identical), nor on where its columns
    // start: k <= 256 with 8 or more outputs takes 8-output blocks whose tile shape
    // (4x2, 3x2, 2x4, 1x8) follows the row count, ending in one vector of sums; narrower
    // calls and k > 256 take 2-output tiles with one sum per output.
    for (k, n) in [(77, 5), (64, 21), (250, 16), (257, 19), (31, 8)] {
        let x = rand_vec(9 * k, 11 + k as u64);
        let w: Vec<bf16> = rand_vec(n * k, 12)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let bias = rand_vec(n, 13);
        for isa in isas() {
            let mut all = vec![0f32; 9 * n];
            matmul(isa, &x, 9, k, &w, n, Some(&bias), &mut all, n);
            for rows in [1, 2, 3] {
                for r in 0..=9 - rows {
                    // These rows alone, all columns and the columns from 1 and from 3 on.
                    for n0 in [0, 1, 3] {
                        let cols = n - n0;
                        let mut some = vec![0f32; rows * cols];
                        let xs = &x[r * k..(r + rows) * k];
                        let (ws, b) = (&w[n0 * k..], &bias[n0..]);
                        matmul(isa, xs, rows, k, ws, cols, Some(b), &mut some, cols);
                        for i in 0..rows {
                            assert_eq!(
                                &all[(r + i) * n + n0..(r + i + 1) * n],
                                &some[i * cols..(i + 1) * cols],
                                "{isa:?} k={k} n={n}: row {} of {rows} from row {r}, columns {n0}..",
                                r + i
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn attention_matches_masked_reference() {
    // GQA 6 q-heads over 2 kv-heads, head_dim 10, block-causal with block 4 over a cache.
    let (nh, nkv, hd, cache, t, block) = (6, 2, 10, 8, 7, 4);
    let n_k = cache + t;
    let q = rand_vec(t * nh * hd, 21);
    let k = rand_vec(n_k * nkv * hd, 22);
    let v = rand_vec(n_k * nkv * hd, 23);
    let shape = AttnShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        q_stride: nh * hd,
        kv_stride: nkv * hd,
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let mut want = vec![0f32; t * nh * hd];
    let visible = |i: usize, j: usize| j / block <= (cache + i) / block;
    reference::attention(&q, t, &k, &v, n_k, nh, nkv, hd, scale, visible, &mut want);
    for isa in isas() {
        let mut got = vec![0f32; t * nh * hd];
        let mut scratch = vec![0f32; n_k];
        let keys = |i: usize| (0, n_k.min(((cache + i) / block + 1) * block));
        attention(
            isa,
            &q,
            t,
            &k,
            &v,
            &mut got,
            shape,
            scale,
            keys,
            &mut scratch,
        );
        assert!(max_rel_err(&got, &want) < 1e-5, "{isa:?}");
    }
}

#[test]
fn attention_segments_match_reference() {
    let (nh, hd, s) = (3, 8, 11);
    let q = rand_vec(s * nh * hd, 31);
    let k = rand_vec(s * nh * hd, 32);
    let v = rand_vec(s * nh * hd, 33);
    let seg = |i: usize| if i < 4 { (0, 4) } else { (4, 11) };
    let shape = AttnShape {
        n_heads: nh,
        n_kv_heads: nh,
        head_dim: hd,
        q_stride: nh * hd,
        kv_stride: nh * hd,
    };
    let mut want = vec![0f32; s * nh * hd];
    reference::attention(
        &q,
        s,
        &k,
        &v,
        s,
        nh,
        nh,
        hd,
        0.3,
        |i, j| seg(i) == seg(j),
        &mut want,
    );
    for isa in isas() {
        let mut got = vec![0f32; s * nh * hd];
        let mut scratch = vec![0f32; s];
        attention(isa, &q, s, &k, &v, &mut got, shape, 0.3, seg, &mut scratch);
        assert!(max_rel_err(&got, &want) < 1e-5, "{isa:?}");
    }
}

fn rel_l2_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// One attention case against the reference on every ISA. `pad` adds unused floats to each
/// q/out and k/v row (the engine's strided views); `amp` scales q (peaky softmax rows).
#[allow(clippy::too_many_arguments)]
fn check_attention(
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
    let (qs, ks) = (nh * hd, nkv * hd);
    let seed = (n_q * 1000 + n_k * 10 + hd) as u64;
    let q: Vec<f32> = rand_vec(n_q * qs, seed).iter().map(|x| x * amp).collect();
    let k = rand_vec(n_k * ks, seed + 1);
    let v = rand_vec(n_k * ks, seed + 2);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut want = vec![0f32; n_q * qs];
    let visible = |i: usize, j: usize| {
        let (lo, hi) = keys(i);
        lo <= j && j < hi
    };
    reference::attention(&q, n_q, &k, &v, n_k, nh, nkv, hd, scale, visible, &mut want);
    // Strided copies: row r of q at r·(qs + pad), of k/v at r·(ks + pad).
    let strided = |x: &[f32], w: usize| -> Vec<f32> {
        x.chunks(w)
            .flat_map(|r| r.iter().copied().chain((0..pad).map(|p| 100.0 + p as f32)))
            .collect()
    };
    let (qp, kp, vp) = (strided(&q, qs), strided(&k, ks), strided(&v, ks));
    let shape = AttnShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        q_stride: qs + pad,
        kv_stride: ks + pad,
    };
    let max_keys = (0..n_q).map(|i| keys(i).1 - keys(i).0).max().unwrap_or(0);
    for isa in isas() {
        let mut got = vec![f32::NAN; n_q * (qs + pad)];
        let mut scratch = vec![0f32; max_keys];
        let run = |got: &mut [f32], scratch: &mut [f32]| {
            attention(isa, &qp, n_q, &kp, &vp, got, shape, scale, &keys, scratch)
        };
        run(&mut got, &mut scratch);
        let heads: Vec<f32> = got
            .chunks(qs + pad)
            .flat_map(|r| r[..qs].iter().copied())
            .collect();
        assert!(
            got.chunks(qs + pad)
                .all(|r| r[qs..].iter().all(|x| x.is_nan())),
            "{name} {isa:?}: wrote past the heads of a row"
        );
        let e = rel_l2_err(&heads, &want);
        assert!(e <= 1e-5, "{name} {isa:?}: relative L2 error {e}");
        // Rows without visible keys are exactly zero (a softmax over nothing).
        for i in (0..n_q).filter(|&i| keys(i).0 == keys(i).1) {
            assert!(
                heads[i * qs..(i + 1) * qs].iter().all(|&x| x == 0.0),
                "{name} {isa:?}: empty row {i} not zero"
            );
        }
        // Deterministic: the same call gives the same bits.
        let mut again = vec![f32::NAN; n_q * (qs + pad)];
        run(&mut again, &mut scratch);
        assert!(
            got.iter()
                .zip(&again)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name} {isa:?}: not deterministic"
        );
    }
}

#[test]
fn attention_full_ranges_with_odd_shapes() {
    // Query counts around the 32-pair tile and head dims that are not vector multiples.
    for n_q in [1usize, 2, 7, 33, 70] {
        for (hd, n_k) in [(20usize, 50usize), (80, 37), (13, 9), (128, 100)] {
            check_attention("full", n_q, n_k, 3, 3, hd, 0, 1.0, |_| (0, n_k));
        }
    }
    // Keys past the visible ones exist but are not seen.
    check_attention("offset", 33, 90, 2, 2, 20, 0, 1.0, |_| (17, 61));
    // Strided rows (the engine's views into a fused qkv buffer).
    check_attention("strided", 33, 47, 4, 2, 20, 5, 1.0, |_| (0, 47));
}

#[test]
fn attention_segments_that_split_query_tiles() {
    // Vision windows of uneven size: tiles of 32 queries straddle segment boundaries,
    // including a one-key segment.
    let bounds = [0usize, 13, 40, 41, 70, 100, 131];
    let seg = move |i: usize| {
        let s = bounds.iter().rposition(|&b| b <= i).unwrap();
        (bounds[s], bounds[s + 1])
    };
    for hd in [20usize, 80] {
        check_attention("segments", 131, 131, 4, 4, hd, 0, 2.0, seg);
    }
    // 64-key windows as in the vision tower, odd query count.
    check_attention("windows", 70, 70, 2, 2, 80, 0, 1.0, |i| {
        (i / 64 * 64, (i / 64 * 64 + 64).min(70))
    });
}

#[test]
fn attention_block_causal_gqa() {
    // Text prefill: 70 new rows after a 37-row cache, block 8, GQA groups of 3 and 8.
    let (cache, t, block) = (37usize, 70usize, 8usize);
    let n_k = cache + t;
    let keys = |i: usize| (0, n_k.min(((cache + i) / block + 1) * block));
    check_attention("causal g3", t, n_k, 6, 2, 20, 0, 1.0, keys);
    check_attention("causal g8", t, n_k, 16, 2, 24, 0, 1.0, keys);
    // Denoise step: 8 rows over a cache, one kv head shared by 8 q heads; and 1 row.
    check_attention("step", 8, 300, 16, 2, 128, 0, 1.0, |_| (0, 300));
    check_attention("step1", 1, 300, 16, 2, 128, 0, 1.0, |_| (0, 300));
}

#[test]
fn attention_long_ranges_use_online_softmax() {
    // Ranges over 512 keys are processed in chunks with rescaling; peaky rows (amp) make a
    // wrong rescale visible. Rows start and end in different chunks, so some rows see
    // nothing in a whole chunk, and one sees only the last chunk.
    let n_k = 1300;
    check_attention("long full", 33, n_k, 2, 1, 20, 0, 4.0, |_| (0, n_k));
    check_attention("long ragged", 40, n_k, 2, 2, 80, 0, 4.0, |i| {
        if i == 39 {
            (1100, 1300)
        } else {
            ((i * 37) % 600, n_k - i * 3)
        }
    });
}

#[test]
fn attention_empty_ranges_give_zero_rows() {
    // An empty range (lo == hi) gives a zero row, alone or inside a tile of non-empty rows.
    check_attention("empty in tile", 33, 40, 2, 2, 20, 0, 1.0, |i| {
        if i % 5 == 2 {
            (i, i)
        } else {
            (0, 40)
        }
    });
    // A whole tile of empty rows in a call that also has long ranges.
    check_attention("empty tile", 70, 40, 2, 2, 20, 0, 1.0, |i| {
        if i < 35 {
            (3, 3)
        } else {
            (0, 40)
        }
    });
    check_attention("all empty", 33, 40, 2, 2, 20, 0, 1.0, |_| (7, 7));
    check_attention("no keys", 5, 0, 2, 2, 20, 0, 1.0, |_| (0, 0));
}

/// Attention over `n_q` rows computed in sub-calls of `chunk` rows (the engine's thread
/// split), each sub-call seeing only its own rows.
#[allow(clippy::too_many_arguments)]
fn attention_in_chunks(
    isa: Isa,
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
    keys: &dyn Fn(usize) -> (usize, usize),
    chunk: usize,
) -> Vec<f32> {
    let qs = shape.q_stride;
    let mut out = vec![f32::NAN; n_q * qs];
    let mut scratch = vec![0f32; k.len() / shape.kv_stride];
    for r0 in (0..n_q).step_by(chunk) {
        let rows = chunk.min(n_q - r0);
        attention(
            isa,
            &q[r0 * qs..(r0 + rows) * qs],
            rows,
            k,
            v,
            &mut out[r0 * qs..(r0 + rows) * qs],
            shape,
            0.3,
            |i| keys(r0 + i),
            &mut scratch,
        );
    }
    out
}

#[test]
fn attention_rows_do_not_depend_on_the_split() {
    // The engine splits query rows across threads. On the tiled path a row's result must be
    // bit-identical whatever rows share its call: other tiles, another union of ranges, other
    // chunk boundaries. Short segments and long ragged ranges (several online-softmax
    // chunks, starting at different keys), GQA groups of 2 and plain heads.
    let n_k = 1300;
    let keys = |i: usize| {
        if i < 30 {
            (i / 9 * 9, i / 9 * 9 + 9)
        } else {
            ((i * 37) % 600, n_k - i * 3)
        }
    };
    for (nh, nkv) in [(4usize, 2usize), (3, 3)] {
        let (n_q, hd) = (70, 20);
        let q = rand_vec(n_q * nh * hd, 41);
        let k = rand_vec(n_k * nkv * hd, 42);
        let v = rand_vec(n_k * nkv * hd, 43);
        let shape = AttnShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            q_stride: nh * hd,
            kv_stride: nkv * hd,
        };
        for isa in isas() {
            let whole = attention_in_chunks(isa, &q, n_q, &k, &v, shape, &keys, n_q);
            for chunk in [1usize, 2, 5, 13, 32, 33] {
                // AVX2 and portable code send calls of fewer than 2 / 4 (query, head) pairs
                // per kv head down the per-query path, which rounds differently.
                let min_pairs = match isa {
                    Isa::Avx512 => 1,
                    Isa::Avx2 => 2,
                    Isa::Portable => 4,
                };
                let smallest = chunk.min(match n_q % chunk {
                    0 => chunk,
                    r => r,
                });
                if smallest * (nh / nkv) < min_pairs {
                    continue;
                }
                let split = attention_in_chunks(isa, &q, n_q, &k, &v, shape, &keys, chunk);
                for (i, (a, b)) in whole.chunks(nh * hd).zip(split.chunks(nh * hd)).enumerate() {
                    assert!(
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{isa:?} {nh}/{nkv} heads, chunks of {chunk}: row {i} differs"
                    );
                }
            }
        }
    }
}

#[test]
fn rms_norm_and_rope_against_closed_forms() {
    let x = [3.0f32, -4.0];
    let mut out = [0f32; 2];
    dvl_kernels::norm::rms_norm(&x, &[1.0f32, 2.0], 0.0, &mut out);
    // rms = sqrt((9 + 16) / 2)
    let r = (12.5f32).sqrt();
    assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] + 8.0 / r).abs() < 1e-6);
    // RoPE by 90 degrees: [a, b] -> [-b, a].
    let mut v = [1.0f32, 2.0, 3.0, 4.0];
    dvl_kernels::rope::rope_rotate_half(&mut v, &[0.0; 4], &[1.0; 4]);
    assert_eq!(v, [-3.0, -4.0, 1.0, 2.0]);
    // Zero angle is the identity.
    let mut v2 = [1.0f32, 2.0, 3.0, 4.0];
    dvl_kernels::rope::rope_rotate_half(&mut v2, &[1.0; 4], &[0.0; 4]);
    assert_eq!(v2, [1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn argmax_confidence_is_exact_on_a_long_row() {
    // Two dominant logits and 150k small ones: chunked sums keep the confidence within
    // rounding (a sequential f32 sum drifts by up to 1e-2 relative; README §6).
    let n = 151_936;
    let mut z = vec![0f32; n];
    z[5] = 12.0;
    z[9] = 12.0;
    let (i, c) = dvl_kernels::softmax::argmax_confidence(&z, None);
    assert_eq!(i, 5, "lowest index wins ties");
    let want = (12f64.exp() / (2.0 * 12f64.exp() + (n - 2) as f64)) as f32;
    assert!(((c - want) / want).abs() < 2e-6, "{c} vs {want}");
    let (i, _) = dvl_kernels::softmax::argmax_confidence(&z, Some(5));
    assert_eq!(i, 9);
}

#[test]
fn activations_match_closed_forms() {
    let mut g = [1.0f32, -2.0];
    dvl_kernels::elementwise::silu_mul(&mut g, &[2.0, 3.0]);
    assert!((g[0] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
    assert!((g[1] - 3.0 * -2.0 / (1.0 + 2f32.exp())).abs() < 1e-6);
    let mut e = [1.0f32];
    dvl_kernels::elementwise::gelu_erf(&mut e);
    assert!((e[0] - 0.841_344_7).abs() < 1e-6);
    let mut t = [1.0f32];
    dvl_kernels::elementwise::gelu_tanh(&mut t);
    assert!((t[0] - 0.841_192).abs() < 1e-5);
}

#[test]
fn unmasking_matches_f64_reference_on_every_isa() {
    use dvl_kernels::softmax::ArgmaxPartial;
    // Odd lengths (vector tails), wide logit ranges (exp underflow below −87), the excluded
    // id in and out of the slice, a slice offset.
    for (len, spread, seed) in [
        (2usize, 1.0f32, 1u64),
        (17, 5.0, 2),
        (1000, 30.0, 3),
        (151_936, 12.0, 4),
        (4099, 200.0, 5),
    ] {
        let z: Vec<f32> = rand_vec(len, seed).iter().map(|v| v * spread).collect();
        for never in [None, Some(100 + len / 2), Some(100)] {
            let (zmax, mut best, mut best_v) =
                (z.iter().cloned().fold(f32::MIN, f32::max), 0, f32::MIN);
            for (i, &v) in z.iter().enumerate() {
                if Some(i + 100) != never && v > best_v {
                    (best, best_v) = (i, v);
                }
            }
            let denom: f64 = z.iter().map(|&v| ((v - zmax) as f64).exp()).sum();
            let want = (((best_v - zmax) as f64).exp() / denom) as f32;
            for isa in isas() {
                let (t, p) = ArgmaxPartial::of_isa(isa, &z, 100, never).finish();
                assert_eq!(t, best + 100, "{isa:?} len {len} never {never:?}");
                assert!(
                    ((p - want) / want).abs() < 2e-6,
                    "{isa:?} len {len}: {p} vs {want}"
                );
            }
        }
    }
}

#[test]
fn split_unmasking_equals_one_pass() {
    use dvl_kernels::softmax::ArgmaxPartial;
    let z: Vec<f32> = rand_vec(10_007, 77).iter().map(|v| v * 9.0).collect();
    for never in [None, Some(3), Some(10_006)] {
        let whole = dvl_kernels::softmax::argmax_confidence(&z, never);
        for chunk in [1usize, 100, 4096, 10_007] {
            let mut acc = ArgmaxPartial::EMPTY;
            for (i, c) in z.chunks(chunk).enumerate() {
                acc = acc.merge(ArgmaxPartial::of(c, i * chunk, never));
            }
            let (t, p) = acc.finish();
            assert_eq!(t, whole.0, "chunk {chunk}");
            assert!(
                ((p - whole.1) / whole.1).abs() < 1e-5,
                "chunk {chunk}: {p} vs {}",
                whole.1
            );
        }
    }
    // The excluded id is never chosen even when it is the maximum.
    let mut z2 = vec![0f32; 50];
    z2[7] = 5.0;
    z2[8] = 4.0;
    assert_eq!(dvl_kernels::softmax::argmax_confidence(&z2, Some(7)).0, 8);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn amx_f32x3_is_as_accurate_as_f32_kernels() {
    // f32 activations split into three bf16 terms on the tiles: every output within f32
    // accumulation error of the float64 reference, like the AVX-512 FMA kernel it stands in
    // for, and rows independent of how many are computed together.
    if !dvl_kernels::amx::available() {
        eprintln!("AMX not available here: skipped");
        return;
    }
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 31, 17),
        (8, 896, 130),
        // Denoising-step shapes on the direct path: k ≤ 64 keeps the B tiles loaded (one
        // and two row blocks of 3m packed rows), longer k reloads them each step.
        (5, 64, 49),
        (8, 64, 50),
        (7, 33, 47),
        (4, 100, 70),
        (9, 200, 40),
        (17, 40, 33),
        (40, 1176, 45),
        (70, 3420, 19),
        (100, 4100, 20),
        // 300 packed rows in two passes of 160: the mid terms straddle the boundary.
        (100, 2040, 20),
    ] {
        let x: Vec<f32> = rand_vec(m * k, 11 + k as u64)
            .iter()
            .enumerate()
            // Magnitudes over many octaves, so the lower terms matter.
            .map(|(i, v)| v * (1.0 + (i % 13) as f32 * 37.0))
            .collect();
        let w: Vec<bf16> = rand_vec(n * k, 12 + n as u64)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let bias = rand_vec(n, 13);
        let mut want = vec![0f32; m * n];
        reference::matmul(&x, m, k, &w, n, Some(&bias), &mut want);
        let mut got = vec![f32::NAN; m * n];
        unsafe { dvl_kernels::amx::matmul_amx_f32x3(&x, m, k, &w, n, Some(&bias), &mut got, n) };
        let mut fma = vec![0f32; m * n];
        matmul(Isa::Avx512, &x, m, k, &w, n, Some(&bias), &mut fma, n);
        for i in 0..m {
            for j in 0..n {
                // f32 accumulation error bound: a few ulps of Σ|x·w| per term added.
                let mag: f64 = (0..k)
                    .map(|t| (x[i * k + t] as f64 * w[j * k + t].to_f64()).abs())
                    .sum::<f64>()
                    + bias[j].abs() as f64;
                let bound = mag * (k as f64).sqrt().max(4.0) * 1.2e-7;
                let e = (got[i * n + j] as f64 - want[i * n + j] as f64).abs();
                let e_fma = (fma[i * n + j] as f64 - want[i * n + j] as f64).abs();
                assert!(e <= bound, "m={m} k={k} n={n} ({i},{j}): err {e} > {bound}");
                assert!(
                    e_fma <= bound,
                    "FMA kernel outside the bound itself: {e_fma}"
                );
            }
        }
        let mut one = vec![0f32; n];
        unsafe {
            dvl_kernels::amx::matmul_amx_f32x3(
                &x[(m - 1) * k..],
                1,
                k,
                &w,
                n,
                Some(&bias),
                &mut one,
                n,
            )
        };
        assert_eq!(&one[..], &got[(m - 1) * n..]);
    }
    // Not finite inputs stay not finite.
    let x = [f32::INFINITY, 1.0];
    let w = [bf16::from_f32(1.0), bf16::from_f32(1.0)];
    let mut out = [0f32];
    unsafe { dvl_kernels::amx::matmul_amx_f32x3(&x, 1, 2, &w, 1, None, &mut out, 1) };
    assert_eq!(out[0], f32::INFINITY);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn amx_activation_packer_matches_its_reference_bitwise() {
    // Odd shapes (partial row blocks and k blocks), and values whose rounding is special:
    // ties to even, NaN, infinities, subnormals, the largest finite values.
    let special = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE / 3.0,
        f32::from_bits(0x3f80_8000), // tie, rounds down to even
        f32::from_bits(0x3f81_8000), // tie, rounds up to even
        f32::from_bits(0x7f7f_ffff),
        -0.0,
    ];
    for &(m, k) in &[
        (0, 5),
        (1, 1),
        (1, 32),
        (15, 31),
        (16, 33),
        (17, 64),
        (40, 1176),
        (3, 17),
    ] {
        let mut x = rand_vec(m * k, 7 + (m * k) as u64);
        for (i, v) in x.iter_mut().enumerate().step_by(7) {
            *v = special[i % special.len()];
        }
        let got = dvl_kernels::amx::pack_activations(&x, m, k);
        let want = dvl_kernels::amx::pack_activations_reference(&x, m, k);
        assert_eq!(got.bits(), want.bits(), "m={m} k={k}");
        // Three bf16 terms per value, split in registers on the way into the blocks: the
        // bits of the scalar split packed by the scalar packer.
        let got3 = dvl_kernels::amx::pack_activations_f32x3(&x, m, k);
        let split = dvl_kernels::amx::split_bf16x3(&x, m, k);
        let want3 = dvl_kernels::amx::pack_activations_reference(&split, 3 * m, k);
        assert_eq!(got3.bits(), want3.bits(), "f32x3 m={m} k={k}");
        // Packed in row-block pieces (as threads do), into storage reused from an earlier,
        // larger packing (stale contents): the same bits.
        for blocks in [1, 2, 3, 64] {
            let earlier =
                dvl_kernels::amx::pack_activations(&rand_vec(40 * (k + 40), 3), 40, k + 40);
            let mut pieced = dvl_kernels::amx::PackedActs::storage(m, k, Some(earlier));
            for (mb0, dst) in pieced.row_block_pieces(blocks) {
                dvl_kernels::amx::pack_row_blocks(&x, m, k, mb0, dst);
            }
            assert_eq!(pieced.bits(), want.bits(), "m={m} k={k} pieces of {blocks}");
            let big = 3 * m + 40;
            let earlier = dvl_kernels::amx::pack_activations(&rand_vec(big * k, 5), big, k);
            let mut pieced3 = dvl_kernels::amx::PackedActs::storage_f32x3(m, k, Some(earlier));
            for (mb0, dst) in pieced3.row_block_pieces(blocks) {
                dvl_kernels::amx::pack_row_blocks_f32x3(&x, m, k, mb0, dst);
            }
            assert_eq!(
                pieced3.bits(),
                want3.bits(),
                "f32x3 m={m} k={k} pieces of {blocks}"
            );
        }
        // Tiles are loaded from the packed blocks: a row straddling two cache lines makes
        // every tile load several times slower, so both packers start on a line.
        for p in [&got, &want] {
            assert_eq!(
                p.bits().as_ptr() as usize % 64,
                0,
                "m={m} k={k}: packed data unaligned"
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn amx_matches_reference_on_bf16_rounded_activations() {
    if !dvl_kernels::amx::available() {
        eprintln!("AMX not available here: skipped");
        return;
    }
    let round = |v: f32| bf16::from_f32(v).to_f32();
    for &(m, k, n) in &[
        (1, 32, 16),
        (16, 64, 32),
        (9, 64, 81),
        (20, 64, 49),
        (30, 50, 33),
        (12, 100, 70),
        (17, 40, 33),
        (70, 1176, 45),
        (300, 96, 20),
        (33, 3420, 17),
        // Activations too large for L2: every row in one pass over the weights, in k
        // chunks (24 k blocks and a tail) with the C tiles of both block pairs parked.
        (500, 4100, 40),
        // Two passes of 576 rows, each in k chunks, five block pairs and a lone block.
        (1100, 4200, 170),
        // Several passes over the weights (row chunks of 160), a k tail, a lone last block.
        (420, 2040, 37),
    ] {
        let x = rand_vec(m * k, 91 + k as u64);
        let w: Vec<bf16> = rand_vec(n * k, 92 + n as u64)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let bias = rand_vec(n, 93);
        let xr: Vec<f32> = x.iter().map(|&v| round(v)).collect();
        let mut want = vec![0f32; m * n];
        reference::matmul(&xr, m, k, &w, n, Some(&bias), &mut want);
        let mut got = vec![f32::NAN; m * n];
        unsafe { dvl_kernels::amx::matmul_amx_bf16(&x, m, k, &w, n, Some(&bias), &mut got, n) };
        let e = max_rel_err(&got, &want);
        assert!(e < 1e-5, "m={m} k={k} n={n}: max rel err {e}");
        // Rows do not depend on how many rows are computed together.
        let mut one = vec![0f32; n];
        unsafe {
            dvl_kernels::amx::matmul_amx_bf16(
                &x[(m - 1) * k..],
                1,
                k,
                &w,
                n,
                Some(&bias),
                &mut one,
                n,
            )
        };
        assert_eq!(&one[..], &got[(m - 1) * n..]);
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_rows_are_bitwise_stable_across_tile_shapes() {
    // Every (rows, cols) tile shape reduces with the same lane tree: compare a full
    // 4-row call with each row computed alone and with odd column counts.
    if !isas().contains(&Isa::Avx512) {
        return;
    }
    let k = 45;
    let x = rand_vec(7 * k, 5);
    let w: Vec<f32> = rand_vec(11 * k, 6);
    let mut all = vec![0f32; 7 * 11];
    matmul(Isa::Avx512, &x, 7, k, &w, 11, None, &mut all, 11);
    for r in 0..7 {
        for n in [1usize, 3, 11] {
            let mut one = vec![0f32; n];
            matmul(
                Isa::Avx512,
                &x[r * k..(r + 1) * k],
                1,
                k,
                &w,
                n,
                None,
                &mut one,
                n,
            );
            assert_eq!(&one[..], &all[r * 11..r * 11 + n], "row {r}, {n} columns");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn dpbf16_matches_reference_on_bf16_rounded_activations() {
    if !dvl_kernels::cpu::has_avx512_bf16() {
        eprintln!("AVX512_BF16 not available here: skipped");
        return;
    }
    let round = |v: f32| bf16::from_f32(v).to_f32();
    for &(m, k, n) in &[
        (1, 1, 1),
        (1, 32, 16),
        (8, 64, 40),
        (8, 95, 151),
        (3, 33, 5),
        (16, 1176, 33),
        (9, 2048, 7),
        (300, 160, 9),
    ] {
        let x = rand_vec(m * k, 191 + k as u64);
        let w: Vec<bf16> = rand_vec(n * k, 192 + n as u64)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let bias = rand_vec(n, 193);
        let xr: Vec<f32> = x.iter().map(|&v| round(v)).collect();
        let mut want = vec![0f32; m * n];
        reference::matmul(&xr, m, k, &w, n, Some(&bias), &mut want);
        let ldo = n + 3;
        let mut got = vec![f32::NAN; m * ldo];
        // SAFETY: has_avx512_bf16 checked above; shapes match.
        unsafe { dvl_kernels::dpbf16::matmul_dpbf16(&x, m, k, &w, n, Some(&bias), &mut got, ldo) };
        let rows: Vec<f32> = (0..m)
            .flat_map(|i| got[i * ldo..i * ldo + n].to_vec())
            .collect();
        let e = max_rel_err(&rows, &want);
        assert!(e < 1e-5, "m={m} k={k} n={n}: max rel err {e}");
        assert!(
            (0..m).all(|i| got[i * ldo + n..(i + 1) * ldo].iter().all(|v| v.is_nan())),
            "columns past n untouched"
        );
        // A row's result does not depend on how many rows share the call.
        let mut one = vec![0f32; n];
        unsafe {
            dvl_kernels::dpbf16::matmul_dpbf16(
                &x[(m - 1) * k..],
                1,
                k,
                &w,
                n,
                Some(&bias),
                &mut one,
                n,
            )
        };
        assert_eq!(&one[..], &rows[(m - 1) * n..]);
    }
}
