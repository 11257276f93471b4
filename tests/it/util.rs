//! What the integration tests share: paths, the `shelfwatch` binary, the daemon under a
//! guard that kills it should a test fail, daemon configs built as TOML tables, and a
//! mosquitto broker and subscriber on loopback for the MQTT tests.

use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The binary under test.
pub const SHELFWATCH: &str = env!("CARGO_BIN_EXE_shelfwatch");

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file or directory under tests/fixtures/.
pub fn fixture(path: &str) -> PathBuf {
    root().join("tests/fixtures").join(path)
}

/// A file under models/.
pub fn model(name: &str) -> PathBuf {
    root().join("models").join(name)
}

/// How much longer than natively things may take: scripts/test-arm.sh sets
/// SHELFWATCH_TEST_SLOWDOWN under qemu, where inference is ~100x slower. It stretches
/// how long a test waits, never what it checks.
pub fn patience(d: Duration) -> Duration {
    let factor: u32 = std::env::var("SHELFWATCH_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    d * factor.max(1)
}

/// The child's exit status once it has exited, or `None` after `limit` (stretched by
/// `patience`).
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let limit = patience(limit);
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Held while this process forks, and by the tests' helper threads while they run: every
/// child process is started through [`spawn`], [`output`] or [`status`].
///
/// Under qemu-user (scripts/test-arm.sh) a fork copies the emulator along with the test,
/// and a fork while another thread of the test runs guest code can leave the child
/// waiting forever on a lock that thread held: the copy never reaches exec (seen once,
/// a CLI test stuck for 70 minutes). So nothing else of ours may run while we fork. The
/// ARM runs start each test that spawns a process alone (`--test-threads=1`); this lock
/// covers the threads those tests start themselves (log and subscriber readers): they
/// hold it while they handle a line and wait for input without it.
static FORK: Mutex<()> = Mutex::new(());

/// [`FORK`], whatever a panicking holder left behind: it guards no data.
pub fn fork_lock() -> MutexGuard<'static, ()> {
    FORK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `cmd.spawn()`, while no helper thread runs.
///
/// scripts/test-arm.sh runs the modules that start no process several tests at a time,
/// with SHELFWATCH_TEST_NO_FORK set: a test there that forks fails here, rather than
/// hanging once in a while.
pub fn spawn(cmd: &mut Command) -> io::Result<Child> {
    assert!(
        std::env::var_os("SHELFWATCH_TEST_NO_FORK").is_none(),
        "{cmd:?}: this test starts a process, so under qemu it must run alone: \
         move its module to the single-threaded run in scripts/test-arm.sh"
    );
    let _fork = fork_lock();
    cmd.spawn()
}

/// `cmd.output()`: started while no helper thread runs, then waited for without the
/// lock, so the helpers go on reading (a daemon never blocks on a full log pipe).
pub fn output(cmd: &mut Command) -> io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd)?.wait_with_output()
}

/// `cmd.status()`, started the same way.
pub fn status(cmd: &mut Command) -> io::Result<ExitStatus> {
    spawn(cmd)?.wait()
}

/// `shelfwatch ARGS` run to its end from the repository's root, as a user runs it, with
/// warnings and errors only on stderr.
pub fn shelfwatch(args: &[&str]) -> Output {
    output(
        Command::new(SHELFWATCH)
            .args(args)
            .current_dir(root())
            .env("SHELFWATCH_LOG", "warn"),
    )
    .expect("run shelfwatch")
}

/// `shelfwatch enroll --gallery GALLERY --sku SKU PHOTO`: one product photo into a
/// gallery, as a user enrols it.
pub fn enroll(gallery: &Path, sku: &str, photo: &Path) -> Output {
    shelfwatch(&[
        "enroll",
        "--gallery",
        gallery.to_str().unwrap(),
        "--sku",
        sku,
        photo.to_str().unwrap(),
    ])
}

