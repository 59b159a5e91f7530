"""The README's tour runs as written, and its two set-up commands are the ones CI uses."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_tour_runs(capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README tour", "exec"), scope)
    x0_hat, x_t, teacher, t = scope["x0_hat"], scope["x_t"], scope["teacher"], scope["t"]
    a, s = teacher.process.coefficients(t, x_t)
    # posterior mean (Gaussian conditioning) agrees with Tweedie applied to the exact score (handbook Eq. 7)
    torch.testing.assert_close(x0_hat, (x_t + s ** 2 * teacher.score(x_t, t)) / a, rtol=1e-10, atol=1e-12)
    assert "basics.tweedie" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()
