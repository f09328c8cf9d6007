"""The models the tests train and compare, one module per subject.

- :mod:`tests.models.basic`: small MLPs, CNNs and other models covering the layer types and parameter layouts the
  Gram engines must handle (:data:`~tests.models.basic.MODELS`, :func:`~tests.models.basic.build`), and plain
  classifiers the tests train: a Tanh MLP, a digits CNN with BatchNorm, a mean-pooling token model.
- :mod:`tests.models.sequences`: recurrent models (RNN, GRU, LSTM, packed sequences), which the exact fallback
  computes.
- :mod:`tests.models.layouts`: models whose layouts break the "dim 0 indexes the examples" assumption, or that no
  rule covers, and :func:`~tests.models.layouts.random_model`.
- :mod:`tests.models.transformer`: small transformer-ish models written with ``torch.nn``.
- :mod:`tests.models.hugging_face`: tiny Hugging Face models of 21 families, each as a
  :class:`~tests.models.hugging_face.Case`.
"""
