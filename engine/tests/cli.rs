//! `dvl generate` end to end: every golden case through the CLI's --json output, --dump
//! probe files, and clear errors for bad arguments.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn dvl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dvl"))
}

fn case_args(g: &Value) -> Option<Vec<String>> {
    let i = &g["inputs"];
    let dir = model_dir(g["model"].as_str()?)?;
    let mut a = vec![
        "generate".into(),
        "--model".into(),
        dir.display().to_string(),
        "--prompt".into(),
        i["question"].as_str()?.into(),
        "--gen-length".into(),
        i["gen_length"].to_string(),
        "--steps".into(),
        i["steps"].to_string(),
        "--strategy".into(),
        i["strategy"].as_str()?.into(),
        "--json".into(),
    ];
    if let Some(t) = i["threshold"].as_f64() {
        a.extend(["--threshold".into(), t.to_string()]);
    }
    for f in i["images"].as_array()? {
        a.extend([
            "--image".into(),
            images_dir().join(f.as_str()?).display().to_string(),
        ]);
    }
    Some(a)
}

#[test]
fn every_golden_case_through_cli_json() {
    let mut failures = Vec::new();
    for path in golden_cases() {
        let g: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let Some(args) = case_args(&g) else { continue };
        let out = dvl().args(&args).output().unwrap();
        let case = g["case"].as_str().unwrap();
        if !out.status.success() {
            failures.push(format!(
                "{case}: exit {:?}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
            continue;
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in ["ids", "prompt_rows", "forward_passes", "stopped_at_eos"] {
            if v[key] != g[key] {
                failures.push(format!("{case}: {key} differs: {} vs {}", v[key], g[key]));
            }
        }
        assert!(v["text"].is_string() && v["timings"]["total_ms"].as_f64().unwrap() > 0.0);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `dvl generate --json` on model a's golden question with `gen_length` and `extra`
/// arguments; fails the test unless it succeeds.
fn generate_json(gen_length: &str, extra: &[&str]) -> Value {
    generate_json_env(&[], gen_length, extra)
}

/// [`generate_json`] with environment variables set.
fn generate_json_env(env: &[(&str, &str)], gen_length: &str, extra: &[&str]) -> Value {
    let model = model_dir("a").unwrap();
    let out = dvl()
        .envs(env.iter().copied())
        .args(["generate", "--model", model.to_str().unwrap(), "--json"])
        .args([
            "--prompt",
            "What is two plus two?",
            "--gen-length",
            gen_length,
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn json_reports_the_panel_copy_and_its_cost() {
    let run = |pack: &str, extra: &[&str]| generate_json_env(&[("DVL_PACK", pack)], "8", extra);
    let packed = run("1", &[]);
    assert_eq!(packed["panels"], true);
    assert!(
        packed["panel_bytes"].as_u64().is_some_and(|b| b > 0),
        "{packed}"
    );
    assert!(
        packed["pack_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{packed}"
    );
    let stored = run("0", &[]);
    assert_eq!(stored["panels"], false);
    assert!(
        stored["panel_bytes"].is_null() && stored["pack_ms"].is_null(),
        "{stored}"
    );
    assert_eq!(stored["ids"], packed["ids"]);
    // --weights decides over DVL_PACK.
    for (weights, panels, pack) in [("panels", true, "0"), ("stored", false, "1")] {
        let v = run(pack, &["--weights", weights]);
        assert_eq!(v["panels"], panels, "--weights {weights}");
        assert_eq!(v["panel_bytes"].is_null(), !panels, "--weights {weights}");
        assert_eq!(v["ids"], packed["ids"]);
    }
}

#[test]
fn panel_cache_option_and_variable_write_then_map_the_panels() {
    let dir = std::env::temp_dir().join(format!("dvl-cli-panel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let panels = ["--weights", "panels"];
    let plain = generate_json("8", &panels);
    assert_eq!(plain["panels_from_cache"], false);
    assert_eq!(plain["panels_written_to_cache"], false);
    let first = generate_json("8", &[&panels[..], &["--panel-cache", d]].concat());
    assert_eq!(first["panels_from_cache"], false, "{first}");
    assert_eq!(first["panels_written_to_cache"], true, "{first}");
    let second = generate_json("8", &[&panels[..], &["--panel-cache", d]].concat());
    assert_eq!(second["panels_from_cache"], true, "{second}");
    assert_eq!(second["panels_written_to_cache"], false, "{second}");
    // The variable does the same for every entry point.
    let by_env = generate_json_env(&[("DVL_PANEL_CACHE", d)], "8", &panels);
    assert_eq!(by_env["panels_from_cache"], true, "{by_env}");
    for v in [&first, &second, &by_env] {
        assert_eq!(v["ids"], plain["ids"]);
        assert_eq!(v["panel_bytes"], plain["panel_bytes"]);
    }
    let stored = generate_json("8", &["--weights", "stored", "--panel-cache", d]);
    assert!(stored["panels_from_cache"].is_null(), "{stored}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dump_writes_fixture_probes() {
    let dir = std::env::temp_dir().join(format!("dvl-dump-{}", std::process::id()));
    generate_json("32", &["--dump", dir.to_str().unwrap()]);
    let golden = tiny_root().join("a/golden/a_text_static8.safetensors");
    for name in [
        "prefill_last_block_hidden",
        "first_step_hidden",
        "first_step_logits_tail",
        "first_step_logsumexp",
    ] {
        let (s1, mine) = read_tensor(&dir.join("dump.safetensors"), name)
            .unwrap_or_else(|| panic!("{name} not dumped"));
        let (s2, want) = read_tensor(&golden, name).unwrap();
        assert_eq!(s1, s2, "{name} shape");
        assert!(rel_l2(&mine, &want) < 1e-5, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn repeat_reports_the_first_runs_answer_and_probes() {
    let dir = std::env::temp_dir().join(format!("dvl-repeat-{}", std::process::id()));
    let once = generate_json("16", &[]);
    let thrice = generate_json("16", &["--repeat", "3", "--dump", dir.to_str().unwrap()]);
    assert_eq!(once["ids"], thrice["ids"]);
    assert_eq!(once["text"], thrice["text"]);
    assert!(thrice["timings"]["decode_ms"].as_f64().unwrap() > 0.0);
    // The first run's probes are kept through the silent repeats.
    assert!(read_tensor(&dir.join("dump.safetensors"), "first_step_hidden").is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plain_mode_streams_text() {
    let model = model_dir("a").unwrap();
    let out = dvl()
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "What is two plus two?",
            "--gen-length",
            "16",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    // Model a's greedy answer starts with " cat book" (a_text_static8 ids 8251, 2311).
    assert!(text.starts_with(" cat book"), "{text:?}");
}

/// A reader that has gone (`dvl generate ... | head -c 1`) ends the program quietly, with
/// success: no panic from writing to a closed pipe.
#[test]
fn closed_stdout_pipe_is_not_a_panic() {
    use std::process::Stdio;
    let model = model_dir("a").unwrap();
    for extra in [&["--json"][..], &[][..]] {
        let mut child = dvl()
            .args(["generate", "--model", model.to_str().unwrap()])
            .args(["--prompt", "What is two plus two?", "--gen-length", "16"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closed before the model has loaded: every write of the run meets the closed pipe.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
        assert!(out.status.success(), "{extra:?}: {:?} {stderr}", out.status);
    }
}

/// Environment switches with values they do not know are named in a warning, not silently
/// ignored, and the run goes on with the default.
#[test]
fn unknown_environment_values_are_warned_about() {
    let model = model_dir("a").unwrap();
    for (var, value, needle) in [
        ("DVL_PACK", "yes", "DVL_PACK=\"yes\" is neither 0 nor 1"),
        (
            "DVL_ISA",
            "sse9",
            "DVL_ISA=\"sse9\" is not portable, avx2 or avx512",
        ),
    ] {
        let out = dvl()
            .env(var, value)
            .args(["generate", "--model", model.to_str().unwrap()])
            .args(["--prompt", "What is two plus two?", "--gen-length", "8"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{var}: {stderr}");
        assert!(stderr.contains(needle), "{var}: {stderr}");
    }
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let model = model_dir("a").unwrap();
    let m = model.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["generate", "--prompt", "x"], "--model"),
        (&["generate", "--model", m], "--prompt"),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "x",
                "--gen-length",
                "0",
            ],
            "gen_length",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "x",
                "--gen-length",
                "ten",
            ],
            "gen-length",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "x",
                "--weights",
                "packed",
            ],
            "--weights",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "x",
                "--strategy",
                "random",
            ],
            "strategy",
        ),
        (
            &["generate", "--model", m, "--prompt", "x", "--bogus", "1"],
            "--bogus",
        ),
        (
            &["generate", "--model", "/nonexistent/dir", "--prompt", "x"],
            "/nonexistent/dir",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "x",
                "--image",
                "/nonexistent.png",
            ],
            "/nonexistent.png",
        ),
        (
            &["generate", "--model", m, "--prompt", "x", "--repeat", "0"],
            "--repeat",
        ),
        (&["frobnicate"], "unknown command"),
        // Checked before anything is allocated (a 10^8-row prefix used to abort in alloc).
        (&["bench", "--model", m, "--block", "0"], "block 0"),
        (
            &["bench", "--model", m, "--prefix", "100000000"],
            "max_position_embeddings",
        ),
        (&["bench", "--model", m, "--prefix", "4"], "prefix 4"),
        (&["bench", "--model", m, "--reps", "0"], "reps 0"),
    ];
    for (args, needle) in cases {
        let out = dvl().args(*args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(needle),
            "{args:?}: stderr lacks {needle:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}
