-- Soak gates: after a device activates a rollout's release, its quality signals are watched
-- until the rollout completes; a device past a bound pauses the rollout, and with `rollback`
-- it is offered the release it ran before (docs/console.md, "Soak gates").

-- The bounds (each optional): the largest drift score (population stability index) of the
-- device's last closed window; how far its escalation rate may rise above its own rate before
-- the offer (absolute, 0..1); how many times its p99 before the offer its p99 may be.
ALTER TABLE rollouts ADD COLUMN drift_max REAL;
ALTER TABLE rollouts ADD COLUMN escalation_rise REAL;
ALTER TABLE rollouts ADD COLUMN p99_ratio REAL;
ALTER TABLE rollouts ADD COLUMN rollback INTEGER NOT NULL DEFAULT 0;

-- What the device's last state says: its largest drift score, and its request figures over
-- the last report interval (requests, escalation rate, p99).
ALTER TABLE devices ADD COLUMN drift REAL;
ALTER TABLE devices ADD COLUMN requests INTEGER;
ALTER TABLE devices ADD COLUMN escalation_rate REAL;
ALTER TABLE devices ADD COLUMN p99_ms REAL;

-- Per offered device: the release it ran when offered (what a rollback returns it to), and its
-- figures then (the baseline the soak gate compares with).
ALTER TABLE rollout_devices ADD COLUMN previous_id TEXT;
ALTER TABLE rollout_devices ADD COLUMN base_escalation REAL;
ALTER TABLE rollout_devices ADD COLUMN base_p99 REAL;

-- rollout_devices.status gains: degraded (activated, then past a soak bound; `reason` says
-- which, and whether it was offered its previous release).

-- The fleet view counts devices by release (and the release list counts each release's devices).
CREATE INDEX devices_release ON devices (release_number);
CREATE INDEX devices_release_id ON devices (release_id);

-- Drift over time: every sample interval, per fleet and release, the online devices, how many
-- have a drift score, its mean and largest, and how many are past 0.25 (the devices' default
-- alert threshold). Kept for 7 days.
CREATE TABLE drift_history (
    at INTEGER NOT NULL,
    fleet TEXT NOT NULL,
    release_number INTEGER,                 -- NULL: devices running no release
    devices INTEGER NOT NULL,
    scored INTEGER NOT NULL,
    mean REAL,
    max REAL,
    over INTEGER NOT NULL
);
CREATE INDEX drift_history_at ON drift_history (at);
