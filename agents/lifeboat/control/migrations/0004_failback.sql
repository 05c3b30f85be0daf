-- Failback steps of a machine after a committed failover: reprotect, prepare, switch, cancel, reenable.
-- machines.state moves failed-over -> reprotecting -> failing-back -> protected; while reprotecting
-- or failing-back the on-prem machine is powered off: its agent's batches are refused at ingest.
CREATE TABLE failback_steps (
    machine TEXT NOT NULL REFERENCES machines (name) ON DELETE CASCADE,
    step TEXT NOT NULL CHECK (step IN ('reprotect', 'prepare', 'switch', 'cancel', 'reenable')),
    from_state TEXT NOT NULL,
    to_state TEXT NOT NULL,
    principal TEXT NOT NULL,                     -- who recorded it
    at REAL NOT NULL
);
CREATE INDEX failback_steps_by_machine ON failback_steps (machine, at);
