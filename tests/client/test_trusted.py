"""``WireModel.trusted``: what ``model_construct`` builds, for the client's hot path."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch

from monitor.client.summary import measure, measure_scale, to_wire
from monitor.schema import SiteSummary, StepSummary


def site_values() -> dict[str, Any]:
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    return to_wire("fc#0", measure(x, "dense")).model_dump()


@pytest.mark.parametrize(
    ("model", "values"),
    [
        (SiteSummary, site_values()),
        (
            StepSummary,
            {
                "step": 3,
                "source": "train",
                "sites": [SiteSummary.model_validate(site_values())],
                "loss": 0.5,
                "sample_indices": None,
                "scalars": {"lr/group0": 0.1},
                "diagram": None,
            },
        ),
    ],
)
def test_trusted_equals_model_construct(model: Any, values: dict[str, Any]) -> None:
    built = model.trusted(**values)
    expected = model.model_construct(**values)
    assert built == expected
    assert built.model_fields_set == expected.model_fields_set
    assert built.model_dump() == expected.model_dump()
    assert built.model_dump_json() == expected.model_dump_json()
    assert pickle.loads(pickle.dumps(built)) == expected  # as the embedded transport sends it
    assert model.model_validate(built.model_dump()) == built  # and it is valid


def test_trusted_needs_every_field_and_no_other() -> None:
    values = site_values()
    del values["sumsq"]
    with pytest.raises(TypeError, match=r"missing \['sumsq'\]"):
        SiteSummary.trusted(**values)
    with pytest.raises(TypeError, match=r"unknown \['extra'\]"):
        SiteSummary.trusted(**site_values(), extra=1)


def test_to_wire_builds_valid_summaries_of_both_kinds() -> None:
    x = torch.randn(16, 9, generator=torch.Generator().manual_seed(4))
    for stats in (measure(x, "dense"), measure_scale(x, "dense")):
        wire = to_wire("fc#0", stats)
        assert SiteSummary.model_validate(wire.model_dump()) == wire
