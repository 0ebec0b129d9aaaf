//! One typed configuration: a TOML file, then `REVSYNC_<SECTION>__<KEY>` environment
//! overrides, then CLI flags (applied by the caller). Every key but the broker, the
//! issuers and their audiences has a default, named below as `DEFAULT_*` or `default_*`.
//!
//! Parsing takes the environment as an argument so tests never touch process env.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8181";
pub const DEFAULT_STORE_PATH: &str = "/var/lib/revsync";
pub const DEFAULT_BROKERS: &str = "localhost:9092";
/// Tansu holds a fetch for the whole `fetch.wait.max.ms` even when data is there, and
/// real Kafka answers as soon as data arrives; 10 ms keeps propagation in the
/// milliseconds on both at the cost of ~100 empty fetches/s per broker when idle.
pub const DEFAULT_FETCH_WAIT_MAX: Duration = Duration::from_millis(10);
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(30);
pub const ENV_PREFIX: &str = "REVSYNC_";

/// Keys whose values are secrets: redacted when the effective config is printed.
const SECRET_KEY_MARKERS: &[&str] = &["password", "secret", "sasl.oauthbearer.config", "key.pem"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(String),
    #[error("config: environment override {var}: {problem}")]
    Env { var: String, problem: String },
    #[error("config: {key}: {problem}")]
    Invalid { key: String, problem: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub store: StoreConfig,
    pub kafka: KafkaConfig,
    /// The issuers whose tokens are checked and whose revocations are kept. Required for
    /// `run` (at least one); events for other issuers are still stored.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    #[serde(default)]
    pub freshness: FreshnessConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The RFC 8935 push receiver for Security Event Tokens. Absent (the default): off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssf: Option<SsfConfig>,
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where the check API listens: `host:port` (loopback by default) or
    /// `unix:/path/to.sock`. Default `127.0.0.1:8181`. A TCP address other than loopback
    /// (127.0.0.0/8, ::1, `localhost`) needs `credential` or `credential_file`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The secret clients send as `X-Revsync-Credential` (and, on `/introspect` and
    /// `/metrics`, as `Authorization`) on every route but `/healthz` and `/readyz`,
    /// compared in constant time. At least 16 bytes; redacted when the config is printed
    /// (prefer `REVSYNC_HTTP__CREDENTIAL`, or `credential_file`). Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// A file holding the credential (a Kubernetes secret, say), read at start-up; one
    /// trailing newline is ignored. Not together with `credential`. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_file: Option<PathBuf>,
    /// Largest request body accepted, in bytes; larger bodies get 413. Default 16384.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How long shutdown waits for in-flight requests. Default `10s`.
    #[serde(default = "default_drain", with = "duration")]
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's headers; slower connections are
    /// closed (slowloris). Default `5s`.
    #[serde(default = "default_header_timeout", with = "duration")]
    pub header_read_timeout: Duration,
    /// Longest time from headers received to answer, body included; past it the answer
    /// is 408. Must exceed the JWKS and introspection timeouts. Default `15s`.
    #[serde(default = "default_request_timeout", with = "duration")]
    pub request_timeout: Duration,
    /// More `Host` values (`name` or `name:port`) a loopback listener without a credential
    /// answers on `/v1/status`, `/metrics`, `/introspect` and `/v1/check`, besides
    /// loopback names and addresses and `listen` itself; others get 421 (DNS rebinding
    /// guard, README "Security"). Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .field("credential_file", &self.credential_file)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("allowed_hosts", &self.allowed_hosts)
            .finish()
    }
}

/// The header that carries `http.credential` on every protected route.
pub const CREDENTIAL_HEADER: &str = "X-Revsync-Credential";
/// Shortest `http.credential` accepted.
pub const MIN_CREDENTIAL_BYTES: usize = 16;

impl HttpConfig {
    /// The credential clients must present: `credential`, or the content of
    /// `credential_file` without one trailing newline (read now), or none.
    pub fn credential(&self) -> Result<Option<String>, ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            key: key.to_string(),
            problem,
        };
        let (key, secret) = match (&self.credential, &self.credential_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "http.credential_file",
                    "set http.credential or http.credential_file, not both".into(),
                ))
            }
            (None, None) => return Ok(None),
            (Some(secret), None) => ("http.credential", secret.clone()),
            (None, Some(path)) => {
                let mut text = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        "http.credential_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                ("http.credential_file", text)
            }
        };
        let what = match &self.credential_file {
            Some(path) => format!("the credential in {}", path.display()),
            None => "the credential".to_string(),
        };
        if secret.len() < MIN_CREDENTIAL_BYTES {
            return Err(invalid(
                key,
                format!("{what} must be at least {MIN_CREDENTIAL_BYTES} bytes"),
            ));
        }
        // Sent in an HTTP header, where surrounding whitespace is stripped and control
        // characters are refused: such a credential could never match.
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                key,
                format!(
                    "{what} must be printable ASCII without spaces (it is sent in an HTTP header)"
                ),
            ));
        }
        Ok(Some(secret))
    }

    /// Whether a credential is configured (`credential` or `credential_file`).
    pub fn has_credential(&self) -> bool {
        self.credential.is_some() || self.credential_file.is_some()
    }

    /// Checks the credential keys, and that a listener reachable from elsewhere has one.
    fn validate(&self) -> Result<(), ConfigError> {
        self.credential()?;
        for (i, host) in self.allowed_hosts.iter().enumerate() {
            if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
                return Err(ConfigError::Invalid {
                    key: format!("http.allowed_hosts[{i}]"),
                    problem: "must be a host name or address, with an optional :port".into(),
                });
            }
        }
        if !self.has_credential() && !listen_is_local(&self.listen) {
            return Err(ConfigError::Invalid {
                key: "http.listen".into(),
                problem: format!(
                    "{} is not a loopback address: set http.credential or http.credential_file (clients send it in {CREDENTIAL_HEADER})",
                    self.listen
                ),
            });
        }
        Ok(())
    }

    /// `[http]` of the environment alone (`REVSYNC_HTTP__*`), every other key at its
    /// default: how the CLI finds the credential when it is given no config file.
    pub fn from_env<I>(env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let prefix = format!("{ENV_PREFIX}HTTP__");
        let mut doc = toml::Table::new();
        apply_env(
            &mut doc,
            env.into_iter().filter(|(k, _)| k.starts_with(&prefix)),
        )?;
        let http = doc
            .remove("http")
            .map(|t| t.try_into::<HttpConfig>())
            .transpose()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?
            .unwrap_or_default();
        http.credential()?;
        Ok(http)
    }
}

