//! # sympow
//!
//! Conformal symmetric-power transformers: language models whose attention is gated
//! symmetric-power attention, (q·k)^p for even p, with data-dependent gating (decay) and
//! data-dependent rotary embeddings (rotation) of the recurrent state.
//!
//! Layout (dependencies point down):
//! - [`attention`]: φ_p, and gated attention in its quadratic, recurrent and chunked forms
//!   (forward and backward); softmax attention as the baseline.
//! - [`ops`]: every other op of the model, each forward beside its backward (generic over
//!   [`Float`] so the same code is the f32 CPU backend and the f64 reference).
//! - [`backend`]: the [`Backend`](backend::Backend) trait the model is written against, and
//!   its CPU implementation.

pub mod attention;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod eval;
pub mod float;
pub mod inference;
pub mod model;
pub mod ops;
pub mod plot;
pub mod recall;
pub mod testing;
pub mod train;

pub use float::Float;
