//! `dvl`: command-line front end.
//!
//! Arguments are parsed by hand: the grammar is a handful of `--flag value` pairs and a
//! parser crate would cost more build time than these forty lines.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use dvl::decoder::{BlockTrace, Observer, ProbeData};
use dvl::{
    CpuBackend, Engine, GenerateParams, ImageInput, LoadOptions, Request, Strategy, WeightLayout,
};

const USAGE: &str = "usage:
  dvl synth --shape tiny|0.5b|3b|7b --out DIR [--seed N] [--tokenizer tokenizer.json]
  dvl bench --model DIR [--prefix 288] [--block 8] [--threads N] [--reps 5] [--no-vision]
            [--isa portable|avx2|avx512] [--bf16] [--weights auto|panels|stored]
            [--panel-cache DIR] [--json]
  dvl generate --model DIR [--image PATH]... --prompt TEXT [--gen-length 128] [--steps 8]
               [--block-size N] [--strategy static|dynamic] [--threshold 0.85]
               [--temperature 0] [--top-k 0] [--top-p 1] [--seed N] [--threads N]
               [--no-fuse-commit] [--bf16] [--weights auto|panels|stored]
               [--panel-cache DIR] [--json] [--dump DIR] [--repeat N]

Defaults equal the reference evaluation (gen_length 128, 8 steps per block, greedy,
low_confidence_static). --bf16 (or --amx) rounds matmul inputs to bf16, on AMX tiles
(or AVX512_BF16 dot products without AMX): faster, hidden states move ~1e-3. The default
f32 path stays within 1e-6 of the references (DVL_AMX_F32=0 keeps its matmuls off AMX
tiles, on the FMA kernels). --json prints one
object (ids, text, prompt_rows, forward_passes, timings); --dump DIR writes the fixture
probe tensors to DIR/dump.safetensors. --repeat N runs the request N times on the loaded
model and reports each stage's median time (for timing without the model and tokenizer
load). Where the kernels are AVX2's (the CPU's best ISA, DVL_ISA=avx2, or bench's --isa
avx2) the text decoder's bf16 weights are repacked into
16-output panels at load (--weights auto, the default: a copy of them, skipped where it
would not fit in available memory; DVL_PACK=0 or 1 overrides auto). --weights stored reads
them as stored (no copy), --weights panels repacks on any CPU. --panel-cache DIR (or
DVL_PANEL_CACHE=DIR) keeps the panels in a file per checkpoint in DIR: the first load packs
into it, later loads map it instead of repacking (the panels' size again on disk; a changed
checkpoint gets a new file and its old one is deleted).";

/// `print!` to standard output, flushed. Rust ignores SIGPIPE, so a plain `print!` panics
/// when the reader has gone (`dvl bench | head -1`); here a closed pipe ends the program
/// quietly with success, as Unix tools do, and any other write error (a full disk) ends it
/// with a message and failure.
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}

fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("dvl: error: writing to standard output: {e}");
        std::process::exit(1);
    }
}

struct Args {
    flags: BTreeMap<String, Vec<String>>,
    switches: Vec<String>,
}

const SWITCHES: &[&str] = &["json", "no-fuse-commit", "help", "no-vision", "bf16", "amx"];

fn parse(args: &[String]) -> Result<Args, String> {
    let mut flags: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut switches = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let name = a
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {a:?}"))?;
        if SWITCHES.contains(&name) {
            switches.push(name.to_string());
            continue;
        }
        let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        flags.entry(name.to_string()).or_default().push(v.clone());
    }
    Ok(Args { flags, switches })
}

impl Args {
    fn one(&self, k: &str) -> Option<&str> {
        self.flags.get(k).and_then(|v| v.last()).map(|s| s.as_str())
    }
    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T, String> {
        match self.one(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{k}: cannot parse {v:?}")),
        }
    }
    fn has(&self, k: &str) -> bool {
        self.switches.iter().any(|s| s == k)
    }
    fn check_known(&self, known: &[&str]) -> Result<(), String> {
        for k in self.flags.keys() {
            if !known.contains(&k.as_str()) {
                return Err(format!("unknown option --{k}"));
            }
        }
        Ok(())
    }
}

