//! The training loop.
//!
//! AdamW with linear warm-up and cosine decay, global-norm gradient clipping, gradient
//! accumulation, periodic validation, metrics as JSONL, checkpoints written atomically, and
//! exact resumption: the data windows, dropout masks and learning rate are pure functions of
//! (seed, step), and the checkpoint holds the parameters and both AdamW moments, so a resumed
//! run computes exactly what the uninterrupted one would have (same thread count).

use crate::backend::Backend;
use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::config::{Config, TrainConfig};
use crate::data::{DataError, Split, TokenData};
use crate::model::{layout, DropoutCtx, Model, Params};
use crate::ops::adamw::{AdamWConfig, AdamWParam};
use crate::ops::cross_entropy::IGNORE;
use crate::Float;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Why a run stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Data could not be loaded.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The output directory holds another run.
    #[error("{0} already holds a run (checkpoint or metrics); pass --resume to continue it, or choose another --out")]
    RunExists(String),
    /// The config differs from the checkpoint's.
    #[error("--resume: {0}")]
    ConfigMismatch(String),
    /// Too many consecutive non-finite steps.
    #[error("training diverged: {bad} consecutive steps with non-finite {what} (first at step {first}, in {tensor}); the last good checkpoint is step {last_good} in {dir}")]
    Diverged {
        /// Consecutive bad steps.
        bad: u64,
        /// "loss" or "gradients".
        what: String,
        /// First bad step of the streak.
        first: u64,
        /// Where: the first parameter whose gradient was non-finite.
        tensor: String,
        /// The last checkpoint written.
        last_good: u64,
        /// The run directory.
        dir: String,
    },
    /// Writing metrics or plots failed.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        err: String,
    },
}

/// How to run.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Run directory (checkpoint, config, metrics, plot).
    pub out: PathBuf,
    /// Continue the run in `out` from its checkpoint.
    pub resume: bool,
    /// Stop after this many steps in this invocation (writing a checkpoint), e.g. to fit a
    /// scheduler's time limit; `--resume` continues.
    pub stop_after: Option<u64>,
    /// Set (by a Ctrl-C handler) to stop after the current step, with a checkpoint.
    pub interrupt: Arc<AtomicBool>,
    /// Draw a progress bar on stderr (otherwise print a line per validation).
    pub progress: bool,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Completed steps (in total, across resumptions).
    pub step: u64,
    /// Mean training loss of the last step.
    pub train_loss: f64,
    /// Last validation loss.
    pub val_loss: Option<f64>,
    /// The unigram baseline (nats/token) on the validation split.
    pub unigram: f64,
    /// Stopped by the interrupt flag or `stop_after` before the configured steps.
    pub stopped_early: bool,
    /// Training throughput of this invocation.
    pub tokens_per_second: f64,
    /// Skipped (non-finite) steps.
    pub skipped_steps: u64,
}

/// Paths inside a run directory.
pub struct RunPaths {
    /// `checkpoint.safetensors`.
    pub checkpoint: PathBuf,
    /// `config.toml`.
    pub config: PathBuf,
    /// `metrics.jsonl`.
    pub metrics: PathBuf,
    /// `loss.png`.
    pub plot: PathBuf,
}

impl RunPaths {
    /// The files of the run in `dir`.
    pub fn new(dir: &Path) -> Self {
        RunPaths {
            checkpoint: dir.join("checkpoint.safetensors"),
            config: dir.join("config.toml"),
            metrics: dir.join("metrics.jsonl"),
            plot: dir.join("loss.png"),
        }
    }
}

/// How ranks of a data-parallel run combine their work. Each rank trains a replica on its
/// share of every step's micro-batches (micro-batch i goes to rank i mod world); `all_reduce`
/// sums a tensor over the ranks in place, so after it every replica holds the global gradient
/// and takes the same optimizer step. Rank 0 alone writes checkpoints, metrics and plots.
pub trait GradSync<B: Backend>: Sync {
    /// This process's rank.
    fn rank(&self) -> usize {
        0
    }
    /// Number of ranks.
    fn world(&self) -> usize {
        1
    }
    /// Sums `t` over the ranks, in place (a no-op for one rank).
    fn all_reduce(&self, _backend: &B, _t: &mut B::Tensor) {}
}

