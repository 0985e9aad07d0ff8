//! Rendering for clusters: the sbatch script and the Kubernetes manifests of jobs/demo-cluster.yaml
//! against golden files (ILLMREC_UPDATE_GOLDEN=1 rewrites them after a deliberate change), the
//! manifests against the Kubernetes schemas and the MPIJob schema (scripts/k8s-validate.py,
//! `kubernetes-validate` in strict mode), and the script through `bash -n`.

use std::path::{Path, PathBuf};
use std::process::Command;

use illmrec::config::JobConfig;
use illmrec::launch::{k8s, slurm};
use illmrec::train::ModelKind;

const K8S_VERSION: &str = "1.33.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo(edit: impl Fn(&mut JobConfig)) -> (JobConfig, String) {
    let (mut job, merged) = JobConfig::load_merged_yaml(&root().join("jobs/demo-cluster.yaml")).unwrap();
    edit(&mut job);
    (job, merged)
}

fn golden(name: &str, text: &str) {
    let path = root().join("tests/golden").join(name);
    if std::env::var_os("ILLMREC_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        want == text,
        "{} differs from the rendering (ILLMREC_UPDATE_GOLDEN=1 cargo test --test launch rewrites it):\n{text}",
        path.display()
    );
}

fn validate(dir: &Path, name: &str, text: &str) {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    let out = Command::new("python3")
        .arg(root().join("scripts/k8s-validate.py"))
        .args(["--k8s-version", K8S_VERSION])
        .arg(&file)
        .output()
        .expect("python3 scripts/k8s-validate.py (scripts/setup.sh installs kubernetes-validate)");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} does not validate:\n{report}");
    assert!(!report.contains("FAIL"), "{report}");
}

#[test]
fn sbatch_script_matches_golden_and_parses() {
    let (job, _) = demo(|_| {});
    let model: ModelKind = "illmrec".parse().unwrap();
    let script =
        slurm::render(&job, Path::new("/shared/jobs/demo-cluster.yaml"), Path::new("/shared/work"), model).unwrap();
    golden("demo-cluster.sbatch", &script);
    for needed in ["#SBATCH --requeue", "#SBATCH --signal=B:USR1@180", "--gpus-per-task=1", "--auto-resume"] {
        assert!(script.contains(needed), "no `{needed}`");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sbatch");
    std::fs::write(&file, &script).unwrap();
    let status = Command::new("bash").arg("-n").arg(&file).status().unwrap();
    assert!(status.success(), "bash -n rejects the rendered script");

    // mpirun inside the allocation instead of srun.
    let (job, _) = demo(|j| j.dist.slurm.launcher = illmrec::distributed::cluster::SlurmLauncher::Mpirun);
    let script = slurm::render(&job, Path::new("/j.yaml"), Path::new("/w"), model).unwrap();
    assert!(script.contains("\nmpirun --bind-to none illmrec train --job /j.yaml"), "{script}");
}

#[test]
fn mpijob_and_indexed_job_match_golden_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    let model: ModelKind = "illmrec".parse().unwrap();
    let (job, merged) = demo(|_| {});
    let mpijob = k8s::render(&job, &merged, model).unwrap();
    golden("demo-cluster.mpijob.yaml", &mpijob);
    validate(dir.path(), "mpijob.yaml", &mpijob);

    let (job, merged) = demo(|j| j.dist.k8s.workload = illmrec::distributed::cluster::K8sWorkload::IndexedJob);
    let indexed = k8s::render(&job, &merged, model).unwrap();
    golden("demo-cluster.indexed-job.yaml", &indexed);
    validate(dir.path(), "indexed.yaml", &indexed);

    for text in [&mpijob, &indexed] {
        // Credentials come from the Secret only; containers run as a non-root user.
        assert!(text.contains("secretRef: {name: illmrec-s3}"));
        assert!(!text.contains("AWS_SECRET_ACCESS_KEY"));
        assert!(text.contains("runAsNonRoot: true"));
        assert!(text.contains("nvidia.com/gpu: \"2\""), "2 ranks per pod, 1 GPU each");
        // The job file travels whole: a pod needs no include files.
        assert!(text.contains("  job.yaml: |\n    name: demo-cluster\n") && !text.contains("include:"));
    }
}

#[test]
fn a_broken_manifest_fails_validation() {
    // The validator is not a rubber stamp: a misspelled MPIJob field is caught.
    let (job, merged) = demo(|_| {});
    let bad =
        k8s::render(&job, &merged, "illmrec".parse().unwrap()).unwrap().replace("slotsPerWorker", "slotsPerWorkers");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, bad).unwrap();
    let out = Command::new("python3")
        .arg(root().join("scripts/k8s-validate.py"))
        .args(["--k8s-version", K8S_VERSION])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("slotsPerWorkers"));
}

#[test]
fn submitting_without_an_image_names_the_key() {
    let (job, merged) = demo(|j| j.dist.k8s.image = None);
    let err = k8s::render(&job, &merged, "illmrec".parse().unwrap()).unwrap_err().to_string();
    assert!(err.contains("dist.k8s.image"), "{err}");
}
