"""The files operators run: docker-compose.yml and the `retort` console script."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_runs_the_documented_commands():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "redis", "postgres", "demo-target"} <= set(services)
    assert services["api"]["environment"]["RETORT_DATABASE_URL"].startswith("postgresql")
    assert services["worker"]["environment"]["RETORT_BROKER_URL"].startswith("redis://")
    retort = shutil.which("retort") or str(Path(sys.executable).parent / "retort")
    for name in ("api", "worker", "webhooks", "beat", "migrate"):
        cmd = services[name]["command"]
        assert cmd[0] == "retort"
        # Every subcommand and option the compose file names exists: --help parses them.
        words = []
        for arg in cmd[1:]:
            if arg.startswith("-"):
                break
            words.append(arg)
        out = subprocess.run([retort, *words, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, (cmd, out.stderr)
        for option in (a for a in cmd[1:] if a.startswith("--")):
            assert option in out.stdout, (cmd, option)


def test_console_script_lists_its_commands():
    retort = shutil.which("retort") or str(Path(sys.executable).parent / "retort")
    out = subprocess.run([retort, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("serve", "api", "worker", "db"):
        assert command in out.stdout
