//! The attention mixers: swak's unit-test expectations, the properties that pin their behaviour,
//! and each documented difference from swak.

mod common;

use common::{assert_close, ones};
use tch::{nn, Device, Kind, Tensor};
use tch_mix::{AttentionConfig, CrossAttentionMixer, MixError, Mixer, SelfAttentionMixer};

fn config(n_heads: i64, bias: bool, skip: bool, keep_dim: bool) -> AttentionConfig {
    AttentionConfig { n_heads, bias, skip, keep_dim, dropout: 0.0 }
}

/// Both mixers on their own VarStores, with swak's test weights: all-one projections.
fn ones_mixers(config: AttentionConfig) -> Vec<Box<dyn Mixer>> {
    let cross =
        CrossAttentionMixer::new(&nn::VarStore::new(Device::Cpu).root(), 4, config).unwrap();
    let this = SelfAttentionMixer::new(&nn::VarStore::new(Device::Cpu).root(), 4, config).unwrap();
    let mixers: Vec<Box<dyn Mixer>> = vec![Box::new(cross), Box::new(this)];
    for mix in &mixers {
        for (key, t) in mix.variables() {
            if key.ends_with("weight") {
                let _ = tch::no_grad(|| t.shallow_clone().fill_(1.0));
            }
        }
    }
    mixers
}

/// Both mixers with random weights (non-zero biases) in f64.
fn random_mixers(n_heads: i64, skip: bool) -> Vec<Box<dyn Mixer>> {
    tch::manual_seed(7);
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let config = config(n_heads, true, skip, false);
    let mixers: Vec<Box<dyn Mixer>> = vec![
        Box::new(CrossAttentionMixer::new(&(vs.root() / "cross"), 6, config).unwrap()),
        Box::new(SelfAttentionMixer::new(&(vs.root() / "self"), 6, config).unwrap()),
    ];
    for (key, t) in vs.variables() {
        if key.ends_with("bias") {
            tch::no_grad(|| t.shallow_clone().copy_(&(Tensor::randn_like(&t) * 0.3)));
        }
    }
    mixers
}

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Double, Device::Cpu))
}

#[test]
fn parameters_have_pytorch_names_shapes_and_init() {
    for bias in [true, false] {
        let vs = nn::VarStore::new(Device::Cpu);
        let mix = CrossAttentionMixer::new(&(vs.root() / "mix"), 8, config(2, bias, true, false))
            .unwrap();
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        let expected: &[&str] = if bias {
            &[
                "mix.attention.in_proj_bias",
                "mix.attention.in_proj_weight",
                "mix.attention.out_proj.bias",
                "mix.attention.out_proj.weight",
            ]
        } else {
            &["mix.attention.in_proj_weight", "mix.attention.out_proj.weight"]
        };
        assert_eq!(names, expected);
        let attention = mix.attention();
        assert_eq!(attention.in_proj_weight.size(), [24, 8]);
        assert_eq!(attention.out_proj_weight.size(), [8, 8]);
        let xavier = (6.0f64 / 32.0).sqrt();
        let max = attention.in_proj_weight.abs().max().double_value(&[]);
        assert!(max <= xavier && max > 0.5 * xavier, "xavier-uniform bound {xavier}, max {max}");
        assert!(attention.out_proj_weight.abs().max().double_value(&[]) <= 1.0 / 8f64.sqrt());
        if bias {
            assert_eq!(
                attention.in_proj_bias.as_ref().unwrap().abs().sum(Kind::Double).double_value(&[]),
                0.0
            );
            assert_eq!(
                attention.out_proj_bias.as_ref().unwrap().abs().sum(Kind::Double).double_value(&[]),
                0.0
            );
        }
    }
}

#[test]
fn defaults_match_swak() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = SelfAttentionMixer::new(&vs.root(), 4, AttentionConfig::default()).unwrap();
    assert_eq!(mix.config(), config(1, true, true, false));
    assert_eq!(
        (mix.mod_dim(), mix.dropout(), mix.kind(), mix.device()),
        (4, 0.0, Kind::Float, Device::Cpu)
    );
}

