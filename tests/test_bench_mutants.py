"""bench/mutants.py patches the package's text: when the code moves on, a patch that no
longer applies must fail here, not only when someone runs the mutation check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import mutants  # noqa: E402


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_patch_applies_once_and_compiles(mutant, tmp_path):
    src = mutants.make_copy(mutant, tmp_path)
    for patch in mutant.patches:
        text = (src / patch.path).read_text()
        assert patch.new in text and patch.old not in text


def test_a_patch_whose_text_moved_is_refused(tmp_path):
    stale = mutants.Mutant("stale", "text that is not in the package", (
        mutants.Patch("supervisor_dcdeploy/coord.py", "no such line\n", "x\n"),))
    with pytest.raises(mutants.PatchError, match="occurs 0 times"):
        mutants.make_copy(stale, tmp_path)
