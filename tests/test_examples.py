"""The README's tour (examples/tour.py) runs and prints what the README shows."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_tour_prints_what_the_readme_shows() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tour.py")],
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    ).stdout.splitlines()
    assert out[:4] == [
        "worker starts on io-1",
        "main sees <Coroutine 'worker' suspended ctx='io-1'>",
        "worker woken with 'hello' on io-1",
        "join -> 'HELLO'",
    ]
    stats = ast.literal_eval(out[4])
    assert stats["co_entered"] == 2 and stats["co_scheduled"] == 2
    assert out[5] == "counter = 1000"
    assert out[6] == "sum = 4950"
    readme = (ROOT / "README.md").read_text()
    for line in [*out[:4], out[5].split(" = ")[0]]:
        assert line in readme
    assert "# sum = 4950" in readme
