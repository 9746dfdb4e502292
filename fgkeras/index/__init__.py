"""Searchable indexes of embeddings: exact brute force and ScaNN, one interface, atomic save / checked load.

```python
from fgkeras.index import Index, ScannIndex

index = ScannIndex().build(embeddings, ids)       # configured from len(ids)
ids_, scores = index.search(queries, k=10)
index.upsert(["sku-123"], new_embedding[None])     # visible to the next search
index.delete(["sku-042"])
index.save("gallery.index")                        # atomic
index = Index.load("gallery.index")                # checked; returns a ScannIndex
```
"""

from fgkeras.index.base import FORMAT_VERSION, Index, IndexFormatError, read_manifest, recall_at_k
from fgkeras.index.exact import ExactIndex, exact_search
from fgkeras.index.scann_index import ScannIndex, default_mode
from fgkeras.index.scann_tuning import best_seconds

__all__ = ["FORMAT_VERSION", "ExactIndex", "Index", "IndexFormatError", "ScannIndex", "best_seconds",
           "default_mode", "exact_search", "read_manifest", "recall_at_k"]
