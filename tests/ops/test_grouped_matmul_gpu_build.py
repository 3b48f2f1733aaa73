"""The GPU build of grouped_matmul (`python -m tfweave.ops.build --gpu yes` runs the same
`build_family(..., gpu=True)`) compiles the CUDA kernels into `_grouped_matmul_ops_gpu.so` (never
run here: there is no GPU), or says clearly that it cannot because there is no nvcc."""

import json
import subprocess
from pathlib import Path

import pytest

from tfweave.ops.build import OpFamily, TensorFlowBuildInfo, build_family, find_nvcc

REPO_ROOT = Path(__file__).resolve().parents[2]
FAMILY = OpFamily("grouped_matmul", REPO_ROOT / "tf_ops" / "grouped_matmul")


def _dynamic_symbols(library: Path) -> str:
    return subprocess.run(["nm", "-D", "-C", str(library)], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.slow  # compiles the family's C++ sources once more, with GOOGLE_CUDA
def test_gpu_build_compiles_the_cuda_kernels_or_reports_missing_nvcc(tmp_path,
                                                                     grouped_matmul_library):
    out_dir = tmp_path / "lib"
    tf_info = TensorFlowBuildInfo.from_installed()
    if find_nvcc() is None:
        with pytest.raises(RuntimeError, match="no nvcc was found .*NVCC"):
            build_family(FAMILY, out_dir, tf_info, gpu=True)
        assert not (out_dir / "_grouped_matmul_ops_gpu.so").exists()
        return

    library = build_family(FAMILY, out_dir, tf_info, gpu=True, jobs=2)
    assert library == out_dir / "_grouped_matmul_ops_gpu.so" and library.exists()
    record = json.loads((out_dir / (library.name + ".json")).read_text())
    assert record["gpu"] is True and record["family"] == "grouped_matmul"

    symbols = _dynamic_symbols(library)
    defined = [line for line in symbols.splitlines() if " U " not in line]
    # The CUDA launchers are defined in the library, and the CUDA runtime registers its fat
    # binary (the compiled GPU kernels) when the library loads.
    for launcher in ["LaunchGroupedMatMulGpu<float>",
                     "LaunchGroupedMatMulGpu<tensorflow::functor::HalfBits>",
                     "LaunchGroupedMatMulWeightGradGpu<float>", "LaunchGroupedLayerNormGpu",
                     "LaunchFusedAttentionGpu"]:
        assert any(launcher in line for line in defined), launcher
    assert "__cudaRegisterFatBinary" in symbols
    # The GPU op kernels (registered for DEVICE_GPU) are in it: their class names appear.
    raw = library.read_bytes()
    for kernel in [b"GroupedMatMulKernel", b"FusedAttentionKernel"]:
        assert kernel in raw  # the __global__ kernels' names, in the fat binary
    for op_class in [b"GroupedMatMulOp<GPUDevice", b"FusedAttentionOp<GPUDevice"]:
        assert op_class in raw  # the GPU OpKernel registrations' class names

    # The CPU library has none of this.
    cpu_symbols = _dynamic_symbols(grouped_matmul_library)
    assert "LaunchGroupedMatMulGpu" not in cpu_symbols
    assert "LaunchFusedAttentionGpu" not in cpu_symbols
