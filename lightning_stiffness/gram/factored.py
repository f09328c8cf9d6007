"""The factored Gram engine: one batched forward and backward, every parameter use recorded, Gram matrices summed.

:mod:`.capture` records each call of an operation with a rule (:mod:`.ops`: ``F.linear``, the products,
convolutions, ``F.embedding``, the norms, a parameter added, multiplied, expanded or tiled; any other operation by its
own vector-Jacobian product) where a parameter, or a tensor computed from parameters alone, meets the examples,
whichever module makes it, and each call of a module with a user rule (:mod:`.rules`), with the gradient of the summed
loss with respect to its output. A derived operand's per-example gradients are carried back to its parameters through
its own small graph. Examples
are independent in eval mode, so the slice of that gradient along the examples' dimension is each example's own.
Each use becomes factors; a parameter's uses join into one term per chunk (:mod:`.assemble`), and the terms' Gram
matrices sum to the parameter's.

Exactness does not rest on the rules' assumptions. On a few check examples (:mod:`.check`) each use's examples'
dimension is found by its size (a batch of 3 examples, or 2 or 4 where 3 is ambiguous: a sequence of 3 steps), and
every parameter's per-example gradients from its term are compared with one autograd call per example. The same
dimensions are used for the probe's chunks, whose uses must come in the same order with the right sizes. A
parameter goes to an exact fallback (torch.func, or the loop where torch.func cannot run the model), with the reason
in the plan, when:

- no recorded call uses it (a recurrent kernel, a custom ``autograd.Function``), or a call's settings are not
  covered (``max_norm`` embeddings), or the output of its call is modified in place;
- no dimension of a call's output holds the examples (nor one flattened with other positions, tried in both orders),
  or the calls differ between the check and the probe;
- its per-example gradients on the check examples differ from autograd's (used somewhere no rule sees as well).
"""

import itertools
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stiffness.gram.assemble import term_of
from lightning_stiffness.gram.blocks import Progress, blocked_gram
from lightning_stiffness.gram.capture import Derived, Recording, Use, record_uses
from lightning_stiffness.gram.check import CHECK_EXAMPLES, ReferenceGradients, fallback_engine
from lightning_stiffness.gram.inputs import Inputs, take
from lightning_stiffness.gram.objective import Objective
from lightning_stiffness.gram.ops import (
    OPERATION_VJP,
    Rows,
    batched_vjp,
    fold_items,
    rows_per_example,
    transposed_factors,
)
from lightning_stiffness.gram.options import GramOptions
from lightning_stiffness.gram.rules import GramRule, rule_for
from lightning_stiffness.gram.terms import ChunkFiller, SlicedTerm, Term, cross_gram

log = logging.getLogger(__name__)

#: Most examples per batched forward/backward when ``chunk_size`` is not given.
DEFAULT_FACTORED_CHUNK = 512
#: Bytes the recorded inputs and outputs of one chunk may take when ``chunk_size`` is not given (the autograd graph
#: of the chunk's forward is a few times as much).
CAPTURE_BYTES = 128 * 1024**2


@dataclass
class GramPlan:
    """How each differentiated parameter's share of the Gram matrix is computed.

    Attributes:
        forms: parameter name -> the factored form its rule used (``outer``, ``flat``, ``ghost``, ``materialised``,
            ``materialised-blocked``), ``unused`` where the loss does not reach it (zero per-example gradients, found
            by autograd), or the exact engine that computed it instead (``torch.func``, ``loop``).
        fallback: parameter name -> why no factored rule computed it.
        calls: factored parameter name -> the operations its per-example gradients come from: ``F.linear``,
            ``torch.addmm``; ``Tensor.__add__ through a tensor computed from it`` where the parameter meets the
            examples through a tensor computed from it and no example (a position embedding looked up with [1, T]
            ids, a bias table indexed by a buffer), its gradients chained back from there; ``torch.cdist (its own
            vjp)`` where no rule has a factored form and that operation's vector-Jacobian product alone gives them.
    """

    forms: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    calls: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = []
        for name, form in self.forms.items():
            if name in self.fallback:
                lines.append(f"  {name}: {form} ({self.fallback[name]})")
            else:
                calls = self.calls.get(name)
                lines.append(f"  {name}: {form}" + (f" via {', '.join(calls)}" if calls else ""))
        return "gram plan:\n" + "\n".join(lines)


