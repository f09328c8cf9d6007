"""Images: drawn off the training process, every probe's (the last one's always) in TensorBoard event files of either
Lightning package and as PNG files, figures that show the fitted line, ξ and the probe sets as they are, thirty classes
with long names, titles and labels inside the figure, PNG files that decode."""

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, seed_everything
from lightning.pytorch.loggers import CSVLogger
from matplotlib.legend import Legend
from matplotlib.text import Text
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.functional import critical_distance
from lightning_stiffness.images.drawing import (
    DPI,
    MAX_TICK_LABELS,
    STIFFNESS_RANGE,
    WIDTH,
    CurveSpec,
    LayersSpec,
    Line,
    MatrixSpec,
    Painter,
    XiBarsSpec,
)
from lightning_stiffness.images.render_worker import Renderer
from lightning_stiffness.images.specs import ImageSpec, probe_specs
from lightning_stiffness.measures.fitted_lines import observed_range
from lightning_stiffness.measures.intervals import add_intervals
from lightning_stiffness.measures.probe_measures import measure_stiffness
from lightning_stiffness.measures.result import StiffnessResult
from lightning_stiffness.names import INPUT, MODEL, class_matrix_tag, distance_curve_tag
from tests.helpers import DigitsData, TinyNet, _callback, events, raw_results, trainer
from tests.models.basic import tanh_mlp

TAG = class_matrix_tag("train-val", "cosine")
#: Every image's width in pixels (at DPI): small, so that its type is large where TensorBoard shows it, 270-300 px.
WIDTH_PX = round(WIDTH * DPI)
#: The smallest text may be this share of the image's width (12 pt at 480 px: 10 px on a 300-px card).
MIN_TEXT_SHARE = 1 / 29


def _assert_card_sized(picture: Image.Image) -> None:
    """A PNG of one probe: 480 px wide and not taller than wide (it must read at TensorBoard's card width)."""
    assert picture.width == WIDTH_PX and 0.6 * WIDTH_PX <= picture.height <= WIDTH_PX, picture.size


def _image_steps(log_dir, tag=TAG):
    return [e.step for e in events(log_dir).Images(tag)]


def test_last_probe_has_images_whatever_the_cadence(tmp_path):
    callback = StiffnessCallback(samples_per_class=2, images_every_n_probes=3)
    fit = trainer(tmp_path, [callback], max_epochs=2)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert sorted(raw_results(fit.log_dir)) == ["epoch=0-step=0.pt", "epoch=0-step=4.pt", "epoch=1-step=8.pt"]
    assert _image_steps(fit.log_dir) == [0, 8]  # the first, and the last although it is not a third


class _FailsAtEpoch(TinyNet):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise RuntimeError("training broke")
        return super().training_step(batch, batch_idx)


def test_images_of_every_probe_arrive_when_training_fails(tmp_path):
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2)], max_epochs=3)
    with pytest.raises(RuntimeError, match="training broke"):
        fit.fit(_FailsAtEpoch(), datamodule=DigitsData())
    assert _image_steps(fit.log_dir) == [0, 4]


def test_standalone_pytorch_lightning_tensorboard_logger(tmp_path):
    loggers = pytest.importorskip("pytorch_lightning.loggers")
    logger = loggers.TensorBoardLogger(str(tmp_path), name="pl")
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2, kinds=["cosine"])], max_epochs=1, logger=logger)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert _image_steps(logger.log_dir) == [0, 4]
    assert not list((tmp_path / "pl").rglob("*.png"))  # TensorBoard takes the images: no PNG files


