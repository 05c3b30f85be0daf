-- Replication policies, consistency groups, protected machines and disks, agent heartbeats.
CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    rpo_threshold_seconds REAL NOT NULL CHECK (rpo_threshold_seconds > 0),   -- alert only
    retention_seconds REAL NOT NULL CHECK (retention_seconds >= 0),          -- 0 = only the latest point
    keep_all_seconds REAL NOT NULL CHECK (keep_all_seconds >= 0),            -- every point younger is kept
    crash_interval_seconds REAL NOT NULL CHECK (crash_interval_seconds > 0),
    app_interval_seconds REAL NOT NULL CHECK (app_interval_seconds >= 0),    -- 0 = every cycle
    created REAL NOT NULL
);
-- The reference design's defaults: RPO alert at 15 min, 1 day of points (all of the last 2 h kept),
-- a crash-consistent point every 5 min, an app-consistent one every 4 h.
INSERT INTO policies VALUES ('default', 900, 86400, 7200, 300, 14400, 0);

CREATE TABLE groups (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL
);

CREATE TABLE machines (
    name TEXT PRIMARY KEY,
    policy TEXT NOT NULL DEFAULT 'default' REFERENCES policies (name),
    group_name TEXT REFERENCES groups (name),
    process_server TEXT NOT NULL REFERENCES process_servers (name),   -- where its agent sends now
    move_to TEXT REFERENCES process_servers (name),                  -- a requested move, until the agent moved
    state TEXT NOT NULL DEFAULT 'protected',    -- protected | failed-over (after a committed failover)
    protected REAL NOT NULL
);

CREATE TABLE disks (
    machine TEXT NOT NULL REFERENCES machines (name) ON DELETE CASCADE,
    disk TEXT NOT NULL,                         -- as in the agent's config ("sda"); disk id = machine.disk
    PRIMARY KEY (machine, disk)
);

CREATE TABLE heartbeats (
    machine TEXT PRIMARY KEY REFERENCES machines (name) ON DELETE CASCADE,
    received REAL NOT NULL,
    body TEXT NOT NULL                          -- the agent's report (JSON), as validated by the API
);
