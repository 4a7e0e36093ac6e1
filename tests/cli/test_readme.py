"""README's examples run as printed and print what README says they do."""
import re
import subprocess
import sys

from support.common import ROOT


def _run_first_block(heading: str, tmp_path, edit=lambda code: code):
    """(stdout, section) of the first ```python block under README's ``heading``, run as a script
    from ``tmp_path`` (after ``edit``)."""
    section = (ROOT / "README.md").read_text().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(edit(code))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, section


def test_readme_dp_example_runs(tmp_path):
    out, _ = _run_first_block("## Differential privacy", tmp_path,
                              lambda code: code.replace("range(2)", "range(1)"))   # one epoch is enough here
    eps = [float(m) for m in re.findall(r"ε = ([0-9.]+)", out)]
    assert len(eps) == 1 and 0 < eps[0] < 10, out


def test_readme_peft_example_runs(tmp_path):
    out, _ = _run_first_block("## Hugging Face and PEFT", tmp_path)
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0], out
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()


def test_readme_split_example_runs_and_prints_its_epsilon(tmp_path):
    out, section = _run_first_block("## Split learning", tmp_path)
    printed = re.search(r"```\n(step.*?)```", section, re.S).group(1)
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", out)]
    assert len(losses) == 3 and losses[-1] < losses[0], out
    eps = re.findall(r"ε = ([0-9]+)", out)
    assert eps == re.findall(r"ε = ([0-9]+)", printed) and len(eps) == 2, (out, printed)


def test_readme_trainer_example_runs_and_ends_at_its_target_epsilon(tmp_path):
    out, _ = _run_first_block("## With Hugging Face Trainer", tmp_path)
    eps = [float(m) for m in re.findall(r"ε = ([0-9.]+) at δ", out)]
    assert len(eps) == 1 and 7.2 < eps[0] <= 8.0, out
