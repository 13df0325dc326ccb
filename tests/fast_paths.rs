//! The fast paths against the straightforward ones: the one-pass CPU kernels of inference
//! against the autograd path. (The pooled attention against PyTorch's own op sequence,
//! gradients included, is a unit test beside it, in `src/attention/fast.rs`.)
//!
//! Both paths round the same computation in a different order of sums, and the order of the
//! autograd path's sums is libtorch's, which differs from one CPU to the next. In f32 they are
//! judged by the rule of the parity check ([`Judge`]), not by a fixed distance from each other.

mod common;

use tch::{nn, Device, Kind, Tensor};
use tch_mix::fixture::{epsilon, TRUTH_FLOOR_EPS, TRUTH_MULTIPLE};
use tch_mix::{
    AttentionConfig, CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, Mixer,
    SelfAttentionMixer, StateDict,
};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    if a.numel() == 0 {
        return 0.0;
    }
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Seeds libtorch's generator with `TCH_MIX_TEST_SEED` if set, else with `default`, and prints
/// the seed.
fn seed(default: i64) -> i64 {
    let seed = std::env::var("TCH_MIX_TEST_SEED").map_or(default, |s| s.parse().unwrap());
    println!("seed {seed} (TCH_MIX_TEST_SEED)");
    tch::manual_seed(seed);
    seed
}

/// How many neighbouring inputs (every finite non-zero element moved one unit in the last
/// place, up or down at random) the autograd path's rounding is also measured on, for problems of up to
/// [`NEIGHBOURS_UP_TO`] input elements. One computation's error is a draw of luck (roundings
/// can cancel); over a large problem the largest error is already the largest of many draws.
const NEIGHBOURS: usize = 3;

/// The largest input (in elements) whose neighbours are measured.
const NEIGHBOURS_UP_TO: i64 = 1 << 16;

/// The largest absolute difference of `a` from `truth`, over the elements finite in both; NaN
/// and infinities must sit at the same places.
fn error(what: &str, a: &Tensor, truth: &Tensor) -> f64 {
    assert_eq!(a.size(), truth.size(), "{what}: shape");
    let flat = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let (a, truth) = (flat(a), flat(truth));
    let mut worst = 0.0f64;
    for (i, (&a, &t)) in a.iter().zip(&truth).enumerate() {
        let same_class = (a.is_nan() && t.is_nan()) || (a.is_finite() && t.is_finite()) || a == t;
        assert!(same_class, "{what}: element {i} is {a}, the float64 truth {t}");
        if a.is_finite() && t.is_finite() {
            worst = worst.max((a - t).abs());
        }
    }
    worst
}

/// The largest finite magnitude of `t`.
fn scale(t: &Tensor) -> f64 {
    let t = t.to_kind(Kind::Double);
    let finite = t.isfinite();
    t.where_self(&finite, &t.zeros_like()).abs().max().double_value(&[])
}

/// The autograd path's results on one problem, with the float64 truth (f32 mixers) and how far
/// the autograd path's rounding takes it from the truth.
struct Expected {
    out: Tensor,
    importance: Tensor,
    /// The float64 truth of output and importance (f32 mixers only).
    truth: Option<(Tensor, Tensor)>,
    /// The autograd path's largest error from the truth, over the problem and its neighbours,
    /// for output and importance.
    rounding: (f64, f64),
}

/// Judges one mixer's fast paths against its autograd path.
///
/// In f32, by the rule of the parity check: a fast result's largest error from the float64
/// truth (the same mixer copied to f64, on the same input) may reach [`TRUTH_MULTIPLE`] times
/// the autograd path's, taken as the larger of its error on the problem and on its neighbours,
/// plus [`TRUTH_FLOOR_EPS`] units of f32's epsilon times the truth's scale. Two orders of sums
/// of one computation pass it on any CPU; a real mistake (a dropped bias, a wrong weight or
/// mask) is thousands of times over. In f64, where there is no wider dtype for a truth, within
/// `1e-12` times the larger of 1 and the result's scale of the autograd path.
struct Judge<'a> {
    mix: &'a dyn Mixer,
    /// The mixer copied to f64, with its store (f32 mixers only).
    exact: Option<(nn::VarStore, Box<dyn Mixer>)>,
}

