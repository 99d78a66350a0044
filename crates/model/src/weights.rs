//! Model weights: every matrix stays quantized in the memory-mapped GGUF file and is viewed in
//! place; only the small f32 vectors (norms, biases) are copied out.

use crate::config::{Arch, Config};
use crate::{Error, ErrorKind};
use ruvllm_gguf::{GgmlType, GgufFile, TensorInfo};
use ruvllm_kernels::matmul::QMatrix;
use ruvllm_kernels::quants::{can_dequantize, dequantize_row};
use std::path::Path;
use std::sync::Arc;

/// A weight matrix: a directory entry of the model file.
#[derive(Debug, Clone)]
pub struct Weight {
    info: TensorInfo,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The row-interleaved copy the kernels use when the SIMD tier has one (see
    /// `ruvllm_kernels::packed`); shared, because a tied output matrix is the embedding.
    packed: Option<Arc<Vec<u8>>>,
}

impl Weight {
    /// The element type.
    pub fn ty(&self) -> GgmlType {
        self.info.ggml_type
    }
}

/// One transformer block.
#[derive(Debug)]
pub struct Layer {
    /// Pre-attention RMSNorm weight: `[n_embd]`.
    pub attn_norm: Vec<f32>,
    /// Query projection: `[q_dim × n_embd]`.
    pub wq: Weight,
    /// Key projection: `[kv_dim × n_embd]`.
    pub wk: Weight,
    /// Value projection: `[kv_dim × n_embd]`.
    pub wv: Weight,
    /// Output projection: `[n_embd × q_dim]`.
    pub wo: Weight,
    /// Query bias (qwen2): `[q_dim]`.
    pub bq: Option<Vec<f32>>,
    /// Key bias (qwen2): `[kv_dim]`.
    pub bk: Option<Vec<f32>>,
    /// Value bias (qwen2): `[kv_dim]`.
    pub bv: Option<Vec<f32>>,
    /// Per-head query RMSNorm (gemma3): `[head_dim]`.
    pub q_norm: Option<Vec<f32>>,
    /// Per-head key RMSNorm (gemma3): `[head_dim]`.
    pub k_norm: Option<Vec<f32>>,
    /// RMSNorm on the attention output before the residual (gemma3): `[n_embd]`.
    pub post_attn_norm: Option<Vec<f32>>,
    /// Pre-FFN RMSNorm weight: `[n_embd]`.
    pub ffn_norm: Vec<f32>,
    /// Gate projection: `[n_ff × n_embd]`.
    pub gate: Weight,
    /// Up projection: `[n_ff × n_embd]`.
    pub up: Weight,
    /// Down projection: `[n_embd × n_ff]`.
    pub down: Weight,
    /// RMSNorm on the FFN output before the residual (gemma3): `[n_embd]`.
    pub post_ffn_norm: Option<Vec<f32>>,
}

/// A loaded model: config, weight views and the mapped file.
pub struct Model {
    file: GgufFile,
    /// Hyperparameters.
    pub config: Config,
    /// Token embeddings: `[n_vocab × n_embd]`.
    pub tok_embd: Weight,
    /// Output (LM head): `[n_vocab × n_embd]`; the embedding itself when tied.
    pub output: Weight,
    /// Final RMSNorm: `[n_embd]`.
    pub output_norm: Vec<f32>,
    /// RoPE frequency factors (Llama 3.1 `rope_freqs.weight`): `[rope_dims / 2]`.
    pub rope_freqs: Option<Vec<f32>>,
    /// The blocks.
    pub layers: Vec<Layer>,
}

fn bad(m: String) -> Error {
    Error::new(ErrorKind::BadWeights(m))
}

impl Model {
    /// Maps a GGUF file and checks every tensor the architecture needs.
    pub fn load(path: &Path) -> Result<Model, Error> {
        Self::from_gguf(GgufFile::open(path)?)
    }

