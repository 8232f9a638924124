//! Bad checkpoints give distinct, clear errors naming what was wrong; good ones load from a
//! directory, from shards + index, and from memory.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use dvl::{Engine, Error};
use safetensors::tensor::TensorView;

const EMBED: &str = "model.embed_tokens.weight";
const Q0: &str = "model.layers.0.self_attn.q_proj.weight";

fn tiny() -> PathBuf {
    model_dir("a").unwrap()
}

/// A scratch checkpoint directory: tiny model a's config + tokenizer and the given weights.
fn scratch(name: &str, weights: &[u8]) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dvl-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(tiny().join("config.json"), d.join("config.json")).unwrap();
    std::fs::write(d.join("model.safetensors"), weights).unwrap();
    d
}

/// Re-serialise model a's weights with `edit` applied to the (name, dtype, shape, bytes) list.
fn rewrite(
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<(String, TensorView<'_>)> = ts
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn open_err(dir: &Path) -> Error {
    match Engine::open(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn shipped_model_loads_and_ties_lm_head() {
    let e = Engine::open(&tiny()).unwrap();
    assert!(e.model.config.text.tie_word_embeddings);
    assert_eq!(e.model.text.lm_head.name, EMBED);
}

#[test]
fn truncated_file_is_reported_as_truncated() {
    let mut b = std::fs::read(tiny().join("model.safetensors")).unwrap();
    b.truncate(b.len() - 1000);
    let e = open_err(&scratch("trunc", &b));
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    assert!(
        e.to_string().contains("model.safetensors") && e.to_string().contains("truncated"),
        "{e}"
    );
}

#[test]
fn header_offsets_overrunning_the_file_name_the_tensor() {
    let mut b = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
    // Point model.norm.weight past the end of the file by rewriting its end offset.
    let key = "\"model.norm.weight\":";
    let at = header.find(key).unwrap();
    let off = header[at..].find("\"data_offsets\":[").unwrap() + at + "\"data_offsets\":[".len();
    let close = header[off..].find(']').unwrap() + off;
    let start: u64 = header[off..close]
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let new_offsets = format!("{start},{}", start + 99_999_999);
    let mut h2 = format!("{}{}{}", &header[..off], new_offsets, &header[close..]);
    while h2.len() % 8 != 0 {
        h2.push(' ');
    }
    let mut nb = (h2.len() as u64).to_le_bytes().to_vec();
    nb.extend_from_slice(h2.as_bytes());
    nb.extend_from_slice(&b.split_off(8 + n));
    let e = open_err(&scratch("overrun", &nb));
    match &e {
        Error::BadOffsets { tensor, .. } => assert_eq!(tensor, "model.norm.weight"),
        other => panic!("expected BadOffsets, got {other}"),
    }
}

#[test]
fn missing_tensor_is_named() {
    let w = rewrite(|ts| ts.retain(|t| t.0 != Q0));
    let e = open_err(&scratch("missing", &w));
    assert_eq!(
        e,
        Error::MissingTensor {
            tensor: Q0.to_string()
        }
    );
    assert!(e.to_string().contains(Q0));
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let w = rewrite(|ts| {
        let t = ts.iter_mut().find(|t| t.0 == Q0).unwrap();
        t.2 = vec![32, 128]; // as many elements as 64×64, wrong shape
    });
    let e = open_err(&scratch("shape", &w));
    match &e {
        Error::WrongShape {
            tensor,
            expected,
            found,
        } => {
            assert_eq!(tensor, Q0);
            assert_eq!(expected, &vec![64, 64]);
            assert_eq!(found, &vec![32, 128]);
        }
        other => panic!("expected WrongShape, got {other}"),
    }
}

#[test]
fn wrong_dtype_is_named() {
    let w = rewrite(|ts| {
        let t = ts.iter_mut().find(|t| t.0 == Q0).unwrap();
        // Same bytes relabelled as int16.
        t.1 = safetensors::Dtype::I16;
    });
    let e = open_err(&scratch("dtype", &w));
    assert!(
        matches!(e, Error::WrongDtype { ref tensor, ref found } if tensor == Q0 && found == "I16"),
        "{e}"
    );
}

#[test]
fn f32_and_f16_checkpoints_load_and_agree() {
    // The same weights stored as f32 must give the same ids as bf16 (exact upcast).
    let w = rewrite(|ts| {
        for t in ts.iter_mut() {
            let vals: Vec<f32> =
                t.3.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect();
            t.1 = safetensors::Dtype::F32;
            t.3 = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        }
    });
    let d = scratch("f32", &w);
    std::fs::copy(tiny().join("tokenizer.json"), d.join("tokenizer.json")).unwrap();
    let e32 = Engine::open(&d).unwrap();
    let ebf = Engine::open(&tiny()).unwrap();
    let be = dvl::CpuBackend::single_threaded();
    let p = dvl::GenerateParams {
        gen_length: 16,
        ..Default::default()
    };
    let req = dvl::Request::new("Hi");
    let a = e32
        .generate(&be, &req, &p, &mut dvl::decoder::NoObserver)
        .unwrap();
    let b = ebf
        .generate(&be, &req, &p, &mut dvl::decoder::NoObserver)
        .unwrap();
    assert_eq!(a.output.ids, b.output.ids);
}

#[test]
fn unknown_model_type_and_missing_files_are_clear() {
    let d = scratch(
        "mt",
        &std::fs::read(tiny().join("model.safetensors")).unwrap(),
    );
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("diffusionvl_qwenvl", "llava_llama");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = open_err(&d);
    assert!(
        matches!(e, Error::UnsupportedModel { .. }) && e.to_string().contains("diffusionvl_qwenvl"),
        "{e}"
    );
    let empty = std::env::temp_dir().join(format!("dvl-test-{}-empty", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    assert!(open_err(&empty).to_string().contains("config.json"));
}

#[test]
fn sharded_index_must_match_shards() {
    let Some(b) = model_dir("b") else { return };
    if !b.join("model.safetensors.index.json").exists() {
        return;
    }
    // Loads as published.
    Engine::open(&b).unwrap();
    // An index naming a tensor no shard has is an index error.
    let d = std::env::temp_dir().join(format!("dvl-test-{}-index", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in std::fs::read_dir(&b).unwrap().flatten() {
        if f.path().is_file() {
            std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
        }
    }
    let idx = std::fs::read_to_string(d.join("model.safetensors.index.json")).unwrap();
    let idx = idx.replacen(
        "\"weight_map\": {",
        "\"weight_map\": {\"ghost.weight\": \"model-00001-of-00002.safetensors\",",
        1,
    );
    let idx = idx.replacen(
        "\"weight_map\":{",
        "\"weight_map\":{\"ghost.weight\":\"model-00001-of-00002.safetensors\",",
        1,
    );
    std::fs::write(d.join("model.safetensors.index.json"), idx).unwrap();
    let e = open_err(&d);
    assert!(
        matches!(e, Error::Index(ref m) if m.contains("ghost.weight")),
        "{e}"
    );
    // A directory where a shard should be is named as such (mapping it said "No such
    // device").
    std::fs::copy(
        b.join("model.safetensors.index.json"),
        d.join("model.safetensors.index.json"),
    )
    .unwrap();
    let shard = d.join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::fs::create_dir(&shard).unwrap();
    let e = open_err(&d);
    assert!(
        matches!(e, Error::Io { ref path, ref detail } if path.ends_with("model-00002-of-00002.safetensors") && detail.contains("not a regular file")),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn load_from_memory_matches_directory() {
    let cfg = std::fs::read(tiny().join("config.json")).unwrap();
    let w = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let m = dvl::load_from_bytes(&cfg, &[&w]).unwrap();
    assert_eq!(m.config.text.hidden_size, 64);
    // No copy: the embedding table lives inside our buffer.
    let range = w.as_ptr_range();
    match m.store.data(&m.text.embed) {
        dvl::weights::WData::BF16(s) => assert!(range.contains(&(s.as_ptr() as *const u8))),
        _ => panic!("expected bf16"),
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // Every output element is computed by the same code in the same order whatever the
    // split: ids and the probe tensors are bit-identical for 1, 2 and 3 threads.
    struct Keep(Vec<(String, Vec<f32>)>);
    impl dvl::decoder::Observer for Keep {
        fn wants_probes(&self) -> bool {
            true
        }
        fn probe(&mut self, name: &str, _: &[usize], d: dvl::decoder::ProbeData<'_>) {
            if let dvl::decoder::ProbeData::F32(v) = d {
                self.0.push((name.to_string(), v.to_vec()));
            }
        }
    }
    let e = Engine::open(&tiny()).unwrap();
    let mut req = dvl::Request::new("Describe this image.");
    req.images
        .push(dvl::ImageInput::Path(images_dir().join("chelsea.png")));
    let p = dvl::GenerateParams {
        gen_length: 16,
        ..Default::default()
    };
    // Both numerics: f32 and, where the CPU has AMX or AVX512_BF16, bf16 matmul inputs.
    for bf16 in [false, true] {
        let run = |threads| {
            // f32 on AMX tiles for every few-row matmul (the tiny model's rows are short).
            let be = dvl::CpuBackend::with_threads(threads)
                .unwrap()
                .with_f32_amx_min_work(0)
                .with_bf16(bf16);
            let mut k = Keep(Vec::new());
            let g = e.generate(&be, &req, &p, &mut k).unwrap();
            (g.output.ids, k.0, be.bf16())
        };
        let one = run(1);
        assert!(!one.1.is_empty());
        if bf16 && !one.2 {
            eprintln!("no bf16 kernels on this CPU: bf16 half skipped");
            continue;
        }
        for t in [2, 3] {
            let other = run(t);
            assert_eq!(one.0, other.0, "{t} threads (bf16 {bf16}): ids");
            for ((n1, v1), (n2, v2)) in one.1.iter().zip(&other.1) {
                assert_eq!(n1, n2);
                assert!(
                    v1.iter().zip(v2).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{t} threads (bf16 {bf16}): {n1} differs"
                );
            }
        }
    }
}

#[test]
fn panel_cost_follows_the_weight_layout() {
    let mut e = Engine::open(&tiny()).unwrap();
    e.set_packed(false);
    assert!(!e.model.is_packed());
    assert_eq!(e.panel_cost(), None);
    e.set_packed(true);
    let cost = e.panel_cost().expect("weights in panels have a cost");
    assert_eq!(cost.bytes, e.model.packed_bytes() as u64);
    // Model a's text weights: at least its tied lm_head, vocabulary × hidden bf16 values.
    let c = &e.model.config.text;
    assert!(cost.bytes >= (c.vocab_size * c.hidden_size * 2) as u64);
    assert!(cost.pack_ms.is_some_and(|ms| ms >= 0.0), "{cost:?}");
    e.set_packed(false);
    assert_eq!(e.panel_cost(), None);
}

#[test]
fn the_weight_layout_is_the_callers_choice_at_load() {
    use dvl::WeightLayout;
    let stored = Engine::open_with_layout(&tiny(), WeightLayout::AsStored).unwrap();
    assert!(!stored.model.is_packed() && stored.panel_cost().is_none());
    let panels = Engine::open_with_layout(&tiny(), WeightLayout::Panels).unwrap();
    assert!(panels.model.is_packed());
    assert!(panels
        .panel_cost()
        .is_some_and(|c| c.bytes > 0 && c.pack_ms.is_some()));
    let read = |f: &str| std::fs::read(tiny().join(f)).unwrap();
    let (cfg, tok) = (read("config.json"), read("tokenizer.json"));
    let shard: &'static [u8] = Box::leak(read("model.safetensors").into_boxed_slice());
    let parts = |layout| {
        let shards: Vec<(String, dvl::ShardBytes<'static>)> =
            vec![("model.safetensors".to_string(), Box::new(shard))];
        Engine::from_parts_with_layout(&cfg, shards, Some(&tok), layout).unwrap()
    };
    assert!(!parts(WeightLayout::AsStored).model.is_packed());
    assert!(parts(WeightLayout::Panels).model.is_packed());
}

/// Under the automatic layout the weights go into panels for the AVX2 kernels, whichever
/// CPU runs them (an AVX2-only CPU's default; `--isa avx2` / `DVL_ISA=avx2` on a newer one),
/// and stay as stored for the others.
#[test]
fn the_automatic_layout_follows_the_kernel_isa() {
    use dvl::backend::Isa;
    use dvl::{LoadOptions, WeightLayout};
    if std::env::var_os("DVL_PACK").is_some() {
        eprintln!("skipped: DVL_PACK overrides the automatic layout");
        return;
    }
    let open = |isa| {
        let options = LoadOptions {
            layout: WeightLayout::Auto,
            isa: Some(isa),
            ..LoadOptions::default()
        };
        Engine::open_with(&tiny(), &options).unwrap()
    };
    assert!(!open(Isa::Portable).model.is_packed());
    assert!(!open(Isa::Avx512).model.is_packed());
    // (The tiny model's panels are a few MB: they fit in any machine's memory.)
    assert!(open(Isa::Avx2).model.is_packed());
}

/// The engine never prints: its load notices are `log` records (target `dvl::…`), which a
/// program shows or drops as it likes (the CLI shows info and up on stderr; libdvl hands
/// them to the C log callback). Records are kept per thread: other tests load too.
#[test]
fn load_notices_are_log_records() {
    use std::sync::Mutex;
    use std::thread::ThreadId;
    static SEEN: Mutex<Vec<(ThreadId, log::Level, String, String)>> = Mutex::new(Vec::new());
    struct Keep;
    impl log::Log for Keep {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            let seen = (
                std::thread::current().id(),
                r.level(),
                r.target().to_string(),
                r.args().to_string(),
            );
            SEEN.lock().unwrap().push(seen);
        }
        fn flush(&self) {}
    }
    log::set_logger(&Keep).expect("the only logger of this test binary");
    log::set_max_level(log::LevelFilter::Trace);

    let e = Engine::open_with_layout(&tiny(), dvl::WeightLayout::Panels).unwrap();
    let cost = e.panel_cost().unwrap();
    let me = std::thread::current().id();
    let mine: Vec<_> = SEEN
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.0 == me)
        .cloned()
        .collect();
    // A checkpoint under a GiB: its notices are debug, below what the CLI shows.
    let panels: Vec<_> = mine
        .iter()
        .filter(|s| s.3.contains("repacked into panels"))
        .collect();
    assert_eq!(panels.len(), 1, "{mine:?}");
    assert_eq!(panels[0].1, log::Level::Debug);
    assert!(panels[0].2.starts_with("dvl"), "{:?}", panels[0]);
    assert!(panels[0].3.contains(&cost.to_string()), "{:?}", panels[0]);
    assert!(
        mine.iter()
            .any(|s| s.1 == log::Level::Debug && s.3.starts_with("mapping shard 1/1")),
        "{mine:?}"
    );
}

/// Random corruption of a checkpoint (bytes and digits of the safetensors header, bytes of
/// config.json, truncation) is an error or, where the result is still a consistent
/// checkpoint, a model that generates: never a panic. A fixed-seed sample of what a scratch
/// fuzz ran 6,000 of.
#[test]
fn random_checkpoint_corruption_is_an_error_never_a_panic() {
    let cfg = std::fs::read(tiny().join("config.json")).unwrap();
    let st = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let tok = std::fs::read(tiny().join("tokenizer.json")).unwrap();
    let header = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s as usize
    };
    let (mut loaded, mut refused) = (0, 0);
    for i in 0..300 {
        let (mut w, mut c) = (st.clone(), cfg.clone());
        let how = i % 4;
        match how {
            0 => {
                for _ in 0..1 + rnd() % 4 {
                    w[8 + rnd() % header] = rnd() as u8;
                }
            }
            1 => w[8 + rnd() % header] = b"0123456789"[rnd() % 10],
            2 => {
                let at = rnd() % c.len();
                c[at] = b"0123456789-e.,{}[]\""[rnd() % 19];
            }
            _ => w.truncate(rnd() % w.len()),
        }
        let run = std::panic::catch_unwind(|| {
            let open = |tok: Option<&[u8]>| {
                let shards = vec![(
                    "model.safetensors".to_string(),
                    Box::new(w.clone()) as dvl::ShardBytes<'static>,
                )];
                Engine::from_parts_with_layout(&c, shards, tok, dvl::WeightLayout::AsStored)
            };
            if let Err(e) = open(None) {
                return Err(e.to_string());
            }
            // Parsing the tokenizer takes most of a second: the first few checkpoints that
            // load also generate (the scratch fuzz generated on all 870 that loaded).
            if loaded >= 4 {
                return Ok(Ok(0));
            }
            let e = open(Some(&tok)).map_err(|e| e.to_string())?;
            let be = dvl::CpuBackend::with_threads(1).unwrap();
            let p = dvl::GenerateParams {
                gen_length: 8,
                ..Default::default()
            };
            let req = dvl::Request::new("hi");
            let g = e.generate(&be, &req, &p, &mut dvl::decoder::NoObserver);
            Ok(g.map(|g| g.output.ids.len()))
        });
        match run {
            Ok(Ok(_)) => loaded += 1,
            Ok(Err(msg)) => {
                assert!(!msg.is_empty(), "mutation {i}: empty error");
                refused += 1;
            }
            Err(_) => panic!("mutation {i} (kind {how}) panicked"),
        }
    }
    // Both outcomes occur: the mutations reach the checks and some leave a valid checkpoint.
    assert!(
        refused > 100 && loaded > 0,
        "{loaded} loaded, {refused} refused"
    );
}
