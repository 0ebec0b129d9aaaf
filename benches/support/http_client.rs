//! A minimal HTTP/1.1 keep-alive client over `std::net::TcpStream` and a load generator
//! on plain threads (closed loop, or paced), shared by the benches and tests/soak.rs (no
//! async runtime of its own, so it never competes with the server under test for a
//! runtime's workers). CPU clocks to pass it are in `host.rs`.
//!
//! Include with `#[path = "support/http_client.rs"] mod http_client;`.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One keep-alive connection. Answers must carry `Content-Length` or be chunked.
pub struct Client {
    stream: TcpStream,
    addr: SocketAddr,
    host: String,
    req: Vec<u8>,
    buf: Vec<u8>,
    /// Decoded body of a chunked answer.
    chunked: Vec<u8>,
    /// The server said `Connection: close`: reconnect before the next request.
    closed: bool,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            stream,
            addr,
            host: addr.to_string(),
            req: Vec::with_capacity(2048),
            buf: vec![0; 8192],
            chunked: Vec::new(),
            closed: false,
        })
    }

    /// A fresh connection to the same address (after an error, the old one may be out of
    /// step with the server).
    pub fn reconnect(&mut self) -> io::Result<()> {
        let stream = TcpStream::connect(self.addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        self.stream = stream;
        self.closed = false;
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// One request with `headers` (name, value) and `body` (Content-Length is added);
    /// returns the status and the (de-chunked) body.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<(u16, &[u8])> {
        if self.closed {
            self.reconnect()?;
        }
        self.req.clear();
        self.req.extend_from_slice(method.as_bytes());
        self.req.push(b' ');
        self.req.extend_from_slice(path.as_bytes());
        self.req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        self.req.extend_from_slice(self.host.as_bytes());
        for (name, value) in headers {
            self.req.extend_from_slice(b"\r\n");
            self.req.extend_from_slice(name.as_bytes());
            self.req.extend_from_slice(b": ");
            self.req.extend_from_slice(value.as_bytes());
        }
        self.req.extend_from_slice(b"\r\nContent-Length: ");
        self.req
            .extend_from_slice(body.len().to_string().as_bytes());
        self.req.extend_from_slice(b"\r\n\r\n");
        self.req.extend_from_slice(body);
        self.stream.write_all(&self.req)?;

        let mut filled = 0usize;
        let head_end = loop {
            let from = filled.saturating_sub(3);
            self.read_more(&mut filled)?;
            if let Some(p) = find(&self.buf[from..filled], b"\r\n\r\n") {
                break from + p + 4;
            }
        };
        let head = &self.buf[..head_end];
        if !head.starts_with(b"HTTP/1.1 ") || head.len() < 12 {
            return Err(bad("not an HTTP/1.1 answer"));
        }
        let status = std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| bad("no status code"))?;
        let mut length = None;
        let mut chunked = false;
        let mut close = false;
        for line in head.split(|b| *b == b'\n').skip(1) {
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            let (name, value) = line.split_at(colon);
            let value = std::str::from_utf8(&value[1..]).unwrap_or("").trim();
            if name.eq_ignore_ascii_case(b"content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case(b"connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        self.closed = close;
        if chunked {
            self.read_chunked(head_end, filled)?;
            return Ok((status, &self.chunked));
        }
        let len = length.ok_or_else(|| bad("answer without Content-Length"))?;
        let total = head_end + len;
        if self.buf.len() < total {
            self.buf.resize(total, 0);
        }
        while filled < total {
            let n = self.stream.read(&mut self.buf[filled..total])?;
            if n == 0 {
                return Err(bad("server closed the connection"));
            }
            filled += n;
        }
        if filled != total {
            return Err(bad("bytes after the answer"));
        }
        Ok((status, &self.buf[head_end..total]))
    }

    /// Reads at least one more byte into `buf[filled..]`, growing it when full.
    fn read_more(&mut self, filled: &mut usize) -> io::Result<()> {
        if *filled == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.buf[*filled..])?;
        if n == 0 {
            return Err(bad("server closed the connection"));
        }
        *filled += n;
        Ok(())
    }

    fn read_chunked(&mut self, mut at: usize, mut filled: usize) -> io::Result<()> {
        self.chunked.clear();
        loop {
            // The chunk-size line.
            let line_end = loop {
                if let Some(p) = find(&self.buf[at..filled], b"\r\n") {
                    break at + p;
                }
                self.read_more(&mut filled)?;
            };
            let size_text =
                std::str::from_utf8(&self.buf[at..line_end]).map_err(|_| bad("chunk size"))?;
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("chunk size"))?;
            at = line_end + 2;
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                loop {
                    if let Some(p) = find(&self.buf[at..filled], b"\r\n") {
                        if p == 0 {
                            return if at + 2 == filled {
                                Ok(())
                            } else {
                                Err(bad("bytes after the answer"))
                            };
                        }
                        at += p + 2;
                        continue;
                    }
                    self.read_more(&mut filled)?;
                }
            }
            while filled < at + size + 2 {
                self.read_more(&mut filled)?;
            }
            self.chunked.extend_from_slice(&self.buf[at..at + size]);
            at += size + 2;
        }
    }
}

