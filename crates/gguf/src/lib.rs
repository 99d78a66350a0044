//! GGUF reader (format versions 2 and 3) over a memory map.
//!
//! Everything that comes from the file is checked before it is used: string and array lengths
//! against the bytes left, tensor dimensions against overflow, tensor data ranges against the
//! file size, and alignment against powers of two. A corrupt or hostile file gives an [`Error`]
//! naming the problem; the parser never panics, never allocates more than the file could hold,
//! and never reads out of bounds. Tensor data is handed out as zero-copy byte slices of the map.
//!
//! Format reference: ggml's `docs/gguf.md` and `gguf-py/gguf/gguf_reader.py`.
#![deny(missing_docs)]

mod types;

pub use types::GgmlType;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// Why a GGUF file could not be read.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
}

/// The kinds of [`Error`].
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file could not be opened or mapped.
    Io(std::io::Error),
    /// The first four bytes are not `GGUF`.
    BadMagic([u8; 4]),
    /// A format version other than 2 or 3.
    UnsupportedVersion(u32),
    /// The file ended while reading `what`.
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Byte offset where it started.
        offset: u64,
    },
    /// A count or length is larger than the rest of the file could hold.
    CountTooLarge {
        /// What was being counted.
        what: &'static str,
        /// The count read from the file.
        count: u64,
    },
    /// A string that is not valid UTF-8.
    InvalidUtf8 {
        /// Byte offset of the string.
        offset: u64,
    },
    /// A metadata value type id that GGUF does not define.
    UnknownValueType(u32),
    /// Arrays nested deeper than the reader allows.
    NestingTooDeep,
    /// A tensor type id that ruvllm does not support.
    UnknownTensorType(u32),
    /// A tensor description that is inconsistent (dims, size, offset).
    BadTensor {
        /// Tensor name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two metadata keys or tensors with the same name.
    Duplicate(String),
    /// `general.alignment` is zero or not a power of two.
    BadAlignment(u64),
    /// A required metadata key is missing.
    MissingKey(String),
    /// A metadata key has the wrong value type.
    WrongType {
        /// The key.
        key: String,
        /// What type was expected.
        expected: &'static str,
    },
}

impl Error {
    /// Wraps a kind.
    pub fn new(kind: ErrorKind) -> Error {
        Error { kind }
    }
    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ErrorKind::*;
        match &self.kind {
            Io(e) => write!(f, "cannot read GGUF file: {e}"),
            BadMagic(m) => write!(
                f,
                "not a GGUF file (magic bytes {m:02x?}, expected \"GGUF\")"
            ),
            UnsupportedVersion(v) => write!(f, "unsupported GGUF version {v} (supported: 2, 3)"),
            Truncated { what, offset } => write!(
                f,
                "GGUF file truncated while reading {what} at byte {offset}"
            ),
            CountTooLarge { what, count } => write!(
                f,
                "GGUF {what} count {count} exceeds what the file can hold"
            ),
            InvalidUtf8 { offset } => write!(f, "GGUF string at byte {offset} is not valid UTF-8"),
            UnknownValueType(t) => write!(f, "unknown GGUF metadata value type {t}"),
            NestingTooDeep => write!(f, "GGUF metadata arrays nested too deeply"),
            UnknownTensorType(t) => write!(f, "unsupported ggml tensor type id {t}"),
            BadTensor { name, reason } => write!(f, "bad tensor '{name}': {reason}"),
            Duplicate(n) => write!(f, "duplicate GGUF entry '{n}'"),
            BadAlignment(a) => write!(f, "bad general.alignment {a} (must be a power of two)"),
            MissingKey(k) => write!(f, "missing GGUF metadata key '{k}'"),
            WrongType { key, expected } => write!(f, "GGUF metadata key '{key}' is not {expected}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Io(e) => Some(e),
            _ => None,
        }
    }
}

