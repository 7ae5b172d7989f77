//! `sympow`: train, evaluate, sample from and benchmark conformal-sympow transformers.

mod experiment;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use sympow::backend::{Backend, CpuBackend};
use sympow::config::{Config, TokenizerKind};
use sympow::data::prepare::PrepareOptions;
use sympow::data::{TokenData, Tokenizer};
use sympow::model::Model;
use sympow::train::{self, RunPaths, TrainOptions};

#[derive(Parser)]
#[command(
    name = "sympow",
    version,
    about = "Conformal symmetric-power transformers: train, evaluate, generate, benchmark"
)]
struct Cli {
    /// Worker threads (default: all cores). Runs with the same config, seed and thread count
    /// are bit-identical.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Run on the CPU even when this build has CUDA and a GPU is present.
    #[arg(long, global = true)]
    cpu: bool,
    /// On the GPU, how the matrix products of the linear layers and the LM head run: bf16
    /// operands with f32 accumulation (as PyTorch's bf16 autocast; weights and optimizer state
    /// stay f32, the MLP's hidden layer is kept in bf16), f32 operands on TF32 tensor cores
    /// (10-bit mantissa, f32 accumulation; about half the bf16 rate), or full f32 (about an
    /// eighth of the TF32 rate).
    #[arg(long, global = true, default_value = "bf16", value_parser = ["bf16", "tf32", "f32"])]
    matmul: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Built-in preset: tiny, small, gpt2-124m (default tiny).
    #[arg(long)]
    preset: Option<String>,
    /// TOML config file (see `sympow config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a field, e.g. --set model.attention=sympow --set train.lr=1e-3.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Shorthand for --set train.steps=N.
    #[arg(long)]
    steps: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (default: the tiny conformal-sympow preset on the embedded corpus).
    Train {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Run directory (default runs/<preset>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out from its checkpoint (only --steps may change).
        #[arg(long)]
        resume: bool,
        /// Stop after this many steps (with a checkpoint); --resume continues.
        #[arg(long)]
        stop_after: Option<u64>,
        /// No progress bar; a line per validation instead.
        #[arg(long)]
        no_progress: bool,
        /// Data-parallel over this many GPUs of this host (NCCL); train.grad_accum must be a
        /// multiple of it. The global batch, and so the result, is that of one GPU.
        #[arg(long, default_value_t = 1)]
        gpus: usize,
    },
    /// Loss by context position on validation documents: CSV and PNG per run, and one plot
    /// with every run.
    Eval {
        /// Run directories (repeat to compare runs on one plot).
        #[arg(long = "run", required = true)]
        runs: Vec<PathBuf>,
        /// Evaluation context (default: each run's training context); may exceed it.
        #[arg(long)]
        context: Option<usize>,
        /// Validation windows to average.
        #[arg(long, default_value_t = 32)]
        windows: usize,
        /// Position buckets.
        #[arg(long, default_value_t = 32)]
        buckets: usize,
        /// Windows per forward pass.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// The combined plot (default: <first run>/eval_ctx<N>_runs.png).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Continue a prompt, streaming tokens as they are sampled.
    Generate {
        /// Run directory.
        #[arg(long)]
        run: PathBuf,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Softmax temperature (0: greedy).
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Keep the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling threshold (1: off).
        #[arg(long, default_value_t = 0.95)]
        top_p: f64,
        /// Continuations to sample, decoded together as one batch (sample i draws from random
        /// stream i of --seed: the first is what --samples 1 prints). One streams as it goes;
        /// several print when done.
        #[arg(long, default_value_t = 1)]
        samples: usize,
        /// How each layer holds the context: auto (sympow's recurrent state where it is no
        /// larger than a KV cache of 64k tokens — p = 2 — a KV cache otherwise, e.g. p = 4 at
        /// d = 64), recurrent, or kv-cache.
        #[arg(long, default_value_t = sympow::inference::DecodeForm::Auto)]
        decode: sympow::inference::DecodeForm,
    },
    /// Train the paper's variants at one size and print their validation losses side by side.
    Compare {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Parent directory of the runs (one sub-directory per variant).
        #[arg(long, default_value = "runs/compare")]
        out: PathBuf,
        /// No progress bars.
        #[arg(long)]
        no_progress: bool,
    },
    /// The paper's experiments.
    Experiment {
        #[command(subcommand)]
        what: ExperimentCommand,
    },
    /// Data preparation.
    Data {
        #[command(subcommand)]
        what: DataCommand,
    },
    /// Print a complete, commented config (a preset with overrides) as TOML.
    Config {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Benchmarks; each prints a table of ratios measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Report the compute device that would be used.
    Device,
    /// Check every CUDA op against the CPU op on the GPU, on fresh random inputs (forward,
    /// backward, and a whole model's gradients); exits non-zero on a mismatch. On Hopper the
    /// fused kernels' state products run on wgmma; with SYMPOW_NO_WGMMA=1 set, on the mma.sync
    /// forms other GPUs run (check both there).
    DeviceCheck {
        /// Seed of the random inputs (default: from the clock, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ExperimentCommand {
    /// Train softmax, sympow, sympow + gate and conformal-sympow at several training contexts,
    /// evaluate each at up to 4× its context, and write the loss-by-position figure (a panel
    /// per training context) and a table.
    ContextScaling(experiment::ContextScaling),
    /// Multi-query associative recall: train each variant on synthetic key–value sequences and
    /// measure how many pairs it retrieves as the number of pairs and the distance grow.
    Recall(experiment::Recall),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenise .txt/.md (one document per file) and .jsonl (field "text") files or
    /// directories, optionally gzipped, into token shards.
    /// Archives (.tar, .tar.gz, .tar.xz) are read member by member, e.g. the Linux source tree
    /// of Debian's linux-source-6.12 (see docs/DATA.md).
    Prepare {
        /// Input files or directories.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output directory for shard_*.tok.
        #[arg(long)]
        out: PathBuf,
        /// gpt2 or bytes.
        #[arg(long, default_value = "gpt2")]
        tokenizer: String,
        /// Tokens per shard.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: u64,
        /// Archive members kept: file-name endings (default: .c .h .S .rs .py .sh .pl .rst
        /// .txt .md).
        #[arg(long, value_delimiter = ',')]
        suffixes: Option<Vec<String>>,
        /// Archive members whose path contains this are left out (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
        /// Documents with fewer bytes of text are left out.
        #[arg(long, default_value_t = 1)]
        min_bytes: u64,
        /// Documents that DEFLATE compresses more than this many times are left out
        /// (generated tables; code and prose compress ≈ 3×).
        #[arg(long)]
        max_deflate_ratio: Option<f64>,
    },
    /// Documents, tokens and the document-length distribution of a directory of shards.
    Stats {
        /// Directory of shard_*.tok.
        dir: PathBuf,
    },
}

/// Arguments of `sympow bench attention`.
#[derive(clap::Args)]
struct AttentionBench {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1024, 4096, 16384, 65536])]
    time: Vec<usize>,
    /// Tokens per call (batch = tokens / T).
    #[arg(long, default_value_t = 65536)]
    tokens: usize,
    /// Heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Head dimension (32, 64 or 128 for the fused kernels).
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Chunk length of the fused kernels (multiple of 128, ≤ 4096).
    #[arg(long, default_value_t = sympow_cuda::DEFAULT_CHUNK)]
    chunk: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Longest T at which the naive O(T²) kernels are timed.
    #[arg(long, default_value_t = 4096)]
    naive_max_t: usize,
    /// Also write the timings as JSON lines here (read by bench/peers.py).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also print the fused kernels' per-stage times.
    #[arg(long)]
    stages: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Generation: prefill time, then the time of one decode step (a token for each sequence of
    /// a batch) and tokens/s after a prefill of each context length, conformal sympow
    /// (recurrent state) against softmax (KV cache) by default, random weights.
    Decode {
        /// Variants (as in `sympow compare`).
        #[arg(long, value_delimiter = ',', default_values_t = ["conformal".to_string(), "softmax".into()])]
        variants: Vec<String>,
        /// How sympow variants hold the context (as `generate --decode`): auto, recurrent or
        /// kv-cache. Softmax always decodes from a KV cache.
        #[arg(long, default_value_t = sympow::inference::DecodeForm::Auto)]
        decode: sympow::inference::DecodeForm,
        /// Context lengths (tokens prefilled before the timed steps).
        #[arg(long, value_delimiter = ',', default_values_t = vec![1024, 4096, 16384, 65536])]
        context: Vec<usize>,
        /// Timed decode steps per context (the median is reported).
        #[arg(long, default_value_t = 32)]
        reps: usize,
        /// Sequences decoded together (each continues the same prompt, prefilled once).
        #[arg(long, value_delimiter = ',', default_values_t = vec![1])]
        batch: Vec<usize>,
        /// Longest context at which softmax, or any variant decoded from a KV cache, is timed
        /// (softmax's prefill is quadratic: slow on a CPU beyond 16k; a GPU prefills 65536 in
        /// seconds).
        #[arg(long, default_value_t = 16384)]
        softmax_max: usize,
        /// Most tokens a KV cache holds over a batch (batch × context): its memory (gpt2-124m on
        /// a GPU: 72 KiB a token, 18 GiB at the default).
        #[arg(long, default_value_t = 262_144)]
        softmax_max_cached: usize,
        /// Also time each row's ops over --reps more steps (a GPU build on a GPU).
        #[arg(long)]
        profile: bool,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Training throughput: tokens/s of a training step (forward, backward, AdamW) per
    /// attention variant and context, on random tokens, on this machine's device.
    Train {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Variants (as in `sympow compare`).
        #[arg(long, value_delimiter = ',', default_values_t = ["softmax".to_string(), "sympow-gated".into(), "conformal".into()])]
        variants: Vec<String>,
        /// Training contexts (default: the config's data.context).
        #[arg(long, value_delimiter = ',')]
        context: Vec<usize>,
        /// Tokens per step; each context takes tokens / context sequences (default: the
        /// config's train.batch_size × data.context).
        #[arg(long)]
        tokens: Option<usize>,
        /// Timed steps per row after one warm-up (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Also print where each row's time goes, op by op (GPU builds).
        #[arg(long)]
        profile: bool,
        /// Also write the rows as JSON lines here (read by bench/train_peers.py).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Attention on the GPU: forward and forward+backward of the fused chunked sympow kernels
    /// against the naive quadratic GPU kernels (sympow and softmax), same tokens per call.
    Attention(AttentionBench),
    /// Attention forward on the CPU: time per token of the quadratic vs the chunked form.
    AttentionCpu {
        /// Sequence lengths.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1024, 4096, 16384])]
        time: Vec<usize>,
        /// Symmetric power.
        #[arg(long, default_value_t = 2)]
        p: u32,
        /// Head dimension.
        #[arg(long, default_value_t = 64)]
        head_dim: usize,
        /// Heads.
        #[arg(long, default_value_t = 2)]
        heads: usize,
        /// Chunk size.
        #[arg(long, default_value_t = 128)]
        chunk: usize,
        /// Repetitions (best is reported).
        #[arg(long, default_value_t = 2)]
        reps: usize,
    },
}

impl ConfigArgs {
    fn name(&self) -> String {
        match (&self.config, &self.preset) {
            (Some(p), _) => p
                .file_stem()
                .map_or("run".into(), |s| s.to_string_lossy().into_owned()),
            (None, Some(p)) => p.clone(),
            (None, None) => "tiny".into(),
        }
    }

    fn given(&self) -> bool {
        self.preset.is_some() || self.config.is_some() || !self.set.is_empty()
    }

    fn build(&self) -> Result<Config> {
        if self.preset.is_some() && self.config.is_some() {
            bail!("give --preset or --config, not both");
        }
        let mut cfg = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::preset(self.preset.as_deref().unwrap_or("tiny"))?,
        };
        let steps = self.steps.map(|s| s.to_string());
        let mut pairs = Vec::new();
        for kv in &self.set {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
            pairs.push((k.trim(), v.trim()));
        }
        if let Some(s) = &steps {
            pairs.push(("train.steps", s));
        }
        cfg.set_all(&pairs)?;
        Ok(cfg)
    }
}

fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to quit at once)");
    });
    flag
}

