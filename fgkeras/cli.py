"""The `fgkeras` command line: parse, call library functions, print."""

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys

from fgkeras import _native_logs

logger = logging.getLogger("fgkeras")

def _config(args):
    from fgkeras import configs

    config = configs.load_config(args.config)
    if getattr(args, "method", None):
        config.train.method = args.method
    if args.smoke:
        configs.smoke(config)
    configs.override(config, args.set)
    if getattr(args, "out", None) and not config.train.log_dir:  # TensorBoard logs beside the run
        config.train.log_dir = os.path.join(args.out, "tensorboard")
    return config


def _add_config_arguments(parser, default_config):
    parser.add_argument("--config", default=default_config,
                        help="experiment configuration: a name, or a JSON file (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="shrink everything to seconds")


def cmd_train(args):
    from fgkeras import evaluation, experiments

    if args.method == "viewgan":
        return _train_viewgan(args)
    if args.method == "fggan" and args.config == "baseline":
        args.config = "fggan"
    config = _config(args)
    train_set, test_set = experiments.load_data(config.data)
    print(f"Training {config.train.method} on {len(train_set)} images of {train_set.num_classes} classes")
    model, _ = experiments.train(config, train_set=train_set)
    metrics = experiments.evaluate(model.embedder, test_set, config)
    os.makedirs(args.out, exist_ok=True)
    model.save(os.path.join(args.out, "model.keras"))
    embedder = experiments.save_embedder(model.embedder, args.out)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": config.to_dict(), "method": config.train.method, "metrics": metrics,
                   "embedder": embedder}, f, indent=2)
    print(evaluation.format_table([{"method": config.train.method, **metrics}]))
    print(f"Saved the model and the embedder in {args.out}")
    _print_report(args.out)


def _print_report(run_dir):
    from fgkeras import viz

    print(f"Report written to {viz.write_report(run_dir)}")


def _train_viewgan(args):
    from fgkeras import configs
    from fgkeras.evaluation import identity, viewgan

    if args.config == "baseline":
        args.config = "viewgan"
    config = _config(args)
    if args.smoke:
        configs.override(viewgan.viewgan_smoke(config), args.set)
    _, train_arrays, unseen_arrays = viewgan.viewgan_data(config)
    print(f"Training ViewGAN ({config.train.variant}) on {len(train_arrays['label'])} images of "
          f"{len(set(train_arrays['label'].tolist()))} classes in {len(train_arrays['views'])} views")
    game, _ = viewgan.train_viewgan(config, train_arrays)
    extractor, classifier = viewgan.judges(config, train_arrays, unseen_arrays)
    results = viewgan.evaluate_viewgan(game, config, unseen_arrays, extractor, classifier, few_shot=False)
    os.makedirs(args.out, exist_ok=True)
    game.save(os.path.join(args.out, "model.keras"))
    game.generator.save(os.path.join(args.out, "generator.keras"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": config.to_dict(), "identity": results["identity"]}, f, indent=2)
    print(identity.format_identity_rows({config.train.variant: results["identity"]}))
    print(f"Saved the game and G in {args.out} (ViewGAN has no retrieval embedder to export)")


def cmd_augment(args):
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from fgkeras.data import IMAGE_EXTENSIONS

    game = _load_model(args.model)
    if not hasattr(game, "augment"):
        raise SystemExit(f"--model must be a ViewGAN game saved by `fgkeras train --method viewgan`: {args.model}")
    views = [int(v) for v in args.views.split(",")] if args.views else None
    size = game.image_shape[0]
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(args.input) for name in names
                   if name.lower().endswith(tuple(IMAGE_EXTENSIONS)))
    if not paths:
        raise SystemExit(f"No images under --input {args.input}")
    written = 0
    for i, path in enumerate(tqdm(paths, desc="augmenting", unit="image")):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
        generated, _, _ = game.augment(pixels[None], per_image=args.per_image, views=views, seed=i)
        relative = os.path.splitext(os.path.relpath(path, args.input))[0]
        os.makedirs(os.path.dirname(os.path.join(args.output, relative)) or args.output, exist_ok=True)
        for j, out in enumerate(generated):
            Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8)).save(
                os.path.join(args.output, f"{relative}_view{j:02d}.png"))
            written += 1
    print(f"Wrote {written} generated images for {len(paths)} inputs under {args.output}")


