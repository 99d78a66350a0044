//! Hyperparameters read from `{arch}.*` GGUF metadata, with llama.cpp's defaults where a key is
//! optional (`llama-model.cpp` `load_hparams`).

use crate::{Error, ErrorKind};
use ruvllm_gguf::GgufFile;
use ruvllm_kernels::ops::RopeStyle;

/// The architectures with a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama family (SmolLM2, Llama 2/3, Mistral, TinyLlama): RMSNorm, SwiGLU, RoPE (normal).
    Llama,
    /// Gemma 3: GeGLU, QK-norm, pre/post norms, scaled embeddings, sliding-window layers.
    Gemma3,
    /// Qwen2: llama with q/k/v biases and NeoX RoPE.
    Qwen2,
}

/// Model hyperparameters.
#[derive(Debug, Clone)]
pub struct Config {
    /// Architecture.
    pub arch: Arch,
    /// The `general.architecture` string.
    pub arch_name: String,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (GQA when fewer than `n_head`).
    pub n_head_kv: usize,
    /// Per-head dimension of queries and keys.
    pub head_dim: usize,
    /// Feed-forward inner size.
    pub n_ff: usize,
    /// Vocabulary size (rows of the embedding).
    pub n_vocab: usize,
    /// Trained context length.
    pub n_ctx_train: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency for full-attention layers.
    pub rope_base: f32,
    /// RoPE frequency scale (1 / linear scaling factor) for full-attention layers.
    pub rope_freq_scale: f32,
    /// RoPE base for sliding-window layers (Gemma 3).
    pub rope_base_swa: f32,
    /// Dimensions of each head that RoPE rotates.
    pub rope_dims: usize,
    /// How RoPE pairs dimensions.
    pub rope_style: RopeStyle,
    /// Sliding-window size, if some layers use one.
    pub sliding_window: Option<usize>,
    /// Every `swa_pattern`-th layer is global; the others slide (Gemma 3: 6).
    pub swa_pattern: usize,
    /// Multiplier on token embeddings (Gemma: `sqrt(n_embd)`).
    pub embed_scale: Option<f32>,
    /// Scale applied to `q·k`.
    pub attn_scale: f32,
}

impl Config {
    /// Reads the hyperparameters of a GGUF model.
    pub fn from_gguf(f: &GgufFile) -> Result<Config, Error> {
        let arch_name = f.get_str("general.architecture")?.to_owned();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            "qwen2" => Arch::Qwen2,
            other => return Err(Error::new(ErrorKind::UnsupportedArch(other.to_owned()))),
        };
        let a = &arch_name;
        let key = |k: &str| format!("{a}.{k}");
        let get = |k: &str| -> Result<usize, Error> {
            let v = f.get_u64(&key(k))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v < (1 << 24))
                .ok_or_else(|| bad(format!("{}.{k} = {v} is out of range", a)))
        };
        let get_or = |k: &str, d: usize| {
            if f.get(&key(k)).is_some() {
                get(k)
            } else {
                Ok(d)
            }
        };
        // A float hyperparameter: `d` when absent, else a number inside `range` (the bounds
        // exclusive); NaN, infinities, zero or negative scales and strings are refused rather
        // than turned into NaN outputs.
        let getf_or = |k: &str, d: f32, range: (f64, f64)| -> Result<f32, Error> {
            let Some(v) = f.get(&key(k)) else {
                return Ok(d);
            };
            v.as_f64()
                .filter(|x| x.is_finite() && *x > range.0 && *x < range.1)
                .map(|x| x as f32)
                .ok_or_else(|| {
                    bad(format!(
                        "{a}.{k} = {v:?} is out of range (a number between {} and {})",
                        range.0, range.1
                    ))
                })
        };

        let n_layer = get("block_count")?;
        let n_embd = get("embedding_length")?;
        let n_head = get("attention.head_count")?;
        let n_head_kv = get_or("attention.head_count_kv", n_head)?;
        let head_dim = get_or("attention.key_length", n_embd / n_head)?;
        let n_ff = get("feed_forward_length")?;
        let n_ctx_train = get_or("context_length", 2048)?;
        let rms_eps = getf_or("attention.layer_norm_rms_epsilon", 1e-5, (0.0, 1.0))?;
        if head_dim > 512 || head_dim % 2 != 0 {
            return Err(bad(format!(
                "head dimension {head_dim} is not supported (even, at most 512)"
            )));
        }
        if n_head % n_head_kv != 0 {
            return Err(bad(format!(
                "head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"
            )));
        }
        if get_or("attention.value_length", head_dim)? != head_dim {
            return Err(bad("value_length differs from key_length".into()));
        }
        let rope_dims = get_or("rope.dimension_count", head_dim)?;
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(bad(format!(
                "rope dimension_count {rope_dims} does not fit head_dim {head_dim}"
            )));
        }
        let mut rope_freq_scale = 1.0;
        if let Some(t) = f.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            match t {
                "none" => {}
                "linear" => {
                    rope_freq_scale = 1.0 / getf_or("rope.scaling.factor", 1.0, (0.0, 1e6))?
                }
                other => {
                    return Err(bad(format!(
                        "rope scaling {other:?} is not supported (none, linear)"
                    )))
                }
            }
        } else if f
            .get(&key("rope.scaling.factor"))
            .is_some_and(|v| v.as_f64() != Some(0.0))
        {
            // 0 means no scaling (as llama.cpp reads it).
            rope_freq_scale = 1.0 / getf_or("rope.scaling.factor", 1.0, (0.0, 1e6))?;
        }
        let (rope_style, sliding_window, swa_pattern, embed_scale, default_base) = match arch {
            Arch::Llama => (RopeStyle::Normal, None, 1, None, 10_000.0),
            Arch::Qwen2 => (RopeStyle::Neox, None, 1, None, 10_000.0),
            Arch::Gemma3 => {
                let w = get_or("attention.sliding_window", 512)?;
                (
                    RopeStyle::Neox,
                    Some(w),
                    6,
                    Some((n_embd as f32).sqrt()),
                    1_000_000.0,
                )
            }
        };
        Ok(Config {
            arch,
            arch_name: arch_name.clone(),
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_vocab: 0,
            n_ctx_train,
            rms_eps,
            rope_base: getf_or("rope.freq_base", default_base, (1.0, 1e12))?,
            rope_freq_scale,
            rope_base_swa: 10_000.0,
            rope_dims,
            rope_style,
            sliding_window,
            swa_pattern,
            embed_scale,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
        })
    }

    /// Whether layer `il` uses the sliding window (Gemma 3: all but every sixth).
    pub fn is_swa_layer(&self, il: usize) -> bool {
        self.sliding_window.is_some() && (il + 1) % self.swa_pattern != 0
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

fn bad(m: String) -> Error {
    Error::new(ErrorKind::BadConfig(m))
}
