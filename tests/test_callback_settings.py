"""The callback's settings: each stored once (changed after construction, it takes effect at the next fit), the
``state_key`` built from the settings that tell callbacks apart, and checkpoints written under the old key."""

import warnings

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_stiffness import StiffnessCallback
from lightning_stiffness.names import MODEL, class_tag
from tests.helpers import DigitsData, TinyNet, events, raw_results, trainer

COSINE_TAG, SIGN_TAG = class_tag("train-val", "cosine", "within"), class_tag("train-val", "sign", "within")
OLD_KEY = "StiffnessCallback{'prefix': 'stiffness'}"


def _indices(callback):
    return {name: idx.clone() for name, idx in callback.state_dict()["indices"].items()}


def test_state_key_holds_the_settings_that_tell_callbacks_apart(tmp_path):
    cosine, sign = StiffnessCallback(kinds=["cosine"], seed=1), StiffnessCallback(kinds=["sign"], seed=2)
    assert cosine.state_key == "StiffnessCallback{'prefix': 'stiffness', 'kinds': ['cosine']}"
    assert cosine.state_key != sign.state_key != StiffnessCallback(kinds=["sign"], prefix="other").state_key
    # The same settings given otherwise are the same callback.
    assert StiffnessCallback().state_key == StiffnessCallback(kinds=["sign", "cosine"]).state_key
    trainer(tmp_path, [cosine, sign])  # Lightning accepts them side by side


def test_the_same_prefix_and_kinds_twice_are_refused_by_lightning(tmp_path):
    # They would log the same tags; the other settings (the examples drawn, how often) do not tell them apart.
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        trainer(tmp_path, [StiffnessCallback(), StiffnessCallback(seed=1, samples_per_class=3, num_bootstrap=0)])


