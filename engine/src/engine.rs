//! The std-side entry point: a checkpoint directory (memory-mapped) or caller-owned bytes,
//! the tokenizer, images from files or buffers, and one call that answers a question.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::{on_backend, CpuBackend};
use crate::config::Config;
use crate::decoder::{self, GenerateParams, Observer, Output, ProbeData};
use crate::error::{Error, Result};
use crate::images::{self, DecodeLimits, RgbImage};
use crate::models::qwen2_5_vl::text::PackFn;
use crate::models::qwen2_5_vl::vision::Grid;
use crate::models::qwen2_5_vl::Model;
use crate::models::{siglip_qwen, Vision};
use crate::panel_cache::{EntryWriter, PanelCache, ShardId};
use crate::prompt;
use crate::tokenizer::Tokenizer;
use crate::weights::{ShardBytes, WeightStore};

/// One image of a request.
pub enum ImageInput {
    /// A JPEG or PNG file.
    Path(PathBuf),
    /// JPEG or PNG bytes.
    Encoded(Vec<u8>),
    /// Decoded RGB8 pixels (camera frames, render targets).
    Rgb(RgbImage),
    /// Already preprocessed `pixel_values [patches, patch_dim]` and grid (bring your own
    /// decoder / processor). For the SigLIP variant: tiles `[t, 3, S, S]` and
    /// `Grid { t: tiles, h: image height, w: image width }` (see [`siglip_qwen`]).
    Pixels { values: Vec<f32>, grid: Grid },
}

/// A question, optionally about images.
pub struct Request {
    /// The user's question. With `raw_prompt`, the complete prompt string instead (template
    /// already applied, `<image>` tags where the images go).
    pub prompt: String,
    pub images: Vec<ImageInput>,
    pub raw_prompt: bool,
}

impl Request {
    pub fn new(question: impl Into<String>) -> Self {
        Request {
            prompt: question.into(),
            images: Vec::new(),
            raw_prompt: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub preprocess_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
}

/// A finished generation.
pub struct Generation {
    pub output: Output,
    /// The answer text (cut at EOS, MASK dropped, specials skipped).
    pub text: String,
    pub prompt_ids: Vec<i64>,
    pub image_grids: Vec<Grid>,
    pub image_tokens: usize,
    pub timings: Timings,
}

/// How a load lays out the text decoder's bf16 weights ([`Engine::open_with_layout`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightLayout {
    /// Panels where the kernels are AVX2's (the CPU's best ISA, or `DVL_ISA=avx2`) and the
    /// copy fits in available memory, else as stored; the environment variable
    /// `DVL_PACK=0` / `DVL_PACK=1` overrides.
    #[default]
    Auto,
    /// Repacked into panels whatever the CPU and memory (a copy of those weights).
    Panels,
    /// Read as stored in the checkpoint: no copy.
    AsStored,
}

/// The cost of holding the text decoder's weights in panels ([`Engine::panel_cost`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanelCost {
    /// Bytes of the panels: a copy in memory on top of the mapped checkpoint, or mapped
    /// from the panel cache's file (page cache, shared between processes; also where this
    /// load packed them into a new entry).
    pub bytes: u64,
    /// Milliseconds the repacking took, or mapping and checking the cache entry (`None`
    /// where the model's weights were packed outside [`Engine`]'s load and
    /// [`Engine::set_packed`]).
    pub pack_ms: Option<f64>,
    /// The panels were mapped from the panel cache ([`LoadOptions::panel_cache`]).
    pub from_cache: bool,
    /// This load repacked them into a new panel cache entry, which was then written in
    /// full: they are that file's pages, not an anonymous copy.
    pub written_to_cache: bool,
}

/// Where a load's panels live: one of three, where `PanelCost` spells it as two flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PanelsIn {
    /// An anonymous copy (repacked at load or by `set_packed`).
    Memory,
    /// Repacked into a new panel cache entry, written in full.
    NewCacheEntry,
    /// Mapped from an existing panel cache entry.
    Cache,
}

