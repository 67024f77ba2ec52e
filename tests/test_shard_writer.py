"""The streamed export's safetensors writer (`apply.stream.ShardWriter`) against safetensors' own reader: the
same tensors back, bit for bit, in every dtype and shape (0-d, empty, bf16), shards split at the byte bound and
when a header would outgrow its room, and a file transformers loads."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mumoe.apply.stream import ShardWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(7, generator=g),
        "c.f16": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "d.f64": torch.randn(4, 1, generator=g, dtype=torch.float64),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
        "g.i64": torch.arange(6).reshape(2, 3),
        "h.bool": torch.tensor([True, False, True]),
        "i.noncontig": torch.randn(4, 6, generator=g).t(),
        "j.u8": torch.arange(5, dtype=torch.uint8),
    }


def _read_all(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_one_shard_reads_back_bit_for_bit(tmp_path):
    ts = _tensors()
    w = ShardWriter(tmp_path, 1 << 30)
    for k, t in ts.items():
        w.add(k, t)
    assert w.finish() == ["model.safetensors"]
    got = load_file(tmp_path / "model.safetensors")
    assert sorted(got) == sorted(ts)
    for k, t in ts.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8:9] == b"{"  # data 8-byte aligned, header padded with spaces
    assert len(raw) == 8 + n + sum(t.numel() * t.element_size() for t in ts.values())


def test_shards_split_at_the_byte_bound_and_index_names_them(tmp_path):
    ts = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    w = ShardWriter(tmp_path, 3 * 1024)
    for k, t in ts.items():
        w.add(k, t)
    names = w.finish()
    assert len(names) == 4 and names[0] == "model-00001-of-00004.safetensors"
    sizes = [len(load_file(tmp_path / n)) for n in names]
    assert sizes == [3, 3, 3, 1]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 10 * 1024
    assert index["weight_map"] == {k: names[i // 3] for i, k in enumerate(ts)}
    got = _read_all(tmp_path)
    assert all(torch.equal(got[k], t) for k, t in ts.items())


def test_a_header_that_would_outgrow_its_room_closes_the_shard(tmp_path):
    ts = {f"model.layers.{i}.mlp.experts.{i}.down_proj.weight": torch.ones(2) * i for i in range(40)}
    w = ShardWriter(tmp_path, 1 << 30, header_bytes=1024)  # room for a few entries only
    for k, t in ts.items():
        w.add(k, t)
    names = w.finish()
    assert len(names) > 3
    for n in names:
        assert int.from_bytes((tmp_path / n).read_bytes()[:8], "little") == 1024
    got = _read_all(tmp_path)
    assert sorted(got) == sorted(ts) and all(torch.equal(got[k], t) for k, t in ts.items())


def test_a_tensor_larger_than_the_bound_gets_a_shard_of_its_own(tmp_path):
    w = ShardWriter(tmp_path, 100)
    w.add("small", torch.ones(4))
    w.add("big", torch.ones(1000))
    w.add("small2", torch.ones(4))
    names = w.finish()
    assert [sorted(load_file(tmp_path / n)) for n in names] == [["small"], ["big"], ["small2"]]


def test_transformers_loads_what_it_writes(tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import make

    model = make("qwen3_moe")
    model.save_pretrained(tmp_path / "ref")  # transformers' own writer: the reference, and the source keys
    model.config.save_pretrained(tmp_path)
    w = ShardWriter(tmp_path, 64 << 10)  # several shards
    for k, t in load_file(tmp_path / "ref" / "model.safetensors").items():
        w.add(k, t)
    assert len(w.finish()) > 1
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


def test_unsupported_dtype_is_one_line(tmp_path):
    from mumoe.errors import MumoeError

    with pytest.raises(MumoeError, match="complex64"):
        ShardWriter(tmp_path, 1 << 20).add("z", torch.zeros(2, dtype=torch.complex64))
