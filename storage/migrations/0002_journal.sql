-- sessiond schema v2: the PostgreSQL journal for SESSIOND_DURABILITY=postgres (DESIGN §5, issue 3):
-- an op is acked once its batch is committed here.
-- `journal` holds one row per change (orjson bytes, exact round trip, like the Redis stream entries);
-- `journal_heads` holds, per session, the last version ever appended and the row count, so an append checks
-- ordering and the cap without scanning, and concurrent writers of one session serialise on its head row.

CREATE TABLE journal (
    session_id  text COLLATE "C" NOT NULL,
    version     bigint NOT NULL,
    data        bytea NOT NULL,
    PRIMARY KEY (session_id, version)
);

CREATE TABLE journal_heads (
    session_id    text COLLATE "C" PRIMARY KEY,
    last_version  bigint NOT NULL,
    entries       integer NOT NULL
);

-- Append the batches of one or more sessions: flattened parallel arrays (sids grouped, sessions in a consistent
-- order to avoid lock-order deadlocks, versions ascending per session). Each session's batch is checked in full
-- before any of its rows is written: all-or-nothing per session, no exception (so the other sessions' batches
-- still land). A version at or below the head is accepted only when the stored row is byte-identical (a retried
-- ack); otherwise the batch is refused. Returns one row per session that was refused: (session_id, reason)
-- with reason 'full' or 'version <v> is not after <last>'.
CREATE FUNCTION sessiond_journal_append(sids text[], versions bigint[], datas bytea[], cap integer)
RETURNS TABLE (refused_session text, reason text)
LANGUAGE plpgsql AS $$
DECLARE
    n       integer := coalesce(array_length(sids, 1), 0);
    i       integer := 1;
    j       integer;
    sid     text;
    head_v  bigint;
    head_n  integer;
    prev    bigint;
    fresh   integer[];
    bad     text;
    stored  bytea;
BEGIN
    WHILE i <= n LOOP
        sid := sids[i];
        INSERT INTO journal_heads AS h (session_id, last_version, entries) VALUES (sid, 0, 0)
            ON CONFLICT (session_id) DO UPDATE SET last_version = h.last_version
            RETURNING h.last_version, h.entries INTO head_v, head_n;
        prev := head_v;
        fresh := '{}';
        bad := NULL;
        j := i;
        WHILE j <= n AND sids[j] = sid LOOP
            IF bad IS NULL THEN
                IF versions[j] <= head_v THEN
                    SELECT data INTO stored FROM journal WHERE session_id = sid AND version = versions[j];
                    IF NOT FOUND OR stored <> datas[j] THEN
                        bad := format('version %s is not after %s', versions[j], head_v);
                    END IF;
                ELSIF versions[j] <= prev THEN
                    bad := format('version order %s after %s', versions[j], prev);
                ELSE
                    prev := versions[j];
                    fresh := fresh || j;
                END IF;
            END IF;
            j := j + 1;
        END LOOP;
        IF bad IS NULL AND cardinality(fresh) > 0 AND head_n + cardinality(fresh) > cap THEN
            bad := 'full';
        END IF;
        IF bad IS NOT NULL THEN
            refused_session := sid;
            reason := bad;
            RETURN NEXT;
        ELSIF cardinality(fresh) > 0 THEN
            INSERT INTO journal (session_id, version, data)
                SELECT sid, versions[k], datas[k] FROM unnest(fresh) AS k;
            UPDATE journal_heads SET last_version = prev, entries = head_n + cardinality(fresh)
                WHERE session_id = sid;
        END IF;
        i := j;
    END LOOP;
END;
$$;

-- Forget changes up to `upto`; with `clamp`, never past the durable snapshot of the session (a fast Redis
-- snapshot alone does not cover them: Redis may come back empty). Locks the head first, like append.
CREATE FUNCTION sessiond_journal_trim(sid text, upto bigint, clamp boolean)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    removed  integer;
    durable  bigint;
BEGIN
    PERFORM 1 FROM journal_heads WHERE session_id = sid FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF clamp THEN
        SELECT version INTO durable FROM snapshots WHERE session_id = sid;
        upto := least(upto, coalesce(durable, 0));
    END IF;
    DELETE FROM journal WHERE session_id = sid AND version <= upto;
    GET DIAGNOSTICS removed = ROW_COUNT;
    IF removed > 0 THEN
        UPDATE journal_heads SET entries = entries - removed WHERE session_id = sid;
    END IF;
    RETURN removed;
END;
$$;

-- Forget a session's journal and its head (a re-created session starts again at version 1).
CREATE FUNCTION sessiond_journal_delete(sid text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM journal_heads WHERE session_id = sid FOR UPDATE;
    DELETE FROM journal WHERE session_id = sid;
    DELETE FROM journal_heads WHERE session_id = sid;
END;
$$;
