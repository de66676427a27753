//! Where a process finds its place in a data-parallel job: the rank, world size and local
//! rank that launchers put in the environment.

use crate::error::{LisaError, Result};

/// This process's place in a job launched with one process per device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankEnv {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// The number of processes.
    pub world_size: usize,
    /// The rank among the processes of this machine: the GPU to use.
    pub local_rank: usize,
}

impl RankEnv {
    /// The variables torchrun and Slurm-style launchers set (`RANK`, `WORLD_SIZE`,
    /// `LOCAL_RANK`), or Open MPI's (`OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`,
    /// `OMPI_COMM_WORLD_LOCAL_RANK`), read through `var`; the local rank defaults to the rank
    /// (one machine).
    ///
    /// ```
    /// use candle_lisa::dist::RankEnv;
    /// let env = |name: &str| match name {
    ///     "OMPI_COMM_WORLD_RANK" => Some("1".to_string()),
    ///     "OMPI_COMM_WORLD_SIZE" => Some("2".to_string()),
    ///     _ => None,
    /// };
    /// let place = RankEnv::from_vars(env)?;
    /// assert_eq!(place, RankEnv { rank: 1, world_size: 2, local_rank: 1 });
    /// assert!(RankEnv::from_vars(|_| None).is_err());
    /// # Ok::<(), candle_lisa::LisaError>(())
    /// ```
    ///
    /// # Errors
    /// [`LisaError::InvalidArgument`] when the rank or the world size is missing or not a
    /// number, or the rank is not below the world size.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let read = |names: [&str; 2]| -> Result<Option<usize>> {
            for name in names {
                if let Some(value) = var(name) {
                    return value.trim().parse().map(Some).map_err(|_| {
                        LisaError::InvalidArgument {
                            what: "launcher environment",
                            reason: format!("{name}={value:?} is not a number"),
                        }
                    });
                }
            }
            Ok(None)
        };
        let missing = |names: &str| LisaError::InvalidArgument {
            what: "launcher environment",
            reason: format!("set {names} (torchrun, Slurm and mpirun set one of them)"),
        };
        let rank = read(["RANK", "OMPI_COMM_WORLD_RANK"])?
            .ok_or_else(|| missing("RANK or OMPI_COMM_WORLD_RANK"))?;
        let world_size = read(["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"])?
            .ok_or_else(|| missing("WORLD_SIZE or OMPI_COMM_WORLD_SIZE"))?;
        let local_rank = read(["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"])?.unwrap_or(rank);
        if rank >= world_size {
            return Err(LisaError::InvalidArgument {
                what: "launcher environment",
                reason: format!("rank {rank} is not below the world size {world_size}"),
            });
        }
        Ok(Self {
            rank,
            world_size,
            local_rank,
        })
    }

    /// [`from_vars`](Self::from_vars) over this process's environment.
    ///
    /// # Errors
    /// Those of [`from_vars`](Self::from_vars).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }
}
