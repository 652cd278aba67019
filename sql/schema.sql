-- booking-management's schema, exactly as production runs it: the users, rooms and bookings
-- tables that this worker shares. booking-management owns these tables; the worker never creates
-- or alters them in production (its own additions are in sql/migrations/). Local runs and tests
-- load this file to stand in for booking-management, so that they meet the same types, widths,
-- nullability, defaults, constraints and indexes.

CREATE TABLE IF NOT EXISTS users (
    id            SERIAL PRIMARY KEY,
    email         VARCHAR(255) UNIQUE NOT NULL,
    username      VARCHAR(100) UNIQUE NOT NULL,
    date_of_birth DATE NOT NULL,
    name          VARCHAR(100) NOT NULL,
    surname       VARCHAR(100) NOT NULL,
    created_at    TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at    TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS rooms (
    id          SERIAL PRIMARY KEY,
    internal_id VARCHAR(50) UNIQUE NOT NULL,
    name        VARCHAR(255) NOT NULL,
    floor       INTEGER NOT NULL,
    bathrooms   INTEGER NOT NULL,
    beds        INTEGER NOT NULL,
    capacity    INTEGER NOT NULL,
    created_at  TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at  TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS bookings (
    id               SERIAL PRIMARY KEY,
    user_id          INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    room_id          INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    number_of_guests INTEGER NOT NULL,
    start_date       DATE NOT NULL,
    end_date         DATE NOT NULL,
    payment_id       VARCHAR(255),
    status           VARCHAR(50) NOT NULL DEFAULT 'Accepted',
    created_at       TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at       TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT check_guest_count CHECK (number_of_guests > 0),
    CONSTRAINT check_dates CHECK (end_date > start_date),
    CONSTRAINT check_status CHECK (status IN ('Accepted', 'Cancelled', 'Refused'))
);

CREATE INDEX IF NOT EXISTS idx_users_email ON users (email);
CREATE INDEX IF NOT EXISTS idx_users_username ON users (username);
CREATE INDEX IF NOT EXISTS idx_rooms_internal_id ON rooms (internal_id);
CREATE INDEX IF NOT EXISTS idx_bookings_user_id ON bookings (user_id);
CREATE INDEX IF NOT EXISTS idx_bookings_room_id ON bookings (room_id);
CREATE INDEX IF NOT EXISTS idx_bookings_dates ON bookings (start_date, end_date);
