//! The ingest path in process: the reader and watcher threads of `revsync::ingest` over a
//! sled store, stopped on drop. Tests add their own accessors in `impl Ingesting` blocks.

use std::path::Path;
use std::sync::Arc;

use revsync::config::KafkaConfig;
use revsync::denylist::{Denylist, Retention};
use revsync::formats::set::SetVerifier;
use revsync::ingest::{self, IngestHandle, IngestState};
use revsync::metrics::Metrics;
use tokio_util::sync::CancellationToken;

pub struct Ingesting {
    pub denylist: Arc<Denylist>,
    pub metrics: Arc<Metrics>,
    pub state: Arc<IngestState>,
    stop: CancellationToken,
    handle: Option<IngestHandle>,
}

/// Stops the threads even when a test panics: librdkafka threads alive at process exit
/// crash the test binary.
impl Drop for Ingesting {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.join();
        }
    }
}

impl Ingesting {
    /// Reads the topics of `kafka` into a store in `dir` (64 MiB cache) that keeps entries
    /// by `retention`; `sets` verifies the records of `set` topics.
    pub fn start_with(
        kafka: &KafkaConfig,
        dir: &Path,
        retention: Retention,
        sets: Option<SetVerifier>,
    ) -> Self {
        let denylist = Arc::new(Denylist::open(dir, 64 << 20, retention).unwrap());
        let metrics = Arc::new(Metrics::new());
        let state = IngestState::new();
        let stop = CancellationToken::new();
        let handle = ingest::spawn_with(
            kafka,
            denylist.clone(),
            metrics.clone(),
            state.clone(),
            stop.clone(),
            sets,
        )
        .unwrap();
        Self {
            denylist,
            metrics,
            state,
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the threads and waits for them.
    pub fn stop(self) {}
}
