//! Tokenizers: GPT-2 BPE (r50k_base, embedded in `tiktoken-rs`, so offline) and raw bytes.

use crate::config::TokenizerKind;

/// A tokenizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tokenizer {
    kind: TokenizerKind,
}

impl Tokenizer {
    /// The tokenizer of that kind.
    pub fn new(kind: TokenizerKind) -> Self {
        Tokenizer { kind }
    }

    /// Which one.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self.kind {
            TokenizerKind::Gpt2 => 50257,
            TokenizerKind::Bytes => 256,
        }
    }

    /// Token ids of `text` (special tokens are not recognised: text is text).
    ///
    /// ```
    /// use sympow::{config::TokenizerKind, data::Tokenizer};
    /// let t = Tokenizer::new(TokenizerKind::Gpt2);
    /// let ids = t.encode("Fellow-Citizens of the Senate");
    /// assert_eq!(t.decode(&ids).unwrap(), "Fellow-Citizens of the Senate");
    /// assert_eq!(Tokenizer::new(TokenizerKind::Bytes).encode("hé"), vec![104, 195, 169]);
    /// ```
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self.kind {
            TokenizerKind::Gpt2 => super::gpt2::encode(text),
            TokenizerKind::Bytes => text.bytes().map(u32::from).collect(),
        }
    }

    /// The bytes of `ids`; an id outside the vocabulary is an error naming it.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, String> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size()) {
            return Err(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size()
            ));
        }
        match self.kind {
            TokenizerKind::Gpt2 => tiktoken_rs::r50k_base_singleton()
                .decode_bytes(ids)
                .map_err(|e| e.to_string()),
            TokenizerKind::Bytes => Ok(ids.iter().map(|&i| i as u8).collect()),
        }
    }

    /// Text of `ids` (invalid UTF-8 replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }
}

/// Turns a stream of token ids into text pieces as soon as they form valid UTF-8 (a BPE token
/// or a byte may end inside a multi-byte character).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds one token's bytes and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_some() => {
                // a real encoding error, not an unfinished character: flush it lossily
                self.pending.len()
            }
            Err(e) => e.valid_up_to(),
        };
        let out: Vec<u8> = self.pending.drain(..valid).collect();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Whatever is left, lossily.
    pub fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_decoder_waits_for_whole_characters() {
        let mut s = StreamDecoder::default();
        let e = "é".as_bytes();
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..]), "é");
        assert_eq!(s.push(b"ab"), "ab");
        assert_eq!(s.push(&[0xff]), "\u{fffd}");
    }

    #[test]
    fn out_of_vocabulary_ids_are_errors() {
        let t = Tokenizer::new(TokenizerKind::Bytes);
        assert!(t.decode(&[300]).unwrap_err().contains("300"));
        let g = Tokenizer::new(TokenizerKind::Gpt2);
        assert!(g.decode(&[60000]).unwrap_err().contains("60000"));
    }
}