/// The checkpoint at `model`, its text weights laid out as `--weights` says.
fn open_engine(model: &str, args: &Args) -> Result<Engine, String> {
    let layout = match args.one("weights").unwrap_or("auto") {
        "auto" => WeightLayout::Auto,
        "panels" => WeightLayout::Panels,
        "stored" => WeightLayout::AsStored,
        other => {
            return Err(format!(
                "--weights {other:?}: expected auto, panels or stored"
            ))
        }
    };
    let options = LoadOptions {
        layout,
        // Unset: DVL_PANEL_CACHE, if set (the library reads it).
        panel_cache: args.one("panel-cache").map(PathBuf::from),
        // bench's --isa (checked there): the layout is chosen for those kernels, so that
        // `--isa avx2` measures what an AVX2-only CPU runs.
        isa: args.one("isa").and_then(dvl::backend::parse_isa),
    };
    Engine::open_with(&PathBuf::from(model), &options).map_err(|e| e.to_string())
}

/// A dumped tensor: name, shape, little-endian bytes, dtype.
type Probe = (String, Vec<usize>, Vec<u8>, safetensors::Dtype);

/// Streams text as blocks finish, collects probes for --dump.
struct CliObserver<'e> {
    engine: &'e Engine,
    stream: bool,
    printed: String,
    probes: Option<Vec<Probe>>,
}

impl Observer for CliObserver<'_> {
    fn on_block_done(&mut self, _b: &BlockTrace, ids: &[u32]) {
        if !self.stream {
            return;
        }
        let Ok(tok) = self.engine.tokenizer() else {
            return;
        };
        // Only blocks before the first unfinished one are final: ids stay MASK past it.
        let done: Vec<u32> = ids
            .iter()
            .copied()
            .take_while(|&t| t != dvl::MASK_ID)
            .collect();
        if let Ok(text) = tok.decode_answer(&done) {
            if let Some(new) = text.strip_prefix(self.printed.as_str()) {
                out!("{new}");
                self.printed = text;
            }
        }
    }
    fn wants_probes(&self) -> bool {
        self.probes.is_some()
    }
    fn probe(&mut self, name: &str, shape: &[usize], data: ProbeData<'_>) {
        if let Some(p) = &mut self.probes {
            let (bytes, dt) = match data {
                ProbeData::F32(d) => (
                    d.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    safetensors::Dtype::F32,
                ),
                ProbeData::I64(d) => (
                    d.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    safetensors::Dtype::I64,
                ),
            };
            p.push((name.to_string(), shape.to_vec(), bytes, dt));
        }
    }
}

/// Each stage's median over `runs` (upper median for an even count).
fn median_timings(runs: &[dvl::engine::Timings]) -> dvl::engine::Timings {
    let median = |f: fn(&dvl::engine::Timings) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    dvl::engine::Timings {
        preprocess_ms: median(|t| t.preprocess_ms),
        vision_ms: median(|t| t.vision_ms),
        prefill_ms: median(|t| t.prefill_ms),
        decode_ms: median(|t| t.decode_ms),
        total_ms: median(|t| t.total_ms),
    }
}