impl PanelCost {
    fn of(bytes: usize, pack_ms: Option<f64>, panels_in: PanelsIn) -> PanelCost {
        PanelCost {
            bytes: bytes as u64,
            pack_ms,
            from_cache: panels_in == PanelsIn::Cache,
            written_to_cache: panels_in == PanelsIn::NewCacheEntry,
        }
    }
}

impl std::fmt::Display for PanelCost {
    /// "6.17 GB copy, packed in 14.9 s" ("in 34 ms" under a second; no time where it is
    /// unknown), "6.17 GB packed into a new panel cache entry in 14.9 s" or "6.17 GB mapped
    /// from the panel cache in 3 ms".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = self.bytes as f64 / 1e9;
        let verb = if self.from_cache {
            write!(f, "{gb:.2} GB mapped from the panel cache")?;
            ""
        } else if self.written_to_cache {
            write!(f, "{gb:.2} GB packed into a new panel cache entry")?;
            ""
        } else {
            write!(f, "{gb:.2} GB copy")?;
            ", packed"
        };
        match self.pack_ms {
            Some(ms) if ms < 1e3 => write!(f, "{verb} in {ms:.0} ms"),
            Some(ms) => write!(f, "{verb} in {:.1} s", ms / 1e3),
            None => Ok(()),
        }
    }
}

/// How [`Engine::open_with`] loads a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// The text decoder's weight layout.
    pub layout: WeightLayout,
    /// A directory for the on-disk panel cache ([`crate::panel_cache`]): where the weights
    /// go into panels, a valid entry for this checkpoint there is mapped instead of
    /// repacking, and a missing or stale one is written after repacking (the panels' size
    /// again on disk). `None`: the environment variable `DVL_PANEL_CACHE`, if set and not
    /// empty, else no cache.
    pub panel_cache: Option<PathBuf>,
    /// The kernel ISA the engine will run with, which [`WeightLayout::Auto`] chooses the
    /// layout for (panels for AVX2). `None`: [`crate::backend::default_isa`], what a
    /// backend made without `with_isa` runs.
    pub isa: Option<crate::backend::Isa>,
}

