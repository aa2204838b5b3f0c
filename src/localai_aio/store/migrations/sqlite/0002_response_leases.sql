-- A background response is owned by the process running it, through a lease it renews; a cancel asked
-- for elsewhere reaches the owner through cancel_requested.
ALTER TABLE responses ADD COLUMN owner TEXT;
ALTER TABLE responses ADD COLUMN lease_until REAL;
ALTER TABLE responses ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
CREATE INDEX responses_unfinished ON responses (status) WHERE status IN ('queued', 'in_progress');
