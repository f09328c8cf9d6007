"""A probe's images: figure specs from a result, drawing them to PNG, the render worker, and each logger's route.

- :mod:`.specs`: a result turned into plain figure specs (NumPy arrays and strings);
- :mod:`.drawing`: specs to PNG bytes with matplotlib, fast enough for every probe (imports no torch);
- :mod:`.render_worker`: a worker process that draws, so that training does not wait;
- :mod:`.logger_routes`: finished PNGs into each logger's own API (TensorBoard, W&B, MLflow);
- :mod:`.image_writer`: the callback's image writer, which ties them together.

This file imports nothing: the render worker imports :mod:`.drawing` alone, without torch.
"""
