//! A minimal service binary on tch-mix: builds a mixer, mixes a batch, and reports what it found
//! (whether CUDA is available, the mixed shape). Used by scripts/test and scripts/deploy to check
//! that a crate depending on tch-mix alone links libtorch_cuda and runs.

use tch::{nn, Device, Kind, Tensor};
use tch_mix::{AttentionConfig, CrossAttentionMixer, Mixer};

fn main() -> Result<(), tch_mix::MixError> {
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = CrossAttentionMixer::new(&vs.root(), 16, AttentionConfig::default())?;
    let inp = Tensor::randn([4, 3, 16], (Kind::Float, Device::Cpu));
    let out = tch::no_grad(|| mix.f_forward_t(&inp, None, false))?;
    println!("cuda_available={} mixed={:?}", tch::Cuda::is_available(), out.size());
    Ok(())
}
