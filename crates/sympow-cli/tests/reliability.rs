//! Reliability: a run survives SIGKILL at random moments, write failures leave the previous
//! checkpoint intact, and divergence stops the run with a message saying where.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sympow"))
}

/// A small run: `steps` steps, a checkpoint after every step (so kills often land in writes).
fn train_args(out: &Path, steps: u64, resume: bool) -> Vec<String> {
    let mut a: Vec<String> = ["--threads", "2", "train", "--out"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(out.display().to_string());
    if resume {
        a.push("--resume".into());
    } else {
        for kv in [
            "model.width=16",
            "model.layers=2",
            "model.heads=2",
            "model.head_dim=8",
            "data.context=32",
            "train.batch_size=4",
            "train.eval_batches=1",
            "train.eval_every=7",
            "train.checkpoint_every=1",
            "train.warmup_steps=5",
        ] {
            a.push("--set".into());
            a.push(kv.into());
        }
    }
    a.extend(["--steps".into(), steps.to_string(), "--no-progress".into()]);
    a
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// ≥ 20 SIGKILLs at random moments (including during checkpoint writes): after every one the
/// last checkpoint loads, and the run, resumed each time, ends with exactly the losses of an
/// uninterrupted run.
#[test]
fn sigkill_at_random_moments_never_loses_the_run() {
    let seed = sympow::testing::test_seed("sigkill");
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let tmp = tempfile::tempdir().unwrap();
    let (reference, killed) = (tmp.path().join("reference"), tmp.path().join("killed"));
    let steps = 1000;
    let o = bin()
        .args(train_args(&reference, steps, false))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let (mut trials, mut during_write, mut no_checkpoint_yet, mut finished) = (0, 0, 0, false);
    while trials < 20 {
        let resume = killed.join("config.toml").exists();
        let mut child = bin()
            .args(train_args(&killed, steps, resume))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30 + next() % 400));
        if child.try_wait().unwrap().is_some() {
            finished = true; // it reached the end before the kill
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        trials += 1;
        if killed.join("checkpoint.safetensors.tmp").exists() {
            during_write += 1;
        }
        match sympow::checkpoint::load(&killed.join("checkpoint.safetensors")) {
            Ok(ck) => assert!(ck.step <= steps),
            Err(sympow::checkpoint::CheckpointError::Missing(_)) => no_checkpoint_yet += 1,
            Err(e) => panic!("after kill {trials}: {e}"),
        }
    }
    assert!(trials >= 20 || finished, "only {trials} kills");
    assert!(
        trials >= 20,
        "the run finished after {trials} kills: lengthen it"
    );
    if !finished {
        let o = bin()
            .args(train_args(&killed, steps, true))
            .output()
            .unwrap();
        assert!(o.status.success(), "final resume: {}", stderr(&o));
    }
    eprintln!(
        "{trials} SIGKILLs: {during_write} left a partial checkpoint.safetensors.tmp, {no_checkpoint_yet} came before the first checkpoint; every last checkpoint loaded"
    );
    assert_eq!(
        sympow::testing::metrics_without_timing(&killed),
        sympow::testing::metrics_without_timing(&reference),
        "the killed-and-resumed run differs"
    );
}

/// A checkpoint write that fails (file size limit, an unwritable temporary path) is a clear
/// error, and the previous checkpoint is untouched.
#[test]
fn failed_checkpoint_writes_keep_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = bin().args(train_args(&run, 3, false)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = run.join("checkpoint.safetensors");
    let before = std::fs::read(&ck).unwrap();

    // 1. the file-size limit (as a full disk or quota would): writes fail with EFBIG
    let args = train_args(&run, 6, true).join(" ");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 40; exec {} {args}",
            env!("CARGO_BIN_EXE_sympow")
        ))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.starts_with("error:")
            && e.contains("checkpoint.safetensors")
            && e.to_lowercase().contains("too large"),
        "{e}"
    );
    assert!(
        std::fs::read(&ck).unwrap() == before,
        "the previous checkpoint changed"
    );
    assert!(
        !run.join("checkpoint.safetensors.tmp").exists(),
        "a partial file was left behind"
    );

    // 2. the temporary file cannot be created
    std::fs::create_dir(run.join("checkpoint.safetensors.tmp")).unwrap();
    let o = bin().args(train_args(&run, 6, true)).output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("checkpoint.safetensors"),
        "{}",
        stderr(&o)
    );
    assert!(
        std::fs::read(&ck).unwrap() == before,
        "the previous checkpoint changed"
    );
    std::fs::remove_dir(run.join("checkpoint.safetensors.tmp")).unwrap();
    // and once the trouble is gone the run continues
    let o = bin().args(train_args(&run, 6, true)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A run whose loss goes non-finite skips those steps, then stops after `max_bad_steps` in a
/// row, naming where it went wrong; its last checkpoint is finite and loads.
#[test]
fn divergence_stops_with_the_place_and_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = train_args(&run, 50, false);
    args.extend(
        [
            "--set",
            "train.lr=1e38",
            "--set",
            "train.max_bad_steps=3",
            "--set",
            "train.grad_clip=0",
        ]
        .map(String::from),
    );
    let o = bin().args(&args).output().unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(
        e.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{e}"
    );
    assert!(
        e.contains("training diverged")
            && e.contains("4 consecutive steps")
            && e.contains("blocks.0"),
        "{e}"
    );
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.matches("\"skipped\":true").count(), 4);
    let ck = sympow::checkpoint::load(&run.join("checkpoint.safetensors")).unwrap();
    assert!(ck.params.iter().flatten().all(|x| x.is_finite()));
    assert!(
        e.contains(&format!("last good checkpoint is step {}", ck.step)),
        "{e}"
    );
}
