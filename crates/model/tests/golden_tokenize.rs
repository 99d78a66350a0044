//! Tokenization and chat-template cases from llama.cpp / Jinja2 (`tests/data/*.json`), on the
//! real model files. Skipped with a message when the models are not installed (CI installs them).

use ruvllm_gguf::GgufFile;
use ruvllm_model::registry;
use ruvllm_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden(file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("tests/data").join(file)).unwrap())
        .unwrap()
}

fn check_tokenize(model: &str, json: &str) {
    let Some(path) = registry::for_test(model) else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    let g = golden(json);
    let cases = g["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let add_bos = c["add_bos"].as_bool().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, add_bos, true);
        if got != want {
            failures.push(format!(
                "{text:?} add_bos={add_bos}\n  want {want:?}\n  got  {got:?}"
            ));
        }
        // Round trip: decoding without specials gives back the text (minus BOS).
        if !text.contains('<') {
            assert_eq!(tok.decode(&got, false).unwrap(), text);
        }
    }
    assert!(
        failures.is_empty(),
        "{} tokenization mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The prompts of the generation cases tokenize identically too.
    for c in g["generate"].as_array().unwrap() {
        let want: Vec<u32> = c["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(
            c["prompt"].as_str().unwrap(),
            c["add_bos"].as_bool().unwrap(),
            true,
        );
        assert_eq!(got, want, "prompt {:?}", c["prompt"]);
    }
}

#[test]
fn smollm2_tokenization_matches_llama_cpp() {
    check_tokenize("smollm2-135m", "smollm2-135m-instruct-q4_1.json");
}

#[test]
fn gemma3_tokenization_matches_llama_cpp() {
    check_tokenize("gemma3-270m", "gemma3-270m-q4_k_m.json");
}

#[test]
fn smollm2_chat_template_matches_jinja2() {
    let Some(path) = registry::for_test("smollm2-135m") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let t = ChatTemplate::new(
        f.get_str("tokenizer.chat_template").unwrap(),
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    let g = golden("smollm2-chat-template.json");
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for c in cases {
        let msgs: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let got = t
            .render(&msgs, c["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(got, c["rendered"].as_str().unwrap());
    }
}

#[test]
fn stream_decoding_of_split_emoji_tokens_is_clean() {
    let Some(path) = registry::for_test("smollm2-135m") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    let text = "emoji 🦀🚀 and CJK 你好世界";
    let ids = tok.encode(text, false, false);
    let mut dec = ruvllm_tokenizer::StreamDecoder::new();
    let mut out = String::new();
    for id in ids {
        let mut b = Vec::new();
        tok.token_bytes(id, false, &mut b).unwrap();
        let s = dec.push(&b);
        assert!(!s.contains('\u{FFFD}'));
        out.push_str(&s);
    }
    out.push_str(&dec.finish());
    assert_eq!(out, text);
}
