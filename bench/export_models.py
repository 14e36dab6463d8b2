"""Export SAM 2 (hiera-tiny) and DETR-ResNet-50 panoptic to the ONNX files segq loads.

    python -m bench.export_models --out /tmp/segq-models [--sam2] [--detr] [--seed 0] [--tiny]
        [--checkpoint-sam2 HF_ID_OR_DIR] [--checkpoint-detr HF_ID_OR_DIR]

writes the layouts of the public exports (DESIGN.md §3), so that
``SEGQ_SAM2_DIR=OUT/sam2 SEGQ_DETR_DIR=OUT/detr`` points segq at them:

    OUT/sam2/encoder.onnx, decoder.onnx     samexporter layout (SharpAI/sam2-hiera-tiny-onnx)
    OUT/detr/onnx/model.onnx, config.json   optimum layout (Xenova/detr-resnet-50-panoptic)

No weights can be downloaded where segq is benchmarked, so by default the networks are the
real architectures (transformers' ``Sam2Model`` and ``DetrForSegmentation``) with seeded random
weights: same graph, same cost, same inputs and outputs. A few weights are then rescaled so
the outputs look like a trained model's (mask logits O(10), a handful of DETR queries over the
0.5 threshold); the exact weights are saved beside the ONNX files (``hf/``) so transformers can
load the same model. ``--checkpoint-*`` exports real weights instead. Every export is run with
onnxruntime and compared with transformers' own forward; the differences are printed and kept
in ``export.json``.

Needs the optional extra: ``pip install 'segq[export]'`` (torch, transformers, onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import onnxruntime as ort

from worker.inference.labels import COCO_PANOPTIC
from worker.inference.sam2 import DECODER_OUTPUTS, EMBEDDING_NAMES, ENCODER_INPUT
from worker.inference.transforms import IMAGENET_MEAN, IMAGENET_STD

try:
    import torch
    from torch import nn

    _Module = nn.Module
except ImportError:  # the optional extra is missing; main() says so before torch is needed
    torch = None
    _Module = object

INSTALL_HINT = "pip install 'segq[export]'"
MAX_IR_VERSION = 10  # onnxruntime-gpu builds lag behind onnx; IR 10 and opset <= 21 load everywhere
SAM2_OPSET = 17  # samexporter's opset
DETR_OPSET = 12  # optimum's DetrOnnxConfig default when the Xenova file was exported
SAM2_IMAGE_SIDE = 1024
DETR_SIZE = (800, 1066)  # (H, W) a 640x480 photo becomes under shortest edge 800
DETR_NUM_LABELS = 250  # logits have 251 columns; the last is "no object"
DETR_KEPT_QUERIES = 8

# samexporter's input order (the worker feeds by name; the file lists them in this order)
SAM2_DECODER_INPUTS = [
    "image_embed", "high_res_feats_0", "high_res_feats_1",
    "point_coords", "point_labels", "mask_input", "has_mask_input",
]
DETR_INPUTS = ["pixel_values", "pixel_mask"]
DETR_OUTPUTS = ["logits", "pred_boxes", "pred_masks"]


def detr_id2label() -> dict[int, str]:
    """The 250 labels of facebook/detr-resnet-50-panoptic's config.json (and so of Xenova's
    copy): the COCO panoptic names by category id, "N/A" for the ids no category has."""
    return {i: COCO_PANOPTIC.get(i, "N/A") for i in range(DETR_NUM_LABELS)}


# --- shared helpers ---------------------------------------------------------------------


def _import_transformers() -> Any:
    """The transformers module (torch is imported above), or an ImportError that says how to
    install both."""
    if torch is None:
        raise ImportError(f"exporting models needs torch and transformers: {INSTALL_HINT}")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except Exception:  # noqa: BLE001
        # A torchvision build that does not match torch (a CUDA wheel beside CPU torch) fails
        # on import and takes `import transformers` down with it. Exports never use it.
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.modules["torchvision"] = None
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"exporting models needs transformers ({e}): {INSTALL_HINT}") from e
    return transformers


def calibration_image(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic photo-like image, ImageNet-normalised NCHW float32.

    Smooth colour fields with a few flat shapes: random weights calibrated on white noise
    would be calibrated for an input no user sends.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x1) + 8, int(y1) + 8], fill=colour)
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)


def _max_abs(got: np.ndarray, want: Any) -> float:
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    if got.shape != want.shape:
        raise RuntimeError(f"the ONNX file gives shape {got.shape} where torch gives {want.shape}")
    return float(np.abs(got.astype(np.float64) - want).max())


def _ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _export_onnx(
    module: Any,
    args: tuple,
    path: Path,
    *,
    inputs: list[str],
    outputs: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> float:
    """Trace ``module`` to ``path`` with the TorchScript exporter; returns seconds taken.

    The dynamo exporter emits opset 18+, which the files segq mirrors do not use.
    """
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Tracer warnings ask whether the graph generalises to other shapes; the verification
        # runs each file at a second size against torch, which answers that.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=inputs, output_names=outputs, dynamic_axes=dynamic_axes,
        )
    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return time.perf_counter() - start


def _versions(transformers: Any, **settings: Any) -> dict[str, Any]:
    import onnx

    return {
        **settings, "torch": torch.__version__, "transformers": transformers.__version__,
        "onnx": onnx.__version__, "onnxruntime": ort.__version__,
    }


def _write_report(out_dir: Path, report: dict[str, Any]) -> None:
    (out_dir / "export.json").write_text(json.dumps(report, indent=2) + "\n")


def _scale_linear(layer: Any, factor: float) -> None:
    layer.weight.mul_(factor)
    if layer.bias is not None:
        layer.bias.mul_(factor)


# --- SAM 2 ------------------------------------------------------------------------------


def _sam2_config(tiny: bool) -> Any:
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2VisionConfig

    if not tiny:
        return Sam2Config()  # the defaults are hiera-tiny's image path
    # Smaller everywhere except the feature sizes and widths the ONNX I/O exposes.
    dims = [8, 16, 32, 64]
    hiera = Sam2HieraDetConfig(
        hidden_size=dims[0], embed_dim_per_stage=dims, blocks_per_stage=[1, 1, 2, 1],
        num_attention_heads_per_stage=[1, 1, 1, 1], global_attention_blocks=[3],
    )
    return Sam2Config(
        vision_config=Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=dims[::-1]),
        mask_decoder_config=Sam2MaskDecoderConfig(num_hidden_layers=1, mlp_dim=256),
    )


def build_sam2(seed: int = 0, *, checkpoint: Optional[str] = None, tiny: bool = False) -> Any:
    """A transformers ``Sam2Model`` (eval mode): a checkpoint's weights, or seeded random ones."""
    from transformers import Sam2Model

    if checkpoint:
        return Sam2Model.from_pretrained(checkpoint, attn_implementation="eager").eval()
    torch.manual_seed(seed)
    model = Sam2Model._from_config(_sam2_config(tiny), attn_implementation="eager").eval()
    # A converted checkpoint has one random-Fourier matrix for image and prompt positions
    # (SAM 2's pe_layer); transformers keeps two copies, which random init makes differ.
    with torch.no_grad():
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(
            model.shared_image_embedding.positional_embedding
        )
    return model