def test_images_decode_with_the_probe_sets_on_the_axes(tmp_path):
    seed_everything(0)
    fit = trainer(tmp_path, [StiffnessCallback(samples_per_class=2)], max_epochs=1)
    fit.fit(TinyNet(), datamodule=DigitsData())
    entry = events(fit.log_dir).Images(distance_curve_tag("train-val"))[-1]
    with Image.open(io.BytesIO(entry.encoded_image_string)) as picture:
        assert picture.mode == "RGB"
        _assert_card_sized(picture)
    result = StiffnessResult.from_dict(raw_results(fit.log_dir)["epoch=0-step=4.pt"])
    spec = probe_specs(result, [str(d) for d in range(10)])[TAG]
    assert (spec.row_label, spec.col_label) == ("train class", "val class")  # rows: the train set, columns: val
    assert spec.title.startswith("cosine, train-val (epoch 0, step 4)\nwithin ")
    start = StiffnessResult.from_dict(raw_results(fit.log_dir)["epoch=0-step=0.pt"])
    assert "(initialisation)" in probe_specs(start, [str(d) for d in range(10)])[TAG].title


def _measured(seed: int = 0) -> StiffnessResult:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 8, generator=generator)
    y = torch.arange(6).repeat_interleave(10)
    x = x + 2.0 * torch.nn.functional.one_hot(y, 8).float()  # same-class examples close together
    g = torch.randn(60, 12, generator=generator) + 1.5 * torch.nn.functional.one_hot(y, 12).float()
    return measure_stiffness(
        g @ g.T, {"train": x}, {"train": y}, {"train": torch.arange(60)}, kinds=("cosine",), num_classes=6
    )


def test_fitted_line_is_critical_distances_line():
    result = _measured()
    space = result.spaces["train-train"][INPUT]
    stiffness, distances = result.classes["train-train"]["cosine"][MODEL].stiffness.double(), space.distances.double()
    labels = result.labels["train"]
    mask = (labels[:, None] == labels[None, :]) & ~torch.eye(60, dtype=torch.bool)
    slope, intercept = np.polyfit(distances[mask].numpy(), stiffness[mask].numpy(), 1)  # float64 reference
    xi = critical_distance(stiffness, distances, mask)
    assert slope < 0 and math.isfinite(xi)

    spec = probe_specs(result, [str(c) for c in range(6)])[distance_curve_tag("train-train")]
    axes = Painter().figure(spec).axes[0]
    (line,) = [artist for artist in axes.get_lines() if artist.get_gid() == "fit-pairs"]
    xs, ys = line.get_xdata(), line.get_ydata()
    low, high = observed_range(space.curves["within"])
    assert list(xs) == [low, high]
    assert low <= float(distances[mask].min()) and float(distances[mask].max()) <= high
    np.testing.assert_allclose(ys, intercept + slope * np.asarray(xs), rtol=1e-6, atol=1e-9)
    assert xs[0] - ys[0] * (xs[1] - xs[0]) / (ys[1] - ys[0]) == pytest.approx(xi, rel=1e-6)  # where it crosses 0
    assert axes.get_ylim() == STIFFNESS_RANGE
    assert space.line_fits["pairs"]["xi"] == pytest.approx(xi, rel=1e-9)
    bins = space.line_fits["bins"]  # through the bin means, each bin once
    curve = space.curves["within"]
    seen = curve.count > 0
    centres = ((curve.edges[1:] + curve.edges[:-1]) / 2)[seen].numpy()
    bin_slope, bin_intercept = np.polyfit(centres, curve.mean[seen].numpy(), 1)
    assert (bins["slope"], bins["intercept"]) == (pytest.approx(bin_slope), pytest.approx(bin_intercept))


def _curve(xi: float) -> CurveSpec:
    edges = np.linspace(0.1, 0.9, 5)
    mean, count = np.array([0.6, 0.4, 0.3, 0.2]), np.array([500, 200, 20, 2])
    line = Line(intercept=0.7, slope=-0.7 / xi if math.isfinite(xi) else 0.1, xi=xi, low=0.1, high=0.9)
    return CurveSpec(edges, mean, count, mean - 0.5, count, line, None, "t", "distance", "stiffness")


