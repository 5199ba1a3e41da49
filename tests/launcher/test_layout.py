"""The layers: the training runtime never imports the evidence tools."""
import subprocess
import sys

from evidence.launch import ROOT


def test_the_training_path_imports_no_evidence_tool():
    code = ("import sys, launcher.pretrain, launcher.modeling, launcher.data, launcher.plan; "
            "bad = sorted(m for m in sys.modules if m == 'evidence' or m.startswith('evidence.')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

