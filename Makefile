# shelfmatch: the two commands are `make demo` and `make test`; both set everything up themselves.
#
#   make demo [MODEL=efficientnet_lite0|resnet18|...]  build a catalogue, start Kafka, stream photos, show matches
#   make test                                         static checks, then unit + integration tests on a real broker
#   make lint                                         the static checks alone: ruff, then mypy (see pyproject.toml)
#   make kafka-start / kafka-stop                     a local Apache Kafka 4.x broker for development
#   make lock                                         re-pin requirements.lock from pyproject.toml
#   make tools                                        build the deployment checkers once into .cache/tools/
#   make chart-sync                                   copy the dashboards of deploy/grafana/ into the Helm chart

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= efficientnet_lite0
UV_VERSION := 0.13.9
PYTEST_ARGS ?=

.PHONY: install demo test lint kafka-start kafka-stop lock clean tools chart-sync FORCE

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

# Static checks fail the run before any test starts (both read their settings from pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install tools lint
	$(BIN)/python -m pytest -p no:cacheprovider -ra $(PYTEST_ARGS)

kafka-start:
	scripts/kafka-local start

kafka-stop:
	scripts/kafka-local stop

lock: install
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements.lock

# Deployment checks (tests/deploy) run these offline. They are built once from the Go module proxy
# into .cache/tools/ (git-ignored); a stamp per version makes later runs no-ops. hadolint and the
# Kubernetes JSON schemas (kubernetes-validate) come from PyPI with the test extra instead.
# helm is linked the way its own Makefile links it, so that it reports its version and checks
# against the Kubernetes version of its client libraries, not the 1.20 fallback.
TOOLS := .cache/tools
HELM_VERSION := v3.22.0
HELM_K8S_MINOR := 37
KUBE_SCORE_VERSION := v1.20.0
GO_INSTALL := GOBIN=$(abspath $(TOOLS)) GOFLAGS="-p=1 -buildvcs=false" go install
HELM_LDFLAGS := -s -w -X helm.sh/helm/v3/internal/version.version=$(HELM_VERSION) \
	-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$(HELM_K8S_MINOR) \
	-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$(HELM_K8S_MINOR)

# A stamp whose binary went missing is rebuilt too.
$(TOOLS)/.helm-$(HELM_VERSION): $(if $(wildcard $(TOOLS)/helm),,FORCE)
	@mkdir -p $(TOOLS)
	$(GO_INSTALL) -ldflags '$(HELM_LDFLAGS)' helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
	@rm -f $(TOOLS)/.helm-*
	touch $@

$(TOOLS)/.kube-score-$(KUBE_SCORE_VERSION): $(if $(wildcard $(TOOLS)/kube-score),,FORCE)
	@mkdir -p $(TOOLS)
	$(GO_INSTALL) -ldflags '-s -w -X main.version=$(KUBE_SCORE_VERSION:v%=%)' github.com/zegl/kube-score/cmd/kube-score@$(KUBE_SCORE_VERSION)
	@rm -f $(TOOLS)/.kube-score-*
	touch $@

# promtool runs the alert rules' unit tests (tests/deploy/alerts). Prometheus 3.x tags its Go module
# v0.3XX.Y for release 3.XX.Y. The module is large: the first build takes minutes, later ones are no-ops.
PROMETHEUS_VERSION := 3.16.0
PROMTOOL_MODULE_VERSION := v0.316.0
$(TOOLS)/.promtool-$(PROMTOOL_MODULE_VERSION): $(if $(wildcard $(TOOLS)/promtool),,FORCE)
	@mkdir -p $(TOOLS)
	$(GO_INSTALL) -ldflags '-s -w -X github.com/prometheus/common/version.Version=$(PROMETHEUS_VERSION)' \
		github.com/prometheus/prometheus/cmd/promtool@$(PROMTOOL_MODULE_VERSION)
	@rm -f $(TOOLS)/.promtool-*
	touch $@

tools: $(TOOLS)/.helm-$(HELM_VERSION) $(TOOLS)/.kube-score-$(KUBE_SCORE_VERSION) $(TOOLS)/.promtool-$(PROMTOOL_MODULE_VERSION)

FORCE:

# The dashboards' one source is deploy/grafana/ (operations, compliance); the chart carries copies
# (helm packages no symlinks), and tests/deploy fails when they differ.
chart-sync:
	cp deploy/grafana/shelfmatch.json deploy/grafana/shelfmatch-compliance.json helm/shelfmatch/dashboards/

clean:
	rm -rf $(VENV) .cache out
