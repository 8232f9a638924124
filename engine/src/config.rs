//! `config.json` of a DiffusionVL checkpoint (spec §1.2).
//!
//! The VL configs copy every text field to the top level and also keep `text_config`; we read
//! the top level first and fall back to `text_config`, so either layout loads.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::siglip_qwen::SiglipQwenConfig;

/// Model types this engine runs (spec §1.1): the Qwen2.5-VL variants (3B, 7B) and the
/// SigLIP variant (DiffusionVL-Qwen2.5-7B).
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["diffusionvl_qwenvl", "diffusionvl_qwen"];

/// `model_type` of DiffusionVL-Qwen2.5-7B (SigLIP + anyres, spec §1.2).
pub const SIGLIP_MODEL_TYPE: &str = "diffusionvl_qwen";

/// Qwen2 / Qwen2.5-VL text decoder (spec §7).
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
}

impl TextConfig {
    /// The sizes against their limits ([`MAX_LAYERS`] …), before any buffer is sized from
    /// them, and the norm epsilon and RoPE base positive and finite.
    fn check_sizes(&self) -> Result<()> {
        all_at_most(
            "",
            &[
                ("num_hidden_layers", self.num_layers, MAX_LAYERS),
                ("hidden_size", self.hidden_size, MAX_WIDTH),
                ("intermediate_size", self.intermediate_size, MAX_WIDTH),
                ("num_attention_heads", self.num_heads, MAX_HEADS),
                ("num_key_value_heads", self.num_kv_heads, MAX_HEADS),
                ("head_dim", self.head_dim, 1024),
                ("vocab_size", self.vocab_size, MAX_VOCAB),
            ],
        )?;
        positive_finite("rms_norm_eps", self.rms_norm_eps as f64)?;
        positive_finite("rope_theta", self.rope_theta)?;
        Ok(())
    }
}

/// Qwen2.5-VL vision transformer (spec §1.2 vision table, §5.1).
#[derive(Clone, Debug, PartialEq)]
pub struct QwenVisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub out_hidden_size: usize,
    pub in_chans: usize,
}

impl QwenVisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Values per patch row: channels × temporal × patch × patch (1176 for the real tower).
    pub fn patch_dim(&self) -> usize {
        self.in_chans * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    /// Merge unit: spatial_merge² patches become one LLM token.
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// The sizes against their limits, as [`TextConfig::check_sizes`]. Channels, temporal
    /// patches and the merge side (3, 2 and 2 in every release) are held to 16 so the
    /// products of patch geometry stay far from overflow.
    fn check_sizes(&self) -> Result<()> {
        all_at_most(
            "vision_config.",
            &[
                ("depth", self.depth, MAX_LAYERS),
                ("hidden_size", self.hidden_size, MAX_WIDTH),
                ("intermediate_size", self.intermediate_size, MAX_WIDTH),
                ("num_heads", self.num_heads, MAX_HEADS),
                ("out_hidden_size", self.out_hidden_size, MAX_WIDTH),
                ("patch_size", self.patch_size, MAX_SIDE),
                ("window_size", self.window_size, MAX_SIDE),
                ("temporal_patch_size", self.temporal_patch_size, 16),
                ("spatial_merge_size", self.spatial_merge_size, 16),
                ("in_chans", self.in_chans, 16),
            ],
        )?;
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub model_type: String,
    pub text: TextConfig,
    /// The Qwen2.5-VL tower. For `diffusionvl_qwen` it describes the SigLIP tower in the same
    /// terms (no temporal patches, no merge; see [`SiglipQwenConfig::as_vision_descriptor`]);
    /// the variant's own configuration is [`Config::siglip`].
    pub vision: QwenVisionConfig,
    /// SigLIP tower, tiling and merge of `diffusionvl_qwen` (spec §1.2, §4.2, §5.2); `None`
    /// for the Qwen2.5-VL variants.
    pub siglip: Option<SiglipQwenConfig>,
    /// `bd3lm_block_size` (spec §8.1; default 8).
    pub block_size: usize,
    /// Image pixel range for `smart_resize` (spec §4.1, §12 Q4).
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub projector_type: String,
    /// Assembled prompts are truncated to this many rows (spec §6 step 3).
    pub max_prompt_rows: usize,
}

/// Upper bounds on the sizes a config.json may declare, checked before anything is sized from
/// them. Each is far above every published Qwen2.5 / Qwen2.5-VL / SigLIP checkpoint (at most
/// 80 layers, widths up to 29,568, 64 heads, a 152,064-token vocabulary), so only a damaged
/// or mislabelled config meets one, and it gets an error naming the field instead of an
/// allocation failure or hours of work.
pub(crate) const MAX_LAYERS: usize = 1024;
/// Hidden, intermediate and head widths.
pub(crate) const MAX_WIDTH: usize = 1 << 17;
pub(crate) const MAX_HEADS: usize = 1024;
pub(crate) const MAX_VOCAB: usize = 1 << 24;
/// Patch, tile and window sides in pixels.
pub(crate) const MAX_SIDE: usize = 4096;
/// `max_pixels`: 16384².
pub(crate) const MAX_PIXELS: usize = 1 << 28;

/// `value` of the field `what` if it is at most `max`, else an error naming both.
pub(crate) fn at_most(what: &str, value: usize, max: usize) -> Result<usize> {
    if value > max {
        return Err(Error::Config(format!(
            "field {what} is {value}, more than the {max} dvl accepts (a damaged or mislabelled config.json?)"
        )));
    }
    Ok(value)
}

/// Each `(field, value, max)` of `table` through [`at_most`], the field names after `prefix`.
pub(crate) fn all_at_most(prefix: &str, table: &[(&str, usize, usize)]) -> Result<()> {
    for &(what, value, max) in table {
        at_most(&format!("{prefix}{what}"), value, max)?;
    }
    Ok(())
}

/// A float field that must be finite and positive (norm epsilons, RoPE bases): a zero,
/// negative or infinite one would fill every hidden state with NaN.
pub(crate) fn positive_finite(what: &str, value: f64) -> Result<f64> {
    if !(value.is_finite() && value > 0.0) {
        return Err(Error::Config(format!(
            "field {what} must be a positive finite number, found {value}"
        )));
    }
    Ok(value)
}

fn field<'v>(root: &'v Value, key: &str) -> Option<&'v Value> {
    root.get(key).filter(|v| !v.is_null()).or_else(|| {
        root.get("text_config")
            .and_then(|t| t.get(key))
            .filter(|v| !v.is_null())
    })
}

