"""How a collated batch splits into ``(x, y)``: a tuple's or list's first two entries, or a dict's label and the rest.

The probe sets (:mod:`lightning_stiffness.callback.probe_sets`) and the whole-dataset measure
(:mod:`~lightning_stiffness.measures.whole_dataset`) read batches this way unless they are given a ``batch_to_xy``.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_stiffness.exceptions import ProbeDataError

#: Label keys looked for, in this order, when a batch is a dict.
TARGET_KEYS = ("y", "label", "labels", "target", "targets")


def default_batch_to_xy(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` from a collated batch (or a dataset item): a tuple's or list's first two entries, or a dict's label
    and everything else.

    For a dict, ``y`` is the entry under the first of ``TARGET_KEYS`` found (``y``, ``label``, ``labels``, ``target``,
    ``targets``) and ``x`` every other entry: the tensor itself when there is one (the model's positional argument),
    a dict when there are several (its keyword arguments, for example ``input_ids`` and ``attention_mask``).

    Raises:
        ProbeDataError: for a dict without a label key, or a batch that is neither a tuple, a list nor a dict.
    """
    if isinstance(batch, Mapping):
        y_key = next((k for k in TARGET_KEYS if k in batch), None)
        if y_key is None:
            raise ProbeDataError(
                f"a batch is a dict with keys {sorted(map(str, batch))}; expected a label key among {TARGET_KEYS}. "
                "Pass `batch_to_xy` to StiffnessCallback for other layouts."
            )
        inputs = {key: value for key, value in batch.items() if key != y_key}
        return (next(iter(inputs.values())) if len(inputs) == 1 else inputs), batch[y_key]
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ProbeDataError(
        f"a batch of type {type(batch).__name__} has no label: expected an (x, y) tuple or list, or a dict. "
        "Pass `batch_to_xy` to StiffnessCallback for other layouts."
    )
