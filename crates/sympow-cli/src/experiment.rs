//! `sympow experiment`: the paper's experiments — context scaling (SPEC §8) and a recall probe.
//!
//! **context-scaling.**
//!
//! Every variant is trained at every training context C on the same number of tokens per
//! step (the batch shrinks as C grows), then evaluated on validation windows of
//! `eval_factor`·C tokens: the loss by position shows both how well a model uses its training
//! context and what happens beyond it. Runs live in `out/ctx<C>/<variant>`; a finished run is
//! not retrained, an interrupted one resumes, an evaluation newer than its checkpoint is
//! reused — so the experiment can be spread over several time-limited calls. The report alone
//! (`--report-only`) can also be made over several copies of the experiment (`--runs`: other
//! seeds), each loss then a mean ± standard deviation.

use crate::{interrupt_flag, run_train, ConfigArgs, Variant, VARIANTS};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use sympow::backend::{Backend, CpuBackend};
use sympow::data::TokenData;
use sympow::eval::Bucket;
use sympow::plot::{Panel, Series};
use sympow::train::{self, RunPaths};

/// Arguments of `sympow experiment context-scaling`.
#[derive(clap::Args)]
pub(crate) struct ContextScaling {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Training contexts.
    #[arg(long, value_delimiter = ',', default_values_t = vec![256, 1024])]
    contexts: Vec<usize>,
    /// Variants (names of `sympow compare`).
    #[arg(long, value_delimiter = ',', default_values_t = ["softmax", "sympow-p2", "sympow-gated", "conformal"].map(String::from).to_vec())]
    variants: Vec<String>,
    /// Tokens per optimizer step at every context (default: the config's batch × context).
    #[arg(long)]
    tokens_per_step: Option<usize>,
    /// Evaluation context as a multiple of the training context.
    #[arg(long, default_value_t = 4)]
    eval_factor: usize,
    /// Validation windows averaged per evaluation.
    #[arg(long, default_value_t = 32)]
    eval_windows: usize,
    /// Position buckets per training context.
    #[arg(long, default_value_t = 8)]
    buckets: usize,
    /// Parent directory of the runs, the table and the figure.
    #[arg(long, default_value = "runs/context-scaling")]
    out: PathBuf,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
    /// Train and evaluate nothing: build the table and figure from the evaluations already in
    /// --out (e.g. runs made on other machines, checkpoints left behind).
    #[arg(long)]
    report_only: bool,
    /// With --report-only: the experiment's run directories (each a --out of the same
    /// experiment, e.g. one per seed) to report on instead of --out's own. With more than one,
    /// each loss in the table is their mean ± standard deviation and the figure draws the mean
    /// curves; the report goes to --out.
    #[arg(long, value_delimiter = ',', requires = "report_only")]
    runs: Vec<PathBuf>,
}

/// One variant at one training context: its evaluation in each run of the experiment (one,
/// unless `--runs` names several).
struct Row {
    context: usize,
    variant: String,
    params: usize,
    curves: Vec<Vec<Bucket>>,
}

impl Row {
    /// Each run's token-weighted mean loss over positions [from, to).
    fn means(&self, from: usize, to: usize) -> Vec<f64> {
        self.curves
            .iter()
            .map(|curve| {
                let (s, n) = curve
                    .iter()
                    .filter(|b| b.start >= from && b.end <= to && b.tokens > 0)
                    .fold((0.0, 0u64), |(s, n), b| {
                        (s + b.loss * b.tokens as f64, n + b.tokens)
                    });
                if n == 0 {
                    f64::NAN
                } else {
                    s / n as f64
                }
            })
            .collect()
    }

    /// A table cell over [from, to): the loss of a single run, or the runs' mean ± their
    /// (sample) standard deviation.
    fn cell(&self, from: usize, to: usize) -> String {
        let xs = self.means(from, to);
        if xs.len() == 1 {
            return format!("{:.4}", xs[0]);
        }
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        format!("{mean:.3} ± {:.3}", var.sqrt())
    }

    /// The runs' curves averaged bucket by bucket (they share their buckets: the same
    /// evaluation set-up).
    fn mean_curve(&self) -> Vec<(f64, f64)> {
        let n = self.curves.len() as f64;
        (0..self.curves[0].len())
            .map(|i| {
                let b = &self.curves[0][i];
                let loss = self.curves.iter().map(|c| c[i].loss).sum::<f64>() / n;
                ((b.start + b.end) as f64 / 2.0, loss)
            })
            .collect()
    }
}

