"""``python -m epmoe generate`` under torchrun: prompts spread over ranks, printed in order."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from epmoe.hf.tiny import save_tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def generate(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", "-m", "epmoe", "generate", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def hf_greedy(path, ids: list[int], n: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    return model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                          max_new_tokens=n)[0, len(ids):].tolist()


def test_prompts_file_over_two_ranks_matches_transformers(tmp_path):
    path = save_tiny_checkpoint("qwen2_moe", tmp_path / "m", seed=1)
    prompts = ["Hello", "Expert parallelism", "a", "MoE layers on CPU"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    p = generate(2, "--model", str(path), "--prompts-file", str(tmp_path / "p.txt"),
                 "--max-new-tokens", "6", "--force-cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 4
    for i, (line, text) in enumerate(zip(lines, prompts, strict=True)):
        m = re.match(rf"\[{i}\] \(rank {i % 2}\) {re.escape(repr(text))} -> .* \[([\d,]*)\]$",
                     line)
        assert m, line
        ids = list(text.encode())  # the byte tokenizer: token i is byte i
        assert [int(t) for t in m.group(1).split(",") if t] == hf_greedy(path, ids, 6)
    assert "EP=2 over 2 rank(s), gloo on cpu" in p.stdout


def test_prompt_ids_without_tokenizer_and_bad_input(tmp_path, capsys, monkeypatch):
    from epmoe.cli import main as cli_main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = save_tiny_checkpoint("mixtral", tmp_path / "m", seed=2, tokenizer=False)
    p = generate(2, "--model", str(path), "--prompt-ids", "1,2,3", "--prompt-ids", "9,8",
                 "--prompt-ids", "5", "--max-new-tokens", "4", "--force-cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    for i, ids in enumerate([[1, 2, 3], [9, 8], [5]]):
        want = ",".join(map(str, hf_greedy(path, ids, 4)))
        assert f"[{i}] (rank {i % 2}) '{','.join(map(str, ids))}' -> {want}\n" in p.stdout
    for args, message in [(["--prompt", "Hello"], "has no tokenizer: give prompts as --prompt-ids"),
                          (["--prompt-ids", "1,x"], "--prompt-ids takes comma-separated integers"),
                          ([], "no prompt: give --prompt, --prompt-ids, --prompts-file or "
                               "--prompt-ids-file"),
                          (["--prompt-ids", "1,300"], "token ids must lie in [0, 259)"),
                          (["--prompt-ids", "1", "--max-new-tokens", "0"],
                           "--max-new-tokens must be >= 1"),
                          (["--prompts-file", "/no/such/file"], "no such file")]:
        # (in this process: the command line's own handling, without a new interpreter)
        with pytest.raises(SystemExit) as exit_:
            cli_main(["generate", "--model", str(path), *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err


def test_id_lines_are_ids_never_text(tmp_path):
    """A --prompts-file line of comma-separated integers is refused (not read as text);
    --prompt-ids-file takes such lines as token ids."""
    from epmoe.cli.generate import _prompts

    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "m", seed=1)
    (tmp_path / "text.txt").write_text("Hello\n27674,12627,3\n")
    with pytest.raises(ValueError, match=r"line 2 is comma-separated integers .*"
                                         r"--prompt-ids-file"):
        _prompts(path, [], [], str(tmp_path / "text.txt"), None)
    (tmp_path / "ids.txt").write_text("1,2,3\n\n250, 7\n")
    _, prompts = _prompts(path, ["2024"], [], None, str(tmp_path / "ids.txt"))
    assert prompts == [("2024", list(b"2024")), ("1,2,3", [1, 2, 3]), ("250,7", [250, 7])]
