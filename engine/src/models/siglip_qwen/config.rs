//! The SigLIP variant's `config.json` fields (spec §1.2, last column).
//!
//! The checkpoint is a LLaVA-OneVision-style config: Qwen2 text fields at the top level (read
//! by [`crate::config`]) plus `mm_projector_type: "mlp2x_gelu"`, `mm_hidden_size`,
//! `image_aspect_ratio: "anyres_max_4"`, `mm_patch_merge_type: "spatial_unpad"` and
//! `image_grid_pinpoints`. The tower's own geometry is read from a `vision_config` object when
//! present; without one it is the published `siglip2-so400m-patch14-384` (spec §1.2).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde_json::Value;

use crate::config::{
    all_at_most, positive_finite, QwenVisionConfig, MAX_HEADS, MAX_LAYERS, MAX_SIDE, MAX_WIDTH,
};
use crate::error::{Error, Result};

/// SigLIP vision transformer geometry (spec §5.2).
#[derive(Clone, Debug, PartialEq)]
pub struct SiglipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Encoder layers of the tower as published (27 for so400m). The reference deletes the
    /// last one at load (spec §5.2), so [`Self::layers_used`] = this − 1 run.
    pub num_hidden_layers: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    /// Tile side in pixels (384).
    pub image_size: usize,
    pub layer_norm_eps: f32,
}

impl SiglipVisionConfig {
    /// so400m-patch14-384 (spec §1.2): the fallback when config.json has no `vision_config`.
    pub fn so400m() -> Self {
        SiglipVisionConfig {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 27,
            num_heads: 16,
            patch_size: 14,
            image_size: 384,
            layer_norm_eps: 1e-6,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Layers actually run: the last one is dropped (`mm_vision_select_layer = -2`).
    pub fn layers_used(&self) -> usize {
        self.num_hidden_layers - 1
    }

    /// Patches along a tile side: `image_size / patch_size` (27; the Conv2d is "valid", so
    /// the last `image_size mod patch_size` = 6 pixel rows and columns are never read).
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Feature rows per tile (729).
    pub fn patches_per_tile(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }

    /// Values of one patch row of the patch-embedding matmul: 3 · patch².
    pub fn patch_dim(&self) -> usize {
        3 * self.patch_size * self.patch_size
    }

    /// Values of one preprocessed tile `[3, image_size, image_size]`.
    pub fn tile_len(&self) -> usize {
        3 * self.image_size * self.image_size
    }
}

/// How images are cut into tiles (spec §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AspectMode {
    /// `anyres_max_N`: base tile + crops, unpadded feature map downscaled to about N tiles.
    AnyresMax(usize),
    /// `pad`: every image padded to a square, one tile (also used for every image of a
    /// multi-image request, spec §4.2 step 7).
    Pad,
}

/// Everything the SigLIP variant adds to the text config.
#[derive(Clone, Debug, PartialEq)]
pub struct SiglipQwenConfig {
    pub vision: SiglipVisionConfig,
    /// `image_aspect_ratio`.
    pub aspect: AspectMode,
    /// `image_grid_pinpoints` as (width, height), in config order (the selection's tie-break
    /// depends on it).
    pub pinpoints: Vec<(usize, usize)>,
    /// `mm_patch_merge_type` (only `spatial_unpad` is supported).
    pub merge_type: String,
}

fn usize_field(obj: &Value, key: &str, what: &str, default: usize) -> Result<usize> {
    match obj.get(key).filter(|v| !v.is_null()) {
        None => Ok(default),
        Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
            Error::Config(format!(
                "field {what}{key} must be a non-negative integer, found {v}"
            ))
        }),
    }
}

/// Most tiles one pinpoint may hold (so also the longest side of a pinpoint grid).
const MAX_PINPOINT_TILES: usize = 1024;

/// The 36 pinpoints `[i·s, j·s]`, i, j ∈ 1..=6, i-major (spec §1.2, §4.2 step 1).
pub fn default_pinpoints(tile: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::with_capacity(36);
    for i in 1..=6 {
        for j in 1..=6 {
            v.push((i * tile, j * tile));
        }
    }
    v
}

