//! The LVLM strategies through an OpenAI-compatible endpoint, with real servers on 127.0.0.1:
//!
//! - llama-cpp-python's server (scripts/setup.sh installs it) serving SmolLM2-135M-Instruct: S4 (with
//!   captions imported in Amazon Review Plus's layout) and S5 (reranking SASRec) end to end; a rerun
//!   with the server gone answers from the cache; the retry path: a proxy in front of the real server
//!   answers 429, then 500, then nothing until the client times out, then forwards.
//! - a server that answers garbage (HTML, a chat completion without a list, an empty completion,
//!   400): a clear error per user, counted, and the run completes; refused credentials stop the run
//!   with a message that names the variable and never the key.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[allow(dead_code)] // this file uses one of the shared helpers
mod common;

const BIN: &str = env!("CARGO_BIN_EXE_illmrec");
const SECRET: &str = "sk-test-0f9e8d7c6b5a";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

mod assets;

fn gguf() -> PathBuf {
    assets::asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
}

/// llama-cpp-python's OpenAI-compatible server on a free loopback port; killed on drop.
struct LlamaServer {
    child: Child,
    port: u16,
}

impl LlamaServer {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "llama_cpp.server", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--model", &gguf().display().to_string(), "--model_alias", "smollm2"])
            .args(["--n_ctx", "4096", "--n_threads", "2"])
            // OpenMP threads that spin while waiting starve everything else on a busy machine.
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m llama_cpp.server (scripts/setup.sh installs llama-cpp-python[server])");
        let server = LlamaServer { child, port };
        let started = Instant::now();
        while !get_ok(port, "/v1/models") {
            assert!(started.elapsed() < Duration::from_secs(180), "the llama.cpp server did not start on {port}");
            std::thread::sleep(Duration::from_millis(250));
        }
        server
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get_ok(port: u16, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}

/// What the scripted server does with one connection.
#[derive(Clone)]
enum Behaviour {
    /// A status line, extra headers and a body.
    Reply(u16, &'static str, String),
    /// Reads the request and says nothing for this long, then hangs up.
    Silent(Duration),
    /// Passes the request to the real server and its reply back.
    Forward(u16),
}

/// An HTTP server on a free loopback port that treats the n-th connection as its script's n-th
/// behaviour (the last one repeats) and keeps every request it read.
struct Scripted {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    fn start(script: Vec<Behaviour>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { continue };
                let behaviour = script[n.min(script.len() - 1)].clone();
                let log = log.clone();
                // A connection of its own thread: a silent one does not hold up the next.
                std::thread::spawn(move || {
                    let Some(request) = read_request(&mut conn) else { return };
                    log.lock().unwrap().push(String::from_utf8_lossy(&request).into_owned());
                    match behaviour {
                        Behaviour::Reply(status, headers, body) => {
                            let _ = write!(
                            conn,
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        }
                        Behaviour::Silent(d) => std::thread::sleep(d),
                        Behaviour::Forward(to) => {
                            let mut up = TcpStream::connect(("127.0.0.1", to)).unwrap();
                            up.write_all(&request).unwrap();
                            let mut reply = Vec::new();
                            let _ = up.read_to_end(&mut reply);
                            let _ = conn.write_all(&reply);
                        }
                    }
                });
            }
        });
        Scripted { port, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// One request (head and body), with `Connection: close` so a forwarded reply ends with its socket.
fn read_request(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut head = Vec::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        if lower.starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    head.extend(body);
    Some(head)
}

fn chat_completion(content: &str) -> String {
    serde_json::json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7}
    })
    .to_string()
}

fn illmrec(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).current_dir(dir).env("ILLMREC_TEST_KEY", SECRET).output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = illmrec(dir, args);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "illmrec {args:?}:\n{stdout}\n{stderr}");
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET), "the key was printed");
    stdout.into_owned()
}

