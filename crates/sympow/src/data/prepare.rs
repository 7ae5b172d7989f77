//! `sympow data prepare`: text or JSONL files → token shards, streaming with bounded memory.

use super::corpus::{for_each_document, input_files, Document};
use super::shard::ShardWriter;
use super::{DataError, Tokenizer};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
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
    /// Bytes of text read.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Documents are tokenised in parallel in groups of about this many bytes of text.
const GROUP_BYTES: usize = 16 << 20;

/// Tokenises every document of `inputs` into shards `out/shard_00000.tok`, … of at most
/// `shard_tokens` tokens each (a longer document gets a shard of its own). Refuses to write
/// into a directory that already holds shards.
pub fn prepare(
    inputs: &[PathBuf],
    out: &Path,
    tokenizer: Tokenizer,
    shard_tokens: u64,
    progress: bool,
) -> Result<PrepareSummary, DataError> {
    let files = input_files(inputs)?;
    if files.is_empty() {
        return Err(DataError::Invalid(
            "no input files (.txt, .md, .jsonl, optionally .gz)".into(),
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
    let bar = if progress {
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
        tokenizer,
        shard_tokens,
        writer: None,
        summary: PrepareSummary {
            shards: vec![],
            documents: 0,
            tokens: 0,
            bytes: 0,
            seconds: 0.0,
        },
    };
    let mut group: Vec<Document> = Vec::new();
    let mut group_bytes = 0;
    for f in &files {
        for_each_document(f, |d| {
            group_bytes += d.text.len();
            group.push(d);
            if group_bytes >= GROUP_BYTES {
                st.flush(&mut group)?;
                group_bytes = 0;
                bar.set_position(st.summary.bytes);
            }
            Ok(())
        })?;
        bar.set_message(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
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

struct State {
    out: PathBuf,
    tokenizer: Tokenizer,
    shard_tokens: u64,
    writer: Option<ShardWriter>,
    summary: PrepareSummary,
}

impl State {
    fn flush(&mut self, group: &mut Vec<Document>) -> Result<(), DataError> {
        let tok = self.tokenizer;
        let ids: Vec<Vec<u32>> = group.par_iter().map(|d| tok.encode(&d.text)).collect();
        self.summary.bytes += group.iter().map(|d| d.text.len() as u64).sum::<u64>();
        group.clear();
        for d in ids.into_iter().filter(|d| !d.is_empty()) {
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
