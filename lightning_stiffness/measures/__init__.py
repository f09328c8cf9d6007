"""Stiffness measures in plain PyTorch, no Lightning: from Gram matrices to numbers, curves and intervals.

- :mod:`.functional`: the measures as pure functions of tensors (the public ``lightning_stiffness.functional``);
- :mod:`.metrics`: torchmetrics classes that accumulate them over blocks of a Gram matrix, across processes;
- :mod:`.result`: :class:`~.result.StiffnessResult`, everything one probe measured, nested by structure; its parts
  in :mod:`.records`; raw files of version 1 read by :mod:`.result_v1`;
- :mod:`.probe_measures`: one probe's measures, from its Gram rows to a result;
- :mod:`.fitted_lines`: the fitted lines behind the critical distance ξ;
- :mod:`.intervals`: bootstrap intervals and curve bands; :mod:`.groups`: stiffness between groups of classes;
- :mod:`.representations`: layer outputs, for distances in a layer's representation;
- :mod:`.whole_dataset`: exact class stiffness over a whole dataset; :mod:`.batches`: a batch split into ``(x, y)``.

This package imports only :mod:`lightning_stiffness.gram`, :mod:`lightning_stiffness.names` and
:mod:`lightning_stiffness.exceptions` of the rest (``tests/test_import_direction.py`` keeps it so), and nothing here
imports its modules eagerly: the report reads a result without torchmetrics.
"""
