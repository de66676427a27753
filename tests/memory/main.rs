//! Tests that count heap bytes with the memory report's global allocator. The counters are
//! global to the process, so these live in their own binary and take [`serial`] first: no two
//! of them run at once.

use std::sync::{Mutex, MutexGuard};

use candle_lisa_testkit::alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

mod attention_memory;
mod lean_update;
mod recompute_memory;

/// Held for the whole of a test that reads the counters.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