pub(crate) fn context_scaling<B: Backend>(make: &dyn Fn() -> B, a: &ContextScaling) -> Result<i32> {
    let base = a.cfg.build()?;
    if a.contexts.is_empty() || a.contexts.contains(&0) {
        bail!("--contexts: give one or more positive training contexts");
    }
    if a.eval_factor == 0 {
        bail!("--eval-factor must be at least 1");
    }
    let variants = find_variants(&a.variants)?;
    let tokens_per_step = a
        .tokens_per_step
        .unwrap_or(base.train.batch_size * base.data.context);
    let flag = interrupt_flag();
    let data = if a.report_only {
        None
    } else {
        Some(TokenData::load(&base.data)?)
    };
    let unigram = data
        .as_ref()
        .map(|d| format!("{:.4}", d.unigram_baseline(base.model.vocab_size)));
    // the run directories reported on: --runs, or --out itself
    let runs = if a.runs.is_empty() {
        vec![a.out.clone()]
    } else {
        a.runs.clone()
    };
    let mut rows = Vec::new();
    for &context in &a.contexts {
        for (name, overrides) in &variants {
            let mut cfg = base.clone();
            for (k, v) in *overrides {
                cfg.set(k, v).with_context(|| format!("variant {name}"))?;
            }
            cfg.data.context = context;
            cfg.train.batch_size = (tokens_per_step / context).max(1);
            cfg.validate()
                .with_context(|| format!("variant {name} at context {context}"))?;
            // the run's directory and evaluation, relative to the experiment's directory
            let run = Path::new(&format!("ctx{context}")).join(name);
            let eval_ctx = a.eval_factor * context;
            let csv_name = format!("eval_ctx{eval_ctx}.csv");
            let dir = a.out.join(&run);
            let csv = dir.join(&csv_name);
            println!("== {name}, training context {context}");
            if a.report_only {
                let csvs: Vec<PathBuf> =
                    runs.iter().map(|r| r.join(&run).join(&csv_name)).collect();
                let curves = csvs
                    .iter()
                    .map(|p| sympow::eval::read_csv(p).map_err(anyhow::Error::msg))
                    .collect::<Result<Vec<_>>>()?;
                let layout = |c: &[Bucket]| c.iter().map(|b| (b.start, b.end)).collect::<Vec<_>>();
                if let Some(i) = curves.iter().position(|c| layout(c) != layout(&curves[0])) {
                    bail!(
                        "{} and {}: the evaluations' position buckets differ (not the same experiment)",
                        csvs[0].display(),
                        csvs[i].display()
                    );
                }
                let params =
                    sympow::model::Model::init(CpuBackend::<f32>::new(), &cfg, 0).num_params();
                rows.push(Row {
                    context,
                    variant: name.to_string(),
                    params,
                    curves,
                });
                continue;
            }
            if !train_unless_done(make, &cfg, &dir, !a.no_progress, &flag)? {
                return Ok(130);
            }
            let model = train::load_model(make(), &dir)?;
            let curve = match fresh_eval(&csv, &dir) {
                Some(c) => c,
                None => {
                    let c = sympow::eval::loss_by_position(
                        &model,
                        data.as_ref().expect("loaded unless --report-only"),
                        eval_ctx,
                        a.eval_windows,
                        (tokens_per_step / eval_ctx).max(1),
                        a.buckets * a.eval_factor,
                    );
                    sympow::eval::write_csv(&csv, &c)?;
                    c
                }
            };
            rows.push(Row {
                context,
                variant: name.to_string(),
                params: model.num_params(),
                curves: vec![curve],
            });
        }
    }
    std::fs::create_dir_all(&a.out)?;
    let table = table(&rows, a.eval_factor);
    let over = if runs.len() > 1 {
        format!(
            "; each loss the mean ± standard deviation of {} runs ({})",
            runs.len(),
            runs.iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        String::new()
    };
    let text = format!(
        "{table}\n{} optimizer steps of {tokens_per_step} tokens per run; loss in nats/token on {} validation windows of {}× the training context{}{over}.\n",
        base.train.steps,
        a.eval_windows,
        a.eval_factor,
        unigram.map_or(String::new(), |u| format!("; unigram baseline {u}"))
    );
    print!("\n{text}");
    sympow::checkpoint::write_atomic(&a.out.join("context_scaling.md"), text.as_bytes())?;
    let png = a.out.join("context_scaling.png");
    figure(&png, &rows, &a.contexts)?;
    println!(
        "wrote {} and {}",
        a.out.join("context_scaling.md").display(),
        png.display()
    );
    Ok(0)
}

/// Trains `cfg` into `dir` unless `dir` already holds a finished run of exactly `cfg`; an
/// unfinished one resumes. `Ok(false)`: interrupted (Ctrl-C), with a checkpoint to resume from.
pub(crate) fn train_unless_done<B: Backend>(
    make: &dyn Fn() -> B,
    cfg: &sympow::config::Config,
    dir: &Path,
    progress: bool,
    flag: &Arc<AtomicBool>,
) -> Result<bool> {
    let paths = RunPaths::new(dir);
    let done = sympow::checkpoint::load(&paths.checkpoint)
        .is_ok_and(|c| c.step >= cfg.train.steps && c.config == *cfg);
    if done {
        println!("already trained: {}", dir.display());
        return Ok(true);
    }
    let resume = paths.checkpoint.exists();
    let s = run_train(make(), cfg, dir, resume, None, progress, flag.clone())?;
    Ok(!s.stopped_early)
}

/// The evaluation in `csv`, if it was written after the run's checkpoint.
fn fresh_eval(csv: &Path, dir: &Path) -> Option<Vec<Bucket>> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let (e, c) = (modified(csv)?, modified(&RunPaths::new(dir).checkpoint)?);
    (e >= c).then(|| sympow::eval::read_csv(csv).ok()).flatten()
}

