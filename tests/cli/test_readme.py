"""README's DP example runs as printed and prints ε."""
import re
import subprocess
import sys

from support.common import ROOT


def test_readme_dp_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Differential privacy", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code.replace("range(2)", "range(1)"))   # one epoch is enough here
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    eps = [float(m) for m in re.findall(r"ε = ([0-9.]+)", proc.stdout)]
    assert len(eps) == 1 and 0 < eps[0] < 10, proc.stdout


def test_readme_peft_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Hugging Face and PEFT", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stdout
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()


def test_readme_split_example_runs_and_prints_its_epsilon(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Split learning", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"```\n(step.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stdout
    eps = re.findall(r"ε = ([0-9]+)", proc.stdout)
    assert eps == re.findall(r"ε = ([0-9]+)", printed) and len(eps) == 2, (proc.stdout, printed)
