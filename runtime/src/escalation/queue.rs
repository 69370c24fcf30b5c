//! The hard-example queue: cases the edge was unsure of and could not escalate, kept on disk
//! (inputs, local outputs, time) until the central side takes them, for relabelling and
//! retraining. One JSON file per example, written to a temporary name, synced and renamed, so a
//! crash leaves whole examples only. Bounded by count and bytes; the oldest go first, counted.
//!
//! An example the central refuses for what it is (400, 413, 415, 422), or one that cannot be
//! read back, is parked in `parked/` (the newest [`PARKED_KEPT`] are kept for a look, the rest
//! removed) and counted, so that it never holds up the examples behind it.

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::QueueLimits;

/// See the module documentation.
#[derive(Debug)]
pub struct HardExampleQueue {
    limits: QueueLimits,
    state: Mutex<State>,
    /// Examples dropped to stay within the limits, since start.
    pub drops: AtomicU64,
    /// Examples parked for good (refused by the central, or unreadable), since start.
    pub parked: AtomicU64,
}

/// Parked examples kept on disk; older ones are removed.
pub const PARKED_KEPT: usize = 64;

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// (sequence number, size in bytes), oldest first.
    items: VecDeque<(u64, u64)>,
    bytes: u64,
}

const SUFFIX: &str = ".json";

impl HardExampleQueue {
    /// Opens (creating if needed) the queue folder and takes stock of what is there. Leftover
    /// temporary files of a crash mid-write are removed.
    pub fn open(limits: QueueLimits) -> std::io::Result<HardExampleQueue> {
        fs::create_dir_all(&limits.dir)?;
        let mut items = Vec::new();
        for entry in fs::read_dir(&limits.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            if let Some(seq) = name.strip_suffix(SUFFIX).and_then(|s| s.parse::<u64>().ok()) {
                items.push((seq, entry.metadata()?.len()));
            }
        }
        items.sort();
        let state = State {
            next: items.last().map_or(1, |(s, _)| s + 1),
            bytes: items.iter().map(|(_, n)| n).sum(),
            items: items.into(),
        };
        let q =
            HardExampleQueue { limits, state: Mutex::new(state), drops: AtomicU64::new(0), parked: AtomicU64::new(0) };
        q.enforce_limits(&mut q.lock());
        Ok(q)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.limits.dir.join(format!("{seq:020}{SUFFIX}"))
    }

    /// Appends one example (a JSON document), dropping the oldest beyond the limits. The file
    /// is written and synced outside the lock: writers do not wait on each other's syncs.
    pub fn push(&self, example: &[u8]) -> std::io::Result<()> {
        let seq = {
            let mut state = self.lock();
            state.next += 1;
            state.next - 1
        };
        write_atomically(&self.path(seq), example)?;
        let mut state = self.lock();
        let at = state.items.partition_point(|(s, _)| *s < seq);
        state.items.insert(at, (seq, example.len() as u64));
        state.bytes += example.len() as u64;
        self.enforce_limits(&mut state);
        Ok(())
    }

    fn enforce_limits(&self, state: &mut State) {
        while state.items.len() > self.limits.max_items
            || (state.bytes > self.limits.max_bytes && state.items.len() > 1)
        {
            let Some((seq, size)) = state.items.pop_front() else { break };
            let _ = fs::remove_file(self.path(seq));
            state.bytes -= size;
            self.drops.fetch_add(1, Relaxed);
        }
    }

    /// The oldest readable example: its sequence number and contents. One that cannot be read
    /// is parked, and the next one tried.
    pub fn oldest(&self) -> Option<(u64, Vec<u8>)> {
        loop {
            let seq = self.lock().items.front()?.0;
            match fs::read(self.path(seq)) {
                Ok(bytes) => return Some((seq, bytes)),
                Err(e) => self.park(seq, &format!("unreadable: {e}")),
            }
        }
    }

    /// Takes an example out of the queue for good: moved to `parked/` (removed when that fails),
    /// counted, logged with `why`. The oldest parked beyond [`PARKED_KEPT`] are removed.
    pub fn park(&self, seq: u64, why: &str) {
        let parked = self.limits.dir.join("parked");
        {
            let mut state = self.lock();
            let Some(i) = state.items.iter().position(|(s, _)| *s == seq) else { return };
            let (_, size) = state.items.remove(i).expect("index from position");
            state.bytes -= size;
            let from = self.path(seq);
            let moved = fs::create_dir_all(&parked)
                .and_then(|()| fs::rename(&from, parked.join(from.file_name().expect("a file name"))));
            if moved.is_err() {
                let _ = fs::remove_file(&from);
            }
        }
        self.parked.fetch_add(1, Relaxed);
        tracing::warn!(example = seq, reason = why, "hard example parked; the queue goes on");
        if let Ok(entries) = fs::read_dir(&parked) {
            let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            names.sort();
            let excess = names.len().saturating_sub(PARKED_KEPT);
            for old in &names[..excess] {
                let _ = fs::remove_file(old);
            }
        }
    }

