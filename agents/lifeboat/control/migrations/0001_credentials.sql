-- Registration and credentials: who may call the management API, as which principal.
-- Tokens are never stored: only the SHA-256 of a token (tokens are 256-bit random, so a fast
-- hash is enough; a slow KDF protects low-entropy passwords, which these are not).
CREATE TABLE registration_passphrase (
    id INTEGER PRIMARY KEY CHECK (id = 1),          -- one current passphrase per deployment
    passphrase_sha256 TEXT NOT NULL,
    created REAL NOT NULL
);

CREATE TABLE credentials (
    id TEXT PRIMARY KEY,                             -- public id (c-<hex>), safe to log and to revoke by
    token_sha256 TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('operator', 'agent', 'process-server')),
    name TEXT NOT NULL,                              -- machine name, process-server name, or operator name
    created REAL NOT NULL,
    expires REAL,                                    -- NULL: does not expire
    revoked REAL,                                    -- NULL: live
    revoked_reason TEXT
);
CREATE INDEX credentials_by_principal ON credentials (kind, name);

CREATE TABLE process_servers (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL DEFAULT '',                    -- its ingest URL, as agents reach it
    is_primary INTEGER NOT NULL DEFAULT 0,
    registered REAL NOT NULL
);
