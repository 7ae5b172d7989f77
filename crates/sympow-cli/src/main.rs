//! `sympow`: train, evaluate, sample from and benchmark conformal-sympow transformers.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sympow",
    version,
    about = "Conformal symmetric-power transformers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks; each prints a table of ratios measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Reports the compute device that would be used (GPU if available, else CPU).
    Device,
}

#[derive(Subcommand)]
enum BenchCommand {
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
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
            println!(
                "sympow attention forward, {}, p = {p}, d = {head_dim}, {heads} heads, chunk {chunk}, gated",
                sympow::backend::Backend::name(&sympow::backend::CpuBackend::<f32>::new())
            );
            let rows = sympow::bench::attention_cpu(&time, p, head_dim, heads, chunk, reps);
            print!("{}", sympow::bench::format_attention_table(&rows));
        }
        Command::Device => match sympow_cuda::detect(0) {
            Ok(info) => println!(
                "GPU {}: {} (compute {}.{}, {:.1} GiB)",
                info.ordinal,
                info.name,
                info.compute_capability.0,
                info.compute_capability.1,
                info.memory_bytes as f64 / (1u64 << 30) as f64
            ),
            Err(why) => println!("CPU ({why})"),
        },
    }
    Ok(())
}