    /// Removes an example once the central side has it.
    pub fn remove(&self, seq: u64) {
        let mut state = self.lock();
        if let Some(i) = state.items.iter().position(|(s, _)| *s == seq) {
            let (_, size) = state.items.remove(i).expect("index from position");
            state.bytes -= size;
            let _ = fs::remove_file(self.path(seq));
        }
    }

    /// Examples waiting.
    pub fn depth(&self) -> usize {
        self.lock().items.len()
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the whole new one: a
/// temporary file, synced, renamed into place, and the folder synced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(name: &str, max_items: usize, max_bytes: u64) -> QueueLimits {
        let dir = std::env::temp_dir().join(format!("outpost-queue-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        QueueLimits { dir, max_items, max_bytes }
    }

    #[test]
    fn survives_a_reopen_in_order_and_holds_its_bounds() {
        let l = limits("bounds", 3, 1 << 20);
        let q = HardExampleQueue::open(l.clone()).unwrap();
        for i in 0..5 {
            q.push(format!("{{\"n\":{i}}}").as_bytes()).unwrap();
        }
        assert_eq!((q.depth(), q.drops.load(Relaxed)), (3, 2));
        drop(q);
        fs::write(l.dir.join("00000000000000000099.tmp"), b"half written").unwrap();
        let q = HardExampleQueue::open(l.clone()).unwrap();
        assert_eq!(q.depth(), 3);
        let (seq, bytes) = q.oldest().unwrap();
        assert_eq!(bytes, b"{\"n\":2}");
        q.remove(seq);
        assert_eq!(q.oldest().unwrap().1, b"{\"n\":3}");
        q.push(b"{\"n\":5}").unwrap();
        assert_eq!(q.depth(), 3);
        assert!(!l.dir.join("00000000000000000099.tmp").exists(), "crash leftovers are cleaned");
        fs::remove_dir_all(&l.dir).unwrap();
    }

    #[test]
    fn unreadable_and_refused_examples_are_parked_and_the_rest_go_on() {
        let l = limits("park", 100, 1 << 20);
        let q = HardExampleQueue::open(l.clone()).unwrap();
        for i in 0..3 {
            q.push(format!("{{\"n\":{i}}}").as_bytes()).unwrap();
        }
        // The oldest becomes unreadable (a dangling link where its file was).
        let (first, _) = q.oldest().unwrap();
        let path = q.path(first);
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(l.dir.join("gone"), &path).unwrap();
        let (seq, bytes) = q.oldest().unwrap();
        assert_eq!(bytes, b"{\"n\":1}", "the unreadable one was passed over");
        assert_eq!(q.parked.load(Relaxed), 1);
        q.park(seq, "the central answered 413");
        assert_eq!(q.oldest().unwrap().1, b"{\"n\":2}");
        assert_eq!((q.depth(), q.parked.load(Relaxed)), (1, 2));
        assert!(l.dir.join("parked").join(format!("{seq:020}.json")).is_file(), "kept for a look");
        for i in 0..PARKED_KEPT + 5 {
            q.push(b"{}").unwrap();
            let (s, _) = q.oldest().unwrap();
            q.park(s, &format!("test {i}"));
        }
        assert_eq!(fs::read_dir(l.dir.join("parked")).unwrap().count(), PARKED_KEPT);
        assert_eq!(q.depth(), 1, "each round parked the oldest: one `{{}}` is left");
        let q = HardExampleQueue::open(l.clone()).unwrap();
        assert_eq!(q.depth(), 1, "parked examples stay out after a reopen");
        fs::remove_dir_all(&l.dir).unwrap();
    }

    #[test]
    fn the_byte_bound_drops_the_oldest() {
        let l = limits("bytes", 100, 25);
        let q = HardExampleQueue::open(l.clone()).unwrap();
        for _ in 0..4 {
            q.push(&[b'x'; 10]).unwrap();
        }
        assert_eq!((q.depth(), q.drops.load(Relaxed)), (2, 2));
        fs::remove_dir_all(&l.dir).unwrap();
    }
}
