"""User journeys through the command-line tools, as a user runs them (each tool in its own process).

1. HF checkpoint -> `convert_checkpoint.py hf-to-mcore` -> `train --load` (no model flags: the model comes from the
   checkpoint) -> `--save` -> `mcore-to-hf`: with lr 0 and gamma 0 every tensor of the original comes back bit for
   bit, the MTP layer and the router bias included.
2. `--load` of a directory without a checkpoint is an error; of a missing directory a fresh start, said in one line.
3. `--save` holding another model's checkpoints is refused before training; one of this model is replaced, said.
4. `--load-hf DIR` alone: model, dtype and MTP depth from DIR, seq-length bounded by max_position_embeddings.
5. Model flags that disagree with the loaded checkpoint: one `error:` line naming the flag and both values.
6. A checkpoint trained with `--fp8` resumes in BF16 without the flag (said in one line), in FP8 with it.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGATRON_DSV3_DEBUG"):
        env.pop(k, None)
    return env


def run(*argv, ok=True, timeout=600):
    """A tool as a user runs it: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, *argv], env=_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    if ok and p.returncode != 0:
        pytest.fail(f"{' '.join(argv[:3])} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.returncode, p.stdout, p.stderr


def train(*flags, ok=True):
    return run("-m", "megatron_dsv3.train", "--cpu", "--no-progress-bar", "--eval-interval", "0", "--eval-iters", "0",
               "--generate-tokens", "0", *flags, ok=ok)


def _tensors(d):
    from safetensors import safe_open
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as s:
                out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """A random tiny DeepSeek-V3 as published (BF16, router bias F32, MTP layer) whose vocabulary holds the byte
    tokenizer's 262 ids."""
    from tests.checkpoint import conftest as C
    root = tmp_path_factory.mktemp("hf_journey")
    kw = dict(C.HF_KW)
    C.HF_KW["vocab_size"] = 320
    try:
        tensors, config, _ = C.random_hf_tensors(str(root))
    finally:
        C.HF_KW.clear()
        C.HF_KW.update(kw)
    return C.write_hf(str(root / "hf"), tensors, config)


def _data(tiny_data):
    prefix, cache = tiny_data
    return ["--data-path", prefix, "--data-cache-path", cache]


def test_convert_train_export_round_trip(hf_ckpt, tiny_data, tmp_path):
    mc, ck, back = str(tmp_path / "mcore"), str(tmp_path / "ckpt"), str(tmp_path / "back")
    run("tools/convert_checkpoint.py", "hf-to-mcore", hf_ckpt, mc)
    _, out, _ = train("--load", mc, "--save", ck, "--lr", "0", "--min-lr", "0", "--bias-update-rate", "0:0",
                      "--train-iters", "1", "--global-batch-size", "2", "--micro-batch-size", "2", "--seq-length", "32",
                      *_data(tiny_data))
    assert "loaded model weights from" in out and "starting at iteration 0" in out, out
    assert "bfloat16" in out, out                          # the checkpoint's dtype, not the CPU default
    assert f"saved checkpoint {ck}/iter_0000001" in out, out
    run("tools/convert_checkpoint.py", "mcore-to-hf", ck, back)
    want, got = _tensors(hf_ckpt), _tensors(back)
    assert set(got) == set(want), set(got) ^ set(want)
    assert any(".e_score_correction_bias" in k for k in want) and any(k.startswith("model.layers.2.") for k in want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    cfg = json.load(open(os.path.join(back, "config.json")))
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["vocab_size"] == 320


def test_load_of_a_directory_without_checkpoint_is_an_error(tiny_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a checkpoint")
    rc, out, err = train("--preset", "tiny", "--load", str(empty), "--train-iters", "1", *_data(tiny_data), ok=False)
    assert rc == 2 and err.strip().count("\n") == 0 and err.startswith("error: --load "), err
    assert "holds no checkpoint" in err and "Traceback" not in err + out
    # a missing directory: a fresh start, said in one line (Megatron-LM's behaviour)
    _, out, _ = train("--preset", "tiny", "--load", str(tmp_path / "nothing"), "--train-iters", "1",
                      "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "4", *_data(tiny_data))
    assert f"--load {tmp_path / 'nothing'} does not exist: starting from scratch" in out


def test_save_dir_of_another_model_is_refused_and_final_save_never_skipped(tiny_data, tmp_path):
    ck = str(tmp_path / "ckpt")
    base = ["--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "2",
            "--save", ck, *_data(tiny_data)]
    _, out, _ = train("--preset", "tiny", "--num-layers", "2", *base)
    assert f"saved checkpoint {ck}/iter_0000002" in out
    # the same --save, another model, the same final iteration: refused before training, nothing overwritten
    rc, out, err = train("--preset", "tiny", *base, ok=False)
    assert rc == 2 and "holds checkpoints of another model" in err and "num_layers 3 here, 2 there" in err, err
    assert "iteration" not in out
    # the same model, not loaded from it: trained, saved (replacing iteration 2), and said so
    _, out, _ = train("--preset", "tiny", "--num-layers", "2", "--seed", "5", *base)
    assert "already holds trainer checkpoint" in out and f"saved checkpoint {ck}/iter_0000002" in out, out


def test_load_hf_alone(tiny_data, tmp_path):
    """An HF checkpoint without its MTP layer (as transformers' save_pretrained writes one), float32."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from tests.checkpoint.conftest import HF_KW
    torch.manual_seed(0)
    hf = str(tmp_path / "hf")
    DeepseekV3ForCausalLM(DeepseekV3Config(**dict(HF_KW, vocab_size=320))).to(torch.float32).save_pretrained(hf)
    assert json.load(open(os.path.join(hf, "config.json"))).get("dtype", "float32") == "float32"
    _, out, _ = train("--load-hf", hf, "--train-iters", "1", "--global-batch-size", "2", "--micro-batch-size", "2",
                      *_data(tiny_data))
    assert "holds no MTP layer" in out and "MTP is off" in out, out
    assert "loaded Hugging Face weights" in out and "float32" in out, out
    assert "x 256 tokens" in out, out                      # seq-length: max_position_embeddings (256), not 4096


def test_model_flags_disagreeing_with_the_checkpoint(tiny_data, tmp_path):
    ck = str(tmp_path / "ckpt")
    base = ["--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "4", *_data(tiny_data)]
    train("--preset", "tiny", "--train-iters", "1", "--save", ck, *base)
    rc, out, err = train("--load", ck, "--hidden-size", "256", "--train-iters", "2", *base, ok=False)
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert err.startswith(f"error: --load {ck} holds another model than the model flags say: --hidden-size 256 "
                          f"(checkpoint: 128)"), err
    # the checkpoint's model without any model flag: resumes
    _, out, _ = train("--load", ck, "--train-iters", "2", *base)
    assert "resumed from" in out and "at iteration 1" in out, out


@pytest.mark.parametrize("flags, message", [
    (["--data-path", "/nonexistent/corpus"], "error: --data-path /nonexistent/corpus: /nonexistent/corpus.bin does not exist"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], "error: --global-batch-size 6 is not divisible by"),
    (["--fp8-backend", "native"], "error: --fp8-backend native needs --fp8"),
    (["--fp8-bf16-modules", "experts"], "error: --fp8-bf16-modules experts needs --fp8"),
    (["--fp8", "--fp8-backend", "native", "--fp8-bf16-modules", "experts,mlp"],
     "error: --fp8-bf16-modules experts,mlp: unknown module(s) mlp; choose from linear_q_down_proj"),
    (["--bias-update-rate", "fast"], "error: schedule 'fast': expected"),
    (["--tokenizer", "/nonexistent/tok.json"], "error: --tokenizer /nonexistent/tok.json: no such file"),
    (["--hf-config", "/nonexistent/config.json"], "error: "),
])
def test_user_mistakes_are_one_line(flags, message, tiny_data):
    prefix, cache = tiny_data
    rc, out, err = train("--preset", "tiny", "--train-iters", "1", "--data-path", prefix, "--data-cache-path", cache,
                         *flags, ok=False)
    assert rc == 2 and err.strip().count("\n") == 0 and err.startswith("error: "), err
    assert message in err and "Traceback" not in out + err, err


def test_fp8_trains_and_says_which_gemms(tiny_data, tmp_path):
    """--fp8 trains (native FP8 GEMMs here: no Transformer Engine on a CPU), the banner and TensorBoard say which
    GEMMs run in FP8, and the loss stays close to the BF16 run's (same data, seed)."""
    base = ["--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "4",
            "--train-iters", "3", "--log-interval", "1", *_data(tiny_data)]
    _, out, _ = train(*base, "--fp8", "--fp8-backend", "native", "--tensorboard-dir", str(tmp_path / "tb"))
    assert "FP8: native backend" in out and "routed experts" in out and "BF16: embedding, output_layer" in out, out
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))
    _, ref, _ = train(*base)
    loss = lambda text: [float(l.split("| loss ")[1].split()[0]) for l in text.splitlines() if "| loss " in l]  # noqa
    fp8, bf16 = loss(out), loss(ref)
    assert len(fp8) == len(bf16) == 3 and all(abs(a - b) < 0.02 * b for a, b in zip(fp8, bf16)), (fp8, bf16)
    # --fp8-bf16-modules: those stay BF16 (an ablation of where FP8's error comes from), the banner says so
    _, out, _ = train(*base, "--fp8", "--fp8-backend", "native", "--fp8-bf16-modules", "experts,shared_experts")
    banner = [l for l in out.splitlines() if "FP8: native backend" in l]
    assert banner and "routed experts" not in banner[0].split("BF16:")[0], banner
    assert banner[0].split("BF16:")[1].strip().endswith("experts, shared_experts"), banner


def test_fp8_is_the_runs_choice_on_resume(tiny_data, tmp_path):
    """Precision is not architecture: the checkpoint's dsv3_config.json records FP8, but the resumed run's flags
    decide (as Megatron-LM's per-run --fp8-format). Without --fp8: BF16 and one line saying so; with it: FP8."""
    ck = str(tmp_path / "ckpt")
    base = ["--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "4",
            "--log-interval", "1", *_data(tiny_data)]
    fp8 = ["--fp8", "--fp8-backend", "native"]
    _, out, _ = train(*base, *fp8, "--train-iters", "1", "--save", ck)
    assert "FP8: native backend" in out, out
    with open(os.path.join(ck, "iter_0000001", "dsv3_config.json")) as f:
        assert json.load(f)["fp8"]["enabled"] is True          # what the loaded model config carries
    _, out, _ = train(*base, "--train-iters", "2", "--load", ck)
    assert "resumed from" in out and "FP8: native backend" not in out, out
    said = [l for l in out.splitlines() if "trained with --fp8" in l]
    assert len(said) == 1 and "this run trains in BF16" in said[0] and "add --fp8" in said[0], out
    _, out, _ = train(*base, *fp8, "--train-iters", "2", "--load", ck)
    assert "resumed from" in out and "FP8: native backend" in out and "trained with --fp8" not in out, out


def test_corrupt_checkpoint_is_one_line(tiny_data, tmp_path):
    ck = tmp_path / "ckpt"
    base = ["--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "4",
            *_data(tiny_data)]
    train(*base, "--train-iters", "1", "--save", str(ck))
    for f in (ck / "iter_0000001").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    rc, out, err = train(*base, "--train-iters", "2", "--load", str(ck), ok=False)
    # one line, no traceback (megatron-core >= 0.17 logs a DDP layout warning to stderr before it: not ours)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err and last.startswith(f"error: --load {ck}"), err
    assert "EOFError" in last or "UnpicklingError" in last or "damaged" in last, last    # the cause, not a wrapper
    # --debug: the traceback for a bug report
    rc, out, err = train(*base, "--train-iters", "2", "--load", str(ck), "--debug", ok=False)
    assert rc != 0 and "Traceback" in err
