"""The reference goldens as a whole: every method of issue 13 §3 has one; each names its official
source, its generating script and a test that reads it; REPRODUCIBILITY.md's parity table lists each
golden and only tests that exist; a golden is read without running code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from clbench.registry import ClbenchError
from reference_golden import GOLDEN_DIR, all_goldens, load_golden

REPO = Path(__file__).resolve().parents[1]
TABLE = (REPO / "REPRODUCIBILITY.md").read_text()

# method (issue 13 §3) -> the goldens that prove it
REQUIRED = {
    "CoTTA": ["cotta"], "TENT": ["tent"], "BN adapt": ["bn_adapt"], "FeTrIL": ["fetril"],
    "AdaB2N": ["adab2n_layer", "adab2n_er_ace_ada", "adab2n_derpp_ada"], "ER-ACE": ["adab2n_er_ace_bn"],
    "DER++": ["adab2n_derpp_bn"], "EWC": ["smith2023"], "L2P": ["coda_prompt_l2p"],
    "DualPrompt": ["coda_prompt_dualprompt"], "CODA-Prompt": ["coda_prompt_coda"],
    "OnePrompt": ["ovor_oneprompt"], "VOR": ["ovor_vor_outliers", "ovor_vor_step"], "SLCA": ["slca"],
    "key-value bottleneck": ["kv_bottleneck"], "MVP": ["mvp"], "Si-Blurry sampler": ["si_blurry"],
}


def _reference_tests() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((REPO / "tests").glob("test_reference_*.py"))}


def test_every_method_has_a_golden():
    present = set(all_goldens())
    missing = {m: [g for g in names if g not in present] for m, names in REQUIRED.items()}
    assert not {m: g for m, g in missing.items() if g}, f"methods without their golden: {missing}"


@pytest.mark.parametrize("name", all_goldens())
def test_golden_names_its_source_script_and_test(name):
    golden = load_golden(name)
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", golden.repository), golden.repository
    assert re.fullmatch(r"[0-9a-f]{7,40}", golden.commit), golden.commit
    assert golden.files, "no official files named"
    script = REPO / golden.script
    assert script.is_file() and script.parent == REPO / "tools" / "reference", golden.script
    source = script.read_text()
    assert golden.commit[:7] in source, f"{golden.script} does not name the pinned commit {golden.commit[:7]}"
    readers = [f for f, text in _reference_tests().items() if f'"{name}"' in text]
    assert readers, f"no tests/test_reference_*.py reads golden {name!r}"
    assert f"`{name}`" in TABLE, f"REPRODUCIBILITY.md's parity table does not list golden {name!r}"
    assert golden.commit[:7] in TABLE, f"REPRODUCIBILITY.md does not give {golden.repository} @ {golden.commit[:7]}"


def test_parity_table_names_only_tests_that_exist():
    tests = _reference_tests()
    functions = {f: {n.name for n in ast.walk(ast.parse(t)) if isinstance(n, ast.FunctionDef)} for f, t in tests.items()}
    cited = re.findall(r"`(test_reference_\w+\.py)(?:::(\w+))?", TABLE)
    assert cited
    for file, func in cited:
        assert file in tests, f"REPRODUCIBILITY.md cites {file}, which does not exist"
        if func:
            assert func in functions[file], f"REPRODUCIBILITY.md cites {file}::{func}, which does not exist"
    for match in re.finditer(r"`::(\w+)`", TABLE):  # `::name` continues the file named before it in its cell
        assert any(match.group(1) in names for names in functions.values()), match.group(1)


def test_a_golden_cannot_run_code(tmp_path):
    """A pickle (what torch.save writes) renamed to .safetensors is refused, and its payload never runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(ClbenchError, match="not a valid safetensors file"):
        load_golden("evil", tmp_path)
    assert not marker.exists()


def test_goldens_stay_small():
    sizes = {p.name: p.stat().st_size for p in GOLDEN_DIR.glob("*.safetensors")}
    assert all(size < 2 * 1024 * 1024 for size in sizes.values()), sizes
    assert sum(sizes.values()) < 12 * 1024 * 1024
