"""llama.cpp's own tools, from the registry package llama-cpp-python: its converter, quantiser and runtime.

The runtime (`llama_cpp`) and `llama_model_quantize` come from the installed llama-cpp-python wheel
(the `[gguf]` extra). The converter, `convert_hf_to_gguf.py` with its `conversion/` package and its own
`gguf-py`, is not part of that wheel: it ships only in the package's source archive, which vendors the
same llama.cpp commit. `make setup` downloads that archive once (pip's cache keeps it) and
`install_converter` copies those three parts to `<venv>/share/chattune/llama.cpp/`, stamped with the
version, so an export runs offline and converter and runtime always come from the same llama.cpp.

The converter runs as a subprocess: its `gguf-py` (newer than the `gguf` chattune pins for reading
GGUF files) goes first on that process's sys.path only, as the script itself arranges.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from chattune.errors import ChattuneError, MissingDependencyError, ModelError, extra_pip, require
from chattune.files import atomic_dir, write_bytes, write_text

PACKAGE = "llama-cpp-python"
SCRIPT = "convert_hf_to_gguf.py"
_PARTS = (SCRIPT, "conversion/", "gguf-py/")
_ENV = "CHATTUNE_LLAMA_CPP"  # a folder holding convert_hf_to_gguf.py (a llama.cpp checkout) overrides the default


def runtime_version() -> str:
    """The installed llama-cpp-python version; MissingDependencyError (exit 2, with the pip command) if absent."""
    require("llama_cpp", extra="gguf", needed_for="chattune export (GGUF conversion, quantisation, parity check)",
            package=PACKAGE, note="builds llama.cpp from source once, about 10 minutes on 2 cores; pip keeps the wheel")
    return metadata.version(PACKAGE)


def default_converter_dir() -> Path:
    """Where `install_converter` puts the converter: inside the active environment."""
    return Path(sys.prefix) / "share" / "chattune" / "llama.cpp"


def install_command(version: str) -> str:
    """The commands that put the converter of llama-cpp-python==version in place (what `make setup` runs)."""
    return (f"pip download --no-deps --no-binary :all: {PACKAGE}=={version} -d /tmp/lcp && "
            f"python -m chattune.export.llamacpp /tmp/lcp/llama_cpp_python-{version}.tar.gz")


def converter_dir() -> Path:
    """The converter folder matching the installed runtime; a ChattuneError naming the install command if not."""
    version = runtime_version()
    if os.environ.get(_ENV):
        folder = Path(os.environ[_ENV]).expanduser()
        if not (folder / SCRIPT).is_file():
            raise MissingDependencyError(SCRIPT, pip=install_command(version), where=f"{_ENV}={folder}",
                                         what=f"{_ENV} points to a folder without {SCRIPT}")
        return folder
    folder = default_converter_dir()
    stamp = folder / "VERSION"
    found = stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else None
    if found != version:
        what = (f"llama.cpp's converter ({SCRIPT}) is not installed" if found is None else
                f"llama.cpp's converter is from {PACKAGE} {found} but the runtime is {version}")
        raise MissingDependencyError(SCRIPT, pip=install_command(version), where=str(folder), what=what,
                                     note=f"`make setup` does this; or point {_ENV} at a llama.cpp checkout")
    return folder


def install_converter(sdist: str | Path, dest: str | Path | None = None) -> Path:
    """Copy convert_hf_to_gguf.py, conversion/ and gguf-py/ out of a llama-cpp-python source archive."""
    sdist = Path(sdist)
    m = re.match(r"llama_cpp_python-(.+)\.tar\.gz$", sdist.name)
    if not m or not sdist.is_file():
        raise ChattuneError("not a llama-cpp-python source archive", where=str(sdist),
                            fix=f"pass the llama_cpp_python-X.Y.Z.tar.gz that `{install_command('X.Y.Z')}` downloads")
    dest = Path(dest) if dest else default_converter_dir()
    with tarfile.open(sdist) as tar, atomic_dir(dest) as tmp:
        copied = 0
        for member in tar.getmembers():
            rel = member.name.split("/vendor/llama.cpp/", 1)[-1] if "/vendor/llama.cpp/" in member.name else None
            if rel and member.isfile() and rel.startswith(_PARTS) and ".." not in Path(rel).parts:
                write_bytes(tmp / rel, tar.extractfile(member).read())
                copied += 1
        if not (tmp / SCRIPT).is_file():
            raise ChattuneError(f"{sdist.name} holds no vendor/llama.cpp/{SCRIPT}", where=str(sdist),
                                fix=f"use a {PACKAGE} version that vendors llama.cpp (0.3.36 does)")
        write_text(tmp / "VERSION", m.group(1) + "\n")
    print(f"installed llama.cpp's converter from {sdist.name} ({copied} files) in {dest}")
    return dest


def supported_architectures(folder: Path) -> set[str]:
    """HF architecture names the converter knows (read from its source, without importing it)."""
    registry = folder / "conversion" / "__init__.py"
    if registry.is_file():  # newer llama.cpp: one table, TEXT_MODEL_MAP
        for node in ast.walk(ast.parse(registry.read_text(encoding="utf-8"))):
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "TEXT_MODEL_MAP":
                return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    text = (folder / SCRIPT).read_text(encoding="utf-8")  # older llama.cpp: @ModelBase.register("A", "B")
    return {name for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", text)
            for name in re.findall(r"\"([^\"]+)\"", args)}


def check_architecture(architectures: list[str], folder: Path, version: str, where: str) -> None:
    """ModelError unless the converter supports one of the model's architectures."""
    known = supported_architectures(folder)
    if not any(a in known for a in architectures):
        raise ModelError(
            f"llama.cpp's converter (from {PACKAGE} {version}) does not support the architecture "
            f"{', '.join(architectures) or '(none named)'}", where=where,
            fix=f"export a model llama.cpp supports, or a newer {PACKAGE} that adds it (`pip install -U {PACKAGE}` and "
                f"reinstall the converter); `chattune merge` still writes a safetensors folder for transformers or vLLM")


