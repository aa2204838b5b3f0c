-- The tables of the SQLite store's first release. seq orders lists (ids are random).
CREATE TABLE assistants (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE files (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL
);
CREATE TABLE responses (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    history TEXT NOT NULL
);
CREATE TABLE response_items (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (response_id, id)
);
CREATE TABLE assistant_files (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    assistant_id TEXT NOT NULL REFERENCES assistants(id) ON DELETE CASCADE,
    file_id TEXT NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    UNIQUE (assistant_id, file_id)
);
CREATE INDEX files_purpose ON files (purpose, seq);
