//! Tokenised documents, their train/validation split, and the windows training draws.

use super::corpus::{embedded_corpus, Document};
use super::rows::TokenRows;
use super::shard::{shard_files, Shard};
use super::{DataError, Tokenizer};
use crate::config::{DataConfig, TokenizerKind};
use crate::ops::cross_entropy::IGNORE;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::Path;

/// Which documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training documents.
    Train,
    /// Held-out documents.
    Val,
}

enum Source {
    Memory {
        tokens: Vec<u32>,
        offsets: Vec<usize>,
    },
    Shard(Shard),
    /// Rows of ids, and optionally a loss mask of the same shape (1: train on this token).
    Rows(TokenRows, Option<TokenRows>),
}

#[derive(Clone, Copy, Debug)]
struct DocRef {
    src: usize,
    idx: usize,
    len: usize,
}

/// A batch of windows: `ids` and next-token `targets`, both `[batch, context]` row-major;
/// positions past a short document's end have target [`IGNORE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Input ids.
    pub ids: Vec<u32>,
    /// Target ids.
    pub targets: Vec<u32>,
}

/// Tokenised documents split into train and validation by document.
pub struct TokenData {
    sources: Vec<Source>,
    docs: Vec<DocRef>,
    train: Vec<usize>,
    val: Vec<usize>,
    /// Cumulative token counts of the training documents, for length-weighted sampling.
    train_cum: Vec<u64>,
    /// The tokenizer the ids belong to.
    pub tokenizer: TokenizerKind,
}

impl TokenData {
    /// Tokenises documents in memory (in parallel).
    pub fn from_documents(docs: &[Document], tokenizer: Tokenizer) -> Self {
        let ids: Vec<Vec<u32>> = docs.par_iter().map(|d| tokenizer.encode(&d.text)).collect();
        let mut offsets = vec![0];
        let mut tokens = Vec::with_capacity(ids.iter().map(Vec::len).sum());
        let mut refs = Vec::with_capacity(ids.len());
        for (i, d) in ids.into_iter().enumerate() {
            refs.push(DocRef {
                src: 0,
                idx: i,
                len: d.len(),
            });
            tokens.extend(d);
            offsets.push(tokens.len());
        }
        TokenData {
            sources: vec![Source::Memory { tokens, offsets }],
            docs: refs,
            train: Vec::new(),
            val: Vec::new(),
            train_cum: Vec::new(),
            tokenizer: tokenizer.kind(),
        }
    }

    /// Opens every shard in `dir`; all must use `tokenizer`.
    pub fn open_shards(dir: &Path, tokenizer: TokenizerKind) -> Result<Self, DataError> {
        let mut sources = Vec::new();
        let mut docs = Vec::new();
        for path in shard_files(dir)? {
            let s = Shard::open(&path)?;
            if s.tokenizer != tokenizer {
                return Err(DataError::Invalid(format!(
                    "{}: tokenised with {:?}, but the config says data.tokenizer = {:?}",
                    path.display(),
                    s.tokenizer,
                    tokenizer
                )));
            }
            let src = sources.len();
            docs.extend((0..s.num_docs()).map(|i| DocRef {
                src,
                idx: i,
                len: s.doc_len(i),
            }));
            sources.push(Source::Shard(s));
        }
        Ok(TokenData {
            sources,
            docs,
            train: Vec::new(),
            val: Vec::new(),
            train_cum: Vec::new(),
            tokenizer,
        })
    }

    /// Opens a `.npy` file of fixed-length rows of ids (LongCrawl64's layout, [`super::rows`]),
    /// one document per row, tokenised with `tokenizer`. A file `<name>.mask.npy` beside
    /// `<name>.npy`, of the same shape and holding 0s and 1s, is a loss mask: a token with a 0
    /// is never a training or validation target (e.g. the prompts of a synthetic task).
    pub fn open_rows(path: &Path, tokenizer: TokenizerKind) -> Result<Self, DataError> {
        let rows = TokenRows::open(path, Tokenizer::new(tokenizer).vocab_size())?;
        let mask_path = path.with_extension("mask.npy");
        let mask = if mask_path.exists() {
            let m = TokenRows::open(&mask_path, 2)?;
            if (m.rows(), m.row_len()) != (rows.rows(), rows.row_len()) {
                return Err(DataError::Invalid(format!(
                    "{}: loss mask of shape ({}, {}) for rows of shape ({}, {})",
                    mask_path.display(),
                    m.rows(),
                    m.row_len(),
                    rows.rows(),
                    rows.row_len()
                )));
            }
            Some(m)
        } else {
            None
        };
        let docs = (0..rows.rows())
            .map(|i| DocRef {
                src: 0,
                idx: i,
                len: rows.row_len(),
            })
            .collect();
        Ok(TokenData {
            sources: vec![Source::Rows(rows, mask)],
            docs,
            train: Vec::new(),
            val: Vec::new(),
            train_cum: Vec::new(),
            tokenizer,
        })
    }

