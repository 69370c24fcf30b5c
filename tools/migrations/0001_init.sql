-- The console's state. Applied once, in order, by tools/src/console/db.rs; PRAGMA user_version
-- records the last migration applied. Times are Unix milliseconds.

-- Every device seen on a fleet's state topics (its retained state and its will).
CREATE TABLE devices (
    id TEXT NOT NULL,
    fleet TEXT NOT NULL,
    grp TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',      -- JSON object, from the device's state
    online INTEGER NOT NULL DEFAULT 0,
    release_id TEXT,
    release_number INTEGER,
    update_state TEXT,
    last_error TEXT,                        -- "kind: reason", for the release it names
    state TEXT NOT NULL DEFAULT '{}',       -- the last state document, whole
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    PRIMARY KEY (fleet, id)
);

-- Releases uploaded to the console: the signed offer as devices get it.
CREATE TABLE releases (
    id TEXT PRIMARY KEY,                    -- sha256 of the signed release envelope
    fleet TEXT NOT NULL,
    grp TEXT NOT NULL,
    number INTEGER NOT NULL,
    models TEXT NOT NULL,                   -- JSON [{name, version}]
    offer BLOB NOT NULL,
    bytes INTEGER NOT NULL,                 -- full size of its blobs
    uploaded INTEGER NOT NULL
);

-- Content-addressed objects (blobs and deltas) under the console's objects/ folder.
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY,
    length INTEGER NOT NULL,
    stored INTEGER NOT NULL
);

CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    release_id TEXT NOT NULL REFERENCES releases(id),
    fleet TEXT NOT NULL,
    grp TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',      -- selector: every label must match
    waves TEXT NOT NULL,                    -- JSON ["1", "10%", ...]
    success_pct REAL NOT NULL,              -- per wave, of the devices offered in it
    soak_ms INTEGER NOT NULL,
    error_limit REAL NOT NULL,
    error_is_pct INTEGER NOT NULL,
    rate_per_min INTEGER NOT NULL,          -- 0: unlimited
    deadline_ms INTEGER NOT NULL,
    state TEXT NOT NULL,                    -- running, paused, completed, aborted, superseded
    reason TEXT,                            -- why it paused, stopped or was superseded
    wave INTEGER NOT NULL DEFAULT 0,        -- the wave being offered
    wave_done INTEGER,                      -- when the current wave finished (soak starts)
    resumed INTEGER NOT NULL DEFAULT 0,     -- last resume: failures finished before it are acknowledged
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL
);

CREATE TABLE rollout_devices (
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,                   -- pending, offered, succeeded, failed, timed_out
    wave INTEGER,
    attempt INTEGER NOT NULL DEFAULT 0,
    offered INTEGER,
    finished INTEGER,
    reason TEXT,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_status ON rollout_devices (rollout_id, status);
CREATE INDEX rollout_devices_device ON rollout_devices (device_id);

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    rollout_id INTEGER,
    device_id TEXT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX events_device ON events (device_id, id);
CREATE INDEX events_rollout ON events (rollout_id, id);