/// What one request of a load run came to.
pub enum Step {
    Ok,
    /// A wrong answer or an I/O error; the connection is replaced before the next request.
    Err(String),
    /// Nothing left to send (a pool of single-use tokens ran out): the run ends for every
    /// client.
    Exhausted,
}

/// The outcome of one load run.
pub struct Load {
    pub concurrency: usize,
    /// Successful requests started inside the measured window.
    pub ok: usize,
    /// Failed requests started inside the measured window.
    pub errors: usize,
    /// Every request of the run, warm-up included (successful or not).
    pub issued: usize,
    pub first_error: Option<String>,
    pub window: Duration,
    /// Latencies of the measured successful requests, sorted, in ns.
    pub latencies_ns: Vec<u64>,
    /// Seconds into the measured window at which `Step::Exhausted` ended the run.
    pub exhausted_at: Option<f64>,
    /// What `server_cpu_ns` advanced by over the measured window, if given.
    pub server_cpu_ns: Option<u64>,
    /// CPU time of the client threads over the measured window, if `thread_cpu_ns` was
    /// given.
    pub client_cpu_ns: Option<u64>,
}

impl Load {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// The `p` quantile (0..=1) of the measured latencies, in µs.
    pub fn pct_us(&self, p: f64) -> f64 {
        percentile_us(&self.latencies_ns, p)
    }

    /// Server CPU per successful measured request, µs.
    pub fn server_cpu_us(&self) -> Option<f64> {
        self.per_request_us(self.server_cpu_ns)
    }

    /// Client CPU per successful measured request, µs.
    pub fn client_cpu_us(&self) -> Option<f64> {
        self.per_request_us(self.client_cpu_ns)
    }

    fn per_request_us(&self, ns: Option<u64>) -> Option<f64> {
        ns.filter(|_| self.ok > 0)
            .map(|ns| ns as f64 / 1000.0 / self.ok as f64)
    }
}

/// The `p` quantile of sorted nanoseconds, in µs (NaN when empty).
pub fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_ns.len() as f64 * p).ceil() as usize).clamp(1, sorted_ns.len()) - 1;
    sorted_ns[i] as f64 / 1000.0
}

/// How to run a load: `concurrency` client threads (named `{thread_prefix}{i}`), one
/// keep-alive connection each, calling a step function for `warmup` (not recorded) and
/// then `measure`.
pub struct LoadSpec<'a> {
    pub addr: SocketAddr,
    pub concurrency: usize,
    /// `None`: closed loop, each thread's requests back to back. `Some(rate)` (requests
    /// per second, all threads together): each thread starts its requests on a schedule,
    /// and a request's latency counts from its scheduled start, so a server that falls
    /// behind is charged for the queueing it causes (no coordinated omission).
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub measure: Duration,
    pub thread_prefix: &'a str,
    /// Read when the measured window starts and after it ends: [`Load::server_cpu_ns`].
    pub server_cpu_ns: Option<&'a (dyn Fn() -> u64 + Sync)>,
    /// The calling thread's CPU clock (ns), read by each client thread at its first
    /// measured request and when it stops: [`Load::client_cpu_ns`].
    pub thread_cpu_ns: Option<fn() -> u64>,
}

impl<'a> LoadSpec<'a> {
    /// A closed-loop run measuring no CPU time.
    pub fn new(
        addr: SocketAddr,
        concurrency: usize,
        warmup: Duration,
        measure: Duration,
        thread_prefix: &'a str,
    ) -> Self {
        LoadSpec {
            addr,
            concurrency,
            rate: None,
            warmup,
            measure,
            thread_prefix,
            server_cpu_ns: None,
            thread_cpu_ns: None,
        }
    }

    pub fn rate(self, rate: Option<f64>) -> Self {
        LoadSpec { rate, ..self }
    }

    pub fn server_cpu(self, server_cpu_ns: &'a (dyn Fn() -> u64 + Sync)) -> Self {
        LoadSpec {
            server_cpu_ns: Some(server_cpu_ns),
            ..self
        }
    }

    pub fn client_cpu(self, thread_cpu_ns: fn() -> u64) -> Self {
        LoadSpec {
            thread_cpu_ns: Some(thread_cpu_ns),
            ..self
        }
    }
}

