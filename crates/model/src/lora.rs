//! LoRA adapters applied inside the forward pass: for an adapted projection `W` (out × in),
//! `y = W·x + scale · B·(A·x)` with `A: rank × in`, `B: out × rank`. Each sequence of a batch may
//! carry its own adapter (or none); the base weights stay quantized and shared.
//!
//! Adapters load from and save to Hugging Face PEFT's layout: `adapter_config.json`
//! (`r`, `lora_alpha`, `use_rslora`, `target_modules`) and `adapter_model.safetensors` with
//! tensors `base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight` and
//! `…mlp.{gate,up,down}_proj.lora_{A,B}.weight`. llama.cpp's converter permutes the rows of the
//! llama q/k projections for its RoPE layout; `B` of those projections is permuted the same way
//! on load (and back on save), so HF adapters apply to GGUF weights unchanged.

use crate::config::Arch;
use crate::weights::Model;
use crate::{Error, ErrorKind};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The projections an adapter can target, in PEFT's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    /// `q_proj` (`attn_q`).
    Q,
    /// `k_proj` (`attn_k`).
    K,
    /// `v_proj` (`attn_v`).
    V,
    /// `o_proj` (`attn_output`).
    O,
    /// `gate_proj` (`ffn_gate`).
    Gate,
    /// `up_proj` (`ffn_up`).
    Up,
    /// `down_proj` (`ffn_down`).
    Down,
}

impl Proj {
    /// Every projection, in a fixed order (the index of [`LayerLora`]'s array).
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// PEFT's module name.
    pub fn peft_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        }
    }

    /// (out, in) of this projection in `model`.
    pub fn shape(self, c: &crate::Config) -> (usize, usize) {
        match self {
            Proj::Q => (c.q_dim(), c.n_embd),
            Proj::K | Proj::V => (c.kv_dim(), c.n_embd),
            Proj::O => (c.n_embd, c.q_dim()),
            Proj::Gate | Proj::Up => (c.n_ff, c.n_embd),
            Proj::Down => (c.n_embd, c.n_ff),
        }
    }

    fn index(self) -> usize {
        Proj::ALL.iter().position(|&p| p == self).unwrap_or(0)
    }
}

/// One adapted projection.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// Rank.
    pub rank: usize,
    /// Down-projection: `[rank × in]`.
    pub a: Vec<f32>,
    /// Up-projection, rows in the GGUF's order: `[out × rank]`.
    pub b: Vec<f32>,
    /// Multiplier of `B·A` (PEFT: `lora_alpha / r`, or `/ √r` with rsLoRA; times a user scale).
    pub scale: f32,
}

/// The adapted projections of one layer, indexed as [`Proj::ALL`].
pub type LayerLora = [Option<LoraPair>; 7];

/// A LoRA adapter for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    /// Name (what requests ask for).
    pub name: String,
    /// Identity mixed into prefix-cache hashes with `version`, so KV computed under other
    /// weights is never reused.
    pub id: u64,
    /// Bumped whenever the weights change.
    pub version: u64,
    /// Per layer.
    pub layers: Vec<LayerLora>,
}

fn err(m: impl Into<String>) -> Error {
    Error::new(ErrorKind::BadWeights(m.into()))
}

/// llama.cpp's row permutation of llama q/k weights (HF → GGUF): within each head of `hd`
/// rows, row `j·hd/2 + i` moves to `2i + j`.
pub fn permute_rows(b: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    move_rows(b, n_head, cols, true)
}

/// The inverse of [`permute_rows`] (GGUF → HF).
pub fn unpermute_rows(b: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    move_rows(b, n_head, cols, false)
}

