"""The per-example check: every factored term, and the torch.func fallback, against one autograd call per example.

A summed gradient cannot see a per-example error: a layer fed [T, N, d] instead of [N, T, d], time steps flattened
into the batch ([N * T, d]) or a tensor broadcast over the batch ([1, T, d]) gives wrong per-example gradients whose
sum is right. So on a few check examples (:data:`CHECK_EXAMPLES`, distinct examples of the probe set), each covered
parameter's per-example gradients from its factored term are compared with the loop engine's (:mod:`.loop`). A
term with the wrong number of rows or wrong values sends its parameter to an exact fallback, with the reason in the
plan. Three examples (or all, when fewer) make the coincidences that could hide a wrong layout harmless: a batch of
one cannot tell a broadcast tensor from a per-example one, but three can by shape; a sequence of length 3 laid out
[T, N, d] has the right shape and is caught by its values.

The fallback is torch.func when it agrees with the loop on the same examples, and the loop engine otherwise (when
``vmap`` raises, or gives other gradients), with one warning naming the modules and the reason.
"""

import warnings

import torch
from torch import Tensor

from lightning_stiffness.gram.blocks import Gradients, PerExampleFn
from lightning_stiffness.gram.inputs import Inputs, take
from lightning_stiffness.gram.loop import loop_per_example
from lightning_stiffness.gram.objective import Objective
from lightning_stiffness.gram.torchfunc import torchfunc_per_example

#: Examples the per-example check runs on (all of them when there are fewer).
CHECK_EXAMPLES = 3
#: Relative tolerance of the per-example check, by the dtype of the gradients.
_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
_RTOL_LOW_PRECISION = 5e-2


class ReferenceGradients:
    """Per-example gradients of every differentiated parameter on the check examples, one autograd call each."""

    def __init__(self, objective: Objective | None, inputs: Inputs, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets
        if objective is None:  # filled by `reordered`
            return
        gradients = loop_per_example(objective, list(objective.params))(inputs, targets)
        self.rows = {name: g.reshape(g.shape[0], -1) for name, g in gradients.items()}
        self.row_norms = {name: rows.norm(dim=1) for name, rows in self.rows.items()}
        # Each example's whole gradient norm: the scale below which a parameter's error cannot matter.
        self.norms = torch.stack(list(self.row_norms.values())).norm(dim=0)

    def reordered(self, order: Tensor) -> "ReferenceGradients":
        """The same gradients for the check examples taken in ``order``."""
        out = ReferenceGradients(None, take(self.inputs, order), self.targets[order])
        out.rows = {name: rows[order] for name, rows in self.rows.items()}
        out.row_norms = {name: norms[order] for name, norms in self.row_norms.items()}
        out.norms = self.norms[order]
        return out

    def disagreement(self, name: str, estimate: Tensor) -> str | None:
        """Why ``estimate`` ([k, numel] rows) is not parameter ``name``'s per-example gradient; None when it is."""
        true = self.rows[name]
        if estimate.shape != true.shape:
            return (
                f"its term has {estimate.shape[0]} rows of {estimate.shape[-1]} numbers for {true.shape[0]} examples "
                f"of {true.shape[1]} (the layer's examples are not along dim 0 of its input)"
            )
        rtol = _RTOL.get(true.dtype, _RTOL_LOW_PRECISION)
        error = (estimate - true).norm(dim=1)
        scale = estimate.norm(dim=1) + self.row_norms[name] + 1e-2 * self.norms
        worst = float((error / scale.clamp_min(torch.finfo(scale.dtype).tiny)).max())
        if worst > rtol:
            return f"its per-example gradients differ from autograd's (relative error {worst:.2g})"
        return None


def fallback_engine(objective: Objective, names: list[str], reference: ReferenceGradients) -> tuple[str, PerExampleFn]:
    """The engine for the parameters ``names`` that no factored term covers: torch.func, or the loop where it fails.

    Returns:
        ``(engine name, per-example gradient function)`` with the name ``"torch.func"`` or ``"loop"``.
    """
    reason = None
    try:
        per_example = torchfunc_per_example(objective, names)
        got: Gradients = per_example(reference.inputs, reference.targets)
        wrong = [name for name in names if reference.disagreement(name, got[name].reshape(got[name].shape[0], -1))]
        if wrong:
            reason = f"torch.func gives other per-example gradients than autograd for {', '.join(wrong[:5])}"
    except Exception as error:  # vmap raises many error types for what it cannot batch
        cause = error.__cause__ or error  # vmap's own message, not the engine's advice around it
        first_line = (str(cause).strip().splitlines() or [""])[0]
        reason = f"torch.func cannot run the model ({type(cause).__name__}: {first_line})"
    if reason is None:
        return "torch.func", per_example
    modules = ", ".join(dict.fromkeys(name.rpartition(".")[0] or name for name in names))
    warnings.warn(
        f"gradient_gram: the parameters of {modules} use the loop engine (one backward pass per example, slower), "
        f"because {reason}.",
        UserWarning,
        stacklevel=2,
    )
    return "loop", loop_per_example(objective, names)
