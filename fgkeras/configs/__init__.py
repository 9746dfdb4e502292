"""One configuration per experiment, with dotted overrides (`train.epochs=3`).

A configuration is a tree of dataclasses; `get_config(name)` returns a fresh copy
of a named experiment (`load_config` also reads one from a JSON file), `override(config, ["train.epochs=3"])` changes leaves with
type checking, and `smoke(config)` shrinks anything to seconds.
"""

import dataclasses
import json
import os


@dataclasses.dataclass
class DataConfig:
    """Where images come from and how they are batched.

    `augment` applies `fgkeras.data.Augment.standard()` to training images; it is off by
    default because the synthetic vehicles carry their own pose, light and clutter jitter
    (with it, batch-hard training from scratch collapsed at 64 px: Recall@1 at chance), and on
    real photos (cars196_half, a CSV source, 96 px) training from scratch lost 2.9 points of
    Recall@1 with it (`benchmarks/results/real_data_cars196.md`): off for every source. Try it
    with a pretrained backbone (`model.preset`), where it was not measured here.

    `source` is "synthetic" (the embedded `SyntheticVehicles`), "csv" (a labels.csv
    in the cars196_half format, `path` = the CSV), "folder" (`path/<class>/<image>`,
    classes split in two halves by sorted name) or "tfds" (`tfds_name`, needs the data
    on disk). `num_makes` … `occlusion_prob` are `SyntheticVehicles` arguments (its
    difficulty knobs; `stock_view` the azimuth of its stock photos). Training uses the
    classes of `train_split`; retrieval is evaluated on the classes of `test_split`, never
    seen in training.
    """

    source: str = "synthetic"
    path: str = ""
    tfds_name: str = ""
    train_split: str = "train"
    test_split: str = "unseen"
    image_size: int = 64
    seed: int = 0
    num_makes: int = 8
    models_per_make: int = 6
    images_per_class: int = 40
    part_scale: float = 1.0
    pose_jitter: float = 0.5
    clutter: float = 0.3
    occlusion_prob: float = 0.05
    augment: bool = False
    stock_view: int = 0


@dataclasses.dataclass
class ModelConfig:
    """The embedder (see `fgkeras.models.build_embedder`).

    `preset` starts the backbone from pretrained weights without the network: a local keras-hub
    preset directory (`backbone.save_to_preset(dir)`; `backbone` and `width` are then ignored) or a
    `.weights.h5` file of the `backbone`/`width` named here (a keras-hub preset name downloads).
    `freeze_bn` freezes the backbone's batch normalisations (moving statistics and γ, β): the
    usual fine-tuning recipe when batches are too small for good batch statistics.

    `kpm` adds HTG's keypoint-map local branch on the backbone blocks `kpm_levels`
    (comma-separated): the paper's blocks 3 and 4, "P4,P5", by default; on the synthetic set at
    64 px they gave 33.4 Recall@1 where "P3,P4" gave 25.1 (benchmarks/results/htg_ablations_synthetic.md).
    """

    backbone: str = "resnet18"
    width: float = 0.5
    embedding_dim: int = 128
    pooling: str = "gap"
    preset: str = ""
    freeze_bn: bool = False
    kpm: bool = False
    kpm_levels: str = "P4,P5"


