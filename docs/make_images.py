"""Redraw the README's two pictures from a real run: the digits demo (examples/configs/fc.yaml) trained here, its
last probe's raw results drawn as the callback draws them (the render worker's code, in this process).

    python docs/make_images.py            # writes docs/images/class_matrix.png and docs/images/distance_curve.png
"""

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import digits  # noqa: E402

from lightning_stiffness import StiffnessResult  # noqa: E402
from lightning_stiffness.images.drawing import Painter  # noqa: E402
from lightning_stiffness.images.specs import probe_specs  # noqa: E402
from lightning_stiffness.names import class_matrix_tag, distance_curve_tag  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        config = str(ROOT / "examples" / "configs" / "fc.yaml")
        digits.main(
            ["fit", "--config", config, "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false"]
        )
        raw = sorted(Path(root).rglob("stiffness/epoch=*.pt"), key=lambda path: path.stat().st_mtime)[-1]
        result = StiffnessResult.from_dict(torch.load(raw, weights_only=True))
    specs = probe_specs(result, [str(digit) for digit in range(10)])
    painter = Painter()
    out = ROOT / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    for name, tag in (
        ("class_matrix", class_matrix_tag("train-val", "cosine")),
        ("distance_curve", distance_curve_tag("train-val")),
    ):
        (out / f"{name}.png").write_bytes(painter.png(specs[tag]))
        print(f"{out / name}.png: {specs[tag].title}")


if __name__ == "__main__":
    main()