fn run_train<B: Backend>(
    backend: B,
    cfg: &Config,
    out: &Path,
    resume: bool,
    stop_after: Option<u64>,
    progress: bool,
    interrupt: Arc<AtomicBool>,
) -> Result<train::TrainSummary> {
    let opts = TrainOptions {
        out: out.to_path_buf(),
        resume,
        stop_after,
        interrupt,
        progress,
    };
    let s = train::train(backend, cfg, &opts)?;
    print_summary(&s, out);
    Ok(s)
}

fn print_summary(s: &train::TrainSummary, out: &Path) {
    let val = s.val_loss.map_or("-".into(), |v| format!("{v:.4}"));
    println!(
        "step {}: train loss {:.4}, validation loss {val} nats/token (unigram baseline {:.4}); {:.0} tokens/s{}",
        s.step,
        s.train_loss,
        s.unigram,
        s.tokens_per_second,
        if s.skipped_steps > 0 { format!("; {} non-finite steps skipped", s.skipped_steps) } else { String::new() }
    );
    println!(
        "run: {} (checkpoint.safetensors, metrics.jsonl, loss.png)",
        out.display()
    );
}

fn main() {
    let cli = Cli::parse();
    #[cfg(feature = "cuda")]
    sympow_cuda::set_default_matmul(cli.matmul.parse().expect("clap checked the value"));
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: --threads {n}: {e}");
            std::process::exit(2);
        }
    }
    #[cfg(feature = "cuda")]
    let result = match (cli.cpu, sympow_cuda::detect(0)) {
        (false, Ok(_)) => match sympow_cuda::CudaBackend::new(0) {
            Ok(_) => run(cli, &|| {
                sympow_cuda::CudaBackend::new(0).expect("the GPU opened a moment ago")
            }),
            Err(why) => {
                eprintln!("note: GPU found but unusable ({why}); using the CPU");
                run(cli, &CpuBackend::<f32>::new)
            }
        },
        _ => run(cli, &CpuBackend::<f32>::new),
    };
    #[cfg(not(feature = "cuda"))]
    let result = run(cli, &CpuBackend::<f32>::new);
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            std::process::exit(1);
        }
    }
}

