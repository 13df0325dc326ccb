//! What both peer benchmarks (examples/bench_torchscript.rs and bench-peers/ort) do with the
//! exported variants of a function: find them, and accept only those whose outputs match swak's.
//! Included by `#[path]`, as median.rs, so that the ORT package depends on nothing of tch-mix.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Largest `max |peer - swak| / max |swak|` accepted (f32 sums in another order).
pub const TOLERANCE: f64 = 1e-4;

/// The files `<prefix><variant><extension>` in `dir`, sorted, with their variant names.
pub fn variants(dir: &Path, prefix: &str, extension: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            let variant = name.strip_prefix(prefix)?.strip_suffix(extension)?.to_string();
            Some((variant, path))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The relative error of a variant's checked output where it is within [`TOLERANCE`]; else
/// `None`, with a `REFUSED` line saying why.
pub fn accepted(variant: &str, function: &str, checked: Result<f64>) -> Option<f64> {
    match checked {
        Ok(err) if err <= TOLERANCE => Some(err),
        Ok(err) => {
            println!("variant={variant} function={function} REFUSED err={err:.1e}");
            None
        }
        Err(why) => {
            println!("variant={variant} function={function} REFUSED {why:#}");
            None
        }
    }
}
