"""Multi-view prompt tokens (METHOD 3.2, 3.3): one id per view token, per-view contexts from one text pass,
the pose token per view, the self-attention grouping, and checkpoints trained for another number of views."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from open_clip.tokenizer import SimpleTokenizer

from conftest import ROOT
from ldm.attention import ViewGrouping
from ldm.checkpoint import CheckpointError
from ldm.latent_diffusion import model_builder
from leftrefill.model_dir import TOKEN_KEY, build_model, build_random, new_parameter_names, read_trained
from leftrefill.multiview_prompt import (MULTIVIEW_INIT_TEXT, MultiViewPosePromptCLIPEmbedder,
                                         MultiViewPromptCLIPEmbedder, view_token_strings)
from leftrefill.pose_prompt import NVS_INIT_TEXT
from leftrefill.prompt_tokens import DEFAULT_INIT_TEXT, special_token_strings

TINY_MV = ROOT / "checkpoints" / "tiny_random_multiview" / "model_config.yaml"
TINY_AR = ROOT / "checkpoints" / "tiny_random_nvs_autoregressive" / "model_config.yaml"
FULL_MV = ROOT / "checkpoints" / "multiview_ref_inpainting" / "model_config.yaml"
FULL_AR = ROOT / "checkpoints" / "nvs_autoregressive" / "model_config.yaml"
SOT, EOT, BASE = 49406, 49407, 49408


def _distinct_tokens_(embedder) -> None:
    """Distinct learned rows, as after training (at init all rows of a group are one mean embedding)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        table = embedder.special_embeddings.weight
        table.add_(0.5 * torch.randn(table.shape, generator=generator))


@pytest.fixture(scope="module")
def tiny():
    return build_random(model_builder(TINY_MV)).eval()


@pytest.fixture(scope="module")
def embedder(tiny) -> MultiViewPromptCLIPEmbedder:
    embedder = tiny.cond_stage_model
    _distinct_tokens_(embedder)
    return embedder


@pytest.fixture(scope="module")
def pose_embedder() -> MultiViewPosePromptCLIPEmbedder:
    embedder = build_random(model_builder(TINY_AR)).eval().cond_stage_model
    _distinct_tokens_(embedder)
    return embedder


# -- tokens --------------------------------------------------------------------------------------------------
def test_every_shared_and_view_token_is_one_id_and_a_view_prompt_is_52_ids(embedder):
    strings = special_token_strings(20) + view_token_strings(0, 30) + view_token_strings(1, 30)
    assert [embedder.tokenizer.encode(s) for s in strings] == [[BASE + i] for i in range(80)]
    for view in range(2):
        ids = embedder.tokenize([embedder.prompt_for_view(view)])[0].tolist()
        view_ids = list(range(BASE + 20 + 30 * view, BASE + 50 + 30 * view))
        assert ids == [SOT, *range(BASE, BASE + 20), *view_ids, EOT] + [0] * 25  # 52 ids, then padding
    prompt = embedder.prompt_for_view(1)  # shared tokens spaced, view tokens joined (METHOD 3.2)
    assert prompt.startswith("<special-token0> <special-token1> <special-token2>")
    assert "<special-token18> <special-token19><view_direct-1-0><view_direct-1-1>" in prompt
    assert prompt.endswith("<view_direct-1-28><view_direct-1-29>")


def test_view_tokens_registered_without_the_closing_bracket_fragment_as_in_the_release():
    """METHOD 7.4: the release registered ``<view_direct-j-l`` (no ``>``); the same check then fails."""
    released = SimpleTokenizer(additional_special_tokens=special_token_strings(20) + [
        token[:-1] for view in range(2) for token in view_token_strings(view, 30)])
    assert len(released.encode("<view_direct-0-1>")) > 1
    prompt = " ".join(special_token_strings(20)) + "".join(view_token_strings(0, 30))
    assert len(released.encode(prompt)) > 50


def test_one_table_of_20_plus_30_per_view_rows_under_the_released_key(tiny):
    assert tuple(tiny.state_dict()[TOKEN_KEY].shape) == (20 + 30 * 2, 64)
    assert new_parameter_names(tiny) == {TOKEN_KEY}
    embedder = MultiViewPromptCLIPEmbedder(num_views=3, arch=None, embed_dim=64,
                                           text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4,
                                                         layers=1))
    assert embedder.special_embeddings.weight.shape == (110, 64) and embedder.num_tokens == 110
    assert (embedder.num_shared_tokens, embedder.view_token_len, embedder.num_views) == (20, 30, 3)


