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


def test_parallel_runs_are_packed_into_waves_that_fit_the_device():
    """--parallel on a GPU: runs go in waves whose memory estimates (+ a per-process overhead) fit the device; the
    H200 call that started six proxy-1gpu runs at once (BF16 ~30 GiB, FP8 ~31 by the estimate) lost two to an
    out-of-memory error: now four, then two. Off CUDA: one wave."""
    mod = _load()
    runs = [(f"{k} s{s}", s, ["--fp8"] if k != "BF16" else []) for s in (1234, 1235) for k in ("BF16", "FP8", "V")]
    est = lambda extra: 31.3 if extra else 30.0
    waves = mod._waves(runs, est, 139.8)
    assert [len(w) for w in waves] == [4, 2] and [r for w in waves for r in w] == runs
    assert mod._waves(runs, est, None) == [runs]
    assert [len(w) for w in mod._waves(runs, lambda extra: 200.0, 139.8)] == [1] * 6    # too big: one at a time
    # the estimate the waves use is the trainer's own (training/memory.py) for the run's flags
    flags = "--preset proxy-1gpu --num-layers 4 --seq-length 1024 --mtp-num-layers 1 --micro-batch-size 4".split()
    assert 25 < mod._estimate(flags) < mod._estimate(flags + ["--fp8", "--fp8-backend", "native"]) < 40
