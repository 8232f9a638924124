//! placeholder until the images module lands
use crate::config::QwenVisionConfig;
use crate::error::Result;
use crate::models::qwen2_5_vl::vision::Grid;
use alloc::vec::Vec;
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}
pub struct Preprocessed {
    pub pixel_values: Vec<f32>,
    pub grid: Grid,
    pub resized_width: usize,
    pub resized_height: usize,
}
pub fn preprocess_qwen2vl(
    _img: &RgbImage,
    _cfg: &QwenVisionConfig,
    _min_pixels: usize,
    _max_pixels: usize,
) -> Result<Preprocessed> {
    unimplemented!()
}
#[cfg(feature = "std")]
#[derive(Default)]
pub struct DecodeLimits {
    pub max_pixels: u64,
    pub max_bytes: u64,
}
#[cfg(feature = "std")]
pub fn decode(_bytes: &[u8], _limits: &DecodeLimits) -> Result<RgbImage> {
    unimplemented!()
}
#[cfg(feature = "std")]
pub fn load(_path: &std::path::Path, _limits: &DecodeLimits) -> Result<RgbImage> {
    unimplemented!()
}