/// LLaVA's string form `"(1x1),...,(6x6)"`: the grid between the first and the last pair,
/// scaled by the tile size (`get_anyres_image_grid_shape`).
fn pinpoints_from_str(s: &str, tile: usize) -> Result<Vec<(usize, usize)>> {
    let mut pairs = Vec::new();
    for part in s.split('(').skip(1) {
        let inner = part.split(')').next().unwrap_or("");
        let mut it = inner.split('x');
        let a = it.next().and_then(|x| x.trim().parse::<usize>().ok());
        let b = it.next().and_then(|x| x.trim().parse::<usize>().ok());
        match (a, b) {
            (Some(a), Some(b)) => pairs.push((a, b)),
            _ => {
                return Err(Error::Config(format!(
                    "image_grid_pinpoints {s:?}: cannot read \"({inner})\" as (AxB)"
                )))
            }
        }
    }
    let (Some(&(a0, b0)), Some(&(a1, b1))) = (pairs.first(), pairs.last()) else {
        return Err(Error::Config(format!(
            "image_grid_pinpoints {s:?} names no (AxB) pair"
        )));
    };
    // No grid side can exceed the 1024 tiles a pinpoint may hold (checked by the caller);
    // refusing larger ones here keeps the expansion below small.
    if a1 > MAX_PINPOINT_TILES || b1 > MAX_PINPOINT_TILES {
        return Err(Error::Config(format!(
            "image_grid_pinpoints {s:?}: a side of more than {MAX_PINPOINT_TILES} tiles"
        )));
    }
    let mut v = Vec::new();
    for i in a0..=a1 {
        for j in b0..=b1 {
            v.push((i * tile, j * tile));
        }
    }
    Ok(v)
}

impl SiglipQwenConfig {
    /// Read the variant's fields from the root of config.json.
    pub fn from_json(root: &Value) -> Result<Self> {
        let vision = match root.get("vision_config").filter(|v| v.is_object()) {
            None => {
                let v = SiglipVisionConfig::so400m();
                if let Some(mm) = root.get("mm_hidden_size").and_then(|x| x.as_u64()) {
                    if mm as usize != v.hidden_size {
                        return Err(Error::Config(format!(
                            "mm_hidden_size {mm} is not the so400m tower's 1152 and config.json has no vision_config describing the tower"
                        )));
                    }
                }
                v
            }
            Some(vc) => {
                let d = SiglipVisionConfig::so400m();
                let p = "vision_config.";
                if let Some(act) = vc.get("hidden_act").and_then(|v| v.as_str()) {
                    if act != "gelu_pytorch_tanh" {
                        return Err(Error::Config(format!(
                            "vision_config.hidden_act {act:?} unsupported (SigLIP uses \"gelu_pytorch_tanh\")"
                        )));
                    }
                }
                let ch = usize_field(vc, "num_channels", p, 3)?;
                if ch != 3 {
                    return Err(Error::Config(format!(
                        "vision_config.num_channels {ch}: images are RGB (3 channels)"
                    )));
                }
                let eps = match vc.get("layer_norm_eps").filter(|v| !v.is_null()) {
                    None => d.layer_norm_eps,
                    Some(v) => v.as_f64().ok_or_else(|| {
                        Error::Config(format!(
                            "field vision_config.layer_norm_eps must be a number, found {v}"
                        ))
                    })? as f32,
                };
                SiglipVisionConfig {
                    hidden_size: usize_field(vc, "hidden_size", p, d.hidden_size)?,
                    intermediate_size: usize_field(
                        vc,
                        "intermediate_size",
                        p,
                        d.intermediate_size,
                    )?,
                    num_hidden_layers: usize_field(
                        vc,
                        "num_hidden_layers",
                        p,
                        d.num_hidden_layers,
                    )?,
                    num_heads: usize_field(vc, "num_attention_heads", p, d.num_heads)?,
                    patch_size: usize_field(vc, "patch_size", p, d.patch_size)?,
                    image_size: usize_field(vc, "image_size", p, d.image_size)?,
                    layer_norm_eps: eps,
                }
            }
        };
        let v = &vision;
        all_at_most(
            "vision_config.",
            &[
                ("num_hidden_layers", v.num_hidden_layers, MAX_LAYERS),
                ("hidden_size", v.hidden_size, MAX_WIDTH),
                ("intermediate_size", v.intermediate_size, MAX_WIDTH),
                ("num_attention_heads", v.num_heads, MAX_HEADS),
                ("patch_size", v.patch_size, MAX_SIDE),
                ("image_size", v.image_size, MAX_SIDE),
            ],
        )?;
        positive_finite("vision_config.layer_norm_eps", v.layer_norm_eps as f64)?;
        if v.num_heads == 0 || v.hidden_size == 0 || v.hidden_size % v.num_heads != 0 {
            return Err(Error::Config(format!(
                "vision hidden_size {} is not a positive multiple of num_attention_heads {}",
                v.hidden_size, v.num_heads
            )));
        }
        if v.num_hidden_layers < 2 {
            return Err(Error::Config(format!(
                "vision num_hidden_layers {} must be at least 2 (the last layer is dropped, spec §5.2)",
                v.num_hidden_layers
            )));
        }
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return Err(Error::Config(format!(
                "vision image_size {} / patch_size {} give no patches",
                v.image_size, v.patch_size
            )));
        }
        if let Some(mm) = root.get("mm_hidden_size").filter(|x| !x.is_null()) {
            if mm.as_u64() != Some(v.hidden_size as u64) {
                return Err(Error::Config(format!(
                    "mm_hidden_size {mm} differs from the vision tower's hidden_size {}",
                    v.hidden_size
                )));
            }
        }

