//! `mlp2x_gelu` projector (spec §5.2, PB L41–48): `Linear(C→H) → GELU(erf) → Linear(H→H)`,
//! applied to every feature row of every tile.

use alloc::vec;
use alloc::vec::Vec;

use crate::backend::Backend;
use crate::error::Result;
use crate::models::qwen2_5_vl::text::Linear;
use crate::weights::WeightStore;

pub struct Projector {
    l0: Linear,
    l2: Linear,
}

impl Projector {
    /// `model.mm_projector.0` `[H, C]` and `model.mm_projector.2` `[H, H]`, both biased
    /// (`.1` is the parameter-free GELU).
    pub fn load(store: &WeightStore<'_>, vision_hidden: usize, text_hidden: usize) -> Result<Self> {
        Ok(Projector {
            l0: Linear::load(
                store,
                "model.mm_projector.0",
                text_hidden,
                vision_hidden,
                true,
            )?,
            l2: Linear::load(
                store,
                "model.mm_projector.2",
                text_hidden,
                text_hidden,
                true,
            )?,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.l2.n_out
    }

    /// `x [rows, C]` → `[rows, H]`.
    pub fn forward(
        &self,
        be: &dyn Backend,
        store: &WeightStore<'_>,
        x: &[f32],
        rows: usize,
    ) -> Vec<f32> {
        let mut h = vec![0f32; rows * self.l0.n_out];
        self.l0.forward(be, store, x, rows, &mut h);
        be.gelu_erf(&mut h);
        let mut out = vec![0f32; rows * self.l2.n_out];
        self.l2.forward(be, store, &h, rows, &mut out);
        out
    }
}
