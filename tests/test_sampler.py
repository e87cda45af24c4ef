import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synfer_ray import taxonomy
from synfer_ray.errors import SynferError
from synfer_ray.generator.sampler import SampleRequest, SamplerSettings


def rows(bundle, expression="sad", seeds=(0, 1, 2, 3)):
    return [SampleRequest(seed=s, prompt=taxonomy.build_prompt(s, expression),
                          aus=taxonomy.sample_target_aus(s, expression, bundle.au_names).tolist(),
                          target=expression) for s in seeds]


def test_same_row_same_bytes(sampler, tiny_bundle):
    settings = SamplerSettings(steps=8, sg_scale=3.0)
    first = sampler.generate(rows(tiny_bundle), settings)
    again = sampler.generate(rows(tiny_bundle), settings)
    assert first.shape == (4, 48, 48, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    # A row depends on its batch neighbours only through float rounding.
    alone = sampler.generate(rows(tiny_bundle, seeds=(2,)), settings)
    assert np.abs(alone[0].astype(int) - first[2]).max() <= 1


def test_seed_prompt_and_target_change_the_image(sampler, tiny_bundle):
    settings = SamplerSettings(steps=8, sg_scale=3.0)
    base = sampler.generate(rows(tiny_bundle, seeds=(5,)), settings)[0]
    other_seed = sampler.generate(rows(tiny_bundle, seeds=(6,)), settings)[0]
    row = rows(tiny_bundle, seeds=(5,))[0]
    other_target = sampler.generate([SampleRequest(row.seed, row.prompt, row.aus, "happy")], settings)[0]
    assert not np.array_equal(base, other_seed)
    assert not np.array_equal(base, other_target)


def test_matches_diffusers_stable_diffusion_pipeline(sampler, tiny_bundle, tiny_bundle_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_bundle_path, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    requests = rows(tiny_bundle)
    peer = pipe([r.prompt for r in requests], num_inference_steps=12, guidance_scale=3.0, height=48, width=48,
                generator=[torch.Generator().manual_seed(r.seed) for r in requests], output_type="np").images
    ours = sampler.generate_float(requests, SamplerSettings(steps=12, cfg_scale=3.0, au_scale=0.0))
    max_abs = np.abs(peer - ours.permute(0, 2, 3, 1).numpy()).max()
    print(f"max abs pixel difference vs diffusers StableDiffusionPipeline: {max_abs:.2e}")
    assert max_abs < 1e-5


def test_au_scale_zero_is_text_only_and_au_scale_matters(sampler, tiny_bundle):
    requests = rows(tiny_bundle)
    zero_aus = [SampleRequest(r.seed, r.prompt, [0.0] * len(r.aus), r.target) for r in requests]
    text_only = sampler.generate_float(requests, SamplerSettings(steps=8, au_scale=0.0))
    # With au_scale 0 the AU values are ignored entirely.
    assert torch.equal(text_only, sampler.generate_float(zero_aus, SamplerSettings(steps=8, au_scale=0.0)))
    with_aus = sampler.generate_float(requests, SamplerSettings(steps=8, au_scale=1.0))
    stronger = sampler.generate_float(requests, SamplerSettings(steps=8, au_scale=2.0))
    assert (with_aus - text_only).abs().max() > 1e-2
    assert (stronger - text_only).abs().mean() > (with_aus - text_only).abs().mean()


def test_semantic_guidance_lowers_the_guides_loss(sampler, tiny_bundle):
    classifier = tiny_bundle.sg_classifier
    for expression in ("sad", "happy"):
        requests = rows(tiny_bundle, expression, seeds=range(6))
        targets = torch.tensor([classifier.classes.index(expression)] * len(requests))

        def loss(sg_scale):
            images = sampler.generate_float(requests, SamplerSettings(steps=10, sg_scale=sg_scale))
            with torch.no_grad():
                return F.cross_entropy(classifier(images), targets, reduction="none")

        off, on = loss(0.0), loss(8.0)
        print(f"{expression}: guide's CE without SG {off.mean():.4f}, with SG {on.mean():.4f}")
        assert torch.all(on < off)


def late_step(sampler, bundle, requests):
    """A late DDIM step (8 of 10) of ``requests``: its x_t, alpha_bar, the conditions SG may steer,
    and the model output as a function of them."""
    from synfer_ray.generator.schedulers import alpha_bar_at, make_scheduler
    scheduler = make_scheduler("ddim", bundle.scheduler.config)
    scheduler.set_timesteps(10)
    step, t = 7, scheduler.timesteps[7]
    latents = sampler.initial_noise([r.seed for r in requests], scheduler)
    conditions = {"text": sampler.encode_prompts([r.prompt for r in requests]),
                  "au": sampler.au_tokens(np.stack([np.asarray(r.aus, np.float32) for r in requests])).float()}

    def eps_of(text, au):
        return sampler.model_output(latents, t, text, au, 1.0)

    return latents, alpha_bar_at(scheduler, step, t), conditions, eps_of


@pytest.mark.parametrize("sg_target", ["text", "au", "both"])
def test_one_guidance_step_on_each_target_lowers_every_rows_loss(sampler, tiny_bundle, sg_target):
    from synfer_ray.generator.guidance import SG_TARGETS, predicted_x0, semantic_guidance_step
    classifier = tiny_bundle.sg_classifier
    requests = rows(tiny_bundle, "happy", seeds=range(6))
    targets = torch.tensor([classifier.classes.index("happy")] * len(requests))
    latents, alpha_bar, conditions, eps_of = late_step(sampler, tiny_bundle, requests)

    def loss_of(conditions):
        with torch.no_grad():
            x0 = predicted_x0(latents, eps_of(**conditions), alpha_bar)
            return F.cross_entropy(classifier(sampler.decode(x0)).float(), targets, reduction="none")

    moved, before, _ = semantic_guidance_step(conditions, SG_TARGETS[sg_target], eps_of, sampler.decode,
                                              classifier, latents, alpha_bar, targets, step_size=2.0)
    after = loss_of(moved)
    print(f"{sg_target}: guide's CE {before.mean():.4f} -> {after.mean():.4f} after one step of 2% of the norm")
    assert torch.allclose(before, loss_of(conditions), atol=1e-5)
    assert torch.all(after < before)
    for name, value in conditions.items():
        change = (moved[name] - value).flatten(1).norm(dim=1) / value.flatten(1).norm(dim=1)
        if name in SG_TARGETS[sg_target]:  # each steered condition moves by 2% of its own norm, per row
            assert torch.allclose(change, torch.full_like(change, 0.02), atol=1e-4)
        else:
            assert torch.equal(moved[name], value)
    if sg_target != "au":
        return
    # Adaptive: each row moves by 2% times 1 - p(target), so a row the guide already reads as its
    # class barely moves; every row's loss still falls.
    adaptive, same, _ = semantic_guidance_step(conditions, ("au",), eps_of, sampler.decode, classifier, latents,
                                            alpha_bar, targets, step_size=2.0, adaptive=True)
    assert torch.allclose(same, before)
    change = (adaptive["au"] - conditions["au"]).flatten(1).norm(dim=1) / conditions["au"].flatten(1).norm(dim=1)
    expected = 0.02 * (1 - torch.exp(-before))
    print(f"adaptive: p(target) {torch.exp(-before).tolist()}, step {change.tolist()}")
    assert torch.allclose(change, expected, atol=1e-4) and expected.std() > 0
    assert torch.all(loss_of(adaptive) < before)


@pytest.fixture(scope="module")
def latent_guide(tiny_bundle):
    """A latent guide over the tiny bundle's latents, its head trained for a few steps to read the
    predicted clean latents of sad and happy rows apart (random weights steer no better than noise)."""
    from synfer_ray.generator.latent_guide import LatentGuide
    from synfer_ray.generator.sampler import GuidedSampler
    torch.manual_seed(0)
    sampler = GuidedSampler(tiny_bundle)
    size = tiny_bundle.unet.config.sample_size
    guide = LatentGuide(classes=list(tiny_bundle.classes), latent_size=size, width=16)
    settings = SamplerSettings(steps=6)
    latents, labels = [], []
    for expression in ("sad", "happy"):
        latents.append(sampler.sample_latents(rows(tiny_bundle, expression, seeds=range(40, 56)), settings))
        labels += [tiny_bundle.classes.index(expression)] * 16
    latents, labels = torch.cat(latents), torch.tensor(labels)
    optimizer = torch.optim.Adam(guide.parameters(), lr=3e-3)
    for _ in range(60):
        noisy = latents + 0.3 * torch.randn_like(latents)
        loss = F.cross_entropy(guide(noisy), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return guide.eval().requires_grad_(False)


def test_one_guidance_step_through_the_latent_guide_lowers_every_rows_loss(sampler, tiny_bundle, latent_guide):
    """The latent guide reads x0_hat itself: no decode, and every row's loss still falls."""
    from synfer_ray.generator.guidance import predicted_x0, semantic_guidance_step
    requests = rows(tiny_bundle, "happy", seeds=range(6))
    targets = torch.tensor([latent_guide.classes.index("happy")] * len(requests))
    latents, alpha_bar, conditions, eps_of = late_step(sampler, tiny_bundle, requests)

    def loss_of(conditions):
        with torch.no_grad():
            x0 = predicted_x0(latents, eps_of(**conditions), alpha_bar)
            return F.cross_entropy(latent_guide(x0), targets, reduction="none")

    decoded = []
    moved, before, output = semantic_guidance_step(
        conditions, ("text", "au"), eps_of, lambda x0: decoded.append(x0) or x0, latent_guide, latents,
        alpha_bar, targets, step_size=2.0)
    after = loss_of(moved)
    print(f"latent guide's CE {before.mean():.4f} -> {after.mean():.4f} after one step of 2% of the norm")
    assert decoded[0].shape == latents.shape  # the guide read the latent, not an image
    assert torch.allclose(before, loss_of(conditions), atol=1e-5) and torch.all(after < before)
    # The step hands back its own forward pass, made under the conditions before the move.
    assert torch.allclose(output, eps_of(**conditions), atol=1e-5)


def test_latent_guidance_samples_steer_and_record_no_decode_in_the_guided_steps(tiny_bundle, latent_guide):
    from synfer_ray.generator.sampler import GuidedSampler
    sampler = GuidedSampler(tiny_bundle, sg_latent_guide=latent_guide)
    requests = rows(tiny_bundle, "happy", seeds=range(6))
    decodes = []
    hook = tiny_bundle.vae.decoder.register_forward_hook(lambda *_: decodes.append(1))
    try:
        off = sampler.sample_latents(requests, SamplerSettings(steps=10, sg_guide="latents"))
        on = sampler.sample_latents(requests, SamplerSettings(steps=10, sg_guide="latents", sg_scale=16.0))
    finally:
        hook.remove()
    assert decodes == []  # guided steps read latents: the VAE decoder never ran
    target = torch.tensor([latent_guide.classes.index("happy")] * len(requests))
    with torch.no_grad():
        loss_off = F.cross_entropy(latent_guide(off), target, reduction="none")
        loss_on = F.cross_entropy(latent_guide(on), target, reduction="none")
    print(f"latent guide's CE on the final latents: without SG {loss_off.mean():.4f}, with SG {loss_on.mean():.4f}")
    assert loss_on.mean() < loss_off.mean()


def test_latent_guidance_without_a_latent_guide_names_the_setting(tiny_bundle):
    from synfer_ray.generator.sampler import GuidedSampler
    with pytest.raises(SynferError, match="sg_guide"):
        GuidedSampler(tiny_bundle).check(rows(tiny_bundle), SamplerSettings(sg_scale=4.0, sg_guide="latents"))


def test_reusing_the_guides_pass_saves_one_unet_pass_per_guided_step(sampler, tiny_bundle):
    requests = rows(tiny_bundle, "sad", seeds=range(4))
    calls = []
    hook = tiny_bundle.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        counts = {}
        for reuse in (False, True):
            calls.clear()
            images = sampler.generate_float(requests, SamplerSettings(steps=10, sg_scale=8.0, sg_reuse_pass=reuse))
            counts[reuse] = (len(calls), images)
    finally:
        hook.remove()
    guided_steps = 4  # the last 40% of 10 steps
    # CFG steps: one UNet call on the doubled batch; guided steps: unconditional + guide (+ fresh conditional).
    assert counts[False][0] == 6 + 3 * guided_steps and counts[True][0] == 6 + 2 * guided_steps
    # The moved conditioning acts from the next step on: other images, still steered by the guide.
    assert (counts[True][1] - counts[False][1]).abs().max() > 1e-4
    classifier = tiny_bundle.sg_classifier
    target = torch.tensor([classifier.classes.index("sad")] * len(requests))
    plain = sampler.generate_float(requests, SamplerSettings(steps=10))
    with torch.no_grad():
        losses = {name: F.cross_entropy(classifier(images), target).item()
                  for name, images in (("off", plain), ("fresh", counts[False][1]), ("reuse", counts[True][1]))}
    print(f"guide's CE: {losses}")
    assert losses["reuse"] < losses["off"]


def test_recomputing_activations_makes_the_same_images(sampler, tiny_bundle):
    requests = rows(tiny_bundle, "fear", seeds=range(3))
    stored = sampler.generate_float(requests, SamplerSettings(steps=8, sg_scale=8.0, sg_target="both"))
    recomputed = sampler.generate_float(requests, SamplerSettings(steps=8, sg_scale=8.0, sg_target="both",
                                                                  sg_checkpointing=True))
    assert torch.allclose(stored, recomputed, atol=1e-5)
    assert not tiny_bundle.unet.is_gradient_checkpointing  # switched off again after each guided step


def test_class_scales_steer_each_class_by_its_own_step(sampler, tiny_bundle):
    """sg_class_scales: in one batch, rows of a class whose scale is 0 come out as without SG, and
    rows of a class with its own scale as if that scale were everyone's."""
    mixed = rows(tiny_bundle, "sad", seeds=(0, 1)) + rows(tiny_bundle, "happy", seeds=(2, 3))
    per_class = SamplerSettings(steps=8, sg_scale=4.0, sg_class_scales={"sad": 0.0, "happy": 16.0})
    assert per_class.uses_sg and per_class.sg_scale_of("happy") == 16 and per_class.sg_scale_of("anger") == 4
    assert SamplerSettings(steps=8, sg_class_scales={"fear": 8.0}).uses_sg  # one class steered is guidance
    steered = sampler.generate_float(mixed, per_class)
    unguided = sampler.generate_float(mixed, SamplerSettings(steps=8))
    everyone_16 = sampler.generate_float(mixed, SamplerSettings(steps=8, sg_scale=16.0))
    assert torch.allclose(steered[:2], unguided[:2], atol=1e-4)
    assert torch.allclose(steered[2:], everyone_16[2:], atol=1e-4)
    assert (steered[2:] - unguided[2:]).abs().max() > 1e-2
    # Each row's provenance records the scale it was made with.
    from synfer_ray.data.manifest import ManifestRow
    from synfer_ray.generator.rows import generate_rows
    table = generate_rows(sampler, [ManifestRow(r.seed, r.seed, r.target, np.asarray(r.aus, np.float32), r.prompt)
                                    for r in mixed], per_class, batch_size=4)
    assert table.column("sg_scale").to_pylist() == [0.0, 0.0, 16.0, 16.0]
    with pytest.raises(SynferError, match=r"^sg_class_scales\.grumpy: "):
        sampler.generate(mixed, SamplerSettings(steps=2, sg_class_scales={"grumpy": 8.0}))
    with pytest.raises(SynferError, match=r"^sg_class_scales\.sad: "):
        SamplerSettings(sg_class_scales={"sad": -1.0})


def test_neutral_is_guided_apart_from_the_unconditional_input(sampler, tiny_bundle):
    adapter = tiny_bundle.au_adapter
    assert not taxonomy.sample_target_aus(0, "neutral", tiny_bundle.au_names, extra_au_probability=0).any()
    neutral = np.zeros(len(tiny_bundle.au_names), np.float32)  # neutral's prototype: no AU active
    latents, t = torch.randn(1, 4, 6, 6), torch.tensor(500)
    text = sampler.unconditional_text(1)

    def au_direction():  # what CFG amplifies through the AU pathway for a neutral row
        with torch.no_grad():
            cond = sampler.au_tokens(neutral[None])
            unconditional = adapter.unconditional(1)
            return (sampler.model_output(latents, t, text, cond, 1.0)
                    - sampler.model_output(latents, t, text, unconditional, 1.0))
    assert adapter.config.null_unconditional and au_direction().abs().mean() > 1e-4
    try:  # an adapter made before the null tokens: neutral was exactly the unconditional input
        adapter.register_to_config(null_unconditional=False)
        assert torch.equal(au_direction(), torch.zeros_like(latents))
    finally:
        adapter.register_to_config(null_unconditional=True)


def test_layout_initialisation_uses_the_reference(sampler, tiny_bundle):
    settings = SamplerSettings(steps=6)
    reference = sampler.generate(rows(tiny_bundle, seeds=(11,)), settings)[0]
    row = rows(tiny_bundle, seeds=(3,))[0]
    with_reference = SampleRequest(row.seed, row.prompt, row.aus, row.target, reference=reference)
    images = sampler.generate([row, with_reference], settings)
    assert not np.array_equal(images[0], images[1])
    # The seed no longer matters once the start comes from the reference.
    other_seed = SampleRequest(row.seed + 100, row.prompt, row.aus, row.target, reference=reference)
    assert np.array_equal(sampler.generate([other_seed], settings), sampler.generate([with_reference], settings))


@pytest.mark.parametrize("change, field", [
    (dict(aus=[0.5] * 11), r"rows\[0\]\.aus"),
    (dict(aus=[1.5] + [0.0] * 11), r"rows\[0\]\.aus.*\[0, 1\]"),
    (dict(seed=-3), r"rows\[0\]\.seed"),
    (dict(target="grumpy"), r"rows\[0\]\.target.*grumpy"),
    (dict(reference=np.zeros((10, 10, 3), np.uint8)), r"rows\[0\]\.reference"),
])
def test_bad_rows_name_their_field(sampler, tiny_bundle, change, field):
    row = rows(tiny_bundle, seeds=(0,))[0]
    bad = SampleRequest(**{**row.__dict__, **change})
    with pytest.raises(SynferError, match=field):
        sampler.generate([bad], SamplerSettings(steps=2))


@pytest.mark.parametrize("kwargs, field", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(au_scale=float("nan")), "au_scale"), (dict(sg_window=1.5), "sg_window"),
])
def test_bad_settings_name_their_field(kwargs, field):
    with pytest.raises(SynferError, match=f"^{field}: "):
        SamplerSettings(**kwargs)


def test_semantic_guidance_needs_a_guide(tiny_bundle):
    from synfer_ray.generator.sampler import GuidedSampler
    bare = GuidedSampler(tiny_bundle)
    bare.sg_classifier = None
    with pytest.raises(SynferError, match="sg_scale.*sg_classifier"):
        bare.generate(rows(tiny_bundle, seeds=(0,)), SamplerSettings(steps=2, sg_scale=1.0))


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "unipc", "euler"])
def test_every_scheduler_samples_with_cfg_au_and_semantic_guidance(sampler, tiny_bundle, scheduler):
    classifier = tiny_bundle.sg_classifier
    requests = rows(tiny_bundle, "happy", seeds=range(4))
    targets = torch.tensor([classifier.classes.index("happy")] * len(requests))

    def images(**kwargs):
        return sampler.generate_float(requests, SamplerSettings(steps=10, scheduler=scheduler, **kwargs))

    plain, with_sg = images(), images(sg_scale=8.0)
    assert torch.isfinite(with_sg).all() and with_sg.shape == (4, 3, 48, 48)
    assert torch.equal(images(sg_scale=8.0), with_sg)  # a fresh scheduler per call: no state carried over
    with torch.no_grad():
        off = F.cross_entropy(classifier(plain), targets, reduction="none")
        on = F.cross_entropy(classifier(with_sg), targets, reduction="none")
    print(f"{scheduler}: guide's CE without SG {off.mean():.4f}, with SG {on.mean():.4f}")
    assert torch.all(on < off)
    # Every scheduler solves the same ODE: at 10 steps it lands near DDIM's image, not somewhere else.
    ddim = sampler.generate_float(requests, SamplerSettings(steps=10))
    other_seeds = sampler.generate_float(rows(tiny_bundle, "happy", seeds=range(10, 14)),
                                         SamplerSettings(steps=10, scheduler=scheduler))
    assert (plain - ddim).abs().mean() < 0.5 * (plain - other_seeds).abs().mean()


