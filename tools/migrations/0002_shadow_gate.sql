-- Shadow gates: a rollout may offer its release as a candidate first and activate it on a
-- device only once the device's shadow comparison passes (docs/console.md, "Shadow gates").

-- The gate: at least this share of compared rows agreeing, over at least this many rows.
ALTER TABLE rollouts ADD COLUMN shadow_agreement REAL;
ALTER TABLE rollouts ADD COLUMN shadow_rows INTEGER;

-- What the device's state says about its candidate release: which one, and its comparison
-- summed over its models (rows compared, rows whose top class agreed).
ALTER TABLE devices ADD COLUMN candidate_id TEXT;
ALTER TABLE devices ADD COLUMN shadow_rows INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN shadow_agreed INTEGER NOT NULL DEFAULT 0;

-- rollout_devices.status gains: shadowing (the device stages the candidate and compares it),
-- promoting (the gate passed and the release was offered for real).
