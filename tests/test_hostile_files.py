"""Hostile input files: tiny pickles that describe huge data, deep JSON, and checkpoints whose pickle
names code. Every refusal is one short message naming the file; no payload ever runs (each would create
a marker file)."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import shutil
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import REFUSAL, CheckpointError, check_resumable_checkpoint, read_state_dict
from leftrefill.data.manifest import ManifestError, Pair, drop_missing_images, read_image_table, read_pairs
from leftrefill.prep.safe_pickle import SafePickleError, safe_load, short_repr

MAX_MESSAGE = 2000
MAX_PEAK_BYTES = 50 << 20


def shared_lists(levels: int, leaf: object = "MegaDepth/x.jpg") -> list:
    """A list nested ``levels`` deep whose two items are the same list: pickled once per level (about
    8 bytes each) through the memo, but 2**levels leaves when written out."""
    node = leaf
    for _ in range(levels):
        node = [node, node]
    return node


def refusal_of(call, *args) -> tuple[str, int]:
    """The message of the error ``call(*args)`` raises, and the peak memory it took."""
    tracemalloc.start()
    try:
        with pytest.raises((ManifestError, SafePickleError, CheckpointError)) as info:
            call(*args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(info.value), peak


# ----------------------------------------------------------------------------------- pickled manifests


def amplification(path: Path) -> str:
    """The refusal safe_pickle gives for ``path`` when its shared lists would outgrow the file."""
    limit = 2 * path.stat().st_size + (1 << 16)
    return (f"{path}: the pickle refers to the same lists, dicts or arrays so often that written out it would "
            f"hold more than {limit} items (from {path.stat().st_size} bytes read); refusing to amplify shared data")


@pytest.mark.parametrize("levels", [22, 40])
def test_a_tiny_image_dict_of_shared_lists_is_refused_with_a_short_message(tmp_path, levels):
    path = tmp_path / "image_dict.pkl"
    path.write_bytes(pickle.dumps({0: shared_lists(levels)}, protocol=2))
    assert path.stat().st_size < 400  # 185 bytes for 22 levels: 4 million leaves
    message, peak = refusal_of(read_image_table, path)
    assert message == amplification(path)
    assert len(message) < MAX_MESSAGE and peak < MAX_PEAK_BYTES


def test_a_tiny_pair_list_of_shared_lists_is_refused_with_a_short_message(tmp_path):
    images, pairs = tmp_path / "image_dict.pkl", tmp_path / "train_pairs.pkl"
    images.write_bytes(pickle.dumps({0: "/d/0015/images/a.jpg"}))
    pairs.write_bytes(pickle.dumps([{"source": shared_lists(40), "target": 0, "prompt": ""}]))
    message, peak = refusal_of(read_pairs, pairs, images)
    assert message == amplification(pairs)
    assert peak < MAX_PEAK_BYTES


def test_shared_lists_below_the_limit_are_quoted_in_a_few_characters(tmp_path):
    path = tmp_path / "image_dict.pkl"
    path.write_bytes(pickle.dumps({0: shared_lists(12, leaf="a")}))  # 4096 leaves: under the item limit
    message, _ = refusal_of(read_image_table, path)
    assert message.startswith(f"{path}: expected {{int id: path string}}, found 0: [[[[...], [...]], [[...], ")
    assert len(message) < len(str(path)) + 300


def test_a_shared_list_reused_deeper_down_counts_its_own_depth(tmp_path):
    inner: list = []
    for _ in range(60):
        inner = [inner]  # 61 levels: fine where it first appears
    outer = inner
    for _ in range(50):
        outer = [outer]  # ... but 50 levels further down it reaches 111
    message, _ = refusal_of(safe_load, io.BytesIO(pickle.dumps([inner, outer])))
    assert message == "the pickle is nested deeper than 100 levels"


def test_short_repr_is_bounded_for_any_value():
    huge = shared_lists(60)  # 2**60 leaves: repr() would never finish
    assert short_repr(huge) == "[[[[...], [...]], [[...], [...]]], [[[...], [...]], [[...], [...]]]]"
    assert short_repr("x" * 10**7) == "'" + "x" * 196 + "..."  # 200 characters
    assert short_repr(7**100_000) == "<int of 280736 bits>"  # str() refuses ints of more than 4300 digits
    assert short_repr({1: ["a", (2,)], "k": None}) == "{1: ['a', (2,)], 'k': None}"
    assert len(short_repr(list(range(10**6)))) == 200


# ------------------------------------------------------------------------------------------- JSON files


def write_table(path: Path, **fields) -> Path:
    path.write_text(json.dumps({"format": "leftrefill-images", "version": 1, "root": ".", "images": {}, **fields}))
    return path


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    path = tmp_path / "images.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    message, _ = refusal_of(read_image_table, path)
    assert message == (f"{path}: not valid JSON for this reader: arrays or objects are nested thousands of "
                       f"levels deep")


def test_huge_json_values_are_quoted_in_a_few_characters(tmp_path):
    path = write_table(tmp_path / "images.json", format="f" * 10**7)
    message, _ = refusal_of(read_image_table, path)
    assert message == f"{path}: format is '{'f' * 196}..., expected 'leftrefill-images'"
    write_table(path, images={"1": ["p"] * 10**6})
    message, _ = refusal_of(read_image_table, path)
    assert message.startswith(f"{path}: image '1': the path must be a string, got ['p', 'p', ")
    assert len(message) < len(str(path)) + 300


def test_json_integers_and_paths_too_long_for_python_or_a_file_system(tmp_path):
    path = tmp_path / "images.json"
    path.write_text('{"format": "leftrefill-images", "version": 1, "root": ".", "images": {"0": ' + "1" * 5000 + "}}")
    message, _ = refusal_of(read_image_table, path)
    assert message.startswith(f"{path}: not valid JSON (Exceeds the limit (4300 digits) for integer string")
    write_table(path, images={"3": "a" * 5000})
    message, _ = refusal_of(read_image_table, path)
    assert message == (f"{path}: image '3': a path of 5000 characters ('{'a' * 56}...) is longer "
                       f"than any file system allows (4096)")


def test_a_missing_image_with_an_overlong_name_is_reported_not_raised(tmp_path):
    long_name = tmp_path / ("a" * 3000 + ".jpg")  # is_file() raises "File name too long" for this
    pairs = [Pair(0, long_name, long_name, "s", None)]
    message, _ = refusal_of(drop_missing_images, pairs)
    assert message.startswith("1 of 1 images listed in the pair list are missing, e.g. ")
    assert len(message) < 400


# ------------------------------------------------------------------------------- checkpoints with code


def payload(module: str, name: str, argument: str, protocol: int) -> bytes:
    """A pickle calling ``module.name(argument)``, written by hand (pickling the real function would
    name the module it lives in: posix, not os). Protocol 2 names it with GLOBAL, 4 with STACK_GLOBAL."""
    def text(value: str) -> bytes:
        data = value.encode()
        return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE

    if protocol == 2:
        callee = b"c" + f"{module}\n{name}\n".encode()  # GLOBAL
    else:
        callee = text(module) + text(name) + b"\x93"  # STACK_GLOBAL
    return bytes([0x80, protocol]) + callee + text(argument) + b"\x85R."  # TUPLE1, REDUCE, STOP


def zip_checkpoint(path: Path, data_pkl: bytes) -> Path:
    """A torch.save zip file whose data.pkl is replaced by ``data_pkl``."""
    torch.save({"w": torch.ones(2)}, path)
    original = path.with_suffix(".orig")
    shutil.move(path, original)
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            target.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else source.read(info))
    original.unlink()
    return path


def payload_cases(marker: Path) -> list[tuple[str, str, str]]:
    """(module, name, argument): each would create ``marker`` if it ran."""
    return [("posix", "system", f"touch {marker}"), ("os", "system", f"touch {marker}"),
            ("builtins", "eval", f"open({str(marker)!r}, 'w')"), ("__builtin__", "eval", f"open({str(marker)!r}, 'w')")]


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("case", range(4))
def test_pickled_code_is_refused_naming_the_global_whatever_torch_would_say(tmp_path, layout, protocol, case):
    marker = tmp_path / "payload_ran"
    module, name, argument = payload_cases(marker)[case]
    pickled = payload(module, name, argument, protocol)
    ops = [op.name for op, _, _ in pickletools.genops(pickled)]
    assert ops[-3:] == ["TUPLE1", "REDUCE", "STOP"] and ("GLOBAL" if protocol == 2 else "STACK_GLOBAL") in ops
    path = tmp_path / "evil.ckpt"
    if layout == "zip":
        zip_checkpoint(path, pickled)
    else:
        path.write_bytes(pickled)
    shown = f"{'builtins' if module == '__builtin__' else module}.{name}"  # Python 2 names as Python 3's
    expected = f"{path}: " + REFUSAL.format(what=f"the global {shown}")
    for load in (read_state_dict, check_resumable_checkpoint):
        message, _ = refusal_of(load, path)
        assert message == expected
        assert "weights_only" not in message and "will likely succeed" not in message
    assert not marker.exists()


class Custom:
    """A class a pickle names: loading it means importing and running this module's code."""


