//! `cargo bench -p sympow`: time per token of the quadratic vs the chunked form on the CPU.
//! Expect the chunked column flat and the quadratic one growing with T.

fn main() {
    // Cargo passes `--bench`; any other argument is a filter we do not need.
    let rows = sympow::bench::attention_cpu(&[1024, 4096, 16384], 2, 64, 2, 128, 2);
    println!("sympow attention forward, CPU, p = 2, d = 64, 2 heads, chunk 128, gated");
    print!("{}", sympow::bench::format_attention_table(&rows));
}
