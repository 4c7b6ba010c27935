"""Build-system tests that need no GPU: setup.py / CMakeLists.txt / pyproject.toml and import fallbacks."""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("spiel_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only: setup() runs under __main__
    return module


# ---- csrc/SOURCES is the one list ---------------------------------------------------------------------------

def test_sources_file_parsing(setup_py, tmp_path):
    (tmp_path / "csrc").mkdir()
    for name in ("a.cpp", "b.cu"):
        (tmp_path / "csrc" / name).write_text("")
    sources = tmp_path / "csrc" / "SOURCES"
    sources.write_text("# comment\ncsrc/a.cpp\n\n  csrc/b.cu   # trailing comment\n")
    assert setup_py.read_sources(sources) == ["csrc/a.cpp", "csrc/b.cu"]
    sources.write_text("csrc/a.cpp\ncsrc/missing.cu\n")
    with pytest.raises(RuntimeError, match="missing.cu"):
        setup_py.read_sources(sources)
    assert setup_py.read_sources(sources, check_exists=False) == ["csrc/a.cpp", "csrc/missing.cu"]
    sources.write_text("# nothing\n")
    with pytest.raises(RuntimeError, match="no sources"):
        setup_py.read_sources(sources)


def test_real_sources_list(setup_py):
    sources = setup_py.read_sources(check_exists=False)
    assert "csrc/bindings.cpp" in sources and "csrc/merge.cu" in sources
    for s in sources:
        assert s.startswith("csrc/") and s.endswith((".cpp", ".cu")), s


def test_cmake_reads_the_same_sources_file():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert 'file(STRINGS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/SOURCES"' in text
    # no source is listed by hand in CMakeLists.txt (comments aside)
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert ".cu " not in code and ".cu\"" not in code and "bindings.cpp" not in code
    assert "SPIEL_CUDA_ARCHS" in text and "Python_add_library(_C MODULE" in text


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_source_parsing_matches_setup(setup_py, tmp_path):
    """Run CMakeLists.txt's SOURCES-parsing block in cmake script mode on the real file."""
    text = (ROOT / "CMakeLists.txt").read_text()
    start = text.index('file(STRINGS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/SOURCES"')
    end = text.index("endforeach()", start) + len("endforeach()")
    block = text[start:end].replace("${CMAKE_CURRENT_SOURCE_DIR}", str(ROOT))
    block = block.replace('message(FATAL_ERROR "csrc/SOURCES lists ${_line}, which does not exist")', "")
    script = tmp_path / "parse.cmake"
    script.write_text(block + '\nforeach(s IN LISTS SPIEL_SOURCES)\n  message(STATUS "SRC ${s}")\nendforeach()\n')
    out = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, check=True)
    got = [line.split("SRC ", 1)[1] for line in (out.stdout + out.stderr).splitlines() if "SRC " in line]
    assert got == [str(ROOT / s) for s in setup_py.read_sources(check_exists=False)]


# ---- environment switches --------------------------------------------------------------------------------

def test_cuda_archs(setup_py, monkeypatch):
    monkeypatch.delenv("SPIEL_CUDA_ARCHS", raising=False)
    assert setup_py.parse_cuda_archs() == ["8.0", "9.0a"]
    assert setup_py.cuda_arch_flags(setup_py.parse_cuda_archs()) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("SPIEL_CUDA_ARCHS", "9.0a")
    assert setup_py.cuda_arch_flags(setup_py.parse_cuda_archs()) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert setup_py.cuda_arch_flags(setup_py.parse_cuda_archs("8.0, 8.6+PTX")) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_86,code=compute_86"]
    assert setup_py.cuda_arch_flags(["10.0"]) == ["-gencode=arch=compute_100,code=sm_100"]
    for bad in ("sm_90", "90", "9.0b", "9"):
        with pytest.raises(ValueError):
            setup_py.parse_cuda_archs(bad)


def test_sm90a_define_follows_the_arch_list(setup_py):
    assert setup_py.arch_defines(setup_py.parse_cuda_archs("8.0;9.0a")) == ["-DSPIEL_BUILD_SM90A"]
    assert setup_py.arch_defines(setup_py.parse_cuda_archs("9.0a+PTX")) == ["-DSPIEL_BUILD_SM90A"]
    assert setup_py.arch_defines(setup_py.parse_cuda_archs("8.0;9.0")) == []


