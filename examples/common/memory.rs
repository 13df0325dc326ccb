//! The peak resident memory a step adds, for the measuring examples (Linux): the kernel's
//! high-water mark (`VmHWM`), reset before the step (`/proc/self/clear_refs`), minus the
//! resident memory at that moment, so that libtorch's own start-up is left out.

/// A `/proc/self/status` entry in KiB (`VmRSS`, `VmHWM`).
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the high-water mark of resident memory and returns the resident memory now, in KiB.
pub fn reset_peak() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    status_kib("VmRSS:")
}

/// The MiB the high-water mark rose above `before` (from [`reset_peak`]), where Linux tells.
pub fn peak_mib(before: Option<u64>) -> Option<f64> {
    Some(status_kib("VmHWM:")?.saturating_sub(before?) as f64 / 1024.0)
}
