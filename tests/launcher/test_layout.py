"""The layers: the training runtime never imports the evidence tools."""
import re
import subprocess
import sys

from evidence.launch import ROOT


def test_the_training_path_imports_no_evidence_tool(spawns):
    code = ("import sys, launcher.pretrain, launcher.modeling, launcher.data, launcher.plan; "
            "bad = sorted(m for m in sys.modules if m == 'evidence' or m.startswith('evidence.')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr



def test_deepspeed_is_imported_by_the_engine_module_only(spawns):
    """The distributed environment and collectives load without DeepSpeed; no other module names it."""
    code = ("import sys, launcher.distributed, launcher.data, launcher.modeling; "
            "sys.exit(1 if 'deepspeed' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    importers = sorted(str(f.relative_to(ROOT)) for package in ("launcher", "evidence", "model", "data_pipeline")
                       for f in (ROOT / package).rglob("*.py")
                       if re.search(r"^\s*(import|from) deepspeed\b", f.read_text(), re.M))
    assert importers == ["launcher/engine.py"]


def test_every_user_error_class_derives_from_user_error():
    """Each *Error class of the project is a UserError, which every tool's main turns into one line and exit 2."""
    import ast
    import importlib

    from data_pipeline.errors import UserError
    found = {}
    for package in ("launcher", "evidence", "data_pipeline"):
        for f in sorted((ROOT / package).rglob("*.py")):
            names = [n.name for n in ast.parse(f.read_text()).body if isinstance(n, ast.ClassDef)
                     and n.name.endswith("Error")]
            if names:
                module = importlib.import_module(".".join(f.relative_to(ROOT).with_suffix("").parts))
                found.update({f"{module.__name__}.{n}": getattr(module, n) for n in names})
    assert len(found) >= 10 and "launcher.config.ConfigError" in found
    assert [name for name, cls in found.items() if not issubclass(cls, UserError)] == []
