-- The batch function again, as booking_worker.apply_batch_v2: the same parameters, result rows
-- and steps as apply_batch_v1 (0004), whose header says how the functions are versioned.
--
-- What changed: the plans a session keeps stay good however much the tables grow, and nothing is
-- planned again at each call. PL/pgSQL keeps a statement's plan for the session, and a plan made
-- while a table was small reads it whole once it has grown, until the next analysis of that
-- table: bookings can grow a thousandfold in a catch-up on a new database, and parked
-- cancellations and dead letters by tens of thousands in minutes. With apply_batch_v1 a batch of
-- the benchmark's took 1 s once bookings held 15,000 rows.
-- - Every look-up the function makes in those tables has an index (by external id, row id, the
--   Go worker's match, a record's topic, partition and offset, a parked cancellation's booking),
--   and the function runs with sequential scans off, so its kept plans read those indexes.
-- - Step 8 finds the cancellations' bookings first, by external id and by row id, each by its
--   own index, and then locks them by row id, in order. apply_batch_v1 locked them in one
--   statement whose kept plan read the whole primary key, so it planned it at each call.
-- The server time of a batch of the benchmark's at 1,000 events/s: 1.6 ms, against 2.0 ms for
-- apply_batch_v1 with adoption off.
--
-- apply_batch_v1 stays for workers of the previous version during a rolling update.

CREATE OR REPLACE FUNCTION booking_worker.apply_batch_v2(
    p_topic text[], p_partition integer[], p_offset bigint[], p_key bytea[], p_payload bytea[],
    p_baggage text[], p_kind text[], p_reason text[], p_error text[], p_sqlstate text[],
    p_booking text[], p_user text[], p_room text[], p_guests integer[], p_start date[],
    p_start_at timestamptz[], p_end date[], p_end_at timestamptz[], p_payment text[],
    p_release text[], p_adopt boolean, p_replaying boolean, p_page integer)
RETURNS TABLE (r_item text, r_n integer, r_end text, r_id integer, r_reason text, r_error text,
               r_sqlstate text, r_booking text, r_user text, r_topic text, r_partition integer,
               r_offset bigint, r_key bytea, r_payload bytea, r_baggage text, r_parked_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    v_n integer := coalesce(cardinality(p_kind), 0);
    -- Each record's end so far, with the row id, reason and error that go with it.
    v_end text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_id integer[] := array_fill(NULL::integer, ARRAY[v_n]);
    v_reason text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_error text[] := array_fill(NULL::text, ARRAY[v_n]);
    -- Each record's user and room, resolved; NULL when none exists.
    v_uid integer[];
    v_rid integer[];
    -- The records that create a booking: the first of their booking id, of a known user and room.
    v_new integer[] := '{}';
    v_releasing text[];
    v_released booking_worker.pending_cancellations[] := '{}';
    v_m integer;
    v_rel_end text[];
    v_rel_id integer[];
    v_rel_reason text[];
    v_rel_error text[];
    v_cancel integer[] := '{}';
    -- The references the cancellations give, and the row ids of the bookings they name.
    v_refs text[];
    v_rids integer[];
    v_park integer[] := '{}';
    v_repark integer[] := '{}';
    v_taken integer[];
    v_chosen_n integer[];
    v_chosen_id integer[];
    v_got integer;
    v_bytes_wanted boolean := false;
    v_e text;
    v_r text;
    v_x text;
    v_round integer;
    i integer;
    rec record;
BEGIN
    -- 1. Two events for one booking never race: its advisory lock, in one sorted order.
    PERFORM pg_advisory_xact_lock(k)
       FROM (SELECT DISTINCT hashtextextended(b, 0) AS k
               FROM unnest(p_booking || p_release) AS b WHERE b IS NOT NULL) AS keys
      ORDER BY k;

    -- 2. A record dead-lettered before stays so; a record the worker could not decode is one.
    IF NOT p_replaying THEN
        FOR i IN SELECT r.n::integer
                   FROM unnest(p_topic, p_partition, p_offset) WITH ORDINALITY AS r(t, p, o, n)
                   JOIN booking_worker.dead_letters d
                     ON d.topic = r.t AND d.kafka_partition = r.p AND d.kafka_offset = r.o
        LOOP
            v_end[i] := 'already_dead_lettered';
        END LOOP;
    END IF;
    FOR i IN 1 .. v_n LOOP
        IF v_end[i] IS NULL AND p_kind[i] = 'rejected' THEN
            v_end[i] := 'dead_lettered';
            v_reason[i] := p_reason[i];
            v_error[i] := p_error[i];
        END IF;
    END LOOP;

    -- 3. Resolve user ids from identifiers and room ids from internal ids, each name once.
    SELECT array_agg(u.id ORDER BY b.n) INTO v_uid
      FROM unnest(p_user) WITH ORDINALITY AS b(ref, n)
      LEFT JOIN (SELECT d.ref, booking_worker.resolve_user_id(d.ref) AS id
                   FROM (SELECT DISTINCT ref FROM unnest(p_user) AS ref WHERE ref IS NOT NULL) AS d) AS u
        ON u.ref = b.ref;
    SELECT array_agg(r.id ORDER BY b.n) INTO v_rid
      FROM unnest(p_room) WITH ORDINALITY AS b(ref, n)
      LEFT JOIN rooms r ON r.internal_id = b.ref;

    -- 4. The first booking event of a booking id creates it, later ones are duplicates.
    FOR rec IN SELECT b.n::integer AS n, row_number() OVER (PARTITION BY b.id COLLATE "C" ORDER BY b.n) AS k
                 FROM unnest(p_booking, p_kind, v_end) WITH ORDINALITY AS b(id, kind, e, n)
                WHERE b.kind = 'booking' AND b.e IS NULL
                ORDER BY b.n
    LOOP
        IF rec.k > 1 THEN
            v_end[rec.n] := 'duplicate';
        ELSIF (v_uid[rec.n] IS NULL OR v_rid[rec.n] IS NULL) AND p_payload[rec.n] IS NULL THEN
            v_bytes_wanted := true;
        ELSIF v_uid[rec.n] IS NULL THEN
            v_end[rec.n] := 'dead_lettered';
            v_reason[rec.n] := 'unknown_user';
            v_error[rec.n] := format('no user has id, email or username %s', to_json(p_user[rec.n]));
        ELSIF v_rid[rec.n] IS NULL THEN
            v_end[rec.n] := 'dead_lettered';
            v_reason[rec.n] := 'unknown_room';
            v_error[rec.n] := format('no room has internal id %s', to_json(p_room[rec.n]));
        ELSE
            v_new := v_new || rec.n;
        END IF;
    END LOOP;

    -- A booking's record comes without its bytes, which only a dead letter keeps. Nothing is
    -- written yet: the caller is asked to send the batch again with them.
    IF v_bytes_wanted THEN
        RETURN QUERY
            SELECT 'bytes_wanted', NULL::integer, NULL::text, NULL::integer, NULL::text, NULL::text, NULL::text,
                   NULL::text, NULL::text, NULL::text, NULL::integer, NULL::bigint, NULL::bytea, NULL::bytea,
                   NULL::text, NULL::timestamptz;
        RETURN;
    END IF;

    -- 5. A new booking adopts the lowest matching row of the Go worker that no booking before it
    -- took; a row another transaction adopted meanwhile is looked for again among the others.
    IF p_adopt AND cardinality(v_new) > 0 THEN
        FOR v_round IN 1 .. 3 LOOP
            v_taken := '{}';
            v_chosen_n := '{}';
            v_chosen_id := '{}';
            FOR rec IN SELECT t.n, array_agg(b.id ORDER BY b.id) AS ids
                         FROM unnest(v_new) AS t(n)
                         JOIN bookings b
                           ON b.external_id IS NULL AND b.room_id = v_rid[t.n] AND b.user_id = v_uid[t.n]
                          AND b.number_of_guests = p_guests[t.n] AND b.payment_id = p_payment[t.n]
                          AND (b.start_date = p_start[t.n] OR b.start_date = p_start_at[t.n]::date)
                          AND (b.end_date = p_end[t.n] OR b.end_date = p_end_at[t.n]::date)
                        WHERE v_end[t.n] IS NULL
                          AND NOT EXISTS (SELECT 1 FROM bookings x WHERE x.external_id = p_booking[t.n])
                        GROUP BY t.n
                        ORDER BY t.n
            LOOP
                FOREACH i IN ARRAY rec.ids LOOP
                    IF NOT i = ANY (v_taken) THEN
                        v_taken := v_taken || i;
                        v_chosen_n := v_chosen_n || rec.n;
                        v_chosen_id := v_chosen_id || i;
                        EXIT;
                    END IF;
                END LOOP;
            END LOOP;
            EXIT WHEN cardinality(v_chosen_n) = 0;
            v_got := 0;
            FOR rec IN UPDATE bookings b SET external_id = p_booking[c.n]
                         FROM unnest(v_chosen_n, v_chosen_id) AS c(n, id)
                        WHERE b.id = c.id AND b.external_id IS NULL
                       RETURNING c.n, b.id
            LOOP
                v_end[rec.n] := 'adopted';
                v_id[rec.n] := rec.id;
                v_got := v_got + 1;
            END LOOP;
            EXIT WHEN v_got = cardinality(v_chosen_n);
        END LOOP;
    END IF;

    -- 6. A page of the parked cancellations of the new bookings (and of those to release) comes
    -- out of the table, oldest first.
    v_releasing := ARRAY(SELECT DISTINCT x COLLATE "C"
                           FROM unnest(ARRAY(SELECT p_booking[t.n] FROM unnest(v_new) AS t(n)) || p_release) AS x);
    IF cardinality(v_releasing) > 0 THEN
        WITH taken AS (
            DELETE FROM booking_worker.pending_cancellations
             WHERE id IN (SELECT p.id
                            FROM unnest(v_releasing) AS r(ref)
                           CROSS JOIN LATERAL (SELECT pc.id, pc.parked_at
                                                 FROM booking_worker.pending_cancellations pc
                                                WHERE pc.booking_ref = r.ref
                                                ORDER BY pc.parked_at, pc.id
                                                LIMIT p_page) AS p
                           ORDER BY p.parked_at, p.id
                           LIMIT p_page)
            RETURNING *)
        SELECT coalesce(array_agg(ROW(t.*)::booking_worker.pending_cancellations
                                  ORDER BY t.parked_at, t.topic, t.kafka_partition, t.kafka_offset), '{}')
          INTO v_released
          FROM taken AS t;
    END IF;
    v_m := cardinality(v_released);
    v_rel_end := array_fill(NULL::text, ARRAY[v_m]);
    v_rel_id := array_fill(NULL::integer, ARRAY[v_m]);
    v_rel_reason := array_fill(NULL::text, ARRAY[v_m]);
    v_rel_error := array_fill(NULL::text, ARRAY[v_m]);

    -- 7. Create the bookings that adopted no row; one whose external id has a row is a duplicate.
    FOR rec IN WITH created AS (
                   INSERT INTO bookings (user_id, room_id, number_of_guests, start_date, end_date, payment_id,
                                         status, external_id, created_at, updated_at)
                   SELECT v_uid[t.n], v_rid[t.n], p_guests[t.n], p_start[t.n], p_end[t.n], p_payment[t.n],
                          'Accepted', p_booking[t.n], now(), now()
                     FROM unnest(v_new) AS t(n)
                    WHERE v_end[t.n] IS NULL
                    ORDER BY t.n
                   ON CONFLICT (external_id) DO NOTHING
                   RETURNING id, external_id)
               SELECT t.n, c.id FROM created AS c JOIN unnest(v_new) AS t(n) ON c.external_id = p_booking[t.n]
    LOOP
        v_end[rec.n] := 'created';
        v_id[rec.n] := rec.id;
    END LOOP;
    FOREACH i IN ARRAY v_new LOOP
        IF v_end[i] IS NULL THEN
            v_end[i] := 'duplicate';
        END IF;
    END LOOP;

    -- 8. Cancel bookings: the released cancellations first (they came earlier), then the batch's
    -- own, each decided against its booking as the ones before it left it.
    IF v_m > 0 OR 'cancellation' = ANY (p_kind) THEN
        v_refs := ARRAY(SELECT (v_released[j]).booking_ref FROM generate_subscripts(v_released, 1) AS j
                        UNION ALL
                        SELECT p_booking[t.n] FROM generate_series(1, v_n) AS t(n)
                         WHERE p_kind[t.n] = 'cancellation' AND v_end[t.n] IS NULL);
        v_rids := ARRAY(SELECT b.id FROM bookings b WHERE b.external_id = ANY (v_refs)
                        UNION
                        SELECT b.id FROM bookings b
                         WHERE b.id = ANY (ARRAY(SELECT booking_worker.row_id(x) FROM unnest(v_refs) AS x)));
        FOR rec IN WITH request AS (
                SELECT r.*, booking_worker.row_id(r.ref) AS rid
                  FROM (SELECT j AS k, NULL::integer AS n, j AS rel, (v_released[j]).booking_ref AS ref,
                               (v_released[j]).user_ref AS uref,
                               booking_worker.resolve_user_id((v_released[j]).user_ref) AS uid
                          FROM generate_subscripts(v_released, 1) AS j
                        UNION ALL
                        SELECT v_m + b.n::integer, b.n::integer, NULL, b.id, b.u, v_uid[b.n::integer]
                          FROM unnest(p_kind, p_booking, p_user, v_end) WITH ORDINALITY AS b(kind, id, u, e, n)
                         WHERE b.kind = 'cancellation' AND b.e IS NULL) AS r),
            locked AS (
                SELECT b.id, b.external_id, b.user_id, b.status
                  FROM bookings b
                 WHERE b.id = ANY (v_rids)
                 ORDER BY b.id
                   FOR UPDATE),
            -- The external id names a booking first; an all-digit reference then its row id.
            target AS (
                SELECT q.*, coalesce(x.id, d.id) AS tid,
                       CASE WHEN x.id IS NOT NULL THEN x.user_id ELSE d.user_id END AS owner,
                       CASE WHEN x.id IS NOT NULL THEN x.status ELSE d.status END AS status
                  FROM request AS q
                  LEFT JOIN locked AS x ON x.external_id = q.ref
                  LEFT JOIN locked AS d ON d.id = q.rid)
            SELECT target.*,
                   coalesce(bool_or(uid = owner) OVER (PARTITION BY tid ORDER BY k
                                                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), false)
                       AS cancelled_before
              FROM target
             ORDER BY k
        LOOP
            IF rec.tid IS NULL THEN
                IF rec.n IS NULL THEN
                    v_repark := v_repark || rec.rel;
                ELSE
                    v_park := v_park || rec.n;
                END IF;
                CONTINUE;
            END IF;
            v_r := NULL;
            v_x := NULL;
            IF rec.uid IS NULL THEN
                v_r := 'unknown_user';
                v_x := format('no user has id, email or username %s', to_json(rec.uref));
            ELSIF rec.uid <> rec.owner THEN
                v_r := 'unauthorized';
                v_x := format('user %s does not own booking %s', to_json(rec.uref), to_json(rec.ref));
            ELSIF rec.status = 'Accepted' AND NOT rec.cancelled_before THEN
                v_cancel := v_cancel || rec.tid;
                v_e := 'cancelled';
            ELSIF rec.status IN ('Accepted', 'Cancelled') THEN
                v_e := 'already_cancelled';
            ELSE
                v_r := 'not_cancellable';
                v_x := format('booking %s is %s; only Accepted bookings can be cancelled', to_json(rec.ref), rec.status);
            END IF;
            IF v_r IS NOT NULL THEN
                v_e := 'dead_lettered';
            END IF;
            IF rec.n IS NOT NULL THEN
                v_end[rec.n] := v_e;
                v_id[rec.n] := rec.tid;
                v_reason[rec.n] := v_r;
                v_error[rec.n] := v_x;
            ELSE
                v_rel_end[rec.rel] := v_e;
                v_rel_id[rec.rel] := rec.tid;
                v_rel_reason[rec.rel] := v_r;
                v_rel_error[rec.rel] := v_x;
            END IF;
        END LOOP;
        IF cardinality(v_cancel) > 0 THEN
            UPDATE bookings SET status = 'Cancelled', updated_at = now()
             WHERE id = ANY (v_cancel) AND status = 'Accepted';
        END IF;
    END IF;

    -- 9. A cancellation whose booking does not exist yet is parked until it comes (one released
    -- again keeps the time it was first parked, so it still expires), unless it is a dead letter
    -- already: a replay after it expired.
    IF cardinality(v_park) + cardinality(v_repark) > 0 THEN
        FOR i IN SELECT t.n FROM unnest(v_park) AS t(n)
                   JOIN booking_worker.dead_letters d
                     ON d.topic = p_topic[t.n] AND d.kafka_partition = p_partition[t.n]
                    AND d.kafka_offset = p_offset[t.n]
        LOOP
            v_end[i] := 'already_dead_lettered';
        END LOOP;
        FOR i IN SELECT t.j FROM unnest(v_repark) AS t(j)
                   JOIN booking_worker.dead_letters d
                     ON d.topic = (v_released[t.j]).topic AND d.kafka_partition = (v_released[t.j]).kafka_partition
                    AND d.kafka_offset = (v_released[t.j]).kafka_offset
        LOOP
            v_rel_end[i] := 'already_dead_lettered';
        END LOOP;
        INSERT INTO booking_worker.pending_cancellations
               (topic, kafka_partition, kafka_offset, record_key, payload, baggage, booking_ref, user_ref, parked_at)
        SELECT p_topic[t.n], p_partition[t.n], p_offset[t.n], p_key[t.n], p_payload[t.n], p_baggage[t.n],
               p_booking[t.n], p_user[t.n], now()
          FROM unnest(v_park) AS t(n) WHERE v_end[t.n] IS NULL
        UNION ALL
        SELECT p.topic, p.kafka_partition, p.kafka_offset, p.record_key, p.payload, p.baggage,
               p.booking_ref, p.user_ref, p.parked_at
          FROM unnest(v_repark) AS t(j), LATERAL (SELECT (v_released[t.j]).*) AS p
         WHERE v_rel_end[t.j] IS NULL
        ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING;
        FOREACH i IN ARRAY v_park LOOP
            v_end[i] := coalesce(v_end[i], 'parked');
        END LOOP;
        FOREACH i IN ARRAY v_repark LOOP
            v_rel_end[i] := coalesce(v_rel_end[i], 'parked');
        END LOOP;
    END IF;

    -- 10. The dead letters of the batch and of the released cancellations.
    IF 'dead_lettered' = ANY (v_end || v_rel_end) THEN
        INSERT INTO booking_worker.dead_letters
               (topic, kafka_partition, kafka_offset, record_key, payload, baggage, booking_id, reason, error,
                sqlstate)
        SELECT p_topic[t.n], p_partition[t.n], p_offset[t.n], p_key[t.n], p_payload[t.n], p_baggage[t.n],
               p_booking[t.n], v_reason[t.n], v_error[t.n], p_sqlstate[t.n]
          FROM generate_series(1, v_n) AS t(n) WHERE v_end[t.n] = 'dead_lettered'
        UNION ALL
        SELECT p.topic, p.kafka_partition, p.kafka_offset, p.record_key, p.payload, p.baggage,
               p.booking_ref, v_rel_reason[t.j], v_rel_error[t.j], NULL
          FROM generate_subscripts(v_released, 1) AS t(j), LATERAL (SELECT (v_released[t.j]).*) AS p
         WHERE v_rel_end[t.j] = 'dead_lettered'
        ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING;
    END IF;

    -- 11. Every record's end, in order; then each released cancellation with its end; then, when
    -- a full page came out, the bookings that may have more parked.
    RETURN QUERY
        SELECT 'record', t.n, v_end[t.n], v_id[t.n], v_reason[t.n], v_error[t.n], p_sqlstate[t.n],
               NULL::text, NULL::text, NULL::text, NULL::integer, NULL::bigint, NULL::bytea, NULL::bytea,
               NULL::text, NULL::timestamptz
          FROM generate_series(1, v_n) AS t(n);
    RETURN QUERY
        SELECT 'released', t.j, v_rel_end[t.j], v_rel_id[t.j], v_rel_reason[t.j], v_rel_error[t.j], NULL::text,
               p.booking_ref, p.user_ref, p.topic, p.kafka_partition, p.kafka_offset, p.record_key, p.payload,
               p.baggage, p.parked_at
          FROM generate_subscripts(v_released, 1) AS t(j), LATERAL (SELECT (v_released[t.j]).*) AS p;
    IF v_m >= p_page THEN
        RETURN QUERY
            SELECT 'more', NULL::integer, NULL::text, NULL::integer, NULL::text, NULL::text, NULL::text,
                   x, NULL::text, NULL::text, NULL::integer, NULL::bigint, NULL::bytea, NULL::bytea, NULL::text,
                   NULL::timestamptz
              FROM unnest(v_releasing) AS x;
    END IF;
END
$$;
