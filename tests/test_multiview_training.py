"""Multi-view training (METHOD 3.2, 3.3) on the tiny configs and the bundled data: the target-view loss, one
timestep per sample, the joint attention installed for the loss only, view-count checks, and both tiny
configs trained and validated from the command line."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import train_inpainting
from conftest import ROOT
from ldm.attention import BasicTransformerBlock, ViewGrouping
from leftrefill.model_dir import TOKEN_KEY, resolve_model_dir
from leftrefill.multiview_inpaint import ViewCountError
from leftrefill.multiview_module import AutoregressiveNVSModule, MultiViewRefModule
from leftrefill.train_config import load_training_config
from leftrefill.trainer import build_training_model

CONFIGS = ROOT / "configs"
TINY_MULTIVIEW = CONFIGS / "tiny_multiview_ref_inpainting.yaml"
TINY_AUTOREGRESSIVE = CONFIGS / "tiny_nvs_autoregressive.yaml"


def module_of(config_path, cls):
    config = load_training_config(config_path)
    spec = config.model
    module = cls(build_training_model(spec.config, spec.base_checkpoint, spec.random_init, None), config)
    module.log = lambda *args, **kwargs: None  # no Trainer here
    return module


def ref_batch(samples: int = 2, references: int = 1, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(samples, 1, size, size)
    mask[..., 8:24, 8:24] = 1
    return {"target": torch.rand(samples, 3, size, size, generator=g) * 2 - 1, "mask": mask,
            "references": torch.rand(samples, references, 3, size, size, generator=g) * 2 - 1,
            "id": torch.arange(samples), "index": torch.arange(samples)}


class ModelCalls:
    """Wraps model.apply_model: records t and the UNet's grouping at each call; ``offset`` (n,) is added to
    the prediction of each item (to see which items the loss reads)."""

    def __init__(self, model, monkeypatch, offset=None):
        self.calls, self.offset = [], offset
        original, unet = model.apply_model, model.model.diffusion_model
        blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]

        def recorded(x, t, cond):
            self.calls.append((t.clone(), blocks[0].self_attention_grouping))
            eps = original(x, t, cond)
            return eps if self.offset is None else eps + self.offset.view(-1, 1, 1, 1).to(eps)

        monkeypatch.setattr(model, "apply_model", recorded)
        self.blocks = blocks


def test_the_loss_reads_the_target_view_only(monkeypatch):
    """reduced_loss (METHOD 3.2): a wrong prediction on a reference view does not change the loss, one on the
    target view does."""
    module = module_of(TINY_MULTIVIEW, MultiViewRefModule)
    batch = ref_batch()  # 2 samples x 2 views: items 0 and 2 are targets

    def loss_with(offset):
        ModelCalls(module.model, monkeypatch, offset)
        torch.manual_seed(0)
        return module.training_step(batch, 0).item()

    base = loss_with(torch.zeros(4))
    assert loss_with(torch.tensor([0.0, 5.0, 0.0, 5.0])) == pytest.approx(base, rel=1e-6)
    assert loss_with(torch.tensor([5.0, 0.0, 0.0, 0.0])) > base + 1.0


def test_views_share_a_timestep_and_attend_jointly_during_the_loss_only(monkeypatch):
    module = module_of(TINY_MULTIVIEW, MultiViewRefModule)
    calls = ModelCalls(module.model, monkeypatch)
    torch.manual_seed(3)
    module.training_step(ref_batch(samples=4), 0)
    [(t, grouping)] = calls.calls
    assert torch.equal(t[0::2], t[1::2]) and len(set(t[0::2].tolist())) > 1  # per sample, not per batch
    assert isinstance(grouping, ViewGrouping) and grouping.num_views == 2 and not grouping.causal
    assert all(block.self_attention_grouping is None for block in calls.blocks)


def test_the_loss_depends_on_the_references():
    """With the joint attention, a reference changes the target view's prediction, hence the loss."""
    module = module_of(TINY_MULTIVIEW, MultiViewRefModule)
    batch = ref_batch()
    other = dict(batch, references=-batch["references"])
    losses = []
    for b in (batch, other):
        torch.manual_seed(0)
        losses.append(module.training_step(b, 0).item())
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)


def test_a_dataset_with_another_number_of_references_is_refused():
    module = module_of(TINY_MULTIVIEW, MultiViewRefModule)
    with pytest.raises(ViewCountError, match=r"gives 3 reference\(s\) per sample, but the model config has "
                                             r"num_views=2 \(1 reference\(s\)\)"):
        module.training_step(ref_batch(references=3), 0)


