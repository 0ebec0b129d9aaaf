//! The brokers `revsync dev` can use: an embedded one (librdkafka's mock cluster, the
//! default: nothing to install), the pinned Tansu binary (`--tansu`), or one already
//! running (`--brokers`).

use std::ffi::{CStr, CString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::bindings as rd;
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::types::{RDKafkaMockCluster, RDKafkaType};
use rdkafka::ClientConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const TANSU_VERSION: &str = "0.6.0";

/// A Kafka-protocol broker inside this process: librdkafka's mock cluster (one broker),
/// reachable by any Kafka client on the machine at `127.0.0.1:<port>`. Its log lives in
/// memory and goes with the process; it keeps the last 100 000 records / 5 MiB of each
/// partition, plenty for a demo.
///
/// The mock binds its listener to a random loopback port and has no setting for it. So
/// the chosen port is a plain TCP relay to that listener, and the mock *advertises* the
/// chosen port in its metadata (`rd_kafka_mock_broker_set_host_port`): every client,
/// bootstrap and data connections alike, goes through `127.0.0.1:<port>`, as with a
/// broker listening there itself.
pub struct EmbeddedBroker {
    cluster: NonNull<RDKafkaMockCluster>,
    /// The librdkafka instance the mock cluster runs in; it must outlive the cluster.
    _handle: Client<DefaultClientContext>,
    addr: SocketAddr,
    /// Stops the relay; cancelled on drop, so the daemon's consumer (stopped before the
    /// broker) never sees the broker vanish under it.
    relay: CancellationToken,
}

// SAFETY: librdkafka's mock cluster API is thread-safe: control calls go through the
// cluster's op queue or take its lock, and the cluster has its own I/O thread.
unsafe impl Send for EmbeddedBroker {}
unsafe impl Sync for EmbeddedBroker {}

impl EmbeddedBroker {
    /// Listens on `listener`'s address and creates `topic` with `partitions` partitions;
    /// stops when dropped. Needs a tokio runtime (the relay is a task).
    pub fn start(listener: TcpListener, topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let config = ClientConfig::new();
        let handle = Client::new(
            &config,
            config.create_native_config()?,
            RDKafkaType::RD_KAFKA_PRODUCER,
            DefaultClientContext,
        )
        .context("creating the librdkafka instance of the embedded broker")?;
        // SAFETY: the handle is a live rd_kafka_t and is kept (in `_handle`) until the
        // cluster is destroyed in `drop`.
        let cluster = unsafe { rd::rd_kafka_mock_cluster_new(handle.native_ptr(), 1) };
        let cluster =
            NonNull::new(cluster).context("librdkafka could not start its mock cluster")?;
        let broker = EmbeddedBroker {
            cluster,
            _handle: handle,
            addr,
            relay: CancellationToken::new(),
        };
        let inner = broker.listener_addr()?;
        let host = CString::new(addr.ip().to_string())?;
        let topic_c = CString::new(topic)?;
        // SAFETY: `cluster` is live; the strings outlive the calls (librdkafka copies them).
        let err = unsafe {
            rd::rd_kafka_mock_broker_set_host_port(
                cluster.as_ptr(),
                1,
                host.as_ptr(),
                i32::from(addr.port()),
            );
            rd::rd_kafka_mock_topic_create(cluster.as_ptr(), topic_c.as_ptr(), partitions, 1)
        };
        let code = RDKafkaErrorCode::from(err);
        if code != RDKafkaErrorCode::NoError {
            bail!("creating topic {topic} on the embedded broker: {code}");
        }
        tokio::spawn(relay(listener, inner, broker.relay.clone()));
        Ok(broker)
    }

    /// `host:port` for clients.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Where the mock itself listens (its bootstrap list, computed when it started).
    fn listener_addr(&self) -> anyhow::Result<SocketAddr> {
        // SAFETY: `cluster` is live; the string is owned by the cluster and copied here.
        let list =
            unsafe { CStr::from_ptr(rd::rd_kafka_mock_cluster_bootstraps(self.cluster.as_ptr())) };
        let list = list.to_str()?;
        list.split(',')
            .next()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("unexpected mock bootstrap list {list:?}"))
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.relay.cancel();
        // SAFETY: created by rd_kafka_mock_cluster_new, destroyed once, before `_handle`.
        unsafe { rd::rd_kafka_mock_cluster_destroy(self.cluster.as_ptr()) };
    }
}

/// Relays every connection to `listener` to `to`, until `shutdown`.
async fn relay(listener: TcpListener, to: SocketAddr, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut client, _)) = accepted else {
            continue;
        };
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(to).await else {
                return;
            };
            // Revocations are small records that must arrive now, not with the next one.
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
            }
        });
    }
}

/// The pinned Tansu binary: `$REVSYNC_TANSU`, else the cache `.ci/run` installs into.
pub fn tansu_path() -> PathBuf {
    if let Some(p) = std::env::var_os("REVSYNC_TANSU") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(format!(".cache/revsync/tansu-{TANSU_VERSION}/bin/tansu"))
}

/// Tansu on `127.0.0.1:<port>` with an in-memory log and `topic` created; killed on drop.
pub async fn start_tansu(
    port: u16,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<tokio::process::Child> {
    let tansu = tansu_path();
    if !tansu.exists() {
        bail!(
            "--tansu: no Tansu at {} (set REVSYNC_TANSU, or install it once, ~20 min on 2 cores: \
             cargo install tansu --version {TANSU_VERSION} --locked --features dynostore,libsql \
             --root ~/.cache/revsync/tansu-{TANSU_VERSION}); without --tansu the embedded broker needs nothing",
            tansu.display()
        );
    }
    if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        bail!("port {port} is taken (another broker?); pass --broker-port");
    }
    let url = format!("tcp://127.0.0.1:{port}");
    let child = tokio::process::Command::new(&tansu)
        .args(["broker", "--listener-url", &url])
        .args(["--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", tansu.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("Tansu did not listen on port {port} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let created = tokio::process::Command::new(&tansu)
        .args(["topic", "create", topic, "--partitions"])
        .arg(partitions.to_string())
        .args(["--broker", &url])
        .env("RUST_LOG", "warn")
        .status()
        .await?;
    if !created.success() {
        bail!("creating the {topic} topic on Tansu failed");
    }
    Ok(child)
}
