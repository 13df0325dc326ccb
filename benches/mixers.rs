//! Criterion benches of the hot paths, for development: forward, importance and both in one
//! call, eval mode without autograd, f32 on the CPU, mod_dim 256, 16 features, 4 heads.
//! (`scripts/bench` compares with swak; this tracks tch-mix's own changes.)

use criterion::{criterion_main, BenchmarkId, Criterion};
use tch::{nn, Device, Kind, Tensor};
use tch_mix::{
    AttentionConfig, CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, Mixer,
    SelfAttentionMixer,
};

const MOD_DIM: i64 = 256;
const FEATURES: i64 = 16;

fn mixers(vs: &nn::VarStore) -> Vec<(&'static str, Box<dyn Mixer>)> {
    let attention = AttentionConfig { n_heads: 4, ..Default::default() };
    let root = vs.root();
    vec![
        (
            "global",
            Box::new(
                GlobalWeightsMixer::new(&(&root / "g"), MOD_DIM, FEATURES, Default::default())
                    .unwrap(),
            ),
        ),
        (
            "instance",
            Box::new(
                InstanceWeightsMixer::new(&(&root / "i"), MOD_DIM, FEATURES, Default::default())
                    .unwrap(),
            ),
        ),
        ("cross", Box::new(CrossAttentionMixer::new(&(&root / "c"), MOD_DIM, attention).unwrap())),
        ("self", Box::new(SelfAttentionMixer::new(&(&root / "s"), MOD_DIM, attention).unwrap())),
    ]
}

fn bench(c: &mut Criterion) {
    let _guard = tch::no_grad_guard();
    let vs = nn::VarStore::new(Device::Cpu);
    let mixers = mixers(&vs);
    for batch in [1i64, 1024] {
        let inp = Tensor::randn([batch, FEATURES, MOD_DIM], (Kind::Float, Device::Cpu));
        let mut group = c.benchmark_group(format!("batch{batch}"));
        group.sample_size(20);
        for (name, mixer) in &mixers {
            group.bench_with_input(BenchmarkId::new("forward", name), &inp, |b, inp| {
                b.iter(|| mixer.f_forward_t(inp, None, false).unwrap())
            });
            group.bench_with_input(BenchmarkId::new("importance", name), &inp, |b, inp| {
                b.iter(|| mixer.f_importance(inp, None).unwrap())
            });
            group.bench_with_input(BenchmarkId::new("both", name), &inp, |b, inp| {
                b.iter(|| mixer.f_forward_and_importance_t(inp, None, false).unwrap())
            });
        }
        group.finish();
    }
}

// criterion's macro defines an undocumented `benches` function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
use group::benches;
criterion_main!(benches);
