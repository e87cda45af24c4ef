"""One GPU check: every synfer stage on CUDA in half precision, at small size, one line per stage.

On a CUDA host that has this project's packages installed, run it directly. A GPU host without
network access gets the wheel archive instead: `make gpu-wheels` on a machine with the package index
builds build/gpu-wheels/site.tar.xz; copy it with the source tree to the host, where
cluster/gpu/with-wheels.sh unpacks it and runs this script (`make gpu-check` there does the same):

    bash cluster/gpu/with-wheels.sh build/gpu-wheels/site.tar.xz cluster/gpu/check.py

The same logic on CPU (a dry run of everything but CUDA; see cluster/gpu/README.md):

    python cluster/gpu/check.py --device cpu --precision bf16 [--stages generate,serve]

Each stage is the user's own command (``python -m synfer_ray.cli ...``) in a process group of its
own, so a stage that fails, hangs or leaves Ray behind never stops the next one; on CUDA two lanes of
stages run side by side (the GPU has room for both; ``--lanes 1`` runs them in turn). Stages: generate
(two generator actors at 0.4 GPU and a labeler at 0.2 sharing one GPU; labels written), serve (a
replica at 0.2 GPU answering over HTTP on 127.0.0.1), train (FER classifier on Ray Train + DeepSpeed,
fp16/bf16), train-generator (``--from`` a tiny SD-layout bundle), train-adapter, train-labeler,
evaluate, bundle quality and a study of two conditions and three downstream runs. On CUDA a stage
passes only if its processes' GPU memory rose while it ran (sampled with nvidia-smi), so one that
silently fell back to the CPU fails. Prints ``PASS|FAIL stage seconds [reason]``; writes ``gpu-check.json``
and every stage's log under ``--out`` (default: the output folder given by the OUT environment
variable when it is set, else build/gpu-check). Exits 1 when any stage fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("generate", "serve", "train", "train-generator", "train-adapter", "train-labeler", "evaluate",
          "bundle-quality", "study")
RESOLUTION = 48  # the tiny bundle's images; the faces made below match it
RAY_START_FAILED = "The current node timed out during startup"


class StageFailed(Exception):
    """A stage's short reason for failing (the log has the rest)."""


@dataclass
class Check:
    """What every stage needs: where things are, which device and precision, how to run a command."""

    device: str
    precision: str
    work: Path
    out: Path
    timeout: float
    notes: list[str] = field(default_factory=list)  # this stage's remarks, printed after its line
    sessions: list[int] = field(default_factory=list)  # process sessions this stage started

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def bundle(self) -> Path:
        return self.work / "bundle"

    @property
    def faces(self) -> Path:
        return self.work / "faces"

    @property
    def evaluator(self) -> Path:
        return self.work / "evaluator"

    def gpus(self, share: float) -> float:
        return share if self.cuda else 0.0

    def training(self, precision_key: str, deepspeed: bool = False) -> list[str]:
        """Overrides that put one Ray Train worker on the GPU in half precision. DeepSpeed's mixed
        precision is for GPUs only, so its jobs run fp32 in a CPU dry run."""
        precision = "fp32" if deepspeed and not self.cuda else self.precision
        return [f"scaling.use_gpu={str(self.cuda).lower()}", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
                f"{precision_key}={precision}", "tracking.enabled=false"]

    def synfer(self, stage: str, *args: str, timeout: float | None = None) -> Path:
        """Run ``synfer ARGS`` from the source tree; raise StageFailed with the log's last error.
        A Ray node that did not come up (its agents were too slow to start on a loaded machine) is
        not the stage's fault: that start is tried once more, with a note."""
        try:
            return self._synfer(stage, *args, timeout=timeout)
        except StageFailed as failure:
            if RAY_START_FAILED not in str(failure):
                raise
            self.notes.append("Ray's node start timed out once; tried again")
            return self._synfer(stage, *args, timeout=timeout)

    def launch(self, command: list[str], sink) -> subprocess.Popen:
        """``command`` in a process group of its own (stopped whole), logged to ``sink``."""
        sink.write("$ " + " ".join(command) + "\n")
        sink.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                   env=stage_environment(), start_new_session=True)
        self.sessions.append(process.pid)
        return process

    def _synfer(self, stage: str, *args: str, timeout: float | None = None) -> Path:
        log = self.out / "logs" / f"{stage}.log"
        command = [sys.executable, "-m", "synfer_ray.cli", *args]
        name = "synfer " + " ".join(args[:2] if args[0] == "bundle" else args[:1])
        with open(log, "a") as sink:
            process = self.launch(command, sink)
            try:
                code = process.wait(timeout=timeout or self.timeout)
            except subprocess.TimeoutExpired:
                stop_group(process)
                raise StageFailed(f"`{name}` still running after {timeout or self.timeout:.0f} s; "
                                  f"stopped ({last_error(log)})")
            finally:
                kill_group(process.pid)
        if code:
            raise StageFailed(f"`{name}` exited {code}: {last_error(log)}")
        return log


