"""benchmarks/official_choices.py (the deviations table of gpavatar/model/design.md) runs end to
end on a small render and measures what it says."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import official_choices  # noqa: E402


def test_script_runs_and_measures(tmp_path):
    out = tmp_path / "choices.json"
    assert official_choices.main(["--size", "12", "--json", str(out), "--markdown", str(tmp_path / "c.md")]) == 0
    rows = {r["choice"].split(":")[0].split(" (")[0]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 7
    # the old depth rule differs from the official one; the alpha rounding is below an ulp of 1
    assert rows["depth fill"]["depth"] > 1e-3
    assert 0 <= rows["alpha"]["alpha (abs)"] <= 6e-8
    assert (tmp_path / "c.md").read_text().startswith("| choice |")
