-- The console lists orders newest first, a page at a time: by the global position of the
-- event that placed each order (the first entry of its status history), unique and in commit
-- order whatever kind of id the order has.
CREATE INDEX order_status_view_placed
    ON order_status_view (((document->'status_history'->0->'position'->>'global_position')::bigint) DESC);