#[test]
fn fresh_and_reset_reinitialise_with_same_hyper_parameters() {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Half);
    let config =
        AttentionConfig { n_heads: 2, bias: false, dropout: 0.1, skip: false, keep_dim: true };
    let mut mix = CrossAttentionMixer::new(&vs.root(), 4, config).unwrap();
    let _ = tch::no_grad(|| mix.attention().in_proj_weight.shallow_clone().fill_(5.0));
    let other = nn::VarStore::new(Device::Cpu);
    let fresh = mix.fresh(&other.root()).unwrap();
    assert_eq!((fresh.config(), fresh.mod_dim(), fresh.kind()), (config, 4, Kind::Half));
    assert!(fresh.attention().in_proj_weight.abs().max().double_value(&[]) < 1.0);
    mix.reset_parameters().unwrap();
    assert!(mix.attention().in_proj_weight.abs().max().double_value(&[]) < 1.0);
}

#[test]
fn reset_parameters_redraws_out_proj_weight_like_nn_linear() {
    // PyTorch's MultiheadAttention leaves out_proj.weight to nn.Linear's own init, which draws
    // from U(-1/sqrt(D), 1/sqrt(D)); a reset draws it anew (and zeroes the biases).
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut mix = CrossAttentionMixer::new(&vs.root(), 64, config(2, true, true, false)).unwrap();
    let weight = mix.attention().out_proj_weight.shallow_clone();
    let bias = mix.attention().out_proj_bias.as_ref().unwrap().shallow_clone();
    let _ = tch::no_grad(|| (weight.shallow_clone().fill_(5.0), bias.shallow_clone().fill_(5.0)));
    let before = weight.copy();
    mix.reset_parameters().unwrap();
    let bound = 1.0 / 64f64.sqrt();
    let max = weight.abs().max().double_value(&[]);
    assert!(max <= bound && max > 0.9 * bound, "max |w| = {max}, bound {bound}");
    assert!(weight.std(true).double_value(&[]) > 0.5 * bound / 3f64.sqrt(), "not uniform");
    assert_eq!(bias.abs().max().double_value(&[]), 0.0);
    mix.reset_parameters().unwrap();
    assert!((&weight - &before).abs().min().double_value(&[]) > 0.0, "not redrawn");
}

#[test]
fn swak_usage_expectations() {
    for mix in ones_mixers(config(1, false, false, false)) {
        assert_close(&mix.f_forward_t(&ones(&[2, 4]), None, false).unwrap(), &(ones(&[4]) * 16.0));
        assert_close(
            &mix.f_forward_t(&ones(&[5, 2, 4]), None, false).unwrap(),
            &(ones(&[5, 4]) * 16.0),
        );
        assert_eq!(mix.f_forward_t(&ones(&[0, 2, 4]), None, false).unwrap().size(), [0, 4]);
    }
    for mix in ones_mixers(config(1, false, true, false)) {
        assert_close(
            &mix.f_forward_t(&ones(&[3, 2, 4]), None, false).unwrap(),
            &(ones(&[3, 4]) * 16.0 + 1.0),
        );
    }
    for mix in ones_mixers(config(1, false, true, true)) {
        assert_close(
            &mix.f_forward_t(&ones(&[3, 2, 4]), None, false).unwrap(),
            &(ones(&[3, 1, 4]) * 16.0 + 1.0),
        );
    }
}

#[test]
fn swak_zero_feature_expectations() {
    for (skip, keep_dim) in [(false, false), (false, true), (true, false), (true, true)] {
        for mix in ones_mixers(config(1, false, skip, keep_dim)) {
            let expected = if keep_dim { vec![3, 0, 4] } else { vec![3, 4] };
            let out = mix.f_forward_t(&ones(&[3, 0, 4]), None, false).unwrap();
            assert_close(&out, &Tensor::zeros(expected.as_slice(), (Kind::Float, Device::Cpu)));
            assert_eq!(mix.f_importance(&ones(&[3, 0, 4]), None).unwrap().size(), [3, 0]);
        }
    }
}

#[test]
fn swak_importance_expectations() {
    for mix in ones_mixers(config(2, false, true, false)) {
        assert_close(&mix.f_importance(&ones(&[2, 4]), None).unwrap(), &(ones(&[2]) * 0.5));
        assert_close(&mix.f_importance(&ones(&[3, 2, 4]), None).unwrap(), &(ones(&[3, 2]) * 0.5));
        assert_close(&mix.f_importance(&ones(&[0, 2, 4]), None).unwrap(), &ones(&[0, 2]));
        assert_close(&mix.f_importance(&ones(&[3, 1, 4]), None).unwrap(), &ones(&[3, 1]));
        assert_close(&mix.f_importance(&ones(&[3, 5, 4]), None).unwrap(), &(ones(&[3, 5]) * 0.2));
        let mask = Tensor::from_slice(&[true, false, false, true, true, false]).view([3, 2]);
        let expected = Tensor::from_slice(&[0f32, 1., 1., 0., 0., 1.]).view([3, 2]);
        assert_close(&mix.f_importance(&ones(&[3, 2, 4]), Some(&mask)).unwrap(), &expected);
    }
}

