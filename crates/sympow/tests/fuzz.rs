//! Fuzzing the three parsers of untrusted input — shard reader, checkpoint loader, config
//! parser — with proptest: on any input they return a value or an error, never panic, and what
//! they accept is valid. Cases per property: FUZZ_CASES (default 5000).

use proptest::prelude::*;
use std::sync::OnceLock;
use sympow::config::{Config, TokenizerKind};
use sympow::data::shard::{Shard, ShardWriter};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000)
}

fn valid_shard() -> &'static [u8] {
    static S: OnceLock<Vec<u8>> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.tok");
        let mut w = ShardWriter::create(&p, TokenizerKind::Bytes, 256).unwrap();
        for d in [vec![1u32, 2, 3], vec![], vec![200; 40], vec![7; 5]] {
            w.push(&d).unwrap();
        }
        w.finish().unwrap();
        std::fs::read(p).unwrap()
    })
}

fn valid_checkpoint() -> &'static [u8] {
    static C: OnceLock<Vec<u8>> = OnceLock::new();
    C.get_or_init(|| {
        let mut config = Config::preset("tiny").unwrap();
        config
            .set_all(&[
                ("model.width", "4"),
                ("model.layers", "1"),
                ("model.heads", "1"),
                ("model.head_dim", "2"),
            ])
            .unwrap();
        let params = sympow::model::layout(&config)
            .iter()
            .map(|p| vec![0.5; p.numel()])
            .collect();
        let ck = sympow::checkpoint::Checkpoint {
            config,
            step: 3,
            skipped_steps: 0,
            params,
            moments: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        sympow::checkpoint::save(&p, &ck).unwrap();
        std::fs::read(p).unwrap()
    })
}

/// A byte string: either arbitrary, or a valid file with some bytes replaced, cut or extended.
fn mutated(valid: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    let n = valid.len();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..400),
        (
            proptest::collection::vec((0..n, any::<u8>()), 1..6),
            0..=n + 8
        )
            .prop_map(move |(edits, len)| {
                let mut b = valid.to_vec();
                for (i, v) in edits {
                    b[i] = v;
                }
                b.resize(len, 0);
                b
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn shard_reader_never_panics(bytes in mutated(valid_shard())) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.tok");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(s) = Shard::open(&p) {
            // accepted: then it is intact — every document reads back
            prop_assert_eq!(&bytes[..], valid_shard());
            let mut out = Vec::new();
            for i in 0..s.num_docs() {
                s.read(i, 0, s.doc_len(i), &mut out);
            }
        }
    }

    #[test]
    fn checkpoint_loader_never_panics(bytes in mutated(valid_checkpoint())) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(ck) = sympow::checkpoint::load(&p) {
            // accepted: the tensors are exactly the saved ones (whitespace in the header may differ)
            prop_assert!(ck.params.iter().flatten().all(|&x| x == 0.5));
            prop_assert_eq!(ck.step, 3);
        }
    }

    #[test]
    fn config_parser_never_panics(
        line in 0usize..60,
        value in prop_oneof![
            Just("-1".to_string()), Just("0".to_string()), Just("3".to_string()), Just("1e400".to_string()),
            Just("nan".to_string()), Just("\"x\"".to_string()), Just("[1, 2]".to_string()), Just("{}".to_string()),
            Just("true".to_string()), Just("18446744073709551616".to_string()), "[ -~]{0,12}",
        ],
    ) {
        let text = Config::preset("tiny").unwrap().to_toml();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let i = line % lines.len();
        if let Some((k, _)) = lines[i].clone().split_once(" = ") {
            lines[i] = format!("{k} = {value}");
        }
        if let Ok(c) = Config::from_toml(&lines.join("\n")) {
            prop_assert!(c.validate().is_ok());
        }
    }

    #[test]
    fn config_set_never_panics(key in "[a-z_.]{0,20}", value in "[ -~]{0,12}") {
        let mut c = Config::preset("tiny").unwrap();
        let before = c.clone();
        if c.set(&key, &value).is_err() {
            prop_assert_eq!(c, before);
        } else {
            prop_assert!(c.validate().is_ok());
        }
    }
}
