//! Any OpenAI-compatible `/chat/completions` endpoint (OpenAI, llama.cpp's server, vLLM, ...).
//!
//! One user message per request: the prompt text, then the images as base64 PNG data URLs.
//! Temperature 0. Requests go out from `concurrency` threads; one that times out or gets 429 or a 5xx
//! is retried after a pause that doubles each time (or what `Retry-After` asks, up to a minute). The
//! API key comes from the environment variable the job names and is sent only as a bearer token: it
//! is never logged and never part of an error or a cache key.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Backend, BackendError, Reply, Request};
use crate::invalid::Invalid;

/// `lvlm.backbones.<name>.openai` in a job.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The API root; requests go to `<base_url>/chat/completions` (e.g. `https://api.openai.com/v1`).
    pub base_url: String,
    pub model: String,
    /// The environment variable that holds the API key (none: no Authorization header).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    #[serde(default = "d_concurrency")]
    pub concurrency: usize,
    /// Seconds one attempt may take.
    #[serde(default = "d_timeout")]
    pub timeout_secs: f64,
    /// Attempts after the first one for timeouts, 429 and 5xx replies.
    #[serde(default = "d_retries")]
    pub retries: usize,
    /// The first pause before a retry, in seconds; it doubles with every retry.
    #[serde(default = "d_backoff")]
    pub backoff_secs: f64,
    /// Ask for a JSON object (`response_format: {"type": "json_object"}`), where the server supports it.
    #[serde(default)]
    pub json_mode: bool,
    /// Ask for the answer's own schema (`{"recommendations": [N, ...]}`: integers 1..=candidates, as many
    /// as the list asks) in the form llama.cpp's and llama-cpp-python's servers turn into a grammar
    /// (`response_format: {"type": "json_object", "schema": ...}`), so every answer parses and stops
    /// when the list is complete. Implies `json_mode`. (llama-cpp-python 0.3 keeps the shape but not
    /// the range: a number past the candidates counts as a hallucination.)
    #[serde(default)]
    pub json_schema: bool,
}

fn d_concurrency() -> usize {
    4
}
fn d_timeout() -> f64 {
    120.0
}
fn d_retries() -> usize {
    5
}
fn d_backoff() -> f64 {
    1.0
}

/// The longest pause a server's `Retry-After` may ask for.
const MAX_PAUSE: Duration = Duration::from_secs(60);

impl OpenAiConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(Invalid::new("base_url", format!("`{}` is not an http:// or https:// URL", self.base_url)));
        }
        if self.model.trim().is_empty() {
            return Err(Invalid::new("model", "must not be empty"));
        }
        if self.concurrency == 0 {
            return Err(Invalid::new("concurrency", "must be at least 1"));
        }
        if !(self.timeout_secs > 0.0 && self.timeout_secs.is_finite()) {
            return Err(Invalid::new("timeout_secs", "must be a positive number of seconds"));
        }
        if !(self.backoff_secs >= 0.0 && self.backoff_secs.is_finite()) {
            return Err(Invalid::new("backoff_secs", "must be a number of seconds, 0 or more"));
        }
        if self.api_key_env.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err(Invalid::new("api_key_env", "must name an environment variable"));
        }
        Ok(())
    }
}

/// A value that must not be printed.
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

#[derive(Debug)]
pub struct OpenAi {
    cfg: OpenAiConfig,
    key: Option<Secret>,
    client: reqwest::blocking::Client,
    url: String,
}

/// The JSON schema of an answer to `req`: a list of `list_length` candidate numbers.
fn answer_schema(req: &Request) -> Value {
    json!({
        "type": "object",
        "properties": {
            "recommendations": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": req.labels},
                "minItems": req.list_length,
                "maxItems": req.list_length,
            }
        },
        "required": ["recommendations"],
    })
}

/// What one attempt came to.
enum Attempt {
    Done(Reply),
    /// Worth another try (timeout, connection refused, 429, 5xx), after at least this pause.
    Retry(String, Option<Duration>),
    Failed(BackendError),
}

