//! Models: configuration and weights read from GGUF, the CPU forward pass for the `llama`,
//! `gemma3` and `qwen2` architectures, a contiguous KV cache, sampling and generation.
#![deny(missing_docs)]

pub mod config;
pub mod forward;
pub mod generate;
pub mod kv;
pub mod lora;
pub mod registry;
pub mod sampler;
pub mod weights;

pub use config::{Arch, Config};
pub use forward::{
    head_logits, logits_from_last_layer, AttnKernel, Capture, Forward, Logits, Runner, SeqInput,
    FLASH_MIN_SPAN,
};
pub use generate::{generate, FinishReason, GenerateParams, Generation, StopMatcher};
pub use kv::{KvCache, KvType};
pub use lora::{write_atomic, LoraAdapter, LoraPair, Proj};
pub use sampler::{Sampler, SamplingParams};
pub use weights::Model;

use std::fmt;

/// Why a model could not be loaded or run.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
}

/// The kinds of [`Error`].
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The GGUF file itself is unreadable.
    Gguf(ruvllm_gguf::Error),
    /// The tokenizer could not be built.
    Tokenizer(ruvllm_tokenizer::Error),
    /// An architecture ruvllm does not implement.
    UnsupportedArch(String),
    /// A tensor is missing or has the wrong shape or type.
    BadWeights(String),
    /// Hyperparameters in the metadata are missing or inconsistent.
    BadConfig(String),
    /// The prompt plus the requested tokens do not fit the context.
    ContextOverflow {
        /// Tokens requested (prompt + generation).
        needed: usize,
        /// The context size.
        context: usize,
    },
    /// A request or sampling parameter out of range, named.
    InvalidParam {
        /// The parameter's name as callers spell it (`temperature`, `prompt`, `kv_type`, …).
        param: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A token id outside the vocabulary.
    BadToken(u32),
    /// The forward pass produced NaN or infinite logits (weights that overflow): sampling
    /// from them would emit one arbitrary token forever.
    NonFiniteLogits,
}

impl Error {
    /// Wraps a kind.
    pub fn new(kind: ErrorKind) -> Error {
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
            ErrorKind::Gguf(e) => write!(f, "{e}"),
            ErrorKind::Tokenizer(e) => write!(f, "{e}"),
            ErrorKind::UnsupportedArch(a) => write!(
                f,
                "unsupported model architecture {a:?} (supported: llama, gemma3, qwen2)"
            ),
            ErrorKind::BadWeights(m) => write!(f, "bad model weights: {m}"),
            ErrorKind::BadConfig(m) => write!(f, "bad model config: {m}"),
            ErrorKind::ContextOverflow { needed, context } => {
                write!(
                    f,
                    "prompt and generation need {needed} tokens but the context holds {context}"
                )
            }
            ErrorKind::InvalidParam { message, .. } => write!(f, "invalid parameter: {message}"),
            ErrorKind::BadToken(t) => write!(f, "token id {t} is outside the vocabulary"),
            ErrorKind::NonFiniteLogits => write!(
                f,
                "the forward pass produced NaN or infinite logits: the model's weights overflow"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Gguf(e) => Some(e),
            ErrorKind::Tokenizer(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ruvllm_gguf::Error> for Error {
    fn from(e: ruvllm_gguf::Error) -> Self {
        Error::new(ErrorKind::Gguf(e))
    }
}

impl From<ruvllm_tokenizer::Error> for Error {
    fn from(e: ruvllm_tokenizer::Error) -> Self {
        Error::new(ErrorKind::Tokenizer(e))
    }
}