impl<'a> Judge<'a> {
    fn new(mix: &'a dyn Mixer) -> Self {
        let exact = (mix.kind() == Kind::Float).then(|| {
            let mut vs = nn::VarStore::new(Device::Cpu);
            vs.set_kind(Kind::Double);
            let exact = mix.spec().build(&vs.root()).unwrap();
            let state = mix.variables().into_iter().map(|(k, t)| (k.to_string(), t.detach()));
            exact.load_state(&StateDict::new(state.collect())).unwrap();
            (vs, exact)
        });
        Self { mix, exact }
    }

    /// The autograd path's output and importance on `inp` (with `mask`), the truth, and the
    /// autograd path's rounding.
    fn expected(&self, inp: &Tensor, mask: Option<&Tensor>) -> Expected {
        let reference =
            |inp: &Tensor| self.mix.f_forward_and_importance_t(inp, mask, false).unwrap();
        let (out, importance) = reference(inp);
        let Some((_, exact)) = &self.exact else {
            return Expected { out, importance, truth: None, rounding: (0.0, 0.0) };
        };
        let mask =
            mask.map(|m| if m.kind() == Kind::Bool { m.copy() } else { m.to_kind(Kind::Double) });
        // The truth on the autograd path too: libtorch's ops in f64, not the kernels under test.
        let truth = |inp: &Tensor| {
            exact
                .f_forward_and_importance_t(&inp.to_kind(Kind::Double), mask.as_ref(), false)
                .unwrap()
        };
        let (truth_out, truth_importance) = truth(inp);
        let mut rounding = (
            error("output", &out, &truth_out),
            error("importance", &importance, &truth_importance),
        );
        let neighbours = if inp.numel() as i64 <= NEIGHBOURS_UP_TO { NEIGHBOURS } else { 0 };
        for _ in 0..neighbours {
            let up = Tensor::rand(inp.size(), (Kind::Float, Device::Cpu)).lt(0.5);
            let towards = Tensor::full(inp.size(), f64::NEG_INFINITY, (inp.kind(), Device::Cpu))
                .masked_fill(&up, f64::INFINITY);
            let moved = inp.isfinite().logical_and(&inp.ne(0.0));
            let near = inp.nextafter(&towards).where_self(&moved, inp);
            let (o, i) = reference(&near);
            let (t_o, t_i) = truth(&near);
            rounding.0 = rounding.0.max(error("neighbour's output", &o, &t_o));
            rounding.1 = rounding.1.max(error("neighbour's importance", &i, &t_i));
        }
        Expected { out, importance, truth: Some((truth_out, truth_importance)), rounding }
    }

    /// Asserts that a fast path's `out` and `importance` (either may be left out) pass against
    /// `expected`.
    fn assert(
        &self,
        what: &str,
        expected: &Expected,
        out: Option<&Tensor>,
        importance: Option<&Tensor>,
    ) {
        let pairs = [
            (
                out,
                &expected.out,
                expected.truth.as_ref().map(|t| &t.0),
                expected.rounding.0,
                "output",
            ),
            (
                importance,
                &expected.importance,
                expected.truth.as_ref().map(|t| &t.1),
                expected.rounding.1,
                "importance",
            ),
        ];
        for (fast, reference, truth, rounding, name) in pairs {
            let Some(fast) = fast else { continue };
            assert_eq!(fast.size(), reference.size(), "{what}: {name} shape");
            match truth {
                None => {
                    let (off, allowed) =
                        (error(name, fast, reference), 1e-12 * scale(reference).max(1.0));
                    assert!(
                        off <= allowed,
                        "{what}: {name} {off:.1e} from the autograd path (allowed {allowed:.1e})"
                    );
                }
                Some(truth) => {
                    let off = error(name, fast, truth);
                    let floor = TRUTH_FLOOR_EPS * epsilon(Kind::Float) * scale(truth);
                    let allowed = TRUTH_MULTIPLE * rounding + floor;
                    assert!(
                        off <= allowed,
                        "{what}: {name} {off:.1e} from the float64 truth, the autograd path \
                         {rounding:.1e} (allowed {allowed:.1e})"
                    );
                }
            }
        }
    }
}

