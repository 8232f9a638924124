#![no_std]

extern crate alloc;

use core::panic::PanicInfo;

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    loop {}
}

/// Load a model from bytes and run the decoder: the whole no_std surface in one call.
pub fn generate_from_bytes(config: &[u8], weights: &[u8], prompt_ids: &[i64]) -> dvl::Result<alloc::vec::Vec<u32>> {
    let model = dvl::load_from_bytes(config, &[weights])?;
    let be = dvl::CpuBackend::single_threaded();
    let embeds = model.assemble(prompt_ids, &[])?;
    let out = dvl::decoder::generate(&model.decode_model(), &be, &embeds, &dvl::GenerateParams::default(), &mut dvl::decoder::NoObserver)?;
    Ok(out.ids)
}

/// Kernels are callable directly too.
pub fn rms(x: &[f32], w: &[f32], out: &mut [f32]) {
    dvl_kernels::norm::rms_norm(x, w, 1e-6, out);
}