fn err<T>(kind: ErrorKind) -> Result<T, Error> {
    Err(Error::new(kind))
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                Value::I8(v) => Some(v as f64),
                Value::I16(v) => Some(v as f64),
                Value::I32(v) => Some(v as f64),
                Value::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// A short rendering for `ruvllm info`: arrays are summarised by length.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 80 => format!(
                "{:?}… ({} bytes)",
                &s[..s.floor_char_boundary_compat(80)],
                s.len()
            ),
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) if a.len() > 8 => format!("[{} items]", a.len()),
            Value::Array(a) => format!(
                "[{}]",
                a.iter().map(Value::summary).collect::<Vec<_>>().join(", ")
            ),
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            Value::Bool(v) => v.to_string(),
        }
    }
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while i > 0 && !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Number of rows (product of all dims but the first).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// Where the bytes of a GGUF file live.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata, tensor directory, and the mapped data.
pub struct GgufFile {
    bytes: Bytes,
    /// Format version (2 or 3).
    pub version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_offset: u64,
    alignment: u64,
}

/// Deepest array nesting accepted in metadata.
const MAX_DEPTH: usize = 8;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

impl GgufFile {
    /// Maps and parses a file.
    pub fn open(path: &Path) -> Result<GgufFile, Error> {
        let file = std::fs::File::open(path).map_err(|e| Error::new(ErrorKind::Io(e)))?;
        // SAFETY: the map is read-only and private to this process. A concurrent truncation of the
        // file by another process could fault; that is the usual mmap caveat that every GGUF
        // runtime accepts. All reads are bounds-checked against the map's length.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::new(ErrorKind::Io(e)))?;
        Self::parse(Bytes::Mapped(map))
    }