/// `eval`'s JSON line with its `cost`.
fn result(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn answers(dir: &Path, run: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("store/runs").join(run).join("report/answers.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The small synthetic job, its LVLM section on 4 users with 1+9 candidates, and the backbones.
fn job(dir: &Path, backbones: &str, captions: bool) {
    let base = format!(
        "name: srv\n{}train:\n  models: [sasrec]\n  \
         sasrec: {{epochs: 4, eval_every: 2, patience: 1, early_stopping_protocol: sampled:29}}\n\
         eval: {{ks: [1, 5]}}\nstorage: {{root: store}}\ntelemetry: {{progress: off}}\n",
        common::tiny_sections("")
    );
    std::fs::write(dir.join("base.yaml"), base).unwrap();
    let captions = if captions { "features:\n  captions: {import: {file: captions.json, model: test}}\n" } else { "" };
    let lvlm = format!(
        "include: [base.yaml]\nmodel:\n  sasrec: {{hidden: 16, max_len: 10}}\n{captions}lvlm:\n  protocol: sampled:9\n  \
         users: 4\n  max_history: 5\n  list_length: 3\n  max_tokens: 60\n  backbones:\n{backbones}"
    );
    std::fs::write(dir.join("job.yaml"), lvlm).unwrap();
}

/// Captions for every item in Amazon Review Plus's item2side.json layout.
fn write_captions(dir: &Path) {
    let store = illmrec::store::Store::open(&dir.join("store").display().to_string()).unwrap();
    let ds = illmrec::data::snapshot::load(&store, "srv").unwrap();
    let mut side = serde_json::Map::new();
    for item in &ds.items {
        let caption = format!("a product photo of {}", item.meta.title.to_lowercase());
        side.insert(
            item.id.clone(),
            serde_json::json!({"title": item.meta.title, "image": {"image_description": {"test": caption}}}),
        );
    }
    std::fs::write(dir.join("captions.json"), serde_json::Value::Object(side).to_string()).unwrap();
}

#[test]
fn s4_and_s5_through_a_real_llama_cpp_server_with_cache_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = LlamaServer::start();
    // The proxy: a 429 (asking for a 0 s pause), a 500, silence past the client's timeout, then the
    // real server for this and every later connection.
    let proxy = Scripted::start(vec![
        Behaviour::Reply(429, "Retry-After: 0\r\n", "{\"error\": \"slow down\"}".into()),
        Behaviour::Reply(500, "", "{\"error\": \"boom\"}".into()),
        Behaviour::Silent(Duration::from_secs(31)),
        Behaviour::Forward(server.port),
    ]);
    let backbones = format!(
        "    server: {{openai: {{base_url: 'http://127.0.0.1:{}/v1', model: smollm2, concurrency: 2, json_schema: true}}}}\n    \
         flaky: {{openai: {{base_url: 'http://127.0.0.1:{}/v1', model: smollm2, concurrency: 1, timeout_secs: 30, \
         retries: 4, backoff_secs: 0.05, json_mode: true, api_key_env: ILLMREC_TEST_KEY}}}}\n  backbone: server\n",
        server.port, proxy.port
    );
    job(d, &backbones, true);
    ok(d, &["synth", "--job", "job.yaml"]);
    ok(d, &["prepare", "--job", "job.yaml"]);
    write_captions(d);
    ok(d, &["train", "--job", "job.yaml", "--model", "sasrec"]);

    // S4: captions + titles, the model ranks.
    let s4 = result(&ok(d, &["lvlm", "--job", "job.yaml", "--strategy", "s4", "--json"]));
    assert_eq!((s4["users"].as_u64(), s4["protocol"].as_str()), (Some(4), Some("sampled:9 (1+9)")));
    assert_eq!((s4["cost"]["requests_sent"].as_u64(), s4["cost"]["request_errors"].as_u64()), (Some(4), Some(0)));
    assert!(s4["cost"]["prompt_tokens_mean"].as_f64().unwrap() > 100.0, "{s4}");
    let a4 = answers(d, "srv-s4-server");
    assert_eq!(a4.len(), 4);
    for a in &a4 {
        assert_eq!(a["candidates"].as_array().unwrap().len(), 10);
        assert!(!a["answer"].as_str().unwrap().is_empty(), "{a}");
        // Either the answer ranked items or its failure is recorded; an unranked target ranks last.
        let ranked = !a["ranking"].as_array().unwrap().is_empty();
        assert!(ranked || a["error"].is_string(), "{a}");
        if !a["ranking"].as_array().unwrap().contains(&a["target"]) {
            assert_eq!(a["target_rank"], 9, "{a}");
        }
    }
    // The answer's schema goes to the server, whose grammar holds every answer to it.
    assert!(a4.iter().all(|a| a["error"].is_null() && a["ranking"].as_array().unwrap().len() == 3), "{a4:?}");
    assert_eq!(s4["cost"]["parse_failures"].as_u64(), Some(0));

    // S5: reranks SASRec's order, which the prompt lists.
    let s5 = result(&ok(d, &["lvlm", "--job", "job.yaml", "--strategy", "s5", "--json"]));
    assert_eq!((s5["users"].as_u64(), s5["cost"]["requests_sent"].as_u64()), (Some(4), Some(4)));
    let a5 = answers(d, "srv-s5-server");
    assert_eq!(s5["cost"]["parse_failures"].as_u64(), Some(0), "{s5}");
    assert!(a5.iter().zip(&a4).any(|(x, y)| x["candidates"] != y["candidates"]), "S5 shows SASRec's order");

    // The retry path: one user meets 429, 500 and a timeout before the real server answers it.
    let flaky =
        result(&ok(d, &["lvlm", "--job", "job.yaml", "--strategy", "s4", "--backbone", "flaky", "--fresh", "--json"]));
    assert_eq!((flaky["cost"]["requests_sent"].as_u64(), flaky["cost"]["request_errors"].as_u64()), (Some(4), Some(0)));
    let seen = proxy.requests();
    assert_eq!(seen.len(), 3 + 4, "3 failed attempts, then one forwarded request per user");
    assert!(seen.iter().all(|r| r.contains(&format!("Bearer {SECRET}"))), "the key goes in the header");
    assert!(seen[0].contains("\"temperature\":0") && seen[0].contains("\"model\":\"smollm2\""));

    // With the server gone, a rerun answers every user from the cache: nothing is sent.
    drop(server);
    let cached = result(&ok(d, &["lvlm", "--job", "job.yaml", "--strategy", "s4", "--json"]));
    assert_eq!(
        (cached["cost"]["requests_sent"].as_u64(), cached["cost"]["answers_cached"].as_u64()),
        (Some(0), Some(4))
    );
    assert_eq!(cached["metrics"], s4["metrics"]);
}

#[test]
fn garbage_replies_are_errors_per_user_and_refused_keys_stop_the_run_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let garbage = Scripted::start(vec![
        Behaviour::Reply(200, "", "<html>502 Bad Gateway</html>".into()),
        Behaviour::Reply(200, "", chat_completion("I would go with the red lamp, it is lovely.")),
        Behaviour::Reply(200, "", "{\"choices\": []}".into()),
        Behaviour::Reply(400, "", "{\"error\": \"context length exceeded\"}".into()),
    ]);
    let refusing = Scripted::start(vec![Behaviour::Reply(401, "", "{\"error\": \"invalid api key\"}".into())]);
    let backbones = format!(
        "    garbage: {{openai: {{base_url: 'http://127.0.0.1:{}/v1', model: m, concurrency: 1, retries: 0}}}}\n    \
         refusing: {{openai: {{base_url: 'http://127.0.0.1:{}/v1', model: m, api_key_env: ILLMREC_TEST_KEY}}}}\n  \
         backbone: garbage\n",
        garbage.port, refusing.port
    );
    job(d, &backbones, false);
    ok(d, &["synth", "--job", "job.yaml"]);
    ok(d, &["prepare", "--job", "job.yaml"]);

    let r = result(&ok(d, &["lvlm", "--job", "job.yaml", "--strategy", "s4", "--json"]));
    let cost = &r["cost"];
    assert_eq!((cost["request_errors"].as_u64(), cost["parse_failures"].as_u64()), (Some(3), Some(1)), "{r}");
    assert_eq!(cost["parse_failure_pct"].as_f64(), Some(100.0));
    // Every target is unranked: last of 10.
    assert_eq!(r["metrics"]["hit@5"].as_f64(), Some(0.0));
    let errors: Vec<String> =
        answers(d, "srv-s4-garbage").iter().map(|a| a["error"].as_str().unwrap().to_string()).collect();
    for want in [
        "the reply is not a chat completion: <html>502 Bad Gateway</html>",
        "the answer holds no JSON list of recommendations",
        "the reply is not a chat completion: {\"choices\": []}",
        "HTTP 400 Bad Request: {\"error\": \"context length exceeded\"}",
    ] {
        assert!(errors.iter().any(|e| e == want), "no `{want}` in {errors:?}");
    }

    let out = illmrec(d, &["lvlm", "--job", "job.yaml", "--strategy", "s4", "--backbone", "refusing"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refused the request (HTTP 401 Unauthorized): check the key in `ILLMREC_TEST_KEY`"),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET) && !String::from_utf8_lossy(&out.stdout).contains(SECRET));
    assert!(refusing.requests()[0].contains(&format!("Bearer {SECRET}")));
}
