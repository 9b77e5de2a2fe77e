"""``trustfed new DIR --template tabular|vision|text|assistant``: a ready federation project.

A project holds the app module (the organisation's own code: model, data loader), the federation
file, one participant file per site pointing at that site's own data folder, small generated sample
data, a README and a test. ``trustfed simulate`` and ``trustfed server`` / ``client`` run it as written.
The assistant template also holds its base language model: ``trustfed new`` pre-trains a tiny one
(:func:`trustfed.apps.assistant.model.pretrain_base`, saved with safetensors into ``base/``), since
nothing is downloaded.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np

from trustfed.errors import ConfigError, ConfigProblem
from trustfed.templates import assistant_project, samples

TEMPLATES = {
    "tabular": "hospitals predict patients' risk class from a table (CSV) each keeps",
    "vision": "sites classify handwritten digits from image folders each keeps",
    "text": "assistant vendors classify user requests (JSON lines) each keeps",
    "assistant": "assistant vendors fine-tune one tool-calling language model with LoRA on the chats each keeps",
}
_LOOP = """[training]                             # the built-in training loop (the app may bring its own train)
local_epochs = 2
batch_size = 32
lr = {lr}
optimizer = "adam"
loss = "cross_entropy"
metrics = ["accuracy"]
evaluate_every = 1                     # each site scores the global model on its own eval data"""
_SETTINGS = {
    "tabular": {"rounds": "10", "config": "hidden = 32", "training": _LOOP.format(lr=0.01)},
    "vision": {"rounds": "10", "config": "size = 8\nchannels = 16", "training": _LOOP.format(lr=0.005)},
    "text": {"rounds": "10", "config": "vocab = 4096\ndim = 32\nlength = 16", "training": _LOOP.format(lr=0.02)},
    "assistant": {
        "rounds": "6",
        "config": assistant_project.APP_CONFIG,
        "training": assistant_project.TRAINING,
        "privacy": assistant_project.PRIVACY,
    },
}


def package_name(folder: Path) -> str:
    """The project's Python package: its folder's name as an identifier, plus ``_app``."""
    stem = re.sub(r"[^0-9a-zA-Z_]", "_", folder.resolve().name).strip("_").lower() or "project"
    if stem[0].isdigit():
        stem = "p_" + stem
    return f"{stem}_app"


def _federation_file(name: str, template: str, package: str, sites: int) -> str:
    s = _SETTINGS[template]
    sim = "\n".join(f'[simulation.data.p{i:03d}]\npath = "sites/p{i:03d}/data"\n' for i in range(sites))
    return f"""# {name}: a trustfed federation ({template} template). Run it:
#   trustfed simulate --config federation.toml --out runs/sim          (every site on this machine)
#   trustfed server --config federation.toml --out runs/live           (the coordinator; see README.md)

[federation]
name = "{name}"
rounds = {s["rounds"]}
participants = {sites}
seed = 0

[app]                                  # the organisations' own code: {package}/app.py
target = "{package}.app:app"

[app.config]                           # handed to the app as ctx.config
{s["config"]}

{s["training"]}

[strategy]
name = "fedavg"
min_participants = {min(2, sites)}
{s.get("privacy", "")}
# In simulation each virtual participant reads the folder its real site would.
{sim}
[transport]                            # `trustfed server`: mutual TLS with the certificates in pki/
listen = "127.0.0.1:50051"
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator.key"
crl = "pki/crl.pem"

[ledger]                               # every round in a signed audit log and on an embedded EVM chain
enabled = true                         # (OUT/ledger): `trustfed audit verify OUT` re-checks the run
"""


def _participant_file(pid: str) -> str:
    return f"""# Site {pid}: its own data stays in data/. Run it with  trustfed client --config participant.toml
[participant]
id = "{pid}"                           # equals the name in its certificate
coordinator = "127.0.0.1:50051"
federation_config = "../../federation.toml"

[tls]
ca = "../../pki/ca.pem"
cert = "../../pki/{pid}.pem"
key = "../../pki/{pid}.key"
crl = "../../pki/crl.pem"

[data]                                 # handed to the app's data loader (trustfed.app.DataSpec)
path = "data"

[ledger]                               # check every model received, and the inclusion of this site's
dir = "../../runs/live/ledger"         # commitments, against the run's chain (the coordinator's OUT/ledger)
"""


