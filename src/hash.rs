//! Content hashes: blake3 for cache keys (fast, ours), sha256 for pins (what registries publish).

use std::io::Read;
use std::path::Path;

use serde_json::Value;
use sha2::Digest;

/// blake3 of a file's bytes, hex.
pub fn file_blake3(path: &Path) -> std::io::Result<String> {
    reader_blake3(crate::fsutil::open_regular(path)?)
}

/// blake3 of a file, or of a model directory: the name and blake3 of each regular file
/// directly in it (hidden ones and subdirectories aside), in name order.
pub fn path_blake3(path: &Path) -> std::io::Result<String> {
    if !path.is_dir() {
        return file_blake3(path);
    }
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    let mut hasher = blake3::Hasher::new();
    for file in files {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        hasher.update(format!("{name}\0{}\n", file_blake3(&file)?).as_bytes());
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// blake3 of everything `reader` yields, hex.
pub fn reader_blake3(reader: impl Read) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(reader)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// sha256 of a file's bytes, hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = crate::fsutil::open_regular(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// blake3 of a JSON value in canonical form (object keys sorted), so that key order in a file does
/// not change a cache key.
/// The name a unit enum variant is written with in files (per its serde attributes).
pub fn serde_name(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

pub fn json_blake3(value: &Value) -> String {
    blake3::hash(canonical(value).as_bytes())
        .to_hex()
        .to_string()
}

fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let body: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical(v)))
                .collect();
            format!("{{{}}}", body.join(","))
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_hash_ignores_key_order_but_not_values() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"d":3,"c":2},"a":1}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"b":{"d":3,"c":2},"a":2}"#).unwrap();
        assert_eq!(json_blake3(&a), json_blake3(&b));
        assert_ne!(json_blake3(&a), json_blake3(&c));
    }

    #[test]
    fn sha256_matches_known_vector() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            file_sha256(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
