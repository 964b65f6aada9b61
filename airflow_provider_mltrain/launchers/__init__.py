"""Ways to run a trainer other than a Kubernetes pod (the local subprocess launcher)."""

from __future__ import annotations