def test_two_callbacks_with_one_prefix_write_their_own_values_and_resume_their_own_examples(tmp_path):
    def callbacks():
        return [
            StiffnessCallback(samples_per_class=2, kinds=["cosine"], seed=1, log_images=False, save_raw=False),
            StiffnessCallback(samples_per_class=2, kinds=["sign"], seed=2, log_images=False, save_raw=False),
        ]

    seed_everything(0)
    cosine, sign = callbacks()
    first = trainer(tmp_path, [cosine, sign, ModelCheckpoint(save_last=True)], max_epochs=1)
    with pytest.warns(UserWarning, match="2 callbacks write under the prefix 'stiffness'"):
        first.fit(TinyNet(), datamodule=DigitsData())
    scalars = events(first.log_dir)
    for callback, tag, other in ((cosine, COSINE_TAG, SIGN_TAG), (sign, SIGN_TAG, COSINE_TAG)):
        logged = scalars.Scalars(tag)
        assert [e.step for e in logged] == [0, 4]
        assert logged[-1].value == pytest.approx(callback.last_result.scalars()[tag], rel=1e-6)
        assert other not in callback.last_result.scalars()
    drawn = {"cosine": _indices(cosine), "sign": _indices(sign)}
    assert not torch.equal(drawn["cosine"]["train"], drawn["sign"]["train"])  # seeds 1 and 2

    resumed = callbacks()[::-1]  # in the other order: each finds its own state by its key
    second = trainer(tmp_path, list(resumed), max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.fit(TinyNet(), datamodule=DigitsData(), ckpt_path=f"{first.log_dir}/checkpoints/last.ckpt")
    assert not [w for w in caught if "callbacks used to create" in str(w.message)]
    for callback, kind in ((resumed[1], "cosine"), (resumed[0], "sign")):
        assert callback.kinds == (kind,)
        assert callback.last_result.step == 8
        for name, idx in drawn[kind].items():
            assert torch.equal(_indices(callback)[name], idx), (kind, name)


def test_settings_changed_after_construction_take_effect(tmp_path):
    callback = StiffnessCallback(samples_per_class=2, log_images=False, num_bootstrap=0)
    callback.kinds = ["sign"]
    callback.samples_per_class = 3
    callback.prefix = "changed"
    callback.every_n_epochs = 2  # no probe at the end of epoch 0: the probes at steps 0 and 8
    callback.num_bootstrap = 20
    assert callback.state_key == "StiffnessCallback{'prefix': 'changed', 'kinds': ['sign']}"
    fit = trainer(tmp_path, [callback], max_epochs=2)
    fit.fit(TinyNet(), datamodule=DigitsData())
    assert sorted(raw_results(fit.log_dir, "changed")) == ["epoch=0-step=0.pt", "epoch=1-step=8.pt"]
    assert not raw_results(fit.log_dir)  # nothing under the old prefix
    assert callback.last_result.kinds == ("sign",)
    assert len(_indices(callback)["train"]) == 30  # 3 a class, 10 classes
    measures = callback.last_result.classes["train-val"]["sign"][MODEL]
    assert set(measures.intervals) == {"within", "between"}  # bootstrap intervals, from the changed num_bootstrap
    tags = events(fit.log_dir).Tags()["scalars"]
    assert class_tag("train-val", "sign", "within", "changed") in tags
    assert class_tag("train-val", "cosine", "within", "changed") not in tags
    assert SIGN_TAG not in tags


def test_a_bad_setting_changed_after_construction_is_refused_at_setup(tmp_path):
    callback = StiffnessCallback(samples_per_class=2)
    with pytest.raises(MisconfigurationException) as at_init:
        StiffnessCallback(kinds=["bogus"])
    callback.kinds = ["bogus"]
    with pytest.raises(MisconfigurationException) as at_setup:
        trainer(tmp_path, [callback]).fit(TinyNet(), datamodule=DigitsData())
    assert str(at_setup.value) == str(at_init.value)


def _old_key_checkpoint(tmp_path, **settings):
    """A run whose checkpoint holds the callback's state under the key it had before (the prefix alone)."""
    seed_everything(0)
    callback = StiffnessCallback(samples_per_class=2, log_images=False, save_raw=False, **settings)
    fit = trainer(tmp_path / "old", [callback, ModelCheckpoint(save_last=True)], max_epochs=1)
    fit.fit(TinyNet(), datamodule=DigitsData())
    path = f"{fit.log_dir}/checkpoints/last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    states = checkpoint["callbacks"]
    states[OLD_KEY] = states.pop(callback.state_key)
    torch.save(checkpoint, path)
    return path, _indices(callback)


def test_a_checkpoint_with_the_old_key_resumes_its_probe_examples(tmp_path):
    path, drawn = _old_key_checkpoint(tmp_path, seed=3)
    callback = StiffnessCallback(samples_per_class=2, seed=4, log_images=False, save_raw=False)
    fit = trainer(tmp_path / "new", [callback], max_epochs=2)
    with pytest.warns(UserWarning, match="drawn with seed=3"):
        fit.fit(TinyNet(), datamodule=DigitsData(), ckpt_path=path)
    assert callback.last_result.step == 8
    for name, idx in drawn.items():
        assert torch.equal(_indices(callback)[name], idx), name


def test_a_checkpoint_with_the_old_key_and_two_claimants_is_taken_by_none(tmp_path):
    path, drawn = _old_key_checkpoint(tmp_path, seed=3)
    callbacks = [
        StiffnessCallback(samples_per_class=2, seed=seed, kinds=[kind], log_images=False, save_raw=False)
        for seed, kind in ((4, "cosine"), (5, "sign"))
    ]
    fit = trainer(tmp_path / "new", list(callbacks), max_epochs=2)  # (Lightning adds to the list it is given)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyNet(), datamodule=DigitsData(), ckpt_path=path)
    assert [w for w in caught if "none of them takes it" in str(w.message)]
    assert not [w for w in caught if "drawn with" in str(w.message)]
    for callback in callbacks:
        assert not torch.equal(_indices(callback)["train"], drawn["train"])


def test_a_layer_named_input_is_refused_at_construction_and_at_setup(tmp_path):
    # "input" is the name of input space in the tags and results: a module of that name would be logged over it.
    with pytest.raises(MisconfigurationException, match=r"`layers` may not name a module 'input'.*input space"):
        StiffnessCallback(layers=["input"])
    callback = StiffnessCallback(samples_per_class=2)
    callback.layers = ["input"]
    with pytest.raises(MisconfigurationException, match=r"`layers` may not name a module 'input'"):
        trainer(tmp_path, [callback]).fit(TinyNet(), datamodule=DigitsData())
