//! Writing into buffers the caller owns (`f_forward_into` and its kin): the same bits as the
//! allocating calls, nothing recorded for autograd, and a buffer that does not fit refused
//! and left as it was.

use tch::{nn, Device, Kind, Tensor};
use tch_mix::{
    AttentionConfig, CrossAttentionMixer, GlobalWeightsConfig, GlobalWeightsMixer,
    InstanceWeightsConfig, InstanceWeightsMixer, MixError, Mixer, SelfAttentionMixer, SharedMixer,
};

/// One mixer of each class on `vs` (`keep_dim` as given), in `kind`, weights redrawn.
fn mixers(vs: &mut nn::VarStore, keep_dim: bool, kind: Kind) -> Vec<Box<dyn Mixer>> {
    let attention = AttentionConfig { n_heads: 2, keep_dim, ..Default::default() };
    vs.set_kind(kind);
    let root = vs.root();
    let mixers: Vec<Box<dyn Mixer>> = vec![
        Box::new(
            GlobalWeightsMixer::new(
                &(&root / "g"),
                8,
                5,
                GlobalWeightsConfig { keep_dim, ..Default::default() },
            )
            .unwrap(),
        ),
        Box::new(
            InstanceWeightsMixer::new(
                &(&root / "i"),
                8,
                5,
                InstanceWeightsConfig { keep_dim, ..Default::default() },
            )
            .unwrap(),
        ),
        Box::new(CrossAttentionMixer::new(&(&root / "c"), 8, attention).unwrap()),
        Box::new(SelfAttentionMixer::new(&(&root / "s"), 8, attention).unwrap()),
    ];
    for (_, t) in vs.variables() {
        tch::no_grad(|| t.shallow_clone().copy_(&(Tensor::randn_like(&t) * 0.5)));
    }
    mixers
}

/// A seed for this run, printed so that a failure can be replayed (`TCH_MIX_SEED`).
fn seed() -> i64 {
    let seed =
        std::env::var("TCH_MIX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            nanos.map_or(0, |d| i64::from(d.subsec_nanos()))
        });
    println!("seed {seed} (TCH_MIX_SEED={seed} replays it)");
    tch::manual_seed(seed);
    seed
}

/// Garbage of the right shape, so that a buffer left unwritten cannot pass.
fn buffer_like(t: &Tensor) -> Tensor {
    t.full_like(f64::NAN)
}

