-- 009: the knowledge base grows up (issue 13): who embedded each row, full-text search beside
-- the vectors, and approximate (HNSW) indexes for the two dimensions msstore ships embedders
-- for. Like 003, it does nothing where the server has no pgvector (knowledge.documents was
-- never created there), so the schema still applies on the external PostgreSQL 15.
--
-- embedder: the name of the embedder that made the row's vector (HashingEmbedder: 'hashing-256',
--   MiniLMEmbedder: 'sentence-transformers/all-MiniLM-L6-v2'). Searches compare a query only
--   with rows of the same embedder: two models of the same dimension give vectors whose cosine
--   means nothing, and pgvector cannot tell them apart. Rows written before 009 keep NULL
--   ("not recorded") and are still compared by dimension, as they were.
-- tsv: the English full-text vector of content, kept by PostgreSQL itself (a stored generated
--   column, so no write path can forget it), with a GIN index for the keyword half of hybrid
--   search (VectorStore.hybrid_search fuses it with the vector ranking by reciprocal rank).
--
-- The embedding column stays an unconstrained vector (003), so every embedder still fits and no
-- existing row is rewritten. An HNSW index needs one fixed dimension, hence one partial
-- expression index per dimension: rows of that dimension only, cast to vector(N). A query uses
-- it when it orders by the same expression and repeats the predicate (msstore.layers.vectors).
--
-- HNSW build parameters (pgvector's defaults, chosen after measuring, see benchmarks/knowledge):
--   m = 16               links per node and layer. More links: better recall at a given
--                        ef_search, but a bigger index (about m * 8 bytes per row and layer) and
--                        slower builds; 16 is the usual choice for 256-768 dimensions.
--   ef_construction = 64 the candidate list while inserting: how hard the build looks for each
--                        node's true neighbours. Higher gives a better graph and slower builds;
--                        it must be at least 2 * m.
-- At query time hnsw.ef_search (VectorStore(ef_search=...), 100 by default, pgvector's is 40)
-- is the candidate list of a search: the recall-versus-latency knob, set per query with
-- SET LOCAL; it must be >= the LIMIT, or a search returns fewer rows than asked for.

DO $$
BEGIN
    IF to_regclass('knowledge.documents') IS NOT NULL THEN
        EXECUTE 'ALTER TABLE knowledge.documents ADD COLUMN IF NOT EXISTS embedder TEXT';
        EXECUTE 'ALTER TABLE knowledge.documents ADD COLUMN IF NOT EXISTS tsv tsvector '
                'GENERATED ALWAYS AS (to_tsvector(''english'', content)) STORED';
        EXECUTE 'CREATE INDEX IF NOT EXISTS idx_documents_tsv '
                'ON knowledge.documents USING gin (tsv)';
        EXECUTE 'CREATE INDEX IF NOT EXISTS idx_documents_hnsw_384 ON knowledge.documents '
                'USING hnsw ((embedding::vector(384)) vector_cosine_ops) '
                'WITH (m = 16, ef_construction = 64) WHERE vector_dims(embedding) = 384';
        EXECUTE 'CREATE INDEX IF NOT EXISTS idx_documents_hnsw_256 ON knowledge.documents '
                'USING hnsw ((embedding::vector(256)) vector_cosine_ops) '
                'WITH (m = 16, ef_construction = 64) WHERE vector_dims(embedding) = 256';
    END IF;
END
$$;