def cmd_evaluate(args):
    from fgkeras import evaluation, experiments

    config = _config(args)
    model = _load_model(args.model)
    embedder = getattr(model, "embedder", model)
    _, test_set = experiments.load_data(config.data)
    metrics = experiments.evaluate(embedder, test_set, config)
    print(evaluation.format_table([{"model": os.path.basename(args.model), **metrics}]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        saved = experiments.save_embedder(embedder, args.out)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"config": config.to_dict(), "method": os.path.splitext(os.path.basename(args.model))[0],
                       "metrics": metrics,
                       "model": os.path.abspath(args.model), "embedder": saved}, f, indent=2)
        _print_report(args.out)


def _demo_viewgan(args):
    from fgkeras import configs
    from fgkeras.evaluation import viewgan

    config = viewgan.viewgan_smoke(configs.get_config("viewgan"))
    configs.override(config, args.set)
    print(f"fgkeras demo: ViewGAN ({config.train.variant}), {config.train.epochs} epochs × "
          f"{config.train.steps_per_epoch} steps at {config.data.image_size} px, then the few-shot table")
    results = viewgan.run_viewgan_demo(config, args.out)
    print(results["table"])
    print(f"View grid written to {results['grid']}")
    _print_report(args.out)


# The retrieval demos by `--method`: (config used for the default "demo", what it trains side by
# side, the method whose embedder is exported — None: the best by Recall@1 —, what it says).
DEMO_METHODS = {
    "htg": ("demo", ("triplet_random", "triplet_batch_hard", "htg"), None, "random triplets, batch-hard and HTG"),
    "fggan": ("fggan_demo", ("softmax_nobias", "fggan"), "fggan",
              "S alone (no-bias softmax) and FGGAN (S pre-trained, then the game; S∘G exported)"),
}


def cmd_demo(args):
    from fgkeras import experiments

    method = getattr(args, "demo_method", "htg")
    if method == "viewgan":
        return _demo_viewgan(args)
    default_config, methods, export_method, description = DEMO_METHODS[method]
    if args.config == "demo":
        args.config = default_config
    config = _config(args)
    print(f"fgkeras demo: {description}, {config.train.epochs} epochs × "
          f"{config.train.steps_per_epoch} steps each, on synthetic multi-view vehicles at "
          f"{config.data.image_size} px")
    results, table = experiments.run_demo(config, args.out, methods=methods, export=not args.no_export,
                                          export_method=export_method)
    print(table)
    if "export" in results:
        _print_export(results["export"])
    if "served" in results:
        served = results["served"]
        print(f"gRPC server on {served['address']}: a photo of a model the inventory lacks →")
        for item, score in zip(served["top_ids"], served["top_scores"]):
            print(f"  {score:.3f}  {item}")
        print(f"after Upsert('new-arrival'): {served['top_scores_after_upsert'][0]:.3f}  "
              f"{served['top_ids_after_upsert'][0]}")
    print(f"Results written to {os.path.join(args.out, 'results.json')}")
    _print_report(args.out)


def _print_export(artefacts):
    if not artefacts["pushed"]:
        print(f"Not pushed: {artefacts['reason']}")
        return
    print(f"SavedModel: {artefacts['saved_model']}")
    print(f"Index: {artefacts['index']}")
    for mode, path in (artefacts.get("tflite") or {}).items():
        parity = artefacts["tflite_parity"][mode]
        print(f"TFLite {mode}: {path} (max |Δ| {parity['max_abs_diff']:.2e}, "
              f"Recall@1 drop {100 * parity['recall@1_drop']:.1f} points)")


def cmd_export(args):
    import keras

    from fgkeras import experiments

    config = _config(args)
    model = _load_model(args.model)
    _, test_set = experiments.load_data(config.data)
    artefacts = experiments.export_artifacts(
        getattr(model, "embedder", model), test_set, config, args.out, name=args.name,
        flavour=args.flavour, k=args.k, tflite_modes=() if args.no_tflite else ("fp32", "dynamic", "int8"),
        force=args.force,
    )
    keras.backend.clear_session()
    _print_export({"pushed": artefacts["push"].pushed, "reason": artefacts["push"].reason,
                   "saved_model": artefacts["saved_model"], "index": artefacts.get("index"),
                   "tflite": artefacts.get("tflite"), "tflite_parity": artefacts.get("tflite_parity")})
    return 0 if artefacts["push"].pushed else 1


