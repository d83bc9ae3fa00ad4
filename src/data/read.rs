//! Reading a data file in any supported format into JSON rows. polars does the parsing (one
//! reader per format, schema inferred over the whole file); rows then go through the same JSON
//! path whatever the format, so the card's dotted field paths mean the same thing everywhere.

use std::io::Cursor;
use std::path::Path;

use polars::prelude::*;
use serde_json::Value;

use super::DataError;
use super::card::DataFormat;

/// How much one data file may hold: its bytes (once decompressed) and its rows, both checked
/// before the rows are built (tiny records multiply memory many times over).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub bytes: u64,
    pub rows: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            bytes: crate::fsutil::MAX_DATA_BYTES,
            rows: 10_000_000,
        }
    }
}

/// All rows of a data file, as JSON objects.
pub fn read_rows(path: &Path, format: DataFormat, limits: Limits) -> Result<Vec<Value>, DataError> {
    let mut df = read_frame(path, format, limits).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        format,
        source,
    })?;
    let mut buf = Vec::new();
    JsonWriter::new(&mut buf)
        .with_json_format(JsonFormat::JsonLines)
        .finish(&mut df)
        .map_err(DataError::Convert)?;
    buf.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).map_err(DataError::Row))
        .collect()
}

fn read_frame(path: &Path, format: DataFormat, limits: Limits) -> PolarsResult<DataFrame> {
    use crate::fsutil::{CappedReader, open_regular, read_bytes_bounded};
    let read = || read_bytes_bounded(path, limits.bytes);
    let lines = |bytes: Vec<u8>| {
        let rows = bytes.iter().filter(|b| **b == b'\n').count() as u64;
        check_rows(rows, limits.rows).map(|()| bytes)
    };
    match format {
        DataFormat::Json => json_frame(read()?, format),
        DataFormat::Jsonl => json_frame(lines(read()?)?, format),
        DataFormat::JsonlGz => {
            let mut bytes = Vec::new();
            let gz = flate2::read::MultiGzDecoder::new(open_regular(path)?);
            std::io::Read::read_to_end(&mut CappedReader::new(gz, limits.bytes), &mut bytes)?;
            json_frame(lines(bytes)?, DataFormat::Jsonl)
        }
        DataFormat::Csv => CsvReadOptions::default()
            .with_has_header(true)
            .into_reader_with_file_handle(Cursor::new(lines(read()?)?))
            .finish(),
        DataFormat::Parquet => {
            let mut reader = ParquetReader::new(open_regular(path)?);
            check_rows(reader.num_rows()? as u64, limits.rows)?;
            reader.finish()
        }
    }
}

fn check_rows(rows: u64, max_rows: u64) -> PolarsResult<()> {
    if rows > max_rows {
        polars_bail!(ComputeError: "the file holds {rows} rows, more than the {max_rows} expected");
    }
    Ok(())
}

fn json_frame(bytes: Vec<u8>, format: DataFormat) -> PolarsResult<DataFrame> {
    let json_format = if format == DataFormat::Json {
        JsonFormat::Json
    } else {
        JsonFormat::JsonLines
    };
    JsonReader::new(Cursor::new(bytes))
        .with_json_format(json_format)
        .infer_schema_len(None)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_gives_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = "{\"doc\":{\"q\":\"a\",\"c\":[\"x\",\"y\"]},\"n\":1}\n{\"doc\":{\"q\":\"b\",\"c\":[\"z\"]},\"n\":2}\n";
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, jsonl).unwrap();
        let rows = read_rows(&p, DataFormat::Jsonl, Limits::default()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["doc"]["c"][0], "z");
        let gz = dir.path().join("d.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut enc, jsonl.as_bytes()).unwrap();
        enc.finish().unwrap();
        assert_eq!(
            read_rows(&gz, DataFormat::JsonlGz, Limits::default()).unwrap(),
            rows
        );
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "q,n\na,1\nb,2\n").unwrap();
        let csv_rows = read_rows(&csv, DataFormat::Csv, Limits::default()).unwrap();
        assert_eq!(csv_rows[1]["q"], "b");
        assert_eq!(csv_rows[1]["n"], 2);
        let json = dir.path().join("d.json");
        std::fs::write(&json, "[{\"q\":\"a\"},{\"q\":\"b\"}]").unwrap();
        assert_eq!(
            read_rows(&json, DataFormat::Json, Limits::default()).unwrap()[0]["q"],
            "a"
        );
        let one_row = Limits {
            rows: 1,
            ..Limits::default()
        };
        let too_many = read_rows(&gz, DataFormat::JsonlGz, one_row)
            .unwrap_err()
            .to_string();
        assert!(
            too_many.contains("holds 2 rows, more than the 1 expected"),
            "{too_many}"
        );
    }

    #[test]
    fn a_compression_bomb_stops_at_the_bound() {
        // 64 MiB of blanks compress to 64 KB; the bound is 16 MiB.
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("bomb.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::best(),
        );
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..64 {
            std::io::Write::write_all(&mut enc, &chunk).unwrap();
        }
        enc.finish().unwrap();
        assert!(std::fs::metadata(&gz).unwrap().len() < 1 << 20);
        let limits = Limits {
            bytes: 16 << 20,
            ..Limits::default()
        };
        let err = read_rows(&gz, DataFormat::JsonlGz, limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expands to more than"), "{err}");
    }
}