/// A loaded model and its tokenizer. Read-only after load; share it across threads.
pub struct Engine {
    pub model: Model<'static>,
    tokenizer: Option<Tokenizer>,
    pub dir: Option<PathBuf>,
    pub decode_limits: DecodeLimits,
    /// Milliseconds the last repacking into panels took, at load or in `set_packed`.
    pack_ms: Option<f64>,
    /// Where the panels are (meaningful while the model is packed).
    panels_in: PanelsIn,
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Shard files of a checkpoint directory: the index's shards, or `model.safetensors`.
/// Also returns the tensor names the index lists (empty without an index), read once.
fn shard_files(dir: &Path) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let bytes = std::fs::read(&index).map_err(|e| io_err(&index, e))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Index(format!("{}: invalid JSON: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Index(format!("{}: no weight_map object", index.display())))?;
        let mut files: Vec<String> = Vec::new();
        for (tensor, f) in map {
            let f = f.as_str().ok_or_else(|| {
                Error::Index(format!("weight_map entry for {tensor} is not a file name"))
            })?;
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(Error::Index(format!(
                    "weight_map entry for {tensor} names a file outside the directory: {f}"
                )));
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        let names = map.keys().cloned().collect();
        return Ok((files.into_iter().map(|f| dir.join(f)).collect(), names));
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok((vec![single], Vec::new()));
    }
    Err(Error::Io {
        path: dir.display().to_string(),
        detail: "no model.safetensors or model.safetensors.index.json in this directory"
            .to_string(),
    })
}

/// Where the text decoder's panels came from at load.
#[derive(Clone, Copy, Debug)]
struct PanelsMade {
    /// Milliseconds: repacking, or mapping and checking the cache entry.
    ms: f64,
    panels_in: PanelsIn,
}

/// Repack the text decoder's bf16 weights into panels ([`dvl_kernels::packed`]) where
/// the kernels run (`isa`) are AVX2's (the CPU has no AVX-512, or `DVL_ISA=avx2`): their
/// few-row panel kernel runs a denoising step's matmuls 1.1-1.5× faster than the
/// dot-product tiles on the weights as stored, and the many-row GEMM reads panels as fast.
/// Costs a copy of those weights (the mapped checkpoint pages they came from are not read
/// again, except a tied embedding table's looked-up rows) and a pass over them at load;
/// skipped when the copy would not fit in available memory. `layout` other than `Auto`
/// decides; under `Auto`, `DVL_PACK=0` keeps the weights as stored and `DVL_PACK=1` packs
/// whatever the CPU and memory.
/// With a panel `cache` entry, a valid file is mapped instead and a missing or unusable one
/// is replaced by repacking straight into a new file (either way no anonymous copy, so no
/// memory check).
/// Returns `None` where the weights stay as stored.
fn pack_if_worthwhile(
    model: &mut Model<'static>,
    layout: WeightLayout,
    isa: crate::backend::Isa,
    cache: Option<&PanelCache>,
) -> Option<PanelsMade> {
    let env = std::env::var("DVL_PACK");
    if let Ok(v) = env.as_deref() {
        if !matches!(v, "" | "0" | "1") && layout == WeightLayout::Auto {
            log::warn!("DVL_PACK={v:?} is neither 0 nor 1: ignored (layout chosen automatically)");
        }
    }
    let chosen = match (layout, env.as_deref()) {
        (WeightLayout::Panels, _) => Some(true),
        (WeightLayout::AsStored, _) => Some(false),
        (WeightLayout::Auto, Ok("0")) => Some(false),
        (WeightLayout::Auto, Ok("1")) => Some(true),
        (WeightLayout::Auto, _) => None,
    };
    if chosen == Some(false) || (chosen.is_none() && isa != crate::backend::Isa::Avx2) {
        return None;
    }
    if let Some(cache) = cache {
        if let Some(made) = map_cached_panels(model, cache) {
            return Some(made);
        }
    }
    // Packed into the cache's file, the panels are page-cache pages rather than an
    // anonymous copy: no memory check.
    if let Some(cache) = cache {
        match cache.writer() {
            Ok(writer) => return Some(pack_into_cache(model, cache, writer)),
            Err(e) => warn_not_written(cache, &e),
        }
    }
    if chosen.is_none() && !fits_in_memory(model.lm_weight_bytes()) {
        return None;
    }
    let ms = pack_timed(model, &pack_on_threads);
    let cost = PanelCost::of(model.packed_bytes(), Some(ms), PanelsIn::Memory);
    log::log!(
        notice_level(cost.bytes),
        "text decoder weights repacked into panels ({cost})"
    );
    Some(PanelsMade {
        ms,
        panels_in: PanelsIn::Memory,
    })
}

/// Repack the model's panels straight into a new cache entry ([`EntryWriter`]), then sync
/// and publish it. Where writing fails the rest is packed in memory (with a warning).
fn pack_into_cache(
    model: &mut Model<'static>,
    cache: &PanelCache,
    writer: EntryWriter,
) -> PanelsMade {
    let writer = std::sync::Mutex::new(Some(writer));
    let ms = pack_timed(model, &|w, n, k| {
        let mut slot = writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(wr) = slot.as_mut() {
            match wr.add(n, k, |dst| pack_into_on_threads(w, n, k, dst)) {
                Ok(m) => return m,
                Err(e) => {
                    warn_not_written(cache, &e);
                    *slot = None;
                }
            }
        }
        pack_on_threads(w, n, k)
    });
    let bytes = model.packed_bytes() as u64;
    log::log!(
        notice_level(bytes),
        "text decoder weights repacked into panels in a new panel cache entry ({:.2} GB, \
         packed in {:.1} s)",
        bytes as f64 / 1e9,
        ms / 1e3
    );
    let mut written = false;
    if let Some(writer) = writer.into_inner().unwrap_or_else(|e| e.into_inner()) {
        let start = std::time::Instant::now();
        match writer.finish() {
            Ok((bytes, stale)) => {
                written = true;
                log::log!(
                    notice_level(bytes),
                    "panel cache written: {} ({:.2} GB, synced in {:.1} s)",
                    cache.path().display(),
                    bytes as f64 / 1e9,
                    start.elapsed().as_secs_f64()
                );
                for f in stale {
                    log::info!("panel cache: removed the stale entry {}", f.display());
                }
            }
            Err(e) => warn_not_written(cache, &e),
        }
    }
    PanelsMade {
        ms,
        panels_in: if written {
            PanelsIn::NewCacheEntry
        } else {
            PanelsIn::Memory
        },
    }
}

/// The one warning of a cache entry that could not be written.
fn warn_not_written(cache: &PanelCache, e: &std::io::Error) {
    log::warn!(
        "panel cache {}: not written ({e}); this load's panels are in memory",
        cache.path().display()
    );
}

/// The model's panels from `cache`'s file, mapped: `None` (with a warning where a file was
/// there but unusable) when the caller must repack.
fn map_cached_panels(model: &mut Model<'static>, cache: &PanelCache) -> Option<PanelsMade> {
    let start = std::time::Instant::now();
    let refuse = |why: &str| {
        log::warn!(
            "panel cache {}: {why}; repacking (the entry will be rewritten)",
            cache.path().display()
        );
    };
    let mapped = match cache.load() {
        Ok(Some(m)) => m,
        Ok(None) => return None,
        Err(why) => {
            refuse(&why);
            return None;
        }
    };
    // Hand the mapped matrices out in pack order; any shape that differs (or a count)
    // means the entry does not belong to this model after all.
    let (count, mismatch) = (mapped.len(), std::sync::atomic::AtomicBool::new(false));
    let next = std::sync::Mutex::new(mapped.into_iter());
    model.pack_weights(&|w, n, k| {
        let m = next.lock().ok().and_then(|mut it| it.next());
        match m {
            Some(m) if (m.n(), m.k()) == (n, k) => m,
            _ => {
                mismatch.store(true, std::sync::atomic::Ordering::Relaxed);
                dvl_kernels::packed::PackedBf16::new(w, n, k)
            }
        }
    });
    let left = next.lock().map_or(0, |it| it.len());
    if mismatch.into_inner() || left > 0 {
        refuse(&format!(
            "its {count} matrices are not the {} this model packs",
            model.packed_matrices().len()
        ));
        model.unpack_weights();
        return None;
    }
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let cost = PanelCost::of(model.packed_bytes(), Some(ms), PanelsIn::Cache);
    log::log!(
        notice_level(cost.bytes),
        "text decoder weights in panels: {cost} ({})",
        cache.path().display()
    );
    Some(PanelsMade {
        ms,
        panels_in: PanelsIn::Cache,
    })
}

/// The level of a load notice about `bytes`: `Info` (shown by the CLI) where loading takes
/// long enough for a person to wonder why (over a GiB), `Debug` otherwise.
fn notice_level(bytes: u64) -> log::Level {
    if bytes > 1 << 30 {
        log::Level::Info
    } else {
        log::Level::Debug
    }
}

/// [`Model::pack_weights`] on this machine's cores; returns the milliseconds it took.
fn pack_timed(model: &mut Model<'static>, pack: PackFn<'_>) -> f64 {
    let start = std::time::Instant::now();
    model.pack_weights(pack);
    start.elapsed().as_secs_f64() * 1e3
}

/// Whether a copy of `bytes` leaves a GiB of the memory Linux reports available
/// (`MemAvailable`, which counts reclaimable page cache such as the mapped checkpoint).
/// Where it does not, the weights stay as stored: mapped weights can be paged in and out,
/// a copy cannot. True where the figure is unknown (other systems).
fn fits_in_memory(bytes: u64) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return true;
    };
    match mem_available_kb(&info) {
        Some(kb) if bytes + (1 << 30) > kb * 1024 => {
            log::warn!(
                "text decoder weights left as stored: a panel copy ({:.2} GB) would not fit \
                 in the {:.2} GB available (DVL_PACK=1 forces it)",
                bytes as f64 / 1e9,
                kb as f64 * 1024.0 / 1e9
            );
            false
        }
        _ => true,
    }
}

