-- sessiond schema v3: fencing tokens (DESIGN §6). Each session row holds its fence, the newest lease token any
-- pod was granted for it. Every write of a session (its record, its durable snapshot, its PostgreSQL journal)
-- carries the writer's token and is refused inside the statement when the fence is newer, so a pod that lost its
-- lease (frozen, partitioned) can never overwrite what the new owner wrote.

ALTER TABLE sessions ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN epoch bigint NOT NULL DEFAULT 0;

-- Raise a session's fence (never lowers it); the fence now in force, or NULL for an unknown session.
CREATE FUNCTION sessiond_fence(sid text, token bigint)
RETURNS bigint
LANGUAGE sql AS $$
    UPDATE sessions SET epoch = greatest(epoch, token) WHERE id = sid RETURNING epoch;
$$;

-- Save a durable snapshot unless the fence is newer than its token ('fenced') or a newer version is stored
-- ('older'); 'ok' when written. The session row is locked FOR SHARE, so a concurrent fence waits for us (and we
-- for it): the check and the write cannot interleave with a takeover.
CREATE FUNCTION sessiond_snapshot_save(sid text, v bigint, payload bytea, token bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    cur  bigint;
    n    integer;
BEGIN
    SELECT epoch INTO cur FROM sessions WHERE id = sid FOR SHARE;
    IF FOUND AND cur > token THEN
        RETURN 'fenced';
    END IF;
    INSERT INTO snapshots AS s (session_id, version, data, epoch) VALUES (sid, v, payload, token)
        ON CONFLICT (session_id) DO UPDATE SET version = EXCLUDED.version, data = EXCLUDED.data,
            epoch = EXCLUDED.epoch, saved_at = extract(epoch FROM now())
        WHERE s.version <= EXCLUDED.version;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN CASE WHEN n > 0 THEN 'ok' ELSE 'older' END;
END;
$$;

-- The journal append of schema v2, with one fencing token per session (`tokens`, parallel to `sids`): a session
-- whose fence is newer than its token is refused with reason 'fenced', nothing of its batch written.
DROP FUNCTION sessiond_journal_append(text[], bigint[], bytea[], integer);
CREATE FUNCTION sessiond_journal_append(sids text[], versions bigint[], datas bytea[], cap integer, tokens bigint[])
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
    fence   bigint;
BEGIN
    WHILE i <= n LOOP
        sid := sids[i];
        INSERT INTO journal_heads AS h (session_id, last_version, entries) VALUES (sid, 0, 0)
            ON CONFLICT (session_id) DO UPDATE SET last_version = h.last_version
            RETURNING h.last_version, h.entries INTO head_v, head_n;
        bad := NULL;
        SELECT epoch INTO fence FROM sessions WHERE id = sid FOR SHARE;
        IF FOUND AND fence > tokens[i] THEN
            bad := 'fenced';
        END IF;
        prev := head_v;
        fresh := '{}';
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
