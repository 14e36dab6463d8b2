"""The README's pictures, made by segq itself (the in-process ``Pipelines``) from a real photo.

    python -m bench.readme_pictures --models /tmp/segq-models --out docs/

MODELS holds ``sam2/`` and ``detr/`` as ``bench.export_models`` writes them. segq's own
outputs are written unchanged (``mask.png`` and ``cutout.png`` from a cutout job with one
point, ``overlay.jpg`` from an overlay job of the panoptic segments), plus ``composite.jpg``,
one small strip of photo (with the prompt point) | mask | cutout | overlay for the README.

With the random-weight exports of ``bench.export_models`` the masks follow texture and
colour, not objects; ``docs/README.md`` says so beside the pictures.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw

from config.settings import Settings
from worker.pipelines import Pipelines

DEFAULT_PHOTO = Path(__file__).resolve().parents[1] / "docs" / "astronaut.jpg"
DEFAULT_POINT = (200.0, 330.0)  # the orange suit, left of the mission patch
PANEL_SIDE = 256
CAPTION_HEIGHT = 22
CHECKER = 16  # side of the squares behind the cutout, so transparency shows


def _checkerboard(size: tuple[int, int]) -> Image.Image:
    board = Image.new("RGB", size, (236, 236, 236))
    draw = ImageDraw.Draw(board)
    for y in range(0, size[1], CHECKER):
        for x in range((y // CHECKER) % 2 * CHECKER, size[0], 2 * CHECKER):
            draw.rectangle([x, y, x + CHECKER - 1, y + CHECKER - 1], fill=(200, 200, 200))
    return board


def _with_point(photo: Image.Image, point: tuple[float, float]) -> Image.Image:
    marked = photo.convert("RGB")
    draw = ImageDraw.Draw(marked)
    r = max(6, marked.width // 60)
    x, y = point
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(60, 220, 60), outline=(255, 255, 255), width=2)
    return marked


def _on_checkerboard(cutout: Image.Image) -> Image.Image:
    board = _checkerboard(cutout.size)
    board.paste(cutout, mask=cutout.getchannel("A"))
    return board


def composite(panels: dict[str, Image.Image]) -> Image.Image:
    """Captioned panels side by side, each scaled to ``PANEL_SIDE`` pixels high."""
    scaled = [
        (caption, img.convert("RGB").resize(
            (round(img.width * PANEL_SIDE / img.height), PANEL_SIDE), Image.LANCZOS))
        for caption, img in panels.items()
    ]
    gap = 6
    width = sum(img.width for _, img in scaled) + gap * (len(scaled) - 1)
    strip = Image.new("RGB", (width, PANEL_SIDE + CAPTION_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    x = 0
    for caption, img in scaled:
        strip.paste(img, (x, 0))
        draw.text((x + img.width // 2, PANEL_SIDE + CAPTION_HEIGHT // 2), caption,
                  fill=(40, 40, 40), anchor="mm")
        x += img.width + gap
    return strip


def make_pictures(pipes: Pipelines, photo: bytes, point: tuple[float, float], out: Path) -> dict[str, int]:
    """Run segq on ``photo`` and write its pictures into ``out``; returns name -> bytes."""
    prompt = {"point": list(point)}
    cut = pipes.cutout(photo, prompt)
    over = pipes.overlay(photo, format="jpeg")
    files = {
        "mask.png": cut.files["mask.png"][0],
        "cutout.png": cut.files["cutout.png"][0],
        "overlay.jpg": over.files["overlay.jpg"][0],
    }
    opened = {name: Image.open(io.BytesIO(data)) for name, data in files.items()}
    strip = composite({
        "photo + prompt point": _with_point(Image.open(io.BytesIO(photo)), point),
        "mask": opened["mask.png"],
        "cutout": _on_checkerboard(opened["cutout.png"].convert("RGBA")),
        "panoptic overlay": opened["overlay.jpg"],
    })
    buf = io.BytesIO()
    strip.save(buf, "JPEG", quality=85, optimize=True)
    files["composite.jpg"] = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    mask = cut.result["mask"]
    print(f"cutout: mask score {mask['score']:.3f}, area {mask['area']} px, bbox {mask['bbox']}")
    print(f"overlay: {len(over.result['segments'])} panoptic segments: "
          + ", ".join(s["label"] for s in over.result["segments"]))
    return {name: len(data) for name, data in files.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="directory with sam2/ and detr/")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    parser.add_argument("--point", type=float, nargs=2, default=DEFAULT_POINT, metavar=("X", "Y"))
    args = parser.parse_args(argv)
    missing = [m for m in ("sam2", "detr") if not (args.models / m).is_dir()]
    if missing:
        wanted = " or ".join(f"{m}/" for m in missing)
        parser.error(f"{args.models} has no {wanted} (make them with python -m bench.export_models)")
    settings = Settings(
        sam2_dir=args.models / "sam2",
        detr_dir=args.models / "detr",
        providers=["CPUExecutionProvider"],
        offline=True,
    )
    sizes = make_pictures(Pipelines(settings), args.photo.read_bytes(), tuple(args.point), args.out)
    for name, size in sizes.items():
        print(f"{args.out / name}: {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
