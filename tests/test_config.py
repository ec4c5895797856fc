"""The configuration: defaults valid against the schema, every key documented."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _keys(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if key == "resources" and not prefix:
                yield dotted
                continue
            yield dotted
            yield from _keys(value, dotted + ".")


def test_every_config_key_is_documented():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    readme = (REPO / "config/README.md").read_text()
    missing = [
        k for k in _keys(config) if f"`{k}`" not in readme and not _section_documented(k, readme)
    ]
    assert missing == []


def _section_documented(key, readme):
    """A key whose whole subtree is a mapping is documented through its children."""
    return any(line.startswith(f"| `{key}.") for line in readme.splitlines())


def test_defaults_validate_against_the_schema():
    import jsonschema
    from referencing import Registry, Resource

    schema_dir = REPO / "config"

    def retrieve(uri):
        return Resource.from_contents(yaml.safe_load((schema_dir / uri).read_text()))

    schema = yaml.safe_load((schema_dir / "schema.yaml").read_text())
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    jsonschema.Draft202012Validator(schema, registry=Registry(retrieve=retrieve)).validate(config)


def test_conda_environments_hold_the_package_dependencies():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    runner = {"snakemake", "pygments"}  # Snakemake's (pygments: --report), not the jobs'
    names = {d.split(">")[0].split("=")[0].strip() for d in deps} - runner
    names = {"matplotlib-base" if n == "matplotlib" else n for n in names}
    for env in ("cryomatch.yaml", "cryomatch-gpu.yaml"):
        listed = yaml.safe_load((REPO / "envs" / env).read_text())["dependencies"]
        listed = {d.split(">")[0].split("=")[0].strip() for d in listed if isinstance(d, str)}
        assert names <= listed, (env, names - listed)
    assert "cupy" in (REPO / "envs/cryomatch-gpu.yaml").read_text()


def test_every_rule_has_log_benchmark_resources_and_code_input():
    import re

    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"(?m)^(?=rule \w+:)", smk.read_text())[1:]:
            name = block.split(":", 1)[0].split()[1]
            for section in ("log:", "benchmark:", "resources:", "conda:", "code=code("):
                assert section in block, f"{smk.name}: rule {name} has no {section}"
