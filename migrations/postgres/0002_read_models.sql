-- Read models maintained by the projector. Each row carries the JSON document the query API
-- serves plus the columns it filters on; last_sequence makes re-applied events no-ops.
CREATE TABLE order_status_view
(
    order_id      uuid PRIMARY KEY,
    last_sequence bigint NOT NULL,
    document      jsonb  NOT NULL
);

CREATE TABLE pet_catalog_view
(
    pet_id        text PRIMARY KEY,
    category      text   NOT NULL,
    price_minor   bigint NOT NULL,
    availability  text   NOT NULL,
    last_sequence bigint NOT NULL,
    document      jsonb  NOT NULL
);

CREATE INDEX pet_catalog_view_category ON pet_catalog_view (category, pet_id);