/// Every mixer, f32 or f64, with random weights, on `(n, f, d)` input.
fn mixers(kind: Kind, f: i64, d: i64, skip: bool) -> (nn::VarStore, Vec<Box<dyn Mixer>>) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(kind);
    let attention = AttentionConfig { n_heads: 4, skip, ..Default::default() };
    let mixers: Vec<Box<dyn Mixer>> = vec![
        Box::new(
            GlobalWeightsMixer::new(
                &(vs.root() / "g"),
                d,
                f,
                tch_mix::GlobalWeightsConfig { skip, ..Default::default() },
            )
            .unwrap(),
        ),
        Box::new(
            InstanceWeightsMixer::new(
                &(vs.root() / "i"),
                d,
                f,
                tch_mix::InstanceWeightsConfig { skip, ..Default::default() },
            )
            .unwrap(),
        ),
        Box::new(CrossAttentionMixer::new(&(vs.root() / "c"), d, attention).unwrap()),
        Box::new(SelfAttentionMixer::new(&(vs.root() / "s"), d, attention).unwrap()),
    ];
    for (key, t) in vs.variables() {
        if key.ends_with("bias") || key.ends_with("coeffs") {
            tch::no_grad(|| t.shallow_clone().copy_(&(Tensor::randn_like(&t) * 0.3)));
        }
    }
    (vs, mixers)
}

/// The inference path (no autograd: CPU kernels, chunks, threads) against the autograd path.
fn kernels_match_autograd(kind: Kind, n: i64, f: i64, d: i64) {
    seed(11);
    for skip in [true, false] {
        let (_vs, mixers) = mixers(kind, f, d, skip);
        let inp = Tensor::randn([n, f, d], (kind, Device::Cpu));
        let mask = Tensor::rand([n, f], (Kind::Float, Device::Cpu)).lt(0.3);
        let _ = mask.get(0).fill_(1); // one fully masked row
        for mix in &mixers {
            let judge = Judge::new(mix.as_ref());
            for mask in [None, Some(&mask)] {
                let what =
                    format!("{mix:?} {kind:?} {n}x{f}x{d} skip {skip} mask {}", mask.is_some());
                let expected = judge.expected(&inp, mask);
                let (out, importance) =
                    tch::no_grad(|| mix.f_forward_and_importance_t(&inp, mask, false)).unwrap();
                judge.assert(&what, &expected, Some(&out), Some(&importance));
                let alone = tch::no_grad(|| mix.f_importance(&inp, mask)).unwrap();
                judge.assert(&format!("{what}, importance alone"), &expected, None, Some(&alone));
                let forward = tch::no_grad(|| mix.f_forward_t(&inp, mask, false)).unwrap();
                judge.assert(&format!("{what}, forward alone"), &expected, Some(&forward), None);
            }
        }
    }
}

#[test]
fn cpu_kernels_match_autograd_path_f64() {
    // Several threads; a width of 12 takes both the vector slabs and the scalar tail.
    kernels_match_autograd(Kind::Double, 300, 5, 12);
}

#[test]
fn cpu_kernels_match_autograd_path_f32_in_chunks() {
    // 2100 instances of 16 x 256 f32 span several 16 MiB chunks of the attention mixers.
    kernels_match_autograd(Kind::Float, 2100, 16, 256);
}

#[test]
fn cpu_kernels_match_autograd_path_at_small_batches() {
    // Below 256 instances the attention mixers take their packed projections: a width of 12
    // leaves a part-filled panel, 7 instances of 5 features part-filled tiles of rows.
    kernels_match_autograd(Kind::Double, 7, 5, 12);
    kernels_match_autograd(Kind::Double, 1, 5, 12);
    kernels_match_autograd(Kind::Float, 16, 16, 256);
    kernels_match_autograd(Kind::Float, 7, 5, 12);
}

