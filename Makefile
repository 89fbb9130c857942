# shelfmatch: the two commands are `make demo` and `make test`; both set everything up themselves.
#
#   make demo [MODEL=efficientnet_lite0|resnet18|...]  build a catalogue, start Kafka, stream photos, show matches
#   make test                                         static checks, then unit + integration tests on a real broker
#   make lint                                         the static checks alone: ruff, then mypy (see pyproject.toml)
#   make kafka-start / kafka-stop                     a local Apache Kafka 4.x broker for development
#   make lock                                         re-pin requirements.lock from pyproject.toml
#   make tools                                        build the deployment checkers once into .cache/tools/
#   make chart-sync                                   copy the dashboards of deploy/grafana/ into the Helm chart
#   make image                                        build the Dockerfile for real with podman (tests/deploy/test_image.py;
#                                                     image-space, its disk check, runs first)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= efficientnet_lite0
UV_VERSION := 0.13.9
PYTEST_ARGS ?=

.PHONY: install demo test lint kafka-start kafka-stop lock clean tools chart-sync image image-tools image-space image-build FORCE

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

test: install tools lint image
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

# The image, built for real from the Dockerfile (docs/operations.md, "Build the image"). There is
# no Docker engine here: Debian's podman builds with chroot isolation, on a Debian base that
# mmdebstrap makes from Debian's packages (python:3.11-slim cannot be pulled here), passed as the
# PYTHON_IMAGE build argument, so the public default stays. The wheels come from the uv cache
# that `make install` fills, bind-mounted into the build. The stamps hold the image ids (the tags
# are shared by every checkout on the machine) and make a rerun a no-op; tests/deploy/test_image.py
# reads them.
IMAGE_OUT := out/image
IMAGE_BASE_SUITE := bookworm
IMAGE_BASE := localhost/shelfmatch-base:$(IMAGE_BASE_SUITE)
IMAGE := localhost/shelfmatch:dev
IMAGE_SOURCES := Dockerfile .dockerignore pyproject.toml requirements.lock README.md \
	$(shell find catalog consumer -name '*.py' 2>/dev/null)
# The base by the id its stamp recorded (as tests/deploy/test_image.py rebuilds it), not by its tag,
# which another checkout on the same machine may have moved.
PODMAN_BUILD = podman build --isolation=chroot --format docker --build-arg PYTHON_IMAGE=$$(cat $(IMAGE_OUT)/base.id) \
	-v "$$($(BIN)/uv cache dir)":/root/.cache/uv

# Installs the builders when missing (CI runs as root on a clean Debian machine like this one).
image-tools:
	@command -v podman >/dev/null && command -v mmdebstrap >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman mmdebstrap; }

# A stamp whose image is gone (podman rmi, prune) is rebuilt; checked only when an image is wanted.
ifneq ($(filter image test,$(MAKECMDGOALS)),)
image_gone = $(if $(shell podman image exists "$$(cat $(1) 2>/dev/null)" 2>/dev/null && echo y),,FORCE)
IMAGE_BASE_GONE := $(call image_gone,$(IMAGE_OUT)/base.id)
IMAGE_GONE := $(call image_gone,$(IMAGE_OUT)/image.id)
endif

# A checkout whose stamp is missing (every clean clone, CI) reuses the base that another one made
# from the same scripts/image-base, found by a tag keyed on that script's content, instead of making
# a new one: a new base has a new id, which misses podman's layer cache for the 6 GB dependency
# layers and stores them again (two clean clones on a full machine once ran it out of disk).
# Builds on one machine share podman's store, so the base and the image are made under one lock.
IMAGE_LOCK := flock /var/tmp/shelfmatch-image.lock
IMAGE_BASE_KEYED = $(IMAGE_BASE)-$(shell sha256sum scripts/image-base | cut -c1-12)
$(IMAGE_OUT)/base.id: scripts/image-base $(IMAGE_BASE_GONE) | image-tools
	@mkdir -p $(IMAGE_OUT)
	@$(IMAGE_LOCK) sh -c 'if podman image exists $(IMAGE_BASE_KEYED); then echo "reusing $(IMAGE_BASE_KEYED)"; \
	else scripts/image-base $(IMAGE_BASE_SUITE) $(IMAGE_BASE_KEYED) $(IMAGE_OUT) && podman tag $(IMAGE_BASE_KEYED) $(IMAGE_BASE); fi'
	podman image inspect --format '{{.Id}}' $(IMAGE_BASE_KEYED) > $@

# Before a build: below 20 GB free for podman's store and /var/tmp (a cold build writes the 6 GB
# dependency layer twice, the deps stage and the runtime's copy, plus a blob in /var/tmp), untagged
# images older than a day are pruned (an older checkout's image is untagged too, but a day old is
# past any test that reads it); below 8 GB after that, the build stops with what to look at. After a
# failed build, the buildah working containers that it left (not there before it) are removed: a
# commit that ran out of disk once left three, 6 GB each, which no prune removes.
IMAGE_PRUNE_BELOW_GB := 20
IMAGE_MIN_FREE_GB := 8
image-space: | image-tools
	@root=$$(podman info --format '{{.Store.GraphRoot}}') || exit 1; mkdir -p "$$root"; \
	free() { df -P -BG "$$root" /var/tmp | awk 'NR>1 {gsub("G","",$$4); print $$4}' | sort -n | head -n 1; }; \
	if [ "$$(free)" -lt $(IMAGE_PRUNE_BELOW_GB) ]; then \
	  echo "$$(free) GB free for podman ($$root, /var/tmp): pruning untagged images older than 24 h"; \
	  podman image prune -f --filter until=24h >/dev/null; echo "now $$(free) GB free"; fi; \
	if [ "$$(free)" -lt $(IMAGE_MIN_FREE_GB) ]; then \
	  echo "$$(free) GB free, $(IMAGE_MIN_FREE_GB) needed at least: see 'podman images' and 'podman ps -a --external' (leftover build containers: podman rm -f --storage ID)" >&2; exit 1; fi

build_containers = podman ps -a --external --format '{{.ID}} {{.Names}}' | awk '$$2 ~ /-working-container/ {print $$1}' | sort
$(IMAGE_OUT)/image.id: $(IMAGE_OUT)/base.id $(IMAGE_SOURCES) $(BIN)/.installed $(IMAGE_GONE) | image-tools
	@$(IMAGE_LOCK) $(MAKE) --no-print-directory image-build

image-build: image-space
	@start=$$(date +%s); before=$$($(build_containers)); \
	if $(PODMAN_BUILD) --iidfile $(IMAGE_OUT)/image.id.tmp -t $(IMAGE) .; then \
		mv $(IMAGE_OUT)/image.id.tmp $(IMAGE_OUT)/image.id && echo "image $(IMAGE) built in $$(( $$(date +%s) - start )) s"; \
	else echo "$$before" > $(IMAGE_OUT)/containers.before; \
		$(build_containers) | comm -13 $(IMAGE_OUT)/containers.before - | xargs -r podman rm -f --storage >/dev/null; \
		rm -f $(IMAGE_OUT)/containers.before; exit 1; fi

image: $(IMAGE_OUT)/image.id

# The dashboards' one source is deploy/grafana/ (operations, compliance); the chart carries copies
# (helm packages no symlinks), and tests/deploy fails when they differ.
chart-sync:
	cp deploy/grafana/shelfmatch.json deploy/grafana/shelfmatch-compliance.json helm/shelfmatch/dashboards/

clean:
	rm -rf $(VENV) .cache out
