//! Block-diffusion decoding (spec §8), as one readable loop.
//!
//! The sequence (prompt rows + `gen_length` answer rows) is cut into blocks of `B` from
//! position 0. Whole prompt blocks are prefilled block-causally; each later block starts as
//! MASK rows (plus any prompt tail), is denoised by forwards that do not write the KV cache,
//! commits tokens by confidence, and once it has no masks is run once more to write its
//! clean K/V (the commit pass). Decoding stops after the first block whose generated part
//! holds EOS.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use dvl_kernels::softmax::argmax_confidence;

use crate::backend::{on_backend, Backend};
use crate::error::{Error, Result};
use crate::models::qwen2_5_vl::text::{KvCache, TextModel};
use crate::weights::WeightStore;
use crate::{EOS_ID, MASK_ID};

/// Which masked rows a denoising step commits (spec §8.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// `low_confidence_static`: the `n` most confident masked rows.
    LowConfidenceStatic,
    /// `low_confidence_dynamic`: every row with confidence > threshold if there are at
    /// least `n`, else the `n` most confident.
    LowConfidenceDynamic,
}

impl Strategy {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "static" | "low_confidence_static" => Ok(Strategy::LowConfidenceStatic),
            "dynamic" | "low_confidence_dynamic" => Ok(Strategy::LowConfidenceDynamic),
            other => Err(Error::InvalidArgument(format!(
                "unknown strategy {other:?}; expected static (low_confidence_static) or dynamic (low_confidence_dynamic)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::LowConfidenceStatic => "low_confidence_static",
            Strategy::LowConfidenceDynamic => "low_confidence_dynamic",
        }
    }
}

/// Decoding parameters. `Default` equals the reference evaluation (spec §8.10).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    pub gen_length: usize,
    /// Denoising steps per block.
    pub steps: usize,
    /// Overrides the checkpoint's `bd3lm_block_size`.
    pub block_size: Option<usize>,
    pub strategy: Strategy,
    pub threshold: f32,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    /// Run block b's commit pass and block b+1's first denoising pass as one forward of 2B
    /// queries (block-causal, K/V written for the first half). Same tokens, one forward
    /// fewer per block; proven identical on every fixture (tests/fixtures.rs).
    pub fuse_commit: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            gen_length: 128,
            steps: 8,
            block_size: None,
            strategy: Strategy::LowConfidenceStatic,
            threshold: 0.85,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            fuse_commit: true,
        }
    }
}

/// Largest `gen_length` accepted; the published models were trained on 8192-row sequences.
pub const MAX_GEN_LENGTH: usize = 8192;

/// Largest block size accepted (by generation and by `dvl bench`).
pub const MAX_BLOCK_SIZE: usize = 1024;

impl GenerateParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.gen_length == 0 || self.gen_length > MAX_GEN_LENGTH {
            return bad(format!(
                "gen_length {} must be in 1..={MAX_GEN_LENGTH}",
                self.gen_length
            ));
        }
        if self.steps == 0 || self.steps > 1024 {
            return bad(format!(
                "steps {} must be in 1..=1024 (per block)",
                self.steps
            ));
        }
        if let Some(b) = self.block_size {
            if b == 0 || b > MAX_BLOCK_SIZE {
                return bad(format!("block_size {b} must be in 1..={MAX_BLOCK_SIZE}"));
            }
        }
        if !(self.threshold.is_finite() && (0.0..=1.0).contains(&self.threshold)) {
            return bad(format!("threshold {} must be in [0, 1]", self.threshold));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature {} must be >= 0", self.temperature));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        Ok(())
    }
}

/// Number of tokens committed at each denoising step of a block (spec §8.4):
/// `steps + 1` entries, `B / steps` each, the first `B mod steps` one more.
pub fn schedule(block: usize, steps: usize) -> Vec<usize> {
    if steps == 0 {
        return Vec::new();
    }
    let (base, rem) = (block / steps, block % steps);
    (0..=steps).map(|i| base + usize::from(i < rem)).collect()
}

