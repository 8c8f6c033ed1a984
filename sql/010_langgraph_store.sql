-- 010: LangGraph's long-term memory (msstore.integrations.langgraph.MsstoreStore, issue 14).
-- One row per item. Several stores share the table, told apart by `store` (the MsstoreStore's
-- name). The namespace is its labels joined by '.' (LangGraph forbids '.' in a label, so the
-- join is exact), in the "C" collation: byte order, which is code-point order, so a namespace
-- prefix is a range of the primary key (('a','b') and below: namespace = 'a.b' or
-- 'a.b.' <= namespace < 'a.b/'), and listings sort the way Python sorts the tuples.
--
-- ttl_minutes / expires_at: LangGraph's TTL (put(ttl=…), TTLConfig.default_ttl, in minutes);
-- a read that refreshes (refresh_on_read) moves expires_at to now() + ttl_minutes. Reads never
-- return an expired row; the sweeper (TTLConfig.sweep_interval_minutes) deletes them, through
-- the partial index below.
--
-- Vectors for search(query=…) live in the knowledge base (knowledge.documents, migration 003),
-- collection 'langgraph:<store>', one row per embedded field; this file needs no pgvector.

CREATE SCHEMA IF NOT EXISTS langgraph;

CREATE TABLE IF NOT EXISTS langgraph.store_items (
    store       TEXT             NOT NULL,
    namespace   TEXT COLLATE "C" NOT NULL,
    key         TEXT             NOT NULL,
    value       JSONB            NOT NULL,
    created_at  TIMESTAMPTZ      NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ      NOT NULL DEFAULT now(),
    ttl_minutes DOUBLE PRECISION CHECK (ttl_minutes > 0),
    expires_at  TIMESTAMPTZ,
    PRIMARY KEY (store, namespace, key)
);

CREATE INDEX IF NOT EXISTS idx_store_items_value_gin
    ON langgraph.store_items USING gin (value jsonb_path_ops);
CREATE INDEX IF NOT EXISTS idx_store_items_expires
    ON langgraph.store_items (store, expires_at) WHERE expires_at IS NOT NULL;

-- The vectors of one item, found by its identity (searches score the items they filter, one
-- index lookup each; puts and sweeps drop the vectors of the items they replace or delete).
-- Like 003 and 009 it needs knowledge.documents, so it does nothing where pgvector is missing.
DO $$
BEGIN
    IF to_regclass('knowledge.documents') IS NOT NULL THEN
        EXECUTE 'CREATE INDEX IF NOT EXISTS idx_documents_langgraph_item ON knowledge.documents '
                '(collection, (value->>''ns''), (value->>''key''))';
    END IF;
END
$$;
