"""The gRPC retrieval server (TF Serving's PredictionService, a live inventory) and its client.

- `serve(model_dir, ...)` / `Server`: serves `saved_models/<name>/<version>/` over
  `tensorflow.serving.PredictionService` and `ModelService`, with hot reload of new versions,
  dynamic batching, limits, health checking and an optional live inventory
  (`fgkeras.serving.InventoryService`, `protos/inventory.proto`).
- `Client(target)`: `embed`, `search`, `upsert`, `delete`, on the standard stubs.
"""

from fgkeras.serving.batching import BatchingParameters, BatchScheduler, default_batch_threads
from fgkeras.serving.client import Client, encode_images
from fgkeras.serving.inventory import Inventory
from fgkeras.serving.server import Server, serve
from fgkeras.serving.signatures import Limits
from fgkeras.serving.status import ServingError

__all__ = [
    "BatchScheduler",
    "BatchingParameters",
    "Client",
    "Inventory",
    "Limits",
    "Server",
    "ServingError",
    "default_batch_threads",
    "encode_images",
    "serve",
]