fn generate(args: &Args) -> Result<(), String> {
    args.check_known(&[
        "model",
        "image",
        "prompt",
        "gen-length",
        "steps",
        "block-size",
        "strategy",
        "threshold",
        "temperature",
        "top-k",
        "top-p",
        "seed",
        "threads",
        "dump",
        "repeat",
        "weights",
        "panel-cache",
    ])?;
    let model = args.one("model").ok_or("--model DIR is required")?;
    let prompt = args.one("prompt").ok_or("--prompt TEXT is required")?;
    let defaults = GenerateParams::default();
    let params = GenerateParams {
        gen_length: args.num("gen-length", defaults.gen_length)?,
        steps: args.num("steps", defaults.steps)?,
        block_size: match args.one("block-size") {
            Some(_) => Some(args.num("block-size", 8)?),
            None => None,
        },
        strategy: Strategy::parse(args.one("strategy").unwrap_or("static"))
            .map_err(|e| e.to_string())?,
        threshold: args.num("threshold", defaults.threshold)?,
        temperature: args.num("temperature", defaults.temperature)?,
        top_k: args.num("top-k", defaults.top_k)?,
        top_p: args.num("top-p", defaults.top_p)?,
        seed: args.num("seed", defaults.seed)?,
        fuse_commit: !args.has("no-fuse-commit"),
    };
    params.validate().map_err(|e| e.to_string())?;
    let threads: usize = args.num("threads", 0)?;
    let engine = open_engine(model, args)?;
    let mut be = CpuBackend::with_threads(threads).map_err(|e| e.to_string())?;
    if args.has("bf16") || args.has("amx") {
        be = be.with_bf16(true);
        if !be.bf16() {
            eprintln!(
                "dvl: --bf16: neither AMX nor AVX512_BF16 is available on this CPU/OS; \
                 using the f32 kernels"
            );
        }
    }
    let images: Vec<ImageInput> = args
        .flags
        .get("image")
        .into_iter()
        .flatten()
        .map(|p| ImageInput::Path(PathBuf::from(p)))
        .collect();
    let req = Request {
        prompt: prompt.to_string(),
        images,
        raw_prompt: false,
    };
    let json = args.has("json");
    let dump = args.one("dump").map(PathBuf::from);
    let mut obs = CliObserver {
        engine: &engine,
        stream: !json,
        printed: String::new(),
        probes: dump.as_ref().map(|_| Vec::new()),
    };
    let repeat: usize = args.num("repeat", 1)?;
    if !(1..=10_000).contains(&repeat) {
        return Err(format!("--repeat {repeat} is out of range (1..=10000)"));
    }
    let mut g = engine
        .generate(&be, &req, &params, &mut obs)
        .map_err(|e| e.to_string())?;
    if repeat > 1 {
        // Later runs are silent; the first one's output and probes are what is reported,
        // with each stage's median over all runs.
        let mut runs = vec![g.timings.clone()];
        obs.stream = false;
        let probes = obs.probes.take();
        for _ in 1..repeat {
            let again = engine
                .generate(&be, &req, &params, &mut obs)
                .map_err(|e| e.to_string())?;
            if again.output.ids != g.output.ids {
                return Err("--repeat: a later run produced other ids".into());
            }
            runs.push(again.timings);
        }
        obs.probes = probes;
        g.timings = median_timings(&runs);
    }
    if let (Some(dir), Some(probes)) = (&dump, &obs.probes) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = probes
            .iter()
            .map(|(n, s, b, dt)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*dt, s.clone(), b).expect("probe sizes"),
                )
            })
            .collect();
        let path = dir.join("dump.safetensors");
        safetensors::serialize_to_file(views, None, &path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("dvl: wrote {} tensors to {}", probes.len(), path.display());
    }
    let o = &g.output;
    if json {
        let grids: Vec<[usize; 3]> = g.image_grids.iter().map(|gr| [gr.t, gr.h, gr.w]).collect();
        let cost = engine.panel_cost();
        let v = serde_json::json!({
            "ids": o.ids,
            "text": g.text,
            "prompt_rows": o.prompt_rows,
            "n_prompt_ids": g.prompt_ids.len(),
            "n_image_tokens": g.image_tokens,
            "image_grid_thw": grids,
            "forward_passes": o.forward_passes,
            "forward_calls": o.forward_calls,
            "stopped_at_eos": o.stopped_at_eos,
            "blocks_decoded": o.trace.len(),
            "params": {
                "gen_length": params.gen_length, "steps": params.steps,
                "block_size": params.block_size.unwrap_or(engine.model.config.block_size),
                "strategy": params.strategy.name(), "threshold": params.threshold,
                "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                "seed": params.seed, "fuse_commit": params.fuse_commit,
            },
            "threads": be.threads(),
            "isa": format!("{:?}", be.isa()),
            "kernels": be.describe(),
            "bf16": be.bf16(),
            "amx": be.amx(),
            "panels": engine.model.is_packed(),
            "panel_bytes": cost.map(|c| c.bytes),
            "pack_ms": cost.and_then(|c| c.pack_ms),
            "panels_from_cache": cost.map(|c| c.from_cache),
            "panels_written_to_cache": cost.map(|c| c.written_to_cache),
            "timings": {
                "preprocess_ms": g.timings.preprocess_ms, "vision_ms": g.timings.vision_ms,
                "prefill_ms": g.timings.prefill_ms, "decode_ms": g.timings.decode_ms,
                "total_ms": g.timings.total_ms,
            },
        });
        out!("{v}\n");
    } else {
        // Print whatever streaming did not (the final text is authoritative).
        if let Some(rest) = g.text.strip_prefix(obs.printed.as_str()) {
            out!("{rest}");
        }
        out!("\n");
        eprintln!(
            "dvl: {} prompt rows, {} forward passes ({} calls), {:.1} ms total",
            o.prompt_rows, o.forward_passes, o.forward_calls, g.timings.total_ms
        );
    }
    Ok(())
}

fn synth(args: &Args) -> Result<(), String> {
    args.check_known(&["shape", "out", "seed", "tokenizer"])?;
    let shape = dvl::synth::shape(args.one("shape").ok_or("--shape is required")?)
        .map_err(|e| e.to_string())?;
    let out = PathBuf::from(args.one("out").ok_or("--out DIR is required")?);
    let tok = args.one("tokenizer").map(PathBuf::from);
    let bytes = dvl::synth::write_checkpoint(&shape, &out, args.num("seed", 0)?, tok.as_deref())
        .map_err(|e| e.to_string())?;
    eprintln!(
        "dvl synth: {} checkpoint ({:.2} GB of bf16 weights) in {}",
        shape.name,
        bytes as f64 / 1e9,
        out.display()
    );
    Ok(())
}

