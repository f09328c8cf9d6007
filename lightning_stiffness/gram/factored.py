"""The factored Gram engine: one batched forward and backward with hooks, per-layer Gram matrices summed.

For every module with a registered rule (:mod:`.rules`), a forward hook records its input activations and output;
one backward of the summed per-example losses gives the gradient with respect to each output (examples are
independent in eval mode, so row i of that gradient is example i's own). Each rule turns those factors into
per-parameter terms whose Gram matrices sum to the layer's. Whatever no rule covers goes to the torch.func engine,
restricted to those parameters, and its Gram matrix is added:

- parameters of modules without a rule, or with settings the rule does not support;
- raw parameters used outside any module that has a rule;
- parameters shared between modules (tied weights) and modules called more than once per forward;
- any parameter whose summed gradient from the factors does not match autograd's (used somewhere else as well):
  checked on every run, so a model that breaks a rule's assumptions gets the exact answer, not a wrong one.
"""

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_stiffness.gram.rules import Term, rule_for
from lightning_stiffness.gram.torchfunc import Progress, torchfunc_gram
from lightning_stiffness.gram.validation import LossFn

log = logging.getLogger(__name__)

#: Examples per batched forward/backward when ``chunk_size`` is not given.
DEFAULT_FACTORED_CHUNK = 512
#: Examples of the separate small pass that checks each rule against autograd's summed gradient.
CHECK_EXAMPLES = 16


@dataclass
class GramPlan:
    """How each differentiated parameter's share of the Gram matrix is computed.

    Attributes:
        forms: parameter name -> the form its rule used (``outer``, ``flat``, ``ghost``, ``materialised``).
        fallback: parameter name -> why it went to the torch.func engine.
    """

    forms: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"  {name}: {form}" for name, form in self.forms.items()]
        lines += [f"  {name}: torch.func ({why})" for name, why in self.fallback.items()]
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


def _capture(
    model: nn.Module,
    loss_fn: LossFn,
    chosen: dict[str, Tensor],
    layers: dict[str, _Layer],
    inputs: Tensor,
    targets: Tensor,
    chunk: int,
    plan: GramPlan,
    n: int,
    m: int,
    check: bool = False,
) -> dict[str, dict[str, Term]]:
    """Per covered layer, its terms (local parameter name -> term) over all examples, built chunk by chunk.

    Layers called more or less than once in a forward lose their parameters to the fallback in ``plan``. With
    ``check``, each term's summed gradient is compared with autograd's and parameters that disagree (used outside
    their module too) go to the fallback as well.
    """
    leaves = {name: p.detach().requires_grad_(True) for name, p in chosen.items()}
    constants = {name: p.detach() for name, p in model.named_parameters() if name not in leaves}
    constants.update({name: b.detach() for name, b in model.named_buffers()})
    calls: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)

    def hook_for(layer_name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            first = args[0] if args else kwargs.get("input")
            if isinstance(first, Tensor) and isinstance(output, Tensor):
                calls[layer_name].append((first.detach(), output))
            else:  # an unusual call: leave this layer to the torch.func engine
                calls[layer_name].extend([(first, output)] * 2)

        return hook

    handles = [layer.module.register_forward_hook(hook_for(name), with_kwargs=True) for name, layer in layers.items()]
    chunks: dict[str, list[dict[str, Term]]] = defaultdict(list)
    try:
        for start in range(0, inputs.shape[0], chunk):
            calls.clear()
            outputs = functional_call(model, (leaves, constants), (inputs[start : start + chunk],))
            loss = loss_fn(outputs, targets[start : start + chunk]).sum()
            active = [name for name in layers if len(calls[name]) == 1 and calls[name][0][1].requires_grad]
            for name in layers:
                if name not in active:
                    for full in layers[name].params.values():
                        plan.fallback.setdefault(full, f"module called {len(calls[name])} times in one forward")
            wanted = [leaves[full] for name in active for full in layers[name].params.values()] if check else []
            grads = torch.autograd.grad(loss, [calls[name][0][1] for name in active] + wanted, allow_unused=True)
            for name, grad in zip(active, grads[: len(active)], strict=True):
                activations, output = calls[name][0]
                backprops = torch.zeros_like(output) if grad is None else grad.detach()
                chunks[name].append(layer_terms(layers[name], activations, backprops, n, m))
            calls.clear()  # frees this chunk's graph before the next forward
            if check:
                _check_sums(layers, active, chunks, grads[len(active) :], plan)
            for name in list(layers):
                layer = layers[name]
                layer.params = {local: full for local, full in layer.params.items() if full not in plan.fallback}
                if not layer.params:
                    del layers[name]
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: {local: type(parts[0][local]).concat([part[local] for part in parts]) for local in layers[name].params}
        for name, parts in chunks.items()
        if name in layers
    }


