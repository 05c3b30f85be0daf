-- Recovery plans: definitions, one run per job (where it is, what it waits for), the job log.
-- jobs.state gains 'waiting' (a plan paused at a manual action) and 'cancelled'. SQLite cannot
-- alter a CHECK, so the table is rebuilt; failovers.job_id references it, so the foreign keys are
-- deferred to COMMIT, where every job row exists again.
PRAGMA defer_foreign_keys = ON;
CREATE TABLE jobs_before_0050 AS SELECT * FROM jobs;
DROP TABLE jobs;
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,                          -- failover | test-failover | cleanup | commit | retention | plan | test-plan
    machine TEXT,
    state TEXT NOT NULL CHECK (state IN ('running', 'waiting', 'succeeded', 'failed', 'cancelled')),
    principal TEXT NOT NULL,                     -- who started it
    params TEXT NOT NULL,                        -- JSON
    result TEXT,                                 -- JSON, when succeeded
    error TEXT,                                  -- what went wrong and what to do, when failed
    created REAL NOT NULL,
    finished REAL
);
INSERT INTO jobs SELECT * FROM jobs_before_0050;
DROP TABLE jobs_before_0050;
CREATE INDEX jobs_by_machine ON jobs (machine, created);

CREATE TABLE plans (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,                    -- JSON, as validated by control/plans.py
    created REAL NOT NULL,
    updated REAL NOT NULL
);

CREATE TABLE plan_runs (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id),
    plan TEXT NOT NULL,                          -- the plan's name (its definition is copied below)
    definition TEXT NOT NULL,                    -- JSON: the definition the run started with
    options TEXT NOT NULL,                       -- JSON: test, point, to, overwrite
    next_step INTEGER NOT NULL,                  -- index into the run's steps: the first one not yet done
    step_running INTEGER NOT NULL DEFAULT 0,     -- 1 while step next_step runs (left at 1 by a crash)
    waiting_for TEXT,                            -- the manual action's text while the job is 'waiting'
    failovers TEXT NOT NULL DEFAULT '[]'         -- JSON: what the run failed over so far
);
CREATE INDEX plan_runs_by_plan ON plan_runs (plan);

CREATE TABLE job_log (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
