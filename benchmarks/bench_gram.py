"""Time and peak memory of the Gram engines, side by side, with ratios against the factored engine.

Each measurement runs in a fresh subprocess so that its peak resident memory (VmHWM, above the process's baseline
after the model and data are built) is its own. Engines: the loop engine (one autograd.grad per example), the
torch.func engine, the factored engine, BackPACK's BatchGrad + matmul when BackPACK is installed, a hand-written
``vmap(grad(...))`` + matmul (``vmap``), and one dense [N, P] @ [P, N] product of the model's size (``gemm``, the bound
the factored engine is held to on convolutions; its time is the product's alone). For the factored
engine the column "check" gives the time of its per-example check alone (measured again after the run), as a share
of the engine's whole time.

    python benchmarks/bench_gram.py                 # the default table (several minutes on 2 cores)
    python benchmarks/bench_gram.py --quick         # small sizes, a smoke run
    python benchmarks/bench_gram.py --bound --repeats 3   # the paper CNN against one dense [N, P] @ [P, N] product
    python benchmarks/bench_gram.py --case mlp512 4096 torch.func
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def relu_mlp(*widths: int) -> nn.Sequential:
    """Flatten, then Linear layers of these widths with ReLU between them."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(width_in, width_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def paper_fc() -> nn.Module:
    return relu_mlp(784, 500, 300, 100, 10)


def paper_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def mlp512() -> nn.Module:
    return relu_mlp(784, 512, 512, 512, 10)