def cmd_serve(args):
    from fgkeras import serving

    batching = serving.BatchingParameters(
        max_batch_size=args.max_batch_size, batch_timeout_micros=args.batch_timeout_micros,
        num_batch_threads=args.num_batch_threads) if args.batching else False
    server = serving.serve(args.model_dir, model_name=args.model_name, host=args.host, port=args.port,
                           batching=batching, index_dir=args.index_dir, wal_recovery=args.wal_recovery,
                           limits=serving.Limits(max_pixels_per_request=args.max_pixels_per_request
                                                 or serving.Limits.max_pixels_per_request),
                           intra_op_parallelism=args.intra_op_parallelism, rest_api_port=args.rest_api_port)
    rest = f", REST API on port {server.rest_port}" if server.rest_port is not None else ""
    print(f"fgkeras serve: {args.model_dir} on {server.address}{rest} (SIGTERM or Ctrl-C stops)", flush=True)
    server.wait()


def cmd_index(args):
    from fgkeras.serving import indexing

    report = indexing.index_gallery(args.model, images=args.images, out=args.out, kind=args.kind,
                                    batch_size=args.batch_size)
    model = report.model
    print(f"Index of {model['name']} version {model['version']}: {report.path}")
    print(f"  {report.count} items: {report.gallery_items} from the gallery, {report.log_upserts} upserted live "
          f"(log record {report.log_seq}), {report.log_deletes} deleted live")
    if report.skipped_embeddings:
        print(f"  {report.skipped_embeddings} ids upserted live as another version's embeddings are not in it: "
              "send their vectors for this version again")
    if report.corrupt:
        print(f"  {len(report.corrupt)} images could not be decoded and are not indexed:", file=sys.stderr)
        for path, reason in report.corrupt:
            print(f"    {path}: {reason}", file=sys.stderr)
    return 0


def cmd_search(args):
    from fgkeras import serving

    with serving.Client(args.server, model_name=args.model_name or "") as client:
        ids, scores = client.search(args.images, k=args.k)
    for image, row_ids, row_scores in zip(args.images, ids, scores):
        print(image)
        for item, score in zip(row_ids, row_scores):
            print(f"  {score:.3f}  {item}")


def cmd_report(args):
    from fgkeras import viz

    print(f"Report written to {viz.write_report(args.run_dir, k=args.k, projector=args.projector)}")
    if args.projector:
        print(f"Projector files written: tensorboard --logdir {os.path.join(args.run_dir, viz.report.PROJECTOR_DIR)}")


def cmd_pipeline_run(args):
    from pipelines import retrieval_pipeline

    config, settings = retrieval_pipeline.load_config(args.config, args.set, smoke=args.smoke)
    serving_root = args.serving_root or retrieval_pipeline.default_serving_root(args.root)
    print(f"fgkeras pipeline: {config.name} ({config.train.method}) in {args.root}, serving root {serving_root}")
    results = retrieval_pipeline.run(config, args.root, settings, serving_root=serving_root)
    print(retrieval_pipeline.format_summary(results))
    version = retrieval_pipeline.served(results, serving_root)
    if version is None:
        print("No version served: the candidate was not blessed or its push was refused")
        return 1
    model_dir, index_dir = version
    print(f"Served: fgkeras serve --model-dir {os.path.dirname(model_dir)} --index-dir {os.path.dirname(index_dir)}")
    return 0


def _load_model(path):
    import keras

    if not os.path.exists(path):
        raise ValueError(f"no model at {path!r}")
    return keras.saving.load_model(path)


