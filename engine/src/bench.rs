//! `dvl bench`: medians of the four costs that decide latency (vision for one 448×448 image,
//! prefill of the prompt prefix, one denoising step, one commit step) next to the step's
//! DRAM roofline (LM weight bytes ÷ this machine's measured read bandwidth).

use std::time::Instant;

use crate::backend::{on_backend, CpuBackend};
use crate::decoder::{Layout, MAX_BLOCK_SIZE};
use crate::engine::{Engine, ImageInput};
use crate::error::{Error, Result};
use crate::images::RgbImage;
use crate::models::qwen2_5_vl::text::KvCache;
use crate::models::qwen2_5_vl::vision::Grid;

#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Prompt rows already in the KV cache when stepping.
    pub prefix: usize,
    pub block: usize,
    pub reps: usize,
    /// Side of the square test image (448 → 32×32 patches, 256 LLM tokens).
    pub image_side: usize,
    pub vision: bool,
    /// Stop repeating a measurement once it has taken this long (the median of what ran
    /// is reported).
    pub max_seconds_per_item: f64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            prefix: 288,
            block: 8,
            reps: 5,
            image_side: 448,
            vision: true,
            max_seconds_per_item: 30.0,
        }
    }
}

impl BenchConfig {
    /// The checks [`run`] makes before allocating anything: a block of 1..=1024 rows (as
    /// generation takes), a prefix of at least one block whose rows plus the two blocks the
    /// step and commit add fit in `max_positions` (the model's `max_position_embeddings`),
    /// 1..=10,000 repetitions, an image side of 28..=4096 pixels.
    pub fn validate(&self, max_positions: usize) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        let b = self.block;
        if b == 0 || b > MAX_BLOCK_SIZE {
            return bad(format!("block {b} must be in 1..={MAX_BLOCK_SIZE}"));
        }
        if self.prefix < b {
            return bad(format!(
                "prefix {} must hold at least one block of {b}",
                self.prefix
            ));
        }
        if self.prefix.saturating_add(2 * b) > max_positions {
            return bad(format!(
                "prefix {} + two blocks of {b} exceeds max_position_embeddings {max_positions}",
                self.prefix
            ));
        }
        if self.reps == 0 || self.reps > 10_000 {
            return bad(format!("reps {} must be in 1..=10000", self.reps));
        }
        if self.vision && !(28..=4096).contains(&self.image_side) {
            return bad(format!(
                "image_side {} must be in 28..=4096",
                self.image_side
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default)]
pub struct BenchResult {
    pub vision_ms: Option<f64>,
    pub prefill_ms: f64,
    pub step_ms: f64,
    pub commit_ms: f64,
    pub lm_weight_bytes: u64,
    pub read_gbps: f64,
    pub roofline_step_ms: f64,
    pub threads: usize,
    pub isa: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Time `f` up to `reps` times (at least once), median in milliseconds.
fn time_ms(reps: usize, budget_s: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    let mut v = Vec::new();
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
        if start.elapsed().as_secs_f64() > budget_s {
            break;
        }
    }
    Ok(median(v))
}

/// Sustained read bandwidth of `threads` threads streaming a buffer larger than any cache.
pub fn read_bandwidth_gbps(threads: usize) -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let per = words.div_ceil(threads.max(1));
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(per)
                .map(|c| {
                    s.spawn(move || {
                        // Four independent accumulators keep the loads, not the adds, the limit.
                        let mut acc = [0u64; 4];
                        for q in c.chunks_exact(4) {
                            for i in 0..4 {
                                acc[i] = acc[i].wrapping_add(q[i]);
                            }
                        }
                        acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Tower input for one `side`×`side` image: for the Qwen2.5-VL tower, `pixel_values` of a
/// fixed pattern (the PyTorch peer feeds the same values); for the SigLIP variant, the
/// anyres tiles of a synthetic picture (base + crops).
fn vision_input(engine: &Engine, side: usize) -> Result<(Vec<f32>, Vec<Grid>)> {
    let model = &engine.model;
    if model.config.siglip.is_some() {
        let mut data = Vec::with_capacity(side * side * 3);
        for y in 0..side {
            for x in 0..side {
                data.extend_from_slice(&[
                    (x * 255 / side) as u8,
                    (y * 255 / side) as u8,
                    ((x ^ y) & 0xff) as u8,
                ]);
            }
        }
        let img = RgbImage::from_rgb8(side, side, side * 3, &data)?;
        return engine.preprocess(&[ImageInput::Rgb(img)]);
    }
    let patch = model.config.vision.patch_size;
    let cells = side / (patch * 2) * 2;
    let grid = Grid {
        t: 1,
        h: cells,
        w: cells,
    };
    let n = grid.patches() * model.config.vision.patch_dim();
    let pixels: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Ok((pixels, vec![grid]))
}

pub fn run(engine: &Engine, be: &CpuBackend, cfg: &BenchConfig) -> Result<BenchResult> {
    let model = &engine.model;
    let text = &model.text;
    let h = text.cfg.hidden_size;
    cfg.validate(text.cfg.max_position_embeddings)?;
    let b = cfg.block;
    let prefix = cfg.prefix / b * b;
    let mut res = BenchResult {
        lm_weight_bytes: model.lm_weight_bytes(),
        threads: be.threads(),
        isa: be.describe(),
        ..Default::default()
    };
    let store = &model.store;
    // Weights off the disk before the first timed pass (else a one- or two-rep median of a
    // model that is not in the page cache is mostly read time).
    std::hint::black_box(store.touch_pages());
    // Panels mapped from the panel cache are paged in on first use too.
    for m in model.packed_matrices().iter().filter(|m| m.is_shared()) {
        let words = m.as_words();
        std::hint::black_box(words.iter().step_by(1024).fold(0u32, |a, &w| a ^ w));
    }

    if cfg.vision {
        let (pixels, grids) = vision_input(engine, cfg.image_side)?;
        res.vision_ms = Some(time_ms(cfg.reps, cfg.max_seconds_per_item, || {
            on_backend(be, || model.encode_images(be, &pixels, &grids).map(|_| ()))
        })?);
    }

    // Embeddings of a synthetic prompt: real token rows, so activations look like real ones.
    let ids: Vec<u32> = (0..prefix as u32)
        .map(|i| 1000 + (i * 37) % 50_000)
        .collect();
    let mut prompt = Vec::with_capacity(prefix * h);
    text.embed_into(store, &ids, &mut prompt)?;
    let lay = Layout::new(prefix, 2 * b, b);
    let mut cache = KvCache::new(&text.cfg, lay.total + b);
    res.prefill_ms = time_ms(cfg.reps, cfg.max_seconds_per_item, || {
        cache.clear();
        let mut x = prompt.clone();
        on_backend(be, || {
            text.forward(be, store, &mut x, prefix, &mut cache, b, prefix)
        })
    })?;

    // One denoising step: the block's forward without cache writes, final norm, lm_head,
    // and the unmasking pass over the logits.
    let mut block_rows = Vec::with_capacity(b * h);
    text.embed_into(store, &vec![crate::MASK_ID; b], &mut block_rows)?;
    let mut hn = vec![0f32; b * h];
    res.step_ms = time_ms(cfg.reps * 2, cfg.max_seconds_per_item, || {
        let mut x = block_rows.clone();
        on_backend(be, || {
            text.forward(be, store, &mut x, b, &mut cache, b, 0)?;
            text.final_norm(be, &x, &mut hn);
            std::hint::black_box(text.greedy_tokens(be, store, &hn, b));
            Ok(())
        })
    })?;
    res.commit_ms = time_ms(cfg.reps * 2, cfg.max_seconds_per_item, || {
        let mut x = block_rows.clone();
        on_backend(be, || text.forward(be, store, &mut x, b, &mut cache, b, b))?;
        cache.truncate(prefix);
        Ok(())
    })?;

    res.read_gbps = read_bandwidth_gbps(be.threads());
    res.roofline_step_ms = res.lm_weight_bytes as f64 / (res.read_gbps * 1e9) * 1e3;
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_limits_are_checked_before_anything_runs() {
        let ok = BenchConfig::default();
        assert!(ok.validate(128_000).is_ok());
        let bad = [
            (
                BenchConfig {
                    block: 0,
                    ..ok.clone()
                },
                "block 0",
            ),
            (
                BenchConfig {
                    block: 1025,
                    ..ok.clone()
                },
                "block 1025",
            ),
            (
                BenchConfig {
                    prefix: 7,
                    ..ok.clone()
                },
                "prefix 7",
            ),
            (
                BenchConfig {
                    prefix: usize::MAX,
                    ..ok.clone()
                },
                "max_position_embeddings",
            ),
            (
                BenchConfig {
                    prefix: 127_985,
                    ..ok.clone()
                },
                "max_position_embeddings",
            ),
            (
                BenchConfig {
                    reps: 0,
                    ..ok.clone()
                },
                "reps 0",
            ),
            (
                BenchConfig {
                    image_side: 27,
                    ..ok.clone()
                },
                "image_side 27",
            ),
        ];
        for (cfg, needle) in bad {
            match cfg.validate(128_000) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("{cfg:?}: {other:?}"),
            }
        }
        // The largest prefix that fits, and no image check without vision.
        assert!(BenchConfig {
            prefix: 127_984,
            ..ok.clone()
        }
        .validate(128_000)
        .is_ok());
        assert!(BenchConfig {
            image_side: 0,
            vision: false,
            ..ok
        }
        .validate(128_000)
        .is_ok());
    }
}
