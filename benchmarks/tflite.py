"""TFLite fp32 / dynamic-range / int8 vs the SavedModel: batch-1 latency and Recall@1.

A small embedder is trained in the script (or loaded with `--model`), exported as a SavedModel
and as TFLite files, and evaluated on the unseen classes of the synthetic vehicles. Latency is
measured in a fresh process per thread count (TensorFlow fixes its thread pools at start-up),
round-robin over the variants so a load change on the machine hits all of them alike; the
SavedModel is timed on its `embed_decoded` signature (the same decoded uint8 input as TFLite)
and, for reference, on `embed` (encoded PNG bytes, decoding included).

Goals (issue 5): int8 >= 8x faster than the SavedModel at batch 1 with <= 1 point Recall@1
drop; fp32 TFLite within 1e-5 of the SavedModel.

    python benchmarks/tflite.py [--quick] [--model embedder.keras] [--save-model PATH]
                                [--set train.epochs=10 ...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import _common

# The synthetic data at its default difficulty leaves a short training run near chance (Recall@1
# ~0.06 over 24 classes), where a quality comparison means nothing; this easier setting reaches
# ~0.27 in 10 x 50 steps.
TRAIN_OVERRIDES = ["train.method=basic", "train.epochs=10", "train.steps_per_epoch=50",
                   "data.clutter=0.5", "data.pose_jitter=0.5", "data.occlusion_prob=0.1"]
QUICK_OVERRIDES = ["train.epochs=2", "train.steps_per_epoch=30"]
TFLITE_VARIANTS = {  # name: (mode, float_head)
    "tflite fp32": ("fp32", True),
    "tflite dynamic": ("dynamic", True),
    "tflite int8 (float head)": ("int8", True),
    "tflite int8 (all ops quantized)": ("int8", False),
}
SAVED_MODEL = "SavedModel embed_decoded"
SAVED_MODEL_BYTES = "SavedModel embed (PNG bytes)"


def _config(args):
    from fgkeras.configs import get_config, override

    config = get_config("baseline")
    override(config, TRAIN_OVERRIDES + (QUICK_OVERRIDES if args.quick else []) + args.set)
    return config


def _embedder(args, config, train_set):
    import keras

    import fgkeras.models  # noqa: F401  (registers the classes a .keras file names)
    from fgkeras import experiments

    if args.model:
        return keras.models.load_model(args.model), f"loaded from {args.model}"
    start = time.perf_counter()
    model, _ = experiments.train(config, train_set=train_set, verbose=2)
    seconds = time.perf_counter() - start
    if args.save_model:
        model.embedder.save(args.save_model)
    return model.embedder, (f"trained in the script: {config.train.method}, {config.train.epochs} x "
                            f"{config.train.steps_per_epoch} steps, {seconds:.0f} s")


def _export(embedder, directory, image_size, calibration):
    from fgkeras.export import export_embedder, export_tflite

    paths = {SAVED_MODEL: export_embedder(embedder, os.path.join(directory, "saved_model"), image_size)}
    for name, (mode, float_head) in TFLITE_VARIANTS.items():
        filename = name.replace("tflite ", "").split(" ")[0] + ("" if float_head else "_all") + ".tflite"
        start = time.perf_counter()
        paths[name] = export_tflite(embedder, os.path.join(directory, filename), image_size, mode=mode,
                                    representative_images=calibration if mode == "int8" else None,
                                    float_head=float_head)
        print(f"converted {name} in {time.perf_counter() - start:.1f} s", flush=True)
    return paths


def _quality(embedder, paths, test_set):
    from fgkeras.export import tflite_parity

    tflite = {name: path for name, path in paths.items() if name in TFLITE_VARIANTS}
    report = tflite_parity(embedder, tflite, test_set.images, test_set.labels, saved_model=paths[SAVED_MODEL])
    report[SAVED_MODEL] = report.pop("saved_model")
    return report


def _latency(directory, threads, rounds, calls):
    """Runs the latency worker in a fresh process with `threads` threads; returns {name: ms}."""
    command = [sys.executable, os.path.abspath(__file__), "--latency-worker", directory,
               "--threads", str(threads), "--rounds", str(rounds), "--calls", str(calls)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"latency worker ({threads} threads) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def latency_worker(args):
    """Median batch-1 latency (ms) of each variant, round-robin; prints one JSON line."""
    import tensorflow as tf

    (threads,) = args.threads
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import numpy as np

    from fgkeras.export import TFLiteEmbedder

    with open(os.path.join(args.latency_worker, "paths.json")) as f:
        paths = json.load(f)
    images = np.load(os.path.join(args.latency_worker, "images.npy"))
    encoded = [tf.io.encode_png(image).numpy() for image in images]
    loaded = tf.saved_model.load(paths[SAVED_MODEL])
    embed_decoded, embed = loaded.signatures["embed_decoded"], loaded.signatures["embed"]
    runners = {
        SAVED_MODEL: lambda i: embed_decoded(images=tf.constant(images[i:i + 1])),
        SAVED_MODEL_BYTES: lambda i: embed(images=tf.constant(encoded[i:i + 1])),
    }
    for name in TFLITE_VARIANTS:
        model = TFLiteEmbedder(paths[name], num_threads=threads)
        runners[name] = lambda i, model=model: model(images[i:i + 1])
    samples = {name: [] for name in runners}
    for name, run in runners.items():  # warm up
        for i in range(10):
            run(i % len(images))
    for i in range(args.rounds * args.calls):  # one call of each variant in turn: they share the load
        for name, run in runners.items():
            start = time.perf_counter()
            run(i % len(images))
            samples[name].append((time.perf_counter() - start) * 1000)
    print(json.dumps({name: {"median": statistics.median(values),
                             "p10": statistics.quantiles(values, n=10)[0]} for name, values in samples.items()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short training and fewer timing rounds")
    parser.add_argument("--model", help="a saved Embedder (.keras) to use instead of training one")
    parser.add_argument("--save-model", help="where to save the trained embedder (.keras)")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. train.epochs=5")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--latency-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.latency_worker:
        return latency_worker(args)
    rounds = args.rounds or (5 if args.quick else 25)

    import numpy as np

    from fgkeras import experiments
    from fgkeras.evaluation import format_table

    config = _config(args)
    train_set, test_set = experiments.load_data(config.data)
    embedder, provenance = _embedder(args, config, train_set)
    image_size = config.data.image_size
    rng = np.random.default_rng(0)
    calibration = train_set.images[rng.choice(len(train_set), min(args.calibration_images, len(train_set)),
                                              replace=False)]
    with tempfile.TemporaryDirectory() as directory:
        paths = _export(embedder, directory, image_size, calibration)
        sizes = {name: sum(os.path.getsize(os.path.join(parent, f)) for parent, _, files in os.walk(path)
                           for f in files) if os.path.isdir(path) else os.path.getsize(path)
                 for name, path in paths.items()}
        quality = _quality(embedder, paths, test_set)
        with open(os.path.join(directory, "paths.json"), "w") as f:
            json.dump(paths, f)
        np.save(os.path.join(directory, "images.npy"), test_set.images[:64])
        latency = {threads: _latency(directory, threads, rounds, args.calls) for threads in args.threads}

    reference = quality["reference"]["recall@1"]
    rows = []
    for threads in args.threads:
        base = latency[threads][SAVED_MODEL]["median"]
        for name in [SAVED_MODEL, SAVED_MODEL_BYTES, *TFLITE_VARIANTS]:
            q = quality.get(name, {})
            recall = q.get("recall@1", reference if name == SAVED_MODEL_BYTES else None)
            rows.append({
                "variant": name, "threads": threads, "ms": latency[threads][name]["median"],
                "p10": latency[threads][name]["p10"],
                "speedup": base / latency[threads][name]["median"], "mb": sizes.get(name, sizes[SAVED_MODEL]) / 1e6,
                **({"diff": q["max_abs_diff"]} if "max_abs_diff" in q else {}),
                **({"norm": q["max_norm_error"], "nn": q["nn_agreement"]} if "nn_agreement" in q else {}),
                **({"recall": recall, "drop": 100 * (reference - recall)} if recall is not None else {}),
            })
    headers = {"ms": "batch-1 ms (median)", "p10": "ms (p10)", "speedup": "× SavedModel", "mb": "size MB",
               "diff": "max abs diff vs Keras", "norm": "max ‖e‖−1", "nn": "same nearest neighbour",
               "recall": "Recall@1", "drop": "drop (points)"}
    formats = {"ms": "{:.3f}", "p10": "{:.3f}", "speedup": "{:.2f}", "mb": "{:.2f}", "diff": "{:.2e}",
               "norm": "{:.1e}", "nn": "{:.3f}", "recall": "{:.4f}", "drop": "{:+.2f}"}
    table = format_table(rows, keys=["variant", "threads", *headers], headers=headers, formats=formats)

    int8 = "tflite int8 (float head)"
    goals = []
    for threads in args.threads:
        speedup = latency[threads][SAVED_MODEL]["median"] / latency[threads][int8]["median"]
        goals.append(f"- int8 (float head) ≥ 8× faster than the SavedModel at batch 1, {threads} thread(s): "
                     f"{speedup:.2f}× — {'met' if speedup >= 8 else 'NOT met'}")
    drop = 100 * (reference - quality[int8]["recall@1"])
    goals.append(f"- int8 (float head) Recall@1 drop ≤ 1 point: {drop:+.2f} points "
                 f"({quality[int8]['recall@1']:.4f} vs {reference:.4f} over {len(test_set)} queries, "
                 f"one query = {100 / len(test_set):.2f} points) — {'met' if drop <= 1 else 'NOT met'}")
    fp32_diff = quality["tflite fp32"]["max_abs_diff_vs_saved_model"]
    goals.append(f"- fp32 TFLite within 1e-5 of the SavedModel: max abs diff {fp32_diff:.2e} — "
                 f"{'met' if fp32_diff <= 1e-5 else 'NOT met'}")
    setup = "\n".join([
        f"- embedder: resnet18 width {config.model.width}, {config.model.embedding_dim}-d, "
        f"{image_size} px; {provenance}",
        f"- data: SyntheticVehicles(seed={config.data.seed}), overrides {' '.join(TRAIN_OVERRIDES + args.set)}"
        + (" (quick)" if args.quick else ""),
        f"- evaluation: the {len(test_set)} images of the {len(np.unique(test_set.labels))} unseen classes, leave-one-out "
        f"Recall@1; reference (Keras) Recall@1 {reference:.4f}; SavedModel vs Keras max abs diff "
        f"{quality[SAVED_MODEL]['max_abs_diff']:.1e}",
        f"- int8 calibrated on {len(calibration)} training-class images; 'float head' keeps pooling, the "
        "embedding Dense(+BN) and L2 normalisation in float",
        f"- latency: {rounds * args.calls} batch-1 calls per variant, one call of each variant in turn (so they "
        "share the machine's load), median and 10th percentile; one process per thread count; absolute times on "
        "a shared 2-core machine are noise, ratios are the result",
    ])
    name = "tflite" if image_size == 64 else f"tflite_{image_size}px"  # 64 px: the default setting
    path = _common.write_results(name, [("Setup", setup), ("Results", table), ("Goals", "\n".join(goals))])
    print(table)
    print("\n".join(goals))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