def owner(param_name: str) -> str:
    """The per-layer key of a parameter: its module's qualified name, or the name itself for a root parameter."""
    module, _, _ = param_name.rpartition(".")
    return module or param_name


ModuleRules = dict[str, tuple[nn.Module, GramRule, dict[str, str]]]


def _module_rules(model: nn.Module, chosen: dict[str, Tensor]) -> ModuleRules:
    """Modules with a user rule (:mod:`.rules`) and the chosen parameters of their own it covers (not shared)."""
    names_of: dict[int, int] = defaultdict(int)
    for _, p in model.named_parameters(remove_duplicate=False):
        names_of[id(p)] += 1
    found: ModuleRules = {}
    for module_name, module in model.named_modules():
        rule = rule_for(module)
        if rule is None:
            continue
        prefix = f"{module_name}." if module_name else ""
        covered = {
            local: prefix + local
            for local, p in module.named_parameters(recurse=False)
            if prefix + local in chosen and local in rule.params and names_of[id(p)] == 1
        }
        if covered:
            found[module_name] = (module, rule, covered)
    return found


@dataclass(frozen=True)
class Where:
    """Where a call's examples are: along ``dim``, or inside it, flattened with other positions.

    ``split`` is None (the dimension holds the examples), ``"outer"`` ([N * T]: example-major) or ``"inner"``
    ([T * N]: the examples vary fastest, as in the output projection of ``nn.MultiheadAttention``).
    """

    dim: int
    split: str | None = None


@dataclass
class _Layout:
    """What the check established for the recorded uses, in call order: who they are and where their examples are."""

    signatures: list[tuple]
    wheres: list[Where | None]
    bytes_per_example: int = 0


def _candidates(use: Use, count: int) -> list[Where]:
    """The places a call's ``count`` examples could be, from its shapes alone."""
    if isinstance(use.rule, GramRule):
        return [Where(0)]
    roles = use.roles
    found = [Where(dim) for dim in use.rule.example_dims(use.bound, use.output, count, roles)]
    flattened = use.rule.flattened(use.bound, use.output, roles)
    if flattened is not None:
        name, dims = flattened
        shape = use.bound[name].shape
        for dim in dims:
            if shape[dim] > count and shape[dim] % count == 0:
                found += [Where(dim, "outer"), Where(dim, "inner")]
    return found


