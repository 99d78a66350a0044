//! Streaming detokenization that never emits a broken UTF-8 sequence.

/// Collects token bytes and releases only complete UTF-8 text; an incomplete character at the
/// end is held back until the next token completes it. Bytes that can never form a character
/// come out as U+FFFD.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // SAFETY-free: from_utf8 said these bytes are valid.
                    out.push_str(std::str::from_utf8(&self.pending[..good]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                        None => {
                            // An incomplete character at the end: keep it for later.
                            self.pending.drain(..good);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Flushes whatever is left (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_split_characters() {
        let crab = "🦀".as_bytes();
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(b"a"), "a");
        assert_eq!(d.push(&crab[..1]), "");
        assert_eq!(d.push(&crab[1..3]), "");
        assert_eq!(d.push(&crab[3..]), "🦀");
        assert_eq!(d.push(&[0xff, b'x']), "\u{FFFD}x");
        assert_eq!(d.push(&crab[..2]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
