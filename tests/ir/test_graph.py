from __future__ import annotations

import torch

from passforge.ir.capture import capture
from passforge.ir.graph import copy_graph_module, param_stats, to_device
from passforge.ir.verify import check_meta
from tests.conftest import TiedEmbeddingHead


def test_copies_share_tensors_and_device_moves_never_touch_them(llama_graph):
    copy = copy_graph_module(llama_graph)
    assert copy.graph is not llama_graph.graph
    assert copy.get_parameter("lm_head.weight") is llama_graph.get_parameter("lm_head.weight")
    gm = capture(TiedEmbeddingHead(), (torch.randint(0, 32, (1, 3)),))
    moved = to_device(gm, torch.device("meta"))
    assert all(t.device.type == "meta" for t in [*moved.parameters(), *moved.buffers()])
    assert all(t.device.type == "cpu" for t in gm.parameters())  # the original is untouched
    assert param_stats(moved)[0] == param_stats(gm)[0]
    assert to_device(gm, torch.device("cpu")) is gm  # nothing to move: no copy


def test_moved_graphs_claim_the_new_device_and_still_verify():
    """The placeholders' and nodes' fake values move too: verification re-propagates from the placeholders,
    and a CPU token placeholder in front of moved weights is two devices in one embedding (seen on CUDA).
    An embedding and a head: on the meta device SDPA would pick other output strides than the CPU's."""
    gm = capture(TiedEmbeddingHead(), (torch.randint(0, 32, (1, 3)),))
    moved = to_device(gm, torch.device("meta"))
    vals = [node.meta["val"] for node in moved.graph.nodes if isinstance(node.meta.get("val"), torch.Tensor)]
    assert vals and all(val.device.type == "meta" for val in vals)
    check_meta(moved)
    assert all(node.meta["val"].device.type == "cpu" for node in gm.graph.nodes
               if isinstance(node.meta.get("val"), torch.Tensor))  # the original's claims are untouched
