"""Measuring one probe (the probe sets' losses checked, this process's rows of the Gram matrix, one result) and the
whole training set (each process its shard, the class sums reduced).

Pure PyTorch apart from the :class:`~lightning_stiffness.callback.distributed.Communicator`, which is an identity with
one process: the callback calls :func:`measure_probe` and :func:`measure_dataset` inside its context managers (eval
mode, random states kept, a progress bar) and writes the
:class:`~lightning_stiffness.measures.result.StiffnessResult` or
:class:`~lightning_stiffness.measures.whole_dataset.DatasetResult` they return with the same writers.
"""

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stiffness.callback.distributed import Communicator
from lightning_stiffness.callback.probe_sets import ProbeSet
from lightning_stiffness.callback.progress import Progress
from lightning_stiffness.exceptions import ProbeSkipped
from lightning_stiffness.gram import GramOptions, gradient_gram_with
from lightning_stiffness.gram.inputs import Inputs, apply, concat, take, tensors
from lightning_stiffness.gram.validation import called_loss, checked_losses, default_loss_fn, loss_check_counts
from lightning_stiffness.measures.batches import default_batch_to_xy
from lightning_stiffness.measures.probe_measures import GramRows, measure_stiffness
from lightning_stiffness.measures.representations import forward_with_outputs
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.measures.whole_dataset import DatasetResult, class_sums_to_matrix, dataset_class_sums
from lightning_stiffness.names import INPUT


@dataclass(frozen=True)
class ProbeOptions:
    """How a probe measures (the callback's arguments, resolved).

    Attributes:
        kinds: stiffness kinds.
        gram: how the Gram matrices are computed (``loss_fn``, ``forward_fn``, ``method``, ``chunk_size``); the probe
            adds its own ``per_layer``, ``progress`` and, under DDP, ``gather_columns``.
        per_layer: also measure each layer's own Gram matrix.
        layers: modules whose outputs give representation distances, in network order.
        layer_distance: metric of those distances.
        num_distance_bins: bins of the distance curves.
        keep_matrices: gather the whole Gram matrix, for the stiffness matrices of the raw results.
    """

    kinds: tuple[str, ...]
    gram: GramOptions = field(default_factory=GramOptions)
    per_layer: bool = False
    layers: tuple[str, ...] = ()
    layer_distance: str = "cosine"
    num_distance_bins: int = 20
    keep_matrices: bool = True


def measure_probe(
    model: nn.Module,
    probe_sets: dict[str, ProbeSet],
    num_classes: int,
    options: ProbeOptions,
    comm: Communicator | None = None,
    *,
    epoch: int = 0,
    step: int = 0,
    progress: Progress | None = None,
    convert_input: Callable[[Inputs], Inputs] | None = None,
) -> StiffnessResult:
    """Measure stiffness between all probe examples of ``model`` (evaluated as given, with gradients enabled).

    Under DDP every process calls this with the same probe sets; each computes its share of the Gram rows and the
    metrics reduce them, so every process returns the same result. ``convert_input`` converts the probe inputs as
    the trainer's precision plugin converts a batch (``bf16-true``, ``64-true``).

    Raises:
        ProbeSkipped: when the loss of a probe example is not finite, or its gradient is not (NaN or inf with a
            finite loss, for example from a masked NaN input); the message names the examples.
        FailedElsewhere: when the probe failed on another process.
    """
    comm = comm or Communicator()
    device = next(iter(model.parameters()), torch.empty(0)).device
    convert = convert_input or (lambda x: x)
    inputs = {name: convert(apply(p.inputs, lambda t: t.to(device))) for name, p in probe_sets.items()}
    labels = {name: p.labels.to(device) for name, p in probe_sets.items()}
    all_x, all_y = concat(list(inputs.values())), torch.cat(list(labels.values()))
    total = len(all_y)
    span = comm.span(total)
    # Every failure is agreed on by all processes before the next collective call, so that none is left waiting.
    named = _ExampleNames(probe_sets)
    representations = comm.agreed(lambda: _checked_forward(model, all_x, all_y, options, named))
    grams = comm.agreed(lambda: _gram_rows(model, all_x, all_y, span, options, comm, progress))
    rows = torch.arange(span.start, span.stop, device=device)
    parts = {key: GramRows(g, rows, comm.all_norms(g, span, total)) for key, g in grams.items()}
    whole = parts.pop("")
    _check_finite_gradients(whole, span, total, comm, named)
    layer_grams: dict[str, Tensor | GramRows] = dict(parts)
    features = {name: input_features(x) for name, x in inputs.items()}
    result = measure_stiffness(
        whole,
        features,
        labels,
        {name: p.indices for name, p in probe_sets.items()},
        kinds=options.kinds,
        num_classes=num_classes,
        num_distance_bins=options.num_distance_bins,
        epoch=epoch,
        step=step,
        layer_grams=layer_grams or None,
        representations=_split_by_set(representations, features) if options.layers else None,
        distance_metric=options.layer_distance,
        full_gram=comm.gather_rows(whole.values, total) if options.keep_matrices else None,
        sync=comm.world_size > 1,
    )
    if comm.rank == 0:
        _warn_undefined_distances(result, named)
    return result


