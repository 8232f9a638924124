//! Random-weight checkpoints of the real shapes, in the published layout, so anyone can
//! benchmark without downloading 16 GB (`dvl synth`).
//!
//! Weights are streamed to disk tensor by tensor (a 7B checkpoint never sits in memory),
//! in 5 GiB shards with `model.safetensors.index.json`, exactly like the releases.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// Architecture numbers of one shape (spec §1.2).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub name: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub tied: bool,
    pub v_depth: usize,
    pub v_hidden: usize,
    pub v_heads: usize,
    pub v_intermediate: usize,
    pub v_fullatt: &'static [usize],
}

pub const SHAPES: &[Shape] = &[
    Shape {
        name: "tiny",
        hidden: 64,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        intermediate: 160,
        vocab: 151_936,
        tied: true,
        v_depth: 4,
        v_hidden: 64,
        v_heads: 2,
        v_intermediate: 96,
        v_fullatt: &[1, 3],
    },
    // Qwen2.5-0.5B text shape with the real Qwen2.5-VL tower: a small benchmarking shape.
    Shape {
        name: "0.5b",
        hidden: 896,
        layers: 24,
        heads: 14,
        kv_heads: 2,
        intermediate: 4864,
        vocab: 151_936,
        tied: true,
        v_depth: 32,
        v_hidden: 1280,
        v_heads: 16,
        v_intermediate: 3420,
        v_fullatt: &[7, 15, 23, 31],
    },
    Shape {
        name: "3b",
        hidden: 2048,
        layers: 36,
        heads: 16,
        kv_heads: 2,
        intermediate: 11008,
        vocab: 151_936,
        tied: true,
        v_depth: 32,
        v_hidden: 1280,
        v_heads: 16,
        v_intermediate: 3420,
        v_fullatt: &[7, 15, 23, 31],
    },
    Shape {
        name: "7b",
        hidden: 3584,
        layers: 28,
        heads: 28,
        kv_heads: 4,
        intermediate: 18944,
        vocab: 152_064,
        tied: false,
        v_depth: 32,
        v_hidden: 1280,
        v_heads: 16,
        v_intermediate: 3420,
        v_fullatt: &[7, 15, 23, 31],
    },
];

pub fn shape(name: &str) -> Result<Shape> {
    SHAPES
        .iter()
        .copied()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
            Error::InvalidArgument(format!(
                "unknown shape {name:?}; expected one of {}",
                names.join(", ")
            ))
        })
}

/// How a tensor is filled.
#[derive(Clone, Copy)]
enum Init {
    /// Uniform with the given standard deviation.
    Random(f32),
    /// All ones (norm weights).
    Ones,
}

struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

fn tensors(s: &Shape) -> Vec<TensorSpec> {
    let mut v = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, init| v.push(TensorSpec { name, shape, init });
    let (h, kvd, i) = (s.hidden, s.kv_heads * (s.hidden / s.heads), s.intermediate);
    let w = Init::Random(0.02);
    let b = Init::Random(0.01);
    add("model.embed_tokens.weight".into(), vec![s.vocab, h], w);
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h], Init::Ones);
        add(format!("{p}.self_attn.q_proj.weight"), vec![h, h], w);
        add(format!("{p}.self_attn.q_proj.bias"), vec![h], b);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kvd, h], w);
        add(format!("{p}.self_attn.k_proj.bias"), vec![kvd], b);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kvd, h], w);
        add(format!("{p}.self_attn.v_proj.bias"), vec![kvd], b);
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, h], w);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        );
        add(format!("{p}.mlp.gate_proj.weight"), vec![i, h], w);
        add(format!("{p}.mlp.up_proj.weight"), vec![i, h], w);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, i], w);
    }
    add("model.norm.weight".into(), vec![h], Init::Ones);
    if !s.tied {
        add("lm_head.weight".into(), vec![s.vocab, h], w);
    }
    let vp = "model.vision_tower.vision_tower";
    let (c, ci) = (s.v_hidden, s.v_intermediate);
    add(
        format!("{vp}.patch_embed.proj.weight"),
        vec![c, 3, 2, 14, 14],
        w,
    );
    for bl in 0..s.v_depth {
        let p = format!("{vp}.blocks.{bl}");
        add(format!("{p}.norm1.weight"), vec![c], Init::Ones);
        add(format!("{p}.norm2.weight"), vec![c], Init::Ones);
        add(format!("{p}.attn.qkv.weight"), vec![3 * c, c], w);
        add(format!("{p}.attn.qkv.bias"), vec![3 * c], b);
        add(format!("{p}.attn.proj.weight"), vec![c, c], w);
        add(format!("{p}.attn.proj.bias"), vec![c], b);
        for m in ["gate_proj", "up_proj"] {
            add(format!("{p}.mlp.{m}.weight"), vec![ci, c], w);
            add(format!("{p}.mlp.{m}.bias"), vec![ci], b);
        }
        add(format!("{p}.mlp.down_proj.weight"), vec![c, ci], w);
        add(format!("{p}.mlp.down_proj.bias"), vec![c], b);
    }
    let mp = "model.mm_projector.merger";
    add(format!("{mp}.ln_q.weight"), vec![c], Init::Ones);
    add(format!("{mp}.mlp.0.weight"), vec![4 * c, 4 * c], w);
    add(format!("{mp}.mlp.0.bias"), vec![4 * c], b);
    add(format!("{mp}.mlp.2.weight"), vec![h, 4 * c], w);
    add(format!("{mp}.mlp.2.bias"), vec![h], b);
    v
}

