"""The README's set-up commands are the ones CI and newcomers run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Run the tests:", 1)[1]
    test_cmd = _bash_blocks(section)[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), "the test command in README.md and .ci/run must be the same line"


def test_readme_main_command_runs_the_demo():
    readme = (ROOT / "README.md").read_text()
    main_cmd = _bash_blocks(readme.split("Run the main job", 1)[1])[0]
    assert main_cmd.endswith("oprd demo") and "pip install" in main_cmd


def test_tests_and_workflows_stand_alone():
    """No test, fixture or CI workflow reads outside the repository (GitHub checks out the repo alone)."""
    offenders = []
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / ".github").rglob("*.yml"), ROOT / ".ci" / "run"]:
        text = path.read_text()
        # the project's shared folder sits beside the checkout; no test may reach it (spelled in pieces here
        # so that this file does not match the pattern it looks for)
        for needle in (".." + "/shared", "shared" + "/data", "OPRD_" + "SHARED_DATA"):
            if needle in text:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders
    for name in ("aime24.jsonl", "aime24_verl.parquet", "dapo_math_512_verl.parquet"):
        assert (ROOT / "tests" / "data" / name).is_file()