class Sam2Encoder(_Module):
    """image -> high_res_feats_0, high_res_feats_1, image_embed (samexporter's encoder)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Any) -> tuple:
        feats_0, feats_1, embed = self.model.get_image_embeddings(image)
        return feats_0, feats_1, embed


class Sam2Decoder(_Module):
    """samexporter's decoder: prompts in 1024-space plus the encoder outputs -> the three
    multimask candidates as 256x256 logits (clamped to +-32 like the public file) and their
    predicted IoUs. The prompt encoder adds the half-pixel offset and the padding point."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, image_embed, high_res_feats_0, high_res_feats_1,
        point_coords, point_labels, mask_input, has_mask_input,
    ) -> tuple:
        model = self.model
        n = point_coords.shape[0]
        sparse, _ = model.prompt_encoder(
            point_coords[:, None], point_labels[:, None].to(torch.int64), None, None
        )
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask * model.prompt_encoder.mask_embed(mask_input) + (1 - has_mask) * no_mask
        masks, iou, _, _ = model.mask_decoder(
            image_embeddings=image_embed.expand(n, -1, -1, -1),
            image_positional_embeddings=model.get_image_wide_positional_embeddings().expand(
                n, -1, -1, -1
            ),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            high_resolution_features=[high_res_feats_0, high_res_feats_1],
        )
        return torch.clamp(masks[:, 0], -32.0, 32.0), iou[:, 0]


