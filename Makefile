# shelfmatch: the two commands are `make demo` and `make test`; both set everything up themselves.
#
#   make demo [MODEL=efficientnet_lite0|resnet18|...]  build a catalogue, start Kafka, stream photos, show matches
#   make test                                         unit + integration tests against a real Kafka broker
#   make kafka-start / kafka-stop                     a local Apache Kafka 4.x broker for development
#   make lock                                         re-pin requirements.lock from pyproject.toml

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= efficientnet_lite0
UV_VERSION := 0.13.9
PYTEST_ARGS ?=

.PHONY: install demo test kafka-start kafka-stop lock clean

# The virtual environment is rebuilt when the pinned dependencies change. uv keeps one copy of
# each wheel in its cache (~/.cache/uv), so a fresh clone installs torch in seconds, not minutes.
$(BIN)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python scripts/demo.py --model $(MODEL)

test: install
	$(BIN)/python -m pytest -p no:cacheprovider -ra $(PYTEST_ARGS)

kafka-start:
	scripts/kafka-local start

kafka-stop:
	scripts/kafka-local stop

lock: install
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements.lock

clean:
	rm -rf $(VENV) .cache out
