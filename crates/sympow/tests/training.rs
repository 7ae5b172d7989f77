//! Training end to end on the embedded corpus: a resumed run reproduces the uninterrupted one,
//! and a small model learns (beats the unigram baseline).

mod common;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use sympow::backend::CpuBackend;
use sympow::config::Config;
use sympow::train::{train, RunPaths, TrainOptions};

fn small(steps: u64, attention: &str) -> Config {
    let mut c = Config::preset("tiny").unwrap();
    for (k, v) in [
        ("model.attention", attention),
        ("model.width", "32"),
        ("model.layers", "2"),
        ("model.heads", "2"),
        ("model.head_dim", "16"),
        ("model.chunk", "16"),
        ("data.context", "64"),
        ("train.batch_size", "8"),
        ("train.steps", &steps.to_string()),
        ("train.warmup_steps", "10"),
        ("train.eval_every", "5"),
        ("train.eval_batches", "2"),
        ("train.checkpoint_every", "0"),
        ("model.dropout", "0.1"),
        ("train.grad_accum", "2"),
    ] {
        c.set(k, v).unwrap();
    }
    c
}

fn opts(out: &std::path::Path, resume: bool, stop_after: Option<u64>) -> TrainOptions {
    TrainOptions {
        out: out.to_path_buf(),
        resume,
        stop_after,
        interrupt: Arc::new(AtomicBool::new(false)),
        progress: false,
    }
}

fn losses(dir: &std::path::Path) -> Vec<String> {
    sympow::testing::metrics_without_timing(dir)
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let cfg = small(12, "conformal");
    train(CpuBackend::<f32>::new(), &cfg, &opts(&a, false, None)).unwrap();
    // stopped after 7 steps (mid-way between validations), then resumed to the end
    let s = train(CpuBackend::<f32>::new(), &cfg, &opts(&b, false, Some(7))).unwrap();
    assert!(s.stopped_early && s.step == 7);
    let partial = losses(&b);
    train(CpuBackend::<f32>::new(), &cfg, &opts(&b, true, None)).unwrap();
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 12 + 3, "12 training lines and 3 validation lines");
    assert_eq!(
        la, lb,
        "resumed metrics differ from the uninterrupted run's"
    );
    assert_eq!(&la[..partial.len()], &partial[..]);
    // and the final weights and optimizer state are bit-identical
    let (ca, cb) = (RunPaths::new(&a).checkpoint, RunPaths::new(&b).checkpoint);
    assert_eq!(
        sympow::checkpoint::load(&ca).unwrap(),
        sympow::checkpoint::load(&cb).unwrap()
    );
    // a run directory is never trained over without --resume
    let err = train(CpuBackend::<f32>::new(), &cfg, &opts(&a, false, None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already holds a run"), "{err}");
    // and --resume refuses a different model
    let mut other = cfg.clone();
    other.set("model.layers", "3").unwrap();
    let err = train(CpuBackend::<f32>::new(), &other, &opts(&a, true, None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("differs"), "{err}");
}

#[test]
fn a_small_model_beats_the_unigram_baseline() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = small(300, "conformal");
    cfg.set("train.lr", "0.004").unwrap();
    cfg.set("model.dropout", "0.0").unwrap();
    cfg.set("train.eval_every", "0").unwrap();
    cfg.set("train.eval_batches", "8").unwrap();
    let s = train(
        CpuBackend::<f32>::new(),
        &cfg,
        &opts(tmp.path(), false, None),
    )
    .unwrap();
    let val = s.val_loss.unwrap();
    eprintln!("validation loss {val:.4} vs unigram {:.4}", s.unigram);
    assert!(
        val < s.unigram - 0.5,
        "validation loss {val:.4} is not clearly below the unigram baseline {:.4}",
        s.unigram
    );
    assert!(RunPaths::new(tmp.path()).plot.exists());
}

/// An in-process all-reduce between threads, for testing the data-parallel logic on the CPU
/// (the product uses NCCL on GPUs). Sums in rank order, so every rank gets the same bits.
struct ThreadSync {
    rank: usize,
    world: usize,
    barrier: Arc<std::sync::Barrier>,
    slots: Arc<std::sync::Mutex<Vec<Vec<f32>>>>,
}

impl sympow::train::GradSync<CpuBackend<f32>> for ThreadSync {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce(&self, _be: &CpuBackend<f32>, t: &mut Vec<f32>) {
        self.slots.lock().unwrap()[self.rank] = t.clone();
        self.barrier.wait();
        let sum: Vec<f32> = {
            let s = self.slots.lock().unwrap();
            (0..t.len()).map(|i| s.iter().map(|v| v[i]).sum()).collect()
        };
        self.barrier.wait();
        *t = sum;
    }
}

/// Two data-parallel ranks (each taking one of the step's two micro-batches) train the same
/// model as one rank accumulating both; and a run resumes on a different number of ranks.
#[test]
fn two_ranks_match_one_rank_with_the_same_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let mut cfg = small(10, "conformal");
    cfg.set("model.dropout", "0.0").unwrap();
    train(CpuBackend::<f32>::new(), &cfg, &opts(&one, false, None)).unwrap();
    let world = 2;
    let barrier = Arc::new(std::sync::Barrier::new(world));
    let slots = Arc::new(std::sync::Mutex::new(vec![Vec::new(); world]));
    std::thread::scope(|s| {
        for rank in 0..world {
            let sync = ThreadSync {
                rank,
                world,
                barrier: barrier.clone(),
                slots: slots.clone(),
            };
            let (cfg, two) = (&cfg, &two);
            s.spawn(move || {
                sympow::train::train_with(
                    CpuBackend::<f32>::new(),
                    cfg,
                    &opts(two, false, Some(6)),
                    &sync,
                )
                .unwrap()
            });
        }
    });
    // resumed on one rank to the end
    train(CpuBackend::<f32>::new(), &cfg, &opts(&two, true, None)).unwrap();
    let parse = |d: &std::path::Path| -> Vec<(u64, f64)> {
        losses(d)
            .iter()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                Some((
                    v["step"].as_u64()?,
                    v.get("loss").or(v.get("val_loss"))?.as_f64()?,
                ))
            })
            .collect()
    };
    let (a, b) = (parse(&one), parse(&two));
    assert_eq!(a.len(), b.len());
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        // the same sums in another order: equal to f32 rounding
        assert!(
            (la - lb).abs() < 1e-4 * la.abs(),
            "step {sa}: one rank {la}, two ranks {lb}"
        );
    }
}