/// Sequence layout (spec §8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub prompt_rows: usize,
    pub gen_length: usize,
    pub block: usize,
    pub nblocks: usize,
    pub total: usize,
    pub prefill_blocks: usize,
    pub prefill_length: usize,
}

impl Layout {
    pub fn new(prompt_rows: usize, gen_length: usize, block: usize) -> Layout {
        let (nblocks, total) = if block >= prompt_rows + gen_length {
            // "Full diffusion" ablation: one block of exactly P + G rows.
            (1, prompt_rows + gen_length)
        } else {
            let n = (prompt_rows + gen_length).div_ceil(block);
            (n, n * block)
        };
        let prefill_blocks = prompt_rows / block;
        Layout {
            prompt_rows,
            gen_length,
            block,
            nblocks,
            total,
            prefill_blocks,
            prefill_length: prefill_blocks * block,
        }
    }
}

/// One committed row of a denoising step.
#[derive(Clone, Debug, PartialEq)]
pub struct Commit {
    pub pos: usize,
    pub token: u32,
    pub conf: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StepTrace {
    pub step: usize,
    pub n_scheduled: usize,
    pub masked_before: usize,
    pub committed: Vec<Commit>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BlockTrace {
    pub block: usize,
    pub start: usize,
    pub prompt_tail: usize,
    pub steps: Vec<StepTrace>,
    pub eos_in_block: bool,
}

/// Result of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// `x_ids[P : P+G]` exactly as the reference returns it: MASK where never generated.
    pub ids: Vec<u32>,
    pub prompt_rows: usize,
    /// Forward passes of the reference schedule (prefill + denoising + commit passes).
    pub forward_passes: usize,
    /// Model invocations actually run (smaller than `forward_passes` with `fuse_commit`).
    pub forward_calls: usize,
    pub stopped_at_eos: bool,
    pub trace: Vec<BlockTrace>,
}

impl Output {
    /// The answer's ids: cut at the first EOS, MASK ids dropped (spec §2.5).
    pub fn answer_ids(&self) -> Vec<u32> {
        self.ids
            .iter()
            .copied()
            .take_while(|&t| t != EOS_ID)
            .filter(|&t| t != MASK_ID)
            .collect()
    }
}

/// A tensor probe: intermediate values the fixtures carry (`--dump`).
pub enum ProbeData<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

/// Hooks into a generation: streaming, cancellation, probes. All methods have defaults.
pub trait Observer {
    /// A row was committed (called in commit order, which need not be left to right).
    fn on_commit(&mut self, _pos: usize, _gen_index: usize, _token: u32) {}
    /// A block finished (its tokens are final); `ids` is the generated window so far.
    fn on_block_done(&mut self, _block: &BlockTrace, _ids: &[u32]) {}
    /// The prompt prefill finished.
    fn on_prefill_done(&mut self) {}
    /// Polled before every forward; returning true stops with [`Error::Cancelled`].
    fn cancelled(&mut self) -> bool {
        false
    }
    fn wants_probes(&self) -> bool {
        false
    }
    fn probe(&mut self, _name: &str, _shape: &[usize], _data: ProbeData<'_>) {}
}

/// An observer that does nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

/// splitmix64: a seeded, reproducible stream for sampling (temperature > 0).
struct Rng(u64);
impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Draw a token and its confidence from one row of logits (spec §8.6). Greedy at
/// temperature 0; otherwise temperature, top-k, top-p, then a categorical draw. MASK is
/// never drawn (documented deviation, spec §8.11).
fn sample(z: &[f32], p: &GenerateParams, rng: &mut Rng, untempered: bool) -> (u32, f32) {
    if p.temperature == 0.0 {
        let (i, c) = argmax_confidence(z, Some(MASK_ID as usize));
        return (i as u32, c);
    }
    let inv_t = if p.temperature == 1.0 {
        1.0
    } else {
        1.0 / p.temperature
    };
    let mut zz: Vec<f32> = z.iter().map(|&v| v * inv_t).collect();
    if let Some(v) = zz.get_mut(MASK_ID as usize) {
        *v = f32::NEG_INFINITY;
    }
    if p.top_k > 0 && p.top_k < zz.len() {
        let mut sorted = zz.clone();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[p.top_k - 1];
        zz.iter_mut()
            .filter(|v| **v < kth)
            .for_each(|v| *v = f32::NEG_INFINITY);
    }
    if p.top_p < 1.0 {
        let mut order: Vec<usize> = (0..zz.len()).collect();
        order.sort_by(|&a, &b| zz[b].total_cmp(&zz[a]).then(a.cmp(&b)));
        let m = zz[order[0]] as f64;
        let total: f64 = zz.iter().map(|&v| libm::exp(v as f64 - m)).sum();
        let mut cum = 0f64;
        let mut remove = Vec::new();
        for (rank, &i) in order.iter().enumerate() {
            // Remove entry k when the mass strictly before it already exceeds p.
            if rank > 0 && cum > p.top_p as f64 {
                remove.push(i);
            }
            cum += libm::exp(zz[i] as f64 - m) / total;
        }
        for i in remove {
            zz[i] = f32::NEG_INFINITY;
        }
    }
    let m = zz.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let w: Vec<f64> = zz.iter().map(|&v| libm::exp(v as f64 - m)).collect();
    let total: f64 = w.iter().sum();
    let target = rng.next_f64() * total;
    let mut acc = 0f64;
    let mut pick = w.iter().rposition(|&x| x > 0.0).unwrap_or(0);
    for (i, &x) in w.iter().enumerate() {
        acc += x;
        if acc > target && x > 0.0 {
            pick = i;
            break;
        }
    }
    if untempered {
        // softmax(z)[x0] over the raw logits (spec §8.6, SigLIP variant).
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let s: f64 = z.iter().map(|&v| libm::exp(v as f64 - m)).sum();
        return (pick as u32, (libm::exp(z[pick] as f64 - m) / s) as f32);
    }
    (pick as u32, (w[pick] / total) as f32)
}

/// Choose which masked rows to commit (spec §8.7). `conf[i]` is `None` for unmasked rows.
/// Ties go to the lowest row index.
pub fn choose_transfer(
    conf: &[Option<f32>],
    n: usize,
    strategy: Strategy,
    threshold: f32,
) -> Vec<usize> {
    let mut masked: Vec<(usize, f32)> = conf
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|c| (i, c)))
        .collect();
    masked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if strategy == Strategy::LowConfidenceDynamic {
        let above: Vec<usize> = masked
            .iter()
            .filter(|(_, c)| *c > threshold)
            .map(|(i, _)| *i)
            .collect();
        if above.len() >= n {
            return above;
        }
    }
    masked.into_iter().take(n).map(|(i, _)| i).collect()
}

