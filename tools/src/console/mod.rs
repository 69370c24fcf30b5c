//! `outpostctl console`: the fleet console. Devices' states come in over MQTT into its database
//! (SQLite, or PostgreSQL shared by several consoles: [`db`], [`lease`]);
//! rollouts move from there (see [`rollout`]); offers go out as retained `desired` messages;
//! chunk requests are answered by the blob server running inside; a JSON API and a web page
//! show it all.
//!
//! [`service`] runs the process; [`state`] is what the [`api`] handlers share.

pub mod api;
pub mod catalog;
pub mod client;
pub mod db;
pub mod fleet;
pub mod history;
pub mod ingest;
pub mod lease;
pub mod objects;
pub mod rollout;
pub mod service;
pub mod state;
