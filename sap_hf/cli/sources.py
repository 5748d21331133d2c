"""Where the recipe and the CLI get their data and model: one set of arguments, one loader.

Data, in order of precedence: a Clothing1M copy in its official layout (`data_dir`), CIFAR-10N
(`cifar10n_labels`, images from `dataset_name`), a `datasets` dataset by name or local path
(`dataset_name`), or the embedded default:
Fashion-MNIST with synthetic label noise (no download). Model: a Hub id or local path
(`model_name_or_path`, with its image processor), or a tiny RGB ViT built from a config (its processor:
`ImageTransform.to_image_processor`, saved with the model so that `transformers.pipeline` serves it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import datasets
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, ViTForImageClassification
from transformers.utils import logging

from ..data import (
    CIFAR10_CLASSES,
    CLOTHING1M_CLASSES,
    FASHION_MNIST_CLASSES,
    ImageTransform,
    cifar10n_label_key,
    cifar10n_label_set_name,
    load_cifar10n,
    load_clothing1m,
    noisy_fashion_mnist,
    prepare_image_dataset,
)
from ..data.cifar10n import CIFAR10N_LABEL_SETS
from ..data.cifar10n import HUB_REPO_ID as CIFAR10_HUB_ID
from ..data.noise import NOISE_TYPES
from ..models import tiny_vit_config
from .checks import hub_model_errors


logger = logging.get_logger(__name__)

#: Self-supervised pretraining checkpoints whose encoder is a ViT but which `AutoModelForImageClassification`
#: does not map (it knows no classifier for them): their encoder loads into this class, with a new head.
PRETRAINING_ENCODERS: dict[str, type] = {"vit_mae": ViTForImageClassification}


@dataclass
class DataArguments:
    """Which data to train/correct/evaluate on."""

    data_dir: Optional[str] = field(
        default=None,
        metadata={"help": "A Clothing1M copy in its official layout (images/, *_key_list.txt, *_label_kv.txt)."},
    )
    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "A `datasets` dataset (Hub id or local path) with an image and a label column, instead of "
            f"Clothing1M. With cifar10n_labels: the CIFAR-10 images (default {CIFAR10_HUB_ID}; or a local folder of "
            "train-*/test-*.parquet files)."
        },
    )
    cifar10n_labels: Optional[str] = field(
        default=None,
        metadata={
            "help": "CIFAR-10N: path of CIFAR-10_human.pt (the CIFAR-N release); its labels are attached by position "
            "to the train split of `dataset_name`, whose order is checked. Validation and test are carved from "
            "CIFAR-10's test split; train_size, val_size, test_size and noise_seed apply."
        },
    )
    cifar10n_label_set: str = field(
        default="worse",
        metadata={
            "help": f"CIFAR-10N label set: one of {list(CIFAR10N_LABEL_SETS)} (or the file's key, e.g. worse_label)."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Image column of `dataset_name`."})
    label_column: str = field(default="label", metadata={"help": "Label column of `dataset_name`."})
    train_split: str = field(default="train", metadata={"help": "Noisy training split of `dataset_name`."})
    validation_split: str = field(
        default="validation", metadata={"help": "Clean validation split of `dataset_name` (picks alpha)."}
    )
    test_split: Optional[str] = field(
        default="test", metadata={"help": "Clean test split of `dataset_name` (None: no test)."}
    )
    streaming: bool = field(
        default=True,
        metadata={"help": "Stream Clothing1M / `dataset_name` instead of loading it (not CIFAR-10N: loaded)."},
    )
    fashion_mnist_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Fashion-MNIST idx files for the embedded default (else Debian's dataset-fashion-mnist, else the Hub)."
        },
    )
    noise_type: str = field(
        default="symmetric",
        metadata={
            "help": (
                "Embedded default's label noise: 'symmetric' (any other class), 'asymmetric' (a fixed class map: "
                "shirt <-> T-shirt, ...) or 'instance' (the images a pixel-level classifier finds ambiguous, "
                "flipped to the class it confuses them with)."
            )
        },
    )
    noise_rate: float = field(default=0.4, metadata={"help": "Embedded default: fraction of flipped training labels."})
    train_size: Optional[int] = field(
        default=6000, metadata={"help": "Embedded default and CIFAR-10N: training images (None: all)."}
    )
    val_size: int = field(default=1000, metadata={"help": "Embedded default and CIFAR-10N: clean validation images."})
    test_size: Optional[int] = field(
        default=2000, metadata={"help": "Embedded default and CIFAR-10N: clean test images (None: all the rest)."}
    )
    noise_seed: int = field(
        default=0, metadata={"help": "Seed of the embedded default's (and CIFAR-10N's) subsets and noise."}
    )
    augment: bool = field(default=False, metadata={"help": "Random flip/shift augmentation on the training split."})

    def __post_init__(self) -> None:
        if self.noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type={self.noise_type!r} is invalid: choose one of {list(NOISE_TYPES)}.")
        if not 0 <= self.noise_rate < 1:
            raise ValueError(f"noise_rate={self.noise_rate!r} is invalid: use a fraction in [0, 1), e.g. 0.4.")
        if self.data_dir and self.dataset_name:
            raise ValueError("Give data_dir (Clothing1M) or dataset_name, not both.")
        if self.data_dir and self.cifar10n_labels:
            raise ValueError(
                "Give data_dir (Clothing1M) or cifar10n_labels (CIFAR-10N, images from dataset_name), not both."
            )
        cifar10n_label_key(self.cifar10n_label_set, name="cifar10n_label_set")  # a typo fails at parse time


@dataclass
class ModelArguments:
    """Which model to correct (or fine-tune first)."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Hub id or local path of an image classifier (e.g. google/vit-base-patch16-224-in21k); None builds a tiny ViT."
        },
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": "Tiny ViT (no model_name_or_path): hidden size."})
    tiny_num_layers: int = field(default=4, metadata={"help": "Tiny ViT: number of layers."})
    tiny_patch_size: int = field(default=7, metadata={"help": "Tiny ViT: patch size (must divide the image size)."})
    tiny_image_size: Optional[int] = field(
        default=None, metadata={"help": "Tiny ViT: image side (default: 28 for Fashion-MNIST, 32 otherwise)."}
    )