/// Everything the decoder needs from a model.
pub struct DecodeModel<'m, 'a> {
    pub text: &'m TextModel,
    pub store: &'m WeightStore<'a>,
    pub block_size: usize,
    /// Confidence of a sampled token = its probability under the untempered, untruncated
    /// softmax (the SigLIP variant) instead of the tempered / top-k / top-p one (the
    /// Qwen2.5-VL variants); spec §8.6. Greedy decoding is the same either way.
    pub untempered_confidence: bool,
}

/// Run block-diffusion decoding on an assembled prompt (`prompt_rows × H` embeddings).
pub fn generate(
    m: &DecodeModel<'_, '_>,
    be: &dyn Backend,
    prompt: &[f32],
    params: &GenerateParams,
    obs: &mut dyn Observer,
) -> Result<Output> {
    params.validate()?;
    let text = m.text;
    let h = text.cfg.hidden_size;
    let vocab = text.cfg.vocab_size;
    if !prompt.len().is_multiple_of(h) {
        return Err(Error::InvalidArgument(format!(
            "prompt embeddings ({}) are not a multiple of hidden size {h}",
            prompt.len()
        )));
    }
    let p_rows = prompt.len() / h;
    if p_rows == 0 {
        return Err(Error::InvalidArgument("empty prompt".to_string()));
    }
    let b = params.block_size.unwrap_or(m.block_size);
    let lay = Layout::new(p_rows, params.gen_length, b);
    let max_len = text.cfg.max_position_embeddings;
    if lay.total > max_len {
        return Err(Error::InvalidArgument(format!(
            "prompt ({p_rows} rows) + gen_length ({}) = {} rows exceeds max_position_embeddings {max_len}",
            params.gen_length, lay.total
        )));
    }
    let block = if lay.nblocks == 1 { lay.total } else { b };
    let steps = params.steps;
    let sched = schedule(block, steps);
    let mut rng = Rng(params.seed);
    let mut cache = KvCache::new(&text.cfg, lay.total);
    let mut out = Output {
        ids: vec![MASK_ID; params.gen_length],
        prompt_rows: p_rows,
        forward_passes: 0,
        forward_calls: 0,
        stopped_at_eos: false,
        trace: Vec::new(),
    };
    let mut ids = vec![MASK_ID; lay.total];
    let mut mask_row = Vec::with_capacity(h);
    text.embed_into(m.store, &[MASK_ID], &mut mask_row)?;

    // §8.3 prefill: whole prompt blocks, block-causal, K/V stored.
    if lay.prefill_length > 0 {
        if obs.cancelled() {
            return Err(Error::Cancelled);
        }
        let mut x = prompt[..lay.prefill_length * h].to_vec();
        on_backend(be, || {
            text.forward(
                be,
                m.store,
                &mut x,
                lay.prefill_length,
                &mut cache,
                block,
                lay.prefill_length,
            )
        })?;
        out.forward_passes += 1;
        out.forward_calls += 1;
        if obs.wants_probes() {
            let last = &x[(lay.prefill_length - block) * h..];
            let mut hn = vec![0f32; last.len()];
            text.final_norm(be, last, &mut hn);
            obs.probe(
                "prefill_last_block_prenorm",
                &[block, h],
                ProbeData::F32(last),
            );
            obs.probe(
                "prefill_last_block_hidden",
                &[block, h],
                ProbeData::F32(&hn),
            );
        }
        debug_assert_eq!(cache.len(), lay.prefill_length);
    }
    obs.on_prefill_done();

    // Rows of a block as they start: prompt tail rows, then MASK rows.
    let initial_rows = |s0: usize| -> Vec<f32> {
        let mut e = Vec::with_capacity(block * h);
        for i in s0..s0 + block {
            if i < p_rows {
                e.extend_from_slice(&prompt[i * h..(i + 1) * h]);
            } else {
                e.extend_from_slice(&mask_row);
            }
        }
        e
    };

    let mut logits = Vec::new();
    let mut hn = vec![0f32; block * h];
    // Hidden states of the next block's first denoising pass, computed by a fused commit.
    let mut pending: Option<Vec<f32>> = None;
    let mut first_decoded = true;
    let mut commit_passes = 0usize;
    for blk in lay.prefill_blocks..lay.nblocks {
        let s0 = blk * block;
        let s1 = s0 + block;
        let mut cur = initial_rows(s0);
        let mut is_mask: Vec<bool> = (s0..s1).map(|i| i >= p_rows).collect();
        let mut bt = BlockTrace {
            block: blk,
            start: s0,
            prompt_tail: p_rows.saturating_sub(s0).min(block),
            steps: Vec::new(),
            eos_in_block: false,
        };
        let mut step = 0usize;
        while is_mask.iter().any(|&x| x) {
            if obs.cancelled() {
                return Err(Error::Cancelled);
            }
            let probes = first_decoded && obs.wants_probes();
            first_decoded = false;
            let greedy = params.temperature == 0.0 && !probes;
            // Rows still masked: committed rows' predictions are never read.
            let rows: Vec<usize> = (0..block).filter(|&i| is_mask[i]).collect();
            // One hop onto the backend's threads per step: the forward pass (unless the
            // previous commit pass already ran it), the final norm and, when greedy, the
            // fused projection + unmasking pass (spec §8.6).
            let fresh = pending.is_none();
            let picks = on_backend(be, || -> Result<Vec<(usize, f32)>> {
                let x = match pending.take() {
                    Some(x) => x,
                    None => {
                        let mut x = cur.clone();
                        text.forward(be, m.store, &mut x, block, &mut cache, block, 0)?;
                        x
                    }
                };
                text.final_norm(be, &x, &mut hn);
                if !greedy {
                    return Ok(Vec::new());
                }
                let mut hn_masked = Vec::with_capacity(rows.len() * h);
                for &i in &rows {
                    hn_masked.extend_from_slice(&hn[i * h..(i + 1) * h]);
                }
                Ok(text.greedy_tokens(be, m.store, &hn_masked, rows.len()))
            })?;
            if fresh {
                out.forward_calls += 1;
            }
            out.forward_passes += 1;
            let mut conf = vec![None; block];
            let mut x0 = vec![0u32; block];
            if greedy {
                for (&i, (t, c)) in rows.iter().zip(picks) {
                    x0[i] = t as u32;
                    conf[i] = Some(c);
                }
            } else {
                logits.resize(block * vocab, 0.0);
                on_backend(be, || text.logits(be, m.store, &hn, block, &mut logits));
                if probes {
                    emit_logit_probes(obs, &hn, &logits, block, h, vocab);
                }
                for i in 0..block {
                    if is_mask[i] {
                        let (t, c) = sample(
                            &logits[i * vocab..(i + 1) * vocab],
                            params,
                            &mut rng,
                            m.untempered_confidence,
                        );
                        x0[i] = t;
                        conf[i] = Some(c);
                    }
                }
            }
            // Past the schedule (only when steps > B leaves zero entries, or a commit was
            // refused) keep denoising at least one row per step: the reference would leave
            // the block uncommitted here (spec §8.12 item 1).
            let mut n = sched.get(step).copied().unwrap_or(0);
            if step >= steps {
                n = n.max(1);
            }
            let masked_before = is_mask.iter().filter(|&&x| x).count();
            let chosen = choose_transfer(&conf, n, params.strategy, params.threshold);
            let mut st = StepTrace {
                step,
                n_scheduled: n,
                masked_before,
                committed: Vec::new(),
            };
            for &i in &chosen {
                let tok = x0[i];
                let mut row = Vec::with_capacity(h);
                text.embed_into(m.store, &[tok], &mut row)?;
                cur[i * h..(i + 1) * h].copy_from_slice(&row);
                is_mask[i] = false;
                ids[s0 + i] = tok;
                let pos = s0 + i;
                st.committed.push(Commit {
                    pos,
                    token: tok,
                    conf: conf[i].unwrap_or(0.0),
                });
                obs.on_commit(pos, pos - p_rows, tok);
            }
            bt.steps.push(st);
            step += 1;
        }
        // EOS check on the generated part of the finished block (spec §2.5, §8.9).
        let gen_lo = p_rows.max(s0);
        bt.eos_in_block = s1 > p_rows && ids[gen_lo..s1].contains(&EOS_ID);
        let has_next = blk + 1 < lay.nblocks && !bt.eos_in_block;
        if obs.cancelled() {
            return Err(Error::Cancelled);
        }
        // The commit pass: write this block's clean K/V (spec §8.5).
        if params.fuse_commit && has_next {
            let mut x = cur;
            x.extend_from_slice(&initial_rows(s1));
            on_backend(be, || {
                text.forward(be, m.store, &mut x, 2 * block, &mut cache, block, block)
            })?;
            pending = Some(x[block * h..].to_vec());
        } else {
            let mut x = cur;
            on_backend(be, || {
                text.forward(be, m.store, &mut x, block, &mut cache, block, block)
            })?;
            out.forward_calls += 1;
        }
        if params.fuse_commit && has_next {
            out.forward_calls += 1;
        }
        out.forward_passes += 1;
        commit_passes += 1;
        // Invariants (spec §14 item 7): the cache holds exactly the blocks committed so far,
        // and every finished block was committed exactly once.
        debug_assert_eq!(cache.len(), s1, "cache length after committing block {blk}");
        debug_assert_eq!(
            commit_passes,
            blk + 1 - lay.prefill_blocks,
            "one commit pass per finished block"
        );
        for (g, slot) in out.ids.iter_mut().enumerate() {
            *slot = ids[p_rows + g];
        }
        obs.on_block_done(&bt, &out.ids);
        let stop = bt.eos_in_block;
        out.trace.push(bt);
        if stop {
            out.stopped_at_eos = true;
            break;
        }
    }
    Ok(out)
}