def test_xi_beyond_the_data_is_said_not_drawn():
    painter = Painter()
    axes = painter.figure(_curve(0.5)).axes[0]
    (marker,) = [line for line in axes.get_lines() if line.get_gid() == "xi"]
    assert marker.get_visible() and list(marker.get_xdata()) == [0.5, 0.5]
    assert _xi_note(painter, _curve(0.5)) == "ξ = 0.5"
    assert _xi_note(painter, _curve(1.6)) == "ξ ≈ 1.6 (extrapolated →)"  # beyond the largest distance
    axes = painter.figure(_curve(1.6)).axes[0]  # the same template, redrawn
    assert not marker.get_visible()
    assert axes.get_xlim()[1] < 1.0  # the axis is not stretched to ξ
    assert _xi_note(painter, _curve(0.05)) == "ξ ≈ 0.05 (extrapolated ←)"  # below the smallest distance
    sizes = next(c for c in axes.collections if c.get_label() == "within").get_sizes()
    assert sizes[0] > 10 * sizes[-1]  # a bin of 500 pairs is drawn larger than one of 2
    assert _xi_note(painter, _curve(math.nan)) == "no ξ (the fit does not fall)"


def _xi_note(painter: Painter, spec: CurveSpec) -> str:
    """The curve's second title line, which says ξ."""
    (note,) = [text for text in painter.figure(spec).texts if text.get_gid() == "xi-label"]
    return note.get_text()


def test_worker_draws_the_same_pictures_as_this_process():
    specs = probe_specs(_measured(), [str(c) for c in range(6)])
    renderer = Renderer()
    try:
        renderer.submit(specs, "job")
        assert renderer.wait(120)
        ((context, pngs),) = renderer.finished()
    finally:
        renderer.close()
    assert context == "job" and sorted(pngs) == sorted(specs)
    painter = Painter()
    for tag, png in pngs.items():
        with Image.open(io.BytesIO(png)) as picture:
            np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), painter.rgb(specs[tag]))


def _drawn_whole(painter: Painter, spec) -> np.ndarray:
    """The spec drawn by matplotlib from scratch (every artist, texts by Agg): the reference of the fast path."""
    figure = painter.figure(spec)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _assert_same_but_text_antialiasing(painter: Painter, spec, fast: np.ndarray, slow: np.ndarray) -> None:
    """Pixels may differ only inside the boxes of texts (Pillow's sub-pixel placement of glyphs) and of the legend
    (part of the kept background, so the probe's artists go over it), and each text is there in the fast picture."""
    figure = painter.figure(spec)
    renderer = figure.canvas.get_renderer()
    height = fast.shape[0]
    inside = np.zeros(fast.shape[:2], dtype=bool)
    for text in figure.findobj(lambda artist: hasattr(artist, "get_text") and artist.get_text()):
        if not text.get_visible():
            continue
        box = text.get_window_extent(renderer)
        rows = slice(max(0, int(height - box.y1) - 3), int(height - box.y0) + 4)
        cols = slice(max(0, int(box.x0) - 3), int(box.x1) + 4)
        inside[rows, cols] = True
        drawn = (slow[rows, cols].min(axis=2) < 128).any()
        assert drawn <= (fast[rows, cols].min(axis=2) < 128).any(), text.get_text()  # drawn where Agg draws it
    for legend in figure.findobj(Legend):
        box = legend.get_window_extent(renderer)
        inside[int(height - box.y1) : int(height - box.y0) + 1, int(box.x0) : int(box.x1) + 1] = True
    differs = np.abs(fast.astype(int) - slow.astype(int)).max(axis=2) > 32
    assert not (differs & ~inside).any()


