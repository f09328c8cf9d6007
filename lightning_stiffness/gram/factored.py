"""The factored Gram engine: one batched forward and backward with hooks, per-layer Gram matrices summed.

For every module with a registered rule (:mod:`.rules`), a forward hook records its input activations and output;
one backward of the summed per-example losses gives the gradient with respect to each output (examples are
independent in eval mode, so row i of that gradient is example i's own *when the layer's examples lie along dim 0*).
Each rule turns those factors into per-parameter terms (:mod:`.terms`) whose Gram matrices sum to the layer's.

Exactness does not rest on the rules' assumptions: every term is checked per example (:mod:`.check`) on a few
examples before it is used, and every chunk's term must have one row per example. A parameter goes to an exact
fallback (torch.func, or the loop engine where torch.func cannot run the model), with the reason in the plan, when:

- its module has no rule, or settings the rule does not support, or it is a raw parameter used outside any module;
- it is shared between modules (tied weights), or its module runs other than once per forward;
- its rule raises, its term has the wrong number of rows (examples not along dim 0: sequence-first layouts, time
  steps flattened into the batch, tensors broadcast over the batch), or its per-example gradients on the check
  examples differ from autograd's (used outside its module as well, or any other broken assumption).
"""

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_stiffness.gram.blocks import Progress, blocked_gram
from lightning_stiffness.gram.check import CHECK_EXAMPLES, ReferenceGradients, fallback_engine
from lightning_stiffness.gram.objective import Objective
from lightning_stiffness.gram.rules import Term, rule_for

log = logging.getLogger(__name__)

#: Examples per batched forward/backward when ``chunk_size`` is not given.
DEFAULT_FACTORED_CHUNK = 512


@dataclass
class GramPlan:
    """How each differentiated parameter's share of the Gram matrix is computed.

    Attributes:
        forms: parameter name -> the factored form its rule used (``outer``, ``flat``, ``ghost``, ``materialised``,
            ``materialised-blocked``), or the exact engine that computed it instead (``torch.func``, ``loop``).
        fallback: parameter name -> why no factored rule computed it.
    """

    forms: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"  {name}: {form}" + (f" ({self.fallback[name]})" if name in self.fallback else "")
            for name, form in self.forms.items()
        ]
        return "gram plan:\n" + "\n".join(lines)


def owner(param_name: str) -> str:
    """The per-layer key of a parameter: its module's qualified name, or the name itself for a root parameter."""
    module, _, _ = param_name.rpartition(".")
    return module or param_name


@dataclass
class _Layer:
    module: nn.Module
    params: dict[str, str]  # local name ("weight") -> full name ("net.0.weight")


def _candidate_layers(model: nn.Module, chosen: dict[str, Tensor], plan: GramPlan) -> dict[str, _Layer]:
    """Modules whose chosen parameters a rule can cover; the other chosen parameters are marked for fallback."""
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of[id(p)].append(name)
    layers: dict[str, _Layer] = {}
    for module_name, module in model.named_modules():
        rule = rule_for(module)
        if rule is None:
            continue
        covered = {}
        for local, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{local}" if module_name else local
            if full not in chosen:
                continue
            if len(names_of[id(p)]) > 1:
                plan.fallback[full] = "shared with " + ", ".join(n for n in names_of[id(p)] if n != full)
            elif local in rule.params:
                covered[local] = full
        if covered:
            layers[module_name] = _Layer(module, covered)
    covered_names = {full for layer in layers.values() for full in layer.params.values()}
    for name in chosen:
        if name not in covered_names and name not in plan.fallback:
            plan.fallback[name] = "no factored rule for its module"
    return layers