/// The markdown table: mean loss inside the training context C, in its last eighth, and in
/// each doubling beyond it.
fn table(rows: &[Row], eval_factor: usize) -> String {
    let mut beyond = Vec::new();
    let mut f = 1;
    while f < eval_factor {
        let g = (2 * f).min(eval_factor);
        beyond.push((f, g));
        f = g;
    }
    let mut head = String::from(
        "| training context C | variant | parameters | loss in [0, C) | in the last C/8 |",
    );
    let mut rule = String::from("|---|---|---|---|---|");
    for (f, g) in &beyond {
        head.push_str(&format!(" in [{f}C, {g}C) |"));
        rule.push_str("---|");
    }
    let mut s = format!("{head}\n{rule}\n");
    for r in rows {
        let c = r.context;
        s.push_str(&format!(
            "| {c} | {} | {} | {} | {} |",
            r.variant,
            r.params,
            r.cell(0, c),
            r.cell(c - c / 8, c)
        ));
        for (f, g) in &beyond {
            s.push_str(&format!(" {} |", r.cell(f * c, g * c)));
        }
        s.push('\n');
    }
    s
}

/// One panel per training context: loss against position, one line per variant (the runs'
/// mean), a dashed line at the training context.
fn figure(path: &Path, rows: &[Row], contexts: &[usize]) -> Result<()> {
    let panels: Vec<Panel> = contexts
        .iter()
        .map(|&c| Panel {
            title: format!("trained at context {c}"),
            marker: Some(c as f64),
            series: rows
                .iter()
                .filter(|r| r.context == c)
                .map(|r| Series {
                    label: r.variant.clone(),
                    points: r.mean_curve(),
                })
                .collect(),
        })
        .collect();
    sympow::plot::panels_plot(
        path,
        "position in context (tokens)",
        "loss (nats/token)",
        &panels,
    )
    .map_err(anyhow::Error::msg)
}

/// Arguments of `sympow experiment recall`.
#[derive(clap::Args)]
pub(crate) struct Recall {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Sequence length (training context).
    #[arg(long, default_value_t = 256)]
    context: usize,
    /// Training sequences (written once to `<out>/recall_rows_*.npy`).
    #[arg(long, default_value_t = 20_000)]
    train_rows: usize,
    /// Numbers of key–value pairs (trained on all of them, scored on each).
    #[arg(long, value_delimiter = ',', default_values_t = vec![4, 8, 16, 32])]
    pairs: Vec<usize>,
    /// Gaps (filler tokens between the pairs and the queries) scored.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0, 64, 128])]
    gaps: Vec<usize>,
    /// Variants (names of `sympow compare`).
    #[arg(long, value_delimiter = ',', default_values_t = ["softmax", "sympow-p2", "sympow-gated", "conformal"].map(String::from).to_vec())]
    variants: Vec<String>,
    /// Train on every token (`all`) or on the queried values only (`answers`, the usual MQAR
    /// set-up: a `.mask.npy` loss mask beside the rows).
    #[arg(long, default_value = "answers", value_parser = ["answers", "all"])]
    loss_on: String,
    /// Fresh sequences scored per (pairs, gap).
    #[arg(long, default_value_t = 64)]
    sequences: usize,
    /// Parent directory of the runs, the data and the table.
    #[arg(long, default_value = "runs/recall")]
    out: PathBuf,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
}

