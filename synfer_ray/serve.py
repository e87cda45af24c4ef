"""Ray Serve: the generator over HTTP (FastAPI ingress), with dynamic batching across requests.

    POST /v1/generate     expression, AUs, prompt, seed, n, steps, scales -> PNGs + label probabilities
    GET  /v1/expressions  classes, AU names, per-class prototype AUs, limits
    GET  /healthz         liveness, the bundle hash and the replica's row counters
    GET  /                a page to tune faces in a browser (static/index.html)

Rows of concurrent requests are sampled together (``@serve.batch``) up to ``max_batch_size``. A
request's rows are never split between batches, so a request of up to ``max_batch_size`` rows
served alone is sampled exactly as ``synfer generate-one`` samples it and returns the same bytes (at
the same ``torch_threads``); batched with other requests a pixel may differ by float rounding (1/255
at most seen).

The replica fails closed: with ``api_key_env`` set it refuses to start unless that variable holds a
key, and then every generate request must carry it in ``X-API-Key`` (Ray's token auth does not
cover Serve's HTTP port); a body over ``max_body_bytes`` gets 413 before anything parses it; a
request past ``request_timeout_s`` gets 504 and its rows not yet sampled are dropped.
"""


import asyncio
import base64
import hmac
import math
import os
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve

from synfer_ray.config import Scheduler, ServeConfig, SgTarget, build_config
from synfer_ray.config.generate import SgGuide
from synfer_ray.errors import SynferError

MAX_SEED = 2**63 - 1

api = FastAPI(title="synfer-ray generator",
              description="SynFER faces of a chosen expression and action units, with pseudo labels.")


class GenerateRequest(BaseModel):
    expression: str = Field(..., max_length=32, description="Target expression; see GET /v1/expressions.",
                            examples=["happy"])
    aus: dict[str, float] = Field(default_factory=dict, max_length=64,
                                  description="AU intensities by name, each in [0, 1]; unnamed AUs are 0. "
                                              "Empty: the expression's EMFACS prototype.",
                                  examples=[{"AU6": 0.7, "AU12": 0.9}])
    prompt: str | None = Field(None, max_length=400, description="Caption; default: sampled from each seed.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the first image; image k uses seed + k.")
    n: int = Field(1, ge=1, le=64, description="Number of images (the server's max_images caps it further).")
    steps: int | None = Field(None, ge=1, le=1000, description="Sampling steps (server default and max_steps apply).")
    scheduler: Scheduler | None = Field(
        None, description="Sampler; default: the server's (ServeConfig.scheduler).")
    cfg_scale: float = Field(3.0, ge=0, le=30, description="Classifier-free guidance scale; 1 = off.")
    au_scale: float = Field(1.0, ge=0, le=4, description="Weight of the AU attention; 0 = text only.")
    sg_scale: float | None = Field(
        None, ge=0, le=100, description="Semantic-guidance step, percent of the norm of what it steers; 0 = off; "
                                        "default: the server's for the expression (ServeConfig.sg_class_scales, "
                                        "else ServeConfig.sg_scale).")
    sg_window: float = Field(0.4, ge=0, le=1, description="Fraction of late steps with semantic guidance.")
    sg_target: SgTarget | None = Field(
        None, description="What semantic guidance steers; default: the server's (ServeConfig.sg_target).")
    sg_adaptive: bool | None = Field(
        None, description="Scale each image's semantic-guidance step by 1 - p(target), the guide's reading of "
                          "the face so far; default: the server's (ServeConfig.sg_adaptive).")
    sg_guide: SgGuide | None = Field(
        None, description="What the guide reads: pixels (the decoded image) or latents (the predicted clean "
                          "latent, no decode: cheaper; the server needs a latent guide); default: the "
                          "server's (ServeConfig.sg_guide).")
    sg_reuse_pass: bool | None = Field(
        None, description="Take the guide's UNet pass as each guided step's conditional half (one pass fewer; "
                          "the move acts from the next step on); default: the server's (ServeConfig.sg_reuse_pass).")
    format: Literal["json", "png"] = Field("json", description="'png' returns image/png bytes (n must be 1).")


