# Two environments, chosen on purpose:
#   .venv       the main job: torch 2.13.0 CPU wheel (small), the package and nothing else.
#   .venv-test  the test suite: torch 2.14.1 + torchvision 0.29.1, because the conversion
#               parity tests compare against timm, and timm imports torchvision; gradio for the app tests.
PY ?= python3
PIP_FLAGS ?= -q --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_EVALUATE_OFFLINE ?= 1

.PHONY: demo lint format test test-slow test-floors clean

.venv/.installed: pyproject.toml
	$(PY) -m venv .venv
	.venv/bin/pip install $(PIP_FLAGS) torch==2.13.0
	.venv/bin/pip install $(PIP_FLAGS) -e .
	touch $@

.venv-test/.installed: pyproject.toml
	$(PY) -m venv .venv-test
	.venv-test/bin/pip install $(PIP_FLAGS) torch==2.14.1 torchvision==0.29.1
	.venv-test/bin/pip install $(PIP_FLAGS) -e '.[test,app]'
	touch $@

demo: .venv/.installed
	.venv/bin/fit3d demo $(ARGS)

# Formatting, lint and the import layering (pyproject.toml: [tool.ruff], [tool.importlinter]).
lint: .venv-test/.installed
	.venv-test/bin/ruff format --check .
	.venv-test/bin/ruff check .
	.venv-test/bin/lint-imports

format: .venv-test/.installed
	.venv-test/bin/ruff format .
	.venv-test/bin/ruff check --fix .

test: lint
	.venv-test/bin/python -m pytest -m "not slow and not cuda" -q $(ARGS)

test-slow: .venv-test/.installed
	.venv-test/bin/python -m pytest -m "slow or cuda" -q -rs $(ARGS)

# The lowest versions pyproject.toml allows (uv's lowest-direct resolution, overrides in
# tests/floors_overrides.txt), then the fast tests of the stages that use those libraries.
test-floors:
	$(PY) -m venv .venv-floors
	.venv-floors/bin/pip install $(PIP_FLAGS) uv
	VIRTUAL_ENV=.venv-floors .venv-floors/bin/uv pip install -q --resolution lowest-direct \
		--override tests/floors_overrides.txt -e . "pytest>=8"
	.venv-floors/bin/python -m pytest -m "not slow and not cuda" -q -p no:cacheprovider \
		tests/test_modeling.py tests/test_targets.py tests/test_hub.py tests/test_finetune.py tests/test_metrics.py

clean:
	rm -rf .venv .venv-test .venv-floors