#[test]
fn buffers_receive_the_bits_of_the_allocating_calls() {
    seed();
    for kind in [Kind::Float, Kind::Double] {
        for keep_dim in [false, true] {
            let mut vs = nn::VarStore::new(Device::Cpu);
            for mixer in mixers(&mut vs, keep_dim, kind) {
                for batch in [vec![1], vec![3], vec![2, 3], vec![300]] {
                    let shape = [batch.as_slice(), &[5, 8]].concat();
                    let inp = Tensor::randn(shape.as_slice(), (kind, Device::Cpu));
                    let mask = inp.select(-1, 0).gt(1.0);
                    for mask in [None, Some(&mask)] {
                        let what = format!(
                            "{:?} {kind:?} keep_dim {keep_dim} batch {batch:?} mask {}",
                            mixer.spec().name(),
                            mask.is_some()
                        );
                        let (out, importance) = tch::no_grad(|| {
                            mixer.f_forward_and_importance_t(&inp, mask, false).unwrap()
                        });
                        let forward =
                            tch::no_grad(|| mixer.f_forward_t(&inp, mask, false).unwrap());
                        let alone = tch::no_grad(|| mixer.f_importance(&inp, mask).unwrap());
                        let mut into = buffer_like(&forward);
                        mixer.f_forward_into(&mut into, &inp, mask).unwrap();
                        assert!(into.equal(&forward), "forward into: {what}");
                        let mut into = buffer_like(&alone);
                        mixer.f_importance_into(&mut into, &inp, mask).unwrap();
                        assert!(into.equal(&alone), "importance into: {what}");
                        let (mut a, mut b) = (buffer_like(&out), buffer_like(&importance));
                        mixer.f_forward_and_importance_into(&mut a, &mut b, &inp, mask).unwrap();
                        assert!(a.equal(&out) && b.equal(&importance), "both into: {what}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_buffer_that_does_not_fit_is_refused_and_left_as_it_was() {
    seed();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let inp = Tensor::randn([3, 5, 8], (Kind::Float, Device::Cpu));
    for mixer in mixers(&mut vs, false, Kind::Float) {
        let name = mixer.spec().name();
        let cases = [
            (Tensor::zeros([3, 7], (Kind::Float, Device::Cpu)), "shape"),
            (Tensor::zeros([3, 1, 8], (Kind::Float, Device::Cpu)), "shape"),
            (Tensor::zeros([3, 8], (Kind::Double, Device::Cpu)), "dtype"),
            (Tensor::new(), "shape"),
        ];
        for (buffer, why) in cases {
            let mut out = buffer.shallow_clone();
            let before = buffer.defined().then(|| buffer.copy());
            let err = mixer.f_forward_into(&mut out, &inp, None).unwrap_err();
            let fits = match why {
                "shape" => matches!(err, MixError::Shape { what: "output buffer", .. }),
                _ => matches!(err, MixError::Kind { what: "output buffer", .. }),
            };
            assert!(fits, "{name}: a buffer of the wrong {why} gave {err}");
            if let Some(before) = before {
                assert!(out.equal(&before), "{name}: a refused buffer was written");
            }
        }
        // Both at once: a wrong importance buffer leaves the output buffer unwritten too.
        let mut out = Tensor::zeros([3, 8], (Kind::Float, Device::Cpu));
        let mut importance = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
        let err =
            mixer.f_forward_and_importance_into(&mut out, &mut importance, &inp, None).unwrap_err();
        assert!(matches!(err, MixError::Shape { what: "importance buffer", .. }), "{name}: {err}");
        assert_eq!(out.abs().sum(Kind::Double).double_value(&[]), 0.0, "{name}: output written");
        // A bad input is the input's error, not the buffer's.
        let bad = Tensor::randn([3, 5, 9], (Kind::Float, Device::Cpu));
        let err = mixer.f_forward_into(&mut out, &bad, None).unwrap_err();
        assert!(matches!(err, MixError::Shape { what: "input", .. }), "{name}: {err}");
    }
}

#[test]
fn writing_into_a_buffer_records_nothing_for_autograd() {
    seed();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let inp = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    for mixer in mixers(&mut vs, false, Kind::Float) {
        assert!(tch::no_grad(|| mixer.variables()[0].1.requires_grad()), "weights are trainable");
        let mut out = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
        mixer.f_forward_into(&mut out, &inp, None).unwrap();
        assert!(!out.requires_grad(), "{}: the buffer joined a graph", mixer.spec().name());
        let expected = tch::no_grad(|| mixer.f_forward_t(&inp, None, false).unwrap());
        assert!(out.equal(&expected));
    }
}

#[test]
fn a_shared_mixer_writes_into_buffers_from_many_threads() {
    seed();
    let mut vs = nn::VarStore::new(Device::Cpu);
    for mixer in mixers(&mut vs, false, Kind::Float) {
        let shared = SharedMixer::new(mixer.as_ref()).unwrap();
        let inp = Tensor::randn([4, 5, 8], (Kind::Float, Device::Cpu));
        let (out, importance) = shared.forward_and_importance(&inp, None).unwrap();
        // Tensors are not `Sync`: each thread gets the numbers and makes its own.
        let values = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        let (inp, out, importance) = (values(&inp), values(&out), values(&importance));
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let inp = Tensor::from_slice(&inp).view([4, 5, 8]);
                    let out = Tensor::from_slice(&out).view([4, 8]);
                    let importance = Tensor::from_slice(&importance).view([4, 5]);
                    let (mut a, mut b) = (buffer_like(&out), buffer_like(&importance));
                    for _ in 0..50 {
                        shared.forward_and_importance_into(&mut a, &mut b, &inp, None).unwrap();
                        assert!(a.equal(&out) && b.equal(&importance));
                        shared.forward_into(&mut a, &inp, None).unwrap();
                        shared.importance_into(&mut b, &inp, None).unwrap();
                        assert!(a.equal(&out) && b.equal(&importance));
                    }
                });
            }
        });
    }
}

#[test]
fn buffers_of_other_strides_or_inside_the_input_get_the_values_all_the_same() {
    seed();
    let mut vs = nn::VarStore::new(Device::Cpu);
    for mixer in mixers(&mut vs, false, Kind::Float) {
        let name = mixer.spec().name();
        for batch in [1, 3] {
            let inp = Tensor::randn([batch, 5, 8], (Kind::Float, Device::Cpu));
            let (out, importance) =
                tch::no_grad(|| mixer.f_forward_and_importance_t(&inp, None, false).unwrap());
            // A transposed buffer: not contiguous, so the values are copied in.
            let strided = Tensor::full([8, batch], f64::NAN, (Kind::Float, Device::Cpu));
            let mut view = strided.transpose(0, 1);
            mixer.f_forward_into(&mut view, &inp, None).unwrap();
            assert!(view.equal(&out), "{name} batch {batch}: transposed buffer");
            // A buffer inside the input: the input is read whole before it is written.
            let copy = inp.copy();
            let mut inside = copy.select(1, 0);
            mixer.f_forward_into(&mut inside, &copy, None).unwrap();
            assert!(inside.equal(&out), "{name} batch {batch}: buffer inside the input");
            let copy = inp.copy();
            let mut inside = copy.select(2, 0).narrow(1, 0, 5);
            let both = mixer.f_forward_and_importance_into(
                &mut Tensor::zeros_like(&out),
                &mut inside,
                &copy,
                None,
            );
            both.unwrap();
            assert!(inside.equal(&importance), "{name} batch {batch}: importance inside the input");
        }
    }
}
