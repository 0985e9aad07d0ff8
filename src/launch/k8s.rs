//! Kubernetes: the manifests of a job (`k8s/*.yaml.tmpl`): a ConfigMap with the job file, and an
//! MPIJob or an Indexed Job with its headless Service; applied and deleted with `kubectl`.

use super::template::{render as render_template, Values};
use super::{dns_name, run_client, LaunchError, Result};
use crate::config::JobConfig;
use crate::distributed::cluster::K8sWorkload;
use crate::train::ModelKind;

const CONFIGMAP: &str = include_str!("../../k8s/configmap.yaml.tmpl");
const MPIJOB: &str = include_str!("../../k8s/mpijob.yaml.tmpl");
const INDEXED_JOB: &str = include_str!("../../k8s/indexed-job.yaml.tmpl");

/// The manifests, as one multi-document YAML stream. `job_yaml` is the job file with its includes
/// merged in (`JobConfig::load_merged_yaml`).
pub fn render(job: &JobConfig, job_yaml: &str, model: ModelKind) -> Result<String> {
    let d = &job.dist;
    let k = &d.k8s;
    let image = k.image.as_deref().ok_or_else(|| {
        LaunchError::Invalid("dist.k8s.image: the container image with the illmrec binary is required".into())
    })?;
    let name = dns_name(&job.name);
    if name.is_empty() {
        return Err(LaunchError::Invalid(format!("job name `{}` has nothing to make a Kubernetes name of", job.name)));
    }
    let mut pod = vec!["securityContext: {runAsNonRoot: true, runAsUser: UID, runAsGroup: UID, fsGroup: UID}"
        .replace("UID", &k.run_as_user.to_string())];
    if let Some(sa) = &k.service_account {
        pod.push(format!("serviceAccountName: {sa}"));
    }
    let mut env = vec!["env:".to_string(), format!("  - {{name: ILLMREC_JOB, value: \"{name}\"}}")];
    env.push("  - {name: OTEL_SERVICE_NAME, value: illmrec}".into());
    if let Some(e) = &k.otlp_endpoint {
        env.push(format!("  - {{name: OTEL_EXPORTER_OTLP_ENDPOINT, value: \"{e}\"}}"));
    }
    if let Some(secret) = &k.secret {
        // S3 keys, endpoint, OTLP headers: from the Secret, never written here.
        env.extend(["envFrom:".to_string(), format!("  - secretRef: {{name: {secret}}}")]);
    }
    let security = vec![
        "securityContext:".to_string(),
        "  allowPrivilegeEscalation: false".into(),
        "  capabilities: {drop: [ALL]}".into(),
    ];
    let gpus = d.gpus_per_task * d.tasks_per_node;
    let amounts = if gpus > 0 {
        format!("{{cpu: \"{}\", memory: {}, nvidia.com/gpu: \"{gpus}\"}}", k.cpu, k.memory)
    } else {
        format!("{{cpu: \"{}\", memory: {}}}", k.cpu, k.memory)
    };
    let resources = vec![format!("requests: {amounts}"), format!("limits: {amounts}")];

    let mut cm = Values::default();
    cm.set("name", &name)
        .set("namespace", &k.namespace)
        .block("job_yaml", job_yaml.lines().map(String::from).collect());
    let mut out = render_template("k8s/configmap.yaml.tmpl", CONFIGMAP, &cm)?;

    let mut v = Values::default();
    v.set("name", &name)
        .set("namespace", &k.namespace)
        .set("model", model)
        .set("image", image)
        .set("binary", "illmrec")
        .set("workers", d.nodes)
        .set("slots", d.tasks_per_node)
        .set("world", d.nodes * d.tasks_per_node)
        .set("backoff_limit", k.backoff_limit)
        .block("pod_spec_common", pod)
        .block("env", env)
        .block("security_context", security)
        .block("worker_resources", resources);
    let (file, text) = match k.workload {
        K8sWorkload::Mpijob => ("k8s/mpijob.yaml.tmpl", MPIJOB),
        K8sWorkload::IndexedJob => ("k8s/indexed-job.yaml.tmpl", INDEXED_JOB),
    };
    out.push_str("---\n");
    out.push_str(&render_template(file, text, &v)?);
    Ok(out)
}

/// The workload's `kind/name`, as kubectl names it.
pub fn workload_id(job: &JobConfig) -> String {
    let kind = match job.dist.k8s.workload {
        K8sWorkload::Mpijob => "mpijob",
        K8sWorkload::IndexedJob => "job",
    };
    format!("{kind}/{}", dns_name(&job.name))
}

pub fn apply(manifests: &str) -> Result<String> {
    run_client("kubectl", &["apply", "-f", "-"], Some(manifests))
}

/// The workload's conditions, as kubectl reports them.
pub fn state(id: &str, namespace: &str) -> Result<String> {
    let out = run_client(
        "kubectl",
        &["get", id, "-n", namespace, "-o", "jsonpath={range .status.conditions[*]}{.type}={.status} {end}"],
        None,
    )?;
    Ok(if out.trim().is_empty() { "PENDING (no conditions yet)".into() } else { out.trim().to_string() })
}

pub fn delete(id: &str, namespace: &str) -> Result<()> {
    run_client("kubectl", &["delete", id, "-n", namespace], None)?;
    // The job's ConfigMap (and the Indexed Job's Service) carry its instance label.
    let selector = format!("app.kubernetes.io/instance={}", id.split('/').nth(1).unwrap_or_default());
    run_client(
        "kubectl",
        &["delete", "service,configmap", "-l", &selector, "-n", namespace, "--ignore-not-found"],
        None,
    )
    .map(|_| ())
}