@dataclasses.dataclass
class TrainConfig:
    """The training method and its budget.

    `method` is one of `fgkeras.models.BASELINES` or "htg". Batches are P×K:
    `classes_per_batch` (P) classes × `images_per_class` (K) images. `epochs` is the
    whole budget of every method: HTG spends the first `warmup_epochs` of it on its
    basic model (at `warmup_learning_rate`) and the rest on the adversarial game (6 of 20:
    a game on the tail of the budget gained nothing, benchmarks/results/htg_ablations_synthetic.md), so
    all methods see the same number of images. Every method's learning rate follows one
    cosine decay over the whole budget (HTG: its basic model on the first part, from
    `warmup_learning_rate`, the game on the rest); `decay_epochs` > 0 gives HTG the paper's
    schedule instead, ×10 lower every `decay_epochs` epochs of each phase (our epochs are
    `steps_per_epoch` steps, not passes over a data set); `restart_schedule` gives each HTG
    phase its own cosine from its full rate instead, and every other method the same warm
    restart after `warmup_epochs` (`experiments.restart_schedule`, the control). `mu`, `beta`,
    `gamma` and `triplets` are HTG's game (see `fgkeras.models.HardTripletGAN`);
    `warmup_triplets` its basic model's triplets, "random" (the paper) or "batch_hard" (the
    ablation: OHEM in the warm-up; `fgkeras.models.train_htg`).

    Optimizer (`fgkeras.models.make_optimizer`, one factory for every method and player):
    `optimizer` is "adam", "adamw" or "sgd"; `beta_1`, `beta_2` are Adam's and AdamW's β1, β2,
    `momentum` SGD's (HTG's players and the baselines alike); `weight_decay` > 0 adds decoupled
    weight decay (0: none; AdamW then keeps Keras's 0.004). `backbone_lr_multiplier` < 1
    fine-tunes a pretrained backbone (`model.preset`) at that fraction of the head's rate.

    Model selection on held-out classes: `validation_classes` (a fraction in [0, 1); 0 turns it
    off) of the training classes are held out of the training stream — the same classes for
    every method trained with the same data and `seed` — and every `validation_every` epochs
    `fgkeras.evaluation.RetrievalEvaluation` embeds them and logs `val_recall@1`, `val_recall@K`
    and `val_map@r`. With `restore_best` the weights of the epoch with the best `val_recall@1`
    are restored at the end (for HTG in each phase: the game's best epoch is the result, and
    both phases' figures are in the history); `patience` > 0 also stops a phase after that many
    evaluations without improvement (`keras.callbacks.EarlyStopping`).

    TensorBoard: `tensorboard` adds a `keras.callbacks.TensorBoard` after the model-selection
    callbacks, so each player's losses and `val_recall@1`, `val_recall@K`, `val_map@r` are logged
    per epoch (`tensorboard --logdir <log_dir>`). `log_dir` is where: `fgkeras train` and `demo`
    default it to `<--out>/tensorboard`; empty elsewhere means `runs/tensorboard/<config name>`.
    HTG's two phases share one run with one continuous epoch count
    (`fgkeras.models.ContinuousTensorBoard`): the basic model's epochs first, then the game's.

    Distribution (`experiments.distribution_strategy`): `distribute` is "none" (one device),
    "mirrored" (`tf.distribute.MirroredStrategy` over this machine's GPUs, else its logical
    CPUs) or "multi_worker" (`MultiWorkerMirroredStrategy`, the workers from `TF_CONFIG`). The
    P×K batch is the global batch, split across the replicas.

    Resuming a killed run (`fgkeras.models.fit_resumable`): with `backup_dir` set, every `fit` of
    the method checkpoints there (weights, every player's optimizer state, random-generator
    states, the step, and the held-out model selection) at each epoch's end and, with
    `backup_every_steps` > 0, every that many steps; a run killed at any moment and started again
    with the same command resumes from its last checkpoint, at the batch of the stream where it
    was taken, and ends with the weights of a run never stopped. HTG keeps one folder per phase
    (`warmup/`, `game/`) and marks a finished basic model done (`warmup.done.weights.h5`), so a
    run killed in either phase resumes in that phase. The folder is removed when training ends.
    Empty (the default): no checkpoints. One run, one folder: two runs never share it.
    """

    method: str = "triplet_batch_hard"
    epochs: int = 20
    warmup_epochs: int = 6
    warmup_learning_rate: float = 1e-3
    decay_epochs: int = 0
    restart_schedule: bool = False
    steps_per_epoch: int = 50
    classes_per_batch: int = 16
    images_per_class: int = 4
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.999
    momentum: float = 0.9
    weight_decay: float = 0.0
    backbone_lr_multiplier: float = 1.0
    margin: float = 0.1
    triplet_weight: float = 1.0
    mu: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    triplets: str = "random"
    warmup_triplets: str = "random"
    mixed_precision: bool = False
    validation_classes: float = 0.2
    validation_every: int = 1
    restore_best: bool = True
    patience: int = 0
    seed: int = 0
    variant: str = "full"
    tensorboard: bool = False
    log_dir: str = ""
    distribute: str = "none"
    backup_dir: str = ""
    backup_every_steps: int = 0


