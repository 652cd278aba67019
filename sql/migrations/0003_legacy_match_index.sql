-- Adoption of the rows the Go worker wrote: they carry no external id. A booking event whose
-- external id matches no row looks for such a row with its user, room, guests, payment id and
-- dates. This partial index holds only rows without an external id, so the look-up stays cheap,
-- and the rows the worker writes (which always have one) never enter it.

CREATE INDEX CONCURRENTLY IF NOT EXISTS bookings_legacy_match_idx ON bookings (room_id, user_id) WHERE external_id IS NULL;
