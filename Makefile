# The two commands of README.md. Both set up .venv first (idempotent: only installs what is missing).
.PHONY: setup demo test lint mutation

setup:
	bash scripts/bootstrap.sh

# main job on the embedded default models (MediaPipe, inside its wheel): photos -> teacher-ready dataset + preview
demo: setup
	.venv/bin/appleswap preprocess examples/faces out/demo --face-selector all --preview

test: setup
	.venv/bin/python -m pytest -n 2 -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check src tests

# developer tool, not CI: mutation score per core module (slow; one target: make mutation TARGETS=weights)
mutation: setup
	.venv/bin/python scripts/mutation.py $(TARGETS)
