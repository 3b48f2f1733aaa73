"""GPU libraries: every op family's DEVICE_GPU registrations compile (nvcc present), and the
loader picks the GPU build only where a GPU is visible. Nothing GPU runs here: no GPU."""

import subprocess
from pathlib import Path

import pytest

from tfweave import ops
from tfweave.ops.build import OpFamily, TensorFlowBuildInfo, build_family, find_nvcc

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_loader_uses_the_gpu_library_only_where_a_gpu_is_visible(tmp_path, monkeypatch):
    monkeypatch.setenv("TFWEAVE_OPS_DIR", str(tmp_path))
    (tmp_path / "_demo_ops.so").write_bytes(b"")
    assert ops.library_path("demo", gpu=True) == tmp_path / "_demo_ops.so"  # no GPU build yet
    (tmp_path / "_demo_ops_gpu.so").write_bytes(b"")
    assert ops.library_path("demo", gpu=True) == tmp_path / "_demo_ops_gpu.so"
    assert ops.library_path("demo", gpu=False) == tmp_path / "_demo_ops.so"
    monkeypatch.setattr(ops, "gpu_visible", lambda: False)
    assert ops.library_path("demo") == tmp_path / "_demo_ops.so"


@pytest.mark.slow  # compiles the invoke family once more, with GOOGLE_CUDA
def test_invoke_gpu_registration_compiles_or_missing_nvcc_is_reported(tmp_path):
    family = OpFamily("invoke", REPO_ROOT / "tf_ops" / "invoke")
    tf_info = TensorFlowBuildInfo.from_installed()
    if find_nvcc() is None:
        with pytest.raises(RuntimeError, match="no nvcc was found"):
            build_family(family, tmp_path, tf_info, gpu=True)
        return
    library = build_family(family, tmp_path, tf_info, gpu=True, jobs=2)
    # Registering a kernel for DEVICE_GPU imports that symbol from libtensorflow_framework; the
    # GPU build of invoke does, the CPU build does not.
    assert "tensorflow::DEVICE_GPU" in _imported_symbols(library)
    cpu_library = build_family(family, tmp_path / "cpu", tf_info, gpu=False, jobs=2)
    assert "tensorflow::DEVICE_GPU" not in _imported_symbols(cpu_library)
    assert "tensorflow::DEVICE_CPU" in _imported_symbols(cpu_library)


def _imported_symbols(library: Path) -> set[str]:
    listing = subprocess.run(["nm", "-D", "-C", "--undefined-only", str(library)],
                             capture_output=True, text=True, check=True).stdout
    return {line.split(None, 1)[1] for line in listing.splitlines() if line.strip()}
