r"""Exact class stiffness over every pair of a whole dataset, in one streaming pass and memory independent of N.

With :math:`u_i = g_i / |g_i|` the direction of example :math:`i`'s loss gradient and
:math:`S_a = \sum_{i \in a} u_i` the sum of the directions of class :math:`a`'s :math:`n_a` examples, the mean cosine
stiffness over all pairs :math:`i \neq j` (Fort et al., arXiv 1901.09491) is

.. math::
    C_{ab} = \frac{S_a \cdot S_b}{n_a n_b} \quad (a \neq b), \qquad
    C_{aa} = \frac{|S_a|^2 - n_a}{n_a (n_a - 1)},

because :math:`|S_a|^2 = \sum_{i, j \in a} u_i \cdot u_j` and each :math:`u_i \cdot u_i = 1`. So the
:math:`O(N^2)` pairs reduce to :math:`C` sums of :math:`P` numbers. Each batch is measured twice: its examples'
gradient norms :math:`|g_i|` are the square roots of the diagonal of its Gram matrix
(:func:`~lightning_stiffness.gram.gradient_gram`, exact on every model: factored where a rule applies, torch.func or
the loop engine elsewhere); then, per class present in the batch, one backward pass of the weighted loss
:math:`\sum_{i \in a} \ell_i / |g_i|` gives :math:`\sum_{i \in a} g_i / |g_i|` directly (the gradient of a weighted sum
of per-example losses is the weighted sum of their gradients, exactly, since in eval mode the examples do not
interact). The norms of a batch are used at once, so a shuffling loader is fine and nothing grows with N.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stiffness.gram import gradient_gram_with
from lightning_stiffness.gram.buffers import untouched_buffers
from lightning_stiffness.gram.inputs import (
    ForwardFn,
    Inputs,
    apply,
    concat,
    default_forward,
    num_examples,
    take,
    tensors,
)
from lightning_stiffness.gram.options import GramOptions
from lightning_stiffness.gram.validation import LossFn, check_int, default_loss_fn, select_parameters
from lightning_stiffness.measures.batches import default_batch_to_xy
from lightning_stiffness.measures.functional import within_between
from lightning_stiffness.names import PREFIX, dataset_class_tag

__all__ = ["DatasetResult", "class_sums_to_matrix", "dataset_class_stiffness", "dataset_class_sums"]


def dataset_class_stiffness(
    model: nn.Module,
    dataloader: Any,
    num_classes: int,
    *,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    batch_to_xy: Callable[[Any], tuple[Inputs, Tensor]] | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    block_size: int = 1024,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    r"""Exact mean cosine stiffness between the classes of every example of ``dataloader`` (pairs :math:`i \neq j`).

    Equal (up to rounding) to ``class_stiffness(cosine_stiffness(gradient_gram(model, X, Y)), Y)`` over all the
    loader's examples, without the [N, N] matrix: the cost is about one forward and backward pass over the data plus
    a Gram matrix of each batch (its diagonal gives the norms), and the memory is :math:`C \times P` numbers (the
    class sums :math:`S_a`), whatever N. Formula in the module docstring.

    The model is evaluated as given (call ``model.eval()``; BatchNorm or dropout in training mode is refused, as by
    :func:`~lightning_stiffness.gram.gradient_gram`). Parameters, ``.grad`` and buffers are left as they were.
    Examples with a zero gradient have no direction and are left out (as the NaN entries of
    :func:`~lightning_stiffness.functional.cosine_stiffness` are).

    Args:
        model: the network; ``model(x)`` (or ``forward_fn(model, x)``) gives the outputs ``loss_fn`` takes.
        dataloader: any iterable of batches (a ``DataLoader``); each batch gives ``(x, y)`` through ``batch_to_xy``.
        num_classes: C; labels must lie in [0, C).
        loss_fn: per-example loss ``loss_fn(outputs, targets) -> [B]``. Default: cross-entropy.
        forward_fn: ``forward_fn(model, x) -> outputs``. Default: ``model(x)`` (``model(*x)``, ``model(**x)``).
        batch_to_xy: ``batch -> (x, y)``; ``x`` a tensor, tuple or dict of tensors along dim 0. Default: a tuple's
            first two entries, or a dict's label key (``y``, ``label``, ``labels``, ``target``, ``targets``) and the
            rest.
        method: Gram engine of the norms (see :func:`~lightning_stiffness.gram.gradient_gram`).
        chunk_size: examples per block inside each Gram matrix of norms (bounds its engine's memory).
        block_size: consecutive batches are joined into blocks of about this many examples (batches whose inputs
            do not concatenate, such as sequences padded to other lengths, are not joined): one Gram matrix of norms
            and one backward pass per class each. Larger blocks spread the engine's fixed cost (its per-example
            check) over more examples, but a Gram matrix costs ``block_size`` products per example.
        all_reduce: sums a tensor over processes (DDP: each process iterates its own shard, the class sums and
            counts are added); None for one process.
        progress: called as ``progress(batches done, total batches or 0)``.

    Returns:
        [C, C] float64 tensor on the CPU: entry (a, b) the mean cosine stiffness over pairs of examples of classes
        a and b; NaN where a class has no example (or, on the diagonal, one).

    Raises:
        ValueError: for ``num_classes`` < 1, labels outside [0, C) or not integers, a non-finite loss, or the
            arguments :func:`~lightning_stiffness.gram.gradient_gram` refuses.
    """
    gram = GramOptions(loss_fn=loss_fn, forward_fn=forward_fn, method=method, chunk_size=chunk_size)
    sums, counts = dataset_class_sums(
        model, dataloader, num_classes, gram, batch_to_xy=batch_to_xy, block_size=block_size, progress=progress
    )
    if all_reduce is not None:
        sums, counts = all_reduce(sums), all_reduce(counts)
    return class_sums_to_matrix(sums, counts).cpu()


def dataset_class_sums(
    model: nn.Module,
    dataloader: Any,
    num_classes: int,
    gram: GramOptions,
    *,
    batch_to_xy: Callable[[Any], tuple[Inputs, Tensor]] | None = None,
    block_size: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """This process's class sums of gradient directions [C, P] and example counts [C] (float64), over the loader.

    Sums from disjoint shards of the data add; :func:`class_sums_to_matrix` turns the totals into the class matrix.
    ``gram`` holds the keywords of the Gram matrices of norms (``loss_fn``, ``forward_fn``, ``method``,
    ``chunk_size``); the others as for :func:`dataset_class_stiffness`, and the same errors.
    """
    check_int(num_classes, "num_classes")
    check_int(block_size, "block_size")
    to_xy = batch_to_xy or default_batch_to_xy
    params = select_parameters(model, None)
    dtype = torch.promote_types(next(iter(params.values())).dtype, torch.float32)
    device = next(iter(params.values())).device
    sums = torch.zeros(num_classes, sum(p.numel() for p in params.values()), dtype=dtype, device=device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    total = len(dataloader) if hasattr(dataloader, "__len__") else 0

    def measure(block: list[tuple[Inputs, Tensor]]) -> None:
        x, y = _joined(block)
        whole = gradient_gram_with(gram, model, x, y)
        if not isinstance(whole, Tensor):
            raise ValueError("`gram` must not set `per_layer`: the class sums need the Gram matrix of all parameters.")
        norms = whole.diagonal().clamp_min(0).sqrt()
        if not bool(torch.isfinite(norms).all()):
            raise ValueError("the loss or its gradient is not finite for some examples of the loader.")
        _add_class_sums(model, params, x, y, norms, sums, counts, gram)

    pending: list[tuple[Inputs, Tensor]] = []
    for done, batch in enumerate(dataloader, start=1):
        x, y = to_xy(batch)
        x, y = apply(x, lambda t: t.to(device)), _checked_labels(y, num_examples(x, "x"), num_classes).to(device)
        if pending and not _joinable(pending[0][0], x):
            measure(pending)
            pending = []
        pending.append((x, y))
        if sum(len(t) for _, t in pending) >= block_size:
            measure(pending)
            pending = []
        if progress is not None:
            progress(done, total)
    if pending:
        measure(pending)
    return sums, counts


def _joinable(a: Inputs, b: Inputs) -> bool:
    """Whether two batches' inputs have the same structure and the same shapes past dim 0 (so they concatenate)."""
    shapes_a = [t.shape[1:] for t in tensors(a)]
    return type(a) is type(b) and shapes_a == [t.shape[1:] for t in tensors(b)]