/// Runs `spec`: each client thread calls `step(client, thread, n)` (n counts that thread's
/// requests), timed around the call.
pub fn run_load<F>(spec: &LoadSpec<'_>, step: &F) -> Load
where
    F: Fn(&mut Client, usize, u64) -> Step + Sync,
{
    let &LoadSpec {
        addr,
        concurrency,
        rate,
        warmup,
        measure,
        thread_prefix,
        server_cpu_ns,
        thread_cpu_ns,
    } = spec;
    // Per thread: the interval between its requests, and its offset, spreading the
    // threads' schedules evenly over one interval.
    let interval = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r.max(1e-9)));
    struct Out {
        latencies_ns: Vec<u64>,
        ok: usize,
        errors: usize,
        issued: usize,
        first_error: Option<String>,
        cpu_ns: Option<u64>,
    }
    let stop = AtomicBool::new(false);
    let exhausted: OnceLock<Instant> = OnceLock::new();
    let start = Instant::now();
    let measure_from = start + warmup;
    let deadline = measure_from + measure;
    let (outs, cpu) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..concurrency)
            .map(|i| {
                let (stop, exhausted) = (&stop, &exhausted);
                std::thread::Builder::new()
                    .name(format!("{thread_prefix}{i}"))
                    .spawn_scoped(s, move || {
                        let mut out = Out {
                            latencies_ns: Vec::with_capacity(1 << 16),
                            ok: 0,
                            errors: 0,
                            issued: 0,
                            first_error: None,
                            cpu_ns: None,
                        };
                        let mut cpu_from = None;
                        let mut client = None;
                        let mut n = 0u64;
                        loop {
                            let t0 = match interval {
                                None => Instant::now(),
                                Some(every) => {
                                    let due = start
                                        + every.mul_f64(n as f64 + i as f64 / concurrency as f64);
                                    std::thread::sleep(
                                        due.saturating_duration_since(Instant::now()),
                                    );
                                    due
                                }
                            };
                            if t0 >= deadline || stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let measured = t0 >= measure_from;
                            if measured && cpu_from.is_none() {
                                cpu_from = thread_cpu_ns.map(|f| f());
                            }
                            let c = match client.as_mut() {
                                Some(c) => c,
                                None => match Client::connect(addr) {
                                    Ok(c) => client.insert(c),
                                    Err(e) => {
                                        if measured {
                                            out.errors += 1;
                                        }
                                        out.first_error
                                            .get_or_insert_with(|| format!("connect: {e}"));
                                        std::thread::sleep(Duration::from_millis(10));
                                        continue;
                                    }
                                },
                            };
                            let result = step(c, i, n);
                            let elapsed = t0.elapsed();
                            n += 1;
                            match result {
                                Step::Ok => {
                                    out.issued += 1;
                                    if measured {
                                        out.ok += 1;
                                        out.latencies_ns.push(elapsed.as_nanos() as u64);
                                    }
                                }
                                Step::Err(e) => {
                                    out.issued += 1;
                                    if measured {
                                        out.errors += 1;
                                    }
                                    out.first_error.get_or_insert(e);
                                    client = None;
                                }
                                Step::Exhausted => {
                                    exhausted.get_or_init(Instant::now);
                                    stop.store(true, Ordering::Relaxed);
                                    break;
                                }
                            }
                        }
                        out.cpu_ns = cpu_from
                            .zip(thread_cpu_ns)
                            .map(|(from, f)| f().saturating_sub(from));
                        out
                    })
                    .expect("spawn client thread")
            })
            .collect();
        std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
        let cpu0 = server_cpu_ns.map(|f| f());
        let outs: Vec<Out> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect();
        let cpu = cpu0
            .zip(server_cpu_ns.map(|f| f()))
            .map(|(a, b)| b.saturating_sub(a));
        (outs, cpu)
    });
    let end = exhausted
        .get()
        .copied()
        .map_or(deadline, |t| t.min(deadline));
    let mut latencies_ns: Vec<u64> = outs
        .iter()
        .flat_map(|o| o.latencies_ns.iter().copied())
        .collect();
    latencies_ns.sort_unstable();
    Load {
        concurrency,
        ok: outs.iter().map(|o| o.ok).sum(),
        errors: outs.iter().map(|o| o.errors).sum(),
        issued: outs.iter().map(|o| o.issued).sum(),
        first_error: outs.iter().find_map(|o| o.first_error.clone()),
        window: end.saturating_duration_since(measure_from),
        latencies_ns,
        exhausted_at: exhausted
            .get()
            .map(|t| t.saturating_duration_since(measure_from).as_secs_f64()),
        server_cpu_ns: cpu,
        client_cpu_ns: thread_cpu_ns.map(|_| outs.iter().filter_map(|o| o.cpu_ns).sum()),
    }
}