#[test]
fn importance_sums_to_one_and_masked_features_get_zero() {
    for mix in random_mixers(3, true) {
        let inp = randn(&[4, 5, 6]);
        let mask = Tensor::rand([4, 5], (Kind::Float, Device::Cpu)).lt(0.4);
        let _ = mask.narrow(1, 0, 1).fill_(0); // at least one unmasked feature per row
        let importance = mix.f_importance(&inp, Some(&mask)).unwrap();
        let sums = importance.sum_dim_intlist(-1, false, Kind::Double);
        assert_close(&sums, &Tensor::ones([4], (Kind::Double, Device::Cpu)));
        assert_eq!(importance.masked_select(&mask).abs().sum(Kind::Double).double_value(&[]), 0.0);
        assert!(importance.masked_select(&mask.logical_not()).gt(0.0).all().int64_value(&[]) == 1);
    }
}

/// An input whose masked features (1 and 4 of 5) got other values.
fn with_masked_features_changed(inp: &Tensor) -> Tensor {
    let changed = inp.copy();
    changed.narrow(1, 1, 1).copy_(&(randn(&[4, 1, 6]) * 10.0));
    let _ = changed.narrow(1, 4, 1).fill_(1e3);
    changed
}

#[test]
fn masked_feature_values_do_not_change_cross_attention() {
    let mix = &random_mixers(2, false)[0]; // without skip: the skip term is the mean of all features
    let inp = randn(&[4, 5, 6]);
    let changed = with_masked_features_changed(&inp);
    let mask = Tensor::from_slice(&[false, true, false, false, true]).expand([4, 5], false);
    let out = mix.f_forward_t(&inp, Some(&mask), false).unwrap();
    assert_close(&out, &mix.f_forward_t(&changed, Some(&mask), false).unwrap());
    let importance = mix.f_importance(&inp, Some(&mask)).unwrap();
    assert_close(&importance, &mix.f_importance(&changed, Some(&mask)).unwrap());
}

#[test]
fn masked_features_still_query_in_self_attention_as_in_swak() {
    // A key padding mask hides features as keys only: as queries they still attend to the
    // unmasked features, and their rows enter the mean over queries (swak's and PyTorch's
    // semantics, kept for parity). What they receive is zero weight from every query.
    let mix = &random_mixers(2, false)[1];
    let inp = randn(&[4, 5, 6]);
    let changed = with_masked_features_changed(&inp);
    let mask = Tensor::from_slice(&[false, true, false, false, true]).expand([4, 5], false);
    let out = mix.f_forward_t(&inp, Some(&mask), false).unwrap();
    let other = mix.f_forward_t(&changed, Some(&mask), false).unwrap();
    assert!((out - other).abs().max().double_value(&[]) > 1e-6);
    let importance = mix.f_importance(&changed, Some(&mask)).unwrap();
    assert_eq!(importance.masked_select(&mask).abs().sum(Kind::Double).double_value(&[]), 0.0);
}

#[test]
fn self_attention_is_invariant_to_permuting_features() {
    let mix = &random_mixers(3, true)[1];
    let inp = randn(&[3, 5, 6]);
    let order = Tensor::from_slice(&[3i64, 0, 4, 1, 2]);
    let permuted = inp.index_select(1, &order);
    assert_close(
        &mix.f_forward_t(&inp, None, false).unwrap(),
        &mix.f_forward_t(&permuted, None, false).unwrap(),
    );
    let importance = mix.f_importance(&inp, None).unwrap();
    assert_close(&importance.index_select(1, &order), &mix.f_importance(&permuted, None).unwrap());
}

