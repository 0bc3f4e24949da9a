"""The medial store: what each candidate's heads consume, plus the backbone's softmax, in checksummed shards.

``store`` (layout, meta, errors), ``budget`` (bytes per row), ``shards`` (the file format), ``writer``
(recording, one writer per process) and ``dataset`` (the read-only view training streams from).
"""
from selfxit.fit.medial.budget import DEFAULT_ROW_BUDGET, FULL_MAPS, MedialBudgetError, plan_storage, stored_bytes
from selfxit.fit.medial.dataset import MedialDataset
from selfxit.fit.medial.store import (
                                      FORMAT_VERSION,
                                      SHARD_BYTES,
                                      SPLITS,
                                      MedialIncompleteWarning,
                                      MedialMeta,
                                      MedialShardError,
                                      MedialStoreError,
                                      create_medial,
)
from selfxit.fit.medial.writer import MedialWriter, finalize_medial

__all__ = ["DEFAULT_ROW_BUDGET", "FORMAT_VERSION", "FULL_MAPS", "SHARD_BYTES", "SPLITS", "MedialBudgetError",
           "MedialDataset", "MedialIncompleteWarning", "MedialMeta", "MedialShardError", "MedialStoreError",
           "MedialWriter", "create_medial", "finalize_medial", "plan_storage", "stored_bytes"]
