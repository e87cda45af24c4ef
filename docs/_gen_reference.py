"""mkdocs-gen-files: writes the reference pages from the code at each build (synfer_ray/reference.py)."""

import json

import mkdocs_gen_files

from synfer_ray import reference

PAGES = {
    "reference/config.md": reference.config_reference,
    "reference/cli.md": reference.cli_reference,
    "reference/http-api.md": reference.http_api_reference,
    "reference/formats.md": reference.formats_reference,
}

for page, render in PAGES.items():
    with mkdocs_gen_files.open(page, "w") as out:
        out.write(render())
    mkdocs_gen_files.set_edit_path(page, "../synfer_ray/reference.py")

with mkdocs_gen_files.open("reference/openapi.json", "w") as out:
    json.dump(reference.openapi_schema(), out, indent=2)
