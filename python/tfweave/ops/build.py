"""Compiles every op family under ``tf_ops/`` against the installed TensorFlow.

Run as ``python -m tfweave.ops.build`` (``make ops`` does this); ``pip install -e .`` calls
:func:`build_all` from ``setup.py``. Each family ``tf_ops/<family>/`` follows the split in
STYLE.md (``ops/*.cc``, ``kernels/*.cc``, ``kernels/*_gpu.cu.cc``) and becomes one CPU library
``_<family>_ops.so`` beside this file, in ``lib/``. When ``nvcc`` exists, the family is also
compiled with ``GOOGLE_CUDA`` into ``_<family>_ops_gpu.so``: that library is only loaded on a
machine with a GPU, so on CPU-only machines it proves the CUDA code compiles.

Every library gets a sidecar ``<library>.json`` that records the TensorFlow version it was
built against; the loader refuses a library whose sidecar names another version.

This module must not import tensorflow at import time: ``setup.py`` loads it by path.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger("tfweave.ops.build")

REBUILD_COMMAND = "python -m tfweave.ops.build   (or: make ops)"
LIB_DIR = Path(__file__).resolve().parent / "lib"
CXX_FLAGS = ["-std=c++17", "-fPIC", "-O2", "-Wno-deprecated-declarations"]


def default_tf_ops_dir() -> Path:
    """The ``tf_ops/`` folder of the source tree this package was installed from."""
    return Path(__file__).resolve().parents[3] / "tf_ops"


@dataclass(frozen=True)
class OpFamily:
    name: str
    root: Path

    @property
    def cpu_sources(self) -> list[Path]:
        sources = sorted(self.root.glob("ops/*.cc")) + sorted(self.root.glob("kernels/*.cc"))
        return [s for s in sources if not s.name.endswith(".cu.cc")]

    @property
    def gpu_sources(self) -> list[Path]:
        return sorted(self.root.glob("kernels/*.cu.cc"))

    @property
    def headers(self) -> list[Path]:
        return sorted(self.root.rglob("*.h"))

    def library_name(self, gpu: bool = False) -> str:
        return f"_{self.name}_ops{'_gpu' if gpu else ''}.so"


def discover_families(tf_ops_dir: Path) -> list[OpFamily]:
    if not tf_ops_dir.is_dir():
        raise FileNotFoundError(
            f"no tf_ops/ folder at {tf_ops_dir}; build from a source checkout of tfweave")
    return [OpFamily(d.name, d) for d in sorted(tf_ops_dir.iterdir())
            if d.is_dir() and (d / "ops").is_dir()]


@dataclass(frozen=True)
class TensorFlowBuildInfo:
    version: str
    compile_flags: tuple[str, ...]
    link_flags: tuple[str, ...]
    include_dir: str

    @classmethod
    def from_installed(cls) -> "TensorFlowBuildInfo":
        # Imported here: tensorflow is heavy and setup.py loads this file before it is needed.
        import tensorflow as tf
        return cls(tf.__version__, tuple(tf.sysconfig.get_compile_flags()),
                   tuple(tf.sysconfig.get_link_flags()), tf.sysconfig.get_include())


def find_nvcc() -> str | None:
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _fingerprint(family: OpFamily, tf_info: TensorFlowBuildInfo, gpu: bool) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([tf_info.version, tf_info.compile_flags, tf_info.link_flags,
                              CXX_FLAGS, gpu]).encode())
    for path in family.cpu_sources + family.gpu_sources + family.headers:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def sidecar_path(library: Path) -> Path:
    return library.with_name(library.name + ".json")


def _run(cmd: list[str]) -> None:
    LOG.debug("%s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(cmd)}\n"
                           f"{result.stdout}{result.stderr}")


def cuda_home(nvcc: str) -> Path:
    """The CUDA toolkit that ``nvcc`` belongs to (its include/ and lib64/).

    ``nvcc`` may be a wrapper script (``/usr/local/bin/nvcc`` here execs
    ``/usr/local/cuda-13.0/bin/nvcc``), so its resolved path is not enough: ask nvcc itself
    (``-dryrun`` prints the directory it runs from) before falling back to the usual places.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  str(Path(nvcc).resolve().parents[1])]
    try:
        dryrun = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
        for line in (dryrun.stdout + dryrun.stderr).splitlines():
            if line.startswith("#$ _HERE_="):
                candidates.append(str(Path(line.split("=", 1)[1].strip()).parent))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate)
    raise RuntimeError(f"cannot find the CUDA toolkit of {nvcc} (no include/cuda_runtime.h in "
                       f"{', '.join(c for c in candidates if c)}); set CUDA_HOME")


def _gpu_defines(cuda: Path) -> list[str]:
    # nvcc's own CUDA headers go before TensorFlow's include dir: the wheel ships CUDA 12.5
    # headers under third_party/gpus/, and a CUDA 13 nvcc only accepts its own crt/ headers.
    return ["-DGOOGLE_CUDA=1", "-DEIGEN_USE_GPU", f"-I{cuda / 'include'}"]


