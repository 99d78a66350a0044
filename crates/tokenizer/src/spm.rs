//! SentencePiece-style tokenization as llama.cpp does it (`llm_tokenizer_spm_session`):
//! start from UTF-8 characters, repeatedly merge the adjacent pair whose concatenation is the
//! highest-scoring vocabulary entry (leftmost on ties), then emit each symbol, and characters that
//! are not tokens as byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap: higher score first, then the lower left index.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

const NIL: usize = usize::MAX;

pub(crate) fn encode(
    text: &str,
    vocab: &HashMap<String, u32>,
    scores: &[f32],
    byte_tokens: &[Option<u32>; 256],
    out: &mut Vec<u32>,
) {
    let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
    for (start, c) in text.char_indices() {
        let i = syms.len();
        syms.push(Sym {
            start,
            len: c.len_utf8(),
            prev: if i == 0 { NIL } else { i - 1 },
            next: i + 1,
        });
    }
    let n = syms.len();
    if n == 0 {
        return;
    }
    syms[n - 1].next = NIL;
    let mut heap = BinaryHeap::new();
    let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], l: usize, r: usize| {
        if l == NIL || r == NIL {
            return;
        }
        let s = syms[l].start;
        let size = syms[l].len + syms[r].len;
        if let Some(&id) = vocab.get(&text[s..s + size]) {
            heap.push(Bigram {
                score: scores[id as usize],
                left: l,
                right: r,
                size,
            });
        }
    };
    for i in 1..n {
        try_add(&mut heap, &syms, i - 1, i);
    }
    while let Some(b) = heap.pop() {
        let (l, r) = (b.left, b.right);
        if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
            continue;
        }
        syms[l].len += syms[r].len;
        syms[r].len = 0;
        syms[l].next = syms[r].next;
        if syms[r].next != NIL {
            let nx = syms[r].next;
            syms[nx].prev = l;
        }
        try_add(&mut heap, &syms, syms[l].prev, l);
        try_add(&mut heap, &syms, l, syms[l].next);
    }
    // A merge happens only when the merged text is a token, so every symbol is either a token or
    // a single character that is not; the latter falls back to byte tokens. (llama.cpp keeps a
    // reverse-merge map for resegmenting, which this invariant makes unreachable.)
    let mut i = 0;
    while i != NIL {
        let sym = syms[i];
        let piece = &text[sym.start..sym.start + sym.len];
        match vocab.get(piece) {
            Some(&id) => out.push(id),
            None => out.extend(piece.bytes().filter_map(|b| byte_tokens[b as usize])),
        }
        i = sym.next;
    }
}
