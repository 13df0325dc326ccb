//! The expectations of swak's own unit tests (tests/pt/mix/test_{global,instance}_weights.py),
//! in Rust, plus the behaviour tch-mix adds (validation).

mod common;

use common::{assert_close, ones};
use tch::{nn, Device, Kind, Tensor};
use tch_mix::{
    GlobalWeightsConfig, GlobalWeightsMixer, InstanceWeightsConfig, InstanceWeightsMixer, Mixer,
};

fn global(vs: &nn::VarStore, n_features: i64, config: GlobalWeightsConfig) -> GlobalWeightsMixer {
    GlobalWeightsMixer::new(&vs.root(), 4, n_features, config).unwrap()
}

fn no_skip() -> GlobalWeightsConfig {
    GlobalWeightsConfig { skip: false, ..Default::default() }
}

/// swak's InstanceWeightsMixer(4, n, bias=False, ...) with all projection weights set to one.
fn instance_ones(
    vs: &nn::VarStore,
    n_features: i64,
    skip: bool,
    keep_dim: bool,
) -> InstanceWeightsMixer {
    let config = InstanceWeightsConfig { bias: false, skip, keep_dim, ..Default::default() };
    let mix = InstanceWeightsMixer::new(&vs.root(), 4, n_features, config).unwrap();
    let _ = tch::no_grad(|| mix.weight.shallow_clone().fill_(1.0));
    mix
}

#[test]
fn global_defaults_match_swak() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = global(&vs, 3, GlobalWeightsConfig::default());
    assert_eq!(mix.mod_dim(), 4);
    assert_eq!(mix.n_features(), 3);
    assert_eq!((mix.dropout(), mix.skip(), mix.keep_dim()), (0.0, true, false));
    assert_eq!((mix.device(), mix.kind()), (Device::Cpu, Kind::Float));
    assert_close(&mix.coeffs, &ones(&[3]));
    let names: Vec<_> = mix.variables().into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, ["coeffs"]);
    assert_eq!(vs.variables().keys().collect::<Vec<_>>(), ["coeffs"]);
}

#[test]
fn global_reset_parameters_restores_ones() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mut mix = global(&vs, 3, GlobalWeightsConfig::default());
    let _ = tch::no_grad(|| mix.coeffs.shallow_clone().fill_(2.0));
    assert_close(&mix.coeffs, &(ones(&[3]) * 2.0));
    mix.reset_parameters().unwrap();
    assert_close(&mix.coeffs, &ones(&[3]));
}

#[test]
fn global_fresh_copy_has_same_hyper_parameters_and_own_weights() {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Half);
    let config = GlobalWeightsConfig { dropout: 0.1, skip: false, keep_dim: true };
    let mix = global(&vs, 3, config);
    let _ = tch::no_grad(|| mix.coeffs.shallow_clone().fill_(2.0));
    let other = nn::VarStore::new(Device::Cpu);
    let fresh = mix.fresh(&(other.root() / "copy")).unwrap();
    assert_eq!((fresh.mod_dim(), fresh.n_features(), fresh.config()), (4, 3, config));
    assert_eq!((fresh.kind(), fresh.device()), (Kind::Half, Device::Cpu));
    assert_close(&fresh.coeffs, &ones(&[3]));
    assert_close(&mix.coeffs, &(ones(&[3]) * 2.0));
    assert_eq!(other.variables().keys().collect::<Vec<_>>(), ["copy.coeffs"]);
}

#[test]
fn global_forward_handles_any_number_of_leading_dims() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = global(&vs, 2, no_skip());
    for (inp, out) in [
        (vec![2, 4], vec![4]),
        (vec![3, 2, 4], vec![3, 4]),
        (vec![5, 3, 2, 4], vec![5, 3, 4]),
        (vec![5, 0, 2, 4], vec![5, 0, 4]),
    ] {
        assert_close(&mix.f_forward_t(&ones(&inp), None, false).unwrap(), &ones(&out));
    }
}

#[test]
fn global_forward_accepts_and_ignores_a_mask() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = global(&vs, 2, no_skip());
    let mask = Tensor::from_slice(&[true, false, true, true, false, false]).view([3, 2]);
    assert_close(&mix.f_forward_t(&ones(&[3, 2, 4]), Some(&mask), false).unwrap(), &ones(&[3, 4]));
    assert_close(
        &mix.f_importance(&ones(&[3, 2, 4]), Some(&mask)).unwrap(),
        &(ones(&[3, 2]) * 0.5),
    );
}