impl OpenAi {
    /// Reads the key from the environment (when the job names a variable) and prepares the client.
    pub fn new(cfg: &OpenAiConfig) -> Result<Self, BackendError> {
        let key =
            match &cfg.api_key_env {
                None => None,
                Some(var) => Some(Secret(std::env::var(var).map_err(|_| {
                    BackendError::Fatal(format!("the API key variable `{var}` (api_key_env) is not set"))
                })?)),
            };
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs_f64(cfg.timeout_secs))
            .build()
            .map_err(|e| BackendError::Fatal(format!("cannot start the HTTP client: {e}")))?;
        let url = format!("{}/chat/completions", cfg.base_url.trim_end_matches('/'));
        Ok(Self { cfg: cfg.clone(), key, client, url })
    }

    /// The JSON body of a request.
    pub fn body(&self, req: &Request) -> Value {
        let content = if req.images.is_empty() {
            Value::String(req.prompt.clone())
        } else {
            let mut parts = vec![json!({"type": "text", "text": req.prompt})];
            for img in &req.images {
                let url =
                    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&img.png));
                parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            Value::Array(parts)
        };
        let mut body = json!({
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": req.max_tokens,
        });
        if self.cfg.json_schema {
            body["response_format"] = json!({"type": "json_object", "schema": answer_schema(req)});
        } else if self.cfg.json_mode {
            body["response_format"] = json!({"type": "json_object"});
        }
        body
    }

    fn attempt(&self, body: &Value) -> Attempt {
        let mut call = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(body).unwrap_or_default());
        if let Some(Secret(key)) = &self.key {
            call = call.bearer_auth(key);
        }
        let resp = match call.send() {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Attempt::Retry(format!("no reply within {} s", self.cfg.timeout_secs), None)
            }
            Err(e) if e.is_connect() || e.is_request() => {
                return Attempt::Retry(format!("cannot reach {}: {}", self.url, without_url(&e)), None)
            }
            Err(e) => return Attempt::Failed(BackendError::Request(format!("{}: {}", self.url, without_url(&e)))),
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s).min(MAX_PAUSE));
        let text = match resp.text() {
            Ok(t) => t,
            Err(e) if e.is_timeout() => {
                return Attempt::Retry(format!("no reply within {} s", self.cfg.timeout_secs), None)
            }
            Err(e) => return Attempt::Retry(format!("the reply broke off: {}", without_url(&e)), None),
        };
        if status.as_u16() == 429 || status.is_server_error() {
            return Attempt::Retry(format!("HTTP {status}: {}", excerpt(&text)), retry_after);
        }
        if status.as_u16() == 401 || status.as_u16() == 403 {
            let hint = match &self.cfg.api_key_env {
                Some(var) => format!("check the key in `{var}`"),
                None => "the job names no api_key_env".to_string(),
            };
            return Attempt::Failed(BackendError::Fatal(format!(
                "{} refused the request (HTTP {status}): {hint}",
                self.url
            )));
        }
        if !status.is_success() {
            return Attempt::Failed(BackendError::Request(format!("HTTP {status}: {}", excerpt(&text))));
        }
        match completion(&text) {
            Some((answer, prompt_tokens, completion_tokens)) => {
                Attempt::Done(Reply { text: answer, prompt_tokens, completion_tokens, seconds: 0.0 })
            }
            None => Attempt::Failed(BackendError::Request(format!(
                "the reply is not a chat completion: {}",
                excerpt(&text)
            ))),
        }
    }

    /// Sends one request, retrying as configured.
    pub fn send(&self, req: &Request) -> Result<Reply, BackendError> {
        let started = Instant::now();
        let body = self.body(req);
        let mut last = String::new();
        for attempt in 0..=self.cfg.retries {
            match self.attempt(&body) {
                Attempt::Done(mut reply) => {
                    reply.seconds = started.elapsed().as_secs_f64();
                    return Ok(reply);
                }
                Attempt::Failed(e) => return Err(e),
                Attempt::Retry(why, asked) => {
                    tracing::debug!("{}: attempt {} of {}: {why}", self.url, attempt + 1, self.cfg.retries + 1);
                    last = why;
                    if attempt < self.cfg.retries {
                        let doubling = Duration::from_secs_f64(self.cfg.backoff_secs * 2f64.powi(attempt as i32));
                        std::thread::sleep(asked.unwrap_or(doubling).max(doubling.min(MAX_PAUSE)));
                    }
                }
            }
        }
        Err(BackendError::Request(format!("gave up after {} attempts: {last}", self.cfg.retries + 1)))
    }
}

/// The answer text and token counts of a chat-completion body.
fn completion(body: &str) -> Option<(String, usize, usize)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let text = v.get("choices")?.get(0)?.get("message")?.get("content")?.as_str()?.to_string();
    let count = |k: &str| v.get("usage").and_then(|u| u.get(k)).and_then(Value::as_u64).unwrap_or(0) as usize;
    Some((text, count("prompt_tokens"), count("completion_tokens")))
}

/// The start of a reply body, on one line, for an error message.
fn excerpt(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None if one_line.is_empty() => "(empty body)".to_string(),
        None => one_line,
    }
}