    /// The corpus a data config names, split into train and validation.
    pub fn load(cfg: &DataConfig) -> Result<Self, DataError> {
        let mut d = if cfg.corpus == "embedded" {
            Self::from_documents(&embedded_corpus(), Tokenizer::new(cfg.tokenizer))
        } else if cfg.corpus.ends_with(".npy") {
            Self::open_rows(Path::new(&cfg.corpus), cfg.tokenizer)?
        } else {
            Self::open_shards(Path::new(&cfg.corpus), cfg.tokenizer)?
        };
        d.split(cfg.val_fraction)?;
        Ok(d)
    }

    /// Splits by document: every k-th non-empty document (k = round(1/val_fraction)) is
    /// validation, the rest training; never overlapping, the same on every run.
    pub fn split(&mut self, val_fraction: f64) -> Result<(), DataError> {
        let nonempty: Vec<usize> = (0..self.docs.len())
            .filter(|&i| self.docs[i].len >= 2)
            .collect();
        if nonempty.len() < 2 {
            return Err(DataError::Invalid(format!(
                "need at least 2 documents of 2+ tokens, found {}",
                nonempty.len()
            )));
        }
        let k = (1.0 / val_fraction).round().max(2.0) as usize;
        (self.val, self.train) = nonempty.iter().partition(|&&i| i % k == k / 2);
        if self.val.is_empty() {
            self.val.push(self.train.pop().unwrap());
        }
        let mut acc = 0u64;
        self.train_cum = self
            .train
            .iter()
            .map(|&i| {
                acc += self.docs[i].len as u64;
                acc
            })
            .collect();
        Ok(())
    }

    /// Documents and tokens in a split.
    pub fn stats(&self, split: Split) -> (usize, u64) {
        let ids = self.split_docs(split);
        (
            ids.len(),
            ids.iter().map(|&i| self.docs[i].len as u64).sum(),
        )
    }

    fn split_docs(&self, split: Split) -> &[usize] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    fn read(&self, doc: usize, start: usize, len: usize, out: &mut Vec<u32>) {
        let d = self.docs[doc];
        match &self.sources[d.src] {
            Source::Memory { tokens, offsets } => {
                out.extend_from_slice(&tokens[offsets[d.idx] + start..offsets[d.idx] + start + len])
            }
            Source::Shard(s) => s.read(d.idx, start, len, out),
            Source::Rows(r, _) => r.read(d.idx, start, len, out),
        }
    }

    /// The loss mask of `doc`'s tokens `start..start + len`, if its source has one.
    fn mask(&self, doc: usize, start: usize, len: usize) -> Option<Vec<u32>> {
        let d = self.docs[doc];
        match &self.sources[d.src] {
            Source::Rows(_, Some(m)) => {
                let mut out = Vec::with_capacity(len);
                m.read(d.idx, start, len, &mut out);
                Some(out)
            }
            _ => None,
        }
    }

    /// One window of `context` inputs and targets from `start` in `doc`, padded if short.
    fn window(&self, doc: usize, start: usize, context: usize, b: &mut Batch) {
        let avail = (self.docs[doc].len - start).min(context + 1);
        let mut toks = Vec::with_capacity(context + 1);
        self.read(doc, start, avail, &mut toks);
        let mask = self.mask(doc, start, avail);
        for i in 0..context {
            b.ids.push(if i < toks.len() { toks[i] } else { 0 });
            let masked = mask
                .as_ref()
                .is_some_and(|m| i + 1 < m.len() && m[i + 1] == 0);
            b.targets.push(if i + 1 < toks.len() && !masked {
                toks[i + 1]
            } else {
                IGNORE
            });
        }
    }

    /// Training windows for (step, micro-batch): documents drawn with probability
    /// proportional to their length, a uniform start inside each. A pure function of its
    /// arguments, so a resumed run draws exactly what the uninterrupted one would.
    pub fn batch(&self, seed: u64, step: u64, micro: u64, batch: usize, context: usize) -> Batch {
        let mut rng = ChaCha8Rng::seed_from_u64(
            seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ micro.wrapping_mul(0xD1B5_4A32_D192_ED03),
        );
        let total = *self.train_cum.last().expect("split() before batch()");
        let mut b = Batch {
            ids: Vec::with_capacity(batch * context),
            targets: Vec::with_capacity(batch * context),
        };
        for _ in 0..batch {
            let pos = rng.gen_range(0..total);
            let k = self.train_cum.partition_point(|&c| c <= pos);
            let doc = self.train[k];
            let max_start = self.docs[doc].len.saturating_sub(context + 1);
            let start = rng.gen_range(0..=max_start);
            self.window(doc, start, context, &mut b);
        }
        b
    }