def test_default_max_jobs(setup_py):
    jobs = setup_py.default_max_jobs()
    assert 1 <= jobs <= (os.cpu_count() or 1)


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_find_cuda_home(setup_py, monkeypatch, tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-99.0")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup_py.find_cuda_home() == str(toolkit.resolve())
    # nvcc on PATH that is a symlink into a toolkit: the toolkit
    monkeypatch.delenv("CUDA_HOME")
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(link_dir))
    assert setup_py.find_cuda_home() == str(toolkit.resolve())
    # nvcc on PATH that is a wrapper script outside any toolkit (like /usr/local/bin/nvcc): never its parent
    wrapper_root = tmp_path / "wrapper"
    (wrapper_root / "bin").mkdir(parents=True)
    (wrapper_root / "bin" / "nvcc").write_text(f"#!/bin/sh\nexec {toolkit}/bin/nvcc \"$@\"\n")
    (wrapper_root / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", str(wrapper_root / "bin"))
    found = setup_py.find_cuda_home()
    assert found != str(wrapper_root)
    assert found == (str(Path("/usr/local/cuda").resolve()) if setup_py._is_toolkit("/usr/local/cuda") else None)
    # a CUDA_HOME that is not a toolkit is ignored
    monkeypatch.setenv("CUDA_HOME", str(wrapper_root))
    assert setup_py.find_cuda_home() == found


def test_skip_cuda_build_switch(setup_py, monkeypatch):
    monkeypatch.setenv("SPIEL_SKIP_CUDA_BUILD", "1")
    assert setup_py.cuda_extensions() == ([], {})


def test_version_file(setup_py):
    assert setup_py.read_version() == "0.1.0"
    ns = {}
    exec((ROOT / "spiel" / "version.py").read_text(), ns)
    assert ns["__version__"] == "0.1.0"


def test_pyproject():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(data["build-system"]["requires"]) >= {"wheel", "ninja"}
    assert any(r.startswith("setuptools") for r in data["build-system"]["requires"])
    assert not any(r.startswith("torch") for r in data["build-system"]["requires"])
    project = data["project"]
    assert project["name"] == "spiel" and "version" in project["dynamic"]
    deps = " ".join(project["dependencies"])
    for dep in ("torch>=2.11", "safetensors", "tqdm", "numpy"):
        assert dep in deps
    extras = project["optional-dependencies"]
    assert set(extras["hf"]) == {"transformers", "peft"} and extras["bnb"] == ["bitsandbytes"]
    assert extras["bench"] == ["matplotlib"]
    assert project["scripts"]["spiel-finetune"] == "spiel.finetune.__main__:main"
    pytest_cfg = data["tool"]["pytest"]["ini_options"]
    assert pytest_cfg["testpaths"] == ["tests"]
    assert any(m.startswith("gpu:") for m in pytest_cfg["markers"])
    assert any(m.startswith("slow") for m in pytest_cfg["markers"])


# ---- the package without the extension --------------------------------------------------------------------

_BLOCK_C = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "spiel._C":
                raise ImportError("blocked for the test")
            return None
    sys.meta_path.insert(0, _Block())
""")


@pytest.mark.skipif(not (ROOT / "spiel" / "__init__.py").is_file(), reason="spiel/__init__.py not written yet")
def test_import_spiel_without_extension():
    code = _BLOCK_C + textwrap.dedent("""
        import spiel, spiel.ops
        from spiel.ops.backends import cuda
        assert not cuda.AVAILABLE and "spiel._C" in cuda.REASON, cuda.REASON
        info = spiel.ops.backend_info()["cuda"]
        assert not info["available"] and info["reason"] == cuda.REASON
        assert spiel.ops.backend_info()["torch"]["available"]
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


@pytest.mark.slow
def test_wheel_without_cuda(tmp_path):
    """SPIEL_SKIP_CUDA_BUILD=1: a pure-Python wheel with every spiel package and no extension."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "csrc", src / "csrc")
    shutil.copytree(ROOT / "spiel", src / "spiel", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {**os.environ, "SPIEL_SKIP_CUDA_BUILD": "1"}
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "installing without the CUDA extension" in out.stdout + out.stderr
    wheels = list((tmp_path / "dist").glob("spiel-0.1.0-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "spiel/version.py" in names and "spiel/ops/_dispatch.py" in names
    assert "spiel/ops/backends/cuda.py" in names
    assert not any(n.endswith(".so") for n in names)
    packages = {str(p.parent.relative_to(src)).replace(os.sep, "/") for p in (src / "spiel").rglob("__init__.py")}
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, pkg
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "spiel-finetune = spiel.finetune.__main__:main" in zipfile.ZipFile(wheels[0]).read(entry_points).decode()
