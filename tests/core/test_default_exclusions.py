"""The default roles keep embedding-like 2-D weights out of DRM: token, position and segment embeddings,
T5's relative attention bias and LM heads take the TIES-like path (elect, disjoint mean); a 2-D weight
with none of those names goes through DRM."""

import warnings

import numpy as np
import pytest

import drm_jax
import merge_reference as ref

EXCLUDED = [
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",  # T5
    "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "bert.embeddings.position_embeddings.weight",  # BERT
    "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.word_embeddings.weight",
    "transformer.wpe.weight",  # GPT-2
    "transformer.wte.weight",
    "model.embed_tokens.weight",  # Llama
    "lm_head.weight",
]
LINEAR = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def merged():
    rng = np.random.default_rng(0)
    names = EXCLUDED + [LINEAR]
    # one shape for all: a single stacked group, one compiled program per path
    base = {n: rng.standard_normal((12, 8)).astype(np.float32) for n in names}
    models = [{n: v + (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in base.items()}
              for _ in range(3)]
    return base, models, drm_jax.merge(base, models, method="drm")


def _deltas(base, models, name):
    return np.stack([m[name] - base[name] for m in models]).astype(np.float64)


@pytest.mark.parametrize("name", EXCLUDED)
def test_embedding_like_weights_take_the_ties_like_path(merged, name):
    base, models, out = merged
    d = _deltas(base, models, name)
    got = np.asarray(out[name], np.float64) - base[name]
    assert ref.relative_error(got, ref.ties_like(d)) < 1e-6
    assert ref.relative_error(got, ref.drm_h(d)) > 1e-2  # DRM would give another result


def test_other_linear_weights_go_through_drm(merged):
    base, models, out = merged
    got = np.asarray(out[LINEAR], np.float64) - base[LINEAR]
    assert ref.relative_error(got, ref.drm_h(_deltas(base, models, LINEAR))) < 1e-4


def test_a_drm_merge_with_no_decomposed_leaf_warns_naming_the_method():
    rng = np.random.default_rng(1)
    base = {"model.embed_tokens.weight": rng.standard_normal((6, 4)).astype(np.float32),
            "model.norm.weight": rng.standard_normal(4).astype(np.float32)}
    models = [{n: v + np.float32(0.1) * (i + 1) for n, v in base.items()} for i in range(2)]
    with pytest.warns(UserWarning, match="method drm: no leaf went through its decomposition"):
        drm_jax.merge(base, models, method="drm")
    with pytest.warns(UserWarning, match="method knots_ties: no leaf"):
        drm_jax.prepare(base, models, method="knots_ties")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one path for every leaf: nothing to say
        drm_jax.prepare(base, models, method="task_arithmetic")
        # a 2-D weight outside the embeddings goes through the decomposition: no warning either
        drm_jax.prepare({**base, LINEAR: base["model.embed_tokens.weight"]},
                        [{**m, LINEAR: m["model.embed_tokens.weight"]} for m in models], method="drm")
