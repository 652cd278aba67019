-- Sample users and rooms for local runs and the demo. Safe to load twice.

INSERT INTO users (email, username, date_of_birth, name, surname) VALUES
    ('alice@example.com', 'user_123', '1990-04-12', 'Alice', 'Martin'),
    ('bob@example.com',   'bob',      '1985-11-02', 'Bob',   'Keller'),
    ('carol@example.com', 'carol',    '1979-06-30', 'Carol', 'Rossi'),
    ('dave@example.com',  'dave',     '2001-01-09', 'Dave',  'Okafor')
ON CONFLICT DO NOTHING;

INSERT INTO rooms (internal_id, name, floor, bathrooms, beds, capacity) VALUES
    ('room_ocean_001',  'Ocean View Suite',  1, 1, 2, 4),
    ('room_ocean_002',  'Ocean View Double', 1, 1, 1, 2),
    ('room_garden_101', 'Garden Room',       2, 1, 2, 3),
    ('room_city_201',   'City Loft',         3, 2, 3, 6)
ON CONFLICT DO NOTHING;
