//! Bad input reaches the user as a `MixError` naming what was expected and what came.

mod common;

use common::ones;
use tch::{nn, Device, Kind, Tensor};
use tch_mix::{
    CrossAttentionMixer, GlobalWeightsConfig, GlobalWeightsMixer, InstanceWeightsConfig,
    InstanceWeightsMixer, MixError, Mixer, SelfAttentionMixer,
};

/// One mixer of each kind that takes `(..., 3, 4)` f32 input on the CPU.
fn mixers(vs: &nn::VarStore) -> Vec<Box<dyn Mixer>> {
    vec![
        Box::new(GlobalWeightsMixer::new(&(vs.root() / "g"), 4, 3, Default::default()).unwrap()),
        Box::new(InstanceWeightsMixer::new(&(vs.root() / "i"), 4, 3, Default::default()).unwrap()),
    ]
}

/// Runs forward and importance and returns both error messages, which must be equal.
fn errors(mix: &dyn Mixer, inp: &Tensor, mask: Option<&Tensor>) -> String {
    let forward = mix.f_forward_t(inp, mask, false).expect_err("forward accepted bad input");
    let importance = mix.f_importance(inp, mask).expect_err("importance accepted bad input");
    assert_eq!(forward.to_string(), importance.to_string());
    forward.to_string()
}

#[test]
fn input_of_fewer_than_two_dims_is_refused() {
    let vs = nn::VarStore::new(Device::Cpu);
    for mix in mixers(&vs) {
        let message = errors(mix.as_ref(), &ones(&[4]), None);
        assert_eq!(message, "input: expected shape (..., 3, 4), got [4]");
        errors(mix.as_ref(), &Tensor::from(1.0f32), None);
    }
}

#[test]
fn wrong_last_dim_is_refused() {
    let vs = nn::VarStore::new(Device::Cpu);
    for mix in mixers(&vs) {
        assert_eq!(
            errors(mix.as_ref(), &ones(&[2, 3, 5]), None),
            "input: expected shape (..., 3, 4), got [2, 3, 5]"
        );
    }
}

#[test]
fn wrong_feature_count_is_refused() {
    let vs = nn::VarStore::new(Device::Cpu);
    for mix in mixers(&vs) {
        assert_eq!(
            errors(mix.as_ref(), &ones(&[2, 2, 4]), None),
            "input: expected shape (..., 3, 4), got [2, 2, 4]"
        );
    }
}

#[test]
fn input_dtype_must_match_the_mixer() {
    let vs = nn::VarStore::new(Device::Cpu);
    for mix in mixers(&vs) {
        let inp = Tensor::ones([2, 3, 4], (Kind::Double, Device::Cpu));
        assert_eq!(errors(mix.as_ref(), &inp, None), "input: expected dtype Float, got Double");
    }
}

#[test]
#[ignore = "needs a CUDA device: scripts/device_check runs it with --ignored"]
fn input_device_must_match_the_mixer() {
    let cuda = common::cuda();
    let vs = nn::VarStore::new(Device::Cpu);
    let mut all = mixers(&vs);
    all.push(Box::new(
        CrossAttentionMixer::new(&(vs.root() / "c"), 4, Default::default()).unwrap(),
    ));
    all.push(Box::new(SelfAttentionMixer::new(&(vs.root() / "s"), 4, Default::default()).unwrap()));
    for mix in all {
        let inp = Tensor::ones([2, 3, 4], (Kind::Float, cuda));
        assert!(
            errors(mix.as_ref(), &inp, None).starts_with("input: expected device Cpu, got Cuda(0)")
        );
    }
}

#[test]
fn mask_must_fit_the_input() {
    let vs = nn::VarStore::new(Device::Cpu);
    for mix in mixers(&vs) {
        let inp = ones(&[2, 3, 4]);
        let wrong_shape = Tensor::zeros([2, 4], (Kind::Bool, Device::Cpu));
        assert_eq!(
            errors(mix.as_ref(), &inp, Some(&wrong_shape)),
            "mask: expected shape (2, 3) (the input's shape without its last dim), got [2, 4]"
        );
        let wrong_kind = Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu));
        assert_eq!(
            errors(mix.as_ref(), &inp, Some(&wrong_kind)),
            "mask: expected dtype Bool or a floating-point kind, got Int64"
        );
    }
}

#[test]
fn dropout_outside_zero_to_one_is_refused() {
    for dropout in [-0.1, 1.0, 1.5, f64::NAN] {
        let vs = nn::VarStore::new(Device::Cpu);
        let global = GlobalWeightsMixer::new(
            &vs.root(),
            4,
            3,
            GlobalWeightsConfig { dropout, ..Default::default() },
        );
        let instance = InstanceWeightsMixer::new(
            &vs.root(),
            4,
            3,
            InstanceWeightsConfig { dropout, ..Default::default() },
        );
        for result in [global.map(|_| ()), instance.map(|_| ())] {
            let err = result.expect_err("dropout accepted");
            assert!(matches!(err, MixError::Config(_)));
            assert_eq!(
                err.to_string(),
                format!("invalid configuration: dropout must lie in [0, 1), got {dropout}")
            );
        }
    }
}

#[test]
fn negative_sizes_are_refused() {
    let vs = nn::VarStore::new(Device::Cpu);
    let err = GlobalWeightsMixer::new(&vs.root(), 4, -1, Default::default()).unwrap_err();
    assert_eq!(err.to_string(), "invalid configuration: n_features must be at least 0, got -1");
    let err = InstanceWeightsMixer::new(&vs.root(), 0, 3, Default::default()).unwrap_err();
    assert_eq!(err.to_string(), "invalid configuration: mod_dim must be at least 1, got 0");
}

#[test]
fn sizes_whose_products_overflow_are_refused_before_allocating() {
    // (2^33 features of 2^31) would wrap to a [2^31, 0] weight in unchecked arithmetic.
    let vs = nn::VarStore::new(Device::Cpu);
    let config = InstanceWeightsConfig::default();
    let err = InstanceWeightsMixer::new(&(vs.root() / "i"), 1 << 31, 1 << 33, config).unwrap_err();
    assert!(matches!(err, MixError::Config(_)), "{err}");
    assert!(err.to_string().contains("n_features * mod_dim"), "{err}");
    let attention = tch_mix::AttentionConfig::default();
    let err = CrossAttentionMixer::new(&(vs.root() / "c"), i64::MAX / 2, attention).unwrap_err();
    assert!(err.to_string().contains("3 * mod_dim"), "{err}");
    assert!(vs.variables().is_empty(), "nothing was created");
}
