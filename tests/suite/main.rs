//! The integration tests, in one binary: each test binary links candle, which takes a while.

#![allow(dead_code)]

mod common;

#[cfg(feature = "mpi")]
mod dist;

mod block_map;
mod bundled;
mod chat;
mod checkpoint;
mod data;
mod diskfull;
mod dropin;
mod errors;
mod freezing;
mod frozen_linear;
mod gguf;
mod gpt2;
mod hub;
use candle_lisa_testkit::gpt2 as gpt2_model;
mod llama;
mod lora;
mod parity;
mod parity_hf;
mod peft;
mod plan;
mod precision;
mod quant;
mod readers;
mod recompute;
mod resume;
mod sampler;
mod state;
mod train;
