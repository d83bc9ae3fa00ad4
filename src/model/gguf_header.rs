//! The GGUF header (metadata and tensor table), read and checked before any tensor data is
//! touched: every length against the bytes left in the file, the alignment, and each tensor's
//! dimensions (1 to 4, none zero, a product that does not overflow, whole quantisation blocks)
//! and extent (aligned, inside the file). candle's own header reader panics on some crafted
//! files (`general.alignment = 0`; dimensions whose product wraps), so tsq reads the header
//! itself and hands candle a checked `Content` to load tensors from.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{
    Content, DEFAULT_ALIGNMENT, TensorInfo, Value, VersionedMagic,
};

/// Arrays of arrays deeper than this are refused (real files use one level).
const MAX_ARRAY_DEPTH: usize = 4;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
const MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian

/// Why a header was refused: the file could not be read, or its bytes break the format.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Malformed(String),
}

impl HeaderError {
    /// The same error, said of the part of the header it was found in.
    fn within(self, part: impl std::fmt::Display) -> Self {
        match self {
            Self::Malformed(message) => Self::Malformed(format!("{part}: {message}")),
            io => io,
        }
    }
}

fn malformed(message: impl Into<String>) -> HeaderError {
    HeaderError::Malformed(message.into())
}

/// Reads and checks the header of a GGUF file of `file_size` bytes from its start.
pub fn read_content(
    reader: &mut (impl Read + Seek),
    file_size: u64,
) -> Result<Content, HeaderError> {
    reader.seek(SeekFrom::Start(0))?;
    let mut r = Bounded {
        reader,
        left: file_size,
    };
    if r.u32()? != MAGIC {
        return Err(malformed("no GGUF magic at the start"));
    }
    let magic = match r.u32()? {
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => {
            return Err(malformed(format!(
                "GGUF version {v} is not supported (2 and 3 are)"
            )));
        }
    };
    let tensor_count = r.u64()?;
    let kv_count = r.u64()?;
    let mut metadata = HashMap::new();
    for _ in 0..kv_count {
        let key = r.string()?;
        let value = r
            .value(None, 0)
            .map_err(|e| e.within(format_args!("metadata `{key}`")))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(malformed(format!("metadata `{key}` appears twice")));
        }
    }
    let alignment = alignment(&metadata)?;
    let mut tensor_infos = HashMap::new();
    for _ in 0..tensor_count {
        let name = r.string()?;
        let info = r
            .tensor_info()
            .map_err(|e| e.within(format_args!("tensor `{name}`")))?;
        if tensor_infos.insert(name.clone(), info).is_some() {
            return Err(malformed(format!("tensor `{name}` appears twice")));
        }
    }
    let tensor_data_offset = (file_size - r.left).next_multiple_of(alignment);
    for (name, info) in &tensor_infos {
        check_extent(info, tensor_data_offset, alignment, file_size)
            .map_err(|e| e.within(format_args!("tensor `{name}`")))?;
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    })
}

/// `general.alignment`: a power of two when given (the spec's rule; 0 would divide by zero).
fn alignment(metadata: &HashMap<String, Value>) -> Result<u64, HeaderError> {
    let Some(value) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let alignment = value
        .to_u32()
        .map(u64::from)
        .map_err(|_| malformed(format!("`general.alignment` is {value:?}, expected a u32")))?;
    if !alignment.is_power_of_two() {
        return Err(malformed(format!(
            "`general.alignment` is {alignment}, expected a power of two"
        )));
    }
    Ok(alignment)
}

/// A tensor's data lies inside the file, starting at an aligned offset.
fn check_extent(
    info: &TensorInfo,
    data_offset: u64,
    alignment: u64,
    size: u64,
) -> Result<(), HeaderError> {
    if !info.offset.is_multiple_of(alignment) {
        return Err(malformed(format!(
            "offset {} is not a multiple of the alignment {alignment}",
            info.offset
        )));
    }
    // The element count was checked to fit; its byte size (found by fuzzing) may not.
    let elements = info.shape.elem_count() as u64;
    let dtype = info.ggml_dtype;
    let bytes = (elements / dtype.block_size() as u64).checked_mul(dtype.type_size() as u64);
    let end = bytes
        .and_then(|bytes| data_offset.checked_add(info.offset)?.checked_add(bytes))
        .filter(|end| *end <= size);
    if end.is_none() {
        return Err(malformed(format!(
            "its {elements} {dtype:?} elements at offset {} run past the end of the {size}-byte file",
            info.offset
        )));
    }
    Ok(())
}

