//! Storage roots on a real S3-compatible server: moto's server (`python3 -m moto.server`, installed
//! by scripts/setup.sh) on 127.0.0.1, started per test. Every client gets dummy keys and a loopback
//! metadata endpoint, so nothing here can reach a cloud metadata service.
//!
//! - dataset + features + checkpoint + resume through S3 end with the same weights as on local disk;
//! - the server cut off during a checkpoint upload: the run reports it and goes on, LATEST never names
//!   the partial checkpoint, the next checkpoint commits once the server is back, and the final
//!   weights equal an undisturbed run's;
//! - the final and a new best checkpoint are retried until the server is back;
//! - a fresh start cut short leaves no pointer to a half-deleted checkpoint;
//! - another writer committing to the run's LATEST first ends the run at once, without retries;
//! - wrong credentials: a clear error that does not print the secret.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use illmrec::store::{S3Config, StorageConfig, Store};

mod common;
use common::{largest_difference, latest_weights};

const BIN: &str = env!("CARGO_BIN_EXE_illmrec");
const KEY_ID: &str = "testing-key-id";
const SECRET: &str = "testing-secret-d41d8cd98f";

/// A moto server on a free loopback port; killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start(enforce_auth: bool) -> Self {
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if enforce_auth {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        let child = cmd.spawn().expect("python3 -m moto.server (scripts/setup.sh installs moto[server])");
        let moto = Moto { child, port };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "moto did not start on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// Creates a bucket with one unsigned request (moto accepts those unless auth is enforced).
    fn create_bucket(&self, bucket: &str) {
        let reply = self.request("PUT", &format!("/{bucket}"));
        assert!(reply.starts_with("HTTP/1.1 200"), "creating bucket {bucket}: {reply}");
    }

    /// One unsigned request without a body; the reply's status line and headers.
    fn request(&self, method: &str, path: &str) -> String {
        unsigned_request(self.port, method, path)
    }
}

/// One unsigned request without a body to the server on `port`; the reply's status line and headers.
/// A server that accepts connections before it is ready may reset the first ones: retried for 30 s.
fn unsigned_request(port: u16, method: &str, path: &str) -> String {
    let started = Instant::now();
    loop {
        let attempt = || -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        };
        match attempt() {
            Ok(reply) => break reply,
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                eprintln!("{method} {path}: {e}, retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The S3 settings every client here uses: dummy keys, path-style, plain HTTP, and a metadata endpoint
/// on a closed loopback port.
fn s3_env(cmd: &mut Command, port: u16) -> &mut Command {
    cmd.env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_SESSION_TOKEN")
}

/// The same keys for this test process's own clients (set once, identically, for every test).
fn s3_env_here() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_REGION", "us-east-1"),
            ("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ] {
            std::env::set_var(k, v);
        }
    });
}

fn open_s3(port: u16, root: &str) -> Store {
    s3_env_here();
    let s3 = S3Config { endpoint: Some(format!("http://127.0.0.1:{port}")), allow_http: true, ..S3Config::default() };
    Store::open_with(&StorageConfig { root: root.into(), s3, ..StorageConfig::default() }).unwrap()
}

fn job(root: &str, steps: u64, extra_storage: &str) -> String {
    format!(
        r#"
name: s3t
{sections}train:
  illmrec: {{batch_size: 4, lr: 0.001, max_steps: {steps}, checkpoint_every: 2}}
storage: {{root: "{root}", cache_dir: node-cache{extra_storage}}}
telemetry: {{progress: off}}
"#,
        sections = common::tiny_sections("")
    )
}

fn illmrec(dir: &Path, port: Option<u16>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(dir);
    if let Some(p) = port {
        s3_env(&mut cmd, p);
    }
    cmd.output().unwrap()
}