def test_a_class_in_a_lightning_checkpoint_is_refused_by_name(tmp_path):
    path = tmp_path / "custom.ckpt"
    torch.save({**lightning_checkpoint(), "hyper_parameters": Custom()}, path)
    message, _ = refusal_of(check_resumable_checkpoint, path)
    assert message == f"{path}: " + REFUSAL.format(what="the global test_hostile_files.Custom")


def test_torch_wording_is_recognised_when_the_scan_has_no_list(tmp_path, monkeypatch):
    """If torch keeps its list of allowed globals elsewhere one day, its own refusal is reworded."""
    monkeypatch.setattr("ldm.pickle_scan._allowed_globals", lambda: None)
    marker = tmp_path / "payload_ran"
    for (module, name, argument), shown in zip(payload_cases(marker)[:3], ["posix.system", "os.system", "eval"]):
        path = zip_checkpoint(tmp_path / "evil.ckpt", payload(module, name, argument, 2))
        message, _ = refusal_of(read_state_dict, path)
        assert message == f"{path}: " + REFUSAL.format(what=f"the global {shown}")
    assert not marker.exists()


def test_a_pickle_that_calls_a_huge_list_is_refused_before_torch_prints_it(tmp_path):
    # torch's loader puts the object it refuses to call into its message: str() of 2**40 items.
    pickled = b"\x80\x02]q\x00"
    for level in range(40):
        pickled += b"](h%ch%ce" % (level, level) + b"q%c" % (level + 1)  # [previous, previous]
    path = tmp_path / "dag.pt"
    path.write_bytes(pickled + b")R.")  # call it with ()
    message, peak = refusal_of(read_state_dict, path)
    assert message == (f"{path}: not a PyTorch checkpoint (its pickle calls an object that is not a named class "
                       f"or function (REDUCE); torch.save never writes that)")
    assert peak < MAX_PEAK_BYTES


