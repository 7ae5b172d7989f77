//! Run configuration: model, data and training, as TOML.
//!
//! Every field is documented here; `sympow config --preset tiny` prints a complete file.
//! Unknown fields are rejected, and [`Config::validate`] names the offending field.
//!
//! ```
//! let mut cfg = sympow::config::Config::preset("tiny").unwrap();
//! cfg.set("model.layers", "3").unwrap();
//! assert_eq!(cfg.model.layers, 3);
//! let err = cfg.set("model.power", "3").unwrap_err();
//! assert!(err.to_string().contains("model.power"));
//! ```

use crate::attention::phi::sympow_dim;
use crate::ops::rotary::RotaryParam;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field has a value outside its range.
    #[error("invalid config: {field} = {value}: {why}")]
    Invalid {
        /// Dotted field path, e.g. `model.power`.
        field: String,
        /// The offending value.
        value: String,
        /// What is expected.
        why: String,
    },
    /// The TOML could not be parsed or has wrong types or unknown fields.
    #[error("invalid config: {0}")]
    Parse(String),
    /// No preset of that name.
    #[error("unknown preset {0:?} (known: tiny, small, gpt2-124m)")]
    UnknownPreset(String),
    /// The file could not be read.
    #[error("cannot read config {path}: {err}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        err: String,
    },
}

/// The attention of each layer: the paper's variants by name. `gate` and `rotary` default
/// from this and may be overridden.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttentionKind {
    /// Softmax attention with fixed RoPE (the quality reference).
    Softmax,
    /// Symmetric power attention with fixed RoPE, no gate.
    Sympow,
    /// Sympow with a data-dependent gate and fixed RoPE.
    SympowGated,
    /// Conformal-sympow: data-dependent gate and data-dependent (learned) rotary.
    Conformal,
}

/// The scalar gate γ (decay) of a sympow layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateKind {
    /// No decay (γ = 1).
    None,
    /// One learned γ per head, the same for every token.
    Learned,
    /// γ_t = sigmoid(w·x_t + b) per head and token (fused into the QKV projection).
    Data,
}

/// The rotary embedding of queries and keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotaryKind {
    /// No rotary embedding (no position information).
    None,
    /// Fixed RoPE, Θ = t·ω.
    Fixed,
    /// Data-dependent rotary: Θ_t = Σ_{r≤t} ω·softplus(logit_r).
    Learned,
}

/// Serialised name of [`RotaryParam`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotaryParamKind {
    /// One learned step size per head and token.
    PerHead,
    /// One learned step size per head, token and frequency.
    PerFrequency,
}

impl From<RotaryParamKind> for RotaryParam {
    fn from(k: RotaryParamKind) -> Self {
        match k {
            RotaryParamKind::PerHead => RotaryParam::PerHead,
            RotaryParamKind::PerFrequency => RotaryParam::PerFrequency,
        }
    }
}

/// Which attention form training uses (all give the same result; they differ in cost).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormKind {
    /// The cheaper of chunked and quadratic for the training context (by FLOP count).
    Auto,
    /// Always chunked (linear in T).
    Chunked,
    /// Always quadratic.
    Quadratic,
}

/// Layer normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerNormKind {
    /// With learned scale and bias.
    Learned,
    /// Parameter-free.
    ParameterFree,
}

/// The tokenizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenizerKind {
    /// GPT-2 BPE (r50k_base, 50,257 tokens), embedded: works offline.
    Gpt2,
    /// UTF-8 bytes (256 tokens): cheap LM head, for small CPU runs.
    Bytes,
}

/// The network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size; at least the tokenizer's (256 for bytes, 50,257 for GPT-2).
    pub vocab_size: usize,
    /// Residual stream width.
    pub width: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Query/key/value dimension per head (need not be width/heads).
    pub head_dim: usize,
    /// MLP hidden width as a multiple of `width`.
    pub mlp_ratio: usize,
    /// softmax | sympow | sympow-gated | conformal.
    pub attention: AttentionKind,
    /// Symmetric power p (even). Ignored for softmax.
    pub power: u32,
    /// none | learned | data. Default: none for softmax and sympow, data otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateKind>,
    /// none | fixed | learned. Default: learned for conformal, fixed otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotary: Option<RotaryKind>,
    /// per-head | per-frequency: the learned rotary's parameterisation.
    pub rotary_param: RotaryParamKind,
    /// RoPE base: ω_i = base^(−2i/head_dim).
    pub rotary_base: f64,
    /// Chunk size of the chunked form on the CPU (and of the form choice under `auto`). The
    /// GPU's fused kernels keep their own chunk, tuned for them (`sympow_cuda::DEFAULT_CHUNK`):
    /// the CPU's best chunk is far shorter than a tensor-core kernel's.
    pub chunk: usize,
    /// auto | chunked | quadratic: the attention form used in training.
    pub form: FormKind,
    /// Share the token embedding with the LM head.
    pub tie_weights: bool,
    /// learned | parameter-free.
    pub layer_norm: LayerNormKind,
    /// Dropout on the attention and MLP outputs (0 disables).
    pub dropout: f64,
}

