//! Where a distributed job's ranks run when it is submitted to a cluster: the resources of
//! `dist` (nodes, tasks per node, GPUs and CPUs per task) and the scheduler settings of
//! `dist.slurm` and `dist.k8s`. `launch` renders them into a batch script or manifests.

use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;

/// How the Slurm batch script starts the ranks inside its allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlurmLauncher {
    /// `srun --mpi=<mpi>`: Slurm starts the ranks, MPI wires up through PMIx or PMI-2.
    #[default]
    Srun,
    /// `mpirun` inside the allocation (Open MPI reads the allocation from Slurm).
    Mpirun,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    /// Wall-clock limit, as sbatch takes it (`HH:MM:SS`, `D-HH:MM:SS`, minutes).
    #[serde(default = "d_time")]
    pub time: String,
    #[serde(default)]
    pub partition: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub launcher: SlurmLauncher,
    /// The PMI plugin for `srun --mpi=` (pmix, pmi2, ...; see `srun --mpi=list`).
    #[serde(default = "d_mpi")]
    pub mpi: String,
    /// More `#SBATCH` options, verbatim (e.g. `--qos=high`, `--constraint=a100`).
    #[serde(default)]
    pub extra_directives: Vec<String>,
    /// Seconds before the time limit at which Slurm sends SIGUSR1: the run checkpoints and requeues.
    #[serde(default = "d_signal")]
    pub signal_before_secs: u64,
    /// Requeues allowed (preemption or time limit) before the script gives up.
    #[serde(default = "d_restarts")]
    pub max_restarts: u32,
    /// The illmrec binary on the cluster's nodes.
    #[serde(default = "d_binary")]
    pub binary: String,
    /// sbatch's --output (`%j` is the job id).
    #[serde(default = "d_output")]
    pub output: String,
}

fn d_time() -> String {
    "04:00:00".into()
}
fn d_mpi() -> String {
    "pmix".into()
}
fn d_signal() -> u64 {
    120
}
fn d_restarts() -> u32 {
    3
}
fn d_binary() -> String {
    "illmrec".into()
}
fn d_output() -> String {
    "illmrec-%j.out".into()
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            time: d_time(),
            partition: None,
            account: None,
            launcher: SlurmLauncher::default(),
            mpi: d_mpi(),
            extra_directives: Vec::new(),
            signal_before_secs: d_signal(),
            max_restarts: d_restarts(),
            binary: d_binary(),
            output: d_output(),
        }
    }
}

/// Which Kubernetes workload runs the ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum K8sWorkload {
    /// A Kubeflow MPIJob (kubeflow.org/v2beta1): a launcher pod runs mpirun over the worker pods.
    #[default]
    Mpijob,
    /// For clusters without the MPI Operator: an Indexed Job whose pods find each other through a
    /// headless Service; each pod runs one rank.
    IndexedJob,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct K8sConfig {
    #[serde(default)]
    pub workload: K8sWorkload,
    /// The container image with the illmrec binary (required to submit).
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default = "d_namespace")]
    pub namespace: String,
    /// A Secret whose keys become the containers' environment: AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, OTEL_EXPORTER_OTLP_HEADERS, ... Credentials never go
    /// into the manifests themselves.
    #[serde(default)]
    pub secret: Option<String>,
    /// OTEL_EXPORTER_OTLP_ENDPOINT of the pods (a collector's address in the cluster).
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Per pod.
    #[serde(default = "d_cpu")]
    pub cpu: String,
    #[serde(default = "d_memory")]
    pub memory: String,
    /// Pod restarts / job retries before the job fails.
    #[serde(default = "d_restarts")]
    pub backoff_limit: u32,
    /// The non-root user the containers run as.
    #[serde(default = "d_uid")]
    pub run_as_user: u32,
    #[serde(default)]
    pub service_account: Option<String>,
}

fn d_namespace() -> String {
    "default".into()
}
fn d_cpu() -> String {
    "4".into()
}
fn d_memory() -> String {
    "16Gi".into()
}
fn d_uid() -> u32 {
    1000
}

impl Default for K8sConfig {
    fn default() -> Self {
        Self {
            workload: K8sWorkload::default(),
            image: None,
            namespace: d_namespace(),
            secret: None,
            otlp_endpoint: None,
            cpu: d_cpu(),
            memory: d_memory(),
            backoff_limit: d_restarts(),
            run_as_user: d_uid(),
            service_account: None,
        }
    }
}

impl SlurmConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let time_ok = !self.time.is_empty() && self.time.chars().all(|c| c.is_ascii_digit() || c == ':' || c == '-');
        if !time_ok {
            return Err(Invalid::new(
                "time",
                format!("`{}` is not a Slurm time (HH:MM:SS, D-HH:MM:SS, minutes)", self.time),
            ));
        }
        if let Some(bad) = self.extra_directives.iter().find(|d| !d.starts_with('-') || d.contains('\n')) {
            return Err(Invalid::new(
                "extra_directives",
                format!("`{bad}` is not one sbatch option (like --qos=high)"),
            ));
        }
        if self.signal_before_secs == 0 {
            return Err(Invalid::new("signal_before_secs", "must be at least 1"));
        }
        Ok(())
    }
}

impl K8sConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let dns = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !dns(&self.namespace) {
            return Err(Invalid::new("namespace", format!("`{}` is not a DNS label", self.namespace)));
        }
        if let Some(s) = self.secret.as_deref().filter(|s| !dns(s)) {
            return Err(Invalid::new("secret", format!("`{s}` is not a valid Secret name")));
        }
        if self.run_as_user == 0 {
            return Err(Invalid::new("run_as_user", "the containers run as a non-root user"));
        }
        Ok(())
    }
}
