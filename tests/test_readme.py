import re


def test_ci_runs_exactly_the_readme_test_command(repo_root):
    readme = (repo_root / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    setup = [b for b in blocks[:2]]
    assert len(setup) == 2 and "pytest" in setup[1]
    ci = (repo_root / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci == setup[1]