@dataclass
class Splits:
    """Raw splits (image + label columns) and the class names."""

    train: Any
    validation: Any
    test: Any
    class_names: list[str]
    num_channels: int
    name: str


def load_splits(args: DataArguments) -> Splits:
    if args.data_dir:
        read = lambda split: load_clothing1m(args.data_dir, split, streaming=args.streaming)  # noqa: E731
        return Splits(read("noisy_train"), read("validation"), read("test"), list(CLOTHING1M_CLASSES), 3, "clothing1m")
    if args.cifar10n_labels:
        data = load_cifar10n(
            args.dataset_name or CIFAR10_HUB_ID,
            args.cifar10n_labels,
            args.cifar10n_label_set,
            train_size=args.train_size,
            val_size=args.val_size,
            test_size=args.test_size,
            seed=args.noise_seed,
        )
        name = f"cifar10n-{cifar10n_label_set_name(args.cifar10n_label_set)}"
        return Splits(data["train"], data["validation"], data["test"], list(CIFAR10_CLASSES), 3, name)
    if args.dataset_name:
        return _load_named(args)
    data = noisy_fashion_mnist(
        noise_rate=args.noise_rate,
        noise_type=args.noise_type,
        seed=args.noise_seed,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        data_dir=args.fashion_mnist_dir,
    )
    name = f"fashion_mnist-{args.noise_type}{int(round(args.noise_rate * 100))}"
    return Splits(data["train"], data["validation"], data["test"], list(FASHION_MNIST_CLASSES), 1, name)


def _load_named(args: DataArguments) -> Splits:
    def read(split: Optional[str]) -> Any:
        if split is None:
            return None
        dataset = datasets.load_dataset(args.dataset_name, split=split, streaming=args.streaming)
        renames = {args.image_column: "image", args.label_column: "label"}
        renames = {old: new for old, new in renames.items() if old != new}
        return dataset.rename_columns(renames) if renames else dataset

    train = read(args.train_split)
    feature = (train.features or {}).get("label")
    names = list(getattr(feature, "names", None) or [])
    if not names:
        raise ValueError(
            f"dataset_name={args.dataset_name!r}: column {args.label_column!r} is not a ClassLabel, so the class "
            "names are unknown. Cast it with dataset.cast_column(..., ClassLabel(names=[...]))."
        )
    return Splits(train, read(args.validation_split), read(args.test_split), names, 3, args.dataset_name)