/// The messages a JSON lines sink has written to `path` so far. Only whole lines: the
/// daemon may be writing the next one while a test reads (a read racing a write on a
/// regular file can see part of it), and that line is read on the next call.
pub fn jsonl(path: &Path) -> Vec<Value> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let end = bytes.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    String::from_utf8(bytes[..end].to_vec())
        .expect("the sink writes UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The daemon (or whatever `spawn` was given) as a child process that is killed and
/// reaped when the guard is dropped, so a failing test leaves no daemon behind. Its
/// stderr is read as it comes: a chatty daemon never blocks on a full pipe, and `log`
/// holds all of it once the process has exited.
pub struct Daemon {
    child: Child,
    status: Option<ExitStatus>,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Daemon {
    /// `shelfwatch run --config CONFIG`, logging at info: what `start` spawns, for a test
    /// that needs to change how the process starts (limits, a sandbox).
    pub fn command(config: &Path) -> Command {
        let mut cmd = Command::new(SHELFWATCH);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env("SHELFWATCH_LOG", "info");
        cmd
    }

    pub fn start(config: &Path) -> Self {
        Self::spawn(Self::command(config))
    }

    /// Starts `cmd` with stdout discarded and stderr captured.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = spawn(cmd.stdout(Stdio::null()).stderr(Stdio::piped()))
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
                let _fork = fork_lock();
                let mut log = sink.lock().unwrap();
                log.push_str(&String::from_utf8_lossy(&line));
                log.push('\n');
            }
        });
        Daemon {
            child,
            status: None,
            log,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig`, unless the process has already been reaped (its pid may be another
    /// process's by now).
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.status.is_none() && self.poll().is_none()
    }

    /// Its exit status; panics, with its log, when it has not exited within `limit`
    /// (stretched by `patience`).
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        match wait_exit(&mut self.child, limit) {
            Some(s) => self.reaped(s),
            None => panic!(
                "{} did not exit within {:?}; its log:\n{}",
                self.child.id(),
                patience(limit),
                self.log()
            ),
        }
    }

    /// SIGTERM, then its exit status, within the 10 s (natively) a stop may take.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait(Duration::from_secs(10))
    }

    /// A clean stop: SIGTERM, and exit 0.
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "{status:?} after SIGTERM:\n{}",
            self.log()
        );
    }

    /// SIGKILL, reaped: a power cut as far as its files and its broker can tell.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        self.wait(Duration::from_secs(10));
    }

    /// Its stderr so far; all of it once it has exited.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn poll(&mut self) -> Option<ExitStatus> {
        let s = self.child.try_wait().unwrap()?;
        Some(self.reaped(s))
    }

    fn reaped(&mut self, status: ExitStatus) -> ExitStatus {
        self.status = Some(status);
        // The pipe closes with the process (and, for a wrapper, the children it takes
        // along), so the reader ends once it has read the last line.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A daemon config as a TOML table: the keys a test sets and no others, so a test shows
/// everything it depends on. Paths inside are relative to the directory `write` puts the
/// file in, as the daemon reads them.
#[derive(Clone, Debug)]
pub struct Config(toml::Table);

impl Config {
    /// Device `device`, its state in `state/`, no health records.
    pub fn new(device: &str) -> Self {
        Config(toml::Table::new())
            .set("device.id", device)
            .set("state.dir", "state")
            .set("health.interval-s", 0)
    }

    /// The counting model's manifest (a name under models/, or a path).
    pub fn model(self, manifest: &str) -> Self {
        self.set("model.manifest", manifest)
    }

    pub fn window_frames(self, frames: u32) -> Self {
        self.set("counting.window-frames", i64::from(frames))
    }

    pub fn min_agreement(self, share: f64) -> Self {
        self.set("counting.min-agreement", share)
    }

    pub fn out_of_stock_after_s(self, seconds: f64) -> Self {
        self.set("counting.out-of-stock-after-s", seconds)
    }

    pub fn occluder_model(self, manifest: &str) -> Self {
        self.set("counting.occluder-model", manifest)
    }

    /// Identification against the gallery in `dir`.
    pub fn gallery(self, dir: &str) -> Self {
        self.set("identify.gallery", dir)
    }

    pub fn health_interval_s(self, seconds: u32) -> Self {
        self.set("health.interval-s", i64::from(seconds))
    }

    pub fn camera(self, camera: Camera) -> Self {
        self.push("cameras", camera.0)
    }

    pub fn sink(self, sink: Sink) -> Self {
        self.push("sinks", sink.0)
    }

    /// Sets the key at a dotted path (`identify.top-k`): for keys no method names, and
    /// for the misspelt or misplaced keys that a test wants refused.
    pub fn set(mut self, path: &str, value: impl Into<toml::Value>) -> Self {
        set(&mut self.0, path, value.into());
        self
    }

    /// The same config without the zone `name` on any camera.
    pub fn without_zone(mut self, name: &str) -> Self {
        let cameras = self.0.get_mut("cameras").and_then(|c| c.as_array_mut());
        for camera in cameras.into_iter().flatten() {
            if let Some(zones) = camera.get_mut("zones").and_then(|z| z.as_array_mut()) {
                zones.retain(|z| z.get("name").and_then(|n| n.as_str()) != Some(name));
            }
        }
        self
    }

    /// Writes it as `dir`/shelfwatch.toml.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("shelfwatch.toml");
        std::fs::write(&path, toml::to_string(&self.0).unwrap()).unwrap();
        path
    }

    fn push(mut self, key: &str, table: toml::Table) -> Self {
        let array = self
            .0
            .entry(key)
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        array
            .as_array_mut()
            .unwrap()
            .push(toml::Value::Table(table));
        self
    }
}

/// Camera `shelf`, replaying image files.
#[derive(Clone, Debug)]
pub struct Camera(toml::Table);

impl Camera {
    /// The files `pattern` matches, in name order, at `fps`.
    pub fn files(pattern: &Path, fps: f64) -> Self {
        let mut t = toml::Table::new();
        set(&mut t, "id", "shelf".into());
        set(&mut t, "source.kind", "files".into());
        set(&mut t, "source.path", pattern.display().to_string().into());
        set(&mut t, "source.fps", fps.into());
        Camera(t)
    }

    /// Starts over after the last file (or, `false`, ends the run there).
    pub fn looping(mut self, on: bool) -> Self {
        set(&mut self.0, "source.loop", on.into());
        self
    }

    /// Counts every file however long inference takes, rather than the latest frame.
    pub fn every_frame(mut self) -> Self {
        set(&mut self.0, "source.every-frame", true.into());
        self
    }

    pub fn zone(mut self, zone: Zone) -> Self {
        let zones = self
            .0
            .entry("zones")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        zones
            .as_array_mut()
            .unwrap()
            .push(toml::Value::Table(zone.0));
        self
    }
}

/// A zone of the frame, as the scene fixtures are composed: two shelf boards, one above
/// the other.
#[derive(Clone, Debug)]
pub struct Zone(toml::Table);

impl Zone {
    /// `top-shelf`, the upper half of the frame.
    pub fn top_shelf() -> Self {
        Self::new("top-shelf", 0.0, 0.5)
    }

    /// `bottom-shelf`, the lower half of the frame.
    pub fn bottom_shelf() -> Self {
        Self::new("bottom-shelf", 0.5, 1.0)
    }

    fn new(name: &str, top: f64, bottom: f64) -> Self {
        let corners = [[0.0, top], [1.0, top], [1.0, bottom], [0.0, bottom]];
        let polygon: Vec<toml::Value> = corners.iter().map(|c| c.to_vec().into()).collect();
        let mut t = toml::Table::new();
        set(&mut t, "name", name.into());
        set(&mut t, "polygon", polygon.into());
        Zone(t)
    }

    /// What it counts (its planogram).
    pub fn labels(mut self, labels: &[&str]) -> Self {
        set(&mut self.0, "labels", labels.to_vec().into());
        self
    }

    /// The count below which it is low on stock.
    pub fn min(mut self, n: u32) -> Self {
        set(&mut self.0, "min", i64::from(n).into());
        self
    }

    pub fn max(mut self, n: u32) -> Self {
        set(&mut self.0, "max", i64::from(n).into());
        self
    }
}

/// Where the daemon's messages go.
#[derive(Clone, Debug)]
pub struct Sink(toml::Table);

impl Sink {
    /// A JSON lines file; read it back with `jsonl`.
    pub fn jsonl(path: &str) -> Self {
        Sink(toml::Table::new())
            .set("kind", "jsonl")
            .set("path", path)
    }

    /// An MQTT client of `broker` (`127.0.0.1:PORT`, or `embedded` for the daemon's own).
    pub fn mqtt(broker: &str) -> Self {
        Sink(toml::Table::new())
            .set("kind", "mqtt")
            .set("broker", broker)
    }

    /// Sets the key at a dotted path (`tls.ca-file`).
    pub fn set(mut self, path: &str, value: impl Into<toml::Value>) -> Self {
        set(&mut self.0, path, value.into());
        self
    }
}

/// Sets `value` at the dotted `path` in `table`, making the tables on the way.
fn set(table: &mut toml::Table, path: &str, value: toml::Value) {
    let (tables, key) = match path.rsplit_once('.') {
        Some((tables, key)) => (Some(tables), key),
        None => (None, path),
    };
    let mut t = table;
    for name in tables.into_iter().flat_map(|p| p.split('.')) {
        t = t
            .entry(name)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("{name} in {path} is not a table"));
    }
    t.insert(key.to_owned(), value);
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A mosquitto process on 127.0.0.1 with its own config and persistence in the test's
/// directory; stopped when dropped.
pub struct Broker {
    child: Option<Child>,
    conf: PathBuf,
    port: u16,
}

impl Broker {
    /// Listening on a free port, with `extra` lines of mosquitto config.
    pub fn start(dir: &Path, extra: &str) -> Self {
        let port = free_port();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\npersistence true\npersistence_location {}/\n{user}{extra}\n",
                dir.display(),
                // As root, mosquitto drops to its own user, which cannot read the
                // test's private temp dir (certificates, persistence).
                user = if nix::unistd::geteuid().is_root() { "user root\n" } else { "" },
            ),
        )
        .unwrap();
        let mut b = Broker {
            child: None,
            conf,
            port,
        };
        b.restart();
        b
    }

    /// A broker that lets any client in.
    pub fn anonymous(dir: &Path) -> Self {
        Self::start(dir, "allow_anonymous true")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Publishes with mosquitto_pub (`args`: topic, message, options) and checks it
    /// went out.
    pub fn publish(&self, args: &[&str]) {
        let ok = status(
            Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &self.port().to_string()])
                .args(args),
        )
        .expect("mosquitto_pub is installed by scripts/setup.sh");
        assert!(ok.success(), "mosquitto_pub {args:?}: {ok}");
    }

    /// `127.0.0.1:PORT`, as the daemon's `broker` key takes it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it (again), and waits until it accepts connections.
    pub fn restart(&mut self) {
        let child = spawn(
            Command::new("mosquitto")
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("mosquitto is installed by scripts/setup.sh");
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < patience(Duration::from_secs(10)),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// An outage: SIGTERM, reaped. Its persistence stays for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// (retained, topic, payload) of one message a `Subscriber` received.
pub type Message = (bool, String, String);

/// A `mosquitto_sub` with a persistent session, collecting what it receives; stopped
/// when dropped.
pub struct Subscriber {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

/// The topic prefix of [`Subscriber::start`]'s readiness markers, never a message a test
/// sees.
const READY_PREFIX: &str = "shelfwatch-test-ready/";

impl Subscriber {
    /// Client `id` subscribed to `shelfwatch/#` at QoS 1, with `extra` arguments (more
    /// topics, credentials, a protocol version).
    pub fn start(port: u16, id: &str, extra: &[&str]) -> Self {
        let ready = format!("{READY_PREFIX}{id}");
        let mut child = spawn(
            Command::new("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-q", "1", "-c", "-i", id])
                .args(["-t", "shelfwatch/#", "-t", &ready, "-F", "%r|%t|%p"])
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )
        .expect("mosquitto_sub is installed by scripts/setup.sh");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            // Snapshots are binary JPEG: read bytes, not UTF-8 lines.
            for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
                let _fork = fork_lock();
                l.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&line).into_owned());
            }
        });
        let sub = Subscriber { child, lines };
        sub.wait_subscribed(port, &ready, extra);
        sub
    }

    /// Until the subscription is in place, so that nothing a test publishes next is
    /// missed: mosquitto_sub says nothing when it has subscribed, so a marker is
    /// published (with the subscriber's own login and TLS options) until it comes back.
    fn wait_subscribed(&self, port: u16, ready: &str, extra: &[&str]) {
        let mut login = Vec::new();
        for pair in extra.windows(2) {
            if ["--cafile", "-u", "-P", "-V"].contains(&pair[0]) {
                login.extend_from_slice(pair);
            }
        }
        let limit = patience(Duration::from_secs(20));
        let t = Instant::now();
        while !self.lines.lock().unwrap().iter().any(|l| l.contains(ready)) {
            assert!(
                t.elapsed() < limit,
                "mosquitto_sub did not subscribe on port {port} within {limit:?}"
            );
            let _ = status(
                Command::new("mosquitto_pub")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                    .args(["-t", ready, "-m", "ready"])
                    .args(&login)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn messages(&self) -> Vec<Message> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let mut p = l.splitn(3, '|');
                Some((p.next()? == "1", p.next()?.to_owned(), p.next()?.to_owned()))
            })
            .filter(|(_, topic, _)| !topic.starts_with(READY_PREFIX))
            .collect()
    }

    /// The payloads that are JSON.
    pub fn json(&self) -> Vec<Value> {
        self.messages()
            .into_iter()
            .filter_map(|(_, _, p)| serde_json::from_str(&p).ok())
            .collect()
    }

    /// Until `what` holds for the messages so far; fails after `limit` (stretched by
    /// `patience`) with what did arrive.
    pub fn wait_for(&self, what: impl Fn(&[Message]) -> bool, limit: Duration) {
        let limit = patience(limit);
        let t = Instant::now();
        while !what(&self.messages()) {
            assert!(t.elapsed() < limit, "timed out; got {:#?}", self.messages());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Until the daemon's status on this subscription is `online`.
    pub fn wait_online(&self) {
        self.wait_for(
            |m| {
                m.iter()
                    .any(|(_, t, p)| t.ends_with("/status") && p == "online")
            },
            Duration::from_secs(60),
        );
    }

    /// Until the last status received is `offline` (a clean stop, or the last will).
    pub fn wait_offline(&self) {
        self.wait_for(
            |m| {
                m.iter()
                    .rev()
                    .find(|(_, t, _)| t.ends_with("/status"))
                    .is_some_and(|(_, _, p)| p == "offline")
            },
            Duration::from_secs(20),
        );
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}
