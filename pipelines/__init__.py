"""Pipelines that use fgkeras (never imported by it): batch embedding of large galleries with Apache Beam.

`pipelines.embed_gallery`: images → a SavedModel's `embed` signature → sharded embeddings, index
shards and one merged index, on any Beam runner. Needs an environment of its own
(`pipelines/requirements.txt`, protobuf 6; see docs/scale_out.md).
"""
