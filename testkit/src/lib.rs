//! What candle-lisa's tests, benches and examples share, as one crate instead of files pulled
//! in with `#[path]`: the counting [`alloc`]ator of the memory figures, [`gpt2`] written the
//! way a candle user writes a model, the [`training`] set-ups the reports and benches
//! compare, and the process settings of CPU training ([`setup`]). Not published.

pub mod alloc;
pub mod gpt2;
pub mod training;

/// Process-wide settings for CPU training; call first thing in `main`, before any thread
/// starts.
///
/// - [`keep_freed_memory`].
/// - candle 0.11.1 works out its thread count on every CPU matmul, reading `/proc/cpuinfo`
///   each time, unless `RAYON_NUM_THREADS` is set. Setting the variable to the machine's
///   parallelism (when the user has not set it) skips that; compare
///   `RAYON_NUM_THREADS= perf record` of the finetune example with and without it.
pub fn setup() {
    keep_freed_memory();
    set_thread_count();
}

/// Sets `RAYON_NUM_THREADS` to the machine's parallelism unless the user set it (see
/// [`setup`]); call before any thread starts.
pub fn set_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Keeps freed memory in the process instead of returning it to the OS.
///
/// glibc's malloc serves large blocks with fresh `mmap`s and gives them back on free, so
/// candle's many parameter- and activation-sized temporaries are page-faulted in again at
/// every op (`perf` shows the page faults and TLB flushes). Raising the mmap and trim
/// thresholds makes malloc reuse the memory. It changes nothing on other platforms.
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