def measure_dataset(
    model: nn.Module,
    dataloader: Any,
    num_classes: int,
    gram: GramOptions,
    comm: Communicator | None = None,
    *,
    epoch: int = 0,
    step: int = 0,
    batch_to_xy: Callable[[Any], tuple[Inputs, Tensor]] | None = None,
    convert_input: Callable[[Inputs], Inputs] | None = None,
    progress: Progress | None = None,
) -> DatasetResult:
    """Exact cosine class stiffness over every pair of the examples of ``dataloader`` (this process's shard under
    DDP; the class sums are added over processes, so every process returns the same result), measured at the end of
    ``epoch`` (global step ``step``), and how long it took.

    ``convert_input`` converts each batch's inputs as the trainer's precision plugin converts a batch; ``gram`` as
    for the probe (:func:`~lightning_stiffness.measures.whole_dataset.dataset_class_sums`).

    Raises:
        ValueError: for a non-finite loss or labels outside [0, ``num_classes``).
        FailedElsewhere: when the measure failed on another process.
    """
    comm = comm or Communicator()
    started = time.perf_counter()
    to_xy, convert = batch_to_xy or default_batch_to_xy, convert_input or (lambda x: x)

    def converted_xy(batch: Any) -> tuple[Inputs, Tensor]:  # inputs as training sees them (64-true, bf16-true, ...)
        x, y = to_xy(batch)
        return convert(x), y

    # Agreed on before the sums are reduced, so that no process waits in a reduction the others never reach.
    sums = comm.agreed(
        lambda: dataset_class_sums(model, dataloader, num_classes, gram, batch_to_xy=converted_xy, progress=progress)
    )
    matrix = class_sums_to_matrix(*(comm.sum(t) for t in sums))
    return DatasetResult(epoch, step, matrix, time.perf_counter() - started)


def input_features(x: Inputs) -> Tensor:
    """[N, F] features of the inputs for input-space distances: the floating-point tensors of ``x`` flattened and
    joined (images, features), or, when it has none (token ids and masks), all its tensors as numbers; for such
    inputs the distances in a layer's representation (``layers``) are the meaningful ones."""
    leaves = tensors(x)
    chosen = [t for t in leaves if t.is_floating_point()] or leaves
    return torch.cat(
        [t.reshape(t.shape[0], -1).float() if not t.is_floating_point() else t.flatten(1) for t in chosen], 1
    )


