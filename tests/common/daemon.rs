//! The `revsync` binary run as a daemon: the config file it is started with, the child
//! process, and the `revsync publish` CLI that feeds it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::broker::{wait_for_port, Broker};
use super::jwt::JwksServer;

/// A `revsync run` config file: the keys every daemon test sets, and raw TOML for the
/// rest. Start from [`DaemonConfig::new`] and change fields with `..`:
///
/// ```ignore
/// DaemonConfig {
///     extra_toml: "[freshness]\non_stale = \"deny\"\n".into(),
///     ..DaemonConfig::new(port, dir, &broker, TOPIC).trusting(&jwks, AUD)
/// }
/// .write(&dir.join("revsync.toml"))
/// ```
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// `[http] listen = "127.0.0.1:PORT"`.
    pub port: u16,
    /// More keys of `[http]`, as TOML lines.
    pub http_extra: String,
    /// `[store] path`.
    pub store: PathBuf,
    /// `[kafka] brokers`.
    pub brokers: String,
    /// `[kafka] watermark_interval`; `None` leaves the default.
    pub watermark_interval: Option<&'static str>,
    /// `name` of the one `[[kafka.topics]]` entry; `None`: no entry (the default topic).
    pub topic: Option<String>,
    /// More keys of that topic entry, as TOML lines.
    pub topic_extra: String,
    /// `issuer`, `jwks_uri` and `audiences = [audience]` of the one `[[issuers]]` entry.
    pub issuer: String,
    pub jwks_uri: String,
    pub audience: String,
    /// More keys of that issuer entry, as TOML lines.
    pub issuer_extra: String,
    /// Further tables, appended as they are.
    pub extra_toml: String,
}

impl DaemonConfig {
    /// Listening on 127.0.0.1:`port`, its store in `dir/store`, reading `topic` from
    /// `broker` with watermarks every 200 ms; trusting `https://as.example.com` for
    /// `https://api.example.com`, with keys at an address nothing answers.
    pub fn new(port: u16, dir: &Path, broker: &Broker, topic: &str) -> Self {
        DaemonConfig {
            port,
            http_extra: String::new(),
            store: dir.join("store"),
            brokers: broker.bootstrap(),
            watermark_interval: Some("200ms"),
            topic: Some(topic.to_string()),
            topic_extra: String::new(),
            issuer: "https://as.example.com".into(),
            jwks_uri: "http://127.0.0.1:1/jwks".into(),
            audience: "https://api.example.com".into(),
            issuer_extra: String::new(),
            extra_toml: String::new(),
        }
    }

    /// Trusting the issuer of `jwks` (keys from its `/jwks`) for `audience`.
    pub fn trusting(self, jwks: &JwksServer, audience: &str) -> Self {
        DaemonConfig {
            issuer: jwks.issuer(),
            jwks_uri: jwks.jwks_uri(),
            audience: audience.to_string(),
            ..self
        }
    }

    /// The file's text.
    pub fn toml(&self) -> String {
        let watermark_interval = match self.watermark_interval {
            Some(interval) => format!("watermark_interval = \"{interval}\"\n"),
            None => String::new(),
        };
        let topic = match &self.topic {
            Some(name) => format!(
                "\n[[kafka.topics]]\nname = \"{name}\"\n{}\n",
                self.topic_extra
            ),
            None => String::new(),
        };
        format!(
            r#"[http]
listen = "127.0.0.1:{port}"
{http_extra}

[store]
path = "{store}"

[kafka]
brokers = "{brokers}"
{watermark_interval}{topic}
[[issuers]]
issuer = "{issuer}"
jwks_uri = "{jwks_uri}"
audiences = ["{audience}"]
{issuer_extra}

{extra_toml}"#,
            port = self.port,
            http_extra = self.http_extra,
            store = self.store.display(),
            brokers = self.brokers,
            issuer = self.issuer,
            jwks_uri = self.jwks_uri,
            audience = self.audience,
            issuer_extra = self.issuer_extra,
            extra_toml = self.extra_toml,
        )
    }

    /// Writes the file at `path`, and returns that path.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.toml()).unwrap();
        path.to_path_buf()
    }
}

/// The revsync binary run as a child process with a config file.
pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    pub config: PathBuf,
}

impl Daemon {
    pub fn spawn(config: &Path, port: u16) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_revsync"))
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn revsync");
        assert!(
            wait_for_port(port, Duration::from_secs(20)),
            "revsync did not listen"
        );
        Daemon {
            child: Some(child),
            port,
            config: config.to_path_buf(),
        }
    }

    /// As [`Daemon::spawn`], with `env` added to the child's environment and its stderr
    /// written to the file `stderr` (for tests that read its log).
    pub fn spawn_with(config: &Path, port: u16, env: &[(&str, &str)], stderr: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_revsync"))
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(stderr).expect("create the stderr file"))
            .spawn()
            .expect("spawn revsync");
        assert!(
            wait_for_port(port, Duration::from_secs(20)),
            "revsync did not listen:\n{}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
        Daemon {
            child: Some(child),
            port,
            config: config.to_path_buf(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(exit code)` once the child has exited (`Some(None)`: killed by a signal).
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status.code())
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("revsync did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `revsync publish --brokers … --topic TOPIC <what…>`; panics unless it exits 0.
pub fn publish(broker: &Broker, topic: &str, what: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_revsync"))
        .args([
            "publish",
            "--brokers",
            &broker.bootstrap(),
            "--topic",
            topic,
        ])
        .args(what)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run revsync publish");
    assert!(
        out.status.success(),
        "revsync publish {what:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `revsync` binary as a command, with the test process's own `REVSYNC_*`
/// configuration variables removed (a developer's environment never leaks into a test)
/// and `env` added.
pub fn cli_command(env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_revsync"));
    for (k, _) in std::env::vars() {
        if k.starts_with("REVSYNC_") && (k.contains("__") || k == "REVSYNC_CONFIG") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// `revsync ARGS` (logging at warn) with `env` added to the child's environment (never
/// the test's) and stdin from `stdin`; waits for it.
pub fn cli(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut cmd = cli_command(&[("RUST_LOG", "warn")]);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run revsync");
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}
