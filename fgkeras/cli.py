"""The `fgkeras` command line: parse, call library functions, print."""

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("fgkeras")


def _config(args):
    from fgkeras import configs

    config = configs.get_config(args.config)
    if getattr(args, "method", None):
        config.train.method = args.method
    if args.smoke:
        configs.smoke(config)
    configs.override(config, args.set)
    return config


def _add_config_arguments(parser, default_config):
    parser.add_argument("--config", default=default_config,
                        help="experiment configuration name (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="shrink everything to seconds")


def cmd_train(args):
    from fgkeras import evaluation, experiments

    config = _config(args)
    train_set, test_set = experiments.load_data(config.data)
    print(f"Training {config.train.method} on {len(train_set)} images of {train_set.num_classes} classes")
    model, _ = experiments.train(config, train_set=train_set)
    metrics = experiments.evaluate(model.embedder, test_set, config)
    os.makedirs(args.out, exist_ok=True)
    model.save(os.path.join(args.out, "model.keras"))
    model.embedder.save(os.path.join(args.out, "embedder.keras"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": config.to_dict(), "metrics": metrics}, f, indent=2)
    print(evaluation.format_table([{"method": config.train.method, **metrics}]))
    print(f"Saved the model and the embedder in {args.out}")


def cmd_evaluate(args):
    from fgkeras import evaluation, experiments

    config = _config(args)
    model = _load_model(args.model)
    embedder = getattr(model, "embedder", model)
    _, test_set = experiments.load_data(config.data)
    metrics = experiments.evaluate(embedder, test_set, config)
    print(evaluation.format_table([{"model": os.path.basename(args.model), **metrics}]))


def cmd_demo(args):
    from fgkeras import experiments

    config = _config(args)
    print(f"fgkeras demo: random triplets, batch-hard and HTG, {config.train.epochs} epochs × "
          f"{config.train.steps_per_epoch} steps each, on synthetic multi-view vehicles at "
          f"{config.data.image_size} px")
    results, table = experiments.run_demo(config, args.out, export=not args.no_export)
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

    batching = serving.BatchingParameters(max_batch_size=args.max_batch_size,
                                          batch_timeout_micros=args.batch_timeout_micros) if args.batching else False
    server = serving.serve(args.model_dir, model_name=args.model_name, host=args.host, port=args.port,
                           batching=batching, index_dir=args.index_dir)
    print(f"fgkeras serve: {args.model_dir} on {server.address} (SIGTERM or Ctrl-C stops)", flush=True)
    server.wait()


def cmd_search(args):
    from fgkeras import serving

    with serving.Client(args.server, model_name=args.model_name or "") as client:
        ids, scores = client.search(args.images, k=args.k)
    for image, row_ids, row_scores in zip(args.images, ids, scores):
        print(image)
        for item, score in zip(row_ids, row_scores):
            print(f"  {score:.3f}  {item}")


def _load_model(path):
    import keras

    if not os.path.exists(path):
        raise ValueError(f"no model at {path!r}")
    return keras.saving.load_model(path)


def build_parser():
    parser = argparse.ArgumentParser(prog="fgkeras", description="Fine-grained image retrieval in Keras 3")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train and compare the baselines on synthetic data")
    _add_config_arguments(demo, "demo")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    demo.add_argument("--no-export", action="store_true", help="stop after the comparison")
    demo.set_defaults(func=cmd_demo)

    train = commands.add_parser("train", help="train one method and evaluate it on unseen classes")
    _add_config_arguments(train, "baseline")
    train.add_argument("--method", help="training method (overrides train.method)")
    train.add_argument("--out", default="runs/train", help="output directory (default: %(default)s)")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a saved model on unseen classes")
    _add_config_arguments(evaluate, "baseline")
    evaluate.add_argument("--model", required=True, help="a .keras file saved by `fgkeras train`")
    evaluate.set_defaults(func=cmd_evaluate)

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
    serve.add_argument("--index-dir", help="a saved fgkeras index: `search` uses it and the inventory "
                                           "service edits it live")
    serve.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True,
                       help="server-side dynamic batching (default: on)")
    serve.add_argument("--max-batch-size", type=int, default=32)
    serve.add_argument("--batch-timeout-micros", type=int, default=0)
    serve.set_defaults(func=cmd_serve)

    search = commands.add_parser("search", help="search a running server with image files")
    search.add_argument("images", nargs="+", help="JPEG/PNG files")
    search.add_argument("--server", default="127.0.0.1:8500", help="HOST:PORT (default: %(default)s)")
    search.add_argument("--model-name", help="model_spec.name (default: the server's only model)")
    search.add_argument("--k", type=int, default=5)
    search.set_defaults(func=cmd_search)
    return parser


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except ValueError as error:  # configuration and data errors: say what, no traceback
        if args.verbose:
            raise
        print(f"fgkeras {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
