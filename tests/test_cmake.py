"""The CMake build keeps its GPU targets when configured again in the same
folder (what an editable install's rebuild, or a second `pip install -e .`,
does)."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def configure(build: str, *defines: str) -> list[str]:
    run = subprocess.run(
        ["cmake", "-S", ROOT, "-B", build, "-DTOKENMILL_BUILD_PYTHON=OFF", *defines],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    found = re.search(r"tokenmill: CUDA kernels for sm (\S+)", run.stdout)
    assert found, run.stdout[-2000:]
    flags = open(os.path.join(build, "CMakeFiles", "tokenmill_cuda.dir", "flags.make")).read()
    built = sorted(set(re.findall(r"arch=compute_(\w+)", flags)))
    assert built == sorted(found.group(1).split(";")), (built, found.group(1))
    return built


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_reconfiguring_keeps_the_cuda_architectures(tmp_path):
    build = str(tmp_path / "build")
    first = configure(build, "-DTOKENMILL_CUDA=ON")
    assert {"80", "89", "90a"} <= set(first)
    assert configure(build, "-DTOKENMILL_CUDA=ON") == first
    # the option of its own narrows them, and widens them again when cleared
    assert configure(build, "-DTOKENMILL_CUDA_ARCHS=90a") == ["90a"]
    assert configure(build, "-DTOKENMILL_CUDA_ARCHS=") == first