/// The first denoising forward's probes (fixture README §5).
fn emit_logit_probes(
    obs: &mut dyn Observer,
    hn: &[f32],
    logits: &[f32],
    rows: usize,
    h: usize,
    vocab: usize,
) {
    obs.probe("first_step_hidden", &[rows, h], ProbeData::F32(hn));
    let k = 64.min(vocab);
    let mut vals = Vec::with_capacity(rows * k);
    let mut idx = Vec::with_capacity(rows * k);
    let mut lse = Vec::with_capacity(rows);
    let tail_from = crate::TOKENIZER_VOCAB.saturating_sub(1).min(vocab);
    let mut tail = Vec::with_capacity(rows * (vocab - tail_from));
    for r in 0..rows {
        let z = &logits[r * vocab..(r + 1) * vocab];
        let mut order: Vec<usize> = (0..vocab).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
        order.truncate(k);
        order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
        vals.extend(order.iter().map(|&i| z[i]));
        idx.extend(order.iter().map(|&i| i as i64));
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let s: f64 = z.iter().map(|&v| libm::exp(v as f64 - m)).sum();
        lse.push((m + libm::log(s)) as f32);
        tail.extend_from_slice(&z[tail_from..]);
    }
    obs.probe(
        "first_step_logits_top64_values",
        &[rows, k],
        ProbeData::F32(&vals),
    );
    obs.probe(
        "first_step_logits_top64_indices",
        &[rows, k],
        ProbeData::I64(&idx),
    );
    obs.probe("first_step_logsumexp", &[rows], ProbeData::F32(&lse));
    obs.probe(
        "first_step_logits_tail",
        &[rows, vocab - tail_from],
        ProbeData::F32(&tail),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_spec_examples() {
        // spec §8.4
        assert_eq!(schedule(8, 8), vec![1; 9]);
        assert_eq!(schedule(8, 4), vec![2; 5]);
        assert_eq!(schedule(8, 3), vec![3, 3, 2, 2]);
        let s = schedule(8, 16);
        assert_eq!(&s[..8], &[1; 8]);
        assert_eq!(&s[8..], &[0; 9]);
        assert!(schedule(8, 0).is_empty());
        assert_eq!(schedule(8, 5), vec![2, 2, 2, 1, 1, 1]);
    }

    #[test]
    fn layout_matches_spec_and_fixtures() {
        // a_text_static8: P = 35, G = 32 -> 9 blocks, total 72, prefill 4 blocks = 32 rows.
        let l = Layout::new(35, 32, 8);
        assert_eq!(
            (l.nblocks, l.total, l.prefill_blocks, l.prefill_length),
            (9, 72, 4, 32)
        );
        // a_img_static8: P = 238 -> prefill 29 blocks (232 rows), 34 blocks.
        let l = Layout::new(238, 32, 8);
        assert_eq!((l.nblocks, l.total, l.prefill_length), (34, 272, 232));
        // P multiple of B: no prompt tail, prefill covers the whole prompt.
        let l = Layout::new(32, 16, 8);
        assert_eq!((l.prefill_length, l.nblocks), (32, 6));
        // Full-diffusion ablation: B >= P + G.
        let l = Layout::new(3, 4, 8);
        assert_eq!((l.nblocks, l.total, l.prefill_blocks), (1, 7, 0));
    }

    #[test]
    fn dynamic_threshold_is_strict_and_falls_back_to_top_n() {
        let conf = [Some(0.85), Some(0.9), None, Some(0.86), Some(0.2)];
        // 0.85 is not > 0.85: only rows 1 and 3 pass.
        assert_eq!(
            choose_transfer(&conf, 2, Strategy::LowConfidenceDynamic, 0.85),
            vec![1, 3]
        );
        assert_eq!(
            choose_transfer(&conf, 1, Strategy::LowConfidenceDynamic, 0.85),
            vec![1, 3]
        );
        // Fewer above threshold than n: top-n by confidence.
        assert_eq!(
            choose_transfer(&conf, 3, Strategy::LowConfidenceDynamic, 0.85),
            vec![1, 3, 0]
        );
        assert_eq!(
            choose_transfer(&conf, 2, Strategy::LowConfidenceStatic, 0.85),
            vec![1, 3]
        );
    }

    #[test]
    fn ties_go_to_the_lowest_row() {
        let conf = [Some(0.5), Some(0.7), Some(0.7), Some(0.7)];
        assert_eq!(
            choose_transfer(&conf, 2, Strategy::LowConfidenceStatic, 0.85),
            vec![1, 2]
        );
    }

    #[test]
    fn greedy_sampling_never_picks_mask_and_uses_lowest_id_on_ties() {
        let mut z = vec![0f32; MASK_ID as usize + 8];
        z[MASK_ID as usize] = 50.0;
        z[7] = 3.0;
        z[9] = 3.0;
        let (t, c) = sample(&z, &GenerateParams::default(), &mut Rng(0), false);
        assert_eq!(t, 7);
        assert!(c < 1e-6, "MASK still counts in the denominator, conf {c}");
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let z: Vec<f32> = (0..1000).map(|i| (i % 17) as f32 * 0.3).collect();
        let p = GenerateParams {
            temperature: 0.8,
            top_k: 3,
            seed: 42,
            ..Default::default()
        };
        let draw = |seed| {
            let mut r = Rng(seed);
            (0..20)
                .map(|_| sample(&z, &p, &mut r, false).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        for t in draw(42) {
            assert_eq!(
                z[t as usize],
                16.0 * 0.3,
                "top-k 3 keeps only the maximal logits"
            );
        }
    }

    #[test]
    fn untempered_confidence_ignores_temperature_and_truncation() {
        // spec §8.6: same draw, confidence from softmax(z) instead of the tempered,
        // top-k-truncated distribution.
        let z: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.5).collect();
        let p = GenerateParams {
            temperature: 0.5,
            top_k: 2,
            seed: 7,
            ..Default::default()
        };
        let (t1, c_tempered) = sample(&z, &p, &mut Rng(7), false);
        let (t2, c_raw) = sample(&z, &p, &mut Rng(7), true);
        assert_eq!(t1, t2);
        let m = z.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let s: f64 = z.iter().map(|&v| libm::exp(v as f64 - m)).sum();
        let want = (libm::exp(z[t1 as usize] as f64 - m) / s) as f32;
        assert!((c_raw - want).abs() < 1e-7, "{c_raw} vs {want}");
        assert!(c_tempered > c_raw * 2.0, "{c_tempered} vs {c_raw}");
    }

    #[test]
    fn params_reject_absurd_values() {
        for p in [
            GenerateParams {
                gen_length: 0,
                ..Default::default()
            },
            GenerateParams {
                gen_length: MAX_GEN_LENGTH + 1,
                ..Default::default()
            },
            GenerateParams {
                steps: 0,
                ..Default::default()
            },
            GenerateParams {
                threshold: 1.5,
                ..Default::default()
            },
            GenerateParams {
                top_p: 0.0,
                ..Default::default()
            },
            GenerateParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(
                matches!(p.validate(), Err(Error::InvalidArgument(_))),
                "{p:?}"
            );
        }
    }
}
