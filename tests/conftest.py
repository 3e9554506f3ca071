
# ---------------------------------------------------------------- data layer fixtures (tests/test_data*.py)
import io as _data_io
import json as _data_json
from pathlib import Path as _DataPath

import pytest as _data_pytest

FLICKR_DIR = _DataPath("/work/shared/data/flickr30k")
"""Real Flickr30k annotation files (read-only; copied before use)."""


def _solid_png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    from PIL import Image

    buf = _data_io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


@_data_pytest.fixture
def tiny_flickr_dir(tmp_path: _DataPath) -> _DataPath:
    """A Flickr30k-layout folder: the first 12 test/val rows of the real annotations, a train file
    built from them (one row per caption), and tiny solid placeholder PNGs for every listed image."""
    if not (FLICKR_DIR / "flickr30k_test.json").exists():
        _data_pytest.skip("real Flickr30k annotations not available")
    out = tmp_path / "flickr"
    out.mkdir()
    train = []
    for split in ("test", "val"):
        rows = _data_json.loads((FLICKR_DIR / f"flickr30k_{split}.json").read_text())[:12]
        (out / f"flickr30k_{split}.json").write_text(_data_json.dumps(rows))
        for k, r in enumerate(rows):
            img = out / r["image"]
            img.parent.mkdir(parents=True, exist_ok=True)
            img.write_bytes(_solid_png((20 * k % 256, 100, 200 - 10 * k)))
            if split == "val":
                train.extend({"image": r["image"], "caption": c, "image_id": str(k)} for c in r["caption"])
    (out / "flickr30k_train.json").write_text(_data_json.dumps(train))
    return out
# ---------------------------------------------------------------- end of data layer fixtures