        let aspect_s = root
            .get("image_aspect_ratio")
            .and_then(|v| v.as_str())
            .unwrap_or("anyres_max_4");
        let aspect = if aspect_s == "pad" {
            AspectMode::Pad
        } else if let Some(n) = aspect_s.strip_prefix("anyres_max_") {
            match n.parse::<usize>() {
                Ok(n) if n > 0 => AspectMode::AnyresMax(n),
                _ => {
                    return Err(Error::Config(format!(
                        "image_aspect_ratio {aspect_s:?}: expected anyres_max_N with N >= 1"
                    )))
                }
            }
        } else {
            return Err(Error::Config(format!(
                "image_aspect_ratio {aspect_s:?} unsupported for diffusionvl_qwen; expected \"anyres_max_N\" or \"pad\""
            )));
        };
        let merge_type = root
            .get("mm_patch_merge_type")
            .and_then(|v| v.as_str())
            .unwrap_or("spatial_unpad")
            .to_string();
        if matches!(aspect, AspectMode::AnyresMax(_)) && merge_type != "spatial_unpad" {
            return Err(Error::Config(format!(
                "mm_patch_merge_type {merge_type:?} unsupported with anyres; expected \"spatial_unpad\""
            )));
        }
        let tile = v.image_size;
        let pinpoints = match root.get("image_grid_pinpoints") {
            None | Some(Value::Null) => default_pinpoints(tile),
            Some(Value::String(s)) => pinpoints_from_str(s, tile)?,
            Some(Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for p in a {
                    let pair = p
                        .as_array()
                        .filter(|x| x.len() == 2)
                        .and_then(|x| Some((x[0].as_u64()? as usize, x[1].as_u64()? as usize)));
                    match pair {
                        Some(wh) => out.push(wh),
                        None => {
                            return Err(Error::Config(format!(
                                "image_grid_pinpoints entry {p} is not a [width, height] pair"
                            )))
                        }
                    }
                }
                out
            }
            Some(other) => {
                return Err(Error::Config(format!(
                    "image_grid_pinpoints must be a list of [width, height] pairs, found {other}"
                )))
            }
        };
        if pinpoints.is_empty()
            || pinpoints.iter().any(|&(w, h)| {
                w == 0
                    || h == 0
                    || w % tile != 0
                    || h % tile != 0
                    || (w / tile).saturating_mul(h / tile) > MAX_PINPOINT_TILES
            })
        {
            return Err(Error::Config(format!(
                "image_grid_pinpoints must be non-empty positive multiples of the tile size {tile} (at most {MAX_PINPOINT_TILES} tiles)"
            )));
        }
        Ok(SiglipQwenConfig {
            vision,
            aspect,
            pinpoints,
            merge_type,
        })
    }

    /// The tower in [`QwenVisionConfig`] terms (depth, width, heads, patch; no temporal
    /// patches, no merge, one window = the whole tile), for code that only needs the
    /// geometry (`Config::vision` stays meaningful for every variant).
    pub fn as_vision_descriptor(&self, out_hidden: usize) -> QwenVisionConfig {
        let v = &self.vision;
        QwenVisionConfig {
            depth: v.layers_used(),
            hidden_size: v.hidden_size,
            intermediate_size: v.intermediate_size,
            num_heads: v.num_heads,
            patch_size: v.patch_size,
            temporal_patch_size: 1,
            spatial_merge_size: 1,
            window_size: v.image_size,
            fullatt_block_indexes: (0..v.layers_used()).collect(),
            out_hidden_size: out_hidden,
            in_chans: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_published_tower() {
        let c = SiglipQwenConfig::from_json(&serde_json::json!({"mm_hidden_size": 1152})).unwrap();
        assert_eq!(c.vision, SiglipVisionConfig::so400m());
        assert_eq!(c.vision.layers_used(), 26);
        assert_eq!(c.vision.head_dim(), 72);
        assert_eq!(c.vision.patches_per_tile(), 729);
        assert_eq!(c.aspect, AspectMode::AnyresMax(4));
        assert_eq!(c.pinpoints.len(), 36);
        assert_eq!(c.pinpoints[1], (384, 768));
        assert_eq!(c.pinpoints[6], (768, 384));
    }

    #[test]
    fn string_pinpoints_expand_like_llava() {
        let c = SiglipQwenConfig::from_json(&serde_json::json!({
            "image_grid_pinpoints": "(1x1),...,(6x6)"
        }))
        .unwrap();
        assert_eq!(c.pinpoints, default_pinpoints(384));
    }

    #[test]
    fn bad_fields_are_named() {
        for (j, needle) in [
            (
                serde_json::json!({"image_aspect_ratio": "anyres"}),
                "image_aspect_ratio",
            ),
            (
                serde_json::json!({"mm_patch_merge_type": "flat"}),
                "mm_patch_merge_type",
            ),
            (serde_json::json!({"mm_hidden_size": 64}), "vision_config"),
            (
                serde_json::json!({"image_grid_pinpoints": [[384, 100]]}),
                "image_grid_pinpoints",
            ),
            (
                serde_json::json!({"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}),
                "num_attention_heads",
            ),
            // Absurd sizes are refused before a tile or a pinpoint list is sized from them.
            (
                serde_json::json!({"vision_config": {"image_size": 1u64 << 40}}),
                "vision_config.image_size",
            ),
            (
                serde_json::json!({"vision_config": {"num_hidden_layers": 1u64 << 40}}),
                "vision_config.num_hidden_layers",
            ),
            (
                serde_json::json!({"vision_config": {"layer_norm_eps": 0.0}}),
                "layer_norm_eps",
            ),
            (
                serde_json::json!({"image_grid_pinpoints": "(1x1),...,(100000000x100000000)"}),
                "image_grid_pinpoints",
            ),
            (
                serde_json::json!({"image_grid_pinpoints": [[384u64 << 40, 384u64 << 40]]}),
                "image_grid_pinpoints",
            ),
        ] {
            let e = SiglipQwenConfig::from_json(&j).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
