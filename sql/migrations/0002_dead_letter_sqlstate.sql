-- The SQLSTATE of a record the database refused, in a column of its own, so that dead letters
-- can be told apart by the server's code rather than by the text of its message.

ALTER TABLE booking_worker.dead_letters ADD COLUMN IF NOT EXISTS sqlstate CHAR(5);