def nvs_batch(samples: int = 1, views: int = 3, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(samples, views, 1, size, size)
    mask[..., 4:28, 4:28] = 1
    return {"reference": torch.rand(samples, 3, size, size, generator=g) * 2 - 1,
            "target": torch.rand(samples, views, 3, size, size, generator=g) * 2 - 1, "mask": mask,
            "pose": torch.randn(samples, views, 4, generator=g), "id": ["a"] * samples,
            "index": torch.arange(samples)}


def test_autoregressive_nvs_trains_every_view_under_the_causal_mask(monkeypatch):
    """Teacher forcing (METHOD 3.3): the loss reads every view, each canvas [reference | target_i] with its own
    pose, one timestep per sample, the block-causal grouping installed for the forward pass only."""
    module = module_of(TINY_AUTOREGRESSIVE, AutoregressiveNVSModule)
    batch = nvs_batch()

    def loss_with(offset):
        calls = ModelCalls(module.model, monkeypatch, offset)
        torch.manual_seed(0)
        return module.training_step(batch, 0).item(), calls

    base, calls = loss_with(torch.zeros(3))
    [(t, grouping)] = calls.calls
    assert isinstance(grouping, ViewGrouping) and grouping.causal and grouping.num_views == 3
    assert len(set(t.tolist())) == 1
    for view in range(3):  # every view counts
        offset = torch.zeros(3)
        offset[view] = 5.0
        assert loss_with(offset)[0] > base + 0.5
    with pytest.raises(ViewCountError, match="gives 2 target views per object, but the model config has num_views=3"):
        module.training_step(nvs_batch(views=2), 0)


@pytest.mark.parametrize("config, name, rows", [(TINY_MULTIVIEW, "tiny_mv", 20 + 30 * 2),
                                                (TINY_AUTOREGRESSIVE, "tiny_nvs_ar", 43 + 30 * 3)])
def test_tiny_multiview_configs_train_and_validate_from_the_command_line(tmp_path, config, name, rows):
    args = ["--config_file", str(config), "--exp_name", name, "--accelerator", "cpu", "--output_dir", str(tmp_path)]
    L.seed_everything(0)
    assert train_inpainting.main(args) == 0
    run = tmp_path / name
    index = (run / "ckpts" / "index.json").read_text()
    assert '"monitor": "val/psnr"' in index and re.search(r'"best_score": \d+\.\d+', index)
    checkpoint = torch.load(resolve_model_dir(run).weights, weights_only=True)
    assert checkpoint["state_dict"][TOKEN_KEY].shape == (rows, 64)
    saved = OmegaConf.load(run / "training_config.yaml")
    assert saved.model.training_module.startswith("leftrefill.multiview_module.")


@pytest.mark.parametrize("name, module", [("multiview_ref_inpainting_training_config", "MultiViewRefModule"),
                                          ("nvs_autoregressive_training_config", "AutoregressiveNVSModule")])
def test_full_size_configs_match_the_model_directories_view_count(name, module):
    config = load_training_config(CONFIGS / f"{name}.yaml")
    model_config = OmegaConf.load(ROOT / config.model.config)
    views = model_config.model.params.cond_stage_config.params.num_views
    assert config.data.params.num_views == views == config.validation.params.num_views == 4
    assert config.model.training_module == f"leftrefill.multiview_module.{module}"
    assert [group.parameters[0] for group in config.trainable] == [TOKEN_KEY]


def test_concat_target_views_train_and_fill_with_one_target_copy(tmp_path):
    """The concat_target option (METHOD 3.1): each view a stitched [reference_i | target], as many views as
    references; the loss reads view 0, and filling keeps the target's pixels outside the mask and depends on
    every reference."""
    from leftrefill.multiview_inpaint import inpaint_views

    model_config = OmegaConf.load(ROOT / "checkpoints" / "tiny_random_multiview" / "model_config.yaml")
    model_config.model.params.cond_stage_config.params.concat_target = True
    (tmp_path / "model_config.yaml").write_text(OmegaConf.to_yaml(model_config))
    config = OmegaConf.load(TINY_MULTIVIEW)
    config.model.config = str(tmp_path / "model_config.yaml")
    OmegaConf.save(config, tmp_path / "concat.yaml")
    module = module_of(tmp_path / "concat.yaml", MultiViewRefModule)
    batch = ref_batch(references=2)  # 2 views = 2 references with concat_target
    torch.manual_seed(0)
    assert torch.isfinite(module.training_step(batch, 0))
    with pytest.raises(ViewCountError, match="trained for 2 views, i.e. 2 reference"):
        inpaint_views(module.model, batch["references"][:, :1], batch["target"], batch["mask"], steps=2)
    fill = lambda references: inpaint_views(module.model.eval(), references, batch["target"], batch["mask"],
                                            steps=2, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    filled = fill(batch["references"])
    outside = batch["mask"].expand_as(filled) < 0.5
    assert torch.equal(filled[outside], batch["target"][outside])
    for view in range(2):
        other = batch["references"].clone()
        other[:, view] = -other[:, view]
        assert not torch.allclose(fill(other), filled, atol=1e-5)
