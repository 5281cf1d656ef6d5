//! Memory allocator settings for the model's working set (glibc only).
//!
//! A UNet step or VAE decode allocates and frees the same large activation
//! buffers (10-300 MB at 512 px) over and over. glibc serves allocations above
//! its mmap threshold (at most 32 MB) with fresh `mmap`s and unmaps them on
//! free, and trims freed heap memory back to the kernel; either way the next
//! allocation faults in new pages that the kernel must zero first: about 10% of
//! a 512-px step on the machine in benches/README.md. [`tune`] keeps freed
//! memory in the process for reuse instead: no `mmap` for large blocks, no
//! trimming, one arena (allocations are few and large, so threads don't contend).
//!
//! Measured (full-size SD 1.5, 512 px, 3 steps, 2 threads, alternating runs):
//! denoise 43.2 / 42.9 s → 39.2 / 39.9 s, VAE decode 15.9 / 15.3 s → 14.2 /
//! 14.7 s, peak RSS 4.91 → 5.08-5.11 GB. The cost: memory freed after a peak is
//! not returned to the kernel while the process lives (RSS stays near its peak,
//! which a model server reaches on its first large job anyway). Nor does it
//! creep: one server given 512, 256, 384, 512, 320, 512, 448 and 512-px jobs
//! in turn stayed at 5.08 GB RSS after the first.
//!
//! `SDSERVE_MALLOC=default`, or any `GLIBC_TUNABLES` in the environment, leaves
//! glibc's own settings alone.

/// Applies the settings above once, before the model allocates anything; a no-op
/// on other C libraries and when opted out. Returns whether it changed anything.
pub fn tune() -> bool {
    if std::env::var("SDSERVE_MALLOC").is_ok_and(|v| v == "default")
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return false;
    }
    tune_glibc()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_glibc() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is called before the
    // program starts its threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
            && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_glibc() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn applies_on_glibc_unless_opted_out() {
        let opted_out = std::env::var("SDSERVE_MALLOC").is_ok_and(|v| v == "default")
            || std::env::var_os("GLIBC_TUNABLES").is_some();
        let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
        assert_eq!(super::tune(), glibc && !opted_out);
    }
}
