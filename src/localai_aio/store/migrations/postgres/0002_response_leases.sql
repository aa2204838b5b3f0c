-- A background response is owned by the replica running it, through a lease it renews; when the
-- replica dies the lease runs out and any replica marks the response failed. A cancel asked for on
-- another replica reaches the owner through cancel_requested.
ALTER TABLE responses
    ADD COLUMN owner TEXT,
    ADD COLUMN lease_until DOUBLE PRECISION,
    ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX responses_unfinished ON responses (status) WHERE status IN ('queued', 'in_progress');
