"""Z_L magnitude pruning (core/prune.py): the documented rule, ties, padding, BitNet's two-level key."""

import torch


def test_magnitude_pruning_rule():
    from slidesparse.core.prune import prune_magnitude
    # ties: the lower column index goes first
    w = torch.ones(1, 8, dtype=torch.bfloat16)
    assert prune_magnitude(w, "2_8").tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]]
    # a group with >= 2 zeros (here -0.0 and 0) is left as it is
    w = torch.tensor([[0.5, -0.0, 0.3, 0.0, 0.001, 0.2, 0.1, 0.4]])
    assert torch.equal(prune_magnitude(w, "2_8"), w)
    # one zero: it and the next smallest go
    w = torch.tensor([[0.5, -0.3, 0.0, 0.7, -0.01, 0.2, 0.1, 0.4]])
    assert torch.equal(prune_magnitude(w, "2_8"), torch.tensor([[0.5, -0.3, 0.0, 0.7, 0.0, 0.2, 0.1, 0.4]]))
    # padding counts: K=10 with L=8 -> the second group has 2 real values and 6 padding zeros
    w = torch.arange(1, 11, dtype=torch.float32).reshape(1, 10)
    assert prune_magnitude(w, "2_8")[0, 8:].tolist() == [9.0, 10.0]
    # already Z_L weights (random) pass unchanged; the input tensor is never modified
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 40, generator=g).to(torch.bfloat16)
    once = prune_magnitude(w, "2_10")
    keep = w.clone()
    assert torch.equal(prune_magnitude(once, "2_10"), once) and torch.equal(w, keep)
