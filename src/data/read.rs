//! Reading a data file in any supported format into JSON rows. polars does the parsing (one
//! reader per format, schema inferred over the whole file); rows then go through the same JSON
//! path whatever the format, so the card's dotted field paths mean the same thing everywhere.

use std::io::Cursor;
use std::path::Path;

use polars::prelude::*;
use serde_json::Value;

use super::card::DataFormat;

/// All rows of a data file, as JSON objects.
pub fn read_rows(path: &Path, format: DataFormat) -> Result<Vec<Value>, String> {
    let mut df = read_frame(path, format)
        .map_err(|e| format!("cannot read `{}` as {format:?}: {e}", path.display()))?;
    let mut buf = Vec::new();
    JsonWriter::new(&mut buf)
        .with_json_format(JsonFormat::JsonLines)
        .finish(&mut df)
        .map_err(|e| format!("cannot convert rows: {e}"))?;
    buf.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).map_err(|e| format!("cannot convert a row: {e}")))
        .collect()
}

fn read_frame(path: &Path, format: DataFormat) -> PolarsResult<DataFrame> {
    match format {
        DataFormat::Jsonl | DataFormat::Json => json_frame(std::fs::read(path)?, format),
        DataFormat::JsonlGz => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut flate2::read::MultiGzDecoder::new(std::fs::File::open(path)?),
                &mut bytes,
            )?;
            json_frame(bytes, DataFormat::Jsonl)
        }
        DataFormat::Csv => CsvReadOptions::default()
            .with_has_header(true)
            .try_into_reader_with_file_path(Some(path.to_path_buf()))?
            .finish(),
        DataFormat::Parquet => ParquetReader::new(std::fs::File::open(path)?).finish(),
    }
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
        let rows = read_rows(&p, DataFormat::Jsonl).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["doc"]["c"][0], "z");
        let gz = dir.path().join("d.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut enc, jsonl.as_bytes()).unwrap();
        enc.finish().unwrap();
        assert_eq!(read_rows(&gz, DataFormat::JsonlGz).unwrap(), rows);
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "q,n\na,1\nb,2\n").unwrap();
        let csv_rows = read_rows(&csv, DataFormat::Csv).unwrap();
        assert_eq!(csv_rows[1]["q"], "b");
        assert_eq!(csv_rows[1]["n"], 2);
        let json = dir.path().join("d.json");
        std::fs::write(&json, "[{\"q\":\"a\"},{\"q\":\"b\"}]").unwrap();
        assert_eq!(read_rows(&json, DataFormat::Json).unwrap()[0]["q"], "a");
    }
}