pub(crate) fn recall<B: Backend>(make: &dyn Fn() -> B, a: &Recall) -> Result<i32> {
    use sympow::recall;
    let mut base = a.cfg.build()?;
    let max_pairs = a.pairs.iter().copied().max().unwrap_or(0);
    if a.pairs.is_empty() || a.pairs.contains(&0) || max_pairs > recall::KEYS.len() {
        bail!("--pairs: give pair counts from 1 to {}", recall::KEYS.len());
    }
    if 4 * max_pairs > a.context {
        bail!(
            "--context {} is too short for {max_pairs} pairs (needs at least {})",
            a.context,
            4 * max_pairs
        );
    }
    let variants = find_variants(&a.variants)?;
    std::fs::create_dir_all(&a.out)?;
    let len = a.context + 1;
    // named by what it holds, so other flags write (and train on) other data
    let pairs: Vec<String> = a.pairs.iter().map(usize::to_string).collect();
    let rows_path = a.out.join(format!(
        "recall_rows_{}x{len}_pairs{}_seed{}_loss-on-{}.npy",
        a.train_rows,
        pairs.join("-"),
        base.train.seed,
        a.loss_on
    ));
    if !rows_path.exists() {
        let (rows, mask) = recall::training_rows(base.train.seed, a.train_rows, len, &a.pairs);
        if a.loss_on == "answers" {
            let mask_path = rows_path.with_extension("mask.npy");
            sympow::data::rows::write_npy_u16(&mask_path, a.train_rows, len, &mask)?;
        }
        sympow::data::rows::write_npy_u16(&rows_path, a.train_rows, len, &rows)?;
    }
    base.set_all(&[
        ("data.tokenizer", "bytes"),
        ("model.vocab_size", "256"),
        ("data.corpus", &rows_path.display().to_string()),
        ("data.context", &a.context.to_string()),
    ])?;
    let flag = interrupt_flag();
    let mut table = String::from("| variant | pairs |");
    let mut rule = String::from("|---|---|");
    for g in &a.gaps {
        table.push_str(&format!(" gap {g} |"));
        rule.push_str("---|");
    }
    table = format!("{table}\n{rule}\n");
    let mut csv = String::from("variant,pairs,gap,recalled,loss\n");
    let mut panels: Vec<Panel> = a
        .gaps
        .iter()
        .map(|g| Panel {
            title: format!("gap {g}"),
            series: vec![],
            marker: None,
        })
        .collect();
    for (name, overrides) in &variants {
        let mut cfg = base.clone();
        for (k, v) in *overrides {
            cfg.set(k, v).with_context(|| format!("variant {name}"))?;
        }
        cfg.validate().with_context(|| format!("variant {name}"))?;
        let dir = a.out.join(name);
        println!("== {name}");
        if !train_unless_done(make, &cfg, &dir, !a.no_progress, &flag)? {
            return Ok(130);
        }
        let model = train::load_model(make(), &dir)?;
        let mut by_gap: Vec<Vec<(f64, f64)>> = vec![vec![]; a.gaps.len()];
        for &p in &a.pairs {
            table.push_str(&format!("| {name} | {p} |"));
            for (gi, &g) in a.gaps.iter().enumerate() {
                if 4 * p + g > len {
                    table.push_str(" – |");
                    continue;
                }
                let (rate, loss) = recall::recall_rate(&model, p, g, a.context, a.sequences, 7);
                table.push_str(&format!(" {:.1} % |", 100.0 * rate));
                csv.push_str(&format!("{name},{p},{g},{rate:.4},{loss:.4}\n"));
                by_gap[gi].push((p as f64, 100.0 * rate));
            }
            table.push('\n');
        }
        for (panel, points) in panels.iter_mut().zip(by_gap) {
            panel.series.push(Series {
                label: name.to_string(),
                points,
            });
        }
        // the scores so far, in case a later variant is interrupted
        sympow::checkpoint::write_atomic(&a.out.join("recall.csv"), csv.as_bytes())?;
    }
    let text = format!(
        "{table}\nPairs recalled (the model gives the right value more than half its probability), {} fresh sequences of {} tokens per cell; trained on {} sequences with {:?} pairs and any gap that fits, {} steps.\n",
        a.sequences, a.context, a.train_rows, a.pairs, base.train.steps
    );
    print!("\n{text}");
    sympow::checkpoint::write_atomic(&a.out.join("recall.md"), text.as_bytes())?;
    sympow::checkpoint::write_atomic(&a.out.join("recall.csv"), csv.as_bytes())?;
    let png = a.out.join("recall.png");
    sympow::plot::panels_plot(&png, "key-value pairs", "recalled (%)", &panels)
        .map_err(anyhow::Error::msg)?;
    println!(
        "wrote {}, recall.csv and {}",
        a.out.join("recall.md").display(),
        png.display()
    );
    Ok(0)
}

/// The named variants of `sympow compare`, or an error naming the unknown one.
pub(crate) fn find_variants(names: &[String]) -> Result<Vec<Variant>> {
    names
        .iter()
        .map(|v| {
            VARIANTS
                .iter()
                .find(|(n, _)| n == v)
                .copied()
                .with_context(|| {
                    let known: Vec<&str> = VARIANTS.iter().map(|(n, _)| *n).collect();
                    format!(
                        "--variants: unknown variant {v:?} (known: {})",
                        known.join(", ")
                    )
                })
        })
        .collect()
}