/// Runs a command with backends made by `make` (one per model: the CPU, or a GPU).
fn run<B: Backend>(cli: Cli, make: &dyn Fn() -> B) -> Result<i32> {
    match cli.command {
        Command::Train {
            cfg: args,
            out,
            resume,
            stop_after,
            no_progress,
            gpus,
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from("runs").join(args.name()));
            let cfg = if resume {
                if args.given() {
                    bail!("--resume continues the run in --out with its own config; only --steps may be given");
                }
                let paths = RunPaths::new(&out);
                let mut c = if !paths.checkpoint.exists() && paths.config.exists() {
                    // killed before its first checkpoint: restart it from its config
                    Config::load(&paths.config)?
                } else {
                    sympow::checkpoint::load(&paths.checkpoint)?.config
                };
                if let Some(s) = args.steps {
                    c.set("train.steps", &s.to_string())?;
                }
                c
            } else {
                args.build()?
            };
            let flag = interrupt_flag();
            let opts = TrainOptions {
                out: out.clone(),
                resume,
                stop_after,
                interrupt: flag.clone(),
                progress: !no_progress,
            };
            let s = if gpus > 1 {
                train_data_parallel(&cfg, &opts, gpus)?
            } else {
                run_train(
                    make(),
                    &cfg,
                    &out,
                    resume,
                    stop_after,
                    !no_progress,
                    flag.clone(),
                )?
            };
            Ok(if flag.load(Ordering::SeqCst) && s.stopped_early {
                130
            } else {
                0
            })
        }
        Command::Eval {
            runs,
            context,
            windows,
            buckets,
            batch,
            plot,
        } => {
            let mut curves = Vec::new();
            let mut ctx_used = 0;
            for dir in &runs {
                let model = train::load_model(make(), dir)?;
                let ctx = context.unwrap_or(model.cfg.data.context);
                ctx_used = ctx;
                let data = TokenData::load(&model.cfg.data)?;
                let b = sympow::eval::loss_by_position(&model, &data, ctx, windows, batch, buckets);
                let csv = dir.join(format!("eval_ctx{ctx}.csv"));
                sympow::eval::write_csv(&csv, &b).with_context(|| csv.display().to_string())?;
                let label = format!(
                    "{} ({:?})",
                    dir.file_name().unwrap_or_default().to_string_lossy(),
                    model.cfg.model.attention
                );
                let png = dir.join(format!("eval_ctx{ctx}.png"));
                sympow::eval::plot(
                    &png,
                    &format!("{label}: loss by position, context {ctx}"),
                    &[(label.clone(), b.clone())],
                )
                .map_err(anyhow::Error::msg)?;
                let tokens: u64 = b.iter().map(|x| x.tokens).sum();
                let mean =
                    b.iter().map(|x| x.loss * x.tokens as f64).sum::<f64>() / tokens.max(1) as f64;
                println!("{label}: mean loss {mean:.4} over {tokens} tokens; by position (first, middle, last bucket): {:.4}, {:.4}, {:.4}", b[0].loss, b[b.len() / 2].loss, b[b.len() - 1].loss);
                println!("  wrote {} and {}", csv.display(), png.display());
                curves.push((label, b));
            }
            if runs.len() > 1 {
                let path =
                    plot.unwrap_or_else(|| runs[0].join(format!("eval_ctx{ctx_used}_runs.png")));
                sympow::eval::plot(
                    &path,
                    &format!("loss by position, context {ctx_used}"),
                    &curves,
                )
                .map_err(anyhow::Error::msg)?;
                println!("wrote {}", path.display());
            }
            Ok(0)
        }
        Command::Generate {
            run,
            prompt,
            max_tokens,
            seed,
            temperature,
            top_k,
            top_p,
            samples,
            decode,
        } => {
            if samples == 0 {
                bail!("--samples must be at least 1");
            }
            let model = train::load_model(make(), &run)?;
            let decode = decode
                .resolve(&model.cfg)
                .map_err(|e| anyhow::anyhow!("--decode {decode}: {e}"))?;
            let tok = Tokenizer::new(model.cfg.data.tokenizer);
            let ids = tok.encode(&prompt);
            if ids.is_empty() {
                bail!("--prompt is empty");
            }
            let sampling = sympow::inference::Sampling {
                temperature,
                top_k,
                top_p,
            };
            let mut out = std::io::stdout().lock();
            if samples == 1 {
                write!(out, "{prompt}")?;
                let mut stream = sympow::data::tokenizer::StreamDecoder::default();
                sympow::inference::generate(
                    &model,
                    &ids,
                    max_tokens,
                    &sampling,
                    decode,
                    seed,
                    |t| {
                        let bytes = tok.decode_bytes(&[t]).unwrap_or_default();
                        let _ = write!(out, "{}", stream.push(&bytes));
                        let _ = out.flush();
                    },
                );
                writeln!(out, "{}", stream.finish())?;
            } else {
                let prompts = vec![&ids[..]; samples];
                let outs = sympow::inference::generate_batch(
                    &model,
                    &prompts,
                    max_tokens,
                    &sampling,
                    decode,
                    seed,
                    |_, _| {},
                );
                for (i, toks) in outs.iter().enumerate() {
                    let text = String::from_utf8_lossy(&tok.decode_bytes(toks).unwrap_or_default())
                        .into_owned();
                    writeln!(out, "--- sample {} of {samples} ---\n{prompt}{text}", i + 1)?;
                }
            }
            Ok(0)
        }
        Command::Compare {
            cfg: args,
            out,
            no_progress,
        } => compare(make, &args, &out, !no_progress),
        Command::Experiment {
            what: ExperimentCommand::ContextScaling(a),
        } => experiment::context_scaling(make, &a),
        Command::Experiment {
            what: ExperimentCommand::Recall(a),
        } => experiment::recall(make, &a),
        Command::Data {
            what:
                DataCommand::Prepare {
                    inputs,
                    out,
                    tokenizer,
                    shard_tokens,
                    suffixes,
                    exclude,
                    min_bytes,
                    max_deflate_ratio,
                },
        } => {
            let kind = match tokenizer.as_str() {
                "gpt2" => TokenizerKind::Gpt2,
                "bytes" => TokenizerKind::Bytes,
                other => bail!("--tokenizer {other}: expected gpt2 or bytes"),
            };
            let mut opts = PrepareOptions::new(Tokenizer::new(kind));
            opts.shard_tokens = shard_tokens;
            if let Some(s) = suffixes {
                opts.filter.suffixes = s;
            }
            opts.filter.exclude = exclude;
            opts.min_bytes = min_bytes;
            opts.max_deflate_ratio = max_deflate_ratio;
            opts.progress = true;
            let s = sympow::data::prepare::prepare(&inputs, &out, &opts)?;
            println!(
                "{} documents, {} tokens from {:.1} MB of text in {:.1} s ({:.1} MB/s on {} threads) → {} shard(s) in {}",
                s.documents,
                s.tokens,
                s.bytes as f64 / 1e6,
                s.seconds,
                s.bytes as f64 / 1e6 / s.seconds.max(1e-9),
                rayon::current_num_threads(),
                s.shards.len(),
                out.display()
            );
            if s.short + s.repetitive + s.skipped.filtered + s.skipped.not_utf8 > 0 {
                println!(
                    "left out: {} documents under --min-bytes, {} over --max-deflate-ratio, {} archive members by name, {} not UTF-8",
                    s.short, s.repetitive, s.skipped.filtered, s.skipped.not_utf8
                );
            }
            println!("train on it with: sympow train --set data.corpus={:?} --set data.tokenizer={tokenizer}", out.display().to_string());
            Ok(0)
        }
        Command::Data {
            what: DataCommand::Stats { dir },
        } => {
            let mut len = sympow::data::shard::document_lengths(&dir)?;
            if len.is_empty() {
                bail!("{}: the shards hold no documents", dir.display());
            }
            len.sort_unstable();
            let tokens: u64 = len.iter().map(|&l| l as u64).sum();
            println!(
                "{}: {} documents, {} tokens",
                dir.display(),
                len.len(),
                tokens
            );
            let pct = |p: f64| len[((len.len() - 1) as f64 * p).round() as usize];
            println!(
                "document length (tokens): min {}  p10 {}  median {}  p90 {}  max {}",
                pct(0.0),
                pct(0.1),
                pct(0.5),
                pct(0.9),
                pct(1.0)
            );
            for at_least in [1024usize, 4096, 16384, 65536] {
                let n = len.iter().filter(|&&l| l >= at_least).count();
                let t: u64 = len
                    .iter()
                    .filter(|&&l| l >= at_least)
                    .map(|&l| l as u64)
                    .sum();
                println!(
                    "  ≥ {at_least:>6} tokens: {n:>7} documents, {:>5.1} % of tokens",
                    100.0 * t as f64 / tokens.max(1) as f64
                );
            }
            Ok(0)
        }
        Command::Config { cfg } => {
            print!("{}", cfg.build()?.to_documented_toml());
            Ok(0)
        }
        Command::Bench {
            what:
                BenchCommand::AttentionCpu {
                    time,
                    p,
                    head_dim,
                    heads,
                    chunk,
                    reps,
                },
        } => {
            sympow::attention::AttentionSpec::sympow(p, head_dim)?;
            println!("sympow attention forward, {}, p = {p}, d = {head_dim}, {heads} heads, chunk {chunk}, gated", CpuBackend::<f32>::new().name());
            let rows = sympow::bench::attention_cpu(&time, p, head_dim, heads, chunk, reps);
            print!("{}", sympow::bench::format_attention_table(&rows));
            Ok(0)
        }
        Command::Bench {
            what: BenchCommand::Attention(args),
        } => {
            if !args.chunk.is_multiple_of(128)
                || !(128..=sympow_cuda::MAX_CHUNK).contains(&args.chunk)
            {
                bail!(
                    "--chunk must be a multiple of 128 between 128 and {}, got {}",
                    sympow_cuda::MAX_CHUNK,
                    args.chunk
                );
            }
            if !sympow_cuda::FUSED_HEAD_DIMS.contains(&args.head_dim) {
                bail!(
                    "--head-dim must be 32, 64 or 128 for the fused kernels, got {}",
                    args.head_dim
                );
            }
            bench_attention_gpu(args)
        }
        Command::Bench {
            what:
                BenchCommand::Decode {
                    variants,
                    decode,
                    context,
                    reps,
                    batch,
                    softmax_max,
                    softmax_max_cached,
                    profile,
                    cfg,
                },
        } => {
            let c = cfg.build()?;
            if batch.contains(&0) || context.contains(&0) {
                bail!("--batch and --context take positive sizes");
            }
            let mut configs = Vec::new();
            for (name, ov) in experiment::find_variants(&variants)? {
                let mut v = c.clone();
                for (k, val) in ov {
                    v.set(k, val).with_context(|| format!("variant {name}"))?;
                }
                let form = decode
                    .resolve(&v)
                    .map_err(|e| anyhow::anyhow!("--decode {decode}, variant {name}: {e}"))?;
                configs.push((name.to_string(), v, form));
            }
            // the first model takes this backend (a GPU backend compiles its kernels when made)
            let first = make();
            if profile && !first.set_profiling(false) {
                bail!(
                    "--profile: {} cannot time its ops (a GPU build on a GPU can)",
                    first.name()
                );
            }
            println!(
                "decode on {}, preset {} ({} layers, {} heads × {}), random weights, median of {reps} steps (a step: one token per sequence)",
                first.name(),
                cfg.name(),
                c.model.layers,
                c.model.heads,
                c.model.head_dim
            );
            let mut spare = Some(first);
            let rows = sympow::bench::decode(
                &mut || spare.take().unwrap_or_else(make),
                &configs,
                &batch,
                &context,
                reps,
                softmax_max,
                softmax_max_cached,
                profile,
            );
            print!("{}", sympow::bench::format_decode_table(&rows));
            for r in &rows {
                if let Some((ops, total)) = &r.profile {
                    println!(
                        "\n{}, batch {}, context {}: {reps} steps, {:.1} ms synchronised\n{}",
                        r.variant,
                        r.batch,
                        r.context,
                        total * 1e3,
                        sympow::bench::format_profile(ops, *total)
                    );
                }
                if let Some((ops, total)) = &r.prefill_profile {
                    println!(
                        "\n{}, batch {}, context {}: one prefill, {:.1} ms synchronised\n{}",
                        r.variant,
                        r.batch,
                        r.context,
                        total * 1e3,
                        sympow::bench::format_profile(ops, *total)
                    );
                }
            }
            Ok(0)
        }
        Command::Bench {
            what:
                BenchCommand::Train {
                    cfg,
                    variants,
                    context,
                    tokens,
                    reps,
                    profile,
                    json,
                },
        } => {
            let rows = bench_train(make, &cfg, &variants, &context, tokens, reps, profile)?;
            if let Some(path) = json {
                let lines: Vec<String> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({"variant": r.attention, "context": r.context,
                            "batch": r.batch, "step_ms": r.step_ms,
                            "tokens_per_s": r.tokens_per_second()})
                        .to_string()
                    })
                    .collect();
                std::fs::write(&path, lines.join("\n") + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(0)
        }
        Command::DeviceCheck { seed } => device_check(seed),
        Command::Device => {
            match sympow_cuda::detect(0) {
                Ok(info) => println!(
                    "GPU {}: {} (compute {}.{}, {:.1} GiB)",
                    info.ordinal,
                    info.name,
                    info.compute_capability.0,
                    info.compute_capability.1,
                    info.memory_bytes as f64 / (1u64 << 30) as f64
                ),
                Err(why) => println!("CPU ({why})"),
            }
            Ok(0)
        }
    }
}

