//! Documents: the embedded corpus and text/JSONL inputs.

use super::DataError;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// One document of raw text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// A stable identifier (file name, JSONL id).
    pub id: String,
    /// The text.
    pub text: String,
}

/// The bundled corpus: 233 State of the Union addresses (public domain; see
/// `data/sotu/README.md`), gzipped JSONL compiled into the binary.
static EMBEDDED: &[u8] = include_bytes!("../../../../data/sotu/sotu.jsonl.gz");

/// The embedded corpus's documents, in file order.
pub fn embedded_corpus() -> Vec<Document> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(EMBEDDED)
        .read_to_string(&mut text)
        .expect("embedded corpus is valid gzip");
    text.lines()
        .enumerate()
        .map(|(i, l)| parse_jsonl_line(l, "embedded", i + 1).expect("embedded corpus is valid"))
        .collect()
}

fn parse_jsonl_line(line: &str, path: &str, lineno: usize) -> Result<Document, DataError> {
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| DataError::Invalid(format!("{path}:{lineno}: invalid JSON: {e}")))?;
    let text = v
        .get("text")
        .and_then(|t| t.as_str())
        .ok_or_else(|| DataError::Invalid(format!("{path}:{lineno}: no string field \"text\"")))?;
    let id = v
        .get("id")
        .and_then(|t| t.as_str())
        .map_or_else(|| format!("{path}:{lineno}"), str::to_string);
    Ok(Document {
        id,
        text: text.to_string(),
    })
}

/// Every input file below `paths` (files as given; directories walked in sorted order):
/// `.txt`/`.md` files are one document each, `.jsonl` files one document per line (field
/// `text`), `.gz` variants of both are decompressed.
pub fn input_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| DataError::io(p, e))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| DataError::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            let nested: Vec<PathBuf> = entries
                .into_iter()
                .filter(|e| e.is_dir() || is_input(e))
                .collect();
            out.extend(input_files(&nested)?);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn is_input(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name.strip_suffix(".gz").unwrap_or(name);
    name.ends_with(".txt") || name.ends_with(".md") || name.ends_with(".jsonl")
}

/// Calls `f` with each document of one input file, streaming (a JSONL file is never held in
/// memory whole).
pub fn for_each_document(
    path: &Path,
    mut f: impl FnMut(Document) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let name = path.to_string_lossy();
    let gz = name.ends_with(".gz");
    let base = name.strip_suffix(".gz").unwrap_or(&name);
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, reader);
    if base.ends_with(".jsonl") {
        let mut line = String::new();
        let mut lineno = 0;
        loop {
            line.clear();
            lineno += 1;
            let n = reader
                .read_line(&mut line)
                .map_err(|e| DataError::io(path, e))?;
            if n == 0 {
                break;
            }
            if line.trim().is_empty() {
                continue;
            }
            f(parse_jsonl_line(&line, &name, lineno)?)?;
        }
        Ok(())
    } else {
        let mut bytes = Vec::new();
        reader
            .read_to_end(&mut bytes)
            .map_err(|e| DataError::io(path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            DataError::Invalid(format!(
                "{name}: not UTF-8 text (byte {})",
                e.utf8_error().valid_up_to()
            ))
        })?;
        f(Document {
            id: name.to_string(),
            text,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_corpus_is_long_documents() {
        let docs = super::embedded_corpus();
        assert_eq!(docs.len(), 233);
        assert!(docs[0].text.starts_with("Fellow-Citizens of the Senate"));
        let total: usize = docs.iter().map(|d| d.text.len()).sum();
        assert!(total > 10_000_000);
    }
}