/// `config.json` in the DiffusionVL layout (text fields top-level and in `text_config`).
pub fn config_json(s: &Shape) -> serde_json::Value {
    let text = serde_json::json!({
        "vocab_size": s.vocab, "hidden_size": s.hidden, "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "hidden_act": "silu", "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": s.tied, "bos_token_id": 151643, "eos_token_id": 151645, "model_type": "qwen2_5_vl_text",
        "torch_dtype": "bfloat16",
    });
    let mut cfg = text.clone();
    let o = cfg.as_object_mut().unwrap();
    o.insert("model_type".into(), "diffusionvl_qwenvl".into());
    o.insert(
        "architectures".into(),
        serde_json::json!(["DiffusionVL_Qwen2_5_VL_ForConditionalGeneration"]),
    );
    o.insert("text_config".into(), text);
    o.insert(
        "vision_config".into(),
        serde_json::json!({
            "depth": s.v_depth, "hidden_size": s.v_hidden, "hidden_act": "silu", "intermediate_size": s.v_intermediate,
            "num_heads": s.v_heads, "in_chans": 3, "out_hidden_size": s.hidden, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": s.v_fullatt, "model_type": "qwen2_5_vl",
        }),
    );
    for (k, v) in [
        ("enable_bd3lm", serde_json::json!(true)),
        ("bd3lm_block_size", serde_json::json!(8)),
        ("mm_projector_type", serde_json::json!("qwen_merger")),
        ("mm_patch_merge_type", serde_json::json!("flat")),
        ("image_aspect_ratio", serde_json::json!("pad")),
        ("min_pixels", serde_json::json!(147456)),
        ("max_pixels", serde_json::json!(262144)),
        ("tokenizer_model_max_length", serde_json::json!(8192)),
        ("dvl_synthetic", serde_json::json!(true)),
    ] {
        o.insert(k.into(), v);
    }
    cfg
}

/// One safetensors file: header, then each tensor's bf16 values generated on the fly.
fn write_shard(
    w: &mut impl Write,
    header: &serde_json::Map<String, serde_json::Value>,
    shard: &[&TensorSpec],
    rng: &mut u64,
) -> std::io::Result<()> {
    let mut h = serde_json::to_string(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(h.as_bytes())?;
    let mut buf = Vec::with_capacity(1 << 20);
    for t in shard {
        let mut left: usize = t.shape.iter().product();
        while left > 0 {
            let chunk = left.min(1 << 19);
            buf.clear();
            for _ in 0..chunk {
                let v = match t.init {
                    Init::Ones => 1.0f32,
                    Init::Random(std) => {
                        // xorshift64*: uniform in [-√3σ, √3σ) has standard deviation σ.
                        *rng ^= *rng >> 12;
                        *rng ^= *rng << 25;
                        *rng ^= *rng >> 27;
                        let u = (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32
                            / (1u64 << 24) as f32;
                        (u * 2.0 - 1.0) * std * 1.732_050_8
                    }
                };
                buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
            w.write_all(&buf)?;
            left -= chunk;
        }
    }
    Ok(())
}

/// Header entries for tensors laid out back to back; returns the data size.
fn header_of(tensors: &[&TensorSpec]) -> (serde_json::Map<String, serde_json::Value>, u64) {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for t in tensors {
        let bytes = t.shape.iter().product::<usize>() as u64 * 2;
        header.insert(t.name.clone(), serde_json::json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [off, off + bytes]}));
        off += bytes;
    }
    (header, off)
}

/// A random-weight checkpoint in memory: (`config.json` bytes, one safetensors file).
/// For benchmarks and tests that should not touch the disk.
pub fn in_memory(s: &Shape, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let specs = tensors(s);
    let refs: Vec<&TensorSpec> = specs.iter().collect();
    let (header, size) = header_of(&refs);
    let mut bytes = Vec::with_capacity(size as usize + 4096);
    let mut rng = seed ^ 0x5DEE_CE66_D1CE_F00D;
    write_shard(&mut bytes, &header, &refs, &mut rng).expect("writing to memory cannot fail");
    (serde_json::to_vec_pretty(&config_json(s)).unwrap(), bytes)
}

/// Shard limit, as the release packaging (5 GiB).
const SHARD_BYTES: u64 = 5 << 30;

/// Write a random-weight checkpoint of `shape` to `out` (bf16, sharded like the releases).
/// `tokenizer` (a tokenizer.json) is copied when given. Each shard written is logged
/// (`log`, info).
pub fn write_checkpoint(s: &Shape, out: &Path, seed: u64, tokenizer: Option<&Path>) -> Result<u64> {
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        detail: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let cfg_path = out.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&config_json(s)).unwrap(),
    )
    .map_err(|e| io(&cfg_path, e))?;
    if let Some(t) = tokenizer {
        std::fs::copy(t, out.join("tokenizer.json")).map_err(|e| io(t, e))?;
    }
    // Group tensors into shards of at most SHARD_BYTES.
    let specs = tensors(s);
    let mut shards: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut cur = 0u64;
    for t in &specs {
        let bytes = t.shape.iter().product::<usize>() as u64 * 2;
        if cur + bytes > SHARD_BYTES && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            cur = 0;
        }
        shards.last_mut().unwrap().push(t);
        cur += bytes;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut rng = seed ^ 0x5DEE_CE66_D1CE_F00D;
    for (si, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", si + 1)
        };
        let (header, off) = header_of(shard);
        for t in shard {
            weight_map.insert(t.name.clone(), fname.clone().into());
        }
        let path = out.join(&fname);
        let f = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        write_shard(&mut w, &header, shard, &mut rng)
            .and_then(|_| w.flush())
            .map_err(|e| io(&path, e))?;
        total += off;
        log::info!(
            "synth: wrote {} ({:.2} GB)",
            path.display(),
            off as f64 / 1e9
        );
    }
    if n > 1 {
        let idx = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = out.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&idx).unwrap()).map_err(|e| io(&p, e))?;
    }
    Ok(total)
}
