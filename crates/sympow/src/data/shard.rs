//! Token shards: documents of token ids in one memory-mapped file, checked on open.
//!
//! Layout (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `SYMPOWTK` |
//! | 8..12 | format version (1) |
//! | 12..16 | bytes per token (2 or 4) |
//! | 16..20 | tokenizer (0 GPT-2, 1 bytes) |
//! | 20..24 | vocabulary size |
//! | 24..32 | documents n |
//! | 32..40 | tokens N |
//! | 40..44 | CRC-32 of everything after the header |
//! | 44..48 | CRC-32 of the header with this field zeroed |
//! | 48..64 | zero |
//! | 64.. | N tokens, then n+1 document offsets (u64, in tokens; first 0, last N) |
//!
//! Tokens come before offsets so that a writer can stream documents to disk. Files are written
//! to a temporary name and renamed into place, so a reader never sees half a shard; a
//! truncated, bit-flipped or foreign file is an error naming the problem, never garbage.

use super::DataError;
use crate::config::TokenizerKind;
use memmap2::Mmap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SYMPOWTK";
const VERSION: u32 = 1;
const HEADER: usize = 64;

fn tokenizer_code(t: TokenizerKind) -> u32 {
    match t {
        TokenizerKind::Gpt2 => 0,
        TokenizerKind::Bytes => 1,
    }
}

/// CRC-32 of a header with its own checksum field (bytes 44..48) taken as zero.
fn header_crc(h: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..44]);
    c.update(&[0; 4]);
    c.update(&h[48..HEADER]);
    c.finalize()
}

/// Streams documents into a shard file.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    crc: crc32fast::Hasher,
    width: usize,
    tokenizer: TokenizerKind,
    vocab: u32,
    offsets: Vec<u64>,
}

impl ShardWriter {
    /// Starts `path` (written as `path.tmp` until [`finish`](Self::finish)). Refuses to
    /// overwrite an existing file.
    pub fn create(path: &Path, tokenizer: TokenizerKind, vocab: usize) -> Result<Self, DataError> {
        if path.exists() {
            return Err(DataError::Invalid(format!(
                "{}: already exists; refusing to overwrite",
                path.display()
            )));
        }
        let tmp = path.with_extension("tmp");
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?,
        );
        file.write_all(&[0u8; HEADER])
            .map_err(|e| DataError::io(&tmp, e))?;
        let width = if vocab <= 1 << 16 { 2 } else { 4 };
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            file,
            crc: crc32fast::Hasher::new(),
            width,
            tokenizer,
            vocab: vocab as u32,
            offsets: vec![0],
        })
    }

    /// Tokens written so far.
    pub fn tokens(&self) -> u64 {
        *self.offsets.last().unwrap()
    }

    /// Appends one document.
    pub fn push(&mut self, ids: &[u32]) -> Result<(), DataError> {
        let mut buf = Vec::with_capacity(ids.len() * self.width);
        for &t in ids {
            if t >= self.vocab {
                return Err(DataError::Invalid(format!(
                    "token id {t} outside the vocabulary of {}",
                    self.vocab
                )));
            }
            if self.width == 2 {
                buf.extend_from_slice(&(t as u16).to_le_bytes());
            } else {
                buf.extend_from_slice(&t.to_le_bytes());
            }
        }
        self.crc.update(&buf);
        self.file
            .write_all(&buf)
            .map_err(|e| DataError::io(&self.tmp, e))?;
        self.offsets.push(self.tokens() + ids.len() as u64);
        Ok(())
    }

    /// Writes offsets and header, syncs, and renames into place.
    pub fn finish(mut self) -> Result<PathBuf, DataError> {
        let io = |e| DataError::io(&self.tmp, e);
        let offs: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        self.crc.update(&offs);
        self.file.write_all(&offs).map_err(io)?;
        let mut h = Vec::with_capacity(HEADER);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&(self.width as u32).to_le_bytes());
        h.extend_from_slice(&tokenizer_code(self.tokenizer).to_le_bytes());
        h.extend_from_slice(&self.vocab.to_le_bytes());
        h.extend_from_slice(&((self.offsets.len() - 1) as u64).to_le_bytes());
        h.extend_from_slice(&self.tokens().to_le_bytes());
        h.extend_from_slice(&self.crc.clone().finalize().to_le_bytes());
        h.resize(HEADER, 0);
        let hcrc = header_crc(&h);
        h[44..48].copy_from_slice(&hcrc.to_le_bytes());
        let mut file = self
            .file
            .into_inner()
            .map_err(|e| DataError::io(&self.tmp, e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| DataError::io(&self.tmp, e))?;
        file.write_all(&h)
            .map_err(|e| DataError::io(&self.tmp, e))?;
        file.sync_all().map_err(|e| DataError::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| DataError::io(&self.path, e))?;
        Ok(self.path)
    }
}

/// A validated, memory-mapped shard.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    width: usize,
    /// The tokenizer its ids belong to.
    pub tokenizer: TokenizerKind,
    offsets: Vec<u64>,
}

