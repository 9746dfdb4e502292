"""The Beam pipeline (DirectRunner) vs the same SavedModel called in batches in-process: embedding throughput.

The same folder of JPEGs (synthetic vehicles) is embedded twice by one exported embedder: in-process
by `SavedModelEmbedder.embed_files` (what `fgkeras index` does: read, batch, call `embed`), and by
`pipelines.embed_gallery.run` on the DirectRunner (read, `BatchElements`, `embed` in a DoFn, then
the embeddings, index shards and dead letters written and the shards merged). Both times are wall
clock from loading the SavedModel to the last vector (Beam: to the merged index), one run each.

Goal (issue 15): Beam at 1 worker >= 0.8x the in-process throughput.

    python benchmarks/beam_embed.py [--images 2000] [--image-size 64] [--batch-size 64] [--workers 1]
"""

import argparse
import os
import sys
import tempfile
import time

import _common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pipelines/ from a checkout


def write_gallery(root, num_images, image_size, seed=0):
    """`num_images` synthetic vehicle JPEGs under `root/<class>/`."""
    import numpy as np
    import tensorflow as tf

    from fgkeras.data import SyntheticVehicles

    per_class = 40
    vehicles = SyntheticVehicles(seed=seed, image_size=image_size, images_per_class=per_class, models_per_make=6,
                                 unseen_fraction=0.0, num_makes=max(1, -(-num_images // (per_class * 6))))
    arrays = vehicles.arrays("train")
    images, labels = arrays["image"][:num_images], arrays["label"][:num_images]
    if len(images) < num_images:
        raise ValueError(f"the synthetic train split holds {len(images)} images, fewer than {num_images}")
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, f"class_{label:03d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(tf.io.encode_jpeg(np.asarray(image, np.uint8)).numpy())
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="DirectRunner workers (in-memory, one process)")
    args = parser.parse_args()

    import numpy as np

    from fgkeras.data.sources import gallery_files
    from fgkeras.export import export_embedder
    from fgkeras.export.saved_model import SavedModelEmbedder
    from fgkeras.models import build_embedder
    from pipelines import embed_gallery

    with tempfile.TemporaryDirectory(prefix="beam-embed-") as work:
        gallery = write_gallery(os.path.join(work, "gallery"), args.images, args.image_size)
        embedder = build_embedder(width=0.5, embedding_dim=64, image_size=args.image_size)
        model = export_embedder(embedder, os.path.join(work, "saved_models", "bench", "1"), args.image_size)

        start = time.perf_counter()
        local = SavedModelEmbedder(model, args.batch_size)
        ids, vectors, corrupt = local.embed_files(gallery_files(gallery), progress=False)
        in_process = time.perf_counter() - start

        out = os.path.join(work, "out")
        start = time.perf_counter()
        report = embed_gallery.run(model, gallery, out, batch_size=args.batch_size,
                                   beam_args=[f"--direct_num_workers={args.workers}"])
        beam = time.perf_counter() - start

        beam_ids, beam_vectors = embed_gallery.read_embeddings(out)
        order = np.argsort(ids)
        same = beam_ids == [ids[i] for i in order]
        max_diff = float(np.abs(beam_vectors - vectors[order]).max()) if same else float("nan")

    rows = {
        "in-process SavedModel, batches": {"images": len(ids), "seconds": in_process,
                                           "images_per_s": len(ids) / in_process, "ratio": 1.0},
        f"Beam DirectRunner, {args.workers} worker(s)": {"images": report.embedded, "seconds": beam,
                                                        "images_per_s": report.embedded / beam,
                                                        "ratio": (report.embedded / beam) / (len(ids) / in_process)},
    }
    table = _common.markdown_table(rows, [("images", "images", "{}"), ("seconds", "seconds", "{:.1f}"),
                                          ("images_per_s", "images/s", "{:.1f}"), ("ratio", "× in-process", "{:.2f}")])
    ratio = rows[f"Beam DirectRunner, {args.workers} worker(s)"]["ratio"]
    goal = (f"- Beam at {args.workers} worker(s) ≥ 0.8× the in-process throughput: {ratio:.2f}× — "
            f"{'met' if ratio >= 0.8 else 'NOT met'}")
    setup = "\n".join([
        f"- {args.images} synthetic vehicle JPEGs of {args.image_size} px in a folder; resnet18 width 0.5, "
        f"64-d embedder (random weights), exported with `export_embedder`; batches of {args.batch_size}",
        "- in-process: `SavedModelEmbedder.embed_files` (as `fgkeras index`); Beam: `pipelines.embed_gallery.run` "
        "(embeddings, 4 index shards, dead letters written, shards merged); wall clock, model load included, one run "
        "each; absolute times on a shared 2-core machine are noise, the ratio is the result",
        f"- same ids: {same}; max |Beam − in-process| {max_diff:.1e}; dead letters {report.dead_letters}, corrupt "
        f"in-process {len(corrupt)}",
    ])
    path = _common.write_results("beam_embed", [("Setup", setup), ("Results", table), ("Goal", goal)])
    print(table)
    print(goal)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
