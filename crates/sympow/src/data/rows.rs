//! Fixed-length rows of token ids, one document per row: the layout of LongCrawl64 (each row
//! 65,536 GPT-2 ids of one long web document), read from a local NumPy `.npy` file of shape
//! `[rows, row_len]`, dtype `<u2` or `<u4`, C order — what `np.save` writes for a slice of the
//! dataset (e.g. `np.save("lc64.npy", train[:n])` from a local copy). Memory-mapped: a file of any
//! size opens in constant memory.
//!
//! ```
//! # let dir = tempfile::tempdir().unwrap();
//! use sympow::data::rows::{write_npy_u16, TokenRows};
//! let path = dir.path().join("lc.npy");
//! write_npy_u16(&path, 2, 3, &[1, 2, 3, 4, 5, 6]).unwrap();
//! let rows = TokenRows::open(&path, 50257).unwrap();
//! assert_eq!((rows.rows(), rows.row_len()), (2, 3));
//! let mut out = Vec::new();
//! rows.read(1, 1, 2, &mut out);
//! assert_eq!(out, [5, 6]);
//! ```

use super::DataError;
use memmap2::Mmap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"\x93NUMPY";

/// A memory-mapped `[rows, row_len]` array of token ids.
pub struct TokenRows {
    path: PathBuf,
    map: Mmap,
    data: usize,
    rows: usize,
    row_len: usize,
    width: usize,
}

impl TokenRows {
    /// Opens and checks an `.npy` file: header, dtype, shape, size, and (in parallel-friendly
    /// strides) that every id is below `vocab`.
    pub fn open(path: &Path, vocab: usize) -> Result<Self, DataError> {
        let bad = |why: String| DataError::Corrupt {
            path: path.display().to_string(),
            why,
        };
        let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        // SAFETY: the file is only read; a user replacing it under a running job is their error.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
        if map.len() < 10 || &map[..6] != MAGIC {
            return Err(bad("not a NumPy .npy file (bad magic)".into()));
        }
        let (hlen, hstart) = match map[6] {
            1 => (u16::from_le_bytes([map[8], map[9]]) as usize, 10),
            2 | 3 if map.len() >= 12 => (
                u32::from_le_bytes([map[8], map[9], map[10], map[11]]) as usize,
                12,
            ),
            v => return Err(bad(format!("unsupported .npy version {v}"))),
        };
        let header = map
            .get(hstart..hstart + hlen)
            .and_then(|h| std::str::from_utf8(h).ok())
            .ok_or_else(|| bad("truncated or non-UTF-8 header".into()))?;
        let field = |key: &str| -> Option<&str> {
            let i = header.find(&format!("'{key}'"))? + key.len() + 2;
            let rest = header[i..].trim_start().strip_prefix(':')?.trim_start();
            Some(rest)
        };
        let width = match field("descr") {
            Some(r) if r.starts_with("'<u2'") || r.starts_with("'|u2'") => 2,
            Some(r) if r.starts_with("'<u4'") => 4,
            Some(r) => {
                return Err(bad(format!(
                    "dtype {} — token rows must be little-endian uint16 or uint32",
                    r.split(',').next().unwrap_or(r)
                )))
            }
            None => return Err(bad("header has no 'descr'".into())),
        };
        if !field("fortran_order").is_some_and(|r| r.starts_with("False")) {
            return Err(bad("Fortran-order array; save it in C order".into()));
        }
        let shape = field("shape")
            .and_then(|r| r.strip_prefix('('))
            .and_then(|r| r.split(')').next())
            .ok_or_else(|| bad("header has no 'shape'".into()))?;
        let dims: Vec<usize> = shape
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad(format!("bad shape ({shape})")))?;
        let [rows, row_len] = dims[..] else {
            return Err(bad(format!(
                "shape ({shape}): token rows must be 2-D [documents, tokens]"
            )));
        };
        let data = hstart + hlen;
        let need = rows
            .checked_mul(row_len)
            .and_then(|n| n.checked_mul(width))
            .and_then(|n| n.checked_add(data))
            .ok_or_else(|| bad(format!("shape ({shape}) overflows")))?;
        if map.len() != need {
            return Err(bad(format!(
                "{} bytes, but shape ({shape}) of {width}-byte ids needs {need}",
                map.len()
            )));
        }
        if rows == 0 || row_len < 2 {
            return Err(DataError::Invalid(format!(
                "{}: no documents of two or more tokens (shape ({shape}))",
                path.display()
            )));
        }
        let r = TokenRows {
            path: path.to_path_buf(),
            map,
            data,
            rows,
            row_len,
            width,
        };
        r.check_ids(vocab)?;
        Ok(r)
    }

    /// Every id below `vocab` (a scan of the whole file: a wrong tokenizer or dtype shows here,
    /// not as an out-of-range embedding lookup mid-run).
    fn check_ids(&self, vocab: usize) -> Result<(), DataError> {
        use rayon::prelude::*;
        let bad_row = (0..self.rows).into_par_iter().find_first(|&r| {
            let mut row = Vec::with_capacity(self.row_len);
            self.read(r, 0, self.row_len, &mut row);
            row.iter().any(|&id| id as usize >= vocab)
        });
        match bad_row {
            Some(r) => Err(DataError::Corrupt {
                path: self.path.display().to_string(),
                why: format!("row {r} holds a token id ≥ the vocabulary size {vocab}"),
            }),
            None => Ok(()),
        }
    }

    /// Number of documents.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Tokens per document.
    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Appends ids `start..start + len` of row `row` to `out`.
    pub fn read(&self, row: usize, start: usize, len: usize, out: &mut Vec<u32>) {
        assert!(row < self.rows && start + len <= self.row_len);
        let at = self.data + (row * self.row_len + start) * self.width;
        let bytes = &self.map[at..at + len * self.width];
        match self.width {
            2 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32),
            ),
            _ => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
        }
    }
}

