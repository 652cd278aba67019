-- The worker's own additions to the shared database. Additive only: an external-id column on
-- bookings, and the worker's tables in its own schema. booking-management's tables are never
-- rewritten.
--
-- Applied online, one statement at a time: each runs under a short lock_timeout and is retried
-- when it runs out, and the index on bookings is built CONCURRENTLY (an INVALID leftover of a
-- failed build is dropped and built again). Every statement can run twice.

ALTER TABLE bookings ADD COLUMN IF NOT EXISTS external_id VARCHAR(255);

CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS bookings_external_id_key ON bookings (external_id);

CREATE TABLE IF NOT EXISTS booking_worker.dead_letters (
    id              BIGSERIAL PRIMARY KEY,
    topic           TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset    BIGINT NOT NULL,
    record_key      BYTEA,
    payload         BYTEA NOT NULL,
    baggage         TEXT,
    booking_id      TEXT,
    reason          TEXT NOT NULL,
    error           TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    replayed_at     TIMESTAMPTZ,
    CONSTRAINT dead_letters_record_unique UNIQUE (topic, kafka_partition, kafka_offset)
);

CREATE INDEX IF NOT EXISTS dead_letters_reason_idx ON booking_worker.dead_letters (reason, id);

CREATE TABLE IF NOT EXISTS booking_worker.pending_cancellations (
    id              BIGSERIAL PRIMARY KEY,
    booking_ref     TEXT NOT NULL,
    user_ref        TEXT NOT NULL,
    topic           TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset    BIGINT NOT NULL,
    record_key      BYTEA,
    payload         BYTEA NOT NULL,
    baggage         TEXT,
    parked_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT pending_cancellations_record_unique UNIQUE (topic, kafka_partition, kafka_offset)
);

CREATE INDEX IF NOT EXISTS pending_cancellations_booking_idx ON booking_worker.pending_cancellations (booking_ref);

CREATE INDEX IF NOT EXISTS pending_cancellations_parked_idx ON booking_worker.pending_cancellations (parked_at);
