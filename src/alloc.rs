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
//! What it gains and costs, measured, is in benches/README.md ("Figures behind
//! constants in the code"). The cost: memory freed after a peak is not returned
//! to the kernel while the process lives (RSS stays near its peak, which a
//! model server reaches on its first large job anyway); it does not creep.
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