def _nvcc_command(nvcc: str, source: Path, obj: Path, tf_info: TensorFlowBuildInfo,
                  repo_root: Path) -> list[str]:
    cuda = cuda_home(nvcc)
    # One real architecture plus its PTX (JIT-compiled on newer GPUs) keeps the build short;
    # TFWEAVE_CUDA_ARCH (e.g. "sm_80") picks another. sm_75 is the oldest CUDA 13 supports.
    arch = os.environ.get("TFWEAVE_CUDA_ARCH", "sm_75")
    return [nvcc, "-c", "-x", "cu", str(source), "-o", str(obj), "-std=c++17", "-O2",
            f"-arch={arch}", *_gpu_defines(cuda), "--expt-relaxed-constexpr",
            "-Xcompiler", "-fPIC", "-Wno-deprecated-gpu-targets",
            f"-I{repo_root}", *tf_info.compile_flags]


def build_family(family: OpFamily, out_dir: Path, tf_info: TensorFlowBuildInfo, *,
                 gpu: bool = False, force: bool = False, jobs: int = 2) -> Path:
    """Compiles one family into ``out_dir`` and returns the library path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / family.library_name(gpu)
    fingerprint = _fingerprint(family, tf_info, gpu)
    sidecar = sidecar_path(library)
    if not force and library.exists() and sidecar.exists():
        try:
            if json.loads(sidecar.read_text()).get("fingerprint") == fingerprint:
                LOG.info("%s is up to date", library.name)
                return library
        except json.JSONDecodeError:
            pass

    repo_root = family.root.parent.parent
    nvcc = find_nvcc() if gpu else None
    if gpu and nvcc is None:
        raise RuntimeError("a GPU build was asked for but no nvcc was found (set NVCC)")
    cuda = cuda_home(nvcc) if nvcc else None
    gpu_flags = _gpu_defines(cuda) if gpu else []
    with tempfile.TemporaryDirectory(prefix=f"tfweave-{family.name}-") as tmp:
        commands = []
        objects = []
        for source in family.cpu_sources:
            obj = Path(tmp) / (source.stem + ".o")
            objects.append(obj)
            commands.append([os.environ.get("CXX", "g++"), "-c", str(source), "-o", str(obj),
                             *CXX_FLAGS, f"-I{repo_root}", *gpu_flags, *tf_info.compile_flags])
        for source in family.gpu_sources if gpu else []:
            obj = Path(tmp) / source.name.replace(".cu.cc", ".cu.o")
            objects.append(obj)
            commands.append(_nvcc_command(nvcc, source, obj, tf_info, repo_root))
        LOG.info("compiling %s (%d sources)", library.name, len(commands))
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(_run, commands))
        link = [os.environ.get("CXX", "g++"), "-shared", "-o", str(Path(tmp) / library.name),
                *map(str, objects), *tf_info.link_flags]
        if gpu:
            link += [f"-L{cuda / 'lib64'}", "-lcudart"]
        _run(link)
        # Rename into place so a reader never sees a half-written library.
        staged = out_dir / (library.name + ".tmp")
        shutil.move(str(Path(tmp) / library.name), staged)
        os.replace(staged, library)
    staged_sidecar = sidecar.with_suffix(".tmp")
    staged_sidecar.write_text(json.dumps({
        "library": library.name, "family": family.name, "tensorflow": tf_info.version,
        "gpu": gpu, "fingerprint": fingerprint}, indent=1))
    os.replace(staged_sidecar, sidecar)
    LOG.info("built %s", library)
    return library


def build_all(tf_ops_dir: Path | None = None, out_dir: Path | None = None, *,
              gpu: str = "auto", force: bool = False, jobs: int = 2) -> list[Path]:
    """Builds every family's CPU library, and its GPU library when ``gpu`` allows.

    ``gpu`` is ``"auto"`` (when nvcc exists), ``"yes"`` or ``"no"``.
    """
    tf_ops_dir = tf_ops_dir or default_tf_ops_dir()
    out_dir = out_dir or LIB_DIR
    tf_info = TensorFlowBuildInfo.from_installed()
    want_gpu = gpu == "yes" or (gpu == "auto" and find_nvcc() is not None)
    built = []
    for family in discover_families(tf_ops_dir):
        built.append(build_family(family, out_dir, tf_info, force=force, jobs=jobs))
        # Every family gets a GPU library, CUDA kernels or not: its CPU sources hold the
        # DEVICE_GPU registrations under GOOGLE_CUDA, and those must compile too.
        if want_gpu:
            built.append(build_family(family, out_dir, tf_info, gpu=True, force=force,
                                      jobs=jobs))
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfweave.ops.build",
        description="Compile tfweave's C++/CUDA ops against the installed TensorFlow.")
    parser.add_argument("--tf-ops-dir", type=Path, default=None,
                        help="the tf_ops/ source folder (default: the source checkout's)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where libraries go (default: {LIB_DIR})")
    parser.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto",
                        help="also compile the CUDA kernels (auto: when nvcc exists)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    try:
        for library in build_all(args.tf_ops_dir, args.out_dir, gpu=args.gpu,
                                 force=args.force, jobs=args.jobs):
            print(library)
    except (RuntimeError, FileNotFoundError) as error:
        print(f"tfweave op build failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
