//! [`CudaBackend`]: the model's ops on an NVIDIA GPU.
//!
//! Matrix products go to cuBLAS; every other op is an NVRTC-compiled kernel from
//! `kernels/ops.cu`, the GPU twin of the CPU op of the same name (and tested against it on the
//! device by `sympow device-check`). Tensors are f32 device buffers.
//!
//! Sympow attention with p = 2 and head dimension 32, 64 or 128 runs as the fused tensor-core
//! chunked kernels of [`crate::chunked`] (bf16 operands, f32 accumulation; linear in T).
//! Ungated softmax attention with head dimension 32, 64 or 128 runs as the flash kernels of
//! [`crate::flash`] (bf16 tensor cores, scores on chip), and so does ungated power attention
//! with p = 4 (its quadratic form); softmax with other head dimensions on cuBLAS, a block of
//! queries at a time (`backend/softmax.rs`, any T). Other attention (gated p = 4, gated
//! softmax, other head sizes) runs as the naive quadratic-form kernels of
//! `kernels/attention.cu` (one thread per query or key, CUDA cores, f32) for sequences of up to
//! [`GPU_ATTENTION_MAX_T`] tokens, and through the CPU implementation beyond.

use crate::chunked::ChunkedSympow;
use crate::flash::FlashSoftmax;
use crate::lt::{BiasGemm, Epilogue, Out};
use crate::profile::{OpTimer, Profiler};
use crate::{DEFAULT_CHUNK, MAX_CHUNK};
use cudarc::cublas::{
    sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig,
};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use sympow::attention::{AttentionGrads, AttentionOut, AttentionSpec, Form, Shape};
use sympow::backend::{
    mlp_backward_ops, mlp_forward_ops, AdamWParam, Backend, CpuBackend, LayerNormSaved,
    LinearSaved, MlpGrads, MlpSaved, MlpWeights, ProfileRow, QkvInputGrads, QkvInputs, Saved,
};
use sympow::ops::rotary::RotaryParam;

pub(crate) const SOURCE: &str = concat!(
    include_str!("../kernels/reduce.cuh"),
    include_str!("../kernels/ops.cu"),
    "\n",
    include_str!("../kernels/attention.cu"),
    "\n",
    include_str!("../kernels/decode.cu")
);

/// Longest sequence the naive GPU attention kernels take; longer ones go through the host.
pub const GPU_ATTENTION_MAX_T: usize = 4096;
/// Largest head dimension those kernels hold in registers (`MAXE` in attention.cu).
const GPU_ATTENTION_MAX_DIM: usize = 256;
const BLOCK: u32 = 256;

/// How cuBLAS runs the backend's f32 matrix products (linear layers and LM head: `gemm`; the
/// cuBLAS softmax path's batched products run in TF32 under `Tf32` and `Bf16`). Weights,
/// gradients and optimizer state stay f32 in memory in every mode, and so do the activations
/// but for the MLP's hidden layer, which `Bf16` keeps in bf16 only (`mlp_forward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MatmulPrecision {
    /// Full f32 products.
    F32,
    /// f32 operands on TF32 tensor cores (10-bit mantissa, f32 accumulation).
    Tf32,
    /// Operands rounded to bf16 (8-bit mantissa) on the fly, f32 accumulation and output (bf16
    /// output where the only consumer reads bf16: the MLP's hidden layer) — the mixed precision
    /// of PyTorch's bf16 autocast; twice TF32's peak rate (gpt2-124m's training step at 16k on
    /// the H100: 146 → 136 ms). The default.
    Bf16,
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "tf32" => Ok(Self::Tf32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!(
                "matmul precision {s:?}: expected bf16, tf32 or f32"
            )),
        }
    }
}

/// The precision backends opened from now on start with (see [`CudaBackend::set_matmul`]).
static MATMUL_DEFAULT: AtomicU8 = AtomicU8::new(MatmulPrecision::Bf16 as u8);

/// Sets the matrix-product precision of GPUs opened from now on (`sympow --matmul`; default
/// bf16, as PyTorch's autocast).
pub fn set_default_matmul(p: MatmulPrecision) {
    MATMUL_DEFAULT.store(p as u8, Ordering::Relaxed);
}

/// A matrix-product operand of the linear layers (see [`CudaBackend::operand`]): f32, and
/// under bf16 products its bf16 copy, made here or borrowed from a forward's [`LinearSaved`].
struct Operand<'a> {
    /// None only for an operand made in bf16 in the first place ([`Operand::bf16_only`]).
    f32: Option<&'a CudaSlice<f32>>,
    bf16: Option<Cow<'a, CudaSlice<u16>>>,
    /// A weight's bf16 copy held by [`Backend::hold_weights`] (then `bf16` is None).
    held: Option<Arc<CudaSlice<u16>>>,
}

impl<'a> Operand<'a> {
    /// An operand that exists only in bf16 (the LM head's ∂logits, the MLP's hidden layer and
    /// its gradient, a vector of ones).
    fn bf16_only(x: Cow<'a, CudaSlice<u16>>) -> Self {
        Operand {
            f32: None,
            bf16: Some(x),
            held: None,
        }
    }
    /// The bf16 copy, if there is one.
    fn half(&self) -> Option<&CudaSlice<u16>> {
        self.held.as_deref().or(self.bf16.as_deref())
    }
    /// The device address of the copy the products read (bf16 if there is one).
    fn ptr(&self, stream: &Arc<CudaStream>) -> cudarc::driver::sys::CUdeviceptr {
        match self.half() {
            Some(x) => x.device_ptr(stream).0,
            None => {
                self.f32
                    .expect("an operand has f32 or bf16")
                    .device_ptr(stream)
                    .0
            }
        }
    }
}

/// The MLP's hidden layer under bf16 products ([`CudaBackend`]'s `mlp_forward`): fc's output
/// and the GELU's, each written once in bf16 and never in f32.
struct Bf16Hidden {
    h: CudaSlice<u16>,
    g: CudaSlice<u16>,
}

fn precision_from(v: u8) -> MatmulPrecision {
    [
        MatmulPrecision::F32,
        MatmulPrecision::Tf32,
        MatmulPrecision::Bf16,
    ][v as usize]
}

/// Recurrent sympow states of the sequences being generated, on the GPU (see
/// [`Backend::sympow_decode_step`]).
pub struct CudaDecodeState {
    /// `[batch·heads, D, e+1]`, f64.
    state: CudaSlice<f64>,
    /// Per-tile partial reads `[batch·heads, tiles, e+1]`.
    partial: CudaSlice<f64>,
    /// φ_p's table: input indices (`D × p`) and scales (`D`).
    idx: CudaSlice<i32>,
    coef: CudaSlice<f64>,
    dim: usize,
    p: usize,
    heads: usize,
    d: usize,
    e: usize,
}

impl sympow::backend::Footprint for CudaDecodeState {
    fn bytes(&self) -> usize {
        (self.state.len() + self.partial.len() + self.coef.len()) * std::mem::size_of::<f64>()
            + self.idx.len() * std::mem::size_of::<i32>()
    }
}

/// φ_p's table for sympow attention of `spec` at head dimension `d`.
fn phi_table(spec: &AttentionSpec, d: usize) -> sympow::attention::phi::SymPow {
    match spec.kernel {
        sympow::attention::Kernel::Power(p) => sympow::attention::phi::SymPow::new(d, p),
        sympow::attention::Kernel::Softmax => panic!("softmax attention has no recurrent state"),
    }
}

/// State rows per block of `sympow_decode_update` (`DECODE_ROWS` in decode.cu).
const DECODE_ROWS: usize = 64;
/// Threads per block of `sympow_decode_update` (`DECODE_THREADS` in decode.cu).
const DECODE_THREADS: u32 = 256;
/// Threads per block of `prefill_gate_weights` (`PREFILL_SCAN` in decode.cu).
const PREFILL_SCAN: u32 = 1024;
/// Bytes of a prefill's f64 φ(k) operand for one chunk of tokens (over every head): the chunk's
/// length follows from it.
const PREFILL_PHI_BYTES: usize = 512 << 20;

/// The CUDA backend of one GPU.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// The linear layers' forward with the bias in the product's epilogue (None if cuBLASLt
    /// would not open: then a fill and an accumulating product).
    bias_gemm: Option<BiasGemm>,
    _module: Arc<CudaModule>,
    fns: HashMap<&'static str, CudaFunction>,
    cpu: CpuBackend<f32>,
    name: String,
    ordinal: usize,
    /// The fused chunked-sympow kernels, or why they are unavailable on this GPU.
    chunked: Result<ChunkedSympow, String>,
    use_fused: AtomicBool,
    chunk: AtomicUsize,
    /// Queries per block of the cuBLAS softmax path (0: as many as the scratch limit allows).
    softmax_rows: AtomicUsize,
    /// The flash softmax kernels, or why they are unavailable on this GPU.
    flash: Result<FlashSoftmax, String>,
    use_flash: AtomicBool,
    /// A [`MatmulPrecision`] as u8.
    matmul: AtomicU8,
    profiler: Profiler,
    /// bf16 copies of the weights [`Backend::hold_weights`] holds, by the f32 tensor's address
    /// and length, each with how many holds it has.
    held: Mutex<HashMap<(u64, usize), Held>>,
}

// SAFETY: cudarc's context, stream and cuBLAS handle are used from one thread at a time here
// (the backend is driven by a single training loop); the trait requires Send + Sync so that
// models can be moved between threads.
unsafe impl Send for CudaBackend {}
unsafe impl Sync for CudaBackend {}

const KERNELS: [&str; 56] = [
    "f32_to_bf16",
    "count_non_finite_bf16",
    "copy_columns_to_bf16",
    "gelu_forward_bf16",
    "gelu_backward_bf16",
    "sympow_decode_update",
    "prefill_gate_weights",
    "prefill_phi",
    "sympow_decode_read",
    "kv_cache_copy",
    "kv_cache_copy_f64",
    "kv_cache_append",
    "kv_cache_gate_append",
    "kv_decode_partial",
    "kv_decode_combine",
    "add_assign",
    "mul",
    "broadcast_rows",
    "column_partials",
    "fold_partials",
    "sum_squares",
    "copy_columns",
    "fill_rows",
    "gelu_forward",
    "gelu_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "layer_norm_param_partials",
    "layer_norm_forward_rows",
    "layer_norm_backward_rows",
    "embedding_forward",
    "embedding_backward",
    "rotary_forward",
    "rotary_backward",
    "qkv_rotary_gate_forward",
    "qkv_rotary_gate_backward",
    "fixed_rotary_angles",
    "learned_rotary_angles",
    "learned_rotary_angle_slice_sums",
    "learned_rotary_slice_sums",
    "learned_rotary_angles_backward",
    "log_gate_forward",
    "log_gate_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "cross_entropy_backward_bf16",
    "adamw_step",
    "zero_chunks",
    "attention_forward",
    "attention_row_dot",
    "attention_backward_dq",
    "attention_backward_dkv",
    "reverse_cumsum_time",
    "softmax_rows_forward",
    "softmax_rows_recompute",
    "softmax_rows_grad",
];

/// cuBLAS's description of C = op(A)·op(B) + beta·C (alpha 1), column-major as BLAS.
fn gemm_config(
    (transa, transb): (Op, Op),
    (m, n, k): (usize, usize, usize),
    (lda, ldb, ldc): (usize, usize, usize),
    beta: f32,
) -> GemmConfig<f32> {
    GemmConfig {
        transa,
        transb,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha: 1.0,
        lda: lda as i32,
        ldb: ldb as i32,
        beta,
        ldc: ldc as i32,
    }
}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Elements per block of the multi-tensor kernels (sums of squares, AdamW).
const CHUNK: usize = 1 << 16;

