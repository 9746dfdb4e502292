"""Servable artefacts: SavedModels on encoded image bytes, the TF Serving layout, TFLite.

- `export_embedder` / `export_retrieval`: SavedModels whose signatures take JPEG/PNG bytes
  (`serving_default`/`embed` → embeddings; `search` → top-k ids and scores).
- `export_and_push` / `push`: `saved_models/<name>/<version>/` with warmup requests and a model
  card, promoted only through a blessing gate (`export_candidate` writes one without pushing it;
  `bless` with `serving_card` is the gate alone).
- `export_tflite` / `tflite_parity`: fp32, dynamic-range and int8 TFLite embedders, and how close
  they are to the Keras model.
- `model_record` / `model_fingerprint`: which SavedModel made a set of vectors (an index keeps it).
"""

from fgkeras.export.fingerprint import model_fingerprint, model_record

from fgkeras.export.saved_model import (
    DECODED_SIGNATURE,
    EMBED_SIGNATURES,
    FLAVOURS,
    SEARCH_SIGNATURE,
    export_embedder,
    export_retrieval,
    graph_op_types,
    load_saved_model,
    retrieval_signature_k,
    signature_summary,
)
from fgkeras.export.serving_layout import (
    PushResult,
    bless,
    build_model_card,
    export_and_push,
    export_candidate,
    latest_version,
    list_versions,
    next_version,
    push,
    read_model_card,
    read_warmup_requests,
    serving_card,
    write_model_card,
    write_warmup_requests,
)
from fgkeras.export.tflite import (
    MODES,
    TFLiteEmbedder,
    convert_tflite,
    export_tflite,
    export_tflite_variants,
    tflite_parity,
)

__all__ = [
    "DECODED_SIGNATURE",
    "EMBED_SIGNATURES",
    "FLAVOURS",
    "MODES",
    "PushResult",
    "SEARCH_SIGNATURE",
    "TFLiteEmbedder",
    "bless",
    "build_model_card",
    "convert_tflite",
    "export_and_push",
    "export_candidate",
    "export_embedder",
    "export_retrieval",
    "export_tflite",
    "export_tflite_variants",
    "graph_op_types",
    "latest_version",
    "list_versions",
    "load_saved_model",
    "model_fingerprint",
    "model_record",
    "next_version",
    "push",
    "read_model_card",
    "read_warmup_requests",
    "retrieval_signature_k",
    "serving_card",
    "signature_summary",
    "tflite_parity",
    "write_model_card",
    "write_warmup_requests",
]
