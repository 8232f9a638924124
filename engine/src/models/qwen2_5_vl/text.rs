//! Qwen2 / Qwen2.5-VL text decoder with block-causal attention (spec §7).

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use dvl_kernels::attention::AttnShape;
use dvl_kernels::bf16;
use dvl_kernels::packed::PackedBf16;

use crate::backend::{Backend, Projection};
use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::weights::{TensorInfo, WData, WeightStore};

/// A linear layer: weight viewed in the checkpoint (or repacked into panels, see
/// [`TextModel::pack_weights`]), bias widened to f32 at load.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: TensorInfo,
    pub b: Option<Vec<f32>>,
    pub n_out: usize,
    pub n_in: usize,
    pub packed: Option<PackedBf16>,
}

/// Repacks one bf16 matrix (`n` rows of `k`) into panels; the engine's version uses its
/// threads.
pub type PackFn<'p> = &'p (dyn Fn(&[bf16], usize, usize) -> PackedBf16 + Sync);

/// `packed` when there is one, else the tensor `t` as stored.
fn panels_or_stored<'a>(
    packed: Option<&'a PackedBf16>,
    store: &'a WeightStore<'_>,
    t: &'a TensorInfo,
) -> WData<'a> {
    match packed {
        Some(p) => WData::Packed(p),
        None => store.data(t),
    }
}

/// `w` repacked by `pack` when it is a bf16 matrix, else `None`.
fn pack_bf16(w: WData<'_>, n: usize, k: usize, pack: PackFn<'_>) -> Option<PackedBf16> {
    match w {
        WData::BF16(s) => Some(pack(s, n, k)),
        _ => None,
    }
}

impl Linear {
    pub fn load(
        store: &WeightStore<'_>,
        prefix: &str,
        n_out: usize,
        n_in: usize,
        bias: bool,
    ) -> Result<Self> {
        let w = store
            .expect(&format!("{prefix}.weight"), &[n_out, n_in])?
            .clone();
        let b = if bias {
            Some(store.f32_vec(&format!("{prefix}.bias"), &[n_out])?)
        } else {
            None
        };
        Ok(Linear {
            w,
            b,
            n_out,
            n_in,
            packed: None,
        })
    }

    /// The weights the kernels read: the panels when packed, else the checkpoint's.
    pub fn weights<'a>(&'a self, store: &'a WeightStore<'_>) -> WData<'a> {
        panels_or_stored(self.packed.as_ref(), store, &self.w)
    }

    /// Repack the weight into panels (bf16 weights only).
    pub fn pack(&mut self, store: &WeightStore<'_>, pack: PackFn<'_>) {
        self.packed = pack_bf16(store.data(&self.w), self.n_out, self.n_in, pack);
    }

    /// This layer as one of several projections of the same input (`matmul_many`),
    /// writing `out`.
    pub fn projection<'a>(
        &'a self,
        store: &'a WeightStore<'_>,
        out: &'a mut [f32],
    ) -> Projection<'a> {
        Projection {
            w: self.weights(store),
            n: self.n_out,
            bias: self.b.as_deref(),
            out,
        }
    }

    /// Weights and bias, as `matmul_swiglu` takes them.
    pub fn operands<'a>(&'a self, store: &'a WeightStore<'_>) -> (WData<'a>, Option<&'a [f32]>) {
        (self.weights(store), self.b.as_deref())
    }

    /// `out[m, n_out] = x[m, n_in] · Wᵀ + b`.
    pub fn forward(
        &self,
        be: &dyn Backend,
        store: &WeightStore<'_>,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        be.matmul(
            x,
            m,
            self.n_in,
            self.weights(store),
            self.n_out,
            self.b.as_deref(),
            out,
        );
    }
}