/// The data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// gpt2 | bytes.
    pub tokenizer: TokenizerKind,
    /// "embedded" (the bundled corpus), a directory of shards written by `sympow data prepare`,
    /// or a `.npy` file of fixed-length rows of token ids (LongCrawl64's layout).
    pub corpus: String,
    /// Training context (tokens per window).
    pub context: usize,
    /// Fraction of documents held out for validation.
    pub val_fraction: f64,
}

/// The optimisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches accumulated per step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub adam_eps: f64,
    /// Clip the global gradient norm to this (0 disables).
    pub grad_clip: f64,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Seed of initialisation, data order and dropout.
    pub seed: u64,
    /// Consecutive non-finite steps tolerated (skipped) before the run stops.
    pub max_bad_steps: u64,
}

/// A complete run configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The network.
    pub model: ModelConfig,
    /// The data.
    pub data: DataConfig,
    /// The optimisation.
    pub train: TrainConfig,
}

/// One line of documentation per field, for [`Config::to_documented_toml`].
const FIELD_DOCS: &[(&str, &str, &str)] = &[
    ("model", "vocab_size", "vocabulary size; at least the tokenizer's (256 bytes, 50257 GPT-2)"),
    ("model", "width", "residual stream width"),
    ("model", "layers", "transformer blocks"),
    ("model", "heads", "attention heads per block"),
    ("model", "head_dim", "query/key/value dimension per head (even when rotary is on)"),
    ("model", "mlp_ratio", "MLP hidden width as a multiple of width"),
    ("model", "attention", "softmax | sympow | sympow-gated | conformal (gate + learned rotary)"),
    ("model", "power", "symmetric power p, even (2 or 4); ignored for softmax"),
    ("model", "gate", "none | learned (one γ per head) | data (γ_t from the token)"),
    ("model", "rotary", "none | fixed (RoPE) | learned (data-dependent angles)"),
    ("model", "rotary_param", "per-head | per-frequency: parameterisation of the learned rotary step"),
    ("model", "rotary_base", "RoPE base: ω_i = base^(−2i/head_dim)"),
    ("model", "chunk", "chunk size of the chunked attention form on the CPU (the GPU's fused kernels use their own)"),
    ("model", "form", "auto | chunked | quadratic: attention form in training (auto: fewer FLOPs)"),
    ("model", "tie_weights", "share the token embedding with the LM head"),
    ("model", "layer_norm", "learned | parameter-free"),
    ("model", "dropout", "dropout on attention and MLP outputs (0 disables)"),
    ("data", "tokenizer", "gpt2 (BPE, r50k_base) | bytes"),
    ("data", "corpus", "\"embedded\" (bundled State of the Union corpus), a directory of shards from `sympow data prepare`, or a .npy file of fixed-length rows of token ids, one document per row (LongCrawl64's layout)"),
    ("data", "context", "training context in tokens"),
    ("data", "val_fraction", "fraction of documents held out for validation"),
    ("train", "steps", "optimizer steps"),
    ("train", "batch_size", "sequences per micro-batch"),
    ("train", "grad_accum", "micro-batches accumulated per step"),
    ("train", "lr", "peak learning rate"),
    ("train", "min_lr_ratio", "final learning rate of the cosine decay, as a fraction of lr"),
    ("train", "warmup_steps", "linear warm-up steps"),
    ("train", "weight_decay", "AdamW decoupled weight decay (matrices only)"),
    ("train", "beta1", "AdamW β1"),
    ("train", "beta2", "AdamW β2"),
    ("train", "adam_eps", "AdamW ε"),
    ("train", "grad_clip", "clip the global gradient norm to this (0 disables)"),
    ("train", "eval_every", "validate every this many steps (0: only at the end)"),
    ("train", "eval_batches", "validation batches per evaluation"),
    ("train", "checkpoint_every", "checkpoint every this many steps (0: only at the end)"),
    ("train", "seed", "seed of initialisation, data order and dropout"),
    ("train", "max_bad_steps", "consecutive non-finite steps skipped before the run stops"),
];