def _sam2_prompts() -> dict[str, dict[str, Any]]:
    """Prompts in 1024-space, as transformers' forward takes them and as the ONNX file does.

    The public layout sends a box as two points labelled 2 and 3, corners first; transformers
    appends the box after the points, which the prompt tokens do not care about.
    """
    box = [150.0, 220.0, 820.0, 760.0]
    return {
        "point": dict(
            hf=dict(input_points=torch.tensor([[[[300.0, 400.0]]]]), input_labels=torch.tensor([[[1]]])),
            onnx=([[300.0, 400.0]], [1]),
        ),
        "fg+bg points": dict(
            hf=dict(
                input_points=torch.tensor([[[[300.0, 400.0], [700.0, 520.0]]]]),
                input_labels=torch.tensor([[[1, 0]]]),
            ),
            onnx=([[300.0, 400.0], [700.0, 520.0]], [1, 0]),
        ),
        "box": dict(
            hf=dict(input_boxes=torch.tensor([[box]])),
            onnx=([box[:2], box[2:]], [2, 3]),
        ),
    }


def _sam2_decode(model: Any, feats: list, prompt: dict[str, Any]) -> tuple:
    """transformers' own forward from precomputed image embeddings: masks [1,3,256,256], IoU [1,3]."""
    out = model(image_embeddings=feats, multimask_output=True, **prompt)
    return out.pred_masks[0], out.iou_scores[0]


def _calibrate_sam2(model: Any, feats: list) -> dict[str, float]:
    """Rescale the heads whose random init leaves the outputs meaningless.

    With transformers' init (normal, std 0.02) mask logits have std ~0.004, so float noise
    decides every pixel's sign, and every IoU is ~0.5. Masks are linear in the last layer of
    the hypernetwork MLPs and IoU logits in the IoU head's last layer, so scaling those sets
    mask-logit std to 8 (a trained SAM 2's are O(10)) and IoU-logit std to 1.5.
    """
    masks, ious = zip(*(_sam2_decode(model, feats, p["hf"]) for p in _sam2_prompts().values()))
    mask_scale = 8.0 / float(torch.stack(masks).std())
    iou_scale = 1.5 / float(torch.logit(torch.stack(ious)).std())
    decoder = model.mask_decoder
    for mlp in decoder.output_hypernetworks_mlps:
        _scale_linear(mlp.proj_out, mask_scale)
    _scale_linear(decoder.iou_prediction_head.proj_out, iou_scale)
    return {"mask_logit_scale": mask_scale, "iou_logit_scale": iou_scale}


