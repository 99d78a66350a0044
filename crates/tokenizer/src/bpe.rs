//! Byte-level BPE (GPT-2 family) with llama.cpp's pre-tokenizer regexes.

use crate::{Error, ErrorKind};
use fancy_regex::Regex;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::OnceLock;

/// GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the rest map to U+0100….
fn byte_table() -> &'static ([char; 256], HashMap<char, u8>) {
    static T: OnceLock<([char; 256], HashMap<char, u8>)> = OnceLock::new();
    T.get_or_init(|| {
        let mut chars = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..256u32 {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            chars[b as usize] = if printable {
                char::from_u32(b).unwrap_or('\0')
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('\0')
            };
        }
        let rev = chars
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        (chars, rev)
    })
}

/// The character that stands for `b` in byte-level vocabularies.
pub(crate) fn byte_char(b: u8) -> char {
    byte_table().0[b as usize]
}

/// Appends the bytes a byte-level token text stands for.
pub(crate) fn decode_bytes(text: &str, out: &mut Vec<u8>) {
    let rev = &byte_table().1;
    for c in text.chars() {
        match rev.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regex sequence and merge policy llama.cpp uses for a `tokenizer.ggml.pre` value
/// (`llm_tokenizer_bpe` in `llama-vocab.cpp`).
fn pre_tokenizer(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2], false)
        }
        "llama-bpe" | "llama3" | "falcon3" | "pixtral" => (vec![LLAMA3], true),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => (vec![QWEN2], false),
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" => (vec![GPT2], false),
        "default" => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
        ),
        _ => return None,
    })
}

pub(crate) struct Bpe {
    regexes: Vec<Regex>,
    ignore_merges: bool,
    /// (left id, right id) → (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
}

impl Bpe {
    pub(crate) fn new(
        pre: &str,
        merges: &[&str],
        vocab: &HashMap<String, u32>,
    ) -> Result<Bpe, Error> {
        let (exprs, ignore_merges) = pre_tokenizer(pre).ok_or_else(|| {
            Error::new(ErrorKind::Unsupported(format!(
                "tokenizer.ggml.pre = {pre:?} (supported: smollm, llama-bpe, qwen2, gpt-2, default and their aliases)"
            )))
        })?;
        let regexes = exprs
            .iter()
            .map(|e| {
                Regex::new(e).map_err(|err| {
                    Error::new(ErrorKind::Unsupported(format!(
                        "pre-tokenizer regex: {err}"
                    )))
                })
            })
            .collect::<Result<_, _>>()?;
        let mut map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // Split at the first space after the first character (a token may itself be a space).
            let skip = m.chars().next().map_or(0, char::len_utf8);
            let Some(pos) = m[skip..].find(' ').map(|p| p + skip) else {
                continue;
            };
            let (a, b) = (&m[..pos], &m[pos + 1..]);
            let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) else {
                continue;
            };
            let Some(&im) = vocab.get(&format!("{a}{b}")) else {
                continue;
            };
            map.entry((ia, ib)).or_insert((rank as u32, im));
        }
        Ok(Bpe {
            regexes,
            ignore_merges,
            merges: map,
        })
    }

    /// Splits text into pre-tokens: each regex splits every piece from the previous one into
    /// its matches and the text between them (llama.cpp `unicode_regex_split`).
    fn pre_tokenize<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for p in pieces {
                let mut last = 0;
                for m in re.find_iter(p) {
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&p[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < p.len() {
                    next.push(&p[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }

    pub(crate) fn encode(
        &self,
        text: &str,
        vocab: &HashMap<String, u32>,
        byte_tokens: &[Option<u32>; 256],
        out: &mut Vec<u32>,
    ) {
        let mut word = String::new();
        for piece in self.pre_tokenize(text) {
            word.clear();
            word.extend(piece.bytes().map(byte_char));
            if self.ignore_merges {
                if let Some(&id) = vocab.get(&word) {
                    out.push(id);
                    continue;
                }
            }
            self.merge_word(&word, vocab, byte_tokens, out);
        }
    }

    fn merge_word(
        &self,
        word: &str,
        vocab: &HashMap<String, u32>,
        byte_tokens: &[Option<u32>; 256],
        out: &mut Vec<u32>,
    ) {
        const NONE: u32 = u32::MAX;
        struct Sym {
            id: u32,
            start: usize,
            end: usize,
            prev: usize,
            next: usize,
            alive: bool,
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(word.len());
        let mut buf = [0u8; 4];
        for (start, c) in word.char_indices() {
            let id = vocab
                .get(c.encode_utf8(&mut buf) as &str)
                .copied()
                .unwrap_or(NONE);
            let i = syms.len();
            syms.push(Sym {
                id,
                start,
                end: start + c.len_utf8(),
                prev: i.wrapping_sub(1),
                next: i + 1,
                alive: true,
            });
        }
        let n = syms.len();
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Reverse<(u32, usize, u32, u32)>>,
                    syms: &[Sym],
                    l: usize,
                    r: usize| {
            if l < n && r < n {
                if let Some(&(rank, _)) = self.merges.get(&(syms[l].id, syms[r].id)) {
                    heap.push(Reverse((rank, l, syms[l].id, syms[r].id)));
                }
            }
        };
        for i in 0..n.saturating_sub(1) {
            push(&mut heap, &syms, i, i + 1);
        }
        while let Some(Reverse((_, l, lid, rid))) = heap.pop() {
            let r = syms[l].next;
            if !syms[l].alive || r >= n || !syms[r].alive || syms[l].id != lid || syms[r].id != rid
            {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&(lid, rid)) else {
                continue;
            };
            syms[l].id = merged;
            syms[l].end = syms[r].end;
            syms[l].next = syms[r].next;
            syms[r].alive = false;
            let nx = syms[l].next;
            if nx < n {
                syms[nx].prev = l;
            }
            let pv = syms[l].prev;
            if pv < n {
                push(&mut heap, &syms, pv, l);
            }
            push(&mut heap, &syms, l, nx);
        }
        let mut bytes = Vec::new();
        for s in syms.iter().filter(|s| s.alive) {
            if s.id != NONE {
                out.push(s.id);
            } else {
                bytes.clear();
                decode_bytes(&word[s.start..s.end], &mut bytes);
                out.extend(bytes.iter().filter_map(|&b| byte_tokens[b as usize]));
            }
        }
    }
}
