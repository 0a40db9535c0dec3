"""patches/: every patch names its Megatron-LM tag, commit and reason; the apply script is valid bash, refuses a
directory that is not Megatron-LM, and (when MEGATRON_LM_PATH points at a core_v0.16.1 checkout) applies cleanly."""
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APPLY = os.path.join(ROOT, "patches", "apply.sh")


def test_patch_headers_name_release_commit_and_reason():
    patches = sorted(glob.glob(os.path.join(ROOT, "patches", "*", "*.patch")))
    assert patches
    for p in patches:
        head = open(p).read().split("\n--- ", 1)[0]
        release = os.path.basename(os.path.dirname(p))
        assert release in head and re.search(r"commit [0-9a-f]{40}", head) and "Why:" in head, p


def test_apply_script():
    subprocess.run(["bash", "-n", APPLY], check=True)
    r = subprocess.run(["bash", APPLY, ROOT, "--check"], capture_output=True, text=True)
    assert r.returncode == 2 and "does not look like a Megatron-LM checkout" in r.stdout


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_PATH"), reason="set MEGATRON_LM_PATH to a core_v0.16.1 checkout")
def test_patches_apply_to_megatron_lm(tmp_path):
    src = os.environ["MEGATRON_LM_PATH"]
    dst = tmp_path / "mlm"
    dst.mkdir()
    shutil.copy(os.path.join(src, "pretrain_gpt.py"), dst / "pretrain_gpt.py")
    out = subprocess.run(["bash", APPLY, str(dst)], capture_output=True, text=True, check=True).stdout
    assert "applied" in out and "checked" in out
    again = subprocess.run(["bash", APPLY, str(dst)], capture_output=True, text=True, check=True).stdout
    assert "already applied" in again