fn ok(dir: &Path, port: Option<u16>, args: &[&str]) -> String {
    let out = illmrec(dir, port, args);
    assert!(out.status.success(), "illmrec {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// synth once, then prepare + features into the job's root.
fn prepare(dir: &Path, port: Option<u16>, file: &str, synth: bool) {
    if synth {
        ok(dir, None, &["synth", "--job", file]);
    }
    ok(dir, port, &["prepare", "--job", file]);
    ok(dir, port, &["features", "--job", file]);
}

/// Trains `s3.yaml` in `d` through `proxy`, which cuts the server off; the server comes back when
/// the run logs a line `back_on` accepts. Asserts the run succeeded; returns its log.
fn train_through(d: &Path, proxy: &FaultProxy, back_on: impl Fn(&str) -> bool) -> String {
    let mut cmd = Command::new(BIN);
    s3_env(&mut cmd, proxy.port);
    let mut child = cmd
        .args(["train", "--job", "s3.yaml", "--model", "illmrec"])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut reported = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
        reported.push_str(&line);
        reported.push('\n');
        if back_on(&line) {
            assert!(proxy.tripped.load(Ordering::SeqCst), "the server was never cut off:\n{reported}");
            proxy.up();
        }
    }
    assert!(child.wait().unwrap().success(), "the run failed:\n{reported}");
    reported
}

#[test]
fn dataset_features_checkpoint_and_resume_round_trip_through_s3() {
    let moto = Moto::start(false);
    moto.create_bucket("illmrec-rt");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("local.yaml"), job("store-local", 6, "")).unwrap();
    std::fs::write(d.join("s3.yaml"), job("s3://illmrec-rt/team/a", 6, "")).unwrap();
    prepare(d, None, "local.yaml", true);
    ok(d, None, &["train", "--job", "local.yaml", "--model", "illmrec"]);

    let port = Some(moto.port);
    prepare(d, port, "s3.yaml", false);
    // Features again: everything is reused from the S3 cache.
    let again: serde_json::Value =
        serde_json::from_str(&ok(d, port, &["features", "--job", "s3.yaml", "--json"])).unwrap();
    for r in again.as_array().unwrap() {
        assert_eq!(r["computed"], 0, "{r}");
        assert!(r["reused"].as_u64().unwrap() > 0, "{r}");
    }
    ok(d, port, &["train", "--job", "s3.yaml", "--model", "illmrec", "--stop-after", "3"]);
    let resumed = ok(d, port, &["train", "--job", "s3.yaml", "--model", "illmrec", "--resume"]);
    assert!(resumed.contains("resumed at step"), "{resumed}");

    // Everything lives in the bucket below the prefix: dataset, features, checkpoints.
    let store = open_s3(moto.port, "s3://illmrec-rt/team/a");
    assert!(store.honours_conditional_put(), "moto honours If-None-Match; the probe should see it");
    let keys = store.list("").unwrap();
    for part in ["datasets/s3t/LATEST", "features/", "runs/s3t-illmrec/checkpoints/LATEST", "/weights.safetensors"] {
        assert!(keys.iter().any(|k| k.contains(part)), "no `{part}` in the bucket: {keys:?}");
    }
    // The node cache holds the immutable objects it read (snapshot files, feature shards).
    assert!(walk(&d.join("node-cache")) > 0, "the local read cache is empty");

    let local = Store::open(&d.join("store-local").display().to_string()).unwrap();
    let (diff, at) = largest_difference(&latest_weights(&local, "s3t-illmrec"), &latest_weights(&store, "s3t-illmrec"));
    assert_eq!(diff, 0.0, "S3 run (stopped and resumed) differs from the local run at {at}");

    // Evaluation reads the same model back from S3.
    let a = ok(d, None, &["eval", "--job", "local.yaml", "--model", "illmrec", "--protocol", "sampled:29", "--json"]);
    let b = ok(d, port, &["eval", "--job", "s3.yaml", "--model", "illmrec", "--protocol", "sampled:29", "--json"]);
    assert_eq!(a, b);
}

