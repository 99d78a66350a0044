//! Generation: prefill (reusing whatever prefix is already cached), then sample token by token
//! until EOS, a stop string, or the token limit; text is streamed as complete UTF-8.

use crate::forward::{Logits, Runner};
use crate::sampler::{Sampler, SamplingParams};
use crate::{Error, ErrorKind};
use ruvllm_tokenizer::{StreamDecoder, Tokenizer};
use std::time::Instant;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most tokens to generate; `None` fills the context.
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Strings that end generation (not included in the output).
    pub stop: Vec<String>,
    /// Keep going past EOS (benchmarks).
    pub ignore_eos: bool,
    /// Tokens per prefill batch.
    pub n_batch: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: None,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            n_batch: 256,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, an end-of-turn token, or a stop string.
    Stop,
    /// The token limit or the end of the context.
    Length,
}

impl FinishReason {
    /// OpenAI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids (the stop token excluded).
    pub tokens: Vec<u32>,
    /// Generated text (stop string excluded).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt tokens that had to be computed (the rest came from the cache).
    pub prompt_computed: usize,
    /// Seconds spent in prefill.
    pub prefill_secs: f64,
    /// Seconds spent generating after the first token.
    pub decode_secs: f64,
}

/// Finds stop strings in streamed text, holding back any tail that could still become one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds text; returns (text safe to emit, whether a stop string was hit).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(i) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..i].to_owned();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            // Proper prefixes only (a whole stop string was found above).
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.pending.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Releases held-back text at the end.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Generates a continuation of `prompt`, calling `on_text` with each piece of complete text.
pub fn generate(
    runner: &mut Runner<'_>,
    tok: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, Error> {
    let n_ctx = runner.n_ctx();
    if prompt.is_empty() {
        return Err(Error::new(ErrorKind::InvalidParam {
            param: "prompt",
            message: "the prompt is empty".into(),
        }));
    }
    let budget = match params.max_tokens {
        Some(m) if prompt.len() + m > n_ctx => {
            return Err(Error::new(ErrorKind::ContextOverflow {
                needed: prompt.len() + m,
                context: n_ctx,
            }));
        }
        Some(m) => m,
        None if prompt.len() >= n_ctx => {
            return Err(Error::new(ErrorKind::ContextOverflow {
                needed: prompt.len() + 1,
                context: n_ctx,
            }))
        }
        None => n_ctx - prompt.len(),
    };
    if let Some(&t) = prompt
        .iter()
        .find(|&&t| t as usize >= runner.model().config.n_vocab)
    {
        return Err(Error::new(ErrorKind::BadToken(t)));
    }
    let mut sampler = Sampler::new(params.sampling.clone())?;

    // Reuse the cached prefix; always recompute at least the last prompt token for its logits.
    let common = runner
        .history()
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len() - 1);
    runner.truncate(common);
    let t0 = Instant::now();
    let rest = &prompt[common..];
    let n_batch = params.n_batch.max(1);
    let mut logits = Vec::new();
    for (i, chunk) in rest.chunks(n_batch).enumerate() {
        let last = (i + 1) * n_batch >= rest.len();
        let l = runner.forward(chunk, if last { Logits::Last } else { Logits::None })?;
        if last {
            logits.clear();
            logits.extend_from_slice(l);
        }
    }
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();

    let mut history: Vec<u32> = prompt.to_vec();
    let mut out_tokens = Vec::new();
    let mut text = String::new();
    let mut decoder = StreamDecoder::new();
    let mut stops = StopMatcher::new(&params.stop);
    let mut bytes = Vec::new();
    let mut finish = FinishReason::Length;
    let mut hit_stop = false;
    for step in 0..budget {
        if !ruvllm_kernels::ops::all_finite(&logits) {
            return Err(Error::new(ErrorKind::NonFiniteLogits));
        }
        let next = sampler.sample(&logits, &history);
        if !params.ignore_eos && tok.is_eog(next) {
            finish = FinishReason::Stop;
            break;
        }
        out_tokens.push(next);
        history.push(next);
        bytes.clear();
        tok.token_bytes(next, false, &mut bytes)?;
        let piece = decoder.push(&bytes);
        let (emit, hit) = stops.push(&piece);
        if !emit.is_empty() {
            on_text(&emit);
            text.push_str(&emit);
        }
        if hit {
            finish = FinishReason::Stop;
            hit_stop = true;
            break;
        }
        if step + 1 == budget {
            break;
        }
        let l = runner.forward(&[next], Logits::Last)?;
        logits.clear();
        logits.extend_from_slice(l);
    }
    if !hit_stop {
        // Flush what the decoder and the stop matcher still hold.
        let (mut tail, hit) = stops.push(&decoder.finish());
        if !hit {
            tail.push_str(&stops.finish());
        }
        if !tail.is_empty() {
            on_text(&tail);
            text.push_str(&tail);
        }
    }
    Ok(Generation {
        tokens: out_tokens,
        text,
        finish,
        prompt_computed: rest.len(),
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_partial_matches() {
        let mut m = StopMatcher::new(&["\nUser:".to_string()]);
        assert_eq!(m.push("Hello"), ("Hello".into(), false));
        assert_eq!(m.push(" world\nUs"), (" world".into(), false));
        assert_eq!(m.push("ually"), ("\nUsually".into(), false));
        assert_eq!(m.push("\nUser: hi"), ("".into(), true));
        // "bc" is listed first but "ab" starts earlier in the text: the earliest match wins.
        let mut m = StopMatcher::new(&["bc".to_string(), "ab".to_string()]);
        assert_eq!(m.push("xabc"), ("x".into(), true));
    }
}