def _forward_backward(
    objective: Objective, layers: dict[str, _Layer], inputs: Tensor, targets: Tensor
) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """One batched forward and backward: per layer, its calls as (input activations, gradient of its output)."""
    leaves = {name: p.detach().requires_grad_(True) for name, p in objective.params.items()}
    constants = objective.constants(leaves)
    calls: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)

    def hook_for(layer_name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            first = args[0] if args else kwargs.get("input")
            calls[layer_name].append((first.detach() if isinstance(first, Tensor) else first, output))

        return hook

    handles = [layer.module.register_forward_hook(hook_for(name), with_kwargs=True) for name, layer in layers.items()]
    try:
        loss = objective.loss(leaves, constants, inputs, targets)
        outputs = [out for name in layers for _, out in calls[name] if isinstance(out, Tensor) and out.requires_grad]
        grads = iter(torch.autograd.grad(loss, outputs, allow_unused=True) if outputs else ())
        return {
            name: [
                (act, _backprop(out, grads) if isinstance(out, Tensor) and out.requires_grad else None)
                for act, out in calls[name]
            ]
            for name in layers
        }
    finally:
        for handle in handles:
            handle.remove()
        objective.guard.restore()


def _backprop(output: Tensor, grads) -> Tensor:
    grad = next(grads)
    return torch.zeros_like(output) if grad is None else grad.detach()


def _chunk_terms(layer: _Layer, calls: list, count: int, n: int, m: int) -> tuple[dict[str, Term] | None, str | None]:
    """A layer's terms for one chunk of ``count`` examples, or why the layer cannot be factored."""
    if len(calls) != 1:
        return None, f"module called {len(calls)} times in one forward"
    activations, backprops = calls[0]
    if not isinstance(activations, Tensor) or backprops is None:
        return None, "its input or output is not one tensor, or its output does not depend on the parameters"
    rule = rule_for(layer.module)
    try:
        terms = rule.fn(layer.module, activations, backprops, set(layer.params), n, m)
    except Exception as error:  # a rule meeting a layout it does not handle: the fallback is exact
        return None, f"its rule raised {type(error).__name__}: {error}"
    rows = {term.num_examples for term in terms.values()}
    if rows != {count}:
        return None, f"its input has {min(rows)} rows for {count} examples (the examples are not along dim 0)"
    return terms, None


def _capture(
    objective: Objective,
    layers: dict[str, _Layer],
    inputs: Tensor,
    targets: Tensor,
    chunk: int,
    plan: GramPlan,
    n: int,
    m: int,
) -> dict[str, dict[str, Term]]:
    """Per covered layer, its terms (local parameter name -> term) over all examples, built chunk by chunk.

    Layers that cannot be factored on some chunk lose their parameters to the fallback (in ``plan``) and leave
    ``layers``.
    """
    chunks: dict[str, list[dict[str, Term]]] = defaultdict(list)
    for start in range(0, inputs.shape[0], chunk):
        x, y = inputs[start : start + chunk], targets[start : start + chunk]
        calls = _forward_backward(objective, layers, x, y)
        for name in list(layers):
            terms, why = _chunk_terms(layers[name], calls[name], x.shape[0], n, m)
            if why is not None:
                for full in layers.pop(name).params.values():
                    plan.fallback[full] = why
            else:
                chunks[name].append(terms)
        del calls  # frees this chunk's graph before the next forward
    return {
        name: {local: type(parts[0][local]).concat([part[local] for part in parts]) for local in layers[name].params}
        for name, parts in chunks.items()
        if name in layers
    }


def _check(objective: Objective, layers: dict[str, _Layer], reference: ReferenceGradients, plan: GramPlan, n, m):
    """Run the per-example check of every covered parameter's term; failures go to the fallback (:mod:`.check`)."""
    count = reference.inputs.shape[0]
    terms = _capture(objective, layers, reference.inputs, reference.targets, count, plan, n, m)
    for name in list(layers):
        layer = layers[name]
        for local, full in list(layer.params.items()):
            why = reference.disagreement(full, terms[name][local].per_example())
            if why is not None:
                plan.fallback[full] = "per-example check: " + why
                del layer.params[local]
        if not layer.params:
            del layers[name]


def factored_grams(
    objective: Objective,
    inputs: Tensor,
    targets: Tensor,
    inputs2: Tensor | None = None,
    targets2: Tensor | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress = None,
    gather_columns: Callable[[Term], Term] | None = None,
) -> tuple[dict[str, Tensor], GramPlan]:
    """Per-layer Gram matrices (key: :func:`owner` of the parameters) and the plan that produced them.

    With ``gather_columns`` (distributed use), ``inputs`` are this process's rows and ``inputs2`` all examples: each
    term of the rows is passed to ``gather_columns``, which returns the same term over all examples (gathered from
    every process), instead of capturing the columns again; ``inputs2`` then serves the check and the fallback.
    """
    plan = GramPlan()
    layers = _candidate_layers(objective.model, objective.params, plan)
    chunk = chunk_size or DEFAULT_FACTORED_CHUNK
    n = inputs.shape[0]
    m = n if inputs2 is None else inputs2.shape[0]
    if gather_columns is not None:
        n = m  # every process must pick the same form for a layer, so decide on the whole matrix's size
    # The check runs on the first examples of the columns when they are gathered: the same on every process, so
    # every process makes the same decisions.
    check_x, check_y = (inputs, targets) if gather_columns is None else (inputs2, targets2)
    reference = ReferenceGradients(objective, check_x[:CHECK_EXAMPLES], check_y[:CHECK_EXAMPLES])
    if layers:
        _check(objective, layers, reference, plan, n, m)
    rows = _capture(objective, layers, inputs, targets, chunk, plan, n, m) if layers else {}
    if gather_columns is not None:
        cols = {name: {local: gather_columns(term) for local, term in terms.items()} for name, terms in rows.items()}
    elif inputs2 is None:
        cols = rows
    else:
        cols = _capture(objective, layers, inputs2, targets2, chunk, plan, n, m)
    grams = _factored_part(layers, rows, cols, plan, dtype, progress)
    if plan.fallback:
        rest = [name for name in objective.params if name in plan.fallback]
        engine, per_example = fallback_engine(objective, rest, reference)
        plan.forms.update(dict.fromkeys(rest, engine))
        fallback = blocked_gram(
            per_example,
            {name: objective.params[name] for name in rest},
            inputs,
            targets,
            inputs2,
            targets2,
            chunk_size=chunk_size,
            dtype=dtype,
            groups={name: owner(name) for name in rest},
        )
        for key, gram in fallback.items():
            grams[key] = grams[key].add_(gram) if key in grams else gram
        if progress is not None:
            progress(len(grams), len(grams))
    plan.forms = {name: plan.forms[name] for name in objective.params if name in plan.forms}
    log.debug("%s", plan)
    return grams, plan


def _factored_part(layers, rows, cols, plan: GramPlan, dtype: torch.dtype, progress: Progress) -> dict[str, Tensor]:
    """Each covered layer's Gram matrix, the sum of its terms' (only layers still covered in ``plan``)."""
    grams: dict[str, Tensor] = {}
    steps = len(rows) + (1 if plan.fallback else 0)
    for step, (name, row_terms) in enumerate(rows.items(), start=1):
        if name not in layers:  # lost to the fallback while the columns were captured
            continue
        gram = None
        for local, term in row_terms.items():
            if local not in layers[name].params:
                continue
            plan.forms[layers[name].params[local]] = term.form
            block = term.gram(cols[name][local])
            gram = block if gram is None else gram.add_(block)
        if gram is not None:
            grams[name] = gram.to(dtype)
        if progress is not None:
            progress(step, steps)
    return grams
