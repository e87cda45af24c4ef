"""The generator over real HTTP on loopback: Ray Serve + FastAPI, batching, limits, the web page."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from conftest import free_port
from synfer_ray.config import ServeConfig, build_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_bundle_path):
    from ray import serve

    from synfer_ray.serve import build_app
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    common = {"bundle": str(tiny_bundle_path), "max_images": 4, "max_steps": 20, "default_steps": 6,
              "num_cpus": 0.5, "torch_threads": 2, "max_batch_size": 8}
    serve.run(build_app(build_config(ServeConfig, common)), name="open", route_prefix="/", blocking=False)
    serve.run(build_app(build_config(ServeConfig, {**common, "api_key_env": "SYNFER_TEST_API_KEY"})),
              name="secure", route_prefix="/secure", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if all(requests.get(f"{base}{p}/healthz", timeout=5).ok for p in ("", "/secure")):
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
    written = generate_pngs(tiny_bundle_path, "sad", tmp_path, seed=7, n=2, steps=6, sg_scale=2.0)
    assert [base64.b64encode(p.read_bytes()).decode() for p in written] == first
    png = post(server, {**body, "n": 1, "format": "png"})
    assert png.headers["content-type"] == "image/png" and png.content == written[0].read_bytes()


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
    assert post(server, body, path="/secure/v1/generate", headers={"x-api-key": "test-key"}).status_code == 200


def test_web_page_generates_in_headless_chromium(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000"]
    url = f"{server}/?expression=surprise&autorun=1"
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert len(re.findall(r'<img alt="seed \d+" src="data:image/png;base64,', dom)) == 4, dom[-2000:]
    assert "4 x surprise" in dom
    subprocess.run([*flags, f"--screenshot={tmp_path / 'page.png'}", "--window-size=900,700", url],
                   capture_output=True, timeout=120)
    assert (tmp_path / "page.png").stat().st_size > 5000
    shutil.copy(tmp_path / "page.png", tmp_path.parent / "serve-page.png")  # for a person to look at
