//! Attention, the piece both attention mixers share.
//!
//! - [`multihead`]: [`MultiheadAttention`], PyTorch's layer: parameters, initialisation,
//!   variables, masks and PyTorch's own op sequence;
//! - [`fast`]: the pooled fast path: chunks, the derived-weight cache, the value and output
//!   projections after pooling;
//! - [`core`]: the shared mixer core: the hyper-parameters, the [`Attend`] trait that each
//!   attention mixer implements (`crate::cross`, `crate::self_attention`), and the choice
//!   between PyTorch's op sequence and the fast path.

mod core;
mod fast;
mod multihead;

pub use self::core::AttentionConfig;
pub(crate) use self::core::{impl_attention_mixer, Attend, AttentionCore, Want};
pub(crate) use self::fast::{masked_softmax, Derived, KeyWeights, Packed, LARGE_BATCH};
pub use self::multihead::MultiheadAttention;