def stage_environment() -> dict[str, str]:
    """No network, no MLflow, no Ray token written to HOME, unbuffered logs."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": os.pathsep.join(
                [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}


def stop_group(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the stage's driver (Serve and Ray shut down cleanly on it), then the whole group."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    kill_group(process.pid)
    process.wait()


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of the process group this check started for a stage (Ray's daemons)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def last_error(log: Path, width: int = 240) -> str:
    """The line of ``log`` that best says what went wrong: synfer's own ``error: ...``, else the last
    exception line of a traceback, else the last line naming an error."""
    import re
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for pattern in (r"^error: ", r"^[\w.]*(Error|Exception)\b", r"(Error|Exception)\b"):
        for line in reversed(lines):
            if re.search(pattern, line) and not line.startswith("$ "):
                return line[:width]
    return (lines[-1] if lines else "no output")[:width]


class GPUMemory:
    """GPU memory while a stage runs, sampled with nvidia-smi: did the stage use the GPU?

    The processes on the GPU are attributed to a stage by their session (each stage's commands start
    one of their own, and Ray's workers inherit it), so stages in parallel lanes do not vouch for
    each other. Where nvidia-smi cannot show this namespace's pids (some containers), the whole
    GPU's rise is all there is, and ``attributed`` says so.
    """

    def __init__(self, sessions: list[int], interval: float = 0.5):
        self.sessions, self.interval = sessions, interval
        self.own_peak = self.peak = self.baseline = 0
        self.attributed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _query(what: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]

    def used_mib(self) -> int:
        return sum(int(row[0]) for row in self._query("gpu=memory.used") if row[0].isdigit())

    def own_mib(self) -> int:
        """MiB held by processes of this stage's sessions (0 when none is visible)."""
        total = 0
        for pid, used in self._query("compute-apps=pid,used_memory"):
            try:
                if pid.isdigit() and used.isdigit() and os.getsid(int(pid)) in self.sessions:
                    total += int(used)
                    self.attributed = True
            except (ProcessLookupError, PermissionError):
                continue
        return total

    def __enter__(self) -> "GPUMemory":
        self.baseline = self.peak = self.used_mib()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self.used_mib())
                self.own_peak = max(self.own_peak, self.own_mib())
            except (OSError, subprocess.SubprocessError, ValueError):
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    @property
    def rise_mib(self) -> int:
        return self.own_peak if self.attributed else self.peak - self.baseline


# --- inputs every stage shares --------------------------------------------------------------------