def test_a_pickled_value_larger_than_the_limit_is_refused_unread(tmp_path):
    path = tmp_path / "big_string.pt"
    path.write_bytes(b"\x80\x02X" + struct.pack("<I", 2**31) + b"abc.")  # claims a 2 GiB string
    message, peak = refusal_of(read_state_dict, path)
    assert message == f"{path}: not a PyTorch checkpoint (its pickle holds a value of {2**31} bytes)"
    assert peak < MAX_PEAK_BYTES


def test_torch_advice_is_dropped_from_other_failures(tmp_path):
    path = tmp_path / "protocol4.pt"
    path.write_bytes(pickle.dumps({"w": 1.0}, protocol=4))
    with pytest.warns(UserWarning, match="protocol 4"):
        message, _ = refusal_of(read_state_dict, path)
    assert message == f"{path}: not a PyTorch checkpoint (UnpicklingError: Unsupported operand 149 (FRAME))"


# --------------------------------------------------------------------------------------------- resuming


def lightning_checkpoint() -> dict:
    """What Lightning's dump_checkpoint writes for this project's runs: the token table, AdamW state
    after one step, a scheduler, loop progress and ModelCheckpoint's state (paths as strings)."""
    tokens = torch.nn.Parameter(torch.randn(4, 8))
    optimizer = torch.optim.AdamW([tokens], lr=1e-3)
    tokens.grad = torch.ones_like(tokens)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    progress = {"total": {"ready": 4, "completed": 4}, "current": {"ready": 4, "completed": 4}}
    best = "/runs/tiny/ckpts/epoch=0-step=4.ckpt"
    return {
        "epoch": 0, "global_step": 4, "pytorch-lightning_version": "2.6.6",
        "state_dict": {"cond_stage_model.special_embeddings.weight": tokens.detach()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.batch_progress": {**progress, "is_last_batch": True}},
                  "validate_loop": {"state_dict": {}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/psnr', 'mode': 'max'}": {
            "monitor": "val/psnr", "best_model_score": torch.tensor(18.9), "best_model_path": best,
            "best_k_models": {best: torch.tensor(18.9)}, "kth_best_model_path": best, "last_model_path": "",
            "dirpath": "/runs/tiny/ckpts"}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "config",
    }


def test_a_lightning_training_checkpoint_is_resumable(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(), path)
    assert check_resumable_checkpoint(path) is None
    torch.save(lightning_checkpoint(), path, _use_new_zipfile_serialization=False)
    assert check_resumable_checkpoint(path) is None


def test_files_that_cannot_be_resumed_say_why(tmp_path):
    with pytest.raises(CheckpointError, match=r"^checkpoint to resume from not found: .*nowhere\.ckpt$"):
        check_resumable_checkpoint(tmp_path / "nowhere.ckpt")
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    message, _ = refusal_of(check_resumable_checkpoint, path)
    assert message == (f"{path}: not a training checkpoint to resume from: it has no 'pytorch-lightning_version', "
                       f"'loops', 'optimizer_states', 'lr_schedulers' (weights-only files such as the SD2 checkpoint "
                       f"or exported tokens cannot be resumed; pass <run>/ckpts/last.ckpt)")
    torch.save(lightning_checkpoint(), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"weights\.ckpt: incomplete checkpoint .*truncated download"):
        check_resumable_checkpoint(path)
    safetensors = tmp_path / "tokens.safetensors"
    safetensors.write_bytes(b"{}")
    with pytest.raises(CheckpointError, match=r"tokens\.safetensors: a \.safetensors file holds weights only"):
        check_resumable_checkpoint(safetensors)


def test_an_old_lightning_checkpoint_with_callback_state_loads_without_importing_lightning(tmp_path, monkeypatch):
    """CompVis/Stability LDM checkpoints (PyTorch Lightning 1.x) key their callback state by the callback class."""
    import sys
    import types

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    legacy = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = legacy
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "sd.ckpt"
    torch.save({"global_step": 7, "state_dict": {"model.w": torch.ones(2)},
                "callbacks": {legacy: {"best_model_path": "x.ckpt", "best_model_score": torch.tensor(0.5)}}}, path)
    monkeypatch.delitem(sys.modules, module.__name__)  # as on a machine without pytorch_lightning 1.x
    assert torch.equal(read_state_dict(path)["model.w"], torch.ones(2))
    assert "pytorch_lightning" not in sys.modules or not hasattr(sys.modules["pytorch_lightning"], "__file__")
