//! With the feature `cuda`, compiles `kernels/lisa.cu` to PTX with nvcc (through `cudaforge`,
//! as candle's own kernels are built) and writes `$OUT_DIR/kernels.rs`, which holds the PTX
//! as `LISA`. Without it, does nothing.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda();
}

#[cfg(feature = "cuda")]
fn cuda() {
    println!("cargo::rerun-if-changed=kernels/lisa.cu");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = cudaforge::KernelBuilder::new()
        .source_files(["kernels/lisa.cu"])
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()
        .and_then(|ptx| ptx.write(out.join("kernels.rs")));
    if let Err(e) = ptx {
        panic!("compiling kernels/lisa.cu with nvcc failed (see scripts/cuda-env.sh for a toolkit): {e}");
    }
}