/// Names of the built-in presets.
pub const PRESETS: [&str; 3] = ["tiny", "small", "gpt2-124m"];

impl Config {
    /// A built-in preset: `tiny` (minutes on 2 CPU cores, byte tokens), `small` (~25M
    /// parameters, GPT-2 tokens) or `gpt2-124m` (the paper's class).
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let model = ModelConfig {
            vocab_size: 50257,
            width: 768,
            layers: 12,
            heads: 12,
            head_dim: 64,
            mlp_ratio: 4,
            attention: AttentionKind::Conformal,
            power: 2,
            gate: None,
            rotary: None,
            rotary_param: RotaryParamKind::PerHead,
            rotary_base: 10000.0,
            chunk: 128,
            form: FormKind::Auto,
            tie_weights: true,
            layer_norm: LayerNormKind::Learned,
            dropout: 0.0,
        };
        let data = DataConfig {
            tokenizer: TokenizerKind::Gpt2,
            corpus: "embedded".into(),
            context: 4096,
            val_fraction: 0.05,
        };
        let train = TrainConfig {
            steps: 5000,
            batch_size: 8,
            grad_accum: 1,
            lr: 6e-4,
            min_lr_ratio: 0.1,
            warmup_steps: 200,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            eval_every: 250,
            eval_batches: 8,
            checkpoint_every: 250,
            seed: 1337,
            max_bad_steps: 10,
        };
        let mut c = Config { model, data, train };
        match name {
            "gpt2-124m" => {}
            "small" => {
                c.model = ModelConfig {
                    width: 384,
                    layers: 6,
                    heads: 6,
                    ..c.model
                };
                c.data.context = 1024;
                c.train.steps = 3000;
                c.train.lr = 1e-3;
            }
            "tiny" => {
                c.model = ModelConfig {
                    vocab_size: 256,
                    width: 128,
                    layers: 4,
                    heads: 4,
                    head_dim: 32,
                    chunk: 64,
                    ..c.model
                };
                c.data.tokenizer = TokenizerKind::Bytes;
                c.data.context = 256;
                c.train = TrainConfig {
                    steps: 800,
                    batch_size: 12,
                    lr: 3e-3,
                    warmup_steps: 50,
                    weight_decay: 0.01,
                    eval_every: 100,
                    eval_batches: 8,
                    checkpoint_every: 100,
                    ..c.train
                };
            }
            other => return Err(ConfigError::UnknownPreset(other.into())),
        }
        Ok(c)
    }

    /// Parses TOML and validates.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| {
            ConfigError::Parse(e.message().trim().to_string() + &span_note(&e, text))
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.display().to_string(),
            err: e.to_string(),
        })?;
        Self::from_toml(&text)
    }

    /// Serialises to TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }

    /// Serialises to TOML with a comment above every field saying what it means.
    pub fn to_documented_toml(&self) -> String {
        let mut out = String::from("# sympow run configuration. Every field is required except model.gate and model.rotary.\n");
        let mut section = "";
        for line in self.to_toml().lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = match name {
                    "model" => "model",
                    "data" => "data",
                    _ => "train",
                };
                out.push('\n');
            } else if let Some((key, _)) = line.split_once(" = ") {
                if let Some((_, _, doc)) = FIELD_DOCS
                    .iter()
                    .find(|(s, k, _)| *s == section && *k == key)
                {
                    out.push_str(&format!("# {doc}\n"));
                }
            }
            out.push_str(line);
            out.push('\n');
            if line == "[model]" {
                out.push_str("# gate = \"data\"      # none | learned | data; default: none for softmax and sympow, data otherwise\n");
                out.push_str("# rotary = \"learned\" # none | fixed | learned; default: learned for conformal, fixed otherwise\n");
            }
        }
        out
    }

    /// Sets a dotted field (`model.layers`, `train.lr`, …) from a string holding a TOML value
    /// (bare words are taken as strings), then re-validates. On error nothing changes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        self.set_all(&[(key, value)])
    }

    /// Applies several [`set`](Self::set)s, validating once at the end (so fields that must
    /// change together, such as the tokenizer and the vocabulary, can). On error nothing
    /// changes.
    pub fn set_all(&mut self, pairs: &[(&str, &str)]) -> Result<(), ConfigError> {
        let mut c = self.clone();
        for (k, v) in pairs {
            c.set_one(k, v)?;
        }
        c.validate()?;
        *self = c;
        Ok(())
    }

    fn set_one(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let mut root = toml::Value::try_from(&*self).expect("config serialises");
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let (section, field) = key.split_once('.').ok_or_else(|| {
            ConfigError::Parse(format!(
                "`{key}`: expected section.field, e.g. model.layers"
            ))
        })?;
        let table = root
            .get_mut(section)
            .and_then(|t| t.as_table_mut())
            .ok_or_else(|| {
                ConfigError::Parse(format!(
                    "unknown section `{section}` in `{key}` (model, data, train)"
                ))
            })?;
        // `gate` and `rotary` are optional (absent when defaulted from `attention`)
        let optional = section == "model" && matches!(field, "gate" | "rotary");
        if !table.contains_key(field) && !optional {
            return Err(ConfigError::Parse(format!("unknown field `{key}`")));
        }
        table.insert(field.to_string(), parsed);
        *self = root.try_into().map_err(|e: toml::de::Error| {
            ConfigError::Parse(format!("{key} = {value}: {}", e.message().trim()))
        })?;
        Ok(())
    }

    /// Checks every field's range and the fields' consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        let bad = |field: &str, value: String, why: &str| {
            Err(ConfigError::Invalid {
                field: field.into(),
                value,
                why: why.into(),
            })
        };
        for (f, v) in [
            ("model.width", m.width),
            ("model.layers", m.layers),
            ("model.heads", m.heads),
            ("model.mlp_ratio", m.mlp_ratio),
            ("model.chunk", m.chunk),
        ] {
            if v == 0 {
                return bad(f, v.to_string(), "must be at least 1");
            }
        }
        if m.head_dim < 2 {
            return bad(
                "model.head_dim",
                m.head_dim.to_string(),
                "must be at least 2",
            );
        }
        if self.rotary() != RotaryKind::None && m.head_dim % 2 == 1 {
            return bad(
                "model.head_dim",
                m.head_dim.to_string(),
                "rotary embeddings rotate coordinate pairs: must be even",
            );
        }
        if m.attention != AttentionKind::Softmax {
            if m.power == 0 || m.power % 2 == 1 {
                return bad(
                    "model.power",
                    m.power.to_string(),
                    "symmetric power must be a positive even integer (2, 4, …)",
                );
            }
            let dim = sympow_dim(m.head_dim, m.power);
            if dim > 4_000_000 {
                return bad(
                    "model.power",
                    m.power.to_string(),
                    &format!("state dimension C(head_dim+p−1, p) = {dim} per head is too large: use a smaller head_dim"),
                );
            }
        } else if self.gate() != GateKind::None {
            return bad(
                "model.gate",
                format!("{:?}", self.gate()).to_lowercase(),
                "gating applies to sympow attention only",
            );
        }
        if m.vocab_size < self.data.tokenizer_vocab() {
            return bad(
                "model.vocab_size",
                m.vocab_size.to_string(),
                &format!(
                    "smaller than the tokenizer's vocabulary ({})",
                    self.data.tokenizer_vocab()
                ),
            );
        }
        if !(m.rotary_base > 1.0 && m.rotary_base.is_finite()) {
            return bad(
                "model.rotary_base",
                m.rotary_base.to_string(),
                "must be a finite number > 1",
            );
        }
        if !(0.0..1.0).contains(&m.dropout) {
            return bad("model.dropout", m.dropout.to_string(), "must be in [0, 1)");
        }
        let d = &self.data;
        if d.context < 2 {
            return bad("data.context", d.context.to_string(), "must be at least 2");
        }
        if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
            return bad(
                "data.val_fraction",
                d.val_fraction.to_string(),
                "must be in (0, 1)",
            );
        }
        if d.corpus.is_empty() {
            return bad(
                "data.corpus",
                "\"\"".into(),
                "must be \"embedded\" or a shard directory",
            );
        }
        let t = &self.train;
        if t.steps == 0 {
            return bad("train.steps", "0".into(), "must be at least 1");
        }
        if t.batch_size == 0 {
            return bad("train.batch_size", "0".into(), "must be at least 1");
        }
        if t.grad_accum == 0 {
            return bad("train.grad_accum", "0".into(), "must be at least 1");
        }
        if t.eval_batches == 0 {
            return bad("train.eval_batches", "0".into(), "must be at least 1");
        }
        for (f, v) in [("train.lr", t.lr), ("train.adam_eps", t.adam_eps)] {
            if !(v > 0.0 && v.is_finite()) {
                return bad(f, v.to_string(), "must be a positive finite number");
            }
        }
        for (f, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(f, v.to_string(), "must be in [0, 1)");
            }
        }
        for (f, v) in [
            ("train.weight_decay", t.weight_decay),
            ("train.grad_clip", t.grad_clip),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(f, v.to_string(), "must be a non-negative finite number");
            }
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return bad(
                "train.min_lr_ratio",
                t.min_lr_ratio.to_string(),
                "must be in [0, 1]",
            );
        }
        Ok(())
    }

    /// The effective gate.
    pub fn gate(&self) -> GateKind {
        self.model.gate.unwrap_or(match self.model.attention {
            AttentionKind::Softmax | AttentionKind::Sympow => GateKind::None,
            AttentionKind::SympowGated | AttentionKind::Conformal => GateKind::Data,
        })
    }

    /// The effective rotary embedding.
    pub fn rotary(&self) -> RotaryKind {
        self.model.rotary.unwrap_or(match self.model.attention {
            AttentionKind::Conformal => RotaryKind::Learned,
            _ => RotaryKind::Fixed,
        })
    }
}

