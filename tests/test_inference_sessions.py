"""Sessions, providers, and the model registry a runtime loads its models through."""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config.contract import Prompt
from config.errors import ModelIncompatible, ModelNotAllowed, ModelNotFound, ModelUnavailable
from config.settings import Settings
from worker.inference.registry import ModelRegistry
from worker.inference.sessions import create_session, provider, require_io, usable_providers

CPU = ["CPUExecutionProvider"]


def test_a_registry_keeps_one_session_per_file_with_its_settings_threads(sam2_repo: Path) -> None:
    path = sam2_repo / "decoder.onnx"
    one = ModelRegistry(Settings(providers=CPU, intra_op_threads=1))
    a = one.session(path)
    assert one.session(sam2_repo / "." / "decoder.onnx") is a
    b = ModelRegistry(Settings(providers=CPU, intra_op_threads=2)).session(path)
    assert b is not a  # another registry, other settings: nothing shared
    assert a.get_session_options().intra_op_num_threads == 1
    assert b.get_session_options().intra_op_num_threads == 2


def test_unavailable_providers_are_skipped_and_the_one_in_use_is_logged(
    sam2_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.inference")
    wanted = ["NoSuchExecutionProvider", "CPUExecutionProvider"]
    assert usable_providers(wanted) == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider" in caplog.text
    session = create_session(
        sam2_repo / "encoder.onnx", Settings(providers=wanted, inter_op_threads=1)
    )
    assert provider(session) == "CPUExecutionProvider"
    assert "encoder.onnx on CPUExecutionProvider" in caplog.text


def test_require_io_names_everything_missing(sam2_repo: Path) -> None:
    session = create_session(sam2_repo / "encoder.onnx", Settings(providers=CPU))
    with pytest.raises(ModelIncompatible) as err:
        require_io(
            session, inputs=["image", "pixels"], outputs=["image_embed", "feats"], model_name="enc"
        )
    message = err.value.message
    assert "pixels" in message and "feats" in message and "high_res_feats_0" in message
    assert err.value.details == {"missing_inputs": ["pixels"], "missing_outputs": ["feats"]}


def test_unreadable_model_file_is_incompatible(tmp_path: Path) -> None:
    (tmp_path / "encoder.onnx").write_bytes(b"not a model")
    (tmp_path / "decoder.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelIncompatible, match="cannot load"):
        ModelRegistry(Settings(sam2_dir=tmp_path, providers=CPU)).sam2()


def test_a_model_newer_than_onnxruntime_names_both_versions_and_the_upgrade(tmp_path: Path) -> None:
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 99)])
    model.ir_version = 10
    path = tmp_path / "future.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelIncompatible) as err:
        create_session(path, Settings(providers=CPU))
    message = err.value.message
    assert "IR version 10" in message and "ai.onnx 99" in message
    assert f"onnxruntime {onnxruntime.__version__}" in message
    assert "pip install -U 'segq[cpu]'" in message
    assert "onnxruntime_src" not in message  # onnxruntime's source path is noise to a user
    assert err.value.details["opsets"] == {"": 99}


def test_models_are_loaded_once_and_overrides_reuse_them(sam2_repo: Path, tmp_path: Path) -> None:
    repo = shutil.copytree(sam2_repo, tmp_path / "sam2")
    settings = Settings(sam2_dir=repo, providers=CPU)
    models = ModelRegistry(settings)
    model = models.sam2()
    assert models.sam2() is model
    shutil.copy(repo / "decoder.onnx", repo / "decoder-copy.onnx")
    other = models.sam2(decoder_file="decoder-copy.onnx")
    assert other is not model and other.encoder is model.encoder  # the session is shared
    assert models.sam2(decoder_file="decoder-copy.onnx") is other
    assert ModelRegistry(settings).sam2() is not model  # registries never share by themselves
    loaded = ModelRegistry(Settings(sam2_dir=repo, providers=CPU)).load(["sam2"])
    assert loaded["sam2"].provider == "CPUExecutionProvider"


