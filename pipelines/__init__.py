"""Pipelines that use fgkeras (never imported by it, but for `fgkeras.cli` dispatching `fgkeras pipeline`).

`pipelines.retrieval_pipeline`: the TFX-style pipeline of `fgkeras pipeline run`: ingest → train →
evaluate → bless → export → embed gallery → index → push, each step skipped when its inputs did not
change (docs/scale_out.md).

`pipelines.embed_gallery`: images → a SavedModel's `embed` signature → sharded embeddings, index
shards and one merged index, on any Beam runner. Needs an environment of its own
(`pipelines/requirements.txt`, protobuf 6; see docs/scale_out.md). `pipelines.embedding_records` is
the format of its embedding files, shared with in-process embedding.
"""
