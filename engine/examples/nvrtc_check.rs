//! Compile every CUDA kernel source (kernels/cuda/*.cu) with NVRTC for the given architectures
//! through the engine's own compile path (dvl::cuda::nvrtc), with no GPU needed.
//!
//!   cargo run -p dvl --features cuda --example nvrtc_check -- [--arch sm_80 --arch sm_90] [--report]
//!
//! Checks that each file compiles with the engine's options, that its image contains every
//! entry point the launchers use, and that the disk cache serves a second compile. `--report` compiles a second time with `-Xptxas=-v` and prints
//! registers, shared memory, stack frame and spills per kernel (a warning line for any kernel
//! with spills or a stack frame). NVRTC is found as the engine finds it (DVL_NVRTC, beside the
//! driver, then LD_LIBRARY_PATH); `DVL_CUDA_INCLUDE` adds `-I` directories. Exit status 1 on
//! any failure.

#[cfg(feature = "cuda")]
fn main() {
    use dvl::cuda::{kernels, nvrtc};
    use std::time::Instant;

    let mut archs: Vec<String> = Vec::new();
    let mut report = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--arch" => archs.extend(args.next()),
            "--report" => report = true,
            "-h" | "--help" => {
                println!("usage: nvrtc_check [--arch sm_XY]... [--report]");
                return;
            }
            other => {
                eprintln!("nvrtc_check: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    if archs.is_empty() {
        archs = vec!["sm_80".into(), "sm_90".into()];
    }
    let nv = match nvrtc::nvrtc() {
        Ok(nv) => nv,
        Err(e) => {
            eprintln!("nvrtc-check: FAILED: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "nvrtc-check: NVRTC {}.{} from {} (supports {:?})",
        nv.version.0,
        nv.version.1,
        nv.library
            .as_ref()
            .map_or_else(|| "?".to_string(), |p| p.display().to_string()),
        nv.archs
    );
    println!("nvrtc-check: options {:?}", nvrtc::options("<arch>"));
    let mut failures = 0;
    let mut compiled_n = 0;
    let mut entry_n = 0;
    for arch in &archs {
        let t0 = Instant::now();
        let results = kernels::compile_all(arch, &[], None);
        let secs = t0.elapsed().as_secs_f64();
        for (file, r) in results {
            match r {
                Ok(c) => {
                    let names = kernels::ENTRY_POINTS
                        .iter()
                        .find(|(f, _)| *f == file)
                        .map_or(&[][..], |(_, n)| n);
                    let missing: Vec<&str> = names
                        .iter()
                        .copied()
                        .filter(|n| {
                            let needle = [n.as_bytes(), b"\0"].concat();
                            !c.image
                                .windows(needle.len())
                                .any(|w| w == needle.as_slice())
                        })
                        .collect();
                    if missing.is_empty() {
                        compiled_n += 1;
                        entry_n += names.len();
                        println!(
                            "ok   {arch:<8} {file:<16} {:>8} bytes {:?}, {} entry points",
                            c.image.len(),
                            c.kind,
                            names.len()
                        );
                    } else {
                        failures += 1;
                        println!("FAIL {arch:<8} {file:<16} missing entry points {missing:?}");
                    }
                    if !c.log.trim().is_empty() {
                        println!("     log: {}", c.log.trim().replace('\n', "\n          "));
                    }
                }
                Err(e) => {
                    failures += 1;
                    println!("FAIL {arch:<8} {file:<16} {e}");
                }
            }
        }
        println!("     {arch}: all sources in {secs:.1} s (in parallel)");
        if report {
            for (file, r) in kernels::compile_all(arch, &["-Xptxas=-v".to_string()], None) {
                let Ok(c) = r else { continue };
                let mut func = String::new();
                let mut frame = String::new();
                for line in c.log.lines() {
                    let l = line.trim_start_matches("ptxas info    : ").trim();
                    if let Some(rest) = l.strip_prefix("Compiling entry function '") {
                        func = rest.split('\'').next().unwrap_or("").to_string();
                    } else if l.contains("bytes stack frame") {
                        frame = l.trim_start_matches("ptxas         .").trim().to_string();
                    } else if let Some(used) = l.strip_prefix("Used ") {
                        let bad = !frame.starts_with("0 bytes stack frame, 0 bytes spill stores");
                        println!(
                            "{} {arch:<8} {file:<16} {func:<24} {used}; {frame}",
                            if bad { "warn" } else { "    " }
                        );
                    }
                }
            }
        }
    }
    // The disk cache: a second compile of the same source hits it and returns the same image.
    let dir = std::env::temp_dir().join(format!("dvl-nvrtc-check-cache-{}", std::process::id()));
    let (file, body) = kernels::SOURCES[0];
    let src = kernels::full_source(file, body);
    let first = nvrtc::compile(file, &src, &archs[0], &[], Some(&dir));
    let second = nvrtc::compile(file, &src, &archs[0], &[], Some(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    match (first, second) {
        (Ok(a), Ok(b)) if !a.cached && b.cached && a.image == b.image => {
            println!("ok   cache    {file:<16} second compile served from the disk cache");
        }
        (a, b) => {
            failures += 1;
            println!(
                "FAIL cache    {file:<16} first cached={:?} second cached={:?} same image={:?}",
                a.as_ref().map(|c| c.cached).ok(),
                b.as_ref().map(|c| c.cached).ok(),
                a.as_ref()
                    .ok()
                    .zip(b.as_ref().ok())
                    .map(|(x, y)| x.image == y.image)
            );
        }
    }
    let total = archs.len() * kernels::SOURCES.len();
    println!(
        "nvrtc-check: {compiled_n}/{total} compilations ok ({} files × {} archs), {entry_n} entry points found, {failures} failed",
        kernels::SOURCES.len(),
        archs.len()
    );
    if failures > 0 {
        std::process::exit(1);
    }
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("nvrtc_check needs the `cuda` feature: cargo run -p dvl --features cuda --example nvrtc_check");
    std::process::exit(2);
}