#[test]
fn packed_projections_without_biases_match_autograd() {
    seed(12);
    let vs = nn::VarStore::new(Device::Cpu);
    let config = AttentionConfig { n_heads: 3, bias: false, ..Default::default() };
    let mixers: Vec<Box<dyn Mixer>> = vec![
        Box::new(CrossAttentionMixer::new(&(vs.root() / "c"), 24, config).unwrap()),
        Box::new(SelfAttentionMixer::new(&(vs.root() / "s"), 24, config).unwrap()),
    ];
    let inp = Tensor::randn([3, 6, 24], (Kind::Float, Device::Cpu));
    for mix in &mixers {
        let judge = Judge::new(mix.as_ref());
        let expected = judge.expected(&inp, None);
        let (out, importance) =
            tch::no_grad(|| mix.f_forward_and_importance_t(&inp, None, false)).unwrap();
        judge.assert(&format!("{mix:?}"), &expected, Some(&out), Some(&importance));
    }
}

/// Whether `a` and `b` have NaN and infinities at the same places.
fn same_non_finite(a: &Tensor, b: &Tensor) -> bool {
    let class = |t: &Tensor| {
        let t = t.to_kind(Kind::Double);
        Tensor::stack(&[t.isnan(), t.isposinf(), t.isneginf()], 0)
    };
    a.size() == b.size() && class(a).equal(&class(b))
}

#[test]
fn kernels_match_autograd_on_nan_inf_and_huge_inputs() {
    // NaN, +inf, -inf and huge finite values in the input, and NaN / inf in a float mask, give
    // the same numbers (NaN where the other has NaN) on the inference kernels as on the autograd
    // path; only a row that the mask hides entirely gets zero weights.
    seed(13);
    for kind in [Kind::Float, Kind::Double] {
        let (_vs, mixers) = mixers(kind, 4, 8, true);
        let judges: Vec<Judge> = mixers.iter().map(|mix| Judge::new(mix.as_ref())).collect();
        let huge = if kind == Kind::Float { 1e16 } else { 1e150 };
        for (value, in_mask) in [
            (f64::NAN, false),
            (f64::INFINITY, false),
            (f64::NEG_INFINITY, false),
            (huge, false),
            (f64::NAN, true),
            (f64::INFINITY, true),
            (f64::NEG_INFINITY, true),
        ] {
            let inp = Tensor::randn([6, 4, 8], (kind, Device::Cpu));
            let mask = Tensor::randn([6, 4], (kind, Device::Cpu));
            if in_mask {
                let _ = mask.get(1).get(2).fill_(value);
                let _ = mask.get(3).fill_(f64::NEG_INFINITY); // one row hidden entirely
            } else {
                let _ = inp.get(1).get(2).get(3).fill_(value);
                let _ = inp.get(4).fill_(value); // one instance all of it
            }
            for (mix, judge) in mixers.iter().zip(&judges) {
                let expected = judge.expected(&inp, Some(&mask));
                let (fast_out, fast_importance) =
                    tch::no_grad(|| mix.f_forward_and_importance_t(&inp, Some(&mask), false))
                        .unwrap();
                let case = format!("{mix:?} {kind:?} value {value} in mask {in_mask}");
                judge.assert(&case, &expected, Some(&fast_out), Some(&fast_importance));
                // NaN where the autograd path has NaN, whatever the truth says.
                assert!(same_non_finite(&fast_out, &expected.out), "{case}: output");
                assert!(
                    same_non_finite(&fast_importance, &expected.importance),
                    "{case}: importance"
                );
                // PyTorch's softmax makes a row NaN that has a NaN or +inf score, or only
                // infinite ones of both signs: the instance full of NaN or infinities (not the
                // global weights, which do not look at the input), and the mask's NaN or +inf
                // (for the attention mixers, which add it to their scores).
                let name = format!("{mix:?}");
                let attention = !name.contains("WeightsMixer");
                let nan_row = match in_mask {
                    false => (!value.is_finite() && !name.starts_with("Global")).then_some(4),
                    true => (attention && (value.is_nan() || value > 0.0)).then_some(1),
                };
                let nan_rows: Vec<bool> =
                    Vec::try_from(fast_importance.isnan().any_dim(-1, false)).unwrap();
                for (row, &is_nan) in nan_rows.iter().enumerate() {
                    let expected = nan_row == Some(row) || (!in_mask && is_nan && row == 1);
                    assert_eq!(is_nan, expected, "{case}: row {row} NaN");
                }
                if in_mask && attention {
                    let hidden = fast_importance.get(3);
                    assert_eq!(
                        hidden.abs().sum(Kind::Double).double_value(&[]),
                        0.0,
                        "{case}: hidden row"
                    );
                }
            }
        }
    }
}