/// The `MemAvailable` line of `/proc/meminfo`, in kB.
fn mem_available_kb(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        l.strip_prefix("MemAvailable:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// [`dvl_kernels::packed::PackedBf16::new`] with the panels split across this machine's
/// cores (scoped threads: the engine's rayon pools belong to backends, not to loading).
fn pack_on_threads(w: &[half::bf16], n: usize, k: usize) -> dvl_kernels::packed::PackedBf16 {
    use dvl_kernels::packed::PackedBf16;
    let mut data = vec![0u32; PackedBf16::words(n, k)];
    pack_into_on_threads(w, n, k, &mut data);
    PackedBf16::from_panels(data, n, k).expect("whole panels")
}

/// The panels of `w` (`n × k`) into `dst` (`PackedBf16::words(n, k)` long), a range of
/// panels per available core.
fn pack_into_on_threads(w: &[half::bf16], n: usize, k: usize, dst: &mut [u32]) {
    use dvl_kernels::packed::{pack_panels, PackedBf16};
    let (panels, len) = (PackedBf16::panels(n), PackedBf16::panel_len(k));
    debug_assert_eq!(dst.len(), panels * len);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per = panels.div_ceil(threads).max(1);
    if len > 0 {
        std::thread::scope(|s| {
            for (i, piece) in dst.chunks_mut(per * len).enumerate() {
                s.spawn(move || pack_panels(w, n, k, i * per, piece));
            }
        });
    }
}

impl Engine {
    /// Open a checkpoint directory as published: `config.json`, `model.safetensors` or
    /// shards + index, `tokenizer.json` (optional for id-only use). The weight layout is
    /// chosen by CPU and memory ([`WeightLayout::Auto`]).
    pub fn open(dir: &Path) -> Result<Engine> {
        Self::open_with_layout(dir, WeightLayout::Auto)
    }

    /// [`Engine::open`] with the text decoder's weight layout chosen by the caller.
    pub fn open_with_layout(dir: &Path, layout: WeightLayout) -> Result<Engine> {
        Self::open_with(
            dir,
            &LoadOptions {
                layout,
                ..LoadOptions::default()
            },
        )
    }

    /// [`Engine::open`] with the weight layout and the panel cache chosen by the caller.
    pub fn open_with(dir: &Path, options: &LoadOptions) -> Result<Engine> {
        let layout = options.layout;
        let cfg_path = dir.join("config.json");
        let cfg_bytes = std::fs::read(&cfg_path).map_err(|e| io_err(&cfg_path, e))?;
        let config = Config::from_json(&cfg_bytes).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", cfg_path.display())),
            other => other,
        })?;
        let (files, indexed) = shard_files(dir)?;
        let mut shards: Vec<(String, ShardBytes<'static>)> = Vec::new();
        let cache_dir = options.panel_cache.clone().or_else(|| {
            std::env::var_os("DVL_PANEL_CACHE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        // Each shard's part of the panel cache entry's identity (None once one is unknown).
        let mut shard_ids: Option<Vec<ShardId>> = cache_dir.as_ref().map(|_| Vec::new());
        let total: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        for (i, f) in files.iter().enumerate() {
            let file = std::fs::File::open(f).map_err(|e| io_err(f, e))?;
            // A directory (or a device) of a shard's name opens, then fails to map with a
            // bare "No such device".
            if !file.metadata().map_err(|e| io_err(f, e))?.is_file() {
                return Err(Error::Io {
                    path: f.display().to_string(),
                    detail: "not a regular file (a weight shard must be one)".to_string(),
                });
            }
            log::log!(
                notice_level(total),
                "mapping shard {}/{} {} ({:.2} of {:.2} GB)",
                i + 1,
                files.len(),
                f.display(),
                file.metadata().map_or(0, |m| m.len()) as f64 / 1e9,
                total as f64 / 1e9
            );
            // SAFETY: the map is read-only; modifying a checkpoint while it is loaded is
            // outside what any loader can defend against (same contract as safetensors').
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(f, e))?;
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(ids) = &mut shard_ids {
                match ShardId::of(f, &map) {
                    Some(id) => ids.push(id),
                    None => {
                        log::warn!(
                            "panel cache not used: the modification time of {} is unknown",
                            f.display()
                        );
                        shard_ids = None;
                    }
                }
            }
            shards.push((name, Box::new(map)));
        }
        let cache = cache_dir
            .as_deref()
            .zip(shard_ids)
            .map(|(d, ids)| PanelCache::for_checkpoint(d, dir, &cfg_bytes, &ids));
        let store = WeightStore::new(shards)?;
        // Every tensor the index names must be in one of the shards.
        if let Some(t) = indexed.iter().find(|t| store.info(t).is_none()) {
            return Err(Error::Index(format!(
                "index lists {t} but no shard contains it"
            )));
        }
        let mut model = Model::new(config, store)?;
        let isa = options.isa.unwrap_or_else(crate::backend::default_isa);
        let made = pack_if_worthwhile(&mut model, layout, isa, cache.as_ref());
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(Tokenizer::from_file(&tok_path)?)
        } else {
            None
        };
        Ok(Engine {
            model,
            tokenizer,
            dir: Some(dir.to_path_buf()),
            decode_limits: DecodeLimits::default(),
            pack_ms: made.map(|m| m.ms),
            panels_in: made.map_or(PanelsIn::Memory, |m| m.panels_in),
        })
    }

    /// Build from caller-owned bytes, read in place (where AVX2 is the best ISA the text
    /// decoder's bf16 weights are also repacked: [`Engine::set_packed`]). `'static` because
    /// the engine may be shared freely; FFI callers promise the buffers outlive the model.
    pub fn from_parts(
        config_json: &[u8],
        shards: Vec<(String, ShardBytes<'static>)>,
        tokenizer_json: Option<&[u8]>,
    ) -> Result<Engine> {
        Self::from_parts_with_layout(config_json, shards, tokenizer_json, WeightLayout::Auto)
    }

    /// [`Engine::from_parts`] with the text decoder's weight layout chosen by the caller
    /// ([`WeightLayout::AsStored`]: nothing copied, the shards are read in place only).
    pub fn from_parts_with_layout(
        config_json: &[u8],
        shards: Vec<(String, ShardBytes<'static>)>,
        tokenizer_json: Option<&[u8]>,
        layout: WeightLayout,
    ) -> Result<Engine> {
        let config = Config::from_json(config_json)?;
        let mut model = Model::new(config, WeightStore::new(shards)?)?;
        let made = pack_if_worthwhile(&mut model, layout, crate::backend::default_isa(), None);
        let tokenizer = tokenizer_json.map(Tokenizer::from_bytes).transpose()?;
        Ok(Engine {
            model,
            tokenizer,
            dir: None,
            decode_limits: DecodeLimits::default(),
            pack_ms: made.map(|m| m.ms),
            panels_in: PanelsIn::Memory,
        })
    }

    /// Repack the text decoder's bf16 weights into panels (`true`), or drop the panels so
    /// that the kernels read the checkpoint's weights as stored (`false`). [`Engine::open`]
    /// and [`Engine::from_parts`] choose by CPU (panels where AVX2 is the best ISA) and
    /// `DVL_PACK`. Generations are equal either way to within f32 rounding.
    pub fn set_packed(&mut self, packed: bool) {
        if !packed {
            self.model.unpack_weights();
            self.pack_ms = None;
            self.panels_in = PanelsIn::Memory;
        } else if !self.model.is_packed() {
            self.pack_ms = Some(pack_timed(&mut self.model, &pack_on_threads));
        }
    }

    /// What the panel copy costs, where the weights are in panels: its bytes (memory on top
    /// of the mapped checkpoint) and the milliseconds the repacking took.
    pub fn panel_cost(&self) -> Option<PanelCost> {
        self.model
            .is_packed()
            .then(|| PanelCost::of(self.model.packed_bytes(), self.pack_ms, self.panels_in))
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer("this model was loaded without tokenizer.json".to_string())
        })
    }

    /// Prompt ids with image placeholders for a request (spec §2.2, §2.3).
    pub fn prompt_ids(&self, req: &Request) -> Result<Vec<i64>> {
        let text = if req.raw_prompt {
            req.prompt.clone()
        } else {
            prompt::chat_prompt(&req.prompt, req.images.len())
        };
        let tok = self.tokenizer()?;
        prompt::tokenize_with_images(&text, |c| tok.encode(c))
    }

    /// Preprocess every image of a request into one `pixel_values` matrix and its grids
    /// (SigLIP variant: all tiles, and per image (tiles, height, width); several images in a
    /// request are padded to squares, one tile each, spec §4.2 step 7).
    pub fn preprocess(&self, inputs: &[ImageInput]) -> Result<(Vec<f32>, Vec<Grid>)> {
        let cfg = &self.model.config;
        let mut pixels = Vec::new();
        let mut grids = Vec::new();
        for (i, inp) in inputs.iter().enumerate() {
            let ctx = |e: Error| match e {
                Error::Image(m) => Error::Image(format!("image {}: {m}", i + 1)),
                other => other,
            };
            let decoded;
            let rgb = match inp {
                ImageInput::Path(p) => {
                    decoded = images::load(p, &self.decode_limits)?;
                    &decoded
                }
                ImageInput::Encoded(b) => {
                    decoded = images::decode(b, &self.decode_limits).map_err(ctx)?;
                    &decoded
                }
                ImageInput::Rgb(img) => img,
                ImageInput::Pixels { values, grid } => {
                    pixels.extend_from_slice(values);
                    grids.push(*grid);
                    continue;
                }
            };
            if let Vision::Siglip(s) = &self.model.vision {
                let t = siglip_qwen::preprocess::preprocess(rgb, &s.cfg, inputs.len() > 1)
                    .map_err(ctx)?;
                pixels.extend_from_slice(&t.pixels);
                grids.push(t.grid);
                continue;
            }
            let pre = images::preprocess_qwen2vl(rgb, &cfg.vision, cfg.min_pixels, cfg.max_pixels)
                .map_err(ctx)?;
            pixels.extend_from_slice(&pre.pixel_values);
            grids.push(pre.grid);
        }
        self.model.vision.check_inputs(&pixels, &grids)?;
        Ok((pixels, grids))
    }

    /// Answer a request: preprocess and encode images, assemble, decode.
    pub fn generate(
        &self,
        be: &CpuBackend,
        req: &Request,
        params: &GenerateParams,
        obs: &mut dyn Observer,
    ) -> Result<Generation> {
        params.validate()?;
        let t0 = Instant::now();
        let prompt_ids = self.prompt_ids(req)?;
        let (pixels, grids) = self.preprocess(&req.images)?;
        let t1 = Instant::now();
        if obs.wants_probes() && !grids.is_empty() {
            let shape = match &self.model.vision {
                Vision::Siglip(s) => {
                    let side = s.cfg.vision.image_size;
                    vec![pixels.len() / (3 * side * side), 3, side, side]
                }
                Vision::Qwen(_) => {
                    let cols = self.model.config.vision.patch_dim();
                    vec![pixels.len() / cols, cols]
                }
            };
            obs.probe("pixel_values", &shape, ProbeData::F32(&pixels));
            let thw: Vec<i64> = grids
                .iter()
                .flat_map(|g| [g.t as i64, g.h as i64, g.w as i64])
                .collect();
            obs.probe("image_grid_thw", &[grids.len(), 3], ProbeData::I64(&thw));
        }
        let feats = if grids.is_empty() {
            Vec::new()
        } else {
            on_backend(be, || self.model.encode_images(be, &pixels, &grids))?
        };
        if obs.wants_probes() && !feats.is_empty() {
            let all: Vec<f32> = feats.concat();
            let h = self.model.config.text.hidden_size;
            obs.probe("vision_features", &[all.len() / h, h], ProbeData::F32(&all));
        }
        let t2 = Instant::now();
        let embeds = self.model.assemble(&prompt_ids, &feats)?;
        let mut timed = TimedObserver {
            inner: obs,
            prefill_done: None,
        };
        let output =
            decoder::generate(&self.model.decode_model(), be, &embeds, params, &mut timed)?;
        let prefill_done = timed.prefill_done.unwrap_or(t2);
        let t3 = Instant::now();
        let text = match &self.tokenizer {
            Some(t) => t.decode_answer(&output.ids)?,
            None => String::new(),
        };
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let image_tokens = grids.iter().map(|g| self.model.tokens_for(g)).sum();
        Ok(Generation {
            output,
            text,
            prompt_ids,
            image_grids: grids,
            image_tokens,
            timings: Timings {
                preprocess_ms: ms(t0, t1),
                vision_ms: ms(t1, t2),
                prefill_ms: ms(t2, prefill_done),
                decode_ms: ms(prefill_done, t3),
                total_ms: ms(t0, t3),
            },
        })
    }
}

struct TimedObserver<'o> {
    inner: &'o mut dyn Observer,
    prefill_done: Option<Instant>,
}

impl Observer for TimedObserver<'_> {
    fn on_commit(&mut self, pos: usize, gen_index: usize, token: u32) {
        self.inner.on_commit(pos, gen_index, token)
    }
    fn on_block_done(&mut self, block: &decoder::BlockTrace, ids: &[u32]) {
        self.inner.on_block_done(block, ids)
    }
    fn on_prefill_done(&mut self) {
        self.prefill_done = Some(Instant::now());
        self.inner.on_prefill_done()
    }
    fn cancelled(&mut self) -> bool {
        self.inner.cancelled()
    }
    fn wants_probes(&self) -> bool {
        self.inner.wants_probes()
    }
    fn probe(&mut self, name: &str, shape: &[usize], data: ProbeData<'_>) {
        self.inner.probe(name, shape, data)
    }
}