#[test]
fn global_skip_and_keep_dim() {
    let vs = nn::VarStore::new(Device::Cpu);
    let skip = global(&vs, 2, GlobalWeightsConfig::default());
    assert_close(
        &skip.f_forward_t(&ones(&[3, 2, 4]), None, false).unwrap(),
        &(ones(&[3, 4]) * 2.0),
    );
    let vs = nn::VarStore::new(Device::Cpu);
    let keep = global(&vs, 2, GlobalWeightsConfig { keep_dim: true, ..Default::default() });
    assert_close(
        &keep.f_forward_t(&ones(&[3, 2, 4]), None, false).unwrap(),
        &(ones(&[3, 1, 4]) * 2.0),
    );
}

#[test]
fn zero_features_give_the_input_or_zeros_for_every_flag() {
    for skip in [false, true] {
        for keep_dim in [false, true] {
            let vs = nn::VarStore::new(Device::Cpu);
            let global = global(&vs, 0, GlobalWeightsConfig { skip, keep_dim, dropout: 0.0 });
            let instance = instance_ones(&nn::VarStore::new(Device::Cpu), 0, skip, keep_dim);
            let expected = if keep_dim { vec![3, 0, 4] } else { vec![3, 4] };
            for mix in [&global as &dyn Mixer, &instance] {
                let out = mix.f_forward_t(&ones(&[3, 0, 4]), None, false).unwrap();
                assert_close(&out, &Tensor::zeros(expected.as_slice(), (Kind::Float, Device::Cpu)));
                assert_eq!(mix.f_importance(&ones(&[3, 0, 4]), None).unwrap().size(), [3, 0]);
            }
        }
    }
}

/// `(n_features, input shape)` pairs for the importance tests: 2-D to 4-D, an empty batch, one
/// feature.
fn importance_cases() -> [(i64, Vec<i64>); 6] {
    [
        (2, vec![2, 4]),
        (2, vec![3, 2, 4]),
        (2, vec![5, 3, 2, 4]),
        (2, vec![5, 0, 2, 4]),
        (1, vec![3, 1, 4]),
        (5, vec![3, 5, 4]),
    ]
}

#[test]
fn global_importance_is_uniform_softmax_of_ones() {
    for (n, shape) in importance_cases() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mix = global(&vs, n, GlobalWeightsConfig::default());
        let leading = &shape[..shape.len() - 1];
        let actual = mix.f_importance(&ones(&shape), None).unwrap();
        assert_close(&actual, &(ones(leading) / n as f64));
    }
}

#[test]
fn global_one_and_five_features_mix_ones_to_ones() {
    for n in [1, 5] {
        let vs = nn::VarStore::new(Device::Cpu);
        let mix = global(&vs, n, no_skip());
        assert_close(&mix.f_forward_t(&ones(&[3, n, 4]), None, false).unwrap(), &ones(&[3, 4]));
    }
}

#[test]
fn instance_defaults_match_swak() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = InstanceWeightsMixer::new(&vs.root(), 4, 3, Default::default()).unwrap();
    assert_eq!((mix.mod_dim(), mix.n_features()), (4, 3));
    assert_eq!(
        mix.config(),
        InstanceWeightsConfig { bias: true, dropout: 0.0, skip: true, keep_dim: false }
    );
    assert_eq!(mix.weight.size(), [3, 12]);
    assert_eq!(mix.bias.as_ref().unwrap().size(), [3]);
    let mut names: Vec<_> = vs.variables().into_keys().collect();
    names.sort();
    assert_eq!(names, ["project.bias", "project.weight"]);
    // nn.Linear's init: U(-1/sqrt(12), 1/sqrt(12)) for weight and bias.
    let bound = 1.0 / 12f64.sqrt();
    for t in [&mix.weight, mix.bias.as_ref().unwrap()] {
        assert!(t.abs().max().double_value(&[]) <= bound);
        assert!(t.abs().max().double_value(&[]) > 0.0);
    }
}

