"""Everything that needs Lightning: :class:`StiffnessCallback` and what it delegates to.

- :mod:`.callback`: the callback (arguments, state, hooks);
- :mod:`.schedule`: when to probe; :mod:`.probe_sets`: which examples (drawn once, batched as training batches);
- :mod:`.probing`: one probe, from the probe sets to a result, and the whole training set's measure;
  :mod:`.distributed`: a probe split across processes;
- :mod:`.isolation`: modes and random states left as they were; :mod:`.progress`: the progress bar;
- :mod:`.writers`: scalars and raw files, of a probe and of the whole training set alike.
"""

from lightning_stiffness.callback.callback import StiffnessCallback

__all__ = ["StiffnessCallback"]
