"""Import paths that moved keep working for one release, with a DeprecationWarning naming the new path; the public
paths (``lightning_stiffness``, ``lightning_stiffness.functional``, ``lightning_stiffness.report``) need none."""

import importlib
import warnings

import pytest

import lightning_stiffness
from lightning_stiffness.measures import metrics, result

#: Old module -> name -> the module the warning sends the user to.
MOVED = {
    "lightning_stiffness.measure": {
        "StiffnessResult": "lightning_stiffness",
        "GramRows": "lightning_stiffness.measures.probe_measures",
        "measure_stiffness": "lightning_stiffness.measures.probe_measures",
    },
    "lightning_stiffness.metrics": {
        name: "lightning_stiffness.measures.metrics"
        for name in ("ClassStiffness", "GradientAlignment", "StiffnessByDistance", "block_stiffness")
    },
}
CASES = [(old, name, new) for old, names in MOVED.items() for name, new in names.items()]


@pytest.mark.parametrize(("old", "name", "new"), CASES, ids=[f"{old}.{name}" for old, name, _ in CASES])
def test_an_old_path_warns_with_the_new_one_and_gives_the_same_object(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"`{old}\.{name}` is deprecated .* use `{new}\.{name}`") as caught:
        found = getattr(module, name)
    assert found is getattr(importlib.import_module(new), name)
    assert found.__module__.startswith("lightning_stiffness.measures.")  # where it is defined now
    assert caught[0].filename == __file__  # the warning points at the code that used the old path


def test_from_import_of_the_documented_old_paths_warns():
    with pytest.warns(DeprecationWarning, match="lightning_stiffness.StiffnessResult"):
        from lightning_stiffness.measure import StiffnessResult
    with pytest.warns(DeprecationWarning, match="lightning_stiffness.measures.metrics.ClassStiffness"):
        from lightning_stiffness.metrics import ClassStiffness
    assert StiffnessResult is result.StiffnessResult and ClassStiffness is metrics.ClassStiffness


def test_an_unknown_name_of_an_old_path_is_an_attribute_error_without_a_warning():
    module = importlib.import_module("lightning_stiffness.measure")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'nothing'"):
            module.nothing  # noqa: B018
        assert not hasattr(module, "__wrapped__")  # what doctest and pytest look for


def test_the_public_paths_need_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from lightning_stiffness import StiffnessCallback, StiffnessResult, functional
        from lightning_stiffness.callback import StiffnessCallback as from_the_package
        from lightning_stiffness.report import load_run, write_report

    assert StiffnessResult is result.StiffnessResult and from_the_package is StiffnessCallback
    assert StiffnessCallback.__module__ == "lightning_stiffness.callback.callback"  # as ddp_spawn pickles it
    assert callable(load_run) and callable(write_report)
    for name in functional.__all__:
        assert getattr(functional, name) is not None, name
    assert set(lightning_stiffness.__all__) == {"StiffnessCallback", "StiffnessResult", "__version__", "functional"}
