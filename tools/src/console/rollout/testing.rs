//! A fleet driven by hand for the gates' tests: two releases on a fresh database, states
//! recorded as devices would send them, steps one second apart, offers collected.

use rusqlite::Connection;
use serde_json::{Value, json};

use super::store::tick;
use super::view::show;
use crate::console::{db, ingest};

pub const R1: &str = "aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11";
pub const R2: &str = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";

pub struct Fleet {
    pub conn: Connection,
    pub now: i64,
}

impl Fleet {
    /// `devices` devices `d1`.. running release 1.
    pub fn new(name: &str, devices: usize) -> Fleet {
        let dir = std::env::temp_dir().join(format!("outpost-gate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let conn = db::open(&dir.join("console.db")).unwrap();
        for (id, n) in [(R1, 1), (R2, 2)] {
            conn.execute(
                "INSERT INTO releases (id, fleet, grp, number, models, offer, bytes, uploaded)
                 VALUES (?1, 'f', 'default', ?2, '[]', x'00', 0, 0)",
                rusqlite::params![id, n],
            )
            .unwrap();
        }
        let mut f = Fleet { conn, now: 1_000_000 };
        for n in 1..=devices {
            f.state(&format!("d{n}"), R1, json!({}));
        }
        f
    }

    /// A state of device `id` running `release` (R1 or R2), with `extra` fields.
    pub fn state(&mut self, id: &str, release: &str, extra: Value) {
        let number = if release == R1 { 1 } else { 2 };
        let mut doc = json!({"device": id, "fleet": "f", "group": "default", "online": true,
                             "release": {"id": release, "number": number}});
        for (k, v) in extra.as_object().unwrap() {
            doc[k] = v.clone();
        }
        let s = ingest::parse("f", id, doc.to_string().as_bytes()).unwrap();
        ingest::record(&self.conn, &s, self.now).unwrap();
    }

    /// One step; the offers sent: (device, release's first 4 characters, as a candidate).
    pub fn step(&mut self) -> Vec<(String, String, bool)> {
        self.now += 1000;
        let mut sent = Vec::new();
        tick(&self.conn, self.now, &mut |_, d, r, _, c| {
            sent.push((d.to_owned(), r[..4].to_owned(), c));
            true
        })
        .unwrap();
        sent
    }

    pub fn show(&self, id: i64) -> Value {
        show(&self.conn, id).unwrap().unwrap()
    }
}

pub fn offer(d: &str, r: &str, candidate: bool) -> (String, String, bool) {
    (d.into(), r.into(), candidate)
}
