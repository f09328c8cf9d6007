"""The names users depend on: stiffness kinds, probe sets and pairs, distance metrics, logged tags, raw-result keys.

Dashboards, monitors (``EarlyStopping(monitor=...)``) and saved results refer to these names, so every tag and key is
built here and nowhere else (change one only with a deprecation). The README's table of logged names lists them.

Example::

    >>> from lightning_stiffness import names
    >>> names.class_tag("train-val", "cosine", "within")
    'stiffness/train-val/cosine/within_class'
    >>> names.critical_distance_tag("train-train", layer="net.2")
    'stiffness/train-train/critical_distance/net.2'
"""

from collections.abc import Sequence
from typing import Literal

#: Stiffness kinds, in the order they are computed and logged.
KINDS = ("cosine", "sign")
#: Probe sets, in the order their examples are concatenated.
SETS = ("train", "val")
#: Which probe sets each pair compares: (rows, columns).
PAIRS = {"train-train": ("train", "train"), "train-val": ("train", "val"), "val-val": ("val", "val")}
#: Pairs of examples of the same class, and of different classes.
SIDES = ("within", "between")
#: The distance space of the inputs themselves: a layer like those whose outputs give representation distances
#: (``layers``), first in a result's ``spaces`` and in the tags (``critical_distance/input``).
INPUT = "input"
#: The Gram matrix of all parameters, first in a result's ``classes`` beside each layer's own (``per_layer``): ``""`` is
#: what ``named_modules()`` calls the model itself, and no layer's Gram matrix is named so (a parameter registered on
#: the model itself is named by the parameter).
MODEL = ""
#: A metric of distances between representations.
DistanceMetric = Literal["cosine", "euclidean"]
#: Metrics of distances between representations (input distances are always cosine).
DISTANCE_METRICS: tuple[DistanceMetric, ...] = ("cosine", "euclidean")
#: The first part of every logged tag and the folder of raw results under the logger's ``log_dir``, by default.
PREFIX = "stiffness"
#: The two lines fitted through same-class (distance, stiffness) pairs: ``pairs``, least squares over all pairs (the
#: paper's, whose zero crossing is the logged critical distance), and ``bins``, through the bin means, each non-empty
#: bin weighted equally.
FITS = ("pairs", "bins")
#: What the probe before the first optimiser step (step 0) is called in titles, the report and messages.
INITIALISATION = "initialisation"
#: Raw result files of one run, ``epoch=E-step=S.pt``.
RAW_FILE_PATTERN = "epoch=*-step=*.pt"
#: The layout of the raw files written now: nested by structure, pair -> kind -> layer and pair -> space (2); files of
#: version 1 (flat ``"{pair}/{kind}"`` keys, intervals keyed by tags) still load.
RAW_FORMAT_VERSION = 2


def xi_kind(kinds: Sequence[str]) -> str:
    """The kind critical distances are fitted on: cosine when measured, else the first kind."""
    return "cosine" if "cosine" in kinds else kinds[0]


# ------------------------------------------------------------------------------------------------ raw-result keys
# Version 2 files nest by structure (pair, kind, layer, side): their keys are the names above and the layers' names.
# The flat keys of version 1 (and of the deprecated attributes that show results that way) are built here.


def kind_key(pair: str, kind: str) -> str:
    """Version-1 key of a pair's per-kind values (``stiffness``, ``class_matrices``, ``within_class``, ...)."""
    return f"{pair}/{kind}"


def layer_key(pair: str, layer: str) -> str:
    """Version-1 key of a pair's values in one layer's representation (``layer_distances``, ``layer_curves``, ...)."""
    return f"{pair}/{layer}"


def layer_kind_key(pair: str, kind: str, layer: str) -> str:
    """Version-1 key of a pair's per-kind values from one layer's own gradients (``layer_within_class``, ...)."""
    return f"{pair}/{kind}/{layer}"


def raw_file_name(epoch: int, step: int) -> str:
    """File name of one probe's raw results, as ``ModelCheckpoint`` names a checkpoint saved at that moment
    (``epoch``: Lightning's 0-based ``current_epoch``; the probe at initialisation is ``epoch=0-step=0``)."""
    return f"epoch={epoch}-step={step}.pt"


def probe_label(epoch: int, step: int) -> str:
    """How titles, the report and messages name a probe: ``initialisation`` before the first optimiser step, else
    Lightning's 0-based epoch and the global step (``epoch 2, step 120``)."""
    return INITIALISATION if step == 0 else f"epoch {epoch}, step {step}"


def image_file(tag: str, epoch: int, step: int) -> str:
    """Path, relative to the logger's ``log_dir``, of an image written as a PNG file: ``{tag}/epoch=E-step=S.png``."""
    return f"{tag}/{raw_file_name(epoch, step)[: -len('.pt')]}.png"


# ----------------------------------------------------------------------------------------------------- logged tags