def _readme(name: str, template: str, package: str, sites: int) -> str:
    ids = " ".join(f"p{i:03d}" for i in range(sites))
    return f"""# {name}

A trustfed federation project (template `{template}`): {TEMPLATES[template]}.

- `{package}/app.py`: the app, the code every site runs: the model and the data loader.
- `federation.toml`: rounds, training, strategy; `[app.config]` is handed to the app.
- `sites/<id>/participant.toml` and `sites/<id>/data/`: each site's own file and data (generated samples).
- `tests/test_project.py`: runs the federation at small size (`pytest tests`).
{assistant_project.README if template == "assistant" else ""}
## Run it on this machine
```bash
trustfed simulate --config federation.toml --out runs/sim
```
metrics.json names the app, its code hash and each site's data manifest hash; each round's
`federated_evaluation` is the sites' example-weighted score of the model on their own eval data.

## Run it as separate processes (one per site)
```bash
trustfed pki init --out pki
trustfed pki issue --ca pki --role coordinator --name coordinator --host 127.0.0.1
for id in {ids}; do trustfed pki issue --ca pki --role participant --name $id; done
trustfed server --config federation.toml --out runs/live &
for id in {ids}; do trustfed client --config sites/$id/participant.toml & done; wait
trustfed audit verify runs/live      # signatures, hash chain, commitments, Merkle roots, the chain: VERIFIED
```
Each site then copies only its own key, certificate and participant file; its data never leaves `sites/<id>/data/`.
Each site checks every model it receives against the run's chain (`[ledger] dir` in its participant
file: here the coordinator's `runs/live/ledger`; across machines, a copy of it or a JSON-RPC node).

## Bring your own data
Point `[data] path` in a site's participant file at its folder; add keys there for the loader
(`spec.options`). Change `{package}/app.py` for your own features, model or training code.
"""


def _project_test(package: str) -> str:
    return f'''"""The federation runs end to end at small size (2 rounds)."""

import math
from pathlib import Path

from trustfed.config import load_federation_config
from trustfed.simulation.runner import run_simulation

PROJECT = Path(__file__).resolve().parents[1]


def test_federation_runs(tmp_path: Path) -> None:
    cfg = load_federation_config(PROJECT / "federation.toml")
    cfg = cfg.model_copy(update={{"federation": cfg.federation.model_copy(update={{"rounds": 2}})}})
    result = run_simulation(cfg, tmp_path / "run")
    assert result.metrics["app"]["target"] == "{package}.app:app"
    last = result.metrics["rounds"][-1]["federated_evaluation"]
    assert math.isfinite(last["loss"]) and last["participants"] == cfg.federation.participants
'''


def new_project(
    folder: Path, template: str, *, sites: int = 3, seed: int = 0, scale: int = 1, base_steps: int | None = None
) -> Path:
    """Write a project of ``template`` into ``folder`` (which must not exist or be empty); returns
    its federation file. ``scale`` multiplies the generated sample sizes; ``base_steps``: the
    assistant's base model pre-training steps (default :data:`assistant_project.BASE_STEPS`)."""
    problems = []
    if template not in TEMPLATES:
        problems.append(ConfigProblem("--template", f"expected one of {', '.join(TEMPLATES)}", repr(template)))
    elif template == "assistant":
        problems += assistant_project.missing_extras()
    if not 2 <= sites <= 20:
        problems.append(ConfigProblem("--sites", "expected 2 to 20 sites", str(sites)))
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        problems.append(ConfigProblem("DIR", "exists and is not an empty folder; choose a new one", str(folder)))
    if problems:
        raise ConfigError("trustfed new", problems)
    package = package_name(folder)
    name = folder.resolve().name
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text(f'"""{name}: a trustfed federation app."""\n', encoding="utf-8")
    source = resources.files("trustfed.templates").joinpath(f"{template}_app.py").read_text(encoding="utf-8")
    (folder / package / "app.py").write_text(source, encoding="utf-8")
    rng = np.random.default_rng(seed)
    data_dirs = []
    for i in range(sites):
        site = folder / "sites" / f"p{i:03d}"
        (site / "data").mkdir(parents=True)
        (site / "participant.toml").write_text(_participant_file(f"p{i:03d}"), encoding="utf-8")
        data_dirs.append(site / "data")
        if template == "tabular":
            samples.write_tabular(site / "data", rng, i, scale)
        elif template == "text":
            samples.write_text(site / "data", rng, i, scale)
        elif template == "assistant":
            assistant_project.write_chats(site / "data", rng, i, scale)
    if template == "vision":
        samples.write_vision(data_dirs, rng, scale)
    if template == "assistant":
        assistant_project.write_base(folder / "base", seed, base_steps)
    fed = folder / "federation.toml"
    fed.write_text(_federation_file(name, template, package, sites), encoding="utf-8")
    (folder / "README.md").write_text(_readme(name, template, package, sites), encoding="utf-8")
    (folder / "tests").mkdir()
    (folder / "tests" / "test_project.py").write_text(_project_test(package), encoding="utf-8")
    (folder / ".gitignore").write_text("runs/\npki/*.key\n__pycache__/\n", encoding="utf-8")
    return fed
