//! The one error type of tch-mix.

use tch::TchError;

/// `(key, expected shape, shape that came)` of one weight whose shape does not fit.
pub type ShapeMismatch = (String, Vec<i64>, Vec<i64>);

/// Everything that can go wrong in tch-mix, each message naming what was expected and what came.
#[derive(Debug, thiserror::Error)]
pub enum MixError {
    /// A hyper-parameter that no mixer can be built with (dropout outside `[0, 1)`, zero heads, ...).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// An input or mask tensor of the wrong shape.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        /// Which tensor, e.g. "input" or "mask".
        what: &'static str,
        /// The expected shape, in words, e.g. `(..., 3, 8)`.
        expected: String,
        /// The shape that came.
        got: Vec<i64>,
    },

    /// A tensor whose element type differs from what the mixer needs.
    #[error("{what}: expected dtype {expected}, got {got:?}")]
    Kind {
        /// Which tensor.
        what: &'static str,
        /// The expected dtype(s), in words.
        expected: String,
        /// The dtype that came.
        got: tch::Kind,
    },

    /// A tensor on another device than the mixer's weights.
    #[error("{what}: expected device {expected:?}, got {got:?}")]
    Device {
        /// Which tensor.
        what: &'static str,
        /// The mixer's device.
        expected: tch::Device,
        /// The tensor's device.
        got: tch::Device,
    },

    /// Creating a variable whose name is already taken on the VarStore path
    /// (tch would silently rename it to `name__N`).
    #[error("variable {0:?} already exists in the VarStore; build each mixer on its own path")]
    DuplicateVariable(String),

    /// A strict load found keys or shapes that do not match, all of them listed.
    #[error("strict load failed:{}", strict_report(.missing, .unexpected, .mismatched))]
    StrictLoad {
        /// Variables of the module that the weights lack.
        missing: Vec<String>,
        /// Weights that no variable of the module takes.
        unexpected: Vec<String>,
        /// `(key, expected shape, shape in the file)` for every shape mismatch.
        mismatched: Vec<ShapeMismatch>,
    },

    /// A weight file or fixture that cannot be read: truncated, not a checkpoint, or holding
    /// something other than a state dict.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },

    /// libtorch refused an operation. The message is libtorch's without its C++ stack frames
    /// (the whole text stays in the source [`TchError`]).
    #[error("{}", torch_message(.0))]
    Torch(#[from] TchError),
}

/// A libtorch error's message up to where its C++ backtrace starts (`Exception raised from ...`,
/// `frame #0: ...`); other tch errors as tch words them.
fn torch_message(error: &TchError) -> String {
    let TchError::Torch(text) = error else {
        return error.to_string();
    };
    let kept: Vec<&str> = text
        .lines()
        .take_while(|line| {
            let line = line.trim_start();
            !line.starts_with("Exception raised from") && !line.starts_with("frame #")
        })
        .filter(|line| !line.trim().is_empty())
        .collect();
    let message = kept.join(" ");
    format!("libtorch: {}", if message.is_empty() { text.trim() } else { message.trim() })
}

fn strict_report(
    missing: &[String],
    unexpected: &[String],
    mismatched: &[ShapeMismatch],
) -> String {
    let mut report = String::new();
    if !missing.is_empty() {
        report += &format!(" missing keys {missing:?};");
    }
    if !unexpected.is_empty() {
        report += &format!(" unexpected keys {unexpected:?};");
    }
    for (key, expected, got) in mismatched {
        report += &format!(" shape mismatch for {key}: expected {expected:?}, got {got:?};");
    }
    report.pop();
    report
}

/// Shorthand for results of tch-mix.
pub type Result<T> = std::result::Result<T, MixError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_errors_keep_their_message_and_drop_the_cpp_frames() {
        let text = "[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: not enough \
                    memory: you tried to allocate 1099511627776 bytes.\nframe #0: \
                    c10::ThrowEnforceNotMet(char const*, int) + 0x55 (0x7f in libc10.so)\n\
                    frame #1: <unknown function> + 0x1";
        let message = MixError::from(TchError::Torch(text.to_string())).to_string();
        assert_eq!(
            message,
            "libtorch: [enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: not \
             enough memory: you tried to allocate 1099511627776 bytes."
        );
        let text = "shape '[2, 3]' is invalid for input of size 5\nException raised from \
                    infer_size_impl at aten/src/ATen/InferSize.h:98 (most recent call first):\n\
                    frame #0: c10::Error::Error";
        let message = MixError::from(TchError::Torch(text.to_string())).to_string();
        assert_eq!(message, "libtorch: shape '[2, 3]' is invalid for input of size 5");
    }

    #[test]
    fn a_real_libtorch_error_reaches_the_user_without_frames() {
        let t = tch::Tensor::zeros([5], (tch::Kind::Float, tch::Device::Cpu));
        let error = MixError::from(t.f_view([2, 3]).unwrap_err()).to_string();
        assert!(error.starts_with("libtorch: "), "{error}");
        assert!(error.contains("invalid for input of size 5"), "{error}");
        assert!(!error.contains("frame #") && !error.contains('\n'), "{error}");
    }
}
