"""The docs' reference pages, rendered as Markdown from the code so they cannot drift from it.

- :func:`config_reference`: every field of every job's config (``synfer_ray.config.JOB_CONFIGS``),
  from the pydantic models' types, defaults and ``Field(description=...)``.
- :func:`cli_reference`: every ``synfer`` command, argument and option, from the Typer app.
- :func:`http_api_reference`: Serve's routes and bodies, from the FastAPI app's OpenAPI schema.
- :func:`formats_reference`: the labelled-faces Parquet schema (as ``synfer data import`` writes it)
  and a generated dataset's columns (as the generate job writes them).

``config_field`` and ``check_command_line`` keep the prose honest: the docs tests run every
``synfer`` command line of README.md and docs/ through them.
"""

from __future__ import annotations

import json
import shlex
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

# ---------------------------------------------------------------------------------------------------
# Config fields


@dataclass(frozen=True)
class ConfigField:
    """One leaf of a job's config, as a user writes it: ``sampling.sg_scale``, ``data.train.N.path``."""

    path: str
    type: str
    default: str
    description: str
    model: str


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: itself, list/dict items, members of a union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _container(annotation: Any) -> str | None:
    """"list" or "dict" when the annotation (or its non-None union member) is one, else None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _container(members[0]) if len(members) == 1 else None
    if origin is typing.Annotated:
        return _container(typing.get_args(annotation)[0])
    return {list: "list", dict: "dict", tuple: "list"}.get(origin)


def type_name(annotation: Any) -> str:
    """A short, YAML-minded name of a field's type: ``int``, ``"ddim" | "euler"``, ``list[Source]``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple, set):
        return f"list[{', '.join(type_name(a) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return f"map[{type_name(args[0])}, {type_name(args[1])}]" if args else "map"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return annotation.__name__
        return {"str": "string", "bool": "boolean", "int": "integer", "float": "number"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _default_text(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return json.dumps(value, default=str)


def config_fields(model: type[BaseModel], prefix: str = "") -> Iterator[ConfigField]:
    """Every leaf field of ``model`` with its dotted path; list items appear as ``N``, map keys as ``KEY``.

    A field whose type holds a model also appears itself (it can be set whole, e.g. ``data.train=[...]``)
    before the fields of that model."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        yield ConfigField(path, type_name(field.annotation), _default_text(field), field.description or "",
                          model.__name__)
        kind = _container(field.annotation)
        step = {"list": ".N.", "dict": ".KEY."}.get(kind, ".")
        for inner in dict.fromkeys(nested):
            yield from config_fields(inner, f"{path}{step}")


def config_field(model: type[BaseModel], dotted: str) -> bool:
    """Whether ``dotted`` (an override key: ``sampling.steps``, ``data.train.0.limit``,
    ``sampling.sg_class_scales.fear``) names a field of ``model`` or a place inside one."""
    parts = dotted.split(".")
    current: list[Any] = [model]  # annotations or models we are inside
    for part in parts:
        following: list[Any] = []
        for node in current:
            if isinstance(node, type) and issubclass(node, BaseModel):
                if part in node.model_fields:
                    following.append(node.model_fields[part].annotation)
                continue
            kind = _container(node)
            if kind == "list" and part.isdigit() or kind == "dict":
                args = [a for a in typing.get_args(_unwrap(node))]
                following.append(args[-1] if args else Any)
            elif node is Any:
                following.append(Any)
            else:  # a model, or a union holding models: look into each
                for inner in _models_in(node):
                    if part in inner.model_fields:
                        following.append(inner.model_fields[part].annotation)
        if not following:
            return False
        current = following
    return True


def _unwrap(annotation: Any) -> Any:
    """A list/dict annotation out of ``Annotated[...]`` and ``X | None``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(members[0]) if len(members) == 1 else annotation
    return annotation


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    from synfer_ray.config import JOB_CONFIGS

    jobs: dict[type, list[str]] = {}
    for job, model in JOB_CONFIGS.items():
        jobs.setdefault(model, []).append(job)
    lines = ["# Config reference", "",
             "Every field of every job's config, generated from the config models in `synfer_ray/config/`.",
             "A job reads a YAML file (`--config FILE`, or a preset's name) and then `key=value` overrides,",
             "dotted paths into it (`sampling.steps=30`, `data.train.0.limit=500`): `N` below is a list",
             "index, `KEY` a map key. A field that is `required` has no default. An unknown key, or a value",
             "of the wrong type or range, is refused with the field's name before any cluster work starts.",
             ""]
    for model, names in jobs.items():
        commands = ", ".join(f"`synfer {name}`" for name in names)
        lines += [f"## {' / '.join(names)}", "", f"{commands}: `{model.__name__}`. {_doc(model)}", "",
                  "| field | type | default | description |", "| --- | --- | --- | --- |"]
        for field in config_fields(model):
            lines.append(f"| `{field.path}` | {_cell(field.type)} | `{_cell(field.default)}` | "
                         f"{_cell(field.description)} |")
        lines.append("")
    return "\n".join(lines)


def _doc(model: type) -> str:
    return " ".join((model.__doc__ or "").split())


# ---------------------------------------------------------------------------------------------------
# The CLI


def synfer_command():
    """The ``synfer`` command tree (Typer's own click-style ``Group``; Typer vendors click)."""
    import typer

    from synfer_ray.cli import app

    return typer.main.get_command(app)


def _is_group(command) -> bool:
    return hasattr(command, "commands")


def _walk(command, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    yield path, command
    if _is_group(command):
        for name in sorted(command.commands):
            sub = command.commands[name]
            if not sub.hidden:
                yield from _walk(sub, [*path, name])


def cli_reference() -> str:
    root = synfer_command()
    lines = ["# CLI reference", "", "Every `synfer` command, generated from the command-line app "
             "(`synfer_ray/cli/`). `synfer COMMAND --help` prints the same.", ""]
    for path, command in _walk(root, []):
        title = " ".join(["synfer", *path])
        lines += [f"## `{title}`" if path else "## `synfer`", "", " ".join((command.help or "").split()), ""]
        usage = " ".join(command.collect_usage_pieces(command.context_class(command, info_name=title)))
        lines += ["```text", f"{title} {usage}".rstrip(), "```", ""]
        if _is_group(command):
            lines += ["| command | what it does |", "| --- | --- |"]
            for name in sorted(command.commands):
                sub = command.commands[name]
                anchor = "synfer-" + "-".join([*path, name])
                lines.append(f"| [`{name}`](#{anchor}) | {_cell(sub.get_short_help_str(limit=200))} |")
            lines.append("")
        params = [p for p in command.params if not getattr(p, "hidden", False) and p.name != "help"]
        if params:
            lines += ["| argument / option | type | default | description |", "| --- | --- | --- | --- |"]
            for param in params:
                lines.append(f"| {_param_names(param)} | {_cell(_param_type(param))} | {_param_default(param)} | "
                             f"{_cell(getattr(param, 'help', None) or '')} |")
            lines.append("")
    return "\n".join(lines)


def _param_names(param) -> str:
    if param.param_type_name == "argument":
        return f"`{(param.metavar or param.name).upper()}`" + (" ..." if param.nargs == -1 else "")
    names = ", ".join(f"`{name}`" for name in [*param.opts, *param.secondary_opts])
    return names


def _param_type(param) -> str:
    if param.param_type_name == "option" and param.is_flag:
        return "flag"
    return param.bare_type()


def _param_default(param) -> str:
    required = param.required
    if required:
        return "required"
    default = param.default
    if default is None or default == () or default == []:
        return ""
    if param.param_type_name == "option" and param.is_flag and default is False:
        return ""
    return f"`{_cell(str(default))}`"


@dataclass(frozen=True)
class CommandProblem:
    command: str
    problem: str


def _shell_commands(block: str) -> Iterator[list[str]]:
    """Each simple command of a shell block, as words (continuations joined, comments dropped)."""
    text = block.replace("\\\n", " ")
    for line in text.splitlines():
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words = list(lexer)
        except ValueError:
            continue
        command: list[str] = []
        for word in words:
            if word and set(word) <= set(";&|"):
                if command:
                    yield command
                command = []
            else:
                command.append(word)
        if command:
            yield command


# Job entrypoints (`ray job submit ... -- python jobs/X.py ...`) run the `synfer` command of that name.
def _job_entrypoints() -> dict[str, str]:
    return {"jobs/generate.py": "generate", "jobs/train.py": "train", "jobs/pipeline.py": "pipeline",
            "jobs/study.py": "study", "jobs/evaluate.py": "evaluate", "jobs/train_adapter.py": "train-adapter",
            "jobs/train_generator.py": "train-generator", "jobs/train_labeler.py": "train-labeler"}


def synfer_invocations(block: str) -> Iterator[list[str]]:
    """The argument lists after ``synfer`` (or a ``jobs/*.py`` entrypoint) in a shell block."""
    entrypoints = _job_entrypoints()
    for words in _shell_commands(block):
        for index, word in enumerate(words):
            if word == "synfer" or word.endswith("bin/synfer"):  # synfer, .venv/bin/synfer
                yield words[index + 1:]
                break
            if word in entrypoints and index > 0 and words[index - 1].startswith("python"):
                yield [entrypoints[word], *words[index + 1:]]
                break


def check_command_line(args: list[str]) -> list[str]:
    """What is wrong with ``synfer ARGS`` as documented: an unknown command or option, or an override
    key that names no field of the command's config. Empty when the line is real."""
    from synfer_ray.cli import COMMAND_CONFIGS
    from synfer_ray.config import JOB_CONFIGS

    command = synfer_command()
    path: list[str] = []
    rest = list(args)
    while _is_group(command) and rest and not rest[0].startswith("-"):
        if rest[0] not in command.commands:
            return [f"no command `synfer {' '.join([*path, rest[0]])}`"]
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    options = {opt: param for param in command.params if param.param_type_name == "option"
               for opt in [*param.opts, *param.secondary_opts]}
    options.update({"--help": None})
    if not path:
        options.update({"--version": None, "--install-completion": None, "--show-completion": None})
    problems = []
    job = COMMAND_CONFIGS.get(" ".join(path))
    words = iter(rest)
    for word in words:
        if word.startswith("-") and len(word) > 1 and not _is_number(word):
            name = word.split("=", 1)[0]
            if name not in options:
                problems.append(f"`synfer {' '.join(path)}` has no option `{name}`")
                continue
            param = options[name]
            if param is not None and not param.is_flag and "=" not in word:
                next(words, None)  # its value
        elif "=" in word and job is not None:
            key = word.split("=", 1)[0]
            if key.replace(".", "").replace("_", "").isalnum() and not config_field(JOB_CONFIGS[job], key):
                problems.append(f"`{key}` is no field of the `synfer {' '.join(path)}` config "
                                f"({JOB_CONFIGS[job].__name__})")
    return problems


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# The HTTP API


def openapi_schema() -> dict[str, Any]:
    from synfer_ray.serve import api

    return api.openapi()


def http_api_reference() -> str:
    schema = openapi_schema()
    components = schema.get("components", {}).get("schemas", {})
    lines = ["# HTTP API", "", f"{schema['info'].get('description', '')} Generated from the Serve app's OpenAPI "
             "schema (`synfer_ray/serve.py`); a running server also serves it at `/openapi.json` and an "
             "interactive page at `/docs`. With `api_key_env` set in the serve config, every route but "
             "`/healthz` needs the `X-API-Key` header.", "",
             "[The schema as JSON](openapi.json)", ""]
    for route, methods in schema["paths"].items():
        for method, operation in methods.items():
            lines += [f"## `{method.upper()} {route}`", "",
                      " ".join((operation.get("description") or operation.get("summary") or "").split()), ""]
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                lines += [f"Request body: [`{_json_type(body)}`](#{_json_type(body).lower()})", ""]
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                kinds = ", ".join(f"`{kind}`" for kind in content) or "no body"
                json_schema = content.get("application/json", {}).get("schema") or {}
                body_type = f" [`{_json_type(json_schema)}`](#{_json_type(json_schema).lower()})" \
                    if "$ref" in json_schema else ""
                lines.append(f"- **{status}** ({kinds}): {response.get('description', '')}{body_type}")
            lines.append("")
    lines += ["## Schemas", ""]
    for name, component in components.items():
        lines += [f"### `{name}`", "", " ".join(component.get("description", "").split()), ""]
        lines += _schema_table({"$ref": f"#/components/schemas/{name}"}, components) + [""]
    return "\n".join(lines)


def _schema_table(schema: dict, components: dict) -> list[str]:
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    properties = schema.get("properties", {})
    if not properties:
        return [f"`{_json_type(schema)}`"]
    required = set(schema.get("required", []))
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for name, prop in properties.items():
        default = "required" if name in required else (json.dumps(prop["default"]) if "default" in prop else "")
        rows.append(f"| `{name}` | {_cell(_json_type(prop))} | {_cell(default)} | "
                    f"{_cell(' '.join(prop.get('description', '').split()))} |")
    return rows


def _json_type(prop: dict | bool) -> str:
    if not isinstance(prop, dict):
        return "any"
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in prop:
        return " | ".join(_json_type(p) for p in prop["anyOf"])
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"array[{_json_type(prop.get('items', {}))}]"
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return f"map[string, {_json_type(prop['additionalProperties'])}]"
    bounds = [f"{word} {prop[key]}" for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                       ("maximum", "<="), ("exclusiveMaximum", "<"))
              if key in prop]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


# ---------------------------------------------------------------------------------------------------
# Formats on disk


def _arrow_table(schema) -> list[str]:
    rows = ["| column | Arrow type |", "| --- | --- |"]
    rows += [f"| `{field.name}` | `{field.type}` |" for field in schema]
    return rows


def _layout_block() -> str:
    """The directory listing in ``synfer_ray.data.shards``' docstring (the one the code keeps)."""
    from synfer_ray.data import shards

    doc = shards.__doc__ or ""
    block = doc.split("::", 1)[1].split("\n\n")[1]
    return "\n".join(line[4:] for line in block.splitlines())


def formats_reference() -> str:
    from synfer_ray.data.importer import SCHEMA_VERSION, ImportOptions, _schema
    from synfer_ray.generator.rows import PROVENANCE_COLUMNS
    from synfer_ray.labeler.ensemble import LABEL_COLUMNS

    faces = _schema(ImportOptions(au_names=("AU1", "AU2")))
    lines = ["# Formats", "", "What the jobs write and read, generated from the code that writes it.", "",
             "## Labelled faces", "",
             f"`synfer data import` writes `train.parquet` and `validation.parquet` with this schema "
             f"(`{SCHEMA_VERSION}`), and every training job reads it; any Parquet with an `image` (encoded "
             "bytes) and a `label` (class name) column trains as well.", ""]
    lines += _arrow_table(faces)
    lines += ["", "File metadata: " + ", ".join(f"`{key.decode()}`" for key in faces.metadata) +
              " (the format, the class list as JSON, and the names of the AUs in `aus` when it has them). "
              "`import_report.json` beside the files counts rows per class and split.", "",
              "## Generated datasets", "",
              "`synfer generate` writes a dataset directory (a local path or a URI such as `s3://bucket/ds`):",
              "", "```text", _layout_block(), "```", "",
              "Names starting with `_` are skipped by pyarrow, Ray Data, DuckDB and Hugging Face readers, so "
              "`data/` reads as one table at any moment; `synfer inspect DIR` prints the card and checks every "
              "shard's checksum. Each row holds its image, everything that made it, and its labels:", "",
              "| column | what it holds |", "| --- | --- |"]
    lines += [f"| `{name}` | {_cell(text)} |" for name, text in {**PROVENANCE_COLUMNS, **LABEL_COLUMNS}.items()]
    return "\n".join(lines) + "\n"
