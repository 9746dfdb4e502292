"""What every benchmark shares: quiet TensorFlow, the machine facts, the results file."""

import datetime
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


def compare_variants(base_config, variants, seeds, metrics):
    """Trains every variant on the same data and budget; rows of mean ± std over seeds.

    Args:
        base_config: an `ExperimentConfig`; each variant is a copy with overrides applied.
        variants: dict `label -> list of "key=value" overrides` (e.g. ["train.method=htg"]).
        seeds: the training seeds.
        metrics: metric names for the rows (shown as percentages).
    """
    import numpy as np

    from fgkeras import configs, experiments

    per_variant = {label: [] for label in variants}
    for seed in seeds:
        config = configs.ExperimentConfig.from_dict(base_config.to_dict())
        config.train.seed = seed
        train_set, test_set = experiments.load_data(config.data)
        for label, overrides in variants.items():
            variant = configs.override(configs.ExperimentConfig.from_dict(config.to_dict()), overrides)
            start = time.perf_counter()
            model, _ = experiments.train(variant, train_set=train_set, verbose=0)
            seconds = time.perf_counter() - start
            result = experiments.evaluate(model.embedder, test_set, variant)
            result["train_seconds"] = seconds
            per_variant[label].append(result)
            print(f"seed {seed} {label}: " + ", ".join(f"{k} {result[k]:.3f}" for k in metrics)
                  + f", {seconds:.0f} s", flush=True)
    rows = []
    for label, runs in per_variant.items():
        row = {"method": label, "seeds": len(runs)}
        for key in metrics:
            values = np.array([r[key] for r in runs]) * 100
            row[key] = f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values[0]:.1f}"
        row["train_seconds"] = f"{np.mean([r['train_seconds'] for r in runs]):.0f}"
        rows.append(row)
    return rows