pub struct TextLayer {
    pub input_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl TextLayer {
    /// The seven projections.
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    /// The seven projections, to repack or unpack.
    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

pub struct TextModel {
    pub cfg: TextConfig,
    pub embed: TensorInfo,
    pub layers: Vec<TextLayer>,
    pub norm: Vec<f32>,
    /// `lm_head.weight`, or `model.embed_tokens.weight` when tied (3B; spec §1.3.1).
    pub lm_head: TensorInfo,
    /// `lm_head` repacked into panels ([`TextModel::pack_weights`]); a tied table stays as
    /// stored too, for the embedding lookups.
    pub lm_head_packed: Option<PackedBf16>,
    /// RoPE inverse frequencies `θ^(−2i/d)`, i < d/2 (spec §7.2).
    inv_freq: Vec<f64>,
}

/// Per-layer K/V of committed blocks, plus room for the chunk being run (spec §7.3).
///
/// A forward writes its chunk's K/V after the committed rows and attends over both; only
/// `store_rows` of them become committed (`len` advances). The rest is overwritten by the
/// next forward: this is the "attend over cache ∪ chunk without modifying the cache" of a
/// denoising step, without copying the cache.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    kv_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    pub fn new(cfg: &TextConfig, capacity: usize) -> Self {
        let kv_dim = cfg.num_kv_heads * cfg.head_dim;
        KvCache {
            k: (0..cfg.num_layers)
                .map(|_| vec![0f32; capacity * kv_dim])
                .collect(),
            v: (0..cfg.num_layers)
                .map(|_| vec![0f32; capacity * kv_dim])
                .collect(),
            kv_dim,
            capacity,
            len: 0,
        }
    }

    /// Committed rows.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forget committed rows past `len` (benchmarks re-run the same commit).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// Keys visible to the query at absolute position `pos` (spec §7.3, §8.2): `mask[i][j] = 0`
/// iff `j / B <= i / B`. With keys at positions `0..n_keys` that is the prefix up to the end
/// of the query's block.
pub fn block_causal_keys(pos: usize, n_keys: usize, block: usize) -> (usize, usize) {
    (0, n_keys.min((pos / block + 1) * block))
}

impl TextModel {
    pub fn load(store: &WeightStore<'_>, cfg: &TextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        let qd = cfg.num_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        let embed = store
            .expect("model.embed_tokens.weight", &[cfg.vocab_size, h])?
            .clone();
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            store
                .expect("lm_head.weight", &[cfg.vocab_size, h])?
                .clone()
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            layers.push(TextLayer {
                input_norm: store.f32_vec(&format!("{p}.input_layernorm.weight"), &[h])?,
                q: Linear::load(store, &format!("{p}.self_attn.q_proj"), qd, h, true)?,
                k: Linear::load(store, &format!("{p}.self_attn.k_proj"), kvd, h, true)?,
                v: Linear::load(store, &format!("{p}.self_attn.v_proj"), kvd, h, true)?,
                o: Linear::load(store, &format!("{p}.self_attn.o_proj"), h, qd, false)?,
                post_norm: store.f32_vec(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate: Linear::load(store, &format!("{p}.mlp.gate_proj"), i, h, false)?,
                up: Linear::load(store, &format!("{p}.mlp.up_proj"), i, h, false)?,
                down: Linear::load(store, &format!("{p}.mlp.down_proj"), h, i, false)?,
            });
        }
        let norm = store.f32_vec("model.norm.weight", &[h])?;
        let half = cfg.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| libm::pow(cfg.rope_theta, -2.0 * i as f64 / cfg.head_dim as f64))
            .collect();
        Ok(TextModel {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            lm_head_packed: None,
            inv_freq,
        })
    }

    /// Repack the bf16 matrices that every denoising step streams (the layers' seven
    /// projections and the lm_head) into 16-output panels ([`dvl_kernels::packed`]), for
    /// the AVX2 kernels: a copy of those weights, made once. Other weight types stay as
    /// stored.
    pub fn pack_weights(&mut self, store: &WeightStore<'_>, pack: PackFn<'_>) {
        for l in &mut self.layers {
            for lin in l.linears_mut() {
                lin.pack(store, pack);
            }
        }
        let (n, k) = (self.cfg.vocab_size, self.cfg.hidden_size);
        self.lm_head_packed = pack_bf16(store.data(&self.lm_head), n, k, pack);
    }

