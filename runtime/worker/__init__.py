"""The worker layer: what one rank runs. ``Worker`` holds the model and its ``ModelRunner``, which
turns a scheduler step into a forward (persistent input buffers, graph dispatch, DBO micro-batches)
and samples; the encoder runner and multimodal inputs serve vision models."""
