//! Model weights: every matrix stays quantized in the memory-mapped GGUF file and is viewed in
//! place; only the small f32 vectors (norms, biases) are copied out.

use crate::config::{Arch, Config};
use crate::{Error, ErrorKind};
use ruvllm_gguf::{GgmlType, GgufFile, TensorInfo};
use ruvllm_kernels::matmul::QMatrix;
use ruvllm_kernels::quants::{can_dequantize, dequantize_row};
use std::path::Path;

/// A weight matrix: a directory entry of the model file.
#[derive(Debug, Clone)]
pub struct Weight {
    info: TensorInfo,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Where the row-interleaved copy the kernels use (when the SIMD tier has one, see
    /// `ruvllm_kernels::packed`) lies in the model's [`PackArena`]; a tied output matrix shares
    /// the embedding's.
    packed: Option<std::ops::Range<usize>>,
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
    /// Every packed matrix, in one mapping (see [`PackArena`]); empty when nothing is packed.
    packed: memmap2::Mmap,
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
        let mut arena = PackArena::for_file(&file);
        let arena = &mut arena;
        let tok_embd = matrix(&file, arena, "token_embd.weight", None, c.n_embd)?;
        config.n_vocab = tok_embd.rows;
        let c = &config;
        let output = match file.tensor_info("output.weight") {
            Some(_) => matrix(&file, arena, "output.weight", Some(c.n_vocab), c.n_embd)?,
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
                wq: matrix(&file, arena, &p("attn_q.weight"), Some(c.q_dim()), c.n_embd)?,
                wk: matrix(
                    &file,
                    arena,
                    &p("attn_k.weight"),
                    Some(c.kv_dim()),
                    c.n_embd,
                )?,
                wv: matrix(
                    &file,
                    arena,
                    &p("attn_v.weight"),
                    Some(c.kv_dim()),
                    c.n_embd,
                )?,
                wo: matrix(
                    &file,
                    arena,
                    &p("attn_output.weight"),
                    Some(c.n_embd),
                    c.q_dim(),
                )?,
                bq: opt_vec(p("attn_q.bias"), c.q_dim())?,
                bk: opt_vec(p("attn_k.bias"), c.kv_dim())?,
                bv: opt_vec(p("attn_v.bias"), c.kv_dim())?,
                q_norm: need(p("attn_q_norm.weight"), c.head_dim, gemma)?,
                k_norm: need(p("attn_k_norm.weight"), c.head_dim, gemma)?,
                post_attn_norm: need(p("post_attention_norm.weight"), c.n_embd, gemma)?,
                ffn_norm: vector(&file, &p("ffn_norm.weight"), c.n_embd)?,
                gate: matrix(&file, arena, &p("ffn_gate.weight"), Some(c.n_ff), c.n_embd)?,
                up: matrix(&file, arena, &p("ffn_up.weight"), Some(c.n_ff), c.n_embd)?,
                down: matrix(&file, arena, &p("ffn_down.weight"), Some(c.n_embd), c.n_ff)?,
                post_ffn_norm: need(p("post_ffw_norm.weight"), c.n_embd, gemma)?,
            });
        }
        Ok(Model {
            packed: arena.finish()?,
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
            packed: w.packed.clone().and_then(|r| self.packed.get(r)),
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
fn matrix(
    f: &GgufFile,
    arena: &mut PackArena,
    name: &str,
    rows: Option<usize>,
    cols: usize,
) -> Result<Weight, Error> {
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
    finite(f, &info)?;
    let packed = pack(f, arena, &info, rows, cols);
    Ok(Weight {
        info,
        rows,
        cols,
        packed,
    })
}

/// Whether `info` is a matrix the row-interleaved kernels of this CPU tier take (what [`pack`]
/// repacks), and its bytes.
fn packable_bytes(f: &GgufFile, info: &TensorInfo) -> Option<usize> {
    let ty = info.ggml_type;
    ruvllm_kernels::dispatch::packed_rows(ty)?;
    let [cols, rows] = info.dims[..] else {
        return None;
    };
    let (rows, cols) = (rows as usize, cols as usize);
    let len = f.tensor_data(info).len();
    (ruvllm_kernels::packed::can_pack(ty, rows, cols) && len == rows * (cols / 32) * ty.type_size())
        .then_some(len)
}

/// Packed matrices of one model in a single anonymous mapping advised for transparent huge
/// pages: the kernels stream ~100 MB of weights per step, and with 4 KiB pages every page of
/// them costs a TLB miss (one mapping in 2 MiB pages cut a SmolLM2-shaped step's matrix
/// products by 31% at one token and 17% at sixteen; `cargo bench -p ruvllm-kernels --bench
/// packed -- step`). Sized from the file's tensor directory before any matrix loads; untouched
/// space is never resident.
struct PackArena {
    map: Option<memmap2::MmapMut>,
    /// Offset of the first 2 MiB boundary in the mapping.
    start: usize,
    used: usize,
}

impl PackArena {
    const HUGE_PAGE: usize = 2 << 20;

    /// Room for every matrix of `f` that [`pack`] could repack (none: no mapping).
    fn for_file(f: &GgufFile) -> PackArena {
        let total: usize = f
            .tensors()
            .iter()
            .filter_map(|t| packable_bytes(f, t))
            .map(|n| n.next_multiple_of(64))
            .sum();
        Self::with_capacity(total)
    }

    /// Room for `total` bytes of matrices (each rounded up to 64), starting on a 2 MiB boundary.
    fn with_capacity(total: usize) -> PackArena {
        let map = (total > 0)
            .then(|| memmap2::MmapMut::map_anon(total + Self::HUGE_PAGE).ok())
            .flatten();
        let start = map.as_ref().map_or(0, |m| {
            // Only a hint: without transparent huge pages the kernels read 4 KiB pages as before.
            let _ = m.advise(memmap2::Advice::HugePage);
            let base = m.as_ptr() as usize;
            base.next_multiple_of(Self::HUGE_PAGE) - base
        });
        PackArena {
            map,
            start,
            used: 0,
        }
    }

    /// The next `len` bytes (64-byte aligned), or None when the arena has no room left.
    fn take(&mut self, len: usize) -> Option<(std::ops::Range<usize>, &mut [u8])> {
        let map = self.map.as_mut()?;
        let from = self.start + self.used;
        let r = from..from + len;
        let out = map.get_mut(r.clone())?;
        self.used += len.next_multiple_of(64);
        Some((r, out))
    }

    /// The filled mapping, read-only (an empty one when nothing was packed).
    fn finish(&mut self) -> Result<memmap2::Mmap, Error> {
        let map = match self.map.take() {
            Some(m) => m,
            None => {
                memmap2::MmapMut::map_anon(0).map_err(|e| bad(format!("packed weights: {e}")))?
            }
        };
        map.make_read_only()
            .map_err(|e| bad(format!("packed weights: {e}")))
    }
}

/// Repacks a matrix for the row-interleaved kernels where this CPU tier has them into the
/// model's [`PackArena`], in pieces of 4,096 rows, letting the file's pages of each piece go
/// once it is copied, so the model never holds a large matrix twice (reads of single rows,
/// e.g. embeddings, fault pages back in).
fn pack(
    f: &GgufFile,
    arena: &mut PackArena,
    info: &TensorInfo,
    rows: usize,
    cols: usize,
) -> Option<std::ops::Range<usize>> {
    use ruvllm_kernels::packed::pack_rows;
    let ty = info.ggml_type;
    if packable_bytes(f, info)? != rows * (cols / 32) * ty.type_size() {
        return None;
    }
    let data = f.tensor_data(info);
    let row_bytes = cols / 32 * ty.type_size();
    let (range, out) = arena.take(data.len())?;
    let piece = 4096 * row_bytes;
    for start in (0..data.len()).step_by(piece) {
        let end = (start + piece).min(data.len());
        pack_rows(ty, cols, &data[start..end], &mut out[start..end]);
        f.release_tensor_range(info, start, end);
    }
    Some(range)
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
    finite(f, info)?;
    let mut v = vec![0f32; n];
    dequantize_row(info.ggml_type, f.tensor_data(info), &mut v);
    Ok(v)
}

/// Refuses a tensor with a NaN or infinite value or block scale (llama.cpp's
/// `--check-tensors`, always on here: one such block turns every output that reads it into NaN,
/// which would otherwise be served as a stream of one repeated token).
fn finite(f: &GgufFile, info: &TensorInfo) -> Result<(), Error> {
    let ty = info.ggml_type;
    match ty.first_non_finite_block(f.tensor_data(info)) {
        None => Ok(()),
        Some(b) => Err(bad(format!(
            "{}: element {} is NaN or infinite (or its block's scale is): the file is corrupt",
            info.name,
            b * ty.block_size()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arena hands out disjoint, 64-byte aligned ranges from a 2 MiB boundary, refuses what
    /// does not fit, keeps what was written after it turns read-only, and an empty arena (no
    /// packed matrix: another tier, `RUVLLM_PACK=off`) still finishes.
    #[test]
    fn pack_arena_hands_out_aligned_disjoint_ranges() {
        let mut a = PackArena::with_capacity(200 + 64 + 1000);
        let (r1, b1) = a.take(200).expect("fits");
        b1.fill(1);
        let (r2, b2) = a.take(1000).expect("fits");
        b2.fill(2);
        assert!(r1.end <= r2.start && r2.start % 64 == 0 && r1.start % 64 == 0);
        assert!(a.take(4 << 20).is_none(), "beyond the mapping");
        let base = a.map.as_ref().map(|m| m.as_ptr() as usize).expect("mapped");
        assert_eq!((base + r1.start) % PackArena::HUGE_PAGE, 0);
        let map = a.finish().expect("read-only");
        assert!(map[r1].iter().all(|&b| b == 1) && map[r2].iter().all(|&b| b == 2));
        let mut empty = PackArena::with_capacity(0);
        assert!(empty.take(1).is_none());
        assert!(empty.finish().expect("empty map").is_empty());
    }
}
