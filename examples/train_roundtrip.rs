//! Weights both ways between Rust and swak, with a small model: per-feature encoders
//! (`nn::linear`, `(B, E)` -> `(B, D)` each, stacked to `(B, F, D)`), a swak mixer, and a linear
//! head, named as the PyTorch model of `scripts/roundtrip_swak.py` names its modules
//! (`encoders.<i>.weight`, `mix.*`, `head.weight`, ...).
//!
//! ```text
//! train_roundtrip train  --mixer M --out DIR
//!     trains the model a few Adam steps on synthetic data, saves it with the mixer's metadata to
//!     DIR/rust.safetensors and DIR/rust.pt, and writes DIR/rust-io.safetensors: the input, the
//!     model's output (eval) and the mixer's importance.
//! train_roundtrip resave --mixer M --input IO --out DIR FILE...
//!     loads each FILE (safetensors, torch.save state dict or swak Checkpoint, written by swak)
//!     strictly into the model, checking the mixer's hyper-parameters if the file carries them,
//!     runs IO's input through it, and saves it again: DIR/<file stem>.resaved.{safetensors,pt}
//!     and DIR/<file stem>.io.safetensors.
//! ```
//!
//! `scripts/roundtrip_swak.py` runs both against the real swak for all four mixers and checks
//! that swak loads what Rust saved with `strict=True` and that the outputs agree.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tch_mix::{load_var_store, AttentionConfig, Mixer, Spec, StateDict};

/// Features, the size of each feature's raw input, the mixer's `mod_dim`, and the batch.
const FEATURES: i64 = 3;
const INPUT: i64 = 5;
const DIM: i64 = 8;
const BATCH: i64 = 16;

/// The mixer of each class as `scripts/roundtrip_swak.py` builds it.
fn spec(mixer: &str) -> Result<Spec> {
    let attention = AttentionConfig { n_heads: 2, ..Default::default() };
    Ok(match mixer {
        "global" => Spec::Global { mod_dim: DIM, n_features: FEATURES, config: Default::default() },
        "instance" => {
            Spec::Instance { mod_dim: DIM, n_features: FEATURES, config: Default::default() }
        }
        "cross" => Spec::Cross { mod_dim: DIM, config: attention },
        "self" => Spec::SelfAttention { mod_dim: DIM, config: attention },
        other => bail!("--mixer: expected global, instance, cross or self, got {other:?}"),
    })
}

/// Encoders, mixer and head on one VarStore.
struct Model {
    vs: nn::VarStore,
    encoders: Vec<nn::Linear>,
    mix: Box<dyn Mixer>,
    head: nn::Linear,
}

impl Model {
    fn new(spec: &Spec) -> Result<Self> {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let encoders = (0..FEATURES)
            .map(|i| nn::linear(&root / "encoders" / i, INPUT, DIM, Default::default()));
        let encoders = encoders.collect();
        let mix = spec.build(&(&root / "mix"))?;
        let head = nn::linear(&root / "head", DIM, 1, Default::default());
        Ok(Self { vs, encoders, mix, head })
    }

    /// The encoded features `(B, F, D)` of an input `(B, F, E)`.
    fn encode(&self, inp: &Tensor) -> Result<Tensor> {
        let features: Vec<Tensor> = self
            .encoders
            .iter()
            .enumerate()
            .map(|(i, e)| e.forward(&inp.select(1, i as i64)))
            .collect();
        Ok(Tensor::f_stack(&features, 1)?)
    }

    /// The output `(B, 1)` and the mixer's importance `(B, F)`.
    fn forward(&self, inp: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let encoded = self.encode(inp)?;
        let out = self.mix.f_forward_t(&encoded, None, train)?.apply(&self.head);
        let importance = tch::no_grad(|| self.mix.f_importance(&encoded, None))?;
        Ok((out, importance))
    }

    /// The whole model's state dict, with the mixer's hyper-parameters as metadata.
    fn state(&self) -> StateDict {
        let mut state = StateDict::from_var_store(&self.vs, "");
        state.set_spec("mix", &self.mix.spec());
        state
    }

