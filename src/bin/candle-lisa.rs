//! The `candle-lisa` command: see [`candle_lisa::cli`].

#[global_allocator]
static GLOBAL: candle_lisa::cli::alloc::Counting = candle_lisa::cli::alloc::Counting;

fn main() {
    candle_lisa::cli::main()
}
