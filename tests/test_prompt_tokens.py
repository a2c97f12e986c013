"""LeftRefill prompt tuning: token ids, lookup, initialisation, released weights, parity with open_clip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from open_clip.transformer import TextTransformer

from ldm.checkpoint import load_weights, read_state_dict
from leftrefill.prompt_tokens import DEFAULT_INIT_TEXT, PromptCLIPEmbedder
from tests.conftest import ROOT, perturb_

RELEASED = ROOT / "checkpoints" / "ref_guided_inpainting" / "ckpts" / "epoch=7-step=6039.ckpt"
TINY_TEXT = dict(arch=None, embed_dim=64, text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3))


@pytest.fixture(scope="module")
def embedder() -> PromptCLIPEmbedder:
    torch.manual_seed(0)
    encoder = PromptCLIPEmbedder(num_tokens=50, **TINY_TEXT)
    perturb_(encoder.model)
    encoder.reset_prompt_tokens()
    with torch.no_grad():  # distinct learned rows, as after training
        encoder.special_embeddings.weight.add_(torch.randn(50, 64) * 0.5)
    return encoder


def test_prompt_token_ids_follow_the_base_vocabulary(embedder):
    tokens = embedder.tokenize([embedder.prompt, ""])
    assert embedder.prompt.split(" ")[0] == "<special-token0>" and len(embedder.prompt.split(" ")) == 50
    assert tokens[0].tolist() == [49406] + list(range(49408, 49458)) + [49407] + [0] * 25
    assert tokens[1, :3].tolist() == [49406, 49407, 0]


def test_lookup_takes_learned_rows_for_special_ids_and_clip_rows_otherwise(embedder):
    tokens = embedder.tokenize(["<special-token3> a photo <special-token49>"])
    assert tokens[0, :6].tolist() == [49406, 49411, 320, 1125, 49457, 49407]
    rows = embedder.embed_tokens(tokens)[0]
    assert torch.equal(rows[1], embedder.special_embeddings.weight[3])
    assert torch.equal(rows[4], embedder.special_embeddings.weight[49])
    assert torch.equal(rows[2], embedder.model.token_embedding.weight[320])
    assert torch.equal(rows[0], embedder.model.token_embedding.weight[49406])


def test_tokens_start_as_the_mean_embedding_of_the_init_sentence():
    encoder = perturb_(PromptCLIPEmbedder(num_tokens=50, **TINY_TEXT))
    encoder.reset_prompt_tokens()
    ids = encoder.tokenizer.encode(DEFAULT_INIT_TEXT)
    assert 49406 not in ids and 49407 not in ids and len(ids) > 20
    expected = encoder.model.token_embedding.weight[ids].mean(dim=0)
    table = encoder.special_embeddings.weight
    assert torch.allclose(table, expected.expand_as(table), atol=1e-6)
    assert encoder.special_embeddings.weight.requires_grad
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_context_equals_open_clip_text_transformer_on_the_same_embeddings(embedder):
    # open_clip's own TextTransformer, one block shorter (= SD2's penultimate layer), same weights.
    reference = TextTransformer(context_length=77, vocab_size=49408, width=64, heads=4, layers=2, output_dim=64).eval()
    missing, unexpected = reference.load_state_dict(
        {k: v for k, v in embedder.model.state_dict().items() if not k.startswith("transformer.resblocks.2.")},
        strict=False)
    assert not missing and unexpected == ["logit_scale"]
    tokens = embedder.tokenize([embedder.prompt, ""])
    with torch.no_grad():
        embeddings = embedder.embed_tokens(tokens)
        x = reference.transformer(embeddings + reference.positional_embedding, attn_mask=reference.attn_mask)
        expected = reference.ln_final(x)
        ours = embedder([embedder.prompt, ""])
    assert ours.shape == (2, 77, 64)
    assert (ours - expected).abs().max().item() <= 1e-5
    # The unconditional context involves no learned token: changing the table leaves it unchanged.
    with torch.no_grad():
        saved = embedder.special_embeddings.weight.clone()
        embedder.special_embeddings.weight.mul_(-1)
        assert torch.allclose(embedder([""]), ours[1:], atol=1e-6)  # batch 1 vs 2: rounding only
        assert not torch.allclose(embedder([embedder.prompt]), ours[:1])
        embedder.special_embeddings.weight.copy_(saved)


def test_released_tokens_load_bit_exactly():
    state_dict = read_state_dict(RELEASED)
    assert list(state_dict) == ["cond_stage_model.special_embeddings.weight"]
    released = state_dict["cond_stage_model.special_embeddings.weight"]
    assert released.shape == (50, 1024) and released.dtype == torch.float32
    encoder = PromptCLIPEmbedder(num_tokens=50, arch=None, embed_dim=1024,
                                 text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=1))
    # The project's strict loader; only the frozen CLIP weights may be absent from a token checkpoint.
    load_weights(encoder, {k.removeprefix("cond_stage_model."): v for k, v in state_dict.items()}, source=RELEASED,
                 allow_missing=lambda key: key.startswith("model."))
    assert torch.equal(encoder.special_embeddings.weight, released)
    assert Path(RELEASED).stat().st_size == 720_347


def test_too_many_tokens_for_the_context_are_rejected():
    with pytest.raises(ValueError, match=r"num_tokens must be in \[1, 75\]"):
        PromptCLIPEmbedder(num_tokens=76, **TINY_TEXT)


def test_model_directories_put_the_token_table_under_cond_stage_model():
    from ldm.latent_diffusion import load_model
    from ldm.util import load_config

    model = load_model(ROOT / "checkpoints" / "tiny_random" / "model_config.yaml")
    assert model.state_dict()["cond_stage_model.special_embeddings.weight"].shape == (50, 64)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and name.startswith("cond_stage_model")]
    assert trainable == ["cond_stage_model.special_embeddings.weight"]
    released = load_config(ROOT / "checkpoints" / "ref_guided_inpainting" / "model_config.yaml")
    assert released.model.params.cond_stage_config.target == "leftrefill.prompt_tokens.PromptCLIPEmbedder"
    assert released.model.params.cond_stage_config.params.num_tokens == 50