#[cfg(test)]
mod tests {
    use super::{mem_available_kb, PanelCost};

    #[test]
    fn panel_cost_reads_as_size_and_time() {
        let cost = |bytes, pack_ms| {
            PanelCost {
                bytes,
                pack_ms,
                from_cache: false,
                written_to_cache: false,
            }
            .to_string()
        };
        assert_eq!(
            cost(6_171_394_048, Some(14_945.4)),
            "6.17 GB copy, packed in 14.9 s"
        );
        assert_eq!(
            cost(19_705_856, Some(34.2)),
            "0.02 GB copy, packed in 34 ms"
        );
        assert_eq!(cost(19_705_856, None), "0.02 GB copy");
        let mapped = PanelCost {
            bytes: 6_171_394_048,
            pack_ms: Some(3.4),
            from_cache: true,
            written_to_cache: false,
        };
        assert_eq!(
            mapped.to_string(),
            "6.17 GB mapped from the panel cache in 3 ms"
        );
        let written = PanelCost {
            bytes: 6_171_394_048,
            pack_ms: Some(14_945.4),
            from_cache: false,
            written_to_cache: true,
        };
        assert_eq!(
            written.to_string(),
            "6.17 GB packed into a new panel cache entry in 14.9 s"
        );
    }

    #[test]
    fn available_memory_is_read_from_meminfo() {
        let info = "MemTotal:       24585392 kB\nMemFree:         1234 kB\n\
                    MemAvailable:   23004956 kB\nBuffers:  1 kB\n";
        assert_eq!(mem_available_kb(info), Some(23_004_956));
        assert_eq!(mem_available_kb("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available_kb("MemAvailable: lots kB\n"), None);
    }
}
