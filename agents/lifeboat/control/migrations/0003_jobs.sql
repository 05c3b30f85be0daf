-- Jobs (failover, test failover, cleanup, commit, retention) and the failovers they leave behind.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,                          -- failover | test-failover | cleanup | commit | retention
    machine TEXT,
    state TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    principal TEXT NOT NULL,                     -- who started it
    params TEXT NOT NULL,                        -- JSON
    result TEXT,                                 -- JSON, when succeeded
    error TEXT,                                  -- what went wrong and what to do, when failed
    created REAL NOT NULL,
    finished REAL
);
CREATE INDEX jobs_by_machine ON jobs (machine, created);

CREATE TABLE failovers (
    machine TEXT NOT NULL,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    test INTEGER NOT NULL,                       -- 1: a drill (removed by cleanup), 0: a real failover
    point_id TEXT NOT NULL,
    targets TEXT NOT NULL,                       -- JSON {disk id: path}
    state TEXT NOT NULL CHECK (state IN ('active', 'cleaned', 'committed')),
    created REAL NOT NULL,
    PRIMARY KEY (machine, job_id)
);