fn bench(args: &Args) -> Result<(), String> {
    args.check_known(&[
        "model",
        "prefix",
        "block",
        "threads",
        "reps",
        "isa",
        "weights",
        "panel-cache",
    ])?;
    let model = args.one("model").ok_or("--model DIR is required")?;
    let engine = open_engine(model, args)?;
    let mut be = CpuBackend::with_threads(args.num("threads", 0)?).map_err(|e| e.to_string())?;
    if let Some(name) = args.one("isa") {
        let isa = dvl::backend::parse_isa(name)
            .ok_or_else(|| format!("--isa {name:?}: expected portable, avx2 or avx512"))?;
        be = be.with_isa(isa);
        if be.isa() != isa {
            return Err(format!("--isa {name}: this CPU does not support it"));
        }
    }
    if args.has("bf16") || args.has("amx") {
        be = be.with_bf16(true);
        if !be.bf16() {
            return Err(
                "--bf16: neither AMX nor AVX512_BF16 is available on this CPU/OS (with --isa)"
                    .to_string(),
            );
        }
    }
    let d = dvl::bench::BenchConfig::default();
    let cfg = dvl::bench::BenchConfig {
        prefix: args.num("prefix", d.prefix)?,
        block: args.num("block", d.block)?,
        reps: args.num("reps", d.reps)?,
        vision: !args.has("no-vision"),
        ..d
    };
    let r = dvl::bench::run(&engine, &be, &cfg).map_err(|e| e.to_string())?;
    if args.has("json") {
        let cost = engine.panel_cost();
        let v = serde_json::json!({
            "model": model, "threads": r.threads, "isa": r.isa, "panels": engine.model.is_packed(),
            "panel_bytes": cost.map(|c| c.bytes),
            "pack_ms": cost.and_then(|c| c.pack_ms),
            "panels_from_cache": cost.map(|c| c.from_cache),
            "panels_written_to_cache": cost.map(|c| c.written_to_cache),
            "prefix": cfg.prefix, "block": cfg.block,
            "vision_ms": r.vision_ms, "prefill_ms": r.prefill_ms, "step_ms": r.step_ms, "commit_ms": r.commit_ms,
            "lm_weight_bytes": r.lm_weight_bytes, "read_gbps": r.read_gbps, "roofline_step_ms": r.roofline_step_ms,
            "step_over_roofline": r.step_ms / r.roofline_step_ms,
        });
        out!("{v}\n");
    } else {
        let layout = match engine.panel_cost() {
            Some(c) => format!("weights in panels ({c})"),
            None => "weights as stored".to_string(),
        };
        out!(
            "model {model}: {} threads, {}, {layout}\n",
            r.threads,
            r.isa
        );
        if let Some(v) = r.vision_ms {
            out!("vision ({0}x{0}):   {v:10.2} ms\n", cfg.image_side);
        }
        out!("prefill ({}):      {:10.2} ms\n", cfg.prefix, r.prefill_ms);
        out!("denoise step:      {:10.2} ms\n", r.step_ms);
        out!("commit step:       {:10.2} ms\n", r.commit_ms);
        out!(
            "roofline step:     {:10.2} ms  ({:.2} GB LM weights / {:.1} GB/s); step = {:.2}x roofline\n",
            r.roofline_step_ms,
            r.lm_weight_bytes as f64 / 1e9,
            r.read_gbps,
            r.step_ms / r.roofline_step_ms
        );
    }
    Ok(())
}

/// The library's notices (`log` records of its `dvl::…` targets: shard mapping progress,
/// the panel copy, memory refusals) on standard error, from info up.
struct StderrNotices;

impl log::Log for StderrNotices {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info && m.target().starts_with("dvl")
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let kind = match r.level() {
                log::Level::Error => "error: ",
                log::Level::Warn => "warning: ",
                _ => "",
            };
            eprintln!("dvl: {kind}{}", r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    if log::set_logger(&StderrNotices).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let args = match parse(&argv[1..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dvl: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.has("help") || cmd == "--help" || cmd == "help" {
        out!("{USAGE}\n");
        return ExitCode::SUCCESS;
    }
    let r = match cmd.as_str() {
        "generate" => generate(&args),
        "synth" => synth(&args),
        "bench" => bench(&args),
        other => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dvl: error: {e}");
            ExitCode::FAILURE
        }
    }
}
