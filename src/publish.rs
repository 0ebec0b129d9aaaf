//! The reference publisher for the authorization-server side: native v1 events, keyed
//! `iss` + `\n` + the revoked identifier so one subject's events share a partition.

use std::io::BufRead;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use crate::config::KafkaConfig;
use crate::event::{self, Event};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("line {line}: {problem}")]
    BadLine { line: usize, problem: String },
    #[error("reading input: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0} record(s) were not acknowledged by the broker")]
    Undelivered(u64),
}

pub struct Publisher {
    producer: ThreadedProducer<DeliveryCounter>,
    topic: String,
}

/// Counts records the broker refused, so `finish` can report them.
#[derive(Default)]
pub struct DeliveryCounter {
    failed: std::sync::atomic::AtomicU64,
}

impl rdkafka::ClientContext for DeliveryCounter {}
impl rdkafka::producer::ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        if let Err((e, _)) = result {
            tracing::warn!(error = %e, "record not delivered");
            self.failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Publisher {
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Result<Self, PublishError> {
        let mut cfg = crate::ingest::client_config(kafka);
        // Revocations are latency-critical and small: 1 ms of batching is plenty.
        cfg.set("linger.ms", "1").set("acks", "all");
        let producer = cfg.create_with_context(DeliveryCounter::default())?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
        })
    }

    /// Queues one event; blocks briefly when librdkafka's queue is full.
    pub fn send(&self, event: &Event) -> Result<(), PublishError> {
        let payload = event::encode_native(event);
        self.send_raw(&event.revocation.record_key(), payload.as_bytes())
    }

    /// Queues a record as is (for tests that need malformed records on the topic).
    pub fn send_raw(&self, key: &str, payload: &[u8]) -> Result<(), PublishError> {
        loop {
            let record = BaseRecord::to(&self.topic).key(key).payload(payload);
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Records queued or sent but not yet acknowledged by the broker.
    pub fn in_flight(&self) -> usize {
        usize::try_from(self.producer.in_flight_count()).unwrap_or(0)
    }

    /// Waits until every queued record is acknowledged (or `timeout`).
    pub fn finish(&self, timeout: Duration) -> Result<(), PublishError> {
        self.producer.flush(timeout)?;
        let failed = self
            .producer
            .context()
            .failed
            .load(std::sync::atomic::Ordering::Relaxed);
        if failed > 0 {
            return Err(PublishError::Undelivered(failed));
        }
        Ok(())
    }

    /// Publishes JSON lines: each line a native v1 event, decoded (so a bad line is
    /// reported with its number and nothing after it is sent) and re-encoded.
    pub fn send_lines(&self, input: impl BufRead) -> Result<usize, PublishError> {
        let mut n = 0;
        for (i, line) in input.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let event =
                event::decode_native(line.as_bytes()).map_err(|e| PublishError::BadLine {
                    line: i + 1,
                    problem: e.to_string(),
                })?;
            self.send(&event)?;
            n += 1;
        }
        Ok(n)
    }
}

/// A fresh event id: 128 random bits, hex.
pub fn new_event_id() -> String {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("system randomness");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
