//! Helpers shared by the examples.
#![allow(dead_code)]

/// Keeps freed memory in the process instead of returning it to the OS.
///
/// glibc's malloc serves large blocks with fresh `mmap`s and gives them back on free, so
/// candle's many parameter- and activation-sized temporaries are page-faulted in again at
/// every op: measured here, 40% of a CPU training step went to page faults and TLB flushes,
/// and backward ran about 2x slower. Raising the mmap and trim thresholds makes malloc reuse
/// the memory. It changes nothing on other platforms.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only sets allocator tunables; called before any thread starts.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