class GeneratedImage(BaseModel):
    seed: int
    prompt: str
    png_base64: str
    label: str | None = Field(None, description="The labeler's final label (argmax of probabilities).")
    probabilities: dict[str, float] = Field(default_factory=dict, description="The labeler's soft label.")


class GenerateResponse(BaseModel):
    expression: str
    aus: dict[str, float]
    bundle_hash: str
    settings: dict[str, Any]
    images: list[GeneratedImage]


def _unprocessable(field: str, message: str) -> HTTPException:
    # The same shape FastAPI uses for schema errors, so clients parse one format.
    return HTTPException(status_code=422, detail=[{"loc": ["body", *field.split(".")], "msg": message,
                                                   "type": "value_error"}])


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    # FastAPI's own 422, except that a NaN or Infinity (which JSON parsing accepts) echoed back in
    # an error's input would make the reply unencodable, a 500: it is echoed as text instead.
    return JSONResponse(status_code=422, content={"detail": _finite(jsonable_encoder(error.errors()))})


def api_key(config: ServeConfig) -> bytes | None:
    """The key a generate request must carry, or None where ``api_key_env`` is unset. A configured
    variable that is unset or empty raises: serving without the key would let every request in."""
    if not config.api_key_env:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise SynferError("api_key_env", config.api_key_env,
                          f"the name of an environment variable holding the API key; {config.api_key_env} "
                          "is unset or empty where the replica runs (set it, or remove api_key_env to serve "
                          "without a key)")
    return key.encode()


def check_class_scales(config: ServeConfig, classes: Sequence[str]) -> None:
    """A per-expression SG scale for a class the bundle lacks would never be used: refused at start."""
    unknown = sorted(set(config.sg_class_scales) - set(classes))
    if unknown:
        raise SynferError(f"sg_class_scales.{unknown[0]}", unknown[0], f"a class of the bundle: {list(classes)}")


def check_guides(config: ServeConfig, has_latent_guide: bool) -> None:
    """A default guide the server cannot run would fail every guided request: refused at start."""
    if config.sg_guide == "latents" and not has_latent_guide:
        raise SynferError("sg_guide", config.sg_guide, "pixels, or a latent guide: sg_latent_guide or the "
                                                       "bundle's sg_latent_guide/ (it has none)")


def _replica() -> "SynferGenerator":
    # The FastAPI app is a frozen copy per replica (serve.ingress); the replica object holds the config.
    return serve.get_replica_context().servable_object


async def _check_api_key(request: Request) -> None:
    expected = _replica().api_key
    if expected is None:
        return
    # Starlette decodes header bytes as latin-1, so this gives back the bytes the client sent;
    # compare_digest takes as long for a near miss as for a wild guess.
    given = request.headers.get("x-api-key", "").encode("latin-1")
    if not hmac.compare_digest(given, expected):
        raise HTTPException(status_code=401, detail="missing or wrong X-API-Key header")


class BodyLimit:
    """ASGI middleware: a request body over the replica's ``max_body_bytes`` gets 413 before any of it
    is parsed, whether it declares its size (Content-Length) or streams it (chunked); a body within
    the cap is read here and handed on whole.

    Serve's proxy still takes in what the client sends (it queues it for the replica); a hard cap
    on what reaches the cluster belongs in the load balancer in front."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _replica().config.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(limit, scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(limit, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, whenever it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(limit: int, scope, receive, send) -> None:
        reply = JSONResponse({"detail": f"request body over {limit} bytes (the server's max_body_bytes)"},
                             status_code=413)
        await reply(scope, receive, send)


api.add_middleware(BodyLimit)  # before @serve.ingress freezes the app


def _rows_in(items: list[tuple[list[Any], Any, Any]]) -> int:
    """A batch's size for ``@serve.batch``: its rows, not its chunks."""
    return sum(len(rows) for rows, _, _ in items)


class _Ticket:
    """One request's claim on the sampler: how many of its rows have started, and whether it gave up."""

    def __init__(self):
        self.started = 0
        self.released = False


