"""Data the rerank tests use; the runner does not run them (they need a cross-encoder)."""

TEST_RERANK_QUERY_DOCS: list[dict] = []
