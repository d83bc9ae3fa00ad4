//! Files in and out. Writes are crash-safe: write to a temporary file in the same directory,
//! fsync, rename; a reader never sees a half-written file, and a process killed mid-write leaves
//! the old file (or nothing) in place, plus at most a stray temporary that is ignored and cleaned
//! later. Reads are bounded: every file tsq reads goes through [`open_regular`] (regular files
//! only) and a size cap from its format, so a device, a FIFO or a huge file is a clear error.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A file that could not be read (or parsed, for the JSON readers), with its path.
#[derive(Debug, thiserror::Error)]
#[error("cannot read `{}`: {source}", path.display())]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl ReadError {
    /// A closure making the error for `path`, for `map_err`.
    pub fn at(path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self { path, source }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Opens (creating it and its directory) the file at `path` whose flock guards something shared
/// between processes: a stage of a run, a model's SVD factors. Its content is never written.
pub fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Writes `value` as pretty JSON to `path` atomically: every JSON record tsq writes goes here.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(path, text.as_bytes())
}

/// Largest YAML file (pipeline, card) tsq reads.
pub const MAX_YAML_BYTES: u64 = 16 << 20;
/// Largest template or JSON config/record tsq reads.
pub const MAX_TEXT_BYTES: u64 = 16 << 20;
/// Largest `tokenizer.json` (Llama-3's is 9 MB, Qwen2.5's 7 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;
/// Largest expert or training checkpoint file (an 8B model's full expert set is ~4 MB).
pub const MAX_EXPERT_BYTES: u64 = 1 << 30;
/// Largest JSON-lines log of a run (`events.jsonl`, `metrics.jsonl`, sample checkpoints).
pub const MAX_LOG_BYTES: u64 = 1 << 30;
/// Largest dataset file, and the most a compressed one may expand to.
pub const MAX_DATA_BYTES: u64 = 2 << 30;

/// Opens `path` for reading only if it is a regular file. The open never blocks (a FIFO with
/// no writer would) and the type is checked on the opened handle, so a path swapped between
/// the check and the read cannot slip a device or pipe through.
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (a device, pipe or directory cannot be read)",
        ));
    }
    Ok(file)
}

/// Reads a regular file of at most `max` bytes; a larger file is refused with its size, before
/// anything is allocated for it.
pub fn read_bytes_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    if len > max {
        return Err(std::io::Error::other(format!(
            "the file is {len} bytes, more than the {max} allowed"
        )));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // A file that grows while being read still stops at the bound.
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "the file grew past the {max} bytes allowed while being read"
        )));
    }
    Ok(bytes)
}

/// [`read_bytes_bounded`] for UTF-8 text.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_bytes_bounded(path, max)?)
        .map_err(|_| std::io::Error::other("the file is not UTF-8 text"))
}

/// Reads a JSON file of at most `max` bytes into `T`.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, max: u64) -> std::io::Result<T> {
    serde_json::from_slice(&read_bytes_bounded(path, max)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A reader that fails once more than `max` bytes came through it: decompression of a crafted
/// archive stops at the bound instead of filling memory.
pub struct CappedReader<R> {
    inner: R,
    left: u64,
    max: u64,
}

impl<R> CappedReader<R> {
    pub fn new(inner: R, max: u64) -> Self {
        Self {
            inner,
            left: max,
            max,
        }
    }
}

impl<R: std::io::Read> std::io::Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // One byte past the bound tells "exactly max" from "more".
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(format!(
                    "it expands to more than the {} bytes allowed",
                    self.max
                ))),
            };
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// fsyncs a directory so that renames inside it survive a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Copies a reader into `path` atomically (used for extraction and downloads).
pub fn copy_atomic(path: &Path, reader: &mut impl std::io::Read) -> std::io::Result<u64> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    let n = std::io::copy(reader, &mut tmp)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_reader_stops_at_the_bound() {
        use std::io::Read;
        let mut out = Vec::new();
        let err = CappedReader::new(std::io::repeat(7), 100)
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(err.to_string().contains("more than the 100 bytes"));
        assert_eq!(out.len(), 100);
        let mut exact = Vec::new();
        CappedReader::new(&[1u8; 100][..], 100)
            .read_to_end(&mut exact)
            .unwrap();
        assert_eq!(exact.len(), 100);
    }

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(read_bounded(&p, 3).unwrap(), "two");
        assert!(
            read_bounded(&p, 2)
                .unwrap_err()
                .to_string()
                .contains("more than")
        );
        assert!(
            read_bounded(Path::new("/dev/zero"), 10)
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
        let fifo = p.with_file_name("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer: a blocking open would hang here.
        assert!(read_bounded(&fifo, 10).is_err());
        std::fs::remove_file(&fifo).unwrap();
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