    /// Loads a whole state dict strictly, refusing one whose metadata describes another mixer.
    fn load(&self, state: &StateDict) -> Result<()> {
        if let Some(saved) = state.spec("mix")? {
            self.mix.spec().check_fits(&saved)?;
        }
        load_var_store(&self.vs, state)?;
        Ok(())
    }

    /// Saves the model to `<dir>/<name>.safetensors` and `<dir>/<name>.pt`, and its input,
    /// output and importance on `inp` to `<dir>/<io>`.
    fn save(&self, dir: &Path, name: &str, inp: &Tensor, io: &str) -> Result<()> {
        let state = self.state();
        for ext in ["safetensors", "pt"] {
            state.save(dir.join(format!("{name}.{ext}")))?;
        }
        let (out, importance) = tch::no_grad(|| self.forward(inp, false))?;
        let entries = vec![
            ("input".to_string(), inp.shallow_clone()),
            ("output".to_string(), out),
            ("importance".to_string(), importance),
        ];
        StateDict::new(entries).save(dir.join(io))?;
        Ok(())
    }
}

fn train(mixer: &str, out: &Path) -> Result<()> {
    tch::manual_seed(0);
    let model = Model::new(&spec(mixer)?)?;
    // Synthetic data: the target is the sum of the first feature's inputs.
    let inp = Tensor::randn([BATCH, FEATURES, INPUT], (Kind::Float, Device::Cpu));
    let target = inp.select(1, 0).sum_dim_intlist(-1, true, Kind::Float);
    let mut opt = nn::Adam::default().build(&model.vs, 1e-2)?;
    let mut losses = Vec::new();
    for _ in 0..20 {
        let (pred, _) = model.forward(&inp, true)?;
        let loss = pred.f_mse_loss(&target, tch::Reduction::Mean)?;
        opt.backward_step(&loss);
        losses.push(loss.double_value(&[]));
    }
    let first_last = (losses[0], losses[losses.len() - 1]);
    ensure!(first_last.1 < first_last.0, "training did not reduce the loss: {first_last:?}");
    model.save(out, "rust", &inp, "rust-io.safetensors")?;
    println!(
        "{mixer}: trained 20 Adam steps (loss {:.4} -> {:.4}), saved to {}",
        first_last.0,
        first_last.1,
        out.display()
    );
    Ok(())
}

fn resave(mixer: &str, io: &Path, out: &Path, files: &[PathBuf]) -> Result<()> {
    let inp = StateDict::from_file(io)?;
    let inp = inp.get("input").context("the input file holds no `input`")?;
    for file in files {
        let model = Model::new(&spec(mixer)?)?;
        let state = StateDict::from_file(file)?;
        model.load(&state).with_context(|| format!("loading {}", file.display()))?;
        let stem = file.file_stem().context("a file name")?.to_string_lossy().into_owned();
        let resaved = format!("{stem}.resaved");
        model.save(out, &resaved, inp, &format!("{stem}.io.safetensors"))?;
        let carried = if state.spec("mix")?.is_some() { "with" } else { "without" };
        println!(
            "{mixer}: {} ({carried} metadata) -> {}.{{safetensors,pt}}",
            file.display(),
            out.join(resaved).display()
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut mixer, mut out, mut io, mut files) = (None, None, None, Vec::new());
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--mixer" => mixer = Some(value()?.clone()),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--input" => io = Some(PathBuf::from(value()?)),
            flag if flag.starts_with("--") => bail!("unknown option {flag}"),
            file => files.push(PathBuf::from(file)),
        }
    }
    let mixer = mixer.context("--mixer is needed")?;
    let out = out.context("--out is needed")?;
    std::fs::create_dir_all(&out)?;
    match args.first().map(String::as_str) {
        Some("train") => train(&mixer, &out),
        Some("resave") => resave(&mixer, &io.context("--input is needed")?, &out, &files),
        _ => bail!("usage: train_roundtrip train|resave --mixer M --out DIR [--input IO FILE...]"),
    }
}