/// A single process: nothing to combine.
pub struct SingleRank;

impl<B: Backend> GradSync<B> for SingleRank {}

/// Sums a scalar over the ranks.
fn reduce_scalar<B: Backend>(backend: &B, sync: &dyn GradSync<B>, x: f64) -> f64 {
    let mut t = backend.upload(&[B::Scalar::of(x)]);
    sync.all_reduce(backend, &mut t);
    backend.download(&t)[0].f64()
}

/// Learning rate at `step` (0-based): linear warm-up to `lr`, then cosine to `lr·min_lr_ratio`.
pub fn learning_rate(t: &TrainConfig, step: u64) -> f64 {
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let span = t.steps.saturating_sub(t.warmup_steps).max(1) as f64;
    let progress = ((step - t.warmup_steps) as f64 / span).min(1.0);
    let min = t.lr * t.min_lr_ratio;
    min + 0.5 * (t.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.display().to_string(),
        err: e.to_string(),
    }
}

/// Mean loss over the validation windows (tokens with a target).
pub fn validation_loss<B: Backend>(
    model: &Model<B>,
    windows: &[crate::data::loader::Batch],
    batch: usize,
    context: usize,
) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for group in windows.chunks(batch) {
        let ids: Vec<u32> = group.iter().flat_map(|b| b.ids.iter().copied()).collect();
        let targets: Vec<u32> = group
            .iter()
            .flat_map(|b| b.targets.iter().copied())
            .collect();
        let tr = model.forward(&ids, Some(&targets), group.len(), context, None);
        let losses = model.backend.download(tr.losses.as_ref().unwrap());
        for (l, &t) in losses.iter().zip(&targets) {
            if t != IGNORE {
                sum += l.f64();
                n += 1;
            }
        }
    }
    sum / n.max(1) as f64
}

/// The checkpoint of a model and its optimizer.
fn snapshot<B: Backend>(
    model: &Model<B>,
    m: &Params<B::Tensor>,
    v: &Params<B::Tensor>,
    step: u64,
    skipped: u64,
) -> Checkpoint {
    let dl = |p: &Params<B::Tensor>| -> Vec<Vec<f32>> {
        p.refs()
            .into_iter()
            .map(|t| {
                model
                    .backend
                    .download(t)
                    .into_iter()
                    .map(|x| x.f64() as f32)
                    .collect()
            })
            .collect()
    };
    Checkpoint {
        config: model.cfg.clone(),
        step,
        skipped_steps: skipped,
        params: dl(&model.params),
        moments: Some((dl(m), dl(v))),
    }
}

