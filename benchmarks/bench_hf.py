"""The Gram engines on Hugging Face models, side by side: the default engine against the loop and torch.func.

Models from ``transformers`` configs with random weights (nothing downloaded), float32, eval mode, dropouts 0, eager
attention (torch.func cannot run the default SDPA masks): BERT, GPT-2 and Llama sequence classifiers (4 layers,
hidden 256, 4 heads, FFN 1024, each family's own vocabulary: 30522, 50257,
32000; T = 64 tokens, every other row padded over its last 10), ViT (4 layers,
hidden 256, 32x32 images, patch 4), ConvNeXt (stages 32-64-128-256, one block each, depthwise 7x7) and ResNet (basic
blocks 32-64-128-256, BatchNorm in eval mode), 3 classes, N = 64.

Each measurement runs in its own subprocess (peak resident memory above the process's baseline, after a warm-up on
4 examples). The engines alternate, round after round, and the table gives medians: on a shared 2-core machine
single runs move by up to 2x. ``x loop`` and ``x torch.func`` are how many times faster the default engine is.
``one step s`` is one plain forward and backward of the summed loss over the same N examples (what a training step
costs): every exact engine needs at least that, so ``loop s / one step s`` bounds what ``x loop`` can reach.

    python benchmarks/bench_hf.py                       # every model, 3 rounds
    python benchmarks/bench_hf.py --models bert --repeats 5
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gram import _peak_rss_reset, _rss_kib  # noqa: E402
from tests.models.hugging_face import Wrapper, class_loss  # noqa: E402

T, CLASSES, IMAGE = 64, 3, 32
VOCAB = {"bert": 30522, "gpt2": 50257, "llama": 32000}  # the families' own, as in the issue's table
ENGINES = ("auto", "loop", "torch.func", "step")
TEXT = dict(num_labels=CLASSES, attn_implementation="eager", pad_token_id=0)


def _text_model(name: str) -> nn.Module:
    if name == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB[name], hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **TEXT,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(config)
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB[name], n_embd=256, n_layer=4, n_head=4, n_inner=1024, n_positions=128, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, **TEXT,
        )  # fmt: skip
        return transformers.GPT2ForSequenceClassification(config)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB[name], hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=1024, max_position_embeddings=128, use_cache=False, **TEXT,
    )  # fmt: skip
    return transformers.LlamaForSequenceClassification(config)


def _vision_model(name: str) -> nn.Module:
    if name == "vit":
        config = transformers.ViTConfig(
            image_size=IMAGE, patch_size=4, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=1024, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=CLASSES,
            attn_implementation="eager",
        )  # fmt: skip
        return transformers.ViTForImageClassification(config)
    if name == "convnext":
        config = transformers.ConvNextConfig(
            hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], patch_size=2, drop_path_rate=0.0,
            num_labels=CLASSES,
        )  # fmt: skip
        return transformers.ConvNextForImageClassification(config)
    config = transformers.ResNetConfig(
        embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic",
        num_labels=CLASSES,
    )  # fmt: skip
    return transformers.ResNetForImageClassification(config)


MODELS = ("bert", "gpt2", "llama", "vit", "convnext", "resnet")


def build(name: str, n: int) -> tuple[nn.Module, object, torch.Tensor]:
    """The model (wrapped to return logits), its inputs and targets, from fixed seeds."""
    torch.manual_seed(0)
    if name in ("bert", "gpt2", "llama"):
        model = Wrapper(_text_model(name))
        ids = torch.randint(2, VOCAB[name], (n, T))
        mask = torch.ones(n, T, dtype=torch.long)
        mask[::2, -10:] = 0
        inputs = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    else:
        model = Wrapper(_vision_model(name), key="pixel_values")
        inputs = torch.randn(n, 3, IMAGE, IMAGE)
    return model.eval(), inputs, torch.arange(n) % CLASSES


def _first(inputs, k: int):
    return {key: value[:k] for key, value in inputs.items()} if isinstance(inputs, dict) else inputs[:k]


def run_case(name: str, n: int, engine: str) -> dict:
    """One measurement in this process: seconds, peak MiB above the baseline, the Gram matrix's trace."""
    from lightning_stiffness.gram import gradient_gram, gram_plan

    torch.set_num_threads(2)
    model, inputs, targets = build(name, n)
    if engine == "step":
        return _one_step(model, inputs, targets)
    try:
        gradient_gram(model, _first(inputs, 4), targets[:4], loss_fn=class_loss, method=engine)
    except Exception as error:  # torch.func on a model vmap cannot batch
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    _peak_rss_reset()
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    gram = gradient_gram(model, inputs, targets, loss_fn=class_loss, method=engine)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_mib": (_rss_kib("VmHWM") - baseline) / 1024}
    result["trace"] = float(gram.double().diagonal().sum())
    if engine == "auto":
        plan = gram_plan(model, _first(inputs, 8), targets[:8], loss_fn=class_loss)
        sizes = dict(model.named_parameters())
        total = sum(p.numel() for p in sizes.values())
        result["params"] = total
        result["factored"] = sum(sizes[k].numel() for k in plan.forms if k not in plan.fallback) / total
    return result


