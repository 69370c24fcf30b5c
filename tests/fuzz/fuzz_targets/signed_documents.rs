//! Signed documents as a device reads them from a release directory or an offer: the envelope,
//! then the release and root documents inside it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_updater::envelope::Envelope;
use outpost_updater::release::ReleaseDoc;
use outpost_updater::root::Root;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::parse(data) {
        let _ = Root::parse(&env);
        let _ = Root::trust_first(&env);
        if let Ok(payload) = env.payload(outpost_updater::envelope::RELEASE_TYPE) {
            let _ = ReleaseDoc::parse(&payload);
        }
    }
    // The document alone, as `unverified_doc` reads an offer's release.
    let _ = ReleaseDoc::parse(data);
});
