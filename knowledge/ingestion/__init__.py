"""The ingestion pipeline: extract -> chunk -> embed in batches -> store -> ``indexed``.

``ingest_documents`` serves both the RQ job (one document) and bulk imports (many): documents
are prepared one by one, their chunks are embedded together in large groups (the encoder is
the bottleneck and batches of tiny documents would waste it), and each document is stored in
its own transaction (chunks, vectors, postings, collection statistics, status, usage event), so
a failure never leaves a half-indexed document. A document's chunks are written by one statement
(re-indexing first removes the old ones in the same transaction); a group is stored on a second
thread while the next group is embedded, by one encoder thread fewer until it is stored
(``_EncoderThreads``).

Progress is written as it goes (outside that transaction, so pages and the API see it):
extraction and chunking take it to 20 %, embedding to 95 %, storing to 100 %.

The package's modules follow those steps: ``preparation`` (extract and chunk one document),
``encoding`` (embed a group's chunks, the encoder's threads), ``storage`` (the SQL that indexes a
document, the store thread) and ``pipeline`` (``ingest_documents``, which runs them in turn).
The names other apps use are re-exported here; the private ones (and the tests' patch points)
live in their modules.
"""

from __future__ import annotations

from knowledge.ingestion.pipeline import IngestReport, ProgressCallback, documents_start, ingest_documents
from knowledge.ingestion.preparation import Prepared, document_fail, prepare, record_text
from knowledge.ingestion.storage import chunks_delete, store

__all__ = [
    "IngestReport",
    "Prepared",
    "ProgressCallback",
    "chunks_delete",
    "document_fail",
    "documents_start",
    "ingest_documents",
    "prepare",
    "record_text",
    "store",
]
