//! A fleet driven by hand for the gates' tests: two releases on a fresh database, states
//! recorded as devices would send them, steps one second apart, offers collected.

use crate::console::db::Connection;
use serde_json::{Value, json};

use super::store::tick;
use super::view::show;
use crate::console::{db, ingest};

pub const R1: &str = "aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11aa11";
pub const R2: &str = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";

pub struct Fleet {
    pub conn: Connection,
    pub now: i64,
    /// Last, so that the connection closes before the database's folder goes.
    _database: db::testing::TestDatabase,
}

impl Fleet {
    /// `devices` devices `d1`.. running release 1.
    /// The same fleet on each engine (db::testing::databases).
    pub fn each(name: &str, devices: usize) -> Vec<Fleet> {
        db::testing::databases(&format!("gate-{name}")).into_iter().map(|d| Fleet::on(d, devices)).collect()
    }

    fn on(database: db::testing::TestDatabase, devices: usize) -> Fleet {
        let conn = db::open(&database).unwrap();
        for (id, n) in [(R1, 1), (R2, 2)] {
            conn.execute(
                "INSERT INTO releases (id, fleet, grp, number, models, offer, bytes, uploaded)
                 VALUES (?1, 'f', 'default', ?2, '[]', ?3, 0, 0)",
                db::params![id, n, vec![0u8]],
            )
            .unwrap();
        }
        let mut f = Fleet { conn, now: 1_000_000, _database: database };
        for n in 1..=devices {
            f.state(&format!("d{n}"), R1, json!({}));
        }
        f
    }

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
