//! The central side's end of the hard-example queue (`server.hard_example_sink`): a folder that
//! keeps each uploaded example as a JSON file, bounded in count and bytes. Past a bound an
//! upload is answered 507 and the edge keeps the example queued and retries later; the operator
//! makes room by taking examples out of the folder (which the sink notices on its next look).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::escalation::queue::write_atomically;

/// How long a full sink trusts its count before looking at the folder again.
const RESCAN_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Sink {
    pub dir: PathBuf,
    pub max_items: u64,
    pub max_bytes: u64,
    /// Examples and bytes in the folder (as last counted, plus what was stored since), and when
    /// the folder was last counted; none before the first upload.
    usage: Mutex<Option<Usage>>,
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    items: u64,
    bytes: u64,
    counted: Instant,
}

/// Why an example was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("the hard-example sink is full ({items} examples, {bytes} bytes; at most {max_items} and {max_bytes})")]
    Full { items: u64, bytes: u64, max_items: u64, max_bytes: u64 },
    #[error("could not store the example: {0}")]
    Io(#[from] std::io::Error),
}

impl Sink {
    pub fn new(dir: PathBuf, max_items: u64, max_bytes: u64) -> Sink {
        Sink { dir, max_items, max_bytes, usage: Mutex::new(None) }
    }

    /// Stores one example as `name` (blocking: call it off the async runtime).
    pub fn store(&self, name: &str, example: &[u8]) -> Result<(), SinkError> {
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let size = example.len() as u64;
        let fits = |u: &Usage| u.items < self.max_items && u.bytes + size <= self.max_bytes;
        let stale = usage.is_none_or(|u| !fits(&u) && u.counted.elapsed() >= RESCAN_AFTER);
        if stale {
            std::fs::create_dir_all(&self.dir)?;
            *usage = Some(count(&self.dir)?);
        }
        let u = usage.as_mut().expect("counted above");
        if !fits(u) {
            return Err(SinkError::Full {
                items: u.items,
                bytes: u.bytes,
                max_items: self.max_items,
                max_bytes: self.max_bytes,
            });
        }
        write_atomically(&self.dir.join(name), example)?;
        u.items += 1;
        u.bytes += size;
        Ok(())
    }
}

fn count(dir: &Path) -> std::io::Result<Usage> {
    let (mut items, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(".json") {
            items += 1;
            bytes += entry.metadata().map_or(0, |m| m.len());
        }
    }
    Ok(Usage { items, bytes, counted: Instant::now() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_sink_refuses_until_room_is_made() {
        let dir = std::env::temp_dir().join(format!("outpost-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("earlier.json"), b"{}").unwrap();
        let sink = Sink::new(dir.clone(), 3, 1 << 20);
        sink.store("a.json", b"{\"a\":1}").unwrap();
        sink.store("b.json", b"{\"b\":1}").unwrap();
        let e = sink.store("c.json", b"{}").unwrap_err();
        assert!(matches!(e, SinkError::Full { items: 3, .. }), "{e}");
        assert!(!dir.join("c.json").exists());
        // The operator takes examples away; the next look (forced here) sees the room.
        std::fs::remove_file(dir.join("a.json")).unwrap();
        sink.usage.lock().unwrap().as_mut().unwrap().counted -= RESCAN_AFTER;
        sink.store("c.json", b"{}").unwrap();

        let small = Sink::new(dir.join("bytes"), 100, 10);
        small.store("x.json", &[b' '; 8]).unwrap();
        assert!(matches!(small.store("y.json", &[b' '; 8]), Err(SinkError::Full { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