def _one_step(model: nn.Module, inputs, targets: torch.Tensor) -> dict:
    """One forward and backward of the summed loss over all examples, after a warm-up on 4."""

    def step(x, y) -> None:
        outputs = model(**x) if isinstance(x, dict) else model(x)
        class_loss(outputs, y).sum().backward()
        model.zero_grad(set_to_none=True)

    step(_first(inputs, 4), targets[:4])
    _peak_rss_reset()
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    step(inputs, targets)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": (_rss_kib("VmHWM") - baseline) / 1024, "trace": float("nan")}


def _measure(name: str, n: int, engine: str) -> dict:
    command = [sys.executable, __file__, "--case", name, str(n), engine]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": out.stderr.strip().splitlines()[-1][:120]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--n", type=int, default=64, help="examples (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of alternating engines (default 3)")
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "N", "ENGINE"), help="one measurement, as JSON")
    args = parser.parse_args()
    if args.case:
        name, n, engine = args.case
        print(json.dumps(run_case(name, int(n), engine)))
        return
    print(f"N = {args.n}, {args.repeats} rounds, torch {torch.__version__}, transformers {transformers.__version__}")
    print(
        "| model | parameters | factored | default s | loop s | torch.func s | one step s | x loop | x torch.func "
        "| peak MiB default / torch.func |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
        for _ in range(args.repeats):
            for engine in ENGINES:
                runs[engine].append(_measure(name, args.n, engine))
        median = {}
        for engine, results in runs.items():
            ok = [r for r in results if "seconds" in r]
            median[engine] = (
                {
                    "seconds": statistics.median(r["seconds"] for r in ok),
                    "peak": statistics.median(r["peak_mib"] for r in ok),
                    "trace": ok[0]["trace"],
                }
                if ok
                else {"error": results[0]["error"]}
            )
        base, info = median["auto"], runs["auto"][0]
        cells = []
        for engine in ("loop", "torch.func"):
            other = median[engine]
            if "error" in other or "error" in base:
                cells.append(("cannot run", "-"))
            else:
                agree = abs(other["trace"] - base["trace"]) / abs(base["trace"])
                mark = "" if agree < 1e-3 else f" (trace differs by {agree:.1e})"
                cells.append((f"{other['seconds']:.2f}{mark}", f"{other['seconds'] / base['seconds']:.1f}x"))
        peak = "-" if "error" in median["torch.func"] else f"{base['peak']:.0f} / {median['torch.func']['peak']:.0f}"
        step = median["step"].get("seconds", float("nan"))
        print(
            f"| {name} | {info.get('params', 0) / 1e6:.1f} M | {info.get('factored', 0):.0%} | "
            f"{base.get('seconds', float('nan')):.2f} | {cells[0][0]} | {cells[1][0]} | {step:.2f} | {cells[0][1]} | "
            f"{cells[1][1]} | {peak} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