def prepare(check: Check) -> None:
    """The tiny SD-layout bundle (with its guide), labelled faces with captions and AUs, an evaluator."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from synfer_ray import taxonomy
    from synfer_ray.bundle import make_tiny_bundle
    from synfer_ray.models import build_classifier
    make_tiny_bundle(check.bundle, seed=0, resolution=RESOLUTION)
    build_classifier("small_convnext", taxonomy.AFFECTNET_7, RESOLUTION, seed=1).save_pretrained(check.evaluator)
    check.faces.mkdir(parents=True, exist_ok=True)
    for name, per_class, seed in (("train", 16, 0), ("test", 4, 1)):
        rng = np.random.default_rng(seed)
        rows: dict[str, list] = {"image": [], "label": [], "caption": [], "aus": []}
        for k, expression in enumerate(taxonomy.AFFECTNET_7):  # a bright square per class: learnable
            for i in range(per_class):
                pixels = rng.normal(100, 20, (RESOLUTION, RESOLUTION))
                row, column = divmod(k, 3)
                pixels[6 + row * 14:16 + row * 14, 6 + column * 14:16 + column * 14] += 120
                rows["image"].append(png(Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L").convert("RGB")))
                rows["label"].append(expression)
                rows["caption"].append(taxonomy.build_prompt(seed * 1000 + k * per_class + i, expression))
                rows["aus"].append(taxonomy.prototype_aus(expression, taxonomy.FINEFACE_12).tolist())
        pq.write_table(pa.table(rows), check.faces / f"{name}.parquet")


def png(image) -> bytes:
    import io
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# --- the stages ------------------------------------------------------------------------------------

def stage_generate(check: Check) -> str:
    import pyarrow.parquet as pq
    output = check.work / "dataset"
    count = 32
    check.synfer("generate", "generate", "--config", "tiny", f"bundle={check.bundle}", f"output={output}",
                 f"count={count}", "rows_per_shard=8", "sampling.steps=4", "sampling.sg_scale=1.0",
                 f"precision={check.precision}",
                 "generator.min_actors=2", "generator.max_actors=2", f"generator.num_gpus={check.gpus(0.4)}",
                 "generator.batch_size=8", "labeler.min_actors=1", "labeler.max_actors=1",
                 f"labeler.num_gpus={check.gpus(0.2)}", "labeler.batch_size=16",
                 f"labeling.voters=[{{path: {check.bundle / 'sg_classifier'}, name: guide}}]",
                 "tracking.enabled=false", "ray.num_cpus=8")
    table = pq.read_table(output / "data", columns=["label", "voters", "confidence"])
    if table.num_rows != count:
        raise StageFailed(f"{table.num_rows} rows written, {count} asked")
    if table.column("label").null_count or not all(table.column("voters").to_pylist()):
        raise StageFailed("rows without a label or without the labeler's votes")
    return f"{count} rows, labelled by {table.column('voters')[0].as_py()}"


def stage_serve(check: Check) -> str:
    import base64
    port = free_port()
    log = check.out / "logs" / "serve.log"
    command = [sys.executable, "-m", "synfer_ray.cli", "serve", "--config", "configs/serve.yaml",
               f"bundle={check.bundle}", "host=127.0.0.1", f"port={port}", f"num_gpus={check.gpus(0.2)}",
               f"precision={check.precision}", "num_cpus=1", "torch_threads=2", "autoscaling.max_replicas=1",
               "ray.num_cpus=4"]
    with open(log, "a") as sink:
        server = check.launch(command, sink)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + check.timeout
            while True:
                if server.poll() is not None:
                    raise StageFailed(f"`synfer serve` exited {server.returncode} before answering: {last_error(log)}")
                try:
                    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise StageFailed(f"no answer on {base}/healthz in {check.timeout:.0f} s: {last_error(log)}")
                time.sleep(1)
            body = json.dumps({"expression": "happy", "n": 2, "steps": 4, "seed": 3}).encode()
            request = urllib.request.Request(f"{base}/v1/generate", data=body,
                                             headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=check.timeout) as answer:
                    reply = json.loads(answer.read())
            except OSError as error:
                raise StageFailed(f"POST /v1/generate failed: {error}; {last_error(log)}") from None
            images = reply.get("images", [])
            if len(images) != 2 or not all(base64.b64decode(i["png_base64"])[:4] == b"\x89PNG" for i in images):
                raise StageFailed(f"expected 2 PNG images, got {len(images)}")
            if not all(i.get("label") for i in images):
                raise StageFailed("images came back without the labeler's label")
            return f"2 images over HTTP, labels {[i['label'] for i in images]}"
        finally:
            stop_group(server)


def free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stage_train(check: Check) -> str:
    output = check.work / "train"
    check.synfer("train", "train", "--config", "configs/train-fer2013.yaml", "name=gpu-check-train",
                 f"output={output}", f"data.train=[{{path: {check.faces / 'train.parquet'}}}]",
                 f"data.test={{path: {check.faces / 'test.parquet'}}}", "data.val_fraction=0.2",
                 "optim.epochs=1", "optim.batch_size=16", "optim.zero_stage=2", "register_as=null", "ray.num_cpus=8",
                 *check.training("optim.precision", deepspeed=True))
    summary = json.loads((output / "summary.json").read_text())
    return f"test accuracy {summary['test']['accuracy']:.3f} (random faces, one epoch)"


def stage_train_generator(check: Check) -> str:
    output = check.work / "generator"
    check.synfer("train-generator", "train-generator", "--config", "tiny-generator", "--from", str(check.bundle),
                 "name=gpu-check-generator", f"output={output}", f"data.path={check.faces / 'train.parquet'}",
                 "data.limit=null", "vae.steps=2", "vae.batch_size=16", "vae.checkpoint_every=2", "vae.log_every=1",
                 f"vae.precision={check.precision}", "unet.steps=4", "unet.batch_size=16", "unet.checkpoint_every=2",
                 "unet.log_every=1", "quality.samples_per_class=1", "quality.sampling.steps=2",
                 f"quality.precision={check.precision}", "ray.num_cpus=8",
                 *check.training("unet.precision"))
    manifest = json.loads((output / "bundle" / "synfer_bundle.json").read_text())
    return f"bundle {manifest['content_hash'][:12]}"


def stage_train_adapter(check: Check) -> str:
    output = check.work / "adapter"
    check.synfer("train-adapter", "train-adapter", "--config", "configs/train-adapter.yaml", "name=gpu-check-adapter",
                 f"bundle={check.bundle}", f"output={output}", f"data.path={check.faces / 'train.parquet'}",
                 "stage.steps=4", "stage.batch_size=16", "stage.checkpoint_every=2", "stage.log_every=1",
                 "stage.warmup_steps=1", "ray.num_cpus=8", *check.training("stage.precision"))
    summary = json.loads((output / "summary.json").read_text())
    return f"diffusion loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}"


def stage_train_labeler(check: Check) -> str:
    output = check.work / "labeler"
    check.synfer("train-labeler", "train-labeler", "--config", "configs/train-labeler.yaml", "name=gpu-check-labeler",
                 f"model.bundle={check.bundle}", f"output={output}",
                 f"data.train=[{{path: {check.faces / 'train.parquet'}}}]",
                 f"data.test={{path: {check.faces / 'test.parquet'}}}", "data.val_fraction=0.2", "optim.epochs=1",
                 "optim.batch_size=16", "model.labeler.dim=16", "model.labeler.heads=2", "register_as=null",
                 "ray.num_cpus=8", *check.training("optim.precision", deepspeed=True))
    if not (output / "bundle" / "labeler").is_dir():
        raise StageFailed("no labeler/ in the new bundle version")
    return "FERAnno installed in a new bundle version"


def trained_classifier(check: Check) -> Path:
    """The train stage's model when it made one, else the untrained evaluator (stages stay independent)."""
    model = check.work / "train" / "model"
    if (model / "config.json").is_file():
        return model
    check.notes.append("train made no model: evaluate used the untrained evaluator")
    return check.evaluator