@serve.ingress(api)
class SynferGenerator:
    """One replica: the bundle loaded once, the sampler, and the labeler's voters."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from synfer_ray.bundle import load_bundle
        from synfer_ray.generator.sampler import GuidedSampler
        from synfer_ray.labeler.ensemble import PseudoLabeler, Voter, load_voters
        self.config = build_config(ServeConfig, config)
        self.api_key = api_key(self.config)  # first: a replica that would fail open does not start
        torch.set_num_threads(self.config.torch_threads)
        from synfer_ray.precision import device_for, resolve
        device = device_for(self.config.num_gpus)
        dtype = resolve(self.config.precision, device)
        self.bundle = load_bundle(self.config.bundle, sg_latent_guide=self.config.sg_latent_guide,
                                  dtype=dtype).to(device)
        self.has_latent_guide = self.bundle.sg_latent_guide is not None  # may requests ask for sg_guide latents
        check_guides(self.config, self.has_latent_guide)
        check_class_scales(self.config, self.bundle.classes)
        self.sampler = GuidedSampler(self.bundle, device=device)
        voters = load_voters(self.config.voters, device, field="voters", bundle_labeler=self.config.bundle,
                             dtype=dtype)
        if not voters and self.bundle.sg_classifier is not None:
            voters = [Voter("sg_classifier", self.bundle.sg_classifier, self.bundle.sg_classifier.classes)]
        self.labeler = PseudoLabeler(voters, self.bundle.classes, mirror_average=self.config.mirror_average)
        self._sample.set_max_batch_size(self.config.max_batch_size)
        self._sample.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        # Rows of live requests waiting for the sampler; rows handed to it; rows dropped because
        # their request timed out or went away first (reported by /healthz).
        self.rows_queued = self.rows_sampled = self.rows_released = 0

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=_rows_in)
    async def _sample(self, items: list[tuple[list[Any], Any, _Ticket]]) -> list[list[Any]]:
        """Chunks of rows from any requests (each chunk one request's, at most ``max_batch_size`` rows,
        never split across batches); chunks sharing settings are sampled as one batch, in arrival order."""
        groups: dict[Any, list[int]] = defaultdict(list)
        for index, (_, settings, _) in enumerate(items):
            groups[settings].append(index)
        results: list[Any] = [None] * len(items)
        loop = asyncio.get_running_loop()
        for settings, indices in groups.items():
            # A request that gave up while an earlier group was sampling gets no further rows started.
            indices = [i for i in indices if not items[i][2].released]
            if not indices:
                continue
            rows = [row for i in indices for row in items[i][0]]
            for i in indices:
                items[i][2].started += len(items[i][0])
            self.rows_queued -= len(rows)
            self.rows_sampled += len(rows)
            # In a thread, so /healthz and request parsing stay responsive while sampling.
            images = iter(await loop.run_in_executor(None, self.sampler.generate, rows, settings))
            for i in indices:
                results[i] = [next(images) for _ in items[i][0]]
        return results

    async def _sample_rows(self, rows: list[Any], settings: Any) -> list[Any]:
        """The rows' images through the shared batch queue, or 504 after ``request_timeout_s``.

        A request's rows enter the queue as chunks of at most ``max_batch_size`` rows, and a chunk is
        never split between batches: a request of up to ``max_batch_size`` rows is sampled as one
        batch, as ``generate-one`` samples it, whatever else is queued.

        What a request that times out, or is cancelled (its client went away, Serve's own timeout),
        releases: its chunks still in the batch queue are dropped before a batch takes them (Ray's
        @serve.batch skips calls whose caller was cancelled), and so are its chunks in a later
        settings group of a batch already running (``_sample`` reads the ticket before each group).
        Rows already handed to the sampler finish, since a batch is one tensor that may hold other
        requests' rows, and their images are thrown away. Labelling and PNG encoding never start.
        """
        ticket = _Ticket()
        self.rows_queued += len(rows)
        size = self.config.max_batch_size
        chunks = [rows[start:start + size] for start in range(0, len(rows), size)]
        work = asyncio.gather(*[self._sample((chunk, settings, ticket)) for chunk in chunks])
        done: set = set()
        try:
            done, _ = await asyncio.wait([work], timeout=self.config.request_timeout_s)
        finally:
            if not work.done():
                # No await between marking the ticket and cancelling: no group can start in between.
                ticket.released = True
                work.cancel()
                released = len(rows) - ticket.started
                self.rows_queued -= released
                self.rows_released += released
        if not done:
            raise HTTPException(status_code=504, detail=f"generation took longer than the server's "
                                                        f"request_timeout_s ({self.config.request_timeout_s} s)")
        return [image for chunk in work.result() for image in chunk]

    def _encode_and_label(self, images: list[Any], png_only: bool) -> tuple[list[bytes], list[tuple[str, dict]]]:
        """PNG bytes of each image, and (label, probabilities) from the voters' weighted vote as in
        ``generate`` (none without voters, or for a PNG reply)."""
        import numpy as np

        from synfer_ray.images import png_bytes
        from synfer_ray.labeler.rectify import rectify
        pngs = [png_bytes(image) for image in images]
        if png_only or not self.labeler.voters:
            return pngs, []
        votes = self.labeler.probabilities(np.stack(images))
        result = rectify(votes, [voter.weight for voter in self.labeler.voters], self.labeler.tau)
        classes = self.bundle.classes
        return pngs, [(classes[int(index)], dict(zip(classes, map(float, soft))))
                      for index, soft in zip(result.label_index, result.soft_label)]

    def _default_sg_scale(self, expression: str) -> float:
        return self.config.sg_class_scales.get(expression, self.config.sg_scale)

    def _rows(self, request: GenerateRequest):
        from synfer_ray.generate_one import expression_requests
        from synfer_ray.generator.sampler import SamplerSettings
        config = self.config
        if request.n > config.max_images:
            raise _unprocessable("n", f"at most {config.max_images} images per request on this server")
        steps = request.steps or config.default_steps
        if steps > config.max_steps:
            raise _unprocessable("steps", f"at most {config.max_steps} steps on this server")
        if request.format == "png" and request.n != 1:
            raise _unprocessable("format", "'png' returns one image: set n to 1 or use 'json'")
        if request.seed + request.n - 1 > MAX_SEED:
            raise _unprocessable("seed", f"seed + n - 1 must be <= {MAX_SEED}")
        try:
            target, rows = expression_requests(self.bundle, request.expression, request.aus, request.prompt,
                                               request.seed, request.n)
            sg_scale = self._default_sg_scale(target) if request.sg_scale is None else request.sg_scale
            settings = SamplerSettings(steps=steps, cfg_scale=request.cfg_scale, au_scale=request.au_scale,
                                       sg_scale=sg_scale, sg_window=request.sg_window,
                                       sg_target=request.sg_target or config.sg_target,
                                       sg_adaptive=config.sg_adaptive if request.sg_adaptive is None
                                       else request.sg_adaptive,
                                       sg_guide=request.sg_guide or config.sg_guide,
                                       sg_reuse_pass=config.sg_reuse_pass if request.sg_reuse_pass is None
                                       else request.sg_reuse_pass,
                                       sg_checkpointing=config.sg_checkpointing,
                                       scheduler=request.scheduler or config.scheduler)
            if settings.sg_guide == "latents" and not self.has_latent_guide:
                raise _unprocessable("sg_guide", "latents needs a latent guide, and this server has none "
                                                 "(its bundle has no sg_latent_guide/ and sg_latent_guide is "
                                                 "unset); use pixels")
            self.sampler.check(rows, settings)
        except SynferError as error:
            raise _unprocessable(error.field.replace("rows[0].", ""), str(error)) from None
        return target, rows, settings

    @api.post("/v1/generate", response_model=GenerateResponse, dependencies=[Depends(_check_api_key)],
              responses={200: {"content": {"image/png": {}}, "description": "JSON, or PNG when format is 'png'"}})
    async def generate(self, request: GenerateRequest):
        target, rows, settings = self._rows(request)
        images = await self._sample_rows(rows, settings)
        # Off the event loop: the labeler's forward passes would stall /healthz and other requests.
        pngs, labelled = await asyncio.get_running_loop().run_in_executor(
            None, self._encode_and_label, images, request.format == "png")
        if request.format == "png":
            return Response(content=pngs[0], media_type="image/png")
        return GenerateResponse(
            expression=target, aus=dict(zip(self.bundle.au_names, map(float, rows[0].aus))),
            bundle_hash=self.bundle.content_hash, settings=settings.__dict__,
            images=[GeneratedImage(seed=row.seed, prompt=row.prompt, png_base64=base64.b64encode(data).decode(),
                                   label=labelled[i][0] if labelled else None,
                                   probabilities=labelled[i][1] if labelled else {})
                    for i, (row, data) in enumerate(zip(rows, pngs))])

    @api.get("/v1/expressions")
    async def expressions(self) -> dict[str, Any]:
        from synfer_ray import taxonomy
        config = self.config
        return {"classes": list(self.bundle.classes), "au_names": list(self.bundle.au_names),
                "prototypes": {c: dict(zip(self.bundle.au_names,
                                           map(float, taxonomy.prototype_aus(c, self.bundle.au_names))))
                               for c in self.bundle.classes},
                "resolution": self.bundle.manifest.resolution,
                "limits": {"max_images": config.max_images, "max_steps": config.max_steps,
                           "default_steps": config.default_steps, "au_value": [0.0, 1.0]},
                # What a request without sg_scale, sg_target or sg_guide gets, per expression; and whether
                # a request may ask for sg_guide latents.
                "sg_defaults": {"target": config.sg_target, "guide": config.sg_guide,
                                "latent_guide": self.has_latent_guide,
                                "scale": {c: self._default_sg_scale(c) for c in self.bundle.classes}},
                "labeler": [v.name for v in self.labeler.voters]}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "bundle_hash": self.bundle.content_hash,
                "rows": {"queued": self.rows_queued, "sampled": self.rows_sampled, "released": self.rows_released}}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return (resources.files("synfer_ray") / "static" / "index.html").read_text()


def build_app(config: ServeConfig):
    """The Serve application for ``config`` (resources and autoscaling from it)."""
    scaling = config.autoscaling
    deployment = serve.deployment(
        SynferGenerator, name="SynferGenerator",
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus,
                           **({"resources": dict(config.resources)} if config.resources else {})},
        max_ongoing_requests=config.max_ongoing_requests,
        autoscaling_config={"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                            "target_ongoing_requests": scaling.target_ongoing_requests})
    return deployment.bind(config.model_dump(mode="json"))


def app_builder(args: dict[str, Any]):
    """For `serve run` / `serve deploy` / KubeRay: ``import_path: synfer_ray.serve:app_builder``
    with the ServeConfig fields as ``args``."""
    return build_app(build_config(ServeConfig, args))


def run_serve(config: ServeConfig, blocking: bool = True) -> str:
    """Start Serve on ``config.host:port`` and deploy; return the base URL. A configured API key
    whose variable is unset here raises before anything starts (replicas started by this driver
    inherit its environment; each replica checks again)."""
    from synfer_ray.bundle import BundleManifest
    from synfer_ray.pipeline import ensure_ray
    api_key(config)
    if config.sg_class_scales and Path(config.bundle).is_dir():  # a hub id is checked by each replica
        check_class_scales(config, BundleManifest.read(Path(config.bundle)).classes)
    ensure_ray(config.ray)
    serve.start(http_options={"host": config.host, "port": config.port,
                              "request_timeout_s": config.request_timeout_s})
    serve.run(build_app(config), name="synfer", route_prefix=config.route_prefix, blocking=False)
    url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    if blocking:
        import signal
        import time

        def stop(signum, frame):
            raise KeyboardInterrupt
        # `kill PID` stops it as Ctrl-C does (Ray's own SIGTERM handler aborts with a core dump).
        signal.signal(signal.SIGTERM, stop)
        print(f"serving {config.bundle} at {url}/ (API docs at {url}/docs); Ctrl-C or kill to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
