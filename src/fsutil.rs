//! Crash-safe file writes: write to a temporary file in the same directory, fsync, rename.
//! A reader never sees a half-written file, and a process killed mid-write leaves the old file
//! (or nothing) in place, plus at most a stray temporary that is ignored and cleaned later.

use std::io::Write;
use std::path::Path;

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

/// Writes `value` as pretty JSON to `path` atomically: every JSON record tsq writes goes here.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(path, text.as_bytes())
}

/// Largest YAML file (pipeline, card) tsq reads.
pub const MAX_YAML_BYTES: u64 = 16 << 20;
/// Largest template or JSON config tsq reads.
pub const MAX_TEXT_BYTES: u64 = 16 << 20;

/// Reads a text file of at most `max` bytes. Anything that is not a regular file (a device, a
/// FIFO, a symlink to one) is refused before reading, so an endless source cannot hang a
/// command; a larger file is refused with its size.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (a device, pipe or directory cannot be read as text)",
        ));
    }
    if meta.len() > max {
        return Err(std::io::Error::other(format!(
            "the file is {} bytes, more than the {max} allowed",
            meta.len()
        )));
    }
    let mut text = String::new();
    // A file that grows while being read still stops at the bound.
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "the file grew past the {max} bytes allowed while being read"
        )));
    }
    Ok(text)
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
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
