//! The CLI's error type and the one place that maps errors to exit codes.

use std::fmt;

/// A CLI failure.
#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
}

/// The kinds of CLI failure.
#[derive(Debug)]
pub enum ErrorKind {
    /// Bad arguments (beyond what clap checks).
    Usage(String),
    /// Model loading or running failed.
    Model(ruvllm_model::Error),
    /// A GGUF file could not be read.
    Gguf(ruvllm_gguf::Error),
    /// Tokenizer or template failure.
    Tokenizer(ruvllm_tokenizer::Error),
    /// A model could not be fetched.
    Fetch(String),
    /// File or terminal I/O.
    Io(String, std::io::Error),
}

impl Error {
    pub fn usage(m: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Usage(m.into()),
        }
    }
    pub fn fetch(m: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Fetch(m.into()),
        }
    }
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Error {
        Error {
            kind: ErrorKind::Io(what.into(), e),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Usage(m) => write!(f, "{m}"),
            ErrorKind::Model(e) => write!(f, "{e}"),
            ErrorKind::Gguf(e) => write!(f, "{e}"),
            ErrorKind::Tokenizer(e) => write!(f, "{e}"),
            ErrorKind::Fetch(m) => write!(f, "cannot fetch model: {m}"),
            ErrorKind::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl From<ruvllm_model::Error> for Error {
    fn from(e: ruvllm_model::Error) -> Self {
        Error {
            kind: ErrorKind::Model(e),
        }
    }
}
impl From<ruvllm_gguf::Error> for Error {
    fn from(e: ruvllm_gguf::Error) -> Self {
        Error {
            kind: ErrorKind::Gguf(e),
        }
    }
}
impl From<ruvllm_tokenizer::Error> for Error {
    fn from(e: ruvllm_tokenizer::Error) -> Self {
        Error {
            kind: ErrorKind::Tokenizer(e),
        }
    }
}

/// Exit status for an error: 2 for usage errors (as clap uses), 3 for a model that cannot be
/// fetched, 4 for a prompt that does not fit the context, 1 otherwise.
pub fn exit_code(e: &Error) -> u8 {
    match &e.kind {
        ErrorKind::Usage(_) => 2,
        ErrorKind::Fetch(_) => 3,
        ErrorKind::Model(m)
            if matches!(m.kind(), ruvllm_model::ErrorKind::ContextOverflow { .. }) =>
        {
            4
        }
        ErrorKind::Model(m) if matches!(m.kind(), ruvllm_model::ErrorKind::InvalidParam { .. }) => {
            2
        }
        _ => 1,
    }
}
