//! `revsync dev` as a newcomer meets it: the README's walkthrough, run as written, and
//! `dev` on a machine with nothing but the binary (no cargo, an empty `$HOME`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::{eventually, free_port};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_revsync");

/// A tiny blocking HTTP/1.1 request: (status, body).
fn http(method: &str, url: &str, bearer: Option<&str>) -> Option<(u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut s = TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// `revsync dev` on free ports in `dir`, killed on drop; stdout goes to `dir/dev.out`.
struct Dev {
    child: Child,
    dir: PathBuf,
    port: u16,
    issuer_port: u16,
    broker_port: u16,
}

impl Dev {
    fn start(dir: &Path, configure: impl FnOnce(&mut Command)) -> Dev {
        Dev::start_on(dir, (free_port(), free_port(), free_port()), configure)
    }

    /// On (check API, issuer, broker) ports `ports`.
    fn start_on(dir: &Path, ports: (u16, u16, u16), configure: impl FnOnce(&mut Command)) -> Dev {
        let (port, issuer_port, broker_port) = ports;
        let mut cmd = Command::new(BIN);
        cmd.arg("dev")
            .arg("--dir")
            .arg(dir.join("dev"))
            .args(["--port", &port.to_string()])
            .args(["--issuer-port", &issuer_port.to_string()])
            .args(["--broker-port", &broker_port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("dev.out")).unwrap())
            .stderr(std::fs::File::create(dir.join("dev.err")).unwrap());
        configure(&mut cmd);
        Dev {
            child: cmd.spawn().expect("spawn revsync dev"),
            dir: dir.to_path_buf(),
            port,
            issuer_port,
            broker_port,
        }
    }

    fn api(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.issuer_port)
    }

    fn output(&self) -> String {
        let out = std::fs::read_to_string(self.dir.join("dev.out")).unwrap_or_default();
        let err = std::fs::read_to_string(self.dir.join("dev.err")).unwrap_or_default();
        format!("stdout:\n{out}\nstderr:\n{err}")
    }

    /// Polls `/readyz` until 200; returns how long that took from `since`.
    fn wait_ready(&mut self, since: Instant, timeout: Duration) -> Duration {
        loop {
            if let Some((200, _)) = http("GET", &self.api("/readyz"), None) {
                return since.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("revsync dev exited ({status}):\n{}", self.output());
            }
            assert!(
                since.elapsed() < timeout,
                "revsync dev not ready after {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kafka.brokers` of the config `dev` wrote.
    fn written_brokers(&self) -> String {
        let path = self.dir.join("dev/revsync.toml");
        revsync::config::Config::load(&path, std::iter::empty())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .kafka
            .brokers
    }

    fn check(&self, token: &str) -> Value {
        let (status, body) = http("POST", &self.api("/v1/check"), Some(token)).expect("check");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Dev {
    /// SIGTERM, and waits for the clean exit (the store flushed).
    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "revsync dev ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One bash process, fed lines one at a time; each line's output is what it printed up
/// to a marker line echoed after it (with its exit status).
struct Shell {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const DONE: &str = "@@walkthrough-line-done";

impl Shell {
    fn start() -> Shell {
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("bash");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Shell {
            child,
            stdin,
            stdout,
        }
    }

    /// Runs `line`; returns (exit status, output).
    fn run(&mut self, line: &str) -> (i32, String) {
        writeln!(self.stdin, "{line}\nprintf '\\n{DONE} %s\\n' $?").unwrap();
        self.stdin.flush().unwrap();
        let mut output = String::new();
        loop {
            let mut l = String::new();
            assert!(
                self.stdout.read_line(&mut l).unwrap() > 0,
                "bash ended during: {line}"
            );
            if let Some(code) = l.trim_end().strip_prefix(DONE) {
                return (code.trim().parse().unwrap(), output.trim().to_string());
            }
            output.push_str(&l);
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The members a walkthrough line promises in its trailing comment (`… # {"active":true}`).
fn promise(line: &str) -> Option<serde_json::Map<String, Value>> {
    let (_, comment) = line.rsplit_once("# ")?;
    serde_json::from_str(comment.trim()).ok()
}

fn keeps(output: &str, promised: &serde_json::Map<String, Value>) -> bool {
    let Ok(Value::Object(got)) = serde_json::from_str::<Value>(output) else {
        return false;
    };
    promised.iter().all(|(k, v)| got.get(k) == Some(v))
}

#[test]
fn the_readme_walkthrough_works_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dev = Dev::start(tmp.path(), |c| {
        c.env("RUST_LOG", "warn");
    });
    dev.wait_ready(Instant::now(), Duration::from_secs(30));

    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let block = revsync::dev::walkthrough(&readme).expect("README has the walkthrough block");
    let brokers = dev.written_brokers();
    let lines: Vec<String> = block
        .iter()
        .map(|l| revsync::dev::localize(l, dev.port, dev.issuer_port, &brokers, BIN))
        .collect();
    assert!(
        lines.iter().filter(|l| promise(l).is_some()).count() >= 4,
        "the walkthrough checks too little: {lines:#?}"
    );
    for needed in [
        "/token",
        "/revoke?jti=",
        "/revoke?sub=",
        "/revoke?sid=",
        "publish",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(needed)),
            "the walkthrough never uses {needed}"
        );
    }
    let printed = std::fs::read_to_string(tmp.path().join("dev.out")).unwrap();
    for line in &lines {
        assert!(
            printed.contains(line.as_str()),
            "revsync dev does not print the README's line {line:?}:\n{printed}"
        );
    }

    let mut shell = Shell::start();
    for line in &lines {
        let promised = promise(line);
        // A revocation reaches the daemon through the broker a few milliseconds after the
        // issuer published it: a promised answer is awaited, not expected at once.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (code, output) = shell.run(line);
            assert_eq!(code, 0, "{line}\nexited {code}: {output}\n{}", dev.output());
            match &promised {
                None => break,
                Some(p) if keeps(&output, p) => break,
                Some(p) => assert!(
                    Instant::now() < deadline,
                    "{line}\npromises {p:?}, answered {output}"
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The machine of someone who was handed the binary: no cargo anywhere on `PATH`, an empty
/// `$HOME` (so no Tansu in its cache), nothing in the environment.
fn bare(cmd: &mut Command, home: &Path) {
    let path: Vec<PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .filter(|d| !d.join("cargo").exists() && !d.join("tansu").exists())
        .collect();
    cmd.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::join_paths(path).unwrap())
        .env("RUST_LOG", "warn");
}

#[test]
fn dev_needs_nothing_but_the_binary_and_publish_revokes_its_token() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let started = Instant::now();
    let mut dev = Dev::start(tmp.path(), |c| bare(c, &home));
    let ready = dev.wait_ready(started, Duration::from_secs(10));
    eprintln!("revsync dev: /readyz 200 {ready:?} after start");

    let brokers = dev.written_brokers();
    assert_eq!(brokers, format!("127.0.0.1:{}", dev.broker_port));
    let printed = std::fs::read_to_string(tmp.path().join("dev.out")).unwrap();
    assert!(
        printed.contains(&format!("broker  {brokers}")),
        "dev does not print its broker:\n{printed}"
    );

    let (status, token) = http(
        "GET",
        &format!("{}/token?sub=alice&jti=bare-1", dev.issuer()),
        None,
    )
    .expect("mint");
    assert_eq!(status, 200);
    let token = token.trim();
    assert_eq!(dev.check(token)["active"], true);

    let mut publish = Command::new(BIN);
    publish
        .args(["publish", "--brokers", &brokers, "token", "--iss"])
        .arg(dev.issuer())
        .args(["--jti", "bare-1"]);
    bare(&mut publish, &home);
    let out = publish.output().expect("run revsync publish");
    assert!(
        out.status.success(),
        "revsync publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = eventually(Duration::from_secs(10), "the token revoked", || {
        let a = dev.check(token);
        (a["active"] == false).then_some(a)
    });
    assert_eq!(answer["reason"], "revoked", "{answer}");
    assert_eq!(
        std::fs::read_dir(&home).unwrap().count(),
        0,
        "dev or publish wrote into $HOME"
    );
}

#[test]
fn a_second_run_in_the_same_dir_starts_with_an_empty_store() {
    let tmp = tempfile::tempdir().unwrap();
    let ports = (free_port(), free_port(), free_port());
    let quiet = |c: &mut Command| {
        c.env("RUST_LOG", "warn");
    };
    let mut first = Dev::start_on(tmp.path(), ports, quiet);
    first.wait_ready(Instant::now(), Duration::from_secs(30));
    let mint = |dev: &Dev| {
        let url = format!("{}/token?sub=alice&jti=again-1", dev.issuer());
        let (status, token) = http("GET", &url, None).expect("mint");
        assert_eq!(status, 200);
        token.trim().to_string()
    };
    let token = mint(&first);
    let url = format!("{}/revoke?jti=again-1", first.issuer());
    assert_eq!(http("POST", &url, None).expect("revoke").0, 200);
    eventually(Duration::from_secs(10), "the token revoked", || {
        (first.check(&token)["reason"] == "revoked").then_some(())
    });
    first.terminate();

    // Same ports, so the same issuer: the old revocation would cover the new token.
    let mut second = Dev::start_on(tmp.path(), ports, quiet);
    second.wait_ready(Instant::now(), Duration::from_secs(30));
    let answer = second.check(&mint(&second));
    assert_eq!(answer["active"], true, "{answer}");
}
