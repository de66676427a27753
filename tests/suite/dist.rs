//! Data-parallel training over MPI (feature `mpi`). `two_ranks_over_mpi` runs this test binary
//! again under `mpirun -n 2`, where `rank_main` makes the checks on each rank; a failed check
//! on one rank ends the whole job, and so the test.

use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_lisa::data::{Example, StepSampler};
use candle_lisa::dist::{Communicator, Mpi};
use candle_lisa::optim::SamplerChoice;
use candle_lisa::train::{CausalLm, Checkpointer, Constant, Trainer, TrainerConfig};
use candle_lisa::{LisaAdamW, LisaConfig, LisaError, Llama, LlamaConfig, TrainingPlan};
use candle_nn::ParamsAdamW;
use sha2::{Digest, Sha256};

type Error = Box<dyn std::error::Error>;

/// Set in the environment of the ranks, to the directory they share.
const SHARED_DIR: &str = "CANDLE_LISA_TEST_MPI_DIR";

#[test]
fn two_ranks_over_mpi() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new("mpirun")
        .args(["-n", "2"])
        .arg(exe)
        .args(["dist::rank_main", "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(SHARED_DIR, dir.path())
        // Open MPI: containers run as root, and may report fewer slots than cores.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run mpirun (install Open MPI: openmpi-bin): {e}"))?;
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(600) {
            child.kill()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(out.status.success(), "mpirun failed: {}", out.status);
    for rank in 0..2 {
        assert!(
            stdout.contains(&format!("rank {rank} of 2: all checks passed")),
            "rank {rank} did not finish"
        );
    }
    Ok(())
}

/// The checks of one rank; run only by `two_ranks_over_mpi`, under `mpirun -n 2`.
#[test]
#[ignore = "runs under mpirun, started by two_ranks_over_mpi"]
fn rank_main() -> Result<(), Error> {
    let mpi = Rc::new(Mpi::init()?);
    let (rank, world) = (mpi.rank(), mpi.world_size());
    assert_eq!(world, 2, "run under mpirun -n 2");
    let shared = std::path::PathBuf::from(std::env::var(SHARED_DIR)?);
    two_ranks_equal_one(&mpi, &shared)?;
    println!("rank {rank}: two ranks give one rank's weights");
    another_seed_is_caught(&mpi)?;
    println!("rank {rank}: another seed is caught");
    a_failing_rank_stops_every_rank(&mpi, &shared)?;
    println!("rank {rank}: a failing rank stops every rank");
    println!("rank {rank} of {world}: all checks passed");
    Ok(())
}

fn config() -> LlamaConfig {
    let mut c = LlamaConfig::tiny(40, 32, 4, 4, 2);
    c.intermediate_size = 64;
    c
}

/// Eight examples of different lengths, so the ranks' shares count different labels.
fn examples() -> Vec<Example> {
    (0..8u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + i % 3).map(|k| (i * 5 + k * 3) % 39).collect();
            let response: Vec<u32> = (0..1 + i % 4).map(|k| (i * 7 + k) % 39).collect();
            Example::prompt_response(&prompt, &response, 39)
        })
        .collect()
}

fn trainer(lisa: LisaConfig) -> Result<Trainer<Llama>, Error> {
    let varmap = crate::common::seeded_llama(&config(), 9)?;
    // eps = 1 keeps the update close to linear in the gradient, so a difference in the last
    // bit of a summed gradient stays that small in the weights instead of flipping the sign
    // of a near-zero element's update, as plain AdamW's normalisation could.
    let params = ParamsAdamW {
        lr: 1e-2,
        eps: 1.0,
        weight_decay: 0.1,
        ..Default::default()
    };
    let opt = LisaAdamW::new(&varmap, params, lisa)?;
    let c = config();
    let build = move |plan: &TrainingPlan| Llama::from_plan(&c, plan);
    let schedule = Constant {
        lr: 1e-2,
        warmup: 0,
    };
    Ok(Trainer::new(
        opt,
        schedule,
        TrainerConfig::default(),
        build,
    )?)
}

