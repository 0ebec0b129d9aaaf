//! A real Kafka-protocol broker (Tansu) for integration tests, started on a free
//! loopback port and killed on drop; and the small helpers of tests that use one.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pinned Tansu binary: `$REVSYNC_TANSU`, else the cache `.ci/run` installs into,
/// else `tansu` on PATH.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REVSYNC_TANSU") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let cached = Path::new(&home).join(".cache/revsync/tansu-0.6.0/bin/tansu");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("tansu")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub enum Storage {
    Memory,
    /// SQLite file: the log survives broker restarts.
    Sqlite(PathBuf),
}

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    storage_url: String,
    /// The SQLite file, for [`Broker::restart_empty`].
    sqlite: Option<PathBuf>,
}

impl Broker {
    pub fn start(storage: Storage) -> Self {
        let sqlite = match &storage {
            Storage::Sqlite(path) => Some(path.clone()),
            Storage::Memory => None,
        };
        let storage_url = match storage {
            Storage::Memory => "memory://tansu/".to_string(),
            // Tansu 0.6 resolves what follows "sqlite://" from its working directory unless
            // it starts with "//": an absolute path needs four slashes in all.
            Storage::Sqlite(path) => {
                assert!(path.is_absolute(), "sqlite storage needs an absolute path");
                format!("sqlite:///{}", path.display())
            }
        };
        let mut b = Broker {
            child: None,
            port: free_port(),
            storage_url,
            sqlite,
        };
        b.launch();
        b
    }

    /// A broker whose log is a SQLite file in `dir`: it survives broker restarts, and it
    /// serves a fetch from any offset. (memory:// cannot serve a fetch that starts inside
    /// a record batch — it answers from the next batch, or nothing — so a daemon killed
    /// mid-stream, which resumes at such an offset, would skip records.)
    pub fn sqlite(dir: &Path) -> Self {
        Self::start(Storage::Sqlite(dir.join("log.db")))
    }

    pub fn memory() -> Self {
        Self::start(Storage::Memory)
    }

    /// `host:port` for librdkafka.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &self.url(),
                "--advertised-listener-url",
                &self.url(),
            ])
            .args(["--storage-engine", &self.storage_url])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (run .ci/run to install Tansu): {e}",
                    tansu_bin().display()
                )
            });
        self.child = Some(child);
        assert!(
            wait_for_port(self.port, Duration::from_secs(20)),
            "tansu did not listen on {}",
            self.port
        );
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new(tansu_bin())
                .args([
                    "topic",
                    "create",
                    name,
                    "--partitions",
                    &partitions.to_string(),
                    "--broker",
                    &self.url(),
                ])
                .env("RUST_LOG", "warn")
                .output()
                .expect("run tansu topic create");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tansu topic create {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn delete_topic(&self, name: &str) {
        let out = Command::new(tansu_bin())
            .args(["topic", "delete", name, "--broker", &self.url()])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run tansu topic delete");
        assert!(
            out.status.success(),
            "tansu topic delete: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Kills the broker (its in-memory log goes with it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Starts it again on the same port with an empty log, as a broker that lost its
    /// data: memory storage is empty anyway; a SQLite file is deleted first. Topics must
    /// be created again.
    pub fn restart_empty(&mut self) {
        self.stop();
        if self.sqlite.is_some() {
            for (file, _) in self.sqlite_files() {
                match std::fs::remove_file(&file) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("cannot delete {}: {e}", file.display()),
                }
            }
        }
        self.launch();
    }

    /// The SQLite files of this broker (database, WAL, …), each with its suffix.
    fn sqlite_files(&self) -> Vec<(PathBuf, &'static str)> {
        let db = self.sqlite.as_ref().expect("SQLite storage");
        ["", "-wal", "-shm", "-journal"]
            .into_iter()
            .map(|suffix| {
                let mut f = db.clone().into_os_string();
                f.push(suffix);
                (PathBuf::from(f), suffix)
            })
            .collect()
    }

    /// Copies the log as it is now (SQLite only) to files named after `to`, with the
    /// broker stopped meanwhile; [`Broker::restart_from_snapshot`] brings it back.
    pub fn snapshot(&mut self, to: &Path) {
        self.stop();
        for (file, suffix) in self.sqlite_files() {
            let mut copy = to.to_path_buf().into_os_string();
            copy.push(suffix);
            if file.exists() {
                std::fs::copy(&file, &copy).expect("copy SQLite file");
            }
        }
        self.launch();
    }

    /// Starts it again on the same port from a [`Broker::snapshot`]: the topics (and
    /// their ids) of then, and only the records of then. Unlike a topic created again,
    /// clients never see a topic id the broker does not know: Tansu answers a fetch for
    /// one with a zero topic id and a current-leader tag, on which librdkafka 2.12.1
    /// looks the topic up by a name it does not have and crashes (SIGSEGV in
    /// `rd_kafka_metadata_update_op`).
    pub fn restart_from_snapshot(&mut self, from: &Path) {
        self.stop();
        for (file, suffix) in self.sqlite_files() {
            let mut copy = from.to_path_buf().into_os_string();
            copy.push(suffix);
            let _ = std::fs::remove_file(&file);
            if Path::new(&copy).exists() {
                std::fs::copy(&copy, &file).expect("restore SQLite file");
            }
        }
        self.launch();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A tiny blocking HTTP/1.1 GET returning the body as text (e.g. `/metrics`).
pub fn get_text(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut s = TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf.split_once("\r\n\r\n")?.1.to_string())
}

/// A tiny blocking HTTP/1.1 GET returning the JSON body: keeps sync tests free of an
/// async runtime.
pub fn get_json(url: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&get_text(url)?).ok()
}
