-- 003: the knowledge base (DataType.KNOWLEDGE_BASE): pgvector embeddings next to JSONB values.
-- Applied only where the server offers pgvector: a PostgreSQL without it (the system
-- PostgreSQL 15 of the external CI lane) records this migration and creates nothing, and
-- msstore.layers.VectorStore then says the extension is missing instead of failing obscurely.
-- EXECUTE keeps the vector type out of the function body, which must parse without pgvector.
--
-- embedding is an unconstrained vector so any embedder's dimension fits (the built-in one
-- has 256). Search is exact (a sequential scan per collection): right for teaching-sized
-- collections. For large ones add an HNSW index on a fixed dimension, e.g.
--   CREATE INDEX ON knowledge.documents
--     USING hnsw ((embedding::vector(256)) vector_cosine_ops) WHERE collection = 'kb';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector') THEN
        EXECUTE 'CREATE EXTENSION IF NOT EXISTS vector';
        EXECUTE 'CREATE SCHEMA IF NOT EXISTS knowledge';
        EXECUTE $ddl$
            CREATE TABLE IF NOT EXISTS knowledge.documents (
                collection TEXT        NOT NULL,
                key        TEXT        NOT NULL,
                content    TEXT        NOT NULL,
                value      JSONB       NOT NULL,
                embedding  vector      NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (collection, key)
            )
        $ddl$;
        EXECUTE 'CREATE INDEX IF NOT EXISTS idx_documents_value_gin '
                'ON knowledge.documents USING gin (value)';
    END IF;
END
$$;
