"""The generator over real HTTP on loopback: Ray Serve + FastAPI, batching, limits, the web page."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import unquote

import pytest
import requests
import torch
from PIL import Image

from conftest import free_port
from synfer_ray.config import ServeConfig, build_config

SERVER_THREADS = 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_bundle_path, second_voter):
    """Three apps on one loopback port: open; secure (API key, two weighted voters, adaptive SG steps and
    a per-expression SG scale by default); slow (a request timeout far below what sampling takes)."""
    from ray import serve

    from synfer_ray.serve import build_app
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    common = {"bundle": str(tiny_bundle_path), "max_images": 4, "max_steps": 20, "default_steps": 6,
              "num_cpus": 0.5, "torch_threads": SERVER_THREADS, "max_batch_size": 8}
    serve.run(build_app(build_config(ServeConfig, common)), name="open", route_prefix="/", blocking=False)
    voters = [{"path": str(tiny_bundle_path / "sg_classifier"), "name": "guide", "weight": 9.0},
              {"path": str(second_voter), "name": "b", "weight": 1.0}]
    serve.run(build_app(build_config(ServeConfig, {**common, "api_key_env": "SYNFER_TEST_API_KEY",
                                                   "voters": voters, "sg_adaptive": True,
                                                   "sg_class_scales": {"sad": 3.0}, "mirror_average": True})),
              name="secure", route_prefix="/secure", blocking=False)
    serve.run(build_app(build_config(ServeConfig, {**common, "request_timeout_s": 0.1, "max_batch_size": 2,
                                                   "batch_wait_timeout_s": 0})),
              name="slow", route_prefix="/slow", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if all(requests.get(f"{base}{p}/healthz", timeout=5).ok for p in ("", "/secure", "/slow")):
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("Serve apps did not become healthy in 180 s")
    yield base
    serve.shutdown()


def post(base: str, body, path: str = "/v1/generate", **kwargs):
    if isinstance(body, (bytes, str)):
        return requests.post(base + path, data=body, headers={"content-type": "application/json"}, timeout=60,
                             **kwargs)
    return requests.post(base + path, json=body, timeout=60, **kwargs)


def test_health_and_expressions(server):
    assert requests.get(f"{server}/healthz", timeout=10).json()["status"] == "ok"
    info = requests.get(f"{server}/v1/expressions", timeout=10).json()
    assert "happy" in info["classes"] and "AU12" in info["au_names"]
    assert info["prototypes"]["happy"]["AU12"] > 0 and info["limits"]["max_images"] == 4


def test_openapi_documents_every_field_with_its_limits(server):
    schema = requests.get(f"{server}/openapi.json", timeout=10).json()
    fields = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert all(field.get("description") for field in fields.values())
    assert fields["n"]["maximum"] == 64 and fields["seed"]["minimum"] == 0
    assert fields["expression"]["maxLength"] == 32 and fields["cfg_scale"]["maximum"] == 30


def test_generate_returns_labelled_pngs(server):
    reply = post(server, {"expression": "happy", "aus": {"AU12": 0.9}, "seed": 3, "n": 2})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["expression"] == "happy" and body["aus"]["AU12"] == pytest.approx(0.9)
    assert [image["seed"] for image in body["images"]] == [3, 4]
    for image in body["images"]:
        assert Image.open(io.BytesIO(base64.b64decode(image["png_base64"]))).size == (48, 48)
        assert sum(image["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert image["label"] in body["images"][0]["probabilities"]


def test_same_request_same_bytes_as_generate_one(server, tiny_bundle_path, tmp_path):
    from synfer_ray.generate_one import generate_pngs
    body = {"expression": "sad", "seed": 7, "n": 2, "steps": 6, "sg_scale": 2.0}
    first = [i["png_base64"] for i in post(server, body).json()["images"]]
    again = [i["png_base64"] for i in post(server, body).json()["images"]]
    assert first == again
    # Float sums depend on the thread count: sample here with the replica's torch_threads.
    torch.set_num_threads(SERVER_THREADS)
    written = generate_pngs(tiny_bundle_path, "sad", tmp_path, seed=7, n=2, steps=6, sg_scale=2.0)
    assert [base64.b64encode(p.read_bytes()).decode() for p in written] == first
    # A one-image request is a batch of one, as generate-one makes it: a row's floats may differ by
    # rounding between batch sizes (the UNet's outputs do, by ~1e-6), so its bytes are compared with
    # generate-one's n=1, not with the first of its n=2.
    single = generate_pngs(tiny_bundle_path, "sad", tmp_path / "one", seed=7, n=1, steps=6, sg_scale=2.0)
    png = post(server, {**body, "n": 1, "format": "png"})
    assert png.headers["content-type"] == "image/png" and png.content == single[0].read_bytes()


BAD = [
    ({"expression": "grumpy"}, ["body", "expression"]),
    ({"expression": "happy", "aus": {"AU12": 1.5}}, ["body", "aus", "AU12"]),
    ({"expression": "happy", "aus": {"AU99": 0.5}}, ["body", "aus"]),
    ({"expression": "happy", "n": 5}, ["body", "n"]),
    ({"expression": "happy", "n": 500}, ["body", "n"]),
    ({"expression": "happy", "steps": 21}, ["body", "steps"]),
    ({"expression": "happy", "seed": -1}, ["body", "seed"]),
    ({"expression": "happy", "n": 2, "format": "png"}, ["body", "format"]),
    ('{"expression": "happy",', ["body"]),
]


def test_bad_requests_get_422_while_good_ones_keep_succeeding(server):
    good = {"expression": "fear", "seed": 11, "n": 2}
    with ThreadPoolExecutor(max_workers=8) as pool:
        good_replies = [pool.submit(post, server, good) for _ in range(4)]
        bad_replies = [(pool.submit(post, server, body), loc) for body, loc in BAD]
        for future, loc in bad_replies:
            reply = future.result()
            assert reply.status_code == 422, (loc, reply.text)
            assert reply.json()["detail"][0]["loc"][:len(loc)] == loc
        outputs = [future.result() for future in good_replies]
    assert all(reply.status_code == 200 for reply in outputs)
    # Concurrent identical requests may share a batch with others; bytes stay within rounding.
    first = Image.open(io.BytesIO(base64.b64decode(outputs[0].json()["images"][0]["png_base64"])))
    for reply in outputs[1:]:
        other = Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0]["png_base64"])))
        assert max(abs(a - b) for pa, pb in zip(first.getdata(), other.getdata()) for a, b in zip(pa, pb)) <= 2
    assert requests.get(f"{server}/healthz", timeout=10).ok


def test_api_key_is_required_where_configured(server):
    body = {"expression": "happy", "steps": 2}
    assert post(server, body, path="/secure/v1/generate").status_code == 401
    assert post(server, body, path="/secure/v1/generate", headers={"x-api-key": "nope"}).status_code == 401
    assert post(server, body, path="/secure/v1/generate", headers={"x-api-key": "test-kez"}).status_code == 401
    assert post(server, body, path="/secure/v1/generate", headers={"x-api-key": "test-key"}).status_code == 200


def test_a_key_whose_variable_is_missing_refuses_to_start(server, tiny_bundle_path, tmp_path):
    from ray import serve

    from synfer_ray.serve import build_app
    missing = "SYNFER_TEST_MISSING_KEY"
    config = build_config(ServeConfig, {"bundle": str(tiny_bundle_path), "num_cpus": 0.5, "api_key_env": missing})
    # The replica: Serve gives up on it after its constructor fails (3 tries), naming the variable.
    with pytest.raises(RuntimeError, match="nokey failed"):
        serve.run(build_app(config), name="nokey", route_prefix="/nokey", blocking=False)
    message = serve.status().applications["nokey"].deployments["SynferGenerator"].message
    assert re.search(f"api_key_env: got '{missing}'.*unset or empty", message), message[-2000:]
    serve.delete("nokey")
    assert requests.get(f"{server}/healthz", timeout=10).ok
    # The driver: `synfer serve` stops before starting Ray or deploying anything.
    (tmp_path / "serve.yaml").write_text(f"bundle: {tiny_bundle_path}\napi_key_env: {missing}\n")
    env = {k: v for k, v in os.environ.items() if k != missing}
    done = subprocess.run([sys.executable, "-m", "synfer_ray.cli", "serve", "--config", str(tmp_path / "serve.yaml"),
                           f"port={free_port()}"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "api_key_env" in done.stderr and missing in done.stderr, done.stderr[-2000:]


def test_a_request_without_sg_scale_is_steered_at_its_expressions_default(server, tiny_bundle_path, tmp_path):
    """ServeConfig.sg_class_scales: the server's SG scale per expression (the bundle's sweep-chosen
    default, as generate's sampling.sg_class_scales); the others take ServeConfig.sg_scale (0 here)."""
    secure = {"path": "/secure/v1/generate", "headers": {"x-api-key": "test-key"}}
    body = {"expression": "sad", "seed": 3, "n": 1, "steps": 4}
    default, named, off = (post(server, request, **secure) for request in
                           (body, {**body, "sg_scale": 3.0}, {**body, "sg_scale": 0.0}))
    assert [r.json()["settings"]["sg_scale"] for r in (default, named, off)] == [3.0, 3.0, 0.0]
    assert default.json()["images"] == named.json()["images"]  # the same faces as asking for 3 by name
    assert default.json()["images"][0]["png_base64"] != off.json()["images"][0]["png_base64"]
    happy = post(server, {**body, "expression": "happy"}, **secure).json()
    assert happy["settings"]["sg_scale"] == 0.0
    defaults = requests.get(f"{server}/secure/v1/expressions", headers=secure["headers"], timeout=30).json()
    assert defaults["sg_defaults"]["scale"]["sad"] == 3.0 and defaults["sg_defaults"]["scale"]["happy"] == 0.0
    # A scale for a class the bundle lacks: `synfer serve` stops before starting Ray, naming the field.
    (tmp_path / "serve.yaml").write_text(f"bundle: {tiny_bundle_path}\nsg_class_scales: {{grumpy: 8}}\n")
    done = subprocess.run([sys.executable, "-m", "synfer_ray.cli", "serve", "--config", str(tmp_path / "serve.yaml"),
                           f"port={free_port()}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "sg_class_scales.grumpy" in done.stderr, done.stderr[-2000:]


def test_votes_are_weighted_as_in_generate(server, tiny_bundle_path, second_voter):
    import numpy as np

    from synfer_ray.config import VoterConfig
    from synfer_ray.labeler.ensemble import PseudoLabeler, load_voters
    from synfer_ray.labeler.rectify import rectify
    reply = post(server, {"expression": "anger", "seed": 5, "n": 2, "steps": 2}, path="/secure/v1/generate",
                 headers={"x-api-key": "test-key"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["settings"]["sg_adaptive"] is True  # the server's default step rule: the request names none
    images = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png_base64"]))).convert("RGB"))
                       for i in body["images"]])
    voters = load_voters([VoterConfig(path=str(tiny_bundle_path / "sg_classifier"), weight=9.0),
                          VoterConfig(path=str(second_voter), weight=1.0)])
    classes = list(body["images"][0]["probabilities"])
    votes = PseudoLabeler(voters, classes, mirror_average=True).probabilities(images)  # the app's setting
    weighted = rectify(votes, [9.0, 1.0]).soft_label
    served = np.array([[image["probabilities"][c] for c in classes] for image in body["images"]])
    assert np.abs(served - weighted).max() < 1e-4
    assert np.abs(served - votes.mean(axis=0)).max() > 1e-3  # the plain mean would be another answer
    unmirrored = rectify(PseudoLabeler(voters, classes).probabilities(images), [9.0, 1.0]).soft_label
    assert np.abs(served - unmirrored).max() > 1e-4  # and so would the vote without mirror images
    assert [image["label"] for image in body["images"]] == [classes[i] for i in weighted.argmax(axis=1)]


def test_a_timed_out_request_releases_its_rows(server):
    # Four rows of 20 steps in batches of 2 against a 0.1 s timeout: the first batch may have
    # started (it finishes, its images thrown away); the rows still queued must be dropped at once.
    reply = post(server, {"expression": "happy", "seed": 1, "n": 4, "steps": 20}, path="/slow/v1/generate")
    assert reply.status_code == 504, reply.text
    rows = requests.get(f"{server}/slow/healthz", timeout=10).json()["rows"]
    assert rows["queued"] == 0 and rows["released"] >= 1 and rows["sampled"] + rows["released"] == 4, rows
    assert rows["sampled"] % 2 == 0  # whole batches of 2 or nothing, never a released row started later


def test_bodies_over_the_cap_get_413_before_parsing(server):
    cap = ServeConfig.model_fields["max_body_bytes"].default
    good = json.dumps({"expression": "happy", "steps": 1}).encode()
    assert post(server, good + b" " * (cap - len(good))).status_code == 200  # exactly at the cap
    over = b"{" + b"x" * cap  # malformed too: 413, not 422, shows it was never parsed
    assert post(server, over).status_code == 413

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(8):
            yield b" " * (cap // 4)
    streamed = requests.post(server + "/v1/generate", data=chunks(), timeout=60,
                             headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "max_body_bytes" in streamed.text


def _burst_requests(server: str) -> tuple[list, list]:
    """(bad, good): each a (method, path, data bytes or a chunk generator factory, headers) tuple."""
    json_type = {"content-type": "application/json"}

    def as_json(body) -> bytes:
        return json.dumps(body).encode()
    bad_bodies = [
        b'{"expression": "happy",', b"not json", b"\xff\xfe\x00", b"[" * 40_000, b"", b"null", b"[]",  # malformed
        as_json({"expression": 5}), as_json({"expression": "happy", "aus": [0.5]}),  # wrong types
        as_json({"expression": "happy", "n": "two"}), as_json({"expression": "happy", "seed": 1.5}),
        as_json({"expression": "happy", "aus": {"AU12": "high"}}), as_json({"expression": ["happy"]}),
        b'{"expression": "happy", "cfg_scale": NaN}', b'{"expression": "happy", "aus": {"AU12": NaN}}',
        b'{"expression": "happy", "sg_scale": Infinity}',
        as_json({"expression": "grumpy"}), as_json({"expression": ""}), as_json({"expression": "x" * 33}),  # unknown
        as_json({"expression": "happy", "aus": {"AU99": 0.5}}), as_json({"expression": "happy", "aus": {"": 0.1}}),
        as_json({"expression": "happy", "aus": {"AU12": 1.5}}), as_json({"expression": "happy", "aus": {"AU12": -0.1}}),
        as_json({"expression": "happy", "n": 5}), as_json({"expression": "happy", "n": 65}),  # too many images
        as_json({"expression": "happy", "n": 0}), as_json({"expression": "happy", "steps": 21}),
        as_json({"expression": "happy", "n": 2, "format": "png"}), as_json({"expression": "happy", "seed": 2**63}),
        as_json({"expression": "happy", "prompt": "x" * 2_000_000}),  # oversized, declared length
    ]
    bad = [("POST", "/v1/generate", body, json_type) for body in bad_bodies]
    bad += [("POST", "/v1/generate", lambda: (b" " * 16_384 for _ in range(16)), json_type),  # oversized, chunked
            ("POST", "/v1/generate", as_json({"expression": "happy"}), {"content-type": "text/plain"}),
            ("GET", "/v1/generate", None, {}),
            ("POST", "/secure/v1/generate", as_json({"expression": "happy", "steps": 1}), json_type)]  # no key
    good = [("POST", "/v1/generate", as_json({"expression": "fear", "seed": k, "n": 1 + k % 2, "steps": 2}),
             json_type) for k in range(6)]
    return bad, good


def test_a_burst_of_bad_requests_gets_4xx_beside_good_ones(server):
    bad, good = _burst_requests(server)
    rounds = 2
    work = [(kind, item) for _ in range(rounds) for kind, items in (("bad", bad), ("good", good)) for item in items]

    def send(item):
        method, path, data, headers = item
        return requests.request(method, server + path, data=data() if callable(data) else data, headers=headers,
                                timeout=90)
    codes: dict[str, list[int]] = {"bad": [], "good": []}
    failures = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {pool.submit(send, item): (kind, item) for kind, item in work}
        for future in as_completed(futures, timeout=400):  # bounded: a hang fails here
            kind, item = futures[future]
            reply = future.result()
            codes[kind].append(reply.status_code)
            if kind == "bad" and not 400 <= reply.status_code < 500 or kind == "good" and reply.status_code != 200:
                failures.append((kind, item[1], repr(item[2])[:80], reply.status_code, reply.text[:200]))
    print(f"burst: {len(work)} requests, bad {len(codes['bad'])} -> "
          f"{sorted(set(codes['bad']))}, good {len(codes['good'])} -> {sorted(set(codes['good']))}")
    assert not failures, failures
    assert len(codes["bad"]) == rounds * len(bad) and len(codes["good"]) == rounds * len(good)
    health = requests.get(f"{server}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["rows"]["queued"] == 0


def test_web_page_tunes_aus_and_compares_sg_in_headless_chromium(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make browser installs Debian's chromium)")
    info = requests.get(f"{server}/v1/expressions", timeout=10).json()
    bundle_hash = requests.get(f"{server}/healthz", timeout=10).json()["bundle_hash"]
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000"]
    # URL parameters fill the form as a person would: expression (sliders jump to its prototype),
    # then one slider moved, a prompt, CFG, steps, seed; autorun presses the button.
    url = (f"{server}/?expression=surprise&AU12=0.8&prompt=a%20portrait&cfg_scale=2.5&steps=4&seed=21&n=2"
           "&sg_scale=3&sg_target=both&sg_adaptive=1&autorun=1")
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    assert "2 seeds x surprise, SG off / SG on (3)" in dom, dom[-3000:]
    # One slider per AU of the bundle, each showing the prototype except the one moved.
    assert len(re.findall(r'<input[^>]* type="range"', dom)) == len(info["au_names"])
    shown = dict(re.findall(r'<output id="au-value-([^"]+)">([0-9.]+)</output>', dom))
    expected = {**info["prototypes"]["surprise"], "AU12": 0.8}
    assert shown == {name: f"{value:.2f}" for name, value in expected.items()}
    # Two columns from the same seeds: SG off and SG on.
    alts = re.findall(r'<img alt="(seed \d+ SG o(?:n|ff))" src="data:image/png;base64,', dom)
    assert alts == ["seed 21 SG off", "seed 21 SG on", "seed 22 SG off", "seed 22 SG on"]
    # Each image downloads as PNG (the same bytes it shows) and with its provenance JSON.
    pngs = re.findall(r'<a class="png" download="([^"]+)" href="data:image/png;base64,([^"]+)"', dom)
    assert [name for name, _ in pngs] == [f"surprise-seed{s}-sg-{v}.png" for s in (21, 22) for v in ("off", "on")]
    shown_pngs = re.findall(r'<img alt="seed \d+ SG o(?:n|ff)" src="data:image/png;base64,([^"]+)"', dom)
    assert [data for _, data in pngs] == shown_pngs
    records = [json.loads(unquote(data)) for data in re.findall(
        r'<a class="provenance" download="[^"]+\.json" href="data:application/json;charset=utf-8,([^"]+)"', dom)]
    assert [(r["seed"], r["variant"], r["settings"]["sg_scale"]) for r in records] == [
        (21, "SG off", 0), (21, "SG on", 3), (22, "SG off", 0), (22, "SG on", 3)]
    for record in records:
        assert record["prompt"] == "a portrait" and record["bundle_hash"] == bundle_hash
        assert record["aus"] == pytest.approx(expected) and record["request"]["aus"] == pytest.approx(expected)
        assert record["settings"]["cfg_scale"] == 2.5 and record["settings"]["steps"] == 4
        assert record["settings"]["sg_target"] == "both"  # the page's SG target select, not the server default (au)
        assert record["settings"]["sg_adaptive"] is True  # the page's step rule, not the server default (fixed)
        assert record["label"] in record["probabilities"]
        assert sum(record["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    # The page's SG-on image is what the API returns for that request.
    direct = post(server, records[1]["request"]).json()["images"][0]["png_base64"]
    assert direct == shown_pngs[1]
    # The SG field starts at the server's scale for the expression: the secure app steers sad at 3 and
    # leaves happy unguided, where the page falls back to 8 so that its two columns still differ.
    for expression, server_scale, field in (("sad", "3", "3"), ("happy", "0", "8")):
        page = subprocess.run([*flags, "--dump-dom", f"{server}/secure/?expression={expression}"],
                              capture_output=True, text=True, timeout=180).stdout
        assert f'<small id="sg_default">server: {server_scale}</small>' in page, page[-3000:]
        assert re.search(rf'<input id="sg_scale"[^>]* value="{field}"', page), page[-3000:]
    subprocess.run([*flags, f"--screenshot={tmp_path / 'page.png'}", "--window-size=1100,900", url],
                   capture_output=True, timeout=180)
    assert (tmp_path / "page.png").stat().st_size > 5000
    shutil.copy(tmp_path / "page.png", tmp_path.parent / "serve-page.png")  # for a person to look at