/// Whether `url` is `http://` (any case) with a host other than loopback. Anything not
/// `http://` is left to the fetch itself (which refuses schemes it cannot speak).
fn plain_http_elsewhere(url: &str) -> bool {
    let Some(rest) = url
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
        .map(|_| &url[7..])
    else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // userinfo@host:port
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let with_port = if host_port.ends_with(']') || !host_port.contains(':') {
        format!("{host_port}:80")
    } else {
        host_port.to_string()
    };
    // `listen_is_local` takes `unix:` as a socket path; here it is a host named `unix`.
    with_port.starts_with("unix:") || !listen_is_local(&with_port)
}

/// Whether `listen` (`host:port` or `unix:/path`) is reachable only from this host: a
/// Unix socket (file permissions guard it), a loopback address, or `localhost`. Any other
/// host name, and the unspecified addresses, count as reachable from elsewhere.
pub fn listen_is_local(listen: &str) -> bool {
    use std::net::{IpAddr, SocketAddr};
    if listen.starts_with("unix:") {
        return true;
    }
    let loopback = |ip: IpAddr| ip.to_canonical().is_loopback();
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return loopback(addr.ip());
    }
    let host = listen.rsplit_once(':').map_or(listen, |(host, _)| host);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match host.parse::<IpAddr>() {
        Ok(ip) => loopback(ip),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory of the sled denylist. Default `/var/lib/revsync`.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// How often entries that can no longer affect any token are dropped. Default `60s`.
    #[serde(default = "default_gc_interval", with = "duration")]
    pub gc_interval: Duration,
    /// sled page cache size in bytes. Default 256 MiB.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// Width of the expiry log's time buckets: an entry is dropped by the first GC after
    /// its bucket ends, so it outlives its expiry by at most this much. Smaller widths
    /// free space sooner and cost more writes per event. Default `10m`.
    #[serde(default = "default_expiry_granularity", with = "duration")]
    pub expiry_granularity: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma separated (librdkafka `bootstrap.servers`). Required.
    pub brokers: String,
    /// Topics to consume; every partition of each is read by every instance.
    #[serde(default = "default_topics")]
    pub topics: Vec<TopicConfig>,
    /// Passed to librdkafka as is (security.protocol, sasl.*, ssl.* …). Keys revsync
    /// manages itself (group/offset settings) are refused.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka `fetch.wait.max.ms`: how long the broker may hold a fetch. Default `10ms`.
    #[serde(default = "default_fetch_wait", with = "duration")]
    pub fetch_wait_max: Duration,
    /// Most records applied in one atomic store write. Default 10000.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// How often the high watermarks are fetched to measure lag. Default `1s`.
    #[serde(default = "default_watermark_interval", with = "duration")]
    pub watermark_interval: Duration,
    /// How often topic metadata is re-read to pick up added partitions. Default `10s`.
    #[serde(default = "default_metadata_interval", with = "duration")]
    pub metadata_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Topic name.
    pub name: String,
    /// Wire format of the records: `native` (default), `set`, `keycloak`.
    #[serde(default)]
    pub format: EventFormat,
    /// `keycloak`: the realm's issuer, to which every event is attributed (its events
    /// carry none); required. `set`: when given, the only issuer whose SETs this topic
    /// accepts (it must be one of `[[issuers]]`). Default none.
    #[serde(default)]
    pub issuer: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    #[default]
    Native,
    Set,
    Keycloak,
}

impl EventFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            EventFormat::Native => "native",
            EventFormat::Set => "set",
            EventFormat::Keycloak => "keycloak",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The issuer identifier, exactly as in tokens' `iss`. Required.
    pub issuer: String,
    /// JWKS location. Default: `jwks_uri` from `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Accepted `aud` values; a token must carry at least one. Required, non-empty.
    pub audiences: Vec<String>,
    /// Accepted signature algorithms. Default `["RS256", "ES256"]`. Never `none` or HS*.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Longest lifetime of this issuer's tokens: bounds how long subject, client,
    /// session and issuer entries are kept. Default `24h`.
    #[serde(default = "default_max_token_lifetime", with = "duration")]
    pub max_token_lifetime: Duration,
    /// `true`: RFC 9068, the header `typ` must be `at+jwt`. Default false.
    #[serde(default)]
    pub require_typ: bool,
    /// Clock skew allowed on `exp`/`nbf`. Default `30s`.
    #[serde(default = "default_leeway", with = "duration")]
    pub leeway: Duration,
    /// Claims a token must carry besides `exp`, `iss`, `aud`. Default none.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// RFC 7662 endpoint asked when the denylist is stale and `on_stale = "introspect"`.
    /// Default none.
    #[serde(default)]
    pub introspection: Option<IntrospectionConfig>,
    /// How often the JWKS is re-fetched. Default `5m`.
    #[serde(default = "default_jwks_refresh", with = "duration")]
    pub jwks_refresh: Duration,
    /// Least time between two fetches triggered by unknown `kid`s. Default `10s`.
    #[serde(default = "default_jwks_min_refetch", with = "duration")]
    pub jwks_min_refetch: Duration,
    /// Longest a JWKS or discovery fetch may take; a slower server counts as a failed
    /// fetch (the last good keys keep serving). Default `5s`.
    #[serde(default = "default_jwks_timeout", with = "duration")]
    pub jwks_timeout: Duration,
    /// `true`: `issuer`, `jwks_uri` and `introspection.endpoint` may be plain `http://`
    /// URLs on other hosts. Default false: they must be `https://` unless their host is
    /// loopback, since keys or introspection answers fetched in clear text can be forged
    /// by anyone on the path.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnStale {
    #[default]
    Deny,
    Allow,
    Introspect,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FreshnessConfig {
    /// How long since the last confirmed catch-up before the denylist counts as stale.
    /// Default `30s`.
    #[serde(default = "default_max_staleness", with = "duration")]
    pub max_staleness: Duration,
    /// What a check does when stale: `deny` (default), `allow`, `introspect`.
    #[serde(default)]
    pub on_stale: OnStale,
    /// `introspect`: how long one RFC 7662 call may take before the check falls back to
    /// `deny`. Default `2s`.
    #[serde(default = "default_introspection_timeout", with = "duration")]
    pub introspection_timeout: Duration,
    /// `introspect`: how long an introspection answer is reused for the same token;
    /// never longer than `max_staleness`. Default `5s`.
    #[serde(default = "default_introspection_cache_ttl", with = "duration")]
    pub introspection_cache_ttl: Duration,
    /// When set, every configured issuer must also have published a heartbeat
    /// (`revsync publish heartbeat`) within this long, or the denylist counts as stale:
    /// proof that the publisher itself is alive, not just the broker. Default none.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub heartbeat_max_age: Option<Duration>,
}