def build_parser():
    parser = argparse.ArgumentParser(prog="fgkeras", description="Fine-grained image retrieval in Keras 3")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debug messages, and the info messages of other libraries")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train and compare the baselines on synthetic data")
    _add_config_arguments(demo, "demo")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    demo.add_argument("--no-export", action="store_true", help="stop after the comparison")
    demo.add_argument("--method", dest="demo_method", choices=("htg", "viewgan", "fggan"),
                      default="htg",
                      help="htg: the retrieval baselines and HTG (default); viewgan: a smoke-sized ViewGAN, "
                           "its view grid and few-shot table; fggan: FGGAN (GDNS) against S alone, S∘G exported, "
                           "indexed, served and queried")
    demo.set_defaults(func=cmd_demo)

    train = commands.add_parser("train", help="train one method and evaluate it on unseen classes")
    _add_config_arguments(train, "baseline")
    train.add_argument("--method", help="training method (overrides train.method)")
    train.add_argument("--out", default="runs/train", help="output directory (default: %(default)s)")
    train.set_defaults(func=cmd_train)

    augment = commands.add_parser("augment", help="write ViewGAN views of a folder of (few-shot) images")
    augment.add_argument("--model", required=True, help="a ViewGAN game (.keras) saved by `fgkeras train --method viewgan`")
    augment.add_argument("--input", required=True, help="a folder of images (searched recursively)")
    augment.add_argument("--output", required=True, help="where the generated images go (same sub-folders)")
    augment.add_argument("--views", help="target view ids, comma-separated (default: all of the model's)")
    augment.add_argument("--per-image", type=int, default=20,
                         help="images per input, spread over the views and interpolated codes (default: 20)")
    augment.set_defaults(func=cmd_augment)

    evaluate = commands.add_parser("evaluate", help="evaluate a saved model on unseen classes")
    _add_config_arguments(evaluate, "baseline")
    evaluate.add_argument("--model", required=True, help="a .keras file saved by `fgkeras train`")
    evaluate.add_argument("--out", help="also save the results, the embedder and an HTML report in this run directory")
    evaluate.set_defaults(func=cmd_evaluate)

    report = commands.add_parser("report", help="write RUN_DIR/report/index.html: figures, galleries and "
                                                "pictures of a run of demo, train or evaluate --out")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a directory with the results.json of a run")
    report.add_argument("--k", type=int, default=5, help="results shown per query in the galleries (default: 5)")
    report.add_argument("--projector", action="store_true",
                        help="also write the test embeddings, labels and thumbnails for TensorBoard's projector "
                             "in RUN_DIR/projector")
    report.set_defaults(func=cmd_report)

    export = commands.add_parser("export", help="export a trained model: SavedModel (TF Serving layout), "
                                                "gallery index and TFLite, through the blessing gate")
    _add_config_arguments(export, "baseline")
    export.add_argument("--model", required=True, help="a .keras file saved by `fgkeras train`")
    export.add_argument("--out", default=".", help="root of saved_models/, indexes/ and tflite/ (default: .)")
    export.add_argument("--name", default="fgkeras", help="model name: saved_models/<name>/<version>/")
    export.add_argument("--flavour", choices=("exact", "scann"), default="exact",
                        help="in-graph search of the `search` signature (default: %(default)s)")
    export.add_argument("--k", type=int, default=10, help="neighbours returned by `search`")
    export.add_argument("--no-tflite", action="store_true", help="skip the TFLite files")
    export.add_argument("--force", action="store_true", help="push even if the blessing gate refuses")
    export.set_defaults(func=cmd_export)

    serve = commands.add_parser("serve", help="serve saved_models/<name> over TF Serving's gRPC protocol")
    serve.add_argument("--model-dir", required=True, help="saved_models/<name> (integer version folders)")
    serve.add_argument("--model-name", help="name clients put in model_spec (default: the folder name)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8500)
    serve.add_argument("--rest-api-port", type=int,
                       help="also answer TF Serving's REST API on this port (TF Serving uses 8501; default: off)")
    serve.add_argument("--index-dir", help="indexes/<name>: each served version searches its own index "
                                           "(indexes/<name>/<version>/) and the inventory service edits them live")
    serve.add_argument("--wal-recovery", choices=("strict", "skip-corrupt"), default="strict",
                       help="an inventory log corrupted before its last record: refuse to start, naming the "
                            "file and offset (strict, the default), or start without the corrupt records")
    serve.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True,
                       help="server-side dynamic batching (default: on)")
    serve.add_argument("--max-batch-size", type=int, default=32)
    serve.add_argument("--max-pixels-per-request", type=int, help="most pixels the images of one request may decode "
                       "to, frames of animations included (default: 16 x 4096 x 4096)")
    serve.add_argument("--batch-timeout-micros", type=int, default=0)
    serve.add_argument("--num-batch-threads", type=int,
                       help="batches run at once (default: the CPUs divided by the intra-op threads)")
    serve.add_argument("--intra-op-parallelism", type=int,
                       help="threads one TensorFlow op may use (default: TensorFlow's, a thread per core); "
                            "1 often serves small models faster")
    serve.set_defaults(func=cmd_serve)

    index = commands.add_parser("index", help="embed a gallery of images with a served model version and build "
                                              "that version's index (with the items upserted live since)")
    index.add_argument("--model", required=True, help="saved_models/<name>/<version>, or saved_models/<name> "
                                                      "for its latest version")
    index.add_argument("--images", help="an image folder (root/<class>/<image>) or a CSV of paths; "
                                        "omitted: the inventory log's live items alone")
    index.add_argument("--out", help="the index directory (default: indexes/<name>/<version> beside saved_models/)")
    index.add_argument("--kind", choices=("exact", "scann"), default="exact", help="index kind (default: exact)")
    index.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    index.set_defaults(func=cmd_index)

    pipeline = commands.add_parser("pipeline", help="the TFX-style retrieval pipeline: ingest, train, evaluate, "
                                                    "bless, export, embed the gallery, index, push")
    actions = pipeline.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="run the pipeline in a root directory; steps whose inputs did not change "
                                         "are skipped (docs/scale_out.md)")
    run.add_argument("config", metavar="CONFIG", help="an experiment configuration: a name, or a JSON file")
    run.add_argument("--root", required=True, help="the pipeline root: one folder per step, with its manifest")
    run.add_argument("--serving-root", help="where versions are pushed: saved_models/<name>/ and indexes/<name>/ "
                                            "(default: ROOT/serving)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.epochs=3 or --set pipeline.threshold=0.01 "
                          "(repeatable)")
    run.add_argument("--smoke", action="store_true", help="shrink everything to seconds")
    run.set_defaults(func=cmd_pipeline_run)

    search = commands.add_parser("search", help="search a running server with image files")
    search.add_argument("images", nargs="+", help="JPEG/PNG files")
    search.add_argument("--server", default="127.0.0.1:8500", help="HOST:PORT (default: %(default)s)")
    search.add_argument("--model-name", help="model_spec.name (default: the server's only model)")
    search.add_argument("--k", type=int, default=5)
    search.set_defaults(func=cmd_search)
    return parser


