"""Stiffness between groups of classes (super-classes): CIFAR-100's 20 groups, living against non-living.

Fort et al. (arXiv 1901.09491, later versions) compare stiffness between classes of the same super-class with
stiffness between super-classes. With each class's group given (``class_groups``), a probe's pair and kind get:

- ``between_class_within_group``: the mean of the class matrix's entries (a, b), a != b, with a and b in one group;
- ``between_groups``: the mean of its entries with a and b in different groups (NaN-ignoring means of class-pair
  means, as within/between-class stiffness are);
- the group matrix [G, G]: entry (g, h) the mean stiffness over pairs of examples i in group g, j in group h,
  i != j (so its diagonal holds the pairs within a group, of the same class or not).
"""

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, SupportsIndex

import torch
from torch import Tensor

from lightning_stiffness.measures.functional import class_stiffness
from lightning_stiffness.measures.records import GroupMeasures
from lightning_stiffness.names import MODEL, PAIRS

if TYPE_CHECKING:
    from lightning_stiffness.measures.result import StiffnessResult

ClassGroups = Sequence[int | str] | Mapping[str, Sequence[int]]


def check_class_groups(class_groups: ClassGroups | None) -> None:
    """Check the form of ``class_groups`` (its size is checked against the classes by :func:`resolve_groups`).

    Raises:
        ValueError: unless it is None, a list of group ids (int or str), or a dict group name -> list of classes.
    """
    if class_groups is None:
        return
    if isinstance(class_groups, Mapping):
        if not class_groups or not all(_is_class_list(classes) for classes in class_groups.values()):
            raise ValueError(
                f"`class_groups` as a dict must map group names to lists of classes, got {class_groups!r}."
            )
        empty = [name for name, classes in class_groups.items() if len(classes) == 0]
        if empty:
            raise ValueError(f"`class_groups` has groups without classes: {empty}; every group needs one.")
        return
    if isinstance(class_groups, str) or not _is_sequence(class_groups) or len(class_groups) == 0:
        raise ValueError(f"`class_groups` must be a list (each class's group) or a dict, got {class_groups!r}.")
    if not all(isinstance(g, str) or _is_int(g) for g in class_groups):
        raise ValueError(
            f"`class_groups` as a list must hold one group id (int or str) per class, got {class_groups!r}."
        )


def _is_int(value: object) -> bool:
    """An integer class index: Python's, NumPy's or a 0-d integer tensor (``operator.index`` takes it), not a bool."""
    if isinstance(value, bool) or getattr(value, "dtype", None) == torch.bool or not isinstance(value, SupportsIndex):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _is_sequence(value: object) -> bool:
    return isinstance(value, Sequence) or (hasattr(value, "__len__") and hasattr(value, "__iter__"))


def _is_class_list(classes: object) -> bool:
    """A list, tuple, NumPy array or tensor of integer classes (CIFAR-100's coarse labels often come as arrays)."""
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__len__") or not hasattr(classes, "__iter__"):
        return False
    return all(_is_int(c) for c in classes)


@dataclass(frozen=True)
class Groups:
    """Classes resolved to groups: ``of_class`` [C] group index of each class, ``names`` [G] group names."""

    of_class: Tensor
    names: list[str]


def resolve_groups(class_groups: ClassGroups, num_classes: int) -> Groups:
    """Each class's group index and the group names (a list's distinct ids in order of appearance, or a dict's keys).

    Raises:
        ValueError: for a list whose length is not ``num_classes``, or a dict that leaves a class out, names it
            twice or names a class outside [0, num_classes).
    """
    check_class_groups(class_groups)
    if isinstance(class_groups, Mapping):
        names = [str(name) for name in class_groups]
        of_class = torch.full((num_classes,), -1, dtype=torch.long)
        for index, (name, classes) in enumerate(class_groups.items()):
            for c in map(operator.index, classes):
                if not 0 <= c < num_classes:
                    raise ValueError(f"`class_groups` group {name!r} names class {c}, outside [0, {num_classes}).")
                if of_class[c] >= 0:
                    raise ValueError(
                        f"`class_groups` places class {c} in two groups, {names[int(of_class[c])]!r} and {name!r}."
                    )
                of_class[c] = index
        missing = torch.nonzero(of_class < 0).flatten().tolist()
        if missing:
            raise ValueError(f"`class_groups` leaves classes {missing} in no group; every class needs one.")
        return Groups(of_class, names)
    if len(class_groups) != num_classes:
        raise ValueError(
            f"`class_groups` must give the group of each of the {num_classes} classes, got {len(class_groups)} entries."
        )
    class_groups = [g if isinstance(g, str) else operator.index(g) for g in class_groups]
    ids = list(dict.fromkeys(class_groups))
    return Groups(torch.tensor([ids.index(g) for g in class_groups]), [str(g) for g in ids])


def group_means(class_matrix: Tensor, groups: Groups) -> tuple[float, float]:
    """``(between_class_within_group, between_groups)``: NaN-ignoring means of the class matrix's off-diagonal
    entries whose two classes share a group, and of those whose classes do not (NaN when there are none)."""
    of = groups.of_class.to(class_matrix.device)
    same_group = of[:, None] == of[None, :]
    off_diagonal = ~torch.eye(class_matrix.shape[0], dtype=torch.bool, device=class_matrix.device)
    values = class_matrix.double()
    within = values[same_group & off_diagonal]
    between = values[~same_group]
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return float(within.nanmean() if within.numel() else nan), float(between.nanmean() if between.numel() else nan)


def group_matrix(stiffness: Tensor, labels: Tensor, labels2: Tensor | None, groups: Groups) -> Tensor:
    """[G, G] mean stiffness over pairs of examples by group (i != j when ``labels2`` is None: one set)."""
    of = groups.of_class.to(labels.device)
    rows = of[labels.long()]
    cols = None if labels2 is None else of[labels2.long().to(labels.device)]
    return class_stiffness(stiffness, rows, cols, num_classes=len(groups.names))


def add_group_measures(result: "StiffnessResult", class_groups: ClassGroups) -> None:
    """Group matrices and the two group scalars of each pair and kind, from the result's stiffness matrices.

    Raises:
        ValueError: when ``class_groups`` does not fit the result's classes, or the result lacks its stiffness or class
            matrices (``result.has_stiffness``).
    """
    groups = resolve_groups(class_groups, result.num_classes)
    result.group_names = groups.names
    for pair, (rows, cols) in PAIRS.items():
        if pair not in result.classes:
            continue
        labels2 = None if rows == cols else result.labels[cols]
        for kind in result.kinds:
            whole = result.classes[pair][kind][MODEL]
            if whole.stiffness is None or whole.matrix is None:
                raise ValueError(
                    f"class groups need the {pair} {kind} stiffness and class matrices; the result lacks them."
                )
            matrix = group_matrix(whole.stiffness, result.labels[rows], labels2, groups)
            result.groups.setdefault(pair, {})[kind] = GroupMeasures(matrix, *group_means(whole.matrix, groups))