def convert(folder: Path, merged: Path, outfile: Path, outtype: str, log: Path) -> None:
    """Run llama.cpp's converter on a merged HF folder; its output goes to `log`."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the script then prefers its own gguf-py
    cmd = [sys.executable, str(folder / SCRIPT), str(merged), "--outfile", str(outfile), "--outtype", outtype]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(folder),
                          text=True, errors="replace")
    write_text(log, proc.stdout)
    if proc.returncode != 0 or not outfile.is_file():
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        hint = "pip install 'chattune[gguf]' (sentencepiece)" if "sentencepiece" in tail else "see the converter's output"
        raise ChattuneError(f"llama.cpp's converter failed (exit {proc.returncode}):\n{tail}", where=str(merged),
                            fix=hint)


def quantise(src: Path, dst: Path, ftype: int, name: str) -> None:
    """llama.cpp's quantiser (llama_model_quantize) from a 16-bit GGUF to `ftype`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise ChattuneError(f"llama.cpp's quantiser failed to make {name} (status {rc})", where=str(src),
                            fix="try another --quant; the 16-bit export (--quant f16) needs no quantiser")


@contextlib.contextmanager
def _no_repack() -> Iterator[None]:
    """Load with llama.cpp's `--no-repack` (model parameter use_extra_bufts=False): Llama() has no switch for it."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = defaults
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def open_model(path: Path, *, n_ctx: int, repack: bool = False) -> Any:
    """A llama_cpp.Llama for a GGUF on the CPU.

    repack=False by default: on this project's CPUs (AVX-512 + AMX) quantised files (q8_0, q4_k_m) crashed
    on the first decode in llama.cpp's extra CPU buffer types (the weights repacked for AMX / SIMD
    kernels); plain CPU buffers give the same answers (docs/export.md).
    """
    from llama_cpp import Llama

    with contextlib.nullcontext() if repack else _no_repack():
        return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, verbose=False, seed=0)


def pip_for_extra() -> str:
    """`pip install 'chattune[gguf]'`."""
    return extra_pip("gguf")


if __name__ == "__main__":  # python -m chattune.export.llamacpp SDIST [DEST]   (make setup)
    install_converter(*sys.argv[1:3])