/// (offset, length) of the chunks of a tensor of `n` elements.
fn chunks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(CHUNK).map(move |o| (o, CHUNK.min(n - o)))
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The launch of a column-partials kernel over `[rows, c]` (blocks of 32 columns × 8 row
/// lanes, one grid row per split of rows) and the rows per split: ≥ 64, and few enough splits
/// for the grid's y limit.
fn column_split(rows: usize, c: usize) -> (LaunchConfig, i64) {
    let split = rows.div_ceil(65_535).max(64);
    let cfg = LaunchConfig {
        grid_dim: (c.div_ceil(32) as u32, rows.div_ceil(split).max(1) as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    (cfg, split as i64)
}

/// Whether the layer norm's rows fit the warp-a-row kernels (`layer_norm_forward_rows`,
/// `layer_norm_backward_rows`): float4 rows of at most 32 lanes × `LN_V` groups of 4 floats.
fn ln_rows_in_registers(c: usize) -> bool {
    c.is_multiple_of(4) && c <= 32 * 4 * LN_V
}
/// The float4 groups a lane holds (`LN_V` in ops.cu), the rows a block of
/// `layer_norm_backward_rows` takes (`LN_BWD_ROWS`) and its warps (`LN_WARPS`).
const LN_V: usize = 8;
const LN_BWD_ROWS: usize = 64;
const LN_WARPS: u32 = 4;

/// One block of `SCAN_THREADS` (ops.cu) per scan over time.
fn scan_cfg(scans: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (scans.max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The learned-rotary scans' grid: `scans` blocks in x, and time cut into slices in y (a block
/// each) so that there are about `target` blocks, each slice `min_span` steps or more. Returns
/// the launch configuration, the number of slices and the steps per slice.
fn time_slices(
    scans: usize,
    time: usize,
    target: usize,
    min_span: usize,
) -> (LaunchConfig, usize, i32) {
    let slices = target.div_ceil(scans).min(time.div_ceil(min_span)).max(1);
    let span = time.div_ceil(slices);
    let slices = time.div_ceil(span).max(1);
    let cfg = LaunchConfig {
        grid_dim: (scans as u32, slices as u32, 1),
        ..scan_cfg(scans)
    };
    (cfg, slices, span as i32)
}

/// A null device pointer for an absent optional argument.
const NULL: u64 = 0;

macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let cfg = $cfg;
        let f = &$be.fns[$name];
        let mut b = $be.stream.launch_builder(f);
        $( b.arg($arg); )*
        // SAFETY: each kernel's argument list matches its declaration in kernels/ops.cu, and
        // sizes passed with the buffers bound every index the kernel touches.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA kernel {}: {e}", $name));
    }};
}

mod kv_cache;
mod softmax;
pub use kv_cache::CudaKvCache;

impl CudaBackend {
    /// Opens GPU `ordinal` and compiles the kernels.
    pub fn new(ordinal: usize) -> Result<Self, crate::Unavailable> {
        let info = crate::detect(ordinal)?;
        let drv = |e: cudarc::driver::DriverError| crate::Unavailable::Driver(e.to_string());
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        crate::device::single_stream_allocation(&ctx, ordinal);
        // a stream of its own: the legacy default stream cannot be captured into a graph
        // (`Backend::record`)
        let stream = ctx.new_stream().map_err(drv)?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| crate::Unavailable::Driver(format!("cuBLAS: {e}")))?;
        let ptx = cudarc::nvrtc::compile_ptx(SOURCE)
            .map_err(|e| crate::Unavailable::Driver(format!("NVRTC: {e}")))?;
        let module = ctx.load_module(ptx).map_err(drv)?;
        let chunked = ChunkedSympow::new(&ctx, &stream);
        let flash = FlashSoftmax::new(&ctx, &stream);
        let mut fns = HashMap::new();
        for k in KERNELS {
            fns.insert(k, module.load_function(k).map_err(drv)?);
        }
        let bias_gemm = BiasGemm::new(&stream).ok();
        let be = CudaBackend {
            ctx,
            stream,
            blas,
            bias_gemm,
            _module: module,
            fns,
            cpu: CpuBackend::new(),
            name: info.name,
            ordinal,
            chunked,
            use_fused: AtomicBool::new(true),
            chunk: AtomicUsize::new(DEFAULT_CHUNK),
            softmax_rows: AtomicUsize::new(0),
            flash,
            use_flash: AtomicBool::new(true),
            matmul: AtomicU8::new(0),
            profiler: Profiler::default(),
            held: Mutex::new(HashMap::new()),
        };
        be.set_matmul(precision_from(MATMUL_DEFAULT.load(Ordering::Relaxed)));
        Ok(be)
    }

    fn prof(&self, op: &'static str) -> Option<OpTimer<'_>> {
        self.profiler.time(&self.stream, op)
    }

    /// Sets how the matrix products run (see [`MatmulPrecision`]; on Hopper TF32 is ~8× the
    /// f32 rate and bf16 ~2× TF32).
    pub fn set_matmul(&self, p: MatmulPrecision) {
        use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
        self.matmul.store(p as u8, Ordering::Relaxed);
        let mode = if p == MatmulPrecision::F32 {
            cublasMath_t::CUBLAS_DEFAULT_MATH
        } else {
            cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        };
        // SAFETY: the handle is this backend's live cuBLAS handle.
        let status = unsafe { cublasSetMathMode(*self.blas.handle(), mode) };
        assert_eq!(
            status,
            cublasStatus_t::CUBLAS_STATUS_SUCCESS,
            "cublasSetMathMode"
        );
    }

    /// Queries per block of the cuBLAS softmax attention (0, the default: as many as a 1 GiB
    /// scratch buffer allows); `device-check` sets a small value to exercise several blocks.
    pub fn set_softmax_block_rows(&self, rows: usize) {
        self.softmax_rows.store(rows, Ordering::Relaxed);
    }

    fn softmax_rows(&self) -> usize {
        self.softmax_rows.load(Ordering::Relaxed)
    }

    /// Whether ungated softmax attention runs on cuBLAS (`backend/softmax.rs`).
    fn cublas_softmax(&self, spec: &AttentionSpec, log_gates: Option<&CudaSlice<f32>>) -> bool {
        self.use_fused.load(Ordering::Relaxed)
            && matches!(spec.kernel, sympow::attention::Kernel::Softmax)
            && log_gates.is_none()
    }

    /// Whether the fused chunked-sympow kernels compiled on this GPU (else why not).
    pub fn fused_attention_status(&self) -> Result<(), String> {
        self.chunked.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// The fused chunked-sympow kernels, when they compiled on this GPU.
    pub fn fused_kernels(&self) -> Option<&ChunkedSympow> {
        self.chunked.as_ref().ok()
    }

    /// Turns the fast attention paths — the fused chunked-sympow kernels and the cuBLAS
    /// softmax — on or off (off: the naive GPU reference kernels, for comparisons).
    pub fn set_fused_attention(&self, on: bool) {
        self.use_fused.store(on, Ordering::Relaxed);
    }

    /// Turns the flash softmax kernels on or off (off: softmax on cuBLAS, for comparisons).
    pub fn set_flash_softmax(&self, on: bool) {
        self.use_flash.store(on, Ordering::Relaxed);
    }

    /// Whether the flash softmax kernels compiled on this GPU (else why not).
    pub fn flash_softmax_status(&self) -> Result<(), String> {
        self.flash.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// The flash softmax kernels, when they take this problem and are on.
    fn flash(
        &self,
        spec: &AttentionSpec,
        shape: &Shape,
        log_gates: Option<&CudaSlice<f32>>,
    ) -> Option<&FlashSoftmax> {
        let f = self.flash.as_ref().ok()?;
        (self.use_fused.load(Ordering::Relaxed)
            && self.use_flash.load(Ordering::Relaxed)
            && FlashSoftmax::supports(spec, shape, log_gates.is_some()))
        .then_some(f)
    }

    /// Chunk length of the fused kernels: a multiple of 128, at most [`MAX_CHUNK`] (default
    /// [`DEFAULT_CHUNK`]; shorter sequences use one chunk).
    pub fn set_attention_chunk(&self, chunk: usize) {
        assert!(
            chunk.is_multiple_of(128) && (128..=MAX_CHUNK).contains(&chunk),
            "fused chunk length must be a multiple of 128 in 128..={MAX_CHUNK}, got {chunk}"
        );
        self.chunk.store(chunk, Ordering::Relaxed);
    }

    /// The fused kernels and their chunk length, when they take this problem and are on.
    fn fused(&self, spec: &AttentionSpec, shape: &Shape) -> Option<(&ChunkedSympow, usize)> {
        let k = self.chunked.as_ref().ok()?;
        (self.use_fused.load(Ordering::Relaxed) && ChunkedSympow::supports(spec, shape))
            .then(|| (k, self.chunk.load(Ordering::Relaxed)))
    }

    fn up_u32(&self, v: &[u32]) -> CudaSlice<u32> {
        self.stream.clone_htod(v).expect("host to device copy")
    }

    /// An op's output buffer, uninitialised: every caller's next launch (a kernel, or a
    /// product with beta = 0, which does not read C) writes each element.
    fn alloc(&self, n: usize) -> CudaSlice<f32> {
        crate::device::alloc_output(&self.stream, n)
    }

    /// The decode read's per-tile partial sums for `heads` states of D = `dim` rows and e + 1
    /// columns: uninitialised, as every decode step's update writes them whole before its read.
    fn decode_partial(&self, heads: usize, dim: usize, e: usize) -> CudaSlice<f64> {
        crate::device::alloc_output(&self.stream, heads * dim.div_ceil(DECODE_ROWS) * (e + 1))
    }

    /// Decode states `[heads, D, e+1]` (f64, on the device) with φ's table and the read's
    /// scratch.
    fn decode_state_of(
        &self,
        table: &sympow::attention::phi::SymPow,
        heads: usize,
        d: usize,
        e: usize,
        state: CudaSlice<f64>,
    ) -> CudaDecodeState {
        let idx: Vec<i32> = table.indices().iter().map(|&i| i32::from(i)).collect();
        let st = &self.stream;
        CudaDecodeState {
            state,
            partial: self.decode_partial(heads, table.dim, e),
            idx: st.clone_htod(&idx).expect("host to device copy"),
            coef: st.clone_htod(table.scales()).expect("host to device copy"),
            dim: table.dim,
            p: table.p as usize,
            heads,
            d,
            e,
        }
    }

    /// [`Backend::sympow_prefill_state`] with at most `max_chunk` tokens a GEMM (fewer where
    /// the φ rows of a chunk would pass `PREFILL_PHI_BYTES`); device-check passes a small one
    /// to run several chunks on a short prompt.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prefill_state(
        &self,
        spec: &AttentionSpec,
        shape: &Shape,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
        seqs: &[usize],
        max_chunk: usize,
    ) -> CudaDecodeState {
        let _p = self.prof("sympow_prefill_state");
        let table = phi_table(spec, shape.dk);
        let (n, t, h, d, e) = (shape.batch, shape.time, shape.heads, shape.dk, shape.dv);
        assert!(
            k.len() == n * t * h * d && v.len() == n * t * h * e,
            "a prefill state takes keys [batch, time, heads, dk] and values [batch, time, heads, dv]"
        );
        assert!(
            seqs.iter().all(|&s| s < n),
            "prefill state: a sequence index is out of range"
        );
        let (nh, dim, e1) = (n * h, table.dim, e + 1);
        let per = h * dim * e1; // one input sequence's states
        let zeros = self
            .stream
            .alloc_zeros::<f64>((nh * dim * e1).max(1))
            .expect("device allocation");
        let mut out = self.decode_state_of(&table, nh, d, e, zeros);
        if t > 0 && n > 0 {
            let (ti, hi, dimi, p, di, ei) = (
                t as i32,
                h as i32,
                dim as i32,
                table.p as i32,
                d as i32,
                e as i32,
            );
            // w_t = exp(Σ_{s>t} log γ_s) per input sequence and head, [n·heads, T] in f64
            // (w, φ and w·[v, 1] are written whole before they are read: not zeroed first)
            let weights = log_gates.map(|g| {
                let mut w = crate::device::alloc_output::<f64>(&self.stream, nh * t);
                let cfg = LaunchConfig {
                    grid_dim: (nh as u32, 1, 1),
                    block_dim: (PREFILL_SCAN, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut l = self
                    .stream
                    .launch_builder(&self.fns["prefill_gate_weights"]);
                l.arg(&mut w).arg(g).arg(&ti).arg(&hi);
                // SAFETY: arguments match decode.cu; one block of PREFILL_SCAN threads a head,
                // w holds [n·heads, T] and g [n, T, heads].
                unsafe { l.launch(cfg) }.expect("prefill_gate_weights");
                w
            });
            // S = Φ(K)ᵀ·W[V, 1], a chunk of tokens at a time: the chunk's φ(k) rows in f64, then
            // per head (column-major, as BLAS) S (e+1 × D) += W[V, 1] (e+1 × tc) · Φ (D × tc)ᵀ
            let tc = (PREFILL_PHI_BYTES / (nh * dim * 8))
                .min(max_chunk)
                .clamp(1, t);
            let mut phi = crate::device::alloc_output::<f64>(&self.stream, nh * tc * dim);
            let mut vw = crate::device::alloc_output::<f64>(&self.stream, nh * tc * e1);
            for t0 in (0..t).step_by(tc) {
                let c = tc.min(t - t0);
                let cfg = LaunchConfig {
                    grid_dim: (c as u32, nh as u32, 1),
                    block_dim: (BLOCK, 1, 1),
                    shared_mem_bytes: (d * 4) as u32,
                };
                let (t0i, ci) = (t0 as i32, c as i32);
                let mut l = self.stream.launch_builder(&self.fns["prefill_phi"]);
                l.arg(&mut phi).arg(&mut vw).arg(k).arg(v);
                match &weights {
                    Some(w) => l.arg(w),
                    None => l.arg(&NULL),
                };
                l.arg(&out.idx)
                    .arg(&out.coef)
                    .arg(&ti)
                    .arg(&t0i)
                    .arg(&ci)
                    .arg(&hi);
                l.arg(&dimi).arg(&p).arg(&di).arg(&ei);
                // SAFETY: arguments match decode.cu; the grid covers the chunk's c ≤ tc tokens
                // of every head, whose rows phi [nh, c, D] and vw [nh, c, e+1] hold.
                unsafe { l.launch(cfg) }.expect("prefill_phi");
                let cfg = StridedBatchedConfig {
                    gemm: GemmConfig {
                        transa: Op::CUBLAS_OP_N,
                        transb: Op::CUBLAS_OP_T,
                        m: e1 as i32,
                        n: dim as i32,
                        k: ci,
                        alpha: 1.0f64,
                        lda: e1 as i32,
                        ldb: dim as i32,
                        beta: 1.0,
                        ldc: e1 as i32,
                    },
                    batch_size: nh as i32,
                    stride_a: (c * e1) as i64,
                    stride_b: (c * dim) as i64,
                    stride_c: (dim * e1) as i64,
                };
                // SAFETY: per head, vw holds c rows of e+1, phi c rows of D, and the state D
                // rows of e+1, as the strides and leading dimensions say.
                unsafe {
                    self.blas
                        .gemm_strided_batched(cfg, &vw, &phi, &mut out.state)
                }
                .expect("cuBLAS dgemm");
            }
        }
        if seqs.iter().copied().eq(0..n) {
            return out;
        }
        // every sequence's states copied in whole
        let mut state = crate::device::alloc_output::<f64>(&self.stream, seqs.len() * per);
        for (i, &s) in seqs.iter().enumerate() {
            let src = out.state.slice(s * per..(s + 1) * per);
            let mut dst = state.slice_mut(i * per..(i + 1) * per);
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .expect("device to device copy");
        }
        // the same φ table, already on the device; a partial-read buffer for the new heads
        let heads = seqs.len() * h;
        CudaDecodeState {
            state,
            partial: self.decode_partial(heads, dim, e),
            heads,
            ..out
        }
    }

    /// A zeroed buffer, for outputs that kernels accumulate into.
    fn alloc_zeroed(&self, n: usize) -> CudaSlice<f32> {
        self.stream
            .alloc_zeros::<f32>(n.max(1))
            .expect("device allocation")
    }

    /// How the matrix products run now (see [`set_matmul`](Self::set_matmul)).
    fn precision(&self) -> MatmulPrecision {
        precision_from(self.matmul.load(Ordering::Relaxed))
    }

    /// `x` as a matrix-product operand: under [`MatmulPrecision::Bf16`] with its bf16 copy,
    /// made here once however many products of the op use it.
    fn operand<'a>(&self, x: &'a CudaSlice<f32>) -> Operand<'a> {
        let bf16 = (self.precision() == MatmulPrecision::Bf16).then(|| Cow::Owned(self.to_bf16(x)));
        Operand {
            f32: Some(x),
            bf16,
            held: None,
        }
    }

    /// [`operand`](Self::operand) of a linear layer's input, reusing the forward's bf16 copy.
    fn saved_operand<'a>(&self, x: &'a CudaSlice<f32>, saved: &'a LinearSaved) -> Operand<'a> {
        let bf16 = self.precision() == MatmulPrecision::Bf16;
        match saved
            .as_ref()
            .and_then(|s| s.downcast_ref::<CudaSlice<u16>>())
        {
            Some(x16) if bf16 && x16.len() == x.len() => Operand {
                f32: Some(x),
                bf16: Some(Cow::Borrowed(x16)),
                held: None,
            },
            _ => self.operand(x),
        }
    }

    /// The bf16 copy of `w` that [`Backend::hold_weights`] keeps, under bf16 products.
    fn held_bf16(&self, w: &CudaSlice<f32>) -> Option<Arc<CudaSlice<u16>>> {
        if self.precision() != MatmulPrecision::Bf16 {
            return None;
        }
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_empty() {
            return None;
        }
        held.get(&self.held_key(w)).map(|h| h.bf16.clone())
    }

    fn held_key(&self, w: &CudaSlice<f32>) -> (u64, usize) {
        (w.device_ptr(&self.stream).0, w.len())
    }

    /// [`operand`](Self::operand) of a layer's weight: its held bf16 copy where there is one.
    fn weight_operand<'a>(&self, w: &'a CudaSlice<f32>) -> Operand<'a> {
        match self.held_bf16(w) {
            Some(held) => Operand {
                f32: Some(w),
                bf16: None,
                held: Some(held),
            },
            None => self.operand(w),
        }
    }

    /// C (col-major m×n) = op(A)·op(B) + beta·C: f32 C, A and B in f32 (TF32 or full f32
    /// products) or in their bf16 copies (f32 accumulation).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        ta: Op,
        tb: Op,
        m: usize,
        n: usize,
        k: usize,
        a: &Operand,
        lda: usize,
        b: &Operand,
        ldb: usize,
        beta: f32,
        c: &mut CudaSlice<f32>,
        ldc: usize,
    ) {
        let cfg = gemm_config((ta, tb), (m, n, k), (lda, ldb, ldc), beta);
        let (Some(a16), Some(b16)) = (a.half(), b.half()) else {
            let (a, b) = (a.f32.expect("f32 operand"), b.f32.expect("f32 operand"));
            // SAFETY: the dimensions and leading dimensions describe buffers of the sizes given.
            unsafe { self.blas.gemm(cfg, a, b, c) }.expect("cuBLAS sgemm");
            return;
        };
        let (pc, _gc) = c.device_ptr_mut(&self.stream);
        // SAFETY: as above, with bf16 copies of a and b (same shapes); c stays f32.
        unsafe { self.gemm_bf16(cfg, a16, b16, (pc, Out::F32)) };
    }

    /// C (col-major m×n, bf16) = op(A)·op(B), A and B in bf16 (f32 accumulation, C rounded
    /// once): a product whose only consumer reads bf16.
    fn gemm_to_bf16(
        &self,
        (ta, tb): (Op, Op),
        (m, n, k): (usize, usize, usize),
        (a, lda): (&CudaSlice<u16>, usize),
        (b, ldb): (&CudaSlice<u16>, usize),
        c: &mut CudaSlice<u16>,
        ldc: usize,
    ) {
        let cfg = gemm_config((ta, tb), (m, n, k), (lda, ldb, ldc), 0.0);
        let (pc, _gc) = c.device_ptr_mut(&self.stream);
        // SAFETY: the dimensions and leading dimensions describe buffers of the sizes given.
        unsafe { self.gemm_bf16(cfg, a, b, (pc, Out::Bf16)) };
    }

    /// cuBLAS's gemm_ex on bf16 A and B with f32 accumulation, C at `pc` in f32 or bf16.
    ///
    /// # Safety
    /// `cfg` must describe A, B and C (at `pc`, of the type `out` names) on this stream.
    unsafe fn gemm_bf16(
        &self,
        cfg: GemmConfig<f32>,
        a16: &CudaSlice<u16>,
        b16: &CudaSlice<u16>,
        (pc, out): (cudarc::driver::sys::CUdeviceptr, Out),
    ) {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        let (pa, _ga) = a16.device_ptr(&self.stream);
        let (pb, _gb) = b16.device_ptr(&self.stream);
        let c_type = match out {
            Out::F32 => cudaDataType::CUDA_R_32F,
            Out::Bf16 => cudaDataType::CUDA_R_16BF,
        };
        // SAFETY: by the caller; the scalars are f32 for CUBLAS_COMPUTE_32F.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cfg.transa,
                cfg.transb,
                cfg.m,
                cfg.n,
                cfg.k,
                &cfg.alpha as *const f32 as *const _,
                pa as *const _,
                cudaDataType::CUDA_R_16BF,
                cfg.lda,
                pb as *const _,
                cudaDataType::CUDA_R_16BF,
                cfg.ldb,
                &cfg.beta as *const f32 as *const _,
                pc as *mut _,
                c_type,
                cfg.ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .expect("cuBLAS bf16 gemm");
    }

    /// A bf16 copy of `x` (a matrix-product operand under [`MatmulPrecision::Bf16`]).
    fn to_bf16(&self, x: &CudaSlice<f32>) -> CudaSlice<u16> {
        // f32_to_bf16 writes every element
        let mut out = crate::device::alloc_output::<u16>(&self.stream, x.len());
        let n = x.len() as i64;
        launch!(
            self,
            "f32_to_bf16",
            grid(x.len().div_ceil(4)),
            &mut out,
            x,
            &n
        );
        out
    }

    /// The layer norm's backward: ∂x into `dx` (written, or added when `accumulate`), ∂w and
    /// ∂b added into theirs.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward_into(
        &self,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        c: usize,
        w: Option<&CudaSlice<f32>>,
        saved: &LayerNormSaved<CudaSlice<f32>>,
        dw: Option<&mut CudaSlice<f32>>,
        db: Option<&mut CudaSlice<f32>>,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
    ) {
        let rows = x.len() / c;
        let (ci, acc) = (c as i32, i32::from(accumulate));
        if ln_rows_in_registers(c) {
            // ∂x and the parameters' partial sums in one pass over x and ∂y
            let blocks = rows.div_ceil(LN_BWD_ROWS);
            let params = dw.is_some() || db.is_some();
            let (mut pw, mut pb) = if params {
                (Some(self.alloc(blocks * c)), Some(self.alloc(blocks * c)))
            } else {
                (None, None)
            };
            let mut l = self
                .stream
                .launch_builder(&self.fns["layer_norm_backward_rows"]);
            l.arg(dx);
            match (&mut pw, &mut pb) {
                (Some(pw), Some(pb)) => l.arg(pw).arg(pb),
                _ => l.arg(&NULL).arg(&NULL),
            };
            l.arg(x).arg(dy);
            match w {
                Some(w) => l.arg(w),
                None => l.arg(&NULL),
            };
            let r = rows as i64;
            l.arg(&saved.mean)
                .arg(&saved.rstd)
                .arg(&r)
                .arg(&ci)
                .arg(&acc);
            let cfg = LaunchConfig {
                grid_dim: (blocks.max(1) as u32, 1, 1),
                block_dim: (32 * LN_WARPS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel's declaration in ops.cu; the grid covers every
            // row, LN_BWD_ROWS a block, and the partials hold a row of c per block.
            unsafe { l.launch(cfg) }.expect("layer_norm_backward_rows");
            if let (Some(pw), Some(pb)) = (pw, pb) {
                self.fold_partials(dw, &pw, c, true);
                self.fold_partials(db, &pb, c, true);
            }
            return;
        }
        {
            let f = &self.fns["layer_norm_backward"];
            let mut l = self.stream.launch_builder(f);
            l.arg(dx).arg(x).arg(dy);
            match w {
                Some(w) => l.arg(w),
                None => l.arg(&NULL),
            };
            l.arg(&saved.mean).arg(&saved.rstd).arg(&ci).arg(&acc);
            // SAFETY: arguments match the kernel's declaration; one block per row of c.
            unsafe { l.launch(rows_cfg(rows)) }.expect("layer_norm_backward");
        }
        if dw.is_some() || db.is_some() {
            let (cols, split) = column_split(rows, c);
            let splits = cols.grid_dim.1 as usize;
            let (mut pw, mut pb) = (self.alloc(splits * c), self.alloc(splits * c));
            let r = rows as i64;
            launch!(
                self,
                "layer_norm_param_partials",
                cols,
                &mut pw,
                &mut pb,
                x,
                dy,
                &saved.mean,
                &saved.rstd,
                &r,
                &ci,
                &split
            );
            self.fold_partials(dw, &pw, c, true);
            self.fold_partials(db, &pb, c, true);
        }
    }

    /// Whether every value of a bf16 tensor is finite (one launch, one 4-byte read back).
    fn bf16_finite(&self, x: &CudaSlice<u16>) -> bool {
        let mut count = self
            .stream
            .alloc_zeros::<u32>(1)
            .expect("device allocation");
        let n = x.len() as i64;
        let blocks = x.len().div_ceil(256).clamp(1, 1024) as u32;
        launch!(
            self,
            "count_non_finite_bf16",
            LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut count,
            x,
            &n
        );
        self.stream.clone_dtoh(&count).expect("device to host copy")[0] == 0
    }

    /// ∂logits of the cross-entropy into `d` (f32 or bf16, by `kernel`): every element written.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_grad<T: cudarc::driver::DeviceRepr>(
        &self,
        kernel: &str,
        d: &mut CudaSlice<T>,
        logits: &CudaSlice<f32>,
        targets: &[u32],
        losses: &CudaSlice<f32>,
        dloss: &CudaSlice<f32>,
        vocab: usize,
        row_len: usize,
    ) {
        assert!(
            vocab <= row_len,
            "cross_entropy_backward: vocab {vocab} > row_len {row_len}"
        );
        let rows = logits.len() / row_len;
        let t = self.up_u32(targets);
        let (v, rl) = (vocab as i32, row_len as i32);
        launch!(
            self,
            kernel,
            rows_cfg(rows),
            d,
            logits,
            &t,
            losses,
            dloss,
            &v,
            &rl
        );
    }

    /// y = x·Wᵀ + b (x `[rows, cin]`, W `[cout, cin]`, y `[rows, cout]` at `py`) by cuBLASLt's
    /// bias epilogue, y and the bias f32 or bf16 ([`Out`]); false where cuBLASLt is absent or
    /// refuses the shape (nothing written then).
    ///
    /// # Safety
    /// `bias` must hold cout elements and `py` rows·cout, of the type `out` names.
    unsafe fn bias_epilogue(
        &self,
        (xo, wo): (&Operand, &Operand),
        (rows, cin, cout): (usize, usize, usize),
        bias: cudarc::driver::sys::CUdeviceptr,
        (py, out): (cudarc::driver::sys::CUdeviceptr, Out),
        residual: Option<cudarc::driver::sys::CUdeviceptr>,
    ) -> bool {
        let Some(lt) = &self.bias_gemm else {
            return false;
        };
        // row-major y[rows, cout] = x·Wᵀ  ⇔  col-major yᵀ (cout×rows) = Wᵀ(cout×cin)·xᵀ(cin×rows)
        // SAFETY: by the caller, and x, W are operands of the sizes named.
        unsafe {
            lt.run(
                &self.stream,
                self.precision(),
                (true, false),
                (cout, rows, cin),
                (wo.ptr(&self.stream), cin),
                (xo.ptr(&self.stream), cin),
                (Epilogue::Bias, bias),
                (py, cout, out),
                residual,
            )
        }
        .is_ok()
    }

    /// y (f32 `[rows, cout]`) = x·Wᵀ + b (+ `residual`, `[rows, cout]`), x as an operand: the
    /// bias and the residual in cuBLASLt's epilogue where it runs, else the bias filled in
    /// first, the product accumulated onto it and the residual added.
    #[allow(clippy::too_many_arguments)]
    fn linear_product(
        &self,
        xo: &Operand,
        rows: usize,
        w: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        cin: usize,
        cout: usize,
        residual: Option<&CudaSlice<f32>>,
    ) -> CudaSlice<f32> {
        let mut y = self.alloc(rows * cout);
        // row-major y[rows, cout] = x·Wᵀ  ⇔  col-major yᵀ (cout×rows) = Wᵀ(cout×cin)·xᵀ(cin×rows)
        let wo = self.weight_operand(w);
        let fused = b.is_some_and(|b| {
            let (pb, _gb) = b.device_ptr(&self.stream);
            let (py, _gy) = y.device_ptr_mut(&self.stream);
            let pr = residual.map(|r| {
                assert_eq!(r.len(), rows * cout, "the residual is the product's shape");
                r.device_ptr(&self.stream)
            });
            // SAFETY: the bias has cout elements, y and the residual rows×cout f32.
            unsafe {
                self.bias_epilogue(
                    (xo, &wo),
                    (rows, cin, cout),
                    pb,
                    (py, Out::F32),
                    pr.as_ref().map(|(p, _)| *p),
                )
            }
        });
        if !fused {
            if let Some(b) = b {
                let (r, c) = (rows as i64, cout as i32);
                launch!(self, "fill_rows", grid(rows * cout), &mut y, b, &r, &c);
            }
            let beta = if b.is_some() { 1.0 } else { 0.0 };
            let (ta, tb) = (Op::CUBLAS_OP_T, Op::CUBLAS_OP_N);
            self.gemm(
                ta, tb, cout, rows, cin, &wo, cin, xo, cin, beta, &mut y, cout,
            );
            if let Some(r) = residual {
                self.add_assign(&mut y, r);
            }
        }
        y
    }

    /// [`linear_forward`](Backend::linear_forward), or with `residual` its
    /// [`linear_residual_forward`](Backend::linear_residual_forward): the product, and the bf16
    /// copy of x for the backward (its ∂W product).
    #[allow(clippy::too_many_arguments)]
    fn linear_saved(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        cin: usize,
        cout: usize,
        residual: Option<&CudaSlice<f32>>,
    ) -> (CudaSlice<f32>, LinearSaved) {
        let xo = self.operand(x);
        let y = self.linear_product(&xo, x.len() / cin, w, b, cin, cout, residual);
        let saved = xo.bf16.map(|x16| Arc::new(x16.into_owned()) as Saved);
        (y, saved)
    }

    /// y = x·Wᵀ + b written once in bf16 (`[rows, cout]`; the bias rounded to bf16 too, as
    /// under PyTorch's autocast): a layer whose output only feeds bf16 consumers.
    fn linear_to_bf16(
        &self,
        xo: &Operand,
        rows: usize,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        cin: usize,
        cout: usize,
    ) -> CudaSlice<u16> {
        let mut y = crate::device::alloc_output::<u16>(&self.stream, rows * cout);
        let wo = self.weight_operand(w);
        let b16 = self
            .held_bf16(b)
            .unwrap_or_else(|| Arc::new(self.to_bf16(b)));
        let ok = {
            let (pb, _gb) = b16.device_ptr(&self.stream);
            let (py, _gy) = y.device_ptr_mut(&self.stream);
            // SAFETY: the bias has cout elements, y rows×cout bf16.
            unsafe { self.bias_epilogue((xo, &wo), (rows, cin, cout), pb, (py, Out::Bf16), None) }
        };
        if ok {
            return y;
        }
        self.to_bf16(&self.linear_product(xo, rows, w, Some(b), cin, cout, None))
    }

    /// The GELU of bf16 `x`, or with `dy` its backward, in bf16.
    fn gelu_bf16(&self, x: &CudaSlice<u16>, dy: Option<&CudaSlice<u16>>) -> CudaSlice<u16> {
        // both kernels write every element, two a thread
        let mut out = crate::device::alloc_output::<u16>(&self.stream, x.len());
        let (n, cfg) = (x.len() as i64, grid(x.len().div_ceil(2)));
        match dy {
            None => launch!(self, "gelu_forward_bf16", cfg, &mut out, x, &n),
            Some(dy) => launch!(self, "gelu_backward_bf16", cfg, &mut out, x, dy, &n),
        }
        out
    }

    /// ∂x = ∂y·W of a linear layer (x `[rows, cin]`, W `[cout, cin]`), ∂y as an operand.
    fn input_grad(
        &self,
        w: &CudaSlice<f32>,
        dyo: &Operand,
        rows: usize,
        cin: usize,
        cout: usize,
    ) -> CudaSlice<f32> {
        let mut dx = self.alloc(rows * cin);
        // dx[rows, cin] = dy·W  ⇔  dxᵀ (cin×rows) = W_cm (cin×cout) · dyᵀ (cout×rows)
        let (wo, n) = (self.operand(w), Op::CUBLAS_OP_N);
        self.gemm(
            n, n, cin, rows, cout, &wo, cin, dyo, cout, 0.0, &mut dx, cin,
        );
        dx
    }

    /// Adds ∂W += ∂yᵀ·x, and ∂b += Σ_rows ∂y — in the product's epilogue where cuBLASLt offers
    /// it, else by a column-sum pass over ∂y in f32 (or, for a ∂y only in bf16, a product
    /// with ones).
    #[allow(clippy::too_many_arguments)]
    fn weight_grads(
        &self,
        xo: &Operand,
        dyo: &Operand,
        rows: usize,
        cin: usize,
        cout: usize,
        dw: &mut CudaSlice<f32>,
        db: Option<&mut CudaSlice<f32>>,
    ) {
        // dW[cout, cin] += dyᵀ·x  ⇔  dW_cm (cin×cout) += xᵀ_cm (cin×rows) · dy_cm (rows×cout)
        let db = match (db, &self.bias_gemm) {
            (Some(db), Some(lt)) => {
                // written by the epilogue: through a scratch vector and added, as gradients
                // accumulate over micro-batches
                let mut sums = self.alloc(cout);
                let fused = {
                    let (ps, _gs) = sums.device_ptr_mut(&self.stream);
                    let (pw, _gw) = dw.device_ptr_mut(&self.stream);
                    // SAFETY: x is rows×cin and dy rows×cout (row-major), dW cout×cin, the
                    // sums cout.
                    unsafe {
                        lt.run(
                            &self.stream,
                            self.precision(),
                            (false, true),
                            (cin, cout, rows),
                            (xo.ptr(&self.stream), cin),
                            (dyo.ptr(&self.stream), cout),
                            (Epilogue::BiasGrad, ps),
                            (pw, cin, Out::F32),
                            None,
                        )
                    }
                    .is_ok()
                };
                if fused {
                    self.add_assign(db, &sums);
                    return;
                }
                Some(db)
            }
            (db, _) => db,
        };
        let (n, t) = (Op::CUBLAS_OP_N, Op::CUBLAS_OP_T);
        self.gemm(n, t, cin, cout, rows, xo, cin, dyo, cout, 1.0, dw, cin);
        match (db, dyo.f32) {
            (Some(db), Some(dy)) => self.column_sums(dy, cout, db, true),
            (Some(db), None) => {
                // db (cout×1) += dy_cm (cout×rows) · 1 (rows×1)
                let ones = self
                    .stream
                    .clone_htod(&vec![0x3f80u16; rows])
                    .expect("host to device copy");
                let onesb = Operand::bf16_only(Cow::Owned(ones));
                self.gemm(
                    Op::CUBLAS_OP_N,
                    Op::CUBLAS_OP_N,
                    cout,
                    1,
                    rows,
                    dyo,
                    cout,
                    &onesb,
                    rows,
                    1.0,
                    db,
                    cout,
                );
            }
            (None, _) => {}
        }
    }

    /// The two products of a linear layer's backward, given ∂y as an operand: returns
    /// ∂x = ∂y·W and adds ∂yᵀ·x into ∂W (and Σ_rows ∂y into ∂b).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward_products(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dyo: &Operand,
        cin: usize,
        cout: usize,
        dw: &mut CudaSlice<f32>,
        db: Option<&mut CudaSlice<f32>>,
        saved: &LinearSaved,
    ) -> CudaSlice<f32> {
        let rows = x.len() / cin;
        let dx = self.input_grad(w, dyo, rows, cin, cout);
        let xo = self.saved_operand(x, saved);
        self.weight_grads(&xo, dyo, rows, cin, cout, dw, db);
        dx
    }

    /// The multi-tensor kernels' table (`SquaresChunk`s: address, length) over `ptrs` (device
    /// address, length of each tensor), and how many chunks each tensor has.
    fn chunk_table(ptrs: impl Iterator<Item = (u64, usize)>) -> (Vec<u64>, Vec<usize>) {
        let mut table: Vec<u64> = Vec::new();
        let mut per_tensor = Vec::new();
        for (ptr, n) in ptrs {
            let before = table.len() / 2;
            for (o, len) in chunks(n) {
                table.extend([ptr + 4 * o as u64, len as u64]);
            }
            per_tensor.push(table.len() / 2 - before);
        }
        (table, per_tensor)
    }

    /// Σx² of each tensor, in double: one launch over all their chunks, one copy back, the
    /// chunks' partial sums added on the host in order (deterministic).
    fn sums_of_squares(&self, xs: &[&CudaSlice<f32>]) -> Vec<f64> {
        let (table, per_tensor) =
            Self::chunk_table(xs.iter().map(|x| (x.device_ptr(&self.stream).0, x.len())));
        if table.is_empty() {
            return vec![0.0; xs.len()];
        }
        let table_dev = self.stream.clone_htod(&table).expect("host to device copy");
        let mut partial = crate::device::alloc_output::<f64>(&self.stream, table.len() / 2);
        launch!(
            self,
            "sum_squares",
            rows_cfg(table.len() / 2),
            &mut partial,
            &table_dev
        );
        let host = self
            .stream
            .clone_dtoh(&partial)
            .expect("device to host copy");
        let mut at = 0;
        per_tensor
            .iter()
            .map(|&k| {
                at += k;
                host[at - k..at].iter().sum()
            })
            .collect()
    }

    /// Column sums of `x` (`[rows, c]`) into `out` (added to it if `accumulate`): per-split
    /// partials, then a fold in a fixed order (deterministic).
    fn column_sums(
        &self,
        x: &CudaSlice<f32>,
        c: usize,
        out: &mut CudaSlice<f32>,
        accumulate: bool,
    ) {
        let rows = x.len() / c;
        let (cols, split) = column_split(rows, c);
        let mut partial = self.alloc(cols.grid_dim.1 as usize * c);
        let (r, ci) = (rows as i64, c as i32);
        launch!(
            self,
            "column_partials",
            cols,
            &mut partial,
            x,
            &r,
            &ci,
            &split
        );
        self.fold_partials(Some(out), &partial, c, accumulate);
    }

    /// `out` (+)= the column sums of `partial` (`[splits, c]`, from a column-partials kernel).
    fn fold_partials(
        &self,
        out: Option<&mut CudaSlice<f32>>,
        partial: &CudaSlice<f32>,
        c: usize,
        accumulate: bool,
    ) {
        let Some(out) = out else { return };
        let (splits, ci, acc) = ((partial.len() / c) as i32, c as i32, i32::from(accumulate));
        launch!(
            self,
            "fold_partials",
            grid(c),
            out,
            partial,
            &splits,
            &ci,
            &acc
        );
    }

    /// Makes this GPU's context current on the calling thread (a rank's thread calls this
    /// before its first op).
    pub fn bind_to_thread(&self) -> Result<(), crate::Unavailable> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| crate::Unavailable::Driver(e.to_string()))
    }

    /// Copies columns `col0..col0+w` of a `[rows, total]` matrix into a `[rows, w]` one
    /// (`into_wide = false`: `dst` is the narrow one), or back (`into_wide = true`: `dst` is
    /// the wide one, `src` the narrow).
    #[allow(clippy::too_many_arguments)]
    fn copy_columns(
        &self,
        dst: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
        rows: usize,
        total: usize,
        col0: usize,
        w: usize,
        into_wide: bool,
    ) {
        let (r, t, c0, wi, dir) = (
            rows as i64,
            total as i32,
            col0 as i32,
            w as i32,
            i32::from(into_wide),
        );
        launch!(
            self,
            "copy_columns",
            grid(rows * w),
            dst,
            src,
            &r,
            &t,
            &c0,
            &wi,
            &dir
        );
    }

    /// The stream every op of this backend runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's context (for kernels outside this backend).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

