"""The committed stubs in client/secant/v1 are exactly what scripts/gen_protos.py generates from
proto/ (Temporal's check-protos): edit the .proto, rerun the script, commit both."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "client" / "secant" / "v1"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    generated = _load_generator().generate(tmp_path)

    fresh = {path.name: path.read_text() for path in generated}
    committed = {path.name: path.read_text() for path in COMMITTED.glob("*.py*")}
    assert sorted(fresh) == sorted(committed), "stub files differ: rerun scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: rerun scripts/gen_protos.py and commit the result"


def test_the_stubs_describe_the_optimizer_service():
    from secant.v1 import optimizer_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Optimizer"]
    assert {m.name for m in service.methods} >= {
        "Solve", "Submit", "SubmitBatch", "Watch", "GetJob", "ListJobs", "CancelJob",
        "SolveWithCallbacks", "Train",
    }