#[test]
fn large_objects_go_up_in_parts_and_come_back_whole() {
    let moto = Moto::start(false);
    moto.create_bucket("illmrec-mp");
    s3_env_here();
    let s3 =
        S3Config { endpoint: Some(format!("http://127.0.0.1:{}", moto.port)), allow_http: true, ..S3Config::default() };
    let cfg = StorageConfig { root: "s3://illmrec-mp/p".into(), s3, multipart_mib: 5, ..StorageConfig::default() };
    let store = Store::open_with(&cfg).unwrap();
    // 12 MiB in 5 MiB parts: three parts, the last one short.
    let big: Vec<u8> = (0..12u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    store.put("runs/r/checkpoints/big/weights.safetensors", big.clone()).unwrap();
    assert!(store.get("runs/r/checkpoints/big/weights.safetensors").unwrap() == big);
    // S3 gives an object uploaded in parts the ETag `"<md5 of the parts' md5s>-<parts>"`: three
    // parts went up, not one PUT.
    let head = moto.request("HEAD", "/illmrec-mp/p/runs/r/checkpoints/big/weights.safetensors");
    let etag = head.lines().find_map(|l| l.strip_prefix("ETag: ").or_else(|| l.strip_prefix("etag: ")));
    assert!(etag.is_some_and(|e| e.trim().trim_matches('"').ends_with("-3")), "not a 3-part upload:\n{head}");
    // Below the threshold, one PUT: a plain ETag.
    store.put("small", vec![7u8; 1024]).unwrap();
    let head = moto.request("HEAD", "/illmrec-mp/p/small");
    assert!(!head.contains("-1\""), "{head}");
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
        .unwrap_or(0)
}

/// What a [`FaultProxy`] does at the first request its trigger names.
enum OnTrigger {
    /// Goes "down": drops every open connection and refuses new ones until `up()`; the request is
    /// not forwarded.
    CutOff,
    /// Runs this first (another writer's request, say), then forwards the request.
    RunFirst(Box<dyn Fn() + Send + Sync>),
}

/// A TCP proxy in front of the server that injects one fault at the first `method` request that
/// names `key_end`: a key ending so in its path, or in its body (S3's deletes are POSTs that list
/// their keys in the body).
struct FaultProxy {
    port: u16,
    down: Arc<AtomicBool>,
    tripped: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl FaultProxy {
    fn start(upstream: u16, method: &str, key_end: &str, on: OnTrigger) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = FaultProxy { port, down: Arc::default(), tripped: Arc::default(), generation: Arc::default() };
        let (down, tripped, generation) = (proxy.down.clone(), proxy.tripped.clone(), proxy.generation.clone());
        let trigger = Arc::new(Trigger { method: method.into(), key_end: key_end.into(), on });
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let gen = generation.load(Ordering::SeqCst);
                let st = Shared { down: down.clone(), tripped: tripped.clone(), generation: generation.clone(), gen };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let st2 = st.clone();
                let trigger = trigger.clone();
                std::thread::spawn(move || pump(client, server, Some(&trigger), st));
                std::thread::spawn(move || pump(s2, c2, None, st2));
            }
        });
        proxy
    }

    fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

struct Trigger {
    method: String,
    key_end: String,
    on: OnTrigger,
}

impl Trigger {
    /// Whether the chunk a client sent starts a request the trigger names (a small request's head
    /// and body arrive in one chunk).
    fn names(&self, chunk: &str) -> bool {
        chunk.starts_with(&format!("{} ", self.method))
            && [format!("{} HTTP/1.1", self.key_end), format!("{}</Key>", self.key_end)]
                .iter()
                .any(|end| chunk.contains(end.as_str()))
    }
}

#[derive(Clone)]
struct Shared {
    down: Arc<AtomicBool>,
    tripped: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    gen: u64,
}