def test_fast_matrix_has_the_colours_and_texts_matplotlib_draws():
    specs = probe_specs(_measured(), [f"class {c}" for c in range(6)])
    spec = specs[class_matrix_tag("train-train", "cosine")]
    painter = Painter()
    fast = painter.rgb(spec).copy()
    slow = _drawn_whole(painter, spec)
    assert fast.shape == slow.shape
    axes = painter.figure(spec).axes[0]
    x0, y0, x1, y1 = axes.bbox.extents
    size = len(spec.class_names)
    for row in range(size):  # each cell's centre: the colour imshow gives it, painted by NumPy
        for col in range(size):
            x = int(x0 + (col + 0.5) * (x1 - x0) / size)
            y = int(fast.shape[0] - (y1 - (row + 0.5) * (y1 - y0) / size))
            np.testing.assert_array_equal(fast[y, x], slow[y, x])
    _assert_same_but_text_antialiasing(painter, spec, fast, slow)
    painter.rgb(specs[class_matrix_tag("train-train", "cosine")])  # the template again, after the whole drawing
    np.testing.assert_array_equal(painter.rgb(spec), fast)


def test_fast_curve_matches_the_whole_drawing_and_shows_the_band():
    spec = _curve(0.5)
    band = (spec.within_mean - 0.1, spec.within_mean + 0.1)
    band[0][2] = np.nan  # an interval that could not be formed: a gap in the band
    banded = CurveSpec(**{**spec.__dict__, "within_band": band})
    painter = Painter()
    fast = painter.rgb(banded).copy()
    slow = _drawn_whole(painter, banded)
    _assert_same_but_text_antialiasing(painter, banded, fast, slow)
    axes = painter.figure(banded).axes[0]
    (collection,) = [c for c in axes.collections if c.get_gid() == "band-within"]
    paths = collection.get_paths()
    centres = (spec.edges[1:] + spec.edges[:-1]) / 2
    assert len(paths) == 2  # bins 0-1, then bin 3 alone
    np.testing.assert_allclose(paths[0].vertices[:4, 0], [centres[0], centres[1], centres[1], centres[0]])
    np.testing.assert_allclose(paths[0].vertices[:4, 1], [band[0][0], band[0][1], band[1][1], band[1][0]])
    assert not next(c for c in axes.collections if c.get_gid() == "band-between").get_paths()
    assert "95% CI" in [t.get_text() for t in axes.get_legend().get_texts()]


def test_curves_of_one_probe_share_their_distance_axis():
    specs = probe_specs(_measured(), [str(c) for c in range(6)])
    curves = [spec for spec in specs.values() if isinstance(spec, CurveSpec)]
    assert curves and len({spec.xlim for spec in curves}) == 1
    low, high = curves[0].xlim
    assert all(low <= spec.edges[0] and spec.edges[-1] <= high for spec in curves)


def test_probe_curves_carry_their_bootstrap_bands():
    result = _measured()
    add_intervals(result, 50, seed=0)
    spec = probe_specs(result, [str(c) for c in range(6)])[distance_curve_tag("train-train")]
    for side in ("within", "between"):
        low, high = result.spaces["train-train"][INPUT].bands[side]
        np.testing.assert_array_equal(getattr(spec, f"{side}_band")[0], low.numpy())
        np.testing.assert_array_equal(getattr(spec, f"{side}_band")[1], high.numpy())
    axes = Painter().figure(spec).axes[0]
    assert next(c for c in axes.collections if c.get_gid() == "band-within").get_paths()


def test_every_spec_is_an_image_spec_and_a_missing_class_matrix_is_named():
    result = _measured()
    assert all(isinstance(spec, ImageSpec) for spec in probe_specs(result, [str(c) for c in range(6)]).values())
    result.classes["train-train"]["cosine"][MODEL].matrix = None  # as a version-1 file without it
    with pytest.raises(ValueError, match="no train-train cosine class matrix to draw"):
        probe_specs(result, [str(c) for c in range(6)])


# ------------------------------------------------------------------------------------------------------- figures