class GRUClassifier(nn.Module):
    """Each image read as a sequence of 28 rows by a GRU (hidden 128), then a Linear head on the last state."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(28, 128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x.flatten(1, 2))[0][:, -1])


class EncoderClassifier(nn.Module):
    """Token ids [N, 64] -> embedding (vocab 8000, d 256) + learned positions -> 4 batch-first encoder layers
    (4 heads, FFN 1024) -> mean over positions -> Linear: 5.2 M parameters."""

    def __init__(self, vocab: int = 8000, d: int = 256, length: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.randn(1, length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 1024, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.position).mean(dim=1))


MODELS = {
    "paper_fc": paper_fc,
    "paper_cnn": paper_cnn,
    "mlp512": mlp512,
    "gru": GRUClassifier,
    "encoder": EncoderClassifier,
}
ENGINES = ["loop", "torch.func", "factored", "backpack"]


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # "5" resets the peak resident set size (Linux)
        handle.write("5")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def check_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 5) -> float:
    """The factored engine's per-example check alone (reference gradients, recorded uses, checked terms), best of
    ``repeats``."""
    from lightning_stiffness.gram.buffers import BufferGuard
    from lightning_stiffness.gram.factored import GramPlan, _check, _module_rules
    from lightning_stiffness.gram.objective import Objective
    from lightning_stiffness.gram.validation import default_loss_fn

    params = dict(model.named_parameters())
    objective = Objective(model, default_loss_fn, params, BufferGuard(model))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.enable_grad():
            _check(objective, _module_rules(model, params), x, y, GramPlan(), x.shape[0], x.shape[0])
        best = min(best, time.perf_counter() - start)
    return best


def backpack_gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    model.zero_grad()
    with backpack(BatchGrad()):
        loss_fn(model(x), y).backward()
    jac = torch.cat([p.grad_batch.flatten(1) for p in model.parameters()], dim=1)
    return jac @ jac.T


def vmap_gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What a user writes by hand (PyTorch's per-sample-gradients tutorial): ``vmap(grad(...))`` over
    ``functional_call``, all per-example gradients at once, then one product."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    jac = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
    return jac @ jac.T


def gemm_gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The bound: one dense product [N, P] @ [P, N] of random per-example gradients of the model's size P (the
    gradients themselves not computed)."""
    params = sum(p.numel() for p in model.parameters())
    jac = torch.randn(x.shape[0], params, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    gram = jac @ jac.T
    gemm_gram.seconds = time.perf_counter() - start  # the product alone, not drawing the random numbers
    return gram


HAND_WRITTEN = {"backpack": backpack_gram, "vmap": vmap_gram, "gemm": gemm_gram}


def run_case(model_name: str, n: int, engine: str) -> dict:
    """One measurement in this process."""
    from lightning_stiffness.gram import gradient_gram

    torch.manual_seed(0)
    model = MODELS[model_name]().eval()
    x = torch.randint(0, 8000, (n, 64)) if model_name == "encoder" else torch.randn(n, 1, 28, 28)
    y = torch.randint(0, 10, (n,))
    params = sum(p.numel() for p in model.parameters())
    if engine == "backpack":
        try:
            import backpack  # noqa: F401
        except ImportError:
            return {"skipped": "BackPACK is not installed (pip install --no-deps backpack-for-pytorch einops unfoldNd)"}
    # Warm up on a few examples (lazy initialisation, kernels), then measure from a fresh peak.
    if engine in HAND_WRITTEN:
        HAND_WRITTEN[engine](model, x[:4], y[:4])
    else:
        gradient_gram(model, x[:4], y[:4], method=engine)
    _peak_rss_reset()
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    if engine in HAND_WRITTEN:
        gram = HAND_WRITTEN[engine](model, x, y)
    else:
        gram = gradient_gram(model, x, y, method=engine)
    seconds = getattr(gemm_gram, "seconds", None) if engine == "gemm" else time.perf_counter() - start
    peak_mib = (_rss_kib("VmHWM") - baseline) / 1024
    checksum = float(gram.double().diagonal().sum())
    result = {"seconds": seconds, "peak_mib": peak_mib, "params": params, "trace": checksum}
    if engine == "factored":
        result["check"] = check_seconds(model, x, y)
    return result


DEFAULT_TABLE = [
    ("paper_fc", 256, ["loop", "torch.func", "factored", "backpack"]),
    ("paper_fc", 1024, ["loop", "torch.func", "factored", "backpack"]),
    ("paper_cnn", 256, ["loop", "torch.func", "factored", "backpack"]),
    ("paper_cnn", 1024, ["loop", "torch.func", "factored", "backpack"]),
    ("paper_cnn", 2048, ["torch.func", "factored"]),
    ("mlp512", 1024, ["torch.func", "factored", "backpack"]),
    ("mlp512", 4096, ["torch.func", "factored"]),
    ("gru", 256, ["loop", "torch.func", "factored"]),
    ("encoder", 256, ["torch.func", "factored"]),
]
#: The convolution bound: the paper's CNN at N = 1024 against one dense product of its size and a hand-written vmap.
BOUND_TABLE = [("paper_cnn", 1024, ["factored", "gemm", "vmap", "torch.func"])]
QUICK_TABLE = [
    ("paper_fc", 64, ["loop", "torch.func", "factored", "backpack"]),
    ("paper_cnn", 64, ["loop", "torch.func", "factored"]),
    ("gru", 32, ["loop", "torch.func", "factored"]),
]


def _median(runs: list[dict]) -> dict:
    """The run of median time among those that ran (its memory and check with it), or the first skip."""
    ran = sorted((r for r in runs if "seconds" in r), key=lambda r: r["seconds"])
    return ran[len(ran) // 2] if ran else runs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--bound", action="store_true", help="the paper CNN against one dense product (N = 1024)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of alternating engines; medians (default 1)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="only these models of the table")
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "N", "ENGINE"), help="run one measurement, print JSON")
    args = parser.parse_args()
    if args.case:
        model_name, n, engine = args.case
        print(json.dumps(run_case(model_name, int(n), engine)))
        return
    table = BOUND_TABLE if args.bound else QUICK_TABLE if args.quick else DEFAULT_TABLE
    if args.models:
        table = [row for row in table if row[0] in args.models]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    header = (
        f"{'model':<10} {'N':>5} {'P':>9} {'engine':<11} {'seconds':>9} {'peak MiB':>9} {'x factored time':>16} "
        f"{'check':>6}"
    )
    print(header)
    print("-" * len(header))
    for model_name, n, engines in table:
        rounds: dict[str, list[dict]] = {engine: [] for engine in engines}
        for _ in range(args.repeats):  # engines alternate, round after round, so that a busy spell hits them all
            for engine in engines:
                out = subprocess.run(
                    [sys.executable, __file__, "--case", model_name, str(n), engine], capture_output=True, text=True
                )
                if out.returncode != 0:
                    rounds[engine].append({"skipped": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"})
                else:
                    rounds[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
        results = {engine: _median(runs) for engine, runs in rounds.items()}
        base = results.get("factored", {}).get("seconds")
        traces = [r["trace"] for engine, r in results.items() if "trace" in r and engine != "gemm"]
        for engine, r in results.items():
            if "skipped" in r:
                print(f"{model_name:<10} {n:>5} {'':>9} {engine:<11} skipped: {r['skipped']}")
                continue
            ratio = f"{r['seconds'] / base:.1f}x" if base else "-"
            check = f"{100 * r['check'] / r['seconds']:.1f}%" if "check" in r else ""
            print(
                f"{model_name:<10} {n:>5} {r['params']:>9} {engine:<11} {r['seconds']:>9.3f} {r['peak_mib']:>9.0f} "
                f"{ratio:>16} {check:>6}"
            )
        if traces:
            spread = (max(traces) - min(traces)) / max(abs(max(traces)), 1e-30)
            print(f"{'':<10} {'':>5} {'':>9} (engines agree on trace(G) to {spread:.1e} relative)")


if __name__ == "__main__":
    main()