/// Copies `from` to `to` until either side closes or the proxy goes down. On the client side, the
/// first request `trigger` names gets its fault.
fn pump(mut from: TcpStream, mut to: TcpStream, trigger: Option<&Trigger>, st: Shared) {
    from.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if st.generation.load(Ordering::SeqCst) != st.gen {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        if let Some(t) = trigger {
            if t.names(&String::from_utf8_lossy(&buf[..n])) && !st.tripped.swap(true, Ordering::SeqCst) {
                match &t.on {
                    OnTrigger::CutOff => {
                        st.down.store(true, Ordering::SeqCst);
                        st.generation.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    OnTrigger::RunFirst(first) => first(),
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn server_cut_off_during_a_checkpoint_upload_costs_that_checkpoint_only() {
    let moto = Moto::start(false);
    moto.create_bucket("illmrec-cut");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A short S3 retry budget so the failed checkpoint is reported quickly.
    let retry = ", s3: {retries: 1, retry_timeout_secs: 2}";
    std::fs::write(d.join("local.yaml"), job("store-local", 30, "")).unwrap();
    prepare(d, None, "local.yaml", true);
    ok(d, None, &["train", "--job", "local.yaml", "--model", "illmrec"]);

    // Prepare through the proxy while it is up, then train: the proxy goes down at the first
    // optimizer-state upload, after the weights of that checkpoint went up (a partial checkpoint).
    let proxy = FaultProxy::start(moto.port, "PUT", "optimizer.safetensors", OnTrigger::CutOff);
    std::fs::write(d.join("s3.yaml"), job("s3://illmrec-cut/x", 30, retry)).unwrap();
    prepare(d, Some(proxy.port), "s3.yaml", false);
    // Bring the server back as soon as the run reports the failed checkpoint.
    let reported = train_through(d, &proxy, |line| line.contains("checkpoint at step") && line.contains("failed"));
    assert!(reported.contains("checkpoint at step 2 failed"), "no report of the failed checkpoint:\n{reported}");
    assert!(!reported.contains(SECRET));
    for line in reported.lines().filter(|l| l.contains("WARN")) {
        eprintln!("run reported: {line}");
    }

    let store = open_s3(moto.port, "s3://illmrec-cut/x");
    let ckpt = illmrec::train::runs::load_latest(&store, "s3t-illmrec").unwrap().unwrap();
    assert_eq!(ckpt.step, 30);
    // A checkpoint committed between the failure and the end: the final one's parent.
    let parent = ckpt.state["parent"].as_str().expect("the final checkpoint has a parent").to_string();
    let parent_step: u64 = parent.split('-').next().unwrap().parse().unwrap();
    assert!((4..30).contains(&parent_step), "parent {parent}");
    // The partial checkpoint of step 2 never became LATEST and is gone after the later commits.
    let keys = store.list("runs/s3t-illmrec/checkpoints").unwrap();
    assert!(!keys.iter().any(|k| k.contains("/0000000002-")), "{keys:?}");
    // Losing a checkpoint does not change the training.
    let local = Store::open(&d.join("store-local").display().to_string()).unwrap();
    let (diff, at) = largest_difference(&latest_weights(&local, "s3t-illmrec"), &latest_weights(&store, "s3t-illmrec"));
    assert_eq!(diff, 0.0, "{at}");
}

#[test]
fn wrong_credentials_fail_clearly_without_printing_the_secret() {
    let moto = Moto::start(true);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s3.yaml"), job("s3://illmrec-auth/p", 2, "")).unwrap();
    let out = illmrec(dir.path(), Some(moto.port), &["prepare", "--job", "s3.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("wrong credentials: {err}");
    assert!(!out.status.success());
    assert!(err.contains("storage root") && err.contains("s3://illmrec-auth/p"), "{err}");
    assert!(err.contains("refused the credentials") && err.contains("InvalidAccessKeyId"), "{err}");
    assert!(!err.contains(SECRET), "the secret is printed: {err}");
}

/// A moto server with `bucket`, and a folder holding `s3.yaml`: `steps` steps into `s3://{bucket}/x`
/// with a short S3 retry budget (failures are reported quickly) and `checkpoints` as the job's
/// checkpoint settings.
fn short_retry_job(bucket: &str, steps: u64, checkpoints: &str) -> (Moto, tempfile::TempDir) {
    let moto = Moto::start(false);
    moto.create_bucket(bucket);
    let dir = tempfile::tempdir().unwrap();
    let retry = ", s3: {retries: 1, retry_timeout_secs: 2}";
    let text = job(&format!("s3://{bucket}/x"), steps, retry).replace("checkpoint_every: 2}", checkpoints);
    std::fs::write(dir.path().join("s3.yaml"), text).unwrap();
    (moto, dir)
}

/// Trains 6 steps of `s3.yaml` into `bucket` with `checkpoints` as the job's checkpoint settings,
/// through a proxy that cuts the server off at the run's first weights upload and brings it back
/// when the run reports that `what` checkpoint's first attempt failed. Asserts that it was retried;
/// returns the server and the store.
fn retried_until_the_store_is_back(bucket: &str, checkpoints: &str, what: &str) -> (Moto, Store) {
    let (moto, dir) = short_retry_job(bucket, 6, checkpoints);
    let d = dir.path();
    let proxy = FaultProxy::start(moto.port, "PUT", "weights.safetensors", OnTrigger::CutOff);
    prepare(d, Some(proxy.port), "s3.yaml", true);
    let reported = train_through(d, &proxy, |line| line.contains(&format!("{what} failed (attempt 1 of 5)")));
    assert!(reported.contains("(attempt 1 of 5), retrying in 2s"), "{reported}");
    let store = open_s3(moto.port, &format!("s3://{bucket}/x"));
    (moto, store)
}

#[test]
fn the_final_checkpoint_is_retried_until_the_store_is_back() {
    // No checkpoint before the last step and no validation: the first upload is the final save's.
    let (_moto, store) = retried_until_the_store_is_back(
        "illmrec-fin",
        "checkpoint_every: 100, validate_every: 0}",
        "final checkpoint at step 6",
    );
    assert_eq!(illmrec::train::runs::load_latest(&store, "s3t-illmrec").unwrap().unwrap().step, 6);
}

#[test]
fn a_new_best_checkpoint_is_retried_until_the_store_is_back() {
    // The validation at step 2 is the first (a new best) and none after it beats it by 1: its
    // checkpoint is the run's first upload and the only one BEST may name.
    let (_moto, store) = retried_until_the_store_is_back(
        "illmrec-best",
        "checkpoint_every: 100, validate_every: 2, validation: {min_delta: 1.0}}",
        "best checkpoint at step 2",
    );
    let best = illmrec::train::runs::load(&store, "s3t-illmrec", illmrec::train::runs::Which::Best).unwrap().unwrap();
    assert_eq!(best.step, 2);
    assert_eq!(illmrec::train::runs::load_latest(&store, "s3t-illmrec").unwrap().unwrap().step, 6);
}

#[test]
fn a_commit_another_writer_got_to_first_ends_the_run_without_retries() {
    let (moto, dir) = short_retry_job("illmrec-conf", 6, "checkpoint_every: 2}");
    let d = dir.path();
    prepare(d, Some(moto.port), "s3.yaml", true);
    // Just before the run's first commit creates LATEST, another writer creates it: the server
    // refuses the run's create-only put.
    let port = moto.port;
    let other_writer = move || {
        let reply = unsigned_request(port, "PUT", "/illmrec-conf/x/runs/s3t-illmrec/checkpoints/LATEST");
        assert!(reply.starts_with("HTTP/1.1 200"), "the other writer's put: {reply}");
    };
    let proxy = FaultProxy::start(moto.port, "PUT", "checkpoints/LATEST", OnTrigger::RunFirst(Box::new(other_writer)));
    let out = illmrec(d, Some(proxy.port), &["train", "--job", "s3.yaml", "--model", "illmrec"]);
    let reported = String::from_utf8_lossy(&out.stderr);
    assert!(proxy.tripped.load(Ordering::SeqCst), "the run never committed:\n{reported}");
    assert!(!out.status.success(), "the run went on over another writer's commit:\n{reported}");
    assert!(reported.contains("changed while this run was committing to it"), "{reported}");
    assert!(
        !reported.contains("retrying") && !reported.contains("training goes on"),
        "retried or tolerated:\n{reported}"
    );
    // LATEST is still the other writer's.
    let store = open_s3(moto.port, "s3://illmrec-conf/x");
    assert_eq!(store.get_string("runs/s3t-illmrec/checkpoints/LATEST").unwrap().as_deref(), Some(""));
}

#[test]
fn a_fresh_start_cut_short_leaves_no_pointer_to_a_deleted_checkpoint() {
    let (moto, dir) = short_retry_job("illmrec-clear", 4, "checkpoint_every: 2}");
    let d = dir.path();
    prepare(d, Some(moto.port), "s3.yaml", true);
    ok(d, Some(moto.port), &["train", "--job", "s3.yaml", "--model", "illmrec"]);
    let store = open_s3(moto.port, "s3://illmrec-clear/x");
    let latest = illmrec::train::runs::load_latest(&store, "s3t-illmrec").unwrap().unwrap();
    // A fresh start of the same run deletes its checkpoints; the server goes away at the delete of
    // LATEST's weights, after the files listed before them (the optimizer state) are gone.
    let proxy =
        FaultProxy::start(moto.port, "POST", &format!("{}/weights.safetensors", latest.name), OnTrigger::CutOff);
    let out = illmrec(d, Some(proxy.port), &["train", "--job", "s3.yaml", "--model", "illmrec"]);
    let reported = String::from_utf8_lossy(&out.stderr);
    assert!(proxy.tripped.load(Ordering::SeqCst), "the server was never cut off:\n{reported}");
    assert!(!out.status.success(), "{reported}");
    // The pointers went first: the run has no checkpoint rather than one with files missing.
    use illmrec::train::runs::{load, load_latest, Which};
    assert!(load_latest(&store, "s3t-illmrec").unwrap().is_none());
    assert!(load(&store, "s3t-illmrec", Which::Best).unwrap().is_none());
}

#[test]
fn an_s3_root_without_keys_is_refused_rather_than_asking_a_metadata_service() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s3.yaml"), job("s3://illmrec-nokeys/p", 2, "")).unwrap();
    let out = Command::new(BIN)
        .args(["prepare", "--job", "s3.yaml"])
        .current_dir(dir.path())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        // Were the refusal to break, a client must still not leave loopback.
        .env("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", free_port()))
        .env("AWS_ALLOW_HTTP", "true")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), "{err}");
    assert!(err.contains("instance_credentials: true"), "{err}");
}
