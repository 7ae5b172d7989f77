//! `sympow data prepare`: text or JSONL files → token shards, streaming with bounded memory.

use super::corpus::{for_each_document, input_files, Document, MemberFilter, Skipped};
use super::shard::ShardWriter;
use super::{DataError, Tokenizer};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What `prepare` wrote.
#[derive(Clone, Debug)]
pub struct PrepareSummary {
    /// Shard files, in order.
    pub shards: Vec<PathBuf>,
    /// Documents written (empty documents are skipped).
    pub documents: u64,
    /// Tokens written.
    pub tokens: u64,
    /// Bytes of text tokenised.
    pub bytes: u64,
    /// Documents shorter than [`PrepareOptions::min_bytes`], left out.
    pub short: u64,
    /// Documents more compressible than [`PrepareOptions::max_deflate_ratio`], left out.
    pub repetitive: u64,
    /// Archive members left out.
    pub skipped: Skipped,
    /// Wall time.
    pub seconds: f64,
}

/// How `prepare` reads and writes.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Tokens per shard (a longer document gets a shard of its own).
    pub shard_tokens: u64,
    /// Which archive members are documents.
    pub filter: MemberFilter,
    /// Documents with fewer bytes of text are left out (long-context training wants long
    /// documents).
    pub min_bytes: u64,
    /// Documents whose text DEFLATE (fast level) compresses more than this many times are
    /// left out: generated register maps, tables and firmware arrays in a source tree, which
    /// are long but say little (see docs/DATA.md). `None` keeps everything.
    pub max_deflate_ratio: Option<f64>,
    /// Show a progress bar (over the bytes of the input files on disk).
    pub progress: bool,
}

impl PrepareOptions {
    /// Defaults: 100 M tokens per shard, the default [`MemberFilter`], every document kept,
    /// no progress bar.
    pub fn new(tokenizer: Tokenizer) -> Self {
        PrepareOptions {
            tokenizer,
            shard_tokens: 100_000_000,
            filter: MemberFilter::default(),
            min_bytes: 1,
            max_deflate_ratio: None,
            progress: false,
        }
    }
}

/// Documents are tokenised in parallel in groups of about this many bytes of text.
const GROUP_BYTES: usize = 16 << 20;

/// Tokenises every document of `inputs` into shards `out/shard_00000.tok`, … of at most
/// `opts.shard_tokens` tokens each. Streaming: memory is bounded by one group of documents
/// (16 MB of text) whatever the input size; groups are tokenised in parallel on every
/// rayon thread. Refuses to write into a directory that already holds shards.
pub fn prepare(
    inputs: &[PathBuf],
    out: &Path,
    opts: &PrepareOptions,
) -> Result<PrepareSummary, DataError> {
    let files = input_files(inputs)?;
    if files.is_empty() {
        return Err(DataError::Invalid(
            "no input files (.txt, .md, .jsonl, optionally .gz; .tar, .tar.gz, .tar.xz)".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| DataError::io(out, e))?;
    if super::shard::shard_files(out).is_ok() {
        return Err(DataError::Invalid(format!(
            "{}: already holds shards; refusing to overwrite",
            out.display()
        )));
    }
    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = if opts.progress {
        indicatif::ProgressBar::new(total_bytes)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template"),
    );
    let t0 = Instant::now();
    let mut st = State {
        out: out.to_path_buf(),
        tokenizer: opts.tokenizer,
        shard_tokens: opts.shard_tokens,
        max_deflate_ratio: opts.max_deflate_ratio,
        writer: None,
        summary: PrepareSummary {
            shards: vec![],
            documents: 0,
            tokens: 0,
            bytes: 0,
            short: 0,
            repetitive: 0,
            skipped: Skipped::default(),
            seconds: 0.0,
        },
    };
    let mut group: Vec<Document> = Vec::new();
    let mut group_bytes = 0;
    let read_before = AtomicU64::new(0);
    for f in &files {
        bar.set_message(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let read = AtomicU64::new(0);
        let skipped = for_each_document(f, &opts.filter, &read, |d| {
            if (d.text.len() as u64) < opts.min_bytes {
                st.summary.short += 1;
                return Ok(());
            }
            group_bytes += d.text.len();
            group.push(d);
            if group_bytes >= GROUP_BYTES {
                st.flush(&mut group)?;
                group_bytes = 0;
                bar.set_position(
                    read_before.load(Ordering::Relaxed) + read.load(Ordering::Relaxed),
                );
            }
            Ok(())
        })?;
        read_before.fetch_add(read.load(Ordering::Relaxed), Ordering::Relaxed);
        st.summary.skipped.filtered += skipped.filtered;
        st.summary.skipped.not_utf8 += skipped.not_utf8;
    }
    st.flush(&mut group)?;
    if let Some(w) = st.writer.take() {
        st.summary.shards.push(w.finish()?);
    }
    bar.finish_and_clear();
    if st.summary.documents == 0 {
        return Err(DataError::Invalid(
            "the inputs hold no non-empty documents".into(),
        ));
    }
    st.summary.seconds = t0.elapsed().as_secs_f64();
    Ok(st.summary)
}

/// How many times DEFLATE's fast level shrinks `text`: ≈ 3 for hand-written code and prose,
/// 5–25 for generated tables.
pub fn deflate_ratio(text: &[u8]) -> f64 {
    use std::io::Write;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(text).expect("writing to memory");
    let n = z.finish().expect("writing to memory").len();
    text.len() as f64 / n.max(1) as f64
}

struct State {
    out: PathBuf,
    tokenizer: Tokenizer,
    shard_tokens: u64,
    max_deflate_ratio: Option<f64>,
    writer: Option<ShardWriter>,
    summary: PrepareSummary,
}

impl State {
    fn flush(&mut self, group: &mut Vec<Document>) -> Result<(), DataError> {
        let (tok, max_ratio) = (self.tokenizer, self.max_deflate_ratio);
        let ids: Vec<Option<Vec<u32>>> = group
            .par_iter()
            .map(|d| {
                let keep = max_ratio.is_none_or(|r| deflate_ratio(d.text.as_bytes()) <= r);
                keep.then(|| tok.encode(&d.text))
            })
            .collect();
        self.summary.bytes += group
            .iter()
            .zip(&ids)
            .filter(|(_, i)| i.is_some())
            .map(|(d, _)| d.text.len() as u64)
            .sum::<u64>();
        self.summary.repetitive += ids.iter().filter(|i| i.is_none()).count() as u64;
        group.clear();
        for d in ids.into_iter().flatten().filter(|d| !d.is_empty()) {
            if self
                .writer
                .as_ref()
                .is_some_and(|w| w.tokens() > 0 && w.tokens() + d.len() as u64 > self.shard_tokens)
            {
                let w = self.writer.take().unwrap();
                self.summary.shards.push(w.finish()?);
            }
            if self.writer.is_none() {
                let path = self
                    .out
                    .join(format!("shard_{:05}.tok", self.summary.shards.len()));
                self.writer = Some(ShardWriter::create(&path, tok.kind(), tok.vocab_size())?);
            }
            self.writer.as_mut().unwrap().push(&d)?;
            self.summary.documents += 1;
            self.summary.tokens += d.len() as u64;
        }
        Ok(())
    }
}
