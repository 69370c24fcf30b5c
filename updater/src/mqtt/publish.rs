//! The publisher: writes an offer to devices' retained `desired` topics and waits until the
//! broker has acknowledged every one (a refusal, such as an ACL denial, is an error naming the
//! device).

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event};

use super::{BrokerConfig, Topics, valid_id};
use crate::offer::Offer;

/// Publishes `payload` (an offer, or empty to clear) retained to each device's `desired`.
/// Returns how many the broker acknowledged.
pub async fn publish_desired(
    broker: &BrokerConfig,
    topics: &Topics,
    devices: &[String],
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<usize, String> {
    if let Some(bad) = devices.iter().find(|d| !valid_id(d)) {
        return Err(format!("device id `{bad}`: letters, digits, - _ . only"));
    }
    let (client, mut eventloop) = AsyncClient::new(broker.options()?, devices.len() + 8);
    let run = async {
        let mut acked = 0;
        let mut sent = false;
        loop {
            match eventloop.poll().await.map_err(|e| format!("broker {}:{}: {e}", broker.host, broker.port))? {
                Event::Incoming(Packet::ConnAck(_)) if !sent => {
                    sent = true;
                    for d in devices {
                        client
                            .try_publish(topics.desired(d), QoS::AtLeastOnce, true, payload.clone())
                            .map_err(|e| e.to_string())?;
                    }
                }
                Event::Incoming(Packet::PubAck(ack)) => {
                    if !matches!(ack.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers) {
                        return Err(format!("the broker refused a publish: {:?}", ack.reason));
                    }
                    acked += 1;
                    if acked == devices.len() {
                        let _ = client.try_disconnect();
                        return Ok(acked);
                    }
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(timeout, run).await.map_err(|_| format!("no acknowledgement within {timeout:?}"))?
}

/// Reads an offer from a release directory and checks it parses (signatures are the devices'
/// business, but a release that is not even signed is refused here).
pub fn offer_from_dir(dir: &std::path::Path) -> Result<(Offer, crate::release::ReleaseDoc), String> {
    let offer = Offer::from_dir(dir)?;
    if offer.release.signatures.is_empty() {
        return Err(format!("{}: the release is not signed", dir.display()));
    }
    let doc = offer.unverified_doc().map_err(|e| e.to_string())?;
    Ok((offer, doc))
}
