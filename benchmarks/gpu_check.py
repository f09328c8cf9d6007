"""Check the Gram engines on CUDA against a float64 CPU reference, and time N = 4096 on the benchmark MLP.

Run where a GPU is available (CI has none):

    python benchmarks/gpu_check.py                    # CUDA: accuracy table, then timings at N = 4096
    python benchmarks/gpu_check.py --device cpu --quick   # a smoke run of the script itself, on the CPU

Accuracy: each engine in float32 on the device, against the torch.func engine in float64 on the CPU, on the paper's
FC net, the paper's CNN and the 784-512-512-512-10 MLP; the relative error of the Gram matrix and the share of pairs
whose sign stiffness agrees. TF32 is disabled inside ``gradient_gram`` (and restored after), so the float32 numbers
are true float32.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gram import MODELS

from lightning_stiffness.functional import gradient_gram


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accuracy(device: torch.device, n: int) -> None:
    print(f"{'model':<10} {'engine':<11} {'rel. error':>11} {'sign agree':>11}")
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make().eval()
        x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
        reference = gradient_gram(model.double(), x.double(), y, method="torch.func")
        model = model.float().to(device)
        for engine in ("factored", "torch.func"):
            got = gradient_gram(model, x.to(device), y.to(device), method=engine).double().cpu()
            error = float((got - reference).norm() / reference.norm())
            agree = float((torch.sign(got) == torch.sign(reference)).double().mean())
            print(f"{name:<10} {engine:<11} {error:>11.2e} {agree:>11.4%}")


def timing(device: torch.device, n: int, engines: list[str]) -> None:
    torch.manual_seed(0)
    model = MODELS["mlp512"]().eval().to(device)
    x, y = torch.randn(n, 1, 28, 28, device=device), torch.randint(0, 10, (n,), device=device)
    print(f"\nmlp512 (P = {sum(p.numel() for p in model.parameters())}), N = {n}, on {device}")
    print(f"{'engine':<11} {'seconds':>9} {'peak GiB':>9}")
    for engine in engines:
        gradient_gram(model, x[:8], y[:8], method=engine)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        gradient_gram(model, x, y, method=engine)
        _sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else float("nan")
        print(f"{engine:<11} {seconds:>9.3f} {peak:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("No CUDA device here: run on a GPU machine, or pass --device cpu --quick for a smoke run.")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), f"torch {torch.__version__}")
    accuracy(device, 16 if args.quick else 256)
    timing(device, 64 if args.quick else 4096, ["factored"] if args.quick else ["factored", "torch.func"])


if __name__ == "__main__":
    main()