class _ThirtyClasses(LightningDataModule):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        y = torch.arange(30).repeat(6)
        x = torch.randn(len(y), 8, generator=generator) + nn.functional.one_hot(y % 8, 8).float()
        self.train_set, self.val_set = TensorDataset(x[:120], y[:120]), TensorDataset(x[120:], y[120:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=30, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=30)


class _ThirtyWay(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = tanh_mlp(8, 12, 30)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_thirty_classes_with_long_names_as_png_files(tmp_path):
    names = [f"a rather long class name number {c}" for c in range(30)]
    callback = _callback(class_names=names)
    fit = trainer(tmp_path, [callback], max_epochs=1, logger=CSVLogger(tmp_path), limit_train_batches=2)
    fit.fit(_ThirtyWay(), datamodule=_ThirtyClasses())
    for pair in ("train-train", "train-val", "val-val"):
        files = sorted((Path(fit.log_dir) / class_matrix_tag(pair, "cosine")).glob("*.png"))
        assert [p.name for p in files] == ["epoch=0-step=0.png", "epoch=0-step=2.png"]
        with Image.open(files[-1]) as picture:
            assert picture.mode == "RGB"
            _assert_card_sized(picture)  # thirty classes: the same width, fewer names on the axes
    spec_names = callback._probes.class_names
    assert list(spec_names) == names


def _texts_outside(figure) -> list[tuple[str, list[int]]]:
    """The title, axis labels and figure texts that reach beyond the figure's edges (as matplotlib lays them out,
    which the fast drawing copies)."""
    figure.canvas.draw()
    renderer, frame = figure.canvas.get_renderer(), figure.bbox
    texts = [*figure.texts]
    for axes in figure.axes[:1]:
        texts += [axes.title, axes.xaxis.label, axes.yaxis.label]
    outside = []
    for text in texts:
        if not text.get_visible() or not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > frame.x1 + 0.5 or box.y1 > frame.y1 + 0.5:
            outside.append((text.get_text(), [round(v) for v in box.extents]))
    return outside


def test_two_class_matrix_title_fits_a_long_run(tmp_path):
    title = "sign stiffness, train-val (epoch 12, step 4567): within -0.12, between -0.01"  # as _matrix_spec writes it
    spec = MatrixSpec(
        np.zeros((2, 2)),
        ("0", "1"),  # the labels, as named when the dataset has no `classes`
        title,
        "class of the train example (rows: train set)",
        "class of the val example (columns: val set)",
    )
    assert _texts_outside(Painter().figure(spec)) == []


def test_layer_distance_curve_title_fits(tmp_path):
    layer = "encoder.layer.11.output"
    edges = np.linspace(0.1, 0.9, 5)
    mean, count = np.array([0.5, 0.3, 0.2, 0.1]), np.array([10, 10, 10, 10])
    spec = CurveSpec(
        edges,
        mean,
        count,
        mean - 0.3,
        count,
        Line(0.7, -1.0, 0.7, 0.1, 0.9),
        None,
        f"cosine stiffness against distance in {layer}, train-val (epoch 9, step 4500)",  # as _curve_spec writes it
        f"cosine distance between outputs of {layer}",
        "mean cosine stiffness",
    )
    assert _texts_outside(Painter().figure(spec)) == []
    assert math.isfinite(spec.fit.xi)


def test_pngs_decode_and_images_are_the_drawn_ones(tmp_path):
    fit = trainer(tmp_path, [_callback()], max_epochs=1, logger=CSVLogger(tmp_path))
    fit.fit(TinyNet(), datamodule=DigitsData())
    for path in (Path(fit.log_dir) / distance_curve_tag("train-val")).glob("*.png"):
        with Image.open(io.BytesIO(path.read_bytes())) as picture:
            assert picture.format == "PNG"
            _assert_card_sized(picture)


# ------------------------------------------------------------------------------------------- readable on a card


def _every_kind() -> dict[str, ImageSpec]:
    """A spec of every kind of image, the hard cases of each: a probe's own (matrices, curves, by layer, ξ by
    layer), a hundred classes, thirty long class names, long layer names, ξ extrapolated and none."""
    result = _measured()
    add_intervals(result, 20, seed=0)
    specs: dict[str, ImageSpec] = dict(probe_specs(result, [str(c) for c in range(6)]))
    hundred = np.random.default_rng(0).uniform(-1, 1, (100, 100))
    names = tuple(f"class {c}" for c in range(100))
    specs["hundred"] = MatrixSpec(hundred, names, "cosine, train-val (epoch 12, step 4567)\nwithin 0.52, between -0.01",
                                  "train class", "val class")  # fmt: skip
    long_names = tuple(f"a rather long class name number {c}" for c in range(30))
    specs["thirty long"] = MatrixSpec(hundred[:30, :30], long_names, "sign, val-val (initialisation)\nwithin 0.10, "
                                      "between 0.00", "val class", "val class")  # fmt: skip
    layers = tuple(f"encoder.layer.{index}.output" for index in range(12))
    specs["layers"] = LayersSpec(layers, tuple(np.linspace(0, 1, 12)), tuple(np.linspace(0, -0.2, 12)), "t (epoch 1)")
    values = (0.8, 1.5, math.nan, *np.linspace(0.1, 0.5, 9))
    flags = (False, True, None, *([False] * 9))
    specs["xi bars"] = XiBarsSpec(("input", *layers[:11]), values, "val-val (epoch 100, step 123456)", flags)
    for name, xi in (("extrapolated", 1.6), ("no xi", math.nan)):
        spec = _curve(xi)
        specs[name] = CurveSpec(**{**spec.__dict__, "xlabel": f"cosine distance in {layers[-1]}.attention.dense"})
    return specs


def test_every_image_is_card_sized_png():
    painter = Painter()
    for name, spec in _every_kind().items():
        with Image.open(io.BytesIO(painter.png(spec))) as picture:
            assert picture.format == "PNG", name
            if name == "hundred":  # many classes: the same picture at a higher dpi, so a cell keeps some pixels
                assert picture.width > WIDTH_PX and 0.6 * picture.width <= picture.height <= picture.width
                assert picture.width / 100 * 0.6 >= 4  # the matrix takes over half the width: 4 px a class or more
            else:
                _assert_card_sized(picture)


def test_every_text_is_large_for_the_image_and_inside_it():
    """Shown 300 px wide, no text is smaller than 10 px: each is at least 1/29 of the image's width (tick labels,
    legends and notes included), and no axis names more than MAX_TICK_LABELS classes or layers."""
    painter = Painter()
    for name, spec in _every_kind().items():
        figure = painter.figure(spec)
        figure.canvas.draw()  # tick labels are made when drawn
        width_px = figure.get_size_inches()[0] * figure.dpi
        texts = [text for text in figure.findobj(Text) if text.get_visible() and text.get_text().strip()]
        assert len(texts) >= 5, name
        for text in texts:
            assert text.get_fontsize() * figure.dpi / 72 >= MIN_TEXT_SHARE * width_px, (name, text.get_text())
        for axis in (figure.axes[0].xaxis, figure.axes[0].yaxis):
            assert len([label for label in axis.get_ticklabels() if label.get_text()]) <= MAX_TICK_LABELS, name
        assert _texts_outside(figure) == [], name


def test_the_words_are_few():
    """Titles, axis labels and legend entries are short: a card has room for about 35 characters a line. (A name
    too long for the width, such as the 52-character layer of the curves here, is shortened with "…" to fit: see
    the test above.)"""
    painter = Painter()
    for name, spec in _every_kind().items():
        if name in ("extrapolated", "no xi"):
            continue
        figure = painter.figure(spec)
        lines = [text.get_text() for text in figure.findobj(Text) if text.get_visible()]
        assert all(len(line) <= 40 for line in lines), (name, [line for line in lines if len(line) > 40])
        for legend in figure.findobj(Legend):
            assert all(len(text.get_text()) <= 12 for text in legend.get_texts()), name