fn move_rows(b: &[f32], n_head: usize, cols: usize, to_gguf: bool) -> Vec<f32> {
    let hd = b.len() / cols / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; b.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let (gguf, hf) = (h * hd + 2 * i + j, h * hd + j * half + i);
                let (dst, src) = if to_gguf { (gguf, hf) } else { (hf, gguf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&b[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Whether the GGUF converter permuted this projection's rows (llama q and k).
fn permuted(model: &Model, p: Proj) -> Option<usize> {
    let c = &model.config;
    match (c.arch, p) {
        (Arch::Llama, Proj::Q) => Some(c.n_head),
        (Arch::Llama, Proj::K) => Some(c.n_head_kv),
        _ => None,
    }
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, Error> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(err(format!(
                "LoRA tensors must be F32, F16 or BF16, not {other:?}"
            )))
        }
    })
}

impl LoraAdapter {
    /// Whether the adapter changes any layer's keys or values: K/V of layer `l` depend on every
    /// projection of the layers before it and on `l`'s own k and v, so only an adapter on the
    /// last layer's q, o, gate, up or down leaves the whole KV cache as the base model's (as
    /// SONA's adapters on the last down projection do). Such an adapter's requests may share
    /// prefix-cached blocks with the base model's.
    pub fn affects_kv(&self) -> bool {
        let last = self.layers.len().saturating_sub(1);
        self.layers.iter().enumerate().any(|(l, projs)| {
            projs
                .iter()
                .zip(Proj::ALL)
                .any(|(p, proj)| p.is_some() && (l < last || matches!(proj, Proj::K | Proj::V)))
        })
    }

    /// Whether the adapter changes anything `layer`'s down projection reads or adds to: a
    /// projection of an earlier layer, or one of `layer`'s own other than down. When it does
    /// not, that layer's down input, base down output and residual are the base model's.
    pub fn adapts_before_down(&self, layer: usize) -> bool {
        self.layers.iter().enumerate().any(|(l, projs)| {
            projs
                .iter()
                .zip(Proj::ALL)
                .any(|(p, proj)| p.is_some() && (l < layer || (l == layer && proj != Proj::Down)))
        })
    }

    /// An adapter with no projections (a starting point for training).
    pub fn empty(name: &str, id: u64, n_layer: usize) -> LoraAdapter {
        LoraAdapter {
            name: name.into(),
            id,
            version: 0,
            layers: (0..n_layer).map(|_| Default::default()).collect(),
        }
    }

    /// The adapted projection `p` of `layer`, if any.
    pub fn pair(&self, layer: usize, p: Proj) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[p.index()].as_ref())
    }

    /// Sets projection `p` of `layer`.
    pub fn set(&mut self, layer: usize, p: Proj, pair: LoraPair) {
        if let Some(l) = self.layers.get_mut(layer) {
            l[p.index()] = Some(pair);
        }
    }

    /// Loads a PEFT adapter (a directory with `adapter_config.json` and
    /// `adapter_model.safetensors`, or the `.safetensors` file with the config beside it) for
    /// `model`, multiplying PEFT's scale by `user_scale`.
    pub fn load_peft(
        path: &Path,
        model: &Model,
        name: &str,
        id: u64,
        user_scale: f32,
    ) -> Result<LoraAdapter, Error> {
        let (dir, file) = if path.is_dir() {
            (path.to_path_buf(), path.join("adapter_model.safetensors"))
        } else {
            (
                path.parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from(".")),
                path.to_path_buf(),
            )
        };
        let cfg_text = std::fs::read_to_string(dir.join("adapter_config.json")).map_err(|e| {
            err(format!(
                "cannot read {}: {e}",
                dir.join("adapter_config.json").display()
            ))
        })?;
        let cfg: serde_json::Value = serde_json::from_str(&cfg_text)
            .map_err(|e| err(format!("adapter_config.json: {e}")))?;
        let r = cfg["r"]
            .as_f64()
            .ok_or_else(|| err("adapter_config.json lacks `r`"))?;
        let alpha = cfg["lora_alpha"].as_f64().unwrap_or(r);
        if r <= 0.0 {
            return Err(err("adapter_config.json: `r` must be positive"));
        }
        if cfg["fan_in_fan_out"].as_bool() == Some(true) {
            return Err(err("fan_in_fan_out adapters are not supported"));
        }
        let scale = if cfg["use_rslora"].as_bool() == Some(true) {
            alpha / r.sqrt()
        } else {
            alpha / r
        } as f32
            * user_scale;
        if !scale.is_finite() {
            return Err(err(format!(
                "adapter scale {scale} (lora_alpha {alpha}, r {r}, scale {user_scale}) is not finite"
            )));
        }
        let bytes = std::fs::read(&file)
            .map_err(|e| err(format!("cannot read {}: {e}", file.display())))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("{}: {e}", file.display())))?;
        let c = &model.config;
        let mut ad = LoraAdapter::empty(name, id, c.n_layer);
        let mut found: HashMap<(usize, Proj), (Option<Vec<f32>>, Option<Vec<f32>>, usize)> =
            HashMap::new();
        for (tname, view) in st.tensors() {
            // base_model.model.model.layers.{i}.{parent}.{proj}.lora_{A,B}[.adapter].weight
            let Some(rest) = tname.split("layers.").nth(1) else {
                continue;
            };
            let parts: Vec<&str> = rest.split('.').collect();
            let (Some(layer), Some(proj), Some(which)) = (
                parts.first().and_then(|s| s.parse::<usize>().ok()),
                parts.get(2),
                parts.get(3),
            ) else {
                continue;
            };
            let Some(p) = Proj::ALL.iter().copied().find(|p| p.peft_name() == *proj) else {
                continue;
            };
            if layer >= c.n_layer {
                return Err(err(format!(
                    "{tname}: layer {layer} but the model has {}",
                    c.n_layer
                )));
            }
            let shape = view.shape().to_vec();
            if shape.len() != 2 {
                return Err(err(format!(
                    "{tname}: expected a matrix, got shape {shape:?}"
                )));
            }
            let data = to_f32(view.dtype(), view.data())?;
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(err(format!("{tname}: element {i} is NaN or infinite")));
            }
            let (out, inp) = p.shape(c);
            let e = found.entry((layer, p)).or_insert((None, None, 0));
            match *which {
                "lora_A" => {
                    if shape[1] != inp {
                        return Err(err(format!(
                            "{tname}: shape {shape:?}, expected [r, {inp}]"
                        )));
                    }
                    e.2 = shape[0];
                    e.0 = Some(data);
                }
                "lora_B" => {
                    if shape[0] != out {
                        return Err(err(format!(
                            "{tname}: shape {shape:?}, expected [{out}, r]"
                        )));
                    }
                    e.1 = Some(data);
                }
                _ => continue,
            }
        }
        if found.is_empty() {
            return Err(err(format!("{}: no LoRA tensors found", file.display())));
        }
        for ((layer, p), (a, b, rank)) in found {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(err(format!(
                    "layer {layer} {}: lora_A and lora_B must both be present",
                    p.peft_name()
                )));
            };
            if b.len() != p.shape(c).0 * rank {
                return Err(err(format!(
                    "layer {layer} {}: lora_B is not [out, {rank}]",
                    p.peft_name()
                )));
            }
            let b = match permuted(model, p) {
                Some(n_head) => permute_rows(&b, n_head, rank),
                None => b,
            };
            ad.set(layer, p, LoraPair { rank, a, b, scale });
        }
        Ok(ad)
    }

    /// Writes the adapter in PEFT's layout into `dir` (created if missing). All projections must
    /// share one rank and one scale (PEFT's config holds one of each); `lora_alpha` is written
    /// as `scale × r`.
    pub fn save_peft(&self, dir: &Path, model: &Model) -> Result<(), Error> {
        let pairs: Vec<(usize, Proj, &LoraPair)> = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(l, ps)| {
                Proj::ALL
                    .iter()
                    .filter_map(move |&p| ps[p.index()].as_ref().map(|x| (l, p, x)))
            })
            .collect();
        let Some(&(_, _, first)) = pairs.first() else {
            return Err(err("the adapter is empty"));
        };
        if pairs
            .iter()
            .any(|(_, _, x)| x.rank != first.rank || x.scale != first.scale)
        {
            return Err(err(
                "PEFT files hold one rank and one scale; this adapter mixes them",
            ));
        }
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut modules: Vec<&str> = Vec::new();
        for &(l, p, x) in &pairs {
            let (out, inp) = p.shape(&model.config);
            let b = match permuted(model, p) {
                Some(n_head) => unpermute_rows(&x.b, n_head, x.rank),
                None => x.b.clone(),
            };
            let base = format!(
                "base_model.model.model.layers.{l}.{}.{}",
                p.parent(),
                p.peft_name()
            );
            let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
            tensors.push((
                format!("{base}.lora_A.weight"),
                vec![x.rank, inp],
                bytes(&x.a),
            ));
            tensors.push((
                format!("{base}.lora_B.weight"),
                vec![out, x.rank],
                bytes(&b),
            ));
            if !modules.contains(&p.peft_name()) {
                modules.push(p.peft_name());
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, d)| {
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), d)
                    .map(|v| (n.clone(), v))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| err(format!("safetensors: {e}")))?;
        let data =
            safetensors::serialize(views, None).map_err(|e| err(format!("safetensors: {e}")))?;
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "r": first.rank,
            "lora_alpha": first.scale * first.rank as f32,
            "target_modules": modules,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "task_type": "CAUSAL_LM",
        });
        write_atomic(&dir.join("adapter_model.safetensors"), &data)?;
        write_atomic(&dir.join("adapter_config.json"), cfg.to_string().as_bytes())
    }
}

/// Writes a file through a temporary sibling, fsync and rename: a crash leaves the old file or
/// the new one, never a torn one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let io = |e: std::io::Error| err(format!("cannot write {}: {e}", path.display()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    // Make the rename itself durable (best effort: not every platform can open a directory).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_the_converter_and_inverts() {
        // One head of 4 rows, HF order r0 r1 r2 r3: reshape(1, 2, 2) and swap the last two
        // axes → r0 r2 r1 r3.
        let b: Vec<f32> = (0..4).map(|r| r as f32).collect();
        assert_eq!(permute_rows(&b, 1, 1), vec![0.0, 2.0, 1.0, 3.0]);
        // Two heads of 8 rows, 3 columns: round trip.
        let b: Vec<f32> = (0..48).map(|v| v as f32).collect();
        let p = permute_rows(&b, 2, 3);
        assert_ne!(p, b);
        assert_eq!(unpermute_rows(&p, 2, 3), b);
        // Head 1 row 1 (GGUF) comes from HF row hd/2 of head 1: 8 + 4 = 12.
        assert_eq!(p[9 * 3], 12.0 * 3.0);
    }
}
