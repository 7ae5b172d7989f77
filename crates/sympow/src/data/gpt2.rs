//! GPT-2 (r50k_base) encoding, fast enough for `sympow data prepare` on a large corpus.
//!
//! tiktoken splits text into pieces with the GPT-2 pattern
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` through
//! `fancy_regex` (look-ahead), which is most of its time: ~4 MB/s per core on source code.
//! [`pieces`] is that pattern as a hand-written scanner (leftmost-first alternation, the same
//! Unicode classes), and each piece that is not itself a token goes through tiktoken's own
//! merge ([`tiktoken_rs::byte_pair_split`]), so the ids are tiktoken's — the tests compare
//! the two on prose, code and random Unicode.

use rustc_hash::FxHashMap;
use std::sync::OnceLock;
use unicode_general_category::{get_general_category, GeneralCategory as G};

/// Every token's bytes → its id, read back from tiktoken's decoder once.
fn ranks() -> &'static FxHashMap<Vec<u8>, u32> {
    static RANKS: OnceLock<FxHashMap<Vec<u8>, u32>> = OnceLock::new();
    RANKS.get_or_init(|| {
        let bpe = tiktoken_rs::r50k_base_singleton();
        (0..50256u32)
            .map(|id| (bpe.decode_bytes(&[id]).expect("r50k id"), id))
            .collect()
    })
}

/// Token ids of `text`, identical to tiktoken's `r50k_base().encode_ordinary(text)`.
pub fn encode(text: &str) -> Vec<u32> {
    let ranks = ranks();
    let mut out = Vec::with_capacity(text.len() / 3);
    for piece in pieces(text) {
        let b = piece.as_bytes();
        match ranks.get(b) {
            Some(&id) => out.push(id),
            None => out.extend(
                tiktoken_rs::byte_pair_split(b, ranks)
                    .iter()
                    .map(|p| ranks[*p]),
            ),
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

#[inline]
fn class(c: char) -> Class {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => Class::Letter,
            '0'..='9' => Class::Number,
            // \s in ASCII: \t \n \v \f \r and space
            '\t' | '\n' | '\x0B' | '\x0C' | '\r' | ' ' => Class::Space,
            _ => Class::Other,
        };
    }
    if c.is_whitespace() {
        return Class::Space; // Unicode White_Space, as regex's \s
    }
    match get_general_category(c) {
        G::UppercaseLetter
        | G::LowercaseLetter
        | G::TitlecaseLetter
        | G::ModifierLetter
        | G::OtherLetter => Class::Letter,
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => Class::Number,
        _ => Class::Other,
    }
}

/// The GPT-2 pre-tokenisation of `text`: consecutive pieces that cover it exactly.
pub fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= text.len() {
            return None;
        }
        let len = piece_len(&text[pos..]);
        let piece = &text[pos..pos + len];
        pos += len;
        Some(piece)
    })
}

/// Length in bytes of the first piece of non-empty `s`.
fn piece_len(s: &str) -> usize {
    let b = s.as_bytes();
    // 's 't 're 've 'm 'll 'd
    if b[0] == b'\'' && b.len() >= 2 {
        match b[1] {
            b's' | b't' | b'm' | b'd' => return 2,
            b'r' if b.get(2) == Some(&b'e') => return 3,
            b'v' if b.get(2) == Some(&b'e') => return 3,
            b'l' if b.get(2) == Some(&b'l') => return 3,
            _ => {}
        }
    }
    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional ASCII space, then a run of one
    // class (the space is taken only if such a run follows it)
    let start = usize::from(b[0] == b' ');
    if let Some(c) = s[start..].chars().next() {
        let k = class(c);
        if k != Class::Space {
            return start + run_len(&s[start..], k);
        }
    }
    // `\s+(?!\S)|\s+`: a whitespace run, less its last character when a non-space follows
    // (that character then leads the next piece), unless the run is that one character
    let run = run_len(s, Class::Space);
    if run == s.len() {
        return run;
    }
    let last = s[..run].chars().next_back().map_or(0, char::len_utf8);
    if run > last {
        run - last
    } else {
        run
    }
}

/// Bytes of the leading run of characters of class `k` in `s`.
#[inline]
fn run_len(s: &str, k: Class) -> usize {
    s.char_indices()
        .find(|&(_, c)| class(c) != k)
        .map_or(s.len(), |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(text: &str) -> Vec<u32> {
        tiktoken_rs::r50k_base_singleton().encode_ordinary(text)
    }

    #[test]
    fn matches_tiktoken_on_prose_code_and_edge_cases() {
        let corpus = crate::data::corpus::embedded_corpus();
        let prose = &corpus[0].text;
        assert_eq!(encode(prose), reference(prose));
        let code = include_str!("gpt2.rs");
        assert_eq!(encode(code), reference(code));
        for s in [
            "",
            " ",
            "  ",
            "a",
            " a",
            "  a",
            "\n\n  x",
            "x  \n",
            "it's we'll they're I'd 'LL",
            "'",
            "''s",
            " 's",
            "x\t\ty",
            "\u{a0}\u{a0}b",
            "¹²³ ½ Ⅻ",
            "naïve café ǅ ʰ",
            "日本語 テキスト",
            "emoji 🙂🙂 ok",
            "tab\there",
            "\r\n\r\n",
            "a\u{2028}b",
            "    return x;\n}\n",
            "i++ += -> ::",
            "\u{300}x",
            " \u{300}",
        ] {
            assert_eq!(encode(s), reference(s), "{s:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn matches_tiktoken_on_random_text(
            s in proptest::collection::vec(
                prop_oneof![
                    Just(' '), Just('\n'), Just('\t'), Just('\''), Just('s'), Just('l'),
                    Just('e'), Just('0'), Just('_'), Just('{'), Just('é'), Just('\u{a0}'),
                    Just('\u{300}'), Just('²'), Just('日'), Just('🙂'), any::<char>(),
                ],
                0..40,
            ).prop_map(|v| v.into_iter().collect::<String>())
        ) {
            prop_assert_eq!(encode(&s), reference(&s));
        }
    }
}