def stage_evaluate(check: Check) -> str:
    out = check.work / "eval"
    check.synfer("evaluate", "evaluate", str(trained_classifier(check)), str(check.faces / "test.parquet"),
                 "--out", str(out), "--device", check.device)
    report = json.loads((out / "eval_report.json").read_text())
    return f"accuracy {report['accuracy']:.3f} on {report['rows']} faces"


def stage_bundle_quality(check: Check) -> str:
    out = check.work / "quality"
    check.synfer("bundle-quality", "bundle", "quality", str(check.bundle), "--evaluator", str(check.evaluator),
                 "--faces", str(check.faces / "train.parquet"), "--out", str(out), "--per-class", "1", "--steps", "2",
                 "--precision", check.precision)  # on CUDA where there is one
    metrics = json.loads((out / "quality.json").read_text())
    return f"{len(metrics.get('metrics', metrics))} figures in quality.json"


def stage_study(check: Check) -> str:
    """The smallest study that runs: given guide, evaluator and generator; two conditions; N = 14."""
    import yaml
    output = check.work / "study"
    generator = {"min_actors": 2, "max_actors": 2, "num_cpus": 1, "num_gpus": check.gpus(0.4), "batch_size": 8}
    labeler = {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "num_gpus": check.gpus(0.2), "batch_size": 16}
    config = {
        "name": "gpu-check-study", "output": str(output),
        "real_train": str(check.faces / "train.parquet"), "real_test": str(check.faces / "test.parquet"),
        "guide": {"model": str(check.bundle / "sg_classifier")}, "evaluator": {"model": str(check.evaluator)},
        "generator": {"model": str(check.bundle)},
        "generation": {"per_class": 1, "conditions": ["text", "text_au_sg"], "rows_per_shard": 8, "tau": 0.0,
                       "precision": check.precision,
                       "sampling": {"steps": 2, "cfg_scale": 2.0, "au_scale": 1.0, "sg_scale": 1.0, "sg_window": 0.5},
                       "generator": generator, "labeler": labeler},
        "downstream": {"real_rows": 14, "multiples": [1], "condition": "text_au_sg", "synthetic_rows": "all",
                       "seeds": [0], "train": {"config": str(ROOT / "configs" / "train-fer2013.yaml"), "overrides": [
                           "optim.epochs=1", "optim.batch_size=8", "data.val_fraction=0.2", "register_as=null",
                           *check.training("optim.precision", deepspeed=True)]}},
        "ray": {"num_cpus": 8}, "tracking": {"enabled": False},
    }
    path = check.work / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    check.synfer("study", "study", "--config", str(path))
    results = json.loads((output / "results.json").read_text())
    runs = sum(len(r) for r in results["downstream"].values())
    return f"{len(results['conditions'])} conditions, {runs} downstream runs, report.md written"


