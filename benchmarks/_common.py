"""What every benchmark shares: quiet TensorFlow, the machine facts, the results file."""

import datetime
import functools
import contextlib
import hashlib
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
SHARED_CARS196 = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cars196_half", "labels.csv")
)


def machine_facts():
    import keras
    import numpy as np
    import tensorflow as tf

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": f"tensorflow {tf.__version__}, keras {keras.__version__}, numpy {np.__version__}",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def write_results(topic, sections):
    """Writes `benchmarks/results/<topic>.md`: the machine facts, then the sections.

    Args:
        sections: list of (heading, markdown text) pairs.
    """
    facts = machine_facts()
    lines = [f"# {topic}", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    for heading, text in sections:
        lines += ["", f"## {heading}", "", text.rstrip()]
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{topic}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def markdown_table(rows, columns):
    """`fgkeras.evaluation.format_table` with (key, header, format) columns; use that instead."""
    from fgkeras.evaluation import format_table

    return format_table(rows, keys=[key for key, _, _ in columns],
                        headers={key: header for key, header, _ in columns},
                        formats={key: pattern for key, _, pattern in columns})


def fit_images_per_second(model, images, labels, steps):
    """Images/s of `model.fit` on one in-memory batch, over `steps` steps after a warm-up.

    The model must be compiled. The batch is repeated from memory, so the input
    pipeline is out of the measurement.
    """
    import keras
    import tensorflow as tf

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    timer = EpochTimer()
    model.fit(dataset, epochs=1, steps_per_epoch=3, verbose=0)  # traces the step function
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return steps * len(images) / timer.seconds


class RunStore:
    """Finished training runs, one JSON line each, reused when the same run is asked for again.

    Long comparisons outlast a session on this machine (a 64-px HTG run takes minutes): every
    finished run is appended to `results/<topic>.jsonl` with its whole configuration (flattened
    to dotted keys), so a comparison cut short loses only the run in progress, and a later
    invocation with the same settings trains only what is missing.

    A stored run answers a request when every setting they both have agrees. A setting the
    run does not have (added to the configs after it was trained) must hold its current
    default in the request, since adding a key keeps the old behaviour as its default; a
    changed default therefore still counts as a new run for the keys the run did store.
    Lines written before configurations were stored carry only a hash of the whole
    configuration's JSON (`legacy_key`) and answer exactly that configuration.
    """

    def __init__(self, topic, enabled=True):
        self.path = os.path.join(RESULTS_DIR, f"{topic}.jsonl")
        self.enabled = enabled
        self.claims = os.path.join(RESULTS_DIR, f"{topic}.claims")
        self.runs = []
        self.reload()

    def reload(self):
        """Reads the runs that other processes have added since."""
        if self.enabled and os.path.exists(self.path):
            with open(self.path) as f:
                self.runs = [json.loads(line) for line in f if line.strip()]

    @staticmethod
    def legacy_key(config):
        return hashlib.sha256(config.to_json().encode()).hexdigest()[:16]

    @staticmethod
    def settings(config):
        """`config` as `{"section.key": value}`, JSON-normalised (tuples become lists)."""
        return {f"{section}.{key}" if isinstance(values, dict) else section: value
                for section, values in json.loads(config.to_json()).items()
                for key, value in (values.items() if isinstance(values, dict) else [(None, values)])}

    def get(self, config):
        from fgkeras.configs import ExperimentConfig

        wanted = self.settings(config)
        defaults = self.settings(ExperimentConfig())
        legacy = self.legacy_key(config)
        for run in reversed(self.runs):
            stored = run.get("config")
            if stored is None:
                if run.get("key") == legacy:
                    return run
            elif all(stored.get(key, defaults.get(key)) == value for key, value in wanted.items()):
                return run
        return None

    @contextlib.contextmanager
    def claim(self, config):
        """Yields whether this process may train `config`: no other live process has claimed it.

        Several processes running the same comparison share its runs this way (one thread each
        shares 2 cores 1.26× better than one process with two: 53 and 84 images/s measured). A
        claim is a file holding the claimant's pid, made atomically; a dead claimant's claim is
        taken over, so a killed process never blocks its run.
        """
        if not self.enabled:
            yield True
            return
        os.makedirs(self.claims, exist_ok=True)
        digest = hashlib.sha256(json.dumps(self.settings(config), sort_keys=True).encode()).hexdigest()[:16]
        path = os.path.join(self.claims, digest)
        claimed = _claim_file(path)
        try:
            yield claimed
        finally:
            if claimed:
                os.remove(path)

    def add(self, config, run):
        run = {**run, "config": self.settings(config)}
        self.runs.append(run)
        if self.enabled:
            os.makedirs(RESULTS_DIR, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(run) + "\n")
        return run


def _claim_file(path):
    """Creates `path` holding our pid unless a live process holds it; True when we hold it."""
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    os.kill(int(f.read() or 0), 0)
                return False  # its claimant lives
            except (ProcessLookupError, ValueError):
                os.remove(path)  # a dead claimant's: take it over
                continue
            except FileNotFoundError:
                continue  # released meanwhile
        with os.fdopen(descriptor, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def add_store_options(parser):
    """The options of a benchmark whose runs are kept in a `RunStore`: `--stored-only`, `--threads`."""
    parser.add_argument("--stored-only", action="store_true",
                        help="train nothing: the table of the runs already in results/<topic>.jsonl")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="TensorFlow's threads per op; to use 2 cores, start the same command twice "
                             "with --threads 1: the processes share the runs (see RunStore.claim)")


def set_threads(args):
    """`--threads N` as TensorFlow's intra-op thread count (its own default when absent)."""
    if args.threads is not None:
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)


