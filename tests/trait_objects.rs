//! Mixers as trait objects and shared handles: in a tch pipeline, fresh copies, their spec, and
//! one frozen copy serving many threads at once.

use std::sync::Arc;

use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use tch_mix::{
    AttentionConfig, CrossAttentionMixer, GlobalWeightsConfig, GlobalWeightsMixer,
    InstanceWeightsConfig, InstanceWeightsMixer, Mixer, SelfAttentionMixer, SharedMixer, Spec,
};

/// One mixer of each class on `vs`, random weights and biases, `(.., 6, 16)` inputs.
fn boxed(vs: &nn::VarStore) -> Vec<Box<dyn Mixer>> {
    let attention = AttentionConfig { n_heads: 4, ..Default::default() };
    let mixers: Vec<Box<dyn Mixer>> = vec![
        Box::new(
            GlobalWeightsMixer::new(&(vs.root() / "g"), 16, 6, GlobalWeightsConfig::default())
                .unwrap(),
        ),
        Box::new(
            InstanceWeightsMixer::new(&(vs.root() / "i"), 16, 6, InstanceWeightsConfig::default())
                .unwrap(),
        ),
        Box::new(CrossAttentionMixer::new(&(vs.root() / "c"), 16, attention).unwrap()),
        Box::new(SelfAttentionMixer::new(&(vs.root() / "s"), 16, attention).unwrap()),
    ];
    for (_, t) in vs.variables() {
        tch::no_grad(|| t.shallow_clone().copy_(&(Tensor::randn_like(&t) * 0.3)));
    }
    mixers
}

#[test]
fn a_boxed_mixer_goes_into_a_tch_pipeline() {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let inp = Tensor::randn([3, 6, 16], (Kind::Float, Device::Cpu));
    for mix in boxed(&vs) {
        let expected = mix.f_forward_t(&inp, None, false).unwrap();
        let head = nn::linear(vs.root() / mix.spec().name(), 16, 2, Default::default());
        let expected = expected.apply(&head);
        let model = nn::seq_t().add(mix).add(head);
        let out = model.forward_t(&inp, false);
        assert_eq!(out.size(), [3, 2]);
        assert!(out.equal(&expected));
    }
}

#[test]
fn trait_objects_tell_their_sizes_and_make_fresh_copies() {
    let vs = nn::VarStore::new(Device::Cpu);
    let mixers = boxed(&vs);
    let sizes: Vec<(Option<i64>, Option<i64>)> =
        mixers.iter().map(|m| (m.n_features(), m.n_heads())).collect();
    assert_eq!(sizes, [(Some(6), None), (Some(6), None), (None, Some(4)), (None, Some(4))]);
    let mut other = nn::VarStore::new(Device::Cpu);
    other.set_kind(Kind::Double); // a fresh copy keeps the original's dtype, not the store's
    for mix in &mixers {
        let fresh = mix.fresh_boxed(&(other.root() / mix.spec().name())).unwrap();
        assert_eq!(fresh.spec(), mix.spec());
        assert_eq!((fresh.kind(), fresh.device()), (Kind::Float, Device::Cpu));
        let (a, b) = (&fresh.variables()[0].1, &mix.variables()[0].1);
        assert!(!a.equal(b), "{}: re-initialised", mix.spec().name());
    }
}

#[test]
fn a_spec_round_trips_through_its_text_form_and_names_both_sides_of_a_misfit() {
    let vs = nn::VarStore::new(Device::Cpu);
    for mix in boxed(&vs) {
        let meta = mix.spec().to_metadata();
        let read = Spec::from_metadata(|key| meta.get(key).cloned()).unwrap();
        assert_eq!(read, mix.spec());
    }
    let four =
        Spec::Cross { mod_dim: 16, config: AttentionConfig { n_heads: 4, ..Default::default() } };
    let two =
        Spec::Cross { mod_dim: 16, config: AttentionConfig { n_heads: 2, ..Default::default() } };
    let err = two.check_fits(&four).unwrap_err().to_string();
    assert!(err.contains("n_heads=4") && err.contains("n_heads=2"), "{err}");
    let trained = Spec::Cross {
        mod_dim: 16,
        config: AttentionConfig { n_heads: 4, dropout: 0.1, ..Default::default() },
    };
    assert!(four.check_fits(&trained).is_ok(), "dropout does not change the numbers");
    let err = Spec::from_metadata(|key| (key != "mod_dim").then(|| "1".to_string())).unwrap_err();
    assert!(err.to_string().contains("\"mod_dim\" is missing"), "{err}");
}

#[test]
fn one_shared_handle_serves_eight_threads_bit_identically() {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let inputs: Vec<Tensor> =
        [1, 5, 40].iter().map(|&n| Tensor::randn([n, 6, 16], (Kind::Float, Device::Cpu))).collect();
    let shared: Vec<Arc<SharedMixer>> =
        boxed(&vs).iter().map(|m| Arc::new(SharedMixer::new(m.as_ref()).unwrap())).collect();
    let expected: Vec<Vec<(Tensor, Tensor)>> = shared
        .iter()
        .map(|m| inputs.iter().map(|x| m.forward_and_importance(x, None).unwrap()).collect())
        .collect();
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let shared = shared.clone();
            let inputs: Vec<Tensor> = inputs.iter().map(Tensor::copy).collect();
            let expected: Vec<Vec<(Tensor, Tensor)>> = expected
                .iter()
                .map(|e| e.iter().map(|(a, b)| (a.copy(), b.copy())).collect())
                .collect();
            std::thread::spawn(move || {
                for call in 0..1000 {
                    let (m, x) = ((call + t) % shared.len(), call % inputs.len());
                    let (out, importance) = match call % 3 {
                        0 => shared[m].forward_and_importance(&inputs[x], None).unwrap(),
                        1 => {
                            (shared[m].forward(&inputs[x], None).unwrap(), expected[m][x].1.copy())
                        }
                        _ => (
                            expected[m][x].0.copy(),
                            shared[m].importance(&inputs[x], None).unwrap(),
                        ),
                    };
                    assert!(out.equal(&expected[m][x].0), "thread {t} call {call}: output");
                    assert!(
                        importance.equal(&expected[m][x].1),
                        "thread {t} call {call}: importance"
                    );
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("a worker failed");
    }
}

#[test]
fn a_shared_handle_owns_its_weights() {
    // Later writes to the original mixer's weights do not reach the frozen copy.
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = CrossAttentionMixer::new(&vs.root(), 16, AttentionConfig::default()).unwrap();
    let shared = SharedMixer::new(&mix).unwrap();
    let inp = Tensor::randn([2, 6, 16], (Kind::Float, Device::Cpu));
    let before = shared.forward(&inp, None).unwrap();
    let _ = tch::no_grad(|| mix.attention().in_proj_weight.shallow_clone().fill_(0.5));
    assert!(shared.forward(&inp, None).unwrap().equal(&before));
    assert!(!tch::no_grad(|| mix.f_forward_t(&inp, None, false)).unwrap().equal(&before));
}