/// A transport error's message without the URL reqwest prepends (the caller names it once).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(&format!(" ({u})"), "").replace(u.as_str(), "");
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

impl Backend for OpenAi {
    fn identity(&self) -> String {
        format!(
            "openai model={} temperature=0 json_mode={} json_schema={}",
            self.cfg.model, self.cfg.json_mode, self.cfg.json_schema
        )
    }

    fn sees_images(&self) -> bool {
        true
    }

    fn answer(
        &self,
        requests: &[Request],
        done: &mut dyn FnMut(usize, Result<Reply, BackendError>),
    ) -> Result<(), BackendError> {
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel();
        let mut fatal = None;
        std::thread::scope(|s| {
            for _ in 0..self.cfg.concurrency.min(requests.len()) {
                let tx = tx.clone();
                let (next, stop) = (&next, &stop);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(req) = requests.get(i) else { break };
                        if tx.send((i, self.send(req))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            for (i, result) in rx {
                match result {
                    Err(BackendError::Fatal(e)) => {
                        stop.store(true, Ordering::Relaxed);
                        fatal.get_or_insert(e);
                    }
                    r => done(i, r),
                }
            }
        });
        match fatal {
            Some(e) => Err(BackendError::Fatal(e)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lvlm::backend::Image;

    fn cfg() -> OpenAiConfig {
        serde_json::from_value(json!({"base_url": "http://127.0.0.1:9/v1/", "model": "m"})).unwrap()
    }

    #[test]
    fn bodies_carry_text_then_images_as_data_urls_at_temperature_zero() {
        let backend = OpenAi::new(&cfg()).unwrap();
        assert_eq!(backend.url, "http://127.0.0.1:9/v1/chat/completions");
        let mut req = Request { prompt: "rank".into(), images: vec![], labels: 2, list_length: 2, max_tokens: 9 };
        let b = backend.body(&req);
        assert_eq!(b["messages"][0]["content"], "rank");
        assert_eq!((b["temperature"].as_u64(), b["max_tokens"].as_u64()), (Some(0), Some(9)));
        assert!(b.get("response_format").is_none());
        req.images.push(Image::from_png(b"\x89PNG".to_vec()));
        let b = backend.body(&req);
        assert_eq!(b["messages"][0]["content"][0]["text"], "rank");
        assert_eq!(b["messages"][0]["content"][1]["image_url"]["url"], "data:image/png;base64,iVBORw==");
    }

    #[test]
    fn json_modes_ask_for_an_object_or_for_the_answers_schema() {
        let req = Request { prompt: "rank".into(), images: vec![], labels: 30, list_length: 5, max_tokens: 9 };
        let mut c = cfg();
        c.json_mode = true;
        assert_eq!(OpenAi::new(&c).unwrap().body(&req)["response_format"], json!({"type": "json_object"}));
        c.json_schema = true;
        let format = OpenAi::new(&c).unwrap().body(&req)["response_format"].clone();
        assert_eq!(format["type"], "json_object");
        let list = &format["schema"]["properties"]["recommendations"];
        assert_eq!((list["minItems"].as_u64(), list["maxItems"].as_u64()), (Some(5), Some(5)));
        assert_eq!((list["items"]["minimum"].as_u64(), list["items"]["maximum"].as_u64()), (Some(1), Some(30)));
        assert_ne!(OpenAi::new(&c).unwrap().identity(), OpenAi::new(&cfg()).unwrap().identity(), "cache keys differ");
    }

    #[test]
    fn a_missing_key_variable_is_named_and_a_key_never_prints() {
        let mut c = cfg();
        c.api_key_env = Some("ILLMREC_TEST_KEY_THAT_IS_NOT_SET".into());
        let err = OpenAi::new(&c).unwrap_err().to_string();
        assert!(err.contains("`ILLMREC_TEST_KEY_THAT_IS_NOT_SET` (api_key_env) is not set"), "{err}");
        let shown = format!("{:?}", Secret("sk-very-secret".into()));
        assert!(!shown.contains("sk-very"));
    }

    #[test]
    fn completions_are_read_and_garbage_is_not() {
        let body = r#"{"choices": [{"message": {"role": "assistant", "content": "hi"}}], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}"#;
        assert_eq!(completion(body), Some(("hi".to_string(), 7, 2)));
        assert_eq!(completion(r#"{"choices": []}"#), None);
        assert_eq!(completion("<html>bad gateway</html>"), None);
        assert_eq!(excerpt("  a\n b  "), "a b");
        assert_eq!(excerpt(""), "(empty body)");
    }
}
