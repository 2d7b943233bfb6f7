"""The README's plain-loop example runs as printed."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_plain_loop_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("### Without Lightning") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1"]
    assert "'encoder/cka_to_reference'" in lines[1] and "'encoder/num_samples': 512.0" in lines[1]