/// An issuer's RFC 7662 introspection endpoint, used only under `on_stale = "introspect"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// The endpoint URL. Required.
    pub endpoint: String,
    /// Client credentials (HTTP Basic, RFC 7662 §2.1). Required.
    pub client_id: String,
    /// Redacted when the config is printed.
    pub client_secret: String,
}

/// The RFC 8935 push receiver (`[ssf]`): a transmitter POSTs `application/secevent+jwt`
/// to `path` on `listen` with `Authorization: Bearer <bearer_secret>`. SETs are verified
/// against the JWKS of `[[issuers]]` (the transmitter's issuer must be one of them).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SsfConfig {
    /// Where the receiver listens: `host:port` or `unix:/path`. Transmitters are usually
    /// remote: bind a routable address behind TLS termination. Default `127.0.0.1:8182`.
    #[serde(default = "default_ssf_listen")]
    pub listen: String,
    /// The route transmitters POST to. Default `/ssf/events`.
    #[serde(default = "default_ssf_path")]
    pub path: String,
    /// The secret transmitters send as `Authorization: Bearer …`, compared in constant
    /// time. Required, at least 16 bytes; redacted when the config is printed (prefer
    /// `REVSYNC_SSF__BEARER_SECRET`).
    pub bearer_secret: String,
    /// When given, a SET's `aud` must name it (else `invalid_audience`). Default none.
    #[serde(default)]
    pub audience: Option<String>,
    /// When given, the only SET issuer accepted (else `invalid_issuer`); it must be one of
    /// `[[issuers]]`. Default none: any configured issuer.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Bridge mode: republish each verified event to this Kafka topic as a native v1 event
    /// (acknowledged by the broker before the 202), so one receiver feeds every revsync
    /// reading that topic. Default none: apply to this instance's denylist directly.
    #[serde(default)]
    pub bridge_topic: Option<String>,
    /// Largest request body accepted, in bytes; larger bodies get 413. Default 65536.
    #[serde(default = "default_ssf_max_body")]
    pub max_body_bytes: usize,
}

impl std::fmt::Debug for SsfConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SsfConfig")
            .field("listen", &self.listen)
            .field("path", &self.path)
            .field("bearer_secret", &"<redacted>")
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("bridge_topic", &self.bridge_topic)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

impl SsfConfig {
    /// A receiver with `bearer_secret`, every other key at its default.
    pub fn new(bearer_secret: impl Into<String>) -> Self {
        Self {
            listen: default_ssf_listen(),
            path: default_ssf_path(),
            bearer_secret: bearer_secret.into(),
            audience: None,
            issuer: None,
            bridge_topic: None,
            max_body_bytes: default_ssf_max_body(),
        }
    }
}

pub const DEFAULT_SSF_LISTEN: &str = "127.0.0.1:8182";
pub const DEFAULT_SSF_PATH: &str = "/ssf/events";
/// Shortest bearer secret accepted for the push receiver.
pub const MIN_SSF_SECRET_BYTES: usize = 16;

fn default_ssf_listen() -> String {
    DEFAULT_SSF_LISTEN.to_string()
}
fn default_ssf_path() -> String {
    DEFAULT_SSF_PATH.to_string()
}
fn default_ssf_max_body() -> usize {
    64 * 1024
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `true`: JSON log lines; default human-readable text. Level comes from `RUST_LOG`.
    #[serde(default)]
    pub json: bool,
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}
fn default_max_body() -> usize {
    16 * 1024
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_store_path() -> PathBuf {
    PathBuf::from(DEFAULT_STORE_PATH)
}
fn default_expiry_granularity() -> Duration {
    crate::denylist::DEFAULT_EXPIRY_BUCKET
}
fn default_gc_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_cache_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_topics() -> Vec<TopicConfig> {
    vec![TopicConfig {
        name: "revocations".into(),
        format: EventFormat::Native,
        issuer: None,
    }]
}
fn default_fetch_wait() -> Duration {
    DEFAULT_FETCH_WAIT_MAX
}
fn default_batch_max() -> usize {
    10_000
}
fn default_watermark_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_metadata_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}
fn default_max_token_lifetime() -> Duration {
    DEFAULT_MAX_TOKEN_LIFETIME
}
fn default_leeway() -> Duration {
    DEFAULT_LEEWAY
}
fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_jwks_min_refetch() -> Duration {
    Duration::from_secs(10)
}
fn default_jwks_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_staleness() -> Duration {
    DEFAULT_MAX_STALENESS
}
fn default_introspection_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_introspection_cache_ttl() -> Duration {
    Duration::from_secs(5)
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            credential: None,
            credential_file: None,
            max_body_bytes: default_max_body(),
            shutdown_grace: default_drain(),
            header_read_timeout: default_header_timeout(),
            request_timeout: default_request_timeout(),
            allowed_hosts: Vec::new(),
        }
    }
}
impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: default_store_path(),
            gc_interval: default_gc_interval(),
            expiry_granularity: default_expiry_granularity(),
            cache_bytes: default_cache_bytes(),
        }
    }
}
impl Default for FreshnessConfig {
    fn default() -> Self {
        Self {
            max_staleness: default_max_staleness(),
            on_stale: OnStale::default(),
            introspection_timeout: default_introspection_timeout(),
            introspection_cache_ttl: default_introspection_cache_ttl(),
            heartbeat_max_age: None,
        }
    }
}