/// Scalar arguments of the attention kernels.
struct AttnArgs {
    b: i32,
    t: i32,
    h: i32,
    d: i32,
    e: i32,
    scale: f32,
    power: i32,
    eps: f32,
}

impl AttnArgs {
    fn new(spec: &AttentionSpec, s: &Shape) -> Self {
        let power = match spec.kernel {
            sympow::attention::Kernel::Power(p) => p as i32,
            sympow::attention::Kernel::Softmax => 0,
        };
        AttnArgs {
            b: s.batch as i32,
            t: s.time as i32,
            h: s.heads as i32,
            d: s.dk as i32,
            e: s.dv as i32,
            scale: spec.scale as f32,
            power,
            eps: spec.eps as f32,
        }
    }
}

/// The inputs both attention backward kernels take after their outputs: q, k, v, the gates
/// (or null), the log-normalisers, dy, D = dy·y, then the shape and spec.
fn attention_inputs<'a>(
    l: &mut cudarc::driver::LaunchArgs<'a>,
    qkv: [&'a CudaSlice<f32>; 3],
    log_gates: Option<&'a CudaSlice<f32>>,
    rows: [&'a CudaSlice<f32>; 3],
    a: &'a AttnArgs,
) {
    for t in qkv {
        l.arg(t);
    }
    match log_gates {
        Some(g) => l.arg(g),
        None => l.arg(&NULL),
    };
    for t in rows {
        l.arg(t);
    }
    l.arg(&a.b)
        .arg(&a.t)
        .arg(&a.h)
        .arg(&a.d)
        .arg(&a.e)
        .arg(&a.scale)
        .arg(&a.power);
}

impl CudaBackend {
    /// Whether the GPU attention kernels take this shape (else the host does).
    fn gpu_attention(&self, s: &Shape) -> bool {
        s.time <= GPU_ATTENTION_MAX_T
            && s.dk <= GPU_ATTENTION_MAX_DIM
            && s.dv <= GPU_ATTENTION_MAX_DIM
    }
}

/// A weight's bf16 copy kept by [`Backend::hold_weights`], and its holds.
struct Held {
    holds: usize,
    bf16: Arc<CudaSlice<u16>>,
}

/// A recorded sequence of ops ([`Backend::record`]): a CUDA graph on the backend's stream.
pub struct CudaRecording(Mutex<GraphCell>);

struct GraphCell(cudarc::driver::CudaGraph);

// SAFETY: a CUDA graph may be used from any thread, one call at a time (the driver's rule for
// graph objects), which the recording's mutex ensures.
unsafe impl Send for GraphCell {}

impl Backend for CudaBackend {
    type Scalar = f32;
    type Tensor = CudaSlice<f32>;
    type DecodeState = CudaDecodeState;
    type KvCache = CudaKvCache;
    type Recording = CudaRecording;

    fn name(&self) -> String {
        format!("cuda ({})", self.name)
    }
    fn upload(&self, data: &[f32]) -> CudaSlice<f32> {
        let _p = self.prof("upload");
        if data.is_empty() {
            return self.alloc(0);
        }
        self.stream.clone_htod(data).expect("host to device copy")
    }
    fn download(&self, t: &CudaSlice<f32>) -> Vec<f32> {
        let _p = self.prof("download");
        self.stream.clone_dtoh(t).expect("device to host copy")
    }
    fn download_into(&self, t: &CudaSlice<f32>, out: &mut [f32]) {
        let _p = self.prof("download");
        assert_eq!(
            out.len(),
            t.len(),
            "download_into: buffer of the wrong length"
        );
        // pageable destination: returns when the copy is done
        self.stream
            .memcpy_dtoh(t, out)
            .expect("device to host copy");
    }
    fn zeros(&self, len: usize) -> CudaSlice<f32> {
        let _p = self.prof("zeros");
        self.alloc_zeroed(len)
    }
    fn copy_into(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) {
        let _p = self.prof("copy_into");
        assert_eq!(dst.len(), src.len(), "copy_into: length mismatch");
        self.stream
            .memcpy_dtod(src, dst)
            .expect("device to device copy");
    }
    fn add_assign(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) {
        let _p = self.prof("add_assign");
        let n = dst.len() as i64;
        launch!(self, "add_assign", grid(n as usize), dst, src, &n);
    }
    fn mul(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> CudaSlice<f32> {
        let _p = self.prof("mul");
        let n = a.len() as i64;
        let mut out = self.alloc(a.len());
        launch!(self, "mul", grid(n as usize), &mut out, a, b, &n);
        out
    }
    fn broadcast_rows(&self, row: &CudaSlice<f32>, rows: usize) -> CudaSlice<f32> {
        let _p = self.prof("broadcast_rows");
        let (r, c) = (rows as i64, row.len() as i32);
        let mut out = self.alloc(rows * row.len());
        launch!(
            self,
            "broadcast_rows",
            grid(rows * row.len()),
            &mut out,
            row,
            &r,
            &c
        );
        out
    }
    fn sum_rows(&self, x: &CudaSlice<f32>, c: usize) -> CudaSlice<f32> {
        let _p = self.prof("sum_rows");
        let mut out = self.alloc(c);
        self.column_sums(x, c, &mut out, false);
        out
    }
    fn sum_squares(&self, x: &CudaSlice<f32>) -> f64 {
        let _p = self.prof("sum_squares");
        self.sums_of_squares(&[x])[0]
    }
    fn zero_all(&self, xs: &mut [&mut CudaSlice<f32>]) {
        let _p = self.prof("zero_all");
        let (table, _) = Self::chunk_table(xs.iter_mut().map(|x| {
            let n = x.len();
            (x.device_ptr_mut(&self.stream).0, n)
        }));
        if table.is_empty() {
            return;
        }
        let table_dev = self.stream.clone_htod(&table).expect("host to device copy");
        launch!(self, "zero_chunks", rows_cfg(table.len() / 2), &table_dev);
    }
    fn sum_squares_each(&self, xs: &[&CudaSlice<f32>]) -> Vec<f64> {
        let _p = self.prof("sum_squares_each");
        self.sums_of_squares(xs)
    }
    fn split_columns(&self, x: &CudaSlice<f32>, widths: &[usize]) -> Vec<CudaSlice<f32>> {
        let _p = self.prof("split_columns");
        (0..widths.len())
            .map(|i| self.column_block(x, widths, i))
            .collect()
    }
    fn concat_columns(&self, parts: &[&CudaSlice<f32>], widths: &[usize]) -> CudaSlice<f32> {
        let _p = self.prof("concat_columns");
        let total: usize = widths.iter().sum();
        let rows = parts[0].len() / widths[0].max(1);
        let mut out = self.alloc(rows * total);
        let mut col0 = 0;
        for (p, &w) in parts.iter().zip(widths) {
            self.copy_columns(&mut out, p, rows, total, col0, w, true);
            col0 += w;
        }
        out
    }
    fn linear_backward_columns(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dy_parts: &[&CudaSlice<f32>],
        widths: &[usize],
        cin: usize,
        dw: &mut CudaSlice<f32>,
        db: Option<&mut CudaSlice<f32>>,
        saved: &LinearSaved,
    ) -> CudaSlice<f32> {
        let cout: usize = widths.iter().sum();
        if self.precision() != MatmulPrecision::Bf16 {
            let dy = self.concat_columns(dy_parts, widths);
            return self.linear_backward(x, w, &dy, cin, cout, dw, db, saved);
        }
        let _p = self.prof("linear_backward");
        let rows = x.len() / cin;
        // every column block written: the whole operand
        let mut dy16 = crate::device::alloc_output::<u16>(&self.stream, rows * cout);
        let mut col0 = 0;
        for (p, &w) in dy_parts.iter().zip(widths) {
            let (r, t, c0, wi) = (rows as i64, cout as i32, col0 as i32, w as i32);
            let cfg = grid(rows * w);
            launch!(
                self,
                "copy_columns_to_bf16",
                cfg,
                &mut dy16,
                *p,
                &r,
                &t,
                &c0,
                &wi
            );
            col0 += w;
        }
        let dyo = Operand::bf16_only(Cow::Owned(dy16));
        self.linear_backward_products(x, w, &dyo, cin, cout, dw, db, saved)
    }
    fn linear_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        cin: usize,
        cout: usize,
    ) -> (CudaSlice<f32>, LinearSaved) {
        let _p = self.prof("linear_forward");
        self.linear_saved(x, w, b, cin, cout, None)
    }
    fn linear_residual_forward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        residual: &CudaSlice<f32>,
        cin: usize,
        cout: usize,
    ) -> (CudaSlice<f32>, LinearSaved) {
        let _p = self.prof("linear_residual_forward");
        self.linear_saved(x, w, b, cin, cout, Some(residual))
    }
    fn linear_backward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        cin: usize,
        cout: usize,
        dw: &mut CudaSlice<f32>,
        db: Option<&mut CudaSlice<f32>>,
        saved: &LinearSaved,
    ) -> CudaSlice<f32> {
        let _p = self.prof("linear_backward");
        // dy feeds both products: one bf16 copy
        self.linear_backward_products(x, w, &self.operand(dy), cin, cout, dw, db, saved)
    }
    fn layer_norm_forward(
        &self,
        x: &CudaSlice<f32>,
        c: usize,
        w: Option<&CudaSlice<f32>>,
        b: Option<&CudaSlice<f32>>,
    ) -> (CudaSlice<f32>, LayerNormSaved<CudaSlice<f32>>) {
        let _p = self.prof("layer_norm_forward");
        let rows = x.len() / c;
        let (mut y, mut mean, mut rstd) = (self.alloc(x.len()), self.alloc(rows), self.alloc(rows));
        let (ci, eps) = (c as i32, sympow::ops::layer_norm::LN_EPS as f32);
        let by_warp = ln_rows_in_registers(c);
        let name = if by_warp {
            "layer_norm_forward_rows"
        } else {
            "layer_norm_forward"
        };
        let mut l = self.stream.launch_builder(&self.fns[name]);
        l.arg(&mut y).arg(&mut mean).arg(&mut rstd).arg(x);
        match w {
            Some(w) => l.arg(w),
            None => l.arg(&NULL),
        };
        match b {
            Some(b) => l.arg(b),
            None => l.arg(&NULL),
        };
        let r = rows as i64;
        if by_warp {
            l.arg(&r);
        }
        l.arg(&ci).arg(&eps);
        // a warp a row (8 a block), or a block a row
        let cfg = if by_warp {
            grid(rows * 32)
        } else {
            rows_cfg(rows)
        };
        // SAFETY: arguments match the kernel's declaration in ops.cu; the grid covers every row.
        unsafe { l.launch(cfg) }.expect(name);
        (y, LayerNormSaved { mean, rstd })
    }
    fn layer_norm_backward(
        &self,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        c: usize,
        w: Option<&CudaSlice<f32>>,
        saved: &LayerNormSaved<CudaSlice<f32>>,
        dw: Option<&mut CudaSlice<f32>>,
        db: Option<&mut CudaSlice<f32>>,
    ) -> CudaSlice<f32> {
        let _p = self.prof("layer_norm_backward");
        // the kernel writes every element
        let mut dx = self.alloc(x.len());
        self.layer_norm_backward_into(x, dy, c, w, saved, dw, db, &mut dx, false);
        dx
    }
    fn layer_norm_backward_add(
        &self,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        c: usize,
        w: Option<&CudaSlice<f32>>,
        saved: &LayerNormSaved<CudaSlice<f32>>,
        dw: Option<&mut CudaSlice<f32>>,
        db: Option<&mut CudaSlice<f32>>,
        dx: &mut CudaSlice<f32>,
    ) {
        let _p = self.prof("layer_norm_backward");
        self.layer_norm_backward_into(x, dy, c, w, saved, dw, db, dx, true);
    }
    fn gelu_forward(&self, x: &CudaSlice<f32>) -> CudaSlice<f32> {
        let _p = self.prof("gelu_forward");
        let n = x.len() as i64;
        let mut y = self.alloc(x.len());
        launch!(self, "gelu_forward", grid(x.len()), &mut y, x, &n);
        y
    }
    fn gelu_backward(&self, x: &CudaSlice<f32>, dy: &CudaSlice<f32>) -> CudaSlice<f32> {
        let _p = self.prof("gelu_backward");
        let n = x.len() as i64;
        let mut dx = self.alloc(x.len());
        launch!(self, "gelu_backward", grid(x.len()), &mut dx, x, dy, &n);
        dx
    }
    fn mlp_hidden_finite(&self, saved: &MlpSaved<CudaSlice<f32>>) -> bool {
        let _p = self.prof("mlp_hidden_finite");
        let bf16 = saved
            .fc2_saved
            .as_ref()
            .and_then(|s| s.downcast_ref::<Bf16Hidden>());
        match (&saved.hidden, bf16) {
            (Some((h, g)), _) => self.sum_squares_each(&[h, g]).iter().all(|s| s.is_finite()),
            (None, Some(hid)) => self.bf16_finite(&hid.h) && self.bf16_finite(&hid.g),
            (None, None) => true,
        }
    }
    fn mlp_forward(
        &self,
        x: &CudaSlice<f32>,
        w: MlpWeights<'_, CudaSlice<f32>>,
        c: usize,
        hidden: usize,
        residual: Option<&CudaSlice<f32>>,
    ) -> (CudaSlice<f32>, MlpSaved<CudaSlice<f32>>) {
        if self.precision() != MatmulPrecision::Bf16 {
            return mlp_forward_ops(self, x, w, c, hidden, residual);
        }
        let _p = self.prof("mlp_forward");
        let rows = x.len() / c;
        let xo = self.operand(x);
        let h = self.linear_to_bf16(&xo, rows, w.fc_w, w.fc_b, c, hidden);
        let g = self.gelu_bf16(&h, None);
        let go = Operand::bf16_only(Cow::Borrowed(&g));
        let y = self.linear_product(&go, rows, w.fc2_w, Some(w.fc2_b), hidden, c, residual);
        drop(go);
        let saved = MlpSaved {
            hidden: None,
            fc_saved: xo.bf16.map(|x16| Arc::new(x16.into_owned()) as Saved),
            fc2_saved: Some(Arc::new(Bf16Hidden { h, g })),
        };
        (y, saved)
    }
    fn mlp_backward(
        &self,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        w: MlpWeights<'_, CudaSlice<f32>>,
        c: usize,
        hidden: usize,
        saved: &MlpSaved<CudaSlice<f32>>,
        g: MlpGrads<'_, CudaSlice<f32>>,
    ) -> CudaSlice<f32> {
        let hid = saved
            .fc2_saved
            .as_ref()
            .and_then(|s| s.downcast_ref::<Bf16Hidden>());
        let (Some(hid), MatmulPrecision::Bf16) = (hid, self.precision()) else {
            return mlp_backward_ops(self, x, dy, w, c, hidden, saved, g);
        };
        let _p = self.prof("mlp_backward");
        let rows = x.len() / c;
        let dyo = self.operand(dy);
        let dy16 = dyo.bf16.as_deref().expect("bf16 operands");
        // ∂g = ∂y·W2 (as input_grad), written in bf16 for the GELU's backward only
        let mut dg = crate::device::alloc_output::<u16>(&self.stream, rows * hidden);
        let (n, w2) = (Op::CUBLAS_OP_N, self.to_bf16(w.fc2_w));
        self.gemm_to_bf16(
            (n, n),
            (hidden, rows, c),
            (&w2, hidden),
            (dy16, c),
            &mut dg,
            hidden,
        );
        let go = Operand::bf16_only(Cow::Borrowed(&hid.g));
        self.weight_grads(&go, &dyo, rows, hidden, c, g.fc2_w, Some(g.fc2_b));
        let dho = Operand::bf16_only(Cow::Owned(self.gelu_bf16(&hid.h, Some(&dg))));
        let dx = self.input_grad(w.fc_w, &dho, rows, c, hidden);
        let xo = self.saved_operand(x, &saved.fc_saved);
        self.weight_grads(&xo, &dho, rows, c, hidden, g.fc_w, Some(g.fc_b));
        dx
    }
    fn embedding_forward(&self, table: &CudaSlice<f32>, ids: &[u32], c: usize) -> CudaSlice<f32> {
        let _p = self.prof("embedding_forward");
        let vocab = table.len() / c;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            panic!("token id {bad} out of range for vocabulary of {vocab}");
        }
        let d_ids = self.up_u32(ids);
        let (n, ci) = (ids.len() as i64, c as i32);
        let mut out = self.alloc(ids.len() * c);
        launch!(
            self,
            "embedding_forward",
            grid(ids.len() * c),
            &mut out,
            table,
            &d_ids,
            &n,
            &ci
        );
        out
    }
    fn embedding_backward(
        &self,
        dtable: &mut CudaSlice<f32>,
        ids: &[u32],
        dout: &CudaSlice<f32>,
        c: usize,
    ) {
        let _p = self.prof("embedding_backward");
        // rows grouped by id, ascending within a group (see the kernel)
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_unstable_by_key(|&r| (ids[r as usize], r));
        let (mut uniq, mut offsets) = (Vec::new(), Vec::new());
        for (i, &r) in order.iter().enumerate() {
            if uniq.last() != Some(&ids[r as usize]) {
                uniq.push(ids[r as usize]);
                offsets.push(i as u32);
            }
        }
        offsets.push(order.len() as u32);
        if uniq.is_empty() {
            return;
        }
        let (u, o, r) = (
            self.up_u32(&uniq),
            self.up_u32(&offsets),
            self.up_u32(&order),
        );
        let ci = c as i32;
        let cfg = LaunchConfig {
            grid_dim: (uniq.len() as u32, c.div_ceil(BLOCK as usize) as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "embedding_backward",
            cfg,
            dtable,
            &u,
            &o,
            &r,
            dout,
            &ci
        );
    }
    fn fixed_rotary_angles(
        &self,
        batch: usize,
        time: usize,
        heads: usize,
        head_dim: usize,
        base: f64,
        start: usize,
    ) -> CudaSlice<f32> {
        let _p = self.prof("fixed_rotary_angles");
        let n = batch * time * heads * head_dim / 2;
        let mut out = self.alloc(n);
        let (b, t, h, half, st) = (
            batch as i32,
            time as i32,
            heads as i32,
            (head_dim / 2) as i32,
            start as i64,
        );
        launch!(
            self,
            "fixed_rotary_angles",
            grid(n),
            &mut out,
            &b,
            &t,
            &h,
            &half,
            &base,
            &st
        );
        out
    }
    fn learned_rotary_angles(
        &self,
        logits: &CudaSlice<f32>,
        shape: &Shape,
        param: RotaryParam,
        base: f64,
        start: Option<&CudaSlice<f32>>,
    ) -> CudaSlice<f32> {
        let _p = self.prof("learned_rotary_angles");
        assert!(
            shape.dk <= 128,
            "the CUDA learned-rotary angles support head_dim ≤ 128"
        );
        let half = shape.dk / 2;
        let mut out = self.alloc(shape.batch * shape.time * shape.heads * half);
        let (b, t, h, hf, r) = (
            shape.batch as i32,
            shape.time as i32,
            shape.heads as i32,
            half as i32,
            param.logits_per_head(shape.dk) as i32,
        );
        // enough blocks to fill the GPU, at least 64 steps a slice (8 per warp)
        let bh = shape.batch * shape.heads;
        let (cfg, slices, sp) = time_slices(bh, shape.time, 264, 64);
        // each slice's Σ per frequency, written by its block (read by the later slices)
        let mut part = crate::device::alloc_output::<f64>(&self.stream, bh * slices * half);
        if slices > 1 {
            launch!(
                self,
                "learned_rotary_angle_slice_sums",
                cfg,
                &mut part,
                logits,
                &b,
                &t,
                &h,
                &hf,
                &r,
                &base,
                &sp
            );
        }
        let f = &self.fns["learned_rotary_angles"];
        let mut l = self.stream.launch_builder(f);
        l.arg(&mut out).arg(logits);
        match start {
            Some(s) => l.arg(s),
            None => l.arg(&NULL),
        };
        l.arg(&part)
            .arg(&b)
            .arg(&t)
            .arg(&h)
            .arg(&hf)
            .arg(&r)
            .arg(&base)
            .arg(&sp);
        // SAFETY: arguments match the declaration; grid (batch·head, slices) of 256 threads.
        unsafe { l.launch(cfg) }.expect("learned_rotary_angles");
        out
    }
    fn learned_rotary_angles_backward(
        &self,
        logits: &CudaSlice<f32>,
        dangles: &CudaSlice<f32>,
        shape: &Shape,
        param: RotaryParam,
        base: f64,
    ) -> CudaSlice<f32> {
        let _p = self.prof("learned_rotary_angles_backward");
        assert!(
            shape.dk <= 128,
            "the CUDA learned-rotary backward supports head_dim ≤ 128"
        );
        let r = param.logits_per_head(shape.dk);
        let scans = shape.batch * shape.heads * r;
        // enough blocks to fill the GPU, at least a step per thread
        let (cfg, slices, sp) = time_slices(scans, shape.time, 1024, 256);
        // each slice's Σ u, written by its block
        let mut part = crate::device::alloc_output::<f64>(&self.stream, scans * slices);
        let mut out = self.alloc(logits.len());
        let (b, t, h, hf, ri) = (
            shape.batch as i32,
            shape.time as i32,
            shape.heads as i32,
            (shape.dk / 2) as i32,
            r as i32,
        );
        launch!(
            self,
            "learned_rotary_slice_sums",
            cfg,
            &mut part,
            dangles,
            &b,
            &t,
            &h,
            &hf,
            &ri,
            &base,
            &sp
        );
        launch!(
            self,
            "learned_rotary_angles_backward",
            cfg,
            &mut out,
            logits,
            dangles,
            &part,
            &b,
            &t,
            &h,
            &hf,
            &ri,
            &base,
            &sp
        );
        out
    }
    fn rotary_forward(
        &self,
        x: &CudaSlice<f32>,
        angles: &CudaSlice<f32>,
        head_dim: usize,
    ) -> CudaSlice<f32> {
        let _p = self.prof("rotary_forward");
        let rows = x.len() / head_dim;
        let mut y = self.alloc(x.len());
        let (r, d) = (rows as i64, head_dim as i32);
        launch!(
            self,
            "rotary_forward",
            grid(rows * head_dim / 2),
            &mut y,
            x,
            angles,
            &r,
            &d
        );
        y
    }
    fn rotary_backward(
        &self,
        dy: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        angles: &CudaSlice<f32>,
        head_dim: usize,
    ) -> (CudaSlice<f32>, CudaSlice<f32>) {
        let _p = self.prof("rotary_backward");
        let rows = dy.len() / head_dim;
        let (mut dx, mut da) = (self.alloc(dy.len()), self.alloc(angles.len()));
        let (r, d) = (rows as i64, head_dim as i32);
        launch!(
            self,
            "rotary_backward",
            grid(rows * head_dim / 2),
            &mut dx,
            &mut da,
            dy,
            y,
            angles,
            &r,
            &d
        );
        (dx, da)
    }
    fn column_block(&self, x: &CudaSlice<f32>, widths: &[usize], i: usize) -> CudaSlice<f32> {
        let _p = self.prof("column_block");
        let (total, col0): (usize, usize) = (widths.iter().sum(), widths[..i].iter().sum());
        let rows = x.len() / total;
        let mut part = self.alloc(rows * widths[i]);
        self.copy_columns(&mut part, x, rows, total, col0, widths[i], false);
        part
    }
    fn qkv_rotary_gate_forward(
        &self,
        qkv: &CudaSlice<f32>,
        widths: &[usize],
        head_dim: usize,
        angles: Option<&CudaSlice<f32>>,
        gate: Option<usize>,
    ) -> QkvInputs<CudaSlice<f32>> {
        let _p = self.prof("qkv_rotary_gate_forward");
        let (total, c) = (widths.iter().sum::<usize>(), widths[0]);
        assert!(
            widths[1] == c
                && widths[2] == c
                && c.is_multiple_of(head_dim)
                && head_dim.is_multiple_of(2),
            "q, k and v are the first three blocks, heads·head_dim wide (even head_dim)"
        );
        let rows = qkv.len() / total;
        let (g0, g) = gate.map_or((0, 0), |i| (widths[..i].iter().sum(), widths[i]));
        assert!(
            g <= c / 2,
            "the gate's block is at most heads·head_dim/2 wide"
        );
        let (mut qr, mut kr, mut v) = (
            self.alloc(rows * c),
            self.alloc(rows * c),
            self.alloc(rows * c),
        );
        let (mut glog, mut lg) = (self.alloc(rows * g), self.alloc(rows * g));
        let (r, w, ci, g0i, gi) = (rows as i64, total as i32, c as i32, g0 as i32, g as i32);
        let f = &self.fns["qkv_rotary_gate_forward"];
        let mut l = self.stream.launch_builder(f);
        l.arg(&mut qr)
            .arg(&mut kr)
            .arg(&mut v)
            .arg(&mut glog)
            .arg(&mut lg)
            .arg(qkv);
        match angles {
            Some(a) => l.arg(a),
            None => l.arg(&NULL),
        };
        l.arg(&r).arg(&w).arg(&ci).arg(&g0i).arg(&gi);
        // SAFETY: arguments match the declaration in kernels/ops.cu; a thread per rotary pair of
        // each row, every index within qkv ([rows, total]) and the outputs sized above.
        unsafe { l.launch(grid(rows * c / 2)) }.expect("qkv_rotary_gate_forward");
        let (gate_logits, log_gates) = match gate {
            Some(_) => (Some(glog), Some(lg)),
            None => (None, None),
        };
        QkvInputs {
            qr,
            kr,
            v,
            gate_logits,
            log_gates,
        }
    }
    fn qkv_rotary_gate_backward(
        &self,
        dqr: CudaSlice<f32>,
        dkr: CudaSlice<f32>,
        qr: &CudaSlice<f32>,
        kr: &CudaSlice<f32>,
        angles: Option<&CudaSlice<f32>>,
        head_dim: usize,
        gate: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>,
    ) -> QkvInputGrads<CudaSlice<f32>> {
        let _p = self.prof("qkv_rotary_gate_backward");
        let Some(a) = angles else {
            // nothing to rotate back: ∂q and ∂k pass through
            let dgate_logits = gate.map(|(logits, dlg)| self.log_gate_backward(logits, dlg));
            return QkvInputGrads {
                dq: dqr,
                dk: dkr,
                dangles: None,
                dgate_logits,
            };
        };
        let pairs = a.len();
        assert!(
            dqr.len() == 2 * pairs && dkr.len() == 2 * pairs && head_dim.is_multiple_of(2),
            "∂q and ∂k: two values a rotary angle"
        );
        let ng = gate.map_or(0, |(logits, dlg)| {
            assert!(dlg.len() == logits.len() && logits.len() <= pairs);
            logits.len()
        });
        let (mut dq, mut dk) = (self.alloc(2 * pairs), self.alloc(2 * pairs));
        let (mut dang, mut dglog) = (self.alloc(pairs), self.alloc(ng));
        let (pi, ni) = (pairs as i64, ng as i64);
        let f = &self.fns["qkv_rotary_gate_backward"];
        let mut l = self.stream.launch_builder(f);
        l.arg(&mut dq)
            .arg(&mut dk)
            .arg(&mut dang)
            .arg(&mut dglog)
            .arg(&dqr)
            .arg(&dkr)
            .arg(qr)
            .arg(kr)
            .arg(a);
        match gate {
            Some((logits, dlg)) => l.arg(logits).arg(dlg),
            None => l.arg(&NULL).arg(&NULL),
        };
        l.arg(&pi).arg(&ni);
        // SAFETY: arguments match the declaration in kernels/ops.cu; a thread per rotary pair,
        // every buffer sized by `pairs` or `ng` (≤ pairs) as allocated or asserted above.
        unsafe { l.launch(grid(pairs)) }.expect("qkv_rotary_gate_backward");
        QkvInputGrads {
            dq,
            dk,
            dangles: Some(dang),
            dgate_logits: gate.map(|_| dglog),
        }
    }
    fn log_gate_forward(&self, logits: &CudaSlice<f32>) -> CudaSlice<f32> {
        let _p = self.prof("log_gate_forward");
        let n = logits.len() as i64;
        let mut g = self.alloc(logits.len());
        launch!(
            self,
            "log_gate_forward",
            grid(logits.len()),
            &mut g,
            logits,
            &n
        );
        g
    }
    fn log_gate_backward(&self, logits: &CudaSlice<f32>, dg: &CudaSlice<f32>) -> CudaSlice<f32> {
        let _p = self.prof("log_gate_backward");
        let n = logits.len() as i64;
        let mut da = self.alloc(logits.len());
        launch!(
            self,
            "log_gate_backward",
            grid(logits.len()),
            &mut da,
            logits,
            dg,
            &n
        );
        da
    }
    fn attention_forward(
        &self,
        spec: &AttentionSpec,
        form: Form,
        shape: &Shape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
    ) -> AttentionOut<CudaSlice<f32>> {
        let _p = self.prof("attention_forward");
        if let Some((f, c)) = self.fused(spec, shape) {
            return f.forward(&self.stream, spec, shape, c, q, k, v, log_gates);
        }
        if let Some(fl) = self.flash(spec, shape, log_gates) {
            return fl.forward(&self.stream, spec, shape, q, k, v);
        }
        if self.cublas_softmax(spec, log_gates) {
            return self.softmax_attention_forward(spec, shape, q, k, v);
        }
        if !self.gpu_attention(shape) {
            let g = log_gates.map(|g| self.download(g));
            let out = self.cpu.attention_forward(
                spec,
                form,
                shape,
                &self.download(q),
                &self.download(k),
                &self.download(v),
                g.as_ref(),
            );
            return AttentionOut {
                y: self.upload(&out.y),
                log_norm: self.upload(&out.log_norm),
                saved: None,
            };
        }
        let rows = shape.batch * shape.time * shape.heads;
        let (mut y, mut ln) = (self.alloc_zeroed(rows * shape.dv), self.alloc_zeroed(rows));
        let a = AttnArgs::new(spec, shape);
        let f = &self.fns["attention_forward"];
        let mut l = self.stream.launch_builder(f);
        l.arg(&mut y).arg(&mut ln).arg(q).arg(k).arg(v);
        match log_gates {
            Some(g) => l.arg(g),
            None => l.arg(&NULL),
        };
        l.arg(&a.b)
            .arg(&a.t)
            .arg(&a.h)
            .arg(&a.d)
            .arg(&a.e)
            .arg(&a.scale)
            .arg(&a.power)
            .arg(&a.eps);
        // SAFETY: arguments match the kernel's declaration; one thread per query row.
        unsafe { l.launch(grid(rows)) }.expect("attention_forward");
        AttentionOut {
            y,
            log_norm: ln,
            saved: None,
        }
    }
    fn attention_backward(
        &self,
        spec: &AttentionSpec,
        form: Form,
        shape: &Shape,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
        out: &AttentionOut<CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
    ) -> AttentionGrads<CudaSlice<f32>> {
        let _p = self.prof("attention_backward");
        if let Some((f, c)) = self.fused(spec, shape) {
            return f.backward(&self.stream, spec, shape, c, q, k, v, log_gates, out, dy);
        }
        if let Some(fl) = self.flash(spec, shape, log_gates) {
            return fl.backward(&self.stream, spec, shape, q, k, v, out, dy);
        }
        if self.cublas_softmax(spec, log_gates) {
            return self.softmax_attention_backward(spec, shape, q, k, v, out, dy);
        }
        if !self.gpu_attention(shape) {
            let g = log_gates.map(|g| self.download(g));
            let host_out = AttentionOut {
                y: self.download(&out.y),
                log_norm: self.download(&out.log_norm),
                saved: None,
            };
            let gr = self.cpu.attention_backward(
                spec,
                form,
                shape,
                &self.download(q),
                &self.download(k),
                &self.download(v),
                g.as_ref(),
                &host_out,
                &self.download(dy),
            );
            return AttentionGrads {
                dq: self.upload(&gr.dq),
                dk: self.upload(&gr.dk),
                dv: self.upload(&gr.dv),
                dlog_gates: gr.dlog_gates.map(|d| self.upload(&d)),
            };
        }
        let rows = shape.batch * shape.time * shape.heads;
        let a = AttnArgs::new(spec, shape);
        let mut dd = self.alloc_zeroed(rows);
        let (r, e) = (rows as i64, shape.dv as i32);
        launch!(
            self,
            "attention_row_dot",
            grid(rows),
            &mut dd,
            dy,
            &out.y,
            &r,
            &e
        );
        let (mut dq, mut dk, mut dv, mut dg) = (
            self.alloc_zeroed(rows * shape.dk),
            self.alloc_zeroed(rows * shape.dk),
            self.alloc_zeroed(rows * shape.dv),
            self.alloc_zeroed(rows),
        );
        {
            let f = &self.fns["attention_backward_dq"];
            let mut l = self.stream.launch_builder(f);
            l.arg(&mut dq).arg(&mut dg);
            attention_inputs(&mut l, [q, k, v], log_gates, [&out.log_norm, dy, &dd], &a);
            // SAFETY: as for the forward; one thread per query.
            unsafe { l.launch(grid(rows)) }.expect("attention_backward_dq");
        }
        {
            let f = &self.fns["attention_backward_dkv"];
            let mut l = self.stream.launch_builder(f);
            l.arg(&mut dk).arg(&mut dv).arg(&mut dg);
            attention_inputs(&mut l, [q, k, v], log_gates, [&out.log_norm, dy, &dd], &a);
            // SAFETY: as above; one thread per key.
            unsafe { l.launch(grid(rows)) }.expect("attention_backward_dkv");
        }
        let dlog_gates = log_gates.map(|_| {
            let mut out = self.alloc_zeroed(rows);
            launch!(
                self,
                "reverse_cumsum_time",
                grid(shape.batch * shape.heads),
                &mut out,
                &dg,
                &a.b,
                &a.t,
                &a.h
            );
            out
        });
        let _ = form;
        AttentionGrads {
            dq,
            dk,
            dv,
            dlog_gates,
        }
    }
    fn decode_state(&self, spec: &AttentionSpec, shape: &Shape, states: &[f64]) -> CudaDecodeState {
        let _p = self.prof("decode_state");
        let table = phi_table(spec, shape.dk);
        let heads = shape.batch * shape.heads;
        assert_eq!(
            states.len(),
            heads * table.dim * (shape.dv + 1),
            "decode states must be [batch·heads, D, e+1]"
        );
        let state = self.stream.clone_htod(states).expect("host to device copy");
        self.decode_state_of(&table, heads, shape.dk, shape.dv, state)
    }
    fn sympow_prefill_state(
        &self,
        spec: &AttentionSpec,
        shape: &Shape,
        _chunk: usize, // the GPU sums over the tokens as matrix products
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
        seqs: &[usize],
    ) -> CudaDecodeState {
        self.prefill_state(spec, shape, k, v, log_gates, seqs, usize::MAX)
    }
    fn concat_decode_states(&self, parts: Vec<CudaDecodeState>) -> CudaDecodeState {
        let _p = self.prof("concat_decode_states");
        let mut parts = parts.into_iter();
        let first = parts.next().expect("concat_decode_states needs a part");
        let rest: Vec<CudaDecodeState> = parts.collect();
        if rest.is_empty() {
            return first;
        }
        let shape = |s: &CudaDecodeState| (s.dim, s.p, s.d, s.e);
        assert!(
            rest.iter().all(|s| shape(s) == shape(&first)),
            "decode states of different shapes cannot share a batch"
        );
        // the (sequence, head) states one after another; the φ table is the first part's
        let per = first.dim * (first.e + 1);
        let heads = first.heads + rest.iter().map(|s| s.heads).sum::<usize>();
        let mut state = crate::device::alloc_output::<f64>(&self.stream, heads * per);
        let mut o = 0;
        for s in std::iter::once(&first).chain(&rest) {
            let n = s.heads * per;
            let mut dst = state.slice_mut(o..o + n);
            self.stream
                .memcpy_dtod(&s.state.slice(0..n), &mut dst)
                .expect("device to device copy");
            o += n;
        }
        CudaDecodeState {
            state,
            partial: self.decode_partial(heads, first.dim, first.e),
            heads,
            ..first
        }
    }
    fn sympow_decode_step(
        &self,
        spec: &AttentionSpec,
        state: &mut CudaDecodeState,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
    ) -> CudaSlice<f32> {
        let _p = self.prof("sympow_decode_step");
        let s = state;
        assert!(
            q.len() == s.heads * s.d && k.len() == q.len() && v.len() == s.heads * s.e,
            "decode step: q, k must be [batch·heads, d] and v [batch·heads, e] of the state's shape"
        );
        let tiles = s.dim.div_ceil(DECODE_ROWS);
        let (dim, p, d, e) = (s.dim as i32, s.p as i32, s.d as i32, s.e as i32);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, s.heads as u32, 1),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = &self.fns["sympow_decode_update"];
        let mut l = self.stream.launch_builder(f);
        l.arg(&mut s.state).arg(&mut s.partial).arg(q).arg(k).arg(v);
        match log_gates {
            Some(g) => l.arg(g),
            None => l.arg(&NULL),
        };
        l.arg(&s.idx)
            .arg(&s.coef)
            .arg(&dim)
            .arg(&p)
            .arg(&d)
            .arg(&e)
            .arg(&spec.scale);
        // SAFETY: arguments match the declaration in decode.cu; the grid covers D rows (last
        // tile partial, bounded in the kernel) and every head of the state.
        unsafe { l.launch(cfg) }.expect("sympow_decode_update");
        let mut y = self.alloc_zeroed(s.heads * s.e);
        let (ti, eps) = (tiles as i32, spec.eps);
        launch!(
            self,
            "sympow_decode_read",
            LaunchConfig {
                grid_dim: (s.heads as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut y,
            &s.partial,
            &ti,
            &e,
            &eps
        );
        y
    }
    fn kv_cache(
        &self,
        _spec: &AttentionSpec,
        shape: &Shape,
        keys: &CudaSlice<f32>,
        values: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
    ) -> CudaKvCache {
        let _p = self.prof("kv_cache");
        self.new_kv_cache(shape, keys, values, log_gates)
    }
    fn kv_cache_decode_step(
        &self,
        spec: &AttentionSpec,
        cache: &mut CudaKvCache,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
    ) -> CudaSlice<f32> {
        let _p = self.prof("kv_cache_decode_step");
        self.kv_cache_decode(spec, cache, q, k, v, log_gates)
    }
    fn kv_cache_reserve(&self, cache: &mut CudaKvCache, len: usize, more: usize) -> bool {
        self.reserve_kv_cache(cache, len, more)
    }
    fn cross_entropy_forward(
        &self,
        logits: &CudaSlice<f32>,
        targets: &[u32],
        vocab: usize,
        row_len: usize,
    ) -> CudaSlice<f32> {
        let _p = self.prof("cross_entropy_forward");
        assert!(
            vocab <= row_len,
            "cross_entropy_forward: vocab {vocab} > row_len {row_len}"
        );
        let rows = logits.len() / row_len;
        let t = self.up_u32(targets);
        let mut loss = self.alloc(rows);
        let (v, rl) = (vocab as i32, row_len as i32);
        launch!(
            self,
            "cross_entropy_forward",
            rows_cfg(rows),
            &mut loss,
            logits,
            &t,
            &v,
            &rl
        );
        loss
    }
    fn classifier_backward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        logits: &CudaSlice<f32>,
        targets: &[u32],
        losses: &CudaSlice<f32>,
        dloss: &CudaSlice<f32>,
        (cin, vocab, row_len): (usize, usize, usize),
        dw: &mut CudaSlice<f32>,
        saved: &LinearSaved,
    ) -> CudaSlice<f32> {
        if self.precision() != MatmulPrecision::Bf16 {
            let dlogits =
                self.cross_entropy_backward(logits, targets, losses, dloss, vocab, row_len);
            return self.linear_backward(x, w, &dlogits, cin, row_len, dw, None, saved);
        }
        let _p = self.prof("classifier_backward");
        // ∂logits straight to the products' bf16: 6.6 GB less traffic a gpt2-124m step at 16k
        // than writing them in f32 and copying (and 3.3 GB less memory)
        let mut d16 = crate::device::alloc_output::<u16>(&self.stream, logits.len());
        let kernel = "cross_entropy_backward_bf16";
        self.cross_entropy_grad(
            kernel, &mut d16, logits, targets, losses, dloss, vocab, row_len,
        );
        let dyo = Operand::bf16_only(Cow::Owned(d16));
        self.linear_backward_products(x, w, &dyo, cin, row_len, dw, None, saved)
    }
    fn cross_entropy_backward(
        &self,
        logits: &CudaSlice<f32>,
        targets: &[u32],
        losses: &CudaSlice<f32>,
        dloss: &CudaSlice<f32>,
        vocab: usize,
        row_len: usize,
    ) -> CudaSlice<f32> {
        let _p = self.prof("cross_entropy_backward");
        let mut d = self.alloc(logits.len());
        let kernel = "cross_entropy_backward";
        self.cross_entropy_grad(
            kernel, &mut d, logits, targets, losses, dloss, vocab, row_len,
        );
        d
    }
    fn adamw_step(
        &self,
        step: u64,
        grad_scale: f64,
        params: &mut [AdamWParam<'_, CudaSlice<f32>>],
    ) {
        let _p = self.prof("adamw_step");
        let Some(first) = params.first() else { return };
        let c0 = first.cfg;
        assert!(
            params.iter().all(|t| (t.cfg.beta1, t.cfg.beta2, t.cfg.eps) == (c0.beta1, c0.beta2, c0.eps)),
            "adamw_step: one call is one optimizer (the tensors may differ in lr and weight decay only)"
        );
        // the chunk table (see AdamWChunk in ops.cu): p, g, m, v, n, then lr and wd as two f32
        let mut table: Vec<u64> = Vec::new();
        for t in params.iter_mut() {
            let n = t.param.len();
            assert!(
                t.grad.len() == n && t.m.len() == n && t.v.len() == n,
                "adamw_step: parameter, gradient and moments differ in length"
            );
            let (p, _) = t.param.device_ptr_mut(&self.stream);
            let (g, _) = t.grad.device_ptr(&self.stream);
            let (m, _) = t.m.device_ptr_mut(&self.stream);
            let (v, _) = t.v.device_ptr_mut(&self.stream);
            let hyper = u64::from((t.cfg.lr as f32).to_bits())
                | u64::from((t.cfg.weight_decay as f32).to_bits()) << 32;
            for (o, len) in chunks(n) {
                let off = 4 * o as u64;
                table.extend([p + off, g + off, m + off, v + off, len as u64, hyper]);
            }
        }
        if table.is_empty() {
            return;
        }
        let table_dev = self.stream.clone_htod(&table).expect("host to device copy");
        let (b1, b2, eps) = (c0.beta1 as f32, c0.beta2 as f32, c0.eps as f32);
        let bc1 = (1.0 - c0.beta1.powi(step as i32)) as f32;
        let bc2 = (1.0 - c0.beta2.powi(step as i32)) as f32;
        let gs = grad_scale as f32;
        launch!(
            self,
            "adamw_step",
            rows_cfg(table.len() / 6),
            &table_dev,
            &b1,
            &b2,
            &eps,
            &bc1,
            &bc2,
            &gs
        );
    }
    fn hold_weights(&self, weights: &[&CudaSlice<f32>]) {
        if self.precision() != MatmulPrecision::Bf16 {
            return; // (the products read f32)
        }
        for w in weights {
            let key = self.held_key(w);
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            match held.get_mut(&key) {
                Some(h) => h.holds += 1,
                None => {
                    let bf16 = Arc::new(self.to_bf16(w));
                    held.insert(key, Held { holds: 1, bf16 });
                }
            }
        }
    }
    fn release_weights(&self, weights: &[&CudaSlice<f32>]) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for w in weights {
            let key = self.held_key(w);
            if let Some(h) = held.get_mut(&key) {
                h.holds -= 1;
                if h.holds == 0 {
                    held.remove(&key);
                }
            }
        }
    }
    fn record(&self, ops: &mut dyn FnMut()) -> Option<CudaRecording> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        // a profiled op synchronises, which a capture cannot hold
        if self.profiler.is_on() || std::env::var_os("SYMPOW_NO_GRAPHS").is_some() {
            return None;
        }
        // this thread's calls only: rayon's threads may work on the host meanwhile
        let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        self.stream.begin_capture(mode).ok()?;
        // an op the capture cannot hold fails its launch and panics; the capture must end
        // either way, and the caller then runs the ops itself (a real fault panics again there)
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(ops));
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        // errors cudarc could only record (a free inside the capture that failed, say)
        let clean = self.ctx.check_err().is_ok();
        match (ran, graph) {
            (Ok(()), Ok(Some(graph))) if clean => {
                graph.upload().ok()?;
                Some(CudaRecording(Mutex::new(GraphCell(graph))))
            }
            _ => None,
        }
    }
    fn replay(&self, recording: &CudaRecording) {
        let _p = self.prof("replay (a recorded step)");
        let graph = recording.0.lock().unwrap_or_else(|e| e.into_inner());
        graph.0.launch().expect("CUDA graph launch");
    }
    fn set_profiling(&self, on: bool) -> bool {
        self.profiler.set(on);
        true
    }
    fn profile(&self) -> Vec<ProfileRow> {
        self.profiler.report()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's copies of the kernels' compile-time sizes (a mismatch would leave rows or
    /// keys unvisited, not fail).
    #[test]
    fn host_constants_match_the_kernel_source() {
        for (name, value) in [
            ("LN_V", LN_V),
            ("LN_WARPS", LN_WARPS as usize),
            ("LN_BWD_ROWS", LN_BWD_ROWS),
            ("DECODE_ROWS", DECODE_ROWS),
            ("DECODE_THREADS", DECODE_THREADS as usize),
            ("PREFILL_SCAN", PREFILL_SCAN as usize),
            ("KV_SPLIT", kv_cache::KV_SPLIT),
        ] {
            let define = format!("#define {name} {value}");
            let found = SOURCE
                .lines()
                .any(|l| l == define || l.starts_with(&format!("{define} ")));
            assert!(found, "no `{define}` in the kernel source");
        }
        for k in KERNELS {
            assert!(
                SOURCE.contains(&format!(" {k}(")),
                "kernel {k} is not declared"
            );
        }
    }
}