#[test]
fn float_mask_is_added_to_the_scores() {
    for mix in random_mixers(1, true) {
        let inp = randn(&[2, 3, 6]);
        let boolean = Tensor::from_slice(&[false, true, false, true, false, false]).view([2, 3]);
        let additive = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))
            .masked_fill(&boolean, f64::NEG_INFINITY);
        let a = mix.f_forward_t(&inp, Some(&boolean), false).unwrap();
        assert_close(&a, &mix.f_forward_t(&inp, Some(&additive), false).unwrap());
        let a = mix.f_importance(&inp, Some(&boolean)).unwrap();
        assert_close(&a, &mix.f_importance(&inp, Some(&additive)).unwrap());
        // A uniform shift of the scores changes no softmax.
        let shifted = mix
            .f_importance(&inp, Some(&Tensor::full([2, 3], 0.5, (Kind::Double, Device::Cpu))))
            .unwrap();
        assert_close(&shifted, &mix.f_importance(&inp, None).unwrap());
        // A finite, uneven mask reweights every query's softmax over the keys by exp(mask):
        // adding log(w) to one key's score multiplies its unnormalised weight by w.
        let uneven = Tensor::from_slice(&[0.0, 2f64.ln(), -1.0, 1.5, 0.0, 3f64.ln()]).view([2, 3]);
        let plain = mix.f_importance(&inp, None).unwrap();
        let masked = mix.f_importance(&inp, Some(&uneven)).unwrap();
        assert!((&masked - &plain).abs().max().double_value(&[]) > 1e-3, "{mix:?}: mask ignored");
        if format!("{mix:?}").starts_with("CrossAttentionMixer") {
            // One query and one head: the importance is that one softmax.
            let expected = &plain * uneven.exp();
            let expected = &expected / expected.sum_dim_intlist(-1, true, None::<Kind>);
            assert_close(&masked, &expected);
        }
        // The inference kernels and the autograd path (the weights require grad) add it alike.
        let (out, importance) = mix.f_forward_and_importance_t(&inp, Some(&uneven), false).unwrap();
        let (fast_out, fast_importance) =
            tch::no_grad(|| mix.f_forward_and_importance_t(&inp, Some(&uneven), false)).unwrap();
        assert_close(&out, &fast_out);
        assert_close(&importance, &fast_importance);
        assert_close(&importance, &masked);
    }
}

#[test]
fn four_dims_are_a_flattened_batch() {
    for mix in random_mixers(2, true) {
        let inp = randn(&[2, 3, 4, 6]);
        let mask = Tensor::rand([2, 3, 4], (Kind::Float, Device::Cpu)).lt(0.3);
        let flat = mix.f_forward_t(&inp.view([6, 4, 6]), Some(&mask.view([6, 4])), false).unwrap();
        assert_close(&mix.f_forward_t(&inp, Some(&mask), false).unwrap(), &flat.view([2, 3, 6]));
        let flat = mix.f_importance(&inp.view([6, 4, 6]), Some(&mask.view([6, 4]))).unwrap();
        assert_close(&mix.f_importance(&inp, Some(&mask)).unwrap(), &flat.view([2, 3, 4]));
    }
}

#[test]
fn fully_masked_row_gives_zero_importance_and_bias_plus_skip_output() {
    for mix in random_mixers(2, true) {
        let inp = randn(&[3, 4, 6]).set_requires_grad(true);
        let mask = Tensor::from_slice(&[
            true, true, true, true, false, true, false, false, true, true, true, true,
        ])
        .view([3, 4]);
        let importance = mix.f_importance(&inp, Some(&mask)).unwrap();
        assert_eq!(importance.isnan().any().int64_value(&[]), 0);
        assert_close(&importance.get(0), &Tensor::zeros([4], (Kind::Double, Device::Cpu)));
        assert_close(&importance.get(2), &Tensor::zeros([4], (Kind::Double, Device::Cpu)));
        let bias =
            mix.variables().into_iter().find(|(k, _)| *k == "attention.out_proj.bias").unwrap().1;
        for train in [false, true] {
            let out = mix.f_forward_t(&inp, Some(&mask), train).unwrap();
            let expected = &bias + inp.get(0).mean_dim(0, false, None::<Kind>);
            assert_close(&out.get(0), &expected);
            // No NaN reaches the gradients either.
            let grads = Tensor::run_backward(&[out.sum(Kind::Double)], &[&inp], false, false);
            assert_eq!(grads[0].isnan().any().int64_value(&[]), 0, "NaN gradient (train {train})");
        }
        let grads = Tensor::run_backward(&[importance.sum(Kind::Double)], &[&inp], false, false);
        assert_eq!(grads[0].isnan().any().int64_value(&[]), 0);
    }
}

