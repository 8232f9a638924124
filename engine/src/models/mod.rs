//! Model families, one folder each (config, weights, vision, text).

pub mod qwen2_5_vl;