    /// Parses a file held in memory (used by tests and the fuzzer).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, Error> {
        Self::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<GgufFile, Error> {
        let mut c = Cursor {
            buf: &bytes,
            pos: 0,
        };
        let magic = c.array4("magic")?;
        if &magic != b"GGUF" {
            return err(ErrorKind::BadMagic(magic));
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return err(ErrorKind::UnsupportedVersion(version));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // Each metadata entry needs at least 8 (key len) + 4 (type) + 1 bytes; each tensor info at
        // least 8 + 4 + 4 + 8 bytes. Reject counts the file cannot possibly hold before allocating.
        c.check_count("metadata", n_kv, 13)?;
        c.check_count("tensor", n_tensors, 24)?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata value type")?;
            let value = c.value(ty, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return err(ErrorKind::Duplicate(key));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            Some(&i) => {
                let a = metadata[i].1.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() {
                    return err(ErrorKind::BadAlignment(a));
                }
                a
            }
            None => 32,
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return err(ErrorKind::BadTensor {
                    name,
                    reason: format!("{n_dims} dimensions (1..=4 allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dimension")?);
            }
            let type_id = c.u32("tensor type")?;
            let ggml_type = GgmlType::from_id(type_id)?;
            let offset = c.u64("tensor offset")?;
            let bad = |reason: String| {
                Error::new(ErrorKind::BadTensor {
                    name: name.clone(),
                    reason,
                })
            };
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad("element count overflows".into()))?;
            if dims.iter().any(|&d| d == 0) {
                return Err(bad("a dimension is zero".into()));
            }
            let row = ggml_type.row_bytes(dims[0]).ok_or_else(|| {
                bad(format!(
                    "row length {} is not a multiple of the {} block size {}",
                    dims[0],
                    ggml_type,
                    ggml_type.block_size()
                ))
            })?;
            let size = row
                .checked_mul(n_elements / dims[0])
                .ok_or_else(|| bad("byte size overflows".into()))?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "offset {offset} is not aligned to {alignment}"
                )));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return err(ErrorKind::Duplicate(name));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                size,
            });
        }

        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return err(ErrorKind::BadTensor {
                        name: t.name.clone(),
                        reason: format!("data (offset {} + {} bytes) runs past the end of the file ({file_len} bytes)", t.offset, t.size),
                    })
                }
            }
        }

        Ok(GgufFile {
            bytes,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            data_offset,
            alignment,
        })
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A required unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, Error> {
        let v = self
            .get(key)
            .ok_or_else(|| Error::new(ErrorKind::MissingKey(key.into())))?;
        v.as_u64().ok_or_else(|| {
            Error::new(ErrorKind::WrongType {
                key: key.into(),
                expected: "an unsigned integer",
            })
        })
    }

    /// A required float.
    pub fn get_f64(&self, key: &str) -> Result<f64, Error> {
        let v = self
            .get(key)
            .ok_or_else(|| Error::new(ErrorKind::MissingKey(key.into())))?;
        v.as_f64().ok_or_else(|| {
            Error::new(ErrorKind::WrongType {
                key: key.into(),
                expected: "a number",
            })
        })
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str, Error> {
        let v = self
            .get(key)
            .ok_or_else(|| Error::new(ErrorKind::MissingKey(key.into())))?;
        v.as_str().ok_or_else(|| {
            Error::new(ErrorKind::WrongType {
                key: key.into(),
                expected: "a string",
            })
        })
    }

    /// The tensor directory in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor's directory entry by name.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor (zero-copy; bounds were checked at parse time).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.bytes[start..start + info.size as usize]
    }

    /// Drops the resident pages wholly inside a tensor's data from this process's memory (a
    /// mapped file only; an in-memory file keeps its bytes). The data stays readable: a later
    /// read faults the pages back in from the file. Used after a weight has been repacked into
    /// an owned copy, so the model does not occupy its memory twice.
    pub fn release_tensor_pages(&self, info: &TensorInfo) {
        self.release_tensor_range(info, 0, info.size as usize);
    }

    /// Like [`GgufFile::release_tensor_pages`] for bytes `from..to` of a tensor's data.
    pub fn release_tensor_range(&self, info: &TensorInfo, from: usize, to: usize) {
        let Bytes::Mapped(map) = &self.bytes else {
            return;
        };
        const PAGE: usize = 4096;
        let base = (self.data_offset + info.offset) as usize;
        let start = base + from.min(info.size as usize);
        let end = (base + to.min(info.size as usize)).min(map.len());
        let (first, last) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
        if last > first {
            // SAFETY: MADV_DONTNEED on a read-only private file mapping only discards clean
            // pages, which the kernel re-reads from the file on the next access; no byte any
            // slice of the map refers to changes value. The range is page-aligned and inside
            // the map.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
            };
        }
    }

    /// Alignment of the data section.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Total file size in bytes.
    pub fn file_size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// A bounds-checked little-endian reader.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => err(ErrorKind::Truncated {
                what,
                offset: self.pos as u64,
            }),
        }
    }
    fn array4(&mut self, what: &'static str) -> Result<[u8; 4], Error> {
        let s = self.take(4, what)?;
        Ok([s[0], s[1], s[2], s[3]])
    }
    fn array8(&mut self, what: &'static str) -> Result<[u8; 8], Error> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array4(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array8(what)?))
    }
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn check_count(
        &self,
        what: &'static str,
        count: u64,
        min_bytes_each: u64,
    ) -> Result<(), Error> {
        if count.saturating_mul(min_bytes_each) > self.remaining() {
            return err(ErrorKind::CountTooLarge { what, count });
        }
        Ok(())
    }
    fn string(&mut self, what: &'static str) -> Result<String, Error> {
        let len = self.u64(what)?;
        if len > self.remaining() {
            return err(ErrorKind::CountTooLarge { what, count: len });
        }
        let offset = self.pos as u64;
        let bytes = self.take(len as usize, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| Error::new(ErrorKind::InvalidUtf8 { offset }))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, Error> {
        let what = "metadata value";
        Ok(match ty {
            0 => Value::U8(self.take(1, what)?[0]),
            1 => Value::I8(self.take(1, what)?[0] as i8),
            2 => {
                let s = self.take(2, what)?;
                Value::U16(u16::from_le_bytes([s[0], s[1]]))
            }
            3 => {
                let s = self.take(2, what)?;
                Value::I16(i16::from_le_bytes([s[0], s[1]]))
            }
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::String(self.string("metadata string")?),
            9 => {
                if depth >= MAX_DEPTH {
                    return err(ErrorKind::NestingTooDeep);
                }
                let elem_ty = self.u32("array element type")?;
                let n = self.u64("array length")?;
                let min = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return err(ErrorKind::UnknownValueType(t)),
                };
                self.check_count("array element", n, min)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => return err(ErrorKind::UnknownValueType(t)),
        })
    }
}

/// Writes GGUF files; used by tests to build valid and deliberately broken inputs.
pub mod writer;

#[cfg(test)]
mod tests;
