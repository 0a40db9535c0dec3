"""bench/fp8_accuracy.py on CPU: --grads --smoke (tiny preset, one global batch per precision, each in its own
process) writes the per-parameter table with FP8's gradient norm ratio and cosine near 1 for every parameter; bad
--seeds / --variant are refused in one line."""
import importlib.util
import os
import re

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "fp8_accuracy.py")


def _load():
    spec = importlib.util.spec_from_file_location("fp8_accuracy", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gradient_table(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the runs' FP8 on CPU: quant.py, not interpreted Triton
    out = tmp_path / "grads.md"
    _load().main(["--smoke", "--grads", "--out", str(out)])
    text = out.read_text()
    rows = re.findall(r"^\| `([^`]+)` \| ([0-9.e+-]+) \| ([0-9.]+) \| ([0-9.]+) \|$", text, re.M)
    names = {r[0] for r in rows}
    assert "output_layer.weight" in names and any("experts.weight1" in n for n in names), names
    for name, norm, ratio, cos in rows:
        # the tiny model's FP8 gradients: norms within ~15% (the routers' the farthest), cosines > 0.9; an FP8 path
        # that dropped or double-counted one of the 2 micro-batches gives ratios near 0.5 / 1.5, one that mixed the
        # experts' tokens cosines far lower
        assert float(norm) > 0 and abs(float(ratio) - 1) < 0.25 and float(cos) > 0.9, (name, ratio, cos)
    assert "lowest cosine per kind of parameter: " in text and "routed experts" in text
    # expert by expert, beside the routing: every MoE layer's two expert weights, the counts adding up
    per_expert = re.findall(r"^\| `([^`]+experts\.weight[12])` \| (\d+) / (\d+) \|.*\| (\d+) of (\d+) \|$", text, re.M)
    assert len(per_expert) == 2 * sum("router.weight" in n for n in names) > 0, per_expert
    assert all(int(s) + int(c) > 0 and int(moved) <= int(total) for _, s, c, moved, total in per_expert)


@pytest.mark.parametrize("args, msg", [(["--seeds", "1,1"], "different seeds"), (["--seeds", "x"], "integers"),
                                       (["--variant", "x"], "NAME=FLAGS"), (["--variant", "FP8=--seed 1"], "new name"),
                                       (["--grads", "--rerun"], "for training runs")])
def test_bad_flags_are_refused(capsys, args, msg):
    with pytest.raises(SystemExit):
        _load().main(args)
    err = capsys.readouterr().err
    assert msg in err and err.strip().splitlines()[-1].startswith("fp8_accuracy.py: error: ")


def test_a_failed_training_run_loses_no_other(tmp_path, monkeypatch):
    """A run that fails (a variant with a flag the trainer refuses) is named in the table and the exit status, and
    the other runs' curves are still written (on the GPU machine one failed run of six lost all six)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "acc.md"
    with pytest.raises(SystemExit, match=r"failed: broken s1234 \(rc 2\)"):
        _load().main(["--smoke", "--variant", "broken=--no-such-flag", "--rerun", "--out", str(out)])
    text = out.read_text()
    assert "broken s1234 FAILED (rc 2)" in text and "seed 1234: FP8 relative to BF16 **" in text
    # --rerun: BF16 once more, the same seed and flags: on CPU the same numbers (on the GPU not: the spread it shows)
    assert "- run to run (seed 1234 and every flag the same): BF16 again relative to BF16 +0.000%" in text, text
    steps = re.findall(r"^\| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([+-][0-9.]+%) \|$", text, re.M)
    assert [int(s[0]) for s in steps] == [2, 4, 6], text
