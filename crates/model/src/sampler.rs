//! Token sampling: repetition/frequency/presence penalties, then top-k, top-p, min-p and
//! temperature, in llama.cpp's default order; temperature 0 is greedy. The sampler owns its
//! random state, so a seed makes sampled output reproducible.

use crate::{Error, ErrorKind};

/// Sampling parameters (OpenAI and llama.cpp names).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set with cumulative probability ≥ p (1: off).
    pub top_p: f32,
    /// Drop tokens below `min_p ×` the top probability (0: off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens (1: off).
    pub repetition_penalty: f32,
    /// Subtract `count × frequency_penalty` from recent tokens' logits.
    pub frequency_penalty: f32,
    /// Subtract `presence_penalty` from every recent token's logit.
    pub presence_penalty: f32,
    /// How many recent tokens the penalties look at (0: all).
    pub penalty_last_n: usize,
    /// RNG seed; `None` draws one from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks every parameter's range; the error names the parameter.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |param: &'static str, message: String| {
            Err(Error::new(ErrorKind::InvalidParam { param, message }))
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > 100.0 {
            return bad(
                "temperature",
                format!("temperature must be in [0, 100], got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            );
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(
                "min_p",
                format!("min_p must be in [0, 1], got {}", self.min_p),
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be > 0, got {}",
                    self.repetition_penalty
                ),
            );
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }
}

/// A sampler with its own random state and reusable buffers.
pub struct Sampler {
    params: SamplingParams,
    rng: [u64; 4],
    cands: Vec<(f32, u32)>,
    /// Probabilities of `cands` (reused buffer).
    probs: Vec<f32>,
    counts: std::collections::HashMap<u32, u32>,
    /// The logits with penalties applied (only filled when a penalty is set, so greedy and
    /// plain temperature sampling read the caller's row without copying it).
    penalized: Vec<f32>,
}

