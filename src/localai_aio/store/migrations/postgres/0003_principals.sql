-- Who made each assistant, file and stored response: the SHA-256 of the API key (never the key). A user
-- key sees only its own rows; rows made before this (or without keys) have none and are seen by admin
-- keys only. ("owner" is taken: it names the replica running a background response.)
ALTER TABLE assistants ADD COLUMN principal TEXT;
ALTER TABLE files ADD COLUMN principal TEXT;
ALTER TABLE responses ADD COLUMN principal TEXT;
CREATE INDEX assistants_principal ON assistants (principal, seq);
CREATE INDEX files_principal ON files (principal, seq);