def class_tag(pair: str, kind: str, side: str, prefix: str = PREFIX, layer: str = MODEL) -> str:
    """Scalar: within-class (``side="within"``) or between-class stiffness, of all parameters (``layer=MODEL``) or
    of one layer's own gradients (``per_layer``)."""
    if layer != MODEL:
        return f"{prefix}/{pair}/{kind}/by_layer/{layer}/{side}_class"
    return f"{prefix}/{pair}/{kind}/{side}_class"


def critical_distance_tag(pair: str, layer: str | None = None, prefix: str = PREFIX) -> str:
    """Scalar: critical distance xi in input space (``layer=None`` or :data:`INPUT`) or in a layer's
    representation."""
    return f"{prefix}/{pair}/critical_distance/{layer or INPUT}"


def extrapolated_tag(pair: str, layer: str | None = None, prefix: str = PREFIX) -> str:
    """Scalar beside :func:`critical_distance_tag`: 1 when that xi is extrapolated (outside the distances of the
    same-class pairs it was fitted on), 0 when it lies among them, NaN when there is no xi."""
    return f"{prefix}/{pair}/critical_distance_extrapolated/{layer or INPUT}"


#: The ends of a 95% bootstrap interval, in the order of ``(low, high)``.
INTERVAL_ENDS = ("low", "high")


def interval_tag(tag: str, end: str, prefix: str = PREFIX) -> str:
    """Scalar: the ``end`` (``"low"`` or ``"high"``) of the 95% bootstrap interval of the scalar ``tag`` (under
    ``prefix``), in a group of its own: ``{prefix}_intervals/{tag without its prefix}/{end}``."""
    return f"{prefix}_intervals/{tag.removeprefix(prefix + '/')}/{end}"


def layer_class_tag(pair: str, kind: str, layer: str, side: str, prefix: str = PREFIX) -> str:
    """Scalar: within/between-class stiffness of one layer's own gradients (:func:`class_tag` with ``layer``)."""
    return class_tag(pair, kind, side, prefix, layer)


def probe_seconds_tag(prefix: str = PREFIX) -> str:
    """Scalar: how long a probe took."""
    return f"{prefix}/probe_seconds"


def class_matrix_tag(pair: str, kind: str, prefix: str = PREFIX) -> str:
    """Image: class stiffness matrix."""
    return f"{prefix}/{pair}/{kind}/class_matrix"


def distance_curve_tag(pair: str, layer: str | None = None, prefix: str = PREFIX) -> str:
    """Image: stiffness against input distance (``layer=None`` or :data:`INPUT`) or against distance in a layer."""
    return f"{prefix}/{pair}/distance_curve" + (f"/{layer}" if layer not in (None, INPUT) else "")


def by_layer_tag(pair: str, prefix: str = PREFIX) -> str:
    """Image: within/between cosine stiffness of each layer's own gradients."""
    return f"{prefix}/{pair}/by_layer"


def critical_distance_by_layer_tag(pair: str, prefix: str = PREFIX) -> str:
    """Image: critical distance in input space and in each recorded layer."""
    return f"{prefix}/{pair}/critical_distance_by_layer"


# ------------------------------------------------------- coherence, class groups, the whole training set (issue 13)

#: The two scalars of class groups: between classes of one group, and between groups.
GROUP_SIDES = ("between_class_within_group", "between_groups")
#: The "pair" of the measures over the whole training set.
DATASET = "dataset"


def gradient_coherence_tag(probe_set: str, prefix: str = PREFIX) -> str:
    """Scalar: gradient coherence of a probe set (``train`` or ``val``)."""
    return f"{prefix}/{probe_set}/gradient_coherence"


def gradient_diversity_tag(probe_set: str, prefix: str = PREFIX) -> str:
    """Scalar: gradient diversity of a probe set (``train`` or ``val``)."""
    return f"{prefix}/{probe_set}/gradient_diversity"


def group_tag(pair: str, kind: str, side: str, prefix: str = PREFIX) -> str:
    """Scalar: stiffness between classes of one group (``side="between_class_within_group"``) or between groups."""
    return f"{prefix}/{pair}/{kind}/{side}"


def group_matrix_tag(pair: str, kind: str, prefix: str = PREFIX) -> str:
    """Image: group x group stiffness."""
    return f"{prefix}/{pair}/{kind}/group_matrix"


def dataset_class_tag(side: str, prefix: str = PREFIX) -> str:
    """Scalar: within/between-class cosine stiffness over every pair of the whole training set."""
    return class_tag(DATASET, "cosine", side, prefix)


def dataset_class_matrix_tag(prefix: str = PREFIX) -> str:
    """Image: the class stiffness matrix of the whole training set (cosine)."""
    return class_matrix_tag(DATASET, "cosine", prefix)


def dataset_raw_file_name(epoch: int, step: int) -> str:
    """File name of the whole training set's class matrix measured at the end of an epoch."""
    return f"dataset-epoch={epoch}-step={step}.pt"