/// Softmax of candidate logits (sorted, best first) at temperature `t`, into a reused buffer.
fn softmax_into(c: &[(f32, u32)], t: f32, out: &mut Vec<f32>) {
    out.clear();
    let mx = c.first().map_or(0.0, |x| x.0);
    out.extend(c.iter().map(|&(l, _)| ((l - mx) / t).exp()));
    let s: f32 = out.iter().sum();
    out.iter_mut().for_each(|v| *v /= s);
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Sampler {
    /// A sampler for validated parameters.
    pub fn new(params: SamplingParams) -> Result<Sampler, Error> {
        params.validate()?;
        let mut seed = params.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ (std::process::id() as u64) << 32
        });
        let rng = [
            splitmix(&mut seed),
            splitmix(&mut seed),
            splitmix(&mut seed),
            splitmix(&mut seed),
        ];
        Ok(Sampler {
            params,
            rng,
            cands: Vec::new(),
            probs: Vec::new(),
            counts: Default::default(),
            penalized: Vec::new(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// xoshiro256** → a float in [0, 1).
    fn uniform(&mut self) -> f32 {
        let s = &mut self.rng;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        (result >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Picks the next token from `logits` (left as they are: penalties apply to a copy);
    /// `history` is the sequence so far (prompt and generated tokens).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut penalized = std::mem::take(&mut self.penalized);
        let logits = if p.repetition_penalty != 1.0
            || p.frequency_penalty != 0.0
            || p.presence_penalty != 0.0
        {
            penalized.clear();
            penalized.extend_from_slice(logits);
            let logits = &mut penalized[..];
            let recent = if p.penalty_last_n == 0 {
                history
            } else {
                &history[history.len().saturating_sub(p.penalty_last_n)..]
            };
            self.counts.clear();
            for &t in recent {
                *self.counts.entry(t).or_insert(0) += 1;
            }
            for (&t, &n) in &self.counts {
                let Some(l) = logits.get_mut(t as usize) else {
                    continue;
                };
                if *l > 0.0 {
                    *l /= p.repetition_penalty;
                } else {
                    *l *= p.repetition_penalty;
                }
                *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
            }
            &penalized[..]
        } else {
            logits
        };
        let next = self.pick(logits);
        self.penalized = penalized;
        next
    }

    /// The token drawn from (penalized) `logits` by the temperature and truncation settings.
    fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let (top_k, top_p, min_p, temp) = (p.top_k, p.top_p, p.min_p, p.temperature);
        self.cands.clear();
        self.cands
            .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if top_k > 0 && top_k < self.cands.len() {
            self.cands.select_nth_unstable_by(top_k - 1, by_logit);
            self.cands.truncate(top_k);
        }
        self.cands.sort_unstable_by(by_logit);
        // Probabilities at temperature 1 for top-p/min-p (llama.cpp applies temperature last).
        if top_p < 1.0 {
            softmax_into(&self.cands, 1.0, &mut self.probs);
            let mut cum = 0.0;
            let mut keep = self.probs.len();
            for (i, pr) in self.probs.iter().enumerate() {
                cum += pr;
                if cum >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cands.truncate(keep.max(1));
        }
        if min_p > 0.0 {
            let mx = self.cands[0].0;
            let thresh = mx + min_p.ln();
            let keep = self.cands.iter().take_while(|c| c.0 >= thresh).count();
            self.cands.truncate(keep.max(1));
        }
        softmax_into(&self.cands, temp, &mut self.probs);
        let r = self.uniform();
        let mut cum = 0.0;
        for (pr, c) in self.probs.iter().zip(&self.cands) {
            cum += pr;
            if r < cum {
                return c.1;
            }
        }
        self.cands.last().map_or(0, |c| c.1)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    // A vector max pass, then the first position holding it (0 for an empty row).
    let max = ruvllm_kernels::ops::max_f32(logits);
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_parameters_are_named() {
        for (p, name) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: 2.0,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: 3.0,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
        ] {
            let e = Sampler::new(p).err().expect("must be rejected");
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn greedy_seeded_and_filtered_sampling() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let best = argmax(&logits);
        let mut g = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(g.sample(&logits, &[]), best);
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..50).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(&p), draw(&p), "same seed, same tokens");
        assert_ne!(
            draw(&p),
            draw(&SamplingParams {
                seed: Some(43),
                ..p.clone()
            })
        );
        // top_k = 1 is greedy whatever the temperature.
        assert!(draw(&SamplingParams {
            top_k: 1,
            ..p.clone()
        })
        .iter()
        .all(|&t| t == best));
        // min_p = 1 keeps only the top token.
        assert!(draw(&SamplingParams {
            min_p: 1.0,
            ..p.clone()
        })
        .iter()
        .all(|&t| t == best));
    }

    /// Greedy picks the first of equal maxima, anywhere in a vocabulary-sized row (the vector
    /// max pass covers the tail too), and leaves the row as it was.
    #[test]
    fn argmax_takes_first_maximum() {
        for n in [1usize, 7, 8, 9, 49_152] {
            let mut l: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
            let top = n * 2 / 3;
            l[top] = 50.0;
            if top + 1 < n {
                l[n - 1] = 50.0;
            }
            assert_eq!(argmax(&l), top as u32, "n = {n}");
            let copy = l.clone();
            let mut g = Sampler::new(SamplingParams::greedy()).expect("valid parameters");
            assert_eq!(g.sample(&l, &[]), top as u32);
            assert_eq!(l, copy);
        }
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn penalties_lower_repeated_tokens() {
        let l = vec![2.0f32, 1.9, -1.0];
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&l, &[0, 2]), 1);
        // The penalties went to the sampler's copy; the caller's row is untouched.
        let p = &s.penalized;
        assert!((p[0] - 2.0 / 1.5).abs() < 1e-6 && (p[2] + 1.5).abs() < 1e-6);
        assert_eq!(l, [2.0, 1.9, -1.0]);
        let l = vec![2.0f32, 1.9];
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.1,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&l, &[0, 0]), 1);
    }
}