impl DataConfig {
    /// Vocabulary of the configured tokenizer.
    pub fn tokenizer_vocab(&self) -> usize {
        match self.tokenizer {
            TokenizerKind::Gpt2 => 50257,
            TokenizerKind::Bytes => 256,
        }
    }
}

/// " at line N: `the line`" for a TOML error with a location.
fn span_note(e: &toml::de::Error, text: &str) -> String {
    let Some(span) = e.span() else {
        return String::new();
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    format!(" at line {line_no}: `{line}`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip() {
        for p in PRESETS {
            let c = Config::preset(p).unwrap();
            c.validate().unwrap();
            assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c, "{p}");
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("model.power", "3", "model.power"),
            ("model.heads", "0", "model.heads"),
            ("train.steps", "0", "train.steps"),
            ("model.chunk", "0", "model.chunk"),
            ("model.head_dim", "7", "model.head_dim"),
            ("model.vocab_size", "100", "model.vocab_size"),
            ("model.dropout", "1.5", "model.dropout"),
            ("train.lr", "-1", "train.lr"),
            ("model.layers", "\"two\"", "model.layers"),
            ("model.attention", "quadratic", "model.attention"),
            ("model.nonsense", "1", "model.nonsense"),
        ];
        for (k, v, want) in cases {
            let mut c = Config::preset("tiny").unwrap();
            let err = c.set(k, v).unwrap_err().to_string();
            assert!(err.contains(want), "{k}={v}: {err}");
            assert_eq!(
                c,
                Config::preset("tiny").unwrap(),
                "a failed set must not change the config"
            );
        }
    }

    #[test]
    fn documented_toml_documents_every_field_and_parses() {
        let c = Config::preset("small").unwrap();
        let text = c.to_documented_toml();
        assert_eq!(Config::from_toml(&text).unwrap(), c);
        let plain = c.to_toml();
        let undocumented: Vec<&str> = plain
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .filter(|k| !FIELD_DOCS.iter().any(|(_, f, _)| f == k))
            .collect();
        assert!(
            undocumented.is_empty(),
            "fields without docs: {undocumented:?}"
        );
    }

    #[test]
    fn softmax_rejects_gates() {
        let mut c = Config::preset("tiny").unwrap();
        c.set("model.attention", "softmax").unwrap();
        assert_eq!(c.gate(), GateKind::None);
        assert!(c
            .set("model.gate", "data")
            .unwrap_err()
            .to_string()
            .contains("model.gate"));
    }

    #[test]
    fn unknown_fields_and_wrong_types_in_files_are_errors() {
        let mut text = Config::preset("tiny").unwrap().to_toml();
        text = text.replace("layers = 4", "layers = \"four\"");
        assert!(Config::from_toml(&text)
            .unwrap_err()
            .to_string()
            .contains("layers"));
        let text = Config::preset("tiny")
            .unwrap()
            .to_toml()
            .replace("[train]", "[train]\nlearning_rate = 1.0");
        assert!(Config::from_toml(&text)
            .unwrap_err()
            .to_string()
            .contains("learning_rate"));
        assert!(matches!(
            Config::preset("huge"),
            Err(ConfigError::UnknownPreset(_))
        ));
    }
}
