"""Stiffness between groups of classes (super-classes): CIFAR-100's 20 groups, living against non-living.

Fort et al. (arXiv 1901.09491, later versions) compare stiffness between classes of the same super-class with
stiffness between super-classes. With each class's group given (``class_groups``), a probe's pair and kind get:

- ``between_class_within_group``: the mean of the class matrix's entries (a, b), a != b, with a and b in one group;
- ``between_groups``: the mean of its entries with a and b in different groups (NaN-ignoring means of class-pair
  means, as within/between-class stiffness are);
- the group matrix [G, G]: entry (g, h) the mean stiffness over pairs of examples i in group g, j in group h,
  i != j (so its diagonal holds the pairs within a group, of the same class or not).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_stiffness.functional import class_stiffness

ClassGroups = Sequence[int | str] | Mapping[str, Sequence[int]]


def check_class_groups(class_groups: ClassGroups | None) -> None:
    """Check the form of ``class_groups`` (its size is checked against the classes by :func:`resolve_groups`).

    Raises:
        ValueError: unless it is None, a list of group ids (int or str), or a dict group name -> list of classes.
    """
    if class_groups is None:
        return
    if isinstance(class_groups, Mapping):
        if not class_groups or not all(
            isinstance(classes, Sequence) and not isinstance(classes, str) and all(_is_int(c) for c in classes)
            for classes in class_groups.values()
        ):
            raise ValueError(
                f"`class_groups` as a dict must map group names to lists of classes, got {class_groups!r}."
            )
        return
    if isinstance(class_groups, str) or not isinstance(class_groups, Sequence) or not class_groups:
        raise ValueError(f"`class_groups` must be a list (each class's group) or a dict, got {class_groups!r}.")
    if not all(isinstance(g, str) or _is_int(g) for g in class_groups):
        raise ValueError(
            f"`class_groups` as a list must hold one group id (int or str) per class, got {class_groups!r}."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        for index, classes in enumerate(class_groups.values()):
            for c in classes:
                if not 0 <= c < num_classes or of_class[c] >= 0:
                    raise ValueError(
                        f"`class_groups` must place each class of [0, {num_classes}) in exactly one group; class {c} "
                        "is out of range or in two groups."
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