def check_probe_loss(
    model: nn.Module,
    probe_set: ProbeSet,
    options: ProbeOptions,
    convert_input: Callable[[Inputs], Inputs] | None = None,
) -> None:
    """The forward and the loss on two and on three probe examples, once when training starts, so that a loss
    every probe would fail on is refused then rather than skipped at each probe.

    An error the loss raises on the model's outputs is a misconfiguration (it fails alike on every process, whose
    probe examples and weights are the same). Any other error, in the forward, is left to the probes, which skip or
    raise it under their own rules, agreed by every process: raised here, on one process only, it would leave the
    others waiting.

    Raises:
        ValueError: when ``loss_fn`` does not return one loss per example (a mean, ``reduction="mean"``), or cannot
            take the model's outputs and the labels.
        TypeError: when the default loss finds no logits in the model's outputs, or the loss cannot take them.
    """
    device = next(iter(model.parameters()), torch.empty(0)).device
    loss_fn = options.gram.loss_fn or default_loss_fn
    for n in loss_check_counts(len(probe_set)):
        x = (convert_input or (lambda v: v))(apply(take(probe_set.inputs, slice(0, n)), lambda t: t.to(device)))
        y = probe_set.labels[:n].to(device)

        def losses(outputs: Any, chunk: slice, y: Tensor = y, n: int = n) -> Tensor:
            return checked_losses(called_loss(loss_fn, outputs, y), n)

        try:
            forward_with_outputs(model, x, (), n, options.gram.forward_fn, per_chunk=losses)
        except (ValueError, TypeError):
            raise
        except Exception:  # not a misconfiguration (out of memory, a failure on one process only):
            return  # the probes meet it under their own rules (skipped or raised, agreed by every process)


def _checked_forward(
    model: nn.Module, x: Inputs, y: Tensor, options: ProbeOptions, named: "_ExampleNames"
) -> dict[str, Tensor]:
    """One forward without gradients: checks the losses, records the outputs of ``options.layers``.

    The model's outputs are only handed to the loss, chunk by chunk, so that any output the loss takes (a Hugging
    Face ``ModelOutput``, a tuple with auxiliary logits, a dict) works.
    """
    gram = options.gram
    loss_fn = gram.loss_fn or default_loss_fn

    def losses(outputs: Any, chunk: slice) -> Tensor:
        return checked_losses(loss_fn(outputs, y[chunk]), chunk.stop - chunk.start)

    losses_all, representations = forward_with_outputs(
        model, x, options.layers, gram.chunk_size or 512, gram.forward_fn, per_chunk=losses
    )
    assert losses_all is not None  # per_chunk given
    bad = torch.nonzero(~torch.isfinite(losses_all)).flatten()
    if bad.numel():
        raise ProbeSkipped(f"the loss is not finite for {bad.numel()} of {len(y)} probe examples: {named(bad)}")
    return representations


def _check_finite_gradients(
    whole: GramRows, span: slice, total: int, comm: Communicator, named: "_ExampleNames"
) -> None:
    """Refuse a probe with an example whose gradient holds a NaN or an inf although its loss is finite (its squared
    norm, the Gram matrix's diagonal, is then not finite), or whose Gram matrix overflows elsewhere. Every measure
    would otherwise quietly leave the example out (its cosines are NaN) or turn NaN (coherence). The diagonal is
    every process's, and the overflow count is summed over processes, so that all of them raise alike."""
    bad = torch.nonzero(~torch.isfinite(whole.sq_norms)).flatten()
    if bad.numel():
        raise ProbeSkipped(
            f"the gradient is not finite (NaN or inf) for {bad.numel()} of {total} probe examples although their "
            f"loss is: {named(bad)}. A NaN in an input that the model masks (torch.where, masked_fill) still "
            "reaches the gradient; clean such inputs (torch.nan_to_num) before the model"
        )
    overflow = comm.sum((~torch.isfinite(whole.values)).sum().reshape(1).to(whole.values.dtype))
    if bool(overflow.item() > 0):
        raise ProbeSkipped(
            f"{int(overflow.item())} dot products of finite per-example gradients overflow {whole.values.dtype}"
        )