def _use_factors(use: Use, where: Where, count: int, n: int, m: int) -> dict[str, Any]:
    """The use's factors (or a module rule's terms) by role, its examples (at ``where``) along dim 0."""
    bound = {key: _widened(value) for key, value in use.bound.items()}
    output, backprop, dim = _widened(use.output), _widened(use.backprop), where.dim
    if isinstance(use.rule, GramRule):
        if use.module is None:
            raise ValueError("a module rule's call was recorded without its module")
        return use.rule.fn(use.module, bound["input"], backprop, set(use.params), n, m)
    if where.split is not None and use.rule.items is not None:  # each item computed alone: its factors, summed
        items = use.rule.factors(bound, output, backprop, 0, use.roles)
        return {role: fold_items(factors, count, where.split) for role, factors in items.items()}
    if where.split is not None:
        flattened = use.rule.flattened(use.bound, use.output, use.roles)
        if flattened is None:
            raise ValueError(f"{use.op} does not flatten its examples with other positions")
        name = flattened[0]
        size = bound[name].shape[dim]
        if size % count:
            raise ValueError(f"a dimension of {size} cannot hold {count} examples")
        sizes = (count, size // count) if where.split == "outer" else (size // count, count)
        bound = {**bound, name: bound[name].unflatten(dim, sizes)}
        output, backprop = output.unflatten(dim, sizes), backprop.unflatten(dim, sizes)
        dim = dim if where.split == "outer" else dim + 1
    return use.rule.factors(bound, output, backprop, dim, use.roles)


def _use_parts(use: Use, where: Where, count: int, recording: Recording, n: int, m: int) -> list[tuple[str, Any, Any]]:
    """(parameter name, slice of its rows, factors) of every parameter the call's gradient reaches: its parameter
    operands', and, through each derived operand's graph, the parameters it is computed from."""
    factors = _use_factors(use, where, count, n, m)
    parts = [(at.name, at.rows, _of_parameter(use, role, factors.get(role))) for role, at in use.params.items()]
    for role, derived in use.derived.items():
        if factors.get(role) is not None:
            parts += _through_derived(recording, derived, rows_per_example(factors[role]), count)
    return [part for part in parts if part[2] is not None]


def _through_derived(recording: Recording, derived: Derived, rows: Tensor, count: int) -> list[tuple[str, None, Rows]]:
    """The per-example gradients of a derived operand's parameters, from its own ``rows`` [count, numel]: one
    batched backward of the operand's graph (the chain rule, example by example)."""
    operand = recording.derived[derived.key]
    names = [name for name in recording.order if name in derived.sources]
    grads = batched_vjp(
        operand,
        [recording.leaves[name] for name in names],
        lambda start, stop: rows[start:stop].reshape(stop - start, *operand.shape),
        count,
    )
    return [
        (name, None, Rows(grad.reshape(count, -1))) for name, grad in zip(names, grads, strict=True) if grad is not None
    ]


def _of_parameter(use: Use, role: str, factors: Any) -> Any:
    """A role's factors as the parameter's (transposed back where the call took ``W.T``)."""
    if factors is not None and use.params[role].transposed:
        return transposed_factors(factors, use.bound[role].shape)
    return factors


def _widened(value: Any) -> Any:
    """Half-precision tensors in float32: factors are multiplied and summed into the Gram matrix, and bfloat16's
    8 bits of mantissa cannot tell the sign of a dot product near zero."""
    if isinstance(value, Tensor) and value.is_floating_point() and value.element_size() < 4:
        return value.float()
    return value


def _num_examples(factors: Any) -> int:
    for name in ("rows", "backprops", "ids"):
        value = getattr(factors, name, None)
        if isinstance(value, Tensor):
            return value.shape[0]
    return factors.num_examples


def _terms(
    recording: Recording, wheres: list[Where | None], count: int, wanted: set[str], plan: GramPlan, n: int, m: int
) -> dict[str, Any]:
    """One term per parameter in ``wanted`` over this chunk's ``count`` examples; failures go to the fallback."""
    for name, why in recording.unsupported.items():
        plan.fallback.setdefault(name, why)
    slices: dict[str, dict[tuple[int, int] | None, list]] = defaultdict(lambda: defaultdict(list))
    for use, where in zip(recording.uses, wheres, strict=True):
        names = use.names
        if where is None or use.backprop is None or not names & wanted - set(plan.fallback):
            continue
        try:
            parts = _use_parts(use, where, count, recording, n, m)
        except Exception as error:  # a rule meeting a layout it does not handle: the fallback is exact
            for name in names:
                plan.fallback.setdefault(name, f"its rule raised {type(error).__name__}: {error}")
            continue
        for name, rows, part in parts:
            call = use.op + (" (its own vjp)" if use.rule is OPERATION_VJP else "")
            if name not in {at.name for at in use.params.values()}:
                call += " through a tensor computed from it"
            if call not in plan.calls.setdefault(name, []):
                plan.calls[name].append(call)
            if _num_examples(part) != count:
                plan.fallback.setdefault(name, f"a call gives {count} examples another number of rows")
            else:
                slices[name][rows].append(part)
    # In the model's order (never a set's): under DDP every process gathers the terms in this order. A parameter the
    # loss does not reach has no term: its per-example gradients are zero.
    ordered = [name for name in recording.order if name in wanted and name not in recording.unreached]
    terms = {name: _param_term(name, slices.get(name), recording.shapes[name], plan, n, m) for name in ordered}
    return {name: term for name, term in terms.items() if term is not None}


def _param_term(name: str, parts: dict | None, shape: torch.Size, plan: GramPlan, n: int, m: int) -> Term | None:
    """The term of a parameter of ``shape`` from its uses' factors by slice of dim 0; None (and the reason in
    ``plan``) when there is none."""
    if name in plan.fallback:
        return None
    if not parts:
        plan.fallback[name] = "no factored rule covers its uses"
        return None
    terms = {rows: term_of(uses, n, m) for rows, uses in parts.items()}
    if any(term is None for term in terms.values()):
        plan.fallback[name] = "uses of different kinds too large to join (per-example gradients over budget)"
        return None
    if list(terms) == [None]:
        return terms[None]
    spans = sorted(rows for rows in terms if rows is not None)
    overlapping = None in terms or any(a[1] > b[0] for a, b in itertools.pairwise(spans))
    if overlapping:
        plan.fallback[name] = "used through overlapping slices"
        return None
    row = math.prod(shape[1:])
    return SlicedTerm([(rows, terms[rows]) for rows in spans], row, math.prod(shape))


def _check(
    objective: Objective, modules: ModuleRules, x: Inputs, y: Tensor, plan: GramPlan, n: int, m: int
) -> tuple[_Layout, ReferenceGradients]:
    """Find where each call's examples are and check every parameter's term per example (see :mod:`.check`).

    Three examples first; where a call of a shared or sliced parameter has several dimensions of that size (a
    sequence of 3 steps), again with 2, 4 or 5. Then the same examples in reverse order must give the same
    per-example gradients, reversed: a forward that reorders the batch by its data (sorting by length) is caught.
    """
    for count in _check_sizes(y.shape[0]):
        cx, cy = take(x, slice(0, count)), y[:count]
        recording = record_uses(objective, modules, cx, cy)
        reference = ReferenceGradients(objective, cx, cy)
        trial = GramPlan()
        wheres = _locate(recording, count, reference, trial, n, m)
        if not any(why.startswith("more than one") for why in trial.fallback.values()):
            break
    plan.fallback.update(trial.fallback)
    _compare(_terms(recording, wheres, count, set(objective.params), plan, n, m), reference, plan, "")
    for name in recording.unreached:
        if bool(reference.rows[name].any()):  # autograd's loop disagrees with the batched backward: trust neither
            plan.fallback.setdefault(name, "per-example check: the batched loss does not reach it, autograd's does")
    if count > 1:
        order = torch.arange(count - 1, -1, -1, device=cy.device)
        reversed_run = record_uses(objective, modules, take(cx, order), cy[order])
        layout = _Layout([use.signature for use in recording.uses], wheres)
        matched = _matched_wheres(reversed_run, layout, set(objective.params), plan)
        wanted = {name for name in objective.params if name not in plan.fallback}
        if wanted:
            terms = _terms(reversed_run, matched, count, wanted, plan, n, m)
            _compare(terms, reference.reordered(order), plan, " (the examples in reverse order)")
    recorded = sum(use.output.numel() * use.output.element_size() * 2 for use in recording.uses)  # outputs, inputs
    return _Layout([use.signature for use in recording.uses], wheres, recorded // count), reference


def _check_sizes(available: int) -> list[int]:
    """The numbers of check examples to try, in order: 3 (or all when fewer), then 2, 4, 5 where available."""
    sizes = [min(CHECK_EXAMPLES, available)] + [size for size in (2, 4, 5) if size <= available]
    return list(dict.fromkeys(sizes))


def _locate(
    recording: Recording, count: int, reference: ReferenceGradients, plan: GramPlan, n: int, m: int
) -> list[Where | None]:
    """Where each call's examples are; None (its parameters to the fallback in ``plan``) where that is not proven."""
    calls = Counter(name for use in recording.uses for name in use.names)
    wheres: list[Where | None] = []
    for use in recording.uses:
        found = _candidates(use, count)
        alone = all(calls[name] == 1 for name in use.names) and all(at.rows is None for at in use.params.values())
        if len(found) > 1 and alone:
            found = [where for where in found if _passes(use, where, count, recording, reference, n, m)][:1]
        elif len(found) > 1 and sum(where.split is None for where in found) == 1:
            # A shared or sliced parameter: its calls cannot be tried one by one. The one dimension of the right
            # size is taken, and the check of the parameter's joined term below proves it or sends it to the fallback.
            found = [where for where in found if where.split is None]
        wheres.append(found[0] if len(found) == 1 else None)
        if len(found) != 1:
            shape = tuple(use.output.shape)
            why = "no" if not found else "more than one"
            for name in use.names:
                plan.fallback.setdefault(name, f"{why} dimension of a call's output {shape} holds the examples")
    return wheres


def _compare(terms: dict[str, Term], reference: ReferenceGradients, plan: GramPlan, how: str) -> None:
    """Send every parameter whose term disagrees with the reference per example to the fallback."""
    for name, term in terms.items():
        why = reference.disagreement(name, term.per_example())
        if why is not None:
            plan.fallback[name] = f"per-example check{how}: {why}"


def _passes(use: Use, where: Where, count: int, recording: Recording, reference: ReferenceGradients, n, m) -> bool:
    """Whether the examples at ``where`` give autograd's per-example gradients for every parameter the call reaches
    (its only call): how the order of a flattened layout is proven, not guessed."""
    try:
        parts = _use_parts(use, where, count, recording, n, m)

        def agrees(name: str, part: Any) -> bool:
            term = term_of([part], n, m)
            return term is not None and reference.disagreement(name, term.per_example()) is None

        # Lazily: the first parameter that disagrees rules the candidate out, without forming the others' terms.
        return bool(parts) and all(agrees(name, part) for name, _, part in parts)
    except Exception:  # this candidate does not fit the call's shapes
        return False


def _capture(
    objective: Objective,
    modules: ModuleRules,
    layout: _Layout,
    wanted: set[str],
    inputs: Inputs,
    targets: Tensor,
    chunk: int,
    plan: GramPlan,
    n: int,
    m: int,
) -> dict[str, Term]:
    """The terms of the parameters in ``wanted`` over all ``inputs``, built chunk by chunk with the check's layout."""
    total = targets.shape[0]
    chunks: dict[str, ChunkFiller] = {}
    unreached: set[str] = set()
    for span in _even_spans(total, chunk):
        x, y = take(inputs, span), targets[span]
        recording = record_uses(objective, modules, x, y)
        if [use.signature for use in recording.uses] != layout.signatures:
            wheres = _matched_wheres(recording, layout, wanted, plan)
        else:
            wheres = layout.wheres
        for name, term in _terms(recording, wheres, y.shape[0], wanted, plan, n, m).items():
            chunks.setdefault(name, ChunkFiller(total)).add(term)
        unreached |= recording.unreached & wanted
        del recording  # frees this chunk's activations before the next forward
    for name in unreached & set(chunks):  # zero for some chunks' examples only (a branch that depends on the data)
        plan.fallback.setdefault(name, "the loss reaches it for some examples only")
    return {name: filler.result() for name, filler in chunks.items() if name not in plan.fallback}


def _even_spans(total: int, chunk: int) -> list[slice]:
    """``total`` examples in as few spans of at most ``chunk`` as possible, their sizes differing by at most one, and
    none of a single example unless ``total`` is one (then spans of 2 or 3 where ``chunk`` is 1 or 2).

    A span of one example makes some models call differently (ViT's ``cls_token.expand(1, -1, -1)`` broadcasts over
    nothing, a squeeze drops the batch dimension), and its parameters would leave the factored engine for its sake.
    """
    count = -(-total // max(1, chunk))
    if count > 1 and total // count < 2:
        count = total // 2
    bounds = [total * k // count for k in range(count + 1)] if total else [0]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _matched_wheres(recording: Recording, layout: _Layout, wanted: set[str], plan: GramPlan) -> list[Where | None]:
    """Where each call's examples are, from the check's layout, call by call of each parameter in ``wanted``; a
    parameter whose calls in this run are not those of the check goes to the fallback (the others stay factored:
    a parameter used by some batches only does not change the calls of the rest)."""
    seen = [use.signature for use in recording.uses]

    def calls_of(name: str, signatures: list[tuple]) -> list[int]:
        return [
            i
            for i, s in enumerate(signatures)
            if any(at.name == name for _, at in s[2]) or any(name in d for _, d in s[3])
        ]

    wheres: list[Where | None] = [None] * len(seen)
    for name in wanted:
        mine, theirs = calls_of(name, seen), calls_of(name, layout.signatures)
        if [seen[i] for i in mine] != [layout.signatures[j] for j in theirs]:
            plan.fallback.setdefault(name, "its calls differ between the check examples and the probe's")
            continue
        for i, j in zip(mine, theirs, strict=True):
            wheres[i] = layout.wheres[j]
    return wheres


def factored_grams(
    objective: Objective,
    inputs: Inputs,
    targets: Tensor,
    inputs2: Inputs | None = None,
    targets2: Tensor | None = None,
    options: GramOptions | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Tensor], GramPlan]:
    """Per-layer Gram matrices (key: :func:`owner` of the parameters) and the plan that produced them, with
    ``options``' ``chunk_size``, ``progress`` and ``gather_columns`` (its other fields are the objective's).

    With ``gather_columns`` (distributed use), ``inputs`` are this process's rows and ``inputs2`` all examples: each
    term of the rows is passed to ``gather_columns``, which returns the same term over all examples (gathered from
    every process), instead of capturing the columns again; ``inputs2`` then serves the check and the fallback.
    """
    options = options or GramOptions()
    chunk_size, progress, gather_columns = options.chunk_size, options.progress, options.gather_columns
    plan = GramPlan()
    modules = _module_rules(objective.model, objective.params)
    n = targets.shape[0]
    m = n if targets2 is None else targets2.shape[0]
    if gather_columns is not None:
        n = m  # every process must pick the same form for a layer, so decide on the whole matrix's size
    # The check runs on the first examples of the columns when they are gathered: the same on every process, so
    # every process makes the same decisions.
    # The check takes the larger side of a cross Gram matrix: one example cannot tell the orders of a flattened layout.
    columns_larger = targets2 is not None and targets2.shape[0] > targets.shape[0]
    check_x, check_y = inputs, targets
    if inputs2 is not None and targets2 is not None and (gather_columns is not None or columns_larger):
        check_x, check_y = inputs2, targets2
    layout, reference = _check(objective, modules, check_x, check_y, plan, n, m)
    chunk = chunk_size or max(1, min(DEFAULT_FACTORED_CHUNK, CAPTURE_BYTES // max(1, layout.bytes_per_example)))
    covered = {name for name in objective.params if name not in plan.fallback}
    rows = _capture(objective, modules, layout, covered, inputs, targets, chunk, plan, n, m) if covered else {}
    if gather_columns is not None:
        cols = {name: gather_columns(rows[name]) for name in objective.params if name in rows}
    elif inputs2 is None or targets2 is None:
        cols = rows
    else:
        cols = _capture(objective, modules, layout, set(rows), inputs2, targets2, chunk, plan, n, m)
    grams = _factored_part(rows, cols, plan, dtype, progress)
    for name in covered - set(rows) - set(plan.fallback):  # the loss reaches none of its per-example gradients
        plan.forms[name] = "unused"
        grams.setdefault(owner(name), torch.zeros(targets.shape[0], m, dtype=dtype, device=targets.device))
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
    plan.calls = {name: plan.calls[name] for name in plan.forms if name in plan.calls and name not in plan.fallback}
    log.debug("%s", plan)
    return grams, plan


def _factored_part(rows, cols, plan: GramPlan, dtype: torch.dtype, progress: Progress) -> dict[str, Tensor]:
    """Each layer's Gram matrix from its factored parameters (those still covered in ``plan``), by :func:`owner`."""
    grams: dict[str, Tensor] = {}
    names = [name for name in rows if name not in plan.fallback and name in cols]
    steps = len(names) + (1 if plan.fallback else 0)
    for step, name in enumerate(names, start=1):
        plan.forms[name] = rows[name].form
        block = cross_gram(rows[name], cols[name]).to(dtype)
        key = owner(name)
        grams[key] = grams[key].add_(block) if key in grams else block
        if progress is not None:
            progress(step, steps)
    return grams
