//! The connection task (polls the event loop, routes messages, reconnects with capped,
//! jittered backoff) and the report task.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::Event;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use tokio::sync::{mpsc, watch};

use super::device::Device;
use super::shared::{Shared, lock};
use crate::mqtt::Backoff;

pub(crate) async fn run_connection<D: Device>(
    s: Arc<Shared<D>>,
    mut eventloop: rumqttc::v5::EventLoop,
    desired: watch::Sender<Option<Bytes>>,
    connected: watch::Sender<bool>,
    replies: mpsc::Sender<Bytes>,
) {
    let id = &s.cfg.device_id;
    let (desired_topic, reply_topic) = (s.cfg.topics.desired(id), s.cfg.topics.chunk_reply(id));
    let mut backoff = Backoff::new(s.cfg.reconnect_min, s.cfg.reconnect_max);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                {
                    let mut c = lock(&s.conn);
                    c.connected = true;
                    c.connects += 1;
                    c.next_retry_ms = None;
                }
                tracing::info!(broker = %format!("{}:{}", s.cfg.broker.host, s.cfg.broker.port), "MQTT connected");
                for topic in [&desired_topic, &reply_topic] {
                    if let Err(e) = s.client.try_subscribe(topic.as_str(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, topic, "subscribe not queued");
                    }
                }
                connected.send_replace(true);
                s.report_now.notify_one();
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic == desired_topic.as_bytes() {
                    let offer = (!p.payload.is_empty()).then_some(p.payload);
                    desired.send_if_modified(|cur| {
                        let changed = *cur != offer;
                        *cur = offer;
                        changed
                    });
                } else if p.topic == reply_topic.as_bytes() {
                    // Only replies that could be a chunk of the transfer under way are queued
                    // (none when there is none), so queued replies never hold more than
                    // REPLY_QUEUE chunks of memory, whatever a server sends.
                    let max = s.reply_max.load(Ordering::Relaxed) as usize;
                    if p.payload.len() > max || replies.try_send(p.payload).is_err() {
                        s.dropped_replies.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => crate::mqtt::check_suback(&ack),
            Ok(_) => {}
            Err(_) if s.stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                connected.send_replace(false);
                let wait = backoff.next_delay();
                {
                    let mut c = lock(&s.conn);
                    c.connected = false;
                    c.failures += 1;
                    c.last_error = Some(e.to_string());
                    c.next_retry_ms = Some(wait.as_millis() as u64);
                }
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "MQTT connection lost or refused; serving on");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

pub(crate) async fn run_reports<D: Device>(s: Arc<Shared<D>>, connected: watch::Receiver<bool>) {
    let mut last = Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(s.cfg.report_interval) => {}
            _ = s.report_now.notified() => {}
        }
        if let Some(wait) = Duration::from_secs(1).checked_sub(last.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if s.stopping.load(Ordering::SeqCst) {
            return;
        }
        if !*connected.borrow() {
            continue;
        }
        let s2 = s.clone();
        let Ok(doc) = tokio::task::spawn_blocking(move || s2.state_doc()).await else { continue };
        let topic = s.cfg.topics.state(&s.cfg.device_id);
        if let Err(e) = s.client.try_publish(topic, QoS::AtLeastOnce, true, serde_json::to_vec(&doc).expect("json")) {
            tracing::debug!(error = %e, "state report not queued");
        }
        last = Instant::now();
    }
}