impl Shard {
    /// Opens and checks a shard: magic, version, header and payload checksums, size, offsets.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let corrupt = |why: String| DataError::Corrupt {
            path: path.display().to_string(),
            why,
        };
        let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        // SAFETY: shards are written once and renamed into place; nothing maps them writable.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
        if map.len() < HEADER {
            return Err(corrupt(format!(
                "{} bytes, shorter than the {HEADER}-byte header",
                map.len()
            )));
        }
        if &map[..8] != MAGIC {
            return Err(corrupt("not a sympow token shard (bad magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
        if header_crc(&map[..HEADER]) != u32_at(44) {
            return Err(corrupt("header checksum mismatch".into()));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(corrupt(format!(
                "format version {version}, this build reads {VERSION}"
            )));
        }
        let width = u32_at(12) as usize;
        if width != 2 && width != 4 {
            return Err(corrupt(format!(
                "{width} bytes per token (expected 2 or 4)"
            )));
        }
        let tokenizer = match u32_at(16) {
            0 => TokenizerKind::Gpt2,
            1 => TokenizerKind::Bytes,
            t => return Err(corrupt(format!("unknown tokenizer code {t}"))),
        };
        let (n_docs, n_tokens) = (u64_at(24), u64_at(32));
        let want = (n_tokens as u128) * width as u128 + (n_docs as u128 + 1) * 8 + HEADER as u128;
        if map.len() as u128 != want {
            return Err(corrupt(format!(
                "{} bytes, but the header describes {want} (truncated?)",
                map.len()
            )));
        }
        if crc32fast::hash(&map[HEADER..]) != u32_at(40) {
            return Err(corrupt(
                "payload checksum mismatch (bit rot or a partial write)".into(),
            ));
        }
        let off_start = HEADER + n_tokens as usize * width;
        let offsets: Vec<u64> = map[off_start..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if offsets[0] != 0
            || *offsets.last().unwrap() != n_tokens
            || offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(corrupt(
                "document offsets are not a non-decreasing 0..N sequence".into(),
            ));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            width,
            tokenizer,
            offsets,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of documents.
    pub fn num_docs(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Length of document `i` in tokens.
    pub fn doc_len(&self, i: usize) -> usize {
        (self.offsets[i + 1] - self.offsets[i]) as usize
    }

    /// Appends tokens `start..start+len` of document `i` to `out`.
    pub fn read(&self, i: usize, start: usize, len: usize, out: &mut Vec<u32>) {
        assert!(
            start + len <= self.doc_len(i),
            "read past the end of document {i}"
        );
        let t0 = self.offsets[i] as usize + start;
        let bytes = &self.map[HEADER + t0 * self.width..HEADER + (t0 + len) * self.width];
        if self.width == 2 {
            out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
            );
        } else {
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap())),
            );
        }
    }
}

/// The shard files of a directory, sorted (`*.tok`).
pub fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "tok"))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: no *.tok shards (write some with `sympow data prepare`)",
            dir.display()
        )));
    }
    Ok(v)
}

/// The length in tokens of every document in a directory of shards, in shard order: what
/// `sympow data stats` summarises. Each shard is checked as [`Shard::open`] checks it.
pub fn document_lengths(dir: &Path) -> Result<Vec<usize>, DataError> {
    let mut out = Vec::new();
    for f in shard_files(dir)? {
        let s = Shard::open(&f)?;
        out.extend((0..s.num_docs()).map(|i| s.doc_len(i)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, docs: &[Vec<u32>]) -> PathBuf {
        let mut w = ShardWriter::create(&dir.join("a.tok"), TokenizerKind::Bytes, 256).unwrap();
        for d in docs {
            w.push(d).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let docs = vec![vec![1, 2, 3], vec![], vec![255; 1000]];
        let s = Shard::open(&write(dir.path(), &docs)).unwrap();
        assert_eq!(s.num_docs(), 3);
        for (i, d) in docs.iter().enumerate() {
            let mut out = Vec::new();
            s.read(i, 0, s.doc_len(i), &mut out);
            assert_eq!(&out, d);
        }
    }

    #[test]
    fn every_single_bit_flip_and_truncation_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &[vec![1, 2, 3], vec![4, 5]]);
        let good = std::fs::read(&path).unwrap();
        let bad = dir.path().join("bad.tok");
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[byte] ^= 1 << bit;
                std::fs::write(&bad, &b).unwrap();
                assert!(
                    matches!(Shard::open(&bad), Err(DataError::Corrupt { .. })),
                    "flip of bit {bit} in byte {byte} not detected"
                );
            }
        }
        for len in 0..good.len() {
            std::fs::write(&bad, &good[..len]).unwrap();
            let err = Shard::open(&bad)
                .err()
                .expect("truncation detected")
                .to_string();
            assert!(err.contains("bad.tok"), "{err}");
        }
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[vec![1]]);
        assert!(ShardWriter::create(&dir.path().join("a.tok"), TokenizerKind::Bytes, 256).is_err());
    }
}