/// `--gpus N`: one thread per GPU, gradients all-reduced by NCCL; prints rank 0's summary.
#[cfg(feature = "cuda")]
fn train_data_parallel(
    cfg: &Config,
    opts: &TrainOptions,
    gpus: usize,
) -> Result<train::TrainSummary> {
    use sympow_cuda::{parallel::NcclSync, CudaBackend};
    let backends: Vec<CudaBackend> = (0..gpus).map(CudaBackend::new).collect::<Result<_, _>>()?;
    let syncs = NcclSync::for_backends(&backends)?;
    let results: Vec<Result<train::TrainSummary, train::TrainError>> = std::thread::scope(|s| {
        let handles: Vec<_> = backends
            .into_iter()
            .zip(&syncs)
            .map(|(be, sync)| {
                s.spawn(move || {
                    be.bind_to_thread().map_err(|e| train::TrainError::Io {
                        path: "GPU".into(),
                        err: e.to_string(),
                    })?;
                    train::train_with(be, cfg, opts, sync)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank's thread panicked"))
            .collect()
    });
    let mut results = results.into_iter();
    let s = results.next().expect("rank 0")?;
    for r in results {
        r?;
    }
    print_summary(&s, &opts.out);
    Ok(s)
}

#[cfg(not(feature = "cuda"))]
fn train_data_parallel(
    _cfg: &Config,
    _opts: &TrainOptions,
    gpus: usize,
) -> Result<train::TrainSummary> {
    bail!("--gpus {gpus}: this binary was built without the `cuda` feature (cargo build --release --features sympow-cli/cuda)")
}

#[cfg(feature = "cuda")]
fn device_check(seed: Option<u64>) -> Result<i32> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64)
    });
    let gpu = sympow_cuda::CudaBackend::new(0)?;
    println!("{} against the CPU backend, seed {seed}", gpu.name());
    if let Some(k) = gpu.fused_kernels() {
        // on Hopper, SYMPOW_NO_WGMMA=1 checks the mma.sync forms that other GPUs run
        println!(
            "fused sympow state products on {} (SYMPOW_NO_WGMMA=1 selects mma.sync on Hopper)",
            k.state_products(64)
        );
    }
    let rows = sympow_cuda::check::device_check(&gpu, seed);
    let mut failed = 0;
    for r in &rows {
        let ok = r.err <= r.tol;
        failed += usize::from(!ok);
        println!(
            "{:<52} rel err {:>9.2e}  (< {:.0e})  {}",
            r.what,
            r.err,
            r.tol,
            if ok { "ok" } else { "MISMATCH" }
        );
    }
    println!("{} passed, {failed} failed", rows.len() - failed);
    Ok(if failed == 0 { 0 } else { 1 })
}

