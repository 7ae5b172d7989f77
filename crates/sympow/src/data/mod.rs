//! Data: tokenizers, the embedded corpus, token shards and the training-window loader.
//!
//! Text → [`Tokenizer`] → documents of token ids → [`shard`] files (or, for the embedded
//! corpus, memory; or fixed-length [`rows`] of ids in LongCrawl64's layout) → [`TokenData`] split by document into train and validation → windows of
//! the training context drawn deterministically from a seed by [`TokenData::batch`].

pub mod corpus;
pub mod gpt2;
pub mod loader;
pub mod prepare;
pub mod rows;
pub mod shard;
pub mod tokenizer;

pub use corpus::Document;
pub use loader::{Split, TokenData};
pub use tokenizer::Tokenizer;

/// A data error; every message names the file or the document.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// A shard is corrupt, truncated, or of another format.
    #[error("{path}: corrupt shard: {why}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The input is unusable (no documents, bad JSON line, …).
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub(crate) fn io(path: &std::path::Path, err: std::io::Error) -> Self {
        DataError::Io {
            path: path.display().to_string(),
            err,
        }
    }
}
