//! The on-disk panel cache: written by the first load, mapped by the next, bit for bit the
//! panels a repack makes; a changed checkpoint gets its own entry; a damaged, foreign or
//! unwritable entry is reported and the load goes on with freshly packed panels.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::ThreadId;

use common::*;
use dvl::{Engine, LoadOptions, WeightLayout};

/// Log records, with the thread that made them (tests run in parallel).
static SEEN: Mutex<Vec<(ThreadId, log::Level, String)>> = Mutex::new(Vec::new());

struct Keep;

impl log::Log for Keep {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let seen = (std::thread::current().id(), r.level(), r.args().to_string());
        SEEN.lock().unwrap().push(seen);
    }
    fn flush(&self) {}
}

/// This thread's warnings since the last call.
fn warnings() -> Vec<String> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Keep).expect("the only logger of this test binary");
        log::set_max_level(log::LevelFilter::Trace);
    });
    let me = std::thread::current().id();
    let mut seen = SEEN.lock().unwrap();
    let mine = seen
        .iter()
        .filter(|s| s.0 == me && s.1 == log::Level::Warn)
        .map(|s| s.2.clone())
        .collect();
    seen.retain(|s| s.0 != me);
    mine
}

/// An empty scratch directory.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dvl-panel-cache-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of tiny model a's checkpoint directory.
fn checkpoint_copy(name: &str) -> PathBuf {
    let d = scratch(name);
    let a = model_dir("a").unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(a.join(f), d.join(f)).unwrap();
    }
    d
}

fn open(model: &Path, layout: WeightLayout, cache: &Path) -> Engine {
    let options = LoadOptions {
        layout,
        panel_cache: Some(cache.to_path_buf()),
        ..LoadOptions::default()
    };
    Engine::open_with(model, &options).unwrap()
}

/// The cache files in `dir`.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "dvlpanels"))
        .collect();
    v.sort();
    v
}

fn panel_words(e: &Engine) -> Vec<Vec<u32>> {
    e.model
        .packed_matrices()
        .iter()
        .map(|m| m.as_words().to_vec())
        .collect()
}

fn ids(e: &Engine) -> Vec<u32> {
    let p = dvl::GenerateParams {
        gen_length: 16,
        ..Default::default()
    };
    let be = dvl::CpuBackend::single_threaded();
    e.generate(
        &be,
        &dvl::Request::new("What is in the picture?"),
        &p,
        &mut dvl::decoder::NoObserver,
    )
    .unwrap()
    .output
    .ids
}

