//! Every non-attention op of the model, each forward beside its backward.
//!
//! All are generic over [`Float`](crate::Float): at `f32` they are the CPU backend, at `f64`
//! the reference that finite-difference checks run against. Backward functions return fresh
//! gradients (or add into a caller's accumulator where they say so).

pub mod adamw;
pub mod cross_entropy;
pub mod embedding;
pub mod gate;
pub mod gelu;
pub mod layer_norm;
pub mod linalg;
pub mod linear;
pub mod rotary;
