//! # tch-mix
//!
//! The feature mixers of the Python library [swak](https://pypi.org/project/swak/)
//! (`swak.pt.mix` 1.2.0) on tch-rs (libtorch). For teams that train a model with swak mixers in
//! PyTorch and serve it from Rust: load its weights, get the same numbers on CPU or CUDA, fast,
//! with each feature's importance ([`Mixer::f_importance`]), and prove the parity in their own CI
//! ([`fixture`]).
//!
//! A mixer combines stacked feature vectors `(..., n_features, mod_dim)` into one vector
//! `(..., mod_dim)` per instance:
//!
//! | mixer | weights (swak's `state_dict` keys) | importance |
//! |---|---|---|
//! | [`GlobalWeightsMixer`] | `coeffs` | `softmax(coeffs)`, the same for every instance |
//! | [`InstanceWeightsMixer`] | `project.weight`, `project.bias` | `softmax(project(flatten(x)))` per instance |
//! | [`CrossAttentionMixer`] | `attention.in_proj_weight`, `attention.in_proj_bias`, `attention.out_proj.weight`, `attention.out_proj.bias` | a learned query's attention over the features, averaged over heads |
//! | [`SelfAttentionMixer`] | as `CrossAttentionMixer` | self-attention weights averaged over heads and queries |
//!
//! ```toml
//! [dependencies]
//! tch-mix = { version = "0.2", default-features = false, features = ["cuda"] }
//! tch = "0.24"   # or 0.22, 0.23, 0.26: tch-mix follows your tch
//! ```
//!
//! Build with `LIBTORCH_USE_PYTORCH=1` and a Python whose pip-installed PyTorch is the one your tch
//! binds to (2.11.0 for tch 0.24) on `PATH`; Rust 1.89 or newer. `cuda` keeps CUDA linked (leave
//! it out for a CPU-only libtorch); `default-features = false` leaves out the command-line tool.
//!
//! ## Quick start
//!
//! ```
//! use tch::{nn, Device, Kind, Tensor};
//! use tch_mix::{InstanceWeightsConfig, InstanceWeightsMixer, Mixer, StateDict};
//!
//! fn main() -> tch_mix::Result<()> {
//!     let mut vs = nn::VarStore::new(Device::cuda_if_available());
//!     vs.set_kind(Kind::Float); // the mixer's dtype: set it before building
//!     // swak's InstanceWeightsMixer(8, 6, skip=False): mod_dim 8, 6 features.
//!     let config = InstanceWeightsConfig { skip: false, ..Default::default() };
//!     let mix = InstanceWeightsMixer::new(&(vs.root() / "mix"), 8, 6, config)?;
//!
//!     // torch.save(model.state_dict(), "instance.pt") in Python, the swak mixer at `model.mix`:
//!     let state = StateDict::from_file("examples/demo/instance.pt")?;
//!     mix.load_state(&state.sub("mix"))?; // strict: every key, every shape
//!
//!     let batch = Tensor::randn([64, 6, 8], (Kind::Float, vs.device()));
//!     // The mixed features and each feature's importance, in one call (eval mode, no autograd).
//!     let (mixed, importance) =
//!         tch::no_grad(|| mix.f_forward_and_importance_t(&batch, None, false))?;
//!     assert_eq!(mixed.size(), [64, 8]);
//!     assert_eq!(importance.size(), [64, 6]);
//!     Ok(())
//! }
//! ```
//!
//! Every mixer is built as `Mixer::new(&path, mod_dim, [n_features,] config)` with swak's
//! hyper-parameters in its config ([`GlobalWeightsConfig`], [`InstanceWeightsConfig`],
//! [`AttentionConfig`]); device and dtype come from the VarStore. The [`Mixer`] trait gives the
//! rest, also as `Box<dyn Mixer>`; [`SharedMixer`] serves one loaded model to many threads.
//!
//! ## Where to go next
//!
//! - Loading: [`StateDict::from_file`] reads safetensors, `torch.save` state dicts and
//!   checkpoints such as swak's `Checkpoint`, strictly and bounded for untrusted files; the
//!   [`checkpoint`] module.
//! - Saving back for swak, with the mixer's hyper-parameters as metadata: [`StateDict::save`],
//!   [`Mixer::save_file`], [`Mixer::load_file`], [`Spec`].
//! - Parity in your CI: [`fixture::Fixture::check`] judges tch-mix against fixtures that the
//!   Python package `tch-mix-tools` exports from your trained swak model.
//! - Errors: every fallible call returns a [`MixError`] naming what was expected and what came.
//!
//! The repository's README and its guides (`docs/`) cover loading, saving, parity, performance,
//! deployment and where tch-mix differs from swak.

// The README's code blocks run as doc tests too.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/parity.md")]
struct ParityGuideDoctests;

mod attention;
pub mod checkpoint;
mod cross;
mod cuda;
mod error;
pub mod fixture;
mod global;
mod instance;
mod kernels;
mod mixer;
#[allow(unsafe_code)] // reading libtorch's grad mode
mod mode;
mod save;
mod self_attention;
mod shared;
mod spec;

pub use attention::{AttentionConfig, MultiheadAttention};
pub use checkpoint::{load_var_store, StateDict, METADATA_ENTRY, METADATA_PREFIX};
pub use cross::CrossAttentionMixer;
pub use error::{MixError, Result, ShapeMismatch};
pub use global::{GlobalWeightsConfig, GlobalWeightsMixer};
pub use instance::{InstanceWeightsConfig, InstanceWeightsMixer};
pub use mixer::Mixer;
pub use self_attention::SelfAttentionMixer;
pub use shared::SharedMixer;
pub use spec::Spec;