def test_shared_rows_start_at_the_multiview_sentence_and_view_rows_at_the_two_part_one():
    embedder = build_random(model_builder(TINY_MV)).cond_stage_model  # tokens as initialised
    clip_rows = embedder.model.token_embedding.weight
    table = embedder.special_embeddings.weight
    shared = clip_rows[embedder.tokenizer.encode(MULTIVIEW_INIT_TEXT)].mean(dim=0)
    view = clip_rows[embedder.tokenizer.encode(DEFAULT_INIT_TEXT)].mean(dim=0)
    torch.testing.assert_close(table[:20], shared.expand(20, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(table[20:], view.expand(60, -1), atol=1e-6, rtol=0)
    assert not torch.allclose(shared, view)


def test_a_prompt_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match=r"SOT \+ 46 shared \+ 30 view tokens \+ EOT = 78 ids, exceeds "
                                         r"max_length = 77"):
        MultiViewPromptCLIPEmbedder(num_tokens=46, view_token_len=30, arch=None, embed_dim=8,
                                    text_cfg=dict(context_length=77, vocab_size=49408, width=8, heads=1, layers=1))


# -- contexts ------------------------------------------------------------------------------------------------
def test_item_i_gets_view_i_mod_v_context_from_one_text_pass(embedder, monkeypatch):
    with torch.no_grad():
        per_view = [embedder.encode([embedder.prompt_for_view(view)]) for view in range(2)]  # (1, 77, w) each
        calls = []
        encode_embeddings = embedder.encode_embeddings
        monkeypatch.setattr(embedder, "encode_embeddings", lambda x: calls.append(x.shape) or encode_embeddings(x))
        context = embedder.context({}, 6)  # b = 3 samples of 2 views, flattened (b v)
    assert context.shape == (6, 77, 64)
    assert calls == [(2, 77, 64)]  # one pass over the 2 view prompts, not one per item
    for i in range(6):
        torch.testing.assert_close(context[i:i + 1], per_view[i % 2], atol=1e-5, rtol=0)
    assert (context[0] - context[1]).abs().max() > 1e-3


def test_a_batch_that_is_not_whole_samples_of_views_is_refused(embedder, pose_embedder):
    with pytest.raises(ValueError, match=r"5 items are not a whole number of samples of num_views = 2 views"):
        embedder.context({}, 5)
    with pytest.raises(ValueError, match=r"4 items are not a whole number of samples of num_views = 3 views"):
        pose_embedder.context({"pose": torch.zeros(4, 4)}, 4)


def test_dropped_items_get_the_empty_context(embedder):
    drop = torch.tensor([False, True, False, False, True, False])
    with torch.no_grad():
        context = embedder.context({}, 6, drop=drop)
        kept, empty = embedder.context({}, 6), embedder.empty_context(6)
    assert torch.equal(context[drop], empty[drop]) and torch.equal(context[~drop], kept[~drop])
    assert embedder.empty_context(4).shape == (4, 77, 64)


# -- the pose conditioner ------------------------------------------------------------------------------------
def test_pose_conditioner_has_the_autoregressive_defaults(pose_embedder):
    assert pose_embedder.condition_keys == ("pose",) and pose_embedder.init_text == NVS_INIT_TEXT
    assert pose_embedder.view_init_text == MULTIVIEW_INIT_TEXT
    assert pose_embedder.pose_index == 74  # 1 + 43 + 30: the EOT slot after a view's prompt
    assert pose_embedder.tokenize([pose_embedder.prompt_for_view(2)])[0, 74].item() == EOT
    assert set(pose_embedder.new_modules()) == {"special_embeddings", "pose_mlp"}
    assert pose_embedder.special_embeddings.weight.shape == (43 + 30 * 3, 64)


def test_each_view_gets_its_own_pose_token_at_index_74(pose_embedder, monkeypatch):
    pose = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    seen = {}
    monkeypatch.setattr(pose_embedder, "encode_embeddings", lambda x: seen.setdefault("x", x))
    embeddings = pose_embedder.context({"pose": pose}, 6)
    with torch.no_grad():
        tokens = pose_embedder.embed_tokens(pose_embedder.tokenize(pose_embedder.prompts))  # (3, 77, w)
        pose_tokens = pose_embedder.pose_mlp(pose)
    assert torch.equal(embeddings[:, 74], pose_tokens)
    keep = [i for i in range(77) if i != 74]
    assert torch.equal(embeddings[:, keep], tokens[[0, 1, 2, 0, 1, 2]][:, keep])


def test_a_pose_changes_only_its_own_item(pose_embedder):
    pose = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    moved = pose.clone()
    moved[4] += 0.5
    with torch.no_grad():
        a, b = pose_embedder.context({"pose": pose}, 6), pose_embedder.context({"pose": moved}, 6)
    differs = (a - b).abs().amax(dim=(1, 2)) > 1e-4
    assert differs.tolist() == [False, False, False, False, True, False]
    torch.testing.assert_close(a[[0, 1, 2, 3, 5]], b[[0, 1, 2, 3, 5]], atol=1e-6, rtol=0)


def test_pose_conditioner_needs_the_pose_and_drops_to_the_empty_string(pose_embedder):
    with pytest.raises(ValueError, match=r"the batch has no 'pose'"):
        pose_embedder.context({}, 3)
    drop = torch.tensor([True, False, False])
    pose = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = pose_embedder.context({"pose": pose}, 3, drop=drop)
        kept, empty = pose_embedder.context({"pose": pose}, 3), pose_embedder.empty_context(1)
    torch.testing.assert_close(context[:1], empty, atol=1e-5, rtol=0)
    torch.testing.assert_close(context[1:], kept[1:], atol=1e-5, rtol=0)


# -- the self-attention grouping -----------------------------------------------------------------------------
def test_grouping_is_joint_over_the_views_and_causal_for_autoregressive_nvs(embedder, pose_embedder):
    full, causal = embedder.grouping(), pose_embedder.grouping()
    assert isinstance(full, ViewGrouping) and (full.num_views, full.causal) == (2, False)
    assert isinstance(causal, ViewGrouping) and (causal.num_views, causal.causal) == (3, True)


def test_concat_target_gives_the_concat_target_grouping():
    from ldm.attention import ConcatTargetGrouping

    embedder = MultiViewPromptCLIPEmbedder(num_views=3, concat_target=True, arch=None, embed_dim=8,
                                           text_cfg=dict(context_length=77, vocab_size=49408, width=8, heads=1,
                                                         layers=1))
    grouping = embedder.grouping()
    assert isinstance(grouping, ConcatTargetGrouping) and grouping.num_views == 3


# -- checkpoints and model configs ---------------------------------------------------------------------------
def test_a_token_file_for_two_views_is_refused_by_a_four_view_model_naming_the_views(tmp_path):
    config = OmegaConf.load(TINY_MV)
    config.model.params.cond_stage_config.params.num_views = 4
    OmegaConf.save(config, tmp_path / "model_config.yaml")
    path = tmp_path / "two_views.ckpt"
    torch.save({"state_dict": {TOKEN_KEY: torch.zeros(20 + 30 * 2, 64)}}, path)
    with torch.device("meta"):
        model = model_builder(tmp_path / "model_config.yaml")()
    expected = (r"holds 80 prompt tokens \(20 shared \+ 30 x 2 views\), but the model config expects 140 prompt "
                r"tokens \(20 shared \+ 30 x 4 views\): the checkpoint was trained for another number of views "
                r"\(num_views in cond_stage_config\)")
    with pytest.raises(CheckpointError, match=expected):
        read_trained(path, model)
    with pytest.raises(CheckpointError, match="number of views"):
        build_model(model_builder(tmp_path / "model_config.yaml"), trained=path, random_init=True)


def test_tiny_autoregressive_nvs_config_builds(pose_embedder):
    assert isinstance(pose_embedder, MultiViewPosePromptCLIPEmbedder)
    assert (pose_embedder.num_views, pose_embedder.causal, pose_embedder.pose_mlp[0].out_features) == (3, True, 32)


def test_full_size_multiview_configs_build_with_the_paper_shapes():
    with torch.device("meta"):
        inpainting = model_builder(FULL_MV)().cond_stage_model
        nvs = model_builder(FULL_AR)().cond_stage_model
    assert type(inpainting) is MultiViewPromptCLIPEmbedder and inpainting.grouping().causal is False
    assert inpainting.special_embeddings.weight.shape == (20 + 30 * 4, 1024) and inpainting.num_views == 4
    assert isinstance(nvs, MultiViewPosePromptCLIPEmbedder) and nvs.grouping().causal is True
    assert nvs.special_embeddings.weight.shape == (43 + 30 * 4, 1024) and nvs.pose_index == 74
    assert nvs.pose_mlp[0].out_features == 512
