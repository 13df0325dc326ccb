//! # tch-mix
//!
//! The feature mixers of the Python library [swak](https://pypi.org/project/swak/)
//! (`swak.pt.mix`, version 1.2.0) on top of tch-rs, at numerical parity with swak, loading the
//! weights of models trained in PyTorch.
//!
//! A mixer combines stacked feature vectors `(..., n_features, mod_dim)` into one vector
//! `(..., mod_dim)` per instance, and tells how much each feature weighed in the mix
//! ([`Mixer::f_importance`]).
//!
//! | mixer | swak class | weights (`state_dict` keys) |
//! |---|---|---|
//! | [`GlobalWeightsMixer`] | `GlobalWeightsMixer` | `coeffs` |
//! | [`InstanceWeightsMixer`] | `InstanceWeightsMixer` | `project.weight`, `project.bias` |
//! | [`CrossAttentionMixer`] | `CrossAttentionMixer` | `attention.in_proj_weight`, `attention.in_proj_bias`, `attention.out_proj.weight`, `attention.out_proj.bias` |
//! | [`SelfAttentionMixer`] | `SelfAttentionMixer` | as `CrossAttentionMixer` |
//!
//! ```no_run
//! use tch::{nn, Device, Kind, Tensor};
//! use tch_mix::{InstanceWeightsConfig, InstanceWeightsMixer, Mixer, StateDict};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let mix = InstanceWeightsMixer::new(&(vs.root() / "mix"), 16, 4, Default::default())?;
//! // Weights of a PyTorch model whose mixer attribute is `mix`, saved with torch.save.
//! mix.load_state(&StateDict::from_file("model.pt")?.sub("mix"))?;
//! let inp = Tensor::randn([32, 4, 16], (Kind::Float, Device::Cpu));
//! // (32, 16) and (32, 4): the mixed features and each feature's importance, in one call.
//! let (mixed, importance) = tch::no_grad(|| mix.f_forward_and_importance_t(&inp, None, false))?;
//! # Ok::<(), tch_mix::MixError>(())
//! ```
//!
//! Weights go back to PyTorch the same way, with the mixer's hyper-parameters as metadata, which
//! loading checks ([`StateDict::save`], [`Mixer::save_file`], [`Mixer::load_file`]):
//!
//! ```no_run
//! # use tch::{nn, Device};
//! # use tch_mix::{InstanceWeightsMixer, Mixer, StateDict};
//! # let vs = nn::VarStore::new(Device::Cpu);
//! # let mix = InstanceWeightsMixer::new(&(vs.root() / "mix"), 16, 4, Default::default())?;
//! // `torch.load("model.pt", weights_only=True)` reads it; swak's `load_state_dict` takes it.
//! let mut state = StateDict::from_var_store(&vs, "");
//! state.set_spec("mix", &mix.spec());
//! state.save("model.pt")?;
//! // A swak Checkpoint gives its `model`; a mixer of other hyper-parameters is refused.
//! mix.load_file("checkpoint.pt".as_ref(), "mix")?;
//! # Ok::<(), tch_mix::MixError>(())
//! ```

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
