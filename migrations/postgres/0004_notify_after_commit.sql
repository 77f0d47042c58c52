-- The per-statement NOTIFY trigger serialized every append on the notification queue lock
-- and halved append throughput at 32 writers (bench/README.md). The service now sends one
-- NOTIFY per burst of appends, after they committed (EventStore::notify_appends).
DROP TRIGGER events_appended ON events;
DROP FUNCTION notify_events_appended();