    /// The panels, in the order [`TextModel::pack_weights`] makes them (the layers' seven
    /// projections, then the lm_head).
    pub fn packed_matrices(&self) -> Vec<&PackedBf16> {
        let layers = self.layers.iter().flat_map(|l| l.linears());
        layers
            .filter_map(|lin| lin.packed.as_ref())
            .chain(self.lm_head_packed.as_ref())
            .collect()
    }

    /// Bytes held in panels.
    pub fn packed_bytes(&self) -> usize {
        let layers = self.layers.iter().flat_map(|l| l.linears());
        let bytes = |p: Option<&PackedBf16>| p.map_or(0, PackedBf16::bytes);
        layers.map(|lin| bytes(lin.packed.as_ref())).sum::<usize>()
            + bytes(self.lm_head_packed.as_ref())
    }

    /// Drop the panels: the kernels read the checkpoint's weights as stored again.
    pub fn unpack_weights(&mut self) {
        for l in &mut self.layers {
            for lin in l.linears_mut() {
                lin.packed = None;
            }
        }
        self.lm_head_packed = None;
    }

    /// The lm_head weights the kernels read: the panels when packed, else the checkpoint's.
    fn lm_head_weights<'a>(&'a self, store: &'a WeightStore<'_>) -> WData<'a> {
        panels_or_stored(self.lm_head_packed.as_ref(), store, &self.lm_head)
    }

    /// Embedding rows of `ids` appended to `out` (spec §6).
    pub fn embed_into(
        &self,
        store: &WeightStore<'_>,
        ids: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let h = self.cfg.hidden_size;
        let table = store.data(&self.embed);
        for &id in ids {
            if id as usize >= self.cfg.vocab_size {
                return Err(Error::InvalidArgument(format!(
                    "token id {id} is outside the embedding table ({} rows)",
                    self.cfg.vocab_size
                )));
            }
            let start = out.len();
            out.resize(start + h, 0.0);
            table.read_f32(id as usize * h, &mut out[start..]);
        }
        Ok(())
    }

    /// cos/sin tables (`concat(φ, φ)`) for `positions`, angles in f64 (spec §7.2).
    fn rope_tables(&self, pos0: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.cfg.head_dim;
        let half = d / 2;
        let mut cos = vec![0f32; n * d];
        let mut sin = vec![0f32; n * d];
        for t in 0..n {
            let p = (pos0 + t) as f64;
            for i in 0..half {
                let a = p * self.inv_freq[i];
                let (s, c) = (libm::sin(a) as f32, libm::cos(a) as f32);
                cos[t * d + i] = c;
                cos[t * d + half + i] = c;
                sin[t * d + i] = s;
                sin[t * d + half + i] = s;
            }
        }
        (cos, sin)
    }

    /// Run the decoder over `t` rows of `x` (the residual stream, `[t, H]`, updated in place)
    /// at positions `cache.len() ..`, block-causal with block `block` (spec §7.1, §7.3).
    /// The first `store_rows` rows' K/V are committed to the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        be: &dyn Backend,
        store: &WeightStore<'_>,
        x: &mut [f32],
        t: usize,
        cache: &mut KvCache,
        block: usize,
        store_rows: usize,
    ) -> Result<()> {
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let qd = c.num_heads * hd;
        let kvd = cache.kv_dim;
        let pos0 = cache.len;
        if !pos0.is_multiple_of(block) {
            return Err(Error::InvalidArgument(format!(
                "forward must start at a block boundary (cache {pos0}, block {block})"
            )));
        }
        if pos0 + t > cache.capacity {
            return Err(Error::InvalidArgument(format!(
                "sequence of {} rows exceeds the KV cache capacity {}",
                pos0 + t,
                cache.capacity
            )));
        }
        debug_assert!(store_rows <= t && x.len() == t * h);
        let (cos, sin) = self.rope_tables(pos0, t);
        let mut a = vec![0f32; t * h];
        let mut q = vec![0f32; t * qd];
        let mut kbuf = vec![0f32; t * kvd];
        let mut vbuf = vec![0f32; t * kvd];
        let mut att = vec![0f32; t * qd];
        let mut proj = vec![0f32; t * h];
        let mut gate = vec![0f32; t * c.intermediate_size];
        let n_keys = pos0 + t;
        let keys = |i: usize| block_causal_keys(pos0 + i, n_keys, block);
        let shape = AttnShape {
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: hd,
            q_stride: qd,
            kv_stride: kvd,
        };
        let scale = 1.0 / libm::sqrtf(hd as f32);
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention (§7.1): RMSNorm, q/k/v projections, RoPE on q and k (§7.2), K/V
            // appended to the cache, block-causal attention (§7.3), output projection.
            be.rms_norm(x, &layer.input_norm, c.rms_norm_eps, &mut a);
            be.matmul_many(
                &a,
                t,
                h,
                &mut [
                    layer.q.projection(store, &mut q),
                    layer.k.projection(store, &mut kbuf),
                    layer.v.projection(store, &mut vbuf),
                ],
            );
            be.rope(&mut q, t, c.num_heads, hd, qd, &cos, &sin);
            be.rope(&mut kbuf, t, c.num_kv_heads, hd, kvd, &cos, &sin);
            cache.k[l][pos0 * kvd..(pos0 + t) * kvd].copy_from_slice(&kbuf);
            cache.v[l][pos0 * kvd..(pos0 + t) * kvd].copy_from_slice(&vbuf);
            be.attention(
                &q,
                t,
                &cache.k[l][..n_keys * kvd],
                &cache.v[l][..n_keys * kvd],
                &mut att,
                shape,
                scale,
                &keys,
            );
            layer.o.forward(be, store, &att, t, &mut proj);
            be.add_inplace(x, &proj);
            // SwiGLU MLP (§7.1): down(silu(gate(a)) ⊙ up(a)), residual.
            be.rms_norm(x, &layer.post_norm, c.rms_norm_eps, &mut a);
            be.matmul_swiglu(
                &a,
                t,
                h,
                layer.gate.operands(store),
                layer.up.operands(store),
                c.intermediate_size,
                &mut gate,
            );
            layer.down.forward(be, store, &gate, t, &mut proj);
            be.add_inplace(x, &proj);
        }
        cache.len += store_rows;
        Ok(())
    }

    /// Final RMSNorm of `rows` rows of the residual stream.
    pub fn final_norm(&self, be: &dyn Backend, x: &[f32], out: &mut [f32]) {
        be.rms_norm(x, &self.norm, self.cfg.rms_norm_eps, out);
    }

    /// Greedy unmasking of `rows` final-norm rows: (arg-max id, its probability) per row,
    /// MASK never chosen (spec §8.6, §8.11), without materialising the logits.
    pub fn greedy_tokens(
        &self,
        be: &dyn Backend,
        store: &WeightStore<'_>,
        hn: &[f32],
        rows: usize,
    ) -> Vec<(usize, f32)> {
        be.logits_argmax(
            hn,
            rows,
            self.cfg.hidden_size,
            self.lm_head_weights(store),
            self.cfg.vocab_size,
            Some(crate::MASK_ID as usize),
        )
    }

    /// `logits[rows, V] = hN · W_lmᵀ` (no shift: row i scores the token at row i, spec §0).
    pub fn logits(
        &self,
        be: &dyn Backend,
        store: &WeightStore<'_>,
        hn: &[f32],
        rows: usize,
        out: &mut [f32],
    ) {
        be.matmul(
            hn,
            rows,
            self.cfg.hidden_size,
            self.lm_head_weights(store),
            self.cfg.vocab_size,
            None,
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::block_causal_keys;

    #[test]
    fn block_causal_ranges_equal_the_spec_mask() {
        // spec §8.2: mask_full[i][j] = 0 iff floor(i/B) >= floor(j/B).
        for block in [1, 3, 8] {
            for n_keys in [1, 7, 8, 9, 24, 30] {
                for pos in 0..n_keys {
                    let (lo, hi) = block_causal_keys(pos, n_keys, block);
                    for j in 0..n_keys {
                        let visible = pos / block >= j / block;
                        assert_eq!(visible, (lo..hi).contains(&j), "B={block} pos={pos} j={j}");
                    }
                }
            }
        }
        // Bidirectional inside a block: the first row of a block sees the whole block.
        assert_eq!(block_causal_keys(16, 40, 8), (0, 24));
    }
}