@dataclasses.dataclass
class ViewGANConfig:
    """ViewGAN (`train.method="viewgan"`, `train.variant`: one of `fgkeras.models.viewgan.VARIANTS`).

    G trains on `instances_per_class` instances of each train class drawn in each of `views`
    (comma-separated azimuths of the synthetic vehicles; "" = the 5 front-facing ones), in
    batches of `batch_size`, for `train.epochs` × `train.steps_per_epoch` steps.
    `connection_scale` 0 keeps the variant's (1/8); the 64-px config puts the CNC at 1/4
    (16×16, r = 4), where 1/8 would be an 8×8 map that the window nearly covers. `view_weight` is
    λ, `generator_steps`:`discriminator_steps` the G:D steps. The evaluation uses the unseen
    classes: KNN identity at `eval_classes` (comma-separated N_c), and few-shot at `shots`
    with `per_image` generated images per training image, over `repeats` splits.
    """

    views: str = ""
    instances_per_class: int = 12
    batch_size: int = 32
    connection_scale: int = 0
    id_dim: int = 128
    noise_dim: int = 128
    width: int = 32
    view_weight: float = 5.0
    generator_steps: int = 1
    discriminator_steps: int = 1
    learning_rate: float = 2e-4
    eval_classes: str = "20"
    shots: str = "5,10"
    few_shot_classes: int = 20
    per_image: int = 20
    repeats: int = 3
    classifier_steps: int = 300


@dataclasses.dataclass
class FGGANConfig:
    """FGGAN (`train.method="fggan"`, `train.variant`: one of `fgkeras.models.fggan.VARIANTS`).

    S (the `model` embedder) is pre-trained with a no-bias softmax for `pretrain_steps` steps at
    `pretrain_learning_rate` on the training classes' real images, cached under `cache_dir` by a
    hash of everything it depends on (data, model, steps, seed), so every variant and run of the
    same data and seed starts from the same S. The game then plays `train.epochs` ×
    `train.steps_per_epoch` steps on pairs (user photo, stock photo in `canonical_view`) of
    `train.classes_per_batch` × `train.images_per_class` pairs, with `train.optimizer` at
    `train.learning_rate` for each player (the fggan config: Adam, 2e-4, β1 0.5). `width` is the
    base width of G, D and N; `recon_layer`, `lam` (λ), `semantic_weight` (the 0.001),
    `positive_pair` and `feature` (the retrieval feature of `model.embedder`) are those of
    `fgkeras.models.ViewNormalizingGAN`. Not in the paper, for the studies of G's collapse:
    `generator_warmup_steps` > 0 first trains G to reproduce its input
    (`fgkeras.models.fggan.pretrain_generator`), `generator_skips` gives G U-Net connections,
    `generator_residual` makes G(x) = x + Δ(x) starting at the identity
    (both `fgkeras.models.fggan.build_generator`), and `semantic_learning_rate` > 0 gives S its own
    rate in the game (0: `train.learning_rate`, as every player). For the canonical-view study on synthetic data, set
    `data.stock_view` and `fggan.canonical_view` to the same azimuth.
    """

    canonical_view: int = 0
    recon_layer: str = "conv4"
    lam: float = 1.0
    semantic_weight: float = 0.001
    positive_pair: str = "same_class"
    feature: str = "embedding"
    width: int = 32
    pretrain_steps: int = 500
    pretrain_learning_rate: float = 1e-3
    generator_warmup_steps: int = 0
    generator_skips: bool = False
    generator_residual: bool = False
    semantic_learning_rate: float = 0.0
    cache_dir: str = "runs/cache/fggan_semantic"


@dataclasses.dataclass
class EvalConfig:
    batch_size: int = 128


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "baseline"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    fggan: FGGANConfig = dataclasses.field(default_factory=FGGANConfig)
    viewgan: ViewGANConfig = dataclasses.field(default_factory=ViewGANConfig)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values):
        kwargs = {"name": values.get("name", cls.name)}
        for field in dataclasses.fields(cls):
            if field.name != "name":
                kwargs[field.name] = field.type(**values.get(field.name, {}))
        return cls(**kwargs)


def _cars196(**train):
    """cars196_half at 96 px, from what `benchmarks/real_data.py` measured there (2 seeds, R@1 on
    classes 99–196, `results/real_data_cars196.md`): held-out selection kept (8.0 ± 0.2 against
    8.1 ± 0.5 at the last epoch: no loss, and it picks the epoch); augmentation off (−2.9 points);
    no weight decay (−0.9); ResNet-18 width 0.5 (width 0.25: −1.8). From scratch none of these clears the
    colour-histogram floor (9.8): real photos want `model.preset`."""
    return ExperimentConfig(
        name="cars196",
        data=DataConfig(source="csv", path="../shared/datasets/cars196_half/labels.csv",
                        train_split="train", test_split="test", image_size=96, augment=False),
        train=TrainConfig(**train),
    )


def _htg(kpm=False):
    return ExperimentConfig(name="htg_kpm" if kpm else "htg", model=ModelConfig(kpm=kpm),
                            train=TrainConfig(method="htg", warmup_epochs=6, epochs=20))