def align_labels(splits: Splits, model: nn.Module, model_name_or_path: str) -> Splits:
    """The splits with labels given as the model's class ids, when the model names its classes.

    A model's `config.id2label` gives the class of each logit. When it names the data's classes in
    another order (a model trained with another label mapping), the data's labels are remapped to
    the model's ids (a log line says so): scoring or correcting on the data's own ids would pair
    each sample with another class's logit, silently. Names that differ as sets raise a ValueError
    naming `--model_name_or_path`; models with the default names (`LABEL_0`, ...) say nothing and
    are taken in the data's order, and are given the data's names (`config.id2label`), so that the
    folder a command saves names its classes in `pipeline()`'s output instead of `LABEL_3`.
    ClassLabel columns with the data's class names (`label`, and e.g. a clean-label column) are
    remapped alike; their ClassLabel then lists the model's order.
    """
    id2label = getattr(model.config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
    data_names = [str(name) for name in splits.class_names]
    unnamed = bool(names) and all(name == f"LABEL_{i}" for i, name in enumerate(names))
    if unnamed and len(names) == len(data_names) and data_names != names:
        model.config.id2label = dict(enumerate(data_names))
        model.config.label2id = {name: i for i, name in enumerate(data_names)}
        logger.info("%s: its classes LABEL_0... are named after the data's: %s", model_name_or_path, data_names)
    if not names or names == data_names or unnamed:
        return splits
    if sorted(names) != sorted(data_names):
        only_model = sorted(set(names) - set(data_names))[:5]
        only_data = sorted(set(data_names) - set(names))[:5]
        raise ValueError(
            f"--model_name_or_path {model_name_or_path!r} names its classes (config.id2label) {only_model} where the "
            f"data has {only_data}: its logits are not the data's classes. Pass a model trained on this data, or data "
            "with the model's classes (its label column a ClassLabel with the names of the model's id2label)."
        )
    table = [names.index(name) for name in data_names]  # data id -> model id
    logger.warning(
        "The model %s orders the classes differently from the data (class %r is id %d in the data, %d in the model): "
        "the data's labels are remapped to the model's ids.",
        model_name_or_path,
        *next((n, i, t) for i, (n, t) in enumerate(zip(data_names, table)) if i != t),
    )

    def remap(split: Any) -> Any:
        if split is None:
            return None
        features = getattr(split, "features", None)
        columns = [
            column
            for column, feature in (features or {}).items()
            if isinstance(feature, datasets.ClassLabel) and list(feature.names) == data_names
        ] or ["label"]
        if features is not None:
            features = features.copy()
            for column in columns:
                features[column] = datasets.ClassLabel(names=names)

        def to_model_ids(*values: Any) -> dict[str, Any]:
            return {
                column: value if value is None or value < 0 else table[value] for column, value in zip(columns, values)
            }

        return split.map(to_model_ids, input_columns=columns, features=features)

    return Splits(
        remap(splits.train), remap(splits.validation), remap(splits.test), names, splits.num_channels, splits.name
    )


def load_model(args: ModelArguments, splits: Splits) -> tuple[nn.Module, Optional[Any]]:
    """The model (with a head sized for the data's classes) and its image processor, if any."""
    id2label = dict(enumerate(splits.class_names))
    if args.model_name_or_path:
        head = dict(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})
        with hub_model_errors(args.model_name_or_path):
            model_type = AutoConfig.from_pretrained(args.model_name_or_path).model_type
        if model_type in PRETRAINING_ENCODERS:
            classifier = PRETRAINING_ENCODERS[model_type]
            logger.warning(
                "%s is a %r pretraining checkpoint, not a classifier: its encoder is loaded into %s with a newly "
                "initialised %d-class head (and the pretraining-only weights are dropped); fine-tune before SAP.",
                args.model_name_or_path,
                model_type,
                classifier.__name__,
                len(id2label),
            )
            model = classifier.from_pretrained(args.model_name_or_path, **head)
        else:
            model = AutoModelForImageClassification.from_pretrained(
                args.model_name_or_path, ignore_mismatched_sizes=True, **head
            )
        return model, load_processor(args.model_name_or_path)
    image_size = args.tiny_image_size or (28 if splits.num_channels == 1 else 32)
    config = tiny_vit_config(
        image_size=image_size,
        patch_size=args.tiny_patch_size if image_size % args.tiny_patch_size == 0 else 4,
        # RGB even for grey data (the grey value in every channel): the image-classification pipeline converts
        # every image to RGB, and a standard image processor saved with the model then reproduces the transform.
        num_channels=3,
        num_labels=len(id2label),
        hidden_size=args.tiny_hidden_size,
        num_hidden_layers=args.tiny_num_layers,
        id2label=id2label,
    )
    return ViTForImageClassification(config), None


def load_processor(model_name_or_path: str) -> Optional[Any]:
    """The checkpoint's image processor, or None (then the model config's image size is used)."""
    try:
        return AutoImageProcessor.from_pretrained(model_name_or_path)
    except (OSError, ValueError):
        logger.warning("No image processor at %s; using the model config's image size.", model_name_or_path)
        return None


def image_transforms(
    model: nn.Module, processor: Optional[Any], augment: bool, seed: int
) -> tuple[ImageTransform, ImageTransform]:
    """(train, eval) transforms that turn `image` columns into the model's `pixel_values`."""
    if processor is not None:
        return ImageTransform(processor, augment=augment, seed=seed), ImageTransform(processor)
    size = getattr(model.config, "image_size", 224)
    channels = getattr(model.config, "num_channels", 3)
    return (
        ImageTransform(image_size=size, num_channels=channels, augment=augment, seed=seed),
        ImageTransform(image_size=size, num_channels=channels),
    )


def saved_image_processor(processor: Optional[Any], transform: ImageTransform) -> Optional[Any]:
    """The image processor to save with a model: its own, else one reproducing `transform` (None: there is none).

    Without one, `transformers.pipeline("image-classification", model=folder)` cannot load the folder.
    A 1-channel transform has no standard equivalent: a warning, and the model is saved without one.
    """
    if processor is not None:
        return processor
    try:
        return transform.to_image_processor()
    except ValueError as err:
        logger.warning("No image processor saved with the model: %s", err)
        return None


def prepare(split: Any, transform: ImageTransform) -> Any:
    return None if split is None else prepare_image_dataset(split, transform)
