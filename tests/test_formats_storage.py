"""How tensors come off the disk: views of a private map of the file, and a
plain LoRA's factors kept in the dtype stored (no conversion while reading).
The reference is safetensors' own loader."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import LoraError
from core.formats import load_lora, open_lora

UP = "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"
DOWN = "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"
ALPHA = "lora_unet_mid_block_attentions_0_proj_in.alpha"
NAME = "lora_unet_mid_block_attentions_0_proj_in"


def _factors(up_dtype=torch.float16, down_dtype=torch.float16, rank=4):
    gen = torch.Generator().manual_seed(3)
    return {UP: torch.randn(1280, rank, generator=gen).to(up_dtype),
            DOWN: torch.randn(rank, 1280, generator=gen).to(down_dtype),
            ALPHA: torch.tensor(2.0)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_plain_lora_factors_are_kept_as_stored(tmp_path, dtype):
    path = tmp_path / "a.safetensors"
    save_file(_factors(dtype, dtype), str(path))
    m = load_lora(str(path)).modules[NAME]
    ref = load_file(str(path))
    assert m.up.dtype == dtype and m.down.dtype == dtype and m.dtype == dtype
    assert torch.equal(m.up, ref[UP]) and torch.equal(m.down, ref[DOWN])
    assert m.scale == 0.5
    dense = 0.5 * ref[UP].double() @ ref[DOWN].double()
    assert torch.allclose(m.delta(), dense, rtol=0, atol=1e-12)


def test_mixed_factor_dtypes_meet_in_float32(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file(_factors(torch.float16, torch.bfloat16), str(path))
    m = load_lora(str(path)).modules[NAME]
    ref = load_file(str(path))
    assert m.up.dtype == m.down.dtype == torch.float32
    assert torch.equal(m.up, ref[UP].float()) and torch.equal(m.down, ref[DOWN].float())


def test_writing_to_a_loaded_factor_never_writes_the_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(_factors(), str(path))
    before = path.read_bytes()
    lora = load_lora(str(path))
    lora.modules[NAME].up.mul_(3)
    del lora
    assert path.read_bytes() == before


def test_factors_outlive_the_reader(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(_factors(), str(path))
    with open_lora(str(path)) as reader:
        m = reader.read(NAME)
    assert torch.equal(m.down, load_file(str(path))[DOWN])


def _hand_written(path, tensors: dict, dtypes: dict | None = None, misalign: bool = False):
    """A safetensors file written by hand, ``dtypes`` overriding the type
    names; the header is padded with spaces so that the data starts on a
    multiple of 8 or (``misalign``, as some old writers did) on an odd byte."""
    header, blobs, offset = {}, [], 0
    for key, t in tensors.items():
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        name = {torch.float16: "F16", torch.float32: "F32"}[t.dtype]
        header[key] = {"dtype": (dtypes or {}).get(key, name), "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * ((-(8 + len(raw)) % 8) + (1 if misalign else 0))
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def test_unaligned_tensors_are_read_exactly(tmp_path):
    tensors = _factors()
    for misalign in (False, True):
        path = _hand_written(tmp_path / f"{misalign}.safetensors", tensors, misalign=misalign)
        start = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
        assert start % 2 == misalign
        m = load_lora(str(path)).modules[NAME]
        assert torch.equal(m.up, tensors[UP]) and torch.equal(m.down, tensors[DOWN]), f"data at byte {start}"


def test_a_factor_of_an_integer_type_torch_cannot_view_is_one_line(tmp_path):
    tensors = _factors()
    path = _hand_written(tmp_path / "u16.safetensors", tensors, dtypes={DOWN: "U16"})
    with pytest.raises(LoraError) as info:
        load_lora(str(path))
    text = str(info.value)
    assert "U16" in text and DOWN in text and "u16.safetensors" in text and "\n" not in text


def test_non_finite_fp16_factor_is_still_refused(tmp_path):
    tensors = _factors()
    tensors[DOWN][2, 7] = float("inf")
    path = tmp_path / "inf.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoraError, match="non-finite") as info:
        load_lora(str(path))
    assert DOWN in str(info.value)


def test_all_zero_fp16_factor_is_still_reported(tmp_path):
    tensors = _factors()
    tensors[UP].zero_()
    path = tmp_path / "zero.safetensors"
    save_file(tensors, str(path))
    assert any("all-zero factor" in w for w in load_lora(str(path)).warnings)


def test_where_a_mapped_file_cannot_be_replaced_tensors_are_copied_and_the_map_closed(tmp_path, monkeypatch):
    """Windows refuses to replace or delete a file while a view of it is
    mapped; there the reader copies each tensor out and closes the map."""
    import core.formats.source as source

    monkeypatch.setattr(source, "COPY_OUT_OF_MAP", True)
    path = tmp_path / "a.safetensors"
    save_file(_factors(), str(path))
    with open_lora(str(path)) as reader:
        lora = reader.load()
        mapped = reader.source._map
        begin = torch.frombuffer(mapped, dtype=torch.uint8).data_ptr()
        for tensor in (lora.modules[NAME].up, lora.modules[NAME].down):
            assert not begin <= tensor.data_ptr() < begin + len(mapped)
    assert mapped.closed
    ref = load_file(str(path))
    assert torch.equal(lora.modules[NAME].up, ref[UP]) and torch.equal(lora.modules[NAME].down, ref[DOWN])