def _warn_undefined_distances(result: StiffnessResult, named: "_ExampleNames") -> None:
    """Warn, naming the examples, where a distance is undefined, so that no space's distance curves and ξ rest on
    fewer pairs than the probe has without saying so.

    :func:`~lightning_stiffness.measures.functional.pairwise_distances` leaves the diagonal of a set's distances to
    itself non-finite exactly for such examples: features with a NaN or an inf, or all zero under 1 - cos (no
    direction; a layer's ReLU output can be)."""
    offsets, start = {}, 0
    for name, labels in result.labels.items():  # the probe sets in the order ``named`` counts them
        offsets[name], start = start, start + len(labels)
    undefined: dict[str, list[Tensor]] = {}
    for name, offset in offsets.items():
        for space, measures in result.spaces.get(f"{name}-{name}", {}).items():
            diagonal = torch.diagonal(measures.distances).cpu()
            undefined.setdefault(space, []).append(torch.nonzero(~torch.isfinite(diagonal)).flatten() + offset)
    for space, positions in undefined.items():
        bad = torch.cat(positions)
        if bad.numel():
            where = "input space" if space == INPUT else f"the outputs of {space}"
            metric = "cosine" if space == INPUT else result.distance_metric
            warnings.warn(
                f"StiffnessCallback: the distances in {where} are undefined for {bad.numel()} of {start} probe "
                f"examples (NaN or inf features{', or all zero under 1 - cos' if metric == 'cosine' else ''}): "
                f"{named(bad)}. Their pairs are left out of the distance curves and ξ in that space.",
                stacklevel=2,
            )


class _ExampleNames:
    """Positions among all probe examples (the sets one after the other) as ``"train #12, val #3"``: each set's
    name and the example's index in its dataset, the first ten."""

    def __init__(self, probe_sets: dict[str, ProbeSet]) -> None:
        self.names = [(name, int(i)) for name, p in probe_sets.items() for i in p.indices.tolist()]

    def __call__(self, positions: Tensor) -> str:
        shown = [f"{self.names[k][0]} #{self.names[k][1]}" for k in positions.tolist()[:10]]
        more = positions.numel() - len(shown)
        return ", ".join(shown) + (f" and {more} more" if more else "") + " (probe set #dataset index)"


def _gram_rows(
    model: nn.Module,
    x: Inputs,
    y: Tensor,
    span: slice,
    options: ProbeOptions,
    comm: Communicator,
    progress: Progress | None,
) -> dict[str, Tensor]:
    """This process's rows of the Gram matrix (key ``""``) and, with ``per_layer``, of each layer's."""
    gram = replace(options.gram, per_layer=options.per_layer, progress=progress)
    if comm.world_size == 1:
        grams = gradient_gram_with(gram, model, x, y)
    else:
        if gram.method != "torch.func":
            gram = replace(gram, gather_columns=comm.term_gatherer(len(y)))
        # More processes than probe examples: an empty share still takes part in the gathers, with one row that is
        # dropped.
        rows = span if span.stop > span.start else slice(0, 1)
        grams = gradient_gram_with(gram, model, take(x, rows), y[rows], x, y)
        if span.stop == span.start:
            grams = {k: g[:0] for k, g in grams.items()} if isinstance(grams, dict) else grams[:0]
    if not isinstance(grams, dict):  # without `per_layer`, the whole model's rows alone
        return {"": grams}
    total = sum(grams.values())  # a new tensor (0 + each layer's rows), not one of the layers' own
    if not isinstance(total, Tensor):  # `sum` of no layers is 0; gradient_gram refuses a model without parameters
        raise ValueError("the model has no layer whose parameters give Gram rows.")
    return {"": total, **grams}


def _split_by_set(representations: dict[str, Tensor], inputs: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Layer -> outputs of all probe examples, into probe set -> layer -> that set's rows."""
    out, start = {}, 0
    for name, x in inputs.items():
        out[name] = {layer: rows[start : start + x.shape[0]] for layer, rows in representations.items()}
        start += x.shape[0]
    return out