impl KafkaConfig {
    /// A config for `brokers` with every other key at its default.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topics: default_topics(),
            properties: BTreeMap::new(),
            fetch_wait_max: default_fetch_wait(),
            batch_max: default_batch_max(),
            watermark_interval: default_watermark_interval(),
            metadata_interval: default_metadata_interval(),
        }
    }
}

impl IssuerConfig {
    /// An issuer accepting `audience`, every other key at its default.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            jwks_uri: None,
            audiences: vec![audience.into()],
            algorithms: default_algorithms(),
            max_token_lifetime: default_max_token_lifetime(),
            require_typ: false,
            leeway: default_leeway(),
            required_claims: Vec::new(),
            introspection: None,
            jwks_refresh: default_jwks_refresh(),
            jwks_min_refetch: default_jwks_min_refetch(),
            jwks_timeout: default_jwks_timeout(),
            allow_http: false,
        }
    }
}

impl Config {
    /// A config for `brokers` and a store at `path`, every other key at its default.
    pub fn new(brokers: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            http: HttpConfig::default(),
            store: StoreConfig {
                path: path.into(),
                ..StoreConfig::default()
            },
            kafka: KafkaConfig::new(brokers),
            issuers: Vec::new(),
            freshness: FreshnessConfig::default(),
            log: LogConfig::default(),
            ssf: None,
        }
    }

    /// Reads `path` and applies overrides from `env` (pairs of name and value).
    pub fn load<I>(path: &Path, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, env)
    }

    /// Parses TOML `text` and applies overrides from `env`.
    pub fn parse<I>(text: &str, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        apply_env(&mut doc, env)?;
        let config: Config = doc
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: relations between keys and value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: &str| {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                problem: problem.to_string(),
            })
        };
        self.http.validate()?;
        self.require_https()?;
        if self.kafka.brokers.trim().is_empty() {
            return invalid("kafka.brokers", "must name at least one broker");
        }
        if self.kafka.topics.is_empty() {
            return invalid("kafka.topics", "must name at least one topic");
        }
        let granularity = self.store.expiry_granularity;
        if granularity < Duration::from_secs(1) || granularity > Duration::from_secs(86400) {
            return invalid("store.expiry_granularity", "must be between 1s and 24h");
        }
        if self.kafka.batch_max == 0 {
            return invalid("kafka.batch_max", "must be at least 1");
        }
        // A partition added to a topic is read from the next metadata refresh on; until
        // then watermark rounds vouch without it. Within max_staleness it must be seen.
        if self.kafka.metadata_interval >= self.freshness.max_staleness {
            return invalid(
                "kafka.metadata_interval",
                "must be shorter than freshness.max_staleness (a partition added later is read only from the next metadata refresh on)",
            );
        }
        for (i, t) in self.kafka.topics.iter().enumerate() {
            if t.name.is_empty() {
                return invalid(&format!("kafka.topics[{i}].name"), "must not be empty");
            }
            if t.format == EventFormat::Keycloak && t.issuer.is_none() {
                return invalid(
                    &format!("kafka.topics[{i}].issuer"),
                    "required for format = \"keycloak\" (its events carry no issuer)",
                );
            }
            if t.format == EventFormat::Set {
                if self.issuers.is_empty() {
                    return invalid(
                        &format!("kafka.topics[{i}].format"),
                        "\"set\" needs [[issuers]]: SETs are verified with their issuer's JWKS",
                    );
                }
                if let Some(iss) = &t.issuer {
                    if self.issuer(iss).is_none() {
                        return invalid(
                            &format!("kafka.topics[{i}].issuer"),
                            "must be one of [[issuers]] (its JWKS verifies the SETs)",
                        );
                    }
                }
            }
        }
        if let Some(ssf) = &self.ssf {
            if ssf.bearer_secret.len() < MIN_SSF_SECRET_BYTES {
                return invalid(
                    "ssf.bearer_secret",
                    &format!("must be at least {MIN_SSF_SECRET_BYTES} bytes"),
                );
            }
            if !ssf.path.starts_with('/') {
                return invalid("ssf.path", "must start with /");
            }
            if ssf.listen.trim().is_empty() {
                return invalid("ssf.listen", "must not be empty");
            }
            if self.issuers.is_empty() {
                return invalid(
                    "ssf",
                    "the receiver needs [[issuers]]: SETs are verified with their issuer's JWKS",
                );
            }
            if let Some(iss) = &ssf.issuer {
                if self.issuer(iss).is_none() {
                    return invalid("ssf.issuer", "must be one of [[issuers]]");
                }
            }
            if ssf.bridge_topic.as_ref().is_some_and(|t| t.is_empty()) {
                return invalid("ssf.bridge_topic", "must not be empty");
            }
        }
        for key in self.kafka.properties.keys() {
            if MANAGED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                return invalid(
                    &format!("kafka.properties.{key}"),
                    "is managed by revsync (it assigns every partition itself and keeps positions in its store)",
                );
            }
        }
        for (i, iss) in self.issuers.iter().enumerate() {
            if iss.issuer.is_empty() {
                return invalid(&format!("issuers[{i}].issuer"), "must not be empty");
            }
            // Two entries would each set audiences, keys and lifetimes for the same tokens;
            // which one wins is never guessed.
            if self.issuers[..i]
                .iter()
                .any(|other| other.issuer == iss.issuer)
            {
                return invalid(
                    &format!("issuers[{i}].issuer"),
                    &format!("{:?} is configured twice; merge the entries", iss.issuer),
                );
            }
            if iss.audiences.is_empty() {
                return invalid(
                    &format!("issuers[{i}].audiences"),
                    "must name at least one audience",
                );
            }
            if self.freshness.on_stale == OnStale::Introspect && iss.introspection.is_none() {
                return invalid(
                    &format!("issuers[{i}].introspection"),
                    "required when freshness.on_stale = \"introspect\" (endpoint, client_id, client_secret)",
                );
            }
            if iss.jwks_timeout.is_zero() || iss.jwks_timeout >= self.http.request_timeout {
                return invalid(
                    &format!("issuers[{i}].jwks_timeout"),
                    "must be above zero and below http.request_timeout (a check waiting for a key fetch must still be answered)",
                );
            }
            for alg in &iss.algorithms {
                if !ASYMMETRIC_ALGORITHMS.contains(&alg.as_str()) {
                    return invalid(
                        &format!("issuers[{i}].algorithms"),
                        &format!(
                            "{alg:?} is not allowed; use one of {}",
                            ASYMMETRIC_ALGORITHMS.join(", ")
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// Every URL revsync fetches keys or answers from is `https://`, or on a loopback
    /// host, or its issuer says `allow_http = true`. An issuer identifier that is not an
    /// `http://` URL (a URN, say) is only ever compared, never fetched.
    fn require_https(&self) -> Result<(), ConfigError> {
        for (i, iss) in self.issuers.iter().enumerate() {
            if iss.allow_http {
                continue;
            }
            let urls = [
                ("issuer", Some(&iss.issuer)),
                ("jwks_uri", iss.jwks_uri.as_ref()),
                (
                    "introspection.endpoint",
                    iss.introspection.as_ref().map(|x| &x.endpoint),
                ),
            ];
            for (key, url) in urls {
                let Some(url) = url else { continue };
                if plain_http_elsewhere(url) {
                    return Err(ConfigError::Invalid {
                        key: format!("issuers[{i}].{key}"),
                        problem: format!(
                            "{url} is plain http on a non-loopback host: use https, or set issuers[{i}].allow_http = true"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// The issuer's config, if `iss` is configured.
    pub fn issuer(&self, iss: &str) -> Option<&IssuerConfig> {
        self.issuers.iter().find(|i| i.issuer == iss)
    }

    /// The effective config as TOML, with secret values replaced by `"<redacted>"`.
    pub fn to_redacted_toml(&self) -> String {
        let mut copy = self.clone();
        for i in copy.issuers.iter_mut() {
            if let Some(x) = i.introspection.as_mut() {
                x.client_secret = "<redacted>".into();
            }
        }
        if let Some(ssf) = copy.ssf.as_mut() {
            ssf.bearer_secret = "<redacted>".into();
        }
        if let Some(credential) = copy.http.credential.as_mut() {
            *credential = "<redacted>".into();
        }
        for (k, v) in copy.kafka.properties.iter_mut() {
            if SECRET_KEY_MARKERS.iter().any(|m| k.contains(m)) {
                *v = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// librdkafka keys revsync sets itself; letting users override them would break
/// invariants 2 and 3 (positions live in sled; every instance reads every partition).
const MANAGED_KAFKA_PROPERTIES: &[&str] = &[
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "bootstrap.servers",
];

/// Signature algorithms a JWKS key may be used with. HMAC is absent on purpose: a
/// JWKS holds public keys, and HS* with a public key is the classic key-confusion attack.
pub const ASYMMETRIC_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// Keys whose environment values are always strings, never read as TOML.
const VERBATIM_ENV_KEYS: &[&str] = &[
    "http.credential",
    "http.credential_file",
    "ssf.bearer_secret",
];

/// Whether the value of the key at `path` is taken as a string whatever it looks like:
/// secrets, and librdkafka properties (all strings to librdkafka: a numeric
/// `sasl.password` must not turn into a TOML integer).
fn verbatim_env_key(path: &str) -> bool {
    VERBATIM_ENV_KEYS.contains(&path) || path.starts_with("kafka.properties.")
}

/// Applies `REVSYNC_<SECTION>__<KEY>` (and deeper `__` paths) to the parsed document.
/// Values are read as TOML when they parse as a TOML value (`true`, `42`, `["a"]`),
/// otherwise as a plain string.
fn apply_env<I>(doc: &mut toml::Table, env: I) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    for (var, value) in env {
        let Some(path) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if path == "CONFIG" || !path.contains("__") {
            continue;
        }
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(|k| k.is_empty()) {
            return Err(ConfigError::Env {
                var,
                problem: "empty key in path".into(),
            });
        }
        // A secret is a string whatever it looks like (all digits, say).
        let parsed = if verbatim_env_key(&keys.join(".")) {
            toml::Value::String(value)
        } else {
            parse_env_value(&value)
        };
        let mut table = &mut *doc;
        for key in &keys[..keys.len() - 1] {
            let entry = table
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Env {
                        var: var.clone(),
                        problem: format!("{key} is not a section"),
                    })
                }
            };
        }
        table.insert(keys[keys.len() - 1].clone(), parsed);
    }
    Ok(())
}

fn parse_env_value(value: &str) -> toml::Value {
    let probe = format!("v = {value}");
    match probe.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| value.into()),
        Err(_) => toml::Value::String(value.to_string()),
    }
}

/// Durations as human strings (`30s`, `5m`, `24h`, `250ms`).
pub mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {e} (use e.g. \"30s\", \"5m\", \"24h\")"
            ))
        })
    }
}

/// Optional durations: absent, or a human string.
pub mod opt_duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        duration::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"

[[issuers]]
issuer = "https://as.example.com"
audiences = ["https://api.example.com"]
"#;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn partitions_added_later_are_seen_within_max_staleness() {
        let text = format!("{MINIMAL}\n[freshness]\nmax_staleness = \"5s\"\n");
        let err = Config::parse(&text, no_env()).unwrap_err().to_string();
        assert!(err.contains("kafka.metadata_interval"), "{err}");
        let ok = format!("{MINIMAL}\n[freshness]\nmax_staleness = \"5s\"\n")
            .replace("[kafka]\n", "[kafka]\nmetadata_interval = \"2s\"\n");
        Config::parse(&ok, no_env()).unwrap();
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MINIMAL, no_env()).unwrap();
        assert_eq!(c.http.listen, DEFAULT_LISTEN);
        assert_eq!(c.store.path, PathBuf::from(DEFAULT_STORE_PATH));
        assert_eq!(c.kafka.topics.len(), 1);
        assert_eq!(c.kafka.topics[0].name, "revocations");
        assert_eq!(c.kafka.fetch_wait_max, Duration::from_millis(10));
        assert_eq!(c.issuers[0].max_token_lifetime, Duration::from_secs(86400));
        assert_eq!(c.issuers[0].leeway, Duration::from_secs(30));
        assert_eq!(c.freshness.on_stale, OnStale::Deny);
    }

    #[test]
    fn an_issuer_configured_twice_is_refused_by_name() {
        let text = format!(
            "{MINIMAL}\n[[issuers]]\nissuer = \"https://as.example.com\"\naudiences = [\"https://other.example.com\"]\n"
        );
        let err = Config::parse(&text, no_env()).unwrap_err().to_string();
        assert!(err.contains("issuers[1].issuer"), "{err}");
        assert!(err.contains("https://as.example.com"), "{err}");
        let other = text.replace(
            "issuer = \"https://as.example.com\"\naudiences = [\"https://other",
            "issuer = \"https://as2.example.com\"\naudiences = [\"https://other",
        );
        assert!(Config::parse(&other, no_env()).is_ok());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let text = format!("{MINIMAL}\n[store]\npaht = \"/x\"\n");
        let err = Config::parse(&text, no_env()).unwrap_err().to_string();
        assert!(err.contains("paht"), "{err}");
    }

    #[test]
    fn heartbeat_max_age_is_optional() {
        assert_eq!(
            Config::parse(MINIMAL, no_env())
                .unwrap()
                .freshness
                .heartbeat_max_age,
            None
        );
        let text = format!("{MINIMAL}\n[freshness]\nheartbeat_max_age = \"1m\"\n");
        let c = Config::parse(&text, no_env()).unwrap();
        assert_eq!(c.freshness.heartbeat_max_age, Some(Duration::from_secs(60)));
        assert_eq!(Config::parse(&c.to_redacted_toml(), no_env()).unwrap(), c);
    }

    #[test]
    fn durations_parse_and_bad_ones_are_named() {
        let text = format!("{MINIMAL}\n[freshness]\nmax_staleness = \"5m\"\n");
        let c = Config::parse(&text, no_env()).unwrap();
        assert_eq!(c.freshness.max_staleness, Duration::from_secs(300));
        let text = format!("{MINIMAL}\n[freshness]\nmax_staleness = \"soon\"\n");
        let err = Config::parse(&text, no_env()).unwrap_err().to_string();
        assert!(
            err.contains("soon") && err.contains("max_staleness"),
            "{err}"
        );
    }

    #[test]
    fn jwks_timeout_must_fit_inside_the_request_timeout() {
        let c = Config::parse(MINIMAL, no_env()).unwrap();
        assert_eq!(c.issuers[0].jwks_timeout, Duration::from_secs(5));
        let text = MINIMAL.replace("audiences =", "jwks_timeout = \"2s\"\naudiences =");
        let c = Config::parse(&text, no_env()).unwrap();
        assert_eq!(c.issuers[0].jwks_timeout, Duration::from_secs(2));
        for bad in ["0s", "15s", "1m"] {
            let text = MINIMAL.replace(
                "audiences =",
                &format!("jwks_timeout = \"{bad}\"\naudiences ="),
            );
            let err = Config::parse(&text, no_env()).unwrap_err().to_string();
            assert!(err.contains("issuers[0].jwks_timeout"), "{bad}: {err}");
        }
    }

    #[test]
    fn env_overrides_replace_file_values() {
        let env = vec![
            (
                "REVSYNC_KAFKA__BROKERS".to_string(),
                "b1:9092,b2:9092".to_string(),
            ),
            (
                "REVSYNC_HTTP__MAX_BODY_BYTES".to_string(),
                "1024".to_string(),
            ),
            ("REVSYNC_STORE__PATH".to_string(), "/tmp/x".to_string()),
            (
                "REVSYNC_FRESHNESS__ON_STALE".to_string(),
                "allow".to_string(),
            ),
            ("UNRELATED".to_string(), "1".to_string()),
        ];
        let c = Config::parse(MINIMAL, env).unwrap();
        assert_eq!(c.kafka.brokers, "b1:9092,b2:9092");
        assert_eq!(c.http.max_body_bytes, 1024);
        assert_eq!(c.store.path, PathBuf::from("/tmp/x"));
        assert_eq!(c.freshness.on_stale, OnStale::Allow);
    }

    #[test]
    fn env_override_of_unknown_key_is_refused() {
        let env = vec![("REVSYNC_STORE__NOPE".to_string(), "1".to_string())];
        let err = Config::parse(MINIMAL, env).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn hmac_and_none_algorithms_are_refused() {
        for alg in ["HS256", "none"] {
            let text = MINIMAL.replace(
                "audiences = [",
                &format!("algorithms = [\"{alg}\"]\naudiences = ["),
            );
            let err = Config::parse(&text, no_env()).unwrap_err().to_string();
            assert!(err.contains("issuers[0].algorithms"), "{err}");
        }
    }

    #[test]
    fn managed_kafka_properties_are_refused() {
        let text = format!("{MINIMAL}\n[kafka.properties]\n\"group.id\" = \"g\"\n");
        let err = Config::parse(&text, no_env()).unwrap_err().to_string();
        assert!(err.contains("group.id"), "{err}");
    }

    #[test]
    fn keycloak_topics_need_an_issuer() {
        let text = MINIMAL.replace(
            "[kafka]\nbrokers = \"127.0.0.1:9092\"\n",
            "[kafka]\nbrokers = \"127.0.0.1:9092\"\n[[kafka.topics]]\nname = \"kc\"\nformat = \"keycloak\"\n",
        );
        let err = Config::parse(&text, no_env()).unwrap_err().to_string();
        assert!(err.contains("kafka.topics[0].issuer"), "{err}");
    }

    #[test]
    fn introspect_policy_needs_every_issuers_endpoint_and_hides_its_secret() {
        let text = format!("{MINIMAL}\n[freshness]\non_stale = \"introspect\"\n");
        let err = Config::parse(&text, no_env()).unwrap_err().to_string();
        assert!(err.contains("issuers[0].introspection"), "{err}");
        let text = format!(
            "{MINIMAL}[issuers.introspection]\nendpoint = \"https://as/introspect\"\nclient_id = \"rs\"\nclient_secret = \"s3cret\"\n\n[freshness]\non_stale = \"introspect\"\n"
        );
        let c = Config::parse(&text, no_env()).unwrap();
        assert_eq!(c.issuers[0].introspection.as_ref().unwrap().client_id, "rs");
        assert!(!c.to_redacted_toml().contains("s3cret"));
    }

    #[test]
    fn every_format_is_accepted_and_set_topics_need_a_known_issuer() {
        let topics = |extra: &str| {
            MINIMAL.replace(
                "[kafka]\nbrokers = \"127.0.0.1:9092\"\n",
                &format!("[kafka]\nbrokers = \"127.0.0.1:9092\"\n[[kafka.topics]]\nname = \"t\"\n{extra}\n"),
            )
        };
        for extra in [
            "format = \"native\"",
            "format = \"set\"",
            "format = \"set\"\nissuer = \"https://as.example.com\"",
            "format = \"keycloak\"\nissuer = \"https://kc/realms/x\"",
        ] {
            Config::parse(&topics(extra), no_env()).unwrap_or_else(|e| panic!("{extra}: {e}"));
        }
        let err = Config::parse(
            &topics("format = \"set\"\nissuer = \"https://other\""),
            no_env(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("kafka.topics[0].issuer"), "{err}");
        let no_issuers = topics("format = \"set\"");
        let no_issuers = &no_issuers[..no_issuers.find("[[issuers]]").unwrap()];
        let err = Config::parse(no_issuers, no_env()).unwrap_err().to_string();
        assert!(err.contains("kafka.topics[0].format"), "{err}");
    }

    #[test]
    fn ssf_receiver_has_documented_defaults_and_a_hidden_secret() {
        let text = format!("{MINIMAL}\n[ssf]\nbearer_secret = \"0123456789abcdef-secret\"\n");
        let c = Config::parse(&text, no_env()).unwrap();
        let ssf = c.ssf.as_ref().unwrap();
        assert_eq!(ssf.listen, DEFAULT_SSF_LISTEN);
        assert_eq!(ssf.path, DEFAULT_SSF_PATH);
        assert_eq!(ssf.max_body_bytes, 65536);
        assert_eq!(
            (
                ssf.audience.as_deref(),
                ssf.issuer.as_deref(),
                ssf.bridge_topic.as_deref()
            ),
            (None, None, None)
        );
        assert!(!c.to_redacted_toml().contains("0123456789abcdef-secret"));
        assert!(!format!("{c:?}").contains("0123456789abcdef-secret"));
        assert!(
            Config::parse(MINIMAL, no_env()).unwrap().ssf.is_none(),
            "off by default"
        );
        // Env overrides reach it (and can enable it).
        let env = vec![(
            "REVSYNC_SSF__BEARER_SECRET".to_string(),
            "from-the-environment-1".to_string(),
        )];
        assert_eq!(
            Config::parse(MINIMAL, env)
                .unwrap()
                .ssf
                .unwrap()
                .bearer_secret,
            "from-the-environment-1"
        );
        for (bad, key) in [
            ("bearer_secret = \"short\"", "ssf.bearer_secret"),
            (
                "bearer_secret = \"0123456789abcdef\"\npath = \"events\"",
                "ssf.path",
            ),
            (
                "bearer_secret = \"0123456789abcdef\"\nissuer = \"https://nope\"",
                "ssf.issuer",
            ),
            (
                "bearer_secret = \"0123456789abcdef\"\nbridge_topic = \"\"",
                "ssf.bridge_topic",
            ),
            (
                "bearer_secret = \"0123456789abcdef\"\nlisten_on = \"x\"",
                "listen_on",
            ),
        ] {
            let err = Config::parse(&format!("{MINIMAL}\n[ssf]\n{bad}\n"), no_env())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn redacted_toml_hides_secrets_and_round_trips() {
        let text = format!(
            "{MINIMAL}\n[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n\"security.protocol\" = \"SASL_SSL\"\n"
        );
        let c = Config::parse(&text, no_env()).unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("hunter2"));
        assert!(out.contains("SASL_SSL"));
        let back = Config::parse(&out, no_env()).unwrap();
        assert_eq!(back.kafka.properties["sasl.password"], "<redacted>");
        assert_eq!(back.issuers, c.issuers);
    }

    fn with_http(http: &str) -> String {
        format!("[http]\n{http}\n{MINIMAL}")
    }

    const CREDENTIAL: &str = "0123456789abcdef-credential";

    #[test]
    fn loopback_and_unix_listeners_need_no_credential() {
        for listen in [
            "127.0.0.1:8181",
            "127.1.2.3:8181",
            "[::1]:8181",
            "[::ffff:127.0.0.1]:8181",
            "localhost:8181",
            "LOCALHOST:8181",
            "unix:/run/revsync/check.sock",
        ] {
            let c = Config::parse(&with_http(&format!("listen = \"{listen}\"")), no_env())
                .unwrap_or_else(|e| panic!("{listen}: {e}"));
            assert_eq!(c.http.credential().unwrap(), None, "{listen}");
        }
        assert!(Config::parse(MINIMAL, no_env()).is_ok(), "the default");
    }

    #[test]
    fn other_tcp_listeners_need_a_credential() {
        for listen in [
            "0.0.0.0:8181",
            "[::]:8181",
            "10.1.2.3:8181",
            "192.168.0.5:8181",
            "[2001:db8::1]:8181",
            "revsync.internal:8181",
            "localhost.example.com:8181",
            ":8181",
        ] {
            let err = Config::parse(&with_http(&format!("listen = \"{listen}\"")), no_env())
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                format!("config: http.listen: {listen} is not a loopback address: set http.credential or http.credential_file (clients send it in X-Revsync-Credential)"),
            );
            let text = with_http(&format!(
                "listen = \"{listen}\"\ncredential = \"{CREDENTIAL}\""
            ));
            let c = Config::parse(&text, no_env()).unwrap_or_else(|e| panic!("{listen}: {e}"));
            assert_eq!(c.http.credential().unwrap().as_deref(), Some(CREDENTIAL));
        }
        // An override after parsing is caught by validate() too (`run --listen`).
        let mut c = Config::parse(MINIMAL, no_env()).unwrap();
        c.http.listen = "0.0.0.0:8181".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("http.listen"));
        // And by the environment.
        let env = vec![("REVSYNC_HTTP__LISTEN".to_string(), "0.0.0.0:1".to_string())];
        assert!(Config::parse(MINIMAL, env).is_err());
        let env = vec![
            ("REVSYNC_HTTP__LISTEN".to_string(), "0.0.0.0:1".to_string()),
            (
                "REVSYNC_HTTP__CREDENTIAL".to_string(),
                CREDENTIAL.to_string(),
            ),
        ];
        let c = Config::parse(MINIMAL, env).unwrap();
        assert_eq!(c.http.credential.as_deref(), Some(CREDENTIAL));
    }

    #[test]
    fn secrets_and_kafka_properties_from_the_environment_stay_strings() {
        let text = format!("{MINIMAL}\n[ssf]\nbearer_secret = \"x\"\n");
        let env = vec![
            (
                "REVSYNC_SSF__BEARER_SECRET".to_string(),
                "12345678901234567890".to_string(),
            ),
            (
                "REVSYNC_KAFKA__PROPERTIES__SASL.PASSWORD".to_string(),
                "0012345".to_string(),
            ),
            (
                "REVSYNC_KAFKA__PROPERTIES__LINGER.MS".to_string(),
                "5".to_string(),
            ),
        ];
        let c = Config::parse(&text, env).unwrap();
        assert_eq!(c.ssf.unwrap().bearer_secret, "12345678901234567890");
        assert_eq!(c.kafka.properties["sasl.password"], "0012345");
        assert_eq!(c.kafka.properties["linger.ms"], "5");
    }

    #[test]
    fn a_credential_from_the_environment_stays_a_string() {
        // Each of these is a TOML value (an integer, a float, an array) as it stands.
        for secret in [
            "1234567890123456",
            "0x1234567890abcdef",
            "12345678.90123456",
            "[1,2,3,4,5,6,7,8]",
        ] {
            let env = vec![("REVSYNC_HTTP__CREDENTIAL".to_string(), secret.to_string())];
            let c = Config::parse(MINIMAL, env).unwrap_or_else(|e| panic!("{secret}: {e}"));
            assert_eq!(c.http.credential().unwrap().as_deref(), Some(secret));
        }
    }

    #[test]
    fn bad_credentials_are_refused_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credential");
        std::fs::write(&file, format!("{CREDENTIAL}\n")).unwrap();
        let file = file.display();
        for (http, key, problem) in [
            (
                "credential = \"short\"",
                "http.credential",
                "at least 16 bytes",
            ),
            (
                "credential = \"0123456789 abcdef\"",
                "http.credential",
                "printable ASCII without spaces",
            ),
            (
                &format!("credential = \"{CREDENTIAL}\"\ncredential_file = \"{file}\""),
                "http.credential_file",
                "not both",
            ),
            (
                "credential_file = \"/nonexistent/revsync-credential\"",
                "http.credential_file",
                "cannot read /nonexistent/revsync-credential",
            ),
            ("credentials = \"x\"", "credentials", "unknown field"),
        ] {
            let err = Config::parse(&with_http(http), no_env())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(problem), "{http}: {err}");
        }
    }

    #[test]
    fn a_credential_file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credential");
        let text = with_http(&format!(
            "listen = \"0.0.0.0:8181\"\ncredential_file = \"{}\"",
            path.display()
        ));
        for (content, expected) in [
            (format!("{CREDENTIAL}\n"), Ok(CREDENTIAL.to_string())),
            (format!("{CREDENTIAL}\r\n"), Ok(CREDENTIAL.to_string())),
            (CREDENTIAL.to_string(), Ok(CREDENTIAL.to_string())),
            // Only one: what is left is not a credential a header can carry.
            (format!("{CREDENTIAL}\n\n"), Err("printable ASCII")),
            ("short\n".to_string(), Err("at least 16 bytes")),
        ] {
            std::fs::write(&path, &content).unwrap();
            match (Config::parse(&text, no_env()), expected) {
                (Ok(c), Ok(expected)) => {
                    assert_eq!(c.http.credential().unwrap(), Some(expected));
                    assert!(!format!("{c:?}").contains(CREDENTIAL));
                }
                (Err(e), Err(problem)) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("http.credential_file") && e.contains(problem),
                        "{e}"
                    );
                }
                (got, expected) => panic!("{content:?}: {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn the_credential_is_redacted_in_debug_and_printed_config() {
        let text = with_http(&format!("credential = \"{CREDENTIAL}\""));
        let c = Config::parse(&text, no_env()).unwrap();
        assert!(!format!("{c:?}").contains(CREDENTIAL));
        assert!(!format!("{:?}", c.http).contains(CREDENTIAL));
        assert!(format!("{:?}", c.http).contains("<redacted>"));
        let shown = c.to_redacted_toml();
        assert!(!shown.contains(CREDENTIAL), "{shown}");
        assert!(shown.contains("credential = \"<redacted>\""), "{shown}");
        // Without one, nothing is printed for it.
        assert!(!Config::parse(MINIMAL, no_env())
            .unwrap()
            .to_redacted_toml()
            .contains("credential"));
    }

    #[test]
    fn the_cli_finds_the_credential_in_the_environment_alone() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            HttpConfig::from_env(env(&[]))
                .unwrap()
                .credential()
                .unwrap(),
            None
        );
        let http = HttpConfig::from_env(env(&[
            ("REVSYNC_HTTP__CREDENTIAL", CREDENTIAL),
            ("REVSYNC_KAFKA__BROKERS", "ignored:9092"),
            ("REVSYNC_STORE__NOPE", "ignored"),
        ]))
        .unwrap();
        assert_eq!(http.credential().unwrap().as_deref(), Some(CREDENTIAL));
        let err = HttpConfig::from_env(env(&[("REVSYNC_HTTP__CREDENTIAL", "short")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("http.credential"), "{err}");
    }
}