/// Writes a `[rows, row_len]` uint16 `.npy` file (tests, examples, small exports).
pub fn write_npy_u16(path: &Path, rows: usize, row_len: usize, ids: &[u16]) -> std::io::Result<()> {
    assert_eq!(ids.len(), rows * row_len, "ids must be rows × row_len");
    let mut header =
        format!("{{'descr': '<u2', 'fortran_order': False, 'shape': ({rows}, {row_len}), }}");
    // pad so that the data starts on a 64-byte boundary, header ends with '\n'
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + ids.len() * 2);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    std::fs::write(path, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenizerKind;
    use crate::data::TokenData;

    /// A synthetic file in LongCrawl64's layout: row r holds r·1000 + position (mod vocab).
    fn synthetic(dir: &Path, rows: usize, row_len: usize) -> PathBuf {
        let ids: Vec<u16> = (0..rows * row_len)
            .map(|i| ((i / row_len) * 1000 + i % row_len) as u16)
            .collect();
        let p = dir.join("lc64.npy");
        write_npy_u16(&p, rows, row_len, &ids).unwrap();
        p
    }

    #[test]
    fn windows_come_from_whole_rows_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, len) = (10, 300);
        let mut data =
            TokenData::open_rows(&synthetic(dir.path(), rows, len), TokenizerKind::Gpt2).unwrap();
        data.split(0.2).unwrap();
        let ctx = 64;
        for step in 0..20 {
            let b = data.batch(1, step, 0, 4, ctx);
            for w in 0..4 {
                let ids = &b.ids[w * ctx..(w + 1) * ctx];
                let tg = &b.targets[w * ctx..(w + 1) * ctx];
                let (row, pos) = (ids[0] as usize / 1000, ids[0] as usize % 1000);
                assert!(
                    row < rows && pos + ctx < len,
                    "window outside a row: {ids:?}"
                );
                for i in 0..ctx {
                    assert_eq!(ids[i] as usize, row * 1000 + pos + i, "ids not contiguous");
                    assert_eq!(tg[i], ids[i] + 1, "target is not the next id");
                }
            }
        }
    }

    #[test]
    fn a_mask_beside_the_rows_leaves_only_marked_targets() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, len) = (4, 40);
        let path = synthetic(dir.path(), rows, len);
        // mark every third token of every row
        let mask: Vec<u16> = (0..rows * len)
            .map(|i| u16::from((i % len).is_multiple_of(3)))
            .collect();
        write_npy_u16(&path.with_extension("mask.npy"), rows, len, &mask).unwrap();
        let mut data = TokenData::open_rows(&path, TokenizerKind::Gpt2).unwrap();
        data.split(0.25).unwrap();
        let ctx = 16;
        for step in 0..10 {
            let b = data.batch(1, step, 0, 2, ctx);
            for (i, (&id, &tg)) in b.ids.iter().zip(&b.targets).enumerate() {
                let next = id as usize % 1000 + 1; // position of the target in its row
                if next.is_multiple_of(3) {
                    assert_eq!(tg, id + 1, "marked target kept (window position {i})");
                } else {
                    assert_eq!(
                        tg,
                        crate::ops::cross_entropy::IGNORE,
                        "unmarked target dropped"
                    );
                }
            }
        }
        // a mask of another shape is a named error
        write_npy_u16(
            &path.with_extension("mask.npy"),
            rows,
            len - 1,
            &mask[..rows * (len - 1)],
        )
        .unwrap();
        let e = TokenData::open_rows(&path, TokenizerKind::Gpt2)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("lc64.mask.npy") && e.contains("loss mask of shape"),
            "{e}"
        );
    }

    #[test]
    fn bad_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = std::fs::read(synthetic(dir.path(), 3, 8)).unwrap();
        let try_bytes = |name: &str, bytes: &[u8], vocab: usize| -> String {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            match TokenRows::open(&p, vocab) {
                Ok(_) => "opened".into(),
                Err(e) => e.to_string(),
            }
        };
        assert_eq!(try_bytes("ok.npy", &good, 50257), "opened");
        assert!(try_bytes("short.npy", &good[..good.len() - 2], 50257).contains("bytes"));
        assert!(try_bytes("magic.npy", b"not numpy at all", 50257).contains("bad magic"));
        let edit = |from: &str, to: &str| -> Vec<u8> {
            let at = good
                .windows(from.len())
                .position(|w| w == from.as_bytes())
                .unwrap();
            let mut b = good[..at].to_vec();
            b.extend_from_slice(to.as_bytes());
            b.extend_from_slice(&good[at + from.len()..]);
            b
        };
        let f4 = edit("<u2", "<f4");
        assert!(try_bytes("f4.npy", &f4, 50257).contains("uint16 or uint32"));
        let three = edit("(3, 8), ", "(3, 8, 1)");
        assert!(try_bytes("3d.npy", &three, 50257).contains("2-D"));
        // ids up to 2007 do not fit a byte vocabulary
        assert!(try_bytes("vocab.npy", &good, 256).contains("vocabulary size 256"));
    }
}
