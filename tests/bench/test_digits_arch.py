"""bench digits-arch's own parts: the equal-stored baseline."""

from weightshare.bench.digits_arch import equal_stored_hidden, mlp


def test_equal_stored_baseline_has_the_hashed_nets_size():
    h = equal_stored_hidden(1842)
    n = sum(p.numel() for p in mlp(h, h).parameters())
    assert abs(n - 1842) <= abs(sum(p.numel() for p in mlp(h + 1, h + 1).parameters()) - 1842)
    assert abs(n - 1842) <= abs(sum(p.numel() for p in mlp(h - 1, h - 1).parameters()) - 1842)
