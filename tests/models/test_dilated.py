import pytest
import torch

from pipeline.models.dilated import CONTEXT_DILATIONS, DilatedContextNet, dilated_geometry
from tests.helpers import empirical_dependency, make_probe_ready


def test_context_module_receptive_fields_match_the_paper_table() -> None:
    # Yu & Koltun 2016, table 1: 3, 5, 9, 17, 33, 65, 67 (and 67 after the 1x1 layer)
    fields, rf = [], 1
    for d in CONTEXT_DILATIONS:
        rf += 2 * d
        fields.append(rf)
    assert fields == [3, 5, 9, 17, 33, 65, 67]
    assert 2 * dilated_geometry(0, "same").halo + 1 == 67


@pytest.mark.parametrize("context", ["basic", "large"])
@pytest.mark.parametrize("front_depth", [0, 2])
def test_receptive_field_equals_the_gradient_probe(context, front_depth) -> None:
    net = make_probe_ready(DilatedContextNet(1, 2, 4, front_depth, context, identity_init=False))
    geo = dilated_geometry(front_depth, "same")
    size, o = 2 * geo.halo + 21, geo.halo + 10
    assert empirical_dependency(net, size, o) == (o - geo.halo, o + geo.halo) * 2


def test_identity_initialisation_passes_scores_through() -> None:
    net = DilatedContextNet(1, 3, 4, 1, "basic").eval()
    scores = torch.rand(1, 3, 40, 40)
    assert torch.equal(net.context(scores), scores)  # positive scores survive the ReLUs
    large = DilatedContextNet(1, 3, 4, 1, "large").eval()
    torch.testing.assert_close(large.context(scores), scores, atol=0.05, rtol=0)


def test_valid_padding_trims_the_halo() -> None:
    geo = dilated_geometry(2, "valid")
    net = DilatedContextNet(3, 4, 8, 2, "large", "valid").eval()
    assert net(torch.zeros(1, 3, 100, 90)).shape == (1, 4, 100 - 2 * geo.trim, 90 - 2 * geo.trim)
    assert geo.trim == geo.halo == 35 and geo.size_min == 71
