//! A release's download: the planned objects fetched chunk by chunk, with a window of requests
//! in flight, a rate cap, a watchdog and retries.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{mpsc, watch};

use super::device::Device;
use super::shared::{Failure, Shared, failed};
use crate::Refusal;
use crate::apply::Transfer;
use crate::mqtt::chunks::{ChunkReply, ChunkRequest};
use crate::mqtt::partial::{Partial, WriteError};
use crate::mqtt::report::{Progress, UpdateState};
use crate::release::ReleaseDoc;
use crate::release_dir::ReleaseDir;

impl<D: Device> Shared<D> {
    /// Fetches every planned object into `dir` (`blobs/` or `deltas/`), chunk by chunk.
    pub(crate) async fn transfer(
        self: &Arc<Self>,
        doc: &ReleaseDoc,
        dir: &Path,
        plan: &[Transfer],
        desired: &mut watch::Receiver<Option<Bytes>>,
        replies: &mut mpsc::Receiver<Bytes>,
        connected: &mut watch::Receiver<bool>,
    ) -> Result<(), Failure> {
        let cfg = &self.cfg;
        let (d, p, dir2) = (doc.clone(), plan.to_vec(), dir.to_owned());
        let mut parts: Vec<Partial> = self
            .blocking(move |_| {
                p.iter()
                    .map(|t| {
                        let folder = if t.delta { ReleaseDir(&dir2).deltas() } else { ReleaseDir(&dir2).blobs() };
                        Partial::open(&folder, &t.object, t.length, &d)
                    })
                    .collect::<Result<Vec<_>, Refusal>>()
            })
            .await
            .map_err(|r| match r.kind {
                crate::error::RefusalKind::Malformed => Failure::Refused(r),
                _ => failed(r.kind.as_str(), r.detail),
            })?;
        let mut progress = Progress {
            objects: plan.len(),
            delta_objects: plan.iter().filter(|t| t.delta).count(),
            full_objects: plan.iter().filter(|t| !t.delta).count(),
            bytes_total: plan.iter().map(|t| t.length).sum(),
            ..Progress::default()
        };
        let mut queue = VecDeque::new();
        for (i, part) in parts.iter().enumerate() {
            progress.chunks_total += part.chunks();
            for c in 0..part.chunks() {
                if part.present[c as usize] {
                    progress.chunks_resumed += 1;
                    progress.bytes_done += part.range(c).1;
                } else {
                    queue.push_back((i, c));
                }
            }
        }
        progress.chunks_done = progress.chunks_resumed;
        if progress.chunks_resumed > 0 {
            tracing::info!(
                chunks = progress.chunks_resumed,
                of = progress.chunks_total,
                "resuming a download from disk"
            );
        }
        let chunk_max = parts.iter().map(|p| p.range(0).1).max().unwrap_or(0);
        self.reply_max.store(chunk_max + 2 + crate::mqtt::chunks::MAX_HEADER_BYTES as u64, Ordering::Relaxed);
        let _stop_queueing = Defer(|| self.reply_max.store(0, Ordering::Relaxed));
        while replies.try_recv().is_ok() {}
        // Only a change of the link during this transfer matters.
        connected.borrow_and_update();
        let flood_limit = 64 + 2 * progress.chunks_total;
        let started = Instant::now();
        let mut tries: HashMap<(usize, u64), u32> = HashMap::new();
        let mut in_flight: HashMap<u64, (usize, u64, Instant)> = HashMap::new();
        let mut next_id = (crate::mqtt::random_unit() * (1u64 << 40) as f64) as u64;
        // The cap is a token bucket holding at most one chunk: time spent stalled or offline
        // earns no burst afterwards.
        let burst = chunk_max as f64;
        let mut credit = (burst, Instant::now());
        // A capped link may need longer than the watchdog's window for one chunk.
        let watchdog_window = match cfg.max_bytes_per_second {
            0 => cfg.watchdog_window,
            cap => cfg.watchdog_window.max(Duration::from_secs_f64(2.0 * burst / cap as f64)),
        };
        // Requests that timed out and were asked again: a late answer still counts.
        let mut retired: HashMap<u64, (usize, u64)> = HashMap::new();
        let mut last_reply = Instant::now();
        let mut window = (Instant::now(), 0u64);
        let mut last_note = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let request_topic = cfg.topics.chunk_request(&cfg.device_id);
        let publish_progress = |p: &Progress| {
            let mut p = p.clone();
            p.millis = started.elapsed().as_millis() as u64;
            self.set_state(|u| {
                u.state = UpdateState::Downloading;
                u.progress = Some(p);
            });
        };
        publish_progress(&progress);
        // One more try for a chunk, or the transfer's failure.
        let retry = |tries: &mut HashMap<(usize, u64), u32>, key: (usize, u64), kind: &'static str, why: String| {
            let n = tries.entry(key).or_insert(0);
            *n += 1;
            if *n >= cfg.chunk_tries {
                return Err(failed(
                    kind,
                    format!("chunk {} of object {}: {why} ({n} tries)", key.1, parts_name(plan, key.0)),
                ));
            }
            Ok(())
        };
        let outcome: Result<(), Failure> = 'fetch: {
            while !(queue.is_empty() && in_flight.is_empty()) {
                if *connected.borrow() {
                    while in_flight.len() < cfg.window.max(1) {
                        let Some(&(i, c)) = queue.front() else { break };
                        if parts[i].present[c as usize] {
                            // A late answer to an earlier request already brought it.
                            queue.pop_front();
                            continue;
                        }
                        let (offset, len) = parts[i].range(c);
                        if cfg.max_bytes_per_second > 0 {
                            let now = Instant::now();
                            let earned = (now - credit.1).as_secs_f64() * cfg.max_bytes_per_second as f64;
                            credit = ((credit.0 + earned).min(burst), now);
                            if credit.0 < len as f64 {
                                break;
                            }
                        }
                        let req = ChunkRequest {
                            id: next_id,
                            object: parts[i].object().to_owned(),
                            offset,
                            length: len as u32,
                        };
                        if self
                            .client
                            .try_publish(request_topic.as_str(), QoS::AtLeastOnce, false, req.to_bytes())
                            .is_err()
                        {
                            break;
                        }
                        queue.pop_front();
                        in_flight.insert(next_id, (i, c, Instant::now()));
                        progress.requests += 1;
                        next_id += 1;
                        credit.0 -= len as f64;
                    }
                }
                tokio::select! {
                    r = desired.changed() => {
                        if r.is_ok() {
                            break 'fetch Err(Failure::Superseded);
                        }
                    }
                    r = connected.changed() => {
                        if r.is_ok() && *connected.borrow_and_update() {
                            // What was in flight when the link dropped is asked for again (not a
                            // retry: the chunk never had its chance).
                            for (_, (i, c, _)) in in_flight.drain() {
                                queue.push_front((i, c));
                                progress.reasked += 1;
                            }
                        }
                        window = (Instant::now(), 0);
                    }
                    msg = replies.recv() => {
                        let Some(msg) = msg else { break 'fetch Err(failed("storage", "reply channel closed")) };
                        let reply = ChunkReply::decode(msg).ok();
                        let known = reply.as_ref().and_then(|r| {
                            in_flight.remove(&r.id).map(|f| (f.0, f.1)).or_else(|| retired.remove(&r.id))
                        });
                        let Some((i, c)) = known else {
                            progress.unrequested += 1;
                            if progress.unrequested > flood_limit {
                                break 'fetch Err(failed("flood", format!("{} chunk replies nobody asked for (limit {flood_limit})", progress.unrequested)));
                            }
                            continue;
                        };
                        let reply = reply.expect("matched above");
                        if parts[i].present[c as usize] {
                            // The answer to a request asked twice: the chunk is already in.
                            progress.duplicates += 1;
                            continue;
                        }
                        let (offset, len) = parts[i].range(c);
                        let outcome = match reply.result {
                            Err(e) => Err(("missing", format!("the blob server says: {e}"))),
                            Ok(_) if reply.object != parts[i].object() || reply.offset != offset => {
                                Err(("hash_mismatch", "a reply for another object or offset".to_string()))
                            }
                            Ok(data) => {
                                progress.bytes_received += data.len() as u64;
                                window.1 += data.len() as u64;
                                last_reply = Instant::now();
                                match parts[i].write(c, &data) {
                                    Err(WriteError::Io(e)) => break 'fetch Err(failed("storage", e)),
                                    Err(WriteError::Corrupt(e)) => Err(("hash_mismatch", e)),
                                    Ok(()) => Ok(()),
                                }
                            }
                        };
                        match outcome {
                            Ok(()) => {
                                progress.chunks_fetched += 1;
                                progress.chunks_done += 1;
                                progress.bytes_done += len;
                            }
                            Err((kind, why)) => {
                                if kind == "hash_mismatch" {
                                    progress.chunks_corrupt += 1;
                                }
                                progress.chunks_retried += 1;
                                tracing::warn!(chunk = c, object = parts_name(plan, i), why, "bad chunk; asking again");
                                if let Err(e) = retry(&mut tries, (i, c), kind, why) {
                                    break 'fetch Err(e);
                                }
                                queue.push_back((i, c));
                            }
                        }
                        if last_note.elapsed() >= Duration::from_secs(2) {
                            last_note = Instant::now();
                            publish_progress(&progress);
                        }
                    }
                    _ = tick.tick() => {
                        if !*connected.borrow() {
                            continue;
                        }
                        let now = Instant::now();
                        // A request is late when nothing at all came for chunk_timeout since it
                        // was sent: on a slow link replies queue behind each other, and each
                        // reply that arrives shows the link is moving.
                        let late: Vec<u64> = in_flight
                            .iter()
                            .filter(|(_, f)| now - f.2.max(last_reply) >= cfg.chunk_timeout)
                            .map(|(id, _)| *id)
                            .collect();
                        for id in late {
                            let (i, c, _) = in_flight.remove(&id).expect("listed above");
                            if parts[i].present[c as usize] {
                                continue;
                            }
                            retired.insert(id, (i, c));
                            progress.chunks_retried += 1;
                            if let Err(e) = retry(&mut tries, (i, c), "timeout", format!("no answer within {:?}", cfg.chunk_timeout)) {
                                break 'fetch Err(e);
                            }
                            queue.push_front((i, c));
                        }
                        let span = now - window.0;
                        if cfg.min_bytes_per_second > 0 && span >= watchdog_window {
                            let rate = window.1 as f64 / span.as_secs_f64();
                            if rate < cfg.min_bytes_per_second as f64 {
                                break 'fetch Err(failed("throughput", format!(
                                    "{rate:.0} B/s over {:.0} s, under the {} B/s minimum", span.as_secs_f64(), cfg.min_bytes_per_second)));
                            }
                            window = (now, 0);
                        }
                    }
                }
            }
            Ok(())
        };
        publish_progress(&progress);
        outcome?;
        self.blocking(move |_| parts.into_iter().try_for_each(Partial::finish))
            .await
            .map_err(|r| failed(r.kind.as_str(), r.detail))?;
        tracing::info!(
            chunks = progress.chunks_fetched,
            resumed = progress.chunks_resumed,
            bytes = progress.bytes_received,
            ms = started.elapsed().as_millis() as u64,
            "release downloaded"
        );
        Ok(())
    }
}

/// Runs a closure when dropped (on every way out of a scope).
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn parts_name(plan: &[Transfer], i: usize) -> &str {
    crate::short(&plan[i].object)
}