def export_sam2(
    out_dir: Path, *, seed: int = 0, checkpoint: Optional[str] = None, tiny: bool = False
) -> dict[str, Any]:
    """Write ``out_dir/encoder.onnx`` and ``decoder.onnx``; return the export report."""
    transformers = _import_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = _versions(transformers, seed=seed, checkpoint=checkpoint, tiny=tiny)
    with torch.no_grad():
        model = build_sam2(seed, checkpoint=checkpoint, tiny=tiny)
        image = torch.from_numpy(calibration_image(SAM2_IMAGE_SIDE, SAM2_IMAGE_SIDE, seed))
        feats = model.get_image_embeddings(image)
        if not checkpoint:
            report["calibration"] = _calibrate_sam2(model, feats)
            model.save_pretrained(out_dir / "hf")

        encoder_path, decoder_path = out_dir / "encoder.onnx", out_dir / "decoder.onnx"
        report["export_s"] = {
            "encoder": _export_onnx(
                Sam2Encoder(model).eval(), (image,), encoder_path,
                inputs=[ENCODER_INPUT], outputs=list(EMBEDDING_NAMES), dynamic_axes={}, opset=SAM2_OPSET,
            ),
        }
        prompts = {0: "num_labels", 1: "num_points"}
        report["export_s"]["decoder"] = _export_onnx(
            Sam2Decoder(model).eval(),
            (feats[2], feats[0], feats[1], torch.rand(1, 3, 2) * 1024, torch.ones(1, 3),
             torch.zeros(1, 1, 256, 256), torch.zeros(1)),
            decoder_path,
            inputs=SAM2_DECODER_INPUTS, outputs=list(DECODER_OUTPUTS), opset=SAM2_OPSET,
            dynamic_axes={
                "point_coords": prompts, "point_labels": prompts,
                "mask_input": {0: "num_labels"}, "has_mask_input": {0: "num_labels"},
                "masks": {0: "num_labels"}, "iou_predictions": {0: "num_labels"},
            },
        )
        report["max_abs_diff"], report["onnx_outputs"] = _verify_sam2(
            model, image, feats, encoder_path, decoder_path
        )
    _write_report(out_dir, report)
    return report