#[test]
fn the_first_load_writes_the_entry_and_the_next_maps_the_same_panels() {
    warnings();
    let cache = scratch("hit");
    let model = model_dir("a").unwrap();
    let plain = Engine::open_with_layout(&model, WeightLayout::Panels).unwrap();

    let first = open(&model, WeightLayout::Panels, &cache);
    let cost = first.panel_cost().unwrap();
    assert!(!cost.from_cache && cost.written_to_cache, "{cost:?}");
    assert!(cost.to_string().contains("new panel cache entry"), "{cost}");
    let files = entries(&cache);
    assert_eq!(files.len(), 1, "{files:?}");
    let size = std::fs::metadata(&files[0]).unwrap().len();
    assert!(
        size > cost.bytes,
        "{size} bytes for {} of panels",
        cost.bytes
    );

    let second = open(&model, WeightLayout::Panels, &cache);
    let cost2 = second.panel_cost().unwrap();
    assert!(cost2.from_cache && !cost2.written_to_cache, "{cost2:?}");
    assert_eq!(cost2.bytes, cost.bytes);
    // Both map the file: the first packed into it, the second found it.
    assert!(second.model.packed_matrices().iter().all(|m| m.is_shared()));
    assert!(first.model.packed_matrices().iter().all(|m| m.is_shared()));
    assert!(plain.model.packed_matrices().iter().all(|m| !m.is_shared()));
    assert_eq!(panel_words(&first), panel_words(&plain));
    assert_eq!(panel_words(&second), panel_words(&plain));
    assert_eq!(ids(&first), ids(&plain));
    assert_eq!(ids(&second), ids(&plain));
    assert_eq!(entries(&cache), files, "nothing more written");
    // Auto on an AVX2-only CPU takes panels, from the cache; elsewhere it keeps the
    // weights as stored and the cache is not touched.
    let auto = open(&model, WeightLayout::Auto, &cache);
    if let Some(c) = auto.panel_cost() {
        assert!(c.from_cache);
    }
    assert!(warnings().is_empty());
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn weights_as_stored_neither_read_nor_write_the_cache() {
    warnings();
    let cache = scratch("stored");
    let e = open(&model_dir("a").unwrap(), WeightLayout::AsStored, &cache);
    assert!(e.panel_cost().is_none());
    assert!(entries(&cache).is_empty());
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_changed_checkpoint_gets_its_own_entry_and_its_old_one_goes() {
    warnings();
    let cache = scratch("changed");
    let model = checkpoint_copy("changed-model");
    // Another checkpoint's entry in the same directory: never touched.
    drop(open(&model_dir("a").unwrap(), WeightLayout::Panels, &cache));
    let other = entries(&cache);
    assert_eq!(other.len(), 1);
    let before = open(&model, WeightLayout::Panels, &cache);
    let old = entries(&cache);
    assert_eq!(old.len(), 2);
    // The same tensors, one weight of a packed matrix changed (in the middle of the
    // shard, away from the bytes the identity hashes): a rewrite, as a fine-tune would.
    let st = model.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let (header, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let q0 = meta.info("model.layers.0.self_attn.q_proj.weight").unwrap();
    let at = 8 + header + q0.data_offsets.0 + 1;
    bytes[at] ^= 0x01;
    std::fs::write(&st, &bytes).unwrap();
    let after = open(&model, WeightLayout::Panels, &cache);
    assert!(!after.panel_cost().unwrap().from_cache);
    // The new entry replaced the old one of the same directory; the other stays.
    let now = entries(&cache);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.contains(&other[0]), "{now:?}");
    let stale: Vec<_> = old.iter().filter(|p| **p != other[0]).collect();
    assert!(!now.contains(stale[0]), "{now:?}");
    // The engine loaded before keeps its (now unlinked) mapping.
    assert_ne!(panel_words(&after), panel_words(&before));
    let fresh = Engine::open_with_layout(&model, WeightLayout::Panels).unwrap();
    assert_eq!(panel_words(&after), panel_words(&fresh));
    let again = open(&model, WeightLayout::Panels, &cache);
    assert!(again.panel_cost().unwrap().from_cache);
    assert_eq!(panel_words(&again), panel_words(&fresh));
    assert!(warnings().is_empty());
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&model);
}

#[test]
fn a_damaged_entry_is_reported_and_replaced() {
    warnings();
    let model = model_dir("a").unwrap();
    let want = panel_words(&Engine::open_with_layout(&model, WeightLayout::Panels).unwrap());
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 10] = [
        ("truncated", |b| b.truncate(b.len() / 2)),
        ("empty", |b| b.clear()),
        ("magic", |b| b[0] = b'X'),
        ("format", |b| b[8] = 1),
        ("format 1", |b| {
            // What an older dvl wrote: the manifest's length, then the manifest.
            let manifest = br#"{"format":1,"identity":"x","matrices":[]}"#;
            let mut old = b"DVLPANEL".to_vec();
            old.extend((manifest.len() as u64).to_le_bytes());
            old.extend(manifest);
            *b = old;
        }),
        ("manifest length", |b| {
            b[24..32].copy_from_slice(&u64::MAX.to_le_bytes())
        }),
        ("manifest offset", |b| {
            b[16..24].copy_from_slice(&16u64.to_le_bytes())
        }),
        ("identity", |b| {
            let at = b.windows(8).position(|w| w == b"identity").unwrap();
            b[at + 12] ^= 1;
        }),
        ("manifest json", |b| {
            let at = u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize;
            b[at] = b'!';
        }),
        ("matrix offset", |b| {
            // The first matrix's offset, 4096, made 4097 (misaligned).
            let at = b.windows(6).rposition(|w| w == b",4096]").unwrap();
            b[at + 5] = b'7';
            b.insert(at + 6, b']');
            let len = b.len() as u64;
            let manifest_at = u64::from_le_bytes(b[16..24].try_into().unwrap());
            b[24..32].copy_from_slice(&(len - manifest_at).to_le_bytes());
        }),
    ];
    for (what, damage) in damages {
        let cache = scratch(&format!("damaged-{}", what.replace(' ', "-")));
        drop(open(&model, WeightLayout::Panels, &cache));
        let file = entries(&cache).pop().unwrap();
        // An older writer's abandoned temporary file, and one being written now.
        let abandoned = cache.join(format!(
            ".{}.tmp-1-0",
            file.file_name().unwrap().to_string_lossy()
        ));
        let live = cache.join(format!(
            ".{}.tmp-2-0",
            file.file_name().unwrap().to_string_lossy()
        ));
        for t in [&abandoned, &live] {
            std::fs::write(t, b"partial").unwrap();
        }
        let hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&abandoned)
            .unwrap()
            .set_modified(hours_ago)
            .unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let intact = bytes.len();
        damage(&mut bytes);
        std::fs::write(&file, &bytes).unwrap();
        warnings();

        let e = open(&model, WeightLayout::Panels, &cache);
        assert!(!e.panel_cost().unwrap().from_cache, "{what}");
        assert_eq!(panel_words(&e), want, "{what}");
        let w = warnings();
        assert_eq!(w.len(), 1, "{what}: {w:?}");
        assert!(
            w[0].contains("panel cache") && w[0].contains("repacking"),
            "{what}: {w:?}"
        );
        if what == "format 1" {
            assert!(w[0].contains("older dvl"), "{w:?}");
        }
        // Rewritten: the next load maps it again.
        assert_eq!(
            std::fs::metadata(&file).unwrap().len() as usize,
            intact,
            "{what}"
        );
        assert!(!abandoned.exists(), "{what}");
        assert!(live.exists(), "{what}");
        let next = open(&model, WeightLayout::Panels, &cache);
        assert!(next.panel_cost().unwrap().from_cache, "{what}");
        assert_eq!(panel_words(&next), want, "{what}");
        let _ = std::fs::remove_dir_all(&cache);
    }
}

#[test]
fn an_unwritable_cache_is_a_warning_not_a_failure() {
    // A regular file where the cache directory should be.
    let dir = scratch("unwritable");
    let not_a_dir = dir.join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    warnings();
    let e = open(&model_dir("a").unwrap(), WeightLayout::Panels, &not_a_dir);
    let cost = e.panel_cost().unwrap();
    assert!(!cost.from_cache && !cost.written_to_cache && cost.bytes > 0);
    assert!(cost.to_string().contains("copy"), "{cost}");
    let w = warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("not written"), "{w:?}");
    assert!(!ids(&e).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