@contextlib.contextmanager
def _filter_native_stderr():
    """Passes what native libraries write to fd 2 through a filter process; Python's stderr stays direct.

    TensorFlow's C++ logging honours TF_CPP_MIN_LOG_LEVEL, but the absl logging inside the
    TFLite converter and grappler, TFLite's logger and the quantizer's prints do not: the filter
    drops their lines below the same level (2 unless set: errors only). The "failed call to
    cuInit" error of machines without a GPU driver counts as a warning. Any other line passes,
    the messages of a crash included: the filter is a separate process, so it still forwards
    them when this one aborts.
    """
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    min_level = int(level) if level.isdigit() else 2
    python_stderr = sys.stderr
    python_stderr.flush()
    # Run by path, not as `fgkeras._native_logs`: importing the package would load TensorFlow.
    process = subprocess.Popen([sys.executable, _native_logs.__file__, str(min_level)], stdin=subprocess.PIPE)
    # Kept open for the life of the process: loggers created meanwhile keep writing to it.
    terminal = os.dup(2)
    os.dup2(process.stdin.fileno(), 2)
    process.stdin.close()
    sys.stderr = open(terminal, "w", buffering=1, encoding=python_stderr.encoding,
                      errors=python_stderr.errors, closefd=False)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(terminal, 2)  # the filter reads the end of the pipe, then exits
        with contextlib.suppress(subprocess.TimeoutExpired):  # a child process still holds the pipe
            process.wait(timeout=10)


def _configure_logging(verbose):
    """fgkeras's (and its pipelines') messages from INFO (DEBUG with -v), other libraries' from WARNING
    (INFO with -v)."""
    threshold = logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(lambda record: record.levelno >= threshold
                      or record.name.split(".")[0] in ("fgkeras", "pipelines"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # TensorFlow gives its logger a handler of its own when it loads before any is configured
    # (`import fgkeras` loads it): its lines go through ours alone, or they would print twice.
    logging.getLogger("tensorflow").handlers.clear()


def main(argv=None):
    args = build_parser().parse_args(argv)
    # Only a process's own stderr: not one that pytest or a notebook has replaced.
    owns_stderr = sys.stderr is not None and sys.stderr is sys.__stderr__ and bool(sys.executable)
    with _filter_native_stderr() if owns_stderr else contextlib.nullcontext():
        _configure_logging(args.verbose)
        try:
            return args.func(args) or 0
        except ValueError as error:  # configuration and data errors: say what, no traceback
            if args.verbose:
                raise
            print(f"fgkeras {args.command}: error: {error}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