def _joined(block: list[tuple[Inputs, Tensor]]) -> tuple[Inputs, Tensor]:
    """Consecutive batches as one (a tensor, tuple or dict of tensors concatenated along dim 0)."""
    if len(block) == 1:
        return block[0]
    return concat([x for x, _ in block]), torch.cat([y for _, y in block])


def class_sums_to_matrix(sums: Tensor, counts: Tensor) -> Tensor:
    r"""Mean cosine stiffness between classes from the sums of directions ``sums`` [C, P] and counts ``counts`` [C].

    :math:`C_{ab} = S_a \cdot S_b / (n_a n_b)` off the diagonal, :math:`(|S_a|^2 - n_a) / (n_a (n_a - 1))` on it
    (module docstring); float64, NaN where there are no pairs.
    """
    dots = sums.double() @ sums.double().T
    n = counts.double().to(dots.device)
    off = dots / (n[:, None] * n[None, :])
    within = (dots.diagonal() - n) / (n * (n - 1))
    matrix = off.clone()
    matrix.diagonal().copy_(within)
    pairs = n[:, None] * n[None, :] - torch.diag(n)
    return torch.where(pairs > 0, matrix, torch.full_like(matrix, float("nan")))


def _add_class_sums(
    model: nn.Module,
    params: dict[str, Tensor],
    x: Inputs,
    y: Tensor,
    norms: Tensor,
    sums: Tensor,
    counts: Tensor,
    gram: GramOptions,
) -> None:
    """Add, per class present, :math:`\\sum_{i \\in a} g_i / |g_i|` (one weighted backward pass) and the count."""
    forward, loss_fn = gram.forward_fn or default_forward, gram.loss_fn or default_loss_fn
    wanted = list(params.values())
    with untouched_buffers(model) as guard, torch.enable_grad():
        for label in torch.unique(y).tolist():
            index = torch.nonzero((y == label) & (norms > 0)).flatten()
            if index.numel() == 0:
                continue
            x_a, y_a = take(x, index), y[index]
            try:
                losses = loss_fn(forward(model, x_a), y_a)
                loss = (losses / norms[index].to(losses.dtype)).sum()
                grads = torch.autograd.grad(loss, wanted, allow_unused=True)
            finally:
                guard.restore()
            flat = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, wanted, strict=True)]
            sums[label] += torch.cat([g.reshape(-1) for g in flat]).to(sums.dtype)
            counts[label] += index.numel()


def _checked_labels(y: Any, count: int, num_classes: int) -> Tensor:
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.shape != (count,):
        raise ValueError(f"labels must be {count} integer classes (one per example), got {y.dtype} {tuple(y.shape)}.")
    if count and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}].")
    return y.long()


@dataclass
class DatasetResult:
    """Exact cosine class stiffness over every pair of the training set (:func:`dataset_class_stiffness`), measured
    at the end of ``epoch`` (global step ``step``), in ``seconds``."""

    epoch: int
    step: int
    class_matrix: Tensor
    seconds: float = float("nan")

    def scalars(self, prefix: str = PREFIX) -> dict[str, float]:
        within, between = within_between(self.class_matrix)
        return {dataset_class_tag("within", prefix): within, dataset_class_tag("between", prefix): between}

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (what the raw file holds; loads with ``weights_only=True``)."""
        return asdict(self)