#[test]
fn self_attention_kernel_takes_many_features_in_slabs() {
    // The kernel holds the scores of 8 queries at a time (memory linear in the features, where
    // all F x F scores of 100k features would take 40 GB); its slabs must still cover every query.
    seed(17);
    let vs = nn::VarStore::new(Device::Cpu);
    let config = AttentionConfig { n_heads: 2, ..Default::default() };
    let mix = SelfAttentionMixer::new(&vs.root(), 4, config).unwrap();
    let judge = Judge::new(&mix);
    for f in [1, 7, 8, 9, 1003] {
        let inp = Tensor::randn([2, f, 4], (Kind::Float, Device::Cpu));
        let mask = Tensor::rand([2, f], (Kind::Float, Device::Cpu)).lt(0.2);
        let expected = judge.expected(&inp, Some(&mask));
        let (out, importance) =
            tch::no_grad(|| mix.f_forward_and_importance_t(&inp, Some(&mask), false)).unwrap();
        judge.assert(&format!("{f} features"), &expected, Some(&out), Some(&importance));
    }
}

#[test]
fn lazy_negated_views_give_their_values() {
    // libtorch may hand over a view with its negation bit set, whose stored elements are the
    // negated values; the kernels must read the values, not the storage.
    tch::manual_seed(19);
    for kind in [Kind::Float, Kind::Double] {
        let (_vs, mixers) = mixers(kind, 5, 12, true);
        let stored = Tensor::randn([40, 5, 12], (kind, Device::Cpu));
        let negated = stored.internal_neg_view();
        assert!(negated.is_neg(), "the view must carry the negation bit for this test");
        let values = stored.neg();
        let mask = Tensor::randn([40, 5], (kind, Device::Cpu)).internal_neg_view();
        for mix in &mixers {
            let (out, importance) =
                tch::no_grad(|| mix.f_forward_and_importance_t(&negated, Some(&mask), false))
                    .unwrap();
            let (expected_out, expected_importance) = tch::no_grad(|| {
                mix.f_forward_and_importance_t(&values, Some(&mask.neg().neg()), false)
            })
            .unwrap();
            assert!(max_diff(&out, &expected_out) < 1e-5, "{mix:?}: output");
            assert!(max_diff(&importance, &expected_importance) < 1e-5, "{mix:?}: importance");
        }
    }
}

#[test]
fn dropout_in_training_keeps_the_mix_unbiased() {
    // Dropout drops attention weights and mixed outputs; pooling first must keep the sum of the
    // dropped weights, so the average of many training passes is the eval output.
    tch::manual_seed(5);
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let config = AttentionConfig { n_heads: 2, dropout: 0.2, ..Default::default() };
    let mixers: Vec<Box<dyn Mixer>> = vec![
        Box::new(CrossAttentionMixer::new(&(vs.root() / "c"), 6, config).unwrap()),
        Box::new(SelfAttentionMixer::new(&(vs.root() / "s"), 6, config).unwrap()),
    ];
    let inp = Tensor::randn([3, 4, 6], (Kind::Double, Device::Cpu));
    for mix in &mixers {
        let eval = mix.f_forward_t(&inp, None, false).unwrap();
        let runs = 4000;
        let mut total = Tensor::zeros_like(&eval);
        for _ in 0..runs {
            total += mix.f_forward_t(&inp, None, true).unwrap().detach();
        }
        let mean = total / runs as f64;
        assert!(max_diff(&mean, &eval) < 0.05, "{mix:?}: {}", max_diff(&mean, &eval));
        assert!(max_diff(&mix.f_forward_t(&inp, None, true).unwrap(), &eval) > 1e-6, "no dropout");
    }
}

