"""Write the Helm chart's Grafana-dashboard ConfigMap template from deploy/grafana/turbofleet.json.

The JSON is the source: edit it, then run `python deploy/grafana/helm_template.py` (tests/test_grafana.py fails
while the two differ). The dashboard holds no `{{`, so it goes into the template verbatim.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "turbofleet.json"
TEMPLATE = HERE.parent / "helm" / "turbofleet" / "templates" / "grafana-dashboard.yaml"

HEAD = """{{- if .Values.grafanaDashboard.enabled }}
# The Grafana dashboard (deploy/grafana/turbofleet.json) as a ConfigMap for the Grafana sidecar, which loads
# every ConfigMap labelled grafanaDashboard.label. Written by deploy/grafana/helm_template.py: edit the JSON.
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "turbofleet.fullname" . }}-grafana-dashboard
  labels:
    {{- include "turbofleet.labels" . | nindent 4 }}
    {{ .Values.grafanaDashboard.label }}: "1"
data:
  turbofleet.json: |
"""
TAIL = "{{- end }}\n"


def template_text() -> str:
    text = json.dumps(json.loads(SOURCE.read_text()), indent=2)
    if "{{" in text:
        raise ValueError("the dashboard holds `{{`, which Helm would read as a template action")
    return HEAD + "".join(f"    {line}\n" for line in text.splitlines()) + TAIL


def main() -> int:
    TEMPLATE.write_text(template_text())
    print(f"wrote {TEMPLATE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