/// A reader that knows how many bytes the file has left, so no length can ask for more.
struct Bounded<'a, R> {
    reader: &'a mut R,
    left: u64,
}

impl<R: Read> Bounded<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], HeaderError> {
        let mut buf = [0u8; N];
        self.take(N as u64)?;
        self.reader.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Claims `n` of the bytes left, or says the file ends first.
    fn take(&mut self, n: u64) -> Result<(), HeaderError> {
        self.left = self.left.checked_sub(n).ok_or_else(|| {
            malformed(format!(
                "the header needs {n} more bytes, the file has {}",
                self.left
            ))
        })?;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, HeaderError> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, HeaderError> {
        self.bytes().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> Result<String, HeaderError> {
        let len = self.u64()?;
        self.take(len)?;
        let mut buf = vec![0u8; len as usize];
        self.reader.read_exact(&mut buf)?;
        // Some writers add a trailing NUL; some strings are not valid UTF-8 (candle does the same).
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// A value of `kind`, or of the type tag read first when `kind` is `None`.
    fn value(&mut self, kind: Option<u32>, depth: usize) -> Result<Value, HeaderError> {
        let kind = match kind {
            Some(k) => k,
            None => self.u32()?,
        };
        Ok(match kind {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(self.bytes::<1>()?[0] as i8),
            2 => Value::U16(self.bytes().map(u16::from_le_bytes)?),
            3 => Value::I16(self.bytes().map(i16::from_le_bytes)?),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.bytes().map(i32::from_le_bytes)?),
            6 => Value::F32(self.bytes().map(f32::from_le_bytes)?),
            7 => match self.bytes::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(malformed(format!("bool byte {b}, expected 0 or 1"))),
            },
            8 => Value::String(self.string()?),
            9 => self.array(depth)?,
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.bytes().map(i64::from_le_bytes)?),
            12 => Value::F64(self.bytes().map(f64::from_le_bytes)?),
            t => return Err(malformed(format!("unknown value type {t}"))),
        })
    }

