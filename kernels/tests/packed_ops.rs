//! Panel weights ([`dvl_kernels::packed`]): the repacking round-trips, the few-row panel
//! kernel and the GEMM on panels match the reference on odd shapes for every ISA, and on
//! AVX2 both give exactly the bits of the many-row GEMM on the weights as stored, whatever
//! the rows, columns or pieces of a call.

use dvl_kernels::matmul::{matmul_many_rows, Isa};
use dvl_kernels::packed::{
    matmul_many_rows_packed, matmul_packed, matmul_panels, pack_panels, PackedBf16, PanelRows,
    PANEL,
};
use dvl_kernels::{bf16, reference};

mod common;
use common::rand_vec;

fn isas() -> Vec<Isa> {
    dvl_kernels::cpu::supported_isas().to_vec()
}

fn bf16_vec(n: usize, seed: u64) -> Vec<bf16> {
    rand_vec(n, seed).into_iter().map(bf16::from_f32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn packing_round_trips_and_splits_into_pieces() {
    for &(n, k) in &[(1, 1), (15, 7), (16, 2), (17, 64), (33, 65), (40, 300)] {
        let w = bf16_vec(n * k, 3 + n as u64);
        let p = PackedBf16::new(&w, n, k);
        assert_eq!((p.n(), p.k()), (n, k));
        for j in 0..n {
            for kk in 0..k {
                assert_eq!(
                    p.weight(j, kk).to_bits(),
                    w[j * k + kk].to_f32().to_bits(),
                    "n={n} k={k} W[{j}][{kk}]"
                );
            }
            let mut row = vec![0f32; k - k / 3];
            p.read_row(j, k / 3, &mut row);
            for (i, v) in row.iter().enumerate() {
                assert_eq!(*v, w[j * k + k / 3 + i].to_f32());
            }
        }
        // Panels packed in two pieces (as threads do) give the same matrix.
        let (panels, len) = (PackedBf16::panels(n), PackedBf16::panel_len(k));
        let mut data = vec![u32::MAX; panels * len];
        let half = panels / 2;
        let (a, b) = data.split_at_mut(half * len);
        pack_panels(&w, n, k, 0, a);
        pack_panels(&w, n, k, half, b);
        let pieces = PackedBf16::from_panels(data, n, k).expect("whole panels");
        assert_eq!(pieces.panels_from(0), p.panels_from(0), "n={n} k={k}");
        assert!(PackedBf16::from_panels(vec![0; panels * len + 1], n, k).is_none());
    }
}

#[test]
fn panel_matmul_matches_reference_on_every_isa() {
    // Row groups of 1-4 (and 5-9: a full group plus a partial one), panel pairs and single
    // panels, odd k (a half pair at the end), k past one and two 256-blocks, column ranges
    // that start and end inside panels, ldo > columns.
    let shapes = [
        (1, 1, 1),
        (1, 64, 40),
        (2, 7, 17),
        (3, 33, 31),
        (4, 64, 48),
        (5, 100, 33),
        (6, 257, 16),
        (7, 2, 70),
        (8, 513, 35),
        (9, 95, 64),
        (4, 0, 5),
        (0, 8, 8),
    ];
    for &(m, k, n) in &shapes {
        let x = rand_vec(m * k, 11 + m as u64);
        let w = bf16_vec(n * k, 12 + k as u64);
        let bias = rand_vec(n, 13);
        let packed = PackedBf16::new(&w, n, k);
        let mut want = vec![0f32; m * n];
        reference::matmul(&x, m, k, &w, n, Some(&bias), &mut want);
        let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
        for isa in isas() {
            for (n0, n1) in [(0, n), (n / 3, n), (n / 3, n - n / 4)] {
                let width = n1 - n0;
                let ldo = width + 3;
                let b = &bias[n0..n1];
                for many in [false, true] {
                    let mut got = vec![f32::NAN; m * ldo];
                    if many {
                        matmul_many_rows_packed(
                            isa,
                            &x,
                            m,
                            k,
                            &packed,
                            n0,
                            n1,
                            Some(b),
                            &mut got,
                            ldo,
                        );
                    } else {
                        matmul_packed(isa, &x, m, k, &packed, n0, n1, Some(b), &mut got, ldo);
                    }
                    for i in 0..m {
                        for c in 0..width {
                            let (g, r) = (got[i * ldo + c], want[i * n + n0 + c]);
                            assert!(
                                (g - r).abs() / scale < 1e-5,
                                "{isa:?} many={many} m={m} k={k} n={n} {n0}..{n1} [{i}][{c}]: {g} vs {r}"
                            );
                        }
                        // Nothing written past the columns.
                        assert!(got[i * ldo + width..(i + 1) * ldo]
                            .iter()
                            .all(|v| v.is_nan()));
                    }
                }
            }
        }
    }
}

#[test]
fn panel_kernels_give_the_gemm_bits_for_any_rows_and_columns() {
    // On AVX2 the few-row panel kernel, the GEMM on panels and the GEMM on the weights as
    // stored sum each output the same way: bit-identical, whatever rows share the call and
    // whatever columns a piece takes. (So the engine may pick the kernel per call.)
    if !isas().contains(&Isa::Avx2) {
        return;
    }
    let isa = Isa::Avx2;
    for &(k, n) in &[(64, 70), (257, 33), (896, 40), (5, 16)] {
        let m = 35;
        let x = rand_vec(m * k, 21 + k as u64);
        let w = bf16_vec(n * k, 22);
        let bias = rand_vec(n, 23);
        let packed = PackedBf16::new(&w, n, k);
        let mut gemm = vec![0f32; m * n];
        matmul_many_rows(isa, &x, m, k, &w, n, Some(&bias), &mut gemm, n);
        let mut on_panels = vec![0f32; m * n];
        matmul_many_rows_packed(isa, &x, m, k, &packed, 0, n, Some(&bias), &mut on_panels, n);
        assert_eq!(bits(&on_panels), bits(&gemm), "GEMM on panels, k={k} n={n}");
        for (r0, r1) in [
            (0, 1),
            (1, 3),
            (3, 6),
            (6, 10),
            (10, 18),
            (18, 35),
            (34, 35),
        ] {
            let rows = r1 - r0;
            let xs = &x[r0 * k..r1 * k];
            let prepared = PanelRows::new(xs, rows, k);
            assert_eq!((prepared.rows(), prepared.k()), (rows, k));
            for (n0, n1) in [(0, n), ((PANEL + 3).min(n), n), (5, 6)] {
                let width = n1 - n0;
                let mut got = vec![f32::NAN; rows * width];
                matmul_panels(
                    isa,
                    &prepared,
                    &packed,
                    n0,
                    n1,
                    Some(&bias[n0..n1]),
                    &mut got,
                    width,
                );
                for i in 0..rows {
                    assert_eq!(
                        bits(&got[i * width..(i + 1) * width]),
                        bits(&gemm[(r0 + i) * n + n0..(r0 + i) * n + n1]),
                        "few-row panels k={k} n={n} rows {r0}..{r1} columns {n0}..{n1}, row {i}"
                    );
                }
            }
        }
    }
}

#[test]
fn checked_words_agrees_with_words_and_refuses_overflow() {
    for (n, k) in [
        (0, 0),
        (1, 1),
        (16, 2),
        (17, 3),
        (151_936, 64),
        (2048, 11_008),
    ] {
        assert_eq!(
            PackedBf16::checked_words(n as u64, k as u64),
            Some(PackedBf16::words(n, k) as u64),
            "{n} x {k}"
        );
        assert_eq!(
            PackedBf16::new(&bf16_vec(n * k, 5), n, k).bytes(),
            PackedBf16::words(n, k) * 4
        );
    }
    assert_eq!(PackedBf16::checked_words(u64::MAX, 2), None);
    assert_eq!(PackedBf16::checked_words(1 << 40, 1 << 40), None);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn gemm_on_rows_packed_once_gives_the_bits_of_the_gemm_that_packs_them_itself() {
    use dvl_kernels::x86::{gemm_avx2, gemm_avx2_panels, gemm_rows_len, pack_gemm_rows, GemmActs};
    if !isas().contains(&Isa::Avx2) {
        eprintln!("skipped: no AVX2");
        return;
    }
    // Row tiles (6), row blocks (96), k blocks (256, unequal remainders) and odd k.
    let shapes = [
        (1, 1, 16),
        (7, 9, 17),
        (13, 257, 40),
        (97, 513, 33),
        (200, 64, 70),
    ];
    for &(m, k, n) in &shapes {
        let x = rand_vec(m * k, 31 + m as u64);
        let w = bf16_vec(n * k, 32 + k as u64);
        let bias = rand_vec(n, 33);
        let packed = PackedBf16::new(&w, n, k);
        let mut rows = vec![f32::NAN; gemm_rows_len(m, k)];
        pack_gemm_rows(&x, m, k, &mut rows);
        // Column pieces on panel boundaries, as the engine splits a call.
        let cuts = [0, 16.min(n), n];
        let run = |prepacked: bool, panels: bool| {
            let mut out = vec![f32::NAN; m * n];
            for piece in cuts.windows(2) {
                let (n0, n1) = (piece[0], piece[1]);
                let (b, o) = (Some(&bias[n0..n1]), out[n0..].as_mut_ptr());
                let ws = &w[n0 * k..n1 * k];
                let acts = if prepacked {
                    GemmActs::Packed(&rows)
                } else {
                    GemmActs::Rows(&x)
                };
                // SAFETY: AVX2 checked above; `out` holds m rows of n from column n0.
                unsafe {
                    if panels {
                        gemm_avx2_panels(acts, m, &packed, n0, n1, b, o, n)
                    } else {
                        gemm_avx2(acts, m, k, ws, n1 - n0, b, o, n)
                    }
                }
            }
            out
        };
        let want = run(false, false);
        assert!(want.iter().all(|v| v.is_finite()), "m={m} k={k} n={n}");
        for (prepacked, panels) in [(true, false), (false, true), (true, true)] {
            assert_eq!(
                bits(&run(prepacked, panels)),
                bits(&want),
                "m={m} k={k} n={n} prepacked={prepacked} panels={panels}"
            );
        }
    }
}