RUNNERS: dict[str, Callable[[Check], str]] = {
    "generate": stage_generate, "serve": stage_serve, "train": stage_train, "train-generator": stage_train_generator,
    "train-adapter": stage_train_adapter, "train-labeler": stage_train_labeler, "evaluate": stage_evaluate,
    "bundle-quality": stage_bundle_quality, "study": stage_study}


def run_stage(shared: Check, name: str, lanes: int = 1) -> dict:
    """Run one stage; never raises. On CUDA it fails unless the GPU's memory rose while it ran."""
    check = replace(shared, notes=[], sessions=[])
    began = time.perf_counter()
    result = {"stage": name, "passed": False}
    try:
        if check.cuda:
            with GPUMemory(check.sessions) as memory:
                detail = RUNNERS[name](check)
            result["gpu_mib"] = memory.rise_mib
            if memory.rise_mib < 64:
                raise StageFailed(f"finished, but its GPU memory never rose ({memory.rise_mib} MiB): it ran on the CPU")
            detail += f"; GPU {memory.rise_mib} MiB"
            if not memory.attributed and lanes > 1:
                check.notes.append("nvidia-smi shows no pids here: the GPU rise may be the other lane's")
        else:
            detail = RUNNERS[name](check)
        result.update(passed=True, detail=detail)
    except StageFailed as failure:
        result["reason"] = str(failure)
    except Exception as error:  # the check itself must go on to the next stage
        result["reason"] = f"{type(error).__name__}: {error}"[:300]
    result["seconds"] = round(time.perf_counter() - began, 1)
    result["notes"] = list(check.notes)
    return result


# Two lanes of about equal length on a GPU machine; within a lane the order matters (evaluate
# takes the model train made).
LANES = (("generate", "serve", "bundle-quality", "study"),
         ("train", "evaluate", "train-generator", "train-adapter", "train-labeler"))


