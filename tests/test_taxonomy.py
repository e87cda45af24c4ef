import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synfer_ray import taxonomy
from synfer_ray.errors import SynferError

seeds = st.integers(min_value=0, max_value=2**63 - 1)
classes7 = st.sampled_from(taxonomy.AFFECTNET_7)
au_sets = st.sampled_from([taxonomy.FINEFACE_12, taxonomy.OPENGRAPHAU_41])


def test_sets_have_the_documented_sizes():
    assert len(taxonomy.AFFECTNET_7) == 7 and len(taxonomy.AFFECTNET_8) == 8
    assert taxonomy.AFFECTNET_8[-1] == "contempt"
    assert len(taxonomy.FINEFACE_12) == 12 and len(set(taxonomy.OPENGRAPHAU_41)) == 41


@given(seed=seeds, expression=classes7, au_names=au_sets)
def test_same_seed_same_row(seed, expression, au_names):
    first = (taxonomy.sample_target_aus(seed, expression, au_names), taxonomy.build_prompt(seed, expression))
    again = (taxonomy.sample_target_aus(seed, expression, au_names), taxonomy.build_prompt(seed, expression))
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]
    assert taxonomy.sample_expression(seed, taxonomy.AFFECTNET_7) == taxonomy.sample_expression(
        seed, taxonomy.AFFECTNET_7)


@given(seed=seeds, expression=st.sampled_from(taxonomy.AFFECTNET_8), au_names=au_sets,
       jitter=st.floats(0, 2))
def test_au_values_within_unit_interval(seed, expression, au_names, jitter):
    aus = taxonomy.sample_target_aus(seed, expression, au_names, jitter=jitter)
    assert aus.shape == (len(au_names),) and aus.dtype == np.float32
    assert np.all((aus >= 0) & (aus <= 1))


@settings(max_examples=20)
@given(start=st.integers(0, 10**9))
def test_every_class_reachable(start):
    for classes in (taxonomy.AFFECTNET_7, taxonomy.AFFECTNET_8):
        drawn = {taxonomy.sample_expression(start + i, classes) for i in range(400)}
        assert drawn == set(classes)


def test_class_mix_is_followed():
    weights = taxonomy.class_mix_weights(taxonomy.AFFECTNET_7, {"happy": 3, "sad": 1})
    drawn = [taxonomy.sample_expression(i, taxonomy.AFFECTNET_7, weights) for i in range(2000)]
    assert set(drawn) == {"happy", "sad"}
    assert 0.7 < drawn.count("happy") / len(drawn) < 0.8


def test_prototypes_follow_emfacs():
    happy = dict(zip(taxonomy.FINEFACE_12, taxonomy.prototype_aus("happy", taxonomy.FINEFACE_12)))
    assert happy["AU6"] > 0 and happy["AU12"] > 0 and happy["AU4"] == 0
    assert not taxonomy.prototype_aus("neutral", taxonomy.FINEFACE_12).any()
    contempt = dict(zip(taxonomy.OPENGRAPHAU_41, taxonomy.prototype_aus("contempt", taxonomy.OPENGRAPHAU_41)))
    assert contempt["AUR12"] > 0 and contempt["AUL12"] == 0  # one-sided


def test_prompt_names_the_expression_and_varies_with_seed():
    prompts = {taxonomy.build_prompt(seed, "surprise") for seed in range(50)}
    assert len(prompts) > 40
    assert all(any(p in prompt for p in taxonomy.EXPRESSION_PHRASES["surprise"]) for prompt in prompts)


def test_aliases_and_bad_names():
    assert taxonomy.canonical_expression("Angry", taxonomy.AFFECTNET_7) == "anger"
    with pytest.raises(SynferError, match="expression.*'grumpy'.*neutral"):
        taxonomy.canonical_expression("grumpy", taxonomy.AFFECTNET_7)
    with pytest.raises(SynferError, match="contempt"):
        taxonomy.canonical_expression("contempt", taxonomy.AFFECTNET_7)
    with pytest.raises(SynferError, match=r"class_mix"):
        taxonomy.class_mix_weights(taxonomy.AFFECTNET_7, {"happy": 0})
    with pytest.raises(SynferError, match="seed"):
        taxonomy.build_prompt(-1, "happy")


def test_action_units_from_mapping_checks_names_and_range():
    aus = taxonomy.ActionUnits.from_mapping({"AU12": 0.8}, taxonomy.FINEFACE_12)
    assert aus.as_array()[taxonomy.FINEFACE_12.index("AU12")] == pytest.approx(0.8)
    with pytest.raises(SynferError, match=r"aus: got 'AU7'; expected an AU name of this bundle"):
        taxonomy.ActionUnits.from_mapping({"AU7": 0.5}, taxonomy.FINEFACE_12)
    with pytest.raises(SynferError, match=r"aus\.AU12.*\[0, 1\]"):
        taxonomy.ActionUnits.from_mapping({"AU12": 1.5}, taxonomy.FINEFACE_12)


def test_cycled_manifest_gives_equal_counts_per_class_in_every_prefix():
    from synfer_ray.data.manifest import ManifestSpec, manifest_rows
    classes = taxonomy.AFFECTNET_7
    spec = ManifestSpec(seed=3, classes=classes, class_weights=(1 / 7,) * 7, au_names=taxonomy.FINEFACE_12,
                        class_assignment="cycled")
    rows = manifest_rows(spec, 0, 70)
    assert [r.target for r in rows[:7]] == list(classes)
    assert all(sum(r.target == c for r in rows) == 10 for c in classes)
    assert manifest_rows(spec, 21, 28)[3].seed == rows[24].seed  # still a pure function of the index


def test_expression_captions_say_only_the_expression_in_varied_wording():
    attribute_words = {word for options in taxonomy.PROMPT_ATTRIBUTES.values() for option in options
                       for word in option.split()} - {"a", "with", "no", "face"}
    for expression in taxonomy.AFFECTNET_7:
        captions = {taxonomy.build_prompt(seed, expression, style="expression") for seed in range(60)}
        assert len(captions) >= 8  # varied wording
        for caption in captions:
            assert any(phrase in caption for phrase in taxonomy.EXPRESSION_PHRASES[expression])
            assert not set(caption.replace(",", " ").split()) & attribute_words, caption
    assert taxonomy.build_prompt(3, "happy") == taxonomy.build_prompt(3, "happy", style="attributes")
    with pytest.raises(SynferError, match="captions"):
        taxonomy.build_prompt(3, "happy", style="poetic")


def test_class_balanced_repeats_even_out_the_classes():
    from synfer_ray.train.generator import class_repeats
    counts = {"neutral": 4965, "happy": 7215, "disgust": 436, "sad": 4830}
    classes = ["neutral", "happy", "disgust", "sad"]
    repeats = class_repeats(counts, classes, 1.0)
    shares = np.array([counts[c] for c in classes]) * repeats
    assert repeats[2] == 17 and shares.max() / shares.min() < 1.6  # whole repeats: even up to rounding
    assert list(class_repeats(counts, classes, 0.0)) == [1, 1, 1, 1]