/// A hash of every weight of `trainer`, as eight u32 words.
fn weights_hash(trainer: &Trainer<Llama>) -> Result<Vec<u32>, Error> {
    let mut hasher = Sha256::new();
    for (name, var) in trainer.optimizer().vars() {
        hasher.update(name.as_bytes());
        for v in var.flatten_all()?.to_vec1::<f32>()? {
            hasher.update(v.to_le_bytes());
        }
    }
    Ok(hasher
        .finalize()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Two ranks with half a batch each (and two micro-batches each), through two redraws, give
/// the weights of one process with the whole batch; every rank holds the same weights after
/// every step; the bytes sent are the trainable bytes, exactly; the gradient-norm sampler
/// draws from the summed gradients (the ranks would disagree otherwise); only rank 0 writes
/// checkpoints, and both ranks resume from them.
fn two_ranks_equal_one(mpi: &Rc<Mpi>, shared: &std::path::Path) -> Result<(), Error> {
    let lisa = LisaConfig {
        gamma: 2,
        period: 3,
        seed: 4,
        sampler: SamplerChoice::GradNorm {
            beta: 0.5,
            floor: 0.1,
        },
        ..Default::default()
    };
    let (dev, ex, batch) = (Device::Cpu, examples(), 6);
    let mut one = trainer(lisa.clone())?;
    let mut two = trainer(lisa.clone())?;
    two.set_communicator(Box::new(mpi.clone()))?;
    let (whole, mine) = (
        StepSampler::new(11),
        StepSampler::new(11).for_rank(mpi.rank(), 2)?,
    );
    for step in 1..=8u64 {
        let trainable = two.optimizer().trainable_bytes();
        let expected = one.step(&whole.micro_batches(&ex, step, batch, 1, 0, None, &dev)?)?;
        let got = two.step(&mine.micro_batches(&ex, step, batch, 2, 0, None, &dev)?)?;
        assert_eq!(got.all_reduced_bytes, trainable, "step {step}");
        assert_eq!(got.tokens, expected.tokens, "step {step}");
        assert!(
            (got.loss - expected.loss).abs() <= 1e-6 * expected.loss,
            "step {step}"
        );
        assert!(
            (got.grad_norm - expected.grad_norm).abs() <= 1e-6 * expected.grad_norm,
            "step {step}: {} vs {}",
            got.grad_norm,
            expected.grad_norm
        );
        assert_eq!(got.resampled, expected.resampled, "step {step}");
        assert_eq!(
            two.optimizer().active_blocks(),
            one.optimizer().active_blocks()
        );
        let mut worst = 0.0f32;
        for ((name, a), (_, b)) in one.optimizer().vars().zip(two.optimizer().vars()) {
            let diff = (a.as_tensor() - b.as_tensor())?.abs()?.max_all()?;
            let scale = a.as_tensor().abs()?.max_all()?.to_scalar::<f32>()?;
            let rel = diff.to_scalar::<f32>()? / scale;
            assert!(rel <= 1e-6, "step {step}: {name} differs by {rel:e}");
            worst = worst.max(rel);
        }
        let hash = weights_hash(&two)?;
        let root = Tensor::new(hash.as_slice(), &dev)?;
        mpi.broadcast(&root, 0)?;
        assert_eq!(root.to_vec1::<u32>()?, hash, "rank {} differs", mpi.rank());
        if mpi.rank() == 0 {
            println!(
                "step {step}: loss {:.6} vs {:.6}, blocks {:?}, {} bytes sent, worst relative \
                 weight difference {worst:.2e}",
                got.loss,
                expected.loss,
                two.optimizer().active_blocks(),
                got.all_reduced_bytes
            );
        }
    }
    assert_eq!(two.optimizer().period_index(), 2);
    let ck = Checkpointer::new(shared.join("checkpoints"), 2, &serde_json::json!({"t": 1}))?;
    let dir = two.save_checkpoint(&ck, |_| Ok(()))?;
    assert!(dir.join("weights.safetensors").is_file());
    let mut again = trainer(lisa)?;
    again.set_communicator(Box::new(mpi.clone()))?;
    assert_eq!(again.resume(&ck)?, Some(8));
    assert_eq!(weights_hash(&again)?, weights_hash(&two)?);
    Ok(())
}

/// The first draw of the uniform sampler for `seed`, and its second (4 blocks, γ = 2).
fn draws(seed: u64) -> Result<(Vec<usize>, Vec<usize>), Error> {
    let mut sampler = SamplerChoice::Uniform.build(seed)?;
    let sorted = |mut d: Vec<usize>| {
        d.sort_unstable();
        d
    };
    let first = sorted(sampler.draw(4, 2));
    Ok((first, sorted(sampler.draw(4, 2))))
}

/// Rank 1 given another seed than rank 0: if its first draw differs, joining fails; if only
/// its second does, the step that redraws fails, on both ranks, with the typed error.
fn another_seed_is_caught(mpi: &Rc<Mpi>) -> Result<(), Error> {
    let rank = mpi.rank();
    let (first, second) = draws(4)?;
    let same_first = (5..1000)
        .find(|&s| draws(s).is_ok_and(|(f, n)| f == first && n != second))
        .ok_or("no seed with the same first draw")?;
    let other_first = (5..1000)
        .find(|&s| draws(s).is_ok_and(|(f, _)| f != first))
        .ok_or("no seed with another first draw")?;
    let lisa = |seed| LisaConfig {
        gamma: 2,
        period: 3,
        seed,
        ..Default::default()
    };
    let expect_disagreement = |result: candle_lisa::Result<()>| match result {
        Err(LisaError::RankDisagreement {
            disagreeing,
            differs,
            ..
        }) => {
            assert_eq!(disagreeing, 1);
            assert_eq!(differs, rank == 1);
        }
        other => panic!("rank {rank}: expected a disagreement, got {other:?}"),
    };

    let mut t = trainer(lisa(if rank == 1 { other_first } else { 4 }))?;
    expect_disagreement(t.set_communicator(Box::new(mpi.clone())));

    let mut t = trainer(lisa(if rank == 1 { same_first } else { 4 }))?;
    t.set_communicator(Box::new(mpi.clone()))?;
    let (dev, ex) = (Device::Cpu, examples());
    let mine = StepSampler::new(11).for_rank(rank, 2)?;
    for step in 1..=2 {
        t.step(&mine.micro_batches(&ex, step, 4, 1, 0, None, &dev)?)?;
    }
    let result = t.step(&mine.micro_batches(&ex, 3, 4, 1, 0, None, &dev)?);
    expect_disagreement(result.map(|_| ()));
    Ok(())
}

/// A Llama whose loss fails while `fail` is set, built by a closure that fails while
/// `fail_build` is set: faults injected on one rank.
struct Faulty {
    model: Llama,
    fail: Arc<AtomicBool>,
}

impl CausalLm for Faulty {
    fn loss(&self, batch: &candle_lisa::data::Batch) -> candle_lisa::Result<Tensor> {
        if self.fail.load(SeqCst) {
            return Err(injected("its loss"));
        }
        self.model.loss(&batch.ids, &batch.labels)
    }
}

fn injected(what: &str) -> LisaError {
    LisaError::InvalidArgument {
        what: "injected fault",
        reason: what.into(),
    }
}

/// An error on rank 1 at four points (its loss; its batch, before the step; between steps,
/// while rank 0 saves a checkpoint; the model's rebuild after a redraw, after the update):
/// each time both ranks return an error within 30 s, rank 1 its own and rank 0
/// `RankFailed`, and afterwards they go on stepping together. A watchdog ends the process
/// if a rank hangs in a collective instead.
fn a_failing_rank_stops_every_rank(mpi: &Rc<Mpi>, shared: &std::path::Path) -> Result<(), Error> {
    let rank = mpi.rank();
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = done.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        while !watchdog.load(SeqCst) {
            if started.elapsed() > Duration::from_secs(60) {
                eprintln!("rank {rank}: hung in a collective after a fault on rank 1");
                std::process::exit(3);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let (fail, fail_build) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let varmap = crate::common::seeded_llama(&config(), 9)?;
    let lisa = LisaConfig {
        gamma: 2,
        period: 3,
        seed: 4,
        ..Default::default()
    };
    let opt = LisaAdamW::new(&varmap, ParamsAdamW::default(), lisa)?;
    let (c, f, fb) = (config(), fail.clone(), fail_build.clone());
    let build = move |plan: &TrainingPlan| {
        if fb.load(SeqCst) {
            return Err(injected("its rebuild"));
        }
        Ok(Faulty {
            model: Llama::from_plan(&c, plan)?,
            fail: f.clone(),
        })
    };
    let schedule = Constant {
        lr: 1e-3,
        warmup: 0,
    };
    let mut t = Trainer::new(opt, schedule, TrainerConfig::default(), build)?;
    t.set_communicator(Box::new(mpi.clone()))?;
    let (dev, ex) = (Device::Cpu, examples());
    let mine = StepSampler::new(11).for_rank(rank, 2)?;
    let batches = |step| mine.micro_batches(&ex, step, 4, 1, 0, None, &dev);
    let check = |result: candle_lisa::Result<()>, started: Instant, point: &str| {
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(30), "{point}: {elapsed:?}");
        match (rank, result) {
            (1, Err(LisaError::InvalidArgument { reason, .. })) => assert_eq!(reason, point),
            (0, Err(LisaError::RankFailed { failed, .. })) => assert_eq!(failed, 1, "{point}"),
            (_, other) => panic!("rank {rank}, {point}: expected an error, got {other:?}"),
        }
        println!("rank {rank}: fault in {point}: both ranks stopped in {elapsed:?}");
    };
    t.step(&batches(1)?)?;

    fail.store(rank == 1, SeqCst);
    let started = Instant::now();
    let result = t.step(&batches(2)?).map(|_| ());
    fail.store(false, SeqCst);
    check(result, started, "its loss");

    let started = Instant::now();
    let result = match rank {
        1 => Err(t.fail_step(injected("its batch"))),
        _ => t.step(&batches(2)?).map(|_| ()),
    };
    check(result, started, "its batch");

    let ck = Checkpointer::new(shared.join("faults"), 2, &serde_json::json!({"t": 2}))?;
    let started = Instant::now();
    let result = match rank {
        1 => Err(t.fail_step(injected("between steps"))),
        _ => t.save_checkpoint(&ck, |_| Ok(())).map(|_| ()),
    };
    check(result, started, "between steps");

    // Nothing moved: the ranks step on together, to the redraw at the third update.
    assert_eq!(t.optimizer().step_count(), 1);
    t.step(&batches(2)?)?;
    fail_build.store(rank == 1, SeqCst);
    let started = Instant::now();
    let result = t.step(&batches(3)?).map(|_| ());
    fail_build.store(false, SeqCst);
    check(result, started, "its rebuild");
    done.store(true, SeqCst);
    Ok(())
}