#[test]
fn inference_cache_follows_weight_changes() {
    // Inference caches tensors derived from the weights; every way of changing a weight
    // (in-place edit, reset, strict load, a new dtype) must void them.
    tch::manual_seed(9);
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let config = AttentionConfig { n_heads: 2, ..Default::default() };
    let mut mix = CrossAttentionMixer::new(&vs.root(), 6, config).unwrap();
    let inp = Tensor::randn([4, 3, 6], (Kind::Double, Device::Cpu));
    let inference = |mix: &CrossAttentionMixer, inp: &Tensor| {
        tch::no_grad(|| mix.f_forward_and_importance_t(inp, None, false)).unwrap()
    };
    let check = |mix: &CrossAttentionMixer, inp: &Tensor| {
        let (out, importance) = inference(mix, inp);
        let (expected_out, expected_importance) =
            mix.f_forward_and_importance_t(inp, None, false).unwrap();
        let tolerance = if out.kind() == Kind::Double { 1e-12 } else { 1e-5 };
        assert!(max_diff(&out, &expected_out) < tolerance, "stale output");
        assert!(max_diff(&importance, &expected_importance) < tolerance, "stale importance");
        out
    };
    let before = check(&mix, &inp);
    let w = mix.attention().in_proj_weight.shallow_clone();
    let _ = tch::no_grad(|| w.shallow_clone().g_mul_scalar_(1.5));
    assert!(max_diff(&check(&mix, &inp), &before) > 1e-6, "edit had no effect");
    // The output projection is packed with the input projection for small batches.
    let before = check(&mix, &inp);
    let w = mix.attention().out_proj_weight.shallow_clone();
    let _ = tch::no_grad(|| w.shallow_clone().g_mul_scalar_(1.5));
    assert!(max_diff(&check(&mix, &inp), &before) > 1e-6, "output projection edit had no effect");
    mix.reset_parameters().unwrap();
    let reset = check(&mix, &inp);
    let state = tch_mix::StateDict::new(
        mix.variables().into_iter().map(|(k, t)| (k.to_string(), t.copy() * 0.5)).collect(),
    );
    mix.load_state(&state).unwrap();
    assert!(max_diff(&check(&mix, &inp), &reset) > 1e-6, "load had no effect");
    vs.float();
    let out = check(&mix, &inp.to_kind(Kind::Float));
    assert_eq!(out.kind(), Kind::Float);
}

#[test]
fn inference_handles_empty_batches_and_single_instances() {
    for kind in [Kind::Float, Kind::Double] {
        let (_vs, mixers) = mixers(kind, 3, 8, true);
        for shape in [vec![0, 3, 8], vec![2, 0, 3, 8], vec![3, 8], vec![1, 1, 3, 8]] {
            let inp = Tensor::randn(shape.as_slice(), (kind, Device::Cpu));
            for mix in &mixers {
                let (out, importance) =
                    tch::no_grad(|| mix.f_forward_and_importance_t(&inp, None, false)).unwrap();
                let (expected_out, expected_importance) =
                    mix.f_forward_and_importance_t(&inp, None, false).unwrap();
                assert_eq!(out.size(), expected_out.size(), "{mix:?} {shape:?}");
                assert!(max_diff(&out, &expected_out) < 1e-5, "{mix:?} {shape:?}");
                assert!(max_diff(&importance, &expected_importance) < 1e-5, "{mix:?} {shape:?}");
            }
        }
    }
}