fn upload_params<B: Backend>(backend: &B, cfg: &Config, tensors: &[Vec<f32>]) -> Params<B::Tensor> {
    let up: Vec<B::Tensor> = tensors
        .iter()
        .map(|t| {
            backend.upload(
                &t.iter()
                    .map(|&x| B::Scalar::of(x as f64))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    Params::from_vec(cfg, up)
}

/// Loads a run's model (weights only) from its directory.
pub fn load_model<B: Backend>(backend: B, dir: &Path) -> Result<Model<B>, CheckpointError> {
    let ck = checkpoint::load(&RunPaths::new(dir).checkpoint)?;
    let params = upload_params(&backend, &ck.config, &ck.params);
    Ok(Model::from_params(backend, &ck.config, params))
}

/// Keeps only the metric lines of steps ≤ `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: u64) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    checkpoint::write_atomic(path, kept.as_bytes()).map_err(|e| io_err(path, e))
}

/// Draws the loss curves of a run from its metrics file.
pub fn plot_metrics(metrics: &Path, out: &Path, title: &str) -> Result<(), TrainError> {
    let text = std::fs::read_to_string(metrics).map_err(|e| io_err(metrics, e))?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(|x| x.as_f64()) {
            train.push((step, l));
        }
        if let Some(l) = v.get("val_loss").and_then(|x| x.as_f64()) {
            val.push((step, l));
        }
    }
    let series = vec![
        crate::plot::Series {
            label: "train".into(),
            points: train,
        },
        crate::plot::Series {
            label: "validation".into(),
            points: val,
        },
    ];
    crate::plot::line_plot(out, title, "step", "loss (nats/token)", &series, false)
        .map_err(|e| io_err(out, e))
}

/// Trains (or resumes) the run described by `cfg` into `opts.out`.
pub fn train<B: Backend>(
    backend: B,
    cfg: &Config,
    opts: &TrainOptions,
) -> Result<TrainSummary, TrainError> {
    train_with(backend, cfg, opts, &SingleRank)
}

/// [`train`] as one rank of a data-parallel run (see [`GradSync`]).
pub fn train_with<B: Backend>(
    backend: B,
    cfg: &Config,
    opts: &TrainOptions,
    sync: &dyn GradSync<B>,
) -> Result<TrainSummary, TrainError> {
    let (rank, world) = (sync.rank(), sync.world());
    let lead = rank == 0;
    if !cfg.train.grad_accum.is_multiple_of(world) {
        return Err(TrainError::ConfigMismatch(format!(
            "train.grad_accum = {} must be a multiple of the {world} ranks (each rank takes grad_accum/{world} micro-batches per step)",
            cfg.train.grad_accum
        )));
    }
    let paths = RunPaths::new(&opts.out);
    std::fs::create_dir_all(&opts.out).map_err(|e| io_err(&opts.out, e))?;
    let resumed = if opts.resume && !paths.checkpoint.exists() && paths.config.exists() {
        // killed before its first checkpoint: nothing to lose, start over with the same config
        let theirs =
            Config::load(&paths.config).map_err(|e| TrainError::ConfigMismatch(e.to_string()))?;
        if theirs.model != cfg.model || theirs.data != cfg.data {
            return Err(TrainError::ConfigMismatch(format!(
                "the config differs from {}",
                paths.config.display()
            )));
        }
        let _ = std::fs::remove_file(&paths.metrics);
        None
    } else if opts.resume {
        let ck = checkpoint::load(&paths.checkpoint)?;
        let mut theirs = ck.config.clone();
        theirs.train.steps = cfg.train.steps;
        if theirs != *cfg {
            return Err(TrainError::ConfigMismatch(format!(
                "the config differs from the checkpoint's in {} (only train.steps may change)",
                paths.checkpoint.display()
            )));
        }
        Some(ck)
    } else {
        if lead && (paths.checkpoint.exists() || paths.metrics.exists()) {
            return Err(TrainError::RunExists(opts.out.display().to_string()));
        }
        None
    };
    let data = TokenData::load(&cfg.data)?;
    let unigram = data.unigram_baseline(cfg.model.vocab_size);
    let (t, b) = (cfg.data.context, cfg.train.batch_size);
    let val_windows = data.eval_windows(t, cfg.train.eval_batches * b);

    let (mut model, mut m, mut v, start, mut skipped) = match &resumed {
        Some(ck) => {
            let params = upload_params(&backend, cfg, &ck.params);
            let model = Model::from_params(backend, cfg, params);
            let (cm, cv) = ck
                .moments
                .as_ref()
                .ok_or_else(|| CheckpointError::Corrupt {
                    path: paths.checkpoint.display().to_string(),
                    why: "no optimizer state to resume from".into(),
                })?;
            let (m, v) = (
                upload_params(&model.backend, cfg, cm),
                upload_params(&model.backend, cfg, cv),
            );
            if lead {
                truncate_metrics(&paths.metrics, ck.step)?;
            }
            (model, m, v, ck.step, ck.skipped_steps)
        }
        None => {
            let model = Model::init(backend, cfg, cfg.train.seed);
            let (m, v) = (model.zeros_like(), model.zeros_like());
            if lead {
                checkpoint::write_atomic(&paths.config, cfg.to_toml().as_bytes())
                    .map_err(|e| io_err(&paths.config, e))?;
            }
            (model, m, v, 0, 0)
        }
    };
    let decays: Vec<bool> = layout(cfg).iter().map(|i| i.decay).collect();
    let (train_docs, train_tokens) = data.stats(Split::Train);
    let (val_docs, val_tokens) = data.stats(Split::Val);
    if lead {
        println!(
            "model: {} parameters, {:?} attention, {}{}; {}",
            model.num_params(),
            cfg.model.attention,
            model.backend.name(),
            if world > 1 {
                format!(" × {world} ranks")
            } else {
                String::new()
            },
            crate::inference::decoding_memory(cfg)
        );
        println!(
        "data: {train_docs} training documents ({train_tokens} tokens), {val_docs} validation ({val_tokens}); unigram baseline {unigram:.4} nats/token"
    );
    }
    // only rank 0 writes metrics
    let mut metrics = if lead {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&paths.metrics)
                .map_err(|e| io_err(&paths.metrics, e))?,
        )
    } else {
        None
    };
    let mut log = |line: serde_json::Value| -> Result<(), TrainError> {
        let Some(metrics) = metrics.as_mut() else {
            return Ok(());
        };
        writeln!(metrics, "{line}")
            .and_then(|_| metrics.flush())
            .map_err(|e| io_err(&paths.metrics, e))
    };
    let bar = if opts.progress && lead {
        indicatif::ProgressBar::new(cfg.train.steps)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(start);

    let be_step =
        |model: &Model<B>, step: u64, grads: &mut Params<B::Tensor>| -> (f64, Option<String>) {
            // one optimizer step's forward/backward over all micro-batches; returns the mean loss
            // and, if it is not finite, where the forward pass first went non-finite
            let mut loss = 0.0;
            // this rank's share of the step's micro-batches
            for micro in (rank as u64..cfg.train.grad_accum as u64).step_by(world) {
                let batch = data.batch(cfg.train.seed, step, micro, b, t);
                let valid = batch
                    .targets
                    .iter()
                    .filter(|&&x| x != IGNORE)
                    .count()
                    .max(1);
                let scale = 1.0 / (valid * cfg.train.grad_accum) as f64;
                let dloss: Vec<B::Scalar> = batch
                    .targets
                    .iter()
                    .map(|&x| B::Scalar::of(if x == IGNORE { 0.0 } else { scale }))
                    .collect();
                let drop = DropoutCtx {
                    seed: cfg.train.seed ^ (step << 20) ^ micro ^ 0xD50,
                };
                let tr = model.forward(&batch.ids, Some(&batch.targets), b, t, Some(drop));
                let losses = model.backend.download(tr.losses.as_ref().unwrap());
                loss += losses.iter().map(|x| x.f64()).sum::<f64>() * scale;
                if !loss.is_finite() {
                    return (
                        loss,
                        Some(
                            model
                                .locate_non_finite(&tr)
                                .unwrap_or_else(|| "the loss".into()),
                        ),
                    );
                }
                let dl = model.backend.upload(&dloss);
                model.backward(&tr, &dl, grads);
            }
            (loss, None)
        };

    let t0 = Instant::now();
    let mut step = start;
    let (mut last_loss, mut last_val) = (f64::NAN, None);
    let mut bad_streak = 0u64;
    let mut bad_first = (0u64, String::new(), String::new());
    let mut last_ckpt = start;
    let mut stopped_early = false;
    // one set of gradient buffers for the whole run, zeroed at each step's start
    let mut grads = model.zeros_like();
    while step < cfg.train.steps {
        model.backend.zero_all(&mut grads.refs_mut());
        let (mut loss, loss_site) = be_step(&model, step, &mut grads);
        if world > 1 {
            for g in grads.refs_mut() {
                sync.all_reduce(&model.backend, g);
            }
            loss = reduce_scalar(&model.backend, sync, loss);
        }
        let norms: Vec<f64> = model.backend.sum_squares_each(&grads.refs());
        let gnorm = norms.iter().sum::<f64>().sqrt();
        if !loss.is_finite() || !gnorm.is_finite() {
            let names = layout(cfg);
            let tensor = match loss_site {
                Some(site) => site,
                None => norms
                    .iter()
                    .position(|n| !n.is_finite())
                    .map_or("the loss".to_string(), |i| {
                        format!("the gradient of {}", names[i].name)
                    }),
            };
            let what = if loss.is_finite() {
                "gradients"
            } else {
                "loss"
            };
            if bad_streak == 0 {
                bad_first = (step + 1, what.to_string(), tensor.clone());
            }
            bad_streak += 1;
            skipped += 1;
            log(
                serde_json::json!({"step": step + 1, "skipped": true, "non_finite": what, "tensor": tensor}),
            )?;
            if bad_streak > cfg.train.max_bad_steps {
                bar.abandon();
                return Err(TrainError::Diverged {
                    bad: bad_streak,
                    what: bad_first.1,
                    first: bad_first.0,
                    tensor: bad_first.2,
                    last_good: last_ckpt,
                    dir: opts.out.display().to_string(),
                });
            }
            step += 1;
            continue;
        }
        bad_streak = 0;
        let lr = learning_rate(&cfg.train, step);
        let clip = if cfg.train.grad_clip > 0.0 && gnorm > cfg.train.grad_clip {
            cfg.train.grad_clip / gnorm
        } else {
            1.0
        };
        let tc = &cfg.train;
        let mut params = AdamWParam::zip(
            model.params.refs_mut(),
            grads.refs(),
            m.refs_mut(),
            v.refs_mut(),
            |i| AdamWConfig {
                lr,
                beta1: tc.beta1,
                beta2: tc.beta2,
                eps: tc.adam_eps,
                weight_decay: if decays[i] { tc.weight_decay } else { 0.0 },
            },
        );
        model.backend.adamw_step(step + 1, clip, &mut params);
        drop(params);
        step += 1;
        last_loss = loss;
        let elapsed = t0.elapsed().as_secs_f64();
        let tokens = (step - start) as f64 * (b * t * cfg.train.grad_accum) as f64;
        log(
            serde_json::json!({"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_second": tokens / elapsed}),
        )?;
        let is_last = step == cfg.train.steps;
        if lead && ((cfg.train.eval_every > 0 && step % cfg.train.eval_every == 0) || is_last) {
            let vl = validation_loss(&model, &val_windows, b, t);
            last_val = Some(vl);
            log(serde_json::json!({"step": step, "val_loss": vl}))?;
            if !opts.progress {
                eprintln!(
                    "step {step}/{}: loss {loss:.4}, val {vl:.4}, {:.0} tokens/s",
                    cfg.train.steps,
                    tokens / elapsed
                );
            }
        }
        bar.set_position(step);
        bar.set_message(format!(
            "loss {loss:.4}{} {:.0} tok/s",
            last_val.map_or(String::new(), |v| format!(" val {v:.4}")),
            tokens / elapsed
        ));
        let local_stop = opts.interrupt.load(Ordering::SeqCst)
            || opts.stop_after.is_some_and(|n| step - start >= n);
        // every rank must stop at the same step, or the others wait forever in all_reduce
        let interrupted = if world > 1 {
            reduce_scalar(&model.backend, sync, f64::from(u8::from(local_stop))) > 0.0
        } else {
            local_stop
        };
        let due = interrupted
            || is_last
            || (cfg.train.checkpoint_every > 0 && step % cfg.train.checkpoint_every == 0);
        // a checkpoint is only ever written from finite parameters: "the last checkpoint" is
        // always a good one to resume from
        if lead && due {
            if model.params_finite() {
                checkpoint::save(&paths.checkpoint, &snapshot(&model, &m, &v, step, skipped))?;
                last_ckpt = step;
            } else {
                log(
                    serde_json::json!({"step": step, "checkpoint_skipped": "non-finite parameters"}),
                )?;
            }
        }
        if interrupted && !is_last {
            stopped_early = true;
            break;
        }
    }
    bar.finish_and_clear();
    if lead
        && !stopped_early
        && step == cfg.train.steps
        && last_ckpt != step
        && model.params_finite()
    {
        checkpoint::save(&paths.checkpoint, &snapshot(&model, &m, &v, step, skipped))?;
    }
    let title = format!(
        "{:?} attention, {} parameters",
        cfg.model.attention,
        model.num_params()
    );
    if lead {
        plot_metrics(&paths.metrics, &paths.plot, &title)?;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    Ok(TrainSummary {
        step,
        train_loss: last_loss,
        val_loss: last_val,
        unigram,
        stopped_early,
        tokens_per_second: (step - start) as f64 * (b * t * cfg.train.grad_accum) as f64
            / elapsed.max(1e-9),
        skipped_steps: skipped,
    })
}