fn usize_of(v: &Value, what: &str) -> Result<usize> {
    v.as_u64().map(|x| x as usize).ok_or_else(|| {
        Error::Config(format!(
            "field {what} must be a non-negative integer, found {v}"
        ))
    })
}

fn req_usize(root: &Value, key: &str) -> Result<usize> {
    let v = field(root, key).ok_or_else(|| Error::Config(format!("missing field {key}")))?;
    usize_of(v, key)
}

fn opt_usize(root: &Value, key: &str, default: usize) -> Result<usize> {
    match root.get(key).filter(|v| !v.is_null()) {
        Some(v) => usize_of(v, key),
        None => Ok(default),
    }
}

fn f64_of(root: &Value, key: &str, default: f64) -> Result<f64> {
    match field(root, key) {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| Error::Config(format!("field {key} must be a number, found {v}"))),
        None => Ok(default),
    }
}

impl Config {
    pub fn from_json(bytes: &[u8]) -> Result<Config> {
        let root: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::Config(format!("config.json is not valid JSON: {e}")))?;
        if !root.is_object() {
            return Err(Error::Config(
                "config.json must be a JSON object".to_string(),
            ));
        }
        let model_type = root
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Config("missing field model_type".to_string()))?
            .to_string();
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(Error::UnsupportedModel {
                model_type,
                supported: SUPPORTED_MODEL_TYPES,
            });
        }
        let hidden_size = req_usize(&root, "hidden_size")?;
        let num_heads = req_usize(&root, "num_attention_heads")?;
        let num_kv_heads = match field(&root, "num_key_value_heads") {
            Some(v) => usize_of(v, "num_key_value_heads")?,
            None => num_heads,
        };
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(Error::Config(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
            )));
        }
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = match field(&root, "head_dim") {
            Some(v) => usize_of(v, "head_dim")?,
            None => hidden_size / num_heads,
        };
        if head_dim % 2 != 0 {
            return Err(Error::Config(format!(
                "head_dim {head_dim} must be even for RoPE"
            )));
        }
        if let Some(act) = field(&root, "hidden_act").and_then(|v| v.as_str()) {
            if act != "silu" {
                return Err(Error::Config(format!(
                    "hidden_act {act:?} unsupported (expected \"silu\")"
                )));
            }
        }
        let text = TextConfig {
            hidden_size,
            intermediate_size: req_usize(&root, "intermediate_size")?,
            num_layers: req_usize(&root, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req_usize(&root, "vocab_size")?,
            rms_norm_eps: f64_of(&root, "rms_norm_eps", 1e-6)? as f32,
            rope_theta: f64_of(&root, "rope_theta", 1e6)?,
            tie_word_embeddings: field(&root, "tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            max_position_embeddings: match field(&root, "max_position_embeddings") {
                Some(v) => usize_of(v, "max_position_embeddings")?,
                None => 32768,
            },
        };
        text.check_sizes()?;
        if text.vocab_size <= crate::MASK_ID as usize {
            return Err(Error::Config(format!(
                "vocab_size {} has no row for the MASK id {} (spec §14 item 1)",
                text.vocab_size,
                crate::MASK_ID
            )));
        }
        let block_size = opt_usize(&root, "bd3lm_block_size", 8)?;
        if block_size == 0 {
            return Err(Error::Config(
                "bd3lm_block_size must be at least 1".to_string(),
            ));
        }
        at_most(
            "bd3lm_block_size",
            block_size,
            crate::decoder::MAX_BLOCK_SIZE,
        )?;
        let max_prompt_rows = opt_usize(&root, "tokenizer_model_max_length", 8192)?;
        if model_type == SIGLIP_MODEL_TYPE {
            let projector_type = root
                .get("mm_projector_type")
                .and_then(|v| v.as_str())
                .unwrap_or("mlp2x_gelu")
                .to_string();
            if projector_type != "mlp2x_gelu" {
                return Err(Error::Config(format!(
                    "mm_projector_type {projector_type:?} unsupported for {SIGLIP_MODEL_TYPE}; expected \"mlp2x_gelu\""
                )));
            }
            let siglip = SiglipQwenConfig::from_json(&root)?;
            return Ok(Config {
                model_type,
                vision: siglip.as_vision_descriptor(hidden_size),
                text,
                siglip: Some(siglip),
                block_size,
                min_pixels: 147_456,
                max_pixels: 262_144,
                projector_type,
                max_prompt_rows,
            });
        }
        let vc = root
            .get("vision_config")
            .filter(|v| v.is_object())
            .ok_or_else(|| Error::Config("missing object vision_config".to_string()))?;
        let v_req = |k: &str| -> Result<usize> {
            let v = vc
                .get(k)
                .ok_or_else(|| Error::Config(format!("missing field vision_config.{k}")))?;
            usize_of(v, &format!("vision_config.{k}"))
        };
        let v_opt = |k: &str, d: usize| -> Result<usize> {
            match vc.get(k).filter(|v| !v.is_null()) {
                Some(v) => usize_of(v, &format!("vision_config.{k}")),
                None => Ok(d),
            }
        };
        let fullatt = match vc.get("fullatt_block_indexes") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| usize_of(v, "vision_config.fullatt_block_indexes"))
                .collect::<Result<Vec<_>>>()?,
            _ => Vec::new(),
        };
        let vision = QwenVisionConfig {
            depth: v_req("depth")?,
            hidden_size: v_req("hidden_size")?,
            intermediate_size: v_req("intermediate_size")?,
            num_heads: v_req("num_heads")?,
            patch_size: v_opt("patch_size", 14)?,
            temporal_patch_size: v_opt("temporal_patch_size", 2)?,
            spatial_merge_size: v_opt("spatial_merge_size", 2)?,
            window_size: v_opt("window_size", 112)?,
            fullatt_block_indexes: fullatt,
            out_hidden_size: v_opt("out_hidden_size", hidden_size)?,
            in_chans: match vc.get("in_chans").or_else(|| vc.get("in_channels")) {
                Some(v) => usize_of(v, "vision_config.in_chans")?,
                None => 3,
            },
        };
        vision.check_sizes()?;
        if vision.num_heads == 0
            || !vision.hidden_size.is_multiple_of(vision.num_heads)
            || !vision.head_dim().is_multiple_of(4)
        {
            return Err(Error::Config(format!(
                "vision hidden_size {} / num_heads {} must give a head_dim divisible by 4 (2-D RoPE)",
                vision.hidden_size, vision.num_heads
            )));
        }
        if vision.out_hidden_size != hidden_size {
            return Err(Error::Config(format!(
                "vision_config.out_hidden_size {} differs from hidden_size {hidden_size}",
                vision.out_hidden_size
            )));
        }
        let unit = vision.patch_size * vision.spatial_merge_size;
        if vision.patch_size == 0
            || vision.spatial_merge_size == 0
            || vision.window_size == 0
            || !vision.window_size.is_multiple_of(unit)
        {
            return Err(Error::Config(format!(
                "vision window_size {} must be a positive multiple of patch_size × spatial_merge_size = {unit}",
                vision.window_size
            )));
        }
        let projector_type = root
            .get("mm_projector_type")
            .and_then(|v| v.as_str())
            .unwrap_or("qwen_merger")
            .to_string();
        if projector_type != "qwen_merger" {
            return Err(Error::Config(format!(
                "mm_projector_type {projector_type:?} unsupported for {}; expected \"qwen_merger\"",
                SUPPORTED_MODEL_TYPES[0]
            )));
        }
        let min_pixels = opt_usize(&root, "min_pixels", 147_456)?;
        let max_pixels = at_most(
            "max_pixels",
            opt_usize(&root, "max_pixels", 262_144)?,
            MAX_PIXELS,
        )?;
        if min_pixels > max_pixels {
            return Err(Error::Config(format!(
                "min_pixels {min_pixels} > max_pixels {max_pixels}"
            )));
        }
        Ok(Config {
            model_type,
            text,
            vision,
            siglip: None,
            block_size,
            min_pixels,
            max_pixels,
            projector_type,
            max_prompt_rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"{"model_type":"diffusionvl_qwenvl","text_config":{"hidden_size":64,"intermediate_size":160,
      "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":151936},
      "vision_config":{"depth":4,"hidden_size":64,"intermediate_size":96,"num_heads":2,"out_hidden_size":64}}"#;

    #[test]
    fn text_fields_fall_back_to_text_config_and_defaults_apply() {
        let c = Config::from_json(MIN.as_bytes()).unwrap();
        assert_eq!(c.text.head_dim, 16);
        assert_eq!(c.block_size, 8);
        assert_eq!((c.min_pixels, c.max_pixels), (147_456, 262_144));
        assert_eq!(c.vision.patch_dim(), 1176);
        assert_eq!(c.text.rope_theta, 1e6);
    }

    #[test]
    fn unknown_model_type_lists_supported_ones() {
        let e = Config::from_json(br#"{"model_type":"llama"}"#).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("llama") && msg.contains("diffusionvl_qwenvl"),
            "{msg}"
        );
    }

    #[test]
    fn siglip_variant_is_detected() {
        let j = r#"{"model_type":"diffusionvl_qwen","hidden_size":64,"intermediate_size":160,
          "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":151936,
          "mm_projector_type":"mlp2x_gelu","mm_hidden_size":1152,"image_aspect_ratio":"anyres_max_4",
          "mm_patch_merge_type":"spatial_unpad","image_grid_pinpoints":[[384,384],[384,768]]}"#;
        let c = Config::from_json(j.as_bytes()).unwrap();
        let s = c.siglip.as_ref().unwrap();
        assert_eq!(s.pinpoints, vec![(384, 384), (384, 768)]);
        assert_eq!(s.vision.layers_used(), 26);
        assert_eq!((c.vision.depth, c.vision.hidden_size), (26, 1152));
        assert_eq!(c.projector_type, "mlp2x_gelu");
        // The Qwen-VL projector is not accepted for this variant, and vice versa.
        let bad = j.replace("mlp2x_gelu", "qwen_merger");
        assert!(Config::from_json(bad.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("mlp2x_gelu"));
        assert!(Config::from_json(MIN.as_bytes()).unwrap().siglip.is_none());
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_is_sized_from_them() {
        // Each field one past its limit (or zero / not finite where that breaks the math) is
        // an error naming the field; the limit itself and every real shape still load.
        let at = |from: &str, to: String| {
            let j = MIN.replace(from, &to);
            assert_ne!(j, MIN, "{from} not in the test config");
            Config::from_json(j.as_bytes())
        };
        let cases = [
            ("\"num_hidden_layers\":3", "num_hidden_layers", MAX_LAYERS),
            ("\"intermediate_size\":160", "intermediate_size", MAX_WIDTH),
            ("\"vocab_size\":151936", "vocab_size", MAX_VOCAB),
            ("\"depth\":4", "depth", MAX_LAYERS),
            ("\"intermediate_size\":96", "intermediate_size", MAX_WIDTH),
        ];
        for (from, key, max) in cases {
            let e = at(from, format!("\"{key}\":{}", max + 1))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains(&max.to_string()), "{e}");
            at(from, format!("\"{key}\":{max}")).unwrap();
        }
        let with = |extra: &str| {
            let j = MIN.replacen('{', &format!("{{{extra},"), 1);
            Config::from_json(j.as_bytes()).map_err(|e| e.to_string())
        };
        for (extra, named) in [
            ("\"rms_norm_eps\":-1e-6", "rms_norm_eps"),
            ("\"rms_norm_eps\":1e300", "rms_norm_eps"),
            ("\"rope_theta\":0", "rope_theta"),
            ("\"bd3lm_block_size\":1025", "bd3lm_block_size"),
            ("\"max_pixels\":268435457", "max_pixels"),
        ] {
            let e = with(extra).unwrap_err();
            assert!(e.contains(named), "{extra}: {e}");
        }
        with("\"bd3lm_block_size\":1024").unwrap();
        let no_window = MIN.replace("\"num_heads\":2", "\"num_heads\":2,\"window_size\":0");
        let e = Config::from_json(no_window.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("window_size"), "{e}");
    }

    #[test]
    fn mislabelled_fields_are_named() {
        let bad = MIN.replace("\"num_hidden_layers\":3", "\"num_hidden_layers\":\"three\"");
        let e = Config::from_json(bad.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("num_hidden_layers"), "{e}");
        let small_vocab = MIN.replace("151936", "1000");
        assert!(Config::from_json(small_vocab.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("MASK"));
    }
}
