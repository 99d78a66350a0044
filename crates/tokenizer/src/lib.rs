//! Tokenizers and chat templates built from a GGUF file's own metadata.
//!
//! * `tokenizer.ggml.model = gpt2`: byte-level BPE with the pre-tokenizer that
//!   `tokenizer.ggml.pre` names ([`bpe`]).
//! * `tokenizer.ggml.model = llama`: SentencePiece-style score-driven merges with byte fallback
//!   ([`spm`]).
//!
//! Both follow llama.cpp's `llama-vocab.cpp` (special-token partitioning, BOS/EOS rules,
//! `token_to_piece`), which is the reference the golden tests compare against.
#![deny(missing_docs)]

mod bpe;
mod spm;
mod stream;
pub mod template;

pub use stream::StreamDecoder;
pub use template::{ChatMessage, ChatTemplate};

use ruvllm_gguf::GgufFile;
use std::collections::HashMap;
use std::fmt;

/// Why a tokenizer could not be built or used.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
}

/// The kinds of [`Error`].
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The GGUF metadata lacks or mis-types something the tokenizer needs.
    Metadata(String),
    /// A `tokenizer.ggml.model` or `tokenizer.ggml.pre` ruvllm does not implement.
    Unsupported(String),
    /// A token id outside the vocabulary.
    BadTokenId(u32),
    /// The chat template failed to parse or render.
    Template(String),
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Error {
        Error { kind }
    }
    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Metadata(m) => write!(f, "tokenizer metadata: {m}"),
            ErrorKind::Unsupported(m) => write!(f, "unsupported tokenizer: {m}"),
            ErrorKind::BadTokenId(id) => write!(f, "token id {id} is outside the vocabulary"),
            ErrorKind::Template(m) => write!(f, "chat template: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Ordinary text.
    Normal,
    /// `<unk>`.
    Unknown,
    /// Control tokens (`<|im_start|>`, `<bos>`): parsed from text only on request, never printed
    /// unless asked.
    Control,
    /// User-defined tokens: always parsed from text and printed verbatim.
    UserDefined,
    /// Unused slots.
    Unused,
    /// SentencePiece byte tokens `<0xNN>`.
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> TokenType {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

/// The algorithm family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Byte-level BPE (`gpt2`).
    Bpe,
    /// SentencePiece (`llama`).
    Spm,
}

/// A tokenizer built from GGUF metadata.
pub struct Tokenizer {
    kind: Kind,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    token_to_id: HashMap<String, u32>,
    /// Special tokens sorted longest first, for partitioning text.
    specials: Vec<(String, u32, TokenType)>,
    bpe: Option<bpe::Bpe>,
    byte_tokens: [Option<u32>; 256],
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Extra end-of-generation tokens (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`), found by name.
    pub eog: Vec<u32>,
    /// Whether BOS is added when the caller asks for special tokens.
    pub add_bos: bool,
    /// Whether EOS is appended when the caller asks for special tokens.
    pub add_eos: bool,
    add_space_prefix: bool,
    /// The pre-tokenizer name (`tokenizer.ggml.pre`).
    pub pre: String,
}

fn meta_err(m: impl Into<String>) -> Error {
    Error::new(ErrorKind::Metadata(m.into()))
}

impl Tokenizer {
    /// Tokenizes a rendered chat prompt: special tokens parsed; BOS added only if the template
    /// did not already write it.
    pub fn encode_chat(&self, rendered: &str) -> Vec<u32> {
        let mut ids = self.encode(rendered, false, true);
        if self.add_bos {
            if let Some(b) = self.bos {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        ids
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, Error> {
        let model = f
            .get_str("tokenizer.ggml.model")
            .map_err(|e| meta_err(e.to_string()))?;
        let kind = match model {
            "gpt2" => Kind::Bpe,
            "llama" => Kind::Spm,
            other => {
                return Err(Error::new(ErrorKind::Unsupported(format!(
                    "tokenizer.ggml.model = {other:?} (supported: gpt2, llama)"
                ))))
            }
        };
        let tokens: Vec<String> = f
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| meta_err("tokenizer.ggml.tokens is missing or not an array"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| meta_err("tokenizer.ggml.tokens holds a non-string"))
            })
            .collect::<Result<_, _>>()?;
        if tokens.is_empty() || tokens.len() > u32::MAX as usize / 2 {
            return Err(meta_err("vocabulary is empty or too large"));
        }
        let n = tokens.len();
        let types: Vec<TokenType> = match f
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) if a.len() == n => a
                .iter()
                .map(|v| TokenType::from_i64(v.as_f64().unwrap_or(1.0) as i64))
                .collect(),
            Some(_) => {
                return Err(meta_err(
                    "tokenizer.ggml.token_type length differs from the vocabulary",
                ))
            }
            None => vec![TokenType::Normal; n],
        };
        let scores: Vec<f32> = match f.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
            Some(_) => {
                return Err(meta_err(
                    "tokenizer.ggml.scores length differs from the vocabulary",
                ))
            }
            None if kind == Kind::Spm => {
                return Err(meta_err(
                    "SentencePiece vocabulary without tokenizer.ggml.scores",
                ))
            }
            None => vec![0.0; n],
        };
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.insert(t.clone(), i as u32);
        }
        let id_opt = |key: &str| -> Result<Option<u32>, Error> {
            match f.get(key).and_then(|v| v.as_u64()) {
                Some(id) if (id as usize) < n => Ok(Some(id as u32)),
                Some(id) => Err(meta_err(format!(
                    "{key} = {id} is outside the vocabulary of {n}"
                ))),
                None => Ok(None),
            }
        };
        let bos = id_opt("tokenizer.ggml.bos_token_id")?;
        let eos = id_opt("tokenizer.ggml.eos_token_id")?;
        let flag =
            |key: &str, default: bool| f.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
        let add_bos = flag("tokenizer.ggml.add_bos_token", kind == Kind::Spm);
        let add_eos = flag("tokenizer.ggml.add_eos_token", false);
        let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", kind == Kind::Spm);
        let pre = f
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_owned();

        let mut specials: Vec<(String, u32, TokenType)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, ty))| {
                !t.is_empty()
                    && matches!(
                        ty,
                        TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                    )
            })
            .map(|(i, (t, ty))| (t.clone(), i as u32, *ty))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let mut byte_tokens = [None; 256];
        let bpe = match kind {
            Kind::Bpe => {
                let merges: Vec<&str> = f
                    .get("tokenizer.ggml.merges")
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| meta_err("BPE vocabulary without tokenizer.ggml.merges"))?
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect();
                let b = bpe::Bpe::new(&pre, &merges, &token_to_id)?;
                for (byte, slot) in byte_tokens.iter_mut().enumerate() {
                    *slot = token_to_id
                        .get(&bpe::byte_char(byte as u8).to_string())
                        .copied();
                }
                Some(b)
            }
            Kind::Spm => {
                for (byte, slot) in byte_tokens.iter_mut().enumerate() {
                    *slot = token_to_id.get(&format!("<0x{byte:02X}>")).copied();
                }
                None
            }
        };
        let eog = [
            "<|im_end|>",
            "<end_of_turn>",
            "<|eot_id|>",
            "<|endoftext|>",
            "<|end|>",
        ]
        .iter()
        .filter_map(|t| token_to_id.get(*t).copied())
        .filter(|&id| types[id as usize] == TokenType::Control)
        .collect();
        Ok(Tokenizer {
            kind,
            tokens,
            types,
            scores,
            token_to_id,
            specials,
            bpe,
            byte_tokens,
            bos,
            eos,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            pre,
        })
    }

    /// The algorithm family.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// A token's raw vocabulary text.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// A token's id by its exact vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Whether a token ends generation (EOS or one of the end-of-turn tokens).
    pub fn is_eog(&self, id: u32) -> bool {
        Some(id) == self.eos || self.eog.contains(&id)
    }

    /// Tokenizes `text`. `add_special` adds BOS/EOS as the model's metadata says; `parse_special`
    /// turns control-token text such as `<|im_start|>` into those tokens (user-defined tokens are
    /// always recognized, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        let fragments = self.partition(text, parse_special);
        let mut prev_special = true;
        for frag in fragments {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    match self.kind {
                        Kind::Bpe => self
                            .bpe
                            .as_ref()
                            .map(|b| b.encode(t, &self.token_to_id, &self.byte_tokens, &mut out))
                            .unwrap_or(()),
                        Kind::Spm => {
                            let mut s = String::with_capacity(t.len() + 3);
                            if self.add_space_prefix && prev_special {
                                s.push(' ');
                            }
                            s.push_str(t);
                            let escaped = s.replace(' ', "\u{2581}");
                            spm::encode(
                                &escaped,
                                &self.token_to_id,
                                &self.scores,
                                &self.byte_tokens,
                                &mut out,
                            );
                        }
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            if let Some(e) = self.eos {
                out.push(e);
            }
        }
        out
    }

    /// Splits text at special tokens, longest first (llama.cpp `tokenizer_st_partition`).
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        for (st, id, ty) in &self.specials {
            if !parse_special && matches!(ty, TokenType::Control | TokenType::Unknown) {
                continue;
            }
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(st.as_str())))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(mut t) => {
                        while let Some(pos) = t.find(st.as_str()) {
                            if pos > 0 {
                                next.push(Fragment::Text(&t[..pos]));
                            }
                            next.push(Fragment::Token(*id));
                            t = &t[pos + st.len()..];
                        }
                        if !t.is_empty() {
                            next.push(Fragment::Text(t));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes a token stands for (llama.cpp `token_to_piece`). Control tokens give their text
    /// only when `special` is true. Bytes, not a string: one token may hold part of a character.
    pub fn token_bytes(&self, id: u32, special: bool, out: &mut Vec<u8>) -> Result<(), Error> {
        let text = self
            .tokens
            .get(id as usize)
            .ok_or_else(|| Error::new(ErrorKind::BadTokenId(id)))?;
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unknown => {
                if special {
                    out.extend_from_slice(text.as_bytes());
                }
            }
            TokenType::UserDefined => out.extend_from_slice(text.as_bytes()),
            TokenType::Byte => {
                if let Some(b) = text
                    .strip_prefix("<0x")
                    .and_then(|s| s.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(b);
                }
            }
            TokenType::Normal => match self.kind {
                Kind::Bpe => bpe::decode_bytes(text, out),
                Kind::Spm => out.extend_from_slice(text.replace('\u{2581}', " ").as_bytes()),
            },
            TokenType::Unused => {}
        }
        Ok(())
    }

    /// Decodes ids to text; invalid UTF-8 (a sequence cut mid-character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], special: bool) -> Result<String, Error> {
        let mut bytes = Vec::new();
        for &id in ids {
            self.token_bytes(id, special, &mut bytes)?;
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}
