//! The device agent: hears its retained `desired` offer, verifies it before fetching a byte,
//! pulls what the store lacks in chunks (a delta when it holds the base), applies it through
//! the same health-gated path as a release directory, and reports a retained `state`.
//!
//! Three tasks share one MQTT connection: the connection task (polls the event loop, routes
//! messages, reconnects with capped, jittered backoff), the update task (one offer at a time)
//! and the report task (on change, at most once a second, and every `report_interval`).
//! Nothing blocks on the broker: while it is away the device serves what it has, a transfer
//! pauses (its chunks stay on disk) and resumes when the broker is back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::LastWill;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};

mod connection;
mod device;
mod settings;
mod shared;
mod status;
mod transfer;
mod updates;

pub use device::Device;
pub use settings::AgentConfig;
use shared::{REPLY_QUEUE, Shared, lock, offline_payload};
pub use status::ConnectionStatus;

use crate::mqtt::report::UpdateStatus;

/// A running agent.
pub struct Agent {
    view: Arc<dyn View>,
}

/// What the handle sees of the running agent (its device type erased).
trait View: Send + Sync {
    fn status(&self) -> Value;
    /// The client, state topic and offline payload, when connected.
    fn goodbye(&self) -> Option<(AsyncClient, String, Vec<u8>)>;
}

impl<D: Device> View for Shared<D> {
    fn status(&self) -> Value {
        json!({"connection": *lock(&self.conn), "update": *lock(&self.update)})
    }

    fn goodbye(&self) -> Option<(AsyncClient, String, Vec<u8>)> {
        self.stopping.store(true, Ordering::SeqCst);
        let c = &self.cfg;
        lock(&self.conn).connected.then(|| (self.client.clone(), c.topics.state(&c.device_id), offline_payload(c)))
    }
}

impl Agent {
    /// The connection and update status (for the local status API).
    pub fn status(&self) -> Value {
        self.view.status()
    }

    /// Says goodbye: a retained offline state, then a clean disconnect (so the will is not
    /// sent). Bounded by `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        if let Some((client, topic, payload)) = self.view.goodbye() {
            let bye = async {
                let _ = client.publish(topic, QoS::AtLeastOnce, true, payload).await;
                let _ = client.disconnect().await;
            };
            let _ = tokio::time::timeout(timeout, bye).await;
        }
    }
}

/// Starts the agent's tasks on the current tokio runtime.
pub fn start<D: Device>(cfg: AgentConfig, device: Arc<D>) -> Result<Agent, String> {
    let mut options = cfg.broker.options()?;
    let will = LastWill::new(cfg.topics.state(&cfg.device_id), offline_payload(&cfg), QoS::AtLeastOnce, true, None);
    options.set_last_will(will);
    let (client, eventloop) = AsyncClient::new(options, 64);
    let shared = Arc::new(Shared {
        device,
        client,
        update: Mutex::new(UpdateStatus::default()),
        conn: Mutex::new(ConnectionStatus::default()),
        report_now: Notify::new(),
        seq: AtomicU64::new(0),
        dropped_replies: AtomicU64::new(0),
        reply_max: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        cfg,
    });
    let (desired_tx, desired_rx) = watch::channel::<Option<Bytes>>(None);
    let (connected_tx, connected_rx) = watch::channel(false);
    let (replies_tx, replies_rx) = mpsc::channel::<Bytes>(REPLY_QUEUE);
    tokio::spawn(connection::run_connection(shared.clone(), eventloop, desired_tx, connected_tx, replies_tx));
    tokio::spawn(updates::run_updates(shared.clone(), desired_rx, replies_rx, connected_rx.clone()));
    tokio::spawn(connection::run_reports(shared.clone(), connected_rx));
    Ok(Agent { view: shared })
}
