"""Test-wide set-up: every test talks to a local Hub server, never to huggingface.co.

``huggingface_hub`` and ``transformers`` read ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` once, when
they are first imported, so these variables are set here, at import time of this file, before any
test module (or plugin) imports them. Subprocesses started by tests inherit them.
"""

from __future__ import annotations

import os
import tempfile

from hf_merge.testing.net import free_port

os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-merge-tests-home-")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# A token from the environment would make "anonymous" requests authenticated.
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)

pytest_plugins = ["hf_merge.testing.fixtures_hub", "hf_merge.testing.fixtures_models"]
