//! [`Spec`]: what a mixer is, its swak class and hyper-parameters, enough to build an identical
//! one; and its text form, the metadata that travels with saved weights and fixtures.

use std::collections::BTreeMap;

use tch::{nn, Device, Kind};

use crate::error::{MixError, Result};
use crate::{
    AttentionConfig, CrossAttentionMixer, GlobalWeightsConfig, GlobalWeightsMixer,
    InstanceWeightsConfig, InstanceWeightsMixer, Mixer, SelfAttentionMixer,
};

/// A mixer's class and hyper-parameters (not its weights, dtype or device).
///
/// Its text form ([`Spec::to_metadata`]) names the class `mixer` (`global`, `instance`, `cross`,
/// `self`, as in fixtures) and each hyper-parameter by swak's name: `mod_dim`, `n_features`,
/// `n_heads`, `bias`, `dropout`, `skip`, `keep_dim`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spec {
    /// A [`GlobalWeightsMixer`].
    Global {
        /// The size of each feature vector.
        mod_dim: i64,
        /// The number of features.
        n_features: i64,
        /// The other hyper-parameters.
        config: GlobalWeightsConfig,
    },
    /// An [`InstanceWeightsMixer`].
    Instance {
        /// The size of each feature vector.
        mod_dim: i64,
        /// The number of features.
        n_features: i64,
        /// The other hyper-parameters.
        config: InstanceWeightsConfig,
    },
    /// A [`CrossAttentionMixer`].
    Cross {
        /// The size of each feature vector.
        mod_dim: i64,
        /// The other hyper-parameters.
        config: AttentionConfig,
    },
    /// A [`SelfAttentionMixer`].
    SelfAttention {
        /// The size of each feature vector.
        mod_dim: i64,
        /// The other hyper-parameters.
        config: AttentionConfig,
    },
}