#[test]
fn inference_from_several_threads_at_once_matches_one_at_a_time() {
    // The kernels run on libtorch's OpenMP team; callers on threads of their own get teams of
    // their own. Identical weights come from the same seed; each thread owns its mixers.
    let build = || -> (nn::VarStore, Vec<Box<dyn Mixer + Send>>) {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let config = AttentionConfig { n_heads: 4, ..Default::default() };
        let instance = tch_mix::InstanceWeightsConfig::default();
        let mixers: Vec<Box<dyn Mixer + Send>> = vec![
            Box::new(CrossAttentionMixer::new(&(vs.root() / "c"), 32, config).unwrap()),
            Box::new(SelfAttentionMixer::new(&(vs.root() / "s"), 32, config).unwrap()),
            Box::new(InstanceWeightsMixer::new(&(vs.root() / "i"), 32, 6, instance).unwrap()),
        ];
        (vs, mixers)
    };
    let inp = Tensor::randn([500, 6, 32], (Kind::Float, Device::Cpu));
    let (_vs, reference) = build();
    let expected: Vec<Tensor> = reference
        .iter()
        .map(|mix| tch::no_grad(|| mix.f_forward_t(&inp, None, false)).unwrap())
        .collect();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (vs, mixers) = build();
            let (inp, expected) =
                (inp.copy(), expected.iter().map(Tensor::copy).collect::<Vec<_>>());
            std::thread::spawn(move || {
                let _vs = vs;
                for _ in 0..5 {
                    for (mix, expected) in mixers.iter().zip(&expected) {
                        let out = tch::no_grad(|| mix.f_forward_t(&inp, None, false)).unwrap();
                        assert!(max_diff(&out, expected) < 1e-5, "{mix:?}");
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("a worker thread failed");
    }
}

/// Small batches take kernels that run the whole call on the calling thread (cross-attention
/// from its input to its outputs, the global weights with their softmax): against the autograd
/// path with partial bool and float masks, a fully masked row, keep_dim, without biases, and on
/// 4-D and strided inputs.
#[test]
fn whole_call_kernels_of_small_batches_match_autograd() {
    seed(13);
    for (kind, n, f, d) in [(Kind::Float, 1, 16, 256), (Kind::Double, 3, 5, 12)] {
        for (keep_dim, bias) in [(false, true), (true, false)] {
            let mut vs = nn::VarStore::new(Device::Cpu);
            vs.set_kind(kind);
            let attention = AttentionConfig { n_heads: 4, keep_dim, bias, ..Default::default() };
            let global = tch_mix::GlobalWeightsConfig { keep_dim, ..Default::default() };
            let instance = tch_mix::InstanceWeightsConfig { keep_dim, bias, ..Default::default() };
            let mixers: Vec<Box<dyn Mixer>> = vec![
                Box::new(GlobalWeightsMixer::new(&(vs.root() / "g"), d, f, global).unwrap()),
                Box::new(InstanceWeightsMixer::new(&(vs.root() / "i"), d, f, instance).unwrap()),
                Box::new(CrossAttentionMixer::new(&(vs.root() / "c"), d, attention).unwrap()),
            ];
            for (_, t) in vs.variables() {
                tch::no_grad(|| t.shallow_clone().copy_(&(Tensor::randn_like(&t) * 0.3)));
            }
            let inp = Tensor::randn([n, f, d], (kind, Device::Cpu));
            let partial = Tensor::rand([n, f], (Kind::Float, Device::Cpu)).lt(0.3);
            let _ = partial.select(1, 0).fill_(0); // no row hidden entirely
            let dead = partial.copy();
            let _ = dead.get(n - 1).fill_(1);
            let additive =
                Tensor::randn([n, f], (kind, Device::Cpu)).masked_fill(&partial, f64::NEG_INFINITY);
            let strided = Tensor::randn([n, d, f], (kind, Device::Cpu)).transpose(1, 2);
            let four = inp.view([1, n, f, d]);
            let inputs = [(&inp, "input"), (&strided, "strided input"), (&four, "4-D input")];
            let masks = [
                (None, "no mask"),
                (Some(&partial), "partial bool mask"),
                (Some(&dead), "bool mask hiding a row"),
                (Some(&additive), "float mask"),
            ];
            for mix in &mixers {
                let judge = Judge::new(mix.as_ref());
                for ((inp, which), (mask, masked)) in
                    inputs.iter().flat_map(|i| masks.map(|m| (i, m)))
                {
                    let mask = mask.map(|m| m.reshape(&inp.size()[..inp.dim() - 1]));
                    let mask = mask.as_ref();
                    let name = mix.spec().name();
                    let what = format!("{name} {kind:?} {which} keep_dim {keep_dim} {masked}");
                    let expected = judge.expected(inp, mask);
                    let fast = tch::no_grad(|| mix.f_forward_t(inp, mask, false)).unwrap();
                    let fast_importance = tch::no_grad(|| mix.f_importance(inp, mask)).unwrap();
                    let (both, both_importance) =
                        tch::no_grad(|| mix.f_forward_and_importance_t(inp, mask, false)).unwrap();
                    judge.assert(&what, &expected, Some(&fast), Some(&fast_importance));
                    judge.assert(
                        &format!("{what}, both"),
                        &expected,
                        Some(&both),
                        Some(&both_importance),
                    );
                }
            }
        }
    }
}
