"""The merge of image embeddings into the text embeddings, as a named custom op.

``graphmode::merge_image_embeddings`` takes, for every row of a step's text embeddings marked as
an image placeholder, the encoder output row instead. Its shapes are the step's token count only
(a dense mask and a dense row buffer), so it can run in every step and sit inside static graphs.
It is one named step (visible in traces, dumps and profiles) that the start-up memory profile
runs at the largest configured image budget.
"""
from __future__ import annotations

import torch

from runtime.ops.library import graph_op

MERGE_OP = "graphmode::merge_image_embeddings"


@graph_op(MERGE_OP, mutates_args=())
def merge_image_embeddings(inputs_embeds: torch.Tensor, is_image: torch.Tensor,
                           image_embeds: torch.Tensor) -> torch.Tensor:
    """inputs_embeds, image_embeds [T, hidden]; is_image [T] bool -> [T, hidden]."""
    return torch.where(is_image[:, None], image_embeds.to(inputs_embeds.dtype), inputs_embeds)


@merge_image_embeddings.register_fake
def _merge_fake(inputs_embeds: torch.Tensor, is_image: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(inputs_embeds)
