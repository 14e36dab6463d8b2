"""onnxruntime sessions with segq's options: the providers and threads of the settings,
memory patterns and thread spinning off, float16 on CUDA when asked. ``create_session``
makes one; the worker's ``ModelRegistry`` keeps one per model file, shared by every
thread (``InferenceSession.run`` is thread-safe), rather than a copy of the weights each."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from config.errors import DependencyMissing, ModelIncompatible

try:
    import onnxruntime as ort
except ImportError:  # segq installed without an extra: producers need no onnxruntime
    raise DependencyMissing(
        "onnxruntime is not installed, and workers need it: pip install 'segq[cpu]', "
        "or 'segq[gpu]' on a machine with an NVIDIA GPU (CUDA 12/13)"
    ) from None
from config.settings import Settings

if TYPE_CHECKING:
    from worker.inference.maskhead import ChunkedDetr

log = logging.getLogger(__name__)

def usable_providers(wanted: Iterable[str]) -> list[str]:
    """``wanted`` in order, less the providers this onnxruntime build does not offer."""
    available = set(ort.get_available_providers())
    wanted = list(wanted)
    usable = [p for p in wanted if p in available]
    skipped = [p for p in wanted if p not in available]
    if skipped:
        log.info("onnxruntime offers no %s here; skipping", ", ".join(skipped))
    return usable or ["CPUExecutionProvider"]


def create_session(path: Path, settings: Settings) -> ort.InferenceSession:
    """A session for the model file ``path`` with the providers and threads of ``settings``."""
    source, providers = _source(Path(path), settings)
    return _create(source, providers, settings)


def create_detr_session(path: Path, settings: Settings) -> "ort.InferenceSession | ChunkedDetr":
    """A session for the DETR-panoptic file ``path``: with ``settings.detr_mask_chunk``, the
    file cut so that its mask head runs that many queries at a time (``maskhead``); a file
    that cannot be cut is loaded whole, and the log says why."""
    from worker.inference.maskhead import CannotChunk, load_chunked

    source, providers = _source(Path(path), settings)
    if settings.detr_mask_chunk > 0:
        try:
            session = load_chunked(
                source,
                lambda model: _create(model, providers, settings, path=source),
                chunk=settings.detr_mask_chunk,
            )
            log.info(
                "loaded %s on %s (asked for %s); its mask head runs %d queries at a time",
                source.name, provider(session), ", ".join(providers), session.chunk,
            )  # fmt: skip
            return session
        except CannotChunk as e:
            log.warning("%s: the mask head runs whole: %s", source.name, e)
    return _create(source, providers, settings)


def _source(path: Path, settings: Settings) -> tuple[Path, tuple[str, ...]]:
    """The file to load for ``path`` (its float16 copy when asked for on CUDA), and the
    providers to load it with."""
    providers = tuple(usable_providers(settings.providers))
    fp16 = settings.fp16 and providers[0] == "CUDAExecutionProvider"
    if settings.fp16 and not fp16:
        log.warning(
            "SEGQ_FP16 needs the CUDA provider; %s runs in float32 on %s",
            Path(path).name,
            providers[0],
        )
    return (float16_copy(path) if fp16 else path), providers


def float16_copy(path: Path, cache_dir: Optional[Path] = None) -> Path:
    """``path`` with its weights and arithmetic in float16 and its inputs and outputs still
    float32 (so callers feed and read the same arrays), converted once and kept beside the
    user's cache. Halves GPU memory and uses the tensor cores; CPU kernels mostly lack float16."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise ModelIncompatible(
            "SEGQ_FP16 needs onnxconverter-common: pip install 'segq[gpu]'"
        ) from None
    import onnx

    stat = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segq" / "fp16"
    target = root / f"{path.stem}-{tag}.onnx"
    if not target.exists():
        root.mkdir(parents=True, exist_ok=True)
        model = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        partial = target.with_suffix(".partial")
        onnx.save(model, str(partial))
        partial.replace(target)  # never a half-written model under the final name
        log.info("converted %s to float16 at %s", path.name, target)
    return target