    /// Builds a model from a parsed file.
    pub fn from_gguf(file: GgufFile) -> Result<Model, Error> {
        let mut config = Config::from_gguf(&file)?;
        let c = &config;
        let tok_embd = matrix(&file, "token_embd.weight", None, c.n_embd)?;
        config.n_vocab = tok_embd.rows;
        let c = &config;
        let output = match file.tensor_info("output.weight") {
            Some(_) => matrix(&file, "output.weight", Some(c.n_vocab), c.n_embd)?,
            None => tok_embd.clone(),
        };
        let output_norm = vector(&file, "output_norm.weight", c.n_embd)?;
        let rope_freqs = match file.tensor_info("rope_freqs.weight") {
            Some(_) => Some(vector(&file, "rope_freqs.weight", c.rope_dims / 2)?),
            None => None,
        };
        let opt_vec = |name: String, n: usize| -> Result<Option<Vec<f32>>, Error> {
            match file.tensor_info(&name) {
                Some(_) => vector(&file, &name, n).map(Some),
                None => Ok(None),
            }
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for il in 0..c.n_layer {
            let p = |s: &str| format!("blk.{il}.{s}");
            let gemma = c.arch == Arch::Gemma3;
            let need =
                |name: String, n: usize, required: bool| -> Result<Option<Vec<f32>>, Error> {
                    let v = opt_vec(name.clone(), n)?;
                    if required && v.is_none() {
                        return Err(bad(format!("missing tensor {name}")));
                    }
                    Ok(v)
                };
            layers.push(Layer {
                attn_norm: vector(&file, &p("attn_norm.weight"), c.n_embd)?,
                wq: matrix(&file, &p("attn_q.weight"), Some(c.q_dim()), c.n_embd)?,
                wk: matrix(&file, &p("attn_k.weight"), Some(c.kv_dim()), c.n_embd)?,
                wv: matrix(&file, &p("attn_v.weight"), Some(c.kv_dim()), c.n_embd)?,
                wo: matrix(&file, &p("attn_output.weight"), Some(c.n_embd), c.q_dim())?,
                bq: opt_vec(p("attn_q.bias"), c.q_dim())?,
                bk: opt_vec(p("attn_k.bias"), c.kv_dim())?,
                bv: opt_vec(p("attn_v.bias"), c.kv_dim())?,
                q_norm: need(p("attn_q_norm.weight"), c.head_dim, gemma)?,
                k_norm: need(p("attn_k_norm.weight"), c.head_dim, gemma)?,
                post_attn_norm: need(p("post_attention_norm.weight"), c.n_embd, gemma)?,
                ffn_norm: vector(&file, &p("ffn_norm.weight"), c.n_embd)?,
                gate: matrix(&file, &p("ffn_gate.weight"), Some(c.n_ff), c.n_embd)?,
                up: matrix(&file, &p("ffn_up.weight"), Some(c.n_ff), c.n_embd)?,
                down: matrix(&file, &p("ffn_down.weight"), Some(c.n_embd), c.n_ff)?,
                post_ffn_norm: need(p("post_ffw_norm.weight"), c.n_embd, gemma)?,
            });
        }
        Ok(Model {
            file,
            config,
            tok_embd,
            output,
            output_norm,
            rope_freqs,
            layers,
        })
    }

    /// The parsed file (metadata, tensor directory).
    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }

    /// A zero-copy view of a weight matrix.
    pub fn mat<'a>(&'a self, w: &'a Weight) -> QMatrix<'a> {
        QMatrix {
            ty: w.info.ggml_type,
            rows: w.rows,
            cols: w.cols,
            data: self.file.tensor_data(&w.info),
            packed: w.packed.as_deref().map(|v| v.as_slice()),
        }
    }

    /// Writes the embedding of `token` into `out` (`[n_embd]`).
    pub fn embed(&self, token: u32, out: &mut [f32]) -> Result<(), Error> {
        if token as usize >= self.config.n_vocab {
            return Err(Error::new(ErrorKind::BadToken(token)));
        }
        let m = self.mat(&self.tok_embd);
        dequantize_row(m.ty, m.row(token as usize), out);
        if let Some(s) = self.config.embed_scale {
            out.iter_mut().for_each(|v| *v *= s);
        }
        Ok(())
    }
}

/// A 2-D matrix with `cols` inputs and (if given) `rows` outputs, in a type the kernels multiply.
fn matrix(f: &GgufFile, name: &str, rows: Option<usize>, cols: usize) -> Result<Weight, Error> {
    let info = f
        .tensor_info(name)
        .ok_or_else(|| bad(format!("missing tensor {name}")))?
        .clone();
    let ty = info.ggml_type;
    if !can_dequantize(ty) || ty == GgmlType::Q8_K {
        return Err(bad(format!(
            "{name}: tensor type {ty} cannot be used as a weight matrix"
        )));
    }
    if info.dims.len() != 2
        || info.dims[0] as usize != cols
        || rows.is_some_and(|r| info.dims[1] as usize != r)
    {
        return Err(bad(format!(
            "{name}: shape {:?}, expected [{cols}, {}]",
            info.dims,
            rows.map_or("n".to_string(), |r| r.to_string())
        )));
    }
    let rows = info.dims[1] as usize;
    let packed = pack(f, &info, rows, cols);
    Ok(Weight {
        info,
        rows,
        cols,
        packed,
    })
}

/// Repacks a matrix for the row-interleaved kernels where this CPU tier has them, in pieces of
/// 4,096 rows, letting the file's pages of each piece go once it is copied, so the model never
/// holds a large matrix twice (reads of single rows, e.g. embeddings, fault pages back in).
fn pack(f: &GgufFile, info: &TensorInfo, rows: usize, cols: usize) -> Option<Arc<Vec<u8>>> {
    use ruvllm_kernels::packed::{can_pack, pack_rows};
    let ty = info.ggml_type;
    ruvllm_kernels::dispatch::packed_rows(ty)?;
    if !can_pack(ty, rows, cols) {
        return None;
    }
    let data = f.tensor_data(info);
    let row_bytes = cols / 32 * ty.type_size();
    if data.len() != rows * row_bytes {
        return None;
    }
    let mut out = vec![0u8; data.len()];
    let piece = 4096 * row_bytes;
    for start in (0..data.len()).step_by(piece) {
        let end = (start + piece).min(data.len());
        pack_rows(ty, cols, &data[start..end], &mut out[start..end]);
        f.release_tensor_range(info, start, end);
    }
    Some(Arc::new(out))
}

/// A 1-D vector of length `n`, dequantized to f32.
fn vector(f: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, Error> {
    let info = f
        .tensor_info(name)
        .ok_or_else(|| bad(format!("missing tensor {name}")))?;
    if info.n_elements() != n as u64
        || !can_dequantize(info.ggml_type)
        || n % info.ggml_type.block_size() != 0
    {
        return Err(bad(format!(
            "{name}: {} elements of {}, expected {n}",
            info.n_elements(),
            info.ggml_type
        )));
    }
    let mut v = vec![0f32; n];
    dequantize_row(info.ggml_type, f.tensor_data(info), &mut v);
    Ok(v)
}