def test_runtimes_share_a_registry_only_with_equal_model_settings(sam2_repo: Path) -> None:
    from worker.runtime import Runtime

    settings = Settings(sam2_dir=sam2_repo, providers=CPU)
    models = ModelRegistry(settings)
    same = Runtime(settings.model_copy(update={"status_ttl_s": 60}), models=models)
    assert same.models is models  # other settings, same models: sharing is fine
    with pytest.raises(ValueError, match="equal model settings"):
        Runtime(settings.model_copy(update={"intra_op_threads": 1}), models=models)


def test_every_setting_the_model_layer_reads_is_tagged_as_a_model_setting() -> None:
    """A setting that changes a loaded model but is not tagged would let a registry shared
    between runtimes serve a model built under other settings."""
    import re

    source = "".join(
        p.read_text() for p in (Path(__file__).parents[1] / "worker" / "inference").glob("*.py")
    )
    read = set(re.findall(r"settings\.(\w+)", source)) - {"model_settings"}
    tagged = set(Settings().model_settings())
    assert read <= tagged, read - tagged


def test_bad_file_overrides(sam2_repo: Path, detr_repo: Path) -> None:
    settings = Settings(sam2_dir=sam2_repo, detr_dir=detr_repo, providers=CPU, offline=True)
    models = ModelRegistry(settings)
    with pytest.raises(ModelNotFound, match="nope.onnx"):
        models.sam2(encoder_file="nope.onnx")
    with pytest.raises(ModelNotAllowed):
        models.sam2(encoder_file="../detr_repo0/onnx/model.onnx")
    with pytest.raises(ModelNotAllowed):
        models.detr(model_file="/etc/passwd")
    with pytest.raises(ModelNotAllowed):
        models.detr(repo="someone/else")
    # a revision names a hub version; offline and uncached, that is unavailable, with the fix
    uncached = ModelRegistry(settings.model_copy(update={"hf_cache_dir": sam2_repo / "no-cache"}))
    with pytest.raises(ModelUnavailable, match="SEGQ_SAM2_DIR"):
        uncached.sam2(revision="v2")


def test_threads_share_one_model(sam2_repo: Path) -> None:
    model = ModelRegistry(Settings(sam2_dir=sam2_repo, providers=CPU)).sam2()
    embedding = model.encode(Image.new("RGB", (320, 200), (1, 2, 3)))
    points = [(float(x), float(y)) for x, y in zip(range(40, 300, 20), range(20, 200, 14))]
    expected = [model.predict(embedding, Prompt(point=p))[0].mask for p in points]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: model.predict(embedding, Prompt(point=p))[0].mask, points))
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_embeddings_stay_on_the_encoders_device(sam2_repo) -> None:
    import onnxruntime as ort

    model = ModelRegistry(Settings(sam2_dir=sam2_repo, providers=["CPUExecutionProvider"])).sam2()
    embedding = model.encode(Image.new("RGB", (64, 48), (10, 20, 30)))
    assert model.device == "cpu" and embedding.device == "cpu"  # "cuda" with the CUDA provider
    assert all(isinstance(v, ort.OrtValue) for v in embedding.features.values())
    assert embedding.nbytes == 4 * (32 * 256 * 256 + 64 * 128 * 128 + 256 * 64 * 64)


def test_float16_copy_keeps_float32_io_and_halves_the_weights(tmp_path, detr_repo) -> None:
    import onnx

    from worker.inference.sessions import float16_copy

    source = detr_repo / "onnx" / "model.onnx"
    converted = float16_copy(source, cache_dir=tmp_path)
    assert float16_copy(source, cache_dir=tmp_path) == converted  # converted once
    model = onnx.load(str(converted))
    floats = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert floats["pixel_values"] == onnx.TensorProto.FLOAT and floats["logits"] == onnx.TensorProto.FLOAT
    sizes = {1: 0, 10: 0}  # float32 and float16 weight elements
    for t in model.graph.initializer:
        if t.data_type in sizes:
            sizes[t.data_type] += int(np.prod(t.dims))
    assert sizes[10] > 10 * sizes[1]  # a few operands (clip bounds) stay float32 by design


def test_fp16_without_cuda_runs_float32(sam2_repo, caplog) -> None:
    with caplog.at_level("WARNING"):
        session = create_session(sam2_repo / "decoder.onnx", Settings(fp16=True, providers=["CPUExecutionProvider"]))
    assert "needs the CUDA provider" in caplog.text
    assert session.get_inputs()[0].type == "tensor(float)"