def _fggan(name, pretrain_steps=500, **train):
    """FGGAN's paper settings: Adam(2e-4, β1 0.5) for every player, batches of 32 pairs, GDNS."""
    return ExperimentConfig(
        name=name, fggan=FGGANConfig(pretrain_steps=pretrain_steps),
        train=TrainConfig(method="fggan", variant="GDNS", optimizer="adam", learning_rate=2e-4, beta_1=0.5,
                          classes_per_batch=8, images_per_class=4, validation_classes=0.0, **train))


EXPERIMENTS = {
    "baseline": lambda: ExperimentConfig(name="baseline"),
    "demo": lambda: ExperimentConfig(name="demo", train=TrainConfig(epochs=12, warmup_epochs=8, steps_per_epoch=50)),
    "cars196": _cars196,
    "htg": _htg,
    "htg_kpm": lambda: _htg(kpm=True),
    "fggan": lambda: _fggan("fggan", epochs=20, steps_per_epoch=50),
    "fggan_demo": lambda: _fggan("fggan_demo", epochs=4, steps_per_epoch=25, pretrain_steps=150),
    "viewgan": lambda: ExperimentConfig(name="viewgan", train=TrainConfig(method="viewgan", epochs=20, steps_per_epoch=50),
                                        viewgan=ViewGANConfig(connection_scale=4)),
}


def get_config(name="baseline"):
    """A fresh copy of the named experiment configuration."""
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r}. Known experiments: {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]()


def load_config(name_or_path):
    """`get_config(name)`, or the configuration in a JSON file (`ExperimentConfig.to_json()`'s format;
    sections or keys it leaves out keep their defaults, other top-level keys are ignored)."""
    if str(name_or_path).lower().endswith(".json"):
        if not os.path.isfile(name_or_path):
            raise ValueError(f"No configuration file {name_or_path!r}")
        with open(name_or_path, encoding="utf-8") as f:
            try:
                values = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{name_or_path!r} is not a JSON configuration: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{name_or_path!r} must hold a JSON object (an experiment configuration)")
        try:
            return ExperimentConfig.from_dict(values)
        except TypeError as error:  # a key no section has
            raise ValueError(f"{name_or_path!r} is not an experiment configuration: {error}") from None
    return get_config(name_or_path)


def _parse(value, current):
    """Parses an override string to the type of the value it replaces."""
    if isinstance(current, bool):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {value!r}")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def override(config, assignments):
    """Applies dotted `key=value` assignments such as "train.epochs=3" in place.

    Raises:
        ValueError: naming the key when it does not exist or the value has the wrong type.
    """
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise ValueError(f"An override must look like section.key=value. Received: {assignment!r}")
        path = key.strip().split(".")
        target = config
        for part in path[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise ValueError(f"Unknown config key {key!r}: no section {part!r}")
            target = getattr(target, part)
        leaf = path[-1]
        if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
            known = sorted(f.name for f in dataclasses.fields(target)) if dataclasses.is_dataclass(target) else []
            raise ValueError(f"Unknown config key {key!r}. Known keys here: {known}")
        current = getattr(target, leaf)
        if dataclasses.is_dataclass(current):
            raise ValueError(f"{key!r} is a section; set one of its keys instead")
        try:
            setattr(target, leaf, _parse(value, current))
        except ValueError as error:
            raise ValueError(f"Bad value for {key!r}: {error}") from None
    return config


def smoke(config):
    """Shrinks an experiment to seconds: tiny data, a narrow backbone, a few steps."""
    config.data.image_size = min(config.data.image_size, 48)
    config.data.num_makes = min(config.data.num_makes, 4)
    config.data.models_per_make = min(config.data.models_per_make, 4)
    config.data.images_per_class = min(config.data.images_per_class, 12)
    config.model.width = min(config.model.width, 0.25)
    config.model.embedding_dim = min(config.model.embedding_dim, 32)
    config.train.epochs = 2
    config.train.warmup_epochs = 1
    config.train.steps_per_epoch = min(config.train.steps_per_epoch, 3)
    config.train.classes_per_batch = min(config.train.classes_per_batch, 4)
    config.train.images_per_class = min(config.train.images_per_class, 4)
    config.fggan.width = min(config.fggan.width, 8)
    config.fggan.pretrain_steps = min(config.fggan.pretrain_steps, 3)
    return config


__all__ = [
    "DataConfig",
    "EXPERIMENTS",
    "EvalConfig",
    "ExperimentConfig",
    "FGGANConfig",
    "ModelConfig",
    "TrainConfig",
    "ViewGANConfig",
    "get_config",
    "load_config",
    "override",
    "smoke",
]