#[test]
fn dropout_acts_in_training_only() {
    let config = AttentionConfig { n_heads: 2, dropout: 0.5, skip: false, ..Default::default() };
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = CrossAttentionMixer::new(&vs.root(), 4, config).unwrap();
    let inp = Tensor::randn([64, 3, 4], (Kind::Float, Device::Cpu));
    let eval = mix.f_forward_t(&inp, None, false).unwrap();
    assert_close(&eval, &mix.f_forward_t(&inp, None, false).unwrap());
    let train = mix.f_forward_t(&inp, None, true).unwrap();
    assert!(train.eq(0.0).sum(Kind::Int64).int64_value(&[]) > 0, "dropout zeroed nothing");
}

#[test]
fn n_heads_must_be_positive_and_divide_mod_dim() {
    let vs = nn::VarStore::new(Device::Cpu);
    let err = CrossAttentionMixer::new(&vs.root(), 6, config(0, true, true, false)).unwrap_err();
    assert_eq!(err.to_string(), "invalid configuration: n_heads must be at least 1, got 0");
    let err = SelfAttentionMixer::new(&vs.root(), 6, config(4, true, true, false)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: n_heads must divide mod_dim evenly, got n_heads = 4 for mod_dim = 6"
    );
    let err = SelfAttentionMixer::new(
        &vs.root(),
        6,
        AttentionConfig { dropout: 1.0, ..Default::default() },
    );
    assert!(matches!(err, Err(MixError::Config(_))));
}

#[test]
fn bad_input_and_mask_are_errors() {
    for mix in ones_mixers(config(1, true, true, false)) {
        for (inp, message) in [
            (ones(&[4]), "input: expected shape (..., n_features, 4), got [4]"),
            (ones(&[2, 3, 5]), "input: expected shape (..., n_features, 4), got [2, 3, 5]"),
            (
                Tensor::ones([2, 3, 4], (Kind::Double, Device::Cpu)),
                "input: expected dtype Float, got Double",
            ),
        ] {
            assert_eq!(mix.f_forward_t(&inp, None, false).unwrap_err().to_string(), message);
            assert_eq!(mix.f_importance(&inp, None).unwrap_err().to_string(), message);
        }
        let inp = ones(&[2, 3, 4]);
        for (mask, message) in [
            (
                Tensor::zeros([3], (Kind::Bool, Device::Cpu)),
                "mask: expected shape (2, 3) (the input's shape without its last dim), got [3]",
            ),
            (
                Tensor::zeros([2, 3], (Kind::Int, Device::Cpu)),
                "mask: expected dtype Bool or a floating-point kind, got Int",
            ),
        ] {
            assert_eq!(mix.f_forward_t(&inp, Some(&mask), false).unwrap_err().to_string(), message);
            assert_eq!(mix.f_importance(&inp, Some(&mask)).unwrap_err().to_string(), message);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: scripts/device_check runs it with --ignored"]
fn runs_on_cuda_like_on_cpu() {
    let cuda = common::cuda();
    let config = config(2, true, true, false);
    let mut gpu_vs = nn::VarStore::new(cuda);
    gpu_vs.set_kind(Kind::Double);
    let gpu: Vec<Box<dyn Mixer>> = vec![
        Box::new(CrossAttentionMixer::new(&(gpu_vs.root() / "cross"), 6, config).unwrap()),
        Box::new(SelfAttentionMixer::new(&(gpu_vs.root() / "self"), 6, config).unwrap()),
    ];
    for (cpu, gpu) in random_mixers(2, true).iter().zip(&gpu) {
        let state = tch_mix::StateDict::new(
            cpu.variables().into_iter().map(|(k, t)| (k.to_string(), t)).collect(),
        );
        gpu.load_state(&state).unwrap();
        let inp = randn(&[3, 4, 6]);
        let mask = Tensor::from_slice(&[
            true, true, true, true, false, true, false, false, true, false, false, false,
        ])
        .view([3, 4]);
        let expected = cpu.f_forward_t(&inp, Some(&mask), false).unwrap();
        let actual = gpu.f_forward_t(&inp.to(cuda), Some(&mask.to(cuda)), false).unwrap();
        assert_close(&actual.to(Device::Cpu), &expected);
        let expected = cpu.f_importance(&inp, Some(&mask)).unwrap();
        assert_close(
            &gpu.f_importance(&inp.to(cuda), Some(&mask.to(cuda))).unwrap().to(Device::Cpu),
            &expected,
        );
    }
}
