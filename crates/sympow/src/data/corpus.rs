//! Documents: the embedded corpus and text/JSONL inputs.

use super::DataError;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
/// `text`), `.gz` variants of both are decompressed, and `.tar`/`.tar.gz`/`.tgz`/`.tar.xz`
/// archives are read member by member (see [`MemberFilter`]).
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
    archive_kind(name).is_some() || {
        let name = name.strip_suffix(".gz").unwrap_or(name);
        name.ends_with(".txt") || name.ends_with(".md") || name.ends_with(".jsonl")
    }
}

#[derive(Clone, Copy)]
enum Compression {
    None,
    Gzip,
    Xz,
}

fn archive_kind(name: &str) -> Option<Compression> {
    if name.ends_with(".tar") {
        Some(Compression::None)
    } else if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(Compression::Gzip)
    } else if name.ends_with(".tar.xz") || name.ends_with(".txz") {
        Some(Compression::Xz)
    } else {
        None
    }
}

/// Which members of an archive become documents: regular files whose name ends with one of
/// `suffixes` and whose path contains none of `exclude`.
///
/// The default keeps source code and prose of a source tree (`.c .h .S .rs .py .sh .pl .rst
/// .txt .md`) — what `sympow data prepare /usr/src/linux-source-6.12.tar.xz` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberFilter {
    /// File-name endings kept; empty keeps every regular file.
    pub suffixes: Vec<String>,
    /// Members whose path contains any of these strings are skipped.
    pub exclude: Vec<String>,
}

/// The default [`MemberFilter::suffixes`].
pub const SOURCE_SUFFIXES: [&str; 10] = [
    ".c", ".h", ".S", ".rs", ".py", ".sh", ".pl", ".rst", ".txt", ".md",
];

impl Default for MemberFilter {
    fn default() -> Self {
        MemberFilter {
            suffixes: SOURCE_SUFFIXES.iter().map(|s| s.to_string()).collect(),
            exclude: vec![],
        }
    }
}

impl MemberFilter {
    fn keeps(&self, path: &str) -> bool {
        (self.suffixes.is_empty() || self.suffixes.iter().any(|s| path.ends_with(s.as_str())))
            && !self.exclude.iter().any(|x| path.contains(x.as_str()))
    }
}

/// Archive members a read passed over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Left out by the [`MemberFilter`] (directories and links are not counted).
    pub filtered: u64,
    /// Not UTF-8 text (binary files, legacy encodings).
    pub not_utf8: u64,
}

/// Counts the bytes read from the file on disk (compressed bytes for compressed inputs), for
/// a progress bar that is exact whatever the compression.
struct Counting<'a, R> {
    inner: R,
    read: &'a AtomicU64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Calls `f` with each document of one input file, streaming: a JSONL file or an archive is
/// never held in memory whole (one member or line at a time). `read` counts the bytes taken
/// from the file on disk.
pub fn for_each_document(
    path: &Path,
    filter: &MemberFilter,
    read: &AtomicU64,
    mut f: impl FnMut(Document) -> Result<(), DataError>,
) -> Result<Skipped, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let file = Counting { inner: file, read };
    let name = path.to_string_lossy();
    if let Some(kind) = archive_kind(&name) {
        let reader: Box<dyn Read + '_> = match kind {
            Compression::None => Box::new(file),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
            Compression::Xz => Box::new(xz2::read::XzDecoder::new(file)),
        };
        return for_each_member(path, reader, filter, f);
    }
    let gz = name.ends_with(".gz");
    let base = name.strip_suffix(".gz").unwrap_or(&name);
    let reader: Box<dyn Read + '_> = if gz {
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
        })?;
    }
    Ok(Skipped::default())
}

fn for_each_member(
    path: &Path,
    reader: impl Read,
    filter: &MemberFilter,
    mut f: impl FnMut(Document) -> Result<(), DataError>,
) -> Result<Skipped, DataError> {
    let corrupt =
        |e: std::io::Error| DataError::Invalid(format!("{}: bad archive: {e}", path.display()));
    let mut skipped = Skipped::default();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let id = entry
            .path()
            .map_err(corrupt)?
            .to_string_lossy()
            .into_owned();
        if !filter.keeps(&id) {
            skipped.filtered += 1;
            continue;
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes).map_err(corrupt)?;
        match String::from_utf8(bytes) {
            Ok(text) => f(Document { id, text })?,
            Err(_) => skipped.not_utf8 += 1,
        }
    }
    // read past the end-of-archive blocks to the end of the stream, so that a compressed
    // stream's own integrity check (xz's, gzip's CRC) is verified too
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(corrupt)?;
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A source tree as an archive: kept, filtered, excluded and non-UTF-8 members, a folder.
    fn archive(compress: impl FnOnce(Vec<u8>) -> Vec<u8>) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, data).unwrap();
        };
        add("tree/main.c", b"int main(void) { return 0; }\n");
        add("tree/logo.png", b"\x89PNG");
        add("tree/gen/regs.h", b"#define A 1\n");
        add("tree/README.md", b"read me\n");
        add("tree/latin1.txt", b"caf\xe9\n");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_cksum();
        b.append_data(&mut h, "tree/sub/", std::io::empty())
            .unwrap();
        compress(b.into_inner().unwrap())
    }

    fn read_all(path: &Path) -> Result<(Vec<Document>, Skipped, u64), DataError> {
        let filter = MemberFilter {
            exclude: vec!["/gen/".into()],
            ..MemberFilter::default()
        };
        let (read, mut docs) = (AtomicU64::new(0), Vec::new());
        let skipped = for_each_document(path, &filter, &read, |d| {
            docs.push(d);
            Ok(())
        })?;
        Ok((docs, skipped, read.into_inner()))
    }

    #[test]
    fn archives_are_read_member_by_member_with_the_filter() {
        let dir = tempfile::tempdir().unwrap();
        let xz = |raw: Vec<u8>| {
            let mut w = xz2::write::XzEncoder::new(Vec::new(), 6);
            w.write_all(&raw).unwrap();
            w.finish().unwrap()
        };
        let gz = |raw: Vec<u8>| {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            w.write_all(&raw).unwrap();
            w.finish().unwrap()
        };
        for (name, bytes) in [
            ("t.tar", archive(|r| r)),
            ("t.tar.gz", archive(gz)),
            ("t.tar.xz", archive(xz)),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            let (docs, skipped, read) = read_all(&path).unwrap();
            let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
            assert_eq!(ids, ["tree/main.c", "tree/README.md"], "{name}");
            assert_eq!(docs[0].text, "int main(void) { return 0; }\n");
            assert_eq!(
                skipped,
                Skipped {
                    filtered: 2,
                    not_utf8: 1
                },
                "{name}"
            );
            assert_eq!(
                read,
                bytes.len() as u64,
                "{name}: every byte on disk counted"
            );
            // a truncated archive is an error naming the file, not a short read
            let cut = dir.path().join(format!("cut-{name}"));
            std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
            let e = read_all(&cut).unwrap_err().to_string();
            assert!(
                e.contains("cut-") && e.contains("bad archive"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn embedded_corpus_is_long_documents() {
        let docs = super::embedded_corpus();
        assert_eq!(docs.len(), 233);
        assert!(docs[0].text.starts_with("Fellow-Citizens of the Senate"));
        let total: usize = docs.iter().map(|d| d.text.len()).sum();
        assert!(total > 10_000_000);
    }
}