    /// Evaluation windows of `context` tokens, at most `max_windows`, in a fixed order: first
    /// the window at the start of every validation document (position 0 is a document
    /// start), then every document's second window (its next `context` tokens), and so on —
    /// so a handful of windows already spans many documents, not the first document's length.
    pub fn eval_windows(&self, context: usize, max_windows: usize) -> Vec<Batch> {
        let mut out = Vec::new();
        let mut start = 0;
        while out.len() < max_windows {
            let mut any = false;
            for &doc in &self.val {
                if out.len() == max_windows {
                    break;
                }
                if start + 1 < self.docs[doc].len {
                    let mut b = Batch {
                        ids: Vec::new(),
                        targets: Vec::new(),
                    };
                    self.window(doc, start, context, &mut b);
                    out.push(b);
                    any = true;
                }
            }
            if !any {
                break;
            }
            start += context;
        }
        out
    }

    /// The unigram baseline in nats per token: the cross-entropy on the validation tokens of
    /// the training tokens' frequencies (add-one smoothed over the vocabulary). A model that
    /// does not beat this has learnt nothing about context.
    pub fn unigram_baseline(&self, vocab: usize) -> f64 {
        let mut counts = vec![1u64; vocab];
        let mut buf = Vec::new();
        for &d in &self.train {
            buf.clear();
            self.read(d, 0, self.docs[d].len, &mut buf);
            buf.iter().for_each(|&t| counts[t as usize] += 1);
        }
        let total: u64 = counts.iter().sum();
        let (mut nll, mut n) = (0.0, 0u64);
        for &d in &self.val {
            buf.clear();
            self.read(d, 0, self.docs[d].len, &mut buf);
            for &t in &buf[1..] {
                nll -= (counts[t as usize] as f64 / total as f64).ln();
                n += 1;
            }
        }
        nll / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> TokenData {
        let docs: Vec<Document> = (0..40)
            .map(|i| Document {
                id: i.to_string(),
                text: "abcdefghij".repeat(i % 7 + 1),
            })
            .collect();
        let mut d = TokenData::from_documents(&docs, Tokenizer::new(TokenizerKind::Bytes));
        d.split(0.1).unwrap();
        d
    }

    #[test]
    fn split_is_disjoint_and_covers_everything() {
        let d = data();
        assert!(d.train.iter().all(|i| !d.val.contains(i)));
        assert_eq!(d.train.len() + d.val.len(), 40);
        assert_eq!(d.val.len(), 4);
    }

    #[test]
    fn batches_are_deterministic_windows_of_documents() {
        let d = data();
        let a = d.batch(1, 5, 0, 8, 16);
        assert_eq!(a, d.batch(1, 5, 0, 8, 16));
        assert_ne!(a, d.batch(1, 6, 0, 8, 16));
        assert_ne!(a, d.batch(2, 5, 0, 8, 16));
        for (ids, tg) in a.ids.chunks(16).zip(a.targets.chunks(16)) {
            for i in 0..15 {
                if tg[i] != IGNORE {
                    assert_eq!(tg[i], ids[i + 1]); // targets are the next input
                    let (x, y) = (ids[i] as u8, tg[i] as u8);
                    assert!(y == x + 1 || (x, y) == (b'j', b'a')); // text is "abc…jabc…"
                }
            }
        }
    }

    #[test]
    fn eval_windows_visit_every_document_before_any_second_window() {
        let docs: Vec<Document> = (0..4u8)
            .map(|i| Document {
                id: i.to_string(),
                text: ((b'a' + i) as char).to_string().repeat(30),
            })
            .collect();
        let mut d = TokenData::from_documents(&docs, Tokenizer::new(TokenizerKind::Bytes));
        d.val = vec![0, 1, 2, 3];
        let first: Vec<u32> = d.eval_windows(10, 6).iter().map(|b| b.ids[0]).collect();
        assert_eq!(first, [97, 98, 99, 100, 97, 98]);
        assert_eq!(
            d.eval_windows(10, 100).len(),
            12,
            "three windows of each document"
        );
    }

    #[test]
    fn short_documents_are_padded_with_ignored_targets() {
        let d = data();
        let b = d.batch(3, 0, 0, 16, 200);
        assert!(b.targets.contains(&IGNORE));
        let w = d.eval_windows(5, 1000);
        assert!(w.iter().all(|b| b.ids.len() == 5));
    }
}
