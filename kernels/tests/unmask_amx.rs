//! The unmasking pass fused into the AMX vocabulary projection against the unfused one:
//! the same tile logits (written out by `matmul_amx_bf16_packed`) reduced by
//! `ArgmaxPartial::of`. Ids and maxima must be equal, sums within rounding. Odd shapes:
//! every row count up to a tile (powers of two and not), one and three bf16 terms, k tails,
//! short last weight blocks, slice offsets, the excluded id at block edges and ties.
//! Skips (passing, with a note) where AMX is not granted.
#![cfg(target_arch = "x86_64")]

use dvl_kernels::amx::unmask::{argmax_partials, UnmaskActs, MAX_ROWS};
use dvl_kernels::amx::{self, PackedActs};
use dvl_kernels::softmax::ArgmaxPartial;
use half::bf16;

mod common;
use common::rand_vec;

fn amx_or_skip() -> bool {
    if !amx::available() {
        eprintln!("AMX not available here: skipped");
        return false;
    }
    true
}

/// Weights with equal rows at ids 5, 6, 21 and 700 (when present), scaled up so they tie
/// for the maximum of most rows.
fn weights(n: usize, k: usize, seed: u64) -> Vec<bf16> {
    let mut w: Vec<f32> = rand_vec(n * k, seed);
    let hot: Vec<f32> = (0..k)
        .map(|i| if i % 3 == 0 { 4.0 } else { -0.5 })
        .collect();
    for id in [5usize, 6, 21, 700] {
        if id < n {
            w[id * k..(id + 1) * k].copy_from_slice(&hot);
        }
    }
    w.into_iter().map(bf16::from_f32).collect()
}

/// (unfused, fused) partials per row.
fn both(
    packed: &PackedActs,
    rows: usize,
    w: &[bf16],
    n: usize,
    offset: usize,
    never: Option<usize>,
) -> (Vec<ArgmaxPartial>, Vec<ArgmaxPartial>) {
    let mut z = vec![0f32; rows * n];
    // SAFETY: AMX checked by the caller; w holds n rows of k, z rows × n.
    unsafe { amx::matmul_amx_bf16_packed(packed, w, n, None, z.as_mut_ptr(), n) };
    let want = z
        .chunks_exact(n)
        .map(|zr| ArgmaxPartial::of(zr, offset, never))
        .collect();
    let acts = UnmaskActs::new(packed).expect("rows within a tile");
    assert_eq!(acts.rows(), rows);
    let mut got = vec![ArgmaxPartial::EMPTY; rows];
    // SAFETY: as above.
    unsafe { argmax_partials(&acts, w, n, offset, never, &mut got) };
    (want, got)
}

fn check(want: &[ArgmaxPartial], got: &[ArgmaxPartial], what: &str) {
    for (r, (w, g)) in want.iter().zip(got).enumerate() {
        assert_eq!(g.best_id, w.best_id, "{what} row {r}: id");
        assert_eq!(g.best.to_bits(), w.best.to_bits(), "{what} row {r}: best");
        assert_eq!(g.max.to_bits(), w.max.to_bits(), "{what} row {r}: max");
        assert!(
            ((g.sum - w.sum) / w.sum).abs() < 1e-6,
            "{what} row {r}: sum {} vs {}",
            g.sum,
            w.sum
        );
    }
}

#[test]
fn fused_unmasking_equals_unfused_on_odd_shapes() {
    if !amx_or_skip() {
        return;
    }
    for &(k, n) in &[
        (64usize, 2048usize),
        (80, 1000),
        (32, 16),
        (896, 333),
        (64, 7),
    ] {
        let w = weights(n, k, k as u64 + n as u64);
        for rows in [1usize, 2, 3, 5, 6, 8, 10, 11, 13, 16] {
            let x: Vec<f32> = rand_vec(rows * k, rows as u64)
                .iter()
                .map(|v| v * 3.0)
                .collect();
            for (terms, packed) in [
                (1, amx::pack_activations(&x, rows, k)),
                (3, amx::pack_activations_f32x3(&x, rows, k)),
            ] {
                let offset = 4096;
                // The excluded id: none, first, on a block edge, in the short last block,
                // last, one of the tied rows, outside the slice.
                for never in [
                    None,
                    Some(offset),
                    Some(offset + 31.min(n - 1)),
                    Some(offset + n - 1 - (n - 1) % 16),
                    Some(offset + n - 1),
                    Some(offset + 5.min(n - 1)),
                    Some(3),
                ] {
                    let (want, got) = both(&packed, rows, &w, n, offset, never);
                    check(
                        &want,
                        &got,
                        &format!("k {k} n {n} rows {rows} terms {terms} never {never:?}"),
                    );
                }
            }
        }
    }
}

#[test]
fn fused_unmasking_keeps_the_lowest_tied_id() {
    if !amx_or_skip() {
        return;
    }
    let (k, n) = (64, 1024);
    let w = weights(n, k, 9);
    // Rows aligned with the hot pattern: ids 5, 6, 21 and 700 tie at the maximum.
    let rows = 4;
    let x: Vec<f32> = (0..rows * k)
        .map(|i| if (i % k) % 3 == 0 { 1.0 } else { -0.25 })
        .collect();
    let packed = amx::pack_activations(&x, rows, k);
    let (want, got) = both(&packed, rows, &w, n, 0, None);
    check(&want, &got, "ties");
    assert!(got.iter().all(|p| p.best_id == 5), "lowest tied id");
    let (want, got) = both(&packed, rows, &w, n, 0, Some(5));
    check(&want, &got, "ties, 5 excluded");
    assert!(got.iter().all(|p| p.best_id == 6));
}

#[test]
fn fused_unmasking_takes_at_most_a_tile_of_rows() {
    if !amx_or_skip() {
        return;
    }
    let k = 64;
    let x = rand_vec((MAX_ROWS + 1) * k, 1);
    assert!(UnmaskActs::new(&amx::pack_activations(&x, MAX_ROWS + 1, k)).is_none());
    assert!(UnmaskActs::new(&amx::pack_activations(&x, 0, k)).is_none());
    // An empty slice gives empty partials.
    let acts = UnmaskActs::new(&amx::pack_activations(&x, 2, k)).unwrap();
    let mut out = vec![ArgmaxPartial::EMPTY; 2];
    out[0].best_id = 1;
    // SAFETY: AMX checked; no weights are read for n = 0.
    unsafe { argmax_partials(&acts, &[], 0, 0, None, &mut out) };
    assert!(out.iter().all(|p| p.best_id == usize::MAX && p.sum == 0.0));
}
