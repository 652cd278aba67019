-- booking-management's schema: the users, rooms and bookings tables that this worker shares.
-- booking-management owns these tables; the worker never creates or alters them in production.
-- Local runs and tests load this file to stand in for booking-management.

CREATE TABLE IF NOT EXISTS users (
    id            SERIAL PRIMARY KEY,
    email         VARCHAR(255) NOT NULL UNIQUE,
    username      VARCHAR(255) NOT NULL UNIQUE,
    date_of_birth DATE,
    name          VARCHAR(255) NOT NULL,
    surname       VARCHAR(255) NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS rooms (
    id          SERIAL PRIMARY KEY,
    internal_id VARCHAR(255) NOT NULL UNIQUE,
    name        VARCHAR(255) NOT NULL,
    floor       INTEGER NOT NULL,
    bathrooms   INTEGER NOT NULL,
    beds        INTEGER NOT NULL,
    capacity    INTEGER NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS bookings (
    id               SERIAL PRIMARY KEY,
    user_id          INTEGER NOT NULL REFERENCES users (id),
    room_id          INTEGER NOT NULL REFERENCES rooms (id),
    number_of_guests INTEGER NOT NULL CHECK (number_of_guests > 0),
    start_date       DATE NOT NULL,
    end_date         DATE NOT NULL,
    payment_id       VARCHAR(255),
    status           VARCHAR(20) NOT NULL DEFAULT 'Accepted'
                     CHECK (status IN ('Accepted', 'Cancelled', 'Refused')),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT bookings_dates_check CHECK (end_date > start_date)
);

CREATE INDEX IF NOT EXISTS idx_bookings_user_id ON bookings (user_id);
CREATE INDEX IF NOT EXISTS idx_bookings_room_id ON bookings (room_id);
CREATE INDEX IF NOT EXISTS idx_bookings_status ON bookings (status);
CREATE INDEX IF NOT EXISTS idx_bookings_room_dates ON bookings (room_id, start_date, end_date);