def _verify_sam2(
    model: Any, image: Any, feats: list, encoder_path: Path, decoder_path: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """onnxruntime against transformers: the encoder on the calibration image, the decoder on
    each prompt kind against ``Sam2Model.forward``."""
    diffs: dict[str, Any] = {}
    outputs: dict[str, float] = {}
    got = _ort_session(encoder_path).run(list(EMBEDDING_NAMES), {ENCODER_INPUT: image.numpy()})
    for name, onnx_out, torch_out in zip(EMBEDDING_NAMES, got, feats):
        diffs[f"encoder {name}"] = _max_abs(onnx_out, torch_out)
    decoder = _ort_session(decoder_path)
    embeds = dict(zip(EMBEDDING_NAMES, (f.numpy() for f in feats)))
    for name, prompt in _sam2_prompts().items():
        coords, labels = prompt["onnx"]
        masks, ious = decoder.run(list(DECODER_OUTPUTS), {
            **embeds,
            "point_coords": np.array([coords], np.float32),
            "point_labels": np.array([labels], np.float32),
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
        })
        want_masks, want_ious = _sam2_decode(model, feats, prompt["hf"])
        want_masks = torch.clamp(want_masks, -32.0, 32.0)
        diffs[f"decoder {name} masks"] = _max_abs(masks, want_masks)
        diffs[f"decoder {name} iou"] = _max_abs(ious, want_ious)
        diffs[f"decoder {name} mask sign flips"] = int(((masks > 0) != (want_masks.numpy() > 0)).sum())
        outputs[f"{name}: mask logit std"] = float(masks.std())
        outputs[f"{name}: best IoU prediction"] = float(ious.max())
    return diffs, outputs


# --- DETR panoptic ----------------------------------------------------------------------


def _detr_config(tiny: bool) -> Any:
    from transformers import DetrConfig, ResNetConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    id2label = detr_id2label()
    labels = dict(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if not tiny:
        # The real checkpoint's backbone is timm's resnet50; transformers' ResNet-50 has the
        # same layers, strides and frozen batch norm, and needs no timm.
        return DetrConfig(backbone_config=ResNetConfig(out_features=stages), **labels)
    backbone = ResNetConfig(
        embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
        layer_type="basic", out_features=stages,
    )
    return DetrConfig(
        backbone_config=backbone, d_model=64, encoder_layers=1, decoder_layers=1,
        encoder_ffn_dim=128, decoder_ffn_dim=128, **labels,
    )


def build_detr(seed: int = 0, *, checkpoint: Optional[str] = None, tiny: bool = False) -> Any:
    """A transformers ``DetrForSegmentation`` (eval mode): a checkpoint's or seeded random weights."""
    from transformers import DetrForSegmentation

    if checkpoint:
        return DetrForSegmentation.from_pretrained(checkpoint, attn_implementation="eager").eval()
    torch.manual_seed(seed)
    return DetrForSegmentation._from_config(_detr_config(tiny), attn_implementation="eager").eval()


def _mask_head_adapters_first(self: Any, features, attention_masks, fpn_features) -> Any:
    """``DetrMaskHeadSmallConv.forward`` in the original DETR order: each FPN adapter runs on
    the image's features before they are repeated per query, not after (transformers 5 runs
    it 100 times over, which makes the head ~100x dearer than the model users download)."""
    num_queries = attention_masks.shape[1]

    def per_query(x):
        return x.unsqueeze(1).expand(-1, num_queries, -1, -1, -1).flatten(0, 1)

    hidden = torch.cat([per_query(features), attention_masks.flatten(0, 1)], dim=1)
    hidden = self.conv2(self.conv1(hidden))
    for stage, fpn in zip(self.fpn_stages, fpn_features):
        fpn = per_query(stage.fpn_adapter(fpn))
        hidden = stage.refine(fpn + nn.functional.interpolate(hidden, size=fpn.shape[-2:], mode="nearest"))
    return self.output_conv(hidden)


@contextmanager
def _mask_head_order(model: Any, *, adapters_first: bool):
    """Run ``model``'s mask head in the original DETR order, or in transformers' own."""
    head = model.mask_head
    saved = head.__dict__.pop("forward", None)
    if adapters_first:
        head.forward = types.MethodType(_mask_head_adapters_first, head)
    try:
        yield model
    finally:
        head.__dict__.pop("forward", None)
        if saved is not None:
            head.forward = saved


def _calibrate_detr(model: Any, pixel_values: Any, kept: int = DETR_KEPT_QUERIES) -> dict[str, Any]:
    """Rescale the weights whose random init makes panoptic output empty.

    With transformers' init all 100 queries decode to the same state (query embeddings of
    std 0.02 attend uniformly), their masks are identical and every class probability is
    ~1/251, so post-processing keeps nothing. In order:

    1. query position embeddings to std 30 and the mask-attention query projection x16:
       each query attends somewhere of its own;
    2. the mask head's first conv weights the 8 attention-map channels up to 10x the feature
       channels' spread, so each query's mask follows its attention;
    3. the mask logits to std 4 per query with 15% of pixels positive;
    4. the classifier blind to the state all queries share, logits to std 6, the "N/A" ids
       pushed out of reach (they had no training examples, so a trained model never picks
       them), and the no-object bias set so that ``kept`` queries score over 0.5 with the
       widest margin (so float differences between torch and onnxruntime cannot flip one).
    """
    d_model = model.config.d_model
    queries = model.detr.model.query_position_embeddings.weight
    queries.mul_(30.0 / float(queries.std()))
    _scale_linear(model.bbox_attention.q_proj, 16.0)

    captured: dict[str, Any] = {}
    hooks = [
        model.mask_head.register_forward_pre_hook(
            lambda _m, _a, kwargs: captured.update(mask_head=kwargs), with_kwargs=True
        ),
        model.detr.class_labels_classifier.register_forward_pre_hook(
            lambda _m, args: captured.update(decoded=args[0][0])
        ),
    ]
    try:
        model(pixel_values=pixel_values)
    finally:
        for hook in hooks:
            hook.remove()

    head_inputs = captured["mask_head"]
    attention_gain = 10.0 * float(head_inputs["features"].std()) / float(
        head_inputs["attention_masks"].std()
    )
    model.mask_head.conv1.conv.weight[:, d_model:].mul_(attention_gain)

    mask_logits = model.mask_head(**head_inputs)
    mask_scale = 4.0 / float(mask_logits.flatten(1).std(dim=1).mean())
    output_conv = model.mask_head.output_conv
    _scale_linear(output_conv, mask_scale)
    output_conv.bias.sub_(float(torch.quantile((mask_logits * mask_scale).flatten()[::7], 0.85)))

    classifier = model.detr.class_labels_classifier
    decoded = captured["decoded"]
    shared = decoded.mean(0) / decoded.mean(0).norm()
    classifier.weight.sub_((classifier.weight @ shared)[:, None] * shared[None, :])
    class_scale = 6.0 / float(classifier(decoded).std())
    _scale_linear(classifier, class_scale)
    unused = [i for i, name in detr_id2label().items() if name == "N/A"]
    classifier.bias[unused] -= 30.0
    bias, margin = _no_object_bias(classifier(decoded), kept)
    classifier.bias[DETR_NUM_LABELS] += bias
    return {
        "query_embedding_std": 30.0, "mask_query_gain": 16.0, "attention_channel_gain": attention_gain,
        "mask_logit_scale": mask_scale, "class_logit_scale": class_scale,
        "no_object_bias": bias, "score_margin": margin,
    }


def _queries_kept(logits: Any) -> tuple[int, float]:
    """How many of these [queries, 251] logits post-processing keeps (a real label scoring over
    0.5), and how near the nearest real-label score comes to 0.5."""
    scores, labels = logits.softmax(-1).max(-1)
    real = labels != DETR_NUM_LABELS
    margin = float((scores[real] - 0.5).abs().min()) if bool(real.any()) else 0.5
    return int((real & (scores > 0.5)).sum()), margin


def _no_object_bias(logits: Any, kept: int) -> tuple[float, float]:
    """The no-object bias that leaves ``kept`` queries (or as near as any bias gets) over the
    0.5 score threshold, with their scores farthest from it."""
    best = None
    for bias in np.linspace(-40.0, 40.0, 1601):
        shifted = logits.clone()
        shifted[:, DETR_NUM_LABELS] += float(bias)
        count, margin = _queries_kept(shifted)
        key = (-abs(count - kept), margin)
        if best is None or key > best[0]:
            best = (key, float(bias), margin)
    return best[1], best[2]


class DetrOnnx(_Module):
    """pixel_values, pixel_mask -> logits, pred_boxes, pred_masks (optimum's output order)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_mask) -> tuple:
        out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return out.logits, out.pred_boxes, out.pred_masks


def export_detr(
    out_dir: Path, *, seed: int = 0, checkpoint: Optional[str] = None, tiny: bool = False
) -> dict[str, Any]:
    """Write ``out_dir/onnx/model.onnx`` and ``out_dir/config.json``; return the export report."""
    transformers = _import_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = _versions(transformers, seed=seed, checkpoint=checkpoint, tiny=tiny)
    model_path = out_dir / "onnx" / "model.onnx"
    pixel_values = torch.from_numpy(calibration_image(*DETR_SIZE, seed))
    # optimum traced a 64x64 mask and declared only the batch axis dynamic, so the public file
    # takes a [batch, 64, 64] mask of ones; the graph resizes it.
    pixel_mask = torch.ones(1, 64, 64, dtype=torch.int64)
    model = build_detr(seed, checkpoint=checkpoint, tiny=tiny)
    with torch.no_grad(), _mask_head_order(model, adapters_first=True):
        if not checkpoint:
            report["calibration"] = _calibrate_detr(model, pixel_values)
            model.save_pretrained(out_dir / "hf")
        model.config.to_json_file(out_dir / "config.json")
        batch = {0: "batch_size"}
        image_axes = {0: "batch_size", 1: "num_channels", 2: "height", 3: "width"}
        report["export_s"] = _export_onnx(
            DetrOnnx(model).eval(), (pixel_values, pixel_mask), model_path,
            inputs=DETR_INPUTS, outputs=DETR_OUTPUTS, opset=DETR_OPSET,
            dynamic_axes={"pixel_values": image_axes, "pixel_mask": batch, "logits": batch,
                          "pred_boxes": batch, "pred_masks": batch},
        )
        report["max_abs_diff"], report["onnx_outputs"] = _verify_detr(
            model, model_path, pixel_values, seed
        )
    _write_report(out_dir, report)
    return report


def _verify_detr(
    model: Any, model_path: Path, pixel_values: Any, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """onnxruntime against transformers: the calibration image at 800x1066 (original mask-head
    order), and a smaller odd size against transformers' unpatched forward, which checks both
    the dynamic height/width and that the reordered mask head computes the same thing."""
    session = _ort_session(model_path)
    pixel_mask = np.ones((1, 64, 64), np.int64)
    cases = [(f"{DETR_SIZE[0]}x{DETR_SIZE[1]}", pixel_values, True),
             ("333x461 transformers order", torch.from_numpy(calibration_image(333, 461, seed + 1)), False)]
    diffs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    for name, pixels, adapters_first in cases:
        with _mask_head_order(model, adapters_first=adapters_first):
            want = model(pixel_values=pixels)
        got = dict(zip(DETR_OUTPUTS, session.run(DETR_OUTPUTS, {"pixel_values": pixels.numpy(),
                                                                "pixel_mask": pixel_mask})))
        if adapters_first:
            kept, _ = _queries_kept(torch.from_numpy(got["logits"][0]))
            outputs[f"{name}: queries scoring over 0.5"] = kept
            outputs[f"{name}: mask logit std"] = float(got["pred_masks"].std())
        for out_name in DETR_OUTPUTS:
            diffs[f"{name} {out_name}"] = _max_abs(got[out_name], getattr(want, out_name))
        labels = got["logits"][0].argmax(-1)
        diffs[f"{name} label flips"] = int((labels != want.logits[0].numpy().argmax(-1)).sum())
    return diffs, outputs


# --- CLI --------------------------------------------------------------------------------


def _print_report(name: str, report: dict[str, Any]) -> None:
    def rows(values: dict[str, Any]) -> None:
        for key, value in values.items():
            print(f"    {key:<44} {value:.3g}" if isinstance(value, float) else f"    {key:<44} {value}")

    print(f"{name}: exported in {json.dumps(report['export_s'])} s")
    if "calibration" in report:
        print(f"  calibration: {json.dumps(report['calibration'])}")
    print("  max |onnxruntime - torch forward|:")
    rows(report["max_abs_diff"])
    print("  onnxruntime outputs:")
    rows(report["onnx_outputs"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segq export-models",
        description="Export SAM 2 and DETR-panoptic ONNX files in the layouts segq loads. "
        "Without --checkpoint-*: real architecture, seeded random weights, calibrated.",
    )
    parser.add_argument("--out", required=True, type=Path, help="writes OUT/sam2 and OUT/detr")
    parser.add_argument("--sam2", action="store_true", help="export SAM 2 (default: both)")
    parser.add_argument("--detr", action="store_true", help="export DETR (default: both)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--checkpoint-sam2", metavar="HF_ID_OR_DIR",
                        help="export these transformers Sam2Model weights instead")
    parser.add_argument("--checkpoint-detr", metavar="HF_ID_OR_DIR",
                        help="export these transformers DetrForSegmentation weights instead")
    parser.add_argument("--tiny", action="store_true",
                        help="shrunken networks with the same I/O, for tests (seconds, not minutes)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``segq export-models`` command; returns the process exit status."""
    args = _parser().parse_args(argv)
    both = not (args.sam2 or args.detr)
    jobs = []
    if args.sam2 or both:
        jobs.append(("sam2", export_sam2, args.checkpoint_sam2))
    if args.detr or both:
        jobs.append(("detr", export_detr, args.checkpoint_detr))
    try:
        _import_transformers().utils.logging.disable_progress_bar()
        torch.set_num_threads(os.cpu_count() or 1)
        for name, export, checkpoint in jobs:
            report = export(args.out / name, seed=args.seed, checkpoint=checkpoint, tiny=args.tiny)
            _print_report(name, report)
    except ImportError as e:
        print(f"segq export-models: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a checkpoint that is not there, or a full disk
        print(f"segq export-models: {e}", file=sys.stderr)
        return 1
    print(f"done: SEGQ_SAM2_DIR={args.out / 'sam2'} SEGQ_DETR_DIR={args.out / 'detr'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