def load_failure(path: Path, error: Exception) -> ModelIncompatible:
    """A model onnxruntime refused, said with the file's ONNX IR version and opsets beside
    onnxruntime's own version: a file newer than the runtime is fixed by upgrading it."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    # drop onnxruntime's "[ONNXRuntimeError] : 1 : FAIL : file.h:46 void f(...) " prefix
    source = re.search(r"\.(?:h|cc|cpp):\d+ .*?\)\s(?=\S)", reason)
    reason = reason[source.end():] if source else reason
    versions = model_versions(path)
    message = f"onnxruntime {ort.__version__} cannot load {path}: {reason[:300]}"
    details: dict = {"onnxruntime": ort.__version__}
    if versions is not None:
        ir_version, opsets = versions
        stamped = ", ".join(f"{domain or 'ai.onnx'} {v}" for domain, v in sorted(opsets.items()))
        message += (
            f". The file is ONNX IR version {ir_version} with opsets {stamped}: if onnxruntime "
            f"{ort.__version__} is older than that needs, upgrade it (pip install -U "
            f"'segq[cpu]', or 'segq[gpu]'), or export the model for an older opset"
        )
        details.update(ir_version=ir_version, opsets=opsets)
    return ModelIncompatible(message, **details)


def model_versions(path: Path) -> Optional[tuple[int, dict[str, int]]]:
    """``(ir_version, {domain: opset})`` stamped in an ONNX file, or None if it cannot be
    read (not ONNX, or the ``onnx`` package is missing)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  any failure: the versions are unknown
        return None
    return int(model.ir_version), {o.domain: int(o.version) for o in model.opset_import}


def provider(session: ort.InferenceSession) -> str:
    """The execution provider that runs ``session`` (the first one it accepted)."""
    return session.get_providers()[0]


def require_io(
    session: ort.InferenceSession,
    *,
    inputs: Sequence[str],
    outputs: Sequence[str],
    model_name: str,
) -> None:
    """Raise ``ModelIncompatible`` naming every input and output ``session`` lacks."""
    have_in = [i.name for i in session.get_inputs()]
    have_out = [o.name for o in session.get_outputs()]
    problems = []
    missing_in = [n for n in inputs if n not in have_in]
    missing_out = [n for n in outputs if n not in have_out]
    if missing_in:
        problems.append(f"inputs {missing_in} missing (it has {have_in})")
    if missing_out:
        problems.append(f"outputs {missing_out} missing (it has {have_out})")
    if problems:
        raise ModelIncompatible(
            f"{model_name} does not look like the expected export: {'; '.join(problems)}",
            missing_inputs=missing_in,
            missing_outputs=missing_out,
        )


def input_shape(
    session: ort.InferenceSession, name: str, fallback: Sequence[int]
) -> tuple[int, ...]:
    """The declared shape of input ``name``, each symbolic dimension taken from ``fallback``."""
    declared = next(i.shape for i in session.get_inputs() if i.name == name)
    if len(declared) != len(fallback):
        raise ModelIncompatible(
            f"input {name!r} has shape {declared}, expected {len(fallback)} dimensions"
        )
    return tuple(d if isinstance(d, int) and d > 0 else f for d, f in zip(declared, fallback))


# One CPU arena for every session of the process instead of one per session: SAM 2's
# encoder reuses the blocks DETR grew, and the first block is reserved large enough for any
# model's peak at once (DETR's mask head run whole holds ~2 GB over 100 queries at 800x1066;
# pages are resident only once used), so the arena never doubles past a peak: a third less
# worker memory at the same speed (bench/README.md, "Memory"). The arena belongs to
# onnxruntime's environment, so it is per process by nature (registered once).
CPU_ARENA_INITIAL_BYTES = 2047 << 20  # onnxruntime takes an int32 here
_cpu_arena_lock = threading.Lock()
_cpu_arena_registered = threading.Event()


def _share_cpu_arena() -> None:
    with _cpu_arena_lock:
        if _cpu_arena_registered.is_set():
            return
        config = ort.OrtArenaCfg(
            {
                "max_mem": 0,
                "arena_extend_strategy": 0,  # kNextPowerOfTwo; kSameAsRequested measured worse
                "initial_chunk_size_bytes": CPU_ARENA_INITIAL_BYTES,
                "max_dead_bytes_per_chunk": -1,
            }
        )
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        ort.create_and_register_allocator(info, config)
        _cpu_arena_registered.set()


def _create(
    model: "Path | bytes",
    providers: tuple[str, ...],
    settings: Settings,
    *,
    path: Optional[Path] = None,
) -> ort.InferenceSession:
    """A session for a model file, or for a serialized model made from the file ``path``."""
    path = path or Path(model)  # type: ignore[arg-type]
    options = ort.SessionOptions()
    _share_cpu_arena()
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    # Memory patterns pre-plan one block per input shape on top of the arena: a third more
    # resident memory per worker for no speed (bench/README.md, "onnxruntime sessions").
    options.enable_mem_pattern = False
    # onnxruntime's pool threads spin for a while after each call, and each session has its
    # own pool: the next session (SAM 2's decoder right after its encoder) and the numpy
    # work after a model call would compete with spinning threads.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(
            model if isinstance(model, bytes) else str(model),
            sess_options=options,
            providers=list(providers),
        )
    except Exception as e:  # onnxruntime raises its own untyped errors for unreadable models
        raise load_failure(path, e) from None
    log.log(
        logging.DEBUG if isinstance(model, bytes) else logging.INFO,  # a part of a cut file
        "loaded %s on %s (asked for %s)", path.name, provider(session), ", ".join(providers),
    )
    return session