def _check_sums(
    layers: dict[str, _Layer],
    active: list[str],
    chunks: dict[str, list[dict[str, Term]]],
    param_grads: tuple[Tensor | None, ...],
    plan: GramPlan,
) -> None:
    """Move to the fallback every parameter whose summed factored gradient differs from autograd's."""
    grads = iter(param_grads)
    for name in active:
        terms = chunks[name][-1]
        for local, full in layers[name].params.items():
            true = next(grads)
            estimate = terms[local].summed()
            true = torch.zeros_like(estimate) if true is None else true.detach().flatten()
            tolerance = (1e-4 if true.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9) * (
                float(true.norm()) + float(estimate.norm()) + 1e-30
            )
            if true.shape != estimate.shape or float((true - estimate).norm()) > tolerance:
                plan.fallback[full] = "also used outside its module (summed gradient check)"


def layer_terms(layer: _Layer, activations: Tensor, backprops: Tensor, n: int, m: int) -> dict[str, Term]:
    rule = rule_for(layer.module)
    assert rule is not None
    return rule.fn(layer.module, activations, backprops, set(layer.params), n, m)


def factored_grams(
    model: nn.Module,
    loss_fn: LossFn,
    chosen: dict[str, Tensor],
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
    every process), instead of capturing the columns again; ``inputs2`` then serves the check and the torch.func part.
    """
    plan = GramPlan()
    layers = _candidate_layers(model, chosen, plan)
    chunk = chunk_size or DEFAULT_FACTORED_CHUNK
    n = inputs.shape[0]
    m = n if inputs2 is None else inputs2.shape[0]
    if gather_columns is not None:
        n = m  # every process must pick the same form for a layer, so decide on the whole matrix's size
    # The summed-gradient check is structural: a few examples tell whether a parameter is used outside its module.
    # It runs on the first examples of the columns, which are the same on every process when they are gathered.
    check_x, check_y = (inputs, targets) if gather_columns is None else (inputs2, targets2)
    few = slice(0, CHECK_EXAMPLES)
    _capture(model, loss_fn, chosen, layers, check_x[few], check_y[few], chunk, plan, n, m, check=True)
    rows = _capture(model, loss_fn, chosen, layers, inputs, targets, chunk, plan, n, m)
    if gather_columns is not None:
        cols = {name: {local: gather_columns(term) for local, term in terms.items()} for name, terms in rows.items()}
    elif inputs2 is None:
        cols = rows
    else:
        cols = _capture(model, loss_fn, chosen, layers, inputs2, targets2, chunk, plan, n, m)
    grams: dict[str, Tensor] = {}
    total_steps = len(rows) + (1 if plan.fallback else 0)
    for step, (name, row_terms) in enumerate(rows.items(), start=1):
        layer = layers[name]
        col_terms = cols[name]
        gram = None
        for local, term in row_terms.items():
            plan.forms[layer.params[local]] = term.form
            block = term.gram(col_terms[local])
            gram = block if gram is None else gram.add_(block)
        grams[name] = gram.to(dtype)
        if progress is not None:
            progress(step, total_steps)
    if plan.fallback:
        rest = {name: chosen[name] for name in chosen if name in plan.fallback}
        fallback = torchfunc_gram(
            model,
            loss_fn,
            rest,
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
            progress(total_steps, total_steps)
    log.debug("%s", plan)
    return grams, plan