impl Spec {
    /// The class as fixtures and saved files name it: `global`, `instance`, `cross` or `self`.
    pub fn name(&self) -> &'static str {
        match self {
            Spec::Global { .. } => "global",
            Spec::Instance { .. } => "instance",
            Spec::Cross { .. } => "cross",
            Spec::SelfAttention { .. } => "self",
        }
    }

    /// The size of each feature vector.
    pub fn mod_dim(&self) -> i64 {
        match *self {
            Spec::Global { mod_dim, .. }
            | Spec::Instance { mod_dim, .. }
            | Spec::Cross { mod_dim, .. }
            | Spec::SelfAttention { mod_dim, .. } => mod_dim,
        }
    }

    /// The number of features, for the mixers that fix it (global and instance weights).
    pub fn n_features(&self) -> Option<i64> {
        match *self {
            Spec::Global { n_features, .. } | Spec::Instance { n_features, .. } => Some(n_features),
            Spec::Cross { .. } | Spec::SelfAttention { .. } => None,
        }
    }

    /// The number of attention heads, for the attention mixers.
    pub fn n_heads(&self) -> Option<i64> {
        match self {
            Spec::Cross { config, .. } | Spec::SelfAttention { config, .. } => Some(config.n_heads),
            Spec::Global { .. } | Spec::Instance { .. } => None,
        }
    }

    /// A freshly initialised mixer of this spec on `path`, in the VarStore's dtype and device.
    ///
    /// # Errors
    /// As the mixer's constructor: invalid hyper-parameters, or variables already on `path`.
    pub fn build(&self, path: &nn::Path) -> Result<Box<dyn Mixer>> {
        self.build_as(path, path.kind(), path.device())
    }

    /// A freshly initialised mixer of this spec on `path`, in `kind` on `device`.
    pub(crate) fn build_as(
        &self,
        path: &nn::Path,
        kind: Kind,
        device: Device,
    ) -> Result<Box<dyn Mixer>> {
        Ok(match *self {
            Spec::Global { mod_dim, n_features, config } => Box::new(GlobalWeightsMixer::build(
                path, mod_dim, n_features, config, kind, device,
            )?),
            Spec::Instance { mod_dim, n_features, config } => Box::new(
                InstanceWeightsMixer::build(path, mod_dim, n_features, config, kind, device)?,
            ),
            Spec::Cross { mod_dim, config } => {
                Box::new(CrossAttentionMixer::build(path, mod_dim, config, kind, device)?)
            }
            Spec::SelfAttention { mod_dim, config } => {
                Box::new(SelfAttentionMixer::build(path, mod_dim, config, kind, device)?)
            }
        })
    }

    /// The text form: `mixer` and every hyper-parameter of this class, as strings.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut meta = BTreeMap::new();
        let mut put = |key: &str, value: String| meta.insert(key.to_string(), value);
        put("mixer", self.name().to_string());
        put("mod_dim", self.mod_dim().to_string());
        let (dropout, skip, keep_dim) = match *self {
            Spec::Global { n_features, config, .. } => {
                put("n_features", n_features.to_string());
                (config.dropout, config.skip, config.keep_dim)
            }
            Spec::Instance { n_features, config, .. } => {
                put("n_features", n_features.to_string());
                put("bias", config.bias.to_string());
                (config.dropout, config.skip, config.keep_dim)
            }
            Spec::Cross { config, .. } | Spec::SelfAttention { config, .. } => {
                put("n_heads", config.n_heads.to_string());
                put("bias", config.bias.to_string());
                (config.dropout, config.skip, config.keep_dim)
            }
        };
        put("dropout", format!("{dropout:?}"));
        put("skip", skip.to_string());
        put("keep_dim", keep_dim.to_string());
        meta
    }

    /// Reads the text form; `get` looks a key up. An error names the key that is missing or
    /// does not parse.
    ///
    /// # Errors
    /// [`MixError::Config`] naming the key that is missing or does not parse.
    pub fn from_metadata(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        fn parse<T: std::str::FromStr>(
            get: &dyn Fn(&str) -> Option<String>,
            key: &str,
        ) -> Result<T> {
            let text = get(key)
                .ok_or_else(|| MixError::Config(format!("mixer metadata: {key:?} is missing")))?;
            text.parse().map_err(|_| {
                MixError::Config(format!("mixer metadata: {key:?} = {text:?} is not a valid value"))
            })
        }
        let get: &dyn Fn(&str) -> Option<String> = &get;
        let mod_dim = parse(get, "mod_dim")?;
        let (dropout, skip, keep_dim) =
            (parse(get, "dropout")?, parse(get, "skip")?, parse(get, "keep_dim")?);
        let mixer: String = parse(get, "mixer")?;
        Ok(match mixer.as_str() {
            "global" => Spec::Global {
                mod_dim,
                n_features: parse(get, "n_features")?,
                config: GlobalWeightsConfig { dropout, skip, keep_dim },
            },
            "instance" => Spec::Instance {
                mod_dim,
                n_features: parse(get, "n_features")?,
                config: InstanceWeightsConfig {
                    bias: parse(get, "bias")?,
                    dropout,
                    skip,
                    keep_dim,
                },
            },
            "cross" | "self" => {
                let (n_heads, bias) = (parse(get, "n_heads")?, parse(get, "bias")?);
                let config = AttentionConfig { n_heads, bias, dropout, skip, keep_dim };
                match mixer.as_str() {
                    "cross" => Spec::Cross { mod_dim, config },
                    _ => Spec::SelfAttention { mod_dim, config },
                }
            }
            other => {
                return Err(MixError::Config(format!(
                    "mixer metadata: mixer = {other:?}, expected global, instance, cross or self"
                )))
            }
        })
    }

    /// Checks that weights saved from a mixer of spec `saved` fit this one: an error naming both
    /// where they differ in class or in any hyper-parameter that changes the numbers (dropout,
    /// a training-only setting, may differ).
    pub fn check_fits(&self, saved: &Spec) -> Result<()> {
        let without_dropout = |spec: &Spec| {
            let mut meta = spec.to_metadata();
            meta.remove("dropout");
            meta
        };
        if without_dropout(self) == without_dropout(saved) {
            return Ok(());
        }
        Err(MixError::Config(format!(
            "the weights were saved from {} but are loaded into {}",
            saved.describe(),
            self.describe()
        )))
    }

    /// One line: `cross(mod_dim=8, n_heads=4, bias=true, ...)`.
    pub fn describe(&self) -> String {
        let meta = self.to_metadata();
        let fields: Vec<String> =
            meta.iter().filter(|(k, _)| *k != "mixer").map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}({})", self.name(), fields.join(", "))
    }
}
