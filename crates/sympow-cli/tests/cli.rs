//! The command line as a user meets it: outputs, errors, and files left untouched on error.

use std::path::Path;
use std::process::{Command, Output};

fn sympow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sympow"))
        .args(args)
        .output()
        .expect("runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A one-line error naming `what`, with a non-zero exit.
fn assert_error(o: &Output, what: &str) {
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {}",
        stderr(o)
    );
    let e = stderr(o);
    let lines: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {e}");
    assert!(
        lines[0].contains(what),
        "error does not mention {what:?}: {e}"
    );
}

/// A one-layer model of width 16 (two heads of 8), for the commands that build one.
const SMALL_MODEL: &[&str] = &[
    "--set",
    "model.width=16",
    "--set",
    "model.layers=1",
    "--set",
    "model.heads=2",
    "--set",
    "model.head_dim=8",
];

/// `train` arguments beside [`SMALL_MODEL`]: a short run with checkpoints and evaluations.
const SMALL: &[&str] = &[
    "--set",
    "data.context=32",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.eval_batches=1",
    "--set",
    "train.eval_every=2",
    "--set",
    "train.checkpoint_every=2",
    "--steps",
    "4",
    "--no-progress",
];

fn train_small(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--threads", "2", "train", "--out", out.to_str().unwrap()];
    args.extend(SMALL_MODEL);
    args.extend(SMALL);
    args.extend(extra);
    sympow(&args)
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn train_eval_generate_end_to_end_and_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = train_small(&a, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("unigram baseline"), "{out}");
    for f in [
        "checkpoint.safetensors",
        "config.toml",
        "metrics.jsonl",
        "loss.png",
    ] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(first.get("step").is_some() && first.get("loss").is_some());
    // same config, seed and thread count: bit-identical checkpoints
    assert!(train_small(&b, &[]).status.success());
    let same = std::fs::read(a.join("checkpoint.safetensors")).unwrap()
        == std::fs::read(b.join("checkpoint.safetensors")).unwrap();
    assert!(same, "two identical runs wrote different checkpoints");

    let o = sympow(&[
        "eval",
        "--run",
        a.to_str().unwrap(),
        "--run",
        b.to_str().unwrap(),
        "--context",
        "48",
        "--windows",
        "4",
        "--buckets",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(a.join("eval_ctx48.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(a.join("eval_ctx48_runs.png").exists());

    let gen_as = |samples: &str, decode: &str| {
        sympow(&[
            "generate",
            "--run",
            a.to_str().unwrap(),
            "--prompt",
            "Fellow-Citizens",
            "--max-tokens",
            "20",
            "--seed",
            "5",
            "--samples",
            samples,
            "--decode",
            decode,
        ])
    };
    let gen = |samples: &str| gen_as(samples, "auto");
    let (g1, g2) = (gen("1"), gen("1"));
    assert!(g1.status.success(), "{}", stderr(&g1));
    let text = String::from_utf8_lossy(&g1.stdout);
    assert!(text.starts_with("Fellow-Citizens") && text.len() > "Fellow-Citizens".len());
    assert_eq!(g1.stdout, g2.stdout, "same seed, same text");
    // the recurrent state (auto, for this p = 2 model) and a KV cache are one function of the
    // context: the same draws
    let cached = gen_as("1", "kv-cache");
    assert!(cached.status.success(), "{}", stderr(&cached));
    assert_eq!(
        cached.stdout, g1.stdout,
        "KV-cache decoding drew other tokens"
    );
    assert_error(&gen_as("1", "sideways"), "unknown decode form");
    // three samples decoded as one batch: the first is the single sample of the same seed
    let many = gen("3");
    assert!(many.status.success(), "{}", stderr(&many));
    let many = String::from_utf8_lossy(&many.stdout).into_owned();
    let blocks: Vec<&str> = many.split("--- sample ").skip(1).collect();
    assert_eq!(blocks.len(), 3, "{many}");
    assert_eq!(
        blocks[0].strip_prefix("1 of 3 ---\n"),
        Some(&text[..]),
        "sample 1 of a batch is the single sample"
    );
}

#[test]
fn bad_inputs_fail_with_one_line_and_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    assert!(train_small(&run, &[]).status.success());
    let before = snapshot(&run);

    assert_error(
        &sympow(&["train", "--preset", "enormous"]),
        "unknown preset",
    );
    assert_error(&sympow(&["train", "--set", "model.power=3"]), "model.power");
    assert_error(&sympow(&["train", "--set", "model.heads=0"]), "model.heads");
    assert_error(&sympow(&["train", "--set", "model.chunk=0"]), "model.chunk");
    assert_error(&sympow(&["train", "--set", "train.lr=fast"]), "train.lr");
    assert_error(
        &sympow(&["bench", "attention", "--chunk", "100"]),
        "--chunk",
    );
    assert_error(
        &sympow(&["bench", "attention", "--head-dim", "48"]),
        "--head-dim",
    );
    // an existing run is not overwritten
    assert_error(&train_small(&run, &[]), "already holds a run");
    assert!(
        snapshot(&run) == before,
        "a failed command changed the run directory"
    );
    // missing and corrupt checkpoints
    assert_error(
        &sympow(&["eval", "--run", tmp.path().join("nope").to_str().unwrap()]),
        "no checkpoint there",
    );
    let ck = run.join("checkpoint.safetensors");
    let mut bytes = std::fs::read(&ck).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x40;
    std::fs::write(&ck, &bytes).unwrap();
    let corrupted = snapshot(&run);
    assert_error(
        &sympow(&["generate", "--run", run.to_str().unwrap(), "--prompt", "x"]),
        "corrupt checkpoint",
    );
    assert_error(
        &sympow(&["train", "--out", run.to_str().unwrap(), "--resume"]),
        "corrupt checkpoint",
    );
    assert!(
        snapshot(&run) == corrupted,
        "a failed command changed the run directory"
    );
    // a config file with a wrong type
    let cfgf = tmp.path().join("bad.toml");
    let text = String::from_utf8(sympow(&["config"]).stdout)
        .unwrap()
        .replace("layers = 4", "layers = \"four\"");
    std::fs::write(&cfgf, text).unwrap();
    assert_error(
        &sympow(&["train", "--config", cfgf.to_str().unwrap()]),
        "layers",
    );
}

#[test]
fn data_prepare_and_corrupt_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for i in 0..6 {
        std::fs::write(
            docs.join(format!("{i}.txt")),
            "The quick brown fox jumps over the lazy dog. ".repeat(20 + i),
        )
        .unwrap();
    }
    std::fs::write(
        docs.join("more.jsonl"),
        "{\"text\": \"a second kind of input\"}\n{\"text\": \"and one more\"}\n",
    )
    .unwrap();
    let shards = tmp.path().join("shards");
    let o = sympow(&[
        "data",
        "prepare",
        docs.to_str().unwrap(),
        "--out",
        shards.to_str().unwrap(),
        "--tokenizer",
        "bytes",
        "--shard-tokens",
        "2000",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("8 documents"));
    // preparing again into the same place is refused
    assert_error(
        &sympow(&[
            "data",
            "prepare",
            docs.to_str().unwrap(),
            "--out",
            shards.to_str().unwrap(),
            "--tokenizer",
            "bytes",
        ]),
        "refusing to overwrite",
    );
    // training reads the shards
    let corpus = format!("data.corpus={}", shards.display());
    let run = tmp.path().join("run");
    let o = train_small(&run, &["--set", &corpus, "--set", "data.val_fraction=0.3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // a wrong tokenizer and a corrupted shard are named errors
    assert_error(
        &train_small(
            &tmp.path().join("r2"),
            &[
                "--set",
                &corpus,
                "--set",
                "data.tokenizer=gpt2",
                "--set",
                "model.vocab_size=50257",
            ],
        ),
        "tokenised with",
    );
    let shard = std::fs::read_dir(&shards)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut b = std::fs::read(&shard).unwrap();
    b[100] ^= 1;
    std::fs::write(&shard, b).unwrap();
    assert_error(
        &train_small(&tmp.path().join("r3"), &["--set", &corpus]),
        "corrupt shard",
    );
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = vec!["train", "--out", run.to_str().unwrap()];
    args.extend(SMALL_MODEL);
    args.extend(SMALL.iter().filter(|&&a| a != "--steps" && a != "4"));
    args.extend([
        "--steps",
        "100000",
        "--set",
        "train.checkpoint_every=0",
        "--set",
        "train.eval_every=0",
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_sympow"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait until it is training, then interrupt as a terminal's Ctrl-C would
    let metrics = run.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 3) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "train exited early ({status}): {}",
                String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr)
            );
        }
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "exit code after Ctrl-C; stderr: {}",
        stderr(&out)
    );
    let ck = sympow::checkpoint::load(&run.join("checkpoint.safetensors"))
        .expect("a loadable checkpoint after Ctrl-C");
    assert!(ck.step >= 3 && ck.step < 100000);
    // resume to a nearby end
    let target = (ck.step + 2).to_string();
    let o = sympow(&[
        "train",
        "--out",
        run.to_str().unwrap(),
        "--resume",
        "--steps",
        &target,
        "--no-progress",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        sympow::checkpoint::load(&run.join("checkpoint.safetensors"))
            .unwrap()
            .step,
        ck.step + 2
    );
}

#[test]
fn trains_on_rows_in_longcrawl64_layout() {
    // 12 documents of 512 byte-token ids each, in a .npy file as LongCrawl64 is laid out
    let tmp = tempfile::tempdir().unwrap();
    let (rows, len) = (12, 512);
    let ids: Vec<u16> = (0..rows * len)
        .map(|i| (b"the state of the union is strong. "[i % 34]) as u16)
        .collect();
    let npy = tmp.path().join("lc64.npy");
    sympow::data::rows::write_npy_u16(&npy, rows, len, &ids).unwrap();
    let corpus = format!("data.corpus={}", npy.display());
    let run = tmp.path().join("run");
    let o = train_small(&run, &["--set", &corpus, "--set", "data.tokenizer=bytes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("val_loss"),
        "no validation on the rows corpus"
    );
    // ids beyond the tokenizer's vocabulary are refused up front, naming the file
    let wide: Vec<u16> = vec![300; rows * len];
    sympow::data::rows::write_npy_u16(&npy, rows, len, &wide).unwrap();
    assert_error(
        &train_small(
            &tmp.path().join("run2"),
            &["--set", &corpus, "--set", "data.tokenizer=bytes"],
        ),
        "vocabulary size 256",
    );
}

#[test]
fn context_scaling_experiment_writes_table_and_figure_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cs");
    let args = [
        "--threads",
        "2",
        "experiment",
        "context-scaling",
        "--out",
        out.to_str().unwrap(),
        "--contexts",
        "16,32",
        "--variants",
        "softmax,conformal",
        "--tokens-per-step",
        "64",
        "--eval-windows",
        "4",
        "--set",
        "model.width=16",
        "--set",
        "model.layers=1",
        "--set",
        "model.heads=2",
        "--set",
        "model.head_dim=8",
        "--set",
        "model.chunk=8",
        "--set",
        "train.eval_every=0",
        "--steps",
        "3",
        "--no-progress",
    ];
    let o = sympow(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = std::fs::read_to_string(out.join("context_scaling.md")).unwrap();
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| 16 ") || l.starts_with("| 32 "))
        .collect();
    assert_eq!(rows.len(), 4, "{table}");
    for r in &rows {
        // four losses (inside, last eighth, 1-2C, 2-4C), all finite and near or below ln(256)
        let losses: Vec<f64> = r
            .split('|')
            .skip(4)
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        assert_eq!(losses.len(), 4, "{r}");
        assert!(losses.iter().all(|l| l.is_finite() && *l < 6.0), "{r}");
    }
    assert!(
        std::fs::metadata(out.join("context_scaling.png"))
            .unwrap()
            .len()
            > 10_000
    );
    // each run was evaluated at 4× its training context
    let csv = std::fs::read_to_string(out.join("ctx32/conformal/eval_ctx128.csv")).unwrap();
    assert!(csv.lines().last().unwrap().starts_with("124,128,"), "{csv}");
    // a second call trains nothing and reuses the evaluations: the same table
    let ck = out.join("ctx16/softmax/checkpoint.safetensors");
    let before = std::fs::metadata(&ck).unwrap().modified().unwrap();
    let o = sympow(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.matches("already trained").count(), 4, "{stdout}");
    assert_eq!(std::fs::metadata(&ck).unwrap().modified().unwrap(), before);
    assert_eq!(
        std::fs::read_to_string(out.join("context_scaling.md")).unwrap(),
        table
    );
    // an unknown variant is a named error
    let mut bad = args.to_vec();
    bad[9] = "softmax,nope";
    assert_error(&sympow(&bad), "unknown variant \"nope\"");

    // the report over two copies of the experiment (a second seed's, here every bucket's loss
    // 0.2 higher): each loss is their mean ± standard deviation, 0.1 higher ± 0.2/√2
    let out2 = tmp.path().join("cs-seed2");
    let csvs = [
        "ctx16/softmax/eval_ctx64.csv",
        "ctx16/conformal/eval_ctx64.csv",
    ]
    .into_iter()
    .chain([
        "ctx32/softmax/eval_ctx128.csv",
        "ctx32/conformal/eval_ctx128.csv",
    ]);
    for rel in csvs {
        let mut b = sympow::eval::read_csv(&out.join(rel)).unwrap();
        b.iter_mut().for_each(|b| b.loss += 0.2);
        std::fs::create_dir_all(out2.join(rel).parent().unwrap()).unwrap();
        sympow::eval::write_csv(&out2.join(rel), &b).unwrap();
    }
    let mean_out = tmp.path().join("cs-mean");
    let runs = format!("{},{}", out.display(), out2.display());
    let mut report = args.to_vec();
    report[5] = mean_out.to_str().unwrap();
    report.extend(["--report-only", "--runs", &runs]);
    let o = sympow(&report);
    assert!(o.status.success(), "{}", stderr(&o));
    let mean_table = std::fs::read_to_string(mean_out.join("context_scaling.md")).unwrap();
    let cells = |line: &str| -> Vec<String> {
        line.split('|')
            .skip(4)
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect()
    };
    let mean_rows: Vec<&str> = mean_table
        .lines()
        .filter(|l| l.starts_with("| 16 ") || l.starts_with("| 32 "))
        .collect();
    assert_eq!(mean_rows.len(), rows.len(), "{mean_table}");
    for (one, two) in rows.iter().zip(&mean_rows) {
        for (x, cell) in cells(one).iter().zip(cells(two)) {
            let (m, s) = cell.split_once(" ± ").expect(&cell);
            let (x, m, s): (f64, f64, f64) =
                (x.parse().unwrap(), m.parse().unwrap(), s.parse().unwrap());
            assert!((m - (x + 0.1)).abs() < 1e-3, "{one} / {two}");
            assert!((s - 0.2 / 2f64.sqrt()).abs() < 1e-3, "{one} / {two}");
        }
    }
    assert!(mean_table.contains("mean ± standard deviation of 2 runs"));
    assert!(mean_out.join("context_scaling.png").exists());
    // runs evaluated on other position buckets are not the same experiment
    let rel = "ctx32/conformal/eval_ctx128.csv";
    let mut b = sympow::eval::read_csv(&out2.join(rel)).unwrap();
    b.pop();
    sympow::eval::write_csv(&out2.join(rel), &b).unwrap();
    assert_error(&sympow(&report), "position buckets differ");
}

#[test]
fn data_prepare_reads_a_source_archive_and_stats_summarises_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    // f0, f3: varied code; f1: too short; f2: one line repeated (a generated table)
    let varied = |n: usize| -> String {
        (0..n)
            .map(|j| format!("int v{j} = {};\n", (j * 7919 + 13) % 10007 * (j % 7 + 1)))
            .collect()
    };
    let docs = [
        varied(20),
        "int x;\n".to_string(),
        "{ 0x00, 0x00 },\n".repeat(200),
        varied(60),
    ];
    for (i, text) in docs.iter().enumerate() {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("src/f{i}.c"), text.as_bytes())
            .unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "src/blob.bin", &b"\0\x01\x02\x03"[..])
        .unwrap();
    let tarball = tmp.path().join("src.tar");
    std::fs::write(&tarball, b.into_inner().unwrap()).unwrap();
    let shards = tmp.path().join("shards");
    let o = sympow(&[
        "data",
        "prepare",
        tarball.to_str().unwrap(),
        "--out",
        shards.to_str().unwrap(),
        "--min-bytes",
        "200",
        "--max-deflate-ratio",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("2 documents"), "{stdout}");
    assert!(
        stdout.contains(
            "left out: 1 documents under --min-bytes, 1 over --max-deflate-ratio, 1 archive members by name, 0 not UTF-8"
        ),
        "{stdout}"
    );
    let o = sympow(&["data", "stats", shards.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains(": 2 documents"), "{stdout}");
    assert!(stdout.contains("≥   1024 tokens:"), "{stdout}");
}

#[test]
fn recall_probe_trains_each_variant_and_scores_every_cell() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("recall");
    let args = [
        "--threads",
        "2",
        "experiment",
        "recall",
        "--out",
        out.to_str().unwrap(),
        "--context",
        "40",
        "--pairs",
        "2,8",
        "--gaps",
        "0,4",
        "--train-rows",
        "64",
        "--sequences",
        "3",
        "--variants",
        "softmax,conformal",
        "--set",
        "model.width=16",
        "--set",
        "model.layers=1",
        "--set",
        "model.heads=2",
        "--set",
        "model.head_dim=8",
        "--set",
        "model.chunk=8",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.eval_every=0",
        "--steps",
        "2",
        "--no-progress",
    ];
    let o = sympow(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    // 2 variants × 2 pair counts × 2 gaps; 8 pairs and a gap of 4 fit (4·8 + 4 ≤ 41)
    let csv = std::fs::read_to_string(out.join("recall.csv")).unwrap();
    let cells: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(cells.len(), 8, "{csv}");
    for c in &cells {
        let rate: f64 = c[3].parse().unwrap();
        let loss: f64 = c[4].parse().unwrap();
        assert!(
            (0.0..=1.0).contains(&rate) && loss.is_finite() && loss > 0.0,
            "{c:?}"
        );
    }
    assert!(std::fs::read_to_string(out.join("recall.md"))
        .unwrap()
        .contains("| conformal | 8 |"));
    // the training data is real MQAR rows in LongCrawl64's layout
    let npy = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "npy"))
        .expect("rows file");
    assert!(std::fs::metadata(&npy).unwrap().len() > 64 * 41 * 2);
    // too many pairs for the context is a named error
    let mut bad = args.to_vec();
    bad[9] = "2,11";
    assert_error(&sympow(&bad), "too short for 11 pairs");
}

#[test]
fn recall_probe_measures_a_softmax_model_that_learnt_one_pair() {
    // trained on the answers only, a 2-layer softmax model learns to recall one key-value pair
    // (100 % on the development machine after 1500 steps, ~20 s on 2 cores): the probe scores
    // real recall, not only the absence of it
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("recall");
    let o = sympow(&[
        "--threads",
        "2",
        "experiment",
        "recall",
        "--out",
        out.to_str().unwrap(),
        "--context",
        "16",
        "--pairs",
        "1,2",
        "--gaps",
        "0,4",
        "--train-rows",
        "20000",
        "--steps",
        "1500",
        "--set",
        "train.batch_size=32",
        "--set",
        "train.eval_every=0",
        "--set",
        "model.width=64",
        "--set",
        "model.layers=2",
        "--set",
        "model.heads=2",
        "--set",
        "model.head_dim=32",
        "--variants",
        "softmax",
        "--sequences",
        "64",
        "--no-progress",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read_dir(&out).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".mask.npy")));
    let csv = std::fs::read_to_string(out.join("recall.csv")).unwrap();
    for gap in ["0", "4"] {
        let row = csv
            .lines()
            .find(|l| l.starts_with(&format!("softmax,1,{gap},")))
            .unwrap_or_else(|| panic!("{csv}"));
        let rate: f64 = row.split(',').nth(3).unwrap().parse().unwrap();
        assert!(rate >= 0.9, "one pair recalled {rate} at gap {gap}: {csv}");
    }
}

#[test]
fn bench_train_prints_a_row_per_variant_and_context() {
    let o = sympow(
        &[
            &["--cpu", "bench", "train"][..],
            SMALL_MODEL,
            &[
                "--variants",
                "softmax,conformal",
                "--context",
                "16,32",
                "--tokens",
                "64",
                "--reps",
                "1",
            ],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for (variant, context, batch) in [
        ("softmax", 16, 4),
        ("conformal", 16, 4),
        ("softmax", 32, 2),
        ("conformal", 32, 2),
    ] {
        let row = out
            .lines()
            .find(|l| {
                let f: Vec<&str> = l.split('|').map(str::trim).collect();
                f.len() == 6
                    && f[0] == variant
                    && f[1] == context.to_string()
                    && f[2] == batch.to_string()
            })
            .unwrap_or_else(|| panic!("no row for {variant} at {context}:\n{out}"));
        let tokens_per_s: f64 = row.split('|').nth(4).unwrap().trim().parse().unwrap();
        assert!(tokens_per_s > 0.0, "{row}");
    }
    assert_error(
        &sympow(&[
            "--cpu",
            "bench",
            "train",
            "--variants",
            "softmax",
            "--profile",
        ]),
        "--profile",
    );
    assert_error(
        &sympow(&["--cpu", "bench", "train", "--variants", "flash"]),
        "unknown variant",
    );
}

/// `bench decode` times a row per variant, batch and context, reports the state's memory
/// (the same at every context for sympow, growing with it for softmax), and skips softmax rows
/// whose cache would pass --softmax-max-cached.
#[test]
fn bench_decode_prints_a_row_per_variant_batch_and_context() {
    let o = sympow(
        &[
            &["--cpu", "bench", "decode"][..],
            SMALL_MODEL,
            &[
                "--context",
                "16,32",
                "--batch",
                "1,2",
                "--reps",
                "2",
                "--softmax-max-cached",
                "32",
            ],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let row = |att: &str, batch: usize, ctx: usize| -> Vec<String> {
        out.lines()
            .map(|l| {
                l.split('|')
                    .map(|f| f.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .find(|f| {
                f.len() >= 4 && f[0] == att && f[1] == batch.to_string() && f[2] == ctx.to_string()
            })
            .unwrap_or_else(|| panic!("no row for {att}, batch {batch}, context {ctx}:\n{out}"))
    };
    let mib = |r: &[String]| -> f64 {
        let (x, unit) = r[7].split_once(' ').unwrap();
        let scale = match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            _ => panic!("unit {unit}"),
        };
        x.parse::<f64>().unwrap() * scale / (1024.0 * 1024.0)
    };
    for batch in [1, 2] {
        let (a, b) = (row("conformal", batch, 16), row("conformal", batch, 32));
        assert!(a[5].parse::<f64>().unwrap() > 0.0, "{a:?}");
        assert_eq!(
            mib(&a),
            mib(&b),
            "a sympow state does not grow with the context"
        );
    }
    assert!(mib(&row("conformal", 2, 16)) > 1.9 * mib(&row("conformal", 1, 16)));
    assert!(mib(&row("softmax", 1, 32)) > mib(&row("softmax", 1, 16)));
    assert!(
        row("softmax", 2, 32)[3].starts_with("skipped"),
        "64 cached tokens > 32"
    );
    assert_eq!(row("conformal", 1, 16)[8], "recurrent");
    assert_eq!(row("softmax", 1, 16)[8], "kv-cache");
    // conformal asked to decode from a KV cache: its memory grows with the context
    let o = sympow(
        &[
            &["--cpu", "bench", "decode"][..],
            SMALL_MODEL,
            &[
                "--variants",
                "conformal",
                "--decode",
                "kv-cache",
                "--context",
                "16,32",
                "--reps",
                "2",
            ],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let cached: Vec<Vec<String>> = out
        .lines()
        .filter(|l| l.starts_with(" conformal"))
        .map(|l| l.split('|').map(|f| f.trim().to_string()).collect())
        .collect();
    assert_eq!(cached.len(), 2, "{out}");
    assert!(cached.iter().all(|r| r[8] == "kv-cache"), "{out}");
    assert!(mib(&cached[1]) > mib(&cached[0]), "{out}");
    assert_error(
        &sympow(&["--cpu", "bench", "decode", "--decode", "recurrent"]),
        "no recurrent state",
    );
    assert_error(
        &sympow(&["--cpu", "bench", "decode", "--batch", "0"]),
        "--batch",
    );
    assert_error(
        &sympow(&["--cpu", "bench", "decode", "--profile"]),
        "--profile",
    );
}
