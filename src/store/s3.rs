//! `s3://BUCKET/PREFIX` roots through object_store's S3 client, for AWS and S3-compatible servers.
//!
//! Endpoint, region and credentials come from the standard variables (AWS_ENDPOINT_URL or
//! AWS_ENDPOINT, AWS_REGION or AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
//! AWS_SESSION_TOKEN), overridden by `storage.s3`. Addressing is path-style unless asked otherwise
//! (S3-compatible servers expect it); plain HTTP only when asked. Without keys the client would ask the
//! cloud's instance-metadata service for credentials; that happens only with `instance_credentials:
//! true` (on a cloud machine with a role), otherwise missing keys are an error.

use std::time::Duration;

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// e.g. http://127.0.0.1:9000 for a local S3-compatible server (default: AWS).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Allow http:// endpoints (also AWS_ALLOW_HTTP=true).
    #[serde(default)]
    pub allow_http: bool,
    /// bucket.host/key instead of host/bucket/key.
    #[serde(default)]
    pub virtual_hosted: bool,
    /// Take credentials from the cloud's instance metadata when no keys are set.
    #[serde(default)]
    pub instance_credentials: bool,
    /// Retries of a failed request (each multipart part on its own), with exponential backoff.
    #[serde(default)]
    pub retries: Option<usize>,
    /// Give up on a request after this many seconds of retrying.
    #[serde(default)]
    pub retry_timeout_secs: Option<u64>,
}

impl S3Config {
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(Invalid::new("endpoint", format!("`{e}` must start with http:// or https://")));
            }
        }
        if self.retry_timeout_secs == Some(0) {
            return Err(Invalid::new("retry_timeout_secs", "must be at least 1"));
        }
        Ok(())
    }
}

impl S3Config {
    /// How long one request may keep retrying before it fails.
    pub fn retry_budget(&self) -> Duration {
        Duration::from_secs(self.retry_timeout_secs.unwrap_or(120))
    }
}

fn env(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

/// Builds the client for `url` = s3://`rest`, keys below the URL's prefix. Errors name the setting,
/// never a secret.
pub fn build(url: &str, rest: &str, cfg: &S3Config) -> Result<Arc<dyn ObjectStore>, String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err("no bucket name".into());
    }
    let endpoint = cfg.endpoint.clone().or_else(|| env(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]));
    let region =
        cfg.region.clone().or_else(|| env(&["AWS_REGION", "AWS_DEFAULT_REGION"])).unwrap_or_else(|| "us-east-1".into());
    let allow_http = cfg.allow_http || env(&["AWS_ALLOW_HTTP"]).is_some_and(|v| v == "true" || v == "1");
    if let Some(e) = &endpoint {
        if e.starts_with("http://") && !allow_http {
            return Err(format!("endpoint {e} is plain HTTP: set storage.s3.allow_http (or AWS_ALLOW_HTTP=true)"));
        }
    }
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
        max_retries: cfg.retries.unwrap_or(8),
        retry_timeout: cfg.retry_budget(),
    };
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(region)
        .with_virtual_hosted_style_request(cfg.virtual_hosted)
        .with_allow_http(allow_http)
        .with_retry(retry)
        .with_client_options(
            ClientOptions::new().with_allow_http(allow_http).with_connect_timeout(Duration::from_secs(10)),
        );
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    match (env(&["AWS_ACCESS_KEY_ID"]), env(&["AWS_SECRET_ACCESS_KEY"])) {
        (Some(id), Some(secret)) => {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(t) = env(&["AWS_SESSION_TOKEN"]) {
                b = b.with_token(t);
            }
        }
        (None, None) if cfg.instance_credentials => {
            if let Some(m) = env(&["AWS_METADATA_ENDPOINT"]) {
                b = b.with_metadata_endpoint(m);
            }
        }
        _ => {
            return Err(format!(
                "{url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or storage.s3.instance_credentials: true on a cloud machine with a role)"
            ))
        }
    }
    let s3 = b.build().map_err(|e| e.to_string())?;
    let prefix = prefix.trim_matches('/');
    Ok(if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) })
}
