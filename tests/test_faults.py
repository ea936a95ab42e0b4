"""The fault campaign's short version: one fault of every kind on a real job, recovered as a
user would (re-run; ``verify --repair`` where a command says so), then compared bit for bit
with a clean run (benchmarks/fault_campaign.py; the full campaign's table is in RESULTS.md)."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fault_campaign.py"


def _campaign():
    spec = importlib.util.spec_from_file_location("fault_campaign", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_one_fault_of_every_kind_is_recovered_bitwise_or_refused_clearly(tmp_path):
    campaign = _campaign()
    outcomes = campaign.main(
        [
            "--quick",
            "--seed",
            "3",
            "--n",
            "600",
            "--test",
            "100",
            "--tile",
            "75",
            "--dir",
            str(tmp_path),
        ]
    )
    injected = [o for o in outcomes if o.injected]
    assert len(injected) >= 3, [(o.kind, o.where, o.notes) for o in outcomes]
    bad = [(o.kind, o.where, o.notes) for o in injected if o.label not in ("identical", "refused")]
    assert not bad, bad
