-- sessiond schema v1: users, session metadata, durable snapshots (DESIGN §2, §5, §8).
-- Timestamps are unix seconds (double precision) so records and keyset cursors round-trip exactly;
-- ids use the "C" collation so ordering matches Python's string order (the other backends).

CREATE TABLE users (
    subject     text PRIMARY KEY,
    first_seen  double precision NOT NULL DEFAULT extract(epoch FROM now())
);

CREATE TABLE sessions (
    id          text COLLATE "C" PRIMARY KEY,
    owner       text NOT NULL,
    name        text NOT NULL DEFAULT '',
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    status      text NOT NULL CHECK (status IN ('active', 'paused', 'ended')),
    version     bigint NOT NULL DEFAULT 0,
    active      text,
    created_at  double precision NOT NULL,
    updated_at  double precision NOT NULL
);

-- GET /v1/sessions: one owner's sessions newest first, keyset-paginated on (created_at, id).
CREATE INDEX sessions_owner_created_id ON sessions (owner, created_at, id);

-- Newest snapshot per session only; `data` is the whole snapshot as orjson bytes (exact round trip).
CREATE TABLE snapshots (
    session_id  text COLLATE "C" PRIMARY KEY,
    version     bigint NOT NULL,
    data        bytea NOT NULL,
    saved_at    double precision NOT NULL DEFAULT extract(epoch FROM now())
);
