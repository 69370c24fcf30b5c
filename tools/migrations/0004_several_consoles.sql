-- Several consoles on one database (docs/scale.md): which one steps rollouts, and the uploaded
-- objects themselves, so that every console can serve any object's chunks.

-- A lease: the console named `holder` steps rollouts until `expires` (Unix ms), renewing it at
-- each step; another takes it once it has expired.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires INTEGER NOT NULL
);

-- Each object (blob or delta) in pieces of at most 1 MiB, in order. A console keeps a copy of
-- every object in its objects/ folder, made from these (and checked against the object's name).
CREATE TABLE object_chunks (
    sha256 TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (sha256, seq)
);
