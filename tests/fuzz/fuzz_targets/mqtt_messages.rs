//! What arrives over MQTT: an offer (retained `desired`), a chunk request (at a blob server), a
//! chunk reply (at a device), and a device's state report (at the console).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_updater::mqtt::chunks::{ChunkReply, ChunkRequest};
use outpost_updater::mqtt::report::StateReport;
use outpost_updater::offer::Offer;

fuzz_target!(|data: &[u8]| {
    if let Ok(offer) = Offer::parse(data) {
        let _ = offer.release_id();
        let _ = offer.unverified_doc();
    }
    let _ = ChunkRequest::parse(data);
    let _ = ChunkReply::decode(bytes::Bytes::copy_from_slice(data));
    if let Ok(report) = serde_json::from_slice::<StateReport>(data) {
        let _ = serde_json::to_vec(&report);
    }
});