#[cfg(feature = "cuda")]
fn bench_attention_gpu(a: AttentionBench) -> Result<i32> {
    let AttentionBench {
        time,
        tokens,
        heads,
        head_dim,
        chunk,
        reps,
        naive_max_t,
        json,
        stages,
    } = a;
    let gpu = sympow_cuda::CudaBackend::new(0)?;
    if let Err(e) = gpu.fused_attention_status() {
        bail!("the fused kernels are unavailable on this GPU: {e}");
    }
    gpu.set_attention_chunk(chunk);
    println!(
        "attention on {}: {tokens} tokens per call, {heads} heads, d = {head_dim}, chunk {chunk}, median of {reps}",
        gpu.name()
    );
    let rows =
        sympow_cuda::bench::attention_gpu(&gpu, &time, tokens, heads, head_dim, reps, naive_max_t);
    print!("{}", sympow_cuda::bench::format_table(&rows));
    if stages {
        print!(
            "{}",
            sympow_cuda::bench::fused_stages(&gpu, &time, tokens, heads, head_dim)
        );
    }
    if let Some(path) = json {
        let lines: Vec<String> = rows
            .iter()
            .map(|r| r.json(heads, head_dim, tokens))
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(0)
}

#[cfg(not(feature = "cuda"))]
fn bench_attention_gpu(_: AttentionBench) -> Result<i32> {
    bail!("`bench attention` runs on the GPU: build with --features sympow-cli/cuda (on the CPU: `sympow bench attention-cpu`)")
}

#[cfg(not(feature = "cuda"))]
fn device_check(_seed: Option<u64>) -> Result<i32> {
    bail!("this binary was built without the `cuda` feature (cargo build --release --features sympow-cli/cuda)")
}

/// `sympow bench train`: a table of training-step throughput, and per-op profiles.
fn bench_train<B: Backend>(
    make: &dyn Fn() -> B,
    args: &ConfigArgs,
    variants: &[String],
    contexts: &[usize],
    tokens: Option<usize>,
    reps: usize,
    profile: bool,
) -> Result<Vec<sympow::bench::TrainBenchRow>> {
    let base = args.build()?;
    let contexts = if contexts.is_empty() {
        vec![base.data.context]
    } else {
        contexts.to_vec()
    };
    let tokens = tokens.unwrap_or(base.train.batch_size * base.data.context);
    let variants = experiment::find_variants(variants)?;
    let be = make();
    println!(
        "training step on {}, preset {}, {tokens} tokens per step, median of {reps}",
        be.name(),
        args.name()
    );
    if profile && !be.set_profiling(false) {
        bail!(
            "--profile: {} cannot time its ops (a GPU build on a GPU can)",
            be.name()
        );
    }
    // the first model takes this backend (a GPU backend compiles its kernels when made)
    let mut spare = Some(be);
    let mut rows = Vec::new();
    let mut profiles = String::new();
    for &context in &contexts {
        for (name, ov) in &variants {
            let mut cfg = base.clone();
            for (k, v) in *ov {
                cfg.set(k, v).with_context(|| format!("variant {name}"))?;
            }
            cfg.set("data.context", &context.to_string())?;
            let batch = (tokens / context).max(1);
            let backend = spare.take().unwrap_or_else(make);
            let mut model = Model::init(backend, &cfg, 1);
            let (step_ms, _) =
                sympow::bench::train_step_ms(&mut model, batch, context, reps, false);
            if profile {
                let (_, total) = sympow::bench::train_step_ms(&mut model, batch, context, 1, true);
                profiles.push_str(&format!(
                    "\n{name}, context {context}, batch {batch}: 2 steps, {:.1} ms synchronised\n{}",
                    total * 1e3,
                    sympow::bench::format_profile(&model.backend.profile(), total)
                ));
                model.backend.set_profiling(false);
            }
            rows.push(sympow::bench::TrainBenchRow {
                attention: name.to_string(),
                context,
                batch,
                step_ms,
            });
        }
    }
    print!("{}", sympow::bench::format_train_table(&rows));
    print!("{profiles}");
    Ok(rows)
}

/// A variant of the paper: its name and the config fields it sets.
type Variant = (&'static str, &'static [(&'static str, &'static str)]);

/// The paper's variants (SPEC §6), as config overrides.
const VARIANTS: [Variant; 6] = [
    ("softmax", &[("model.attention", "softmax")]),
    (
        "sympow-p2",
        &[("model.attention", "sympow"), ("model.power", "2")],
    ),
    (
        "sympow-p4",
        &[("model.attention", "sympow"), ("model.power", "4")],
    ),
    (
        "sympow-learned-gate",
        &[("model.attention", "sympow"), ("model.gate", "learned")],
    ),
    ("sympow-gated", &[("model.attention", "sympow-gated")]),
    ("conformal", &[("model.attention", "conformal")]),
];

fn compare<B: Backend>(
    make: &dyn Fn() -> B,
    args: &ConfigArgs,
    out: &Path,
    progress: bool,
) -> Result<i32> {
    let base = args.build()?;
    let flag = interrupt_flag();
    // the variants differ only in their model: one corpus, one baseline for all
    let data = TokenData::load(&base.data)?;
    let unigram = data.unigram_baseline(base.model.vocab_size);
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for (name, ov) in VARIANTS {
        let mut cfg = base.clone();
        for (k, v) in ov {
            cfg.set(k, v).with_context(|| format!("variant {name}"))?;
        }
        let dir = out.join(name);
        println!("== {name}");
        if !experiment::train_unless_done(make, &cfg, &dir, progress, &flag)? {
            return Ok(130);
        }
        let model = train::load_model(make(), &dir)?;
        let b = sympow::eval::loss_by_position(
            &model,
            &data,
            cfg.data.context,
            4 * cfg.train.eval_batches * cfg.train.batch_size,
            cfg.train.batch_size,
            16,
        );
        let tokens: u64 = b.iter().map(|x| x.tokens).sum();
        let mean = b.iter().map(|x| x.loss * x.tokens as f64).sum::<f64>() / tokens.max(1) as f64;
        rows.push((
            name,
            model.num_params(),
            mean,
            b.last().map_or(f64::NAN, |x| x.loss),
        ));
        sympow::eval::write_csv(&dir.join(format!("eval_ctx{}.csv", cfg.data.context)), &b)?;
        curves.push((name.to_string(), b));
    }
    let mut table = String::from("| variant | parameters | validation loss | loss in last 1/16 of context | vs softmax |\n|---|---|---|---|---|\n");
    let soft = rows[0].2;
    for (name, n, mean, last) in &rows {
        table.push_str(&format!(
            "| {name} | {n} | {mean:.4} | {last:.4} | {:+.4} |\n",
            mean - soft
        ));
    }
    table.push_str(&format!(
        "\nunigram baseline: {:.4} nats/token; {} steps of {} × {} tokens\n",
        unigram, base.train.steps, base.train.batch_size, base.data.context
    ));
    print!("\n{table}");
    std::fs::create_dir_all(out)?;
    sympow::checkpoint::write_atomic(&out.join("compare.md"), table.as_bytes())?;
    let plot = out.join("compare.png");
    sympow::eval::plot(
        &plot,
        &format!("loss by position, context {}", base.data.context),
        &curves,
    )
    .map_err(anyhow::Error::msg)?;
    println!(
        "wrote {} and {}",
        out.join("compare.md").display(),
        plot.display()
    );
    Ok(0)
}