#[test]
fn instance_reset_and_fresh_reinitialise() {
    let vs = nn::VarStore::new(Device::Cpu);
    let config = InstanceWeightsConfig { bias: false, dropout: 0.1, skip: false, keep_dim: true };
    let mut mix = InstanceWeightsMixer::new(&vs.root(), 4, 3, config).unwrap();
    assert!(mix.bias.is_none());
    let _ = tch::no_grad(|| mix.weight.shallow_clone().fill_(7.0));
    mix.reset_parameters().unwrap();
    assert!(mix.weight.abs().max().double_value(&[]) <= 1.0 / 12f64.sqrt());
    let other = nn::VarStore::new(Device::Cpu);
    let fresh = mix.fresh(&other.root()).unwrap();
    assert_eq!((fresh.config(), fresh.n_features(), fresh.mod_dim()), (config, 3, 4));
    assert!(!fresh.weight.equal(&mix.weight));
    assert_eq!(other.variables().len(), 1);
}

#[test]
fn instance_forward_handles_any_number_of_leading_dims() {
    let mix = instance_ones(&nn::VarStore::new(Device::Cpu), 2, false, false);
    for (inp, out) in [
        (vec![2, 4], vec![4]),
        (vec![5, 2, 4], vec![5, 4]),
        (vec![3, 5, 2, 4], vec![3, 5, 4]),
        (vec![1, 3, 5, 2, 4], vec![1, 3, 5, 4]),
        (vec![3, 0, 2, 4], vec![3, 0, 4]),
    ] {
        assert_close(&mix.f_forward_t(&ones(&inp), None, false).unwrap(), &ones(&out));
    }
}

#[test]
fn instance_skip_and_keep_dim() {
    let skip = instance_ones(&nn::VarStore::new(Device::Cpu), 2, true, false);
    assert_close(
        &skip.f_forward_t(&ones(&[3, 2, 4]), None, false).unwrap(),
        &(ones(&[3, 4]) * 2.0),
    );
    let keep = instance_ones(&nn::VarStore::new(Device::Cpu), 2, true, true);
    assert_close(
        &keep.f_forward_t(&ones(&[3, 2, 4]), None, false).unwrap(),
        &(ones(&[3, 1, 4]) * 2.0),
    );
}

#[test]
fn instance_importance_of_equal_scores_is_uniform() {
    for (n, shape) in importance_cases() {
        let mix = instance_ones(&nn::VarStore::new(Device::Cpu), n, true, false);
        let leading = &shape[..shape.len() - 1];
        assert_close(&mix.f_importance(&ones(&shape), None).unwrap(), &(ones(leading) / n as f64));
    }
}

#[test]
fn instance_scores_are_the_projection_of_the_flattened_features() {
    // swak's test_norm_called: with all-one weights the softmax sees 8 = 2 features x 4 dims.
    let mix = instance_ones(&nn::VarStore::new(Device::Cpu), 2, false, false);
    let inp = Tensor::arange(24, (Kind::Float, Device::Cpu)).view([3, 2, 4]);
    let scores = inp.flatten(-2, -1).sum_dim_intlist(-1, true, None::<Kind>).expand([3, 2], false);
    assert_close(&mix.f_importance(&inp, None).unwrap(), &scores.softmax(-1, None::<Kind>));
}

#[test]
fn dropout_is_active_in_training_only() {
    let vs = nn::VarStore::new(Device::Cpu);
    let config = GlobalWeightsConfig { dropout: 0.5, skip: false, keep_dim: false };
    let mix = global(&vs, 2, config);
    let inp = ones(&[1000, 2, 4]);
    assert_close(&mix.f_forward_t(&inp, None, false).unwrap(), &ones(&[1000, 4]));
    let trained = mix.f_forward_t(&inp, None, true).unwrap();
    let zeros = trained.eq(0.0).sum(Kind::Int64).int64_value(&[]);
    assert!((1000..3000).contains(&zeros), "{zeros} of 4000 dropped at p = 0.5");
    let kept = trained.ne(0.0);
    assert_close(&trained.masked_select(&kept), &(ones(&[4000 - zeros]) * 2.0));
}

#[test]
fn module_t_wrapper_forwards_without_mask() {
    use tch::nn::ModuleT;
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = global(&vs, 2, no_skip());
    assert_close(&mix.forward_t(&ones(&[3, 2, 4]), false), &ones(&[3, 4]));
}