def run_stages(check: Check, stages: list[str], lanes: int) -> list[dict]:
    """Every stage, in ``lanes`` parallel lanes, printing each line as its stage ends."""
    from concurrent.futures import ThreadPoolExecutor
    if lanes == 1:
        queues = [stages]
    else:
        queues = [[s for s in lane if s in stages] for lane in LANES]
        queues[-1] += [s for s in stages if not any(s in lane for lane in LANES)]
    printing = threading.Lock()
    results: dict[str, dict] = {}

    def lane(queue: list[str]) -> None:
        for name in queue:
            result = run_stage(check, name, lanes)
            with printing:
                results[name] = result
                print(line(result), flush=True)
    with ThreadPoolExecutor(max_workers=len(queues)) as pool:
        list(pool.map(lane, [q for q in queues if q]))
    return [results[name] for name in stages]


def line(result: dict) -> str:
    verdict = "PASS" if result["passed"] else "FAIL"
    text = f"{verdict} {result['stage']:16s} {result['seconds']:7.1f}s  "
    text += result.get("detail", "") if result["passed"] else result.get("reason", "")
    return text + "".join(f" [{note}]" for note in result["notes"])


def preflight(check: Check) -> list[str]:
    """What this Python sees: versions and where each package comes from (a failed import is printed
    and left to the stages that need it), and the GPU; the problems returned stop the check."""
    import importlib
    problems = []
    print(f"python {sys.version.split()[0]} at {sys.executable}", flush=True)
    for name in ("torch", "ray", "diffusers", "deepspeed", "transformers", "pydantic", "fastapi", "PIL", "matplotlib"):
        try:
            module = importlib.import_module(name)
            print(f"  {name:12s} {getattr(module, '__version__', '?'):14s} {Path(module.__file__).parent}", flush=True)
        except Exception as error:  # a broken import is what this line is for
            print(f"  {name:12s} IMPORT FAILED: {type(error).__name__}: {error}", flush=True)
    import torch
    if check.cuda:
        if not torch.cuda.is_available():
            problems.append("--device cuda, but torch sees no CUDA device here")
        else:
            print(f"  cuda {torch.version.cuda}, {torch.cuda.get_device_name(0)}, bf16 "
                  f"{torch.cuda.is_bf16_supported()}", flush=True)
            if shutil.which("nvidia-smi") is None:
                problems.append("nvidia-smi not found: the check measures each stage's GPU use with it")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                        help="default: fp16 on cuda, bf16 on cpu")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "build" / "gpu-check"))
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--stage-timeout", type=float, default=None, help="seconds (default 300 cuda, 900 cpu)")
    parser.add_argument("--lanes", type=int, choices=[1, 2], default=None,
                        help="stages in parallel: 2 on cuda (the GPU has room for both), 1 on cpu")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    precision = args.precision or ("fp16" if args.device == "cuda" else "bf16")
    timeout = args.stage_timeout or (300 if args.device == "cuda" else 900)
    lanes = args.lanes or (2 if args.device == "cuda" else 1)
    work = args.work or Path(tempfile.mkdtemp(prefix="synfer-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    check = Check(args.device, precision, work, args.out, timeout)
    began = time.perf_counter()
    print(f"gpu-check: device {args.device}, precision {precision}, {lanes} lane(s), stages {', '.join(stages)}; "
          f"logs in {args.out / 'logs'}", flush=True)
    problems = preflight(check)
    if not problems:
        import contextlib
        with open(args.out / "logs" / "prepare.log", "w") as log, contextlib.redirect_stderr(log):
            try:  # libraries' progress bars and warnings go to the log, not between the verdicts
                prepare(check)
            except Exception as error:
                problems.append(f"preparing the bundle and faces: {type(error).__name__}: {error}")
    if problems:
        results = [{"stage": name, "passed": False, "seconds": 0.0, "reason": problems[0], "notes": []}
                   for name in stages]
        for result in results:
            print(line(result), flush=True)
    else:
        results = run_stages(check, stages, lanes)
    passed = sum(r["passed"] for r in results)
    total = time.perf_counter() - began
    print(f"gpu-check: {passed}/{len(results)} stages passed in {total:.0f} s (device {args.device}, "
          f"{precision})", flush=True)
    (args.out / "gpu-check.json").write_text(json.dumps(
        {"device": args.device, "precision": precision, "seconds": round(total, 1), "problems": problems,
         "results": results}, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
