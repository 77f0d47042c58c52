-- Fencing tokens: each time a process becomes the holder of an exclusive lock (the active
-- instance of a projection), the lock's token goes up by one. Every checkpoint and read-model
-- write of a holder checks, in its own transaction, that its token is still the current one,
-- so a holder that lost its lock (connection dropped, process paused) cannot write after a
-- successor took over.
CREATE TABLE lock_fences
(
    name  text PRIMARY KEY,
    token bigint NOT NULL
);