def test_v_prediction_bundles_guide_through_their_own_x0(tiny_bundle):
    from synfer_ray.generator.guidance import predicted_noise, predicted_x0
    x0, eps = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    abar = torch.tensor(0.3)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    assert torch.allclose(predicted_x0(x_t, v, abar, "v_prediction"), x0, atol=1e-5)
    assert torch.allclose(predicted_x0(x_t, eps, abar, "epsilon"), x0, atol=1e-5)
    assert torch.allclose(predicted_noise(x_t, v, abar, "v_prediction"), eps, atol=1e-5)


def test_bf16_weights_sample_the_same_faces_as_fp32(tiny_bundle_path, sampler, tiny_bundle):
    from synfer_ray.bundle import load_bundle
    from synfer_ray.generator.sampler import GuidedSampler
    half = GuidedSampler(load_bundle(tiny_bundle_path, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.bundle.sg_classifier.model.dtype == torch.bfloat16
    requests = rows(tiny_bundle, "sad", seeds=range(4))
    for settings in (SamplerSettings(steps=8), SamplerSettings(steps=8, sg_scale=4.0, scheduler="dpmpp_2m")):
        full, low = sampler.generate(requests, settings), half.generate(requests, settings)
        difference = np.abs(full.astype(int) - low.astype(int))
        print(f"{settings.scheduler} sg {settings.sg_scale}: bf16 vs fp32 max pixel difference {difference.max()}/255, "
              f"mean {difference.mean():.2f}")
        assert difference.mean() < 3 and difference.max() <= 64
    assert np.array_equal(half.initial_noise([5]).cpu().numpy(), sampler.initial_noise([5]).cpu().numpy())


def test_sg_sweep_reports_every_target_and_scale_from_the_same_seeds(tiny_bundle_path, tmp_path):
    from typer.testing import CliRunner

    from synfer_ray.cli import app
    args = ["bundle", "sg-sweep", str(tiny_bundle_path), "--evaluator", str(tiny_bundle_path / "sg_classifier"),
            "--out", str(tmp_path), "--per-class", "2", "--steps", "3", "--scale", "5", "--scale", "50"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    import json
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert [(p["sg_target"], p["sg_scale"]) for p in report["points"]] == [
        ("none", 0.0), ("text", 5.0), ("text", 50.0), ("au", 5.0), ("au", 50.0), ("both", 5.0), ("both", 50.0)]
    for point in report["points"]:
        assert 0 <= point["agreement"]["overall"] <= 1 and point["diversity"] >= 0
        assert 0 <= point["pixel_diversity"] <= 2 and (point["diversity_agreed"] >= 0
                                                      or np.isnan(point["diversity_agreed"]))
        assert (tmp_path / point["contact_sheet"]).is_file()
    best = report["best_within_diversity"]
    assert best["diversity"] >= best["diversity_floor"]
    assert "Highest agreement with diversity within 10%" in (tmp_path / "sweep.md").read_text()
    bad = CliRunner().invoke(app, [*args[:5], "--out", str(tmp_path / "bad"), "--target", "pixels"])
    assert bad.exit_code != 0 and "sg_target" in bad.output and not (tmp_path / "bad").exists()
    bad = CliRunner().invoke(app, [*args[:5], "--out", str(tmp_path / "bad"), "--step-rule", "greedy"])
    assert bad.exit_code != 0 and "--step-rule" in bad.output and not (tmp_path / "bad").exists()
    bad = CliRunner().invoke(app, [*args[:5], "--out", str(tmp_path / "bad"), "--real-faces",
                                   str(tmp_path / "no-such.parquet")])
    assert bad.exit_code != 0 and "--real-faces" in bad.output and not (tmp_path / "bad").exists()
    # Another seed's sweep of one of those points, pooled with the first: the points both have, each
    # reading the mean of the two (classes of equal size: the share over all their faces).
    other = tmp_path / "seed-2"
    result = CliRunner().invoke(app, [*args[:5], "--out", str(other), "--per-class", "2", "--steps", "3",
                                      "--target", "au", "--scale", "5", "--seed", "777", "--tolerance", "0.05"])
    assert result.exit_code == 0, result.output
    assert "within 5% of no SG" in (other / "sweep.md").read_text()  # its own bound, not pool's
    bad = CliRunner().invoke(app, [*args[:5], "--out", str(tmp_path / "bad"), "--tolerance", "0"])
    assert bad.exit_code != 0 and "--tolerance" in bad.output and not (tmp_path / "bad").exists()
    result = CliRunner().invoke(app, ["bundle", "sg-pool", str(tmp_path), str(other), "--out", str(tmp_path / "pool")])
    assert result.exit_code == 0, result.output
    second = json.loads((other / "sweep.json").read_text())
    pooled = json.loads((tmp_path / "pool" / "sweep.json").read_text())
    assert [(p["sg_target"], p["sg_scale"]) for p in pooled["points"]] == [("none", 0.0), ("au", 5.0)]
    assert pooled["seeds"] == [10_000, 777] and pooled["per_class"] == 4
    for point, one, two in zip(pooled["points"], [report["points"][0], report["points"][3]], second["points"]):
        assert point["agreement"]["overall"] == pytest.approx((one["agreement"]["overall"]
                                                               + two["agreement"]["overall"]) / 2)
        assert point["diversity_by_class"]["sad"] == pytest.approx((one["diversity_by_class"]["sad"]
                                                                    + two["diversity_by_class"]["sad"]) / 2)
    text = (tmp_path / "pool" / "sweep.md").read_text()
    assert text.startswith("Pooled from 2 sweeps (seeds 10000, 777): 4 faces a class") and "| au | 5 |" in text
    # A margin under the 10% bound for the pick's luck: the rule and the mixes read at 5%.
    result = CliRunner().invoke(app, ["bundle", "sg-pool", str(tmp_path), str(other), "--out", str(tmp_path / "pool"),
                                      "--tolerance", "0.05"])
    assert result.exit_code == 0, result.output
    assert "within 5% of no SG" in (tmp_path / "pool" / "sweep.md").read_text()
    bad = CliRunner().invoke(app, ["bundle", "sg-pool", str(tmp_path), str(other), "--out", str(tmp_path / "bad"),
                                   "--tolerance", "10"])
    assert bad.exit_code != 0 and "--tolerance" in bad.output and not (tmp_path / "bad").exists()
    # The same seed twice adds no reading; other sampler settings are not the same sweep.
    bad = CliRunner().invoke(app, ["bundle", "sg-pool", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "sweep seed" in bad.output and not (tmp_path / "bad").exists()
    steps = json.loads((other / "sweep.json").read_text())
    steps["settings"]["steps"] = 4
    (other / "sweep.json").write_text(json.dumps(steps))
    bad = CliRunner().invoke(app, ["bundle", "sg-pool", str(tmp_path), str(other), "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "sweep settings" in bad.output and "--seed" in bad.output
    bad = CliRunner().invoke(app, ["bundle", "sg-pool", str(tmp_path), str(tmp_path / "nothing"),
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "sg-sweep" in bad.output and not (tmp_path / "bad").exists()


def test_sg_sweep_compares_fixed_and_adaptive_steps_on_the_same_seeds(tiny_bundle_path, separable_parquet,
                                                                       tmp_path):
    from typer.testing import CliRunner

    from synfer_ray.cli import app
    args = ["bundle", "sg-sweep", str(tiny_bundle_path), "--evaluator", str(tiny_bundle_path / "sg_classifier"),
            "--out", str(tmp_path), "--per-class", "2", "--steps", "3", "--target", "au", "--scale", "50",
            "--step-rule", "fixed", "--step-rule", "adaptive", "--real-faces", str(separable_parquet["test"])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    import json
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert [(p["sg_target"], p["sg_adaptive"], p["sg_scale"]) for p in report["points"]] == [
        ("none", False, 0.0), ("au", False, 50.0), ("au", True, 50.0)]
    sheets = {p["contact_sheet"]: (tmp_path / p["contact_sheet"]).read_bytes() for p in report["points"]}
    assert set(sheets) == {"contact_none_0.png", "contact_au_50.png", "contact_au_adaptive_50.png"}
    # Smaller steps where the guide already reads the class: other images than fixed steps make.
    assert sheets["contact_au_50.png"] != sheets["contact_au_adaptive_50.png"]
    assert "| au adaptive | 50 |" in (tmp_path / "sweep.md").read_text()
    # The real faces' row: the same readings of 2 real faces per class, by the same evaluator.
    reference = report["real_reference"]
    assert reference["rows"] == 14 and set(reference["agreement"]) == {*report["points"][0]["agreement"]}
    assert 0 < reference["diversity"] < 2 and 0 < reference["pixel_diversity"] < 2
    assert re.search(r"\| real faces \| \| \*\d+\.\d%\* \|", (tmp_path / "sweep.md").read_text())


def test_real_faces_for_the_sweep_are_a_seeded_draw_by_row_id(separable_parquet, tmp_path):
    """The sweep's real-faces row reads the same faces whatever the file order (ids come from the
    image bytes), as many per class as asked or all a class has, FER-2013's 'angry' as anger."""
    import pyarrow.parquet as pq

    from synfer_ray import taxonomy
    from synfer_ray.train.generator_report import sample_real_faces
    classes = list(taxonomy.AFFECTNET_7)
    images, labels = sample_real_faces(str(separable_parquet["test"]), classes, 3, seed=7, size=48)
    assert images.shape == (21, 48, 48, 3) and labels == [name for name in classes for _ in range(3)]
    table = pq.read_table(separable_parquet["test"])
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    order = np.random.default_rng(0).permutation(table.num_rows)
    pq.write_table(table.take(order[:30]), shuffled / "b.parquet")
    pq.write_table(table.take(order[30:]), shuffled / "a.parquet")
    again, again_labels = sample_real_faces(str(shuffled), classes, 3, seed=7, size=48)
    assert again_labels == labels
    assert sorted(image.tobytes() for image in again) == sorted(image.tobytes() for image in images)
    other, _ = sample_real_faces(str(separable_parquet["test"]), classes, 3, seed=8, size=48)
    assert sorted(image.tobytes() for image in other) != sorted(image.tobytes() for image in images)
    everything, counted = sample_real_faces(str(separable_parquet["test"]), classes, 100, seed=7, size=24)
    assert everything.shape == (70, 24, 24, 3) and counted.count("anger") == 10


def test_sg_sweep_steers_by_the_guide_it_is_given(tiny_bundle_path, second_voter, tmp_path):
    """The study sweeps with its own guide: --sg-classifier replaces the bundle's, so the SG points
    change while the no-SG point stays the same image for image."""
    from typer.testing import CliRunner

    from synfer_ray.cli import app
    sheets = {}
    for name, extra in (("own", []), ("other", ["--sg-classifier", str(second_voter)])):
        args = ["bundle", "sg-sweep", str(tiny_bundle_path), "--evaluator", str(tiny_bundle_path / "sg_classifier"),
                "--out", str(tmp_path / name), "--per-class", "2", "--steps", "3", "--target", "au",
                "--scale", "50", *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        sheets[name] = {p.name: p.read_bytes() for p in (tmp_path / name).glob("contact_*.png")}
    assert sheets["own"]["contact_none_0.png"] == sheets["other"]["contact_none_0.png"]
    assert sheets["own"]["contact_au_50.png"] != sheets["other"]["contact_au_50.png"]


def test_the_default_rule_ignores_scales_past_a_targets_peak():
    """Past its peak SG breaks faces, and broken faces are diverse again: such a point must not win."""
    from synfer_ray.train.generator_report import best_within_diversity

    def point(target, scale, agreement, diversity):
        return {"sg_target": target, "sg_scale": scale, "agreement": {"overall": agreement}, "diversity": diversity}
    points = [point("none", 0, 0.623, 0.2028), point("text", 8, 0.686, 0.1827), point("text", 64, 0.866, 0.129),
              point("au", 8, 0.737, 0.171), point("au", 64, 0.863, 0.132), point("au", 128, 0.729, 0.1865)]
    best = best_within_diversity(points)
    assert (best["sg_target"], best["sg_scale"]) == ("text", 8)
    # The table reads its pick from the points: a sweep stored under the old rule (au 128) reads by this one.
    from synfer_ray.train.generator_report import sweep_table
    for p in points:
        p.update(seconds=1.0)
    stale = {"points": points, "best_within_diversity": {"sg_target": "au", "sg_scale": 128}}
    assert sweep_table(stale, ["happy"]).rstrip().endswith("text SG 8, 68.6%.")  # no per-class readings
    # An evaluator that agrees with fewer than two faces of every class has no diversity among them
    # (the scaled-down study's did): the cell says so instead of printing nan.
    few = {"points": [{**p, "agreement": {**p["agreement"], "happy": 0.5}, "diversity_agreed": float("nan"),
                       "pixel_diversity": 0.5} for p in points]}
    table = sweep_table(few, ["happy"])
    assert "nan" not in table and "| 0.2028 | too few faces | 0.5000 | 1 |" in table
    # A class no face of a point was asked of (a foreign sweep's) reads n/a, not nan%.
    assert "nan" not in sweep_table(few, ["happy", "sad"]) and "| 50% | n/a |" in sweep_table(few, ["happy", "sad"])
    # Each step rule is a curve of its own: adaptive AU still rises at 128, so its 128 counts while
    # fixed AU's 128 (past that curve's peak) does not.
    adaptive = [{**point("au", 64, 0.866, 0.1378), "sg_adaptive": True},
                {**point("au", 128, 0.88, 0.19), "sg_adaptive": True}]
    best = best_within_diversity(points + adaptive)
    assert (best["sg_target"], best["sg_adaptive"], best["sg_scale"]) == ("au", True, 128)


def test_weak_classes_are_lifted_by_the_smallest_scale_of_their_curve():
    """The study's sweep (docs/results/study.md), fixed steps on the AU tokens: at SG 8 only fear is read as
    asked under 30% of the time (20%); AU 32 is the first scale at which it reaches 30% (38%)."""
    from synfer_ray.train.generator_report import class_scales_line, class_scales_to_floor, sweep_table

    def point(target, scale, fear, anger, overall, adaptive=False):
        return {"sg_target": target, "sg_scale": scale, "sg_adaptive": adaptive, "diversity": 0.2, "seconds": 1.0,
                "agreement": {"overall": overall, "fear": fear, "anger": anger}}
    points = [point("none", 0, 0.08, 0.46, 0.623), point("au", 8, 0.20, 0.68, 0.737),
              point("au", 16, 0.26, 0.78, 0.789), point("au", 32, 0.38, 0.88, 0.854),
              point("au", 64, 0.40, 0.86, 0.863), point("au", 128, 0.38, 0.72, 0.729),
              point("au", 8, 0.14, 0.25, 0.709, adaptive=True), point("au", 16, 0.26, 0.74, 0.769, adaptive=True)]
    assert class_scales_to_floor(points, "au", 8) == {"fear": {"agreement": 0.20, "sg_scale": 32, "reached": 0.38}}
    assert "`sampling.sg_class_scales={fear: 32}`" in class_scales_line(points, "au", 8)
    # Each step rule is its own curve; a class no scale up to the curve's peak lifts is named.
    assert class_scales_to_floor(points, "au adaptive", 8) == {
        "fear": {"agreement": 0.14, "sg_scale": None, "reached": None},
        "anger": {"agreement": 0.25, "sg_scale": 16, "reached": 0.74}}
    assert "No scale up to the curve's peak lifts fear." in class_scales_line(points, "au adaptive", 8)
    assert class_scales_line(points, "au", 32).startswith("At au SG 32 no class")
    assert "fear 32 (38%)" in sweep_table({"points": points}, ["fear", "anger"], ("au", 8))


def test_class_scale_mix_is_the_best_within_the_diversity_floor():
    """Each class its own scale: the mix of highest mean agreement whose mean diversity stays within
    10% of no SG's, the same as trying every mix; SG is left off a class where it costs diversity
    without buying agreement."""
    import itertools

    from synfer_ray.train.generator_report import class_scales_within_diversity, sweep_table

    def point(target, scale, readings):  # readings: class -> (agreement, diversity)
        shares = {name: a for name, (a, _) in readings.items()}
        diversities = {name: d for name, (_, d) in readings.items()}
        return {"sg_target": target, "sg_scale": scale, "seconds": 1.0,
                "agreement": {**shares, "overall": float(np.mean(list(shares.values())))},
                "diversity_by_class": diversities, "diversity": float(np.mean(list(diversities.values())))}
    points = [point("none", 0, {"happy": (0.90, 0.20), "sad": (0.30, 0.20), "fear": (0.50, 0.20)}),
              point("au", 8, {"happy": (0.92, 0.10), "sad": (0.60, 0.18), "fear": (0.72, 0.17)}),
              point("au", 16, {"happy": (0.95, 0.08), "sad": (0.80, 0.15), "fear": (0.80, 0.15)})]
    mix = class_scales_within_diversity(points, "au")
    assert mix["scales"] == {"happy": 0.0, "sad": 8, "fear": 8}
    assert mix["agreement"] == pytest.approx((0.90 + 0.60 + 0.72) / 3) and mix["diversity"] >= 0.18
    assert "`{sad: 8, fear: 8}` | **74.0%**" in sweep_table({"points": points}, ["happy", "sad", "fear"])
    # Every class at least 65%: sad needs 16, so happy and fear give up their diversity... or it does not fit.
    assert class_scales_within_diversity(points, "au", class_floor=0.65) is None
    assert "| au, every class >= 30% |" not in sweep_table({"points": points}, ["happy", "sad", "fear"])
    # Sad under 30% but at SG 16, where lifting it buys little: the plain mix steers fear instead ...
    for reading, share in zip(points, (0.25, 0.28, 0.35)):
        reading["agreement"]["sad"] = share
    assert class_scales_within_diversity(points, "au")["scales"] == {"happy": 0.0, "sad": 0.0, "fear": 16}
    floored = class_scales_within_diversity(points, "au", class_floor=0.30)
    assert floored["scales"] == {"happy": 0.0, "sad": 16, "fear": 0.0}  # ... the floored one lifts sad
    assert "| au, every class >= 30% | `{sad: 16}` |" in sweep_table({"points": points}, ["happy", "sad", "fear"])
    # Against every mix, on a random sweep of 7 classes and 6 scales.
    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(7)]
    scales = [0, 4, 8, 16, 32, 64]
    table = {scale: {name: (float(rng.uniform(0.1, 1)), float(rng.uniform(0.1, 0.3))) for name in classes}
             for scale in scales}
    points = [point("none" if scale == 0 else "au", scale, table[scale]) for scale in scales]
    floor = 0.9 * points[0]["diversity"]
    peak = max(points[1:], key=lambda p: p["agreement"]["overall"])["sg_scale"]
    allowed = [s for s in scales if s <= peak]
    best = max(((np.mean([table[s][n][0] for s, n in zip(mix, classes)]), mix)
                for mix in itertools.product(allowed, repeat=len(classes))
                if np.mean([table[s][n][1] for s, n in zip(mix, classes)]) >= floor - 1e-12))
    found = class_scales_within_diversity(points, "au")
    assert found["agreement"] == pytest.approx(best[0]) and found["diversity"] >= floor - 1e-12
    # A sweep made before per-class diversity was read has no mix.
    del points[1]["diversity_by_class"]
    assert class_scales_within_diversity(points, "au") is None