    fn array(&mut self, depth: usize) -> Result<Value, HeaderError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(malformed(format!(
                "arrays nested deeper than {MAX_ARRAY_DEPTH}"
            )));
        }
        let kind = self.u32()?;
        let len = self.u64()?;
        // Every element takes at least one byte: a count past the bytes left is a lie.
        if len > self.left {
            return Err(malformed(format!(
                "an array of {len} elements in the {} bytes left",
                self.left
            )));
        }
        let mut values = Vec::with_capacity(len.min(1 << 16) as usize);
        for _ in 0..len {
            values.push(self.value(Some(kind), depth + 1)?);
        }
        Ok(Value::Array(values))
    }

    fn tensor_info(&mut self) -> Result<TensorInfo, HeaderError> {
        let n_dims = self.u32()?;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(malformed(format!(
                "{n_dims} dimensions, expected 1 to {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64()?);
        }
        let ggml_dtype = ggml_dtype(self.u32()?)?;
        let offset = self.u64()?;
        let elements = dims
            .iter()
            .try_fold(1u64, |n, d| n.checked_mul(*d).filter(|_| *d > 0))
            .filter(|n| usize::try_from(*n).is_ok())
            .ok_or_else(|| {
                malformed(format!(
                    "dimensions {dims:?} are zero or multiply past 2^64"
                ))
            })?;
        let block = ggml_dtype.block_size() as u64;
        if !elements.is_multiple_of(block) {
            return Err(malformed(format!(
                "{elements} elements are not whole {ggml_dtype:?} blocks of {block}"
            )));
        }
        // GGUF lists the fastest-varying dimension first; candle's shapes are row-major.
        let shape: Vec<usize> = dims.iter().rev().map(|d| *d as usize).collect();
        Ok(TensorInfo {
            ggml_dtype,
            shape: shape.into(),
            offset,
        })
    }
}

/// ggml's type ids (ggml.h `enum ggml_type`) of the types candle can load.
fn ggml_dtype(id: u32) -> Result<GgmlDType, HeaderError> {
    Ok(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        t => return Err(malformed(format!("tensor type {t} is not supported"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file, byte by byte, as a crafted one would be written.
    #[derive(Default)]
    struct Raw(Vec<u8>);

    impl Raw {
        fn u32(mut self, v: u32) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn str(self, s: &str) -> Self {
            let mut r = self.u64(s.len() as u64);
            r.0.extend(s.as_bytes());
            r
        }
        fn header(tensors: u64, kvs: u64) -> Self {
            Raw::default().u32(MAGIC).u32(3).u64(tensors).u64(kvs)
        }
        /// A tensor entry: name, dims (GGUF order), type, offset.
        fn tensor(self, name: &str, dims: &[u64], dtype: u32, offset: u64) -> Self {
            let mut r = self.str(name).u32(dims.len() as u32);
            for d in dims {
                r = r.u64(*d);
            }
            r.u32(dtype).u64(offset)
        }
        fn padded(mut self, to: usize) -> Self {
            self.0.resize(to, 0);
            self
        }
        fn read(&self) -> Result<Content, HeaderError> {
            read_content(&mut std::io::Cursor::new(&self.0), self.0.len() as u64)
        }
    }

    #[test]
    fn a_well_formed_header_gives_candle_a_loadable_content() {
        let raw = Raw::header(1, 1)
            .str("general.alignment")
            .u32(4)
            .u32(64)
            .tensor("t", &[2, 3], 0, 0);
        let data_at = raw.0.len().next_multiple_of(64);
        let mut raw = raw.padded(data_at);
        for v in 0..6 {
            raw.0.extend((v as f32).to_le_bytes());
        }
        let content = raw.read().unwrap();
        assert_eq!(content.tensor_data_offset, data_at as u64);
        let t = content
            .tensor(
                &mut std::io::Cursor::new(&raw.0),
                "t",
                &candle_core::Device::Cpu,
            )
            .unwrap()
            .dequantize(&candle_core::Device::Cpu)
            .unwrap();
        assert_eq!(t.dims(), [3, 2]);
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[5], 5.0);
    }

    #[test]
    fn crafted_headers_are_errors_not_panics() {
        let alignment = |v: u32| Raw::header(0, 1).str("general.alignment").u32(4).u32(v);
        let cases: Vec<(Raw, &str)> = vec![
            (alignment(0), "`general.alignment` is 0"),
            (alignment(48), "expected a power of two"),
            (
                Raw::header(1, 0).tensor("t", &[1 << 33, 1 << 33], 0, 0),
                "multiply past 2^64",
            ),
            (Raw::header(1, 0).tensor("t", &[4, 0], 0, 0), "are zero"),
            (Raw::header(1, 0).tensor("t", &[], 0, 0), "0 dimensions"),
            (Raw::header(1, 0).tensor("t", &[1; 5], 0, 0), "5 dimensions"),
            (
                Raw::header(1, 0).tensor("t", &[33], 2, 0),
                "whole Q4_0 blocks",
            ),
            (Raw::header(1, 0).tensor("t", &[4], 99, 0), "type 99"),
            (Raw::header(1, 0).tensor("t", &[4], 0, 7), "not a multiple"),
            (
                Raw::header(1, 0).tensor("t", &[1 << 20], 0, 0),
                "run past the end",
            ),
            (
                Raw::header(1, 0).tensor("t", &[4], 0, u64::MAX - 31),
                "run past the end",
            ),
            // Found by the fuzzer: elements that fit, bytes that do not.
            (
                Raw::header(1, 0).tensor("t", &[1 << 32, 1 << 31], 0, 0),
                "run past the end",
            ),
            (
                Raw::header(2, 0)
                    .tensor("t", &[4], 0, 0)
                    .tensor("t", &[4], 0, 32),
                "appears twice",
            ),
            (
                Raw::header(0, 1).u64(u64::MAX),
                "needs 18446744073709551615",
            ),
            (
                Raw::header(0, 1).str("k").u32(9).u32(0).u64(1 << 40),
                "array of 1099511627776 elements",
            ),
            (
                (0..5).fold(Raw::header(0, 1).str("k").u32(9), |r, _| r.u32(9).u64(1)),
                "nested deeper",
            ),
            (Raw::header(0, 1).str("k").u32(13), "unknown value type 13"),
            (Raw::header(u64::MAX, 0), "needs 8 more bytes"),
            (Raw::default().u32(MAGIC).u32(1), "version 1"),
            (Raw::default().u32(7), "no GGUF magic"),
        ];
        for (raw, want) in cases {
            let err = raw.read().expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