def retrieval_run(load_splits, metrics):
    """A `train` for `measured_run`: trains a config by `experiments.train` and gives its test
    `metrics`, seconds and epochs. `load_splits()` gives `(train_set, test_set)`; it is called
    only when a run is trained."""
    from fgkeras import experiments

    def train(config):
        train_set, test_set = load_splits()
        start = time.perf_counter()
        model, history = experiments.train(config, train_set=train_set, verbose=0)
        seconds = time.perf_counter() - start
        result = experiments.evaluate(model.embedder, test_set, config)
        epochs = len(history.history.get("loss", [])) if history is not None else None
        return {"method": config.train.method, "seed": config.train.seed, "train_seconds": round(seconds),
                "epochs_run": epochs, **{key: float(result[key]) for key in metrics}}

    return train


def measured_run(config, store, train, train_missing=True):
    """The run of `config` in `store`, else `train(config)` (a dict of its figures, added to
    `store`) unless another process has claimed it (`RunStore.claim`) or `train_missing` is
    False; None when it is not (yet) there."""
    store.reload()
    run = store.get(config)
    if run is None and train_missing:
        with store.claim(config) as mine:
            if mine:
                run = store.add(config, train(config))
    return run


def mean_std_rows(runs_by_label, metrics):
    """Rows of `label, seeds, metric mean ± std (in %), train_seconds` from lists of runs."""
    import numpy as np

    rows = []
    for label, runs in runs_by_label.items():
        row = {"method": label, "seeds": len(runs)}
        for key in metrics:
            values = np.array([run[key] for run in runs]) * 100
            row[key] = f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values[0]:.1f}"
        row["train_seconds"] = f"{np.mean([run['train_seconds'] for run in runs]):.0f}"
        rows.append(row)
    return rows


def results_topic(topic, rows, variants, seeds):
    """`topic` when every variant has a row over every seed, else `<topic>_progress`: a comparison
    still under way (in other processes, or cut short) never overwrites the last complete table."""
    complete = len(rows) == len(variants) and all(row["seeds"] == len(seeds) for row in rows)
    return topic if complete else f"{topic}_progress"


def compare_variants(base_config, variants, seeds, metrics, store=None, train_missing=True):
    """Trains every variant on the same data and budget; rows of mean ± std over seeds.

    Args:
        base_config: an `ExperimentConfig`; each variant is a copy with overrides applied.
        variants: dict `label -> list of "key=value" overrides` (e.g. ["train.method=htg"]).
        seeds: the training seeds.
        metrics: metric names for the rows (shown as percentages).
        store: a `RunStore` whose finished runs are reused (None: train everything, keep nothing).
            Runs are trained in seed-major order; a run that another process has claimed
            (`RunStore.claim`) is left to it, so the same command started in several processes
            shares the work. The rows count only the runs present.
        train_missing: False trains nothing: the rows of the runs in `store` (a progress table).
    """
    from fgkeras import configs, experiments

    store = store or RunStore("", enabled=False)
    per_variant = {label: [] for label in variants}
    for seed in seeds:
        config = configs.ExperimentConfig.from_dict(base_config.to_dict())
        config.train.seed = seed
        train = retrieval_run(functools.cache(functools.partial(experiments.load_data, config.data)), metrics)
        for label, overrides in variants.items():
            variant = configs.override(configs.ExperimentConfig.from_dict(config.to_dict()), overrides)
            run = measured_run(variant, store, train, train_missing)
            if run is None:
                continue
            per_variant[label].append(run)
            print(f"seed {seed} {label}: " + ", ".join(f"{k} {run[k]:.3f}" for k in metrics)
                  + f", {run['train_seconds']} s", flush=True)
    return mean_std_rows({label: runs for label, runs in per_variant.items() if runs}, metrics)
